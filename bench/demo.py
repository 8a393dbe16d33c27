"""The demo `make demo` runs: a reference model from high bits to low bits, measured.

Quantizes the model with RTN, AWQ and GPTQ (calibrated on WikiText-2 validation) at 4 and 3 bits,
saves and reloads each checkpoint (AWQ W4 in AutoAWQ's format, GPTQ W4 in GPTQ's, the rest in
lowbit's), and prints
one table: method, bits per weight, size on disk, WikiText-2 perplexity, KL divergence and top-1
agreement against the float model, quantization time, decode tokens/s. Figures also go to JSON.

    python bench/demo.py --model smollm2-135m [--windows 40] [--calib-samples 128] [--json out.json]
        [--only KEY,...] [--all]

`--only` takes row keys (below) or recipe names; `--all` adds the rows `make demo` leaves out
(GPTQ without act-order, AWQ scales + GPTQ rounding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lowbit
from lowbit import zoo
from lowbit.cli import default_bos
from lowbit.eval import bits_per_weight, evaluate, load_windows, measure_throughput, model_bytes

REPO = Path(__file__).resolve().parents[1]
WIKI_TEST = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.joined.txt"
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"

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
    args = ap.parse_args()
    torch.manual_seed(0)

    src = zoo.pull(args.model) if args.model in zoo.ZOO else Path(args.model)
    fp = lowbit.load(src)
    tok = fp.lowbit_tokenizer
    windows = load_windows(tok, args.text, seqlen=args.seqlen, windows=args.windows, bos=default_bos(fp))
    print(f"{args.model}: {windows.shape[0]} windows x {windows.shape[1]} tokens of {Path(args.text).name}")

    rows = []
    res = evaluate(fp, windows)
    speed = measure_throughput(fp, new_tokens=args.new_tokens)
    rows.append(dict(method="float (fp32)", bits_per_weight=bits_per_weight(fp)["bits_per_weight"],
                     model_bytes=model_bytes(src), ppl=res["ppl"], kl=0.0, top1_agreement=1.0,
                     quant_seconds=0.0, **speed))
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
        model = lowbit.load(src)
        t0 = time.perf_counter()  # quantization alone, as the peers' benchmarks time it
        q = lowbit.quantize(model, rec, calib if needs_data else None)
        qtime = time.perf_counter() - t0
        out = lowbit.save(q, Path(args.out) / recipe, format=fmt, tokenizer=tok, overwrite=True)
        del q
        q = lowbit.load(out)  # measure what a user gets back from disk
        res = evaluate(q, windows, ref_model=fp)
        speed = measure_throughput(q, new_tokens=args.new_tokens)
        rows.append(dict(method=label, key=key, recipe=rec.to_dict(), bits_per_weight=bits_per_weight(q)["bits_per_weight"],
                         model_bytes=model_bytes(out), ppl=res["ppl"], kl=res["kl"],
                         top1_agreement=res["top1_agreement"], quant_seconds=qtime, **speed))
        print(f"  {label}: ppl {res['ppl']:.3f}, KL {res['kl']:.4f}", flush=True)

    base = rows[0]
    print()
    print("| method | bits/weight | size on disk | ppl | Δppl | KL | top-1 | quant s | decode tok/s | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_weight']:.2f} | {r['model_bytes'] / 2**20:.1f} MiB | {r['ppl']:.2f} "
              f"| {r['ppl'] - base['ppl']:+.2f} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['quant_seconds']:.1f} "
              f"| {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "windows": int(windows.shape[0]),
                                               "seqlen": int(windows.shape[1]), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
