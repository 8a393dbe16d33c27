"""W8A8 side by side: lowbit's SmoothQuant O1 and LLM.int8() presets next to the peers' W8A8, in one run.

One reference model, one set of WikiText-2 test windows (40 x 512 by default) and one set of calibration
token ids (64 random 512-token slices of wiki.valid.tokens, cut once, handed to lowbit as a tensor and to
the calibrated peer as a file with its SHA-256):

- lowbit `w8a8-sq-o1`, `w8a8-llm-int8` (on rotated inputs), `w8a8-llm-int8-paper` (as published: the
  like-for-like row for bitsandbytes) and `w8a8-llm-int8-gptq`, quantized here, saved in lowbit's format and reloaded;
- llm-compressor 0.14.0.1: SmoothQuant (strength 0.5) + GPTQ with the scheme it ships as "W8A8"
  (int8 weights per channel, int8 activations per token, dynamic), in its own venv;
- bitsandbytes 0.50.2 LLM.int8() (threshold 6.0) and torchao 0.18.0
  `Int8DynamicActivationInt8WeightConfig`, in theirs.

The peers are quantized and scored inside their venvs by lowbit's own evaluation code on the very same
windows (bench/peers/in_venv.py, the machinery bench/peers.py uses); lowbit's rows are scored here by
bench/measure.py. Every row: perplexity, KL divergence and top-1 agreement against the float model. The
last table gives, per peer, lowbit's perplexity increase over float divided by the peer's (the issue's
target: <= 0.5).

    python bench/w8a8_peers.py [--model smollm2-135m] [--windows 40] [--calib-samples 64]
        [--lowbit w8a8-sq-o1,w8a8-llm-int8,w8a8-llm-int8-paper,w8a8-llm-int8-gptq] [--peers llmc-w8a8,bnb-int8,torchao-w8a8] [--threads 1]
        [--json bench/out/w8a8_peers.json]
    python bench/w8a8_peers.py --merge a.json,b.json,... [--json merged.json]

A whole run (llm-compressor alone quantizes for about 9 minutes at one thread) can be split into one
process per row (`--lowbit w8a8-sq-o1 --peers ""`, `--lowbit "" --peers llmc-w8a8`, ...), each with
its own `--json`; `--merge` then checks that they scored the same model, windows and calibration ids
and prints the one table, float taken from the first.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval import bits_per_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import REPO, WIKI_TEST, WIKI_VALID, load_reference, quality, write_json  # noqa: E402

LOWBIT_PRESETS = ("w8a8-sq-o1", "w8a8-llm-int8", "w8a8-llm-int8-paper", "w8a8-llm-int8-gptq")
PEERS = ("llmc-w8a8", "bnb-int8", "torchao-w8a8")


def peers_script():
    """bench/peers.py as a module (the name bench.peers is the package of peer scripts beside it)."""
    spec = importlib.util.spec_from_file_location("bench_peers_script", REPO / "bench" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lowbit_row(preset: str, ref, samples: torch.Tensor, out_dir: Path) -> dict:
    # a preset name, or a recipe .yaml (a variant of one), whose row is named by its file stem
    name = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    row = {"method": f"lowbit {name}", "key": name, "kind": "lowbit", "status": "ok", "notes": []}
    try:
        model = lowbit.load(ref.src)
        t0 = time.perf_counter()
        q = lowbit.quantize(model, preset, calib=samples, progress=False)
        row["quant_seconds"] = time.perf_counter() - t0
        path = lowbit.save(q, out_dir / name, tokenizer=ref.fp.lowbit_tokenizer, overwrite=True)
        del q, model
        q = lowbit.load(path)  # what a user gets back from disk
        row["bits_per_weight"] = bits_per_weight(q)["bits_per_weight"]
        row.update(quality(q, ref))
    except Exception as e:  # noqa: BLE001 - a failed row says why, the others still run
        row["status"] = f"failed: {type(e).__name__}: {e}"[:300]
    return row


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def tables(rows: list[dict], float_ppl: float) -> str:
    lines = ["| method | bits/weight | ppl | Δppl | Δppl % | KL | top-1 | quant s | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        d = None if r.get("ppl") is None else r["ppl"] - float_ppl
        lines.append(f"| {r['method']} | {fmt(r.get('bits_per_weight'), '.2f')} | {fmt(r.get('ppl'), '.3f')} | "
                     f"{fmt(d, '+.3f')} | {fmt(None if d is None else 100 * d / float_ppl, '+.2f')} | "
                     f"{fmt(r.get('kl'), '.4f')} | {fmt(r.get('top1_agreement'), '.3f')} | "
                     f"{fmt(r.get('quant_seconds'), '.1f')} | {r.get('status', 'ok')} |")
    ours = [r for r in rows if r.get("kind") == "lowbit" and r.get("ppl") is not None]
    peers = [r for r in rows if r.get("kind") == "peer" and r.get("ppl") is not None]
    if ours and peers:
        lines += ["", "lowbit's perplexity increase / the peer's (target <= 0.5):", "",
                  "| lowbit | " + " | ".join(p["method"] for p in peers) + " |",
                  "|---|" + "---:|" * len(peers)]
        for o in ours:
            cells = []
            for p in peers:
                dp = p["ppl"] - float_ppl
                cells.append(f"{(o['ppl'] - float_ppl) / dp:.2f}x" if dp > 0 else "– (peer not above float)")
            lines.append(f"| {o['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(paths: list[str], out: str | None) -> None:
    """One table from the JSONs of split runs, which must agree on what they scored."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    same = ("model", "windows", "seqlen")
    for p, r in zip(paths[1:], runs[1:]):
        for k in same:
            if r[k] != runs[0][k]:
                raise SystemExit(f"--merge: {p} has {k} {r[k]!r}, {paths[0]} {runs[0][k]!r}")
        if r["calibration"]["ids_sha256"] != runs[0]["calibration"]["ids_sha256"]:
            raise SystemExit(f"--merge: {p} was calibrated on other token ids than {paths[0]}")
        f0, f1 = runs[0]["rows"][0]["ppl"], r["rows"][0]["ppl"]
        # the same float model on the same windows; float32 sums differ in their last bits with the thread
        # count and with whether the float logits came from a --ref-logits file (9e-6 seen)
        if abs(f0 - f1) > 1e-4 * f0:
            raise SystemExit(f"--merge: float ppl {f1} in {p} against {f0} in {paths[0]}")
    rows = [runs[0]["rows"][0]] + [row for r in runs for row in r["rows"][1:]]
    payload = {**{k: runs[0][k] for k in (*same, "calibration")}, "merged_from": paths,
               "threads": sorted({r["threads"] for r in runs}), "rows": rows}
    payload["markdown"] = tables(rows, rows[0]["ppl"])
    if out:
        write_json(out, payload)
    print(payload["markdown"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(WIKI_TEST))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default=str(WIKI_VALID))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--lowbit", default=",".join(LOWBIT_PRESETS),
                    help="comma-separated lowbit presets or recipe .yaml files")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the peers")
    ap.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds per peer process")
    ap.add_argument("--work-dir", default=None, help="peer logs and outputs (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "w8a8_peers"), help="lowbit checkpoints")
    ap.add_argument("--ref-logits", default=None, metavar="FILE",
                    help="keep the float model's logits on the windows in FILE (SmolLM2 40 x 512: 4 GB; Gemma-3: "
                         "21 GB) for later runs on the same windows, which then skip the float forward")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", default=None, help="comma-separated JSONs of split runs: print their one table")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge.split(","), args.json)
    presets = [p for p in args.lowbit.split(",") if p]
    peers = [p for p in args.peers.split(",") if p]
    if unknown := [p for p in peers if p not in PEERS]:
        ap.error(f"--peers: unknown {unknown}; choose from {', '.join(PEERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the peers inherit it
    torch.manual_seed(0)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lowbit-w8a8-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[w8a8-peers] work dir {work} (peer logs)", flush=True)

    ref = load_reference(args.model, args.text, args.windows, args.seqlen)
    ref.logits_path = args.ref_logits
    from safetensors.torch import save_file

    samples = lowbit.calib.text_file(args.calib, n_samples=args.calib_samples, seqlen=512).samples(
        ref.fp.lowbit_tokenizer)
    ids_sha = hashlib.sha256(samples.numpy().tobytes()).hexdigest()
    windows_file, samples_file = work / "windows.safetensors", work / "calib_ids.safetensors"
    save_file({"input_ids": ref.windows.contiguous()}, str(windows_file))
    save_file({"input_ids": samples.contiguous()}, str(samples_file))
    print(f"[w8a8-peers] calibration {tuple(samples.shape)} ids sha256 {ids_sha[:12]}", flush=True)

    rows = [{"method": "float (fp32)", "key": "float", "kind": "float", "status": "ok", "bits_per_weight": 32.0,
             **quality(ref.fp, ref)}]
    float_ppl = rows[0]["ppl"]
    print(f"[w8a8-peers] float ppl {float_ppl:.3f}", flush=True)
    payload = {"model": args.model, "windows": int(ref.windows.shape[0]), "seqlen": int(ref.windows.shape[1]),
               "calibration": {"file": args.calib, "n_samples": int(samples.shape[0]),
                               "seqlen": int(samples.shape[1]), "ids_sha256": ids_sha},
               "threads": torch.get_num_threads(), "rows": rows}

    def save() -> None:
        if args.json:
            write_json(args.json, payload)

    for preset in presets:
        row = lowbit_row(preset, ref, samples, Path(args.out) / args.model)
        rows.append(row)
        print(f"[w8a8-peers] {row['method']}: {row['status']}"
              + (f", ppl {row['ppl']:.3f}, KL {row['kl']:.4f}" if row.get("ppl") else ""), flush=True)
        save()

    ps = peers_script()
    peer_args = argparse.Namespace(src=ref.src, group_size=64, new_tokens=0, no_speed=True,
                                   peer_timeout=args.peer_timeout)
    for name in peers:
        row = ps.in_venv_row(name, peer_args, work, windows_file, samples_file, ids_sha)
        rows.append(row)
        print(f"[w8a8-peers] {name}: {row['status']}" + (f", ppl {row['ppl']:.3f}" if row.get("ppl") else ""),
              flush=True)
        save()

    text = tables(rows, float_ppl)
    payload["markdown"] = text
    save()
    print(f"\n{args.model}, WikiText-2 test {ref.windows.shape[0]} x {ref.windows.shape[1]}; calibration "
          f"{samples.shape[0]} x {samples.shape[1]} of {Path(args.calib).name} (same ids for every calibrated "
          f"method); KL and top-1 against the float model; torch threads {torch.get_num_threads()}\n")
    print(text)


if __name__ == "__main__":
    main()
