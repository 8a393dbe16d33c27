"""LLM.int8(): MixedInt8Linear against its float linear, the preset, the lowbit format round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import SpecError
from lowbit.nn import MixedInt8Linear, W8A8Linear
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_module_handles_outlier_features_better_than_w8a8():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(50, 64)
    x[:, 7] *= 40  # one outlier feature, as LLM activations have
    with torch.no_grad():
        ref = lin(x)
        mixed = MixedInt8Linear.from_float(lin)(x)
        plain = W8A8Linear.from_float(lin, weight_granularity="channel", act_mode="per_token")(x)
    err = lambda y: float((y - ref).pow(2).mean() / ref.pow(2).mean())  # noqa: E731
    assert err(mixed) < 1e-3
    assert err(mixed) < err(plain) / 5


def test_preset_and_round_trip(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 50.0  # an outlier feature into q/k/v
        want = model(IDS).logits
    q = lowbit.quantize(model, "w8a8-llm-int8", None, progress=False)
    mods = [m for m in q.modules() if isinstance(m, MixedInt8Linear)]
    assert len(mods) == 14 and all(m.threshold == 6.0 for m in mods)
    with torch.no_grad():
        got = q(IDS).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.01
    lowbit.save(q, tmp_path / "ckpt")
    again = lowbit.load(tmp_path / "ckpt")
    r = again.get_submodule("model.layers.1.mlp.down_proj")
    assert type(r) is MixedInt8Linear and r.threshold == 6.0
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, got)


def test_bad_settings():
    rec = load_recipe("w8a8-llm-int8")
    rec.steps[0]["threshold"] = -1.0
    with pytest.raises(SpecError, match="threshold"):
        rec.build()
    rec = load_recipe("w8a8-sq-o2")  # per-tensor weights
    rec.steps = [{"method": "llm_int8"}]
    with pytest.raises(SpecError, match="per output row"):
        rec.build()


def test_mixed_int8_input_is_what_the_matmul_multiplies():
    """The activations GPTQ's act_calib fits to: outlier columns as they are, the rest per-token int8;
    multiplied by the dequantized weight they give the mixed matmul's output (up to its 16-bit part)."""
    from lowbit.kernels.mixed_int8 import mixed_int8_input

    torch.manual_seed(1)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(40, 64)
    x[:, 3] *= 30
    m = MixedInt8Linear.from_float(lin)
    xr = mixed_int8_input(x, 6.0)
    assert torch.equal(xr[:, 3], x[:, 3])  # the outlier column untouched
    assert not torch.equal(xr, x) and float((xr - x).abs().max()) < 6.0 / 127
    w = m.weight.float() * m.weight_scale.reshape(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), xr @ w.t(), rtol=2e-3, atol=2e-3)


def test_gptq_rounding_keeps_the_grid_and_lowers_the_error(tmp_path):
    """rounding: gptq (and act_calib) on LLM.int8()'s grid: the same row scales and modules, codes that
    bring the quantized model closer to the float one than rounding to nearest on the calibration tokens
    (on held-out tokens the tiny random model is too noisy to say), a lossless round trip."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 50.0
        want = model(IDS).logits
    err, mods = {}, {}
    for key, step in (("nearest", {}), ("gptq", dict(rounding="gptq")),
                      ("act_calib", dict(rounding="gptq", act_calib=1.0))):
        rec = load_recipe("w8a8-llm-int8")
        rec.steps[0].update(step)
        m = model if key == "act_calib" else tiny_model("llama")
        if key != "act_calib":
            m.load_state_dict(model.state_dict())
        q = lowbit.quantize(m, rec, IDS, progress=False)
        mods[key] = {n: x for n, x in q.named_modules() if isinstance(x, MixedInt8Linear)}
        assert len(mods[key]) == 14
        with torch.no_grad():
            got = q(IDS).logits
        err[key] = float((got - want).pow(2).mean() / want.pow(2).mean())
    assert err["gptq"] < err["nearest"] and err["act_calib"] < err["nearest"], err
    for n, x in mods["gptq"].items():
        if n.startswith("model.layers.0."):
            assert torch.equal(x.weight_scale, mods["nearest"][n].weight_scale), n
    assert any(not torch.equal(x.weight, mods["nearest"][n].weight) for n, x in mods["gptq"].items())
    assert q.lowbit_recipe["steps"][-1]["act_calib"] == 1.0
    lowbit.save(q, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "ck")(IDS).logits, got)
    rec = load_recipe("w8a8-llm-int8")
    rec.steps[0].update(rounding="gptq")
    with pytest.raises(Exception, match="calibration"):
        lowbit.quantize(tiny_model("llama"), rec, None, progress=False)
    for bad in (dict(rounding="stochastic"), dict(act_calib=0.5), dict(rounding="gptq", act_calib=2)):
        rec = load_recipe("w8a8-llm-int8")
        rec.steps[0].update(bad)
        with pytest.raises(SpecError, match="rounding|act_calib"):
            rec.build()


def test_presets_rotate_and_paper_does_not():
    """w8a8-llm-int8 is LLM.int8() on rotated inputs, w8a8-llm-int8-paper the published scheme; both
    calibration-free, the same threshold."""
    rot, paper = load_recipe("w8a8-llm-int8").build()[-1], load_recipe("w8a8-llm-int8-paper").build()[-1]
    assert (rot.rotate_block, paper.rotate_block) == (64, 0) and rot.threshold == paper.threshold == 6.0
    assert not rot.requires_calibration and not paper.requires_calibration


def test_gptq_preset():
    alg = load_recipe("w8a8-llm-int8-gptq").build()[-1]
    assert type(alg).__name__ == "LLMInt8" and alg.threshold == 6.0
    assert alg.rounding == "gptq" and alg.act_calib == 1.0 and alg.requires_calibration and alg.rotate_block == 64
    assert not load_recipe("w8a8-llm-int8").build()[-1].requires_calibration


def test_rotated_module_spreads_channels_under_the_threshold():
    """The case LLM.int8() leaves alone: large channels under the threshold set every token's int8
    scale. Rotated (W R^T times R x), the same float product with a far smaller rounding error."""
    torch.manual_seed(2)
    lin = nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)  # LLM weights are bell-shaped, not nn.Linear's uniform init
    x = torch.randn(60, 128) * 0.3
    x[:, [3, 70]] = 5.0 * torch.randn(60, 2).sign()  # under 6.0, so no outlier columns
    with torch.no_grad():
        ref = lin(x)
        plain = MixedInt8Linear.from_float(lin)
        rot = MixedInt8Linear.from_float(lin, rotate_block=64, rotate_seed=1)
        err = lambda m: float((m(x) - ref).pow(2).mean() / ref.pow(2).mean())  # noqa: E731
        assert err(rot) < err(plain) / 3 and err(rot) < 1e-4, (err(rot), err(plain))
        # the weight it holds is the rotated one; rotated back it is the float weight up to int8 rounding
        # (R is orthogonal, so each row's error keeps its norm: at most half a step per entry)
        row_err = (rot.dequantize_weight() - lin.weight).norm(dim=1)
        assert bool((row_err <= rot.weight_scale.reshape(-1) * 0.5 * 128 ** 0.5 * 1.001).all())
        assert float((rot.weight.float() * rot.weight_scale - lin.weight).abs().max()) > 0.05
        y16 = rot(x.to(torch.bfloat16))
        assert y16.dtype == torch.bfloat16
    assert rot.storage_bits() == plain.storage_bits() + 128 * 8
    with pytest.raises(SpecError, match="not divisible by the rotation block"):
        MixedInt8Linear.from_float(nn.Linear(96, 8), rotate_block=64, name="x")
    with pytest.raises(SpecError, match="one sign"):
        MixedInt8Linear.from_codes(plain.weight, plain.weight_scale, None, rotate_block=64,
                                   rotation_signs=torch.zeros(128, dtype=torch.int8))


def test_rotated_preset_round_trip(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 5.0  # a large channel under the threshold
        want = model(IDS).logits
    errs = {}
    for rot in (False, True, "gptq"):
        rec = load_recipe("w8a8-llm-int8-paper")
        if rot:
            rec.steps[0].update(rotate="hadamard", rotate_block=32)
        if rot == "gptq":  # GPTQ on the rotated weight and inputs: closer still on its calibration tokens
            rec.steps[0].update(rounding="gptq", act_calib=1.0)
        m = tiny_model("llama")
        m.load_state_dict(model.state_dict())
        q = lowbit.quantize(m, rec, IDS if rot == "gptq" else None, progress=False)
        with torch.no_grad():
            got = q(IDS).logits
        errs[rot] = float((got - want).pow(2).mean() / want.pow(2).mean())
    assert errs["gptq"] < errs[True] < errs[False], errs
    mods = [x for x in q.modules() if isinstance(x, MixedInt8Linear)]
    assert len(mods) == 14 and all(x.rotate_block == 32 for x in mods)
    assert q.lowbit_recipe["steps"][-1]["rotate"] == "hadamard"
    lowbit.save(q, tmp_path / "ck")
    again = lowbit.load(tmp_path / "ck")
    r = again.get_submodule("model.layers.1.mlp.down_proj")
    assert r.rotate_block == 32 and torch.equal(r.rotation_signs, q.get_submodule("model.layers.1.mlp.down_proj").rotation_signs)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, got)


def test_rotation_settings_are_checked():
    for bad, match in ((dict(rotate="givens"), "rotate"), (dict(rotate="hadamard", rotate_block=48), "power of two"),
                       (dict(rotate="hadamard", rotate_seed=-1), "rotate_seed")):
        rec = load_recipe("w8a8-llm-int8")
        rec.steps[0].update(bad)
        with pytest.raises(SpecError, match=match):
            rec.build()
    rec = load_recipe("w8a8-llm-int8")
    rec.steps[0].update(rotate="hadamard", rotate_block=256)  # wider than the tiny model's 64 features
    with pytest.raises(SpecError, match="not divisible by the rotation block 256"):
        lowbit.quantize(tiny_model("llama"), rec, None, progress=False)
