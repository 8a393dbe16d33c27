"""lowbit's GPTQ format against the real GPTQModel (gptqmodel 7.6.0), both directions, on CPU.

Runs where `gptqmodel` imports: `python bench/gptq_compat.py` runs this file in GPTQModel's own venv
(bench/peers/venv.py), with GPTQMODEL_CPU_WORKERS=2 and torch.compile off (GPTQModel compiles its
dequantization, minutes on CPU for nothing this checks). Elsewhere it is skipped.

What is compared. Integer codes, zero points, scales and g_idx are compared bit for bit (GPTQModel's
packer given lowbit's quantization writes lowbit's words); GPTQModel's dequantized float16 weights
must be lowbit's exact `(u - z) * s` rounded once to float16. Outputs: GPTQModel's TorchLinear
multiplies in float16, within 2**-9 * (|x| @ |W|^T + |b|) of the exact product (the weight, the
output and the bias sum each rounded once, inputs float16 already). Whole models: lowbit (float32
reference kernels) must be as close to GPTQModel's float16 forward as GPTQModel's own weights computed
in float32 are.

GPTQModel refuses to load an asymmetric checkpoint_format "gptq" (v1) file unless its meta.quantizer
names gptqmodel >= 0.9.0: AutoGPTQ's old asymmetric files lost zero points of 0 to the "- 1". lowbit
writes the "- 1" as GPTQModel does (the z = 0 case is checked below), so the whole-model test for
asymmetric weights adds GPTQModel to the quantizer list of its copy of lowbit's file; lowbit's own
writer names only itself.
"""

import copy
import json
import shutil

import pytest
import torch
from torch import nn

gptqmodel = pytest.importorskip("gptqmodel", reason="GPTQModel (gptqmodel) is not installed in this environment; "
                                "`python bench/gptq_compat.py` runs these checks in its own venv")
from gptqmodel import BACKEND, GPTQModel, QuantizeConfig  # noqa: E402
from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: E402
from gptqmodel.utils.model import (convert_gptq_v1_to_v2_format_module,  # noqa: E402
                                   convert_gptq_v2_to_v1_format_module)

import lowbit  # noqa: E402
from lowbit.formats import gptq  # noqa: E402
from lowbit.nn import WQLinear  # noqa: E402
from lowbit.quant import PerGroup, QuantSpec  # noqa: E402

from ..conftest import tiny_tokenizer  # noqa: E402

IN, OUT, G = 256, 96, 64
LAYER_CASES = [(b, sym, act) for b in (2, 3, 4, 8) for sym in (True, False) for act in (False, True)]


def case_id(bits, sym, act):
    return f"w{bits} {'sym' if sym else 'asym'}{' act-order' if act else ''}"


def lowbit_layer(bits, sym, act_order, bias=True, seed=0):
    """Random codes, scales and zero points (asymmetric ones include 0 and 2^bits - 1, the values
    v1's "- 1" and its inverse carry across fields), optionally with an act-order permutation."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (OUT, IN), generator=g)
    s = (torch.rand(OUT, IN // G, generator=g) * 0.02 + 0.005).half().float()
    spec = QuantSpec(bits=bits, symmetric=sym, granularity=PerGroup(G))
    b = torch.randn(OUT, generator=g).half().float() if bias else None
    perm = torch.randperm(IN, generator=g) if act_order else None
    if sym:
        return WQLinear.from_codes(u - 2 ** (bits - 1), s, None, spec, bias=b, perm=perm, name="layer")
    z = torch.randint(0, 2**bits, (OUT, IN // G), generator=g)
    z[::7, 0], z[1::7, -1] = 0, 2**bits - 1
    return WQLinear.from_codes(u, s, z.float(), spec, bias=b, perm=perm, name="layer")


def gptqmodel_layer(bits, sym, act_order, bias=True):
    m = TorchLinear(bits=bits, group_size=G, sym=sym, desc_act=act_order, in_features=IN, out_features=OUT,
                    bias=bias, pack_dtype=torch.int32)
    m.optimized = True  # no torch.compile of its dequantization
    return m


def fp16_inputs(seed=1, shape=(2, 7, IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half()


def bound(x, w, b):
    """2**-9 * (|x| @ |W|^T + |b|): how far GPTQModel's float16 arithmetic may be from the exact output."""
    t = x.abs().double() @ w.abs().double().t()
    return 2.0**-9 * (t + (0 if b is None else b.abs().double()))


# ---- (a) what lowbit writes, GPTQModel reads --------------------------------------------------------

@pytest.mark.parametrize("bits,sym,act_order", LAYER_CASES, ids=[case_id(*c) for c in LAYER_CASES])
def test_lowbit_layer_runs_in_gptqmodel(bits, sym, act_order, record_property):
    ours = lowbit_layer(bits, sym, act_order)
    t = gptq.gptq_tensors(ours, "layer")
    t["bias"] = t["bias"].half()
    theirs = gptqmodel_layer(bits, sym, act_order)
    theirs.load_state_dict(t, strict=True)  # names, shapes and dtypes as GPTQModel registers them
    convert_gptq_v1_to_v2_format_module(theirs, bits=bits, pack_dtype=torch.int32)  # what its loader does
    theirs.post_init()
    theirs.eval()
    w = ours.dequantize_weight()
    # (u - z) * s is exact in float32: rounding it once to float16 must give GPTQModel's weight
    assert torch.equal(theirs.dequantize_weight(), w.t().half())
    x = fp16_inputs()
    with torch.no_grad():
        y = theirs(x).double()
    exact = x.double() @ w.double().t() + ours.bias.double()
    used = float(((y - exact).abs() / bound(x, w, ours.bias)).max())
    assert used <= 1, f"GPTQModel's output is {used:.2f} of the float16 bound from the exact product"
    record_property(f"lowbit->gptqmodel layer {case_id(bits, sym, act_order)} max diff / fp16 bound", used)


@pytest.mark.parametrize("bits,sym,act_order", [c for c in LAYER_CASES if c[2] or c[0] == 3],
                         ids=[case_id(*c) for c in LAYER_CASES if c[2] or c[0] == 3])
def test_gptqmodel_packer_writes_lowbits_words(bits, sym, act_order, monkeypatch):
    """GPTQModel's own packer, given lowbit's scales, zeros and g_idx, then its v2 -> v1 conversion
    (what its save does), writes the very tensors lowbit writes."""
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")  # its Python packer; the C++ one builds with ninja
    ours = lowbit_layer(bits, sym, act_order, seed=3)
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(ours.dequantize_weight())
        lin.bias.copy_(ours.bias)
    theirs = gptqmodel_layer(bits, sym, act_order)
    theirs.pack_block(lin, ours.scales.float(), ours.zeros(), ours.g_idx())
    convert_gptq_v2_to_v1_format_module(theirs, QuantizeConfig(bits=bits))
    for k, v in gptq.gptq_tensors(ours, "layer").items():
        mine = v.half() if k == "bias" else v
        assert getattr(theirs, k).dtype == mine.dtype and torch.equal(getattr(theirs, k), mine), k


# ---- whole checkpoints ------------------------------------------------------------------------------

TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    """A tiny random Llama in float16 with a tokenizer (GPTQModel's loader wants one); layers wide
    enough for every GPTQ packing (multiples of 32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("float") / "llama"
    model.half().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def token_ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(token_ids()).logits.float()


def gptqmodel_load(path):
    return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()


def float32_reference(theirs):
    """GPTQModel's loaded model in float32, each TorchLinear replaced by a Linear holding the weight
    its own unpacking and formula give with its scales in float32 (exact): GPTQModel's model without
    float16 arithmetic."""
    ref = copy.deepcopy(theirs)
    for name, m in list(ref.named_modules()):
        if isinstance(m, TorchLinear):
            m.scales.data = m.scales.data.float()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                # the class's method: the instance's is a torch.compile wrapper bound to the original module
                lin.weight.copy_(TorchLinear.dequantize_weight(m).t())
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    return nn.Module.float(ref)  # transformers' own .float() refuses a model it loaded quantized


def compare_models(ours, theirs, record_property, tag):
    """Layer weights bit for bit (float16 rounding of lowbit's exact weight) and logits: lowbit no
    farther from GPTQModel's float16 forward than GPTQModel's own weights computed in float32."""
    y_ref = logits(float32_reference(theirs))  # first: GPTQModel's layers cache what they dequantize
    n_layers = 0
    for name, m in theirs.named_modules():
        if isinstance(m, TorchLinear):
            n_layers += 1
            mine = ours.get_submodule(name)
            assert isinstance(mine, WQLinear), name
            assert torch.equal(m.dequantize_weight(), mine.dequantize_weight().t().half()), name
    assert n_layers == 7 * TINY_LLAMA["num_hidden_layers"]
    y_theirs, y_ours = logits(theirs), logits(ours)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    own = float((y_ref - y_theirs).abs().max())
    diff = float((y_ours - y_theirs).abs().max())
    assert diff <= own * 1.05 + 1e-5
    record_property(f"{tag}: max|lowbit - gptqmodel fp32 reference|", float((y_ours - y_ref).abs().max()))
    record_property(f"{tag}: max|lowbit - gptqmodel fp16 forward|", diff)
    record_property(f"{tag}: max|gptqmodel fp32 reference - gptqmodel fp16 forward|", own)
    record_property(f"{tag}: logits max|.|", float(y_theirs.abs().max()))


def with_act_order(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, m in list(model.named_modules()):
        if isinstance(m, WQLinear):
            spec = QuantSpec(bits=m.bits, symmetric=m.symmetric, granularity=PerGroup(m.group_size))
            q = m.codes().to(torch.int32) - (2 ** (m.bits - 1) if m.symmetric else 0)
            new = WQLinear.from_codes(q, m.scales, None if m.symmetric else m.zeros(), spec, bias=m.bias,
                                      perm=torch.randperm(m.in_features, generator=g), name=name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


@pytest.mark.parametrize("bits,sym,act_order", [(4, True, True), (4, False, True), (3, True, False),
                                                (8, False, False), (2, False, True)],
                         ids=lambda v: str(v))
def test_lowbit_checkpoints_load_into_gptqmodel(float_llama, tmp_path, bits, sym, act_order, record_property,
                                                monkeypatch):
    model = lowbit.quantize(lowbit.load(float_llama), "w4a16-rtn", bits=bits, symmetric=sym, group_size=32,
                            progress=False)
    if act_order:
        model = with_act_order(model)
    out = lowbit.save(model, tmp_path / "lowbit-gptq", format="gptq", tokenizer=tiny_tokenizer())
    if not sym:  # see the module docstring: GPTQModel's provenance check for asymmetric v1 files
        for f in (out / "config.json", out / "quantize_config.json"):
            cfg = json.loads(f.read_text())
            qc = cfg.get("quantization_config", cfg)
            qc["meta"]["quantizer"].append(f"gptqmodel:{gptqmodel.__version__}")
            f.write_text(json.dumps(cfg))
    theirs = gptqmodel_load(out)
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    compare_models(lowbit.load(out), theirs, record_property, f"lowbit ckpt w{bits} sym={sym} act={act_order}")


def test_lowbits_gptq_recipe_loads_into_gptqmodel(float_llama, tmp_path, record_property, monkeypatch):
    """lowbit's own GPTQ (w4a16-gptq: act-order, asymmetric), as a user would export it."""
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))
    model = lowbit.quantize(lowbit.load(float_llama), "w4a16-gptq", calib=calib, group_size=32, progress=False)
    out = lowbit.save(model, tmp_path / "lowbit-gptq", format="gptq", tokenizer=tiny_tokenizer())
    for f in (out / "config.json", out / "quantize_config.json"):  # GPTQModel's provenance check, as above
        cfg = json.loads(f.read_text())
        (cfg.get("quantization_config", cfg))["meta"]["quantizer"].append(f"gptqmodel:{gptqmodel.__version__}")
        f.write_text(json.dumps(cfg))
    theirs = gptqmodel_load(out)
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    compare_models(lowbit.load(out), theirs, record_property, "lowbit w4a16-gptq ckpt")


# ---- (b) what GPTQModel writes, lowbit reads --------------------------------------------------------

def gptqmodel_quantize(float_dir, out_dir, bits, sym, desc_act, group_size):
    qc = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    model = GPTQModel.load(str(float_dir), qc, device="cpu")
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 256, (64,), generator=g).tolist(), "attention_mask": [1] * 64}
             for _ in range(16)]
    model.quantize(calib, batch_size=1)
    model.save(str(out_dir))
    return out_dir


GPTQMODEL_CASES = [(4, False, True, 32), (3, True, False, 64)]


@pytest.fixture(scope="module", params=GPTQMODEL_CASES, ids=lambda c: f"w{c[0]} sym={c[1]} desc_act={c[2]} g{c[3]}")
def gptqmodel_checkpoint(request, float_llama, tmp_path_factory):
    bits, sym, desc_act, group_size = request.param
    out = tmp_path_factory.mktemp("gptqmodel") / "ckpt"
    return gptqmodel_quantize(float_llama, out, bits, sym, desc_act, group_size), request.param


def test_gptqmodel_checkpoints_load_into_lowbit(gptqmodel_checkpoint, record_property, monkeypatch):
    out, (bits, sym, desc_act, group_size) = gptqmodel_checkpoint
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["desc_act"]) == ("gptq", "gptq", bits,
                                                                                          desc_act)
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    ours = lowbit.load(out)
    acts = [m.perm is not None for m in ours.modules() if isinstance(m, WQLinear)]
    assert all(acts) if desc_act else not any(acts)
    compare_models(ours, gptqmodel_load(out), record_property,
                   f"gptqmodel ckpt w{bits} sym={sym} desc_act={desc_act}")


def test_lowbit_rewrites_gptqmodels_tensors_unchanged(gptqmodel_checkpoint, tmp_path):
    """GPTQModel's checkpoint read by lowbit and saved again as GPTQ: the same packed tensors."""
    from safetensors.torch import load_file

    out, _ = gptqmodel_checkpoint
    again = lowbit.save(lowbit.load(out, dtype=None), tmp_path / "again", format="gptq")
    theirs, ours = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    packed = [k for k in theirs if k.endswith(gptq.QUANT_TENSORS)]
    assert packed and set(packed) == {k for k in ours if k.endswith(gptq.QUANT_TENSORS)}
    for k in packed:
        assert torch.equal(ours[k], theirs[k]), k
    shutil.rmtree(again)
