import copy
import math

import pytest
import torch

import lowbit
from lowbit.algorithms import ALGORITHMS, SpQR
from lowbit.algorithms.gptq import Hessian, gptq_quantize
from lowbit.algorithms.spqr import group_minmax, loo_error_reduction, spqr_quantize
from lowbit.errors import SpecError
from lowbit.eval.size import bits_per_weight
from lowbit.models import block_linears, get_adapter, get_blocks
from lowbit.nn import SpQRLinear
from lowbit.nn.spqr_linear import spqr_summary
from lowbit.quant import PerGroup, QuantSpec
from lowbit.recipes import load_recipe

from ..conftest import tiny_model
from .test_gptq import correlated_inputs, out_err


def hessian(x):
    h = Hessian(x.shape[1], "cpu")
    h.add(x)
    return h.H


def module(r, bits=3, qbits=3):
    return SpQRLinear.from_codes(r["codes"], r["scale_codes"], r["scale_stats"], r["zero_codes"], r["zero_stats"],
                                 r["outliers"], bits=bits, qq_scale_bits=qbits, qq_zero_bits=qbits, perm=r["perm"])


def weight_with_outliers(out_f=64, in_f=64, share=0.01, seed=0):
    """Gaussian weights with a sprinkle of large ones (the structure SpQR's paper finds in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    hit = torch.rand(out_f, in_f, generator=g) < share
    return torch.where(hit, w * 8, w)


def test_registered_and_recipe_loads():
    assert ALGORITHMS["spqr"] is SpQR
    rec = load_recipe("w3a16-spqr")
    (alg,) = rec.build()
    assert isinstance(alg, SpQR) and rec.weights.bits == 3 and rec.weights.granularity == PerGroup(16)
    assert (alg.qq_scale_bits, alg.qq_zero_bits, alg.qq_groupsize) == (3, 3, 16)
    assert alg.outlier_threshold == 0.2 and alg.percdamp == 1.0 and alg.act_order
    rec = load_recipe("w4a16-spqr")
    (alg,) = rec.build()
    assert isinstance(alg, SpQR) and rec.weights.bits == 4 and rec.weights.granularity == PerGroup(32)
    with pytest.raises(SpecError, match="asymmetric"):
        SpQR(QuantSpec(bits=3, symmetric=True, granularity=PerGroup(16)))


@pytest.mark.parametrize("act_order", [False, True])
def test_packed_module_is_what_was_scored(act_order):
    x = correlated_inputs()
    w = weight_with_outliers()
    r = spqr_quantize(w, hessian(x), act_order=act_order, percdamp=0.01)
    m = module(r)
    assert torch.equal(m.dequantize_weight(), r["weight"])
    assert m.n_outliers == int(r["outlier_mask"].sum()) > 0
    assert (r["perm"] is not None) == act_order
    y = m(x[:32])
    assert torch.allclose(y, x[:32] @ r["weight"].t(), rtol=0.02, atol=0.02 * float(y.abs().mean()))


def test_outliers_reduce_output_error():
    x = correlated_inputs()
    w = weight_with_outliers(share=0.01)
    H = hessian(x)
    dense = spqr_quantize(w, H, outlier_threshold=math.inf, percdamp=0.01)
    sparse = spqr_quantize(w, H, outlier_threshold=0.2, percdamp=0.01)
    share = float(sparse["outlier_mask"].float().mean())
    assert not dense["outlier_mask"].any() and 0.003 < share < 0.05
    # measured: 0.34 of the error without outliers, at 1.3% of the weights kept
    assert out_err(w, sparse["weight"], x) < 0.5 * out_err(w, dense["weight"], x)
    # without outliers it is GPTQ with 3-bit statistics: about GPTQ's own error at g16
    gptq = gptq_quantize(w, H, QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16)), 16, act_order=True)
    assert out_err(w, dense["weight"], x) < 1.2 * out_err(w, gptq["weight"], x)
    # a lower threshold keeps more outliers and leaves less error
    more = spqr_quantize(w, H, outlier_threshold=0.05, percdamp=0.01)
    assert more["outlier_mask"].sum() > sparse["outlier_mask"].sum()
    assert out_err(w, more["weight"], x) < out_err(w, sparse["weight"], x)


def test_outlier_errors_are_zero_in_the_feedback():
    """An outlier is kept to fp16: the weight there equals the original (as corrected so far)."""
    torch.manual_seed(0)
    w = weight_with_outliers()
    r = spqr_quantize(w, torch.eye(64), percdamp=0.0, act_order=False)  # H = I: no error feedback
    mask = r["outlier_mask"]
    assert mask.any()
    assert torch.allclose(r["weight"][mask], w[mask], rtol=1e-3, atol=1e-3)
    # the largest weights are the outliers
    assert float(w[mask].abs().mean()) > 3 * float(w[~mask].abs().mean())


def test_leave_one_out_matches_refitting():
    torch.manual_seed(1)
    w = torch.randn(5, 16)
    w[2, 7] = 9.0
    d = torch.rand(16) + 0.5
    red = loo_error_reduction(w, d, 3)

    def err(v, dd):
        lo, hi = v.min(), v.max()
        s = (hi - lo) / 7
        q = ((v - lo) / s).round().clamp(0, 7) * s + lo
        return float(((q - v) / dd).square().sum())

    for r in range(5):
        base = err(w[r], d)
        for k in range(16):
            keep = torch.arange(16) != k
            assert red[r, k] == pytest.approx(base - err(w[r, keep], d[keep]), rel=1e-4, abs=1e-4)
    assert int(red[2].argmax()) == 7


def test_statistics_leave_out_excluded_weights():
    w = torch.tensor([[0.0, 0.1, 0.2, 5.0]])
    s, z = group_minmax(w, 3, torch.tensor([[False, False, False, True]]))
    assert float(s) == pytest.approx(0.2 / 7) and float(z) == pytest.approx(0.0)
    s, _ = group_minmax(torch.zeros(2, 4), 3)  # no spread anywhere: a positive scale all the same
    assert bool((s > 0).all())


def test_stacked_linears_round_as_one_by_one():
    x = correlated_inputs()
    H = hessian(x)
    w1, w2 = weight_with_outliers(32, seed=1), weight_with_outliers(48, seed=2) * 0.1
    both = spqr_quantize(torch.cat([w1, w2]), H, parts=[32, 48])
    one = spqr_quantize(w1, H)
    two = spqr_quantize(w2, H)
    assert torch.allclose(both["weight"], torch.cat([one["weight"], two["weight"]]), atol=1e-5)
    assert torch.equal(both["outlier_mask"], torch.cat([one["outlier_mask"], two["outlier_mask"]]))


def test_dead_inputs_are_ignored():
    """An input that is always 0 gets weight 0 before rounding (then whatever its group's grid gives
    0: the zero point is not an integer), so what the weight held there changes nothing."""
    x = correlated_inputs()
    x[:, 5] = 0
    w = torch.randn(16, 64) + 3
    w2 = w.clone()
    w2[:, 5] = 100.0
    a, b = spqr_quantize(w, hessian(x)), spqr_quantize(w2, hessian(x))
    assert torch.equal(a["weight"], b["weight"]) and not a["outlier_mask"][:, 5].any()


def test_tiny_model_end_to_end(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    rtn = lowbit.quantize(copy.deepcopy(model), load_recipe("w3a16-rtn", group_size=16), progress=False)
    q = lowbit.quantize(model, "w3a16-spqr", calib=ids, progress=False)
    adapter = get_adapter(q)
    mods = [m for b in get_blocks(q, adapter) for m in block_linears(b, adapter).values()]
    assert mods and all(isinstance(m, SpQRLinear) and m.perm is not None for m in mods)
    with torch.no_grad():
        got = q(ids).logits
        rtn_err = float((rtn(ids).logits - ref).norm() / ref.norm())
    # measured 0.53 against RTN's 0.64 (random weights leave little for outliers to catch)
    assert float((got - ref).norm() / ref.norm()) < 0.9 * rtn_err
    s = spqr_summary(q)
    assert 0 < s["outlier_fraction"] < 0.05
    assert bits_per_weight(q)["bits_per_weight"] == pytest.approx(s["bits_per_weight"])
    assert q.lowbit_recipe["algorithms"][0]["method"] == "spqr"
    lowbit.save(q, tmp_path / "m")
    back = lowbit.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, got)


def test_cli_refuses_other_formats_before_the_work():
    from lowbit.cli import check_recipe_fits_format
    from lowbit.errors import LowbitError

    check_recipe_fits_format(load_recipe("w3a16-spqr"), "lowbit")
    for fmt in ("gptq", "awq", "compressed-tensors"):
        with pytest.raises(LowbitError, match="lowbit"):
            check_recipe_fits_format(load_recipe("w3a16-spqr"), fmt)


def test_spqr_needs_calibration():
    with pytest.raises(Exception, match="calib"):
        lowbit.quantize(tiny_model("llama"), "w3a16-spqr", progress=False)


def test_refuses_out_features_off_the_second_level_grid():
    model = tiny_model("llama", num_key_value_heads=1, head_dim=8, num_attention_heads=8)  # k/v: 8 rows
    ids = torch.randint(0, 256, (2, 16))
    with pytest.raises(SpecError, match="qq_groupsize"):
        lowbit.quantize(model, "w3a16-spqr", calib=ids, progress=False)
