"""GPTQ checkpoints, checkpoint_format "gptq" (v1): written from lowbit models, read from lowbit,
GPTQModel or AutoGPTQ.

    model.safetensors  for each quantized linear `<name>.qweight`, `.qzeros`, `.scales`, `.g_idx`
                       (and `.bias`); every other tensor too, in float16
    config.json        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                       "desc_act": true, "sym": false, "checkpoint_format": "gptq", ...}
    quantize_config.json  the same settings (GPTQModel and AutoGPTQ read them from here)

Per layer, for a weight `W [out, in]` with b-bit unsigned codes u, zero points z and groups of G:

    qweight  int32 [in * b / 32, out]     u^T packed along the input, in model order, as one bit stream
                                          (`lowbit.quant.pack_words`; 3-bit values straddle words)
    qzeros   int32 [in / G, out * b / 32]  z - 1 packed along the output ("v1")
    scales   fp16  [in / G, out]
    g_idx    int32 [in]                    the group of each input: i // G, or with act-order (desc_act)
                                          a permutation-derived index, G inputs per group

so `W[n, k] = s[g_idx[k], n] * (u[k, n] - z[g_idx[k], n])`. Loading turns each layer into a
`WQLinear` bit for bit; a g_idx other than i // G becomes its act-order `perm` (the inputs sorted by
group, stably), and a g_idx whose groups do not hold exactly G inputs is refused. Symmetric layers
store z = 2^(b-1) (v1: 2^(b-1) - 1, 0x77777777 at 4 bits).

The "- 1" follows GPTQModel, the reference writer: for 2, 4 and 8 bits it subtracts the constant
0x11111111 (4-bit) from each packed word, for 3 bits it subtracts one per value, and it reads them
back the same way. The two agree unless a zero point is 0, which v1 cannot hold as a value (it
borrows from the next one): GPTQModel reads such words back exactly, readers that add one per
value (vLLM, exllama) do not. lowbit writes and reads as GPTQModel does; checkpoint_format "gptq_v2"
(no offset) is read as well.

Float tensors are written in float16, the dtype GPTQ's kernels (and its scales) compute in;
reading takes any float dtype.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError, SpecError
from ..models import find_module, is_linear, linear_shape, set_module, untied_state_dict
from ..nn import QUANTIZED_MODULES, AWQLinear, WQLinear
from ..quant import PerGroup, QuantSpec, pack_words, packed_nwords, unpack_words
from . import native

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANTIZE_CONFIG_NAME = "quantize_config.json"
SAVE_DTYPE = torch.float16
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")

__all__ = ["GPTQConfig", "BITS", "read_quant_config", "gptq_tensors", "wqlinear_from_gptq", "save", "load"]


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    # GPTQModel's per-module rules, first match wins: "-:regex" leaves a module in float,
    # "+:regex" (or a bare regex) overrides bits / group_size / sym
    dynamic: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantization_config") -> "GPTQConfig":
        fmt = str(d.get("checkpoint_format", d.get("format", "gptq"))).lower()
        if fmt not in CHECKPOINT_FORMATS:
            raise CheckpointError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (lowbit reads "
                                  f"{', '.join(CHECKPOINT_FORMATS)})")
        pack_dtype = str(d.get("pack_dtype", "int32")).replace("torch.", "")
        if pack_dtype != "int32":
            raise CheckpointError(f"{where}: pack_dtype {pack_dtype!r} is not supported (lowbit reads int32 words)")
        dynamic = d.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise CheckpointError(f"{where}: dynamic must be a mapping of module patterns, got {dynamic!r}")
        cfg = cls(bits=d.get("bits", 4), group_size=d.get("group_size", 128), desc_act=bool(d.get("desc_act", False)),
                  sym=bool(d.get("sym", True)), checkpoint_format=fmt, lm_head=bool(d.get("lm_head", False)),
                  dynamic=dict(dynamic), meta=dict(d.get("meta") or {}))
        cfg.settings_check(cfg.bits, cfg.group_size, where)
        for pattern, over in dynamic.items():
            if not isinstance(over, dict):
                raise CheckpointError(f"{where}: dynamic[{pattern!r}] must be a mapping, got {over!r}")
            if not pattern.startswith("-:"):
                cfg.settings_check(over.get("bits", cfg.bits), over.get("group_size", cfg.group_size),
                                   f"{where} dynamic[{pattern!r}]")
        return cfg

    @staticmethod
    def settings_check(bits, group_size, where: str) -> None:
        if bits not in BITS:
            raise CheckpointError(f"{where}: {bits}-bit GPTQ checkpoints are not supported (lowbit reads "
                                  f"{', '.join(map(str, BITS))} bits)")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
            raise CheckpointError(f"{where}: group_size must be a positive integer or -1, got {group_size!r}")

    def module_settings(self, name: str) -> tuple[int, int, bool] | None:
        """(bits, group_size, sym) of module `name`, or None where a dynamic rule leaves it in float."""
        for pattern, over in self.dynamic.items():
            negative = pattern.startswith("-:")
            raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
            if re.match(raw, name):
                if negative:
                    return None
                return over.get("bits", self.bits), over.get("group_size", self.group_size), over.get("sym", self.sym)
        return self.bits, self.group_size, self.sym

    def to_dict(self) -> dict:
        d = {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
             "sym": self.sym, "lm_head": self.lm_head, "checkpoint_format": self.checkpoint_format,
             "format": self.checkpoint_format, "pack_dtype": "int32", "meta": self.meta}
        if self.dynamic:
            d["dynamic"] = self.dynamic
        return d


def read_quant_config(path: str | Path, cfg: dict) -> GPTQConfig | None:
    """The GPTQ settings of a checkpoint directory whose config.json is `cfg`; None if it is not GPTQ.
    config.json's quantization_config first, then quantize_config.json (AutoGPTQ wrote only that)."""
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        if str(qc.get("quant_method", "")).lower() == "gptq":
            return GPTQConfig.from_dict(qc, f"{Path(path) / 'config.json'} quantization_config")
        return None
    f = Path(path) / QUANTIZE_CONFIG_NAME
    if f.is_file():
        try:
            qc = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON ({e})") from e
        if isinstance(qc, dict) and str(qc.get("quant_method", "gptq")).lower() == "gptq":
            return GPTQConfig.from_dict(qc, str(f))
    return None


# ---- one layer --------------------------------------------------------------------------------------

def _word_offsets(bits: int, n: int) -> torch.Tensor:
    """int64 words of n packed fields that each hold 1 (0x11111111 at 4 bits)."""
    return pack_words(torch.ones(n, dtype=torch.int64), bits).to(torch.int64)


def _wrap_int32(words: torch.Tensor) -> torch.Tensor:
    words = words % 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_zeros(z: torch.Tensor, bits: int, v1: bool = True) -> torch.Tensor:
    """Integer zero points `[groups, out]` -> GPTQ `qzeros` int32 `[groups, ceil(out * bits / 32)]`."""
    z = z.to(torch.int64)
    if not v1:
        return pack_words(z, bits)
    if 32 % bits:  # 3 bits: one less per value, as GPTQModel writes it
        return pack_words((z - 1) % 2**bits, bits)
    return _wrap_int32(pack_words(z, bits).to(torch.int64) - _word_offsets(bits, z.shape[-1]))


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, v1: bool = True) -> torch.Tensor:
    """Inverse of `pack_zeros`: int32 `[groups, words]` -> zero points int64 `[groups, out]`."""
    if not v1:
        return unpack_words(qzeros, bits, out_features).to(torch.int64)
    if 32 % bits:
        return (unpack_words(qzeros, bits, out_features).to(torch.int64) + 1) % 2**bits
    words = _wrap_int32(qzeros.to(torch.int64) + _word_offsets(bits, out_features))
    return unpack_words(words, bits, out_features).to(torch.int64)


def check_gptq_compatible(m: WQLinear, name: str = "") -> None:
    """Raise SpecError unless GPTQ's layout can hold `m`."""
    where = f"layer {name}: " if name else ""
    if m.codebook is not None:
        raise SpecError(f"{where}GPTQ checkpoints hold integer codes with zero points; this layer uses a "
                        f"{m.bits}-bit codebook (non-uniform levels)")
    if m.bits not in BITS:
        raise SpecError(f"{where}GPTQ checkpoints hold {', '.join(map(str, BITS))}-bit codes; this layer is "
                        f"{m.bits}-bit")
    for what, n in (("in_features", m.in_features), ("out_features", m.out_features)):
        if n * m.bits % 32:
            raise SpecError(f"{where}{what}={n} times {m.bits} bits is not a whole number of int32 words, which "
                            f"GPTQ's layout needs (a multiple of {32 // math.gcd(32, m.bits)})")


def gptq_tensors(m: WQLinear, name: str = "", v1: bool = True) -> dict[str, torch.Tensor]:
    """The layer as GPTQ stores it: qweight, qzeros, scales, g_idx (and bias, as it is)."""
    check_gptq_compatible(m, name)
    u = m.codes()  # [out, in], stored order
    if m.perm is not None:  # back to model order: column perm[j] holds stored column j
        u = torch.empty_like(u).index_copy_(1, m.perm.long(), u)
    z = m.zeros().round().to(torch.int64)  # [out, groups]
    out = {"qweight": pack_words(u, m.bits).t().contiguous(),
           "qzeros": pack_zeros(z.t(), m.bits, v1).contiguous(),
           "scales": m.scales.detach().t().to(torch.float16).contiguous(),
           "g_idx": m.g_idx().to(torch.int32).contiguous()}
    if m.bias is not None:
        out["bias"] = m.bias.detach()
    return out


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int, name: str = "") -> torch.Tensor | None:
    """WQLinear's act-order perm for a GPTQ g_idx (None when it is i // G): the inputs sorted by
    group, stably. Refuses a g_idx whose groups do not hold exactly G inputs each."""
    in_f = g_idx.numel()
    ng = in_f // group_size
    g = g_idx.reshape(-1).to(torch.int64)
    where = f"layer {name}: " if name else ""
    if in_f and (int(g.min()) < 0 or int(g.max()) >= ng):
        raise CheckpointError(f"{where}g_idx holds group {int(g.min()) if int(g.min()) < 0 else int(g.max())}, "
                              f"outside the {ng} groups of {in_f} inputs")
    counts = torch.bincount(g, minlength=ng)
    if not bool((counts == group_size).all()):
        bad = int((counts != group_size).nonzero()[0])
        raise CheckpointError(f"{where}g_idx puts {int(counts[bad])} inputs in group {bad}; each group must hold "
                              f"group_size={group_size} inputs for lowbit to load it (an act-order permutation)")
    if torch.equal(g, torch.arange(in_f) // group_size):
        return None
    return torch.sort(g, stable=True).indices


def wqlinear_from_gptq(t: dict[str, torch.Tensor], in_features: int, out_features: int, *, bits: int,
                       group_size: int, sym: bool, v1: bool = True, name: str = "") -> WQLinear:
    """A `WQLinear` holding exactly the weight of one GPTQ layer's tensors `t` (qweight, qzeros,
    scales, optional g_idx and bias). Zero points all 2^(bits-1) under sym give a symmetric layer."""
    where = f"layer {name}: " if name else ""
    g = in_features if group_size == -1 else group_size
    if in_features % g:
        raise CheckpointError(f"{where}group size {g} does not divide in_features {in_features} (lowbit keeps "
                              f"whole groups)")
    ng = in_features // g
    want = {"qweight": ((packed_nwords(in_features, bits), out_features), (torch.int32,)),
            "qzeros": ((ng, packed_nwords(out_features, bits)), (torch.int32,)),
            "scales": ((ng, out_features), (torch.float16, torch.bfloat16, torch.float32)),
            "g_idx": ((in_features,), (torch.int32, torch.int64))}
    for k, (shape, dtypes) in want.items():
        v = t.get(k)
        if v is None:
            if k == "g_idx":
                continue
            raise CheckpointError(f"{where}missing tensor {k}")
        if v.dtype not in dtypes:
            raise CheckpointError(f"{where}{k} is {v.dtype}, GPTQ stores {str(dtypes[0]).replace('torch.', '')}")
        if tuple(v.shape) != shape:
            raise CheckpointError(f"{where}{k} has shape {tuple(v.shape)}, a {bits}-bit layer {in_features} -> "
                                  f"{out_features} with group size {group_size} has {shape}")
    u = unpack_words(t["qweight"].t().contiguous(), bits, in_features)  # [out, in], model order
    z = unpack_zeros(t["qzeros"], bits, out_features, v1).t()  # [out, groups]
    s = t["scales"].t()
    s16 = s.to(torch.float16)  # what WQLinear holds (GPTQ's writers store float16 already)
    if not bool(torch.isfinite(s16).all()) or bool(((s16 == 0) & (s != 0)).any()):
        raise CheckpointError(f"{where}scales beyond float16's range (max |s| = {float(s.float().abs().max()):.4g})")
    perm = perm_from_g_idx(t["g_idx"], g, name) if "g_idx" in t else None
    if perm is not None:
        u = u[:, perm]  # stored column j holds input perm[j]
    symmetric = sym and bool((z == 2 ** (bits - 1)).all())
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=PerGroup(g))
    q = u.to(torch.int32) - 2 ** (bits - 1) if symmetric else u
    try:
        return WQLinear.from_codes(q, s16, None if symmetric else z.float(), spec, bias=t.get("bias"), perm=perm,
                                   name=name)
    except SpecError as e:
        raise CheckpointError(f"{where}{e}") from None


# ---- writing ----------------------------------------------------------------------------------------

def gptq_layers(model: nn.Module) -> dict[str, WQLinear]:
    """Each quantized linear of `model` as a `WQLinear` (AWQ layers converted; the model is left as it
    is). Raises before anything is written when a layer has no GPTQ form or the layers disagree on
    bits or group size (GPTQ checkpoints have one of each)."""
    qmods = {n: m for n, m in model.named_modules() if type(m).__name__ in QUANTIZED_MODULES}
    if not qmods:
        raise SpecError("the model has no quantized linear layers to write as GPTQ (quantize it first)")
    problems, out = [], {}
    for name, m in qmods.items():
        if isinstance(m, AWQLinear):
            m = m.to_wqlinear()
        if not isinstance(m, WQLinear):
            problems.append(f"layer {name}: {type(m).__name__} has no GPTQ form")
            continue
        try:
            check_gptq_compatible(m, name)
        except SpecError as e:
            problems.append(str(e))
        out[name] = m
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SpecError(f"cannot write a GPTQ checkpoint: {'; '.join(problems[:3])}{more}")
    bits = {m.bits for m in out.values()}
    if len(bits) > 1:
        raise SpecError(f"GPTQ checkpoints have one bit width, this model mixes {sorted(bits)}")
    group_sizes = {m.group_size for m in out.values()}
    if len(group_sizes) > 1 and not all(m.group_size == m.in_features for m in out.values()):
        raise SpecError(f"GPTQ checkpoints have one group size, this model mixes {sorted(group_sizes)}")
    return out


def _float_linears(model: nn.Module, quantized: dict) -> list[str]:
    """Linears left in float, but for the output head (GPTQ's lm_head flag says whether it is quantized)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if n not in quantized and is_linear(m) and m is not head and not n.endswith("lm_head")]


def _meta(model: nn.Module) -> dict:
    meta = {"quantizer": [f"lowbit:{__version__}"]}
    recipe = getattr(model, "lowbit_recipe", None) or {}
    for step in recipe.get("algorithms", []) or []:
        if step.get("method") == "gptq":
            meta.update(damp_percent=step.get("percdamp"), static_groups=step.get("static_groups"),
                        true_sequential=step.get("true_sequential"))
    return {k: v for k, v in meta.items() if v is not None}


def save(model: nn.Module, out_dir: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes `model` (quantized by lowbit or loaded from an AWQ or GPTQ checkpoint) as a GPTQ v1
    checkpoint. Everything is checked before a byte is written."""
    layers = gptq_layers(model)
    any_layer = next(iter(layers.values()))
    group_sizes = {m.group_size for m in layers.values()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    floats = _float_linears(model, layers)
    qcfg = GPTQConfig(bits=any_layer.bits, group_size=group_sizes.pop() if len(group_sizes) == 1 else -1,
                      desc_act=any(m.perm is not None for m in layers.values()),
                      sym=all(m.symmetric for m in layers.values()),
                      lm_head=any(model.get_submodule(n) is head for n in layers) if head is not None else False,
                      dynamic={f"-:^{re.escape(n)}$": {} for n in floats}, meta=_meta(model))
    state = {}
    for k, v in untied_state_dict(model).items():
        if k.rpartition(".")[0] in layers:
            continue  # written below, in GPTQ's layout
        state[k] = native.to_save_dtype(k, v, SAVE_DTYPE, "GPTQ")
    for name, m in layers.items():
        for k, v in gptq_tensors(m, name).items():
            state[f"{name}.{k}"] = native.to_save_dtype(f"{name}.{k}", v, SAVE_DTYPE, "GPTQ")
    cfg = native.export_config(model, qcfg.to_dict(), SAVE_DTYPE)
    return native.write_checkpoint(out_dir, model, state, cfg, tokenizer=tokenizer, overwrite=overwrite,
                                   extra_json={QUANTIZE_CONFIG_NAME: qcfg.to_dict()})


# ---- reading ----------------------------------------------------------------------------------------

def load(path: str | Path, qcfg: GPTQConfig, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A GPTQ checkpoint into a model whose quantized linears are `WQLinear`, bit for bit.

    The float tensors are loaded in `dtype` (None: the dtype config.json names); a bias keeps the
    dtype it has in the file. The quantized layers are the ones the file has `qweight` for.
    """
    path = Path(path)
    state = native.read_safetensors(native.weight_files(path))
    model = native.empty_model(path, dtype)
    names = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{path}: a GPTQ config but no .qweight tensors in the weights")
    v1 = qcfg.checkpoint_format == "gptq"
    for name in names:
        old = find_module(model, name)
        if old is None or not is_linear(old):
            raise CheckpointError(f"{path}: checkpoint quantizes {name}, which is not a linear layer of "
                                  f"{type(model).__name__}")
        settings = qcfg.module_settings(name)
        if settings is None:
            raise CheckpointError(f"{path}: {name} has a .qweight, but the config's dynamic rules leave it in float")
        bits, group_size, sym = settings
        out_f, in_f = linear_shape(old)
        t = {k: state.pop(f"{name}.{k}") for k in (*QUANT_TENSORS, "bias") if f"{name}.{k}" in state}
        try:
            new = wqlinear_from_gptq(t, in_f, out_f, bits=bits, group_size=group_size, sym=sym, v1=v1, name=name)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        set_module(model, name, new)
    native.load_float_tensors(model, state, path, set(names))
    return model.to(device).eval()
