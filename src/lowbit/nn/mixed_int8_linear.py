"""`MixedInt8Linear`: LLM.int8() - int8 weights with one scale per output row, int8 activations per
token, and the input columns holding outliers (|x| > threshold at run time) multiplied in 16-bit.

Storage is `W8A8Linear`'s with per-channel weights (`weight` int8 `[out, in]`, `weight_scale`
`[out, 1]`); the threshold is part of the module's configuration. The forward is
`lowbit.kernels.mixed_int8_matmul`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..errors import SpecError
from .w8a8_linear import W8A8Linear, int8_weight


class MixedInt8Linear(W8A8Linear):
    def __init__(self, in_features: int, out_features: int, *, threshold: float = 6.0, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, name: str = ""):
        if not float(threshold) > 0:
            raise SpecError(f"layer {name or '?'}: the LLM.int8() outlier threshold must be > 0, got {threshold}")
        super().__init__(in_features, out_features, weight_granularity="channel", act_mode="per_token", bias=bias,
                         bias_dtype=bias_dtype, name=name)
        self.threshold = float(threshold)

    @classmethod
    def from_float(cls, linear: nn.Module, *, threshold: float = 6.0, name: str = "") -> "MixedInt8Linear":
        return cls.from_weight(linear.weight, getattr(linear, "bias", None), threshold=threshold, name=name)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, threshold: float = 6.0,
                    name: str = "") -> "MixedInt8Linear":
        q, s = int8_weight(weight, "channel", name)
        return cls.from_codes(q, s, bias, threshold=threshold, name=name)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                   threshold: float = 6.0, name: str = "") -> "MixedInt8Linear":
        """From integer codes `[out, in]` and row scales `[out, 1]` rounded elsewhere (GPTQ)."""
        base = W8A8Linear.from_codes(codes, weight_scale, bias, weight_granularity="channel", act_mode="per_token",
                                     name=name)
        m = cls(base.in_features, base.out_features, threshold=threshold, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, name=name)
        m.load_state_dict(base.state_dict())
        return m.to(codes.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.mixed_int8_matmul(x, self._prepared(), self.weight_scale, self.bias, self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
                f"bias={self.bias is not None}")
