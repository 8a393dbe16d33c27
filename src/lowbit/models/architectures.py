"""One adapter table per config.model_type.

Adding an architecture means adding a table here and a tiny config to tests/models; nothing in the
algorithms changes.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import UnsupportedArchitectureError
from .adapter import ModelAdapter, ScalePair
from .blocks import missing_paths


def _llama_like(model_type: str, root: str = "model", *, mlp_norm: str = "post_attention_layernorm",
                norm_offset: float = 0.0) -> ModelAdapter:
    """The decoder most current models share: q/k/v/o attention and a gated (gate, up, down) MLP.

    `mlp_norm` is the norm whose output the MLP reads (Gemma-3 applies post_attention_layernorm to
    the attention output before the residual add, and a separate pre_feedforward_layernorm).
    """
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    gate_up = ("mlp.gate_proj", "mlp.up_proj")
    return ModelAdapter(
        model_type=model_type,
        blocks=f"{root}.layers",
        embeddings=(f"{root}.embed_tokens", f"{root}.rotary_emb"),
        final_norm=f"{root}.norm",
        head="lm_head",
        sequential=(qkv, ("self_attn.o_proj",), gate_up, ("mlp.down_proj",)),
        shared_input=(qkv, gate_up),
        scaling_pairs=(
            ScalePair("input_layernorm", qkv, "self_attn", "norm"),
            ScalePair("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", "linear", when="mha"),
            ScalePair(mlp_norm, gate_up, "mlp", "norm"),
            # down_proj reads act(gate) * up: linear in up, so up's rows can carry the inverse
            ScalePair("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "linear"),
        ),
        norm_offset=norm_offset,
    )


LLAMA = _llama_like("llama")
MISTRAL = _llama_like("mistral")
QWEN2 = _llama_like("qwen2")
QWEN3 = _llama_like("qwen3")  # q_norm/k_norm act per head after q/k_proj: input folds stay exact
GEMMA3_TEXT = _llama_like("gemma3_text", mlp_norm="pre_feedforward_layernorm", norm_offset=1.0)
# Gemma3ForConditionalGeneration: the text decoder sits under model.language_model, the head stays
# at the root. The vision tower runs only with pixel_values, so text calibration never reaches it.
GEMMA3 = _llama_like("gemma3", "model.language_model", mlp_norm="pre_feedforward_layernorm", norm_offset=1.0)

_OPT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPT = ModelAdapter(
    model_type="opt",
    blocks="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    final_norm="model.decoder.final_layer_norm",
    post_blocks=("model.decoder.project_out",),
    head="lm_head",
    sequential=(_OPT_QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    shared_input=(_OPT_QKV,),
    scaling_pairs=(
        ScalePair("self_attn_layer_norm", _OPT_QKV, "self_attn", "norm", when="pre_norm"),
        ScalePair("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", "linear"),
        ScalePair("final_layer_norm", ("fc1",), "fc1", "norm", when="pre_norm"),
        # relu(x / s) == relu(x) / s for s > 0, so fc1's rows can carry the inverse of fc2's scale
        ScalePair("fc1", ("fc2",), "fc2", "linear"),
    ),
    # project_in/out exist only when word_embed_proj_dim != hidden_size (opt-350m), and post-norm
    # OPT has no final_layer_norm.
    optional=frozenset({"model.decoder.project_in", "model.decoder.project_out", "model.decoder.final_layer_norm"}),
)

GPT2 = ModelAdapter(
    model_type="gpt2",
    blocks="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    head="lm_head",
    sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    shared_input=(),  # q/k/v are one fused Conv1D
    scaling_pairs=(
        ScalePair("ln_1", ("attn.c_attn",), "attn", "norm"),
        ScalePair("ln_2", ("mlp.c_fc",), "mlp", "norm"),
        # GELU is not positive-homogeneous: the scale needs AutoAWQ's ScaledActivation
        ScalePair("mlp.act", ("mlp.c_proj",), "mlp.c_proj", "act"),
    ),
)

GPT_NEOX = ModelAdapter(
    model_type="gpt_neox",
    blocks="gpt_neox.layers",
    embeddings=("gpt_neox.embed_in", "gpt_neox.rotary_emb"),
    final_norm="gpt_neox.final_layer_norm",
    head="lm_head",
    sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    shared_input=(),  # q/k/v are one fused linear
    scaling_pairs=(
        ScalePair("input_layernorm", ("attention.query_key_value",), "attention", "norm"),
        ScalePair("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp", "norm"),
        ScalePair("mlp.act", ("mlp.dense_4h_to_h",), "mlp.dense_4h_to_h", "act"),
    ),
)

# transformers < 5 named GPT-NeoX's head embed_out
GPT_NEOX_V4 = replace(GPT_NEOX, head="embed_out")

# A model_type may come in more than one module layout; with a model in hand the first layout whose
# paths all resolve wins, with only a config the first is assumed.
ADAPTERS: dict[str, tuple[ModelAdapter, ...]] = {
    "llama": (LLAMA,),
    "mistral": (MISTRAL,),
    "qwen2": (QWEN2,),
    "qwen3": (QWEN3,),
    "gemma3": (GEMMA3, GEMMA3_TEXT),
    "gemma3_text": (GEMMA3_TEXT,),
    "opt": (OPT,),
    "gpt_neox": (GPT_NEOX, GPT_NEOX_V4),
    "gpt2": (GPT2,),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ADAPTERS))


def expects_bos(model_or_config) -> bool:
    """Whether the model was trained with BOS at the start of every sequence and degrades without it
    (Gemma: SmolLM2 and Llama-style checkpoints here are not). Evaluation windows start with BOS for
    these models (without it, Gemma-3-270m's validation perplexity is 133 against 54)."""
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "")).startswith("gemma")


def get_adapter(model_or_config) -> ModelAdapter:
    """The adapter for a model, a config, or a model_type string.

    Raises UnsupportedArchitectureError (one line, listing the supported types) for any other type,
    or when a model's module layout matches none of its type's tables.
    """
    if isinstance(model_or_config, str):
        model, model_type = None, model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model = model_or_config if config is not model_or_config else None
        model_type = getattr(config, "model_type", None)
    layouts = ADAPTERS.get(model_type)
    if layouts is None:
        raise UnsupportedArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model is None:
        return layouts[0]
    for adapter in layouts:
        if not missing_paths(model, adapter):
            return adapter
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} (model_type {model_type!r}) lacks the modules its adapter names: "
        f"{', '.join(missing_paths(model, layouts[0]))}"
    )
