"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 with a mixed-precision decomposition.

Each linear becomes a `MixedInt8Linear`: int8 weights with one absmax scale per output row, int8
activations with one scale per token, and at run time the feature columns where some token's
magnitude exceeds `threshold` (6.0 in the paper) multiplied in 16-bit instead. With the default
`rounding: nearest` no calibration: the outliers are found on every call.

`rounding: gptq` keeps all of that (the same row scales, the same run-time decomposition, the same
checkpoint and kernel) and lets GPTQ choose the int8 codes on that grid from calibration data, as
`w8a8`'s option of the same name does; `act_calib` (0..1) fits them to the inputs as the mixed matmul
sees them (outlier columns as they are, the rest rounded per token), so that part of the activations'
rounding error moves into the weights. That is what costs LLM.int8() on these small models: per-token
int8 over a 576-wide hidden state whose large channels sit between 2 and 6, under the threshold.
`calib_forward: quantized` fits them on the quantized forward (see `w8a8`): held-out validation,
SmolLM2 ppl +0.89% -> +0.85%, Gemma-3 +0.65% -> +1.04%; off by default.

`rotate: hadamard` stores each linear as `W R^T` and feeds it `R x`, R a randomized block-Hadamard
rotation of `rotate_block` channels (lowbit.algorithms.rotation; signs from `rotate_seed`, stored in
the checkpoint). The float output is the same; the large channels are spread over their block, so the
per-token int8 scale no longer leaves the typical entry a few steps of the grid, and the threshold
applies to the rotated input. With rounding to nearest it needs no calibration either; with GPTQ the
codes are chosen in the rotated basis.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..kernels.mixed_int8 import mixed_int8_input
from ..models import linear_weight, set_module
from ..nn import MixedInt8Linear
from ..quant import QuantSpec
from .base import Algorithm
from .rotation import check_model_widths, check_rotate_options, rotated_float_linears
from .gptq import check_act_calib, check_calib_forward, check_rounding
from .w8a8 import check_finite_weights, gptq_int8_codes, weight_granularity


class LLMInt8(Algorithm):
    name = "llm_int8"

    def __init__(self, spec: QuantSpec, threshold: float = 6.0, rounding: str = "nearest", percdamp: float = 0.01,
                 act_order: bool = True, act_calib: float = 0.0, calib_forward: str = "float",
                 rotate: str = "none", rotate_block: int = 64, rotate_seed: int = 0):
        if weight_granularity(spec) != "channel":
            raise SpecError(f"LLM.int8() quantizes weights per output row (vector-wise), the recipe has {spec}")
        self.spec = spec
        self.threshold = float(threshold)
        MixedInt8Linear(1, 1, threshold=self.threshold)  # refuses a bad threshold before any work
        self.rounding, self.percdamp = check_rounding("llm_int8", rounding, percdamp)
        self.act_order = bool(act_order)
        self.act_calib = check_act_calib("llm_int8", act_calib, rounding)
        self.calib_forward = check_calib_forward("llm_int8", calib_forward, self.act_calib)
        self.requires_calibration = rounding == "gptq"
        self.rotate = rotate
        self.rotate_block = check_rotate_options("llm_int8", rotate, rotate_block, rotate_seed)
        self.rotate_seed = int(rotate_seed)

    def prepare(self, model, adapter) -> None:
        check_finite_weights(model, adapter)
        if self.rotate_block:
            check_model_widths(model, adapter, self.rotate_block)

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, MixedInt8Linear)}
        codes, signs = {}, {}
        if self.rounding == "gptq":
            with rotated_float_linears(linears, self.rotate_block, self.rotate_seed) as signs:
                codes = gptq_int8_codes(ctx, linears, "channel", percdamp=self.percdamp, act_order=self.act_order,
                                        input_quant=lambda n, x: mixed_int8_input(x, self.threshold),
                                        act_calib=self.act_calib, calib_forward=self.calib_forward)
        for n, m in linears.items():
            kw = dict(threshold=self.threshold, rotate_block=self.rotate_block, name=f"{ctx.name}.{n}")
            if n in codes:
                q = MixedInt8Linear.from_codes(*codes[n], getattr(m, "bias", None), rotation_signs=signs.get(n), **kw)
            else:
                q = MixedInt8Linear.from_weight(linear_weight(m), getattr(m, "bias", None),
                                                rotate_seed=self.rotate_seed, **kw)
            set_module(ctx.block, n, q.to(linear_weight(m).device))

    def config(self) -> dict:
        d = {"method": self.name, "threshold": self.threshold, "rounding": self.rounding}
        if self.rotate_block:
            d.update(rotate=self.rotate, rotate_block=self.rotate_block, rotate_seed=self.rotate_seed)
        if self.rounding == "gptq":
            d.update(percdamp=self.percdamp, act_order=self.act_order, act_calib=self.act_calib,
                     calib_forward=self.calib_forward)
        return d
