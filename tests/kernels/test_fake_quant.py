"""kernels.fake_quant: the grid searches' rounding. The torch definitions must give what a packed
WQLinear stores, and the C++ kernel the torch definitions' exact bits; the AWQ searches must choose
the same scales and clips with the kernel as without it."""

import pytest
import torch

from lowbit.algorithms.awq import InputStats, pseudo_quantize_tensor, search_best_clip, search_best_scale
from lowbit.kernels import _fq_cpp
from lowbit.kernels.fake_quant import (
    fake_quant_clamped,
    fake_quant_clamped_ref,
    fake_quant_scaled,
    fake_quant_scaled_ref,
)
from lowbit.nn import WQLinear
from lowbit.quant import PerGroup, QuantSpec

needs_ext = pytest.mark.skipif(_fq_cpp.load() is None, reason="the C++ fake_quant kernel did not build here")


def _weights(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, 1, generator=g) + 0.05)
    w[0, : in_f // 2] = 0.0  # all-zero groups: the scale's floor
    w[1] = w[1].abs() + 0.1  # groups without a negative value: the range still includes zero
    return w


@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, False), (4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("group_size", [32, 64, 20])
def test_reference_rounds_as_wqlinear_stores(bits, symmetric, group_size):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=PerGroup(group_size))
    w = _weights(6, group_size * 4)
    got = fake_quant_scaled_ref(w, torch.ones(1, w.shape[1]), group_size, spec)[0]
    assert torch.equal(got, pseudo_quantize_tensor(w, spec))
    if group_size % 8 == 0:
        packed = WQLinear.from_weight(w, None, spec)
        assert torch.equal(got, packed.dequantize_weight().float())


@needs_ext
@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (4, True), (6, False), (8, True)])
@pytest.mark.parametrize("group_size", [64, 128, 20, 7])
@pytest.mark.parametrize("subtract", [False, True])
def test_kernel_scaled_matches_the_reference_bit_for_bit(bits, symmetric, group_size, subtract):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=PerGroup(group_size))
    w = _weights(10, group_size * 3, seed=bits)
    s = torch.rand(5, w.shape[1], generator=torch.Generator().manual_seed(1)) * 3 + 0.05
    want = fake_quant_scaled_ref(w, s, group_size, spec, subtract)
    buf = torch.full((want.numel() + 7,), float("nan"))  # a larger, dirty buffer: only its head is written
    got = fake_quant_scaled(w, s, group_size, spec, subtract, out=buf)
    assert got.shape == want.shape and got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("bits, symmetric", [(3, False), (4, False), (4, True)])
@pytest.mark.parametrize("group_size", [64, 20])
def test_kernel_clamped_matches_the_reference_bit_for_bit(bits, symmetric, group_size):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=PerGroup(group_size))
    w = _weights(9, group_size * 3, seed=3)
    wg = w.reshape(9, 3, group_size).transpose(0, 1).contiguous()  # [ng, out, g]
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    r = torch.tensor([1.0, 0.85, 0.6, 0.5])[None, :, None]
    lo_b, hi_b = (lo[:, None] * r).contiguous(), (hi[:, None] * r.flip(1)).contiguous()
    want = fake_quant_clamped_ref(wg, lo_b, hi_b, spec)
    got = fake_quant_clamped(wg, lo_b, hi_b, spec)
    assert got.shape == (3, 4, 9, group_size)
    assert torch.equal(got, want)


def test_bad_shapes_are_named():
    w, spec = torch.randn(4, 64), QuantSpec(bits=4)
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant_scaled(w, torch.ones(2, 64), 48, spec)
    with pytest.raises(ValueError, match=r"s \[k, I\]"):
        fake_quant_scaled(w, torch.ones(2, 32), 32, spec)
    with pytest.raises(ValueError, match="at least"):
        fake_quant_scaled(w, torch.ones(2, 64), 32, spec, out=torch.empty(10))


@needs_ext
@pytest.mark.parametrize("mode", ["abs", "asym"])
def test_awq_searches_choose_the_same_with_and_without_the_kernel(monkeypatch, mode):
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 128, generator=g) * (torch.rand(128, generator=g) * 4 + 0.1)
    w = torch.randn(48, 128, generator=g)
    full, blocks = InputStats.of(x), InputStats.of(x, group_size=32)
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(_fq_cpp.EXT_ENV, flag)
        s, losses = search_best_scale([w[:20], w[20:]], full, spec, loss_dtype=torch.float32)
        clip = search_best_clip(w, blocks, spec, mode=mode)
        got[flag] = (s, losses, clip)
    assert torch.equal(got["1"][0], got["0"][0])
    assert torch.equal(got["1"][1], got["0"][1])
    assert torch.equal(got["1"][2], got["0"][2])
