"""ZeroQuant (Yao et al., 2022): group-wise weights, token-wise dynamic activations, and optional
layer-by-layer knowledge distillation (LKD).

Weights, row groups (the paper's layout; recipe `weights: {granularity: channel}`, step `groups`).
ZeroQuant's reference implementation (DeepSpeed's compression `SymQuantizer`) splits a weight into
`num_groups` groups by reshaping the flattened tensor to `[num_groups, -1]`; on an `nn.Linear`
weight `[out, in]` (row-major) every group is a run of whole consecutive output rows, and its
example configs use 64 groups (`quantize_groups: 64`, symmetric). lowbit keeps that layout: `groups`
groups of `out / groups` rows (the largest divisor of `out` not above `groups` when it does not
divide; `groups: -1` is one group per row), one symmetric scale per group, absmax / 127.5 at 8 bits
(codes in [-128, 127], W8A8Linear's grid) and absmax / 7.5 at 4 bits ([-8, 7]). Because the groups
run along the output dimension, a group's scale is a per-output-channel scale shared by its rows:
it is applied in the integer GEMM's epilogue with the activation's token scale, and the whole
reduction over the input dimension stays in int32. The modules store it per row (`W8A8Linear` /
`W4A8Linear` with channel scales), equal within a group: 32 bits a row (0.06 bits/weight at 576
inputs) for one epilogue shared with the other W8A8 presets.

Weights, groups along the input dim (4 bits only; recipe `weights: {group_size: G}`). At 4 bits
row groups lose too much on small models: on four of SmolLM2-135M's blocks the relative squared
weight error is 5.7% with 64 row groups, 2.2% with one scale per row and 1.0% in groups of 64 along
the input dim (the fine-grained groups of ZeroQuant-V2). Float scales per input group would need a
float multiply inside the reduction, so these groups use the two-level int4 of `W4A8Linear` (integer
group scales in [1, 16] under a float row scale): the unpacked weight is int8 and the GEMM stays in
integers. `w4a8-zeroquant` uses this layout; `w8a8-zeroquant` the paper's row groups.

Activations: int8 per token, dynamic (the scale of each token from its absmax at run time).

LKD (`lkd: true`, with `steps`, `lr`, `batch_size`). The paper trains each quantized layer to
reproduce its float counterpart's output, both fed the float model's activations, one layer at a
time, so only one block is in memory. Here: the runner feeds every block the float model's inputs
(`propagate: float`) and records the float block's outputs; the block's linears become fake-quant
students: latent float weights rounded onto their grid (the round-to-nearest grid of the float
weight, kept fixed), per-token int8 activations, straight-through gradients; Adam minimises the MSE
between the block's output and the float one over `steps` micro-batches of `batch_size` calibration
samples. One micro-batch is held out (when there are two or more): the tuned weights are kept only
if its loss went down, so a block LKD overfits keeps its round-to-nearest weights. The latent
weights are then packed on the same grid, so the packed module computes what the student did. Only
the linear weights are tuned (norms and biases stay). Each block's held-out loss before and after
is kept in `lkd_log`.

Measured on SmolLM2-135M (bench/w8a8.py, WikiText-2 test 40 x 512, calibration 16 x 512 tokens of
WikiText-2 validation, checkpoints saved in lowbit's format and reloaded; one thread, run under the
shared lock, load average about 1 at its end; float perplexity 29.19, naive W8A8 72.00 in the same
settings, see the README):

    preset            bits/weight   ppl     Δppl %   KL       top-1   quantize
    w8a8-zeroquant    8.05          30.25   +3.62    0.0377   0.881   1.7 s
    w4a8 (no LKD)     4.17          44.99   +54.15   0.5099   0.619   7.0 s
    w4a8-zeroquant    4.17          39.32   +34.71   0.3574   0.679   240 s  (LKD, 20 steps/block)

`w4a8` is `w4a8-zeroquant`'s grid rounded to nearest, so the last two rows are LKD's effect. The 64
row groups cost w8a8-zeroquant against one scale per row: w8a8-sq-o1 (per-channel weights, per-token
activations, SmoothQuant) measured +0.92% in the same settings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calib.runner import call_block
from ..errors import SpecError
from ..kernels.int8_gemm import fake_quantize_per_token
from ..models import linear_weight, set_module
from ..nn import W4A8Linear, W8A8Linear
from ..nn.w4a8_linear import INT4_MAX, INT4_MIN, int4_weight
from ..quant import PerChannel, PerGroup, QuantSpec
from .base import Algorithm
from .w4a8 import check_per_token
from .w8a8 import check_finite_weights

log = logging.getLogger(__name__)

DEFAULT_GROUPS = 64


def _n_groups(out_features: int, groups: int) -> int:
    if groups == -1 or groups >= out_features:
        return out_features
    return max(d for d in range(1, groups + 1) if out_features % d == 0)


def row_group_scales(weight: torch.Tensor, bits: int, groups: int) -> torch.Tensor:
    """float32 `[out, 1]`: each row's scale, shared by the `out / n_groups` consecutive rows of its group."""
    w = weight.detach().float()
    out_f = w.shape[0]
    g = _n_groups(out_f, groups)
    amax = w.abs().reshape(g, -1).amax(dim=1)  # [g]
    half_range = (2 ** bits - 1) / 2  # 127.5 at 8 bits, 7.5 at 4
    return (amax / half_range).clamp(min=1e-12).repeat_interleave(out_f // g).reshape(out_f, 1)


def row_group_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes (float) of the weight on the row scales, clamped to [-2^(b-1), 2^(b-1) - 1]."""
    return torch.clamp(torch.round(weight.float() / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded - x).detach()


@dataclass
class Grid:
    """A weight's int grid, fixed from its round-to-nearest quantization: `step` `[out, 1]` (row groups)
    or `[out, in]` (float row scale times integer group scale), codes clamped to [qmin, qmax]."""

    step: torch.Tensor
    qmin: int
    qmax: int
    row_scale: torch.Tensor  # [out, 1] float32: what the GEMM's epilogue applies
    group_scale: torch.Tensor | None = None  # [out, in / G] uint8, two-level int4 only
    group_size: int | None = None

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w.float() / self.step), self.qmin, self.qmax)


class _StudentLinear(nn.Module):
    """A linear under LKD: a latent float weight rounded onto its fixed grid in the forward, the input
    rounded per token to int8 (as the packed module's kernel does), straight-through gradients."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else bias.detach().float().clone()
        self.grid = grid

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        return _ste(w, self.grid.codes(w.detach()) * self.grid.step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize_per_token(x)
        b = None if self.bias is None else self.bias.to(x.device)
        return F.linear(xq, self.quantized_weight(), b).to(x.dtype)


def _slice(obj, start: int, stop: int, batch: int):
    """The micro-batch [start, stop) of a block input: tensors whose first dim is the chunk's batch
    are sliced; broadcast ones (first dim 1) and everything else pass through."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_slice(o, start, stop, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice(o, start, stop, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice(v, start, stop, batch) for k, v in obj.items()}
    return obj


class ZeroQuant(Algorithm):
    name = "zeroquant"
    takes_activations = True

    def __init__(self, spec: QuantSpec, activations: QuantSpec | None = None, groups: int = DEFAULT_GROUPS,
                 lkd: bool = False, steps: int = 20, lr: float = 1e-4, batch_size: int = 2, seed: int = 0):
        if spec.bits not in (4, 8) or not spec.symmetric or spec.dtype != "int":
            raise SpecError(f"ZeroQuant quantizes weights to 8 or 4-bit symmetric integers, the recipe has {spec}")
        g = spec.granularity
        if isinstance(g, PerChannel) or (isinstance(g, PerGroup) and g.group_size == -1):
            self.group_size = None  # ZeroQuant's groups of output rows (`groups`)
        elif isinstance(g, PerGroup) and spec.bits == 4:
            self.group_size = g.group_size  # groups along the input dim, two-level int4
        else:
            raise SpecError(f"ZeroQuant's weights are in groups of output rows (`granularity: channel` and the step's "
                            f"`groups`), or at 4 bits in groups along the input dim (`group_size`); the recipe "
                            f"has {spec}")
        check_per_token(activations, "ZeroQuant")
        if isinstance(groups, bool) or not isinstance(groups, int) or (groups <= 0 and groups != -1):
            raise SpecError(f"zeroquant: groups must be a positive int or -1 (one per row), got {groups!r}")
        if not isinstance(lkd, bool):
            raise SpecError(f"zeroquant: lkd must be true or false, got {lkd!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpecError(f"zeroquant: steps must be a positive int, got {steps!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise SpecError(f"zeroquant: lr must be a positive number, got {lr!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError(f"zeroquant: batch_size must be a positive int, got {batch_size!r}")
        self.spec, self.bits, self.groups = spec, spec.bits, groups
        self.lkd, self.steps, self.lr, self.batch_size, self.seed = lkd, steps, float(lr), batch_size, seed
        # LKD needs calibration data and the float model's activations as every block's input
        self.requires_calibration = lkd
        self.propagate = "float" if lkd else "quantized"
        self.lkd_log: list[dict] = []

    def prepare(self, model, adapter) -> None:
        check_finite_weights(model, adapter)

    # ---- LKD ---------------------------------------------------------------------------------

    def _micro_batches(self, ctx) -> list[tuple[int, int, int]]:
        out = []
        for ci, c in enumerate(ctx.chunks):
            b = c.hidden.shape[0]
            out += [(ci, s, min(s + self.batch_size, b)) for s in range(0, b, self.batch_size)]
        return out

    def _batch_loss(self, ctx, mb) -> torch.Tensor:
        ci, s, e = mb
        c = ctx.chunks[ci]
        b = c.hidden.shape[0]
        h = c.hidden[s:e].to(ctx.device)
        kw = _slice(ctx.kwargs(c), s, e, b)
        target = ctx.float_outputs[ci][s:e].to(ctx.device)
        return F.mse_loss(call_block(ctx.block, h, kw).float(), target.float())

    @torch.no_grad()
    def _mean_loss(self, ctx, mbs) -> float:
        return sum(float(self._batch_loss(ctx, mb)) for mb in mbs) / max(1, len(mbs))

    def _distill(self, ctx, students: dict[str, _StudentLinear]) -> None:
        if ctx.float_outputs is None:
            raise SpecError("zeroquant: LKD needs the float block's outputs (the runner records them when "
                            "zeroquant is the recipe's last step)")
        mbs = self._micro_batches(ctx)
        held = mbs[-1:] if len(mbs) > 1 else mbs
        train = mbs[:-1] if len(mbs) > 1 else mbs
        frozen = [p for p in ctx.block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        params = [st.weight for st in students.values()]
        for p in params:
            p.requires_grad_(True)
        start = [p.detach().clone() for p in params]
        before = self._mean_loss(ctx, held)
        opt = torch.optim.Adam(params, lr=self.lr)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed + ctx.index)).tolist()
        try:
            with torch.enable_grad():
                for step in range(self.steps):
                    loss = self._batch_loss(ctx, train[order[step % len(order)]])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        after = self._mean_loss(ctx, held)
        kept = after < before
        if not kept:
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
        self.lkd_log.append({"block": ctx.index, "loss_before": before, "loss_after": after, "kept": kept})
        log.info("%s: LKD held-out MSE %.4g -> %.4g (%s)", ctx.name, before, after, "kept" if kept else "reverted")

    # ---- grid and packing ----------------------------------------------------------------------

    def _grid(self, weight: torch.Tensor, name: str) -> Grid:
        w = weight.detach().float()
        if self.group_size is not None:
            _, row, k = int4_weight(w, "group", self.group_size, name)
            step = row * k.float().repeat_interleave(self.group_size, dim=1)
            return Grid(step, INT4_MIN, INT4_MAX, row, k, self.group_size)
        row = row_group_scales(w, self.bits, self.groups)
        return Grid(row, -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1, row)

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None, grid: Grid, name: str) -> nn.Module:
        codes = grid.codes(weight).to(torch.int8)
        out_f, in_f = weight.shape
        if self.bits == 4:
            return W4A8Linear.from_codes(codes, grid.row_scale, bias, group_scale=grid.group_scale,
                                         group_size=grid.group_size, name=name).to(weight.device)
        m = W8A8Linear(in_f, out_f, weight_granularity="channel", act_mode="per_token", bias=bias is not None,
                       bias_dtype=bias.dtype if bias is not None else torch.float32, name=name)
        m.weight.copy_(codes)
        m.weight_scale.copy_(grid.row_scale)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m.to(weight.device)

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, (W8A8Linear, W4A8Linear))}
        biases = {n: getattr(m, "bias", None) for n, m in linears.items()}
        weights = {n: linear_weight(m) for n, m in linears.items()}
        grids = {n: self._grid(w, f"{ctx.name}.{n}") for n, w in weights.items()}
        if self.lkd and ctx.has_data:
            students = {n: _StudentLinear(weights[n], biases[n], grids[n]).to(ctx.device) for n in linears}
            for n, st in students.items():
                set_module(ctx.block, n, st)
            try:
                self._distill(ctx, students)
            finally:
                for n, m in linears.items():  # the float linears back in place until packed
                    set_module(ctx.block, n, m)
            weights = {n: st.weight.detach() for n, st in students.items()}
        for n in linears:
            set_module(ctx.block, n, self._pack(weights[n], biases[n], grids[n], f"{ctx.name}.{n}"))

    def config(self) -> dict:
        d = {"method": self.name, "bits": self.bits, "activations": "per_token", "lkd": self.lkd}
        d.update({"group_size": self.group_size} if self.group_size is not None else {"groups": self.groups})
        if self.lkd:
            d.update(steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                     blocks_tuned=sum(e["kept"] for e in self.lkd_log))
        return d
