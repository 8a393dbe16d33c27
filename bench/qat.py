"""QAT acceptance: PTQ against QAT started from it, on a reference model, with a plot.

For each bit width, the `w{bits}a16-qat` recipe (or `--recipe`) at `--group-size`: its PTQ steps
(GPTQ with act-order by default; `--ptq awq-gptq` swaps in AWQ's scales then GPTQ, `--ptq rtn`
round-to-nearest; with `--recipe w4a8-qat`, `--ptq zeroquant` or `w4a8`) and its Block-AP step (`--no-block-ap` drops it) run block by block on `--calib-samples`
windows of wiki.valid.tokens; then E2E-QP (the recipe's `qat` step: distillation from the float model,
step sizes only when the recipe says `train_weights: false`) trains on wiki.valid.tokens windows for
`--steps` steps or until the Block-AP time plus the E2E time reach `--budget-minutes`, whichever comes
first. Measured on the WikiText-2 test (first `--windows` windows of 512 tokens): the PTQ start alone
(a separate PTQ run when Block-AP follows it; `--skip-ptq` leaves it out), the model after Block-AP, the fake-quant model after
E2E, and the converted model saved in lowbit's format and reloaded with `lowbit.load` (with the default
kernels, and with `--ref-kernel` the fp32 reference one too).

Held-out text: the last `--heldout` windows of wiki.valid.tokens are never E2E-trained on and give the
perplexity curve against E2E steps (the PTQ/Block-AP calibration windows are drawn from the whole file,
so they may overlap them); the test text is only ever evaluated. Writes JSON and a PNG (Block-AP
reconstruction loss per block, E2E training loss, held-out perplexity against E2E steps).

    python bench/qat.py --model smollm2-135m --bits 3 --group-size 64 --calib-samples 64 \\
        --budget-minutes 20 --json bench/out/qat/w3.json --plot bench/out/qat/w3.png
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
from lowbit.algorithms import BlockAP, qat
from lowbit.calib import BlockRunner
from lowbit.models import expects_bos
from lowbit.eval import evaluate, load_windows
from lowbit.kernels.wint import BACKEND_ENV
from lowbit.models import get_adapter

REPO = Path(__file__).resolve().parents[1]
WIKI_TEST = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.joined.txt"
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
PTQ_RECIPES = {"gptq": "w3a16-gptq", "awq-gptq": "w4a16-awq-gptq", "rtn": "w3a16-rtn",
               # W4A8 starts (with --recipe w4a8-qat): round to nearest, or ZeroQuant's LKD
               "w4a8": "w4a8", "zeroquant": "w4a8-zeroquant"}


def ppl(model, windows) -> float:
    return evaluate(model, windows, progress=False)["ppl"]


def _quantize(model, recipe, samples) -> list:
    """Runs a recipe's steps block by block on token windows; returns the algorithm objects."""
    algs = recipe.build()
    adapter = get_adapter(model)
    for a in algs:
        a.prepare(model, adapter)
    with torch.no_grad():
        BlockRunner(model, adapter, samples, progress=True).run(algs)
        for a in algs:
            a.finalize(model, adapter)
    model.lowbit_recipe = {**recipe.to_dict(), "algorithms": [a.config() for a in algs]}
    return algs


def run_bits(args, bits: int, teacher, test, train, heldout, calib) -> dict:
    tok = teacher.lowbit_tokenizer
    recipe = lowbit.recipes.load_recipe(args.recipe or f"w{bits}a16-qat", bits=bits, group_size=args.group_size)
    start, cfg = qat.split_recipe(recipe)
    bap_steps = [dict(s) for s in start.steps if s["method"] == "block_ap"]
    ptq_steps = lowbit.recipes.load_recipe(PTQ_RECIPES[args.ptq]).steps
    ptq = dataclasses.replace(start, name=f"{args.ptq} W{bits} g{args.group_size}", steps=ptq_steps)
    row = dict(bits=bits, group_size=args.group_size, recipe=recipe.name, ptq=ptq.name, calib_samples=calib.shape[0])

    run_bap = bool(bap_steps) and not args.no_block_ap
    if not args.skip_ptq and run_bap:  # without Block-AP the start below is the PTQ model itself
        model = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        _quantize(model, ptq, calib)
        row["ptq_seconds"] = time.perf_counter() - t0
        row["ptq_ppl"] = ppl(model, test)
        del model
        print(f"W{bits} {ptq.name}: test ppl {row['ptq_ppl']:.3f} ({row['ptq_seconds']:.0f} s)", flush=True)

    model = copy.deepcopy(teacher)
    bap = None
    if bap_steps and not args.no_block_ap:
        over = {k: v for k, v in (("epochs", args.bap_epochs), ("lr", args.bap_lr), ("scale_lr", args.bap_scale_lr))
                if v is not None}
        bap_steps = [{**s, **over} for s in bap_steps]
    steps = ptq_steps + ([] if args.no_block_ap else bap_steps)
    t0 = time.perf_counter()
    algs = _quantize(model, dataclasses.replace(start, steps=steps), calib)
    row["start_seconds"] = time.perf_counter() - t0
    if not args.skip_ptq and not run_bap:
        row["ptq_seconds"] = row["start_seconds"]
        row["ptq_ppl"] = ppl(model, test)
        print(f"W{bits} {ptq.name}: test ppl {row['ptq_ppl']:.3f} ({row['ptq_seconds']:.0f} s)", flush=True)
    bap = next((a for a in algs if isinstance(a, BlockAP)), None)
    row["block_ap_seconds"] = sum(h["seconds"] for h in bap.history) if bap else 0.0
    row["block_ap"] = None if bap is None else {"config": bap.config(), "history": bap.history}
    if bap is not None and not args.skip_block_ap_eval:
        row["block_ap_ppl"] = ppl(model, test)
        print(f"W{bits} after Block-AP: test ppl {row['block_ap_ppl']:.3f} (PTQ + Block-AP {row['start_seconds']:.0f} s, "
              f"Block-AP {row['block_ap_seconds']:.0f} s)", flush=True)

    over = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("scale_lr", args.scale_lr),
                              ("ce", args.ce), ("distill", args.distill)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    qat.prepare(model)
    trainer = qat.QATTrainer(model, train, cfg, teacher=teacher, progress=True,
                             state_dir=Path(args.out) / f"w{bits}-state" if args.state else None)
    curve = [{"step": 0, "heldout_ppl": ppl(model, heldout)}]
    print(f"  E2E step 0: held-out ppl {curve[0]['heldout_ppl']:.3f}", flush=True)
    train_seconds = 0.0
    budget = args.budget_minutes * 60 - row["block_ap_seconds"]
    while trainer.step < cfg.steps and train_seconds < budget:
        t0 = time.perf_counter()
        trainer.train(until=min(cfg.steps, trainer.step + args.eval_every))
        train_seconds += time.perf_counter() - t0
        recent = trainer.history[-args.eval_every:]
        point = {"step": trainer.step, "heldout_ppl": ppl(model, heldout), "train_seconds": train_seconds,
                 "loss": sum(r["loss"] for r in recent) / len(recent)}
        curve.append(point)
        print(f"  E2E step {point['step']}: loss {point['loss']:.4f}, held-out ppl {point['heldout_ppl']:.3f}, "
              f"{train_seconds:.0f} s of training", flush=True)
    # the fake-quant model against its packed, reloaded self (the 0.1% check), where asked for
    fake_ppl = ppl(model, test) if bits in args.check_bits else None
    qat.convert(model)
    out = lowbit.save(model, Path(args.out) / f"w{bits}-qat", tokenizer=tok, overwrite=True)
    del model
    reloaded_ppl = ppl(lowbit.load(out), test)
    ref_kernel_ppl = None
    if args.ref_kernel and bits in args.check_bits:  # fp32 dequantize + F.linear: the fake-quant arithmetic
        os.environ[BACKEND_ENV] = "ref"
        try:
            ref_kernel_ppl = ppl(lowbit.load(out), test)
        finally:
            del os.environ[BACKEND_ENV]
    row.update(qat_fake_quant_ppl=fake_ppl, qat_reloaded_ppl=reloaded_ppl, reloaded_ref_kernel_ppl=ref_kernel_ppl,
               reload_rel_diff=None if fake_ppl is None else abs(reloaded_ppl - fake_ppl) / fake_ppl,
               reload_ref_rel_diff=None if fake_ppl is None or ref_kernel_ppl is None
               else abs(ref_kernel_ppl - fake_ppl) / fake_ppl,
               steps=trainer.step, tokens_trained=trainer.step * cfg.batch_size * train.shape[1],
               train_seconds=train_seconds, qat_seconds=row["block_ap_seconds"] + train_seconds,
               seconds_per_step=train_seconds / max(1, trainer.step), config=dataclasses.asdict(cfg),
               curve=curve, history=trainer.history)
    print(f"W{bits}: PTQ {row.get('ptq_ppl')} -> Block-AP {row.get('block_ap_ppl')} -> E2E {reloaded_ppl:.3f} "
          f"reloaded (fake-quant {fake_ppl}, ref kernel {ref_kernel_ppl}); Block-AP {row['block_ap_seconds']:.0f} s, "
          f"{trainer.step} E2E steps in {train_seconds:.0f} s", flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_bap = any(r.get("block_ap") for r in result["rows"])
    if has_bap:
        fig, (ax_bap, ax_loss, ax_ppl) = plt.subplots(1, 3, figsize=(16, 4))
    else:  # a recipe without Block-AP (w4a8-qat): no empty panel
        fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
        ax_bap = None
    for row in result["rows"]:
        label = row["recipe"].split(" (")[0]  # the name, without the spec the loader appends
        if row.get("block_ap"):
            hist = row["block_ap"]["history"]
            line, = ax_bap.plot([h["block"] for h in hist], [h.get("first_loss", float("nan")) for h in hist], "--",
                                alpha=0.7, label=f"{label}: first step")
            ax_bap.plot([h["block"] for h in hist], [h["epoch_loss"][-1] if h["epoch_loss"] else float("nan")
                                                     for h in hist], "o-", color=line.get_color(),
                        label=f"{label}: last epoch")
        steps_, losses = [h["step"] for h in row["history"]], [h["loss"] for h in row["history"]]
        line, = ax_loss.plot(steps_, losses, alpha=0.3, label=f"{label}: per step")
        k = 10  # one 512-token window per step is noisy: the trend is what the curve is for
        if len(losses) >= k:
            avg = [sum(losses[i - k + 1:i + 1]) / k for i in range(k - 1, len(losses))]
            ax_loss.plot(steps_[k - 1:], avg, color=line.get_color(), label=f"{label}: mean of {k}")
        ax_ppl.plot([c["step"] for c in row["curve"]], [c["heldout_ppl"] for c in row["curve"]], "o-", label=label)
    if has_bap:
        ax_bap.set(xlabel="block", ylabel="MSE to the float block's output", yscale="log",
                   title="Block-AP reconstruction loss")
    ax_loss.set(xlabel="E2E step", ylabel="distillation loss", title="E2E training loss")
    ax_ppl.set(xlabel=f"E2E step (0: {'after Block-AP' if has_bap else 'the PTQ start'})", ylabel="perplexity",
               yscale="log", title=f"held-out wiki.valid perplexity ({result['heldout_windows']} x {result['seqlen']})")
    for ax in (ax for ax in (ax_bap, ax_loss, ax_ppl) if ax is not None):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    stages = "Block-AP then E2E" if any(r.get("block_ap") for r in result["rows"]) else "E2E QAT"
    fig.suptitle(f"{result['model']}: {stages} from {result['ptq']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", default="3,2", help="comma-separated bit widths")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--recipe", default=None, help="a QAT recipe (default: w{bits}a16-qat)")
    ap.add_argument("--ptq", default="gptq", choices=sorted(PTQ_RECIPES), help="the PTQ steps Block-AP starts from")
    ap.add_argument("--calib-samples", type=int, default=64, help="PTQ and Block-AP calibration windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="test windows")
    ap.add_argument("--heldout", type=int, default=4, help="wiki.valid windows kept out of E2E training")
    ap.add_argument("--skip-ptq", action="store_true", help="no separate PTQ-only run and measurement")
    ap.add_argument("--no-block-ap", action="store_true", help="drop the recipe's Block-AP step")
    ap.add_argument("--skip-block-ap-eval", action="store_true", help="no test measurement between Block-AP and E2E")
    ap.add_argument("--bap-epochs", type=int, default=None)
    ap.add_argument("--bap-lr", type=float, default=None)
    ap.add_argument("--bap-scale-lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=None, help="E2E steps (default: the recipe's)")
    ap.add_argument("--budget-minutes", type=float, default=20.0,
                    help="E2E stops once Block-AP and E2E training time together reach this")
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
    bos = expects_bos(teacher)
    test = load_windows(tok, WIKI_TEST, seqlen=args.seqlen, windows=args.windows, bos=bos)
    valid = load_windows(tok, WIKI_VALID, seqlen=args.seqlen, bos=bos)
    train, heldout = valid[: -args.heldout], valid[-args.heldout:]
    calib = lowbit.calib.text_file(WIKI_VALID, n_samples=args.calib_samples, seqlen=args.seqlen).samples(tok)
    print(f"{args.model}: test {tuple(test.shape)}, E2E train {tuple(train.shape)}, held-out {tuple(heldout.shape)}, "
          f"calibration {tuple(calib.shape)}", flush=True)
    result = {"model": args.model, "ptq": args.ptq, "seqlen": args.seqlen, "test_windows": args.windows,
              "heldout_windows": args.heldout, "threads": torch.get_num_threads(), "rows": []}
    if args.float_ppl:
        result["float_ppl"] = ppl(teacher, test)
        print(f"float: test ppl {result['float_ppl']:.3f}", flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        result["rows"].append(run_bits(args, bits, teacher, test, train, heldout, calib))
        if args.json:
            with lowbit.formats.atomic_file(args.json) as tmp:
                Path(tmp).write_text(json.dumps(result, indent=1))
        if args.plot:
            plot(result, Path(args.plot))
    print("| width | PTQ start | PTQ | + Block-AP | + E2E-QP (reloaded) | fake-quant | Block-AP s | E2E steps, s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| W{row['bits']} g{row['group_size']} | {row['ptq']} | {_fmt(row.get('ptq_ppl'))} | "
              f"{_fmt(row.get('block_ap_ppl'))} | {_fmt(row['qat_reloaded_ppl'])} | {_fmt(row['qat_fake_quant_ppl'])} | "
              f"{row['block_ap_seconds']:.0f} | {row['steps']}, {row['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
