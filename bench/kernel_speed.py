"""Weight-only quantized GEMM (`lowbit.kernels.wint_gemm`) against fp32 and bf16 `F.linear`.

For each shape (K x N: in x out features) and token count M it times fp32 and bf16 `F.linear`
and every wint backend for 4-bit g64, 4-bit g128 and 8-bit per-channel weights, plus what
`auto` picks, and prints Markdown tables: milliseconds, speedup against fp32 and bf16, and the
achieved GB/s of weight bytes at M=1 next to the machine's read bandwidth measured in the same
run (a sum over a large tensor), and the fraction of that limit each kernel reaches with its
weights streamed from DRAM (decode reads every weight once per token). Candidates are timed in
interleaved rounds (medians of `torch.utils.benchmark` medians) so that other load on the machine
hits all of them alike.

    python bench/kernel_speed.py [--quick] [--json bench/out/kernels.json] [--markdown FILE] [--threads 2]
                            [--shapes 576x576,4096x4096] [--ms 1,16,128] [--timer wall|cpu]

`--timer cpu` times process CPU time instead of wall time: steadier on a shared machine, and
meaningful with `--threads 1` only (idle OpenMP threads spin and count as busy).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from lowbit.kernels import wint
from lowbit.kernels.wint import prepare_wint, select_backend, wint_gemm

SHAPES = ["576x576", "576x1536", "1536x576", "4096x4096", "4096x11008"]
MS = [1, 16, 128, 512]
QUICK_SHAPES = ["576x1536", "4096x4096"]
QUICK_MS = [1, 16, 128]

# M=1 is also timed with the weights streamed from DRAM: each call uses the next of enough
# copies to fill this many bytes (8x the 32 MiB L3 of the dev machine)
STREAM_BYTES = 256 * 2**20

# (label, bits, group size or None for per-channel, symmetric)
CONFIGS = [("w4g64", 4, 64, False), ("w4g128", 4, 128, False), ("w8pc", 8, None, False)]


def weight_bytes(prepared: dict[str, torch.Tensor], backend: str) -> int:
    """Bytes the backend reads per call: its weight and its scales."""
    keys = {
        "int4pack": ("int4pack_weight", "int4pack_scales_zeros"),
        "int4cpp": ("int4pack_weight", "int4pack_scales_zeros"),
        "int8pack": ("int8pack_weight", "int8pack_scales", "int8pack_offset"),
        "nib": ("nib_weight", "nib_scales", "nib_offset"),
        "dequant": ("dequant_codes", "dequant_scales", "dequant_offset"),
        "ref": ("ref_q", "ref_scales", "ref_zeros"),
    }[backend]
    if backend == "dequant" and "dequant_codes" not in prepared:
        src = "int8pack" if "int8pack_weight" in prepared else "int4pack"
        return weight_bytes(prepared, src)
    return sum(prepared[k].numel() * prepared[k].element_size() for k in keys if k in prepared)


def make_weight(n: int, k: int, bits: int, group_size: int, sym: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = torch.rand(n, k // group_size, generator=g) * 0.02 + 0.002
    if sym:
        zeros = torch.full((n, k // group_size), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, 2**bits, (n, k // group_size), generator=g).float()
    return q, scales, zeros


def interleaved(cands: dict, rounds: int, min_run_time: float, timer) -> dict[str, float]:
    """Median over rounds of each candidate's blocked_autorange median, in ms."""
    timers = {name: Timer("f()", globals={"f": f}, timer=timer) for name, f in cands.items()}
    for f in cands.values():  # warm up (first-call allocations, oneDNN primitive creation)
        f()
    samples: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(t.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def read_bandwidth(gib: float, rounds: int, timer) -> float:
    """GB/s of a sum over a tensor far larger than the caches."""
    t = torch.ones(int(gib * 2**30) // 4)
    ms = interleaved({"sum": lambda: t.sum()}, rounds, 0.2, timer)["sum"]
    return t.numel() * 4 / (ms * 1e-3) / 1e9


def streamed(make_call, nbytes: int):
    """A callable cycling through copies of the weights (made by make_call) so none stays cached."""
    calls = [make_call() for _ in range(max(2, math.ceil(STREAM_BYTES / nbytes)))]
    it = itertools.cycle(calls)
    return lambda: next(it)()


def fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, M {QUICK_MS}, fewer rounds")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--shapes", help="comma-separated KxN (in x out)")
    ap.add_argument("--ms", help="comma-separated token counts")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else SHAPES)
    ms = [int(m) for m in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else MS)
    rounds = args.rounds or (3 if args.quick else 5)
    min_run = 0.05 if args.quick else 0.1
    timer = time.perf_counter if args.timer == "wall" else time.process_time

    bw = read_bandwidth(0.5 if args.quick else 1.0, rounds, timer)
    info = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "timer": args.timer,
        "rounds": rounds,
        "read_bandwidth_GBps": round(bw, 2),
        "int4pack_max_m": wint.INT4PACK_MAX_M,
        "int8pack_max_m": wint.INT8PACK_MAX_M,
    }
    print(f"torch {torch.__version__}, {info['threads']} threads, {info['cpu_capability']}, "
          f"timer={args.timer}, read bandwidth {bw:.1f} GB/s (sum over {0.5 if args.quick else 1.0} GiB)\n")

    rows = []
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        w32 = torch.randn(n, k) / k**0.5
        w16 = w32.to(torch.bfloat16)
        prepared = {}
        for label, bits, g, sym in CONFIGS:
            group = k if g is None else g
            if k % group:
                continue
            q, s, z = make_weight(n, k, bits, group, sym)
            prepared[label] = prepare_wint(q, s, z, bits, group)  # the default (auto) runtime form
        for m in ms:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            cands = {"fp32": lambda: F.linear(x32, w32), "bf16": lambda: F.linear(x16, w16)}
            for label, p in prepared.items():
                for b in wint.available_backends(p):
                    cands[f"{label}/{b}"] = lambda p=p, b=b: wint_gemm(x16, p, out_features=n, backend=b)
            t = interleaved(cands, rounds, min_run, timer)
            row = {"shape": shape, "K": k, "N": n, "M": m, "ms": t, "auto": {}, "GBps": {}}
            for label, p in prepared.items():
                row["auto"][label] = select_backend(m, p)
            if m == 1:
                nbytes = {"fp32": 4 * n * k, "bf16": 2 * n * k}
                scold = {"fp32": streamed(lambda: (lambda w=w32.clone(): F.linear(x32, w)), nbytes["fp32"]),
                         "bf16": streamed(lambda: (lambda w=w16.clone(): F.linear(x16, w)), nbytes["bf16"])}
                for name in t:
                    if "/" in name:
                        label, b = name.split("/")
                        nbytes[name] = weight_bytes(prepared[label], b)
                        scold[name] = streamed(
                            lambda p=prepared[label], b=b: (
                                lambda c={key: v.clone() for key, v in p.items()}: wint_gemm(
                                    x16, c, out_features=n, backend=b)), nbytes[name])
                cold = interleaved(scold, rounds, min_run, timer)
                del scold
                row["stream_ms"] = cold
                row["GBps"] = {c: nbytes[c] / t[c] / 1e6 for c in t}
                row["stream_GBps"] = {c: nbytes[c] / cold[c] / 1e6 for c in cold}
            rows.append(row)
            best = {lab: t[f"{lab}/{row['auto'][lab]}"] for lab in prepared}
            print(f"  {shape} M={m}: fp32 {t['fp32']:.3f} bf16 {t['bf16']:.3f} "
                  + " ".join(f"{lab}[{row['auto'][lab]}] {v:.3f}" for lab, v in best.items()), flush=True)

    text = tables(rows, info)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        head = (f"Kernels: torch {info['torch']}, {info['threads']} threads, {info['cpu_capability']}, timer "
                f"{info['timer']}, read bandwidth {info['read_bandwidth_GBps']} GB/s (a sum over a large tensor).\n")
        args.markdown.write_text(head + text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")


def tables(rows: list[dict], info: dict) -> str:
    """The Markdown tables: ms per call at every M, then for M=1 (decode) the GB/s of weight bytes and
    the fraction of the read bandwidth measured in the same run that this reaches."""
    out = []
    cols = [f"{label}/{b}" for label, _, _, _ in CONFIGS for b in ("int4pack", "int4cpp", "int8pack", "nib", "dequant")
            if any(f"{label}/{b}" in r["ms"] for r in rows)]
    out.append("\n### ms per call (speedup vs fp32 / vs bf16); * = what `auto` picks\n")
    out.append("| K x N | M | fp32 | bf16 | " + " | ".join(cols) + " |")
    out.append("|---|---:|---:|---:|" + "---:|" * len(cols))
    for r in rows:
        t = r["ms"]
        cells = []
        for c in cols:
            if c not in t:
                cells.append("n/a")
                continue
            label, b = c.split("/")
            star = "*" if r["auto"].get(label) == b else ""
            cells.append(f"{fmt_ms(t[c])}{star} ({t['fp32'] / t[c]:.2f}x / {t['bf16'] / t[c]:.2f}x)")
        out.append(f"| {r['shape']} | {r['M']} | {fmt_ms(t['fp32'])} | {fmt_ms(t['bf16'])} | " + " | ".join(cells) + " |")

    one = [r for r in rows if r["M"] == 1]
    if one:
        bw = info["read_bandwidth_GBps"]
        gcols = ["fp32", "bf16"] + cols
        out.append(f"\n### M=1: GB/s of weight bytes read, weights hot in cache / streamed from DRAM "
                   f"(ms streamed in brackets); machine read bandwidth {bw} GB/s\n")
        out.append("| K x N | " + " | ".join(gcols) + " |")
        out.append("|---|" + "---:|" * len(gcols))
        for r in one:
            out.append(f"| {r['shape']} | " + " | ".join(
                f"{r['GBps'][c]:.1f} / {r['stream_GBps'][c]:.1f} ({fmt_ms(r['stream_ms'][c])})"
                if c in r["GBps"] else "n/a" for c in gcols) + " |")
        # decode streams every weight once per token: time >= weight bytes / read bandwidth
        out.append(f"\n### M=1, weights streamed from DRAM: fraction of the {bw} GB/s read bandwidth reached "
                   f"(1.00 = bandwidth-bound; ms at the limit in brackets)\n")
        out.append("| K x N | " + " | ".join(gcols) + " |")
        out.append("|---|" + "---:|" * len(gcols))
        for r in one:
            cells = []
            for c in gcols:
                if c not in r["stream_GBps"]:
                    cells.append("n/a")
                    continue
                limit_ms = r["stream_GBps"][c] * r["stream_ms"][c] / bw  # bytes / bandwidth, in ms
                cells.append(f"{r['stream_GBps'][c] / bw:.2f} ({fmt_ms(limit_ms)})")
            out.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.pop(wint.BACKEND_ENV, None)
    main()
