"""W4A8Linear: the two-level int4 grid against float per-group int4, the forward against float, the
w4a8 preset, and lowbit's checkpoint round trip."""

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import GroupSizeError, InvalidWeightsError, SpecError
from lowbit.nn import W4A8Linear
from lowbit.nn.w4a8_linear import int4_weight
from lowbit.quant import PerChannel, PerGroup, QuantSpec, quantize_dequantize

from ..conftest import tiny_model

GEN = torch.Generator().manual_seed(0)


def _mse(a, b):
    return float((a - b).pow(2).mean())


def _sqnr_db(ref, got):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()))


def _two_level(w, g=64):
    codes, s, k = int4_weight(w, "group", g)
    return codes.float() * k.float().repeat_interleave(g, dim=1) * s, codes, k


@pytest.mark.parametrize("outlier", [1.0, 20.0])
def test_two_level_grid_is_as_good_as_float_group_scales(outlier):
    w = torch.randn(128, 512, generator=GEN) * 0.05
    w[:, 7] *= outlier  # one large input column: its group needs k = 16, the others much less
    deq, codes, k = _two_level(w)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert int(k.min()) >= 1 and int(k.max()) <= 16
    float_group = quantize_dequantize(w, QuantSpec(bits=4, symmetric=True, granularity=PerGroup(64)))
    per_channel = quantize_dequantize(w, QuantSpec(bits=4, symmetric=True, granularity=PerChannel()))
    # integer group scales under a per-row float scale lose nothing measurable against float group
    # scales here (the k search also may clip), and beat one scale per row clearly
    assert _mse(deq, w) < 1.05 * _mse(float_group, w)
    assert _mse(deq, w) < 0.8 * _mse(per_channel, w)


@pytest.mark.parametrize("gran,group", [("group", 64), ("channel", None), ("tensor", None)])
def test_forward_against_float(gran, group):
    lin = torch.nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=GEN)
    m = W4A8Linear.from_float(lin, weight_granularity=gran, group_size=group)
    x = torch.randn(4, 7, 256, generator=GEN)
    y = m(x)
    # against the module's own (dequantized) weight: only the per-token int8 rounding of x differs
    exact = F.linear(x, m.dequantize_weight(), m.bias)
    assert _sqnr_db(exact, y) > 30
    # against the float layer: the 4-bit weight dominates
    assert _sqnr_db(lin(x).detach(), y) > {"group": 17, "channel": 15, "tensor": 10}[gran]
    scales = {"group": 96 * 32 + 96 * 4 * 8, "channel": 96 * 32, "tensor": 32}[gran]
    assert m.storage_bits() == 256 * 96 * 4 + scales


def test_bf16_cast_keeps_scales_float32():
    lin = torch.nn.Linear(128, 32)
    m = W4A8Linear.from_float(lin, weight_granularity="group", group_size=64).to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float32 and m.qweight.dtype == torch.uint8
    assert m.bias.dtype == torch.bfloat16
    y = m(torch.randn(2, 128, generator=GEN).bfloat16())
    assert y.dtype == torch.bfloat16


def test_bad_layers():
    with pytest.raises(SpecError, match="even"):
        W4A8Linear(63, 8, weight_granularity="channel")
    with pytest.raises(GroupSizeError):
        W4A8Linear(96, 8, weight_granularity="group", group_size=64)
    with pytest.raises(SpecError, match="granularity"):
        W4A8Linear(64, 8, weight_granularity="row")
    w = torch.randn(8, 64)
    w[0, 0] = float("nan")
    with pytest.raises(InvalidWeightsError, match="NaN"):
        int4_weight(w, "group", 32, name="x")
    with pytest.raises(SpecError, match="\\[-8, 7\\]"):
        W4A8Linear.from_codes(torch.full((4, 8), 9, dtype=torch.int8), torch.ones(4, 1), None)


IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_w4a8_preset_and_native_round_trip(tmp_path):
    model = tiny_model("qwen2")  # q/k/v with a bias
    with torch.no_grad():
        want = model(IDS).logits
    q = lowbit.quantize(model, "w4a8", progress=False)
    mods = {n: m for n, m in q.named_modules() if isinstance(m, W4A8Linear)}
    assert len(mods) == 14
    assert all(m.weight_granularity == "group" and m.group_size == 64 for m in mods.values())
    with torch.no_grad():
        got = q(IDS).logits
    assert _mse(got, want) / float(want.pow(2).mean()) < 0.3
    out = lowbit.save(q, tmp_path / "q")
    again = lowbit.load(out)
    for n, m in mods.items():
        r = again.get_submodule(n)
        assert isinstance(r, W4A8Linear)
        for k, t in m.state_dict().items():
            assert torch.equal(r.state_dict()[k], t), (n, k)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, got)


def test_w4a8_recipe_errors(tmp_path):
    from lowbit.recipes import load_recipe

    with pytest.raises(SpecError, match="4-bit symmetric"):
        load_recipe("w4a8", bits=8).build()
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nweights: {bits: 4, symmetric: true, group_size: 64}\n"
                   "activations: {granularity: tensor, dynamic: true}\nsteps: [{method: w4a8}]\n")
    with pytest.raises(SpecError, match="per token"):
        load_recipe(bad).build()


def test_rotated_module_against_float():
    """W R^T in int4 groups times R x in int8 per token: the float product, with less error than the
    plain module when the input has large channels and the weight a few large entries."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 128, generator=g) * 0.05
    w[:, 9] *= 8
    x = torch.randn(40, 128, generator=g) * 0.3
    x[:, [3, 70]] = 5.0
    ref = x @ w.t()
    plain = W4A8Linear.from_weight(w, None, group_size=64)
    rot = W4A8Linear.from_weight(w, None, group_size=64, rotate_block=64, rotate_seed=2)
    with torch.no_grad():
        e_plain, e_rot = _mse(plain(x), ref), _mse(rot(x), ref)
        assert e_rot < e_plain / 2, (e_rot, e_plain)
        # the rotated weight rotated back: the float weight up to the int4 grid
        assert _mse(rot.dequantize_weight(), w) < _mse(plain.dequantize_weight(), w)
        assert rot(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert rot.storage_bits() == plain.storage_bits() + 128 * 8 and "rotate_block=64" in repr(rot)
    from lowbit.nn.fake_quant import FakeQuantLinear
    with pytest.raises(SpecError, match="rotated"):
        FakeQuantLinear.from_w4a8linear(rot)


def test_rotated_w4a8_step_round_trip(tmp_path):
    """rotate: hadamard on the w4a8 step: every module rotated, GPTQ's codes chosen in the rotated basis
    (closer to the float model on its calibration tokens than rounding to nearest there), a lossless
    round trip of the signs and codes."""
    from lowbit.recipes import load_recipe

    model = tiny_model("llama")
    with torch.no_grad():
        want = model(IDS).logits
    errs = {}
    for preset in ("w4a8", "w4a8-gptq"):
        rec = load_recipe(preset)
        rec.steps[0].update(rotate="hadamard", rotate_block=32)
        m = tiny_model("llama")
        m.load_state_dict(model.state_dict())
        q = lowbit.quantize(m, rec, IDS if preset == "w4a8-gptq" else None, progress=False)
        with torch.no_grad():
            got = q(IDS).logits
        errs[preset] = _mse(got, want) / float(want.pow(2).mean())
    assert errs["w4a8-gptq"] < errs["w4a8"] < 0.3, errs
    assert q.lowbit_recipe["steps"][-1]["rotate_block"] == 32
    mods = {n: x for n, x in q.named_modules() if isinstance(x, W4A8Linear)}
    assert len(mods) == 14 and all(x.rotate_block == 32 for x in mods.values())
    again = lowbit.load(lowbit.save(q, tmp_path / "q"))
    for n, x in mods.items():
        assert torch.equal(again.get_submodule(n).rotation_signs, x.rotation_signs)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, got)
