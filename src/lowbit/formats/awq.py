"""AutoAWQ checkpoints, versions "gemm" and "gemv": written from lowbit models, read from lowbit or AutoAWQ.

    model.safetensors  for each quantized linear `<name>.qweight`, `.qzeros`, `.scales` (and `.bias`) in
                       the layout of `lowbit.nn.AWQLinearGEMM` / `AWQLinearGEMV`; every other tensor too.
    config.json        "quantization_config": {"quant_method": "awq", "version": "gemm", "bits": 4,
                       "group_size": 128, "zero_point": true, "modules_to_not_convert": null}

Float tensors are written in float16. AutoAWQ saves the model in the dtype it loaded it in, which
is float16 unless asked otherwise, and its kernels (like vLLM's AWQ kernels) compute in float16
only, so that is what readers of these files expect. Reading takes any float dtype: AutoAWQ under
other transformers versions leaves them in float32.

Older AutoAWQ releases wrote `w_bit` / `q_group_size` and an upper-case version ("GEMM"), in
config.json or in a quant_config.json of their own; both are read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from ..models import find_module, is_linear, linear_shape, set_module, untied_state_dict
from ..nn import AWQ_LAYOUTS, QUANTIZED_MODULES, AWQLinear, WQLinear
from ..nn.awq_linear import check_awq_compatible
from . import native

VERSIONS = tuple(AWQ_LAYOUTS)
LEGACY_CONFIG_NAME = "quant_config.json"
SAVE_DTYPE = torch.float16
QUANT_TENSORS = ("qweight", "qzeros", "scales")

__all__ = ["AWQConfig", "VERSIONS", "read_quant_config", "awq_modules", "save", "load", "wqlinear_modules"]


@dataclass(frozen=True)
class AWQConfig:
    version: str = "gemm"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantization_config") -> "AWQConfig":
        """Reads both spellings (bits / w_bit, group_size / q_group_size) and refuses what lowbit
        cannot load, naming the key."""
        version = str(d.get("version", "gemm")).lower()
        bits = d.get("bits", d.get("w_bit", 4))
        group_size = d.get("group_size", d.get("q_group_size", 128))
        zero_point = d.get("zero_point", True)
        skip = d.get("modules_to_not_convert")
        if version not in VERSIONS:
            raise CheckpointError(f"{where}: AutoAWQ version {version!r} is not supported (lowbit reads "
                                  f"{', '.join(VERSIONS)})")
        if bits != 4:
            raise CheckpointError(f"{where}: {bits}-bit AWQ checkpoints are not supported (AutoAWQ's layouts "
                                  f"are 4-bit)")
        if not zero_point:
            raise CheckpointError(f"{where}: zero_point=false AWQ checkpoints are not supported (the GEMM and GEMV "
                                  f"layouts hold zero points)")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
            raise CheckpointError(f"{where}: group_size must be a positive integer or -1, got {group_size!r}")
        return cls(version, bits, group_size, True, tuple(skip) if skip else None)

    def to_dict(self) -> dict:
        return {"quant_method": "awq", "version": self.version, "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point,
                "modules_to_not_convert": list(self.modules_to_not_convert) if self.modules_to_not_convert else None}


def read_quant_config(path: str | Path, cfg: dict) -> AWQConfig | None:
    """The AWQ settings of a checkpoint directory whose config.json is `cfg`; None if it is not AWQ."""
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", "")).lower()
        if method == "awq" or (not method and "w_bit" in qc):
            return AWQConfig.from_dict(qc, f"{Path(path) / 'config.json'} quantization_config")
        return None
    legacy = Path(path) / LEGACY_CONFIG_NAME
    if legacy.is_file():
        try:
            qc = json.loads(legacy.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{legacy} is not valid JSON ({e})") from e
        if str(qc.get("quant_method", "awq")).lower() == "awq":
            return AWQConfig.from_dict(qc, str(legacy))
    return None


# ---- writing --------------------------------------------------------------------------------------

def awq_modules(model: nn.Module, version: str) -> dict[str, AWQLinear]:
    """Each quantized linear of `model` in AutoAWQ's `version` layout (the model is left as it is).

    Raises before anything is converted when a layer cannot be expressed: not 4-bit with zero
    points, a shape the layout cannot pack, or group sizes that differ between layers.
    """
    if version not in AWQ_LAYOUTS:
        raise SpecError(f"AutoAWQ version {version!r} is not one lowbit writes (choose from {', '.join(VERSIONS)})")
    qmods = {n: m for n, m in model.named_modules() if type(m).__name__ in QUANTIZED_MODULES}
    if not qmods:
        raise SpecError("the model has no quantized linear layers to write as AWQ (quantize it first)")
    problems = []
    for name, m in qmods.items():
        if isinstance(m, WQLinear):
            try:
                check_awq_compatible(m, name)
            except SpecError as e:
                problems.append(str(e))
        elif not isinstance(m, AWQLinear):
            problems.append(f"layer {name}: {type(m).__name__} has no AutoAWQ form")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SpecError(f"cannot write an AutoAWQ checkpoint: {'; '.join(problems[:3])}{more}")
    group_sizes = {m.group_size for m in qmods.values()}
    if len(group_sizes) > 1 and not all(m.group_size == m.in_features for m in qmods.values()):
        raise SpecError(f"AutoAWQ checkpoints have one group size, this model mixes {sorted(group_sizes)}")
    cls = AWQ_LAYOUTS[version]
    out = {}
    for name, m in qmods.items():
        if type(m) is cls:
            out[name] = m
        elif isinstance(m, WQLinear):
            out[name] = cls.from_wqlinear(m, name)
        else:
            out[name] = cls.from_codes(m.codes(), m.group_scales(), m.zeros(), group_size=m.group_size,
                                       bias=m.bias, name=name)
    return out


def _config_group_size(mods: dict[str, AWQLinear]) -> int:
    sizes = {m.group_size for m in mods.values()}
    if len(sizes) == 1:
        return sizes.pop()
    return -1  # every layer is per-channel (awq_modules refused anything else)


def _float_linears(model: nn.Module, quantized: dict) -> list[str]:
    """Linears left in float, but for the output head, which AWQ loaders never quantize."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if n not in quantized and is_linear(m) and m is not head and not n.endswith("lm_head")]


def _to_save_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return native.to_save_dtype(name, t, dtype, "AutoAWQ")


def save(model: nn.Module, out_dir: str | Path, *, version: str = "gemm", tokenizer=None,
         overwrite: bool = False) -> Path:
    """Writes `model` (quantized by lowbit, 4-bit asymmetric, or loaded from an AWQ checkpoint) as an
    AutoAWQ checkpoint of `version` "gemm" or "gemv". Everything is checked before a byte is written."""
    version = str(version).lower()
    mods = awq_modules(model, version)
    qcfg = AWQConfig(version=version, group_size=_config_group_size(mods),
                     modules_to_not_convert=tuple(_float_linears(model, mods)) or None)
    state = {}
    for k, v in untied_state_dict(model).items():
        owner = k.rpartition(".")[0]
        if owner in mods:
            continue  # written below, in the AWQ layout
        state[k] = _to_save_dtype(k, v, SAVE_DTYPE)
    for name, m in mods.items():
        state[f"{name}.qweight"] = m.qweight.detach().contiguous()
        state[f"{name}.qzeros"] = m.qzeros.detach().contiguous()
        state[f"{name}.scales"] = m.scales.detach().to(torch.float16).contiguous()
        if m.bias is not None:
            state[f"{name}.bias"] = _to_save_dtype(f"{name}.bias", m.bias.detach(), SAVE_DTYPE).contiguous()
    cfg = native.export_config(model, qcfg.to_dict(), SAVE_DTYPE)
    return native.write_checkpoint(out_dir, model, state, cfg, tokenizer=tokenizer, overwrite=overwrite)


@contextlib.contextmanager
def wqlinear_modules(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its AWQ modules swapped for the equivalent `WQLinear` while the block runs
    (to write lowbit's own format from a model loaded from an AWQ checkpoint)."""
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, AWQLinear)}
    try:
        for name, m in swapped.items():
            set_module(model, name, m.to_wqlinear().to(m.qweight.device))
        yield model
    finally:
        for name, m in swapped.items():
            set_module(model, name, m)


# ---- reading --------------------------------------------------------------------------------------

def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x, which AutoAWQ's own environment may pin
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load(path: str | Path, qcfg: AWQConfig, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """An AWQ checkpoint into a model whose quantized linears are `AWQLinearGEMM` / `AWQLinearGEMV`.

    The float tensors are loaded in `dtype` (None: the dtype config.json names); the packed
    tensors stay as they are. The quantized layers are the ones the file has `qweight` for.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    state = native.read_safetensors(native.weight_files(path))
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers would otherwise want its own AWQ backend
    if dtype is None:
        dtype = native._dtype(json.loads((path / "config.json").read_text()))
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    cls = AWQ_LAYOUTS[qcfg.version]
    names = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{path}: an AWQ config but no .qweight tensors in the weights")
    for name in names:
        old = find_module(model, name)
        if old is None or not is_linear(old):
            raise CheckpointError(f"{path}: checkpoint quantizes {name}, which is not a linear layer of "
                                  f"{type(model).__name__}")
        out_f, in_f = linear_shape(old)
        bias = state.get(f"{name}.bias")
        try:
            new = cls(in_f, out_f, group_size=qcfg.group_size, bias=bias is not None,
                      bias_dtype=bias.dtype if bias is not None else torch.float16, name=name)
        except SpecError as e:
            raise CheckpointError(f"{path}: {e}") from None
        for t in ("qweight", "qzeros"):
            if state.get(f"{name}.{t}") is not None and state[f"{name}.{t}"].dtype != torch.int32:
                raise CheckpointError(f"{path}: {name}.{t} is {state[f'{name}.{t}'].dtype}, AWQ stores int32")
        set_module(model, name, new)
    expected = model.state_dict()
    for k, v in state.items():
        if k not in expected:
            hint = (" (AutoAWQ's ScaledActivation, which lowbit does not build)"
                    if k.endswith(".scales") and f"{k[:-len('.scales')]}.qweight" not in state else "")
            raise CheckpointError(f"{path}: unexpected tensor {k}{hint}")
        if tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, {qcfg.version.upper()} layer "
                                  f"with group size {qcfg.group_size} expects {tuple(expected[k].shape)}")
    tied = native._tied_names(model)
    missing = [k for k in expected if k not in state and k not in tied]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(device).eval()

