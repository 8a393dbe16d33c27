"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 with a mixed-precision decomposition.

Each linear becomes a `MixedInt8Linear`: int8 weights with one absmax scale per output row, int8
activations with one scale per token, and at run time the feature columns where some token's
magnitude exceeds `threshold` (6.0 in the paper) multiplied in 16-bit instead. No calibration: the
outliers are found on every call.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..models import linear_weight, set_module
from ..nn import MixedInt8Linear
from ..quant import QuantSpec
from .base import Algorithm
from .w8a8 import check_finite_weights, weight_granularity


class LLMInt8(Algorithm):
    name = "llm_int8"
    requires_calibration = False

    def __init__(self, spec: QuantSpec, threshold: float = 6.0):
        if weight_granularity(spec) != "channel":
            raise SpecError(f"LLM.int8() quantizes weights per output row (vector-wise), the recipe has {spec}")
        self.spec = spec
        self.threshold = float(threshold)
        MixedInt8Linear(1, 1, threshold=self.threshold)  # refuses a bad threshold before any work

    def prepare(self, model, adapter) -> None:
        check_finite_weights(model, adapter)

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        for n, m in ctx.linears.items():
            if isinstance(m, MixedInt8Linear):
                continue
            q = MixedInt8Linear.from_weight(linear_weight(m), getattr(m, "bias", None), threshold=self.threshold,
                                            name=f"{ctx.name}.{n}")
            set_module(ctx.block, n, q)

    def config(self) -> dict:
        return {"method": self.name, "threshold": self.threshold}
