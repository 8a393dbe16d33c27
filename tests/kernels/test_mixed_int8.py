"""mixed_int8_matmul: backends against the reference, outlier columns routed through 16-bit."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.kernels import mixed_int8_matmul, mixed_int8_matmul_ref, outlier_columns, prepare_int8
from tests.conftest import ONEDNN


def _weight(n=40, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    ws = w.abs().amax(1) / 127
    return torch.round(w / ws[:, None]).to(torch.int8), ws


def _x(m=24, k=64, cols=(5, 41), big=30.0, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    for c in cols:
        x[3, c] = big
        x[:, c] *= 4
    return x


def test_outlier_columns():
    x = _x()
    assert outlier_columns(x, 6.0).tolist() == [5, 41]
    assert outlier_columns(x, 1e6).numel() == 0


@pytest.mark.parametrize("backend", ["ref", "int_mm", ONEDNN, "fp32"])
def test_backends_match_reference(backend):
    qw, ws = _weight()
    x = _x()
    bias = torch.randn(40)
    p = prepare_int8(qw, backends=[backend] if backend != "ref" else [])
    got = mixed_int8_matmul(x, p, ws, bias, 6.0, backend=backend)
    want = mixed_int8_matmul_ref(x, qw, ws, bias, 6.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decomposition_beats_plain_int8_with_outliers():
    qw, ws = _weight()
    x = _x(big=60.0)
    w = qw.float() * ws[:, None]
    exact = x @ w.t()
    mixed = mixed_int8_matmul_ref(x, qw, ws, None, 6.0)
    plain = mixed_int8_matmul_ref(x, qw, ws, None, 1e9)  # no column over the threshold: all int8
    err = lambda y: float((y - exact).pow(2).mean())  # noqa: E731
    assert err(mixed) < err(plain) / 10


def test_bf16_in_bf16_out_and_leading_dims():
    qw, ws = _weight()
    x = _x().reshape(2, 12, 64).bfloat16()
    y = mixed_int8_matmul(x, prepare_int8(qw), ws)
    assert y.shape == (2, 12, 40) and y.dtype == torch.bfloat16


def test_bad_input():
    qw, ws = _weight()
    with pytest.raises(SpecError, match="threshold"):
        mixed_int8_matmul(_x(), prepare_int8(qw), ws, threshold=0.0)
    with pytest.raises(SpecError, match="features"):
        mixed_int8_matmul(_x(k=32, cols=(5,)), prepare_int8(qw), ws)
