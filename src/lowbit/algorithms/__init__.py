"""One file per method; each is an `Algorithm` (prepare, quantize_block, finalize)."""

from .base import Algorithm
from .awq import AWQ
from .gptq import GPTQ
from .rtn import RTN
from .spqr import SpQR

# The names recipes use in their `steps`.
ALGORITHMS: dict[str, type[Algorithm]] = {"rtn": RTN, "awq": AWQ, "gptq": GPTQ, "spqr": SpQR}

__all__ = ["Algorithm", "AWQ", "GPTQ", "RTN", "SpQR", "ALGORITHMS"]
