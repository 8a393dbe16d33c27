"""SpQRLinear: the stored form against a hand decode, the forward against the dequantized weight,
exact bit accounting, lowbit-format round trips."""

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.formats.native import module_config, module_from_config
from lowbit.kernels import WINT_BACKEND_ENV
from lowbit.nn import QUANTIZED_MODULES, SpQRLinear
from lowbit.nn.spqr_linear import dequantize_stats, quantize_stats, spqr_summary


def sqnr_db(ref, x):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def make(out_f=48, in_f=64, bits=3, G=16, qq=16, qbits=3, act_order=True, bias=True, outlier_share=0.03, seed=0):
    """A module from random codes and statistics as the algorithm would produce them."""
    g = torch.Generator().manual_seed(seed)
    ng = in_f // G
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    scales = torch.rand(ng, out_f, generator=g) * 0.05 + 0.01
    zeros = torch.rand(ng, out_f, generator=g) * (2**bits - 1)
    sc, ss = zip(*(quantize_stats(s, qbits, qq) for s in scales))
    zc, zs = zip(*(quantize_stats(z, qbits, qq) for z in zeros))
    mask = torch.rand(out_f, in_f, generator=g) < outlier_share
    outliers = (torch.randn(out_f, in_f, generator=g) * mask).half().float()
    perm = torch.randperm(in_f, generator=g) if act_order else None
    b = torch.randn(out_f, generator=g) if bias else None
    m = SpQRLinear.from_codes(codes, torch.stack(sc), torch.stack(ss), torch.stack(zc), torch.stack(zs), outliers,
                              bits=bits, qq_scale_bits=qbits, qq_zero_bits=qbits, perm=perm, bias=b)
    return m, dict(codes=codes, sc=torch.stack(sc), ss=torch.stack(ss), zc=torch.stack(zc), zs=torch.stack(zs),
                   outliers=outliers, perm=perm, bias=b, G=G, qq=qq)


def hand_weight(p) -> torch.Tensor:
    """The documented decode, written out element by element over groups."""
    codes, G, qq = p["codes"].float(), p["G"], p["qq"]
    out_f, in_f = codes.shape
    w = torch.empty(out_f, in_f)
    for r in range(out_f):
        for g in range(in_f // G):
            s = p["sc"][g, r].float() * p["ss"][g, r // qq, 0].float() + p["ss"][g, r // qq, 1].float()
            z = p["zc"][g, r].float() * p["zs"][g, r // qq, 0].float() + p["zs"][g, r // qq, 1].float()
            w[r, g * G : (g + 1) * G] = (codes[r, g * G : (g + 1) * G] - z) * s
    w = w + p["outliers"]
    if p["perm"] is not None:
        w = torch.empty_like(w).index_copy_(1, p["perm"], w)
    return w


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_hand_decode(act_order):
    m, p = make(act_order=act_order)
    assert m.n_outliers == int((p["outliers"] != 0).sum())
    assert torch.equal(m.codes(), p["codes"].to(torch.uint8))
    assert torch.allclose(m.dequantize_weight(), hand_weight(p), atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m_tokens", [1, 7, 300])
def test_forward_is_dense_plus_sparse(act_order, m_tokens, monkeypatch):
    m, _ = make(act_order=act_order)
    x = torch.randn(2, m_tokens, 64)
    ref = x @ m.dequantize_weight().t() + m.bias
    # the float32 reference kernel: equal to rounding
    monkeypatch.setenv(WINT_BACKEND_ENV, "ref")
    m._runtime = None
    assert torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4)
    # the fast path (bf16 activations in the dense GEMM)
    monkeypatch.setenv(WINT_BACKEND_ENV, "auto")
    m._runtime = None
    y = m(x)
    assert y.shape == (2, m_tokens, 48) and sqnr_db(ref, y) > 40
    assert m(x.bfloat16()).dtype == torch.bfloat16


def test_forward_under_autocast():
    m, _ = make()
    x = torch.randn(5, 64)
    ref = x @ m.dequantize_weight().t() + m.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert sqnr_db(ref, y.float()) > 35


def test_no_outliers():
    m, p = make(outlier_share=0.0, act_order=False, bias=False)
    assert m.n_outliers == 0 and m.outlier_val.numel() == 0
    x = torch.randn(3, 64)
    assert sqnr_db(x @ hand_weight(p).t(), m(x)) > 40


def test_bits_match_a_hand_count():
    m, p = make(out_f=48, in_f=64, bits=3, G=16, qq=16, qbits=3, act_order=True)
    nnz = int((p["outliers"] != 0).sum())
    out_f, in_f, ng, nq = 48, 64, 4, 3
    hand = {
        "codes": out_f * in_f * 3,
        "stats_codes": 2 * ng * out_f * 3,  # scales and zeros, 3 bits each
        "stats_second_level": 2 * ng * nq * (16 + 16),  # (scale, min) in fp16 for each
        "outlier_values": nnz * 16,
        "outlier_indices": nnz * 16 + (out_f + 1) * 32,  # int16 columns, int32 row pointers
        "perm": in_f * 16,
    }
    assert m.bits_breakdown() == hand
    assert m.storage_bits() == sum(hand.values())
    # and the stored tensors are exactly that many bits
    stored = sum(t.numel() * t.element_size() * 8 for n, t in m.named_buffers() if n != "bias")
    assert stored == m.storage_bits()
    # the paper's formula for the dense part: bits + (3 + 3) / 16 + 2 * 32 / (16 * 16)
    assert (hand["codes"] + hand["stats_codes"] + hand["stats_second_level"]) / (out_f * in_f) == 3 + 6 / 16 + 64 / 256
    s = spqr_summary(torch.nn.Sequential(m))
    assert s["outliers"] == nnz and s["bits_per_weight"] == pytest.approx(m.storage_bits() / (out_f * in_f))


def test_quantize_stats():
    torch.manual_seed(0)
    x = torch.rand(64) * 0.02 + 0.01
    x[16:32] = 0.0123  # a constant group comes back exactly (to fp16)
    q, st = quantize_stats(x, 3, 16)
    assert q.dtype == torch.uint8 and int(q.max()) <= 7 and st.shape == (4, 2) and st.dtype == torch.float16
    back = dequantize_stats(q, st)
    assert torch.equal(back[16:32], torch.full((16,), 0.0123).half().float())
    step = st[:, 0].float().repeat_interleave(16)
    assert bool(((back - x).abs() <= step / 2 + 1e-3 * x.abs()).all())
    # a narrow range far from 0 does not overflow fp16 (the paper's -min/scale would be ~1e6)
    q, st = quantize_stats(torch.linspace(3.0, 3.00001, 16), 3, 16)
    assert torch.isfinite(st.float()).all() and (dequantize_stats(q, st) - 3).abs().max() < 1e-2


def test_state_dict_round_trip_through_native_config():
    m, _ = make()
    assert QUANTIZED_MODULES["SpQRLinear"] is SpQRLinear
    cfg = module_config(m)
    assert cfg["class"] == "SpQRLinear" and cfg["n_outliers"] == m.n_outliers
    back = module_from_config(cfg, "layer")
    back.load_state_dict(m.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(back(x), m(x))
    assert torch.equal(back.dequantize_weight(), m.dequantize_weight())


def test_refusals():
    with pytest.raises(SpecError, match="qq_groupsize"):
        SpQRLinear(64, 40, qq_groupsize=16)
    with pytest.raises(SpecError):
        SpQRLinear(60, 32, group_size=16)
    with pytest.raises(SpecError, match="bits"):
        SpQRLinear(64, 32, bits=9)
