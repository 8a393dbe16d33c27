"""Round-to-nearest: each weight group quantized on its own min/max, no data needed.

The baseline every other method is measured against, and the final rounding step that scaling
methods (AWQ, SmoothQuant) hand their transformed weights to.
"""

from __future__ import annotations

from ..errors import InvalidWeightsError
from ..models import get_blocks, block_linears, linear_weight, set_module
from ..nn import WQLinear
from ..quant import QuantSpec, check_group_size
from .base import Algorithm


class RTN(Algorithm):
    name = "rtn"
    requires_calibration = False

    def __init__(self, spec: QuantSpec):
        self.spec = spec

    def prepare(self, model, adapter) -> None:
        check_weights(model, adapter, self.spec)

    def quantize_block(self, ctx) -> None:
        for name, mod in ctx.linears.items():
            if isinstance(mod, WQLinear):
                continue
            full = f"{ctx.name}.{name}"
            q = WQLinear.from_weight(linear_weight(mod), getattr(mod, "bias", None), self.spec, name=full)
            set_module(ctx.block, name, q.to(linear_weight(mod).device))

    def config(self) -> dict:
        return {"method": self.name}


def check_weights(model, adapter, spec: QuantSpec) -> None:
    """Refuses NaN/Inf weights and group sizes that don't divide a layer, before any work."""
    for i, block in enumerate(get_blocks(model, adapter)):
        for name, mod in block_linears(block, adapter).items():
            full = f"{adapter.blocks}.{i}.{name}"
            w = linear_weight(mod)
            if not w.is_floating_point():
                continue
            if not bool(w.isfinite().all()):
                raise InvalidWeightsError(f"layer {full} has NaN or Inf in its weight")
            check_group_size(w.shape[1], WQLinear.spec_group_size(spec, w.shape[1]), full)
