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


def test_gptq_preset():
    alg = load_recipe("w8a8-llm-int8-gptq").build()[-1]
    assert type(alg).__name__ == "LLMInt8" and alg.threshold == 6.0
    assert alg.rounding == "gptq" and alg.act_calib == 1.0 and alg.requires_calibration
    assert not load_recipe("w8a8-llm-int8").build()[-1].requires_calibration
