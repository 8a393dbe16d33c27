"""compressed-tensors checkpoints, format "pack-quantized" (integer weights, no activation
quantization): written from lowbit models, read from lowbit or the `compressed-tensors` package
(llm-compressor's output).

    model.safetensors  for each quantized linear `<name>.weight_packed`, `.weight_scale`,
                       `.weight_shape`, `.weight_zero_point` when asymmetric (and `.bias`); every
                       other tensor too
    config.json        "quantization_config": {"quant_method": "compressed-tensors", "format":
                       "pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"], "weights":
                       {"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group",
                       "group_size": 128, "dynamic": false}, ...}}, "ignore": ["lm_head"], ...}

Per layer, for a weight `W [out, in]` with b-bit codes, as the package's `PackedQuantizationCompressor`
stores them (its integers are signed, q in [-2^(b-1), 2^(b-1)), and packed offset by 2^(b-1), which
makes them lowbit's unsigned codes u = q + 2^(b-1)):

    weight_packed      int32 [out, ceil(in * b / 32)]   u packed along the input, one bit stream
                                                         (`lowbit.quant.pack_words`)
    weight_scale       float [out, in / G]              ([out, 1] for strategy "channel")
    weight_zero_point  int32 [ceil(out * b / 32), in / G]  zero points z (unsigned, as u) packed along
                                                         the output; asymmetric layers only
    weight_shape       int64 [2]                        (out, in)

so `W[n, k] = (u[n, k] - z[n, k // G]) * s[n, k // G]`, symmetric layers having z = 2^(b-1): exactly
a `WQLinear`. One config group per distinct (bits, symmetric, group size); a model with one
scheme targets "Linear" and lists its float linears (the output head among them) in `ignore`.

Float tensors, scales included, are written in the model's float dtype when it is float16, else in
float32: scales are float16 in a `WQLinear`, which float32 holds exactly and bfloat16 does not, and
the package dequantizes in the scale's dtype. Reading takes any float dtype; scales become float16
(exact for bfloat16 and float16 scales within float16's range, rounded to the nearest float16 for
float32 ones, refused when beyond it).

Act-order layers (`WQLinear.perm`) are refused: the package has dropped its g_idx ordering
(actorder "group"; 0.19 and 0.20 refuse such configs). Older checkpoints that carry `weight_g_idx`
are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, SpecError
from ..models import find_module, is_linear, linear_shape, set_module, untied_state_dict
from ..nn import QUANTIZED_MODULES, AWQLinear, WQLinear
from ..quant import PerGroup, QuantSpec, pack_words, packed_nwords, unpack_words
from . import native
from .gptq import perm_from_g_idx

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
QUANT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
LEGACY_ACTORDER = ("group", "dynamic")  # g_idx ordering, which older releases wrote

__all__ = ["CTScheme", "CTConfig", "read_quant_config", "ct_tensors", "wqlinear_from_ct", "save", "load"]


@dataclass(frozen=True)
class CTScheme:
    """One config group: integer weights of `bits`, one scale per `group_size` inputs (None: per
    output channel, strategy "channel"), zero points unless symmetric."""

    bits: int
    symmetric: bool
    group_size: int | None
    targets: tuple[str, ...] = ("Linear",)
    format: str = FORMAT

    @classmethod
    def from_dict(cls, d: dict, top_format: str, where: str) -> "CTScheme":
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: a preset name in place of a scheme ({d!r}) is not supported (the "
                                  f"package writes full schemes)")
        fmt = d.get("format") or top_format
        if fmt != FORMAT:
            raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported (lowbit reads "
                                  f"{FORMAT!r}: integer weights packed in int32)")
        for act in ("input_activations", "output_activations"):
            if d.get(act):
                raise CheckpointError(f"{where}: {act} are quantized; lowbit reads weight-only checkpoints")
        w = d.get("weights")
        if not isinstance(w, dict):
            raise CheckpointError(f"{where}: no weights scheme")
        bits, kind, strategy = w.get("num_bits", 8), str(w.get("type", "int")), w.get("strategy")
        group_size = w.get("group_size")
        if kind != "int":
            raise CheckpointError(f"{where}: {kind} weights are not supported (lowbit reads integer weights)")
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise CheckpointError(f"{where}: {bits}-bit weights are not supported (lowbit holds 2..8 bits)")
        if w.get("dynamic"):
            raise CheckpointError(f"{where}: dynamic weight quantization is not supported")
        if strategy is None:
            strategy = "channel" if group_size == -1 else ("group" if group_size else "tensor")
        if strategy == "channel":
            group_size = None
        elif strategy == "group":
            if not isinstance(group_size, int) or group_size <= 0:
                raise CheckpointError(f"{where}: strategy 'group' needs a positive group_size, got {group_size!r}")
        else:
            raise CheckpointError(f"{where}: weight strategy {strategy!r} is not supported (lowbit reads 'group' "
                                  f"and 'channel')")
        targets = d.get("targets") or []
        return cls(bits, bool(w.get("symmetric", True)), group_size, tuple(targets), fmt)

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "format": self.format, "input_activations": None,
                "output_activations": None,
                "weights": {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                            "strategy": "channel" if self.group_size is None else "group",
                            "group_size": self.group_size, "dynamic": False}}


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """The package's rule: "re:" + a regex matched at the start of the name, else the exact name or
    the name of one of the module's classes ("Linear" for any linear)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == name:
        return True
    if target == "Linear" and is_linear(module):
        return True
    return any(c.__name__ == target for c in type(module).__mro__)


@dataclass(frozen=True)
class CTConfig:
    groups: dict[str, CTScheme]
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantization_config") -> "CTConfig":
        top = d.get("format") or FORMAT
        if top not in (FORMAT, "mixed-precision"):
            raise CheckpointError(f"{where}: compressed-tensors format {top!r} is not supported (lowbit reads "
                                  f"{FORMAT!r}: integer weights packed in int32)")
        for key, what in (("kv_cache_scheme", "a quantized KV cache"), ("transform_config", "transforms (rotations)"),
                          ("sparsity_config", "sparsity")):
            if d.get(key):
                raise CheckpointError(f"{where}: the checkpoint has {what} ({key}), which lowbit does not apply")
        groups = d.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError(f"{where}: no config_groups")
        schemes = {k: CTScheme.from_dict(v, top, f"{where} config_groups[{k!r}]") for k, v in groups.items()}
        for k, g in groups.items():
            actorder = (g.get("weights") or {}).get("actorder")
            if actorder not in (None, False, "weight", "static", *LEGACY_ACTORDER):
                raise CheckpointError(f"{where} config_groups[{k!r}]: actorder {actorder!r} is not supported")
        return cls(schemes, tuple(d.get("ignore") or ()))

    def scheme_for(self, name: str, module: nn.Module) -> CTScheme | None:
        """The scheme of the first group that targets `name`; None when ignored or untargeted."""
        if any(_matches(name, module, t) for t in self.ignore):
            return None
        for scheme in self.groups.values():
            if any(_matches(name, module, t) for t in scheme.targets):
                return scheme
        return None

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format": FORMAT,
                "config_groups": {k: v.to_dict() for k, v in self.groups.items()},
                "ignore": list(self.ignore), "kv_cache_scheme": None, "quantization_status": "compressed",
                "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def read_quant_config(path: str | Path, cfg: dict) -> CTConfig | None:
    """The compressed-tensors settings of a checkpoint whose config.json is `cfg`; None if it is not one."""
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == QUANT_METHOD:
        return CTConfig.from_dict(qc, f"{Path(path) / 'config.json'} quantization_config")
    return None


# ---- one layer --------------------------------------------------------------------------------------

def check_ct_compatible(m: WQLinear, name: str = "") -> None:
    """Raise SpecError unless pack-quantized can hold `m`."""
    where = f"layer {name}: " if name else ""
    if m.codebook is not None:
        raise SpecError(f"{where}compressed-tensors' pack-quantized holds integer codes; this layer uses a "
                        f"{m.bits}-bit codebook (non-uniform levels)")
    if m.perm is not None:
        raise SpecError(f"{where}compressed-tensors has no act-order input permutation (its actorder 'group' "
                        f"with g_idx was removed); this layer was quantized with act_order (save it in the "
                        f"GPTQ or lowbit format, or quantize with act_order: false)")


def scheme_key(m: WQLinear, channel: bool) -> tuple[int, bool, int | None]:
    return m.bits, m.symmetric, None if channel else m.group_size


def ct_tensors(m: WQLinear, float_dtype: torch.dtype = torch.float32, name: str = "") -> dict[str, torch.Tensor]:
    """The layer as pack-quantized stores it (scales in `float_dtype`; the bias as it is)."""
    check_ct_compatible(m, name)
    out = {"weight_packed": pack_words(m.codes(), m.bits),
           "weight_scale": m.scales.detach().to(float_dtype).contiguous(),
           "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    if not m.symmetric:
        z = m.zeros().round().to(torch.int64)  # [out, groups], unsigned
        out["weight_zero_point"] = pack_words(z.t(), m.bits).t().contiguous()
    if m.bias is not None:
        out["bias"] = m.bias.detach()
    return out


def wqlinear_from_ct(t: dict[str, torch.Tensor], in_features: int, out_features: int, scheme: CTScheme,
                     name: str = "") -> WQLinear:
    """A `WQLinear` holding the weight of one pack-quantized layer's tensors `t`."""
    where = f"layer {name}: " if name else ""
    bits = scheme.bits
    g = in_features if scheme.group_size is None else scheme.group_size
    if in_features % g:
        raise CheckpointError(f"{where}group size {g} does not divide in_features {in_features} (lowbit keeps "
                              f"whole groups)")
    ng = in_features // g
    want = {"weight_packed": ((out_features, packed_nwords(in_features, bits)), (torch.int32,)),
            "weight_scale": ((out_features, ng), (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
            "weight_shape": ((2,), (torch.int64, torch.int32)),
            "weight_g_idx": ((in_features,), (torch.int32, torch.int64))}
    if not scheme.symmetric:
        want["weight_zero_point"] = ((packed_nwords(out_features, bits), ng), (torch.int32,))
    for k, (shape, dtypes) in want.items():
        v = t.get(k)
        if v is None:
            if k == "weight_g_idx":
                continue
            raise CheckpointError(f"{where}missing tensor {k}")
        if v.dtype not in dtypes:
            raise CheckpointError(f"{where}{k} is {v.dtype}, pack-quantized stores {str(dtypes[0]).replace('torch.', '')}")
        if tuple(v.shape) != shape:
            raise CheckpointError(f"{where}{k} has shape {tuple(v.shape)}, a {bits}-bit layer {in_features} -> "
                                  f"{out_features} with {'per-channel scales' if scheme.group_size is None else f'group size {g}'} "
                                  f"has {shape}")
    if scheme.symmetric and "weight_zero_point" in t and bool(t["weight_zero_point"].any()):
        # older releases stored all-zero zero points for symmetric layers too; others are a mismatch
        raise CheckpointError(f"{where}weight_zero_point holds nonzero values, but the scheme is symmetric")
    if t["weight_shape"].tolist() != [out_features, in_features]:
        raise CheckpointError(f"{where}weight_shape says {t['weight_shape'].tolist()}, the model's layer is "
                              f"[{out_features}, {in_features}]")
    u = unpack_words(t["weight_packed"], bits, in_features)  # [out, in] unsigned, model order
    s = t["weight_scale"]
    s16 = s.to(torch.float16)
    if not bool(torch.isfinite(s16).all()) or bool(((s16 == 0) & (s != 0)).any()):
        raise CheckpointError(f"{where}weight_scale beyond float16's range (max |s| = {float(s.float().abs().max()):.4g}), "
                              f"which lowbit's WQLinear stores scales in")
    perm = perm_from_g_idx(t["weight_g_idx"], g, name) if "weight_g_idx" in t else None
    if perm is not None:
        u = u[:, perm]
    spec = QuantSpec(bits=bits, symmetric=scheme.symmetric, granularity=PerGroup(g))
    if scheme.symmetric:
        return WQLinear.from_codes(u.to(torch.int32) - 2 ** (bits - 1), s16, None, spec, bias=t.get("bias"),
                                   perm=perm, name=name)
    z = unpack_words(t["weight_zero_point"].t().contiguous(), bits, out_features).t()  # [out, groups]
    return WQLinear.from_codes(u, s16, z.float(), spec, bias=t.get("bias"), perm=perm, name=name)


# ---- writing ----------------------------------------------------------------------------------------

def ct_layers(model: nn.Module) -> dict[str, WQLinear]:
    """Each quantized linear of `model` as a `WQLinear` (AWQ layers converted; the model is left as it
    is). Raises before anything is written when a layer has no pack-quantized form."""
    qmods = {n: m for n, m in model.named_modules() if type(m).__name__ in QUANTIZED_MODULES}
    if not qmods:
        raise SpecError("the model has no quantized linear layers to write as compressed-tensors (quantize it "
                        "first)")
    problems, out = [], {}
    for name, m in qmods.items():
        if isinstance(m, AWQLinear):
            m = m.to_wqlinear()
        if not isinstance(m, WQLinear):
            problems.append(f"layer {name}: {type(m).__name__} has no compressed-tensors form")
            continue
        try:
            check_ct_compatible(m, name)
        except SpecError as e:
            problems.append(str(e))
        out[name] = m
    conv1d = _conv1d_names(model)
    for name in (n for n in out if n in conv1d):
        problems.append(f"layer {name}: a GPT-2-style Conv1D (weight stored [in, out]), which compressed-tensors' "
                        f"readers would unpack as an nn.Linear")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SpecError(f"cannot write a compressed-tensors checkpoint: {'; '.join(problems[:3])}{more}")
    return out


def _conv1d_names(model: nn.Module) -> set[str]:
    """Names of the linears that the architecture builds as transformers' Conv1D (GPT-2's), found on
    an empty copy on the meta device: in `model` they may have been replaced already."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model.config)
    except (ValueError, TypeError, AttributeError):  # not an architecture transformers builds by itself
        return set()
    return {n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}


def float_dtype(model: nn.Module) -> torch.dtype:
    """float16 for a float16 model, else float32 (which holds WQLinear's float16 scales exactly)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float16 if dtypes == {torch.float16} else torch.float32


def _config(model: nn.Module, layers: dict[str, WQLinear]) -> CTConfig:
    channel = all(m.group_size == m.in_features for m in layers.values())
    by_scheme: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        by_scheme.setdefault(scheme_key(m, channel), []).append(name)
    ignore = [n for n, m in model.named_modules() if n not in layers and is_linear(m)]  # the head among them
    one = len(by_scheme) == 1
    groups = {f"group_{i}": CTScheme(bits, sym, g, ("Linear",) if one else tuple(names))
              for i, ((bits, sym, g), names) in enumerate(by_scheme.items())}
    return CTConfig(groups, tuple(ignore))


def save(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes `model` (quantized by lowbit, or loaded from an AWQ, GPTQ or compressed-tensors
    checkpoint) as a compressed-tensors pack-quantized checkpoint. Everything is checked before a
    byte is written."""
    layers = ct_layers(model)
    qcfg = _config(model, layers)
    dtype = float_dtype(model)
    state = {}
    for k, v in untied_state_dict(model).items():
        if k.rpartition(".")[0] in layers:
            continue  # written below, packed
        state[k] = native.to_save_dtype(k, v, dtype, "compressed-tensors")
    for name, m in layers.items():
        for k, v in ct_tensors(m, dtype, name).items():
            state[f"{name}.{k}"] = v
    cfg = native.export_config(model, qcfg.to_dict(), dtype)
    return native.write_checkpoint(out_dir, model, state, cfg, tokenizer=tokenizer, overwrite=overwrite)


# ---- reading ----------------------------------------------------------------------------------------

def load(path: str | Path, qcfg: CTConfig, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A pack-quantized checkpoint into a model whose quantized linears are `WQLinear`.

    The float tensors are loaded in `dtype` (None: the dtype config.json names); a bias keeps the
    dtype it has in the file. The quantized layers are the ones the file has `weight_packed` for.
    """
    path = Path(path)
    state = native.read_safetensors(native.weight_files(path))
    model = native.empty_model(path, dtype)
    names = sorted(k[: -len(".weight_packed")] for k in state if k.endswith(".weight_packed"))
    if not names:
        raise CheckpointError(f"{path}: a compressed-tensors config but no .weight_packed tensors in the weights")
    for name in names:
        old = find_module(model, name)
        if old is None or not is_linear(old):
            raise CheckpointError(f"{path}: checkpoint quantizes {name}, which is not a linear layer of "
                                  f"{type(model).__name__}")
        scheme = qcfg.scheme_for(name, old)
        if scheme is None:
            raise CheckpointError(f"{path}: {name} has a .weight_packed, but no config group targets it (or it is "
                                  f"ignored)")
        out_f, in_f = linear_shape(old)
        t = {k: state.pop(f"{name}.{k}") for k in (*QUANT_TENSORS, "bias") if f"{name}.{k}" in state}
        try:
            new = wqlinear_from_ct(t, in_f, out_f, scheme, name=name)
        except (CheckpointError, SpecError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        set_module(model, name, new)
    native.load_float_tensors(model, state, path, set(names))
    return model.to(device).eval()
