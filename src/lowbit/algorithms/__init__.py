"""One file per method; each is an `Algorithm` (prepare, quantize_block, finalize)."""

from .base import Algorithm
from .awq import AWQ
from .block_ap import BlockAP
from .gptq import GPTQ
from .llm_int8 import LLMInt8
from .outlier_suppression import OutlierSuppression
from .qat import QAT
from .rtn import RTN
from .smoothquant import SmoothQuant
from .spqr import SpQR
from .w4a8 import W4A8
from .w8a8 import W8A8
from .zeroquant import ZeroQuant

# The names recipes use in their `steps`.
ALGORITHMS: dict[str, type[Algorithm]] = {"rtn": RTN, "awq": AWQ, "gptq": GPTQ, "spqr": SpQR, "smoothquant": SmoothQuant, "w8a8": W8A8, "llm_int8": LLMInt8, "qat": QAT,
                                        "zeroquant": ZeroQuant, "outlier_suppression": OutlierSuppression, "w4a8": W4A8,
                                        "block_ap": BlockAP}

__all__ = ["Algorithm", "AWQ", "BlockAP", "GPTQ", "QAT", "RTN", "SpQR", "SmoothQuant", "W8A8", "LLMInt8", "OutlierSuppression", "W4A8", "ZeroQuant", "ALGORITHMS"]
