"""`InputRotation`: what a packed module needs to hold `W R^T` and multiply `R x`.

R is the randomized block-Hadamard rotation of `lowbit.quant.rotation`, fixed by `rotate_block` (part of
the module's configuration; 0 = none) and the int8 buffer `rotation_signs` (one +-1 per input feature,
saved with the module). The module's forward calls `rotate_input(x)` before it quantizes x; the float
output is the same, both roundings see spread-out values.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..quant.rotation import check_rotation_block, rotate, rotation_signs, unrotate


def rotate_weight(weight: torch.Tensor, rotate_block: int, rotate_seed: int = 0, name: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W R^T in float64, the signs), or (weight, None) without rotation: what `from_weight` rounds."""
    if not rotate_block:
        return weight, None
    check_rotation_block(weight.shape[1], rotate_block, name)
    signs = rotation_signs(weight.shape[1], rotate_seed)
    return rotate(weight.detach(), signs, rotate_block, torch.float64), signs


class InputRotation:
    rotate_block: int
    rotation_signs: torch.Tensor | None

    def _init_rotation(self, in_features: int, rotate_block: int, name: str) -> None:
        if rotate_block:
            check_rotation_block(in_features, rotate_block, name)
        self.rotate_block = int(rotate_block)
        if self.rotate_block:
            self.register_buffer("rotation_signs", torch.ones(in_features, dtype=torch.int8))
        else:
            self.rotation_signs = None

    def _set_rotation_signs(self, signs: torch.Tensor | None, name: str) -> None:
        if not self.rotate_block:
            return
        if signs is None or signs.numel() != self.in_features or not bool((signs.abs() == 1).all()):
            raise SpecError(f"layer {name or '?'}: a rotated module needs one sign (+-1) per input feature")
        self.rotation_signs.copy_(signs.reshape(-1).to(torch.int8))

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """R x in float32 (a 16-bit copy would add its own rounding before the int8 one), or x."""
        return rotate(x, self.rotation_signs, self.rotate_block) if self.rotate_block else x

    def _unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        return unrotate(w, self.rotation_signs, self.rotate_block) if self.rotate_block else w

    def _rotation_bits(self) -> int:
        return self.rotation_signs.numel() * 8 if self.rotate_block else 0

    def _rotation_repr(self) -> str:
        return f", rotate_block={self.rotate_block}" if self.rotate_block else ""
