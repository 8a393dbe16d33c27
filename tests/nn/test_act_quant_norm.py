"""Norm-fused activation quantization: the linears get exactly the codes and scales they would have
computed themselves, the model's outputs do not change, fewer quantization passes run, and the
links survive lowbit's format."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.errors import SpecError
from lowbit.nn import MixedInt8Linear, W8A8Linear, act_quant_norm
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def _quantized(model_type="llama", preset="w8a8-sq-o1", fuse=True):
    model = tiny_model(model_type)
    rec = load_recipe(preset)
    for step in rec.steps:
        if step.get("method") == "w8a8":
            step["fuse_norm"] = fuse
    return lowbit.quantize(model, rec, IDS, progress=False)


def _unfused_copy(model):
    plain = copy.deepcopy(model)
    for name in act_quant_norm.fused_norms(plain):
        act_quant_norm.detach(plain.get_submodule(name))
    assert not act_quant_norm.fused_norms(plain)
    return plain


def _record(monkeypatch):
    """Every int8_gemm call's (codes, scales), and how many activation quantizations ran."""
    calls, count = [], {"quantize": 0}
    gemm, quant = kernels.int8_gemm, act_quant_norm.quantize_activation
    real_quant = kernels.quantize_activation

    def rec_gemm(qx, xs, *a, **kw):
        calls.append((qx.clone(), torch.as_tensor(xs).clone()))
        return gemm(qx, xs, *a, **kw)

    def counting(real):
        def f(*a, **kw):
            count["quantize"] += 1
            return real(*a, **kw)
        return f

    monkeypatch.setattr(kernels, "int8_gemm", rec_gemm)
    monkeypatch.setattr(kernels, "quantize_activation", counting(real_quant))
    monkeypatch.setattr(act_quant_norm, "quantize_activation", counting(quant))
    return calls, count


@pytest.mark.parametrize("model_type,norms", [("llama", ("input_layernorm", "post_attention_layernorm")),
                                              ("gemma3_text", ("input_layernorm", "pre_feedforward_layernorm"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_codes_scales_and_outputs_equal_the_unfused_path(model_type, norms, dtype, monkeypatch):
    fused = _quantized(model_type).to(dtype)
    links = act_quant_norm.fused_norms(fused)
    assert sorted(links) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in norms)
    assert links["model.layers.0.input_layernorm"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    plain = _unfused_copy(fused)
    assert act_quant_norm.fused_norms(fused) == links  # the copy's links are its own

    calls, count = _record(monkeypatch)
    with torch.inference_mode():
        got = fused(IDS).logits
    fused_calls, fused_count = list(calls), count["quantize"]
    calls.clear()
    count["quantize"] = 0
    with torch.inference_mode():
        want = plain(IDS).logits

    assert torch.equal(got, want)
    assert len(fused_calls) == len(calls) == 14  # 7 linears x 2 blocks, in the same order
    for (qa, sa), (qb, sb) in zip(fused_calls, calls):
        assert torch.equal(qa, qb) and torch.equal(sa, sb)
    # per block: one pass for q/k/v, one for gate/up, then o_proj and down_proj on their own
    assert count["quantize"] == 14 and fused_count == 8


def test_static_per_tensor_consumers_share_one_scale():
    fused = _quantized("llama", "w8a8-sq-o3")
    assert len(act_quant_norm.fused_norms(fused)) == 4
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, _unfused_copy(fused)(IDS).logits)


def test_fuse_norm_off_leaves_every_linear_quantizing_itself():
    q = _quantized(fuse=False)
    assert not act_quant_norm.fused_norms(q)
    assert q.lowbit_recipe is not None


def test_other_inputs_and_in_place_changes_fall_back_to_quantizing():
    model = _quantized()
    layer = model.model.layers[0]
    q_proj, norm = layer.self_attn.q_proj, layer.input_layernorm
    plain = _unfused_copy(model).model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y = norm(x)
        other = torch.randn_like(y)
        assert torch.equal(q_proj(other), plain(other))  # not the norm's output: quantizes itself
        y.mul_(3.0)  # the norm's output changed after the codes were made
        assert torch.equal(q_proj(y), plain(y))
        y2 = norm(x)
        assert torch.equal(q_proj(y2), plain(y2))


def test_native_format_round_trip(tmp_path):
    model = _quantized()
    links = act_quant_norm.fused_norms(model)
    lowbit.save(model, tmp_path / "ckpt")
    again = lowbit.load(tmp_path / "ckpt")
    assert act_quant_norm.fused_norms(again) == links
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_attach_refuses_consumers_that_cannot_share_codes():
    lin = torch.nn.Linear(16, 8)
    norm = torch.nn.LayerNorm(16)
    tok = W8A8Linear.from_float(lin, act_mode="per_token")
    with pytest.raises(SpecError, match="W8A8Linear"):
        act_quant_norm.attach(norm, [tok, MixedInt8Linear.from_float(lin)])
    with pytest.raises(SpecError, match="disagree"):
        act_quant_norm.attach(norm, [tok, W8A8Linear.from_float(lin, act_mode="per_tensor")])
    with pytest.raises(SpecError, match="input_scale"):
        act_quant_norm.attach(norm, [W8A8Linear.from_float(lin, act_mode="static", input_scale=0.1),
                                     W8A8Linear.from_float(lin, act_mode="static", input_scale=0.2)])
    with pytest.raises(SpecError, match="no consumer"):
        act_quant_norm.attach(norm, [])
    act_quant_norm.attach(norm, [tok])
    with pytest.raises(SpecError, match="already"):
        act_quant_norm.attach(torch.nn.LayerNorm(16), [tok])
    act_quant_norm.detach(norm)
    assert act_quant_norm.source_of(tok) is None and not norm._forward_hooks
