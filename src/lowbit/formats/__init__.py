"""Save and load checkpoints: lowbit's own format and AutoAWQ's (versions gemm and gemv); GPTQ and
compressed-tensors export arrive with the methods that produce them. Every write goes to a temporary
directory first."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from . import awq, native
from .atomic import atomic_dir, atomic_file

FORMATS = ("lowbit", "awq")


def save(model: nn.Module, out_dir: str | Path, *, format: str = "lowbit", version: str | None = None,
         tokenizer=None, overwrite: bool = False) -> Path:
    """`version` picks the AutoAWQ layout ("gemm", the default, or "gemv") with format="awq"."""
    if format == "awq":
        return awq.save(model, out_dir, version=version or "gemm", tokenizer=tokenizer, overwrite=overwrite)
    if format != "lowbit":
        raise CheckpointError(f"format {format!r} is not available yet (available: {', '.join(FORMATS)})")
    if version is not None:
        raise CheckpointError(f"version={version!r} applies to format='awq' only")
    # lowbit's format stores WQLinear; a model read from an AWQ checkpoint converts losslessly
    with awq.wqlinear_modules(model):
        return native.save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A lowbit or AutoAWQ checkpoint into packed modules, or a plain HF checkpoint (safetensors only) in
    `dtype`. An AWQ checkpoint's float tensors are loaded in `dtype` too (None: its own, float16)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    cfg = native.read_config(path)
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method == "lowbit":
        return native.load(path, cfg, device=device)
    awq_cfg = awq.read_quant_config(path, cfg)
    if awq_cfg is not None:
        return awq.load(path, awq_cfg, device=device, dtype=dtype)
    if method is not None:
        raise CheckpointError(f"{path} is a {method!r} checkpoint, which lowbit cannot load yet")
    # Refuse pickle-only directories before transformers would unpickle them, and truncated files
    # before it reports them in its own words.
    native.check_safetensors(native.weight_files(path))
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except ValueError as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from e
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=False)


__all__ = ["save", "load", "load_tokenizer", "atomic_dir", "atomic_file", "FORMATS"]
