import copy

import pytest
import torch

import lowbit
from lowbit.errors import GroupSizeError, InvalidWeightsError
from lowbit.models import block_linears, get_adapter, get_blocks, set_linear_weight
from lowbit.nn import WQLinear

from ..conftest import tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3", "opt", "gpt2", "gpt_neox"])
def test_rtn_replaces_every_block_linear_and_stays_close(model_type):
    model = tiny_model(model_type)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    lowbit.quantize(model, "w8a16-rtn", progress=False)
    adapter = get_adapter(model)
    for block, twin_block in zip(get_blocks(model, adapter), get_blocks(twin, adapter)):
        packed = block_linears(block, adapter)
        assert all(isinstance(m, WQLinear) for m in packed.values())
        for name, m in block_linears(twin_block, adapter).items():  # the float twin of the packed model
            set_linear_weight(m, packed[name].dequantize_weight())
    out = logits(model, ids)
    # The packed model computes what its dequantized float twin computes (bf16 activations aside)
    twin_out = logits(twin, ids)
    assert float((out - twin_out).norm() / twin_out.norm()) < 0.025
    # and 8-bit rounding moves these deliberately noisy tiny models' logits by a few percent at most
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_lower_bits_cost_more_accuracy():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    errs = {}
    for bits in (8, 4, 3, 2):
        model = tiny_model("llama")
        ref = logits(model, ids)
        lowbit.quantize(model, "w4a16-rtn", bits=bits, group_size=32, progress=False)
        errs[bits] = float((logits(model, ids) - ref).norm() / ref.norm())
    assert errs[8] < errs[4] < errs[3] < errs[2]


def test_group_size_that_does_not_divide_names_the_layer_and_suggests_one():
    model = tiny_model("llama", hidden_size=96, intermediate_size=192)
    with pytest.raises(GroupSizeError, match=r"model\.layers\.0\..*96.*32"):
        lowbit.quantize(model, "w4a16-rtn", group_size=64, progress=False)


def test_nan_weight_is_refused_before_any_layer_changes():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data[3, 3] = float("inf")
    with pytest.raises(InvalidWeightsError, match=r"model\.layers\.1\.mlp\.up_proj"):
        lowbit.quantize(model, "w4a16-rtn", group_size=32, progress=False)
    assert not any(isinstance(m, WQLinear) for m in model.modules())
