"""The `rotate` options of the steps whose modules quantize their input per token (`llm_int8`, `w4a8`).

`rotate: hadamard` makes every linear hold `W R^T` and multiply `R x` (lowbit.nn.input_rotation, R a
randomized block-Hadamard rotation of `rotate_block` channels whose signs come from `rotate_seed`).
Rounding to nearest needs nothing more. For GPTQ rounding, `rotated_float_linears` rotates the float
linears of a block in place and rotates their inputs with a forward pre-hook registered before GPTQ's
own, so that the Hessians, the act_calib targets and the block's propagated outputs are all taken in
the rotated basis the packed module will compute in.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from ..errors import SpecError
from ..models import block_linears, get_blocks, linear_weight
from ..quant.rotation import check_rotation_block, rotate, rotation_signs

ROTATIONS = ("none", "hadamard")


def check_rotate_options(method: str, rotate: str, rotate_block: int, rotate_seed: int) -> int:
    """The rotation block the step's modules get (0: no rotation); bad values refused by name."""
    if rotate not in ROTATIONS:
        raise SpecError(f"{method}: rotate is one of {ROTATIONS}, got {rotate!r}")
    if rotate == "none":
        return 0
    if not isinstance(rotate_block, int) or isinstance(rotate_block, bool) or rotate_block < 2 or (
            rotate_block & (rotate_block - 1)):
        raise SpecError(f"{method}: rotate_block must be a power of two >= 2, got {rotate_block!r}")
    if not isinstance(rotate_seed, int) or isinstance(rotate_seed, bool) or rotate_seed < 0:
        raise SpecError(f"{method}: rotate_seed must be an integer >= 0, got {rotate_seed!r}")
    return rotate_block


def check_model_widths(model, adapter, rotate_block: int) -> None:
    """Every decoder linear's input width divisible by the block, checked before any block is touched."""
    for i, block in enumerate(get_blocks(model, adapter)):
        for n, m in block_linears(block, adapter).items():
            check_rotation_block(linear_weight(m).shape[1], rotate_block, f"block {i}: {n}")


def _rotate_input(module, args, *, signs, block):
    return (rotate(args[0], signs, block).to(args[0].dtype), *args[1:])


@contextmanager
def rotated_float_linears(linears: dict, rotate_block: int, rotate_seed: int):
    """Within: each float linear holds `W R^T` and is fed `R x`; yields {name: signs}. The hooks go on
    exit; the weights stay rotated (the caller replaces the linears by packed modules)."""
    signs, hooks = {}, []
    try:
        if rotate_block:
            for n, m in linears.items():
                w = linear_weight(m)
                signs[n] = rotation_signs(w.shape[1], rotate_seed)
                w.copy_(rotate(w, signs[n], rotate_block, torch.float64).to(w.dtype))
                hooks.append(m.register_forward_pre_hook(functools.partial(
                    _rotate_input, signs=signs[n], block=rotate_block)))
        yield signs
    finally:
        for h in hooks:
            h.remove()
