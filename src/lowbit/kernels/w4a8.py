"""W4A8: 4-bit weights kept packed, unpacked to int8 for the int8 GEMM (`lowbit.kernels.int8_gemm`).

Weight storage (what `W4A8Linear` holds)::

    qweight      uint8 [N, K / 2]   4-bit codes c = q + 8 (q in [-8, 7]), lowbit.quant.packing's
                                    layout: value 2j in the low nibble of byte j, 2j + 1 in the high
    group_scale  uint8 [N, K / G]   optional integer second-level scales k in [1, 16]
    w_scale      float32 [N] / []   the float scale, per output channel (or per tensor)

    W[n, j] = w_scale[n] * q[n, j] * k[n, j // G]      (k = 1 without group scales)

`q * k` lies in [-128, 112]: an int8 weight. So the unpacked weight goes through the same int8 GEMM
as W8A8 (int32 accumulation), and the only float scale left, `w_scale`, is per output channel,
which the GEMM's epilogue applies with the activation's per-token scale. This is QServe's idea
(progressive group quantization: integer group scales under a float channel scale) in its symmetric
form; groups along K with float scales would need a float multiply inside the reduction.

The unpack runs on every call (the 4-bit weight is what stays in memory): two nibble masks, one
interleave and, with group scales, one int16 multiply, O(N * K) against the GEMM's O(M * N * K).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowbit.errors import SpecError
from lowbit.kernels.int8_gemm import BACKEND_ENV, BACKENDS, _has_vnni, int8_gemm, int8_gemm_ref, prepare_int8
from lowbit.kernels._dispatch import forced_backend

__all__ = ["GROUP_SCALE_MAX", "INT4_MAX", "INT4_MIN", "unpack_int4", "w4a8_int8_weight", "w4a8_gemm",
           "w4a8_gemm_ref"]

INT4_MIN, INT4_MAX = -8, 7
GROUP_SCALE_MAX = 16  # 16 * -8 = -128 and 16 * 7 = 112: every product is an int8


def unpack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 `[N, K / 2]` packed codes -> signed int8 codes `[N, K]` in [-8, 7]."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise SpecError(f"w4a8: qweight must be uint8 [N, K / 2], got {qweight.dtype} {tuple(qweight.shape)}")
    if k % 2 or qweight.shape[1] != k // 2:
        raise SpecError(f"w4a8: {k} input features need {k // 2} packed bytes per row, got {qweight.shape[1]}")
    lo = (qweight & 0x0F).to(torch.int8)
    hi = (qweight >> 4).to(torch.int8)
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], k).sub_(8)


def w4a8_int8_weight(qweight: torch.Tensor, k: int, group_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 weight `[N, K]` the GEMM multiplies: codes times their integer group scales."""
    q = unpack_int4(qweight, k)
    if group_scale is None:
        return q
    n = q.shape[0]
    if group_scale.dim() != 2 or group_scale.shape[0] != n or k % group_scale.shape[1]:
        raise SpecError(f"w4a8: group_scale must be [N={n}, K / G] with G dividing K={k}, got "
                        f"{tuple(group_scale.shape)}")
    g = k // group_scale.shape[1]
    prod = q.reshape(n, -1, g).to(torch.int16) * group_scale.to(torch.int16).unsqueeze(-1)
    return prod.reshape(n, k).to(torch.int8)


def _prepared(w8: torch.Tensor, backend: str) -> Mapping[str, torch.Tensor]:
    # oneDNN needs a prepacked weight, which per call would cost more than it saves; it is built
    # only when that backend is asked for explicitly (argument or LOWBIT_INT8_BACKEND). The AVX2
    # kernel reads the int8 weight as it is: asked for, or on CPUs without VNNI (as prepare_int8's auto)
    forced = forced_backend("w4a8", backend, BACKEND_ENV, BACKENDS, BACKENDS)
    if forced == "onednn":
        return prepare_int8(w8, backends=("onednn",))
    return prepare_int8(w8, backends=("avx2",) if forced == "avx2" or not _has_vnni() else ())


def w4a8_gemm(qx: torch.Tensor, x_scale, qweight: torch.Tensor, k: int, w_scale,
              group_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32, *, backend: str = "auto") -> torch.Tensor:
    """``qx [..., K]`` int8 (scale per token or per tensor) times the 4-bit weight -> ``[..., N]``:
    unpack to int8, then `int8_gemm` (int32 accumulation, scales and bias in its epilogue)."""
    w8 = w4a8_int8_weight(qweight, k, group_scale)
    return int8_gemm(qx, x_scale, _prepared(w8, backend), w_scale, bias, out_dtype, backend=backend)


def w4a8_gemm_ref(qx: torch.Tensor, x_scale, qweight: torch.Tensor, k: int, w_scale,
                  group_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The oracle: int64 accumulation in plain torch (`int8_gemm_ref`) on the unpacked weight."""
    w8 = w4a8_int8_weight(qweight, k, group_scale)
    lead = qx.shape[:-1]
    xs = torch.as_tensor(x_scale)
    y = int8_gemm_ref(qx.reshape(-1, k), xs.reshape(-1) if xs.numel() > 1 else xs, w8, w_scale, bias,
                            out_dtype)
    return y.reshape(*lead, w8.shape[0])
