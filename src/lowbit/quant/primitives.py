"""Quantization primitives: choose qparams, quantize, dequantize, fake-quantize. Pure functions.

Shape convention for the qparams of a tensor x `[..., K]` (reductions are over the last dim):

    granularity            scale / zero_point shape
    PerGroup(G)            [..., K // G]
    PerChannel, PerToken   [..., 1]          (so is PerGroup(-1))
    PerTensor              []                (0-dim; any one-element tensor is accepted back)

`codebook` (nf4 / learned) is `[2**bits]` and shared by the whole tensor.

Internally every granularity is handled in one "grouped" layout: x is viewed as `[..., n, G]` and
its qparams as `[..., n, 1]`, so one broadcast serves all four and nothing loops over groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidWeightsError, SpecError
from .codebooks import NF4_CODEBOOK, kmeans_codebook, nearest_code
from .spec import PerGroup, PerTensor, QuantSpec, check_group_size

# Floor for scales: keeps constant groups (all zeros, e.g. pruned rows) from dividing by zero, and is
# far below the step of any real weight while far above float32 underflow.
SCALE_EPS = 1e-8


@dataclass
class QParams:
    """Quantization parameters of one tensor; shapes as in the module docstring.

    scale:      float32 tensor.
    zero_point: float32 tensor of integer values in code units (asymmetric int), else None.
    codebook:   float32 `[2**bits]` (nf4 / learned codebook), else None.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    codebook: torch.Tensor | None = None


# ---- grouped layout ------------------------------------------------------------------------------

def _group(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """x `[..., K]` -> `[..., n, G]`, the elements sharing one scale along the last dim."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return x.reshape(1, -1)
    if isinstance(g, PerGroup) and g.group_size != -1:
        return x.reshape(*x.shape[:-1], x.shape[-1] // g.group_size, g.group_size)
    return x.unsqueeze(-2)


def _stat_to_grouped(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A qparam in public shape -> grouped `[..., n, 1]`."""
    if isinstance(spec.granularity, PerTensor):
        if t.numel() != 1:
            raise SpecError(f"per-tensor qparams must have one element, got shape {tuple(t.shape)}")
        return t.reshape(1, 1)
    return t.unsqueeze(-1)


def _stat_from_grouped(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Grouped `[..., n, 1]` -> public shape."""
    if isinstance(spec.granularity, PerTensor):
        return t.reshape(())
    return t.squeeze(-1)


def _validate(x: torch.Tensor, spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise SpecError(f"expected a QuantSpec, got {type(spec).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InvalidWeightsError(f"expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.numel() == 0:
        raise InvalidWeightsError(f"cannot quantize a tensor of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidWeightsError("tensor to quantize has NaN or Inf values")
    g = spec.granularity
    if isinstance(g, PerGroup):
        check_group_size(x.shape[-1], g.group_size)


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (fp16), rounded up so the group's range still fits the grid.

    Codes are then chosen against this scale, so dequantization reproduces exactly what rounding
    intended; rounding the scale down instead would clip the largest values of each group.
    """
    s16 = scale.to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    return torch.where(s16.float() < scale, up, s16).float()


def _range_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Elementwise (any shape): a [lo, hi] range -> (scale, zero or None)."""
    if spec.is_codebook:
        return torch.maximum(lo.abs(), hi.abs()).clamp_min(SCALE_EPS), None
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / ((spec.qmax - spec.qmin) / 2)).clamp_min(SCALE_EPS), None
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(SCALE_EPS)
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def _quantize_grouped(xg, sg, zg, codebook, spec: QuantSpec) -> torch.Tensor:
    """Float codes (integer valued), same shape as the broadcast of xg and sg."""
    if spec.is_codebook:
        return nearest_code(xg / sg, codebook).float()
    q = torch.round(xg / sg)
    if zg is not None:
        q = q + zg
    return q.clamp(spec.qmin, spec.qmax)


def _dequantize_grouped(qg, sg, zg, codebook, spec: QuantSpec) -> torch.Tensor:
    if spec.is_codebook:
        return codebook[qg.long()] * sg
    return (qg - zg if zg is not None else qg) * sg


def _grouped_qparams(qparams: QParams, spec: QuantSpec, like: torch.Tensor):
    sg = _stat_to_grouped(qparams.scale.to(like.device, torch.float32), spec)
    zg = None
    if not spec.is_codebook and not spec.symmetric:
        if qparams.zero_point is None:
            raise SpecError(f"{spec} needs a zero_point, the qparams have none")
        zg = _stat_to_grouped(qparams.zero_point.to(like.device, torch.float32), spec)
    cb = None
    if spec.is_codebook:
        if qparams.codebook is None:
            raise SpecError(f"{spec} needs a codebook, the qparams have none")
        cb = qparams.codebook.to(like.device, torch.float32)
        if cb.numel() != 2**spec.bits:
            raise SpecError(f"{spec} needs a codebook of {2 ** spec.bits} entries, got {cb.numel()}")
    return sg, zg, cb


def _clip_to_grouped(clip_ratio, spec: QuantSpec, stat_shape) -> torch.Tensor | float:
    if isinstance(clip_ratio, torch.Tensor):
        r = clip_ratio.float()
        if not isinstance(spec.granularity, PerTensor):
            try:
                r = r.broadcast_to(stat_shape)
            except RuntimeError:
                raise SpecError(f"clip_ratio of shape {tuple(r.shape)} does not broadcast to the "
                                f"scale shape {tuple(stat_shape)}") from None
        return _stat_to_grouped(r, spec)
    if not float(clip_ratio) > 0:
        raise SpecError(f"clip_ratio must be > 0, got {clip_ratio}")
    return float(clip_ratio)


def _public_stat_shape(x: torch.Tensor, spec: QuantSpec):
    return _stat_from_grouped(_group(x, spec)[..., :1], spec).shape


def _broadcast_error(x_shape, qparams: QParams, spec: QuantSpec) -> SpecError:
    return SpecError(f"qparams of shape {tuple(qparams.scale.shape)} do not fit a tensor of shape "
                     f"{tuple(x_shape)} quantized {spec.granularity}")


# ---- public -------------------------------------------------------------------------------------

def choose_qparams(x: torch.Tensor, spec: QuantSpec, clip_ratio: float | torch.Tensor = 1.0) -> QParams:
    """Min-max qparams of x under `spec`, with each range shrunk by `clip_ratio`.

    Per group, with lo = clip_ratio * min(min(x), 0) and hi = clip_ratio * max(max(x), 0). The range
    always holds 0 (GPTQ's convention): AutoAWQ uses the raw min/max, and then a group whose values
    share one sign gets a clamped zero point and is clipped, losing up to its whole range.

    - int, asymmetric: scale = (hi - lo) / (qmax - qmin), floored at SCALE_EPS;
                       zero  = clamp(round(-lo / scale), qmin, qmax).
    - int, symmetric:  scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)  (amax / 7.5 at 4 bits, as GPTQ
                       and compressed-tensors do), no zero point.
    - nf4 / codebook:  scale = max(|lo|, |hi|); the codebook is NF4, or learned by k-means on
                       x / scale clamped to [-1, 1].

    `clip_ratio` is a float or a tensor broadcastable to the scale shape (AWQ's clip search and the
    MSE observer pass one ratio per group). Raises InvalidWeightsError on NaN/Inf and GroupSizeError
    when the group size does not divide the last dim.
    """
    _validate(x, spec)
    xg = _group(x.detach().float(), spec)  # [..., n, G]
    r = _clip_to_grouped(clip_ratio, spec, _public_stat_shape(x, spec))
    lo = xg.amin(dim=-1, keepdim=True).clamp(max=0) * r  # [..., n, 1]
    hi = xg.amax(dim=-1, keepdim=True).clamp(min=0) * r
    scale, zero = _range_qparams(lo, hi, spec)
    codebook = None
    if spec.dtype == "nf4":
        codebook = NF4_CODEBOOK.to(x.device).clone()
    elif spec.dtype == "codebook":
        codebook = kmeans_codebook((xg / scale).clamp(-1, 1), spec.bits)
    return QParams(
        scale=_stat_from_grouped(scale, spec),
        zero_point=None if zero is None else _stat_from_grouped(zero, spec),
        codebook=codebook,
    )


def quantize(x: torch.Tensor, qparams: QParams, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of x, shape of x: int8 for symmetric int, uint8 for asymmetric int and codebooks.

    int: q = clamp(round(x / scale) + zero, qmin, qmax); codebook: q = index of the entry nearest to
    x / scale.
    """
    xg = _group(x.detach().float(), spec)
    sg, zg, cb = _grouped_qparams(qparams, spec, x)
    try:
        qg = _quantize_grouped(xg, sg, zg, cb, spec)
    except RuntimeError:
        raise _broadcast_error(x.shape, qparams, spec) from None
    if qg.shape != xg.shape:
        raise _broadcast_error(x.shape, qparams, spec)
    out_dtype = torch.int8 if spec.symmetric and not spec.is_codebook else torch.uint8
    return qg.to(out_dtype).reshape(x.shape)


def dequantize(q: torch.Tensor, qparams: QParams, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Floats from codes: (q - zero) * scale for int, codebook[q] * scale for codebooks."""
    qg = _group(q, spec)
    sg, zg, cb = _grouped_qparams(qparams, spec, q)
    try:
        out = _dequantize_grouped(qg if spec.is_codebook else qg.float(), sg, zg, cb, spec)
    except RuntimeError:
        raise _broadcast_error(q.shape, qparams, spec) from None
    return out.reshape(q.shape).to(dtype)


def quantize_dequantize(x: torch.Tensor, spec: QuantSpec, clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x rounded onto its own quantization grid (min-max qparams), in x's dtype."""
    qp = choose_qparams(x, spec, clip_ratio)
    return dequantize(quantize(x, qp, spec), qp, spec, dtype=x.dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, qparams: QParams | None = None) -> torch.Tensor:
    """quantize_dequantize in the forward, straight-through in the backward.

    Gradient to x: 1 where the rounded code lands inside [qmin, qmax], 0 where it is clipped
    (codebooks: 1 everywhere). Gradient to a scale that requires grad follows LSQ: round(v) - v
    inside (v = x / scale + zero), the clipped code minus zero outside; codebooks: codebook[q] - x / scale.
    A zero point that requires grad (integer valued: a learned one is rounded straight-through by its
    owner first) gets -scale where the code is clipped and 0 inside, where it shifts code and offset
    alike. Without qparams they are chosen from x (detached) with min-max. LSQ's gradient scale is
    `grad_scale` applied to the scale beforehand.
    """
    if qparams is None:
        qparams = choose_qparams(x.detach(), spec)
    xg = _group(x.float(), spec)
    sg, zg, cb = _grouped_qparams(qparams, spec, x)
    try:
        shape = torch.broadcast_shapes(xg.shape, sg.shape, *(() if zg is None else (zg.shape,)))
    except RuntimeError:
        raise _broadcast_error(x.shape, qparams, spec) from None
    if shape != xg.shape:
        raise _broadcast_error(x.shape, qparams, spec)
    if not spec.is_codebook:
        return _FakeQuantInt.apply(xg, sg, zg, spec).reshape(x.shape).to(x.dtype)
    with torch.no_grad():
        s0 = sg.detach()
        qg = _quantize_grouped(xg, s0, zg, cb, spec)
        dq = _dequantize_grouped(qg, s0, zg, cb, spec)
        grad_s = cb[qg.long()] - xg / s0
    # Each added term is exactly zero in value, so the forward is bit-identical to dequantize().
    out = dq + (xg - xg.detach())
    if sg.requires_grad:
        out = out + (sg - s0) * grad_s
    return out.reshape(x.shape).to(x.dtype)


class _FakeQuantInt(torch.autograd.Function):
    """Integer-grid fake quantization that keeps only its inputs for the backward (no weight-sized
    masks or gradient terms held between forward and backward: QAT holds every layer's at once)."""

    @staticmethod
    def forward(ctx, xg, sg, zg, spec):
        ctx.save_for_backward(xg, sg, zg)
        ctx.spec = spec
        with torch.no_grad():
            return _dequantize_grouped(_quantize_grouped(xg, sg, zg, None, spec), sg, zg, None, spec)

    @staticmethod
    def backward(ctx, g):
        xg, sg, zg = ctx.saved_tensors
        spec = ctx.spec
        v = xg / sg
        if zg is not None:
            v.add_(zg)
        r = torch.round(v)
        inside = (r >= spec.qmin).logical_and_(r <= spec.qmax)
        # in place where it can be: Block-AP runs this on every weight of a block at every step
        gx = g * inside if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] else None
        gs = None
        if ctx.needs_input_grad[1]:
            # LSQ: d out / d scale = q - v inside the grid, the clipped code (minus zero) outside
            q = r.clamp_(spec.qmin, spec.qmax)
            q.sub_(torch.where(inside, v, zg if zg is not None else 0.0))
            gs = q.mul_(g).sum_to_size(sg.shape)
        gz = None
        if zg is not None and ctx.needs_input_grad[2]:
            # out = (clamp(round(x / s) + z) - z) * s: z cancels inside the grid, leaves -s where clipped
            gz = (gx - g).sum(-1, keepdim=True).mul_(sg).sum_to_size(zg.shape)
        return (gx if ctx.needs_input_grad[0] else None), gs, gz, None


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x unchanged in the forward, its gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return _GradScale.apply(x, float(factor))


def lsq_grad_factor(spec: QuantSpec, group_numel: int) -> float:
    """LSQ's gradient scale for a step size shared by `group_numel` values: 1 / sqrt(N * Q_P), with
    Q_P the number of positive levels (qmax for signed grids, the whole 2^bits - 1 for unsigned)."""
    q_p = spec.qmax if spec.symmetric else spec.qmax - spec.qmin
    return 1.0 / math.sqrt(max(1, group_numel) * max(1, q_p))


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, g):
        return g, None


def straight_through(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in the forward (computed from x without grad, same shape), x's gradient passed through
    unchanged: e.g. a scale rounded to the fp16 it will be stored in."""
    return _StraightThrough.apply(x, value.detach())
