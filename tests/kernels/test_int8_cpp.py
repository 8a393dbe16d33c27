"""The C++ activation quantizers and epilogue against the torch expressions they replace (bit for bit),
uint8 codes (+128) through every backend, and the per-token-count backend choice."""

from __future__ import annotations

import importlib

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.kernels import _int8_cpp
from tests.conftest import AVX2, ONEDNN, need_backend

K = importlib.import_module("lowbit.kernels.int8_gemm")


def ext():
    e = _int8_cpp.load()
    if e is None:
        pytest.skip("C++ int8 extension unavailable (no compiler?)")
    return e


def _torch_per_token(x):
    s = x.abs().amax(dim=-1, keepdim=True).float().div_(127).clamp_(min=1e-12)
    return torch.clamp(torch.round(x.float() / s), -127, 127).to(torch.int8), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 16), (7, 37), (33, 576), (3, 4096)])
def test_per_token_codes_and_scales_bit_identical(dtype, m, k):
    e = ext()
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-2, 1.5, k)).to(dtype)
    x[0, : min(k, 5)] = 0.5 * x[0, 0]  # ties of round-half-even are likelier on repeated values
    if m > 2:
        x[2] = 0  # an all-zero token: the floored scale
    want_q, want_s = _torch_per_token(x)
    q, s = e.quantize_per_token(x, 0)
    assert torch.equal(q, want_q) and torch.equal(s, want_s)
    qu, su = e.quantize_per_token(x, 128)
    assert qu.dtype == torch.uint8 and torch.equal(qu.to(torch.int16) - 128, want_q.to(torch.int16))
    assert torch.equal(su, want_s)


def test_exact_halves_round_to_even():
    e = ext()
    # scale 1 (absmax 127): x / s lands exactly on .5 values
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5] + [0.0] * 8])
    q, s = e.quantize_per_token(x, 0)
    assert float(s) == 1.0
    assert q[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_codes_bit_identical_and_clipped(dtype):
    e = ext()
    x = (torch.randn(9, 70, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    s = torch.tensor(0.01)  # far below the range: most values clip to +-127
    want = torch.clamp(torch.round(x.float() / s), -127, 127).to(torch.int8)
    assert torch.equal(e.quantize_scaled(x, float(s), 0), want)
    assert torch.equal(e.quantize_scaled(x, float(s), 128).to(torch.int16) - 128, want.to(torch.int16))
    with pytest.raises(RuntimeError, match="positive"):
        e.quantize_scaled(x, 0.0, 0)


@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token,per_channel,bias", [(True, True, True), (False, False, False),
                                                        (True, False, True), (False, True, False)])
def test_epilogue_bit_identical(acc_dtype, out_dtype, per_token, per_channel, bias):
    e = ext()
    g = torch.Generator().manual_seed(3)
    m, n = 13, 75
    acc = torch.randint(-2**22, 2**22, (m, n), generator=g, dtype=torch.int32)
    acc = acc if acc_dtype == torch.int32 else acc.float() * 0.37
    xs = torch.rand(m, 1, generator=g) * 1e-3 if per_token else torch.tensor(2e-4)
    ws = torch.rand(n, generator=g) * 1e-2 if per_channel else torch.tensor(3e-3)
    b = torch.randn(n, generator=g) if bias else None
    want = K._epilogue_torch(acc.clone(), xs, ws, b, out_dtype)  # it works in place on a float acc
    got = e.dequantize_acc(acc, xs.reshape(-1), ws.reshape(-1), b, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", ["ref", "int_mm", ONEDNN, "fp32", AVX2])
def test_uint8_codes_give_the_same_result_as_int8(backend):
    need_backend(backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 96, generator=g)
    qw = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=g)
    ws = torch.rand(40, generator=g) * 0.01
    p = K.prepare_int8(qw, backends=[backend] if backend != "ref" else [])
    q8, s8 = K.quantize_per_token(x)
    qu, su = K.quantize_per_token(x, offset=128)
    assert qu.dtype == torch.uint8 and torch.equal(qu.to(torch.int16) - 128, q8.to(torch.int16))
    y8 = K.int8_gemm(q8, s8, p, ws, None, torch.float32, backend=backend)
    yu = K.int8_gemm(qu, su, p, ws, None, torch.float32, backend=backend)
    assert torch.equal(y8, yu)
    ref = K.int8_gemm_ref(q8, s8, qw, ws)
    torch.testing.assert_close(yu, ref, rtol=2e-6, atol=1e-6)


def test_torch_fallback_matches_the_extension(monkeypatch):
    x = (torch.randn(6, 50, generator=torch.Generator().manual_seed(5)) * 4).to(torch.bfloat16)
    with_ext = [K.quantize_per_token(x, offset=o) for o in (0, 128)] + [K.quantize_per_tensor(x, offset=128)]
    monkeypatch.setenv(_int8_cpp.EXT_ENV, "0")
    without = [K.quantize_per_token(x, offset=o) for o in (0, 128)] + [K.quantize_per_tensor(x, offset=128)]
    for (qa, sa), (qb, sb) in zip(with_ext, without):
        assert torch.equal(qa, qb) and torch.equal(sa, sb)


@pytest.mark.skipif(not K._has_vnni(), reason="this CPU has no VNNI/AMX for oneDNN's int8 GEMM")
def test_backend_choice_by_token_count(monkeypatch):
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    qw = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    both = K.prepare_int8(qw, backends=["int_mm", "onednn"])
    if not K._has_amx():  # with AMX oneDNN takes single tokens too
        assert K.select_int8_backend(both, m=1) == "int_mm" and K.act_offset(both, 1) == 0
    assert K.select_int8_backend(both, m=K.ONEDNN_MIN_M) == "onednn" and K.act_offset(both, 512) == 128
    plain = K.prepare_int8(qw, backends=[])
    assert K.act_offset(plain, 512) == 0
    monkeypatch.setenv(K.BACKEND_ENV, "onednn")
    assert K.act_offset(both, 1) == 128  # a forced backend holds for every M
    with pytest.raises(SpecError, match="offset"):
        K.quantize_per_token(torch.randn(2, 8), offset=1)
