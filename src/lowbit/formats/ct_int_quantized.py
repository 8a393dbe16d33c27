"""compressed-tensors checkpoints, format "int-quantized": the W8A8 presets (`W8A8Linear`).

    model.safetensors  for each quantized linear `<name>.weight` int8 [out, in], `.weight_scale`
                       ([out, 1] per channel, [1] per tensor), `.input_scale` [1] when activations
                       are static (and `.bias`); every other tensor too
    config.json        "quantization_config": {"quant_method": "compressed-tensors", "format":
                       "int-quantized", "config_groups": {"group_0": {"targets": [layer names],
                       "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy":
                       "channel", "dynamic": false}, "input_activations": {"num_bits": 8, "type":
                       "int", "symmetric": true, "strategy": "token", "dynamic": true}}}, ...}

`W[n, k] = weight[n, k] * weight_scale[n]`, which is `W8A8Linear`'s storage as it is (its codes are
on the same grid: absmax / 127.5, [-128, 127]). One config group per distinct (weight strategy,
activation strategy, dynamic), targeting its layers by name: with unpacked int8 weights a class
target ("Linear") read without the model would also claim the embeddings' and norms' `weight`. Scales are written in float32 (or float16 for a float16 model), so
the package's dequantization gives W8A8Linear's weight exactly. `MixedInt8Linear` (LLM.int8()) has
no form here: its outlier decomposition is not part of the scheme.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from ..models import find_module, is_linear, set_module, untied_state_dict
from ..nn import QUANTIZED_MODULES, MixedInt8Linear, W8A8Linear
from . import native
from .compressed_tensors import QUANT_METHOD, float_dtype

FORMAT = "int-quantized"
ACT_STRATEGY = {"per_token": ("token", True), "per_tensor": ("tensor", True), "static": ("tensor", False)}

__all__ = ["FORMAT", "is_int_quantized", "has_w8a8", "save", "load"]


def has_w8a8(model: nn.Module) -> bool:
    return any(isinstance(m, W8A8Linear) for m in model.modules())


def is_int_quantized(cfg: dict) -> bool:
    qc = cfg.get("quantization_config") or {}
    return str(qc.get("quant_method", "")).lower() == QUANT_METHOD and qc.get("format") == FORMAT


def _layers(model: nn.Module) -> dict[str, W8A8Linear]:
    out, problems = {}, []
    for n, m in model.named_modules():
        if type(m).__name__ not in QUANTIZED_MODULES:
            continue
        if isinstance(m, MixedInt8Linear) or not isinstance(m, W8A8Linear):
            problems.append(f"layer {n}: {type(m).__name__} has no int-quantized form")
        else:
            out[n] = m
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SpecError(f"cannot write a compressed-tensors int-quantized checkpoint: {'; '.join(problems[:3])}{more}")
    return out


def _scheme(m: W8A8Linear) -> tuple[str, str, bool]:
    return (m.weight_granularity, *ACT_STRATEGY[m.act_mode])


def _args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": None if dynamic else "minmax"}


def _config(model: nn.Module, layers: dict[str, W8A8Linear]) -> dict:
    by_scheme: dict[tuple, list[str]] = {}
    for n, m in layers.items():
        by_scheme.setdefault(_scheme(m), []).append(n)
    groups = {}
    for i, ((wg, a_strategy, a_dynamic), names) in enumerate(by_scheme.items()):
        groups[f"group_{i}"] = {"targets": names, "weights": _args(wg, False),
                                "input_activations": _args(a_strategy, a_dynamic), "output_activations": None,
                                "format": FORMAT}
    ignore = [n for n, m in model.named_modules() if n not in layers and is_linear(m)]
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "quantization_status": "compressed"}


def save(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes a model whose quantized linears are all `W8A8Linear`; checked before a byte is written."""
    layers = _layers(model)
    dtype = float_dtype(model)
    state = {}
    for k, v in untied_state_dict(model).items():
        owner, _, leaf = k.rpartition(".")
        if owner in layers and leaf in ("weight_scale", "input_scale"):
            v = v.to(dtype)
        state[k] = native.to_save_dtype(k, v, dtype, "compressed-tensors")
    cfg = native.export_config(model, _config(model, layers), dtype)
    return native.write_checkpoint(out_dir, model, state, cfg, tokenizer=tokenizer, overwrite=overwrite)


def _parse_group(name: str, g: dict) -> tuple[str, str]:
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    if w.get("num_bits") != 8 or w.get("type") != "int" or not w.get("symmetric", False):
        raise CheckpointError(f"{name}: int-quantized weights other than 8-bit symmetric int are not supported")
    if w.get("strategy") not in ("channel", "tensor"):
        raise CheckpointError(f"{name}: weight strategy {w.get('strategy')!r} is not supported (channel, tensor)")
    if not a:
        raise CheckpointError(f"{name}: no input_activations; lowbit reads int-quantized W8A8 checkpoints")
    if a.get("num_bits") != 8 or a.get("type") != "int" or not a.get("symmetric", False):
        raise CheckpointError(f"{name}: activations other than 8-bit symmetric int are not supported")
    key = (a.get("strategy"), bool(a.get("dynamic")))
    modes = {v: k for k, v in ACT_STRATEGY.items()}
    if key not in modes:
        raise CheckpointError(f"{name}: activation strategy {key[0]!r} with dynamic={key[1]} is not supported")
    return w["strategy"], modes[key]


def load(path: str | Path, cfg: dict, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """An int-quantized checkpoint into a model whose quantized linears are `W8A8Linear`."""
    path = Path(path)
    qc = cfg["quantization_config"]
    groups = qc.get("config_groups") or {}
    if not groups:
        raise CheckpointError(f"{path}: no config_groups")
    state = native.read_safetensors(native.weight_files(path))
    model = native.empty_model(path, dtype)
    names = sorted(k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale"))
    packed = set()
    for name in names:
        old = find_module(model, name)
        if old is None or not is_linear(old):
            raise CheckpointError(f"{path}: checkpoint quantizes {name}, which is not a linear layer")
        group = next((g for g in groups.values() if "Linear" in g.get("targets", ()) or name in g.get("targets", ())),
                     None)
        if group is None:
            raise CheckpointError(f"{path}: no config group targets {name}")
        wg, act = _parse_group(f"{path}: {name}", group)
        bias = state.get(f"{name}.bias")
        new = W8A8Linear(old.in_features, old.out_features, weight_granularity=wg, act_mode=act,
                         bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32, name=name)
        sd = {k: state.pop(f"{name}.{k}") for k in ("weight", "weight_scale", "input_scale", "bias")
              if f"{name}.{k}" in state}
        try:
            new.load_state_dict({k: v.to(new.state_dict()[k].dtype) for k, v in sd.items()})
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"{path}: {name}: tensors do not fit a {wg}/{act} W8A8 layer ({e})") from None
        set_module(model, name, new)
        packed.add(name)
    native.load_float_tensors(model, state, path, packed)
    return model.to(device).eval()
