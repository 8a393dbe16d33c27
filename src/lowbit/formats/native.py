"""lowbit's own checkpoint: one safetensors file, config.json with a `quantization_config`, the tokenizer.

    config.json  "quantization_config": {
        "quant_method": "lowbit", "format_version": 1, "recipe": {...},
        "modules": {"model.layers.0.self_attn.q_proj": {"class": "WQLinear", "bits": 4, ...}, ...},
        "norm_act_quant": {"model.layers.0.input_layernorm": ["model.layers.0.self_attn.q_proj", ...]}}
    model.safetensors  every tensor of the model; packed modules contribute qweight/scales/qzeros.

Per-module entries (not one global setting) so mixed-precision models describe themselves.
`float_dtype` (optional) records that the tensors outside the packed modules (embeddings, norms, an
unquantized lm_head) were stored in that dtype to halve them; loading casts them back to the dtype
config.json names, the one the model computes in.
`norm_act_quant` (optional) lists the norms that quantize their output once for the W8A8 linears
reading it (lowbit.nn.act_quant_norm); a run-time link with no tensors of its own, re-attached on load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, InvalidWeightsError, SpecError
from ..models import get_module, set_module, untied_state_dict
from ..nn import QUANTIZED_MODULES, MixedInt8Linear, SpQRLinear, W4A8Linear, W8A8Linear, WQLinear
from ..nn import act_quant_norm
from .atomic import atomic_dir

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ in QUANTIZED_MODULES}


def module_config(m: nn.Module) -> dict:
    if not isinstance(m, (WQLinear, SpQRLinear, W8A8Linear, W4A8Linear)):  # MixedInt8Linear is a W8A8Linear
        raise CheckpointError(f"cannot save module of type {type(m).__name__}")
    common = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
              "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None}
    if isinstance(m, WQLinear):
        return {"class": "WQLinear", **common, "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                "codebook": m.codebook is not None, "act_order": m.perm is not None}
    if isinstance(m, SpQRLinear):
        return {"class": "SpQRLinear", **common, "bits": m.bits, "group_size": m.group_size,
                "qq_scale_bits": m.qq_scale_bits, "qq_zero_bits": m.qq_zero_bits, "qq_groupsize": m.qq_groupsize,
                "n_outliers": m.n_outliers, "act_order": m.perm is not None}
    rot = {"rotate_block": m.rotate_block} if getattr(m, "rotate_block", 0) else {}
    if isinstance(m, MixedInt8Linear):  # before W8A8Linear, its base class
        return {"class": "MixedInt8Linear", **common, "threshold": m.threshold, **rot}
    if isinstance(m, W8A8Linear):
        return {"class": "W8A8Linear", **common, "weight_granularity": m.weight_granularity, "act_mode": m.act_mode}
    return {"class": "W4A8Linear", **common, "weight_granularity": m.weight_granularity, "group_size": m.group_size,
            **rot}


def module_from_config(c: dict, name: str) -> nn.Module:
    if c.get("class") == "SpQRLinear":
        return SpQRLinear(c["in_features"], c["out_features"], bits=c["bits"], group_size=c["group_size"],
                          qq_scale_bits=c["qq_scale_bits"], qq_zero_bits=c["qq_zero_bits"],
                          qq_groupsize=c["qq_groupsize"], n_outliers=c["n_outliers"], bias=c["bias"],
                          bias_dtype=getattr(torch, c.get("bias_dtype") or "float32"),
                          act_order=bool(c.get("act_order", False)), name=name)
    if c.get("class") == "MixedInt8Linear":
        return MixedInt8Linear(c["in_features"], c["out_features"], threshold=c["threshold"], bias=c["bias"],
                               bias_dtype=getattr(torch, c.get("bias_dtype") or "float32"),
                               rotate_block=int(c.get("rotate_block", 0)), name=name)
    if c.get("class") == "W8A8Linear":
        return W8A8Linear(c["in_features"], c["out_features"], weight_granularity=c["weight_granularity"],
                          act_mode=c["act_mode"], bias=c["bias"],
                          bias_dtype=getattr(torch, c.get("bias_dtype") or "float32"), name=name)
    if c.get("class") == "W4A8Linear":
        return W4A8Linear(c["in_features"], c["out_features"], weight_granularity=c["weight_granularity"],
                          group_size=c.get("group_size"), bias=c["bias"],
                          bias_dtype=getattr(torch, c.get("bias_dtype") or "float32"),
                          rotate_block=int(c.get("rotate_block", 0)), name=name)
    if c.get("class") != "WQLinear":
        raise CheckpointError(f"checkpoint module {name} has unknown class {c.get('class')!r}")
    return WQLinear(c["in_features"], c["out_features"], bits=c["bits"], group_size=c["group_size"],
                    symmetric=c["symmetric"], bias=c["bias"], codebook=c.get("codebook", False),
                    bias_dtype=getattr(torch, c.get("bias_dtype") or "float32"),
                    act_order=bool(c.get("act_order", False)), name=name)


FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def float_dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    """None, or one of FLOAT_DTYPES by name or as a torch dtype; anything else is refused."""
    if name is None or isinstance(name, torch.dtype) and name in FLOAT_DTYPES.values():
        return name
    key = str(name).replace("torch.", "")
    if key not in FLOAT_DTYPES:
        raise CheckpointError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {name!r}")
    return FLOAT_DTYPES[key]


def save(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False,
         recipe: dict | None = None, float_dtype: str | torch.dtype | None = None) -> Path:
    """`float_dtype`: the dtype of the tensors outside the packed modules (None: as the model holds
    them); the packed modules' own tensors (codes, scales, biases) are stored as they are."""
    float_dtype = float_dtype_of(float_dtype)
    qmods = quantized_modules(model)
    qcfg = {"quant_method": "lowbit", "format_version": FORMAT_VERSION,
            "recipe": recipe or getattr(model, "lowbit_recipe", None),
            "modules": {n: module_config(m) for n, m in qmods.items()}}
    fused = act_quant_norm.fused_norms(model)
    if fused:
        qcfg["norm_act_quant"] = fused
    state = untied_state_dict(model)
    if float_dtype is not None:
        packed = tuple(f"{n}." for n in qmods)
        state = {k: v if k.startswith(packed) else to_save_dtype(k, v, float_dtype, "these")
                 for k, v in state.items()}
        qcfg["float_dtype"] = str(float_dtype).replace("torch.", "")
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    return write_checkpoint(out_dir, model, state, cfg, tokenizer=tokenizer, overwrite=overwrite,
                            metadata={"lowbit_format": str(FORMAT_VERSION)})


def export_config(model: nn.Module, quantization_config: dict, dtype: torch.dtype) -> dict:
    """config.json for a checkpoint other engines read: the model's config, its quantization_config,
    the float dtype under both keys (transformers 4.x and vLLM read `torch_dtype`), and the
    architecture vLLM picks the model class by."""
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg["torch_dtype"] = cfg["dtype"]
    cfg["architectures"] = [type(model).__name__]
    return cfg


def write_checkpoint(out_dir: str | Path, model: nn.Module, state: dict[str, torch.Tensor], cfg: dict, *,
                     tokenizer=None, overwrite: bool = False, metadata: dict | None = None,
                     extra_json: dict[str, dict] | None = None) -> Path:
    """Writes a checkpoint directory atomically, as every format does: the weights, config.json, any
    `extra_json` files, the generation config and the tokenizer."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", **(metadata or {})})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        for name, d in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(d, indent=2))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model checkpoint")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})") from e


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Reads tensors, refusing truncated or corrupt files with a message that names the file."""
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    state[k] = fh.get_tensor(k)
        except (SafetensorError, OSError, struct.error) as e:
            raise CheckpointError(f"{f} is truncated or corrupt ({e})") from e
    return state


def check_safetensors(files: list[Path]) -> None:
    """Opens each file's header, which is where safetensors notices truncation."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f} is truncated or corrupt ({e})") from e


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if pickles:
            raise CheckpointError(f"{path} holds only pickle weights ({', '.join(pickles)}); lowbit refuses to "
                                  f"unpickle files: convert them to safetensors first")
        raise CheckpointError(f"{path} has no .safetensors weights")
    return files


def load(path: str | Path, cfg: dict, *, device: str | torch.device = "cpu") -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    qcfg = cfg["quantization_config"]
    if qcfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer lowbit (format {qcfg['format_version']})")
    state = read_safetensors(weight_files(path))
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The float weights are never filled in: don't spend time initialising them.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=_dtype(cfg))
    for name, mc in qcfg.get("modules", {}).items():
        try:
            get_module(model, name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint names module {name}, which this architecture does not have") from e
        set_module(model, name, module_from_config(mc, name))
    # the packed modules' buffers are ordinary state here: every tensor is checked and loaded
    load_float_tensors(model, state, path, packed=set())
    for norm, consumers in (qcfg.get("norm_act_quant") or {}).items():
        try:
            act_quant_norm.attach(get_module(model, norm), [get_module(model, c) for c in consumers])
        except (AttributeError, SpecError) as e:
            raise CheckpointError(f"{path}: norm_act_quant entry {norm} -> {consumers} does not fit the model "
                                  f"({e})") from e
    model.lowbit_recipe = qcfg.get("recipe")
    return model.to(device).eval()


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias another tensor (a tied lm_head)."""
    names = set()
    seen = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            names.add(k)
        seen.setdefault(ptr, k)
    if getattr(model.config, "tie_word_embeddings", False):
        names.update(k for k in model.state_dict() if k.startswith("lm_head."))
    return names


def _dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


# ---- shared by the formats that store packed layers in another project's layout -------------------

def to_save_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A float tensor in the `dtype` a checkpoint stores it in; refuses values that would become inf
    there (`what` names the format in the message). Other tensors pass through."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if not torch.isfinite(out).all() and torch.isfinite(t).all():
        big = float(t.abs().max())
        raise InvalidWeightsError(f"tensor {name} has values beyond {str(dtype).replace('torch.', '')}'s range "
                                  f"(max |x| = {big:.4g}), the dtype {what} checkpoints store it in")
    return out


def empty_model(path: Path, dtype: torch.dtype | None) -> nn.Module:
    """The architecture of the checkpoint at `path`, its weights not initialised (they are about to be
    filled), float parameters in `dtype` (None: the dtype config.json names); its quantization_config
    is dropped so transformers builds plain linears."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x, which a peer's environment may pin
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        dtype = _dtype(read_config(path))
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)


def load_float_tensors(model: nn.Module, state: dict[str, torch.Tensor], path: Path, packed: set[str]) -> None:
    """Loads `state` (every tensor of the checkpoint but those already turned into the packed
    modules named in `packed`) into `model`, refusing unexpected, misshapen or missing tensors."""
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in packed}
    for k, v in state.items():
        if k not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {k} (not part of {type(model).__name__})")
        if tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
    tied = _tied_names(model)
    missing = [k for k in expected if k not in state and k not in tied]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
