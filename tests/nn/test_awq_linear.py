"""AutoAWQ's GEMM and GEMV layouts: the words bit for bit, lossless conversion to and from WQLinear,
the forward on lowbit's kernels, and refusal of what the layouts cannot hold."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import GroupSizeError, SpecError
from lowbit.nn import AWQLinearGEMM, AWQLinearGEMV, WQLinear
from lowbit.nn.awq_linear import AWQ_ORDER, gemv_zeros_width, pack_int32, unpack_int32
from lowbit.quant import PerChannel, PerGroup, QuantSpec

LAYOUTS = [AWQLinearGEMM, AWQLinearGEMV]
ASYM4 = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))


def random_codes(out_f, in_f, group_size, seed=0, bias=True):
    """Random codes, zero points over the whole range and fp16 scales: a weight no quantizer would
    pick, so every nibble position and value is exercised."""
    g = torch.Generator().manual_seed(seed)
    ng = in_f // (in_f if group_size == -1 else group_size)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_f, ng), generator=g).float()
    scales = (torch.rand(out_f, ng, generator=g) * 0.1 + 1e-3).half()
    b = torch.randn(out_f, generator=g) if bias else None
    return codes, scales, zeros, b


def awq_unpack_reference(words: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """FORMATS.md's unpacking, written independently: shift by 0, 4, .., 28, then re-index the
    interleaved (GEMM) words with AWQ_REVERSE_ORDER."""
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    cols = []
    for c in range(words.shape[1]):
        w = words[:, c].to(torch.int64) & 0xFFFFFFFF
        nib = [(w >> (4 * i)) & 15 for i in range(8)]
        cols += [nib[reverse[j]] for j in range(8)] if interleaved else nib
    return torch.stack(cols, dim=1).to(torch.uint8)


def test_gemm_word_interleave_matches_the_autoawq_order():
    codes = torch.arange(8).repeat(3, 1)  # column j holds j
    word = pack_int32(codes, AWQ_ORDER)[0, 0].item() & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 15 for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    assert pack_int32(codes)[0, 0].item() & 0xFFFFFFFF == 0x76543210


@pytest.mark.parametrize("interleaved", [True, False])
def test_unpacking_agrees_with_the_format_description(interleaved):
    g = torch.Generator().manual_seed(1)
    words = torch.randint(-2**31, 2**31 - 1, (5, 6), generator=g, dtype=torch.int64).to(torch.int32)
    order = AWQ_ORDER if interleaved else tuple(range(8))
    ours = unpack_int32(words, order)
    assert torch.equal(ours, awq_unpack_reference(words, interleaved))
    assert torch.equal(pack_int32(ours, order), words)


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_codes_scales_zeros_survive_packing_exactly(cls, group_size):
    codes, scales, zeros, b = random_codes(48, 256, group_size)
    m = cls.from_codes(codes, scales, zeros, group_size=group_size, bias=b)
    assert torch.equal(m.codes(), codes)
    assert torch.equal(m.zeros(), zeros)
    assert torch.equal(m.group_scales(), scales)
    assert torch.equal(m.bias, b)


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
def test_tensors_have_autoawq_names_shapes_and_dtypes(cls):
    codes, scales, zeros, _ = random_codes(48, 256, 64, bias=False)
    m = cls.from_codes(codes, scales, zeros, group_size=64, bias=torch.zeros(48, dtype=torch.float16))
    sd = m.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "bias"}
    if cls is AWQLinearGEMM:
        want = {"qweight": (256, 6), "qzeros": (4, 6), "scales": (4, 48)}
    else:  # 4 groups fill one word; G = 64 pads to 2 words (AutoAWQ's calculate_zeros_width)
        want = {"qweight": (48, 32), "qzeros": (48, 2), "scales": (48, 16)}
    assert {k: tuple(sd[k].shape) for k in want} == want
    assert sd["qweight"].dtype == sd["qzeros"].dtype == torch.int32
    assert sd["scales"].dtype == sd["bias"].dtype == torch.float16


def test_gemm_words_hold_transposed_interleaved_codes():
    codes, scales, zeros, _ = random_codes(16, 64, 32, bias=False)
    m = AWQLinearGEMM.from_codes(codes, scales, zeros, group_size=32)
    assert torch.equal(awq_unpack_reference(m.qweight, True), codes.t())
    assert torch.equal(awq_unpack_reference(m.qzeros, True).float(), zeros.t())
    assert torch.equal(m.scales, scales.t())


def test_gemv_words_hold_sequential_codes_and_padding_is_zero():
    codes, scales, zeros, _ = random_codes(16, 256, 32, bias=False)  # 8 groups: 1 word, padded to 4
    m = AWQLinearGEMV.from_codes(codes, scales, zeros, group_size=32)
    assert torch.equal(awq_unpack_reference(m.qweight, False), codes)
    z = awq_unpack_reference(m.qzeros, False)
    assert z.shape == (16, 32) and torch.equal(z[:, :8].float(), zeros) and not z[:, 8:].any()
    assert torch.equal(m.scales[:, :8], scales) and not m.scales[:, 8:].any()


@pytest.mark.parametrize("in_f,group_size,width", [(256, 128, 1), (4096, 128, 4), (4096, 64, 8), (4096, 32, 16),
                                                   (192, 64, 2), (96, 32, 4), (8192, 256, 4), (256, 256, 1)])
def test_gemv_zeros_width_follows_autoawq(in_f, group_size, width):
    # widths worked out by hand from AutoAWQ's calculate_zeros_width
    assert gemv_zeros_width(in_f, group_size) == width


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
@pytest.mark.parametrize("spec", [ASYM4, QuantSpec(bits=4, symmetric=False, granularity=PerGroup(64)),
                                  QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128)),
                                  QuantSpec(bits=4, symmetric=False, granularity=PerChannel())], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_wqlinear_round_trip_is_bit_exact(cls, spec, bias):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 256, generator=g)
    wq = WQLinear.from_weight(w, torch.randn(40, generator=g) if bias else None, spec, name="layer")
    a = cls.from_wqlinear(wq, "layer")
    back = a.to_wqlinear()
    ref = wq.state_dict()
    assert set(back.state_dict()) == set(ref)
    for k, v in back.state_dict().items():
        assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    assert torch.equal(a.dequantize_weight(), wq.dequantize_weight())
    # and the other way round, through the other layout too
    other = LAYOUTS[1 - LAYOUTS.index(cls)]
    again = cls.from_wqlinear(other.from_wqlinear(back).to_wqlinear())
    for k, v in again.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
@pytest.mark.parametrize("tokens", [1, 5, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_wqlinear_forward(cls, tokens, dtype):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 256, generator=g), torch.randn(96, generator=g)
    wq = WQLinear.from_weight(w, b, ASYM4)
    a = cls.from_wqlinear(wq)
    x = torch.randn(2, tokens, 256, generator=g).to(dtype)
    y = a(x)
    assert y.dtype == dtype and y.shape == (2, tokens, 96)
    # the same codes through the same kernels: the same numbers
    assert torch.equal(y, wq(x))
    ref = F.linear(x.float(), a.dequantize_weight(), b)
    assert (y.float() - ref).norm() / ref.norm() < 2e-2  # the fast paths take bf16 activations


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
def test_reference_backend_is_exact(cls, monkeypatch):
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    codes, scales, zeros, b = random_codes(24, 128, 32)
    m = cls.from_codes(codes, scales, zeros, group_size=32, bias=b)
    x = torch.randn(3, 128, dtype=torch.float64).float()
    ref = F.linear(x.double(), m.dequantize_weight().double(), b.double())
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
def test_new_tensors_rebuild_the_kernels(cls):
    a1 = cls.from_codes(*random_codes(16, 64, 32, seed=1)[:3], group_size=32)
    a2 = cls.from_codes(*random_codes(16, 64, 32, seed=2)[:3], group_size=32)
    x = torch.randn(4, 64)
    y1, y2 = a1(x), a2(x)
    assert not torch.equal(y1, y2)
    a1.load_state_dict(a2.state_dict())
    assert torch.equal(a1(x), y2)


def test_storage_bits_count_the_stored_words():
    codes, scales, zeros, _ = random_codes(16, 256, 32, bias=False)
    gemm = AWQLinearGEMM.from_codes(codes, scales, zeros, group_size=32)
    gemv = AWQLinearGEMV.from_codes(codes, scales, zeros, group_size=32)
    assert gemm.storage_bits() == 16 * 256 * 4 + 16 * 8 * 4 + 16 * 8 * 16
    assert gemv.storage_bits() == 16 * 256 * 4 + 16 * 32 * 4 + 16 * 32 * 16  # zeros/scales padded to 32


@pytest.mark.parametrize("spec,what", [
    (QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32)), "3-bit"),
    (QuantSpec(bits=8, symmetric=False, granularity=PerChannel()), "8-bit"),
    (QuantSpec(bits=4, symmetric=True, granularity=PerGroup(32)), "symmetric"),
    (QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(32)), "codebook"),
], ids=["3bit", "8bit", "symmetric", "nf4"])
@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
def test_settings_the_layouts_cannot_hold_are_refused(cls, spec, what):
    wq = WQLinear.from_weight(torch.randn(16, 64), None, spec)
    with pytest.raises(SpecError, match=f"layer q_proj: .*{what}"):
        cls.from_wqlinear(wq, "q_proj")


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.version)
def test_out_features_not_a_multiple_of_8_is_refused(cls):
    wq = WQLinear.from_weight(torch.randn(20, 64), None, ASYM4)
    with pytest.raises(SpecError, match="layer k_proj: out_features=20 is not a multiple of 8"):
        cls.from_wqlinear(wq, "k_proj")


def test_gemv_refuses_what_autoawq_gemv_cannot_hold():
    with pytest.raises(GroupSizeError, match="group sizes 32, 64 or >= 128, got 16"):
        AWQLinearGEMV(64, 16, group_size=16, name="o_proj")
    with pytest.raises(GroupSizeError, match="got 96"):
        AWQLinearGEMV(96, 16, group_size=-1)  # per-channel over 96 inputs
    with pytest.raises(SpecError, match="in_features=36 is not a multiple of 8"):
        AWQLinearGEMV(36, 16, group_size=-1)
    AWQLinearGEMM(96, 16, group_size=-1)  # the GEMM layout takes both
    AWQLinearGEMM(64, 16, group_size=16)


def test_group_size_must_divide_in_features():
    with pytest.raises(GroupSizeError, match="layer fc"):
        AWQLinearGEMM(96, 16, group_size=64, name="fc")


def test_malformed_inputs_are_refused():
    codes, scales, zeros, _ = random_codes(16, 64, 32, bias=False)
    with pytest.raises(SpecError, match="scales must have shape"):
        AWQLinearGEMM.from_codes(codes, scales[:, :1], zeros, group_size=32)
    with pytest.raises(SpecError, match="integers"):
        AWQLinearGEMM.from_codes(codes, scales, zeros + 0.5, group_size=32)
    with pytest.raises(SpecError, match=r"\[0, 15\]"):
        pack_int32(torch.full((2, 8), 16))
    with pytest.raises(SpecError, match="multiple of 8"):
        pack_int32(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(SpecError, match="int32"):
        unpack_int32(torch.zeros(2, 2, dtype=torch.int64))
