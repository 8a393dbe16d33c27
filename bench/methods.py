"""Every lowbit preset on one reference model, measured the same way, in one table.

For each preset in `lowbit.recipes.available()` (or `--only`): load the float model, quantize (timed:
the quantize call alone, calibration tokenizing included), save in lowbit's format, reload from disk,
and measure what came back (bench/measure.py): bits per weight, size on disk, WikiText-2 perplexity,
KL divergence and top-1 agreement against the float model, prefill and decode tokens/s and peak RSS
(`lowbit bench` on the checkpoint in a fresh process, so the memory is that of serving this model
alone). A preset that fails becomes a row with its error. Writes DIR/results.json and DIR/results.md.

    python bench/methods.py [--model smollm2-135m|HF_DIR] [--windows 40|all] [--only w4a16-awq,...]
        [--calib-samples 8] [--group-size 64] [--qat-steps N] [--out bench/out/methods]

A preset's group size is kept when it divides every decoder linear's input features; otherwise
`--group-size` replaces it (SmolLM2's hidden size 576 is not a multiple of 128). `*-qat` presets
train (through `lowbit train-qat`), so they run only when `--qat-steps` gives their step budget. On a
machine shared with other jobs the times move from run to run: compare them within one run.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import lowbit
from lowbit.recipes import available, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import REPO, WIKI_TEST, WIKI_VALID, load_reference, measure, results_markdown, write_json  # noqa: E402


def decoder_in_features(model) -> set[int]:
    from lowbit.models import get_adapter
    from lowbit.models.blocks import block_linears, get_blocks
    from lowbit.models.modules import linear_shape

    adapter = get_adapter(model)
    return {linear_shape(m)[1] for block in get_blocks(model, adapter) for m in block_linears(block, adapter).values()}


def fitted_recipe(name: str, in_features: set[int], group_size: int, qat_steps: int | None):
    """The preset, with its group size replaced where it does not divide the model's linears, and QAT's
    step budget set. Returns (recipe, what was changed)."""
    rec = load_recipe(name)
    changes = []
    g = getattr(rec.weights.granularity, "group_size", None)
    if g and any(f % g for f in in_features):
        rec = load_recipe(name, group_size=group_size)
        changes.append(f"group size {g} -> {group_size}")
    if qat_steps is not None:
        for step in rec.steps:
            if step.get("method") == "qat":
                step["steps"] = qat_steps
                changes.append(f"{qat_steps} QAT steps")
    return rec, changes


def selected(only: str | None, qat_steps: int | None) -> tuple[list[str], list[str]]:
    """(presets to run, presets skipped and why)."""
    presets = available()
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in presets]
        if unknown:
            raise SystemExit(f"--only: no preset {', '.join(unknown)}; presets: {', '.join(presets)}")
        presets = wanted
    run, skipped = [], []
    for p in presets:
        if p.endswith("-qat") and qat_steps is None:
            skipped.append(f"{p} (QAT trains: give --qat-steps N)")
        else:
            run.append(p)
    return run, skipped


def train_qat(src: Path, name: str, ckpt: Path, args, row: dict, group_override: bool) -> Path:
    """A QAT preset through `lowbit train-qat` (PTQ start, then --qat-steps of training), timed as a whole
    (its model load included)."""
    cmd = [sys.executable, "-m", "lowbit.cli", "train-qat", str(src), "--recipe", name, "--steps", str(args.qat_steps),
           "--calib", args.calib, "--calib-samples", str(args.calib_samples), "--out", str(ckpt), "--overwrite",
           *(["--group-size", str(args.group_size)] if group_override else []),
           *(["--calib-seqlen", str(args.calib_seqlen)] if args.calib_seqlen else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row["quant_seconds"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"lowbit train-qat: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    row.setdefault("notes", []).append(f"lowbit train-qat, {args.qat_steps} steps; time includes loading the model")
    return ckpt


def write_results(out: Path, payload: dict) -> str:
    write_json(out / "results.json", payload)
    text = results_markdown(payload)
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="zoo name or HF checkpoint directory")
    ap.add_argument("--text", default=str(WIKI_TEST), help="evaluation text")
    ap.add_argument("--windows", default="40", help="evaluation windows of --seqlen tokens, or 'all'")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated presets (default: all of them)")
    ap.add_argument("--calib", default=str(WIKI_VALID), help="calibration text")
    ap.add_argument("--calib-samples", type=int, default=8,
                    help="calibration windows (8: the peer comparisons' setting; recipes default to 128)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--group-size", type=int, default=64, help="for presets whose group size does not fit the model")
    ap.add_argument("--qat-steps", type=int, default=None, help="run the *-qat presets with this many steps")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens in the speed test")
    ap.add_argument("--no-speed", action="store_true", help="skip prefill/decode/memory")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "methods"),
                    help="results.json, results.md and the checkpoints go here")
    ap.add_argument("--keep-checkpoints", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    windows = None if args.windows == "all" else int(args.windows)
    presets, skipped = selected(args.only, args.qat_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ref = load_reference(args.model, args.text, windows, args.seqlen)
    speed = "none" if args.no_speed else "subprocess"
    rows = [{"method": "float (fp32)", "key": "float", "status": "ok", "quant_seconds": 0.0,
             **measure(ref.fp, ref, ref.src, speed, args.new_tokens)}]
    in_features = decoder_in_features(ref.fp)
    calib = lowbit.calib.text_file(args.calib, n_samples=args.calib_samples, seqlen=args.calib_seqlen)

    payload = {
        "model": args.model, "model_path": str(ref.src), "windows": int(ref.windows.shape[0]),
        "seqlen": int(ref.windows.shape[1]), "bos": ref.bos, "text": str(args.text),
        "calibration": {"file": str(args.calib), "n_samples": args.calib_samples, "seqlen": args.calib_seqlen},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "skipped": skipped, "rows": rows}
    for i, name in enumerate(presets):
        print(f"[{i + 1}/{len(presets)}] {name}", flush=True)
        row = {"method": name, "key": name, "status": "ok"}
        rows.append(row)
        ckpt = out / "checkpoints" / name
        try:
            rec, changes = fitted_recipe(name, in_features, args.group_size, args.qat_steps)
            row.update(recipe=rec.to_dict(), changes=changes)
            if changes:
                row["method"] = f"{name} ({', '.join(changes)})"
            if name.endswith("-qat"):
                saved = train_qat(ref.src, name, ckpt, args, row, any("group size" in c for c in changes))
            else:
                needs_data = any(a.requires_calibration for a in rec.build())
                model = lowbit.load(ref.src)
                t0 = time.perf_counter()
                q = lowbit.quantize(model, rec, calib if needs_data else None)
                row["quant_seconds"] = time.perf_counter() - t0
                saved = lowbit.save(q, ckpt, tokenizer=ref.fp.lowbit_tokenizer, overwrite=True)
                del q, model
            q = lowbit.load(saved)  # measure what a user gets back from disk
            row.update(measure(q, ref, saved, speed, args.new_tokens))
            del q
            print(f"  ppl {row['ppl']:.3f}, KL {row['kl']:.4f}, quantize {row['quant_seconds']:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - one preset failing is a row, not the end of the run
            row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
            row["traceback"] = traceback.format_exc()[-2000:]
            print(f"  FAILED: {row['status']}", flush=True)
        finally:
            if not args.keep_checkpoints:
                shutil.rmtree(ckpt, ignore_errors=True)
        write_results(out, payload)  # after every row: a long run stopped early keeps what it measured

    text = write_results(out, payload)
    print("\n" + text)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
