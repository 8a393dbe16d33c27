"""SmoothQuant's alpha search (alpha: auto): it scores alphas by the int8-rounded pair's output error
on calibration tokens, keeps the float function, and does at least as well as the fixed default."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.smoothquant import ALPHA_GRID, SmoothQuant, search_alpha, smoothing_error
from lowbit.calib import BlockRunner
from lowbit.errors import SpecError
from lowbit.models import get_adapter
from lowbit.recipes import load_recipe

from ..conftest import tiny_model
from .test_smoothquant import IDS, _with_outlier_channels


def _outlier_input(tokens=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, 5] *= 60.0  # two outlier channels, as LLM activations have them
    x[:, 9] *= 25.0
    return x


def test_search_picks_the_least_error_and_beats_no_smoothing():
    x = _outlier_input()
    w = [torch.randn(96, 64, generator=torch.Generator().manual_seed(1)) * 0.05,
         torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 0.05]
    absmax = x.abs().amax(0)
    best, errs = search_alpha(x, absmax, w)
    assert set(errs) == set(ALPHA_GRID) and best in errs
    assert errs[best] == min(errs.values())
    # no smoothing at all: per-token int8 of x as it is, per-channel int8 of W
    from lowbit.kernels.int8_gemm import quantize_per_token
    from lowbit.nn.w8a8_linear import int8_weight
    q, s = quantize_per_token(x)
    plain = 0.0
    for wi in w:
        qw, sw = int8_weight(wi, "channel")
        plain += float((x @ wi.t() - (q.float() * s) @ (qw.float() * sw).t()).pow(2).sum())
    assert errs[best] < 0.5 * plain
    # the error is the float output's: small against the output's energy
    energy = sum(float((x @ wi.t()).pow(2).sum()) for wi in w)
    assert errs[best] / energy < 1e-3


@pytest.mark.parametrize("wg,act", [("channel", "per_token"), ("tensor", "per_tensor")])
def test_error_is_the_dequantized_float_products(wg, act):
    # the search scores with one integer GEMM over the stacked pair; it must be the error of the
    # dequantized operands, linear by linear (per-tensor weight scales stay per linear)
    from lowbit.algorithms.smoothquant import smooth_scales
    from lowbit.kernels.int8_gemm import quantize_activation
    from lowbit.nn.w8a8_linear import int8_weight

    x = _outlier_input(tokens=256, seed=5)
    w = [torch.randn(48, 64, generator=torch.Generator().manual_seed(6)) * 0.05,
         torch.randn(16, 64, generator=torch.Generator().manual_seed(7)) * 0.5]
    absmax = x.abs().amax(0)
    for alpha in (0.3, 0.75):
        s = smooth_scales(absmax, w, alpha)
        q, sx = quantize_activation((x / s).contiguous(), act)
        xq = q.float() * sx
        want = 0.0
        for wi in w:
            qw, sw = int8_weight(wi * s, wg)
            want += float((x @ wi.t() - xq @ (qw.float() * sw).t()).pow(2).sum())
        got = smoothing_error(x, absmax, w, alpha, wg, act)
        assert got == pytest.approx(want, rel=1e-3)
    _, errs = search_alpha(x, absmax, w, grid=(0.3, 0.75), weight_granularity=wg, act=act)
    assert errs[0.75] == pytest.approx(smoothing_error(x, absmax, w, 0.75, wg, act), rel=1e-6)


def test_relative_error_weighs_every_token_by_its_own_output():
    """error: relative divides each token's squared error by its float output's squared norm: a token
    whose outputs are 300 times the others' (an attention sink) no longer outweighs them all."""
    from lowbit.algorithms.smoothquant import smooth_scales
    from lowbit.kernels.int8_gemm import quantize_activation
    from lowbit.nn.w8a8_linear import int8_weight

    x = _outlier_input(tokens=256, seed=8)
    x[0] *= 300.0
    w = [torch.randn(48, 64, generator=torch.Generator().manual_seed(9)) * 0.05]
    absmax = x.abs().amax(0)
    for alpha in (0.4, 0.8):
        s = smooth_scales(absmax, w, alpha)
        q, sx = quantize_activation((x / s).contiguous(), "per_token")
        qw, sw = int8_weight(w[0] * s, "channel")
        ref = x @ w[0].t()
        d = (ref - (q.float() * sx) @ (qw.float() * sw).t()).pow(2).sum(1)
        got = smoothing_error(x, absmax, w, alpha, error="relative")
        assert got == pytest.approx(float((d / ref.pow(2).sum(1)).sum()), rel=1e-3)
        # the absolute error is the big token's nearly alone; the relative one is not
        assert float(d[0]) > 0.5 * float(d.sum())
        assert float(d[0] / ref[0].pow(2).sum()) < 0.1 * got
    _, errs = search_alpha(x, absmax, w, grid=(0.4, 0.8), error="relative")
    assert errs[0.8] == pytest.approx(smoothing_error(x, absmax, w, 0.8, error="relative"), rel=1e-6)
    with pytest.raises(SpecError, match="error"):
        SmoothQuant(alpha="auto", error="mse")


def test_per_tensor_activations_want_more_smoothing_than_per_token():
    # a single scale for all tokens suffers more from outlier channels, so the search moves more of
    # them into the weights
    x = _outlier_input(seed=3)
    w = [torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) * 0.05]
    a_tok, _ = search_alpha(x, x.abs().amax(0), w, act="per_token")
    a_ten, _ = search_alpha(x, x.abs().amax(0), w, act="per_tensor", weight_granularity="tensor")
    assert a_ten >= a_tok
    assert smoothing_error(x, x.abs().amax(0), w, a_ten, "tensor", "per_tensor") > 0


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_auto_keeps_the_float_function(model_type):
    model = _with_outlier_channels(tiny_model(model_type))
    with torch.no_grad():
        want = model(IDS).logits
        sq = SmoothQuant(alpha="auto", pairs="all")
        sq.prepare(model, get_adapter(model))
        BlockRunner(model, get_adapter(model), IDS, progress=False).run([sq])
        got = model(IDS).logits
    assert set(sq.last_alphas) == set(sq.last_scales) and len(sq.last_alphas) >= 4
    assert all(a in ALPHA_GRID for a in sq.last_alphas.values())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cfg = sq.config()
    assert cfg["alpha"] == "auto" and cfg["alphas"] == sq.last_alphas


def test_auto_preset_variant_is_no_worse_than_the_default_alpha(tmp_path):
    base = _with_outlier_channels(tiny_model("llama"), scale=80.0)
    with torch.no_grad():
        want = base(IDS).logits

    def err(alpha):
        rec = load_recipe("w8a8-sq-o1")
        # rounding to nearest: the alphas are scored against it (GPTQ's rounding would blur the comparison).
        # The absolute error: this random model's tokens have outputs of similar size, and the preset's
        # relative error, which down-weights the rare huge ones of real LLMs, here overweights the
        # smallest (it picks alphas down to 0.3 and loses to 0.5)
        rec.steps = [dict(rec.steps[0], alpha=alpha, error="absolute"),
                     dict(rec.steps[1], rounding="nearest", act_calib=0.0)]
        q = lowbit.quantize(_with_outlier_channels(tiny_model("llama"), scale=80.0), rec, IDS, progress=False)
        with torch.no_grad():
            return float((q(IDS).logits - want).pow(2).mean() / want.pow(2).mean())

    e_auto, e_half = err("auto"), err(0.5)
    assert e_auto < 0.01
    assert e_auto <= 1.1 * e_half


def test_alpha_settings_errors():
    with pytest.raises(SpecError, match="alpha"):
        SmoothQuant(alpha="sometimes")
    with pytest.raises(SpecError, match="alpha_grid"):
        SmoothQuant(alpha="auto", alpha_grid=[0.5, 1.5])
    with pytest.raises(SpecError, match="alpha_grid"):
        SmoothQuant(alpha="auto", alpha_grid=[])
    with pytest.raises(SpecError, match="search_tokens"):
        SmoothQuant(alpha="auto", search_tokens=0)
    sq = SmoothQuant(alpha={"llama": "auto", "default": 0.5})
    model = tiny_model("llama")
    sq.prepare(model, get_adapter(model))
    assert sq.alpha == "auto"


def test_fake_int8_pair_is_what_w8a8_linear_computes_after_the_fold():
    # the block objective simulates a pair's W8A8 with hooks on the unfolded float linears; it must
    # give W8A8Linear's output on the folded linear (x / s in, W * s as weight), and undo exactly
    from lowbit.algorithms.smoothquant import _fake_int8_pair, smooth_scales
    from lowbit.nn import W8A8Linear

    x = _outlier_input(tokens=128, seed=8)
    lins = [torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(64, 16, bias=False)]
    for i, lin in enumerate(lins):
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(10 + i)) * 0.05)
    before = [lin.weight.detach().clone() for lin in lins]
    s = smooth_scales(x.abs().amax(0), [lin.weight for lin in lins], 0.6)
    for wg, act in (("channel", "per_token"), ("tensor", "per_tensor")):
        with torch.no_grad():
            undo = _fake_int8_pair(lins, s, wg, act)
            got = [lin(x) for lin in lins]
            undo()
            for lin, g in zip(lins, got):
                folded = torch.nn.Linear(64, lin.out_features, bias=False)
                folded.weight.copy_(lin.weight * s)
                want = W8A8Linear.from_float(folded, weight_granularity=wg, act_mode=act)(x / s)
                torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)
                # and it is not the float product: the rounding is there
                assert float((g - lin(x)).abs().max()) > 0
    for lin, w in zip(lins, before):
        assert torch.equal(lin.weight, w) and not lin._forward_pre_hooks


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_block_objective_keeps_the_float_function_and_picks_the_least_block_error(model_type, monkeypatch):
    import lowbit.algorithms.smoothquant as sqm

    seen = []
    real = sqm.search_alpha_block

    def spy(*args, **kwargs):
        best, errs = real(*args, **kwargs)
        seen.append((best, errs))
        return best, errs

    monkeypatch.setattr(sqm, "search_alpha_block", spy)
    model = _with_outlier_channels(tiny_model(model_type))
    with torch.no_grad():
        want = model(IDS).logits
        sq = SmoothQuant(alpha="auto", pairs="all", objective="block", search_tokens=64)
        sq.prepare(model, get_adapter(model))
        BlockRunner(model, get_adapter(model), IDS, progress=False).run([sq])
        got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(seen) == len(sq.last_alphas) >= 4
    for best, errs in seen:
        assert set(errs) == set(ALPHA_GRID) and errs[best] == min(errs.values()) and errs[best] > 0
        assert len(set(errs.values())) > 1  # the alphas are told apart
    assert sq.config()["objective"] == "block"


def test_block_objective_preset_variant_is_no_worse_than_the_default_alpha():
    base = _with_outlier_channels(tiny_model("llama"), scale=80.0)
    with torch.no_grad():
        want = base(IDS).logits

    def err(**step):
        rec = load_recipe("w8a8-sq-o1")
        rec.steps = [dict(rec.steps[0], **step), dict(rec.steps[1], rounding="nearest", act_calib=0.0)]
        q = lowbit.quantize(_with_outlier_channels(tiny_model("llama"), scale=80.0), rec, IDS, progress=False)
        with torch.no_grad():
            return float((q(IDS).logits - want).pow(2).mean() / want.pow(2).mean())

    e_block, e_half = err(alpha="auto", objective="block"), err(alpha=0.5)
    assert e_block < 0.01
    assert e_block <= 1.1 * e_half


def test_objective_errors():
    with pytest.raises(SpecError, match="objective"):
        SmoothQuant(alpha="auto", objective="model")
