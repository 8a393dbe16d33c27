"""Packed modules that replace `nn.Linear`."""

from .awq_linear import AWQ_LAYOUTS, AWQLinear, AWQLinearGEMM, AWQLinearGEMV
from .fake_quant import FakeQuantize, FakeQuantLinear, is_int8_per_token
from .mixed_int8_linear import MixedInt8Linear
from .spqr_linear import SpQRLinear
from .w4a8_linear import W4A8Linear
from .w8a8_linear import W8A8Linear
from .wq_linear import WQLinear

QUANTIZED_MODULES = {"WQLinear": WQLinear, "AWQLinearGEMM": AWQLinearGEMM, "AWQLinearGEMV": AWQLinearGEMV,
                     "SpQRLinear": SpQRLinear, "W8A8Linear": W8A8Linear,
                     "MixedInt8Linear": MixedInt8Linear, "W4A8Linear": W4A8Linear}

__all__ = ["WQLinear", "W4A8Linear", "W8A8Linear", "MixedInt8Linear", "FakeQuantize", "FakeQuantLinear", "is_int8_per_token", "SpQRLinear", "AWQLinear", "AWQLinearGEMM", "AWQLinearGEMV", "AWQ_LAYOUTS", "QUANTIZED_MODULES"]
