"""End-to-end gate: the float reference perplexity of a zoo model (needs `lowbit zoo pull smollm2-135m`)."""

from pathlib import Path

import pytest
import torch

from lowbit import zoo
from lowbit.eval import evaluate, load_windows

WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "wiki.test.joined.txt"


@pytest.mark.slow
def test_smollm2_reference_ppl():
    if not zoo.is_pulled("smollm2-135m"):
        pytest.skip(f"smollm2-135m is not pulled into {zoo.cache_root()}; run: lowbit zoo pull smollm2-135m")
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is missing")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = zoo.ZOO["smollm2-135m"]
    path = zoo.path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    windows = load_windows(tokenizer, WIKITEXT, seqlen=512, windows=40, bos=entry.bos_per_window)
    result = evaluate(model, windows)
    assert result["ppl"] == pytest.approx(entry.float_ppl, abs=0.05)
