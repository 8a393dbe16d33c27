import math

import pytest
import torch
from torch import nn

from lowbit.errors import SpecError
from lowbit.nn import FakeQuantize, FakeQuantLinear, WQLinear
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
    with pytest.raises(SpecError, match="W8A8"):
        fq.to_wqlinear()


def test_bad_specs_are_refused():
    lin = _linear()
    with pytest.raises(SpecError, match="integer"):
        FakeQuantLinear.from_float(lin, QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(32)))
    with pytest.raises(SpecError, match="group size 48"):
        FakeQuantLinear.from_float(lin, QuantSpec(bits=4, granularity=PerGroup(48)))
    with pytest.raises(SpecError, match="per-token scales need dynamic"):
        FakeQuantLinear.from_float(lin, QuantSpec(bits=4, granularity=PerGroup(32)),
                                   input_spec=QuantSpec(bits=8, granularity=PerToken()))
