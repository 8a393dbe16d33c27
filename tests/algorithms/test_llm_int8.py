"""LLM.int8(): MixedInt8Linear against its float linear, the preset, the lowbit format round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import SpecError
from lowbit.nn import MixedInt8Linear, W8A8Linear
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_module_handles_outlier_features_better_than_w8a8():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(50, 64)
    x[:, 7] *= 40  # one outlier feature, as LLM activations have
    with torch.no_grad():
        ref = lin(x)
        mixed = MixedInt8Linear.from_float(lin)(x)
        plain = W8A8Linear.from_float(lin, weight_granularity="channel", act_mode="per_token")(x)
    err = lambda y: float((y - ref).pow(2).mean() / ref.pow(2).mean())  # noqa: E731
    assert err(mixed) < 1e-3
    assert err(mixed) < err(plain) / 5


def test_preset_and_round_trip(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 50.0  # an outlier feature into q/k/v
        want = model(IDS).logits
    q = lowbit.quantize(model, "w8a8-llm-int8", None, progress=False)
    mods = [m for m in q.modules() if isinstance(m, MixedInt8Linear)]
    assert len(mods) == 14 and all(m.threshold == 6.0 for m in mods)
    with torch.no_grad():
        got = q(IDS).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.01
    lowbit.save(q, tmp_path / "ckpt")
    again = lowbit.load(tmp_path / "ckpt")
    r = again.get_submodule("model.layers.1.mlp.down_proj")
    assert type(r) is MixedInt8Linear and r.threshold == 6.0
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, got)


def test_bad_settings():
    rec = load_recipe("w8a8-llm-int8")
    rec.steps[0]["threshold"] = -1.0
    with pytest.raises(SpecError, match="threshold"):
        rec.build()
    rec = load_recipe("w8a8-sq-o2")  # per-tensor weights
    rec.steps = [{"method": "llm_int8"}]
    with pytest.raises(SpecError, match="per output row"):
        rec.build()
