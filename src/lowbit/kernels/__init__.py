"""Kernels: one function per operation, a plain-torch reference and fast backends behind one dispatcher."""

from lowbit.kernels.wint import (
    BACKEND_ENV as WINT_BACKEND_ENV,
    BACKENDS as WINT_BACKENDS,
    available_backends as wint_available_backends,
    prepare_wint,
    select_backend as select_wint_backend,
    wint_gemm,
    wint_gemm_ref,
)

__all__ = [
    "WINT_BACKENDS",
    "WINT_BACKEND_ENV",
    "prepare_wint",
    "select_wint_backend",
    "wint_available_backends",
    "wint_gemm",
    "wint_gemm_ref",
]
