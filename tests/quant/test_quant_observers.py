import pytest
import torch

from lowbit.errors import InvalidWeightsError, SpecError
from lowbit.quant import (MinMaxObserver, MSEObserver, PerChannel, PerGroup, PerTensor, PercentileObserver, QuantSpec,
                          choose_qparams, dequantize, mse_clip_search, quantize)


def heavy_tailed(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(2.0)).sample(shape)


def qdq(x, qp, spec):
    return dequantize(quantize(x, qp, spec), qp, spec)


def group_err(x, y, spec, p=2.0):
    g = spec.granularity
    gs = g.group_size if isinstance(g, PerGroup) else x.shape[-1]
    return (x - y).abs().pow(p).reshape(*x.shape[:-1], -1, gs).sum(-1)


SPECS = [QuantSpec(bits=4, granularity=PerGroup(64)),
         QuantSpec(bits=4, symmetric=True, granularity=PerChannel()),
         QuantSpec(bits=3, symmetric=True, granularity=PerGroup(32)),
         QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(64))]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_mse_observer_never_worse_than_minmax_per_group(spec):
    w = heavy_tailed(32, 256)
    mm, ms = MinMaxObserver(spec), MSEObserver(spec, norm=2.0)
    mm.update(w)
    ms.update(w)
    e_mm = group_err(w, qdq(w, mm.calculate_qparams(), spec), spec)
    e_ms = group_err(w, qdq(w, ms.calculate_qparams(), spec), spec)
    assert bool((e_ms <= e_mm).all())
    assert e_ms.sum() < 0.98 * e_mm.sum()  # and better overall on heavy tails


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_mse_observer_default_norm_lowers_total_mse(spec):
    w = heavy_tailed(32, 256, seed=1)
    mm, ms = MinMaxObserver(spec), MSEObserver(spec)
    mm.update(w)
    ms.update(w)
    assert group_err(w, qdq(w, ms.calculate_qparams(), spec), spec).sum() < \
        group_err(w, qdq(w, mm.calculate_qparams(), spec), spec).sum()


def test_mse_clip_search_matches_observer_and_grid():
    spec = QuantSpec(bits=4, granularity=PerGroup(64))
    w = heavy_tailed(8, 128)
    r = mse_clip_search(w, spec, grid=20, max_shrink=0.5)
    assert r.shape == (8, 2)
    allowed = 1 - torch.arange(10) / 20
    assert bool(torch.isclose(r.unsqueeze(-1), allowed).any(-1).all())
    obs = MSEObserver(spec, grid=20, max_shrink=0.5)
    obs.update(w)
    assert torch.allclose(obs.calculate_qparams().scale, choose_qparams(w, spec, clip_ratio=r).scale)


def test_clip_search_on_gaussian_keeps_most_of_the_range():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    r = mse_clip_search(w, QuantSpec(bits=8, symmetric=True, granularity=PerChannel()))
    assert float(r.min()) > 0.7


def test_minmax_observer_accumulates_like_the_concatenation():
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    obs = MinMaxObserver(spec)
    batches = [torch.randn(2, 7, 32) * (i + 1) for i in range(3)]
    batches.append(torch.randn(1, 3, 32))  # another token count is fine per-tensor
    for b in batches:
        assert obs.update(b) is b
    whole = torch.cat([b.reshape(-1) for b in batches])
    ref = choose_qparams(whole.unsqueeze(0), spec)
    qp = obs.calculate_qparams()
    assert qp.scale.shape == () and torch.allclose(qp.scale, ref.scale) and torch.equal(qp.zero_point, ref.zero_point)


def test_minmax_observer_per_channel_weight_matches_choose_qparams():
    spec = QuantSpec(bits=4, granularity=PerGroup(32))
    w = torch.randn(8, 64)
    obs = MinMaxObserver(spec)
    obs.update(w)
    qp, ref = obs.calculate_qparams(), choose_qparams(w, spec)
    assert torch.equal(qp.scale, ref.scale) and torch.equal(qp.zero_point, ref.zero_point)


def test_percentile_observer_ignores_rare_outliers():
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerTensor())
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 1000.0
    pct, mm = PercentileObserver(spec, percentile=0.999), MinMaxObserver(spec)
    pct.update(x)
    mm.update(x)
    s_pct, s_mm = pct.calculate_qparams().scale, mm.calculate_qparams().scale
    assert s_pct * 100 < s_mm
    assert 2.5 < float(s_pct) * 127.5 < 4.5  # about the 99.9th percentile of |N(0, 1)|


def test_percentile_observer_asymmetric_averages_batches():
    spec = QuantSpec(bits=8, granularity=PerTensor())
    obs = PercentileObserver(spec, percentile=1.0)
    obs.update(torch.tensor([[0.0, 2.0]]))
    obs.update(torch.tensor([[-2.0, 4.0]]))
    assert (float(obs.lo), float(obs.hi)) == (-1.0, 3.0)


def test_observer_errors():
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    obs = MinMaxObserver(spec)
    with pytest.raises(SpecError, match="no data"):
        obs.calculate_qparams()
    obs.update(torch.randn(4, 16))
    with pytest.raises(SpecError, match="same rows"):
        obs.update(torch.randn(5, 16))
    with pytest.raises(InvalidWeightsError):
        obs.update(torch.full((4, 16), float("nan")))
    with pytest.raises(SpecError):
        MSEObserver(QuantSpec(dtype="codebook"))
    with pytest.raises(SpecError):
        PercentileObserver(spec, percentile=0.2)
