"""Fake quantization for the grid searches (AWQ's scale and clip searches score tens of candidate
roundings of every weight per block): each weight group rounded onto its own min-max grid, exactly
as a packed `WQLinear` stores it (fp16 scale rounded up, integer zero point, round half to even),
returned dequantized in float32.

- ``fake_quant_scaled(w [O, I], s [k, I], ...) -> [k, O, I]``: ``Q(w * s_j) / s_j`` for every
  candidate per-input-channel scale (minus ``w`` with ``subtract``: the rounding error itself);
- ``fake_quant_clamped(wg [ng, O, g], lo [ng, k, O], hi [ng, k, O], ...) -> [ng, k, O, g]``:
  ``Q(clamp(wg, lo_j, hi_j)) - wg`` for every candidate clipping range, group-major.

The ``*_ref`` functions are the plain-torch definitions; the fast path is a C++ kernel
(``_fq_cpp``) that does each group in one pass and gives the same bits.
"""

from __future__ import annotations

import torch

from lowbit.quant import QuantSpec
from lowbit.quant.primitives import _range_qparams, fp16_scale

__all__ = ["fake_quant_clamped", "fake_quant_clamped_ref", "fake_quant_scaled", "fake_quant_scaled_ref",
           "round_groups_"]

def round_groups_(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """v `[..., g]` rounded in place onto spec's grid of the range [lo, hi] `[..., 1]` (the groups'
    min and max, or what a clamp just made them): quant.primitives' range parameters, the scale as
    fp16 stores it (rounded up). The one definition of this rounding: AWQ's searches call it, and
    the C++ kernel reproduces it bit for bit."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale, zero = _range_qparams(lo, hi, spec)
    scale = fp16_scale(scale)
    v.div_(scale).round_()
    if zero is None:
        v.clamp_(spec.qmin, spec.qmax)
    else:
        # codes and zero are integers in float32, so clamping q to [qmin - z, qmax - z] is exactly
        # (q + z).clamp(qmin, qmax) - z, in one pass instead of three
        v.clamp_(min=spec.qmin - zero, max=spec.qmax - zero)
    return v.mul_(scale)


def fake_quant_scaled_ref(w: torch.Tensor, s: torch.Tensor, group_size: int, spec: QuantSpec,
                          subtract: bool = False) -> torch.Tensor:
    o, i = w.shape
    v = (w.float()[None] * s.float()[:, None, :]).view(s.shape[0], o, i // group_size, group_size)
    round_groups_(v, v.amin(-1, keepdim=True), v.amax(-1, keepdim=True), spec)
    v = v.view(s.shape[0], o, i).div_(s.float()[:, None, :])
    return v.sub_(w.float()) if subtract else v


def fake_quant_clamped_ref(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    w4 = wg.float().unsqueeze(1)  # [ng, 1, O, g]
    v = torch.clamp(w4, min=lo.unsqueeze(-1), max=hi.unsqueeze(-1))
    round_groups_(v, v.amin(-1, keepdim=True), v.amax(-1, keepdim=True), spec)
    return v.sub_(w4)


def _ops(*tensors: torch.Tensor):
    if not all(t.device.type == "cpu" for t in tensors):
        return None
    from lowbit.kernels import _fq_cpp

    return _fq_cpp.load()


def fake_quant_scaled(w: torch.Tensor, s: torch.Tensor, group_size: int, spec: QuantSpec,
                      subtract: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """spec: a uniform grid (codebook specs have no kernel: quant.quantize_dequantize). out: a float32 buffer of k * O * I elements to write into (a search reuses one: a fresh
    tensor of this size costs its page faults every call); returned viewed as `[k, O, I]`."""
    if w.dim() != 2 or s.dim() != 2 or s.shape[1] != w.shape[1]:
        raise ValueError(f"fake_quant_scaled: w [O, I] and s [k, I], got {tuple(w.shape)} and {tuple(s.shape)}")
    if w.shape[1] % group_size:
        raise ValueError(f"fake_quant_scaled: group size {group_size} does not divide {w.shape[1]} input features")
    ops = _ops(w, s)
    shape = (s.shape[0], *w.shape)
    if ops is None:
        r = fake_quant_scaled_ref(w, s, group_size, spec, subtract)
        return r if out is None else _into(out, r, shape)
    out = _buffer(out, shape, w.device)
    ops.fq_scaled(w.float().contiguous(), s.float().contiguous(), group_size, spec.qmin, spec.qmax, spec.symmetric,
                  subtract, out)
    return out


def fake_quant_clamped(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """out: as for fake_quant_scaled; returned viewed as `[ng, k, O, g]`."""
    if wg.dim() != 3 or lo.dim() != 3 or lo.shape != hi.shape or lo.shape[0] != wg.shape[0] or lo.shape[2] != wg.shape[1]:
        raise ValueError(f"fake_quant_clamped: wg [ng, O, g], lo and hi [ng, k, O]; got {tuple(wg.shape)}, "
                         f"{tuple(lo.shape)}, {tuple(hi.shape)}")
    ops = _ops(wg, lo, hi)
    shape = (wg.shape[0], lo.shape[1], wg.shape[1], wg.shape[2])
    if ops is None:
        r = fake_quant_clamped_ref(wg, lo, hi, spec)
        return r if out is None else _into(out, r, shape)
    out = _buffer(out, shape, wg.device)
    ops.fq_clamped(wg.float().contiguous(), lo.float().contiguous(), hi.float().contiguous(), spec.qmin, spec.qmax,
                   spec.symmetric, out)
    return out


def _buffer(out: torch.Tensor | None, shape, device) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    if out is None:
        return torch.empty(shape, device=device)
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < n:
        raise ValueError(f"out: a contiguous float32 buffer of at least {n} elements")
    return out.view(-1)[:n].view(shape)


def _into(out: torch.Tensor, r: torch.Tensor, shape) -> torch.Tensor:
    buf = _buffer(out, shape, r.device)
    return buf.copy_(r)
