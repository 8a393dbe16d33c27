"""Peer side of bench/gptq_peers.py: GPTQ with llm-compressor 0.14.0.1, run in its own venv.

    PEER_PYTHON -P bench/peers/llmc_gptq.py --model DIR --samples S.safetensors --bits 4 --group-size 64 --out OUT \
        [--damp 0.01] [--sym] [--act-order]

Runs `oneshot` with llm-compressor's GPTQModifier (int weights per group, every Linear but lm_head, block
size 128) on the very calibration token windows the main script wrote, and writes OUT/model.safetensors
and OUT/result.json (see peer_side.py).

How its GPTQ differs from the textbook one (and from GPTQModel's), as this version does it:
- scales and zero points come from its min-max observer on the float weights before the column sweep,
  not from the error-updated columns as each group is reached;
- all Linears of a decoder layer are calibrated on that layer's inputs, then compressed together (no
  true-sequential order inside the layer);
- act-order: only "weight" (alias "static") exists for GPTQ, columns quantized in descending Hessian
  diagonal order with the groups kept as runs of consecutive inputs (static groups); its default, so
  without --act-order the modifier is given actorder=None explicitly.

The weights the modifier leaves are already the dequantized values; baking the fake quantization in
again (as llmc_awq.py does) changes them by no more than float rounding, and the result says by how much.

Run with `-P` so bench/peers/venv.py cannot shadow the standard library's `venv`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # after the standard library (see peer_side.py)
from peer_side import llmc_dense, llmc_oneshot, llmc_versions, load_calibration, logger, peer_args, save_outputs  # noqa: E402

log = logger("llmcompressor")
BLOCK_SIZE = 128


def gptq_options(ap) -> None:
    ap.add_argument("--damp", type=float, default=None, help="dampening_frac (default: llm-compressor's, 0.01)")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--act-order", action="store_true", help='actorder="weight" (static groups)')


def main() -> None:
    args = peer_args(gptq_options)
    notes = []
    ids = load_calibration(args.samples, log, args.samples_sha256)
    n, seqlen = ids.shape
    actorder = "weight" if args.act_order else None
    modifier = {}

    def recipe() -> list:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.gptq import GPTQModifier

        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                                   group_size=args.group_size, dynamic=False)
        kw = {} if args.damp is None else {"dampening_frac": args.damp}
        gptq = GPTQModifier(config_groups={"g0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head"], actorder=actorder, block_size=BLOCK_SIZE, **kw)
        modifier["dampening_frac"] = gptq.dampening_frac
        return [gptq]

    model, quant_seconds, quant_cpu_seconds = llmc_oneshot(
        args.model, ids, recipe, f"GPTQ W{args.bits} g{args.group_size} {'sym' if args.sym else 'asym'} "
        f"actorder {actorder}", log, notes)
    tensors, n_quant, max_change = llmc_dense(model, log)
    notes.append(f"re-applying its fake quantization moved the GPTQ weights by at most {max_change:.2e}")
    save_outputs(args.out, tensors, log, peer="llmcompressor", seconds=quant_seconds, cpu_seconds=quant_cpu_seconds,
                 quantized_linears=n_quant, versions=llmc_versions(), notes=notes,
                 config={"bits": args.bits, "group_size": args.group_size, "symmetric": args.sym,
                         "dampening_frac": modifier["dampening_frac"], "actorder": actorder,
                         "block_size": BLOCK_SIZE, "observer": "minmax (default)", "ignore": ["lm_head"],
                         "calibration": [int(n), int(seqlen)]})


if __name__ == "__main__":
    main()
