"""ZeroQuant: the row-group weight layout, the presets' modules, LKD lowering each block's held-out
error and what it packs computing what it trained."""

import pytest
import torch

import lowbit
from lowbit.algorithms.zeroquant import ZeroQuant, _StudentLinear, row_group_codes, row_group_scales
from lowbit.errors import CalibrationError, SpecError
from lowbit.nn import W4A8Linear, W8A8Linear
from lowbit.recipes import load_recipe

from ..conftest import tiny_model

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_row_groups_are_runs_of_output_rows():
    w = torch.randn(192, 64, generator=GEN)
    s = row_group_scales(w, 8, 64)  # 64 groups of 3 rows
    assert s.shape == (192, 1)
    for g in range(64):
        rows = w[3 * g : 3 * g + 3]
        assert torch.all(s[3 * g : 3 * g + 3] == rows.abs().max() / 127.5)
    q = row_group_codes(w, s, 8)
    assert int(q.min()) >= -128 and int(q.max()) <= 127
    assert float((q * s - w).abs().max()) <= float(s.max()) / 2 + 1e-7
    # 100 rows in at most 64 groups: the largest divisor, 50 groups of 2
    s2 = row_group_scales(torch.randn(100, 8, generator=GEN), 4, 64)
    assert s2.unique().numel() == 50
    # -1: one group per row (per-channel)
    w3 = torch.randn(10, 8, generator=GEN)
    assert torch.equal(row_group_scales(w3, 4, -1), (w3.abs().amax(dim=1, keepdim=True) / 7.5))


def test_w8a8_zeroquant_preset():
    model = tiny_model("llama")
    with torch.no_grad():
        want = model(IDS).logits
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    q = lowbit.quantize(model, "w8a8-zeroquant", progress=False)
    mods = {n: m for n, m in q.named_modules() if isinstance(m, W8A8Linear)}
    assert len(mods) == 14 and all(m.weight_granularity == "channel" and m.act_mode == "per_token"
                                   for m in mods.values())
    for n, m in mods.items():
        s = m.weight_scale.reshape(-1)
        groups = min(64, m.out_features)  # 32-row k/v projections: one group per row
        assert torch.all(s.reshape(groups, -1) == s.reshape(groups, -1)[:, :1])  # equal within a group
        assert float((m.dequantize_weight() - weights[n]).abs().max()) <= float(s.max()) / 2 + 1e-6
    with torch.no_grad():
        got = q(IDS).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.01
    assert q.lowbit_recipe["algorithms"][0] == {"method": "zeroquant", "bits": 8, "groups": 64,
                                                "activations": "per_token", "lkd": False}


@pytest.mark.parametrize("preset", ["w4a8-zeroquant", "w8a8-zeroquant"])
def test_student_forward_is_what_gets_packed(preset):
    lin = torch.nn.Linear(128, 32)
    with torch.no_grad():
        lin.weight.normal_(0, 0.1, generator=GEN)
    r = load_recipe(preset)
    alg = ZeroQuant(r.weights, r.activations, groups=8)
    grid = alg._grid(lin.weight, "x")
    st = _StudentLinear(lin.weight, lin.bias, grid)
    with torch.no_grad():
        st.weight.add_(torch.randn(32, 128, generator=GEN) * 0.01)  # as if tuned
    packed = alg._pack(st.weight.detach(), lin.bias.detach(), grid, "x")
    assert isinstance(packed, W4A8Linear if preset.startswith("w4") else W8A8Linear)
    if preset.startswith("w4"):
        assert packed.weight_granularity == "group" and packed.group_size == 64
    x = torch.randn(5, 128, generator=GEN)
    with torch.no_grad():
        torch.testing.assert_close(packed.dequantize_weight(), st.quantized_weight(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(packed(x), st(x), rtol=1e-5, atol=1e-5)


def _calib(n=16, seed=3):
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_lkd_lowers_the_held_out_block_error():
    calib, held = _calib(64), _calib(8, seed=9)
    base = tiny_model("llama")
    with torch.no_grad():
        want = base(held).logits

    def quantized(lkd: bool):
        r = load_recipe("w4a8-zeroquant")
        r.steps = [{"method": "zeroquant", "lkd": lkd, "steps": 60, "lr": 3e-4, "batch_size": 4}]
        return lowbit.quantize(tiny_model("llama"), r, calib, progress=False)

    plain, tuned = quantized(False), quantized(True)
    log = tuned.lowbit_recipe["algorithms"][0]
    assert log["lkd"] and log["blocks_tuned"] >= 1
    assert all(isinstance(m, W4A8Linear) for n, m in tuned.named_modules() if n.endswith("proj"))
    with torch.no_grad():
        e_plain = float((plain(held).logits - want).pow(2).mean())
        e_tuned = float((tuned(held).logits - want).pow(2).mean())
    assert e_tuned < 0.9 * e_plain  # on text it never saw while tuning


def test_lkd_log_and_revert():
    alg = ZeroQuant(load_recipe("w4a8-zeroquant").weights, load_recipe("w4a8-zeroquant").activations, lkd=True,
                    steps=5, lr=1e-3)
    from lowbit.calib import BlockRunner
    from lowbit.models import get_adapter

    model = tiny_model("llama")
    alg.prepare(model, get_adapter(model))
    with torch.no_grad():
        BlockRunner(model, get_adapter(model), _calib(), progress=False).run([alg])
    assert [e["block"] for e in alg.lkd_log] == [0, 1]
    for e in alg.lkd_log:
        assert e["kept"] == (e["loss_after"] < e["loss_before"])


def test_errors():
    w8 = load_recipe("w8a8-zeroquant")
    with pytest.raises(SpecError, match="8 or 4-bit"):
        load_recipe("w8a8-zeroquant", bits=3).build()
    with pytest.raises(SpecError, match="input dim"):
        load_recipe("w4a8-zeroquant", bits=8).build()  # 8-bit weights in groups along K
    with pytest.raises(SpecError, match="groups"):
        ZeroQuant(w8.weights, w8.activations, groups=0)
    with pytest.raises(SpecError, match="lr"):
        ZeroQuant(w8.weights, w8.activations, lkd=True, lr=-1)
    with pytest.raises(SpecError, match="per token"):
        ZeroQuant(w8.weights, load_recipe("w8a8-sq-o3").activations)
    with pytest.raises(CalibrationError, match="calibration"):
        lowbit.quantize(tiny_model("llama"), "w4a8-zeroquant", None, progress=False)


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen2", "gpt2"])
def test_lkd_on_other_architectures(model_type):
    """Micro-batches slice each architecture's block kwargs (masks, rotary tables, Gemma's per-layer
    ones); whatever LKD keeps, the held-out check means no block ends worse than round to nearest."""
    calib = _calib(8)
    r = load_recipe("w4a8-zeroquant")
    r.steps = [{"method": "zeroquant", "lkd": True, "steps": 4, "lr": 3e-4, "batch_size": 2}]
    alg = r.build()[0]
    from lowbit.calib import BlockRunner
    from lowbit.models import get_adapter

    model = tiny_model(model_type)
    alg.prepare(model, get_adapter(model))
    with torch.no_grad():
        BlockRunner(model, get_adapter(model), calib, progress=False).run([alg])
    assert len(alg.lkd_log) == 2
    assert all((e["loss_after"] < e["loss_before"]) == e["kept"] for e in alg.lkd_log)
    assert sum(isinstance(m, W4A8Linear) for m in model.modules()) >= 8
