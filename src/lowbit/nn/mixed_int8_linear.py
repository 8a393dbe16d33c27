"""`MixedInt8Linear`: LLM.int8() - int8 weights with one scale per output row, int8 activations per
token, and the input columns holding outliers (|x| > threshold at run time) multiplied in 16-bit.

Storage is `W8A8Linear`'s with per-channel weights (`weight` int8 `[out, in]`, `weight_scale`
`[out, 1]`); the threshold is part of the module's configuration. The forward is
`lowbit.kernels.mixed_int8_matmul`.

With `rotate_block` > 0 the module holds `W R^T` and multiplies `R x` (`InputRotation`: a randomized
block-Hadamard rotation whose signs are the int8 buffer `rotation_signs`): the same output in float,
while both roundings, the weight rows' and each token's, see spread-out values. The outlier threshold
then applies to the rotated input.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..errors import SpecError
from .input_rotation import InputRotation, rotate_weight
from .w8a8_linear import W8A8Linear, int8_weight

_HALF = (torch.float16, torch.bfloat16)


class MixedInt8Linear(InputRotation, W8A8Linear):
    def __init__(self, in_features: int, out_features: int, *, threshold: float = 6.0, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, rotate_block: int = 0, name: str = ""):
        if not float(threshold) > 0:
            raise SpecError(f"layer {name or '?'}: the LLM.int8() outlier threshold must be > 0, got {threshold}")
        super().__init__(in_features, out_features, weight_granularity="channel", act_mode="per_token", bias=bias,
                         bias_dtype=bias_dtype, name=name)
        self.threshold = float(threshold)
        self._init_rotation(in_features, rotate_block, name)

    @classmethod
    def from_float(cls, linear: nn.Module, *, threshold: float = 6.0, rotate_block: int = 0, rotate_seed: int = 0,
                   name: str = "") -> "MixedInt8Linear":
        return cls.from_weight(linear.weight, getattr(linear, "bias", None), threshold=threshold,
                               rotate_block=rotate_block, rotate_seed=rotate_seed, name=name)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, threshold: float = 6.0,
                    rotate_block: int = 0, rotate_seed: int = 0, name: str = "") -> "MixedInt8Linear":
        """From a float weight `[out, in]`; with `rotate_block` its rows are rotated first (in float64,
        so the int8 rounding is the only one), with the signs `rotation_signs(in, rotate_seed)`."""
        weight, signs = rotate_weight(weight, rotate_block, rotate_seed, name)
        q, s = int8_weight(weight, "channel", name)
        return cls.from_codes(q, s, bias, threshold=threshold, rotate_block=rotate_block, rotation_signs=signs,
                              name=name)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                   threshold: float = 6.0, rotate_block: int = 0, rotation_signs: torch.Tensor | None = None,
                   name: str = "") -> "MixedInt8Linear":
        """From integer codes `[out, in]` and row scales `[out, 1]` rounded elsewhere (GPTQ); with
        `rotate_block`, codes of the rotated weight and the signs that rotated it."""
        base = W8A8Linear.from_codes(codes, weight_scale, bias, weight_granularity="channel", act_mode="per_token",
                                     name=name)
        m = cls(base.in_features, base.out_features, threshold=threshold, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, rotate_block=rotate_block, name=name)
        m.load_state_dict(base.state_dict(), strict=False)
        m._set_rotation_signs(rotation_signs, name)
        return m.to(codes.device)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out, in]` in the input's own basis (`W R^T` rotated back)."""
        return self._unrotate_weight(super().dequantize_weight())

    def storage_bits(self) -> int:
        return super().storage_bits() + self._rotation_bits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rotate_block:
            return kernels.mixed_int8_matmul(x, self._prepared(), self.weight_scale, self.bias, self.threshold)
        # the outlier columns still go through the 16-bit matmul x's dtype asks for
        y = kernels.mixed_int8_matmul(self.rotate_input(x), self._prepared(), self.weight_scale, self.bias,
                                      self.threshold, x.dtype if x.dtype in _HALF else torch.float16)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"
                f"{self._rotation_repr()}, bias={self.bias is not None}")
