import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import GroupSizeError, InvalidWeightsError, SpecError
from lowbit.quant import (NF4_CODEBOOK, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, choose_qparams,
                          dequantize, fake_quantize, quantize, quantize_dequantize)

FAST = settings(max_examples=60, deadline=None)


def expand(t: torch.Tensor, shape, gran) -> torch.Tensor:
    """A qparam in its documented shape, repeated to the shape of the tensor it quantizes."""
    if isinstance(gran, PerGroup) and gran.group_size != -1:
        return t.repeat_interleave(gran.group_size, dim=-1)
    return t.expand(shape)


def sqnr(x, y):
    return (10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())).item()


GRANULARITIES = st.sampled_from(["tensor", "channel", "token", "group", "group-1"])


@st.composite
def cases(draw):
    kind = draw(GRANULARITIES)
    g = draw(st.sampled_from([8, 16, 32]))
    gran = {"tensor": PerTensor(), "channel": PerChannel(), "token": PerToken(),
            "group": PerGroup(g), "group-1": PerGroup(-1)}[kind]
    spec = QuantSpec(bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()), granularity=gran)
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    shape = (*lead, g * draw(st.integers(1, 4)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mag = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    x = torch.randn(shape, generator=gen) * mag
    if draw(st.booleans()):
        # A shift makes some groups one-signed: the clamped-zero-point path.
        x = x + draw(st.floats(-3, 3)) * mag
    clip = draw(st.sampled_from([1.0, 1.0, 0.9, 0.6]))
    return x, spec, clip


@FAST
@given(cases())
def test_round_trip_within_half_a_step(case):
    x, spec, clip = case
    qp = choose_qparams(x, spec, clip_ratio=clip)
    q = quantize(x, qp, spec)
    assert q.shape == x.shape
    assert q.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    dq = dequantize(q, qp, spec)
    s = expand(qp.scale, x.shape, spec.granularity)
    z = torch.zeros_like(s) if spec.symmetric else expand(qp.zero_point, x.shape, spec.granularity)
    err = (x - dq).abs()
    tol = 1e-6 * (x.abs() + s * 2**spec.bits)
    lo, hi = (spec.qmin - z) * s, (spec.qmax - z) * s  # what the grid can represent
    inside = (x >= lo - s / 2) & (x <= hi + s / 2)
    assert bool((err[inside] <= s[inside] / 2 + tol[inside]).all())
    # Outside the grid, values clip to its nearest end.
    clipped = torch.where(x < lo, lo, hi)
    assert torch.allclose(dq[~inside], clipped[~inside], rtol=1e-5, atol=0)
    if clip == 1.0:
        # With the full range nothing clips, one-signed groups included (the range holds 0).
        assert bool((err <= s / 2 + tol).all())


def test_one_signed_group_widens_its_range_to_zero_instead_of_clipping():
    # AutoAWQ's raw min/max would clamp the zero point at 0 and clip this group's top half.
    spec = QuantSpec(bits=4, granularity=PerChannel())
    x = torch.linspace(1.0, 2.0, 16).reshape(1, 16)
    qp = choose_qparams(x, spec)
    assert qp.scale.item() == pytest.approx(2 / 15) and qp.zero_point.item() == 0
    assert quantize_dequantize(x, spec).max().item() == pytest.approx(2.0)
    neg = choose_qparams(-x, spec)
    assert neg.zero_point.item() == 15 and quantize_dequantize(-x, spec).min().item() == pytest.approx(-2.0)


@pytest.mark.parametrize("gran,shape,expected", [
    (PerGroup(16), (2, 3, 64), (2, 3, 4)),
    (PerGroup(-1), (2, 3, 64), (2, 3, 1)),
    (PerChannel(), (8, 64), (8, 1)),
    (PerToken(), (2, 5, 64), (2, 5, 1)),
    (PerTensor(), (2, 5, 64), ()),
])
def test_qparam_shapes(gran, shape, expected):
    x = torch.randn(shape)
    for sym in (False, True):
        qp = choose_qparams(x, QuantSpec(bits=4, symmetric=sym, granularity=gran))
        assert qp.scale.shape == expected and qp.scale.dtype == torch.float32
        assert (qp.zero_point is None) == sym
        if not sym:
            assert qp.zero_point.shape == expected
            assert torch.equal(qp.zero_point, qp.zero_point.round())


def test_symmetric_scale_is_amax_over_half_range():
    x = torch.tensor([[-3.0, 1.0, 0.5, 7.5]])
    qp = choose_qparams(x, QuantSpec(bits=4, symmetric=True, granularity=PerChannel()))
    assert qp.scale.item() == pytest.approx(1.0)  # 7.5 / 7.5


def test_clip_ratio_tensor_per_group():
    x = torch.randn(4, 64)
    spec = QuantSpec(bits=4, granularity=PerGroup(32))
    r = torch.tensor([[1.0, 0.5]]).expand(4, 2)
    qp, full = choose_qparams(x, spec, clip_ratio=r), choose_qparams(x, spec)
    assert torch.allclose(qp.scale[:, 0], full.scale[:, 0])
    assert torch.allclose(qp.scale[:, 1], full.scale[:, 1] * 0.5)
    with pytest.raises(SpecError):
        choose_qparams(x, spec, clip_ratio=torch.ones(3))


def test_constant_groups_do_not_divide_by_zero():
    x = torch.zeros(2, 64)
    for sym in (False, True):
        spec = QuantSpec(bits=4, symmetric=sym, granularity=PerGroup(32))
        assert torch.equal(quantize_dequantize(x, spec), x)


@pytest.mark.parametrize("gran", [PerGroup(32), PerChannel(), PerTensor()])
def test_nf4_values_are_codebook_times_scale(gran):
    spec = QuantSpec(bits=4, dtype="nf4", granularity=gran)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    qp = choose_qparams(x, spec)
    assert torch.equal(qp.codebook, NF4_CODEBOOK)
    q = quantize(x, qp, spec)
    assert q.dtype == torch.uint8 and int(q.max()) < 16
    dq = dequantize(q, qp, spec)
    s = expand(qp.scale, x.shape, gran)
    assert torch.allclose(dq, NF4_CODEBOOK[q.long()] * s)
    # dq / s is a codebook value, and the nearest one: error at most half the widest gap.
    assert bool(((dq / s).unsqueeze(-1) - NF4_CODEBOOK).abs().amin(-1).le(1e-6).all())
    max_gap = NF4_CODEBOOK.diff().max()
    assert bool(((x - dq).abs() <= max_gap / 2 * s + 1e-6).all())


def test_nf4_codebook_shape():
    assert NF4_CODEBOOK.shape == (16,) and NF4_CODEBOOK.dtype == torch.float32
    assert torch.equal(NF4_CODEBOOK, NF4_CODEBOOK.sort().values)
    assert {-1.0, 0.0, 1.0} <= set(NF4_CODEBOOK.tolist())


@pytest.mark.parametrize("sym", [False, True])
def test_sqnr_8bit_per_channel(sym):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    assert sqnr(w, quantize_dequantize(w, QuantSpec(bits=8, symmetric=sym, granularity=PerChannel()))) > 40


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity=PerGroup(64)),
                                  QuantSpec(bits=4, symmetric=True, granularity=PerGroup(64)),
                                  QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(64))], ids=str)
def test_sqnr_4bit_g64(spec):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    assert sqnr(w, quantize_dequantize(w, spec)) > 18


def test_half_precision_input():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    dq = quantize_dequantize(w.to(torch.bfloat16), spec)
    assert dq.dtype == torch.bfloat16 and sqnr(w, dq.float()) > 35


# ---- fake quantization ----------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(cases())
def test_fake_quantize_forward_equals_quantize_dequantize(case):
    x, spec, clip = case
    qp = choose_qparams(x, spec, clip_ratio=clip)
    expected = dequantize(quantize(x, qp, spec), qp, spec)
    assert torch.equal(fake_quantize(x, spec, qp), expected)
    if clip == 1.0:
        assert torch.equal(fake_quantize(x, spec), quantize_dequantize(x, spec))


@pytest.mark.parametrize("sym", [False, True])
def test_fake_quantize_gradient_is_one_inside_zero_outside(sym):
    spec = QuantSpec(bits=4, symmetric=sym, granularity=PerGroup(32))
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    qp = choose_qparams(x, spec, clip_ratio=0.5)  # half the range: plenty of clipped values
    xr = x.clone().requires_grad_(True)
    fake_quantize(xr, spec, qp).sum().backward()
    s = expand(qp.scale, x.shape, spec.granularity)
    z = 0 if sym else expand(qp.zero_point, x.shape, spec.granularity)
    r = torch.round(x / s) + z
    inside = (r >= spec.qmin) & (r <= spec.qmax)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(xr.grad, inside.float())


def test_fake_quantize_gradient_flows_to_a_learnable_scale():
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerChannel())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    qp = choose_qparams(x, spec)
    scale = qp.scale.clone().requires_grad_(True)
    out = fake_quantize(x, spec, type(qp)(scale=scale))
    assert torch.equal(out, quantize_dequantize(x, spec))
    out.sum().backward()
    assert scale.grad.shape == scale.shape and bool(torch.isfinite(scale.grad).all())
    # Everything clipped: d out / d scale is the clipped code itself (LSQ).
    tiny = torch.full((4, 1), 1e-4, requires_grad=True)
    fake_quantize(x, spec, type(qp)(scale=tiny)).sum().backward()
    codes = torch.where(x > 0, float(spec.qmax), float(spec.qmin))
    assert torch.allclose(tiny.grad, codes.sum(-1, keepdim=True))


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    x = torch.randn(4, 64)
    x[1, 3] = bad
    with pytest.raises(InvalidWeightsError):
        choose_qparams(x, QuantSpec())
    with pytest.raises(InvalidWeightsError):
        quantize_dequantize(x, QuantSpec(dtype="nf4", granularity=PerChannel()))


def test_group_not_dividing_raises():
    with pytest.raises(GroupSizeError, match="group size 64 does not divide in_features 96"):
        choose_qparams(torch.randn(4, 96), QuantSpec(granularity=PerGroup(64)))


def test_mismatched_qparams_raise():
    spec = QuantSpec(granularity=PerGroup(32))
    qp = choose_qparams(torch.randn(4, 64), spec)
    with pytest.raises(SpecError):
        quantize(torch.randn(4, 128), qp, spec)
    with pytest.raises(SpecError):
        quantize(torch.randn(4, 64), type(qp)(scale=qp.scale), spec)  # asymmetric without zero
