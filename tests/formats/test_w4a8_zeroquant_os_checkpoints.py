"""Checkpoints of the ZeroQuant, Outlier Suppression and W4A8 presets: lowbit's format round trips bit
for bit; the W8A8 ones go to compressed-tensors int-quantized and the package's decompressor gives
exactly their weights; W4A8 is refused there with its reason."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.cli import check_recipe_fits_format
from lowbit.errors import LowbitError, SpecError
from lowbit.nn import W4A8Linear, W8A8Linear
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))


def quantized(preset):
    r = load_recipe(preset)
    for step in r.steps:
        if step.get("lkd"):
            step["steps"] = 3  # the format is what is tested here
    return lowbit.quantize(tiny_model("qwen2"), r, IDS, progress=False)  # q/k/v carry a bias


def packed(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (W8A8Linear, W4A8Linear))}


@pytest.mark.parametrize("preset", ["w8a8-zeroquant", "w4a8-zeroquant", "w8a8-os", "w4a8"])
def test_lowbit_format_round_trip(tmp_path, preset):
    model = quantized(preset)
    mods = packed(model)
    assert len(mods) == 14
    out = lowbit.save(model, tmp_path / "q")
    again = lowbit.load(out)
    assert packed(again).keys() == mods.keys()
    for n, m in mods.items():
        r = again.get_submodule(n)
        assert type(r) is type(m)
        for k, t in m.state_dict().items():
            assert torch.equal(r.state_dict()[k], t), (n, k)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
    assert again.lowbit_recipe["name"] == preset


@pytest.mark.parametrize("preset,weights,act", [("w8a8-zeroquant", "channel", ("token", True)),
                                                ("w8a8-os", "tensor", ("tensor", False))])
def test_compressed_tensors_int_quantized(tmp_path, preset, weights, act):
    model = quantized(preset)
    check_recipe_fits_format(load_recipe(preset), "compressed-tensors")
    out = lowbit.save(model, tmp_path / "q", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == weights
    assert (group["input_activations"]["strategy"], group["input_activations"]["dynamic"]) == act
    again = lowbit.load(out)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)

    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).process(load_file(out / "model.safetensors"))
    for n, m in packed(model).items():
        assert torch.equal(dense[f"{n}.weight"], m.dequantize_weight()), n
    assert sum(k.endswith("input_scale") for k in dense) == (14 if not act[1] else 0)


@pytest.mark.parametrize("preset", ["w4a8", "w4a8-zeroquant"])
def test_w4a8_has_no_compressed_tensors_form(tmp_path, preset):
    with pytest.raises(LowbitError, match="--format lowbit"):
        check_recipe_fits_format(load_recipe(preset), "compressed-tensors")
    with pytest.raises(SpecError, match="W4A8Linear"):
        lowbit.save(quantized(preset), tmp_path / "x", format="compressed-tensors")
    assert not (tmp_path / "x").exists()
