"""Prefill and decode throughput, and peak memory.

A hand-written greedy loop rather than `generate()`: generate adds logits processors, stopping
criteria and cache bookkeeping whose cost varies between transformers versions, and it reports one
total. Here prefill (one forward over the prompt) and decode (single-token forwards on the KV cache)
are timed apart, because quantized kernels help them very differently (compute- vs memory-bound).
"""

from __future__ import annotations

import inspect
import resource
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval._common import eval_mode, model_device

__all__ = ["measure_throughput"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab_size(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return int(model.config.vocab_size)


def _peak_rss() -> tuple[float, str]:
    """(MiB, where it came from). Linux: VmHWM of /proc/self/status, the peak of this process's own
    memory; ru_maxrss would carry over the parent's resident set at fork into a child process (a
    `lowbit bench` started by a benchmark holding models would report the benchmark's memory)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "/proc/self/status VmHWM (process peak since exec)"
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return (peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024), "getrusage ru_maxrss"


def _current_rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / (1024 * 1024)


def _prefill_kwargs(model) -> dict:
    # generate() asks for the last position's logits only; with a 262k vocabulary (Gemma) the full
    # [prompt_len, vocab] head would otherwise dominate the prefill time.
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _one_run(
    model, prompt: torch.Tensor, new_tokens: int, device: torch.device, prefill_kwargs: dict
) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **prefill_kwargs)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    cache = out.past_key_values
    del out
    for _ in range(new_tokens):
        out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure_throughput(
    model,
    *,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokens per second for prefill (`batch * prompt_len` tokens) and decode (`batch * new_tokens`).

    Each of `repeats` timed runs is one prefill followed by `new_tokens` greedy single-token forwards;
    the medians are reported. The prompt is random in-vocabulary ids from `seed`.

    `peak_rss_mb` is the process's peak resident set since it started (VmHWM on Linux), so it includes
    loading; `rss_mb` (psutil, when installed) is the resident set after the runs.
    """
    if prompt_len < 1 or new_tokens < 1 or batch < 1 or repeats < 1 or warmup < 0:
        raise LowbitError("prompt_len, new_tokens, batch and repeats must be at least 1, warmup at least 0")
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, _vocab_size(model), (batch, prompt_len), generator=generator).to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_kwargs = _prefill_kwargs(model)
    prefill_s, decode_s = [], []
    with torch.inference_mode(), eval_mode(model):
        for run in tqdm(range(warmup + repeats), desc="bench", unit="run", disable=not progress):
            p, d = _one_run(model, prompt, new_tokens, device, prefill_kwargs)
            if run >= warmup:
                prefill_s.append(p)
                decode_s.append(d)

    prefill = statistics.median(prefill_s)
    decode = statistics.median(decode_s)
    peak_mb, peak_source = _peak_rss()
    result = {
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_tokens_per_s": batch * new_tokens / decode,
        "prefill_s": prefill,
        "decode_ms_per_token": 1000 * decode / new_tokens,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": batch,
        "repeats": repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prefill_last_logits_only": bool(prefill_kwargs),
        "peak_rss_mb": peak_mb,
        "peak_rss_source": peak_source,
    }
    rss = _current_rss_mb()
    if rss is not None:
        result["rss_mb"] = rss
        result["rss_source"] = "psutil (resident set after the runs)"
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / (1024 * 1024)
    return result
