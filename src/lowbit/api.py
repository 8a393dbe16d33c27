"""The verbs as Python functions: quantize, save, load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import formats
from .calib import BlockRunner, CalibSource
from .errors import CalibrationError, LowbitError
from .models import get_adapter
from .recipes import Recipe, load_recipe


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local directory, or the name of a reference model pulled with `lowbit zoo pull`."""
    p = Path(name_or_path)
    if p.exists():
        return p
    from . import zoo

    if str(name_or_path) in zoo.ZOO:
        return zoo.path(str(name_or_path))
    raise LowbitError(f"model directory {name_or_path} does not exist (nor is it a zoo name: "
                      f"{', '.join(sorted(zoo.ZOO))})")


def load(name_or_path: str | Path, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A lowbit, AutoAWQ, GPTQ or compressed-tensors checkpoint (packed modules) or a float HF
    checkpoint; the tokenizer rides along as `model.lowbit_tokenizer` when the directory has one."""
    path = resolve_model_path(name_or_path)
    model = formats.load(path, device=device, dtype=dtype)
    try:
        model.lowbit_tokenizer = formats.load_tokenizer(path)
    except (OSError, ValueError):
        model.lowbit_tokenizer = None
    model.lowbit_source = str(path)
    return model


def save(model: nn.Module, out_dir: str | Path, *, format: str = "lowbit", version: str | None = None,
         tokenizer=None, overwrite: bool = False, float_dtype: str | torch.dtype | None = None) -> Path:
    """`format`: "lowbit", "awq" (AutoAWQ; `version` "gemm", the default, or "gemv"), "gptq" (GPTQ v1:
    GPTQModel, vLLM, transformers) or "compressed-tensors" (pack-quantized: vLLM, llm-compressor).
    `float_dtype` ("bfloat16", "float16"; lowbit format only) stores the unquantized tensors (embeddings,
    norms, lm_head) in that dtype: half the bytes; they are cast back to the model's dtype on load."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "lowbit_tokenizer", None)
    return formats.save(model, out_dir, format=format, version=version, tokenizer=tokenizer, overwrite=overwrite,
                        float_dtype=float_dtype)


def quantize(model: nn.Module | str | Path, recipe: str | Path | Recipe = "w4a16-rtn",
             calib: CalibSource | torch.Tensor | None = None, *, tokenizer=None, bits: int | None = None,
             group_size: int | None = None, symmetric: bool | None = None, calib_samples: int | None = None,
             calib_seqlen: int | None = None, device: str | torch.device | None = None,
             progress: bool = True) -> nn.Module:
    """Quantizes `model` in place with a recipe and returns it.

    `calib` is a calibration source (`lowbit.calib.text_file(...)`) or a LongTensor of token ids
    `[n, L]`; recipes whose methods need no data (RTN) ignore it. Its size comes from
    calib_samples/calib_seqlen, else the source's own n_samples/seqlen, else the recipe's
    `calibration` block, else 128 x 512. Windows cut from text start with BOS only when the source
    asks (`text_file(..., bos=True)`).
    """
    if isinstance(model, (str, Path)):
        model = load(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "lowbit_tokenizer", None)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, bits=bits, group_size=group_size,
                                                                 symmetric=symmetric)
    adapter = get_adapter(model)
    algorithms = rec.build()
    for alg in algorithms:
        alg.prepare(model, adapter)
    samples = None
    needs_data = any(a.requires_calibration for a in algorithms)
    if needs_data or calib is not None:  # data the user gave is checked even when unused
        if calib is None:
            raise CalibrationError(f"recipe {rec.name} needs calibration data (calib=lowbit.calib.text_file(...), "
                                   f"or --calib FILE)")
        if isinstance(calib, torch.Tensor):
            samples = calib
        else:
            if tokenizer is None:
                raise CalibrationError("calibration text needs a tokenizer (pass tokenizer=...)")
            samples = calib.samples(tokenizer, calib_samples, calib_seqlen, fallback=rec.calibration)
        if samples.numel() == 0:
            raise CalibrationError("calibration data is empty")
        if not needs_data:
            samples = None
    with torch.no_grad():
        BlockRunner(model, adapter, samples, device=device, progress=progress).run(algorithms)
        for alg in algorithms:
            alg.finalize(model, adapter)
    model.lowbit_recipe = {**rec.to_dict(), "algorithms": [a.config() for a in algorithms]}
    return model
