"""GPTQ (v1) checkpoints written and read by lowbit: the files GPTQModel writes, round trips that change
nothing but the float16 storage of the unquantized tensors, act-order, and refusal of what the format
cannot hold."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError, InvalidWeightsError, OutputExistsError, SpecError
from lowbit.formats import gptq, native
from lowbit.nn import WQLinear
from lowbit.quant import PerGroup, QuantSpec

from ..conftest import tiny_model, tiny_tokenizer


def quantized(model_type="llama", group_size=32, recipe="w4a16-rtn", fp16_exact=True, **kw):
    model = tiny_model(model_type, **kw.pop("overrides", {}))
    if fp16_exact:  # float tensors the checkpoint's float16 holds exactly
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return lowbit.quantize(model, recipe, group_size=group_size, progress=False, **kw)


def with_act_order(model, seed=0):
    """Each WQLinear re-stored with a random act-order permutation (same codes, different inputs)."""
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


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, WQLinear)}


@pytest.mark.parametrize("recipe,kw", [
    ("w4a16-rtn", {}), ("w4a16-rtn", {"symmetric": True}), ("w3a16-rtn", {}), ("w3a16-rtn", {"symmetric": True}),
    ("w8a16-rtn", {"group_size": -1}), ("w4a16-rtn", {"bits": 2}),
])
def test_round_trip_gives_identical_layers_and_logits(tmp_path, recipe, kw):
    model = quantized(recipe=recipe, **{"group_size": 32, **kw})
    out = lowbit.save(model, tmp_path / "q", format="gptq", tokenizer=tiny_tokenizer())
    loaded = lowbit.load(out)
    assert layers(loaded).keys() == layers(model).keys()
    for n, m in layers(model).items():
        lm = loaded.get_submodule(n)
        assert (lm.bits, lm.group_size, lm.symmetric, lm.perm) == (m.bits, m.group_size, m.symmetric, None)
        assert torch.equal(lm.qweight, m.qweight) and torch.equal(lm.scales, m.scales)
        assert (m.qzeros is None) or torch.equal(lm.qzeros, m.qzeros)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.lowbit_tokenizer is not None


def test_act_order_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")  # float32 throughout: only the summation order differs
    model = with_act_order(quantized())
    out = lowbit.save(model, tmp_path / "q", format="gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    sd = load_file(out / "model.safetensors")
    loaded = lowbit.load(out)
    for n, m in layers(model).items():
        lm = loaded.get_submodule(n)
        assert torch.equal(sd[f"{n}.g_idx"], m.g_idx())
        assert lm.perm is not None and torch.equal(lm.g_idx(), m.g_idx())
        # within a group the order is the file's (ascending inputs): the same weight, bit for bit
        assert torch.equal(lm.dequantize_weight(), m.dequantize_weight())
    # summation order within groups may differ from the original perm's
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-4, atol=1e-4)
    # and back: the same tensors
    again = lowbit.save(loaded, tmp_path / "again", format="gptq")
    sd2 = load_file(again / "model.safetensors")
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_lowbits_gptq_recipe_round_trips(tmp_path, monkeypatch):
    """What the format is for: lowbit's GPTQ (act-order, asymmetric) written and read back."""
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # what the file's float16 holds
    model = lowbit.quantize(model, "w4a16-gptq", calib=calib, group_size=32, progress=False)
    assert all(m.perm is not None for m in layers(model).values())
    out = lowbit.save(model, tmp_path / "q", format="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["desc_act"], qc["sym"], qc["meta"]["damp_percent"], qc["meta"]["true_sequential"]) == (
        True, False, 0.01, True)
    loaded = lowbit.load(out)
    for n, m in layers(model).items():
        assert torch.equal(loaded.get_submodule(n).dequantize_weight(), m.dequantize_weight())
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-4, atol=1e-4)


def test_act_order_layer_through_lowbits_own_format_and_back(tmp_path):
    model = with_act_order(quantized("qwen2"))  # q/k/v carry a bias
    native = lowbit.load(lowbit.save(lowbit.load(lowbit.save(model, tmp_path / "g", format="gptq")), tmp_path / "n"))
    for n, m in layers(model).items():
        assert torch.equal(native.get_submodule(n).dequantize_weight(), m.dequantize_weight())


def test_files_are_what_gptqmodel_writes(tmp_path):
    model = quantized("qwen2", recipe="w4a16-rtn", symmetric=True)
    out = lowbit.save(model, tmp_path / "q", format="gptq", tokenizer=tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format",
                               "format", "pack_dtype", "lm_head")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": False}
    assert qc["meta"]["quantizer"] == [f"lowbit:{lowbit.__version__}"] and "dynamic" not in qc
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    assert cfg["torch_dtype"] == "float16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in keys}
    for n, m in layers(model).items():
        i, o = m.in_features, m.out_features
        assert meta[f"{n}.qweight"] == ("I32", [i * 4 // 32, o])
        assert meta[f"{n}.qzeros"] == ("I32", [i // 32, o * 4 // 32])
        assert meta[f"{n}.scales"] == ("F16", [i // 32, o])
        assert meta[f"{n}.g_idx"] == ("I32", [i])
        assert f"{n}.weight" not in keys and (f"{n}.bias" in keys) == (m.bias is not None)
    sd = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert (sd[f"{q}.qzeros"] == 0x77777777).all()  # symmetric 4-bit: z = 8 stored as 7
    assert torch.equal(sd[f"{q}.g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    floats = {k: d for k, (d, _) in meta.items() if not k.endswith((".qweight", ".qzeros", ".g_idx"))}
    assert set(floats.values()) == {"F16"}


def test_qweight_and_qzeros_words_by_hand():
    """4-bit: input row 8r + j of W^T in nibble j of qweight row r; v1 qzeros hold z - 1."""
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (8, 32), generator=g)
    z = torch.randint(1, 16, (8, 2), generator=g)
    m = WQLinear.from_codes(u, torch.rand(8, 2, generator=g) + 0.5, z.float(), spec)
    t = gptq.gptq_tensors(m)
    word = int(t["qweight"][1, 3]) & 0xFFFFFFFF
    assert [(word >> 4 * j) & 15 for j in range(8)] == u[3, 8:16].tolist()
    zword = int(t["qzeros"][1, 0]) & 0xFFFFFFFF
    assert [(zword >> 4 * j) & 15 for j in range(8)] == (z[:, 1] - 1).tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_point_zero_survives_the_v1_offset(bits):
    """z = 0 is stored as GPTQModel stores it (borrowing from the next value at 2/4/8 bits) and read back."""
    z = torch.randint(0, 2**bits, (3, 64), generator=torch.Generator().manual_seed(bits))
    z[:, ::5] = 0
    assert torch.equal(gptq.unpack_zeros(gptq.pack_zeros(z, bits), bits, 64), z)
    assert torch.equal(gptq.unpack_zeros(gptq.pack_zeros(z, bits, v1=False), bits, 64, v1=False), z)


def test_layers_left_in_float_are_listed_as_dynamic_exclusions(tmp_path):
    model = quantized()
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    with torch.no_grad():
        lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        lin.weight.copy_(layer.dequantize_weight().half().float())
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, lin)
    out = lowbit.save(model, tmp_path / "q", format="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    assert gptq.GPTQConfig.from_dict(qc).module_settings(name) is None
    loaded = lowbit.load(out)
    assert type(loaded.get_submodule(name)) is torch.nn.Linear
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_awq_checkpoint_rewritten_as_gptq(tmp_path):
    awq = lowbit.load(lowbit.save(quantized(), tmp_path / "awq", format="awq"))
    loaded = lowbit.load(lowbit.save(awq, tmp_path / "gptq", format="gptq"))
    torch.testing.assert_close(logits(loaded), logits(awq), rtol=0, atol=0)


@pytest.mark.parametrize("recipe,kw,match", [
    ("w4a16-rtn", {"bits": 5}, "5-bit"),
    ("w4a16-rtn", {"bits": 3, "group_size": 16, "overrides": {"intermediate_size": 80}},
     r"gate_proj: out_features=80 times 3 bits is not a whole number of int32 words.*multiple of 32"),
])
def test_layers_gptq_cannot_hold_are_refused_before_writing(tmp_path, recipe, kw, match):
    model = quantized(recipe=recipe, **{"group_size": 32, **kw})
    with pytest.raises(SpecError, match=match):
        lowbit.save(model, tmp_path / "q", format="gptq")
    assert list(tmp_path.iterdir()) == []


def test_codebook_and_mixed_group_sizes_are_refused(tmp_path):
    model = quantized()
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    model.model.layers[0].mlp.up_proj = WQLinear.from_weight(torch.randn(128, 64), None, spec)
    with pytest.raises(SpecError, match=r"one group size, this model mixes \[16, 32\]"):
        lowbit.save(model, tmp_path / "q", format="gptq")
    model = quantized()
    nf4 = QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(32))
    model.model.layers[0].self_attn.q_proj = WQLinear.from_weight(torch.randn(64, 64), None, nf4)
    with pytest.raises(SpecError, match="q_proj: GPTQ checkpoints hold integer codes.*codebook"):
        lowbit.save(model, tmp_path / "q", format="gptq")
    assert list(tmp_path.iterdir()) == []


def test_unquantized_model_and_version_are_refused(tmp_path):
    with pytest.raises(SpecError, match="no quantized linear layers"):
        lowbit.save(tiny_model(), tmp_path / "q", format="gptq")
    with pytest.raises(CheckpointError, match="format='awq' only"):
        lowbit.save(quantized(), tmp_path / "q", format="gptq", version="v2")
    assert list(tmp_path.iterdir()) == []


def test_float_tensor_beyond_float16_is_refused(tmp_path):
    model = quantized()
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6
    with pytest.raises(InvalidWeightsError, match="model.norm.weight.*float16.*GPTQ"):
        lowbit.save(model, tmp_path / "q", format="gptq")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_existing_output(tmp_path, monkeypatch):
    model = quantized()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        lowbit.save(model, tmp_path / "q", format="gptq")
    monkeypatch.setattr(native, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save(model, tmp_path / "q", format="gptq", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and (tmp_path / "q" / "keep.txt").read_text() == "mine"


# ---- reading ----------------------------------------------------------------------------------------

@pytest.fixture
def gptq_dir(tmp_path):
    model = quantized()
    return lowbit.save(model, tmp_path / "q", format="gptq"), model


def rewrite_config(path, change):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(cfg))


def test_quantize_config_json_alone_is_read(gptq_dir):
    """AutoGPTQ's checkpoints carry their settings in quantize_config.json only."""
    out, model = gptq_dir
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": False,
                                                          "sym": False, "damp_percent": 0.01}))
    torch.testing.assert_close(logits(lowbit.load(out)), logits(model), rtol=0, atol=0)


def test_gptq_v2_zeros_are_read_without_the_offset(gptq_dir):
    out, model = gptq_dir
    sd = load_file(out / "model.safetensors")
    for n, m in layers(model).items():
        sd[f"{n}.qzeros"] = gptq.pack_zeros(m.zeros().round().long().t(), 4, v1=False)
    save_file(sd, out / "model.safetensors")
    rewrite_config(out, {"checkpoint_format": "gptq_v2", "format": "gptq_v2"})
    torch.testing.assert_close(logits(lowbit.load(out)), logits(model), rtol=0, atol=0)


def test_dynamic_per_module_bits_are_read(tmp_path):
    model = quantized()
    name = "model.layers.0.mlp.down_proj"
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerGroup(32))
    model.model.layers[0].mlp.down_proj = WQLinear.from_weight(torch.randn(64, 128), None, spec)
    ref = logits(model)
    tensors = gptq.gptq_tensors(model.get_submodule(name))
    model.model.layers[0].mlp.down_proj = WQLinear.from_weight(torch.randn(64, 128), None,
                                                               QuantSpec(bits=4, granularity=PerGroup(32)))
    out = lowbit.save(model, tmp_path / "q", format="gptq")
    sd = load_file(out / "model.safetensors")
    sd.update({f"{name}.{k}": v for k, v in tensors.items()})
    save_file(sd, out / "model.safetensors")
    rewrite_config(out, {"dynamic": {r"+:.*down_proj$": {"bits": 2}, r"+:^model\.layers\.0\.mlp\.": {"bits": 8}}})
    with pytest.raises(CheckpointError, match=r"down_proj: qweight has shape \(32, 64\), a 2-bit layer"):
        lowbit.load(out)
    rewrite_config(out, {"dynamic": {r"+:^model\.layers\.0\.mlp\.down": {"bits": 8}}})
    torch.testing.assert_close(logits(lowbit.load(out)), ref, rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"bits": 5}, "5-bit GPTQ"),
    ({"group_size": 0}, "group_size must be a positive integer or -1, got 0"),
    ({"group_size": 48}, "down_proj: group size 48 does not divide in_features 128"),
    ({"group_size": 64}, r"qzeros has shape \(4, 8\).*group size 64 has \(2, 8\)"),
    ({"pack_dtype": "int16"}, "pack_dtype 'int16'"),
])
def test_configs_lowbit_cannot_honour_are_refused(gptq_dir, change, match):
    out, _ = gptq_dir
    rewrite_config(out, {**change, **({"format": change["checkpoint_format"]} if "checkpoint_format" in change else {})})
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(out)


def test_g_idx_with_unequal_groups_is_refused(gptq_dir):
    out, _ = gptq_dir
    sd = load_file(out / "model.safetensors")
    g = sd["model.layers.0.self_attn.q_proj.g_idx"]
    g[0] = 1  # group 0 holds 31 inputs, group 1 holds 33
    save_file(sd, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj: g_idx puts 31 inputs in group 0; each group must hold "
                                              "group_size=32"):
        lowbit.load(out)
    g[0] = 7
    save_file(sd, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="g_idx holds group 7, outside the 2 groups"):
        lowbit.load(out)


def test_permuted_g_idx_becomes_act_order(gptq_dir):
    """A g_idx GPTQModel would write with desc_act: each group G inputs, in any order."""
    out, model = gptq_dir
    sd = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int32) // 32
    sd[f"{name}.g_idx"] = g_idx
    save_file(sd, out / "model.safetensors")
    m = lowbit.load(out).get_submodule(name)
    assert m.perm is not None and torch.equal(m.g_idx(), g_idx)
    ref = model.get_submodule(name)  # the same codes; group of input k is now g_idx[k]
    u = ref.codes().float()
    s = ref.scales.float()[:, g_idx.long()]
    z = ref.zeros()[:, g_idx.long()]
    assert torch.equal(m.dequantize_weight(), (u - z) * s)


def test_truncated_file_is_refused(gptq_dir):
    out, _ = gptq_dir
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        lowbit.load(out)


def test_wrong_tensors_are_refused(gptq_dir):
    out, _ = gptq_dir
    f = out / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.self_attn.q_proj"
    bad = dict(sd)
    bad[f"{name}.qweight"] = sd[f"{name}.qweight"].to(torch.int64)
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="q_proj: qweight is torch.int64, GPTQ stores int32"):
        lowbit.load(out)
    save_file({k: v for k, v in sd.items() if k != f"{name}.scales"}, f)
    with pytest.raises(CheckpointError, match="q_proj: missing tensor scales"):
        lowbit.load(out)
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, f)
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.norm.weight'\]"):
        lowbit.load(out)
    bad = dict(sd)
    bad["model.embed_tokens.qweight"] = sd[f"{name}.qweight"].clone()
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="embed_tokens, which is not a linear layer"):
        lowbit.load(out)
    bad = dict(sd)
    bad["model.layers.0.mlp.act_fn.scales"] = torch.ones(3)
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.mlp.act_fn.scales"):
        lowbit.load(out)
