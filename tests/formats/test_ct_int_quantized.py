"""compressed-tensors int-quantized (W8A8): round trips bit for bit, and the package's own decompressor
turns lowbit's files into exactly W8A8Linear's weight."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.cli import check_recipe_fits_format
from lowbit.errors import LowbitError, SpecError
from lowbit.nn import W8A8Linear
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
PRESETS = ["w8a8-sq-o1", "w8a8-sq-o2", "w8a8-sq-o3"]


def quantized(preset):
    return lowbit.quantize(tiny_model("qwen2"), preset, IDS, progress=False)  # q/k/v carry a bias


def w8a8(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_and_package_decompression(tmp_path, preset):
    model = quantized(preset)
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    act = qc["config_groups"]["group_0"]["input_activations"]
    assert (act["strategy"], act["dynamic"]) == {"w8a8-sq-o1": ("token", True), "w8a8-sq-o2": ("tensor", True),
                                                 "w8a8-sq-o3": ("tensor", False)}[preset]
    again = lowbit.load(out)
    assert w8a8(again).keys() == w8a8(model).keys()
    for n, m in w8a8(model).items():
        r = again.get_submodule(n)
        assert (r.weight_granularity, r.act_mode) == (m.weight_granularity, m.act_mode)
        for k, t in m.state_dict().items():
            assert torch.equal(r.state_dict()[k], t), (n, k)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)

    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    # the package decompresses every layer's weight from the file alone (its config, targets, ignore);
    # a static input_scale stays, as activation quantization is not part of a dense weight
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).process(load_file(out / "model.safetensors"))
    assert not any(k.endswith("weight_scale") for k in dense)
    assert sum(k.endswith("input_scale") for k in dense) == (14 if preset == "w8a8-sq-o3" else 0)
    for n, m in w8a8(model).items():
        assert torch.equal(dense[f"{n}.weight"], m.dequantize_weight()), n


def test_refusals(tmp_path):
    q = lowbit.quantize(tiny_model("llama"), "w8a8-llm-int8", None, progress=False)
    with pytest.raises(SpecError, match="MixedInt8Linear"):
        lowbit.save(q, tmp_path / "x", format="compressed-tensors")
    with pytest.raises(LowbitError, match="lowbit"):
        check_recipe_fits_format(load_recipe("w8a8-llm-int8"), "compressed-tensors")
    with pytest.raises(LowbitError, match="compressed-tensors"):
        check_recipe_fits_format(load_recipe("w8a8-sq-o1"), "gptq")
    check_recipe_fits_format(load_recipe("w8a8-sq-o3"), "compressed-tensors")
