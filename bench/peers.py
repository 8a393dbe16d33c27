"""The peers that run on this machine, on the same model, data and settings as bench/methods.py, as rows
of the same table.

Two kinds of peer, each in its own venv (created or reused by bench/peers/setup.sh, torch pinned):

- quantized in memory and scored inside their venv by lowbit's own evaluation code on the very windows
  this script cut (bench/peers/in_venv.py): bitsandbytes nf4 and LLM.int8(), torchao int4 weight-only and
  int8 dynamic activations + weights, optimum-quanto qint4 and W8A8, hqq W4. These give every column,
  speed and memory included (what the peer's own kernels do on this CPU).
- calibrated weight-only peers, through the runners bench/awq_peers.py and bench/gptq_peers.py use
  (bench/peers/common.py): llm-compressor GPTQ and AWQ, GPTQModel, AutoAWQ. They hand back dense
  dequantized weights, checked to lie on the W4 g64 grid and scored here: ppl, KL, top-1 and quantize
  time, no speed (their dense weights would run at float speed).

A peer that fails gets a row with its error.

    python bench/peers.py [--model smollm2-135m] [--peers bnb-nf4,bnb-int8,...] [--windows 40]
        [--calib-samples 8] [--group-size 64] [--results bench/out/methods/results.json] [--markdown FILE]

`--results` appends the peer rows to a bench/methods.py results.json (replacing earlier rows of the same
peers) and rewrites the results.md beside it, so the lowbit presets and the peers form one table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import (REPO, WIKI_TEST, WIKI_VALID, load_reference, measure, results_markdown,  # noqa: E402
                           write_json)
from bench.peers.common import Peer, PeerBench, add_common_args, failure_reason, run_peer  # noqa: E402

PEERS_DIR = REPO / "bench" / "peers"

# name -> (row label, venv); scored inside the venv by bench/peers/in_venv.py
IN_VENV = {
    "bnb-nf4": ("bitsandbytes 0.50.2 nf4 (blocks of 64)", "bitsandbytes"),
    "bnb-int8": ("bitsandbytes 0.50.2 LLM.int8() (threshold 6)", "bitsandbytes"),
    "torchao-int4": ("torchao 0.18.0 int4 weight-only g{g} (bf16)", "torchao"),
    "torchao-w8a8": ("torchao 0.18.0 int8 dynamic act + int8 weight", "torchao"),
    "quanto-w4": ("optimum-quanto 0.2.7 qint4 weights", "quanto"),
    "quanto-w8a8": ("optimum-quanto 0.2.7 qint8 weights + static qint8 act", "quanto"),
    "hqq-w4": ("hqq 0.2.8 W4 g{g} (fp32 meta)", "hqq"),
    "llmc-w8a8": ("llm-compressor 0.14.0.1 SmoothQuant 0.5 + GPTQ W8A8", "llmcompressor"),
}
# name -> (runner, extra args); dense weights scored here. The Peer tuples must match the other
# benchmarks' and setup.sh's spelling of these venvs.
DENSE = {
    "llmc-gptq": (Peer("llm-compressor 0.14.0.1 GPTQ W4 g{g}", "llmcompressor", ("llmcompressor==0.14.0.1",),
                       "llmc_gptq.py"), []),
    "llmc-awq": (Peer("llm-compressor 0.14.0.1 AWQ W4 g{g}", "llmcompressor", ("llmcompressor==0.14.0.1",),
                      "llmc_awq.py"), []),
    "gptqmodel": (Peer("GPTQModel 7.6.0 GPTQ W4 g{g}", "gptqmodel", ("gptqmodel==7.6.0",), "gptqmodel_gptq.py"), []),
    "autoawq": (Peer("AutoAWQ 0.2.9 W4 g{g} (+ CPU snapshot fix)", "autoawq", ("autoawq==0.2.9",), "autoawq_awq.py"),
                []),
}
ALL = (*IN_VENV, *DENSE)
# make bench's quick set: the calibration-free peers (each installs in a few minutes) and
# llm-compressor's GPTQ; AutoAWQ takes 10+ minutes to quantize SmolLM2 on 2 cores
QUICK = ("bnb-nf4", "bnb-int8", "torchao-int4", "torchao-w8a8", "quanto-w4", "quanto-w8a8", "hqq-w4", "llmc-gptq")


def setup_venv(venv: str) -> Path:
    """bench/peers/setup.sh VENV: the venv's python (created on first use)."""
    proc = subprocess.run(["bash", str(PEERS_DIR / "setup.sh"), venv], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/peers/setup.sh {venv} failed (exit {proc.returncode})")
    return Path(proc.stdout.strip().splitlines()[-1])


def in_venv_row(name: str, args, work: Path, windows_file: Path, samples_file: Path, ids_sha: str) -> dict:
    label, venv = IN_VENV[name]
    row = {"method": label.format(g=args.group_size), "key": name, "kind": "peer", "status": "ok", "notes": []}
    try:
        python = setup_venv(venv)
        out = work / name
        cmd = [str(python), "-P", str(PEERS_DIR / "in_venv.py"), "--method", name, "--model", str(args.src),
               "--windows", str(windows_file), "--samples", str(samples_file), "--samples-sha256", ids_sha,
               "--group-size", str(args.group_size), "--out", str(out), "--new-tokens", str(args.new_tokens),
               *(["--no-speed"] if args.no_speed else [])]
        print(f"[peers] {name}: {python}", flush=True)
        rc, tail = run_peer(cmd, work / f"{name}.log", args.peer_timeout)
        if rc != 0 or not (out / "result.json").is_file():
            row["status"] = f"failed (exit {rc}): {tail if rc == 124 else failure_reason(tail)}"
            return row
        res = json.loads((out / "result.json").read_text())
        row["notes"] += res.pop("notes", [])
        row.update(res)
        row["method"] = label.format(g=args.group_size)
    except Exception as e:  # noqa: BLE001 - a failed peer is a row
        row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
    return row


def dense_rows(names: list[str], args, work: Path) -> list[dict]:
    """The calibrated peers through PeerBench (its own float evaluation and calibration ids)."""
    ns = argparse.ArgumentParser()
    add_common_args(ns, tuple(DENSE))
    ns = ns.parse_args([])
    ns.model, ns.windows, ns.text, ns.eval_seqlen = args.model, args.windows, args.text, args.seqlen
    ns.n_samples, ns.calib, ns.group_size, ns.bits = args.calib_samples, args.calib, args.group_size, 4
    ns.work_dir, ns.peer_timeout, ns.threads = str(work / "dense"), args.peer_timeout, args.threads
    rows = []
    bench = PeerBench("peers", ns)
    for name in names:
        peer, extra = DENSE[name]
        try:
            setup_venv(peer.venv)
        except Exception as e:  # noqa: BLE001
            rows.append({"method": peer.label.format(g=args.group_size), "key": name, "kind": "peer",
                         "status": f"failed: {e}"})
            continue
        r = bench.peer_row(name, peer, extra, label=peer.label.format(g=args.group_size))
        r.update(key=name, kind="peer")
        rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="zoo name or HF checkpoint directory")
    ap.add_argument("--peers", default=",".join(QUICK), help=f"comma-separated, of {', '.join(ALL)}; 'all' for every one")
    ap.add_argument("--text", default=str(WIKI_TEST))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default=str(WIKI_VALID))
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds per peer process")
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the peers")
    ap.add_argument("--results", default=None, help="a bench/methods.py results.json to add the rows to")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "peers"), help="results.json/.md without --results")
    ap.add_argument("--markdown", default=None, help="also write the table here (e.g. bench/RESULTS.md)")
    ap.add_argument("--work-dir", default=None, help="peer logs and outputs (default: a temp dir)")
    args = ap.parse_args(argv)
    names = list(ALL) if args.peers == "all" else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(ALL)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the peers inherit it
    torch.manual_seed(0)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lowbit-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[peers] work dir {work} (logs)", flush=True)

    ref = load_reference(args.model, args.text, args.windows, args.seqlen)
    args.src = ref.src
    from safetensors.torch import save_file

    windows_file, samples_file = work / "windows.safetensors", work / "calib_ids.safetensors"
    save_file({"input_ids": ref.windows.contiguous()}, str(windows_file))
    samples = lowbit.calib.text_file(args.calib, n_samples=args.calib_samples).samples(ref.fp.lowbit_tokenizer)
    save_file({"input_ids": samples.contiguous()}, str(samples_file))
    ids_sha = hashlib.sha256(samples.numpy().tobytes()).hexdigest()

    if args.results:
        path = Path(args.results)
        payload = json.loads(path.read_text())
        payload["rows"] = [r for r in payload["rows"] if r.get("key") not in names]
    else:
        path = Path(args.out) / "results.json"
        payload = {"model": args.model, "model_path": str(ref.src), "windows": int(ref.windows.shape[0]),
                   "seqlen": int(ref.windows.shape[1]), "bos": ref.bos, "text": str(args.text),
                   "rows": [{"method": "float (fp32)", "key": "float", "status": "ok", "quant_seconds": 0.0,
                             **measure(ref.fp, ref, ref.src, "none" if args.no_speed else "subprocess",
                                       args.new_tokens)}]}
    payload["peers"] = {"calibration": {"file": str(args.calib), "n_samples": int(samples.shape[0]),
                                        "seqlen": int(samples.shape[1]), "ids_sha256": ids_sha},
                        "group_size": args.group_size, "machine": {"platform": platform.platform(),
                                                                   "torch_threads": torch.get_num_threads()}}

    def save() -> str:  # after every peer: a long run stopped early keeps what it measured
        write_json(path, payload)
        text = results_markdown(payload)
        path.with_suffix(".md").write_text(text)
        if args.markdown:
            Path(args.markdown).write_text(text)
        return text

    for name in [n for n in names if n in IN_VENV]:
        row = in_venv_row(name, args, work, windows_file, samples_file, ids_sha)
        print(f"[peers] {name}: {row['status']}" + (f", ppl {row['ppl']:.3f}" if row.get("ppl") else ""), flush=True)
        payload["rows"].append(row)
        save()
    dense = [n for n in names if n in DENSE]
    if dense:
        payload["rows"] += dense_rows(dense, args, work)
    text = save()
    print("\n" + text)
    print(f"wrote {path}" + (f" and {args.markdown}" if args.markdown else ""))


if __name__ == "__main__":
    main()
