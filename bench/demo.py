"""The demo `make demo` runs: a reference model from high bits to low bits, measured.

Quantizes the model with RTN, AWQ and GPTQ (calibrated on WikiText-2 validation) at 4 and 3 bits,
saves and reloads each checkpoint (AWQ W4 in AutoAWQ's format, GPTQ W4 in GPTQ's, the rest in
lowbit's), and prints
one table: method, bits per weight, size on disk, WikiText-2 perplexity, KL divergence and top-1
agreement against the float model, quantization time, decode tokens/s. Figures also go to JSON.

    python bench/demo.py --model smollm2-135m [--windows 40] [--calib-samples 128] [--json out.json]
        [--only KEY,...] [--all]

`--only` takes row keys (below) or recipe names; `--all` adds the rows `make demo` leaves out
(GPTQ without act-order, AWQ scales + GPTQ rounding). Checkpoints go to OUT/MODEL/KEY. A model whose
rows take long (Gemma-3: a 262k-vocabulary float pass of several minutes on 40 x 512 at one thread)
can be run in parts: `--stage quantize` saves the checkpoints, `--stage measure` measures them later,
and `--ref-logits FILE` keeps the float model's logits for the next part (`--only none`: the float
row alone, which fills FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import (COLUMNS, REPO, WIKI_TEST, WIKI_VALID, load_reference, markdown_table,  # noqa: E402
                           measure, write_json)

DEMO_QUANTIZE = "demo_quantize.json"  # what --stage quantize leaves beside a checkpoint: recipe, calibration, time

# the demo's columns: no prefill or memory (one process measures every row in turn)
DEMO_COLUMNS = [c for c in COLUMNS if c[1] not in ("prefill_tokens_per_s", "peak_rss_mb")]

# key -> (label, recipe, load_recipe overrides, step overrides, checkpoint format, in the default run).
# Group 64: SmolLM2's hidden size 576 is not a multiple of 128.
CONFIGS = {
    "w8-rtn": ("RTN W8 per-channel sym", "w8a16-rtn", {}, {}, "lowbit", True),
    "w4-rtn": ("RTN W4 g64 asym", "w4a16-rtn", {"group_size": 64}, {}, "lowbit", True),
    "w4-awq": ("AWQ W4 g64 asym", "w4a16-awq", {"group_size": 64}, {}, "awq", True),
    "w4-gptq": ("GPTQ W4 g64 asym act-order", "w4a16-gptq", {"group_size": 64}, {}, "gptq", True),
    "w4-gptq-noact": ("GPTQ W4 g64 asym", "w4a16-gptq", {"group_size": 64}, {"act_order": False}, "lowbit", False),
    "w4-awq-gptq": ("AWQ scales + GPTQ W4 g64 asym act-order", "w4a16-awq-gptq", {"group_size": 64}, {}, "lowbit",
                    False),
    "w3-rtn": ("RTN W3 g64 asym", "w3a16-rtn", {"group_size": 64}, {}, "lowbit", True),
    "w3-awq": ("AWQ W3 g64 asym", "w3a16-awq", {"group_size": 64}, {}, "lowbit", True),
    "w3-gptq": ("GPTQ W3 g64 asym act-order", "w3a16-gptq", {"group_size": 64}, {}, "lowbit", True),
    "w3-gptq-noact": ("GPTQ W3 g64 asym", "w3a16-gptq", {"group_size": 64}, {"act_order": False}, "lowbit", False),
    "w3-awq-gptq": ("AWQ scales + GPTQ W3 g64 asym act-order", "w4a16-awq-gptq", {"group_size": 64, "bits": 3}, {},
                    "lowbit", False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="zoo name or HF checkpoint directory")
    ap.add_argument("--text", default=str(WIKI_TEST))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "demo"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calib", default=str(WIKI_VALID), help="calibration text for AWQ")
    ap.add_argument("--calib-samples", type=int, default=8,
                    help="calibration windows (8: the AWQ peer comparison's setting; recipes default to 128)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="default: the recipe's (512)")
    ap.add_argument("--only", default=None, help="comma-separated row keys or recipe names, e.g. w4-awq,w3a16-gptq")
    ap.add_argument("--all", action="store_true", help="also the rows the default run leaves out")
    ap.add_argument("--ref-logits", default=None, metavar="FILE",
                    help="keep the float model's logits on the windows in FILE (float32; Gemma-3 40 x 512: "
                         "21 GB) and reuse them in later runs, which then skip the float forward")
    ap.add_argument("--stage", choices=("all", "quantize", "measure"), default="all",
                    help="quantize: quantize and save the rows' checkpoints only (no float row, nothing "
                         "measured); measure: measure the checkpoints an earlier --stage quantize saved with "
                         "the same recipe and calibration. Splits a slow model's run into shorter commands")
    args = ap.parse_args()
    torch.manual_seed(0)

    ref = load_reference(args.model, args.text, args.windows, args.seqlen)
    ref.logits_path = args.ref_logits
    src, tok = ref.src, ref.fp.lowbit_tokenizer
    rows = []
    if args.stage != "quantize":
        rows.append(dict(method="float (fp32)", quant_seconds=0.0,
                         **measure(ref.fp, ref, src, "in-process", args.new_tokens)))
    calib = lowbit.calib.text_file(args.calib, n_samples=args.calib_samples, seqlen=args.calib_seqlen)
    only = set(args.only.split(",")) if args.only else None
    for key, (label, recipe, overrides, step_overrides, fmt, default) in CONFIGS.items():
        if (only and key not in only and recipe not in only) or (not only and not default and not args.all):
            continue
        rec = lowbit.recipes.load_recipe(recipe, **overrides)
        for step in rec.steps:
            if step.get("method") != "awq":  # the rounding step's options
                step.update(step_overrides)
        needs_data = any(a.requires_calibration for a in rec.build())
        ckpt = Path(args.out) / Path(args.model).name / key
        done = {"key": key, "recipe": rec.to_dict(),
                "calibration": [args.calib, args.calib_samples, args.calib_seqlen] if needs_data else None}
        if args.stage == "measure":
            saved = json.loads((ckpt / DEMO_QUANTIZE).read_text()) if (ckpt / DEMO_QUANTIZE).is_file() else {}
            if {k: saved.get(k) for k in done} != json.loads(json.dumps(done)):
                sys.exit(f"{ckpt}: no checkpoint saved by --stage quantize with this recipe and calibration")
            out, qtime = ckpt, saved["quant_seconds"]
        else:
            model = lowbit.load(src)
            t0 = time.perf_counter()  # quantization alone, as the peers' benchmarks time it
            q = lowbit.quantize(model, rec, calib if needs_data else None)
            qtime = time.perf_counter() - t0
            out = lowbit.save(q, ckpt, format=fmt, tokenizer=tok, overwrite=True)
            del q, model
            (Path(out) / DEMO_QUANTIZE).write_text(json.dumps({**done, "quant_seconds": qtime}, indent=1))
            print(f"  {label}: quantized in {qtime:.1f} s, saved to {out}", flush=True)
            if args.stage == "quantize":
                continue
        q = lowbit.load(out)  # measure what a user gets back from disk
        row = measure(q, ref, out, "in-process", args.new_tokens)
        rows.append(dict(method=label, key=key, recipe=rec.to_dict(), quant_seconds=qtime, **row))
        print(f"  {label}: ppl {row['ppl']:.3f}, KL {row['kl']:.4f}", flush=True)
        del q
    if args.stage == "quantize":
        return

    print()
    print(markdown_table(rows, DEMO_COLUMNS, status=False))
    if args.json:
        write_json(args.json, {"model": args.model, "windows": int(ref.windows.shape[0]),
                               "seqlen": int(ref.windows.shape[1]), "rows": rows})


if __name__ == "__main__":
    main()
