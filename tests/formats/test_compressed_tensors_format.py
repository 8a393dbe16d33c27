"""compressed-tensors pack-quantized checkpoints written and read by lowbit, checked against the
`compressed-tensors` package itself where it is installed: its decompressor turns lowbit's files into
exactly `WQLinear.dequantize_weight()`, and lowbit loads what the package compresses."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError, SpecError
from lowbit.nn import WQLinear
from lowbit.quant import PerGroup, QuantSpec

from ..conftest import tiny_model, tiny_tokenizer

CASES = [("w4a16-rtn", {}), ("w4a16-rtn", {"symmetric": True}), ("w3a16-rtn", {}), ("w4a16-rtn", {"bits": 2}),
         ("w8a16-rtn", {"group_size": -1}), ("w4a16-rtn", {"bits": 5, "symmetric": True})]


def quantized(model_type="llama", recipe="w4a16-rtn", dtype=torch.float32, **kw):
    model = tiny_model(model_type, dtype=dtype, **kw.pop("overrides", {}))
    return lowbit.quantize(model, recipe, progress=False, **{"group_size": 32, **kw})


def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, WQLinear)}


@pytest.mark.parametrize("recipe,kw", CASES)
def test_round_trip_gives_identical_layers_and_logits(tmp_path, recipe, kw):
    model = quantized(recipe=recipe, **kw)
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors", tokenizer=tiny_tokenizer())
    loaded = lowbit.load(out)
    assert layers(loaded).keys() == layers(model).keys()
    for n, m in layers(model).items():
        lm = loaded.get_submodule(n)
        assert (lm.bits, lm.group_size, lm.symmetric) == (m.bits, m.group_size, m.symmetric)
        assert torch.equal(lm.qweight, m.qweight) and torch.equal(lm.scales, m.scales)
        assert (m.qzeros is None) or torch.equal(lm.qzeros, m.qzeros)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.lowbit_tokenizer is not None


def test_files_are_what_the_package_writes(tmp_path):
    model = quantized("qwen2")  # q/k/v carry a bias
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
            "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32,
                        "dynamic": False}}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "quantization_status": "compressed",
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}
    assert cfg["torch_dtype"] == "float32" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    for n, m in layers(model).items():
        i, o = m.in_features, m.out_features
        assert meta[f"{n}.weight_packed"] == ("I32", [o, i * 4 // 32])
        assert meta[f"{n}.weight_scale"] == ("F32", [o, i // 32])
        assert meta[f"{n}.weight_zero_point"] == ("I32", [o * 4 // 32, i // 32])
        assert meta[f"{n}.weight_shape"] == ("I64", [2])
        assert f"{n}.weight" not in meta and (f"{n}.bias" in meta) == (m.bias is not None)
    sd = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert sd[f"{q}.weight_shape"].tolist() == [64, 64]
    assert torch.equal(sd[f"{q}.weight_scale"], model.get_submodule(q).scales.float())


def test_symmetric_per_channel_and_float16_model(tmp_path):
    model = quantized(recipe="w8a16-rtn", group_size=-1, dtype=torch.float16)
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["group_size"], w["symmetric"], w["num_bits"]) == ("channel", None, True, 8)
    assert cfg["torch_dtype"] == "float16"
    sd = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight_zero_point" not in sd and sd[f"{q}.weight_scale"].shape == (64, 1)
    assert sd[f"{q}.weight_scale"].dtype == sd["model.norm.weight"].dtype == torch.float16


def test_mixed_schemes_get_a_group_each_targeting_their_layers(tmp_path):
    model = quantized()
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerGroup(64))
    model.model.layers[1].mlp.down_proj = WQLinear.from_weight(torch.randn(64, 128), None, spec)
    ref = logits(model)
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2 and groups["group_1"]["targets"] == ["model.layers.1.mlp.down_proj"]
    assert groups["group_1"]["weights"]["num_bits"] == 8 and len(groups["group_0"]["targets"]) == 13
    torch.testing.assert_close(logits(lowbit.load(out)), ref, rtol=0, atol=0)


def test_awq_and_gptq_checkpoints_rewritten_as_compressed_tensors(tmp_path):
    for fmt in ("awq", "gptq"):
        src = lowbit.load(lowbit.save(quantized(), tmp_path / fmt, format=fmt))
        again = lowbit.load(lowbit.save(src, tmp_path / f"{fmt}-ct", format="compressed-tensors"))
        torch.testing.assert_close(logits(again), logits(src), rtol=0, atol=0)


def test_act_order_codebook_and_conv1d_layers_are_refused(tmp_path):
    model = quantized()
    m = model.model.layers[0].self_attn.q_proj
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    model.model.layers[0].self_attn.q_proj = WQLinear.from_codes(m.codes(), m.scales, m.zeros(), spec,
                                                                 perm=torch.randperm(64))
    with pytest.raises(SpecError, match="q_proj: compressed-tensors has no act-order.*GPTQ or lowbit format"):
        lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    model.model.layers[0].self_attn.q_proj = WQLinear.from_weight(
        torch.randn(64, 64), None, QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(32)))
    with pytest.raises(SpecError, match="q_proj: compressed-tensors' pack-quantized holds integer codes.*codebook"):
        lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    with pytest.raises(SpecError, match="h.0.attn.c_attn: a GPT-2-style Conv1D"):
        lowbit.save(quantized("gpt2"), tmp_path / "q", format="compressed-tensors")
    with pytest.raises(SpecError, match="no quantized linear layers"):
        lowbit.save(tiny_model(), tmp_path / "q", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


# ---- reading ----------------------------------------------------------------------------------------

@pytest.fixture
def ct_dir(tmp_path):
    model = quantized()
    return lowbit.save(model, tmp_path / "q", format="compressed-tensors"), model


def rewrite_config(path, change, group=None):
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    (qc["config_groups"]["group_0"] if group == "group" else
     qc["config_groups"]["group_0"]["weights"] if group == "weights" else qc).update(change)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,where,match", [
    ({"format": "int-quantized"}, None, "int-quantized weights other than 8-bit symmetric int are not supported"),
    ({"format": "float-quantized"}, "group", "format 'float-quantized' is not supported"),
    ({"input_activations": {"num_bits": 8}}, "group", "input_activations are quantized"),
    ({"kv_cache_scheme": {"num_bits": 8}}, None, "a quantized KV cache"),
    ({"transform_config": {"config_groups": {"u": {}}}}, None, "transforms"),
    ({"type": "float"}, "weights", "float weights are not supported"),
    ({"strategy": "tensor", "group_size": None}, "weights", "strategy 'tensor' is not supported"),
    ({"num_bits": 1}, "weights", "1-bit weights"),
    ({"group_size": 64}, "weights", r"down_proj: weight_scale has shape \(64, 4\).*group size 64 has \(64, 2\)"),
    ({"symmetric": True}, "weights", "down_proj: weight_zero_point holds nonzero values, but the scheme is symmetric"),
    ({"targets": ["Embedding"]}, "group", "down_proj has a .weight_packed, but no config group targets it"),
])
def test_configs_lowbit_cannot_honour_are_refused(ct_dir, change, where, match):
    out, _ = ct_dir
    rewrite_config(out, change, where)
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(out)


def test_wrong_tensors_are_refused(ct_dir):
    out, _ = ct_dir
    f = out / "model.safetensors"
    sd = load_file(f)
    q = "model.layers.0.self_attn.q_proj"
    bad = dict(sd)
    bad[f"{q}.weight_shape"] = torch.tensor([64, 63])
    save_file(bad, f)
    with pytest.raises(CheckpointError, match=r"q_proj: weight_shape says \[64, 63\]"):
        lowbit.load(out)
    bad = dict(sd)
    bad[f"{q}.weight_scale"] = sd[f"{q}.weight_scale"] * 1e6
    save_file(bad, f)
    with pytest.raises(CheckpointError, match="q_proj: weight_scale beyond float16's range"):
        lowbit.load(out)
    save_file({k: v for k, v in sd.items() if k != f"{q}.weight_zero_point"}, f)
    with pytest.raises(CheckpointError, match="q_proj: missing tensor weight_zero_point"):
        lowbit.load(out)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        lowbit.load(out)


def test_legacy_g_idx_becomes_act_order(ct_dir):
    """Checkpoints from before the package dropped actorder "group" carry weight_g_idx."""
    out, model = ct_dir
    sd = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int32) // 32
    sd[f"{q}.weight_g_idx"] = g_idx
    save_file(sd, out / "model.safetensors")
    rewrite_config(out, {"actorder": "group"}, "weights")
    m = lowbit.load(out).get_submodule(q)
    ref = model.get_submodule(q)
    assert m.perm is not None and torch.equal(m.g_idx(), g_idx)
    expect = (ref.codes().float() - ref.zeros()[:, g_idx.long()]) * ref.scales.float()[:, g_idx.long()]
    assert torch.equal(m.dequantize_weight(), expect)


# ---- against the compressed-tensors package ---------------------------------------------------------

@pytest.fixture
def package():
    return pytest.importorskip("compressed_tensors", reason="the compressed-tensors package is not installed "
                               "(pip install compressed-tensors; it is in the [test] extra)")


@pytest.mark.parametrize("recipe,kw", CASES)
def test_package_decompresses_lowbit_files_to_dequantize_weight(package, tmp_path, recipe, kw):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    model = quantized(recipe=recipe, **kw)
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    # parses the config with the package's own schema, matches targets and ignore, decompresses
    # every layer with PackedQuantizationCompressor, and checks no quantization tensor is left over
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(load_file(out / "model.safetensors"))
    for n, m in layers(model).items():
        # float32 scales and integer codes: (u - z) * s is exact in float32 on both sides
        assert torch.equal(dense[f"{n}.weight"], m.dequantize_weight()), n


def test_transformers_loads_lowbit_files_through_the_package(package, tmp_path, monkeypatch):
    """The whole model as transformers builds it from the file (CompressedTensorsHfQuantizer, which
    decompresses on the first forward). Symmetric only: transformers 5.23 with compressed-tensors
    0.20 refuses asymmetric pack-quantized files, the package's own included (weight_zero_point
    shape mismatch on load)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")  # lowbit's float32 path
    model = quantized(recipe="w4a16-rtn", symmetric=True)
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)
    for n, m in layers(model).items():
        assert torch.equal(theirs.get_submodule(n).weight, m.dequantize_weight()), n


def package_checkpoint(path, bits, symmetric, group_size, dtype=torch.float16):
    """A tiny llama quantized (min-max) and compressed by the package itself, the way llm-compressor
    saves: apply the config, compute qparams, compress, save_pretrained, update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama", dtype=dtype)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, dynamic=False,
                            strategy="group" if group_size > 0 else "channel",
                            group_size=group_size if group_size > 0 else None)
    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                             ignore=["lm_head"])
    apply_quantization_config(model, cfg, show_progress=False)
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            w = m.weight.data
            wg = w.reshape(w.shape[0], -1, group_size if group_size > 0 else w.shape[1])
            s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            m.weight_scale.data.copy_(s.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(z.reshape(m.weight_zero_point.shape))
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


@pytest.mark.parametrize("bits,symmetric,group_size", [(4, False, 32), (4, True, 32), (3, True, -1), (8, False, -1),
                                                       (2, False, 16), (6, True, 64)])
def test_lowbit_loads_what_the_package_compresses(package, tmp_path, bits, symmetric, group_size):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    out = package_checkpoint(tmp_path / "ct", bits, symmetric, group_size)
    theirs = CompressedTensorsDequantizer(out, dtype=torch.float16).process(load_file(out / "model.safetensors"))
    ours = lowbit.load(out)
    qlayers = layers(ours)
    assert len(qlayers) == 14
    for n, m in qlayers.items():
        assert (m.bits, m.symmetric) == (bits, symmetric)
        # the package dequantizes in the scales' float16: lowbit's exact value, rounded once
        assert torch.equal(m.dequantize_weight().half(), theirs[f"{n}.weight"]), n
    assert torch.equal(ours.lm_head.weight.half(), theirs["lm_head.weight"])


def test_float32_scales_are_rounded_to_float16(package, tmp_path):
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    out = package_checkpoint(tmp_path / "ct", 4, False, 32, dtype=torch.float32)
    theirs = CompressedTensorsDequantizer(out, dtype=torch.float32).process(load_file(out / "model.safetensors"))
    for n, m in layers(lowbit.load(out)).items():
        w = theirs[f"{n}.weight"]
        assert ((m.dequantize_weight() - w).abs() <= 2.0**-11 * w.abs()).all(), n
