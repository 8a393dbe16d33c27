"""What the method benchmarks (bench/demo.py, bench/methods.py, bench/peers.py) share: the reference model
and its evaluation windows, one measured row per model, and the Markdown table.

A row holds: bits per weight (decoder-block linears), bytes on disk, perplexity on the windows, KL
divergence and top-1 agreement against the float model on the same windows, quantization wall time,
prefill and decode tokens/s and peak resident memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit import zoo
from lowbit.models import expects_bos
from lowbit.eval import ReferenceLogits, bits_per_weight, evaluate, load_windows, measure_throughput, model_bytes

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
WIKI_TEST = DATA / "wiki.test.joined.txt"
WIKI_VALID = DATA / "wiki.valid.tokens"


@dataclass
class Reference:
    """The float model, where it came from and the evaluation windows every row is scored on."""

    name: str
    src: Path
    fp: nn.Module
    windows: torch.Tensor  # [n, seqlen] int64
    bos: bool
    text: str
    # The float model's logits on `windows`, computed by the first row that needs them, then read back
    # (a temporary float32 file: 4 GB for SmolLM2, 21 GB for Gemma-3 on 40 x 512).
    logits: ReferenceLogits | None = None
    # Where to keep those logits after the run, for later runs on the same model and windows (None: a
    # temporary file).
    logits_path: str | None = None


def resolve_source(model: str) -> Path:
    """A zoo name (pulled if needed) or an HF checkpoint directory."""
    return zoo.pull(model) if model in zoo.ZOO else Path(model)


def load_reference(model: str, text: str | os.PathLike = WIKI_TEST, windows: int | None = 40,
                   seqlen: int = 512) -> Reference:
    src = resolve_source(model)
    fp = lowbit.load(src)
    bos = expects_bos(fp)
    ids = load_windows(fp.lowbit_tokenizer, text, seqlen=seqlen, windows=windows, bos=bos)
    print(f"{model}: {ids.shape[0]} windows x {ids.shape[1]} tokens of {Path(text).name}"
          f"{' (BOS per window)' if bos else ''}", flush=True)
    return Reference(model, src, fp, ids, bos, str(text))


def quality(model: nn.Module, ref: Reference) -> dict:
    """ppl, KL and top-1 agreement against the float model (the float model itself: KL 0, top-1 1)."""
    if ref.logits is None:
        ref.logits = ReferenceLogits(ref.fp, ref.windows, path=ref.logits_path, key=str(ref.src))
    if model is ref.fp:  # its own forward fills the cache the quantized rows read: one float pass, not two
        res = evaluate(model, ref.windows, ref_model=ref.logits)
        return {"ppl": res["ppl"], "kl": 0.0, "top1_agreement": 1.0}
    res = evaluate(model, ref.windows, ref_model=ref.logits)
    return {"ppl": res["ppl"], "kl": res["kl"], "top1_agreement": res["top1_agreement"]}


SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "peak_rss_mb")


def speed_in_process(model: nn.Module, new_tokens: int = 64) -> dict:
    res = measure_throughput(model, new_tokens=new_tokens)
    return {k: res[k] for k in SPEED_KEYS}


def speed_subprocess(checkpoint: str | os.PathLike, new_tokens: int = 64, prompt_len: int = 128,
                     timeout: float = 1800) -> dict:
    """`lowbit bench CHECKPOINT` in a fresh process, so that its peak memory is that of loading and
    running this one model and nothing else this process holds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "lowbit.cli", "bench", str(checkpoint), "--new-tokens", str(new_tokens),
               "--prompt-len", str(prompt_len), "--json", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"lowbit bench failed: {proc.stderr.strip().splitlines()[-1:]}")
        res = json.loads(out.read_text())
    return {k: res[k] for k in SPEED_KEYS}


def measure(model: nn.Module, ref: Reference, checkpoint: str | os.PathLike | None = None,
            speed: str = "subprocess", new_tokens: int = 64) -> dict:
    """One row's measurements of `model` (saved at `checkpoint`, if it was). `speed`: "subprocess"
    (lowbit bench on the checkpoint), "in-process" or "none"."""
    row = {"bits_per_weight": bits_per_weight(model)["bits_per_weight"],
           "model_bytes": model_bytes(checkpoint) if checkpoint is not None else None}
    row.update(quality(model, ref))
    if speed == "subprocess" and checkpoint is not None:
        row.update(speed_subprocess(checkpoint, new_tokens))
    elif speed in ("in-process", "subprocess"):
        row.update(speed_in_process(model, new_tokens))
    return row


# ---------------------------------------------------------------------------------------------- the table


def _cell(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec)


# (heading, row key, format); Δppl and "vs fp32" are derived from the first row
COLUMNS = [
    ("bits/weight", "bits_per_weight", ".2f"),
    ("size", "model_bytes", "mib"),
    ("ppl", "ppl", ".2f"),
    ("Δppl", "delta_ppl", "+.2f"),
    ("KL", "kl", ".4f"),
    ("top-1", "top1_agreement", ".3f"),
    ("quant s", "quant_seconds", ".1f"),
    ("prefill tok/s", "prefill_tokens_per_s", ".0f"),
    ("decode tok/s", "decode_tokens_per_s", ".1f"),
    ("decode vs fp32", "decode_speedup", ".2f"),
    ("peak RSS MiB", "peak_rss_mb", ".0f"),
]


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]] = COLUMNS, status: bool = True) -> str:
    """The rows as a Markdown table; the first row is the float baseline for Δppl and speedups. A row
    with a non-"ok" `status` shows it in the last column."""
    base = rows[0] if rows else {}
    lines = ["| method | " + " | ".join(h for h, _, _ in columns) + (" | status |" if status else " |"),
             "|---|" + "---:|" * len(columns) + ("---|" if status else "")]
    for r in rows:
        r = dict(r)
        if r.get("ppl") is not None and base.get("ppl") is not None:
            r["delta_ppl"] = r["ppl"] - base["ppl"]
        if r.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
            r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        cells = []
        for _, key, spec in columns:
            v = r.get(key)
            if spec == "mib":
                cells.append("–" if v is None else f"{v / 2**20:.1f} MiB")
            else:
                cells.append(_cell(v, spec) + ("x" if key == "decode_speedup" and v is not None else ""))
        st = str(r.get("status", "ok")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + (f" | {st} |" if status else " |"))
    return "\n".join(lines)


def results_markdown(payload: dict) -> str:
    """The combined table (lowbit presets, then peers) and each row's notes."""
    rows = payload["rows"]
    head = (f"{payload['model']}, WikiText-2 test: {payload['windows']} windows x {payload['seqlen']} tokens"
            f"{' (BOS per window)' if payload.get('bos') else ''}; KL and top-1 against the float model on the same "
            f"windows; lm_head and embeddings in float everywhere.")
    cal = payload.get("calibration")
    if cal:
        seqlen = cal.get("seqlen") or "the recipe's"
        head += (f" Calibration: {cal['n_samples']} x {seqlen} tokens of "
                 f"{Path(cal['file']).name}.")
    notes = [f"- {r['method']}: {n}" for r in rows for n in r.get("notes", []) or []]
    notes += [f"- skipped {s}" for s in payload.get("skipped", [])]
    if any(r.get("kind") == "peer" for r in rows):
        notes += ["- Peers quantized in memory and scored in their own venv (bitsandbytes, torchao, quanto, hqq): no "
                  "size on disk; their peak RSS includes the float model they quantized from and the float reference.",
                  "- Calibrated peers (llm-compressor, GPTQModel, AutoAWQ): their dense dequantized weights are "
                  "scored by lowbit, so no bits/weight, size or speed."]
    return "\n".join([head, "", markdown_table(rows), "", *notes]).rstrip() + "\n"


def write_json(path: str | os.PathLike, payload: dict) -> None:
    from lowbit.formats import atomic_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=str) + "\n")
