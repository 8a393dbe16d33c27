import json

import pytest
import torch

import lowbit
from lowbit.algorithms import qat
from lowbit.errors import CheckpointError, LowbitError, SpecError
from lowbit.nn import FakeQuantLinear, W4A8Linear, WQLinear
from lowbit.quant import PerGroup, QuantSpec

from ..conftest import tiny_model

SPEC = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32))


def _samples(n=12, length=24, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _ptq_model(recipe="w3a16-rtn"):
    model = tiny_model("llama")
    lowbit.quantize(model, recipe, group_size=32, progress=False)
    return model


def _config(**kw):
    base = dict(steps=6, lr=1e-3, scale_lr=1e-3, warmup=2, ce=1.0, distill=1.0, checkpoint_every=3, autocast=None)
    base.update(kw)
    return qat.QATConfig(**base)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_prepare_swaps_block_linears_only_and_starts_at_the_ptq_model():
    model = _ptq_model()
    ids = _samples(2)
    before = _logits(model, ids)
    mods = qat.prepare(model)
    assert len(mods) == 2 * 7 and all(isinstance(m, FakeQuantLinear) for m in mods.values())
    assert not isinstance(model.lm_head, FakeQuantLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("weight_quant.scale", ".weight")) and ".layers." in n for n in trainable)
    assert "model.embed_tokens.weight" not in trainable
    # WQLinear computes in bf16, the fake-quant model in fp32: same weights, bf16-sized differences
    rel = ((_logits(model, ids) - before).norm() / before.norm()).item()
    assert rel < 2e-2


def test_prepare_float_model_needs_a_spec():
    model = tiny_model("llama")
    with pytest.raises(SpecError, match="needs a weight spec"):
        qat.prepare(model)
    assert len(qat.prepare(model, SPEC)) == 14


def test_training_lowers_the_loss_and_moves_scales():
    model = _ptq_model()
    teacher = tiny_model("llama")
    qat.prepare(model)
    s0 = model.model.layers[0].self_attn.q_proj.weight_quant.scale.detach().clone()
    tr = qat.QATTrainer(model, _samples(4), _config(steps=30, ce=0.0, lr=3e-3, scale_lr=3e-3), teacher=teacher,
                        progress=False)
    hist = tr.train()
    first = sum(r["loss"] for r in hist[:5]) / 5
    last = sum(r["loss"] for r in hist[-5:]) / 5
    assert last < 0.8 * first
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight_quant.scale.detach(), s0)


def test_fake_quant_model_equals_its_converted_model_and_reloads(tmp_path):
    model = _ptq_model()
    teacher = tiny_model("llama")
    qat.prepare(model)
    qat.QATTrainer(model, _samples(), _config(steps=8), teacher=teacher, progress=False).train()
    ids = _samples(3, seed=5)
    with torch.no_grad():
        ref = _logits(model, ids)
        w_fake = {n: m.quantized_weight().clone() for n, m in qat.fake_quant_modules(model).items()}
    qat.convert(model)
    assert not qat.fake_quant_modules(model)
    for n, w in w_fake.items():
        packed = model.get_submodule(n)
        assert isinstance(packed, WQLinear) and torch.equal(packed.dequantize_weight(), w), n
    out = _logits(model, ids)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2  # bf16 kernels against the fp32 fake-quant forward
    lowbit.save(model, tmp_path / "qat")
    again = lowbit.load(tmp_path / "qat")
    assert torch.equal(_logits(again, ids), out)


def test_fake_quant_forward_equals_the_converted_wqlinear_with_the_reference_kernel(monkeypatch):
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")  # fp32 dequantize + F.linear: no bf16 in the way
    model = _ptq_model()
    qat.prepare(model)
    qat.QATTrainer(model, _samples(), _config(steps=4, distill=0.0), progress=False).train()
    ids = _samples(2, seed=9)
    ref = _logits(model, ids)
    out = _logits(qat.convert(model), ids)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_gptq_start_with_act_order_keeps_the_permutation_through_convert():
    model = tiny_model("llama")
    lowbit.quantize(model, "w3a16-gptq", _samples(8, 32), group_size=32, progress=False)
    perms = {n: m.perm.clone() for n, m in model.named_modules() if isinstance(m, WQLinear)}
    assert any(p is not None for p in perms.values())
    qat.prepare(model)
    qat.QATTrainer(model, _samples(), _config(steps=2, distill=0.0), progress=False).train()
    qat.convert(model)
    for n, p in perms.items():
        assert torch.equal(model.get_submodule(n).perm, p)


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    cfg = _config(steps=6, checkpoint_every=3)
    teacher = tiny_model("llama")
    full = _ptq_model()
    qat.prepare(full)
    whole = qat.QATTrainer(full, _samples(), cfg, teacher=teacher, progress=False).train()

    stopped = _ptq_model()
    qat.prepare(stopped)
    qat.QATTrainer(stopped, _samples(), cfg, teacher=teacher, state_dir=tmp_path / "state", progress=False).train(until=3)
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 3
    torch.manual_seed(1234)  # the RNG state comes back from the checkpoint, not from here
    fresh = tiny_model("llama")  # a float model: the fake-quant layers come from the state
    resumed = qat.QATTrainer.resume(fresh, tmp_path / "state", teacher=teacher, progress=False)
    assert resumed.step == 3
    curve = resumed.train()
    assert [r["step"] for r in curve] == list(range(1, 7))
    for a, b in zip(whole, curve):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0)
    for (n, p), (n2, p2) in zip(full.named_parameters(), fresh.named_parameters()):
        assert n == n2 and torch.allclose(p, p2, rtol=1e-6, atol=0), n


def test_bad_state_and_settings_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a QAT training state"):
        qat.QATTrainer.resume(tiny_model("llama"), tmp_path)
    with pytest.raises(SpecError, match="unknown settings"):
        qat.QATConfig.from_dict({"stepz": 3})
    with pytest.raises(SpecError, match="needs a loss"):
        qat.QATConfig(ce=0.0, distill=0.0)
    model = _ptq_model()
    qat.prepare(model)
    with pytest.raises(LowbitError, match="teacher"):
        qat.QATTrainer(model, _samples(), _config(), progress=False)
    (tmp_path / "s").mkdir()
    for f in ("trainer.json", "model.safetensors", "optimizer.safetensors", "data.safetensors"):
        (tmp_path / "s" / f).write_text("{")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        qat.QATTrainer.resume(tiny_model("llama"), tmp_path / "s")


def test_qat_recipes_split_into_a_ptq_start_and_settings():
    for name in ("w4a16-qat", "w3a16-qat", "w2a16-qat", "w4a8-qat"):
        rec = lowbit.recipes.load_recipe(name, group_size=32)
        start, cfg = qat.split_recipe(rec)
        assert rec.weights.bits == int(name[1]) and start.weights == rec.weights
        assert all(s["method"] != "qat" for s in start.steps) and cfg.steps > 0
    with pytest.raises(LowbitError, match="train-qat"):
        lowbit.quantize(tiny_model("llama"), "w3a16-qat", _samples(), group_size=32, progress=False)


def test_cli_train_qat_trains_saves_and_resumes(tmp_path, tiny_dir, capsys):
    from lowbit.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Quantization maps weights to a few bits. " * 60)
    common = ["--recipe", "w3a16-qat", "--group-size", "32", "--calib", str(text), "--calib-samples", "4",
              "--calib-seqlen", "16", "--train-seqlen", "16", "--train-samples", "6"]
    out = tmp_path / "q"
    assert main(["train-qat", str(tiny_dir), *common, "--steps", "2", "--out", str(out)]) == 0
    state = tmp_path / "q.qat-state"
    assert json.loads((state / "trainer.json").read_text())["step"] == 2
    model = lowbit.load(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, WQLinear) and model.model.layers[0].mlp.up_proj.bits == 3
    assert main(["train-qat", str(tiny_dir), *common, "--steps", "3", "--resume", str(state),
                 "--out", str(tmp_path / "q2")]) == 0
    assert json.loads((state / "trainer.json").read_text())["step"] == 3
    assert main(["train-qat", str(tiny_dir), "--recipe", "w4a16-rtn", "--out", str(tmp_path / "bad")]) == 2
    assert "ends with exactly one `method: qat` step" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _w4a8_unrotated():
    """The w4a8 preset in groups of 32 without its input rotation: QAT starts from unrotated layers."""
    from lowbit.recipes import load_recipe

    rec = load_recipe("w4a8", group_size=32)
    rec.steps[0]["rotate"] = "none"
    return rec


def test_w4a8_qat_trains_the_group_multipliers_when_asked():
    model = tiny_model("llama")
    lowbit.quantize(model, _w4a8_unrotated(), progress=False)
    qat.prepare(model)
    start = {n: m.group_mult.detach().clone() for n, m in qat.fake_quant_modules(model).items()}
    cfg = _config(steps=6, distill=1.0, ce=0.0, train_weights=False, scale_lr=1e-5, mult_lr=0.5)
    trainer = qat.QATTrainer(model, _samples(), cfg, teacher=tiny_model("llama"), progress=False)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["scales", "multipliers"]
    trainer.train()
    mods = qat.fake_quant_modules(model)
    moved = sum(int((m.group_mult.detach().round() != start[n]).sum()) for n, m in mods.items())
    assert moved > 0
    ids = _samples(2, seed=7)
    ref = _logits(model, ids)
    qat.convert(model)
    got = {n: model.get_submodule(n).group_scale for n in mods}
    assert all(int(g.min()) >= 1 and int(g.max()) <= 16 for g in got.values())
    assert ((_logits(model, ids) - ref).norm() / ref.norm()).item() < 2e-2


def test_cli_train_qat_w4a8_packs_w4a8linear(tmp_path, tiny_dir):
    from lowbit.cli import main

    text = tmp_path / "text.txt"
    text.write_text("Integer GEMMs want int8 activations and int4 weights in two-level groups. " * 60)
    out = tmp_path / "w4a8"
    assert main(["train-qat", str(tiny_dir), "--recipe", "w4a8-qat", "--group-size", "32", "--calib", str(text),
                 "--calib-samples", "4", "--calib-seqlen", "16", "--train-seqlen", "16", "--train-samples", "4",
                 "--steps", "2", "--out", str(out)]) == 0
    model = lowbit.load(out)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, W4A8Linear) and up.weight_granularity == "group" and up.group_size == 32


def test_frozen_weights_train_the_scales_only_and_leave_latent_weights_bit_identical(monkeypatch):
    """E2E-QP: the codes stay where PTQ (or Block-AP) put them, the step sizes learn."""
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    model = _ptq_model()
    teacher = tiny_model("llama")
    qat.prepare(model)
    w0 = {n: m.weight.detach().clone() for n, m in qat.fake_quant_modules(model).items()}
    s0 = {n: m.weight_quant.scale.detach().clone() for n, m in qat.fake_quant_modules(model).items()}
    tr = qat.QATTrainer(model, _samples(4), _config(steps=30, ce=0.0, scale_lr=3e-3, train_weights=False),
                        teacher=teacher, progress=False)
    assert [g["name"] for g in tr.optimizer.param_groups] == ["scales"]
    hist = tr.train()
    assert sum(r["loss"] for r in hist[-5:]) < 0.9 * sum(r["loss"] for r in hist[:5])
    mods = qat.fake_quant_modules(model)
    assert all(torch.equal(mods[n].weight, w) for n, w in w0.items())
    assert all(not torch.equal(mods[n].weight_quant.scale, s) for n, s in s0.items())
    ids = _samples(2, seed=9)
    ref = _logits(model, ids)
    assert torch.allclose(_logits(qat.convert(model), ids), ref, rtol=1e-4, atol=1e-4)


def test_resume_with_frozen_weights_is_exact(tmp_path):
    cfg = _config(steps=6, checkpoint_every=3, train_weights=False)
    teacher = tiny_model("llama")
    full = _ptq_model()
    qat.prepare(full)
    whole = qat.QATTrainer(full, _samples(), cfg, teacher=teacher, progress=False).train()
    stopped = _ptq_model()
    qat.prepare(stopped)
    qat.QATTrainer(stopped, _samples(), cfg, teacher=teacher, state_dir=tmp_path / "s", progress=False).train(until=3)
    fresh = tiny_model("llama")
    curve = qat.QATTrainer.resume(fresh, tmp_path / "s", teacher=teacher, progress=False).train()
    assert [a["loss"] for a in whole] == pytest.approx([b["loss"] for b in curve], rel=1e-6, abs=0)
    for n, m in qat.fake_quant_modules(full).items():
        other = fresh.get_submodule(n)
        assert torch.equal(other.codes, m.codes) and torch.equal(other.weight, m.weight), n
        assert torch.allclose(other.weight_quant.scale, m.weight_quant.scale, rtol=1e-6, atol=0), n


def test_w4a8_qat_trains_converts_to_w4a8linear_reloads_and_resumes(tmp_path):
    """W4A8: int8 inputs per token and two-level int4 groups in training, W4A8Linear after convert."""
    def start():
        model = tiny_model("llama")
        lowbit.quantize(model, _w4a8_unrotated(), progress=False)
        return model

    teacher = tiny_model("llama")
    cfg = _config(steps=6, checkpoint_every=3, distill=1.0, ce=0.0, scale_lr=1e-5)  # row scales are ~1/16 of a group step
    model = start()
    ids = _samples(3, seed=5)
    before = _logits(model, ids)
    mods = qat.prepare(model)
    assert all(m.group_mult is not None and m.input_quant is not None for m in mods.values())
    # the fake-quant start computes what the packed W4A8 model computed. Each layer agrees to ~1e-7
    # (tests/nn); through the model those float32-sized differences flip a few int8 activation codes
    # at their rounding boundaries, one step each, so whole-model logits differ by ~1e-3, not 1e-7
    assert ((_logits(model, ids) - before).norm() / before.norm()).item() < 2e-2
    whole = qat.QATTrainer(model, _samples(), cfg, teacher=teacher, progress=False).train()
    assert whole[-1]["loss"] < whole[0]["loss"]
    ref = _logits(model, ids)
    qat.convert(model)
    layers = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    assert len(layers) == 2 * 7 and all(m.weight_granularity == "group" for m in layers)
    out = _logits(model, ids)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    lowbit.save(model, tmp_path / "w4a8-qat")
    assert torch.equal(_logits(lowbit.load(tmp_path / "w4a8-qat"), ids), out)

    stopped = start()
    qat.prepare(stopped)
    qat.QATTrainer(stopped, _samples(), cfg, teacher=teacher, state_dir=tmp_path / "state", progress=False).train(until=3)
    resumed = qat.QATTrainer.resume(tiny_model("llama"), tmp_path / "state", teacher=teacher, progress=False)
    curve = resumed.train()
    for a, b in zip(whole, curve):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=0)
