import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import CalibrationError, LowbitError
from lowbit.eval import ReferenceLogits, evaluate, load_windows

TEXT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 characters, one token each


def test_windows_are_consecutive_without_bos(tokenizer):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    w = load_windows(tokenizer, TEXT, seqlen=32)
    assert w.dtype == torch.long and w.shape == (len(ids) // 32, 32)
    assert torch.equal(w.flatten(), ids[: w.numel()])


def test_windows_with_bos_start_with_bos_and_skip_no_text(tokenizer):
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    w = load_windows(tokenizer, TEXT, seqlen=32, bos=True)
    assert w.shape == (len(ids) // 31, 32)
    assert (w[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(w[:, 1:].flatten(), ids[: w.shape[0] * 31])


def test_windows_keeps_the_first_n(tokenizer):
    all_windows = load_windows(tokenizer, TEXT, seqlen=32)
    first = load_windows(tokenizer, TEXT, seqlen=32, windows=3)
    assert torch.equal(first, all_windows[:3])


def test_windows_reads_a_file(tokenizer, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert torch.equal(load_windows(tokenizer, f, seqlen=32), load_windows(tokenizer, str(f), seqlen=32))
    assert torch.equal(load_windows(tokenizer, f, seqlen=32), load_windows(tokenizer, TEXT, seqlen=32))


def test_windows_errors(tokenizer):
    with pytest.raises(CalibrationError, match="fewer than one window"):
        load_windows(tokenizer, "short", seqlen=32)
    with pytest.raises(CalibrationError, match="holds only"):
        load_windows(tokenizer, TEXT, seqlen=32, windows=100)


def _hand_nll(model, windows):
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return torch.cat(losses).mean().item()


def test_ppl_is_exp_of_cross_entropy(model, tokenizer):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=4)
    result = evaluate(model, windows, progress=False)
    nll = _hand_nll(model, windows)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result["windows"], result["seqlen"], result["tokens"]) == (4, 32, 4 * 31)
    assert "kl" not in result


def test_batching_does_not_change_the_result(model, tokenizer):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=5)
    one = evaluate(model, windows, batch_size=1, progress=False)
    uneven = evaluate(model, windows, batch_size=2, progress=False)
    assert uneven["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert uneven["tokens"] == one["tokens"]


def test_kl_against_itself_is_zero(model, tokenizer):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=3)
    result = evaluate(model, windows, ref_model=model, progress=False)
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["top1_agreement"] == 1.0


def _perturbed(model, seed: int):
    noisy = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return noisy


def test_kl_against_a_perturbed_copy(model, tokenizer):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=3)
    noisy = _perturbed(model, seed=1)
    result = evaluate(noisy, windows, ref_model=model, progress=False)

    with torch.no_grad():
        lq = torch.cat([noisy(w[None]).logits[0, :-1] for w in windows]).log_softmax(-1)
        lr = torch.cat([model(w[None]).logits[0, :-1] for w in windows]).log_softmax(-1)
    kl = (lr.exp() * (lr - lq)).sum(-1).mean().item()
    top1 = (lq.argmax(-1) == lr.argmax(-1)).float().mean().item()
    assert result["kl"] > 0
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(top1)


def test_evaluate_leaves_training_flags_alone(make_llama, tokenizer):
    m = make_llama().train()
    evaluate(m, load_windows(tokenizer, TEXT, seqlen=32, windows=1), progress=False)
    assert all(mod.training for mod in m.modules())


def test_evaluate_rejects_bad_windows(model):
    with pytest.raises(CalibrationError):
        evaluate(model, torch.zeros(2, 1, dtype=torch.long), progress=False)


@contextlib.contextmanager
def _counted_reference(model, windows, tmp_path):
    """(ReferenceLogits of `model`, the list that grows by one per forward of `model`)."""
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    ref = ReferenceLogits(model, windows, directory=tmp_path)  # after the hook: a hook added later is a change
    try:
        yield ref, calls
    finally:
        hook.remove()
        ref.close()


def test_cached_reference_gives_the_live_reference_numbers(model, tokenizer, tmp_path):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=4)
    noisy = _perturbed(model, seed=2)
    live = evaluate(noisy, windows, ref_model=model, batch_size=2, progress=False)
    with _counted_reference(model, windows, tmp_path) as (ref, calls):
        first = evaluate(noisy, windows, ref_model=ref, batch_size=2, progress=False)
        n_first = len(calls)
        again = evaluate(noisy, windows, ref_model=ref, batch_size=2, progress=False)
        other = evaluate(noisy, windows[1:3], ref_model=ref, progress=False)  # not the cached windows
    assert n_first == 2 and len(calls) == 4  # once per batch, then never for the cached windows
    for r in (first, again):
        assert (r["ppl"], r["kl"], r["top1_agreement"]) == (live["ppl"], live["kl"], live["top1_agreement"])
    assert other["kl"] > 0
    assert not any(tmp_path.iterdir())


def test_scoring_the_reference_itself_fills_the_cache(model, tokenizer, tmp_path):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=4)
    noisy = _perturbed(model, seed=3)
    plain = evaluate(model, windows, progress=False)
    live = evaluate(noisy, windows, ref_model=model, batch_size=2, progress=False)
    with _counted_reference(model, windows, tmp_path) as (ref, calls):
        own = evaluate(model, windows, ref_model=ref, batch_size=2, progress=False)
        n_own = len(calls)
        other = evaluate(noisy, windows, ref_model=ref, batch_size=2, progress=False)
    assert n_own == 2 and len(calls) == 2  # one forward per batch for its own score, none for the other model
    assert own["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)
    assert own["kl"] == 0.0 and own["top1_agreement"] == 1.0
    assert (other["ppl"], other["kl"], other["top1_agreement"]) == (live["ppl"], live["kl"], live["top1_agreement"])


def test_a_reference_changed_in_place_is_scored_against_its_stored_logits(model, tokenizer, tmp_path):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=4)
    work = copy.deepcopy(model)
    ref = ReferenceLogits(work, windows, directory=tmp_path)
    try:
        first = evaluate(work, windows[:2], ref_model=ref, progress=False)  # stores windows 0 and 1 only
        assert first["kl"] == 0.0
        with torch.no_grad():
            work.lm_head.weight.mul_(1.5)  # in place: same object, new numbers
        changed = evaluate(work, windows[:2], ref_model=ref, progress=False)
        live = evaluate(work, windows[:2], ref_model=model, progress=False)
        assert changed["kl"] > 1e-4 and changed["kl"] == pytest.approx(live["kl"], rel=1e-5)
        assert changed["ppl"] == pytest.approx(live["ppl"], rel=1e-6)
        with pytest.raises(LowbitError, match="changed in place"):
            evaluate(work, windows, ref_model=ref, progress=False)  # windows 2, 3 have no reference left
        hooked = copy.deepcopy(model)
        ref2 = ReferenceLogits(hooked, windows[:1], directory=tmp_path)
        evaluate(hooked, windows[:1], ref_model=ref2, progress=False)
        hooked.lm_head.register_forward_hook(lambda m, i, o: o * 0.5)
        assert evaluate(hooked, windows[:1], ref_model=ref2, progress=False)["kl"] > 1e-4
        ref2.close()
    finally:
        ref.close()


def test_kept_reference_logits_are_reused_by_a_later_run(model, tokenizer, tmp_path):
    windows = load_windows(tokenizer, TEXT, seqlen=32, windows=3)
    noisy = _perturbed(model, seed=4)
    live = evaluate(noisy, windows, ref_model=model, progress=False)
    plain = evaluate(model, windows, progress=False)
    path = tmp_path / "ref.f32"
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = ReferenceLogits(model, windows, path=path, key="m")
        evaluate(noisy, windows[:2], ref_model=first, progress=False)  # two of three windows
        first.close()
        assert len(calls) == 2 and path.is_file()
        second = ReferenceLogits(model, windows, path=path, key="m")
        own = evaluate(model, windows, ref_model=second, progress=False)  # the float row: reads 2, runs 1
        assert len(calls) == 3
        again = evaluate(noisy, windows, ref_model=second, progress=False)
        assert len(calls) == 3
        kept = path.read_bytes()
        with pytest.raises(LowbitError, match="other windows or another model"):
            ReferenceLogits(model, windows, path=path, key="another model")  # neither reused nor overwritten
        with pytest.raises(LowbitError, match="other windows or another model"):
            ReferenceLogits(model, windows[:2], path=path, key="m")
        assert path.read_bytes() == kept and len(calls) == 3
    finally:
        hook.remove()
    assert own["ppl"] == pytest.approx(plain["ppl"], rel=1e-6) and own["kl"] == 0.0
    assert (again["ppl"], again["kl"], again["top1_agreement"]) == (live["ppl"], live["kl"], live["top1_agreement"])
