"""The rounding step of W4A8 recipes: every linear becomes a `W4A8Linear`.

Weights: symmetric int4, rounded to nearest, per tensor, per output channel, or in groups of G along
the input dim with the two-level scheme (integer group scales in [1, 16] under a float per-channel
scale, so the unpacked weight is int8 and the GEMM stays in integers; see `lowbit.kernels.w4a8`).
Activations: int8 per token, dynamic. No calibration.

`rounding: gptq` keeps that grid (row scales and integer group scales chosen from the float weight as
rounding to nearest chooses them) and lets GPTQ pick the codes on it, each absorbing the output error
of those before it (`lowbit.algorithms.gptq.round_on_fixed_grids`); that needs calibration data.

`rotate: hadamard` (`rotate_block`, `rotate_seed`): every linear holds `W R^T` and multiplies `R x`,
a randomized block-Hadamard rotation (lowbit.algorithms.rotation): int4 weight groups and per-token
int8 activations without their large channels. With GPTQ the codes are chosen in the rotated basis.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..nn.w4a8_linear import int4_weight
from ..models import linear_weight, set_module
from ..nn import W4A8Linear, is_int8_per_token
from ..quant import PerChannel, PerGroup, PerTensor, QuantSpec
from .base import Algorithm
from .gptq import check_rounding, round_on_fixed_grids
from .rotation import check_model_widths, check_rotate_options, rotated_float_linears
from .w8a8 import check_finite_weights


def int4_granularity(spec: QuantSpec) -> tuple[str, int | None]:
    """("tensor" | "channel" | "group", group size or None) for a 4-bit symmetric integer spec."""
    if spec.bits != 4 or not spec.symmetric or spec.dtype != "int":
        raise SpecError(f"W4A8 needs 4-bit symmetric integer weights, the recipe has {spec}")
    g = spec.granularity
    if isinstance(g, PerTensor):
        return "tensor", None
    if isinstance(g, PerChannel) or (isinstance(g, PerGroup) and g.group_size == -1):
        return "channel", None
    if isinstance(g, PerGroup):
        return "group", g.group_size
    raise SpecError(f"W4A8 weights are per tensor, per channel or per group, the recipe has {g}")


def check_per_token(activations: QuantSpec | None, what: str) -> None:
    if activations is None:
        raise SpecError(f"a {what} recipe needs an `activations` block (bits 8, symmetric, granularity token, "
                        f"dynamic true)")
    if not is_int8_per_token(activations):
        raise SpecError(f"{what} quantizes activations to int8 per token, dynamic; the recipe has {activations}")


class W4A8(Algorithm):
    name = "w4a8"
    takes_activations = True

    def __init__(self, spec: QuantSpec, activations: QuantSpec | None = None, rounding: str = "nearest",
                 percdamp: float = 0.01, act_order: bool = True, rotate: str = "none", rotate_block: int = 64,
                 rotate_seed: int = 0):
        self.spec = spec
        self.weight_granularity, self.group_size = int4_granularity(spec)
        check_per_token(activations, "W4A8")
        self.rounding, self.percdamp = check_rounding("w4a8", rounding, percdamp)
        self.act_order = bool(act_order)
        self.requires_calibration = rounding == "gptq"
        self.rotate = rotate
        self.rotate_block = check_rotate_options("w4a8", rotate, rotate_block, rotate_seed)
        self.rotate_seed = int(rotate_seed)

    def prepare(self, model, adapter) -> None:
        check_finite_weights(model, adapter)
        if self.rotate_block:
            check_model_widths(model, adapter, self.rotate_block)

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, W4A8Linear)}
        grids = {}

        def grid(n, w):
            _, s, gs = grids[n] = int4_weight(w, self.weight_granularity, self.group_size, f"{ctx.name}.{n}")
            s = s.reshape(-1, 1).expand(w.shape[0], 1)
            return s if gs is None else s * gs.float()

        codes, signs = {}, {}
        if self.rounding == "gptq":
            spec = QuantSpec(bits=4, symmetric=True,
                             granularity=PerGroup(self.group_size) if self.group_size else PerChannel())
            with rotated_float_linears(linears, self.rotate_block, self.rotate_seed) as signs:
                codes = round_on_fixed_grids(ctx, linears, spec, grid, percdamp=self.percdamp,
                                             act_order=self.act_order)
        rot = dict(rotate_block=self.rotate_block)
        for n, m in linears.items():
            name, bias = f"{ctx.name}.{n}", getattr(m, "bias", None)
            if n in codes:
                _, s, gs = grids[n]
                q = W4A8Linear.from_codes(codes[n].to(torch.int8), s, bias, group_scale=gs,
                                          group_size=self.group_size, rotation_signs=signs.get(n), name=name, **rot)
            else:
                q = W4A8Linear.from_weight(linear_weight(m), bias, weight_granularity=self.weight_granularity,
                                           group_size=self.group_size, rotate_seed=self.rotate_seed, name=name,
                                           **rot)
            set_module(ctx.block, n, q.to(linear_weight(m).device))

    def config(self) -> dict:
        d = {"method": self.name, "weights": self.weight_granularity, "group_size": self.group_size,
             "activations": "per_token", "rounding": self.rounding}
        if self.rounding == "gptq":
            d.update(percdamp=self.percdamp, act_order=self.act_order)
        if self.rotate_block:
            d.update(rotate=self.rotate, rotate_block=self.rotate_block, rotate_seed=self.rotate_seed)
        return d
