"""Folding per-channel scales must not change what the model computes."""

import copy

import pytest
import torch
from torch import nn

from lowbit.errors import InvalidWeightsError, LowbitError
from lowbit.models import (
    fold_scales,
    get_adapter,
    get_blocks,
    get_module,
    linear_weight,
    norm_offset,
    resolve_scaling_pairs,
)

TOL = dict(rtol=1e-9, atol=1e-9)  # float64 models: a wrong fold misses by orders of magnitude more
# Gemma3RMSNorm upcasts to float32 whatever the model dtype, so float32 rounding is the floor there;
# the naive (offset-blind) fold below misses by > 1e-3.
GEMMA_TOL = dict(rtol=1e-5, atol=1e-5)


def _tol(model):
    return GEMMA_TOL if "gemma" in model.config.model_type else TOL


def _block0_call(model, ids):
    """The positional and keyword arguments block 0 receives, captured from a real forward."""
    adapter = get_adapter(model)
    seen = {}

    def hook(_m, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    handle = get_blocks(model, adapter)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def _run_block0(model, call):
    with torch.no_grad():
        out = get_blocks(model, get_adapter(model))[0](*call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _random_scales(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).exp()  # positive, spanning ~[0.05, 20]


def _width(pair):
    return pair.prev.weight.numel() if pair.kind == "norm" else linear_weight(pair.prev).shape[0]


def _fold_everywhere(model, which, offset=None):
    """Folds fresh random scales into pair `which` (a (prev, linears) key) of every block."""
    adapter = get_adapter(model)
    for i, block in enumerate(get_blocks(model, adapter)):
        for pair in resolve_scaling_pairs(block, adapter, model.config):
            if (pair.prev_name, pair.linear_names) == which:
                fold_scales(pair.prev, pair.linears, _random_scales(_width(pair), seed=i), pair.kind, offset=offset)


def test_each_fold_preserves_block_output_and_logits(case, ids):
    name, model, _ = case
    adapter = get_adapter(model)
    call = _block0_call(model, ids)
    ref_block, ref_logits = _run_block0(model, call), _logits(model, ids)
    pairs = resolve_scaling_pairs(get_blocks(model, adapter)[0], adapter, model.config)
    foldable = [(p.prev_name, p.linear_names) for p in pairs if p.kind != "act"]
    assert foldable, name

    for key in foldable:
        folded = copy.deepcopy(model)
        _fold_everywhere(folded, key)
        before = get_module(get_blocks(model, adapter)[0], key[1][0]).weight
        after = get_module(get_blocks(folded, adapter)[0], key[1][0]).weight
        assert not torch.allclose(before, after), f"{name} {key}: fold changed nothing"
        torch.testing.assert_close(_run_block0(folded, call), ref_block, **_tol(model), msg=f"{name} {key}")
        torch.testing.assert_close(_logits(folded, ids), ref_logits, **_tol(model), msg=f"{name} {key}")

    everything = copy.deepcopy(model)
    for key in foldable:
        _fold_everywhere(everything, key)
    torch.testing.assert_close(_logits(everything, ids), ref_logits, **_tol(model))


@pytest.mark.parametrize("case_name", ["gemma3_text-mha", "gemma3-multimodal"])
def test_gemma3_folds_into_one_plus_weight(make_model, ids, case_name):
    model = make_model(case_name)
    adapter = get_adapter(model)
    norm = get_blocks(model, adapter)[0].input_layernorm
    assert type(norm).__name__ == "Gemma3RMSNorm" and norm_offset(norm) == 1.0 == adapter.norm_offset
    ref = _logits(model, ids)

    right = copy.deepcopy(model)
    _fold_everywhere(right, ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")))
    torch.testing.assert_close(_logits(right, ids), ref, **GEMMA_TOL)

    # dividing the stored weight as if the gain were `weight` breaks the model
    naive = copy.deepcopy(model)
    _fold_everywhere(naive, ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), offset=0.0)
    assert (_logits(naive, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("case_name", ["gpt2", "gpt_neox"])
def test_act_pairs_are_listed_but_refused(make_model, case_name):
    model = make_model(case_name)
    adapter = get_adapter(model)
    acts = [p for p in resolve_scaling_pairs(get_blocks(model, adapter)[0], adapter, model.config) if p.kind == "act"]
    assert len(acts) == 1 and acts[0].prev_name == "mlp.act"
    with pytest.raises(NotImplementedError, match="ScaledActivation"):
        fold_scales(acts[0].prev, acts[0].linears, torch.ones(linear_weight(acts[0].linears[0]).shape[1]), "act")


def test_fold_keeps_dtype_and_computes_in_float32():
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(64), nn.Linear(64, 32)
    with torch.no_grad():
        for p in [*norm.parameters(), *lin.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(8, 64)
    ref = lin(norm(x))
    norm16, lin16 = copy.deepcopy(norm).bfloat16(), copy.deepcopy(lin).bfloat16()
    fold_scales(norm16, [lin16], _random_scales(64, seed=3).float(), "norm")
    assert norm16.weight.dtype == lin16.weight.dtype == torch.bfloat16
    out = lin16.float()(norm16.float()(x))
    # within bf16 rounding of the stored weights, far from the change a wrong fold makes
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_scales_are_refused():
    norm, lin = nn.LayerNorm(8), nn.Linear(8, 4)
    with pytest.raises(InvalidWeightsError):
        fold_scales(norm, [lin], torch.ones(7), "norm")
    with pytest.raises(InvalidWeightsError):
        fold_scales(norm, [lin], -torch.ones(8), "norm")
    with pytest.raises(InvalidWeightsError):
        fold_scales(norm, [nn.Linear(6, 4)], torch.ones(8), "norm")
    with pytest.raises(ValueError):
        fold_scales(norm, [lin], torch.ones(8), "bogus")


class _OffsetRMSNorm(nn.Module):
    def __init__(self, d, gain_offset=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)
        self.gain_offset = gain_offset

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (self.gain_offset + self.weight)


class _PlainLayerNorm(nn.LayerNorm):
    pass


def test_norm_offset_by_name_and_by_probe():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert norm_offset(Gemma3RMSNorm(16)) == 1.0
    assert norm_offset(LlamaRMSNorm(16)) == 0.0
    assert norm_offset(nn.LayerNorm(16)) == 0.0
    # classes it does not know by name are probed
    assert norm_offset(_OffsetRMSNorm(16)) == 1.0
    assert norm_offset(_OffsetRMSNorm(15, gain_offset=0.0)) == 0.0
    ln = _PlainLayerNorm(16)
    with torch.no_grad():
        ln.weight.add_(torch.randn(16) * 0.1)
        ln.bias.add_(torch.randn(16) * 0.1)
    assert norm_offset(ln) == 0.0
    with pytest.raises(LowbitError, match="cannot tell"):
        norm_offset(_OffsetRMSNorm(16, gain_offset=2.0))


def test_resolve_refuses_a_norm_the_table_misdescribes(make_model):
    from dataclasses import replace

    from lowbit.errors import UnsupportedArchitectureError

    model = make_model("llama-gqa")
    wrong = replace(get_adapter(model), norm_offset=1.0)
    with pytest.raises(UnsupportedArchitectureError, match="LlamaRMSNorm"):
        resolve_scaling_pairs(get_blocks(model, wrong)[0], wrong, model.config)
