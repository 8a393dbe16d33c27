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
import sys
from pathlib import Path

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers.common import Peer, PeerBench, add_common_args, chosen_methods  # noqa: E402

# The autoawq venv is shared with another benchmark: its name and requirement list must stay exactly these.
PEERS = {
    "llmcompressor": Peer("llm-compressor 0.14.0.1 AWQ", "llmcompressor", ("llmcompressor==0.14.0.1",), "llmc_awq.py"),
    "autoawq": Peer("AutoAWQ 0.2.9", "autoawq", ("autoawq==0.2.9",), "autoawq_awq.py"),
}
ALL_METHODS = ("lowbit", *PEERS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, ALL_METHODS)
    ap.add_argument("--autoawq-stock", action="store_true",
                    help="run AutoAWQ unmodified (with its CPU scale-search bug; see bench/peers/autoawq_awq.py)")
    args = ap.parse_args()
    methods = chosen_methods(ap, args, ALL_METHODS)

    bench = PeerBench("awq_peers", args)
    for method in methods:
        if method == "lowbit":
            bench.lowbit_row(
                f"lowbit {lowbit.__version__} w4a16-awq" if args.bits == 4 else f"lowbit {lowbit.__version__} AWQ W{args.bits}",
                f"quantize w4a16-awq W{args.bits} g{args.group_size}",
                lambda model: lowbit.quantize(model, "w4a16-awq", calib=bench.calib,
                                              group_size=args.group_size, bits=args.bits),
                notes=[f"quantize time includes tokenizing the calibration text (~{bench.tokenize_s:.1f} s)"])
        elif method == "autoawq":
            peer = PEERS[method]
            bench.peer_row(method, peer, ["--stock"] if args.autoawq_stock else [],
                           label=peer.label + (" (stock)" if args.autoawq_stock else " (+ CPU snapshot fix)"))
        else:
            bench.peer_row(method, PEERS[method])
    bench.report("asymmetric", symmetric=False)


if __name__ == "__main__":
    main()
