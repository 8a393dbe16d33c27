"""Packed modules that replace `nn.Linear`."""

from .awq_linear import AWQ_LAYOUTS, AWQLinear, AWQLinearGEMM, AWQLinearGEMV
from .fake_quant import FakeQuantize, FakeQuantLinear
from .spqr_linear import SpQRLinear
from .wq_linear import WQLinear

QUANTIZED_MODULES = {"WQLinear": WQLinear, "AWQLinearGEMM": AWQLinearGEMM, "AWQLinearGEMV": AWQLinearGEMV,
                     "SpQRLinear": SpQRLinear}

__all__ = ["WQLinear", "FakeQuantize", "FakeQuantLinear", "SpQRLinear", "AWQLinear", "AWQLinearGEMM", "AWQLinearGEMV", "AWQ_LAYOUTS", "QUANTIZED_MODULES"]
