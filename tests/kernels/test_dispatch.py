"""The bf16 capability probe every bf16-for-speed choice goes through (fast_bf16, matmul_dtype,
autocast), and the kernels and statistics that follow it."""

import pytest
import torch

from lowbit.calib.stats import add_product_
from lowbit.kernels import autocast, fast_bf16, matmul_dtype
from lowbit.kernels._dispatch import BF16_ENV
from lowbit.kernels.wint import prepare_wint, wint_gemm, wint_gemm_ref


@pytest.mark.parametrize("flag, want", [("0", torch.float32), ("1", torch.bfloat16)])
def test_matmul_dtype_follows_the_probe_on_cpu(monkeypatch, flag, want):
    monkeypatch.setenv(BF16_ENV, flag)
    assert fast_bf16("cpu") is (flag == "1")
    assert matmul_dtype(torch.bfloat16, "cpu") == want
    # only bf16 is ever swapped
    assert matmul_dtype(torch.float32, "cpu") == torch.float32
    assert matmul_dtype(torch.float16, "cpu") == torch.float16


def test_accelerators_keep_bf16(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    assert matmul_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("flag", ["0", "1"])
def test_autocast_is_off_where_bf16_would_run_in_float32(monkeypatch, flag):
    monkeypatch.setenv(BF16_ENV, flag)
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bfloat16", "cpu"):
        y = x @ w
    assert y.dtype == (torch.bfloat16 if flag == "1" else torch.float32)
    with autocast(torch.float32, "cpu"), autocast(None, "cpu"):
        assert (x @ w).dtype == torch.float32


def test_add_product_runs_bf16_operands_in_float32_without_fast_bf16(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    acc = torch.zeros(16, 16)
    add_product_(acc, a, a)
    # bf16 x bf16 products are exact in float32: only the float32 summation order may differ
    want = a.double().t() @ a.double()
    assert torch.allclose(acc.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m", [64, 300])
def test_dequant_path_without_fast_bf16_multiplies_in_float32(monkeypatch, m):
    g = torch.Generator().manual_seed(1)
    n, k, gs = 128, 256, 64
    q = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // gs, generator=g) * 0.02 + 0.002
    zeros = torch.randint(0, 16, (n, k // gs), generator=g).float()
    x = torch.randn(m, k, generator=g)
    p = prepare_wint(q, scales, zeros, 4, gs, backends=("dequant",))
    ref = wint_gemm_ref(x, q, scales, zeros, gs)
    errs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(BF16_ENV, flag)
        y = wint_gemm(x, p, out_features=n, backend="dequant")
        assert y.dtype == x.dtype and y.shape == (m, n)
        errs[flag] = float((y - ref).norm() / ref.norm())
    # float32 activations and products: only the bf16-stored scales are left (< 2^-8 relative)
    assert errs["0"] < 4e-3
    assert errs["1"] < 1e-2
    assert errs["0"] < errs["1"]
