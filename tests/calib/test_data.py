import pytest
import torch

from lowbit import calib
from lowbit.errors import CalibrationError

from ..conftest import WIKI_VALID


class CharTokenizer:
    """One token per character: enough to test windowing without a real tokenizer."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        class Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])
        return Out()


def test_samples_are_seeded_windows_of_the_text():
    text = "".join(chr(97 + i % 26) for i in range(5000))
    src = calib.texts([text], n_samples=6, seqlen=32, seed=3)
    a = src.samples(CharTokenizer())
    b = src.samples(CharTokenizer())
    assert a.shape == (6, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, calib.texts([text], n_samples=6, seqlen=32, seed=4).samples(CharTokenizer()))
    ids = CharTokenizer()(text).input_ids[0]
    slices = ids.unfold(0, 32, 1)  # every contiguous 32-token slice of the text
    for row in a:
        assert (slices == row).all(dim=1).any()


def test_overrides_change_count_and_length():
    src = calib.texts(["x" * 1000])
    assert src.samples(CharTokenizer(), n_samples=3, seqlen=10).shape == (3, 10)


@pytest.mark.parametrize("text", ["", "   \n\n  "])
def test_empty_text_is_refused(text):
    with pytest.raises(CalibrationError, match="empty"):
        calib.texts([text]).samples(CharTokenizer())


def test_short_text_is_refused_with_the_token_count():
    with pytest.raises(CalibrationError, match="too short"):
        calib.texts(["abc"], seqlen=512).samples(CharTokenizer())


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        calib.text_file(tmp_path / "nope.txt").samples(CharTokenizer())


@pytest.mark.skipif(not WIKI_VALID.exists(), reason="../shared/data not beside the checkout")
def test_wikitext_validation_file_gives_samples():
    s = calib.text_file(WIKI_VALID, n_samples=4, seqlen=64).samples(CharTokenizer())
    assert s.shape == (4, 64)


def test_sample_sizes_come_from_arguments_then_source_then_recipe_then_defaults():
    text = "abcdefghij " * 400
    tok = CharTokenizer()
    recipe_block = {"n_samples": 5, "seqlen": 24}
    assert calib.texts([text]).samples(tok, fallback=recipe_block).shape == (5, 24)
    assert calib.texts([text], n_samples=2).samples(tok, fallback=recipe_block).shape == (2, 24)
    assert calib.texts([text], n_samples=2).samples(tok, 3, 8, fallback=recipe_block).shape == (3, 8)
    assert calib.texts([text]).samples(tok).shape == (calib.data.DEFAULT_SAMPLES, calib.data.DEFAULT_SEQLEN)


def test_bos_windows_are_bos_and_the_same_slots(monkeypatch):
    class BosTokenizer(CharTokenizer):
        bos_token_id = 2

    text = "".join(chr(97 + i % 26) for i in range(5000))
    plain = calib.texts([text], n_samples=5, seqlen=16).samples(BosTokenizer())
    with_bos = calib.texts([text], n_samples=5, seqlen=16).samples(BosTokenizer(), bos=True)
    assert with_bos.shape == (5, 16)
    assert (with_bos[:, 0] == 2).all()
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])  # the same seeded slots, BOS in front
    # the source's own setting wins over the caller's default
    assert torch.equal(calib.texts([text], n_samples=5, seqlen=16, bos=False).samples(BosTokenizer(), bos=True), plain)
    assert torch.equal(calib.texts([text], n_samples=5, seqlen=16, bos=True).samples(BosTokenizer()), with_bos)
    with pytest.raises(CalibrationError, match="BOS"):
        calib.texts([text], n_samples=2, seqlen=16).samples(CharTokenizer(), bos=True)


def test_quantize_cuts_bos_windows_only_when_the_source_asks(monkeypatch):
    """lowbit.quantize passes the source's BOS choice through (off by default, Gemma included)."""
    import lowbit
    from lowbit.calib import runner

    from ..conftest import tiny_model, tiny_tokenizer

    seen = []
    real = runner.BlockRunner.__init__

    def spy(self, model, adapter, samples, *a, **k):
        seen.append(samples)
        real(self, model, adapter, samples, *a, **k)

    monkeypatch.setattr(runner.BlockRunner, "__init__", spy)
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 200
    for bos in (None, True):
        lowbit.quantize(tiny_model("gemma3_text"), "w4a16-gptq", calib.texts([text], n_samples=3, seqlen=24, bos=bos),
                        tokenizer=tok, group_size=32, progress=False)
        ids = seen[-1]
        assert ids.shape == (3, 24)
        assert bool((ids[:, 0] == tok.bos_token_id).all()) == bool(bos)
