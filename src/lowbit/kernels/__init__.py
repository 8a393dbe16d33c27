"""Kernels: one function per operation, a plain-torch reference and fast backends behind one dispatcher."""

from lowbit.kernels._dispatch import autocast, fast_bf16, matmul_dtype
from lowbit.kernels.fake_quant import fake_quant_clamped, fake_quant_scaled
from lowbit.kernels.int8_gemm import (
    ACT_MODES as INT8_ACT_MODES,
    BACKEND_ENV as INT8_BACKEND_ENV,
    BACKENDS as INT8_BACKENDS,
    int8_available_backends,
    int8_gemm,
    int8_gemm_ref,
    prepare_int8,
    quantize_activation,
    quantize_per_tensor,
    quantize_per_token,
    quantize_static,
    select_int8_backend,
)
from lowbit.kernels.w4a8 import unpack_int4, w4a8_gemm, w4a8_gemm_ref, w4a8_int8_weight
from lowbit.kernels.mixed_int8 import mixed_int8_matmul, mixed_int8_matmul_ref, outlier_columns
from lowbit.kernels.wint import (
    BACKEND_ENV as WINT_BACKEND_ENV,
    BACKENDS as WINT_BACKENDS,
    available_backends as wint_available_backends,
    codebook4_linear,
    prepare_codebook4,
    prepare_wint,
    select_backend as select_wint_backend,
    wint_gemm,
    wint_gemm_ref,
)

__all__ = [
    "autocast",
    "codebook4_linear",
    "prepare_codebook4",
    "fake_quant_clamped",
    "fake_quant_scaled",
    "fast_bf16",
    "matmul_dtype",
    "INT8_ACT_MODES",
    "INT8_BACKENDS",
    "INT8_BACKEND_ENV",
    "int8_available_backends",
    "int8_gemm",
    "int8_gemm_ref",
    "mixed_int8_matmul",
    "mixed_int8_matmul_ref",
    "outlier_columns",
    "prepare_int8",
    "quantize_activation",
    "quantize_per_tensor",
    "quantize_per_token",
    "quantize_static",
    "select_int8_backend",
    "unpack_int4",
    "w4a8_gemm",
    "w4a8_gemm_ref",
    "w4a8_int8_weight",
    "WINT_BACKENDS",
    "WINT_BACKEND_ENV",
    "prepare_wint",
    "select_wint_backend",
    "wint_available_backends",
    "wint_gemm",
    "wint_gemm_ref",
]
