"""Tiny random models of every supported architecture, built from configs (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3Config, SiglipVisionConfig

VOCAB = 128


def _llama_like(model_type, kv_heads, **extra):
    return lambda: AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, **extra,
    )


def _gemma3_text(kv_heads):
    # one sliding and one global layer, window shorter than the test sequence
    return _llama_like("gemma3_text", kv_heads, sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def _gemma3_multimodal():
    text = _gemma3_text(2)()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1)


def _opt(**extra):
    kw = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
              word_embed_proj_dim=64, max_position_embeddings=64)
    return lambda: AutoConfig.for_model("opt", **{**kw, **extra})


def _gpt_neox():
    return AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)


def _gpt2():
    return AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                bos_token_id=0, eos_token_id=0)


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
V_O = ("self_attn.v_proj", ("self_attn.o_proj",))
UP_DOWN = ("mlp.up_proj", ("mlp.down_proj",))


def _llama_pairs(mha, mlp_norm="post_attention_layernorm"):
    pairs = [("input_layernorm", QKV), (mlp_norm, GATE_UP), UP_DOWN]
    return pairs + [V_O] if mha else pairs


OPT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPT_LINEAR_PAIRS = [("self_attn.v_proj", ("self_attn.out_proj",)), ("fc1", ("fc2",))]

# id -> (config builder, {(prev, linears)} the adapter must resolve for that config)
CASES = {
    "llama-gqa": (_llama_like("llama", 2), _llama_pairs(mha=False)),
    "llama-mha": (_llama_like("llama", 4), _llama_pairs(mha=True)),
    "mistral-gqa": (_llama_like("mistral", 2), _llama_pairs(mha=False)),
    "qwen2-gqa": (_llama_like("qwen2", 2), _llama_pairs(mha=False)),
    "qwen2-mha": (_llama_like("qwen2", 4), _llama_pairs(mha=True)),
    "qwen3-gqa": (_llama_like("qwen3", 2), _llama_pairs(mha=False)),
    "qwen3-mha": (_llama_like("qwen3", 4), _llama_pairs(mha=True)),
    "gemma3_text-gqa": (_gemma3_text(2), _llama_pairs(mha=False, mlp_norm="pre_feedforward_layernorm")),
    "gemma3_text-mha": (_gemma3_text(4), _llama_pairs(mha=True, mlp_norm="pre_feedforward_layernorm")),
    "gemma3-multimodal": (_gemma3_multimodal, _llama_pairs(mha=False, mlp_norm="pre_feedforward_layernorm")),
    "opt": (_opt(), [("self_attn_layer_norm", OPT_QKV), ("final_layer_norm", ("fc1",))] + OPT_LINEAR_PAIRS),
    # opt-350m's shape: post-norm blocks (norm folds would leak into the residual) and project_in/out
    "opt-postnorm": (_opt(do_layer_norm_before=False, word_embed_proj_dim=32), OPT_LINEAR_PAIRS),
    "gpt_neox": (_gpt_neox, [("input_layernorm", ("attention.query_key_value",)),
                             ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
                             ("mlp.act", ("mlp.dense_4h_to_h",))]),
    "gpt2": (_gpt2, [("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)), ("mlp.act", ("mlp.c_proj",))]),
}


@torch.no_grad()
def build(case: str, dtype=torch.float64):
    """A tiny random model in eval mode with every parameter perturbed.

    Fresh norms have weight 1 (0 for Gemma) and bias 0, which would hide a fold that forgot the
    bias or the offset; the noise makes each of them matter.
    """
    torch.manual_seed(0)
    config = CASES[case][0]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype).eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    return model


def input_ids(batch=2, length=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB - 3, (batch, length), generator=g)  # clear of pad/bos and image tokens


@pytest.fixture(params=sorted(CASES))
def case(request):
    """(id, tiny float64 model, the (prev, linears) pairs its adapter must resolve)."""
    name = request.param
    return name, build(name), {(prev, tuple(lins)) for prev, lins in CASES[name][1]}


@pytest.fixture
def make_model():
    return build


@pytest.fixture
def ids():
    return input_ids()
