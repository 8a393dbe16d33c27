import pytest
import torch
from torch import nn

from lowbit.errors import UnsupportedArchitectureError
from lowbit.models import (
    ADAPTERS,
    SUPPORTED_MODEL_TYPES,
    block_linears,
    find_module,
    get_adapter,
    get_blocks,
    get_module,
    is_linear,
    linear_shape,
    missing_paths,
    move_embeddings,
    move_head,
    resolve_scaling_pairs,
)


def test_every_path_resolves(case):
    _, model, _ = case
    adapter = get_adapter(model)
    assert missing_paths(model, adapter) == []
    assert isinstance(get_blocks(model, adapter), nn.ModuleList)
    assert len(get_blocks(model, adapter)) == 2
    assert is_linear(get_module(model, adapter.head))
    for path in [*adapter.embeddings, *adapter.post_blocks, adapter.final_norm]:
        if path not in adapter.optional:
            assert find_module(model, path) is not None, path


def test_sequential_covers_exactly_the_block_linears(case):
    _, model, _ = case
    adapter = get_adapter(model)
    assert len(set(adapter.linears)) == len(adapter.linears), "a linear listed twice"
    for block in get_blocks(model, adapter):
        actual = {name for name, m in block.named_modules() if is_linear(m)}
        assert set(adapter.linears) == actual
        assert list(block_linears(block, adapter)) == list(adapter.linears)


def test_shared_input_groups_have_equal_in_features(case):
    _, model, _ = case
    adapter = get_adapter(model)
    block = get_blocks(model, adapter)[0]
    for group in adapter.shared_input:
        assert set(group) <= set(adapter.linears)
        assert len({linear_shape(get_module(block, n))[1] for n in group}) == 1, group


def test_resolved_pairs_match_the_architecture(case):
    name, model, expected = case
    adapter = get_adapter(model)
    for block in get_blocks(model, adapter):
        pairs = resolve_scaling_pairs(block, adapter, model.config)
        assert {(p.prev_name, p.linear_names) for p in pairs} == expected
        for p in pairs:
            assert p.inspect is get_module(block, p.inspect_name)
            assert set(p.linear_names) <= set(adapter.linears)
            if p.kind == "act":
                continue
            width = linear_shape(p.prev)[0] if p.kind == "linear" else p.prev.weight.numel()
            assert all(linear_shape(m)[1] == width for m in p.linears), (name, p.prev_name)


def test_gqa_drops_v_to_o_and_mha_keeps_it(make_model):
    v_o = ("self_attn.v_proj", ("self_attn.o_proj",))
    for case, kept in [("llama-gqa", False), ("llama-mha", True), ("gemma3_text-gqa", False), ("gemma3_text-mha", True)]:
        model = make_model(case)
        adapter = get_adapter(model)
        pairs = resolve_scaling_pairs(get_blocks(model, adapter)[0], adapter, model.config)
        assert (v_o in {(p.prev_name, p.linear_names) for p in pairs}) is kept, case


def test_unsupported_type_lists_the_supported_ones():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError) as err:
        get_adapter(BertConfig())
    msg = str(err.value)
    assert "\n" not in msg and "'bert'" in msg
    for t in SUPPORTED_MODEL_TYPES:
        assert t in msg
    assert set(SUPPORTED_MODEL_TYPES) >= {
        "llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text", "opt", "gpt_neox", "gpt2"
    }


def test_get_adapter_accepts_model_config_or_type(make_model):
    model = make_model("qwen3-gqa")
    assert get_adapter(model) is get_adapter(model.config) is get_adapter("qwen3") is ADAPTERS["qwen3"][0]


def test_gemma3_layouts(make_model):
    multimodal = make_model("gemma3-multimodal")
    text = make_model("gemma3_text-gqa")
    assert type(multimodal).__name__ == "Gemma3ForConditionalGeneration"
    assert get_adapter(multimodal).blocks == "model.language_model.layers"
    assert get_adapter(multimodal.config).blocks == "model.language_model.layers"
    assert type(text).__name__ == "Gemma3ForCausalLM"
    assert get_adapter(text).blocks == "model.layers"
    assert get_adapter(text).norm_offset == 1.0


def test_gemma3_type_with_the_text_only_layout(make_model):
    # a gemma3 checkpoint loaded into Gemma3ForCausalLM keeps its blocks at model.layers
    model = make_model("gemma3_text-gqa")
    model.config.model_type = "gemma3"
    assert get_adapter(model).blocks == "model.layers"


def test_older_gpt_neox_head_name(make_model):
    model = make_model("gpt_neox")
    model.embed_out = model.lm_head  # transformers < 5 called the head embed_out
    del model.lm_head
    assert get_adapter(model).head == "embed_out"


def test_layout_mismatch_names_the_missing_modules():
    class NotALlama(nn.Module):
        config = type("C", (), {"model_type": "llama"})()

    with pytest.raises(UnsupportedArchitectureError, match="model.layers"):
        get_adapter(NotALlama())


def test_move_embeddings_and_head(make_model):
    model = make_model("opt-postnorm")
    adapter = get_adapter(model)
    move_embeddings(model, adapter, "meta")
    for path in adapter.embeddings:
        assert all(p.device.type == "meta" for p in get_module(model, path).parameters())
    assert get_blocks(model, adapter)[0].fc1.weight.device.type == "cpu"
    move_head(model, adapter, torch.device("meta"))
    assert model.lm_head.weight.device.type == "meta"
    assert model.model.decoder.project_out.weight.device.type == "meta"
