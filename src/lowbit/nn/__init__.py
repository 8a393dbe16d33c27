"""Packed modules that replace `nn.Linear`."""

from .wq_linear import WQLinear

QUANTIZED_MODULES = {"WQLinear": WQLinear}

__all__ = ["WQLinear", "QUANTIZED_MODULES"]
