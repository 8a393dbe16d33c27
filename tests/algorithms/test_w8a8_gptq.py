"""W8A8 and W4A8 with GPTQ rounding: the same grid as rounding to nearest (scales unchanged), codes
that reproduce the layer outputs better, and a quantized model closer to the float one."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.errors import CalibrationError, SpecError
from lowbit.nn import W4A8Linear, W8A8Linear
from lowbit.nn.w8a8_linear import int8_weight
from lowbit.quant import PerChannel, PerGroup, QuantSpec
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("act_order", [False, True])
def test_fixed_grid_gptq_beats_nearest_on_the_same_grid(granularity, act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    # correlated inputs with a few strong channels: where error compensation pays
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    x[:, :4] *= 8
    H = 2 * x.t() @ x / x.shape[0]
    q0, s = int8_weight(w, granularity)
    s_rows = s.reshape(-1, 1).expand(w.shape[0], 1)
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    r = gptq_quantize(w, H, spec, w.shape[1], act_order=act_order, qparams=(s_rows, None))
    assert r["perm"] is None  # fixed grids keep the codes in model order
    assert torch.equal(r["scales"], s_rows.float())
    q = r["codes"]
    assert torch.equal(q, q.round()) and q.min() >= -128 and q.max() <= 127
    assert torch.allclose(r["weight"], q * s_rows)
    err_gptq = float(((w - r["weight"]) @ x.t()).pow(2).sum())
    err_rtn = float(((w - q0.float() * s_rows) @ x.t()).pow(2).sum())
    assert err_gptq < 0.7 * err_rtn
    assert not torch.equal(q, q0.float())


def _recipe(preset, rounding):
    rec = load_recipe(preset)
    for step in rec.steps:
        if step.get("method") == "w8a8":
            step["rounding"] = rounding
    return rec


@pytest.mark.parametrize("preset", ["w8a8-sq-o1", "w8a8-sq-o3"])
def test_gptq_rounding_keeps_the_grid_and_lowers_the_error(preset):
    base = tiny_model("llama")
    with torch.no_grad():
        want = base(IDS).logits
    out = {}
    for rounding in ("nearest", "gptq"):
        q = lowbit.quantize(tiny_model("llama"), _recipe(preset, rounding), IDS, progress=False)
        mods = {n: m for n, m in q.named_modules() if isinstance(m, W8A8Linear)}
        assert len(mods) == 14
        with torch.no_grad():
            err = float((q(IDS).logits - want).pow(2).mean() / want.pow(2).mean())
        out[rounding] = (mods, err, q)
    near, gptq = out["nearest"][0], out["gptq"][0]
    changed = 0
    for n, m in gptq.items():
        # the grid is rounding to nearest's: same scales, codes moved by error compensation only (in the
        # first block: the later ones are smoothed on inputs that differ with the rounding before them)
        if n.startswith("model.layers.0."):
            assert torch.equal(m.weight_scale, near[n].weight_scale), n
        changed += int((m.weight != near[n].weight).sum())
    assert changed > 0
    assert out["gptq"][1] < out["nearest"][1]
    assert out["gptq"][2].lowbit_recipe["steps"][-1]["rounding"] == "gptq"


def test_gptq_rounding_round_trips(tmp_path):
    q = lowbit.quantize(tiny_model("llama"), _recipe("w8a8-sq-o1", "gptq"), IDS, progress=False)
    lowbit.save(q, tmp_path / "ck")
    r = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(q(IDS).logits, r(IDS).logits)


def test_gptq_rounding_errors():
    with pytest.raises(SpecError, match="rounding"):
        _recipe("w8a8-sq-o1", "stochastic").build()
    with pytest.raises(CalibrationError, match="calibration"):
        lowbit.quantize(tiny_model("llama"), _recipe("w8a8-naive", "gptq"), None, progress=False)


def test_fixed_per_group_grid():
    """Per-group fixed scales `[out, in / G]` (W4A8's two-level grid): codes on each group's own grid."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    s = torch.rand(16, 4, generator=g) * 0.1 + 0.05
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerGroup(16))
    r = gptq_quantize(w, H, spec, 16, act_order=True, qparams=(s, None))
    assert r["perm"] is None and torch.equal(r["scales"], s)
    assert r["codes"].min() >= -8 and r["codes"].max() <= 7
    torch.testing.assert_close(r["weight"], r["codes"] * s.repeat_interleave(16, dim=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fixed qparams"):
        gptq_quantize(w, H, spec, 16, qparams=(s[:, :3], None))


@pytest.mark.parametrize("group_size", [32, -1])
def test_w4a8_gptq_rounding_keeps_the_grid_and_lowers_the_error(group_size):
    base = tiny_model("llama")
    with torch.no_grad():
        want = base(IDS).logits
    out = {}
    for rounding in ("nearest", "gptq"):
        rec = load_recipe("w4a8", group_size=group_size)
        rec.steps = [dict(rec.steps[0], rounding=rounding)]
        q = lowbit.quantize(tiny_model("llama"), rec, IDS, progress=False)
        mods = {n: m for n, m in q.named_modules() if isinstance(m, W4A8Linear)}
        assert len(mods) == 14
        with torch.no_grad():
            out[rounding] = (mods, float((q(IDS).logits - want).pow(2).mean() / want.pow(2).mean()))
    near, gptq = out["nearest"][0], out["gptq"][0]
    for n, m in gptq.items():
        if n.startswith("model.layers.0."):  # later blocks' float weights are the same, but keep it to block 0
            assert torch.equal(m.weight_scale, near[n].weight_scale), n
            if m.group_scale is not None:
                assert torch.equal(m.group_scale, near[n].group_scale), n
    assert any(not torch.equal(m.qweight, near[n].qweight) for n, m in gptq.items())
    assert out["gptq"][1] < out["nearest"][1]
    with pytest.raises(CalibrationError, match="calibration"):
        rec = load_recipe("w4a8")
        rec.steps = [dict(rec.steps[0], rounding="gptq")]
        lowbit.quantize(tiny_model("llama"), rec, None, progress=False)


def test_gptq_presets():
    for preset, cls_name in (("w8a8-sq-o1", "W8A8"), ("w4a8-gptq", "W4A8")):
        alg = load_recipe(preset).build()[-1]
        assert type(alg).__name__ == cls_name and alg.rounding == "gptq" and alg.requires_calibration
