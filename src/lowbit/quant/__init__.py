"""The math of quantization, knowing nothing about models or modules.

`QuantSpec` says what to quantize to; `choose_qparams` / `quantize` / `dequantize` /
`fake_quantize` do it; observers pick qparams from data; codebooks hold non-linear grids; `pack` /
`unpack` store codes densely (in bytes; `pack_words` / `unpack_words` in int32 words).
"""

from .codebooks import NF4_CODEBOOK, kmeans_codebook
from .observers import MinMaxObserver, MSEObserver, PercentileObserver, mse_clip_search
from .packing import pack, pack_words, packed_nbytes, packed_nwords, unpack, unpack_words
from .primitives import (QParams, choose_qparams, dequantize, fake_quantize, grad_scale, lsq_grad_factor, quantize,
                         quantize_dequantize, straight_through)
from .spec import Granularity, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, check_group_size

__all__ = [
    "QuantSpec", "Granularity", "PerTensor", "PerChannel", "PerGroup", "PerToken", "check_group_size",
    "QParams", "choose_qparams", "quantize", "dequantize", "quantize_dequantize", "fake_quantize",
    "grad_scale", "lsq_grad_factor", "straight_through",
    "MinMaxObserver", "PercentileObserver", "MSEObserver", "mse_clip_search",
    "NF4_CODEBOOK", "kmeans_codebook",
    "pack", "unpack", "packed_nbytes", "pack_words", "unpack_words", "packed_nwords",
]
