"""Randomized block-Hadamard rotations: orthogonal, invertible, the same product in float."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.quant.rotation import check_rotation_block, hadamard, rotate, rotation_signs, unrotate


@pytest.mark.parametrize("n", [2, 8, 64])
def test_hadamard_is_symmetric_and_orthogonal(n):
    h = hadamard(n, torch.float64)
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_rotation_keeps_products_and_inverts():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 192, generator=g, dtype=torch.float64), torch.randn(5, 192, generator=g, dtype=torch.float64)
    s = rotation_signs(192, 3)
    assert s.dtype == torch.int8 and set(s.tolist()) == {-1, 1}
    assert torch.equal(s, rotation_signs(192, 3)) and not torch.equal(s, rotation_signs(192, 4))
    xr, wr = rotate(x, s, 64, torch.float64), rotate(w, s, 64, torch.float64)
    torch.testing.assert_close(xr @ wr.t(), x @ w.t())  # (W R^T)(R x) = W x
    torch.testing.assert_close(unrotate(xr, s, 64, torch.float64), x)
    torch.testing.assert_close(xr.norm(dim=1), x.norm(dim=1))
    # rotation mixes within a block only: the second block of x does not reach the first of R x
    x2 = x.clone()
    x2[:, 64:] = 0
    assert torch.equal(rotate(x2, s, 64, torch.float64)[:, 64:], torch.zeros(7, 128, dtype=torch.float64))


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    x[:, 5] = 50.0
    xr = rotate(x, rotation_signs(128), 64)
    ratio = lambda t: float((t.abs().amax(1) / t.pow(2).mean(1).sqrt()).mean())  # noqa: E731
    assert ratio(xr) < ratio(x) / 2


def test_bad_blocks_are_refused():
    with pytest.raises(SpecError, match="power of two"):
        hadamard(12)
    with pytest.raises(SpecError, match="power of two"):
        check_rotation_block(96, 48, "q_proj")
    with pytest.raises(SpecError, match="q_proj.*not divisible by the rotation block 64"):
        check_rotation_block(96, 64, "q_proj")
    with pytest.raises(SpecError, match="signs"):
        rotate(torch.zeros(2, 64), rotation_signs(32), 32)
