"""What every kernel dispatcher does before its own `auto` rule: honour an explicit backend or the
environment override, and refuse names it does not know or weights not prepared for them; and
whether this device multiplies bf16 matrices at speed (`fast_bf16`, `matmul_dtype`), which every
bf16-for-speed choice in lowbit goes through."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence

import torch

from lowbit.errors import SpecError

log = logging.getLogger(__name__)


def forced_backend(op: str, backend: str, env: str, known: Sequence[str], have: Sequence[str]) -> str | None:
    """The backend asked for (the argument, else the `env` variable), checked; None for "auto"."""
    if backend == "auto":
        backend = os.environ.get(env, "auto").strip().lower() or "auto"
    if backend == "auto":
        return None
    if backend not in known:
        raise SpecError(f"{op}: unknown backend {backend!r}; choose from {tuple(known)} or 'auto'")
    if backend not in have:
        raise SpecError(f"{op}: backend {backend!r} was not prepared (have {tuple(have)})")
    return backend


BF16_ENV = "LOWBIT_CPU_BF16"  # "0" / "1": override the CPU's bf16 probe (tests, benchmarks)


@functools.lru_cache(maxsize=1)
def _cpu_bf16_native() -> bool:
    # oneDNN's own test for running bf16 GEMMs in vector units (AVX512 and up, or Arm bf16); below
    # that, torch multiplies bf16 matrices in a scalar fallback, 10-100x slower than float32
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products run at speed on `device`: CUDA and XPU, and CPUs where oneDNN
    has bf16 kernels (AVX512 or AMX). `LOWBIT_CPU_BF16=0|1` overrides the CPU probe."""
    if torch.device(device).type != "cpu":
        return True
    env = os.environ.get(BF16_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return _cpu_bf16_native()


def matmul_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to run products in when `dtype` was asked for speed: bf16 stays bf16 where it is fast
    and becomes float32 where it is not (AVX2-only CPUs), so a recipe's bf16 forwards never run
    in torch's scalar bf16 fallback. Other dtypes pass through."""
    if dtype == torch.bfloat16 and not fast_bf16(device):
        _warn_slow_bf16()
        return torch.float32
    return dtype


def autocast(dtype: torch.dtype | str | None, device: torch.device | str = "cpu"):
    """`torch.autocast` to `dtype` (a dtype or its name) on `device`, through `matmul_dtype`; a null
    context where that leaves float32 (or None was asked)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    dtype = None if dtype is None else matmul_dtype(dtype, device)
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.lru_cache(maxsize=1)
def _warn_slow_bf16() -> None:
    log.info("this CPU has no fast bf16 matrix products (no AVX512/AMX): bf16 compute runs in float32")
