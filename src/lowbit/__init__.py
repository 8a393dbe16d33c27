"""lowbit: quantize Hugging Face causal LMs to low bits, pack them, measure what was lost."""

__version__ = "0.1.0"

from . import calib  # noqa: E402  (lowbit.calib.text_file(...) is part of the API)
from .api import load, quantize, save  # noqa: E402

__all__ = ["quantize", "save", "load", "calib", "__version__"]
