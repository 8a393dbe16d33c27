"""Each kind of bad input ends in one clear line on stderr, status 2, and no output directory."""

import json
import subprocess
import sys

import pytest

from lowbit.cli import main

from .conftest import save_tiny_checkpoint


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, pattern):
    import re

    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]


def test_quantize_eval_round_trip(tmp_path, tiny_dir, capsys):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_dir, "--recipe", "w4a16-rtn", "--group-size", "32", "--out", out)
    assert code == 0, err
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, stdout, err = run(capsys, "eval", out, "--ppl", text, "--seqlen", "32", "--windows", "4",
                            "--ref", tiny_dir, "--json", tmp_path / "r.json")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    for key in ("ppl", "windows", "seqlen", "kl", "top1_agreement", "bits_per_weight", "model_bytes"):
        assert key in res
    assert res["windows"] == 4 and res["seqlen"] == 32 and res["kl"] > 0 and 0 < res["top1_agreement"] <= 1
    assert 4.0 < res["bits_per_weight"] < 5.5


def test_missing_model_directory(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path / "bloom"
    cfg = AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    code, _, err = run(capsys, "quantize", d, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "bloom.*llama")
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide(tmp_path, capsys):
    d = save_tiny_checkpoint(tmp_path / "m", hidden_size=96, intermediate_size=192)
    code, _, err = run(capsys, "quantize", d, "--group-size", "64", "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"model\.layers\.0\.\S+.*96.*32")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(tmp_path, tiny_dir, capsys, bits):
    code, _, err = run(capsys, "quantize", tiny_dir, "--bits", bits, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "bits")
    assert not (tmp_path / "o").exists()


def test_nan_weights(tmp_path, capsys):
    from lowbit.formats.native import read_safetensors
    from safetensors.torch import save_file

    d = save_tiny_checkpoint(tmp_path / "m")
    sd = read_safetensors([d / "model.safetensors"])
    sd["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors")
    code, _, err = run(capsys, "quantize", d, "--group-size", "32", "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"model\.layers\.1\.self_attn\.v_proj.*NaN")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,pattern", [("", "empty"), ("two words", "too short")])
def test_bad_calibration_text(tmp_path, tiny_dir, capsys, content, pattern):
    f = tmp_path / "calib.txt"
    f.write_text(content)
    code, _, err = run(capsys, "quantize", tiny_dir, "--group-size", "32", "--calib", f, "--out", tmp_path / "o")
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "o").exists()


def test_existing_output_directory(tmp_path, tiny_dir, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = run(capsys, "quantize", tiny_dir, "--group-size", "32", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "exists.*--overwrite")
    code, _, err = run(capsys, "quantize", tiny_dir, "--group-size", "32", "--out", tmp_path / "o", "--overwrite")
    assert code == 0, err


def test_truncated_checkpoint_on_eval(tmp_path, tiny_dir, capsys):
    out = tmp_path / "q"
    assert run(capsys, "quantize", tiny_dir, "--group-size", "32", "--out", out)[0] == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100)
    code, _, err = run(capsys, "eval", out, "--ppl", text)
    assert_one_line_error(code, err, "truncated")


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "quantize" in out.stdout


def test_bench_reports_throughput(tmp_path, tiny_dir, capsys):
    code, _, err = run(capsys, "bench", tiny_dir, "--prompt-len", "8", "--new-tokens", "4", "--json", tmp_path / "b.json")
    assert code == 0, err
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["prefill_tokens_per_s"] > 0 and res["decode_tokens_per_s"] > 0 and res["peak_rss_mb"] > 0


def test_quantize_with_awq_writes_an_autoawq_checkpoint(tmp_path, tiny_dir, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_dir, "--recipe", "w4a16-awq", "--group-size", "32",
                            "--calib", calib, "--calib-samples", "2", "--calib-seqlen", "32",
                            "--format", "awq", "--out", out)
    assert code == 0, err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["version"] == "gemm" and qcfg["group_size"] == 32
    import lowbit
    from lowbit.nn import AWQLinearGEMM
    assert any(isinstance(m, AWQLinearGEMM) for m in lowbit.load(out).modules())


def test_awq_format_refuses_3_bit_before_any_work(tmp_path, tiny_dir, capsys):
    code, _, err = run(capsys, "quantize", tiny_dir, "--recipe", "w3a16-rtn", "--group-size", "32",
                       "--format", "awq", "--out", tmp_path / "q")
    assert_one_line_error(code, err, r"--format awq stores 4-bit asymmetric")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("fmt,key", [("gptq", "gptq"), ("compressed-tensors", "compressed-tensors")])
def test_quantize_writes_gptq_and_compressed_tensors_checkpoints(tmp_path, tiny_dir, capsys, fmt, key):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_dir, "--recipe", "w3a16-rtn", "--group-size", "32",
                            "--format", fmt, "--out", out)
    assert code == 0, err
    assert f"({fmt} format)" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == key
    import lowbit
    from lowbit.nn import WQLinear
    assert any(isinstance(m, WQLinear) and m.bits == 3 for m in lowbit.load(out).modules())


@pytest.mark.parametrize("fmt,recipe,extra,pattern", [
    ("gptq", "w4a16-rtn", ["--bits", "5"], r"--format gptq stores 2, 3, 4 or 8-bit weights"),
    ("compressed-tensors", "w4a16-gptq", [], r"--format compressed-tensors has no act-order.*w4a16-gptq"),
])
def test_formats_refuse_recipes_before_any_work(tmp_path, tiny_dir, capsys, fmt, recipe, extra, pattern):
    code, _, err = run(capsys, "quantize", tiny_dir, "--recipe", recipe, "--group-size", "32", *extra,
                       "--format", fmt, "--out", tmp_path / "q")
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "q").exists()


def test_float_dtype_option(tmp_path, tiny_dir, capsys):
    code, _, err = run(capsys, "quantize", tiny_dir, "--recipe", "w4a16-rtn", "--group-size", "32",
                       "--format", "gptq", "--float-dtype", "bfloat16", "--out", tmp_path / "g")
    assert_one_line_error(code, err, r"--float-dtype applies to --format lowbit")
    assert not (tmp_path / "g").exists()
    code, _, err = run(capsys, "quantize", tiny_dir, "--recipe", "w4a16-rtn", "--group-size", "32",
                       "--float-dtype", "bfloat16", "--out", tmp_path / "q")
    assert code == 0, err
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["float_dtype"] == "bfloat16"


def test_set_overrides_one_step_option(tmp_path, tiny_dir, capsys):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", tiny_dir, "--recipe", "w8a8-llm-int8", "--set", "llm_int8.threshold=3.5",
                            "--out", out)
    assert code == 0, err
    assert "llm_int8.threshold=3.5" in stdout
    import lowbit
    from lowbit.nn import MixedInt8Linear
    mods = [m for m in lowbit.load(out).modules() if isinstance(m, MixedInt8Linear)]
    assert mods and all(m.threshold == 3.5 for m in mods)


@pytest.mark.parametrize("setting,pattern", [
    ("awq.clip_mode=asym", r"w8a8-llm-int8 has no 'awq' step \(its steps: llm_int8\)"),
    ("llm_int8.thresold=3", r"method llm_int8 has no option 'thresold' \(its options: threshold, "),
    ("llm_int8.threshold", r"--set takes METHOD.KEY=VALUE"),
    ("threshold=3", r"--set takes METHOD.KEY=VALUE"),
    ("llm_int8.threshold=[1", r"not valid YAML"),
    ("llm_int8.threshold=high", r"step llm_int8: could not convert string to float"),
])
def test_bad_set_fails_before_any_work(tmp_path, tiny_dir, capsys, setting, pattern):
    code, _, err = run(capsys, "quantize", tiny_dir, "--recipe", "w8a8-llm-int8", "--set", setting,
                       "--out", tmp_path / "q")
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "q").exists()
