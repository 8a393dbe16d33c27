"""WQLinear against the float reference: stored codes, dequantization, forward on every path."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import GroupSizeError, InvalidWeightsError, SpecError
from lowbit.nn import WQLinear
from lowbit.quant import PerChannel, PerGroup, QuantSpec, quantize_dequantize

SPECS = [
    QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32)),
    QuantSpec(bits=4, symmetric=True, granularity=PerGroup(64)),
    QuantSpec(bits=3, symmetric=False, granularity=PerGroup(64)),
    QuantSpec(bits=2, symmetric=False, granularity=PerGroup(32)),
    QuantSpec(bits=8, symmetric=True, granularity=PerChannel()),
    QuantSpec(bits=8, symmetric=False, granularity=PerChannel()),
    QuantSpec(bits=8, symmetric=False, granularity=PerGroup(64)),
    QuantSpec(bits=5, symmetric=False, granularity=PerGroup(64)),
]


def sqnr_db(ref, x):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def make(spec, out_f=96, in_f=192, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    return w, b, WQLinear.from_weight(w, b, spec, name="layer")


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_stored_weight_is_round_to_nearest(spec):
    w, _, m = make(spec)
    dq = m.dequantize_weight()
    ref = quantize_dequantize(w, spec if isinstance(spec.granularity, PerGroup) else
                              QuantSpec(bits=spec.bits, symmetric=spec.symmetric, granularity=PerGroup(w.shape[1])))
    # fp16 storage of the scales is the only difference from the fp32 reference: it moves the
    # codes that sit on a rounding boundary by one step, never more
    step = m.scales.float().repeat_interleave(m.group_size, dim=1)
    assert ((dq - ref).abs() <= step * 1.01 + 1e-6).all()
    if spec.bits <= 4:  # at 8 bits the fp16 scale error times |q - z| <= 255 is itself ~0.1 step
        assert ((dq - ref).abs() > step * 0.02).float().mean() < 0.01
    assert ((dq - w).abs() <= step / 2 * 1.01 + 1e-6).all()  # within half a step everywhere
    assert sqnr_db(w, dq) > {2: 6, 3: 12, 4: 18, 5: 24, 8: 40}[spec.bits]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dequantized_reference(spec, tokens, dtype):
    w, b, m = make(spec)
    x = torch.randn(tokens, w.shape[1]).to(dtype)
    ref = F.linear(x.float(), m.dequantize_weight(), b)
    y = m(x)
    assert y.dtype == dtype and y.shape == (tokens, w.shape[0])
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 1.5e-2)  # fast paths take bf16 activations


def test_three_dim_inputs_keep_their_shape():
    w, b, m = make(SPECS[0])
    x = torch.randn(2, 5, w.shape[1])
    assert m(x).shape == (2, 5, w.shape[0])
    # the same token count runs the same backend: bit for bit
    assert torch.equal(m(x).reshape(10, -1), m(x.reshape(10, -1)))


def test_storage_bits_counts_codes_scales_and_zeros():
    _, _, m = make(QuantSpec(bits=4, symmetric=False, granularity=PerGroup(64)), out_f=96, in_f=192)
    groups = 192 // 64
    assert m.storage_bits() == 96 * 192 * 4 + 96 * groups * 16 + 96 * 8 * 4  # zeros padded to 8 per row
    _, _, s = make(QuantSpec(bits=4, symmetric=True, granularity=PerGroup(64)), out_f=96, in_f=192)
    assert s.storage_bits() == 96 * 192 * 4 + 96 * groups * 16


def test_state_dict_round_trip_rebuilds_the_kernels():
    w, b, m = make(SPECS[0])
    x = torch.randn(4, w.shape[1])
    y = m(x)
    fresh = WQLinear(192, 96, bits=4, group_size=32, symmetric=False, bias=True)
    fresh(x)  # builds kernels for the all-zero weight
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(x), y)


def test_bad_input_is_refused():
    w = torch.randn(8, 96)
    with pytest.raises(GroupSizeError, match="layer.*96"):
        WQLinear.from_weight(w, None, QuantSpec(bits=4, granularity=PerGroup(64)), name="layer")
    w[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="NaN"):
        WQLinear.from_weight(w, None, QuantSpec(bits=4, granularity=PerGroup(32)), name="layer")
    with pytest.raises(SpecError):
        WQLinear(96, 8, bits=9)


def test_act_order_perm_matches_float_reference():
    """Codes stored in act-order (columns permuted) compute W x with W in model order."""
    from lowbit.quant import QuantSpec, PerGroup
    torch.manual_seed(0)
    out_f, in_f, g = 24, 64, 16
    w = torch.randn(out_f, in_f)
    perm = torch.randperm(in_f)
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(g))
    ref = WQLinear.from_weight(w[:, perm], None, spec)  # quantized in the permuted order
    m = WQLinear.from_codes(ref.codes().to(torch.int32), ref.scales.float(), ref.zeros(), spec, perm=perm)
    w_hat = torch.empty_like(w).index_copy_(1, perm, ref.dequantize_weight())
    assert torch.equal(m.dequantize_weight(), w_hat)
    x = torch.randn(5, in_f)
    y, y_ref = m(x), x @ w_hat.t()
    assert torch.equal(y, ref(x[:, perm]))
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-2  # the kernels run in bf16
    assert torch.equal(m.g_idx().long(), torch.empty(in_f, dtype=torch.long).index_copy_(0, perm, torch.arange(in_f) // g))
    with pytest.raises(Exception, match="permutation"):
        WQLinear.from_codes(ref.codes().to(torch.int32), ref.scales.float(), ref.zeros(), spec, perm=torch.zeros(in_f, dtype=torch.long))
