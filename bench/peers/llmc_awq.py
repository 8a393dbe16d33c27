"""Peer side of bench/awq_peers.py: AWQ with llm-compressor, run in its own venv.

    PEER_PYTHON -P bench/peers/llmc_awq.py --model DIR --samples S.safetensors --bits 4 --group-size 64 --out OUT

Reads the calibration token windows the main script wrote (the very ids lowbit calibrates on), runs
`oneshot` with llm-compressor's AWQ transform followed by its QuantizationModifier (int weights,
asymmetric, per group, every Linear but lm_head), and writes

    OUT/model.safetensors   every float parameter of the model, Linear weights replaced by their
                            dequantized (fake-quantized) values
    OUT/result.json         quantization wall time (the `oneshot` call only, model load excluded),
                            versions, notes

Run with `-P` so bench/peers/venv.py cannot shadow the standard library's `venv`; the helpers shared
with the other peer scripts come from bench/peers/peer_side.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # after the standard library (see peer_side.py)
from peer_side import llmc_dense, llmc_oneshot, llmc_versions, load_calibration, logger, peer_args, save_outputs  # noqa: E402

log = logger("llmcompressor")


def main() -> None:
    args = peer_args()
    notes = []
    ids = load_calibration(args.samples, log, args.samples_sha256)
    n, seqlen = ids.shape

    def recipe() -> list:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                                   group_size=args.group_size, dynamic=False)
        return [
            AWQModifier(),  # defaults: mappings by architecture, duo_scaling=True, n_grid=20
            QuantizationModifier(config_groups={"g0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                 ignore=["lm_head"]),
        ]

    model, quant_seconds, quant_cpu_seconds = llmc_oneshot(
        args.model, ids, recipe, f"AWQ W{args.bits} g{args.group_size} asym", log, notes)
    tensors, n_quant, _ = llmc_dense(model, log)
    save_outputs(args.out, tensors, log, peer="llmcompressor", seconds=quant_seconds, cpu_seconds=quant_cpu_seconds,
                 quantized_linears=n_quant, versions=llmc_versions(), notes=notes,
                 config={"bits": args.bits, "group_size": args.group_size, "symmetric": False,
                         "awq": {"duo_scaling": True, "n_grid": 20}, "ignore": ["lm_head"],
                         "calibration": [int(n), int(seqlen)]})


if __name__ == "__main__":
    main()
