"""The machinery the side-by-side peer benchmarks (bench/awq_peers.py, bench/gptq_peers.py) share.

One run of such a benchmark is a `PeerBench`: it loads the float model, cuts the WikiText-2 test
windows and the calibration token windows once (the ids go to every peer as a safetensors file with
their SHA-256, which the peer checks and the report records), evaluates the float model, then gets
one row per method:

- `lowbit_row(label, quantize)`: lowbit in this process; `quantize(model)` returns the quantized model.
- `peer_row(method, peer, extra_args)`: a peer script in the peer's own venv (bench/peers/venv.py),
  as a subprocess that times its own quantization and writes `OUT/model.safetensors` (every float
  parameter, Linear weights dequantized), `OUT/result.json` and, where the layout is not plain
  contiguous groups (act-order), `OUT/g_idx.safetensors` (the group of each input column, per Linear).

Each row's decoder Linears are checked to lie on the expected `bits`-bit per-group grid, then the model
is evaluated by lowbit.eval against the float model (perplexity, KL, top-1 agreement). A method that
fails becomes a row that says why. `report` prints the Markdown table and writes the JSON.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import lowbit
from lowbit import zoo
from lowbit.models import expects_bos
from lowbit.eval import evaluate, load_windows

from .venv import ensure_venv

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
WIKI_TEST = DATA / "wiki.test.joined.txt"
WIKI_VALID = DATA / "wiki.valid.tokens"
PEERS_DIR = REPO / "bench" / "peers"


@dataclass(frozen=True)
class Peer:
    """A peer package: its row label, its venv (name and exact requirement list, which other scripts
    sharing the venv must spell the same way) and its script in bench/peers/."""

    label: str
    venv: str
    requirements: tuple[str, ...]
    script: str


# ---------------------------------------------------------------------------------------------- checks


def grid_check(weights: dict[str, torch.Tensor], bits: int, group_size: int,
               g_idx: dict[str, torch.Tensor] | None = None) -> dict:
    """Whether each [out, in] weight takes at most 2^bits distinct values in every group of a row, i.e.
    lies on a `bits`-bit per-group grid. Groups are `group_size` consecutive inputs, or, for a layer
    with an entry in `g_idx` (act-order), the inputs that share a group index (`group_size` of each)."""
    levels = 2**bits
    worst = 0
    off = []
    for name, w in weights.items():
        out_f, in_f = w.shape
        if in_f % group_size:
            off.append(f"{name} (in_features {in_f} not a multiple of {group_size})")
            continue
        w = w.detach().float()
        if g_idx is not None and name in g_idx:
            gi = g_idx[name].reshape(-1).long()
            sizes = torch.bincount(gi, minlength=in_f // group_size) if gi.numel() == in_f and gi.min() >= 0 else None
            if sizes is None or sizes.numel() != in_f // group_size or bool((sizes != group_size).any()):
                off.append(f"{name} (g_idx does not make groups of {group_size})")
                continue
            w = w[:, torch.argsort(gi, stable=True)]  # members of each group side by side
        s = w.reshape(out_f, in_f // group_size, group_size).sort(dim=-1).values
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


def lowbit_g_idx(model: nn.Module) -> dict[str, torch.Tensor]:
    """The group of each input column of lowbit's act-order layers (the others have plain groups)."""
    from lowbit.nn import WQLinear

    return {name: m.g_idx() for name, m in model.named_modules()
            if isinstance(m, WQLinear) and getattr(m, "perm", None) is not None}


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


# ---------------------------------------------------------------------------------------------- arguments


def add_common_args(ap: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    """The options every peer benchmark takes: model, methods, scheme, data, output, work dir, threads."""
    ap.add_argument("--model", default="smollm2-135m", help="zoo name (smollm2-135m, gemma3-270m) or HF checkpoint dir")
    ap.add_argument("--peers", default=",".join(methods),
                    help=f"comma-separated subset of {','.join(methods)} (default: all)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=8, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--calib", default=str(WIKI_VALID), help="calibration text file")
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="seed of the calibration windows' offsets (every method gets the same windows)")
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


def chosen_methods(ap: argparse.ArgumentParser, args: argparse.Namespace, methods: tuple[str, ...]) -> list[str]:
    chosen = [m.strip() for m in args.peers.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in methods]
    if unknown or not chosen:
        ap.error(f"--peers: unknown {unknown}; choose from {', '.join(methods)}")
    return chosen


# ---------------------------------------------------------------------------------------------- the run


def _fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


class PeerBench:
    """One side-by-side run: shared inputs, the float row, one row per method, the report."""

    def __init__(self, tag: str, args: argparse.Namespace):
        self.tag = tag
        self.args = args
        self.rows: list[dict] = []
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the peers inherit it

        self.src = zoo.pull(args.model) if args.model in zoo.ZOO else Path(args.model)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.say(f"model {args.model} ({self.src}); work dir {self.work}")

        self.fp = lowbit.load(self.src)
        tok = self.fp.lowbit_tokenizer
        self.bos = expects_bos(self.fp)
        self.windows = load_windows(tok, args.text, seqlen=args.eval_seqlen, windows=args.windows, bos=self.bos)
        self.say(f"evaluation: {self.windows.shape[0]} windows x {self.windows.shape[1]} tokens of "
                 f"{Path(args.text).name}{' (BOS per window)' if self.bos else ''}")

        # The calibration windows, cut once by lowbit and handed to the peers as token ids.
        from safetensors.torch import save_file

        self.calib = lowbit.calib.text_file(args.calib, n_samples=args.n_samples, seqlen=args.seqlen,
                                            seed=args.calib_seed)
        t0 = time.perf_counter()
        self.samples = self.calib.samples(tok)
        self.tokenize_s = time.perf_counter() - t0
        self.samples_file = self.work / "calib_ids.safetensors"
        save_file({"input_ids": self.samples.contiguous()}, str(self.samples_file))
        self.ids_sha = hashlib.sha256(self.samples.numpy().tobytes()).hexdigest()
        self.say(f"calibration: {self.samples.shape[0]} x {self.samples.shape[1]} tokens of {Path(args.calib).name} "
                 f"(seed {self.calib.seed}, ids sha256 {self.ids_sha[:12]}, tokenizing took {self.tokenize_s:.1f} s)")

        self.say("float model: perplexity")
        res = evaluate(self.fp, self.windows)
        self.rows.append({"method": "float (fp32)", "status": "ok", "ppl": res["ppl"], "kl": 0.0,
                          "top1_agreement": 1.0, "quant_seconds": None, "grid": None, "notes": []})
        self.float_ppl = res["ppl"]
        self.say(f"float ppl {self.float_ppl:.3f}")

    def say(self, msg: str) -> None:
        print(f"[{self.tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def evaluate_row(self, row: dict, model: nn.Module, g_idx: dict[str, torch.Tensor] | None = None) -> None:
        """Grid check, then perplexity, KL and top-1 agreement against the float model, into `row`."""
        args = self.args
        row["grid"] = grid_check(quantized_linear_weights(model), args.bits, args.group_size, g_idx)
        g = row["grid"]
        self.say(f"{row['method']}: grid check {g['on_grid']}/{g['linears']} decoder linears on a {args.bits}-bit "
                 f"g{args.group_size} grid (max {g['max_distinct_per_group']} distinct values per group, limit "
                 f"{g['levels']})" + ("" if g["ok"] else f"; OFF GRID: {g['off_grid']}"))
        if not g["ok"]:
            row["status"] = f"weights off the {args.bits}-bit g{args.group_size} grid"
        self.say(f"{row['method']}: evaluating")
        r = evaluate(model, self.windows, ref_model=self.fp)
        row.update(ppl=r["ppl"], kl=r["kl"], top1_agreement=r["top1_agreement"])
        if not (math.isfinite(r["ppl"]) and math.isfinite(r["kl"])):
            row["status"] = "non-finite ppl/KL" if row["status"] == "ok" else row["status"] + "; non-finite ppl/KL"
        self.say(f"{row['method']}: ppl {r['ppl']:.3f}, KL {r['kl']:.4f}, top-1 {r['top1_agreement']:.3f}")

    def lowbit_row(self, label: str, start: str, quantize: Callable[[nn.Module], nn.Module],
                   notes: list[str] | None = None, **extra) -> dict:
        """lowbit in this process: loads the float model, times `quantize(model)` (wall and CPU time),
        then checks and evaluates what it returns. `start` is logged before the quantize call."""
        row = {"method": label, "status": "ok", "notes": [], **extra}
        self.rows.append(row)
        try:
            model = lowbit.load(self.src)
            self.say(f"lowbit: {start}")
            t0, c0 = time.perf_counter(), time.process_time()
            q = quantize(model)
            row["quant_seconds"] = time.perf_counter() - t0
            row["quant_cpu_seconds"] = time.process_time() - c0
            row["notes"] += notes or []
            self.say(f"lowbit: quantize took {row['quant_seconds']:.1f} s (CPU time {row['quant_cpu_seconds']:.1f} s)")
            self.evaluate_row(row, q, lowbit_g_idx(q) or None)
            del model, q
        except Exception as e:  # noqa: BLE001 - a failed method is a row, not the end of the run
            row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
            self.say(f"lowbit FAILED: {row['status']}")
        return row

    def peer_row(self, method: str, peer: Peer, extra_args: list[str] = (), label: str | None = None,
                 **extra) -> dict:
        """A peer script in the peer's venv, given the model, the calibration ids, bits, group size and
        `extra_args`; its dense weights are then loaded into the float model, checked and evaluated."""
        args, work = self.args, self.work
        row = {"method": label or peer.label, "status": "ok", "notes": [], **extra}
        self.rows.append(row)
        try:
            self.say(f"{method}: venv")
            python = ensure_venv(peer.venv, list(peer.requirements))
            out = work / method
            if out.exists():
                shutil.rmtree(out)
            cmd = [str(python), "-P", str(PEERS_DIR / peer.script), "--model", str(self.src),
                   "--samples", str(self.samples_file), "--bits", str(args.bits),
                   "--group-size", str(args.group_size), "--out", str(out), "--samples-sha256", self.ids_sha,
                   *extra_args]
            self.say(f"{method}: running {' '.join(cmd[2:4])} ...")
            rc, tail = run_peer(cmd, work / f"{method}.log", args.peer_timeout)
            if rc != 0 or not (out / "result.json").is_file():
                if rc < 0:
                    why = f"killed by {signal.Signals(-rc).name} (from outside this script)"
                elif rc == 124:
                    why = tail
                else:
                    why = failure_reason(tail)
                row["status"] = f"failed (exit {rc}): {why}"
                self.say(f"{method} FAILED: {row['status']} (log: {work / f'{method}.log'})")
                return row
            info = json.loads((out / "result.json").read_text())
            row.update(quant_seconds=info["quant_seconds"], quant_cpu_seconds=info.get("quant_cpu_seconds"),
                       versions=info.get("versions"), config=info.get("config"))
            row["notes"] += info.get("notes", [])
            self.say(f"{method}: quantize took {info['quant_seconds']:.1f} s; loading its weights")
            model, notes = load_dense(self.src, out / "model.safetensors")
            row["notes"] += notes
            g_idx = None
            if (out / "g_idx.safetensors").is_file():
                from safetensors.torch import load_file

                g_idx = load_file(str(out / "g_idx.safetensors"))
            self.evaluate_row(row, model, g_idx)
            del model
            if not args.keep_work:
                shutil.rmtree(out, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
            self.say(f"{method} FAILED: {row['status']}")
        return row

    # ------------------------------------------------------------------------------------------ report

    def report(self, scheme: str, symmetric: bool, extra_columns: list[tuple[str, Callable[[dict], str]]] = (),
               extra_json: dict | None = None,
               timing: str = "the quantize call only (model load excluded; lowbit's includes tokenizing the "
                             "calibration text)") -> None:
        """Prints the Markdown table (`scheme` describes the setting in its title line, `extra_columns`
        come after the method column, `timing` says what the wall time covers) and writes the JSON
        (`extra_json` after the scheme keys); removes the work dir unless a peer failed or it was asked
        to stay."""
        args, rows = self.args, self.rows
        samples, windows = self.samples, self.windows
        ref_t = next((r.get("quant_seconds") for r in rows if r["method"].startswith("llm-compressor")
                      and r.get("quant_seconds")), None)
        ref_c = next((r.get("quant_cpu_seconds") for r in rows if r["method"].startswith("llm-compressor")
                      and r.get("quant_cpu_seconds")), None)
        for r in rows:
            r["delta_ppl"] = r["ppl"] - self.float_ppl if r.get("ppl") is not None else None
            r["time_vs_llmcompressor"] = (r["quant_seconds"] / ref_t if ref_t and r.get("quant_seconds") else None)
            r["cpu_time_vs_llmcompressor"] = (r["quant_cpu_seconds"] / ref_c if ref_c and r.get("quant_cpu_seconds")
                                              else None)

        print()
        print(f"{args.model}, W{args.bits} g{args.group_size} {scheme}, calibration {samples.shape[0]} x "
              f"{samples.shape[1]} tokens of {Path(args.calib).name}; eval {windows.shape[0]} x {windows.shape[1]} "
              f"of {Path(args.text).name}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        print()
        heads = "".join(f" {h} |" for h, _ in extra_columns)
        print(f"| method |{heads} ppl | Δppl vs float | KL vs float | top-1 | quantize wall time "
              f"| time / llm-compressor | quantize CPU time | {args.bits}-bit grid check | status |")
        print("|---|" + "---|" * len(extra_columns) + "---|---|---|---|---|---|---|---|---|")
        for r in rows:
            g = r.get("grid")
            grid = "–" if g is None else (f"{g['on_grid']}/{g['linears']} ok (≤{g['max_distinct_per_group']} values/group)"
                                          if g["ok"] else f"{g['on_grid']}/{g['linears']} OFF GRID")
            ppl = r.get("ppl")
            cells = "".join(f" {fn(r)} |" for _, fn in extra_columns)
            print(f"| {r['method']} |{cells} {_fmt(ppl, '.2f')} "
                  f"| {_fmt(r.get('delta_ppl'), '+.2f') if r is not rows[0] else '–'} "
                  f"| {_fmt(r.get('kl'), '.4f') if r is not rows[0] else '–'} | {_fmt(r.get('top1_agreement'), '.3f')} "
                  f"| {_fmt(r.get('quant_seconds'), '.1f')}{' s' if r.get('quant_seconds') is not None else ''} "
                  f"| {_fmt(r.get('time_vs_llmcompressor'), '.2f')}{'x' if r.get('time_vs_llmcompressor') else ''} "
                  f"| {_fmt(r.get('quant_cpu_seconds'), '.1f')}{' s' if r.get('quant_cpu_seconds') is not None else ''} "
                  f"| {grid} | {r['status']} |")
        print()
        print(f"Wall time: {timing}. CPU time: summed over that process's threads over the same span (wall time "
              "well above CPU time / threads means it waited for a core).")
        for r in rows:
            for n in r.get("notes", []):
                print(f"- {r['method']}: {n}")

        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "model": args.model, "model_path": str(self.src), "bits": args.bits, "group_size": args.group_size,
                "symmetric": symmetric,
                **(extra_json or {}),
                "calibration": {"file": str(args.calib), "n_samples": int(samples.shape[0]),
                                "seqlen": int(samples.shape[1]), "seed": self.calib.seed, "ids_sha256": self.ids_sha,
                                "tokenize_seconds": self.tokenize_s},
                "eval": {"text": str(args.text), "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                         "bos": self.bos},
                "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "torch": torch.__version__},
                "rows": rows,
            }, indent=2, default=str))
            self.say(f"wrote {args.json}")
        if not args.keep_work and not args.work_dir:
            if any(r["status"].startswith("failed") for r in rows):
                self.say(f"kept {self.work} for the logs of the failed peers")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
