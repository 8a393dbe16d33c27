import math

import pytest
import torch
from torch import nn

from lowbit.errors import SpecError
from lowbit.nn import FakeQuantize, FakeQuantLinear, W4A8Linear, WQLinear
from lowbit.quant import (PerChannel, PerGroup, PerTensor, PerToken, QParams, QuantSpec, choose_qparams, dequantize,
                          grad_scale, lsq_grad_factor, quantize)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear(out_f=48, in_f=64, bias=True, seed=0):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=_gen(seed)) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=_gen(seed + 1)))
    return lin


# ---- straight-through and LSQ gradients -----------------------------------------------------------

@pytest.mark.parametrize("spec", [
    QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16)),
    QuantSpec(bits=4, symmetric=True, granularity=PerChannel()),
    QuantSpec(bits=2, symmetric=False, granularity=PerTensor()),
])
def test_ste_gradient_passes_inside_the_grid_and_stops_outside(spec):
    x = torch.randn(6, 64, generator=_gen())
    qp = choose_qparams(x, spec, clip_ratio=0.6)  # a shrunk range: some values clip
    fq = FakeQuantize(spec, qp.scale, qp.zero_point)
    xr = x.clone().requires_grad_(True)
    out = fq(xr)
    g = torch.randn(out.shape, generator=_gen(1))
    out.backward(g)
    # the clipped positions are the ones whose value the grid cannot reach
    q = quantize(x, _stored(fq), spec)
    clipped = (dequantize(q, _stored(fq), spec) - x).abs() > 0.5001 * _expand(fq.scale, x, spec)
    assert 0 < int(clipped.sum()) < x.numel()
    assert torch.equal(xr.grad, torch.where(clipped, torch.zeros_like(g), g))


def _stored(fq):
    return QParams(scale=fq.scale.detach().half().float(), zero_point=fq.zero_point)


def _expand(s, x, spec):
    s = s.detach().half().float()
    if isinstance(spec.granularity, PerGroup):
        return s.repeat_interleave(spec.granularity.group_size, dim=-1)
    return s.expand(x.shape)


def test_lsq_scale_gradient_matches_the_formula_and_its_gradient_scale():
    """d out / d s = round(v) - v inside the grid, qmin/qmax - zero outside (v = x / s + zero), times
    LSQ's 1 / sqrt(N Q_P)."""
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    x = torch.randn(4, 32, generator=_gen(3))
    qp = choose_qparams(x, spec, clip_ratio=0.7)
    s0 = qp.scale.half().float()
    fq = FakeQuantize(spec, s0, qp.zero_point, learnable=True)
    fq(x).sum().backward()
    s = s0.repeat_interleave(16, 1)
    z = qp.zero_point.repeat_interleave(16, 1)
    v = x / s + z
    r = v.round()
    inside = (r >= 0) & (r <= 7)
    per_elem = torch.where(inside, r - v, r.clamp(0, 7) - z)
    expected = per_elem.reshape(4, 2, 16).sum(-1) / math.sqrt(16 * 7)
    assert lsq_grad_factor(spec, 16) == pytest.approx(1 / math.sqrt(16 * 7))
    assert torch.allclose(fq.scale.grad, expected, rtol=1e-5, atol=1e-6)
    # without the gradient scale: the plain LSQ derivative
    fq2 = FakeQuantize(spec, s0, qp.zero_point, learnable=True, lsq_grad_scale=False)
    fq2(x).sum().backward()
    assert torch.allclose(fq2.scale.grad, expected * math.sqrt(16 * 7), rtol=1e-5, atol=1e-5)


def test_lsq_scale_gradient_agrees_with_a_finite_difference_of_the_clipping_loss():
    """With every value clipped the output is linear in the scale, so a finite difference is exact."""
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerTensor())
    x = torch.randn(8, 16, generator=_gen(4)) + 5.0  # far outside a tiny grid: all clip to qmax
    s = torch.tensor(0.01)
    fq = FakeQuantize(spec, s, learnable=True, lsq_grad_scale=False)
    fq(x).sum().backward()
    h = 1e-3
    up = FakeQuantize(spec, s + h)(x).sum()
    down = FakeQuantize(spec, s - h)(x).sum()
    assert fq.scale.grad.item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-2)


def test_grad_scale_changes_the_gradient_not_the_value():
    x = torch.randn(5, requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 0.25))


def test_dynamic_per_token_activation_fake_quant():
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerToken(), dynamic=True)
    x = torch.randn(2, 5, 32, generator=_gen(5))
    y = FakeQuantize(spec)(x)
    err = (y - x).abs().amax(-1)
    step = x.abs().amax(-1) / 127.5
    assert bool((err <= 0.5001 * step).all()) and not torch.equal(y, x)


# ---- FakeQuantLinear --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,sym,group", [(3, False, 16), (4, True, 32), (2, False, -1)])
def test_from_float_starts_at_rtn_and_converts_to_the_same_weight(bits, sym, group):
    lin = _linear()
    spec = QuantSpec(bits=bits, symmetric=sym, granularity=PerGroup(group) if group > 0 else PerChannel())
    fq = FakeQuantLinear.from_float(lin, spec)
    rtn = WQLinear.from_weight(lin.weight, lin.bias, spec)
    assert torch.equal(fq.quantized_weight().detach(), rtn.dequantize_weight())
    packed = fq.to_wqlinear()
    assert torch.equal(packed.qweight, rtn.qweight) and torch.equal(packed.scales, rtn.scales)


def test_from_wqlinear_keeps_the_ptq_grid_and_act_order():
    lin = _linear(seed=7)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    rtn = WQLinear.from_weight(lin.weight, lin.bias, spec)
    perm = torch.randperm(64, generator=_gen(8))
    # the same codes, but stored in act-order: column j is input channel perm[j]
    w_perm = lin.weight.detach()[:, perm]
    qp = choose_qparams(w_perm, spec)
    q = WQLinear.from_codes(quantize(w_perm, qp, spec), qp.scale.half().float(), qp.zero_point, spec,
                            bias=lin.bias.detach(), perm=perm)
    for packed in (rtn, q):
        fq = FakeQuantLinear.from_wqlinear(packed)
        assert torch.equal(fq.quantized_weight().detach(), packed.dequantize_weight())
        back = fq.to_wqlinear()
        for name in ("qweight", "scales", "qzeros"):
            assert torch.equal(getattr(back, name), getattr(packed, name)), name
        assert (back.perm is None) == (packed.perm is None)
        if packed.perm is not None:
            assert torch.equal(back.perm, packed.perm)


def test_trained_fake_quant_linear_forward_equals_its_converted_wqlinear():
    torch.manual_seed(0)
    lin = _linear(seed=11)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    fq = FakeQuantLinear.from_float(lin, spec)
    opt = torch.optim.Adam(fq.parameters(), lr=1e-2)
    x = torch.randn(4, 10, 64, generator=_gen(12))
    target = lin(x).detach()
    for _ in range(10):
        opt.zero_grad()
        loss = (fq(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    assert not torch.equal(fq.weight_quant.scale.detach(), FakeQuantLinear.from_float(lin, spec).weight_quant.scale)
    packed = fq.to_wqlinear()
    with torch.no_grad():
        ref = fq(x)
        assert torch.equal(packed.dequantize_weight(), fq.quantized_weight())
        out = packed(x)  # the kernels compute in bf16
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2


def test_input_fake_quant_and_its_refusal_to_pack():
    lin = _linear()
    spec = QuantSpec(bits=4, granularity=PerGroup(32))
    act = QuantSpec(bits=8, symmetric=True, granularity=PerToken(), dynamic=True)
    fq = FakeQuantLinear.from_float(lin, spec, input_spec=act)
    x = torch.randn(3, 64, generator=_gen(2))
    assert not torch.equal(fq(x), FakeQuantLinear.from_float(lin, spec)(x))
    with pytest.raises(SpecError, match="W4A8Linear"):
        fq.to_wqlinear()
    with pytest.raises(SpecError, match="symmetric int4"):
        fq.to_w4a8linear()
    sym = FakeQuantLinear.from_float(lin, spec.replace(symmetric=True), input_spec=act)
    with pytest.raises(SpecError, match="two-level"):  # float group scales do not fit the integer GEMM
        sym.to_w4a8linear()


def test_bad_specs_are_refused():
    lin = _linear()
    with pytest.raises(SpecError, match="integer"):
        FakeQuantLinear.from_float(lin, QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(32)))
    with pytest.raises(SpecError, match="group size 48"):
        FakeQuantLinear.from_float(lin, QuantSpec(bits=4, granularity=PerGroup(48)))
    with pytest.raises(SpecError, match="per-token scales need dynamic"):
        FakeQuantLinear.from_float(lin, QuantSpec(bits=4, granularity=PerGroup(32)),
                                   input_spec=QuantSpec(bits=8, granularity=PerToken()))


# ---- learned zero points and frozen codes (EfficientQAT) ------------------------------------------

def test_learned_zero_point_rounds_straight_through_and_gets_minus_scale_where_clipped():
    """out = (clamp(round(x / s) + z) - z) * s: z cancels inside the grid, so only clipped values
    (where out = (qmin|qmax - z) * s) pass a gradient, -s each. A fractional z behaves as round(z)."""
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    x = torch.randn(4, 32, generator=_gen(6))
    qp = choose_qparams(x, spec, clip_ratio=0.6)
    s0 = qp.scale.half().float()
    fq = FakeQuantize(spec, s0, qp.zero_point, learnable_zero=True)
    assert isinstance(fq.zero_point, nn.Parameter) and fq.zero_point.requires_grad
    with torch.no_grad():
        fq.zero_point.add_(0.3)  # rounds back to the same integers
    out = fq(x)
    assert torch.equal(out, FakeQuantize(spec, s0, qp.zero_point)(x))
    g = torch.randn(out.shape, generator=_gen(7))
    out.backward(g)
    s = s0.repeat_interleave(16, 1)
    r = (x / s + qp.zero_point.repeat_interleave(16, 1)).round()
    clipped = (r < 0) | (r > 7)
    assert bool(clipped.any())
    expected = (g * torch.where(clipped, -s, torch.zeros_like(s))).reshape(4, 2, 16).sum(-1)
    assert torch.allclose(fq.zero_point.grad, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        fq.zero_point.fill_(9.4)  # outside the code range: clamped to qmax
    assert torch.equal(fq.qparams(16).zero_point, torch.full_like(qp.zero_point, 7.0))


def test_frozen_codes_keep_the_forward_and_train_only_the_scale():
    lin = _linear(in_f=64, out_f=24)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(16))
    m = FakeQuantLinear.from_float(lin, spec)
    with torch.no_grad():
        m.weight.add_(torch.randn(m.weight.shape, generator=_gen(8)) * 0.01)  # off the grid
    x = torch.randn(5, 64, generator=_gen(9))
    before = m(x).detach()
    w0 = m.weight.detach().clone()
    m.freeze_codes()
    assert m.codes.dtype == torch.uint8 and not m.weight.requires_grad and "codes" in m.state_dict()
    assert torch.equal(m(x), before)
    m(x).pow(2).sum().backward()
    assert m.weight.grad is None and m.weight_quant.scale.grad is not None
    # the gradient of (codes - zero) * scale: the codes themselves, not LSQ's round(v) - v (0 on the grid)
    assert bool((m.weight_quant.scale.grad != 0).all())
    with torch.no_grad():
        m.weight_quant.scale.mul_(1.5)  # far enough to change codes were they re-rounded
    assert torch.equal(m.weight, w0)
    w = m.quantized_weight()
    assert torch.allclose(m.to_wqlinear().dequantize_weight(), w, rtol=0, atol=1e-6)


# ---- W4A8: two-level group scales, int8 activations per token -------------------------------------

@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_w4a8_start_computes_what_the_packed_module_computes_and_trains_back_into_one(granularity):
    lin = _linear(bias=True)
    packed = W4A8Linear.from_float(lin, weight_granularity=granularity, group_size=32)
    fq = FakeQuantLinear.from_w4a8linear(packed)
    assert (fq.group_mult is not None) == (granularity == "group")
    x = torch.randn(2, 5, 64, generator=_gen(3)) * 3
    with torch.no_grad():
        assert torch.allclose(fq.quantized_weight(), packed.dequantize_weight(), rtol=1e-6, atol=0)
        # the kernel's int32 GEMM against float arithmetic on the same grids: float32 rounding apart
        assert torch.allclose(fq(x), packed(x), rtol=1e-4, atol=1e-5)
    opt = torch.optim.Adam([fq.weight, fq.weight_quant.scale], lr=1e-3)
    target = lin(x).detach()
    for _ in range(5):
        opt.zero_grad()
        loss = (fq(x) - target).pow(2).mean()
        loss.backward()
        assert fq.weight.grad.abs().sum() > 0
        opt.step()  # the scales get LSQ gradients once the latent weights leave the grid points
    assert fq.weight_quant.scale.shape == (48, 1)
    assert not torch.allclose(fq.weight_quant.scale.detach().reshape(-1), packed.weight_scale.expand(48, 1).reshape(-1))
    again = fq.to_w4a8linear()
    assert again.weight_granularity == ("group" if granularity == "group" else "channel")
    if granularity == "group":
        assert torch.equal(again.group_scale, packed.group_scale)  # the integer multipliers stay fixed
    with torch.no_grad():
        assert torch.allclose(again.dequantize_weight(), fq.quantized_weight(), rtol=1e-6, atol=1e-9)
        assert torch.allclose(again(x), fq(x), rtol=1e-4, atol=1e-5)


def test_w4a8_input_rounding_is_the_kernels_per_token_int8():
    from lowbit.kernels import quantize_per_token

    packed = W4A8Linear.from_float(_linear(), weight_granularity="group", group_size=32)
    fq = FakeQuantLinear.from_w4a8linear(packed)
    x = torch.randn(4, 64, generator=_gen(4))
    x[0, 3] = 40.0  # an outlier sets its token's scale: absmax / 127, not lowbit.quant's / 127.5
    q, s = quantize_per_token(x)
    with torch.no_grad():
        expect = torch.nn.functional.linear(q.float() * s, fq.quantized_weight(), fq.bias)
        assert torch.allclose(fq(x), expect, rtol=1e-6, atol=1e-6)
    fq.freeze_codes()
    assert torch.equal(fq.to_w4a8linear().int4_codes(), packed.int4_codes())


def test_two_level_needs_w4a8_weights():
    with pytest.raises(SpecError, match="two-level"):
        FakeQuantLinear(64, 48, QuantSpec(bits=3, symmetric=True, granularity=PerGroup(32)), two_level=True)
    fq = FakeQuantLinear.from_float(_linear(), QuantSpec(bits=4, symmetric=True, granularity=PerGroup(-1)))
    with pytest.raises(SpecError, match="int8 per token"):  # no input quantization: a WQLinear, not W4A8
        fq.to_w4a8linear()


def test_w4a8_group_multipliers_train_straight_through_and_pack_as_integers():
    packed = W4A8Linear.from_float(_linear(), weight_granularity="group", group_size=32)
    fq = FakeQuantLinear.from_w4a8linear(packed)
    fq.freeze_codes()
    fq.group_mult.requires_grad_(True)
    x = torch.randn(6, 64, generator=_gen(5))
    fq(x).pow(2).sum().backward()
    assert fq.group_mult.grad is not None and fq.group_mult.grad.abs().sum() > 0
    with torch.no_grad():
        k = packed.group_scale.float()
        fq.group_mult.copy_(k + 0.3)  # rounds back to k: the forward does not move
        assert torch.equal(fq.weight_qparams().scale, fq.weight_quant.scale * k)
        fq.group_mult[0, 0] = float(packed.group_scale[0, 0]) - 0.7  # rounds to k - 1 (at least 1)
        fq.group_mult[1, 1] = 40.0  # clamped to 16: q * k must stay in int8
        again = fq.to_w4a8linear()
        want = k.clone()
        want[0, 0] = max(1.0, want[0, 0] - 1)
        want[1, 1] = 16.0
        assert torch.equal(again.group_scale.float(), want)
        assert torch.equal(again.int4_codes(), packed.int4_codes())
        assert torch.allclose(again.dequantize_weight(), fq.quantized_weight(), rtol=1e-6, atol=1e-9)
