"""How big a model is: bytes on disk and bits per weight in memory.

A quantized module is recognised by duck typing, so this module needs nothing from `lowbit.nn`: it
has `storage_bits()` (every bit it keeps for its weight: packed values, scales, zeros) and the
`in_features` / `out_features` of the Linear it replaces.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import CheckpointError

__all__ = ["model_bytes", "bits_per_weight"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes of a checkpoint's weight files (a single weights file, or the weight files in a directory)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist")
    files = sorted(p.glob("*.safetensors"))
    if not files:  # older checkpoints: pytorch_model*.bin and the like
        files = [f for f in sorted(p.iterdir()) if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)]
    if not files:
        raise CheckpointError(f"checkpoint {p} holds no weight files (*.safetensors, *.bin)")
    return sum(f.stat().st_size for f in files)


def _is_quantized(module: nn.Module) -> bool:
    return (
        callable(getattr(module, "storage_bits", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def _conv1d_type():
    # GPT-2 style blocks use transformers' Conv1D, a Linear with a transposed weight.
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    return (Conv1D,)


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def _own_tensors(module: nn.Module):
    """Parameters and persistent buffers held by `module` itself (stored in a checkpoint)."""
    yield from module.parameters(recurse=False)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module.named_buffers(recurse=False):
        if name not in skip and buf is not None:
            yield buf


def _in_block(name: str, module_lists: set[str]) -> bool:
    # Decoder blocks live in a ModuleList (model.layers, transformer.h, ...); the embeddings, the final
    # norm, the lm_head and stray projections (OPT's project_in/out) do not.
    parts = name.split(".")
    return any(".".join(parts[:k]) in module_lists for k in range(1, len(parts)))


def bits_per_weight(model: nn.Module) -> dict:
    """Storage bits per weight, over the decoder blocks' linears and over the whole model.

    `bits_per_weight`: linear layers inside the decoder blocks, quantized or not (a float Linear counts
    its dtype's width). `bits_per_weight_all`: every parameter and persistent buffer, against the
    number of weights the float model had; tied tensors count once.
    """
    linear_types = (nn.Linear, *_conv1d_type())
    module_lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    block_bits = block_weights = 0
    n_quant = n_float = 0
    all_bits = all_weights = 0
    seen: set[int] = set()  # data_ptr of tensors already counted (tied embeddings)
    inside_quantized: list[str] = []

    def count(t: torch.Tensor) -> tuple[int, int]:
        key = t.data_ptr()
        if key in seen and key != 0:
            return 0, 0
        seen.add(key)
        return _tensor_bits(t), t.numel()

    for name, module in model.named_modules():
        if any(name.startswith(q + ".") for q in inside_quantized):
            continue  # already counted through its quantized parent's storage_bits()
        in_block = _in_block(name, module_lists) and module is not head
        if _is_quantized(module):
            inside_quantized.append(name)
            bits = int(module.storage_bits())
            weights = int(module.in_features) * int(module.out_features)
            bias = getattr(module, "bias", None)
            bias_bits, bias_n = count(bias) if isinstance(bias, torch.Tensor) else (0, 0)
            all_bits += bits + bias_bits
            all_weights += weights + bias_n
            if in_block:
                block_bits += bits
                block_weights += weights
                n_quant += 1
            continue
        for t in _own_tensors(module):
            bits, numel = count(t)
            all_bits += bits
            all_weights += numel
        if in_block and isinstance(module, linear_types):
            block_bits += _tensor_bits(module.weight)
            block_weights += module.weight.numel()
            n_float += 1

    return {
        "bits_per_weight": block_bits / block_weights if block_weights else float("nan"),
        "bits_per_weight_all": all_bits / all_weights if all_weights else float("nan"),
        "linear_bits": block_bits,
        "linear_weights": block_weights,
        "quantized_linears": n_quant,
        "float_linears": n_float,
        "total_bits": all_bits,
        "total_weights": all_weights,
    }
