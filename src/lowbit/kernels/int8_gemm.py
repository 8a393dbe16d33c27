"""Weight + activation int8 GEMM: ``y = (qx @ qw.T) * x_scale * w_scale + bias``.

The GEMM runs on int8 codes with int32 accumulation; the dequantization (``x_scale * w_scale``, then
the bias) is the epilogue, and the output comes back in the caller's dtype. Scales::

    qx       [M, K] int8, symmetric codes in [-127, 127]
    x_scale  [] (per tensor) or [M, 1] / [M] (per token), float
    qw       [N, K] int8, symmetric codes
    w_scale  [] / [1] (per tensor) or [N] / [N, 1] (per output channel), float

Activation quantizers (symmetric int8, zero point 0): ``quantize_per_token`` and
``quantize_per_tensor`` (dynamic: the scale comes from this call's absmax) and ``quantize_static``
(a calibrated scale, values beyond its range clipped). Codes come as int8, or with ``offset=128`` as
uint8 holding ``code + 128`` (the same values, in the form oneDNN's u8 x s8 GEMM reads); ``int8_gemm``
takes either and ``act_offset`` says which one the backend it will pick wants, so the activation is
quantized straight into it. On CPU the quantizers and the epilogue are one-pass C++ kernels
(``_int8_cpp``, bit-identical to the torch expressions, which remain the fallback).

Backends, all exact in int32:

- ``ref``: int64 matmul in plain torch (the test oracle; slow).
- ``int_mm``: ``torch._int_mm`` with the weight kept ``[N, K]`` and passed as ``qw.t()`` (measured
  faster than a contiguous ``[K, N]`` copy, see CPU_KERNELS.md).
- ``onednn``: ``onednn.qlinear_pointwise`` on a prepacked weight. Activations go in as uint8 with
  zero point 128 (``qx + 128``): on CPUs without AMX torch 2.13 falls back to a reference loop
  for int8 activations (a 512x576x1536 GEMM took 13 s here, against 16 ms for uint8). The op takes
  one activation scale, so it runs with scale 1 and the activation scales (per token or per tensor)
  are applied to its fp32 output by the epilogue.
- ``fp32``: float32 GEMMs over the codes, in slices of at most ``FP32_EXACT_K`` input features whose
  sums float32 holds exactly (|acc| <= 127 * 127 * K < 2^24), added up in int32: exact too. For CPUs
  without u8 x s8 dot products (AVX2 alone), where torch's ``_int_mm`` is a scalar loop about 20x
  slower than a float32 GEMM and oneDNN's AVX2 int8 kernel saturates its 16-bit pair sums (15-20%
  error on random codes): there the integer GEMM runs at float32 GEMM speed, no faster.
- ``avx2``: lowbit's own AVX2 kernel (``_i8_cpp``: ``vpmaddubsw`` on |w| and sign(w) x, exact for
  activation codes in [-127, 127], which the quantizers here give), ``auto``'s choice on CPUs
  without VNNI at every token count. It reads the weight at one byte a value where ``fp32`` first
  widens it to four. W8A8Linear on 4096 x 4096, one thread, quantization and epilogue included
  (bench/w8a8.py, bench/RESULTS.md): M=1 1.80 ms against 53.95 (``fp32``) and 6.62 (float32
  ``F.linear``); M=128 63.0 against 146.5 and 118.1; M=512 232.5 against 456.7 and 335.6.
  Activation codes holding -128 (lowbit's quantizers never give it) go to ``fp32`` for that call.

``prepare_int8`` builds what the backends need once from the canonical ``[N, K]`` int8 weight;
``int8_gemm`` picks one (explicit argument, then ``LOWBIT_INT8_BACKEND``, then ``auto``). ``auto``
prepares oneDNN on CPUs with VNNI (AVX512-VNNI, AVX-VNNI or AMX: u8 x s8 dot products in hardware)
and uses it from ``ONEDNN_MIN_M`` tokens up; a single token goes to ``torch._int_mm``, whose GEMV
path beats oneDNN's per-call cost. Measured on a Zen4 (AVX512-VNNI, no AMX), 1 thread, quantization
and epilogue included, 4096x4096: M=1 0.39 ms (``_int_mm``) against 0.43 ms (oneDNN); M=2 10.2 ms
against 0.65 ms (``_int_mm`` leaves its GEMV path); M=32 12.3 against 3.2 ms. The prepacked weight is
a second copy of the int8 weight, held at run time only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping

import torch

from lowbit.errors import SpecError
from lowbit.kernels import _cpp_ext, _i8_cpp, _int8_cpp
from lowbit.kernels._dispatch import forced_backend

__all__ = [
    "ACT_MODES",
    "BACKENDS",
    "BACKEND_ENV",
    "ONEDNN_MIN_M",
    "QMAX",
    "act_offset",
    "int8_available_backends",
    "int8_gemm",
    "int8_gemm_ref",
    "prepare_int8",
    "fake_quantize_per_token",
    "quantize_activation",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_static",
    "select_int8_backend",
]

BACKENDS = ("ref", "int_mm", "onednn", "fp32", "avx2")
BACKEND_ENV = "LOWBIT_INT8_BACKEND"  # force a backend (tests, benchmarks); "auto" or unset: dispatch
QMAX = 127  # symmetric int8: -128 is left out so that -q is always representable
# Floor of an activation scale: an all-zero row (padding, a dead channel group) must not divide by 0.
SCALE_EPS = 1e-12

ACT_MODES = ("per_token", "per_tensor", "static")
# Below this many tokens `auto` prefers torch._int_mm to oneDNN on CPUs without AMX (see the module
# doc); with AMX oneDNN wins from one token (CPU_KERNELS.md: 0.92 against 1.76 ms at M=1).
ONEDNN_MIN_M = 2
# Input features per float32 slice of the fp32 backend: 127 * 127 * 1040 < 2^24, so each slice's sums
# are exact integers in float32.
FP32_EXACT_K = 1040
_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------
# activation quantizers


def _check_offset(offset: int) -> None:
    if offset not in (0, 128):
        raise SpecError(f"int8: activation codes take offset 0 (int8) or 128 (uint8), got {offset}")


def _ext_for(x: torch.Tensor):
    """The C++ ops when they can take x (a CPU float tensor), else None."""
    if x.device.type != "cpu" or x.dtype not in _EXT_DTYPES or x.numel() == 0:
        return None
    return _int8_cpp.load()


def _shift(q: torch.Tensor, offset: int) -> torch.Tensor:
    """int8 codes -> codes in the form `offset` names."""
    return (q.to(torch.int16) + 128).to(torch.uint8) if offset else q


def _codes(x: torch.Tensor, scale: torch.Tensor, offset: int = 0) -> torch.Tensor:
    ext = _ext_for(x)
    if ext is not None and scale.numel() == 1 and math.isfinite(sc := float(scale)) and sc > 0:
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
        return ext.quantize_scaled(x2.detach().contiguous(), sc, offset).reshape(x.shape)
    return _shift(torch.clamp(torch.round(x.float() / scale), -QMAX, QMAX).to(torch.int8), offset)


def quantize_per_token(x: torch.Tensor, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: codes like x, scales ``[..., 1]`` float32 (each row's absmax / 127).
    ``offset=128``: uint8 codes + 128 (see the module doc)."""
    _check_offset(offset)
    ext = _ext_for(x)
    if ext is not None and x.dim() >= 1:
        q, s = ext.quantize_per_token(x.detach().reshape(-1, x.shape[-1]).contiguous(), offset)
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().div_(QMAX).clamp_(min=SCALE_EPS)
    return _shift(torch.clamp(torch.round(x.float() / scale), -QMAX, QMAX).to(torch.int8), offset), scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded onto the grid `quantize_per_token` gives it (each row's absmax / 127), in float32, with
    a straight-through gradient: what trains a layer whose packed form quantizes its input per token
    (QAT, ZeroQuant's LKD) sees exactly the kernel's rounding, not lowbit.quant's absmax / 127.5 grid."""
    xf = x.float()
    q, scale = quantize_per_token(x.detach())
    return xf + (q.float() * scale - xf).detach()


def quantize_per_tensor(x: torch.Tensor, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor int8: codes like x, one float32 scale ``[]`` (the tensor's absmax / 127)."""
    _check_offset(offset)
    scale = x.detach().abs().amax().float().div(QMAX).clamp(min=SCALE_EPS)
    return _codes(x, scale, offset), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor | float, *, offset: int = 0) -> torch.Tensor:
    """int8 codes of x on a given (calibrated) per-tensor scale; values beyond it are clipped."""
    _check_offset(offset)
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if s.numel() != 1:
        raise SpecError(f"int8: a static activation scale has one element, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or float(s) <= 0:
        raise SpecError(f"int8: a static activation scale must be finite and positive, got {float(s)}")
    return _codes(x, s.reshape(()), offset)


def quantize_activation(x: torch.Tensor, mode: str, scale: torch.Tensor | None = None, *, offset: int = 0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) for ``mode`` in ``ACT_MODES``; "static" needs ``scale``."""
    if mode == "per_token":
        return quantize_per_token(x, offset=offset)
    if mode == "per_tensor":
        return quantize_per_tensor(x, offset=offset)
    if mode == "static":
        if scale is None:
            raise SpecError("int8: static activation quantization needs a calibrated input scale")
        return quantize_static(x, scale, offset=offset), scale.float().reshape(())
    raise SpecError(f"int8: unknown activation mode {mode!r}; choose from {ACT_MODES}")


# ----------------------------------------------------------------------------------------
# checks and the epilogue


def _check(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates shapes; returns the scales as float32 ``[M, 1] or []`` and ``[N] or []``."""
    if qx.dtype not in (torch.int8, torch.uint8) or qx.dim() != 2:
        raise SpecError(f"int8_gemm: qx must be int8 [M, K] (or uint8 codes + 128), got {qx.dtype} "
                        f"{tuple(qx.shape)}")
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
    """float32 acc * x_scale * w_scale (+ bias), then out_dtype, in one pass where the C++ ops run."""
    ext = _int8_cpp.load() if acc.device.type == "cpu" and out_dtype in _EXT_DTYPES and acc.numel() else None
    if ext is None:
        return _epilogue_torch(acc, xs, ws, bias, out_dtype)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    return ext.dequantize_acc(acc.contiguous(), xs.reshape(-1).contiguous(), ws.reshape(-1).contiguous(), b,
                              out_dtype)


def _epilogue_torch(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """float32 acc * x_scale * w_scale (+ bias), then out_dtype. acc may be int32 or float32."""
    y = acc.to(torch.float32)
    y.mul_(xs)
    y.mul_(ws)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(out_dtype)


def _signed(qx: torch.Tensor) -> torch.Tensor:
    """int8 codes from either form (uint8 holds code + 128)."""
    return (qx.to(torch.int16) - 128).to(torch.int8) if qx.dtype == torch.uint8 else qx


def _unsigned(qx: torch.Tensor) -> torch.Tensor:
    return qx if qx.dtype == torch.uint8 else (qx.to(torch.int16) + 128).to(torch.uint8)


def int8_gemm_ref(qx: torch.Tensor, x_scale, qw: torch.Tensor, w_scale, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The oracle: exact integer accumulation in int64 (checked to fit int32), then the epilogue."""
    xs, ws = _check(qx, x_scale, qw, w_scale)
    acc = _signed(qx).to(torch.int64) @ qw.to(torch.int64).t()
    if acc.numel() and int(acc.abs().max()) >= 2**31:
        raise SpecError("int8_gemm: accumulation overflows int32 (K too large for int8 codes)")
    return _epilogue_torch(acc.to(torch.int32), xs, ws, bias, out_dtype)


# ----------------------------------------------------------------------------------------
# preparation and dispatch


@functools.lru_cache(maxsize=1)
def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if callable(probe) else False


@functools.lru_cache(maxsize=1)
def _has_vnni() -> bool:
    """u8 x s8 dot products in hardware, where oneDNN's uint8 GEMM beats torch._int_mm."""
    return _has_amx() or any(_cpp_ext.has_cpu_flag(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def prepare_int8(qw: torch.Tensor, *, backends: str | Iterable[str] = "auto") -> dict[str, torch.Tensor]:
    """Runtime tensors for the backends from the canonical int8 weight ``[N, K]``.

    Every result keeps ``int8_weight`` (the canonical weight; ``ref`` and ``int_mm`` read it). The
    oneDNN prepacked weight (its own layout, as large again) is added when asked for, or under
    ``auto`` on CPUs with VNNI or AMX, where that path is the fast one; the AVX2 kernel's weight (the
    same tensor) when asked for, or under ``auto`` on other CPUs.
    """
    if qw.dtype != torch.int8 or qw.dim() != 2:
        raise SpecError(f"int8: the weight must be int8 [N, K], got {qw.dtype} {tuple(qw.shape)}")
    if isinstance(backends, str) and backends == "auto":
        wanted = ({"onednn"} if _has_vnni() else {"avx2"}) if qw.device.type == "cpu" else set()
    else:
        wanted = {backends} if isinstance(backends, str) else set(backends)
        unknown = wanted - set(BACKENDS)
        if unknown:
            raise SpecError(f"int8: unknown backend(s) {sorted(unknown)}; choose from {BACKENDS}")
    out = {"int8_weight": qw}
    if "avx2" in wanted and qw.device.type == "cpu":
        out["i8_avx2_weight"] = qw.contiguous()
    if "onednn" in wanted:
        if qw.device.type != "cpu":
            raise SpecError("int8: the onednn backend runs on CPU tensors only")
        if not _has_vnni():
            # without u8 x s8 dot products oneDNN sums pairs of products in 16 bits, which saturate
            raise SpecError("int8: the onednn backend needs a CPU with VNNI or AMX (its AVX2 kernel "
                            "saturates); use 'fp32' or 'int_mm'")
        out["onednn_weight"] = torch.ops.onednn.qlinear_prepack(qw.contiguous(), None)
        out["onednn_zero_points"] = torch.zeros(qw.shape[0], dtype=torch.long)
    return out


def int8_available_backends(prepared: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    have = ["ref"]
    if "int8_weight" in prepared and prepared["int8_weight"].device.type == "cpu":
        have += ["int_mm", "fp32"]
    if "i8_avx2_weight" in prepared and _avx2_ext() is not None:
        have.append("avx2")
    if "onednn_weight" in prepared:
        have.append("onednn")
    return tuple(have)


def select_int8_backend(prepared: Mapping[str, torch.Tensor], backend: str = "auto", m: int | None = None) -> str:
    """An explicit ``backend`` wins, then ``LOWBIT_INT8_BACKEND``, then ``auto``: oneDNN when its
    weight was prepared (VNNI/AMX) and there are at least ``ONEDNN_MIN_M`` tokens (``m``; None: many;
    any number with AMX), else the AVX2 kernel where its weight was prepared (CPUs without VNNI), else
    the float32 GEMMs over codes on those CPUs, else ``torch._int_mm``."""
    have = int8_available_backends(prepared)
    forced = forced_backend("int8", backend, BACKEND_ENV, BACKENDS, have)
    if forced is not None:
        return forced
    if "onednn" in have and (m is None or m >= (1 if _has_amx() else ONEDNN_MIN_M) or "int_mm" not in have):
        return "onednn"
    if "avx2" in have:
        return "avx2"
    if "fp32" in have and not _has_vnni():
        return "fp32"
    return "int_mm" if "int_mm" in have else "ref"


def act_offset(prepared: Mapping[str, torch.Tensor], m: int, backend: str = "auto") -> int:
    """The activation-code offset the backend chosen for ``m`` tokens reads: 128 (uint8) for oneDNN, else 0."""
    return 128 if select_int8_backend(prepared, backend, m) == "onednn" else 0


@functools.lru_cache(maxsize=1)
def _avx2_ext():
    """lowbit_i8's ops where they run vectorized (built with AVX2), else None."""
    ext = _i8_cpp.load()
    return ext if ext is not None and ext.has_avx2() else None


def _run_fp32(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """int32 ``qx @ qw.T`` from float32 GEMMs over slices of K, each exact (see FP32_EXACT_K)."""
    k = qw.shape[1]
    acc = None
    for k0 in range(0, k, FP32_EXACT_K):
        k1 = min(k, k0 + FP32_EXACT_K)
        part = torch.mm(qx[:, k0:k1].float(), qw[:, k0:k1].float().t())
        acc = part.to(torch.int32) if acc is None else acc.add_(part.to(torch.int32))
    return acc


def _run_onednn(qxu: torch.Tensor, prepared: Mapping[str, torch.Tensor], ws: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``acc * w_scale`` (the activation scales are left to the epilogue)."""
    w_scales = ws.expand(n).contiguous() if ws.dim() == 0 else ws.contiguous()
    return torch.ops.onednn.qlinear_pointwise(qxu, 1.0, 128, prepared["onednn_weight"], w_scales,
                                              prepared["onednn_zero_points"], None, 1.0, 0, torch.float32,
                                              "none", [], "")


def int8_gemm(qx: torch.Tensor, x_scale, w_prepared: Mapping[str, torch.Tensor], w_scale,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32, *,
              backend: str = "auto") -> torch.Tensor:
    """``qx [..., K]`` int8 (or uint8 codes + 128) times the prepared weight ``[N, K]`` -> ``[..., N]`` in
    ``out_dtype``, with int32 accumulation and ``x_scale * w_scale`` (+ bias) applied to the accumulator."""
    qw = w_prepared["int8_weight"]
    n, k = qw.shape
    if qx.shape[-1] != k:
        raise SpecError(f"int8_gemm: qx has {qx.shape[-1]} features, the weight expects {k}")
    lead = qx.shape[:-1]
    qx2 = qx.reshape(-1, k)
    xs = torch.as_tensor(x_scale)
    if xs.numel() > 1:
        xs = xs.reshape(-1)
    name = select_int8_backend(w_prepared, backend, qx2.shape[0])
    if qx2.shape[0] == 0:
        return torch.zeros(*lead, n, dtype=out_dtype, device=qx.device)
    if name == "ref":
        y = int8_gemm_ref(qx2, xs, qw, w_scale, bias, out_dtype)
    else:
        xs2, ws = _check(qx2, xs, qw, w_scale)
        if name == "int_mm":
            y = _epilogue(torch._int_mm(_signed(qx2).contiguous(), qw.t()), xs2, ws, bias, out_dtype)
        elif name == "fp32":
            y = _epilogue(_run_fp32(_signed(qx2), qw), xs2, ws, bias, out_dtype)
        elif name == "avx2":
            q8 = _signed(qx2).contiguous()
            if bool((q8 == -128).any()):  # outside the kernel's range (see _i8_cpp): exact float32 GEMMs
                acc = _run_fp32(q8, qw)
            else:
                acc = _avx2_ext().i8_gemm(q8, w_prepared["i8_avx2_weight"])
            y = _epilogue(acc, xs2, ws, bias, out_dtype)
        else:
            acc = _run_onednn(_unsigned(qx2).contiguous(), w_prepared, ws, n)
            y = _epilogue(acc, xs2, torch.ones((), dtype=torch.float32), bias, out_dtype)
    return y.reshape(*lead, n)
