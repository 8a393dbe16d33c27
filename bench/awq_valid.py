"""One AWQ (or RTN, or any recipe's) run on SmolLM2-135M, scored on held-out validation windows: for
choosing settings without looking at the test set.

Quantizes with the w4a16-awq recipe at --bits / --group-size, the AWQ step's options overridden by
KEY=VALUE arguments (values parsed as JSON, so strings need quotes: clip_mode='"asym"'), calibrated
on --n-samples x 512 windows of wiki.valid.tokens (lowbit.calib.text_file, seed 0), times the
quantize call and prints the AWQ phase times (`AWQ.last_timings`), then the perplexity on:

- valid: 40 non-overlapping 512-token windows of wiki.valid.tokens that share no token with the
  seed-0 calibration windows of 8 x 512 or 128 x 512 (so both calibration sizes are scored on the
  same held-out text);
- test: the WikiText-2 test windows every other figure uses (40 x 512).

(lowbit.calib.text_file's seed-0 draws of 64 samples are the first 64 of the 128: held out from too.)

`--seeds 0,1,2,3` quantizes once per calibration seed, from a fresh load, and prints each seed's
perplexities and their mean: two settings whose single-seed figures differ by less than the spread
over calibration draws are not told apart by one run. The validation windows then also avoid every
listed seed's calibration windows (with seed 0 alone they are the windows above), so compare only
figures taken with the same --seeds and --n-samples.

    python bench/awq_valid.py --bits 4 --eval valid [--n-samples 8] [--rtn] [--json-lines FILE] \\
        output_tokens=1024 clip_mode='"asym"'

`--model gemma3-270m` runs on Gemma-3 (windows with BOS, as every Gemma figure); `--float` scores
the float model. `--recipe` scores another recipe instead (its weight settings as the recipe says; --bits and
--group-size ignored), the overrides going to its `--step` step:

    python bench/awq_valid.py --recipe w8a8-sq-o1 --step w8a8 --n-samples 64 rounding='"gptq"'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import lowbit
import lowbit.algorithms.awq as awq_mod
from lowbit import zoo
from lowbit.models import expects_bos
from lowbit.eval import evaluate, load_windows
from lowbit.eval.size import bits_per_weight
from lowbit.recipes import RecipeError, load_recipe, with_step_options

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import WIKI_TEST, WIKI_VALID  # noqa: E402

# (samples, seed) of the calibration draws the validation windows always avoid
CALIB_DRAWS = ((8, 0), (128, 0))


def valid_windows(tok, n_windows: int = 40, seqlen: int = 512, bos: bool = False,
                  avoid: tuple = ()) -> torch.Tensor:
    """Evenly spaced seqlen-token windows of wiki.valid.tokens clear of every calibration window of
    CALIB_DRAWS and `avoid` ((samples, seed) pairs); with `bos` (Gemma) each is BOS and the slot's
    first seqlen - 1 tokens."""
    ids = torch.as_tensor(tok(Path(WIKI_VALID).read_text(), add_special_tokens=False)["input_ids"])
    taken = set()
    for n, seed in (*CALIB_DRAWS, *avoid):  # the starts lowbit.calib.text_file draws
        starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=torch.Generator().manual_seed(seed))
        for s in starts.tolist():
            taken.update(range(s // seqlen, (s + seqlen - 1) // seqlen + 1))
    free = [i for i in range(ids.numel() // seqlen) if i not in taken]
    pick = [free[int(j * len(free) / n_windows)] for j in range(n_windows)]
    out = torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in pick])
    if bos:
        out = torch.cat([torch.full((n_windows, 1), tok.bos_token_id, dtype=out.dtype), out[:, :-1]], 1)
    return out


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for item in pairs:
        key, _, val = item.partition("=")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="zoo name (Gemma's windows start with BOS)")
    ap.add_argument("--float", action="store_true", help="score the float model (no quantization)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", default="valid", help="comma-separated: valid, test")
    ap.add_argument("--rtn", action="store_true", help="round to nearest instead of AWQ")
    ap.add_argument("--recipe", default=None, help="a preset or YAML to score instead of AWQ")
    ap.add_argument("--step", default="awq", help="with --recipe: the method whose step takes the overrides")
    ap.add_argument("--json-lines", type=Path, help="append the result row here")
    ap.add_argument("overrides", nargs="*", help="AWQ step options, KEY=JSON_VALUE")
    ap.add_argument("--calib-bos", action="store_true", help="calibration windows start with BOS (as Gemma's evaluation windows)")
    ap.add_argument("--seeds", default="0", help="comma-separated calibration seeds: one quantization each")
    args = ap.parse_args()
    kw = parse_overrides(args.overrides)
    seeds = [int(x) for x in args.seeds.split(",")]
    avoid = tuple((args.n_samples, s) for s in seeds)
    rows = []
    for seed in seeds[:1] if args.float else seeds:  # the float model does not depend on the seed
        rows.append(run(args, kw, seed, avoid))
        if args.json_lines:
            with args.json_lines.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    if len(rows) > 1:
        mean = {w: round(sum(r[w] for r in rows) / len(rows), 3) for w in args.eval.split(",")}
        print(json.dumps({"name": rows[0]["name"], "seeds": seeds, "mean": mean,
                          **{w: [r[w] for r in rows] for w in mean}}))


def run(args, kw: dict, seed: int, avoid: tuple) -> dict:
    """Load the model, quantize it as the arguments say with calibration seed `seed`, score it."""
    model = lowbit.load(zoo.pull(args.model))
    tok = model.lowbit_tokenizer
    bos = expects_bos(model)
    made = []  # the AWQ instance the recipe builds, for its phase timings
    real_init = awq_mod.AWQ.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)

    awq_mod.AWQ.__init__ = spy
    calib = lowbit.calib.text_file(WIKI_VALID, n_samples=args.n_samples, seqlen=args.seqlen, seed=seed,
                                   bos=True if args.calib_bos else None)
    t0 = time.perf_counter()
    try:
        if args.float:
            name = "float"
        elif args.recipe:
            rec = load_recipe(args.recipe)
            if kw:
                try:
                    rec = with_step_options(rec, args.step, kw)
                except RecipeError as e:
                    raise SystemExit(f"{e}: nowhere to put the overrides") from None
            lowbit.quantize(model, rec, calib=calib, progress=False)
            name = f"{rec.name} {args.n_samples}x{args.seqlen} {rec.steps}"
        elif args.rtn:
            lowbit.quantize(model, load_recipe(f"w{args.bits}a16-rtn", group_size=args.group_size), progress=False)
            name = f"rtn w{args.bits} g{args.group_size}"
        else:
            rec = load_recipe("w4a16-awq", bits=args.bits, group_size=args.group_size)
            rec = with_step_options(rec, "awq", kw)
            lowbit.quantize(model, rec, calib=calib, progress=False)
            name = f"awq w{args.bits} g{args.group_size} {args.n_samples}x{args.seqlen} {rec.steps[0]}"
    finally:
        awq_mod.AWQ.__init__ = real_init
    seconds = time.perf_counter() - t0
    row = {"model": args.model, "name": name, "seed": seed, "calib_bos": args.calib_bos, "quant_s": round(seconds, 1),
           "threads": torch.get_num_threads()}
    if not args.float:
        row["bits_per_weight"] = round(bits_per_weight(model)["bits_per_weight"], 3)
    if made:
        row["timings"] = {k: round(v, 1) for k, v in made[0].last_timings.items()}
    print(f"seed {seed}: quantized in {seconds:.1f} s", flush=True)
    for which in args.eval.split(","):
        w = (valid_windows(tok, bos=bos, avoid=avoid) if which == "valid"
             else load_windows(tok, WIKI_TEST, seqlen=512, windows=40, bos=bos))
        row[which] = round(evaluate(model, w, progress=False)["ppl"], 3)
        print(which, row[which], flush=True)
    print(json.dumps(row))
    return row

if __name__ == "__main__":
    main()
