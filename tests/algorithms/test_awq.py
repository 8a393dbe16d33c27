import copy

import pytest
import torch

import lowbit
from lowbit.algorithms import ALGORITHMS, AWQ
from lowbit.algorithms.awq import apply_clip, group_output_error, pseudo_quantize_tensor, search_best_clip
from lowbit.models import block_linears, get_adapter, get_blocks
from lowbit.nn import WQLinear
from lowbit.quant import PerGroup, QuantSpec
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
    for name, bits in (("w4a16-awq", 4), ("w3a16-awq", 3)):
        rec = load_recipe(name)
        assert rec.weights.bits == bits and rec.weights.granularity == PerGroup(128)
        (alg,) = rec.build()
        assert isinstance(alg, AWQ) and alg.propagate == "float"


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


def test_awq_beats_rtn_on_outlier_channels_at_w3():
    def outlier_llama():
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.embed_tokens.weight[:, [3, 17, 40, 58]] *= 20.0
        return model

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
    ratios = search_best_clip(w, x, spec, max_shrink=0.5, clip_grid=20, n_sample_token=256, oc_chunk=64)
    assert ratios.shape == (96, 4)
    assert bool((ratios >= 0.5).all() and (ratios <= 1).all())
    assert bool((ratios < 1).any())  # something was worth clipping
    xs = x[:: 1000 // 256][:256]
    clipped = torch.nn.Linear(128, 96, bias=False)
    clipped.weight.data.copy_(w)
    apply_clip(clipped, ratios)
    err_clip = group_output_error(w, pseudo_quantize_tensor(clipped.weight, spec), xs, 32)
    err_none = group_output_error(w, pseudo_quantize_tensor(w, spec), xs, 32)
    assert bool((err_clip <= err_none * (1 + 1e-5) + 1e-9).all())
    assert float(err_clip.sum()) < float(err_none.sum())


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
