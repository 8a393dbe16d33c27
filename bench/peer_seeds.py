"""Peer benchmark runs at several calibration seeds, side by side: one row per method, its Δppl at each
seed, the mean, and its ratio to a reference method's (the ratio of the means and the range of the
per-seed ratios).

One run compares the methods on one draw of calibration windows, and on SmolLM2 W4 g64 8 x 512 the
ratio of lowbit's AWQ increase to llm-compressor's moved from 0.71x to 0.99x between draws; this
says how much of a one-run ratio is the draw.

    python bench/awq_peers.py ... --calib-seed S --json bench/out/awq_peers_seedS.json   (per seed)
    python bench/peer_seeds.py bench/out/awq_peers_seed*.json [--reference llm-compressor]

Several files may hold one seed (lowbit rerun alone beside an older run with the peers): a method's
row in a later file replaces its row from an earlier one, and the script prints which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="JSON outputs of one peer benchmark at different seeds")
    ap.add_argument("--reference", default="llm-compressor", help="the method (name prefix) ratios are taken to")
    args = ap.parse_args()

    runs = [(f, json.loads(f.read_text())) for f in args.files]
    keys = {(r["model"], r["bits"], r["group_size"], r["calibration"]["n_samples"], r["calibration"]["seqlen"])
            for _, r in runs}
    if len(keys) != 1:
        raise SystemExit(f"the files are not runs of one setting: {sorted(keys)}")
    seeds = sorted({r["calibration"]["seed"] for _, r in runs})
    # A method may come from several files at one seed (a rerun of lowbit alone beside an older run
    # with the peers): the later file on the command line wins, and says so.
    delta: dict[str, dict[int, float]] = {}
    source: dict[tuple[str, int], Path] = {}
    for f, run in runs:
        seed = run["calibration"]["seed"]
        for row in run["rows"]:
            if row.get("status") == "ok" and row.get("delta_ppl") and row["method"] != "float (fp32)":
                if (row["method"], seed) in source:
                    print(f"seed {seed}: {row['method']} from {f} replaces {source[row['method'], seed]}")
                delta.setdefault(row["method"], {})[seed] = row["delta_ppl"]
                source[row["method"], seed] = f
    ref = [m for m in delta if m.startswith(args.reference)]
    if len(ref) != 1:
        raise SystemExit(f"--reference {args.reference!r} matches {ref or 'no method'} of {list(delta)}")
    ref = ref[0]

    print(f"Δppl by calibration seed ({keys.pop()}); ratios to {ref}\n")
    print("| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | ratio of means | per-seed ratios |")
    print("|---|" + "---:|" * (len(seeds) + 3))
    for method, d in delta.items():
        if set(d) != set(seeds):
            print(f"| {method} | missing seeds {sorted(set(seeds) - set(d))} |")
            continue
        mean = sum(d.values()) / len(d)
        ref_mean = sum(delta[ref].values()) / len(seeds)
        ratios = [d[s] / delta[ref][s] for s in seeds if s in delta[ref]]
        print(f"| {method} | " + " | ".join(f"{d[s]:+.3f}" for s in seeds) + f" | {mean:+.3f} | "
              f"{mean / ref_mean:.3f}x | {min(ratios):.3f}-{max(ratios):.3f}x |")


if __name__ == "__main__":
    main()
