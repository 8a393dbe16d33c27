"""The contract every method implements, so recipes can chain them.

A recipe is a list of algorithms. For each decoder block the runner calls, in recipe order,
`quantize_block(ctx)` of every algorithm. Methods that only transform float weights (AWQ's
scale search, SmoothQuant) leave the linears as `nn.Linear`; methods that round (RTN, GPTQ,
AWQ's final step) replace them with packed modules. `prepare` runs once before any block (and
is where bad input is refused, before minutes of calibration), `finalize` once after.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import SpecError


class Algorithm:
    name: str = "algorithm"
    # Whether the runner must feed calibration samples through the blocks.
    requires_calibration: bool = True
    # Which outputs feed the next block: "quantized" (GPTQ) or "float" (AutoAWQ).
    propagate: str = "quantized"
    # Whether quantize_block reads ctx.float_outputs (the untouched block on the float model's hidden
    # states, computed by the runner before any step changes the block).
    needs_float_outputs: bool = False

    def float_input_names(self, ctx) -> list[str]:
        """Submodules of the block whose inputs on the float model's hidden states quantize_block reads
        (`ctx.float_inputs_of[name]`, one tensor per calibration batch); the runner records them during
        the forward that produces ctx.float_outputs, so they cost no extra pass."""
        return []

    def prepare(self, model: nn.Module, adapter) -> None:
        pass

    def quantize_block(self, ctx) -> None:
        raise NotImplementedError

    def finalize(self, model: nn.Module, adapter) -> None:
        pass

    def config(self) -> dict:
        """What the checkpoint records about how it was made."""
        return {"method": self.name}


def settings_from_dict(cls, d: dict, method: str):
    """A settings dataclass from a recipe step's keys, refusing the ones it does not have by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise SpecError(f"{method}: unknown settings {sorted(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**d)
