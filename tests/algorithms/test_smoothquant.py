"""SmoothQuant keeps the float function; the W8A8 presets build W8A8Linear with the right modes and
beat naive W8A8 on a model with activation outlier channels."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.smoothquant import SmoothQuant, smooth_scales
from lowbit.calib import BlockRunner
from lowbit.errors import CalibrationError, SpecError
from lowbit.models import get_adapter
from lowbit.nn import W8A8Linear
from lowbit.recipes import RecipeError, load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _with_outlier_channels(model, scale=40.0):
    """Activation outliers as LLMs have them: a few norm channels much larger than the rest."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, getattr(layer, "pre_feedforward_layernorm", None)
                         or layer.post_attention_layernorm):
                w = norm.weight
                w[3] = w[3] * scale + (scale if model.config.model_type.startswith("gemma") else 0)
                w[17] = w[17] * scale * 0.5
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("pairs", ["norm", "all"])
def test_smoothing_keeps_the_float_function(model_type, pairs):
    model = _with_outlier_channels(tiny_model(model_type))
    with torch.no_grad():
        want = model(IDS).logits
        sq = SmoothQuant(alpha=0.5, pairs=pairs)
        sq.prepare(model, get_adapter(model))
        BlockRunner(model, get_adapter(model), IDS, progress=False).run([sq])
        got = model(IDS).logits
    assert len(sq.last_scales) >= 4  # two norms per block at least
    assert any(float((s - 1).abs().max()) > 0.1 for s in sq.last_scales.values())  # it did move something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_smooth_scales_formula():
    a = torch.tensor([8.0, 1.0, 0.0, 4.0])
    w1 = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.5, -4.0, 1.0, 0.0]])
    s = smooth_scales(a, [w1], alpha=0.5)
    torch.testing.assert_close(s[:2], torch.tensor([8.0 ** 0.5 / 2.0 ** 0.5, 1.0 / 2.0]))
    assert s[2] == 1 and s[3] == 1  # a channel dead in X or in W keeps scale 1
    s1 = smooth_scales(a, [w1], alpha=1.0)
    assert s1[0] == 8.0


def test_smoothing_flattens_the_activation_channels():
    model = _with_outlier_channels(tiny_model("llama"))
    adapter = get_adapter(model)
    from lowbit.calib.stats import collect_activation_stats
    from lowbit.algorithms import Algorithm
    seen = {}

    class Probe(Algorithm):
        def quantize_block(self, ctx):
            seen[len(seen)] = collect_activation_stats(ctx, ["self_attn.q_proj"])["self_attn.q_proj"].channel_absmax

    with torch.no_grad():
        BlockRunner(model, adapter, IDS, progress=False).run([Probe()])
        before = seen.pop(0)
        seen.clear()
        sq = SmoothQuant(alpha=0.5)
        sq.prepare(model, adapter)
        BlockRunner(model, adapter, IDS, progress=False).run([sq, Probe()])
        after = seen[0]
    ratio = lambda a: float(a.max() / a.median())  # noqa: E731
    assert ratio(after) < ratio(before) / 3


# relative logit MSE bounds: about 2x what each preset measured on this model; per-tensor scales leave
# the unsmoothed inputs (o_proj, down_proj) of a random model much worse off than per-token ones
@pytest.mark.parametrize("preset,wg,act,bound", [("w8a8-sq-o1", "channel", "per_token", 0.01),
                                                 ("w8a8-sq-o2", "tensor", "per_tensor", 0.15),
                                                 ("w8a8-sq-o3", "tensor", "static", 0.15),
                                                 ("w8a8-naive", "tensor", "static", 0.25)])
def test_presets_build_w8a8_linears(preset, wg, act, bound):
    model = _with_outlier_channels(tiny_model("llama"))
    with torch.no_grad():
        want = model(IDS).logits
    q = lowbit.quantize(model, preset, IDS, progress=False)
    mods = [m for m in q.modules() if isinstance(m, W8A8Linear)]
    assert len(mods) == 14  # 7 linears x 2 blocks
    assert all(m.weight_granularity == wg and m.act_mode == act for m in mods)
    if act == "static":
        assert all(float(m.input_scale) > 0 for m in mods)
    with torch.no_grad():
        got = q(IDS).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < bound
    rec = q.lowbit_recipe
    assert rec["activations"]["granularity"]["type"] == ("token" if act == "per_token" else "tensor")


def test_smoothquant_beats_naive_on_outlier_channels():
    base = _with_outlier_channels(tiny_model("llama"), scale=80.0)
    with torch.no_grad():
        want = base(IDS).logits

    def err(preset):
        m = _with_outlier_channels(tiny_model("llama"), scale=80.0)
        q = lowbit.quantize(m, preset, IDS, progress=False)
        with torch.no_grad():
            return float((q(IDS).logits - want).pow(2).mean())

    assert err("w8a8-sq-o3") < 0.5 * err("w8a8-naive")


def test_recipe_and_spec_errors():
    with pytest.raises(SpecError, match="8-bit symmetric"):
        load_recipe("w8a8-sq-o1", bits=4).build()
    with pytest.raises(SpecError, match="alpha"):
        SmoothQuant(alpha=1.5).prepare(tiny_model("llama"), get_adapter(tiny_model("llama")))
    with pytest.raises(SpecError, match="pairs"):
        SmoothQuant(pairs="some")
    with pytest.raises(CalibrationError, match="calibration"):
        lowbit.quantize(tiny_model("llama"), "w8a8-sq-o3", None, progress=False)


def test_activation_block_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nweights: {bits: 8, symmetric: true, granularity: tensor}\n"
                   "activations: {granularity: group}\nsteps: [{method: w8a8}]\n")
    with pytest.raises(RecipeError, match="granularity"):
        load_recipe(bad)
    bad.write_text("name: bad\nweights: {bits: 8, symmetric: true, granularity: tensor}\n"
                   "activations: {granularity: token, dynamic: false}\nsteps: [{method: w8a8}]\n")
    with pytest.raises(SpecError, match="per token"):
        load_recipe(bad).build()
    bad.write_text("name: bad\nweights: {bits: 8, symmetric: true, granularity: tensor}\nsteps: [{method: w8a8}]\n")
    with pytest.raises(SpecError, match="activations"):
        load_recipe(bad).build()


def test_per_model_alpha():
    sq = SmoothQuant(alpha={"llama": 0.8, "default": 0.4})
    model = tiny_model("llama")
    sq.prepare(model, get_adapter(model))
    assert sq.alpha == 0.8
    g = tiny_model("qwen2")
    sq.prepare(g, get_adapter(g))
    assert sq.alpha == 0.4


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("alpha,objective", [(0.5, "pair"), ("auto", "pair"), ("auto", "block")])
def test_gqa_tied_value_scales_keep_the_float_function_and_move_o_proj(model_type, alpha, objective):
    """Under grouped-query attention v -> o is dropped by default; tie_gqa scales o_proj's input with one
    scale per value channel, shared by the query heads that read it, and v_proj's rows carry the inverse."""
    import copy

    model = _with_outlier_channels(tiny_model(model_type))
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    plain = copy.deepcopy(model)
    with torch.no_grad():
        want = model(IDS).logits
    runs = {}
    for tie, m in ((False, plain), (True, model)):
        sq = SmoothQuant(alpha=alpha, pairs="all", objective=objective, tie_gqa=tie)
        sq.prepare(m, get_adapter(m))
        BlockRunner(m, get_adapter(m), IDS, progress=False).run([sq])
        runs[tie] = sq
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, (blk, pb) in enumerate(zip(model.model.layers, plain.model.layers)):
        key = f"model.layers.{i}.self_attn.v_proj"
        assert key not in runs[False].last_scales and key in runs[True].last_scales
        s = runs[True].last_scales[key].view(-1, n_rep, hd)
        assert float((s - 1).abs().max()) > 0.01
        torch.testing.assert_close(s, s[:, :1].expand_as(s))  # one scale per value channel
        assert not torch.equal(blk.self_attn.o_proj.weight, pb.self_attn.o_proj.weight)
        assert not torch.equal(blk.self_attn.v_proj.weight, pb.self_attn.v_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(SpecError, match="tie_gqa"):
        SmoothQuant(tie_gqa="yes")
