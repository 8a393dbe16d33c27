"""Observers: watch tensors (weights once, activations over calibration batches), then give qparams.

Each keeps its statistics in the qparams' own shape (see `primitives`), so successive `update`
calls must give tensors whose statistics have the same shape: any leading shape for PerTensor,
the same rows for PerChannel / PerGroup. A learned codebook needs the data itself, not statistics,
so observers refuse `dtype="codebook"`; call `choose_qparams` on the weight instead.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from .primitives import (QParams, _dequantize_grouped, _group, _quantize_grouped, _range_qparams,
                         _stat_from_grouped, _validate)
from .codebooks import NF4_CODEBOOK
from .spec import QuantSpec

# Elements of x times clip candidates evaluated at once by the MSE search: bounds the temporary
# `[candidates, ..., n, G]` tensors to a few hundred MB whatever the weight's size.
_SEARCH_BUDGET = 1 << 24


def _clip_candidates(grid: int, max_shrink: float, device) -> torch.Tensor:
    """1, 1 - 1/grid, ... down to (not including) 1 - max_shrink: GPTQ's and AWQ's grid."""
    n = max(1, int(max_shrink * grid))
    return 1.0 - torch.arange(n, device=device, dtype=torch.float32) / grid


def _search_grouped(xg: torch.Tensor, spec: QuantSpec, grid: int, max_shrink: float, norm: float,
                    codebook: torch.Tensor | None) -> torch.Tensor:
    """Best clip ratio per group `[..., n, 1]` for grouped x `[..., n, G]`."""
    lo = xg.amin(dim=-1, keepdim=True)  # [..., n, 1]
    hi = xg.amax(dim=-1, keepdim=True)
    ratios = _clip_candidates(grid, max_shrink, xg.device)
    best_err = torch.full(lo.shape, float("inf"), device=xg.device)
    best_r = torch.ones(lo.shape, device=xg.device)
    chunk = max(1, _SEARCH_BUDGET // xg.numel())
    for start in range(0, ratios.numel(), chunk):
        r = ratios[start:start + chunk].reshape(-1, *([1] * xg.dim()))  # [c, 1, ..., 1]
        scale, zero = _range_qparams(lo * r, hi * r, spec)  # [c, ..., n, 1]
        dq = _dequantize_grouped(_quantize_grouped(xg, scale, zero, codebook, spec), scale, zero, codebook, spec)
        err = (xg - dq).abs_().pow_(norm).sum(dim=-1, keepdim=True)  # [c, ..., n, 1]
        err_min, idx = err.min(dim=0)
        # Strict < keeps the earliest (largest) ratio on ties, so ratio 1 wins unless clipping helps.
        better = err_min < best_err
        best_err = torch.where(better, err_min, best_err)
        best_r = torch.where(better, r.reshape(-1)[idx], best_r)
    return best_r


def _check_search(grid: int, max_shrink: float, norm: float) -> None:
    if grid < 1 or not 0 < max_shrink < 1 or norm <= 0:
        raise SpecError(f"mse search needs grid >= 1, 0 < max_shrink < 1, norm > 0; got {grid}, {max_shrink}, {norm}")


def _codebook_for_search(spec: QuantSpec, device) -> torch.Tensor | None:
    if spec.dtype == "codebook":
        raise SpecError("observers and the clip search cannot learn a codebook; use choose_qparams on the weight")
    return NF4_CODEBOOK.to(device) if spec.dtype == "nf4" else None


def mse_clip_search(x: torch.Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8,
                    norm: float = 2.4) -> torch.Tensor:
    """Per-group clip ratio (scale shape) minimising sum |x - qdq(x)|^norm over the group.

    Candidates are 1 - i/grid for i < max_shrink * grid (GPTQ's `find_params(mse=True)` grid);
    pass the result to `choose_qparams(x, spec, clip_ratio=...)`.
    """
    _validate(x, spec)
    _check_search(grid, max_shrink, norm)
    cb = _codebook_for_search(spec, x.device)
    xg = _group(x.detach().float(), spec)
    return _stat_from_grouped(_search_grouped(xg, spec, grid, max_shrink, norm, cb), spec)


class _Observer:
    """Running [lo, hi] per scale; subclasses say how one batch's range is measured."""

    def __init__(self, spec: QuantSpec):
        if not isinstance(spec, QuantSpec):
            raise SpecError(f"expected a QuantSpec, got {type(spec).__name__}")
        _codebook_for_search(spec, "cpu")
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.count = 0

    def _batch_range(self, xg: torch.Tensor):
        raise NotImplementedError

    def _merge(self, lo, hi):
        raise NotImplementedError

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Fold x into the statistics; returns x so it can sit in a forward hook."""
        _validate(x, self.spec)
        lo, hi = self._batch_range(_group(x.detach().float(), self.spec))
        lo, hi = _stat_from_grouped(lo, self.spec), _stat_from_grouped(hi, self.spec)
        if self.lo is not None and self.lo.shape != lo.shape:
            raise SpecError(f"observer saw statistics of shape {tuple(self.lo.shape)}, now {tuple(lo.shape)}; "
                            f"{self.spec.granularity} needs the same rows on every update")
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self._merge(lo, hi)
        self.count += 1
        return x

    def calculate_qparams(self) -> QParams:
        if self.lo is None:
            raise SpecError(f"{type(self).__name__} has seen no data; call update() first")
        scale, zero = _range_qparams(self.lo, self.hi, self.spec)
        cb = NF4_CODEBOOK.to(scale.device).clone() if self.spec.dtype == "nf4" else None
        return QParams(scale=scale, zero_point=zero, codebook=cb)


class MinMaxObserver(_Observer):
    """Running min and max per scale: the range of everything seen."""

    def _batch_range(self, xg):
        return xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)

    def _merge(self, lo, hi):
        self.lo = torch.minimum(self.lo, lo)
        self.hi = torch.maximum(self.hi, hi)


class _MeanRange(_Observer):
    """Running mean of each batch's range: one outlier batch cannot stretch the scale for good."""

    def _merge(self, lo, hi):
        w = 1.0 / (self.count + 1)
        self.lo = self.lo + (lo - self.lo) * w
        self.hi = self.hi + (hi - self.hi) * w


class PercentileObserver(_MeanRange):
    """Per batch, the `percentile` quantile of x (of |x| when symmetric or codebook) and its mirror
    (nearest rank); averaged over batches. On groups smaller than 1 / (1 - percentile) it is min-max.
    """

    def __init__(self, spec: QuantSpec, percentile: float = 0.999):
        super().__init__(spec)
        if not 0.5 < percentile <= 1.0:
            raise SpecError(f"percentile must be in (0.5, 1], got {percentile}")
        self.percentile = percentile

    def _kth(self, v: torch.Tensor, p: float) -> torch.Tensor:
        n = v.shape[-1]
        k = min(n, max(1, round(p * (n - 1)) + 1))
        return v.kthvalue(k, dim=-1, keepdim=True).values

    def _batch_range(self, xg):
        if self.spec.symmetric or self.spec.is_codebook:
            hi = self._kth(xg.abs(), self.percentile)
            return -hi, hi
        return self._kth(xg, 1.0 - self.percentile), self._kth(xg, self.percentile)


class MSEObserver(_MeanRange):
    """Per batch, the range clipped by `mse_clip_search` (sum |x - qdq(x)|^norm per group, minimised
    over clip ratios); averaged over batches. With one update (a weight) it is exactly the search.
    """

    def __init__(self, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4):
        super().__init__(spec)
        _check_search(grid, max_shrink, norm)
        self.grid, self.max_shrink, self.norm = grid, max_shrink, norm

    def _batch_range(self, xg):
        cb = _codebook_for_search(self.spec, xg.device)
        r = _search_grouped(xg, self.spec, self.grid, self.max_shrink, self.norm, cb)
        return xg.amin(dim=-1, keepdim=True) * r, xg.amax(dim=-1, keepdim=True) * r
