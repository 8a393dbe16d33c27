"""Save and load checkpoints: lowbit's own format, AutoAWQ's (versions gemm and gemv), GPTQ's
(checkpoint_format "gptq", v1) and compressed-tensors' "pack-quantized" (weight-only) and
"int-quantized" (W8A8). Every write goes to a temporary directory first."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from . import awq, compressed_tensors, ct_int_quantized, gptq, native
from .atomic import atomic_dir, atomic_file

FORMATS = ("lowbit", "awq", "gptq", "compressed-tensors")


def save(model: nn.Module, out_dir: str | Path, *, format: str = "lowbit", version: str | None = None,
         tokenizer=None, overwrite: bool = False, float_dtype: str | torch.dtype | None = None) -> Path:
    """`format`: "lowbit", "awq", "gptq" or "compressed-tensors"; `version` picks the AutoAWQ layout
    ("gemm", the default, or "gemv") with format="awq". `float_dtype` (lowbit format only: the other
    formats store fp16, as their loaders expect) stores the tensors outside the packed modules in
    float32, bfloat16 or float16."""
    if float_dtype is not None and format != "lowbit":
        raise CheckpointError(f"float_dtype applies to format='lowbit' only; {format!r} checkpoints store their "
                              f"float tensors in the dtype their loaders expect")
    if format == "awq":
        return awq.save(model, out_dir, version=version or "gemm", tokenizer=tokenizer, overwrite=overwrite)
    if format not in FORMATS:
        raise CheckpointError(f"format {format!r} is not available (available: {', '.join(FORMATS)})")
    if version is not None:
        raise CheckpointError(f"version={version!r} applies to format='awq' only")
    if format == "gptq":
        return gptq.save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
    if format == "compressed-tensors":
        # W8A8: unpacked int8 ("int-quantized"); W4A8 goes there too, to be refused with its reason
        if ct_int_quantized.has_w8a8(model) or any(type(m).__name__ == "W4A8Linear" for m in model.modules()):
            return ct_int_quantized.save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
        return compressed_tensors.save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
    # lowbit's format stores WQLinear; a model read from an AWQ checkpoint converts losslessly
    with awq.wqlinear_modules(model):
        return native.save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, float_dtype=float_dtype)


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A lowbit, AutoAWQ, GPTQ or compressed-tensors (pack-quantized) checkpoint into packed modules,
    or a plain HF checkpoint (safetensors only) in `dtype`. The float tensors of the other projects'
    checkpoints are loaded in `dtype` too (None: the checkpoint's own); GPTQ and compressed-tensors
    layers become `WQLinear`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    cfg = native.read_config(path)
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method == "lowbit":
        return native.load(path, cfg, device=device)
    if ct_int_quantized.is_int_quantized(cfg):
        return ct_int_quantized.load(path, cfg, device=device, dtype=dtype)
    awq_cfg = awq.read_quant_config(path, cfg)
    if awq_cfg is not None:
        return awq.load(path, awq_cfg, device=device, dtype=dtype)
    gptq_cfg = gptq.read_quant_config(path, cfg)
    if gptq_cfg is not None:
        return gptq.load(path, gptq_cfg, device=device, dtype=dtype)
    ct_cfg = compressed_tensors.read_quant_config(path, cfg)
    if ct_cfg is not None:
        return compressed_tensors.load(path, ct_cfg, device=device, dtype=dtype)
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
