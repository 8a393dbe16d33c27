"""Packed modules that replace `nn.Linear`."""

from .awq_linear import AWQ_LAYOUTS, AWQLinear, AWQLinearGEMM, AWQLinearGEMV
from .wq_linear import WQLinear

QUANTIZED_MODULES = {"WQLinear": WQLinear, "AWQLinearGEMM": AWQLinearGEMM, "AWQLinearGEMV": AWQLinearGEMV}

__all__ = ["WQLinear", "AWQLinear", "AWQLinearGEMM", "AWQLinearGEMV", "AWQ_LAYOUTS", "QUANTIZED_MODULES"]
