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


def _recipe(preset, rounding, act_calib=0.0):
    rec = load_recipe(preset)
    for step in rec.steps:
        if step.get("method") == "w8a8":
            step["rounding"] = rounding
            step["act_calib"] = act_calib
    return rec


def _quantize_both_ways(make_recipe, cls):
    """The tiny llama quantized with rounding to nearest and with GPTQ rounding: per rounding, the
    packed modules of type `cls` by name, the logits' relative squared error against float, and the model."""
    with torch.no_grad():
        want = tiny_model("llama")(IDS).logits
    out = {}
    for rounding in ("nearest", "gptq"):
        q = lowbit.quantize(tiny_model("llama"), make_recipe(rounding), IDS, progress=False)
        mods = {n: m for n, m in q.named_modules() if isinstance(m, cls)}
        assert len(mods) == 14
        with torch.no_grad():
            err = float((q(IDS).logits - want).pow(2).mean() / want.pow(2).mean())
        out[rounding] = (mods, err, q)
    assert out["gptq"][1] < out["nearest"][1]
    return out


@pytest.mark.parametrize("preset", ["w8a8-sq-o1", "w8a8-sq-o3"])
def test_gptq_rounding_keeps_the_grid_and_lowers_the_error(preset):
    out = _quantize_both_ways(lambda rounding: _recipe(preset, rounding), W8A8Linear)
    near, gptq = out["nearest"][0], out["gptq"][0]
    changed = 0
    for n, m in gptq.items():
        # the grid is rounding to nearest's: same scales, codes moved by error compensation only (in the
        # first block: the later ones are smoothed on inputs that differ with the rounding before them)
        if n.startswith("model.layers.0."):
            assert torch.equal(m.weight_scale, near[n].weight_scale), n
        changed += int((m.weight != near[n].weight).sum())
    assert changed > 0
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
    def recipe(rounding):
        rec = load_recipe("w4a8", group_size=group_size)
        rec.steps = [dict(rec.steps[0], rounding=rounding)]
        return rec

    out = _quantize_both_ways(recipe, W4A8Linear)
    near, gptq = out["nearest"][0], out["gptq"][0]
    for n, m in gptq.items():
        if n.startswith("model.layers.0."):  # later blocks' float weights are the same, but keep it to block 0
            assert torch.equal(m.weight_scale, near[n].weight_scale), n
            if m.group_scale is not None:
                assert torch.equal(m.group_scale, near[n].group_scale), n
    assert any(not torch.equal(m.qweight, near[n].qweight) for n, m in gptq.items())
    with pytest.raises(CalibrationError, match="calibration"):
        lowbit.quantize(tiny_model("llama"), recipe("gptq"), None, progress=False)


def test_gptq_presets():
    for preset, cls_name in (("w8a8-sq-o1", "W8A8"), ("w4a8-gptq", "W4A8")):
        alg = load_recipe(preset).build()[-1]
        assert type(alg).__name__ == cls_name and alg.rounding == "gptq" and alg.requires_calibration
    assert load_recipe("w8a8-sq-o1").build()[-1].act_calib == 1.0


def test_act_calib_fits_the_int8_activations_on_the_same_grid():
    """input_quant: GPTQ's Hessian comes from the inputs rounded as W8A8Linear rounds them (per token,
    int8) and its target is the float product, so with input_calib 1 the codes on the same grid
    reproduce X W^T from the rounded X better than GPTQ fitted to float inputs does."""
    from lowbit.algorithms.gptq import GPTQ
    from lowbit.kernels.int8_gemm import quantize_per_token

    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.3 * torch.randn(4096, 64, generator=g)
    x[:, :3] *= 20  # outlier channels: a coarse per-token grid for the rest

    def rounded(_name, t):
        q, s = quantize_per_token(t.reshape(-1, t.shape[-1]).contiguous())
        return (q.float() * s).reshape(t.shape)

    class Ctx:  # what collect_hessians reads: the inputs of the named linears, batch by batch
        def run_inputs(self, names, record):
            for part in x.split(1024):
                record(names[0], part)

    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    hs = GPTQ(spec, input_quant=rounded, input_calib=1.0).collect_hessians(Ctx(), ["lin"])["lin"]
    xq = rounded("lin", x)
    torch.testing.assert_close(hs.H, 2 * xq.t() @ xq / x.shape[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(hs.C, 2 * (x - xq).t() @ xq / x.shape[0], rtol=1e-4, atol=1e-3)
    _, s = int8_weight(w, "channel")
    fixed = (s.reshape(-1, 1).expand(w.shape[0], 1), None)
    err = {}
    for alpha in (0.0, 1.0):
        r = gptq_quantize(w, hs.H, spec, w.shape[1], act_order=True, qparams=fixed, C=hs.C, asym_calib=alpha)
        assert torch.equal(r["scales"], fixed[0].float())
        err[alpha] = float((x @ w.t() - xq @ r["weight"].t()).pow(2).sum())
    assert err[1.0] < err[0.0], err  # the rounding noise is mostly uncorrelated with xq: a small gain
    with pytest.raises(ValueError, match="input_quant"):
        GPTQ(spec, input_quant=rounded, asym_calib=0.25)
    for bad, rounding in ((0.5, "nearest"), (1.5, "gptq"), ("x", "gptq")):
        rec = _recipe("w8a8-sq-o1", rounding, act_calib=bad)
        with pytest.raises(SpecError, match="act_calib"):
            rec.build()


@pytest.mark.parametrize("preset,step", [("w8a8-sq-o1", "w8a8"), ("w8a8-llm-int8-gptq", "llm_int8")])
def test_quantized_calib_forward(preset, step):
    """calib_forward: quantized keeps the grid and the modules, leaves no hook behind, and changes the
    codes (the later linears are fitted on the rounded activations of the earlier ones)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 30.0
        want = model(IDS).logits
    got, mods = {}, {}
    for cf in ("float", "quantized"):
        rec = load_recipe(preset)
        rec.steps[-1].update(calib_forward=cf)
        m = tiny_model("llama")
        m.load_state_dict(model.state_dict())
        q = lowbit.quantize(m, rec, IDS, progress=False)
        assert q.lowbit_recipe["steps"][-1]["calib_forward"] == cf
        assert not any(x._forward_pre_hooks for x in q.modules())
        mods[cf] = {n: x for n, x in q.named_modules() if hasattr(x, "weight_scale")}
        with torch.no_grad():
            got[cf] = q(IDS).logits
    assert len(mods["float"]) == len(mods["quantized"]) == 14
    rel = float((got["quantized"] - want).pow(2).mean() / want.pow(2).mean())
    assert rel < 0.01
    # block 0's q/k/v see the same inputs either way: same Hessian, same codes; later linears differ
    l0 = "model.layers.0.self_attn.q_proj"
    assert torch.equal(mods["float"][l0].weight, mods["quantized"][l0].weight)
    assert any(not torch.equal(x.weight, mods["float"][n].weight) for n, x in mods["quantized"].items())
    for bad in (dict(calib_forward="int8"), dict(calib_forward="quantized", act_calib=0.0)):
        rec = load_recipe(preset)
        rec.steps[-1].update(bad)
        with pytest.raises(SpecError, match="calib_forward"):
            rec.build()
