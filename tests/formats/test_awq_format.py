"""AutoAWQ checkpoints written and read by lowbit: the files AutoAWQ expects, a round trip that changes
nothing but the float16 storage of the unquantized tensors, and refusal of what the format cannot hold."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError, InvalidWeightsError, OutputExistsError, SpecError
from lowbit.nn import AWQLinear, AWQLinearGEMM, AWQLinearGEMV, WQLinear

from ..conftest import tiny_model, tiny_tokenizer

VERSIONS = {"gemm": AWQLinearGEMM, "gemv": AWQLinearGEMV}


def quantized(model_type="llama", group_size=32, recipe="w4a16-rtn", fp16_exact=False, **kw):
    model = tiny_model(model_type, **kw.pop("overrides", {}))
    if fp16_exact:  # float tensors the checkpoint's float16 holds exactly
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return lowbit.quantize(model, recipe, group_size=group_size, progress=False, **kw)


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def wqlinear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, WQLinear)}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("model_type,group_size", [("llama", 32), ("llama", -1), ("qwen2", 64), ("gpt2", 32)])
def test_round_trip_gives_identical_logits(tmp_path, version, model_type, group_size):
    # float tensors that float16 holds exactly, so the file loses nothing: identical logits
    model = quantized(model_type, group_size, fp16_exact=True)
    ref = logits(model)
    out = lowbit.save(model, tmp_path / "q", format="awq", version=version, tokenizer=tiny_tokenizer())
    loaded = lowbit.load(out)
    layers = {n for n, m in loaded.named_modules() if isinstance(m, AWQLinear)}
    assert layers == wqlinear_names(model)
    assert all(type(loaded.get_submodule(n)) is VERSIONS[version] for n in layers)
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)
    assert loaded.lowbit_tokenizer is not None


@pytest.mark.parametrize("version", VERSIONS)
def test_float16_storage_is_the_only_change(tmp_path, version):
    model = quantized()
    out = lowbit.save(model, tmp_path / "q", format="awq", version=version)
    loaded = lowbit.load(out)
    # what the file does to the model: its float tensors rounded to float16
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(p.half().float())
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_files_are_what_autoawq_writes(tmp_path, version):
    model = quantized("qwen2", 32)  # q/k/v carry a bias
    qnames = wqlinear_names(model)
    out = lowbit.save(model, tmp_path / "q", format="awq", version=version, tokenizer=tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "version": version, "bits": 4, "group_size": 32,
                                          "zero_point": True, "modules_to_not_convert": None}
    assert cfg["torch_dtype"] == "float16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".q.tmp-*"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    for n in qnames:
        m = model.get_submodule(n)
        assert {f"{n}.qweight", f"{n}.qzeros", f"{n}.scales"} <= keys and f"{n}.weight" not in keys
        assert dtypes[f"{n}.qweight"] == dtypes[f"{n}.qzeros"] == "I32" and dtypes[f"{n}.scales"] == "F16"
        assert (f"{n}.bias" in keys) == (m.bias is not None)
    assert any(f"{n}.bias" in keys for n in qnames)
    floats = {k: d for k, d in dtypes.items() if not k.endswith((".qweight", ".qzeros"))}
    assert floats and set(floats.values()) == {"F16"}


def test_lowbit_checkpoint_of_an_awq_model_converts_losslessly(tmp_path):
    loaded = lowbit.load(lowbit.save(quantized(), tmp_path / "awq", format="awq", version="gemv"))
    ref = logits(loaded)
    native = lowbit.load(lowbit.save(loaded, tmp_path / "lowbit"))
    assert wqlinear_names(native) and not any(isinstance(m, AWQLinear) for m in native.modules())
    torch.testing.assert_close(logits(native), ref, rtol=0, atol=0)
    assert any(isinstance(m, AWQLinearGEMV) for m in loaded.modules())  # the saved model is left as it was
    # and back to AWQ in the other layout
    gemm = lowbit.load(lowbit.save(native, tmp_path / "gemm", format="awq", version="gemm"))
    torch.testing.assert_close(logits(gemm), ref, rtol=0, atol=0)


def test_per_channel_layers_of_different_widths_write_group_size_minus_one(tmp_path):
    model = quantized(group_size=-1)  # in_features 64 and 128: one group each
    out = lowbit.save(model, tmp_path / "q", format="awq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1


def test_float_linears_are_listed_as_not_converted(tmp_path):
    model = quantized(fp16_exact=True)
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    with torch.no_grad():  # put a float Linear back in one place
        lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        lin.weight.copy_(layer.dequantize_weight().half().float())
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, lin)
    ref = logits(model)
    out = lowbit.save(model, tmp_path / "q", format="awq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == [name]
    loaded = lowbit.load(out)
    assert type(loaded.get_submodule(name)) is torch.nn.Linear
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=0)


@pytest.mark.parametrize("recipe,kw,what", [
    ("w3a16-rtn", {}, "3-bit"),
    ("w8a16-rtn", {"group_size": -1}, "8-bit"),
    ("w4a16-rtn", {"symmetric": True}, "symmetric"),
])
def test_models_autoawq_cannot_hold_are_refused_before_writing(tmp_path, recipe, kw, what):
    model = quantized(recipe=recipe, **{"group_size": 32, **kw})
    with pytest.raises(SpecError, match=f"layer model.layers.0.self_attn.q_proj: .*{what}"):
        lowbit.save(model, tmp_path / "q", format="awq")
    assert list(tmp_path.iterdir()) == []


def test_out_features_not_a_multiple_of_8_is_refused(tmp_path):
    model = quantized(group_size=-1, overrides={"intermediate_size": 100})
    with pytest.raises(SpecError, match="gate_proj: out_features=100 is not a multiple of 8"):
        lowbit.save(model, tmp_path / "q", format="awq")
    assert list(tmp_path.iterdir()) == []


def test_gemv_group_size_autoawq_lacks_is_refused(tmp_path):
    model = quantized(group_size=16)
    lowbit.save(model, tmp_path / "gemm", format="awq", version="gemm")  # any group size
    with pytest.raises(SpecError, match="GEMV layout takes group sizes 32, 64 or >= 128, got 16"):
        lowbit.save(model, tmp_path / "gemv", format="awq", version="gemv")
    assert not (tmp_path / "gemv").exists()


def test_unquantized_model_and_unknown_version_are_refused(tmp_path):
    with pytest.raises(SpecError, match="no quantized linear layers"):
        lowbit.save(tiny_model(), tmp_path / "q", format="awq")
    with pytest.raises(SpecError, match="'marlin'"):
        lowbit.save(quantized(), tmp_path / "q", format="awq", version="marlin")
    with pytest.raises(CheckpointError, match="format='awq' only"):
        lowbit.save(quantized(), tmp_path / "q", version="gemv")
    assert list(tmp_path.iterdir()) == []


def test_float_tensor_beyond_float16_is_refused(tmp_path):
    model = quantized()
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6
    with pytest.raises(InvalidWeightsError, match="model.norm.weight.*float16"):
        lowbit.save(model, tmp_path / "q", format="awq")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_partial_output_and_existing_output_is_kept(tmp_path, monkeypatch):
    from lowbit.formats import native

    model = quantized()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        lowbit.save(model, tmp_path / "q", format="awq")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(native, "save_file", boom)  # every format writes through native.write_checkpoint
    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save(model, tmp_path / "q", format="awq", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and (tmp_path / "q" / "keep.txt").read_text() == "mine"


# ---- reading ----------------------------------------------------------------------------------------

@pytest.fixture
def awq_dir(tmp_path):
    model = quantized(fp16_exact=True)
    out = lowbit.save(model, tmp_path / "q", format="awq", version="gemm")
    return out, logits(model)


def rewrite_config(path, qc, key="quantization_config"):
    cfg = json.loads((path / "config.json").read_text())
    if qc is None:
        cfg.pop(key)
    else:
        cfg[key] = qc
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("where", ["config.json", "quant_config.json"])
def test_legacy_autoawq_config_keys_are_read(awq_dir, where):
    out, ref = awq_dir
    legacy = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    if where == "config.json":
        rewrite_config(out, legacy)
    else:
        rewrite_config(out, None)
        (out / "quant_config.json").write_text(json.dumps(legacy))
    torch.testing.assert_close(logits(lowbit.load(out)), ref, rtol=0, atol=0)


def test_float16_load_keeps_the_checkpoint_dtype(awq_dir):
    out, _ = awq_dir
    model = lowbit.load(out, dtype=None)
    assert model.model.embed_tokens.weight.dtype == torch.float16


@pytest.mark.parametrize("change,match", [
    ({"version": "marlin"}, "version 'marlin' is not supported"),
    ({"bits": 8}, "8-bit AWQ"),
    ({"zero_point": False}, "zero_point=false"),
    ({"group_size": 64}, r"qzeros has shape \(4, 8\), GEMM layer with group size 64 expects \(2, 8\)"),
    ({"group_size": 48}, "down_proj: group size 48 does not divide in_features 128"),
    ({"group_size": 0}, "group_size must be a positive integer or -1, got 0"),
])
def test_configs_lowbit_cannot_honour_are_refused(awq_dir, change, match):
    out, _ = awq_dir
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    rewrite_config(out, {**qc, **change})
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(out)


def test_truncated_file_is_refused(awq_dir):
    out, _ = awq_dir
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        lowbit.load(out)


def test_corrupt_header_is_refused(awq_dir):
    out, _ = awq_dir
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"x" * 32  # inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        lowbit.load(out)


def test_wrong_tensors_are_refused(awq_dir):
    out, _ = awq_dir
    f = out / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.self_attn.q_proj"
    bad = dict(sd)
    bad[f"{name}.qweight"] = sd[f"{name}.qweight"].to(torch.int64)
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="q_proj.qweight is torch.int64"):
        lowbit.load(out)
    bad = dict(sd)
    bad["model.layers.0.mlp.act_fn.scales"] = torch.ones(128, dtype=torch.float16)
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="act_fn.scales.*ScaledActivation"):
        lowbit.load(out)
    bad = {k: v for k, v in sd.items() if k != f"{name}.qzeros"}
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="missing tensors.*q_proj.qzeros"):
        lowbit.load(out)
    bad = dict(sd)
    bad["model.embed_tokens.qweight"] = sd[f"{name}.qweight"].clone()
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="embed_tokens, which is not a linear layer"):
        lowbit.load(out)
