"""int8_gemm: every backend against the int64 reference (exact accumulation), quantizers, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

from lowbit.errors import SpecError
from tests.conftest import AVX2, ONEDNN, need_backend

# the package exports the function int8_gemm under the module's name: fetch the module itself
K = importlib.import_module("lowbit.kernels.int8_gemm")


def _case(m=33, k=96, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return qx, qw


def _exact(qx, qw):
    return (qx.double() @ qw.double().t())


@pytest.mark.parametrize("backend", ["ref", "int_mm", ONEDNN, "fp32", AVX2])
@pytest.mark.parametrize("x_gran,w_gran", [("token", "channel"), ("tensor", "tensor"), ("token", "tensor"),
                                           ("tensor", "channel")])
def test_backends_match_exact_accumulation(backend, x_gran, w_gran):
    need_backend(backend)
    m, k, n = 33, 96, 48
    qx, qw = _case(m, k, n)
    xs = torch.rand(m, 1) * 0.1 + 0.01 if x_gran == "token" else torch.tensor(0.03)
    ws = torch.rand(n) * 0.1 + 0.01 if w_gran == "channel" else torch.tensor(0.02)
    bias = torch.randn(n)
    prepared = K.prepare_int8(qw, backends=[backend] if backend not in ("ref", "fp32") else [])
    y = K.int8_gemm(qx, xs, prepared, ws, bias, torch.float32, backend=backend)
    want = _exact(qx, qw) * xs.double().reshape(-1, 1) * ws.double().reshape(1, -1) + bias.double()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # the int32 accumulator is exact; only the fp32 epilogue rounds
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["int_mm", ONEDNN, "fp32", AVX2])
def test_m1_and_leading_dims_and_out_dtype(backend):
    need_backend(backend)
    qx, qw = _case(6, 64, 32, seed=1)
    ws = torch.rand(32) + 0.5
    prepared = K.prepare_int8(qw, backends=[backend] if backend != "fp32" else [])
    for m in (1, 6):
        x3 = qx[:m].reshape(1, m, 64)
        xs = torch.rand(1, m, 1) + 0.5
        y = K.int8_gemm(x3, xs, prepared, ws, None, torch.bfloat16, backend=backend)
        ref = K.int8_gemm_ref(qx[:m], xs.reshape(m, 1), qw, ws, None, torch.bfloat16)
        assert y.shape == (1, m, 32) and y.dtype == torch.bfloat16
        assert torch.equal(y.reshape(m, 32), ref)


def test_fp32_backend_is_exact_where_float32_sums_would_round():
    # every product +-127 * 127 with one sign per row: |acc| = 127^2 * 3000 > 2^24, which one float32
    # GEMM over K would round; the slices of FP32_EXACT_K features keep it exact
    k = 3000
    qx = torch.full((3, k), 127, dtype=torch.int8)
    qw = torch.full((4, k), 127, dtype=torch.int8)
    qw[1::2] = -127
    qx[1, ::7] = -127
    assert torch.equal(K._run_fp32(qx, qw).double(), _exact(qx, qw))
    one = torch.ones(())
    y = K.int8_gemm(qx, one, K.prepare_int8(qw, backends=[]), one, backend="fp32")
    assert torch.equal(y, K.int8_gemm_ref(qx, one, qw, one))


def test_auto_without_vnni_picks_avx2_then_fp32_and_onednn_is_refused_there(monkeypatch):
    _, qw = _case(4, 32, 16)
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    monkeypatch.setattr(K, "_has_vnni", lambda: False)
    p = K.prepare_int8(qw)
    assert "onednn_weight" not in p and "i8_avx2_weight" in p
    want = "avx2" if K._avx2_ext() is not None else "fp32"
    assert K.select_int8_backend(p, m=1) == K.select_int8_backend(p, m=512) == want
    with pytest.raises(SpecError, match="VNNI"):
        K.prepare_int8(qw, backends=["onednn"])


def test_avx2_kernel_exact_at_the_extremes_and_odd_shapes():
    need_backend(AVX2)
    g = torch.Generator().manual_seed(7)
    # K with and without a tail past the last 32 codes, odd N (the two-row loop's last row), M past
    # the 4-token tiles; |w| = 128 with |x| = 127 is the largest pair sum the kernel forms
    for m, k, n in ((1, 32, 1), (5, 70, 9), (9, 576, 13), (2, 4096, 3)):
        qx = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        qw = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        qx[0] = -127
        qw[0] = -128
        qw[-1] = 127
        acc = K._avx2_ext().i8_gemm(qx, qw)
        assert acc.dtype == torch.int32 and torch.equal(acc.double(), _exact(qx, qw))
    big = torch.full((1, 4096), 127, dtype=torch.int8)  # |acc| = 128 * 127 * 4096 < 2^31
    w = torch.full((2, 4096), -128, dtype=torch.int8)
    assert torch.equal(K._avx2_ext().i8_gemm(big, w).double(), _exact(big, w))
    # an activation code of -128 has no sign-flipped int8 value: the op refuses it, and int8_gemm
    # takes the exact float32 path for that call instead
    qx = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=g)
    qx[1, 5] = -128
    qw = torch.randint(-128, 128, (8, 64), dtype=torch.int8, generator=g)
    with pytest.raises(RuntimeError, match=r"\[-127, 127\]"):
        K._avx2_ext().i8_gemm(qx, qw)
    one = torch.ones(())
    y = K.int8_gemm(qx, one, K.prepare_int8(qw, backends=["avx2"]), one, backend="avx2")
    assert torch.equal(y, K.int8_gemm_ref(qx, one, qw, one))


def test_auto_and_env_override(monkeypatch):
    _, qw = _case(4, 32, 16)
    p = K.prepare_int8(qw, backends=["int_mm"] + (["onednn"] if K._has_vnni() else []))
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    assert K.select_int8_backend(p) in ("onednn", "int_mm", "fp32", "avx2")
    monkeypatch.setenv(K.BACKEND_ENV, "ref")
    assert K.select_int8_backend(p) == "ref"
    monkeypatch.setenv(K.BACKEND_ENV, "onednn")
    with pytest.raises(SpecError, match="not prepared"):
        K.select_int8_backend(K.prepare_int8(qw, backends=[]))
    with pytest.raises(SpecError, match="unknown backend"):
        K.select_int8_backend(p, "cuda-magic")


def test_per_token_quantizer_error_bound():
    x = torch.randn(7, 5, 64) * torch.linspace(0.1, 10, 64)
    q, s = K.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (7, 5, 1)
    assert int(q.abs().max()) == 127  # each row's absmax lands on the grid's end
    err = (q.float() * s - x).abs()
    assert bool((err <= s / 2 + 1e-6).all())


def test_per_tensor_and_static_quantizers():
    x = torch.randn(9, 32)
    q, s = K.quantize_per_tensor(x)
    assert s.dim() == 0 and torch.isclose(s, x.abs().max() / 127)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()
    # a static scale smaller than the range clips
    qs = K.quantize_static(x * 10, s)
    assert int(qs.abs().max()) == 127
    z, sz = K.quantize_per_token(torch.zeros(2, 8))  # an all-zero row must not divide by zero
    assert torch.equal(z, torch.zeros(2, 8, dtype=torch.int8)) and bool(torch.isfinite(sz).all())


def test_quantize_then_gemm_close_to_float():
    torch.manual_seed(0)
    x, w = torch.randn(64, 128), torch.randn(96, 128)
    qx, xs = K.quantize_per_token(x)
    ws = w.abs().amax(1) / 127
    qw = torch.round(w / ws[:, None]).to(torch.int8)
    y = K.int8_gemm(qx, xs, K.prepare_int8(qw), ws)
    ref = x @ w.t()
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean())
    assert sqnr > 35  # int8 x int8 on Gaussian data: about 38 dB


def test_bad_input():
    qx, qw = _case(4, 32, 16)
    p = K.prepare_int8(qw)
    with pytest.raises(SpecError, match="features"):
        K.int8_gemm(qx[:, :16], torch.tensor(1.0), p, torch.tensor(1.0))
    with pytest.raises(SpecError, match="x_scale"):
        K.int8_gemm(qx, torch.ones(3), p, torch.tensor(1.0), backend="int_mm")
    with pytest.raises(SpecError, match="w_scale"):
        K.int8_gemm(qx, torch.tensor(1.0), p, torch.ones(5), backend="int_mm")
    with pytest.raises(SpecError, match="int8"):
        K.prepare_int8(qw.float())
    with pytest.raises(SpecError, match="positive"):
        K.quantize_static(torch.randn(3), torch.tensor(0.0))
    with pytest.raises(SpecError, match="input scale"):
        K.quantize_activation(torch.randn(3), "static")
    with pytest.raises(SpecError, match="unknown activation mode"):
        K.quantize_activation(torch.randn(3), "per_group")
