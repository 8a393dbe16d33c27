"""AWQ side by side (issue 3): lowbit, llm-compressor and AutoAWQ in one run, on one machine.

Every method quantizes the same model with the same scheme (W4, groups of 64 along the input,
asymmetric with a zero point, every decoder Linear, lm_head and embeddings left in float) on the same
calibration token windows (8 x 512 from wiki.valid.tokens, cut by lowbit.calib.text_file and handed to
the peers as token ids, so the data is identical, not just the file). Each peer runs in its own venv
(bench/peers/venv.py) as a subprocess, times its own quantization (model load excluded, as for
lowbit) and writes its model back as dense float weights (the dequantized values). All models are then
evaluated here by lowbit.eval on the same WikiText-2 test windows: perplexity, KL divergence and top-1
agreement against the float model. A peer that crashes or yields NaN gets a row saying so.

    python bench/awq_peers.py [--model smollm2-135m|gemma3-270m] [--peers lowbit,llmcompressor,autoawq]
        [--bits 4] [--group-size 64] [--n-samples 8] [--seqlen 512] [--json bench/out/awq_peers.json]

AutoAWQ is slow on CPU (11 minutes for SmolLM2 on an idle 2-core machine, about 50 under load) and
has a CPU-only bug in its scale search that bench/peers/autoawq_awq.py fixes (see there);
`--autoawq-stock` runs it unmodified. On a machine shared with other jobs, wall times move a lot
(llm-compressor's AWQ took 200 s to 1700 s here): compare times only within one run, and consider
`--threads 1` so that no method has two threads waiting on one free core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit import zoo
from lowbit.cli import default_bos
from lowbit.eval import evaluate, load_windows

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
WIKI_TEST = DATA / "wiki.test.joined.txt"
WIKI_VALID = DATA / "wiki.valid.tokens"
PEERS_DIR = REPO / "bench" / "peers"

sys.path.insert(0, str(REPO))
from bench.peers.venv import ensure_venv  # noqa: E402

# name -> (label, venv name, requirements, script). The autoawq venv is shared with another benchmark:
# its name and requirement list must stay exactly these.
PEERS = {
    "llmcompressor": ("llm-compressor 0.14.0.1 AWQ", "llmcompressor", ["llmcompressor==0.14.0.1"], "llmc_awq.py"),
    "autoawq": ("AutoAWQ 0.2.9", "autoawq", ["autoawq==0.2.9"], "autoawq_awq.py"),
}
ALL_METHODS = ("lowbit", *PEERS)


def say(msg: str) -> None:
    print(f"[awq_peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- checks


def grid_check(weights: dict[str, torch.Tensor], bits: int, group_size: int) -> dict:
    """Whether each [out, in] weight takes at most 2^bits distinct values in every group of
    `group_size` consecutive inputs of a row, i.e. lies on a `bits`-bit per-group grid."""
    levels = 2**bits
    worst = 0
    off = []
    for name, w in weights.items():
        out_f, in_f = w.shape
        if in_f % group_size:
            off.append(f"{name} (in_features {in_f} not a multiple of {group_size})")
            continue
        s = w.detach().float().reshape(out_f, in_f // group_size, group_size).sort(dim=-1).values
        distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(dim=-1)
        m = int(distinct.max())
        worst = max(worst, m)
        if m > levels:
            off.append(f"{name} (up to {m} values per group)")
    return {"linears": len(weights), "on_grid": len(weights) - len(off), "max_distinct_per_group": worst,
            "levels": levels, "ok": not off and len(weights) > 0, "off_grid": off[:5]}


def quantized_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense weights of the decoder Linears: lowbit's packed modules dequantized, plain nn.Linear as is;
    lm_head (left in float by every method) is not included."""
    from lowbit.nn import WQLinear

    out = {}
    for name, m in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(m, WQLinear):
            out[name] = m.dequantize_weight()
        elif isinstance(m, nn.Linear):
            out[name] = m.weight.data
    return out


def load_dense(src: Path, weights_file: Path) -> tuple[nn.Module, list[str]]:
    """The float model with every parameter replaced from a peer's safetensors file."""
    from safetensors.torch import load_file

    model = lowbit.load(src)
    sd = load_file(str(weights_file))
    expected = {name for name, _ in model.named_parameters()}  # tied parameters once
    missing = sorted(expected - sd.keys())
    if missing:
        raise RuntimeError(f"peer weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite values in {len(bad)} peer tensors, e.g. {bad[:3]}")
    notes = []
    unexpected = sorted(sd.keys() - {k for k in model.state_dict()})
    if unexpected:
        notes.append(f"ignored {len(unexpected)} extra tensors, e.g. {unexpected[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expected:
            p = params[name]
            if tuple(sd[name].shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: peer shape {tuple(sd[name].shape)} != model shape {tuple(p.shape)}")
            p.copy_(sd[name].to(p.dtype))
    return model, notes


# ---------------------------------------------------------------------------------------------- peers


def run_peer(cmd: list[str], log_file: Path, timeout: float) -> tuple[int, str]:
    """Runs a peer script, streaming its output through (progress bars included) and into `log_file`;
    returns (exit status, last lines of output); 124 when it ran past `timeout` seconds."""
    tail = b""
    timed_out = threading.Event()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

        def stop(sig=signal.SIGTERM) -> None:  # the peer's own process group, started just above
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

        def on_timeout() -> None:
            timed_out.set()
            stop()

        timer = threading.Timer(timeout, on_timeout)
        timer.start()
        try:
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                log.write(chunk)
                tail = (tail + chunk)[-8192:]
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop(signal.SIGKILL)
                rc = proc.wait()
        except BaseException:
            stop(signal.SIGKILL)
            proc.wait()
            raise
        finally:
            timer.cancel()
    if timed_out.is_set():
        return 124, f"timed out after {timeout:.0f} s"
    return rc, tail.decode("utf-8", "replace").replace("\r", "\n")


def failure_reason(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "error:" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, gemma3-270m) or HF checkpoint dir")
    ap.add_argument("--peers", default=",".join(ALL_METHODS),
                    help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=8, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--calib", default=str(WIKI_VALID), help="calibration text file")
    ap.add_argument("--text", default=str(WIKI_TEST), help="evaluation text")
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--work-dir", default=None, help="where peers write their models (default: a temp dir)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work dir (peer models, logs)")
    ap.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds per peer subprocess")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every method (default: torch's own); 1 may steady the times on a "
                         "machine shared with other jobs")
    ap.add_argument("--autoawq-stock", action="store_true",
                    help="run AutoAWQ unmodified (with its CPU scale-search bug; see bench/peers/autoawq_awq.py)")
    args = ap.parse_args()

    methods = [m.strip() for m in args.peers.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        ap.error(f"--peers: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the peers inherit it

    src = zoo.pull(args.model) if args.model in zoo.ZOO else Path(args.model)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="awq_peers-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"model {args.model} ({src}); work dir {work}")

    fp = lowbit.load(src)
    tok = fp.lowbit_tokenizer
    bos = default_bos(fp)
    windows = load_windows(tok, args.text, seqlen=args.eval_seqlen, windows=args.windows, bos=bos)
    say(f"evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens of {Path(args.text).name}"
        f"{' (BOS per window)' if bos else ''}")

    # The calibration windows, cut once by lowbit and handed to the peers as token ids.
    from safetensors.torch import save_file

    calib = lowbit.calib.text_file(args.calib, n_samples=args.n_samples, seqlen=args.seqlen)
    t0 = time.perf_counter()
    samples = calib.samples(tok)
    tokenize_s = time.perf_counter() - t0
    samples_file = work / "calib_ids.safetensors"
    save_file({"input_ids": samples.contiguous()}, str(samples_file))
    ids_sha = hashlib.sha256(samples.numpy().tobytes()).hexdigest()
    say(f"calibration: {samples.shape[0]} x {samples.shape[1]} tokens of {Path(args.calib).name} "
        f"(seed {calib.seed}, ids sha256 {ids_sha[:12]}, tokenizing took {tokenize_s:.1f} s)")

    rows = []
    say("float model: perplexity")
    res = evaluate(fp, windows)
    rows.append({"method": "float (fp32)", "status": "ok", "ppl": res["ppl"], "kl": 0.0, "top1_agreement": 1.0,
                 "quant_seconds": None, "grid": None, "notes": []})
    float_ppl = res["ppl"]
    say(f"float ppl {float_ppl:.3f}")

    def evaluate_row(row: dict, model: nn.Module) -> None:
        row["grid"] = grid_check(quantized_linear_weights(model), args.bits, args.group_size)
        g = row["grid"]
        say(f"{row['method']}: grid check {g['on_grid']}/{g['linears']} decoder linears on a {args.bits}-bit "
            f"g{args.group_size} grid (max {g['max_distinct_per_group']} distinct values per group, limit {g['levels']})"
            + ("" if g["ok"] else f"; OFF GRID: {g['off_grid']}"))
        if not g["ok"]:
            row["status"] = f"weights off the {args.bits}-bit g{args.group_size} grid"
        say(f"{row['method']}: evaluating")
        r = evaluate(model, windows, ref_model=fp)
        row.update(ppl=r["ppl"], kl=r["kl"], top1_agreement=r["top1_agreement"])
        if not (math.isfinite(r["ppl"]) and math.isfinite(r["kl"])):
            row["status"] = "non-finite ppl/KL" if row["status"] == "ok" else row["status"] + "; non-finite ppl/KL"
        say(f"{row['method']}: ppl {r['ppl']:.3f}, KL {r['kl']:.4f}, top-1 {r['top1_agreement']:.3f}")

    for method in methods:
        if method == "lowbit":
            row = {"method": f"lowbit {lowbit.__version__} w4a16-awq" if args.bits == 4 else
                   f"lowbit {lowbit.__version__} AWQ W{args.bits}", "status": "ok", "notes": []}
            rows.append(row)
            try:
                model = lowbit.load(src)
                say(f"lowbit: quantize w4a16-awq W{args.bits} g{args.group_size}")
                t0, c0 = time.perf_counter(), time.process_time()
                q = lowbit.quantize(model, "w4a16-awq", calib=lowbit.calib.text_file(
                    args.calib, n_samples=args.n_samples, seqlen=args.seqlen),
                    group_size=args.group_size, bits=args.bits)
                row["quant_seconds"] = time.perf_counter() - t0
                row["quant_cpu_seconds"] = time.process_time() - c0
                row["notes"].append(f"quantize time includes tokenizing the calibration text (~{tokenize_s:.1f} s)")
                say(f"lowbit: quantize took {row['quant_seconds']:.1f} s (CPU time {row['quant_cpu_seconds']:.1f} s)")
                evaluate_row(row, q)
                del model, q
            except Exception as e:  # noqa: BLE001 - a failed method is a row, not the end of the run
                row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
                say(f"lowbit FAILED: {row['status']}")
            continue

        label, venv_name, reqs, script = PEERS[method]
        if method == "autoawq":
            label += " (stock)" if args.autoawq_stock else " (+ CPU snapshot fix)"
        row = {"method": label, "status": "ok", "notes": []}
        rows.append(row)
        try:
            say(f"{method}: venv")
            python = ensure_venv(venv_name, reqs)
            out = work / method
            if out.exists():
                shutil.rmtree(out)
            cmd = [str(python), "-P", str(PEERS_DIR / script), "--model", str(src), "--samples", str(samples_file),
                   "--bits", str(args.bits), "--group-size", str(args.group_size), "--out", str(out)]
            if method == "autoawq" and args.autoawq_stock:
                cmd.append("--stock")
            say(f"{method}: running {' '.join(cmd[2:4])} ...")
            rc, tail = run_peer(cmd, work / f"{method}.log", args.peer_timeout)
            if rc != 0 or not (out / "result.json").is_file():
                if rc < 0:
                    why = f"killed by {signal.Signals(-rc).name} (from outside this script)"
                elif rc == 124:
                    why = tail
                else:
                    why = failure_reason(tail)
                row["status"] = f"failed (exit {rc}): {why}"
                say(f"{method} FAILED: {row['status']} (log: {work / f'{method}.log'})")
                continue
            info = json.loads((out / "result.json").read_text())
            row.update(quant_seconds=info["quant_seconds"], quant_cpu_seconds=info.get("quant_cpu_seconds"),
                       versions=info.get("versions"), config=info.get("config"))
            row["notes"] += info.get("notes", [])
            say(f"{method}: quantize took {info['quant_seconds']:.1f} s; loading its weights")
            model, notes = load_dense(src, out / "model.safetensors")
            row["notes"] += notes
            evaluate_row(row, model)
            del model
            if not args.keep_work:
                shutil.rmtree(out, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
            say(f"{method} FAILED: {row['status']}")

    # ------------------------------------------------------------------------------------------ report
    ref_t = next((r.get("quant_seconds") for r in rows if r["method"].startswith("llm-compressor")
                  and r.get("quant_seconds")), None)
    ref_c = next((r.get("quant_cpu_seconds") for r in rows if r["method"].startswith("llm-compressor")
                  and r.get("quant_cpu_seconds")), None)
    for r in rows:
        r["delta_ppl"] = r["ppl"] - float_ppl if r.get("ppl") is not None else None
        r["time_vs_llmcompressor"] = (r["quant_seconds"] / ref_t if ref_t and r.get("quant_seconds") else None)
        r["cpu_time_vs_llmcompressor"] = (r["quant_cpu_seconds"] / ref_c if ref_c and r.get("quant_cpu_seconds")
                                          else None)

    def fmt(v, spec, none="–"):
        return none if v is None else format(v, spec)

    print()
    print(f"{args.model}, W{args.bits} g{args.group_size} asymmetric, calibration {samples.shape[0]} x "
          f"{samples.shape[1]} tokens of {Path(args.calib).name}; eval {windows.shape[0]} x {windows.shape[1]} "
          f"of {Path(args.text).name}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print()
    print("| method | ppl | Δppl vs float | KL vs float | top-1 | quantize wall time | time / llm-compressor "
          "| quantize CPU time | 4-bit grid check | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r.get("grid")
        grid = "–" if g is None else (f"{g['on_grid']}/{g['linears']} ok (≤{g['max_distinct_per_group']} values/group)"
                                      if g["ok"] else f"{g['on_grid']}/{g['linears']} OFF GRID")
        ppl = r.get("ppl")
        print(f"| {r['method']} | {fmt(ppl, '.2f')} | {fmt(r.get('delta_ppl'), '+.2f') if r is not rows[0] else '–'} "
              f"| {fmt(r.get('kl'), '.4f') if r is not rows[0] else '–'} | {fmt(r.get('top1_agreement'), '.3f')} "
              f"| {fmt(r.get('quant_seconds'), '.1f')}{' s' if r.get('quant_seconds') is not None else ''} "
              f"| {fmt(r.get('time_vs_llmcompressor'), '.2f')}{'x' if r.get('time_vs_llmcompressor') else ''} "
              f"| {fmt(r.get('quant_cpu_seconds'), '.1f')}{' s' if r.get('quant_cpu_seconds') is not None else ''} "
              f"| {grid} | {r['status']} |")
    print()
    print("Wall time: the quantize call only (model load excluded; lowbit's includes tokenizing the calibration "
          "text). CPU time: summed over that process's threads over the same span (wall time well above CPU time "
          "/ threads means it waited for a core).")
    for r in rows:
        for n in r.get("notes", []):
            print(f"- {r['method']}: {n}")

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": args.model, "model_path": str(src), "bits": args.bits, "group_size": args.group_size,
            "symmetric": False,
            "calibration": {"file": str(args.calib), "n_samples": int(samples.shape[0]),
                            "seqlen": int(samples.shape[1]), "seed": calib.seed, "ids_sha256": ids_sha,
                            "tokenize_seconds": tokenize_s},
            "eval": {"text": str(args.text), "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                     "bos": bos},
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "torch": torch.__version__},
            "rows": rows,
        }, indent=2, default=str))
        say(f"wrote {args.json}")
    if not args.keep_work and not args.work_dir:
        if any(r["status"].startswith("failed") for r in rows):
            say(f"kept {work} for the logs of the failed peers")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
