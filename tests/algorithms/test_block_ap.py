import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.algorithms import Algorithm, BlockAP
from lowbit.algorithms.block_ap import _one_window
from lowbit.calib import BlockRunner
from lowbit.errors import CalibrationError, SpecError
from lowbit.models import get_adapter
from lowbit.nn import FakeQuantLinear, WQLinear
from lowbit.quant import PerGroup, QuantSpec
from lowbit.recipes import Recipe

from ..conftest import tiny_model

SPEC = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32))
FAST = dict(epochs=4, lr=1e-3, scale_lr=1e-3, autocast=None)


def _samples(n=12, length=32, seed=0):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


class Probe(Algorithm):
    """The block's reconstruction error, MSE(block(x_q), float block(x_f)), as it stands."""

    needs_float_outputs = True

    def __init__(self, tag, store):
        self.tag, self.store = tag, store

    def quantize_block(self, ctx):
        num = sum(F.mse_loss(o.float(), t.float(), reduction="sum") for o, t in zip(ctx.forward(), ctx.float_outputs))
        self.store.setdefault(ctx.index, {})[self.tag] = float(num) / sum(t.numel() for t in ctx.float_outputs)


def _steps(*steps):
    return Recipe(name="t", description="", weights=SPEC, steps=list(steps)).build()


@pytest.mark.parametrize("start", [{"method": "gptq", "act_order": True}, {"method": "rtn"}])
def test_block_ap_lowers_every_blocks_reconstruction_error_from_its_ptq_start(start):
    model = tiny_model("llama")
    store = {}
    ptq, bap = _steps(start, {"method": "block_ap", **FAST})
    BlockRunner(model, get_adapter(model), _samples(), batch_size=4, progress=False).run(
        [ptq, Probe("start", store), bap, Probe("end", store)])
    assert sorted(store) == [0, 1]
    for i, e in store.items():
        assert e["end"] < 0.97 * e["start"], (i, e)
    # packed again, at the recipe's width, and the history says what happened
    assert all(isinstance(m, WQLinear) and m.bits == 3 for n, m in model.named_modules() if n.endswith("_proj"))
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert [h["block"] for h in bap.history] == [0, 1] and all(h["steps"] == 4 * 6 for h in bap.history)


def test_block_ap_is_deterministic_given_a_seed_and_changes_with_it():
    def run(seed):
        model = tiny_model("llama")
        lowbit.quantize(model, Recipe(name="t", description="", weights=SPEC,
                                      steps=[{"method": "rtn"}, {"method": "block_ap", **FAST, "seed": seed}]),
                        _samples(), progress=False)
        return {n: (m.qweight.clone(), m.scales.clone(), m.qzeros.clone())
                for n, m in model.named_modules() if isinstance(m, WQLinear)}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))
    assert any(not torch.equal(x, y) for n in a for x, y in zip(a[n], c[n]))


def test_block_ap_model_saves_and_reloads_like_ptq(tmp_path):
    model = tiny_model("llama")
    rec = Recipe(name="t", description="", weights=SPEC, steps=[{"method": "gptq"}, {"method": "block_ap", **FAST}])
    lowbit.quantize(model, rec, _samples(), progress=False)
    assert [a["method"] for a in model.lowbit_recipe["algorithms"]] == ["gptq", "block_ap"]
    ids = _samples(2, seed=4)
    with torch.no_grad():
        out = model(ids).logits
        lowbit.save(model, tmp_path / "m")
        again = lowbit.load(tmp_path / "m")
        assert torch.equal(again(ids).logits, out)


def test_one_window_of_keyword_arguments_and_bad_settings():
    cos = torch.randn(1, 8, 4).expand(3, 8, 4)
    got = _one_window({"position_embeddings": (cos, cos), "flag": True, "mask": None}, 3)
    assert got["position_embeddings"][0].shape == (1, 8, 4) and got["flag"] is True and got["mask"] is None
    with pytest.raises(CalibrationError, match="without padding"):
        _one_window({"attention_mask": torch.randint(0, 2, (3, 8))}, 3)
    with pytest.raises(SpecError, match="unknown settings"):
        BlockAP(SPEC, epoch=2)
    with pytest.raises(SpecError, match="integer grids"):
        BlockAP(QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(32)))
