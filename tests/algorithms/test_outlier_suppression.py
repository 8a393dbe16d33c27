"""Outlier Suppression: gamma migration keeps the float function, token-wise clipping lowers the
quantized output error where a few tokens hold the extremes, and the preset builds static W8A8."""

import pytest
import torch

import lowbit
from lowbit.algorithms.outlier_suppression import OutlierSuppression, gamma_scales, migrate_gamma, search_clip
from lowbit.errors import CalibrationError, SpecError
from lowbit.models import get_adapter, get_blocks, norm_offset
from lowbit.nn import W8A8Linear
from lowbit.nn.w8a8_linear import int8_weight
from lowbit.recipes import load_recipe

from ..conftest import tiny_model
from .test_smoothquant import _with_outlier_channels

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2"])
def test_gamma_migration_keeps_the_float_function(model_type):
    model = _with_outlier_channels(tiny_model(model_type))
    with torch.no_grad():
        for layer in model.model.layers:  # negative and zero gains too
            layer.input_layernorm.weight[5] = -2.0 - norm_offset(layer.input_layernorm)
            layer.input_layernorm.weight[9] = -norm_offset(layer.input_layernorm)
        want = model(IDS).logits
    adapter = get_adapter(model)
    moved = {}
    for i, block in enumerate(get_blocks(model, adapter)):
        moved.update({f"{i}.{k}": v for k, v in migrate_gamma(block, adapter, model.config).items()})
    assert len(moved) >= 4  # two norms per block at least
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the migrated norms now only flip signs (dead channels excepted)
    for layer in model.model.layers:
        norm = layer.input_layernorm
        gain = norm.weight.detach().float() + norm_offset(norm)
        live = torch.ones_like(gain, dtype=torch.bool)
        live[9] = False
        torch.testing.assert_close(gain[live].abs(), torch.ones(int(live.sum())), rtol=1e-5, atol=1e-5)
        assert float(gain[5]) < 0 and float(gain[9]) == 0


def test_gamma_scales_of_a_dead_channel_stay_one():
    norm = torch.nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -0.5, 0.0, 1.0]))
    torch.testing.assert_close(gamma_scales(norm), torch.tensor([2.0, 0.5, 1.0, 1.0]))


def test_clipping_helps_when_few_tokens_hold_the_extremes():
    x = torch.randn(2048, 64, generator=GEN)
    x[::512] *= 60.0  # 4 outlier tokens hold the extremes
    w = torch.randn(32, 64, generator=GEN) * 0.1
    q, s = int8_weight(w, "tensor")
    wq = q.float() * s
    ta = x.abs().amax(dim=1)
    clip, quantile, losses = search_clip(x, ta, [w], [wq])
    # clipping into those tokens costs them dearly (they dominate a squared error), so the best clip
    # is modest, but it beats the calibration absmax (quantile 1.0, the first candidate) clearly
    assert quantile < 1.0 and clip < 0.9 * float(ta.max())
    assert losses[0] > 1.3 * min(losses)
    # and on Gaussian tokens with no outliers, clipping hardly matters
    y = torch.randn(2048, 64, generator=GEN)
    _, _, flat = search_clip(y, y.abs().amax(dim=1), [w], [wq])
    assert flat[0] < 2 * min(flat)


@pytest.mark.parametrize("gamma", [True, False, "auto"])
def test_preset_builds_static_per_tensor_w8a8(gamma):
    model = _with_outlier_channels(tiny_model("llama"))
    with torch.no_grad():
        want = model(IDS).logits
    r = load_recipe("w8a8-os")
    # the per-layer clip search runs here too, with gamma left in place
    r.steps = [{"method": "outlier_suppression", "gamma_migration": gamma,
                "clip_search": "layer" if gamma is False else "block"}]
    q = lowbit.quantize(model, r, IDS, progress=False)
    mods = {n: m for n, m in q.named_modules() if isinstance(m, W8A8Linear)}
    assert len(mods) == 14
    assert all(m.weight_granularity == "tensor" and m.act_mode == "static" for m in mods.values())
    cfg = q.lowbit_recipe["algorithms"][0]
    assert cfg["norms_migrated"] == {True: 4, False: 0}.get(gamma, cfg["norms_migrated"])
    with torch.no_grad():
        got = q(IDS).logits
    # the bound of naive W8A8 (per-tensor static) on this model in test_smoothquant
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.25


def test_auto_mode_takes_the_lower_error_per_norm():
    """On block 0 (the same inputs whatever was decided), auto's quantized output error, summed over
    the linears, is no more than always or never migrating gamma."""
    from lowbit.calib import BlockRunner

    total = {}
    for gamma in (True, False, "auto"):
        model = _with_outlier_channels(tiny_model("llama"), scale=80.0)
        r = load_recipe("w8a8-os")
        alg = OutlierSuppression(r.weights, r.activations, gamma_migration=gamma, clip_search="layer")
        alg.prepare(model, get_adapter(model))
        with torch.no_grad():
            BlockRunner(model, get_adapter(model), IDS, progress=False).run([alg])
        block0 = {k: v for k, v in alg.clip_log.items() if k.startswith("model.layers.0.")}
        total[gamma] = sum(v["layer_loss"] for v in {v["clip"]: v for v in block0.values()}.values())
    assert total["auto"] <= min(total[True], total[False]) * (1 + 1e-6)
    assert total[True] != total[False]


def test_errors():
    r = load_recipe("w8a8-os")
    with pytest.raises(SpecError, match="static"):
        OutlierSuppression(r.weights, load_recipe("w8a8-sq-o1").activations)
    with pytest.raises(SpecError, match="gamma_migration"):
        OutlierSuppression(r.weights, r.activations, gamma_migration="yes")
    with pytest.raises(SpecError, match="quantiles"):
        OutlierSuppression(r.weights, r.activations, quantiles=[1.5])
    with pytest.raises(SpecError, match="8-bit"):
        load_recipe("w8a8-os", bits=4).build()
    with pytest.raises(CalibrationError, match="calibration"):
        lowbit.quantize(tiny_model("llama"), "w8a8-os", None, progress=False)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_preset_on_other_architectures(model_type):
    model = tiny_model(model_type)
    with torch.no_grad():
        want = model(IDS).logits
    q = lowbit.quantize(model, "w8a8-os", IDS, progress=False)
    assert q.lowbit_recipe["algorithms"][0]["norms_migrated"] == 4  # two pre-linear norms in each block
    with torch.no_grad():
        got = q(IDS).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.25


def test_block_search_scores_the_block_output():
    """clip_search block: one quantile per block, no worse on block 0's output (the same inputs in both
    runs) than not clipping at all, and the layer search is still there as an option."""
    from lowbit.calib import BlockRunner

    logs = {}
    for quantiles in ([1.0], list(load_recipe("w8a8-os").steps[0].get("quantiles", [])) or None):
        model = _with_outlier_channels(tiny_model("llama"), scale=80.0)
        r = load_recipe("w8a8-os")
        kw = {} if quantiles is None else {"quantiles": quantiles}
        alg = OutlierSuppression(r.weights, r.activations, **kw)
        alg.prepare(model, get_adapter(model))
        with torch.no_grad():
            BlockRunner(model, get_adapter(model), IDS, progress=False).run([alg])
        logs[str(quantiles)] = alg.block_log
    unclipped, searched = logs["[1.0]"], logs["None"]
    assert [e["block"] for e in searched] == [0, 1]
    assert searched[0]["loss"] <= unclipped[0]["loss"] * (1 + 1e-6)
    r = load_recipe("w8a8-os")
    layer = OutlierSuppression(r.weights, r.activations, clip_search="layer")
    q = lowbit.quantize(_with_outlier_channels(tiny_model("llama")), load_recipe("w8a8-os"), IDS, progress=False)
    assert q.lowbit_recipe["algorithms"][0]["clip_search"] == "block" and layer.clip_search == "layer"
    with pytest.raises(SpecError, match="clip_search"):
        OutlierSuppression(r.weights, r.activations, clip_search="model")
