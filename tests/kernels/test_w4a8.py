"""W4A8 kernel: the nibble unpack agrees with lowbit.quant.packing, the unpacked weight is a true
int8, and the GEMM is exact in int32 against the plain-torch oracle and close to float."""

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.kernels import int8_gemm_ref, quantize_per_token, unpack_int4, w4a8_gemm, w4a8_gemm_ref, w4a8_int8_weight
from lowbit.quant.packing import pack, unpack

GEN = torch.Generator().manual_seed(0)


def _codes(n, k):
    return torch.randint(-8, 8, (n, k), generator=GEN, dtype=torch.int16)


def test_unpack_matches_packing_module():
    q = _codes(37, 96)
    packed = pack(q + 8, 4)
    assert packed.shape == (37, 48)
    got = unpack_int4(packed, 96)
    assert got.dtype == torch.int8
    assert torch.equal(got.to(torch.int16), q)
    assert torch.equal(got.to(torch.int16) + 8, unpack(packed, 4, 96).to(torch.int16))


def test_group_scales_make_an_int8_weight():
    q = _codes(8, 128)
    k = torch.randint(1, 17, (8, 2), generator=GEN, dtype=torch.uint8)
    w8 = w4a8_int8_weight(pack(q + 8, 4), 128, k)
    assert w8.dtype == torch.int8
    want = q * k.to(torch.int16).repeat_interleave(64, dim=1)
    assert torch.equal(w8.to(torch.int16), want)
    assert int(want.min()) >= -128 and int(want.max()) <= 127


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("backend", ["ref", "int_mm"])
def test_gemm_exact_and_close_to_float(grouped, backend):
    n, k, m = 48, 128, 5
    q = _codes(n, k)
    gs = torch.randint(1, 17, (n, 4), generator=GEN, dtype=torch.uint8) if grouped else None
    ws = torch.rand(n, generator=GEN) * 0.01 + 1e-3
    bias = torch.randn(n, generator=GEN)
    x = torch.randn(2, m, k, generator=GEN)
    qx, xs = quantize_per_token(x)
    packed = pack(q + 8, 4)
    y = w4a8_gemm(qx, xs, packed, k, ws, gs, bias, torch.float32, backend=backend)
    assert y.shape == (2, m, n)
    ref = w4a8_gemm_ref(qx, xs, packed, k, ws, gs, bias)
    assert torch.equal(y, ref)  # int32 accumulation is exact, the epilogue is the same
    w8 = w4a8_int8_weight(packed, k, gs)
    assert torch.equal(ref.reshape(-1, n), int8_gemm_ref(qx.reshape(-1, k), xs.reshape(-1), w8, ws, bias))
    wf = w8.float() * ws[:, None]
    xf = qx.float() * xs
    torch.testing.assert_close(y, xf @ wf.t() + bias, rtol=1e-5, atol=1e-5)


def test_bf16_output_dtype():
    q = _codes(16, 64)
    x = torch.randn(3, 64, generator=GEN).bfloat16()
    qx, xs = quantize_per_token(x)
    y = w4a8_gemm(qx, xs, pack(q + 8, 4), 64, torch.ones(16), out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_bad_inputs():
    with pytest.raises(SpecError, match="uint8"):
        unpack_int4(torch.zeros(4, 8, dtype=torch.int8), 16)
    with pytest.raises(SpecError, match="packed bytes"):
        unpack_int4(torch.zeros(4, 8, dtype=torch.uint8), 20)
    with pytest.raises(SpecError, match="group_scale"):
        w4a8_int8_weight(torch.zeros(4, 8, dtype=torch.uint8), 16, torch.ones(4, 3, dtype=torch.uint8))
