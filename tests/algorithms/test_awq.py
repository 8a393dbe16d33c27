import copy

import pytest
import torch

import lowbit
from lowbit.algorithms import ALGORITHMS, AWQ
from lowbit.algorithms.awq import (InputStats, apply_clip, group_output_error, output_error, pseudo_quantize_tensor,
                                  refit_scales, search_best_clip, search_best_scale)
from lowbit.models import block_linears, get_adapter, get_blocks
from lowbit.nn import WQLinear
from lowbit.quant import PerChannel, PerGroup, QuantSpec
from lowbit.recipes import load_recipe

from ..conftest import tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def calib_ids(n=4, length=32, seed=1):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def awq_recipe(bits=4, group_size=32, **step):
    rec = load_recipe("w4a16-awq", bits=bits, group_size=group_size)
    rec.steps = [{"method": "awq", **step}]
    return rec


def test_awq_is_registered_and_recipes_load():
    assert ALGORITHMS["awq"] is AWQ
    for name, bits, propagate in (("w4a16-awq", 4, "float"), ("w3a16-awq", 3, "float")):
        rec = load_recipe(name)
        assert rec.weights.bits == bits and rec.weights.granularity == PerGroup(128)
        (alg,) = rec.build()
        assert isinstance(alg, AWQ) and alg.propagate == propagate


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "opt"])
def test_scaling_without_quantization_keeps_the_float_function(model_type):
    model = tiny_model(model_type)
    twin = copy.deepcopy(model)
    ids = calib_ids()
    ref = logits(model, ids)
    lowbit.quantize(model, awq_recipe(quantize=False, clip=False), ids, progress=False)
    adapter = get_adapter(model)
    # the scales were really folded (weights moved), yet the model computes the same logits
    moved = [not torch.equal(a.weight, b.weight)
             for blk, tw in zip(get_blocks(model, adapter), get_blocks(twin, adapter))
             for a, b in zip(block_linears(blk, adapter).values(), block_linears(tw, adapter).values())]
    assert any(moved)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def outlier_llama():
    """A tiny llama whose embeddings carry four outlier channels (x20): what AWQ's scales are for."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, [3, 17, 40, 58]] *= 20.0
    return model


def test_awq_beats_rtn_on_outlier_channels_at_w3():
    ids = calib_ids(n=4, length=64)
    float_model = outlier_llama()
    ref = logits(float_model, ids)
    errs = {}
    for method in ("rtn", "awq"):
        model = outlier_llama()
        rec = awq_recipe(bits=3) if method == "awq" else load_recipe("w3a16-rtn", group_size=32)
        lowbit.quantize(model, rec, ids, progress=False)
        errs[method] = float((logits(model, ids) - ref).norm() / ref.norm())
    assert errs["awq"] < errs["rtn"], errs


def test_clip_search_ratios_in_range_and_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32))
    w = torch.randn(96, 128, generator=g)
    w[torch.rand(96, 128, generator=g) < 0.01] *= 8  # a few large weights that clipping can trade off
    x = torch.randn(1000, 128, generator=g)
    x[:, :4] *= 10
    ratios = search_best_clip(w, InputStats.of(x), spec, max_shrink=0.5, clip_grid=20)
    assert ratios.shape == (96, 4)
    assert bool((ratios >= 0.5).all() and (ratios <= 1).all())
    assert bool((ratios < 1).any())  # something was worth clipping
    clipped = torch.nn.Linear(128, 96, bias=False)
    clipped.weight.data.copy_(w)
    apply_clip(clipped, ratios)
    # scored directly on the tokens, not through the second moment the search used
    err_clip = group_output_error(w, pseudo_quantize_tensor(clipped.weight, spec), x, 32)
    err_none = group_output_error(w, pseudo_quantize_tensor(w, spec), x, 32)
    assert bool((err_clip <= err_none * (1 + 1e-4) + 1e-9).all())
    assert float(err_clip.sum()) < float(err_none.sum())


def test_clip_search_picks_the_best_ratio_of_each_group_by_brute_force():
    g = torch.Generator().manual_seed(3)
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    w = torch.randn(8, 64, generator=g)
    x = torch.randn(300, 64, generator=g) * torch.linspace(0.2, 5, 64)
    ratios = search_best_clip(w, InputStats.of(x), spec, max_shrink=0.5, clip_grid=10)
    cands = [1 - i / 10 for i in range(5)]
    errs = []
    for r in cands:
        lin = torch.nn.Linear(64, 8, bias=False)
        lin.weight.data.copy_(w)
        apply_clip(lin, torch.full((8, 4), r))
        errs.append(group_output_error(w, pseudo_quantize_tensor(lin.weight, spec), x, 16))
    errs = torch.stack(errs)  # [ratio, out, ng]
    chosen = errs.gather(0, torch.tensor([[cands.index(round(float(r), 6)) for r in row] for row in ratios])[None])[0]
    torch.testing.assert_close(chosen, errs.amin(0), rtol=1e-4, atol=1e-7)


def test_pseudo_quantize_is_what_wqlinear_stores():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 96, generator=g)
    for spec in (QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)),
                 QuantSpec(bits=3, symmetric=True, granularity=PerGroup(32)),
                 QuantSpec(bits=8, symmetric=True, granularity=PerChannel())):
        stored = WQLinear.from_weight(w, None, spec).dequantize_weight()
        assert torch.equal(pseudo_quantize_tensor(w, spec), stored), spec


def test_output_error_from_second_moment_matches_tokens():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(500, 48, generator=g) * torch.linspace(0.1, 8, 48)
    d = torch.randn(2, 16, 48, generator=g) * 0.01
    st = InputStats.of(x[:200])
    st.add(x[200:])  # accumulates across chunks
    direct = torch.stack([(x @ di.t()).pow(2).sum() for di in d]) / 500
    torch.testing.assert_close(output_error(d, st.gram / st.n), direct, rtol=1e-4, atol=0)
    s = torch.rand(48, generator=g) + 0.5
    torch.testing.assert_close(st.scaled(s).gram, (x / s).t() @ (x / s), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st.x_mean, x.abs().mean(0))


def test_scale_search_losses_match_quantized_outputs_and_pick_the_minimum():
    g = torch.Generator().manual_seed(6)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    x = torch.randn(400, 64, generator=g)
    x[:, [2, 9]] *= 25
    ws = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    s, losses = search_best_scale(ws, InputStats.of(x), spec, n_grid=10, loss_dtype=torch.float32)
    assert losses.shape == (10,) and int(losses.argmin()) > 0  # the outlier channels wanted scaling
    w = torch.cat(ws)
    # the reported loss of the chosen scale is the real output MSE of the scaled, rounded linears
    out = x @ w.t()
    out_q = (x / s) @ pseudo_quantize_tensor(w * s, spec).t()
    torch.testing.assert_close(losses.min(), (out_q - out).pow(2).mean(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_every_linear_ends_up_packed_and_no_worse_than_rtn(model_type):
    ids = calib_ids()
    errs = {}
    for recipe in ("w4a16-rtn", "w4a16-awq"):
        model = tiny_model(model_type)
        ref = logits(model, ids)
        lowbit.quantize(model, recipe, ids, group_size=32, progress=False)
        adapter = get_adapter(model)
        for block in get_blocks(model, adapter):
            assert all(isinstance(m, WQLinear) for m in block_linears(block, adapter).values())
        out = logits(model, ids)
        assert bool(out.isfinite().all())
        errs[recipe] = float((out - ref).norm() / ref.norm())
    assert model.lowbit_recipe["algorithms"][0]["method"] == "awq"
    # these noisy random models have no outliers for AWQ to protect; it must still not lose to RTN
    assert errs["w4a16-awq"] <= errs["w4a16-rtn"] * 1.02, errs


def _attention_and_mlp_inputs(model, ids):
    """(attention input, kwargs, mlp input) of block 0, captured the way the runner does."""
    from lowbit.calib.runner import BlockRunner, call_block

    adapter = get_adapter(model)
    runner = BlockRunner(model, adapter, ids, progress=False, batch_size=ids.shape[0])
    runner.capture()
    block = get_blocks(model, adapter)[0]
    chunk = runner.chunks[0]
    kw = chunk.kwargs[0]
    got = {}
    def grab(key):
        def hook(_m, args, kwargs):
            got.setdefault(key, args[0] if args else kwargs["hidden_states"])
        return hook

    h1 = block.self_attn.register_forward_pre_hook(grab("attn"), with_kwargs=True)
    h2 = block.mlp.register_forward_pre_hook(grab("mlp"), with_kwargs=True)
    with torch.no_grad():
        call_block(block, chunk.hidden, kw)
    h1.remove(), h2.remove()
    return block, got["attn"], kw, got["mlp"]


def test_subsampled_attention_inputs_keep_their_masks_and_positions():
    from lowbit.algorithms.awq import _inspect_outputs, subsample_inputs

    model = tiny_model("llama")
    ids = calib_ids(n=4, length=24)
    block, x_attn, kw, x_mlp = _attention_and_mlp_inputs(model, ids)
    with torch.no_grad():
        full = _inspect_outputs(block.self_attn, [x_attn], [kw])[0]
        xs, kws = subsample_inputs(block.self_attn, [x_attn], [kw], max_tokens=40)  # 2 whole sequences
        assert [tuple(x.shape[:2]) for x in xs] == [(2, 24)]
        part = _inspect_outputs(block.self_attn, xs, kws)[0]
    torch.testing.assert_close(part, full[:2])
    xs, kws = subsample_inputs(block.mlp, [x_mlp], [kw], max_tokens=30)  # strided tokens of every sequence
    assert xs[0].shape == (1, 30, x_mlp.shape[-1])
    flat = x_mlp.reshape(-1, x_mlp.shape[-1])
    torch.testing.assert_close(xs[0][0], flat[:: flat.shape[0] // 30][:30])


@pytest.mark.parametrize("objective", ["linear", "output", "refine"])
def test_every_objective_keeps_the_float_function_and_beats_rtn_on_outliers(objective):
    model = outlier_llama()
    ids = calib_ids(n=4, length=64)
    ref = logits(model, ids)
    twin = copy.deepcopy(model)
    lowbit.quantize(twin, awq_recipe(bits=3, quantize=False, clip=False, objective=objective), ids, progress=False)
    torch.testing.assert_close(logits(twin, ids), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    rtn = copy.deepcopy(model)
    lowbit.quantize(rtn, load_recipe("w3a16-rtn", group_size=32), progress=False)
    lowbit.quantize(model, awq_recipe(bits=3, objective=objective), ids, progress=False)
    err = {n: float((logits(m, ids) - ref).norm() / ref.norm()) for n, m in (("awq", model), ("rtn", rtn))}
    assert err["awq"] < err["rtn"], err


def test_group_block_statistics_match_the_whole_second_moment():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 96, generator=g) * torch.linspace(0.1, 6, 96)
    whole = InputStats.of(x[:100])
    whole.add(x[100:])
    blocks = InputStats.of(x[:100], group_size=32)
    blocks.add(x[100:])
    assert blocks.gram is None and blocks.blocks.shape == (3, 32, 32)
    torch.testing.assert_close(blocks.group_blocks(32), whole.group_blocks(32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocks.x_mean, whole.x_mean)
    s = torch.rand(96, generator=g) + 0.5
    torch.testing.assert_close(blocks.scaled(s).group_blocks(32), whole.scaled(s).group_blocks(32), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        blocks.group_blocks(16)  # the groups it was built for, nothing else
    with pytest.raises(RuntimeError):
        search_best_scale([torch.randn(8, 96, generator=g)], blocks, QuantSpec(bits=4, granularity=PerGroup(32)))
    # bf16 products summed in float32: each chunk's G rounds to bf16 (2^-9 relative), nothing accumulates there
    low = InputStats.of(x[:100], dtype=torch.bfloat16)
    low.add(x[100:])
    torch.testing.assert_close(low.gram, whole.gram, rtol=1e-2, atol=1e-2 * float(whole.gram.abs().max()))


def test_bf16_output_error_keeps_the_grid_order():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2000, 128, generator=g) * torch.linspace(0.1, 6, 128)
    gram = x.t() @ x / x.shape[0]
    d = torch.randn(6, 64, 128, generator=g) * torch.linspace(0.5, 1.5, 6)[:, None, None]
    exact = output_error(d, gram)
    low = output_error(d.bfloat16(), gram.bfloat16())
    torch.testing.assert_close(low, exact, rtol=5e-3, atol=0)
    assert torch.equal(low.argsort(), exact.argsort())


@pytest.mark.parametrize("mode", ["range", "asym"])
def test_asymmetric_clip_modes_never_lose_to_no_clip_and_asym_never_to_range(mode):
    g = torch.Generator().manual_seed(9)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32))
    w = torch.randn(64, 128, generator=g) + 0.3  # off-centre groups, where the two sides differ
    w[torch.rand(64, 128, generator=g) < 0.02] *= 6
    x = torch.randn(800, 128, generator=g)
    x[:, :4] *= 10
    st = InputStats.of(x)
    errs = {}
    for m in ("abs", "range", "asym"):
        ratios = search_best_clip(w, st, spec, max_shrink=0.5, clip_grid=20, mode=m)
        assert ratios.shape == ((64, 4, 2) if m == "asym" else (64, 4))
        assert bool((ratios > 0.5).all() and (ratios <= 1).all())
        lin = torch.nn.Linear(128, 64, bias=False)
        lin.weight.data.copy_(w)
        apply_clip(lin, ratios, m)
        errs[m] = group_output_error(w, pseudo_quantize_tensor(lin.weight, spec), x, 32)
    err_none = group_output_error(w, pseudo_quantize_tensor(w, spec), x, 32)
    tol = 1 + 1e-4
    assert bool((errs[mode] <= err_none * tol + 1e-9).all())
    assert float(errs[mode].sum()) < float(err_none.sum())
    if mode == "asym":  # its first pass is "range", and later passes keep each group's choice as a candidate
        assert bool((errs["asym"] <= errs["range"] * tol + 1e-9).all())


def test_asym_clip_clamps_each_side_by_its_own_ratio():
    w = torch.tensor([[-2.0, -1.0, 0.5, 4.0]])
    lin = torch.nn.Linear(4, 1, bias=False)
    lin.weight.data.copy_(w)
    apply_clip(lin, torch.tensor([[[0.75, 0.5]]]), "asym")  # lower side to -1.5, upper to 2
    torch.testing.assert_close(lin.weight.data, torch.tensor([[-1.5, -1.0, 0.5, 2.0]]))
    lin.weight.data.copy_(w)
    apply_clip(lin, torch.tensor([[0.75]]), "range")  # [-1.5, 3]
    torch.testing.assert_close(lin.weight.data, torch.tensor([[-1.5, -1.0, 0.5, 3.0]]))
    lin.weight.data.copy_(w)
    apply_clip(lin, torch.tensor([[0.75]]), "abs")  # [-3, 3]: the lower side is untouched
    torch.testing.assert_close(lin.weight.data, torch.tensor([[-2.0, -1.0, 0.5, 3.0]]))


def test_duo_scaling_both_holds_the_identity_and_both_families():
    from lowbit.algorithms.awq import scale_grid

    g = torch.Generator().manual_seed(10)
    w = torch.randn(16, 64, generator=g)
    x_mean = torch.rand(64, generator=g) * 5 + 0.1
    both = scale_grid(w, x_mean, 32, n_grid=20, duo_scaling="both")
    assert both.shape == (20, 64)
    torch.testing.assert_close(both[0], torch.ones(64))  # a = 0 without w_mean: no scaling at all
    # a = 1 ends each family: x_mean alone, normalised
    top = x_mean / (x_mean.max() * x_mean.min()).sqrt()
    torch.testing.assert_close(both[9], top)
    assert not torch.allclose(both[10], both[0])  # a = 0 with w_mean: 1 / w_mean


def test_awq_options_round_trip_and_bad_values_are_refused():
    from lowbit.errors import SpecError

    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    alg = AWQ(spec, clip_mode="asym", duo_scaling="both", stats_dtype="float32", forward_dtype="bfloat16")
    cfg = alg.config()
    assert (cfg["clip_mode"], cfg["duo_scaling"], cfg["stats_dtype"], cfg["forward_dtype"]) == (
        "asym", "both", "float32", "bfloat16")
    assert alg.forward_dtype is torch.bfloat16
    for bad in ({"clip_mode": "minmax"}, {"duo_scaling": "yes"}, {"stats_dtype": "float16"},
                {"forward_dtype": "int8"}, {"propagate": "gptq"}):
        with pytest.raises(SpecError):
            AWQ(spec, **bad)


@pytest.mark.parametrize("step", [{"clip_mode": "asym"}, {"duo_scaling": "both"}, {"forward_dtype": "bfloat16"},
                                  {"propagate": "quantized"}])
def test_awq_variants_beat_rtn_on_outliers(step):
    model = outlier_llama()
    ids = calib_ids(n=4, length=64)
    ref = logits(model, ids)
    rtn = copy.deepcopy(model)
    lowbit.quantize(rtn, load_recipe("w3a16-rtn", group_size=32), progress=False)
    lowbit.quantize(model, awq_recipe(bits=3, **step), ids, progress=False)
    err = {n: float((logits(m, ids) - ref).norm() / ref.norm()) for n, m in (("awq", model), ("rtn", rtn))}
    assert err["awq"] < err["rtn"], err


def test_coarse_grid_scores_a_subset_exactly_and_finds_a_single_minimum():
    from lowbit.algorithms.awq import scale_grid, search_best_scale_output

    model = outlier_llama()
    block, _, _, x_mlp = _attention_and_mlp_inputs(model, calib_ids(n=4, length=32))
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32))
    lins = [block.mlp.gate_proj, block.mlp.up_proj]
    w = torch.cat([m.weight.float() for m in lins])
    cand = scale_grid(w, x_mlp.reshape(-1, x_mlp.shape[-1]).abs().mean(0), 32, n_grid=20)
    before = [m.weight.clone() for m in lins]
    best, full = search_best_scale_output(lins, block.mlp, [x_mlp], [{}], cand, spec, torch.float32)
    got, part = search_best_scale_output(lins, block.mlp, [x_mlp], [{}], cand, spec, torch.float32, coarse=3)
    assert all(torch.equal(m.weight, b) for m, b in zip(lins, before))  # restored
    scored = ~part.isnan()
    assert 8 <= int(scored.sum()) <= 12 and bool(scored[torch.arange(0, 20, 3)].all()) and bool(scored[19])
    torch.testing.assert_close(part[scored], full[scored])
    # the coarse pass's pick is the best of what it scored, and where the full curve has one minimum, the full pick
    assert got == int(torch.where(scored, part, torch.inf).argmin())
    d = full.diff().sign()
    if int((d[1:] != d[:-1]).sum()) <= 1:
        assert got == best


@pytest.mark.parametrize("tokens", [500, 40])  # 40 < 96 features: a G of deficient rank
def test_triangular_output_error_matches_the_second_moment_form(tokens):
    from lowbit.algorithms.awq import gram_factor, output_error_tri

    g = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, 96, generator=g) * torch.linspace(0.1, 6, 96)
    gram = x.t() @ x / tokens
    d = torch.randn(5, 24, 96, generator=g) * 0.01
    L = gram_factor(gram)
    assert L is not None and torch.equal(L, L.tril())
    exact = output_error(d, gram)
    torch.testing.assert_close(output_error_tri(d, L), exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(output_error_tri(d, L, n_blocks=7), exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(output_error_tri(d.bfloat16(), L.bfloat16()), exact, rtol=1e-2, atol=0)
    direct = torch.stack([(x @ di.t()).pow(2).sum() for di in d]) / tokens
    torch.testing.assert_close(output_error_tri(d, L), direct, rtol=1e-4, atol=0)


def _block_inputs(model, ids, index):
    """The hidden states entering decoder block `index` when the model runs on ids."""
    got = []
    block = get_blocks(model, get_adapter(model))[index]
    h = block.register_forward_pre_hook(lambda m, args, kw: got.append((args[0] if args else kw["hidden_states"]).clone()),
                                        with_kwargs=True)
    try:
        logits(model, ids)
    finally:
        h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("propagate", ["float", "quantized"])
def test_propagate_decides_which_block_outputs_the_next_block_is_calibrated_on(propagate, monkeypatch):
    ids = calib_ids(n=4, length=32)
    model = outlier_llama()
    float_in = _block_inputs(model, ids, 1)
    seen = {}
    real = AWQ.quantize_block

    def spy(self, ctx):
        seen[ctx.index] = torch.cat([c.hidden for c in ctx.chunks]).clone()
        return real(self, ctx)

    monkeypatch.setattr(AWQ, "quantize_block", spy)
    lowbit.quantize(model, awq_recipe(bits=3, propagate=propagate), ids, progress=False)
    # block 0 is final once quantized, so the quantized model's block-1 inputs are its outputs
    quant_in = _block_inputs(model, ids, 1)
    assert float((quant_in - float_in).norm() / float_in.norm()) > 1e-3  # W3 moved them measurably
    want, other = (float_in, quant_in) if propagate == "float" else (quant_in, float_in)
    tol = 1e-4 * float(want.abs().max())
    torch.testing.assert_close(seen[1], want, rtol=1e-4, atol=tol)
    assert not torch.allclose(seen[1], other, rtol=1e-4, atol=tol)


def test_tied_scales_follow_grouped_query_heads():
    from lowbit.models import expand_tied, tie_scales

    n_rep, hd, kv = 3, 4, 2
    s_v = torch.rand(5, kv * hd) + 0.5
    s_o = expand_tied(s_v, n_rep, hd)
    assert s_o.shape == (5, kv * n_rep * hd)
    for h in range(kv * n_rep):  # query head h reads value head h // n_rep, as repeat_kv lays them out
        torch.testing.assert_close(s_o[:, h * hd:(h + 1) * hd], s_v[:, (h // n_rep) * hd:(h // n_rep + 1) * hd])
    torch.testing.assert_close(tie_scales(s_o, n_rep, hd), s_v)
    # untied scales: each value channel gets the geometric mean of the columns that read it
    s = torch.rand(kv * n_rep * hd) + 0.5
    want = torch.stack([s[[(v // hd) * n_rep * hd + r * hd + v % hd for r in range(n_rep)]].prod() ** (1 / n_rep)
                        for v in range(kv * hd)])
    torch.testing.assert_close(tie_scales(s, n_rep, hd), want)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_gqa_tied_value_scale_keeps_the_float_function_and_moves_o_proj(model_type):
    model = tiny_model(model_type)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    plain = copy.deepcopy(model)
    ids = calib_ids()
    ref = logits(model, ids)
    lowbit.quantize(plain, awq_recipe(quantize=False, clip=False), ids, progress=False)
    lowbit.quantize(model, awq_recipe(quantize=False, clip=False, tie_gqa=True), ids, progress=False)
    adapter = get_adapter(model)
    for blk, pb in zip(get_blocks(model, adapter), get_blocks(plain, adapter)):
        # without the tie nothing scales o_proj under GQA; with it, o_proj and v_proj both moved
        assert not torch.equal(blk.self_attn.o_proj.weight, pb.self_attn.o_proj.weight)
        assert not torch.equal(blk.self_attn.v_proj.weight, pb.self_attn.v_proj.weight)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_gqa_tied_value_scale_search_is_scored_and_beats_rtn(monkeypatch):
    model = outlier_llama()
    ids = calib_ids(n=4, length=64)
    ref = logits(model, ids)
    rtn = copy.deepcopy(model)
    lowbit.quantize(rtn, load_recipe("w3a16-rtn", group_size=32), progress=False)
    made = []
    real = AWQ.__init__
    monkeypatch.setattr(AWQ, "__init__", lambda self, *a, **k: (real(self, *a, **k), made.append(self))[0])
    lowbit.quantize(model, awq_recipe(bits=3, tie_gqa=True), ids, progress=False)
    (alg,) = made
    for i in range(model.config.num_hidden_layers):
        losses = alg.last_losses[f"model.layers.{i}.self_attn.v_proj"]
        assert losses.shape == (20,) and bool(torch.isfinite(losses).all())
        s = alg.last_scales[f"model.layers.{i}.self_attn.v_proj"]
        hd = model.config.hidden_size // model.config.num_attention_heads
        n_rep = model.config.num_attention_heads // model.config.num_key_value_heads
        # the scale o_proj took is tied across the query heads of each value head
        torch.testing.assert_close(s.view(-1, n_rep, hd), s.view(-1, n_rep, hd)[:, :1].expand(-1, n_rep, hd))
    err = {n: float((logits(m, ids) - ref).norm() / ref.norm()) for n, m in (("awq", model), ("rtn", rtn))}
    assert err["awq"] < err["rtn"], err


def test_attention_tokens_size_the_attention_objective_apart_from_the_mlp(monkeypatch):
    import lowbit.algorithms.awq as awq_mod

    asked = []
    real = awq_mod.subsample_inputs

    def spy(inspect, xs, kwargs, max_tokens):
        asked.append((type(inspect).__name__, max_tokens))
        return real(inspect, xs, kwargs, max_tokens)

    monkeypatch.setattr(awq_mod, "subsample_inputs", spy)
    model = outlier_llama()
    lowbit.quantize(model, awq_recipe(bits=4, output_tokens=48, attention_tokens=96), calib_ids(n=4, length=32),
                    progress=False)
    assert asked and set(asked) == {("LlamaAttention", 96), ("LlamaMLP", 48)}
    assert AWQ(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)),
               attention_tokens=96).config()["attention_tokens"] == 96


def test_nf4_presets_pack_nf4_and_awq_beats_nearest_rounding(tmp_path):
    """w4a16-nf4 (bitsandbytes' nf4 grid, blocks of 64 here 32) and w4a16-nf4-awq (AWQ's searches on
    that grid): codebook WQLinears whose codes index NF4, a lossless round trip, and AWQ closer to the
    float model than nearest rounding on the same grid."""
    from lowbit.quant.codebooks import NF4_CODEBOOK

    ids = calib_ids()
    ref = logits(tiny_model("llama"), ids)
    errs = {}
    for recipe in ("w4a16-nf4", "w4a16-nf4-awq"):
        model = lowbit.quantize(tiny_model("llama"), recipe, ids, group_size=32, progress=False)
        mods = [m for m in model.modules() if isinstance(m, WQLinear)]
        assert len(mods) == 14 and all(m.group_size == 32 and m.codebook is not None for m in mods)
        assert all(torch.equal(m.codebook, NF4_CODEBOOK.float()) for m in mods)
        w = mods[0].dequantize_weight().reshape(mods[0].out_features, -1, 32)
        unit = w / w.abs().amax(-1, keepdim=True)  # every block's absmax weight sits on the code +-1
        assert torch.isclose(unit[..., None], NF4_CODEBOOK.to(unit.dtype), atol=1e-3).any(-1).float().mean() > 0.99
        out = logits(model, ids)
        errs[recipe] = float((out - ref).norm() / ref.norm())
        lowbit.save(model, tmp_path / recipe)
        torch.testing.assert_close(logits(lowbit.load(tmp_path / recipe), ids), out, rtol=0, atol=0)
    assert errs["w4a16-nf4-awq"] < errs["w4a16-nf4"], errs


@pytest.mark.parametrize("symmetric", [False, True])
def test_refit_scales_never_loses_to_the_clipped_grid_and_stays_on_a_packable_grid(symmetric):
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=PerGroup(32))
    w = torch.randn(24, 128)
    x = torch.randn(512, 128) * torch.linspace(0.2, 3.0, 128)  # channels of unequal weight in the error
    stats = InputStats.of(x, group_size=32)
    ratios = search_best_clip(w, stats, spec, mode="asym" if not symmetric else "abs")
    lin = torch.nn.Linear(128, 24, bias=False)
    lin.weight.data.copy_(w)
    apply_clip(lin, ratios, "asym" if not symmetric else "abs")
    w_clip = lin.weight.detach().clone()
    blocks = stats.group_blocks(32)

    plain = WQLinear.from_weight(w_clip, None, spec)
    codes0, s0, z0 = refit_scales(w, w_clip, blocks, spec, passes=0)
    # no passes: exactly what from_weight stores
    assert torch.equal(WQLinear.from_codes(codes0, s0, z0, spec).dequantize_weight(), plain.dequantize_weight())

    codes, scales, zeros = refit_scales(w, w_clip, blocks, spec, passes=3)
    refit = WQLinear.from_codes(codes, scales, zeros, spec)
    # scales stored exactly (fp16), codes in range, zero points untouched
    assert torch.equal(refit.scales.float(), scales.reshape(24, -1))
    if zeros is not None:
        assert torch.equal(zeros, z0)
    e_plain = group_output_error(w, plain.dequantize_weight(), x, 32)
    e_refit = group_output_error(w, refit.dequantize_weight(), x, 32)
    # per group never worse (up to float rounding of the two error forms), and better overall
    assert bool((e_refit <= e_plain * (1 + 1e-4) + 1e-9).all())
    assert float(e_refit.sum()) < 0.995 * float(e_plain.sum())


@pytest.mark.parametrize("symmetric", [False, True])
def test_refit_cross_fits_the_whole_output_error_better_than_group_by_group(symmetric):
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=PerGroup(32))
    mode = "abs" if symmetric else "asym"
    w = torch.randn(48, 192)
    # correlated channels: the cross-group terms of X^T X matter
    x = (torch.randn(1024, 192) @ (0.3 * torch.randn(192, 192) + torch.eye(192))) * torch.linspace(0.2, 3.0, 192)
    stats = InputStats.of(x)
    lin = torch.nn.Linear(192, 48, bias=False)
    lin.weight.data.copy_(w)
    apply_clip(lin, search_best_clip(w, stats, spec, mode=mode), mode)
    w_clip = lin.weight.detach().clone()
    blocks, gram = stats.group_blocks(32), stats.gram / stats.n

    def row_error(codes, scales, zeros):
        d = w - WQLinear.from_codes(codes, scales, zeros, spec).dequantize_weight()
        return ((d @ gram) * d).sum(-1)

    e0 = row_error(*refit_scales(w, w_clip, blocks, spec, passes=0, gram=gram))
    e_group = row_error(*refit_scales(w, w_clip, blocks, spec, passes=2))
    codes, scales, zeros = refit_scales(w, w_clip, blocks, spec, passes=2, gram=gram)
    e_cross = row_error(codes, scales, zeros)
    # zero points untouched, every row no worse than the clip search left it, and the whole error
    # lower than the group-by-group refit reaches
    z0 = refit_scales(w, w_clip, blocks, spec, passes=0)[2]
    assert (zeros is None and z0 is None) if symmetric else torch.equal(zeros, z0)
    assert bool((e_cross <= e0 * (1 + 1e-4) + 1e-9).all())
    assert float(e_cross.sum()) < 0.98 * float(e_group.sum()) < 0.98 * float(e0.sum())


@pytest.mark.parametrize("cross", [False, True])
def test_awq_refit_option_packs_every_linear_and_is_recorded(cross):
    ids = calib_ids()
    model = tiny_model("llama")
    ref = logits(model, ids)
    rec = awq_recipe(refit=2, refit_cross=cross)
    lowbit.quantize(model, rec, ids, progress=False)
    adapter = get_adapter(model)
    for block in get_blocks(model, adapter):
        assert all(isinstance(m, WQLinear) for m in block_linears(block, adapter).values())
    out = logits(model, ids)
    assert float((out - ref).norm() / ref.norm()) < 0.5
    assert model.lowbit_recipe["algorithms"][0]["refit"] == 2
    assert model.lowbit_recipe["algorithms"][0]["refit_cross"] == float(cross)
    with pytest.raises(ValueError, match="refit"):
        awq_recipe(refit=-1).build()
    for bad in (1.5, "all"):
        with pytest.raises(ValueError, match="refit_cross"):
            awq_recipe(refit=2, refit_cross=bad).build()
