"""LLM.int8()'s mixed-precision matmul (Dettmers et al., 2022): ``y = x @ W.T + bias`` where W is
int8 with one scale per output row.

At run time, the input columns (feature dimensions) in which any token's magnitude exceeds
``threshold`` are outliers: those columns of x, and the matching columns of W dequantized, are
multiplied in 16-bit; every other column goes through the int8 GEMM with per-token activation
scales (``int8_gemm``). A few outlier features would otherwise set every token's int8 scale and
crush the rest. The outlier weight columns are the int8 weight dequantized (as bitsandbytes does
when it keeps only int8 weights), so no second copy of the weight is stored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowbit.errors import SpecError
from lowbit.kernels.int8_gemm import act_offset, int8_gemm, int8_gemm_ref, quantize_per_token

__all__ = ["mixed_int8_input", "mixed_int8_matmul", "mixed_int8_matmul_ref", "outlier_columns"]

_HALF = (torch.float16, torch.bfloat16)


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (int64) of the columns of x ``[M, K]`` where some |x| > threshold."""
    return (x2.abs().amax(dim=0) > threshold).nonzero().reshape(-1)


def _half_dtype(x: torch.Tensor, outlier_dtype: torch.dtype | None) -> torch.dtype:
    if outlier_dtype is not None:
        return outlier_dtype
    return x.dtype if x.dtype in _HALF else torch.float16


def _split(x2: torch.Tensor, threshold: float):
    if not threshold > 0:
        raise SpecError(f"mixed_int8: the outlier threshold must be > 0, got {threshold}")
    cols = outlier_columns(x2, threshold)
    x_in = x2.index_fill(1, cols, 0.0) if cols.numel() else x2
    return cols, x_in


def mixed_int8_input(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x ``[..., K]`` in float32 as the mixed matmul sees it: the outlier columns of this call as they
    are, every other column rounded to int8 per token (what GPTQ's `input_quant` fits the weights to)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    cols, x_in = _split(x2, threshold)
    qx, xs = quantize_per_token(x_in.contiguous())
    y = qx.float() * xs
    if cols.numel():
        y.index_copy_(1, cols, x2.index_select(1, cols))
    return y.reshape(x.shape)


def _outlier_part(x2, cols, qw, w_scale, dt) -> torch.Tensor:
    """float32 ``[M, N]``: x[:, cols] @ (qw[:, cols] * w_scale).T computed in dt."""
    w_cols = qw.index_select(1, cols).to(dt) * w_scale.reshape(-1, 1).to(dt)  # [N, n_cols]
    return (x2.index_select(1, cols).to(dt) @ w_cols.t()).float()


def _finish(y, x, bias, n):
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def mixed_int8_matmul_ref(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                          threshold: float = 6.0, outlier_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference: the int8 part through ``int8_gemm_ref`` (exact int64 accumulation)."""
    n, k = qw.shape
    x2 = x.reshape(-1, k)
    cols, x_in = _split(x2, threshold)
    qx, xs = quantize_per_token(x_in)
    y = int8_gemm_ref(qx, xs, qw, w_scale.reshape(-1), None, torch.float32)
    if cols.numel():
        y += _outlier_part(x2, cols, qw, w_scale, _half_dtype(x, outlier_dtype))
    return _finish(y, x, bias, n)


def mixed_int8_matmul(x: torch.Tensor, w_prepared: Mapping[str, torch.Tensor], w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None, threshold: float = 6.0,
                      outlier_dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``x [..., K]`` times the prepared int8 weight ``[N, K]`` (row scales ``w_scale [N]``) -> x's dtype.
    ``outlier_dtype``: the outlier matmul's dtype (default x's if 16-bit, else float16)."""
    qw = w_prepared["int8_weight"]
    n, k = qw.shape
    if x.shape[-1] != k:
        raise SpecError(f"mixed_int8: x has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    cols, x_in = _split(x2, threshold)
    qx, xs = quantize_per_token(x_in, offset=act_offset(w_prepared, x2.shape[0], backend))
    y = int8_gemm(qx, xs, w_prepared, w_scale.reshape(-1), None, torch.float32, backend=backend)
    if cols.numel():
        y += _outlier_part(x2, cols, qw, w_scale, _half_dtype(x, outlier_dtype))
    return _finish(y, x, bias, n)
