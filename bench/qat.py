"""QAT acceptance: PTQ against QAT started from it, on a reference model, with a plot.

For each bit width: quantize with PTQ (GPTQ with act-order by default, the best PTQ at 3 bits here;
`--ptq rtn` for round-to-nearest), measure WikiText-2 test perplexity (first `--windows` windows of
512 tokens), then train QAT from that PTQ result (the `w{bits}a16-qat` recipe's settings; distillation
from the float model) on wiki.valid.tokens for `--steps` steps or until `--budget-minutes` of training
time, whichever comes first; measure the fake-quant model on the test windows, convert it to packed
`WQLinear` modules, save it in lowbit's format, reload it with `lowbit.load` and measure it again.

Training text and held-out text are both wiki.valid.tokens, cut into non-overlapping windows: the
last `--heldout` windows are never trained on and give the intermediate perplexity curve; the test
text is only ever evaluated. Writes JSON and a PNG (training loss and held-out perplexity against steps).

    python bench/qat.py --model smollm2-135m --bits 3 --group-size 64 --steps 60 --budget-minutes 20 \\
        --json bench/out/qat/w3.json --plot bench/out/qat/w3.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import lowbit
from lowbit import zoo
from lowbit.algorithms import qat
from lowbit.cli import default_bos
from lowbit.eval import evaluate, load_windows
from lowbit.kernels.wint import BACKEND_ENV

REPO = Path(__file__).resolve().parents[1]
WIKI_TEST = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.joined.txt"
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def ppl(model, windows) -> float:
    return evaluate(model, windows, progress=False)["ppl"]


def run_bits(args, bits: int, src: Path, teacher, test, train, heldout) -> dict:
    tok = teacher.lowbit_tokenizer
    # the 3-bit presets at `bits`: GPTQ's and AWQ's settings do not depend on the width
    ptq_recipe = lowbit.recipes.load_recipe(f"w3a16-{args.ptq}", bits=bits, group_size=args.group_size)
    model = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    calib = lowbit.calib.text_file(WIKI_VALID, n_samples=args.calib_samples, seqlen=args.seqlen)
    lowbit.quantize(model, ptq_recipe, calib if args.ptq != "rtn" else None, progress=False)
    ptq_seconds = time.perf_counter() - t0
    ptq_ppl = ppl(model, test)
    print(f"W{bits} {ptq_recipe.name}: test ppl {ptq_ppl:.3f} ({ptq_seconds:.0f} s)", flush=True)

    _, cfg = qat.split_recipe(lowbit.recipes.load_recipe(f"w{bits}a16-qat", group_size=args.group_size))
    over = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("scale_lr", args.scale_lr),
                              ("ce", args.ce), ("distill", args.distill)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    qat.prepare(model)
    trainer = qat.QATTrainer(model, train, cfg, teacher=teacher, progress=True,
                             state_dir=Path(args.out) / f"w{bits}-state" if args.state else None)
    curve = [{"step": 0, "heldout_ppl": ppl(model, heldout)}]
    print(f"  step 0: held-out ppl {curve[0]['heldout_ppl']:.3f}", flush=True)
    train_seconds = 0.0
    budget = args.budget_minutes * 60
    while trainer.step < cfg.steps and train_seconds < budget:
        t0 = time.perf_counter()
        trainer.train(until=min(cfg.steps, trainer.step + args.eval_every))
        train_seconds += time.perf_counter() - t0
        recent = trainer.history[-args.eval_every:]
        point = {"step": trainer.step, "heldout_ppl": ppl(model, heldout), "train_seconds": train_seconds,
                 "loss": sum(r["loss"] for r in recent) / len(recent)}
        curve.append(point)
        print(f"  step {point['step']}: loss {point['loss']:.4f}, held-out ppl {point['heldout_ppl']:.3f}, "
              f"{train_seconds:.0f} s of training", flush=True)
    # the fake-quant model against its packed, reloaded self (the 0.1% check), where asked for
    fake_ppl = ppl(model, test) if bits in args.check_bits else None
    qat.convert(model)
    out = lowbit.save(model, Path(args.out) / f"w{bits}-qat", tokenizer=tok, overwrite=True)
    del model
    reloaded_ppl = ppl(lowbit.load(out), test)
    ref_kernel_ppl = None
    if args.ref_kernel:  # fp32 dequantize + F.linear: the fake-quant forward's arithmetic, without bf16
        os.environ[BACKEND_ENV] = "ref"
        try:
            ref_kernel_ppl = ppl(lowbit.load(out), test)
        finally:
            del os.environ[BACKEND_ENV]
    row = dict(bits=bits, group_size=args.group_size, ptq=ptq_recipe.name, reloaded_ref_kernel_ppl=ref_kernel_ppl,
               ptq_ppl=ptq_ppl, ptq_seconds=ptq_seconds,
               qat_fake_quant_ppl=fake_ppl, qat_reloaded_ppl=reloaded_ppl,
               reload_rel_diff=None if fake_ppl is None else abs(reloaded_ppl - fake_ppl) / fake_ppl, steps=trainer.step,
               tokens_trained=trainer.step * cfg.batch_size * train.shape[1], train_seconds=train_seconds,
               seconds_per_step=train_seconds / max(1, trainer.step), config=dataclasses.asdict(cfg),
               curve=curve, history=trainer.history)
    print(f"W{bits}: PTQ {ptq_ppl:.3f} -> QAT {reloaded_ppl:.3f} reloaded, fake-quant {fake_ppl}; "
          f"{trainer.step} steps in {train_seconds:.0f} s", flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for row in result["rows"]:
        label = f"W{row['bits']} g{row['group_size']}"
        ax_loss.plot([h["step"] for h in row["history"]], [h["loss"] for h in row["history"]], label=label, alpha=0.8)
        ax_ppl.plot([c["step"] for c in row["curve"]], [c["heldout_ppl"] for c in row["curve"]], "o-", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="QAT training loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity", yscale="log",
               title=f"held-out wiki.valid perplexity ({result['heldout_windows']} x {result['seqlen']})")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']}: QAT from {result['ptq']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", default="3,2", help="comma-separated bit widths")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ptq", default="gptq", choices=["gptq", "rtn", "awq"], help="the PTQ start")
    ap.add_argument("--calib-samples", type=int, default=64, help="PTQ calibration windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="test windows")
    ap.add_argument("--heldout", type=int, default=4, help="wiki.valid windows kept out of training")
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--budget-minutes", type=float, default=20.0, help="stop training after this much training time")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--scale-lr", type=float, default=None)
    ap.add_argument("--ce", type=float, default=None)
    ap.add_argument("--distill", type=float, default=None)
    ap.add_argument("--check-bits", default="3",
                    help="widths whose fake-quant model is measured on the test windows too (the reload check)")
    ap.add_argument("--ref-kernel", action="store_true",
                    help="also measure the reloaded model with the fp32 reference kernel")
    ap.add_argument("--float-ppl", action="store_true", help="also measure the float model")
    ap.add_argument("--state", action="store_true", help="write training-state checkpoints")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "qat"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    args.check_bits = {int(b) for b in args.check_bits.split(",") if b}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    src = zoo.pull(args.model) if args.model in zoo.ZOO else Path(args.model)
    teacher = lowbit.load(src)
    tok = teacher.lowbit_tokenizer
    bos = default_bos(teacher)
    test = load_windows(tok, WIKI_TEST, seqlen=args.seqlen, windows=args.windows, bos=bos)
    valid = load_windows(tok, WIKI_VALID, seqlen=args.seqlen, bos=bos)
    train, heldout = valid[: -args.heldout], valid[-args.heldout:]
    print(f"{args.model}: test {tuple(test.shape)}, train {tuple(train.shape)}, held-out {tuple(heldout.shape)}",
          flush=True)
    result = {"model": args.model, "ptq": args.ptq, "seqlen": args.seqlen, "test_windows": args.windows,
              "heldout_windows": args.heldout, "threads": torch.get_num_threads(), "rows": []}
    if args.float_ppl:
        result["float_ppl"] = ppl(teacher, test)
        print(f"float: test ppl {result['float_ppl']:.3f}", flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        result["rows"].append(run_bits(args, bits, src, teacher, test, train, heldout))
        if args.json:
            with lowbit.formats.atomic_file(args.json) as tmp:
                Path(tmp).write_text(json.dumps(result, indent=1))
        if args.plot:
            plot(result, Path(args.plot))
    for row in result["rows"]:
        print(f"| W{row['bits']} g{row['group_size']} | {row['ptq']} {row['ptq_ppl']:.2f} | QAT {row['qat_reloaded_ppl']:.2f} "
              f"(fake-quant {row['qat_fake_quant_ppl']}) | {row['steps']} steps, {row['train_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
