"""Weight + activation int8 GEMM: ``y = (qx @ qw.T) * x_scale * w_scale + bias``.

The GEMM runs on int8 codes with int32 accumulation; the dequantization (``x_scale * w_scale``, then
the bias) is the epilogue, and the output comes back in the caller's dtype. Scales::

    qx       [M, K] int8, symmetric codes in [-127, 127]
    x_scale  [] (per tensor) or [M, 1] / [M] (per token), float
    qw       [N, K] int8, symmetric codes
    w_scale  [] / [1] (per tensor) or [N] / [N, 1] (per output channel), float

Activation quantizers (symmetric int8, zero point 0): ``quantize_per_token`` and
``quantize_per_tensor`` (dynamic: the scale comes from this call's absmax) and ``quantize_static``
(a calibrated scale, values beyond its range clipped).

Backends, all exact in int32:

- ``ref``: int64 matmul in plain torch (the test oracle; slow).
- ``int_mm``: ``torch._int_mm`` with the weight kept ``[N, K]`` and passed as ``qw.t()`` (measured
  faster than a contiguous ``[K, N]`` copy, see CPU_KERNELS.md).
- ``onednn``: ``onednn.qlinear_pointwise`` on a prepacked weight. Activations go in as uint8 with
  zero point 128 (``qx + 128``): on CPUs without AMX torch 2.13 falls back to a reference loop
  for int8 activations (a 512x576x1536 GEMM took 13 s here, against 16 ms for uint8). The op takes
  one activation scale, so per-token scales are applied to its fp32 output.

``prepare_int8`` builds what the backends need once from the canonical ``[N, K]`` int8 weight;
``int8_gemm`` picks one (explicit argument, then ``LOWBIT_INT8_BACKEND``, then ``auto``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lowbit.errors import SpecError
from lowbit.kernels._dispatch import forced_backend

__all__ = [
    "ACT_MODES",
    "BACKENDS",
    "BACKEND_ENV",
    "QMAX",
    "int8_available_backends",
    "int8_gemm",
    "int8_gemm_ref",
    "prepare_int8",
    "quantize_activation",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_static",
    "select_int8_backend",
]

BACKENDS = ("ref", "int_mm", "onednn")
BACKEND_ENV = "LOWBIT_INT8_BACKEND"  # force a backend (tests, benchmarks); "auto" or unset: dispatch
QMAX = 127  # symmetric int8: -128 is left out so that -q is always representable
# Floor of an activation scale: an all-zero row (padding, a dead channel group) must not divide by 0.
SCALE_EPS = 1e-12

ACT_MODES = ("per_token", "per_tensor", "static")


# ----------------------------------------------------------------------------------------
# activation quantizers


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() / scale), -QMAX, QMAX).to(torch.int8)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: codes like x, scales ``[..., 1]`` float32 (each row's absmax / 127)."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().div_(QMAX).clamp_(min=SCALE_EPS)
    return _codes(x, scale), scale


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor int8: codes like x, one float32 scale ``[]`` (the tensor's absmax / 127)."""
    scale = x.detach().abs().amax().float().div(QMAX).clamp(min=SCALE_EPS)
    return _codes(x, scale), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """int8 codes of x on a given (calibrated) per-tensor scale; values beyond it are clipped."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.numel() != 1:
        raise SpecError(f"int8: a static activation scale has one element, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or float(s) <= 0:
        raise SpecError(f"int8: a static activation scale must be finite and positive, got {float(s)}")
    return _codes(x, s.reshape(()))


def quantize_activation(x: torch.Tensor, mode: str, scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) for ``mode`` in ``ACT_MODES``; "static" needs ``scale``."""
    if mode == "per_token":
        return quantize_per_token(x)
    if mode == "per_tensor":
        return quantize_per_tensor(x)
    if mode == "static":
        if scale is None:
            raise SpecError("int8: static activation quantization needs a calibrated input scale")
        return quantize_static(x, scale), scale.float().reshape(())
    raise SpecError(f"int8: unknown activation mode {mode!r}; choose from {ACT_MODES}")


# ----------------------------------------------------------------------------------------
# checks and the epilogue


def _check(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates shapes; returns the scales as float32 ``[M, 1] or []`` and ``[N] or []``."""
    if qx.dtype != torch.int8 or qx.dim() != 2:
        raise SpecError(f"int8_gemm: qx must be int8 [M, K], got {qx.dtype} {tuple(qx.shape)}")
    if qw.dtype != torch.int8 or qw.dim() != 2:
        raise SpecError(f"int8_gemm: the weight must be int8 [N, K], got {qw.dtype} {tuple(qw.shape)}")
    m, k = qx.shape
    n = qw.shape[0]
    if qw.shape[1] != k:
        raise SpecError(f"int8_gemm: qx has {k} features, the weight expects {qw.shape[1]}")
    xs = torch.as_tensor(x_scale, dtype=torch.float32, device=qx.device)
    if xs.numel() == 1:
        xs = xs.reshape(())
    elif xs.numel() == m:
        xs = xs.reshape(m, 1)
    else:
        raise SpecError(f"int8_gemm: x_scale must have 1 or M={m} elements, got shape {tuple(xs.shape)}")
    ws = torch.as_tensor(w_scale, dtype=torch.float32, device=qx.device)
    if ws.numel() == 1:
        ws = ws.reshape(())
    elif ws.numel() == n:
        ws = ws.reshape(n)
    else:
        raise SpecError(f"int8_gemm: w_scale must have 1 or N={n} elements, got shape {tuple(ws.shape)}")
    return xs, ws


def _epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """float32 acc * x_scale * w_scale (+ bias), then out_dtype. acc may be int32 or float32."""
    y = acc.to(torch.float32)
    y.mul_(xs)
    y.mul_(ws)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(out_dtype)


def int8_gemm_ref(qx: torch.Tensor, x_scale, qw: torch.Tensor, w_scale, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The oracle: exact integer accumulation in int64 (checked to fit int32), then the epilogue."""
    xs, ws = _check(qx, x_scale, qw, w_scale)
    acc = qx.to(torch.int64) @ qw.to(torch.int64).t()
    if acc.numel() and int(acc.abs().max()) >= 2**31:
        raise SpecError("int8_gemm: accumulation overflows int32 (K too large for int8 codes)")
    return _epilogue(acc.to(torch.int32), xs, ws, bias, out_dtype)


# ----------------------------------------------------------------------------------------
# preparation and dispatch


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if callable(probe) else False


def prepare_int8(qw: torch.Tensor, *, backends: str | Iterable[str] = "auto") -> dict[str, torch.Tensor]:
    """Runtime tensors for the backends from the canonical int8 weight ``[N, K]``.

    Every result keeps ``int8_weight`` (the canonical weight; ``ref`` and ``int_mm`` read it). The
    oneDNN prepacked weight (its own layout, as large again) is added when asked for, or under
    ``auto`` on CPUs with AMX, where that path is the fast one.
    """
    if qw.dtype != torch.int8 or qw.dim() != 2:
        raise SpecError(f"int8: the weight must be int8 [N, K], got {qw.dtype} {tuple(qw.shape)}")
    if isinstance(backends, str) and backends == "auto":
        wanted = {"onednn"} if (_has_amx() and qw.device.type == "cpu") else set()
    else:
        wanted = {backends} if isinstance(backends, str) else set(backends)
        unknown = wanted - set(BACKENDS)
        if unknown:
            raise SpecError(f"int8: unknown backend(s) {sorted(unknown)}; choose from {BACKENDS}")
    out = {"int8_weight": qw}
    if "onednn" in wanted:
        if qw.device.type != "cpu":
            raise SpecError("int8: the onednn backend runs on CPU tensors only")
        out["onednn_weight"] = torch.ops.onednn.qlinear_prepack(qw.contiguous(), None)
    return out


def int8_available_backends(prepared: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    have = ["ref"]
    if "int8_weight" in prepared and prepared["int8_weight"].device.type == "cpu":
        have.append("int_mm")
    if "onednn_weight" in prepared:
        have.append("onednn")
    return tuple(have)


def select_int8_backend(prepared: Mapping[str, torch.Tensor], backend: str = "auto") -> str:
    """An explicit ``backend`` wins, then ``LOWBIT_INT8_BACKEND``, then ``auto``: oneDNN when its
    weight was prepared (AMX), else ``torch._int_mm``."""
    have = int8_available_backends(prepared)
    forced = forced_backend("int8", backend, BACKEND_ENV, BACKENDS, have)
    if forced is not None:
        return forced
    for name in ("onednn", "int_mm"):
        if name in have:
            return name
    return "ref"


def _run_onednn(qx, xs, packed, ws, n):
    # uint8 activations with zero point 128 are the same values as the int8 codes (see module doc)
    qxu = (qx.to(torch.int16) + 128).to(torch.uint8)
    per_tensor = xs.dim() == 0
    w_scales = ws.expand(n).contiguous() if ws.dim() == 0 else ws.contiguous()
    zeros = torch.zeros(n, dtype=torch.long)
    y = torch.ops.onednn.qlinear_pointwise(qxu, float(xs) if per_tensor else 1.0, 128, packed, w_scales, zeros,
                                           None, 1.0, 0, torch.float32, "none", [], "")
    return y if per_tensor else y.mul_(xs)


def int8_gemm(qx: torch.Tensor, x_scale, w_prepared: Mapping[str, torch.Tensor], w_scale,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, *,
              backend: str = "auto") -> torch.Tensor:
    """``qx [..., K]`` int8 times the prepared weight ``[N, K]`` -> ``[..., N]`` in ``out_dtype``,
    with int32 accumulation and ``x_scale * w_scale`` (+ bias) applied to the accumulator."""
    qw = w_prepared["int8_weight"]
    n, k = qw.shape
    if qx.shape[-1] != k:
        raise SpecError(f"int8_gemm: qx has {qx.shape[-1]} features, the weight expects {k}")
    lead = qx.shape[:-1]
    qx2 = qx.reshape(-1, k)
    xs = torch.as_tensor(x_scale)
    if xs.numel() > 1:
        xs = xs.reshape(-1)
    name = select_int8_backend(w_prepared, backend)
    if qx2.shape[0] == 0:
        return torch.zeros(*lead, n, dtype=out_dtype, device=qx.device)
    if name == "ref":
        y = int8_gemm_ref(qx2, xs, qw, w_scale, bias, out_dtype)
    else:
        xs2, ws = _check(qx2, xs, qw, w_scale)
        if name == "int_mm":
            y = _epilogue(torch._int_mm(qx2.contiguous(), qw.t()), xs2, ws, bias, out_dtype)
        else:
            y = _run_onednn(qx2.contiguous(), xs2, w_prepared["onednn_weight"], ws, n)
            if bias is not None:
                y.add_(bias.to(torch.float32))
            y = y.to(out_dtype)
    return y.reshape(*lead, n)
