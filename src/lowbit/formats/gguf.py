"""GGUF import: turn a llama.cpp file into a plain Hugging Face checkpoint lowbit can quantize.

The weights are dequantized on load by transformers' GGUF loader, so the result is a dense float
model (the GGUF quantization error stays baked into it; that is the reference we measure against).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lowbit.errors import CheckpointError
from lowbit.formats.atomic import atomic_dir, check_output_dir

__all__ = ["convert_gguf", "check_gguf_file"]

GGUF_MAGIC = b"GGUF"


def check_gguf_file(gguf_path: str | os.PathLike) -> Path:
    """Fail early, with one line, on a missing, foreign or truncated GGUF file."""
    path = Path(gguf_path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")

    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        # The header parses fine on a file cut inside the tensor data; only the tensor extents tell.
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:  # the reader signals truncation with whatever numpy raises
        raise CheckpointError(f"GGUF file {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    if size < end:
        raise CheckpointError(f"GGUF file {path} is truncated ({size} bytes, its tensors need {end})")
    if not reader.tensors:
        raise CheckpointError(f"GGUF file {path} holds no tensors")
    return path


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Dequantize `gguf_path` and save it to `out_dir` as safetensors + config + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = check_gguf_file(gguf_path)
    out = check_output_dir(out_dir, overwrite)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True asks for dense weights even where a GGUF matmul kernel is installed, and
        # makes transformers drop the quantization_config that would stop save_pretrained.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load GGUF file {path}: {msg}") from e
    _strip_gguf_quantization(model)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _strip_gguf_quantization(model) -> None:
    # The legacy GGUF path (architectures transformers has no block kernels for) may still leave the
    # quantizer attached; the weights are already dense, so it only describes what the file was.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype", "_is_quantized"):
        if attr in model.config.__dict__:
            delattr(model.config, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
