import pytest
import torch

from lowbit.errors import InvalidWeightsError, SpecError
from lowbit.quant import PerGroup, QuantSpec, choose_qparams, dequantize, kmeans_codebook, quantize, quantize_dequantize


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mse(x, y):
    return (x - y).pow(2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_beats_uniform_on_gaussian(bits):
    w = gaussian(128, 1024)
    g = PerGroup(128)
    learned = mse(w, quantize_dequantize(w, QuantSpec(bits=bits, dtype="codebook", granularity=g)))
    for sym in (False, True):
        uniform = mse(w, quantize_dequantize(w, QuantSpec(bits=bits, symmetric=sym, granularity=g)))
        assert learned < 0.95 * uniform


def test_kmeans_beats_nf4_on_the_data_it_learns():
    w = gaussian(128, 1024)
    g = PerGroup(64)
    learned = mse(w, quantize_dequantize(w, QuantSpec(bits=4, dtype="codebook", granularity=g)))
    nf4 = mse(w, quantize_dequantize(w, QuantSpec(bits=4, dtype="nf4", granularity=g)))
    assert learned < nf4


def test_kmeans_is_deterministic_sorted_and_bounded():
    v = gaussian(4096)
    a, b = kmeans_codebook(v, 3), kmeans_codebook(v, 3)
    assert torch.equal(a, b)
    assert a.shape == (8,) and a.dtype == torch.float32
    assert torch.equal(a, a.sort().values)
    assert float(a.abs().max()) <= 1.0
    # Scale-free: it sees x / absmax.
    assert torch.allclose(kmeans_codebook(v * 37.0, 3), a, atol=1e-6)


def test_kmeans_subsamples_large_inputs_reproducibly():
    v = gaussian(1 << 21, seed=3)
    assert torch.equal(kmeans_codebook(v, 2, iters=5, seed=1), kmeans_codebook(v, 2, iters=5, seed=1))


def test_kmeans_on_few_distinct_values_recovers_them():
    v = torch.tensor([-1.0, -0.25, 0.5, 1.0]).repeat(100)
    cb = kmeans_codebook(v, 2)
    assert torch.allclose(cb, torch.tensor([-1.0, -0.25, 0.5, 1.0]))


def test_codebook_qparams_and_codes():
    w = gaussian(16, 256)
    spec = QuantSpec(bits=3, dtype="codebook", granularity=PerGroup(64))
    qp = choose_qparams(w, spec)
    assert qp.codebook.shape == (8,) and qp.zero_point is None
    q = quantize(w, qp, spec)
    assert q.dtype == torch.uint8 and int(q.max()) < 8
    assert torch.allclose(dequantize(q, qp, spec), qp.codebook[q.long()] * qp.scale.repeat_interleave(64, -1))


def test_kmeans_bad_input():
    with pytest.raises(SpecError):
        kmeans_codebook(gaussian(64), 9)
    with pytest.raises(InvalidWeightsError):
        kmeans_codebook(torch.tensor([1.0, float("nan")]), 2)
