"""W8A8Linear: against its float linear (SQNR), against the dequantized reference exactly, every
activation mode and backend, saving and reloading in lowbit's format bit for bit."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import lowbit
from lowbit import kernels
from lowbit.errors import InvalidWeightsError, SpecError
from lowbit.nn import QUANTIZED_MODULES, W8A8Linear
from tests.conftest import ONEDNN, tiny_model


def _sqnr(ref, y):
    ref, y = ref.detach(), y.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))


def _linear(in_f=96, out_f=80, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.2)
    return lin


@pytest.mark.parametrize("wg", ["tensor", "channel"])
@pytest.mark.parametrize("act", ["per_token", "per_tensor", "static"])
def test_close_to_float_and_exact_against_reference(wg, act):
    lin = _linear()
    x = torch.randn(3, 17, 96)
    scale = x.abs().max() / 127 if act == "static" else None
    m = W8A8Linear.from_float(lin, weight_granularity=wg, act_mode=act, input_scale=scale)
    y = m(x)
    assert y.shape == (3, 17, 80) and y.dtype == torch.float32
    assert _sqnr(lin(x), y) > 30
    # the module computes exactly the integer GEMM of its stored codes (the reference path)
    qx, xs = kernels.quantize_activation(x.reshape(-1, 96), act, m.input_scale)
    want = kernels.int8_gemm_ref(qx, xs, m.weight, m.weight_scale, m.bias, torch.float32)
    torch.testing.assert_close(y.reshape(-1, 80), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", "int_mm", ONEDNN, "fp32"])
def test_backends_agree(backend, monkeypatch):
    lin = _linear(bias=False)
    x = torch.randn(9, 96)
    monkeypatch.setenv(kernels.INT8_BACKEND_ENV, "ref")
    want = W8A8Linear.from_float(lin)(x)
    monkeypatch.setenv(kernels.INT8_BACKEND_ENV, backend)
    got = W8A8Linear.from_float(lin)(x)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_bf16_input_gives_bf16_output():
    lin = _linear()
    x = torch.randn(5, 96)
    m = W8A8Linear.from_float(lin)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert _sqnr(lin(x), y.float()) > 25


def test_dtype_casts_keep_the_scales_float32():
    lin = _linear()
    m = W8A8Linear.from_float(lin, act_mode="static", input_scale=0.0123456789)
    ws = m.weight_scale.clone()
    m.to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, ws)
    assert m.input_scale.dtype == torch.float32 and m.bias.dtype == torch.bfloat16
    assert m(torch.randn(4, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_storage_and_dequantized_weight():
    lin = _linear(in_f=64, out_f=32)
    m = W8A8Linear.from_float(lin, weight_granularity="channel")
    assert m.weight.dtype == torch.int8 and m.weight_scale.shape == (32, 1)
    assert m.storage_bits() == 64 * 32 * 8 + 32 * 32
    err = (m.dequantize_weight() - lin.weight).abs()
    assert bool((err <= m.weight_scale / 2 + 1e-7).all())  # round to nearest: half a step at most
    t = W8A8Linear.from_float(lin, weight_granularity="tensor", act_mode="static", input_scale=0.1)
    assert t.weight_scale.shape == (1,) and t.storage_bits() == 64 * 32 * 8 + 32 + 32
    assert "W8A8Linear" in QUANTIZED_MODULES


def test_bad_input():
    lin = _linear()
    with pytest.raises(SpecError, match="input_scale"):
        W8A8Linear.from_float(lin, act_mode="static")
    with pytest.raises(SpecError, match="positive"):
        W8A8Linear.from_float(lin, act_mode="static", input_scale=0.0)
    with pytest.raises(SpecError, match="granularity"):
        W8A8Linear.from_float(lin, weight_granularity="group")
    with pytest.raises(SpecError, match="activation mode"):
        W8A8Linear(8, 8, act_mode="per_channel")
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="layer q"):
        W8A8Linear.from_float(lin, name="q")


def test_lowbit_format_round_trip(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 16))
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            parent, _, attr = name.rpartition(".")
            lin = getattr(layer.get_submodule(parent), attr)
            act = "static" if i == 0 else "per_token"
            q = W8A8Linear.from_float(lin, weight_granularity="tensor" if i else "channel", act_mode=act,
                                      input_scale=0.05 if act == "static" else None)
            setattr(layer.get_submodule(parent), attr, q)
    want = model(ids).logits
    lowbit.save(model, tmp_path / "ckpt")
    again = lowbit.load(tmp_path / "ckpt")
    for n, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            r = again.get_submodule(n)
            assert isinstance(r, W8A8Linear) and r.act_mode == m.act_mode
            assert r.weight_granularity == m.weight_granularity
            for key, t in m.state_dict().items():
                assert torch.equal(r.state_dict()[key], t), (n, key)
    assert torch.equal(again(ids).logits, want)


def test_copy_and_pickle_after_a_forward_on_every_backend():
    import copy
    import io

    lin = torch.nn.Linear(64, 32)
    for backend in ("onednn", "int_mm") if importlib.import_module("lowbit.kernels.int8_gemm")._has_vnni() else ("int_mm",):
        m = W8A8Linear.from_float(lin)
        m._runtime = kernels.prepare_int8(m.weight, backends=[backend])  # oneDNN's weight is an opaque tensor
        m._runtime_device = m.weight.device
        x = torch.randn(16, 64)
        want = m(x)
        c = copy.deepcopy(m)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        p = torch.load(buf, weights_only=False)
        # the copies rebuild their run-time tensors for the auto backend: equal up to the epilogue's rounding
        torch.testing.assert_close(c(x), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p(x), want, rtol=1e-6, atol=1e-6)
