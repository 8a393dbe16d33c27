"""Perplexity, KL divergence and top-1 agreement on non-overlapping windows (GPTQ-style).

The text is tokenized once as a whole and cut into windows of `seqlen` tokens; every window is scored
independently, its first position has no context and is not scored. This is the protocol of the
GPTQ and AWQ papers, so numbers compare with theirs at the same `seqlen`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowbit.errors import CalibrationError, LowbitError
from lowbit.eval._common import eval_mode, model_device

__all__ = ["load_windows", "evaluate", "ReferenceLogits"]

# Positions per log_softmax chunk: bounds the float32 temporaries to chunk x vocab (Gemma: 262k vocab).
_CHUNK = 128


def _read_text(text_or_path: str | os.PathLike) -> str:
    if isinstance(text_or_path, os.PathLike):
        return Path(text_or_path).read_text(encoding="utf-8")
    looks_like_path = len(text_or_path) < 4096 and "\n" not in text_or_path
    if looks_like_path and os.path.isfile(text_or_path):
        return Path(text_or_path).read_text(encoding="utf-8")
    return text_or_path


def load_windows(
    tokenizer,
    text_or_path: str | os.PathLike,
    seqlen: int = 512,
    windows: int | None = None,
    bos: bool = False,
) -> torch.Tensor:
    """Token windows `[n, seqlen]` (int64) for `evaluate`.

    `bos=True` (Gemma) makes each window `[BOS] + seqlen - 1` text tokens, taken consecutively so no
    text token is skipped between windows. Of the conventions in use, only this one reproduces the
    reference Gemma-3-270m number (23.88 on 40 x 512): BOS over the first token of each window gives
    23.80, BOS before 512 tokens 23.83, BOS before the first 511 of each 512-token window 23.84.
    """
    if seqlen < 2:
        raise CalibrationError(f"seqlen must be at least 2, got {seqlen}")
    if windows is not None and windows < 1:
        raise CalibrationError(f"windows must be at least 1, got {windows}")
    text = _read_text(text_or_path)
    # verbose=False: the "longer than the model's maximum length" warning does not apply, we cut windows
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()

    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise CalibrationError("bos=True but the tokenizer has no BOS token")
        step = seqlen - 1
    else:
        step = seqlen
    available = ids.numel() // step
    if available == 0:
        raise CalibrationError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if windows is not None and windows > available:
        raise CalibrationError(f"asked for {windows} windows of {seqlen} tokens, the text holds only {available}")
    n = available if windows is None else windows

    body = ids[: n * step].view(n, step)
    if not bos:
        return body.clone()
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids.to(model_device(model)), use_cache=False).logits


def _fingerprint(model) -> tuple:
    """What changes when a model is changed in place: its modules' types and hooks, and each parameter's
    and buffer's storage and in-place version counter (quantizing, smoothing or hooking it)."""
    mods = tuple((n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks))
                 for n, m in model.named_modules())
    tensors = tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    return mods, tensors


class ReferenceLogits:
    """The reference model's logits on fixed windows, computed on first use and kept in a float32 file.

    Comparing many quantized models with one float model (a benchmark table) otherwise runs the float
    model again for every row: half of all evaluation time. The values are the float32 logits
    themselves, so KL and top-1 come out exactly as with the live model. Pass it to `evaluate` as
    `ref_model`; windows other than the ones it was built for fall back to running the model. Scoring
    the reference model itself against it (`evaluate(model, windows, ref_model=ReferenceLogits(model,
    windows))`) fills the cache from that same forward, or reads it from the cache, as long as the model
    is as it was when this was built: once it is changed in place (quantized, smoothed, hooked) it is
    scored by running it, against the stored logits, and windows not stored yet are an error (their
    reference is gone). With `path`, the file outlives the run (see `__init__`).
    Size: windows x (seqlen - 1) x vocab x 4 bytes on disk (SmolLM2, 40 x 512: 4 GB; Gemma-3: 21 GB).
    """

    def __init__(self, model, windows: torch.Tensor, directory: str | os.PathLike | None = None,
                 path: str | os.PathLike | None = None, key: str = ""):
        """`path`: keep the logits in this file after `close` (and beside it, in `path`.json, which
        windows are done), so that later runs on the same windows read them instead of running the
        model. The JSON records the windows (SHA-256) and `key`, which should name the reference model (its
        checkpoint path): the file cannot tell models apart. A file kept for other windows or another key is
        an error, never overwritten."""
        import hashlib
        import tempfile

        self.model = model
        self._print = _fingerprint(model)
        self.windows = windows.clone()
        self._done = torch.zeros(windows.shape[0], dtype=torch.bool)
        self._store = None
        self._dir = None
        if path is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lowbit-ref-", dir=directory)
            self._file = Path(self._dir.name) / "logits.f32"
            self._meta = None
            return
        self._file = Path(path)
        self._meta = self._file.with_name(self._file.name + ".json")
        self._id = {"windows_sha256": hashlib.sha256(self.windows.numpy().tobytes()).hexdigest(), "key": key}
        if self._file.is_file() and self._meta.is_file():
            meta = json.loads(self._meta.read_text())
            shape = meta.get("shape")
            if {k: meta.get(k) for k in self._id} != self._id:
                # never overwrite another reference's logits (Gemma-3's take 21 GB and an hour to redo)
                raise LowbitError(f"{self._file} holds reference logits of other windows or another model "
                                  f"(key {meta.get('key')!r}, here {key!r}); pass another path, or delete it")
            if shape and self._file.stat().st_size == math.prod(shape) * 4:
                self._store = torch.from_file(str(self._file), shared=True, size=math.prod(shape),
                                              dtype=torch.float32).view(shape)
                self._done = torch.tensor(meta["done"], dtype=torch.bool)

    def _cached(self, start: int, batch: torch.Tensor) -> bool:
        end = start + batch.shape[0]
        return end <= self.windows.shape[0] and torch.equal(batch.cpu(), self.windows[start:end])

    def is_reference(self, model) -> bool:
        """Whether `model` is the reference model, unchanged since this was built."""
        return model is self.model and _fingerprint(model) == self._print

    def logits(self, start: int, batch: torch.Tensor) -> torch.Tensor:
        """Logits `[b, seqlen - 1, vocab]` of windows `start .. start + b` (what `evaluate` scores)."""
        stored = self.cached_logits(start, batch)
        if stored is not None:
            return stored
        if not self.is_reference(self.model):
            raise LowbitError("the reference model was changed in place after ReferenceLogits was built, and these "
                              "windows' reference logits were not stored before: build it from an unchanged copy")
        if not self._cached(start, batch):
            return _logits(self.model, batch)[:, :-1]
        if not bool(self._done[start : start + batch.shape[0]].all()):
            return self._keep(start, _logits(self.model, batch)[:, :-1])
        return self._store[start : start + batch.shape[0]].clone()

    def fill(self, start: int, batch: torch.Tensor, logits: torch.Tensor) -> None:
        """Stores `logits` (`[b, seqlen - 1, vocab]`, computed by the reference model itself on windows
        `start .. start + b`), so that scoring the reference model also fills the cache and costs one
        forward, not two. Windows other than the cached ones are ignored."""
        if self._cached(start, batch) and not bool(self._done[start : start + batch.shape[0]].all()):
            self._keep(start, logits)

    def _keep(self, start: int, logits: torch.Tensor) -> torch.Tensor:
        fresh = logits.float().cpu()
        if self._store is None:
            shape = (self.windows.shape[0], *fresh.shape[1:])
            with open(self._file, "wb") as f:  # sparse: blocks are written as windows come
                f.truncate(math.prod(shape) * 4)
            self._store = torch.from_file(str(self._file), shared=True, size=math.prod(shape),
                                          dtype=torch.float32).view(shape)
        self._store[start : start + fresh.shape[0]] = fresh
        self._done[start : start + fresh.shape[0]] = True
        if self._meta is not None:
            self._meta.write_text(json.dumps({**self._id, "shape": list(self._store.shape),
                                              "done": self._done.tolist()}))
        return fresh

    def cached_logits(self, start: int, batch: torch.Tensor) -> torch.Tensor | None:
        """The stored logits of windows `start .. start + b`, or None where they are not all stored."""
        if self._cached(start, batch) and bool(self._done[start : start + batch.shape[0]].all()):
            return self._store[start : start + batch.shape[0]].clone()
        return None

    def close(self) -> None:
        self._store = None
        if self._dir is not None:
            self._dir.cleanup()


def evaluate(
    model,
    windows: torch.Tensor,
    ref_model=None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of `model` on `windows`; with `ref_model`, also KL(P_ref || P_model) and top-1 agreement.

    Both models run on each batch in turn, and only that batch's logits are alive at any time.
    `nll` and `kl` are means over the scored positions, in nats.
    """
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise CalibrationError(f"windows must be [n >= 1, seqlen >= 2], got {list(windows.shape)}")
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be at least 1, got {batch_size}")
    n, seqlen = windows.shape
    nll_sum = 0.0
    kl_sum = 0.0
    agree = 0
    scored = 0
    start = time.perf_counter()

    batches = range(0, n, batch_size)
    desc = "ppl+kl" if ref_model is not None else "ppl"
    cached = isinstance(ref_model, ReferenceLogits)
    own = cached and ref_model.is_reference(model)  # scoring the unchanged reference itself
    with torch.inference_mode(), eval_mode(model, ref_model.model if cached else ref_model):
        for i in tqdm(batches, desc=desc, unit="batch" if batch_size > 1 else "window", disable=not progress):
            batch = windows[i : i + batch_size]
            logits = ref_model.cached_logits(i, batch) if own else None
            if logits is None:
                logits = _logits(model, batch)[:, :-1]  # [b, seqlen - 1, vocab]
            targets = batch[:, 1:].to(logits.device)
            ref_logits = None
            if own:  # its logits fill the cache (or came from it)
                ref_model.fill(i, batch, logits)
                ref_logits = logits
            elif cached:
                ref_logits = ref_model.logits(i, batch).to(logits.device)
            elif ref_model is not None:
                ref_logits = _logits(ref_model, batch)[:, :-1].to(logits.device)
            for j in range(0, seqlen - 1, _CHUNK):
                logp = F.log_softmax(logits[:, j : j + _CHUNK].float(), dim=-1)
                tgt = targets[:, j : j + _CHUNK]
                nll_sum += -logp.gather(-1, tgt.unsqueeze(-1)).double().sum().item()
                if ref_logits is not None:
                    ref_logp = F.log_softmax(ref_logits[:, j : j + _CHUNK].float(), dim=-1)
                    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)
                    kl_sum += kl.double().sum().item()
                    agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
            scored += targets.numel()
            del logits, ref_logits

    nll = nll_sum / scored
    result = {
        "ppl": math.exp(nll) if nll < 700 else math.inf,  # a broken model must not crash the report
        "nll": nll,
        "windows": n,
        "seqlen": seqlen,
        "tokens": scored,
        "seconds": time.perf_counter() - start,
    }
    if ref_model is not None:
        result["kl"] = kl_sum / scored
        result["top1_agreement"] = agree / scored
    return result
