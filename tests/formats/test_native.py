"""lowbit's own checkpoint: exact round trip, atomic writes, refusal of bad files."""

import json
import pickle

import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError, OutputExistsError
from lowbit.nn import WQLinear

from ..conftest import tiny_model, tiny_tokenizer


def quantized(model_type="llama", recipe="w4a16-rtn", **kw):
    model = tiny_model(model_type)
    return lowbit.quantize(model, recipe, group_size=kw.pop("group_size", 32), progress=False, **kw)


@pytest.mark.parametrize("model_type,recipe", [("llama", "w4a16-rtn"), ("gemma3_text", "w3a16-rtn"),
                                               ("gpt2", "w8a16-rtn"), ("qwen2", "w4a16-rtn")])
def test_round_trip_gives_identical_logits(tmp_path, model_type, recipe):
    model = quantized(model_type, recipe, group_size=-1 if recipe == "w8a16-rtn" else 32)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    out = lowbit.save(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lowbit" and len(cfg["modules"]) > 0
    assert (out / "tokenizer.json").exists()
    loaded = lowbit.load(out)
    assert sum(isinstance(m, WQLinear) for m in loaded.modules()) == len(cfg["modules"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = quantized()
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists"):
        lowbit.save(model, tmp_path / "q")
    assert (tmp_path / "q" / "keep.txt").read_text() == "mine"
    lowbit.save(model, tmp_path / "q", overwrite=True)
    assert not (tmp_path / "q" / "keep.txt").exists() and (tmp_path / "q" / "model.safetensors").exists()


def test_failed_save_leaves_no_partial_output(tmp_path, monkeypatch):
    model = quantized()
    from lowbit.formats import native

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_refused(tmp_path):
    out = lowbit.save(quantized(), tmp_path / "q")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        lowbit.load(out)


def test_shape_mismatch_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    out = lowbit.save(quantized(), tmp_path / "q")
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.scales"] = torch.zeros(3, 3, dtype=torch.float16)
    save_file(sd, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.scales.*shape"):
        lowbit.load(out)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    tiny_model().config.save_pretrained(d)

    class Bomb:
        def __reduce__(self):
            return (pytest.fail, ("the loader unpickled the file",))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(CheckpointError, match="unpickle"):
        lowbit.load(d)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        lowbit.load(tmp_path / "nowhere")


def test_act_order_layers_round_trip_bit_for_bit(tmp_path):
    """A WQLinear with an act-order perm (GPTQ's desc_act) keeps its perm, codes and outputs exactly."""
    from lowbit.quant import PerGroup, QuantSpec

    model = quantized("qwen2")  # q/k/v carry a bias
    g = torch.Generator().manual_seed(0)
    for name, m in list(model.named_modules()):
        if isinstance(m, WQLinear):
            spec = QuantSpec(bits=m.bits, symmetric=False, granularity=PerGroup(m.group_size))
            new = WQLinear.from_codes(m.codes(), m.scales, m.zeros(), spec, bias=m.bias,
                                      perm=torch.randperm(m.in_features, generator=g), name=name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    out = lowbit.save(model, tmp_path / "q")
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert modules and all(c["act_order"] for c in modules.values())
    loaded = lowbit.load(out)
    for name, m in model.named_modules():
        if isinstance(m, WQLinear):
            lm = loaded.get_submodule(name)
            assert torch.equal(lm.perm, m.perm) and torch.equal(lm.qweight, m.qweight)
            assert torch.equal(lm.g_idx(), m.g_idx())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float_dtype_halves_the_unquantized_tensors(tmp_path, dtype):
    """float_dtype stores embeddings, norms and lm_head in 16 bits (the packed modules' tensors as they
    are) and loading computes in the model's float32 again, from those rounded values."""
    from safetensors import safe_open

    model = quantized("llama", "w8a8-sq-o1", calib=torch.randint(0, 256, (2, 16)))
    full = lowbit.save(model, tmp_path / "full")
    half = lowbit.save(model, tmp_path / "half", float_dtype=dtype)
    cfg = json.loads((half / "config.json").read_text())
    assert cfg["quantization_config"]["float_dtype"] == dtype and cfg["dtype"] == "float32"
    packed = tuple(f"{n}." for n in cfg["quantization_config"]["modules"])
    with safe_open(str(half / "model.safetensors"), "pt") as h, safe_open(str(full / "model.safetensors"), "pt") as f:
        assert set(h.keys()) == set(f.keys())
        for k in h.keys():
            a, b = h.get_tensor(k), f.get_tensor(k)
            if k.startswith(packed) or not b.is_floating_point():
                assert torch.equal(a, b), k  # codes, scales and biases untouched
            else:
                assert a.dtype == getattr(torch, dtype) and torch.equal(a, b.to(a.dtype)), k
    # the dtype config.json names is what the model computes in; the tensors are the rounded ones
    want = model
    sd = want.state_dict()
    for k in list(sd):
        if not k.startswith(packed) and sd[k].is_floating_point():
            sd[k] = sd[k].to(getattr(torch, dtype)).float()
    want.load_state_dict(sd)
    loaded = lowbit.load(half)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want(ids).logits, rtol=0, atol=0)
    assert (half / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size


def test_float_dtype_errors(tmp_path):
    model = quantized()
    with pytest.raises(CheckpointError, match="float_dtype must be one of"):
        lowbit.save(model, tmp_path / "a", float_dtype="int8")
    with pytest.raises(CheckpointError, match="format='lowbit' only"):
        lowbit.save(model, tmp_path / "b", format="gptq", float_dtype="float16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = 1e6  # beyond float16
    with pytest.raises(lowbit.errors.InvalidWeightsError, match="float16"):
        lowbit.save(model, tmp_path / "c", float_dtype="float16")
    assert not (tmp_path / "c").exists()
