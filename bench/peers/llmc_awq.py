"""Peer side of bench/awq_peers.py: AWQ with llm-compressor, run in its own venv.

    PEER_PYTHON -P bench/peers/llmc_awq.py --model DIR --samples S.safetensors --bits 4 --group-size 64 --out OUT

Reads the calibration token windows the main script wrote (the very ids lowbit calibrates on), runs
`oneshot` with llm-compressor's AWQ transform followed by its QuantizationModifier (int weights,
asymmetric, per group, every Linear but lm_head), and writes

    OUT/model.safetensors   every float parameter of the model, Linear weights replaced by their
                            dequantized (fake-quantized) values
    OUT/result.json         quantization wall time (the `oneshot` call only, model load excluded),
                            versions, notes

Run with `-P` so bench/peers/venv.py cannot shadow the standard library's `venv`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(f"[llmcompressor] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from safetensors.torch import load_file, save_file

    notes = []
    # CPU only: the sequential pipeline pins cached activations for async host-to-device copies,
    # which needs an accelerator. Nothing is copied anywhere here, so pinning is skipped.
    if not torch.cuda.is_available():
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
        notes.append("IntermediatesCache._pin_intermediate patched to a no-op (CPU)")

    ids = load_file(args.samples)["input_ids"].long()
    n, seqlen = ids.shape
    log(f"calibration: {n} x {seqlen} tokens (from {args.samples})")
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    log(f"loading {args.model}")
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                               group_size=args.group_size, dynamic=False)
    recipe = [
        AWQModifier(),  # defaults: mappings by architecture, duo_scaling=True, n_grid=20
        QuantizationModifier(config_groups={"g0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=["lm_head"]),
    ]

    log(f"oneshot AWQ W{args.bits} g{args.group_size} asym (llmcompressor {llmcompressor.__version__})")
    t0, c0 = time.perf_counter(), time.process_time()
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
                    max_seq_length=seqlen, shuffle_calibration_samples=False, batch_size=1)
    quant_seconds = time.perf_counter() - t0
    quant_cpu_seconds = time.process_time() - c0
    log(f"oneshot done in {quant_seconds:.1f} s (CPU time {quant_cpu_seconds:.1f} s)")

    # The modules keep float weights plus weight_scale / weight_zero_point and quantize on the fly in
    # forward; bake the quantize-dequantize into the weights so any plain model reproduces them.
    quant_params = set()
    n_quant = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            zp = getattr(module, "weight_zero_point", None)
            deq = fake_quantize(module.weight.data.float(), module.weight_scale.data, zp.data if zp is not None
                                else None, scheme.weights)
            module.weight.data.copy_(deq.to(module.weight.dtype))
            n_quant += 1
            for pname, _ in module.named_parameters(recurse=False):
                if pname != "weight" and pname != "bias":
                    quant_params.add(f"{name}.{pname}" if name else pname)
    log(f"baked fake quantization into {n_quant} Linear weights")

    tensors = {}
    for pname, p in model.named_parameters():  # tied parameters appear once
        if pname in quant_params:
            continue
        tensors[pname] = p.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"))

    result = {
        "peer": "llmcompressor",
        "quant_seconds": quant_seconds,
        "quant_cpu_seconds": quant_cpu_seconds,  # all threads of the process
        "quantized_linears": n_quant,
        "versions": {"llmcompressor": llmcompressor.__version__,
                     "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "config": {"bits": args.bits, "group_size": args.group_size, "symmetric": False,
                   "awq": {"duo_scaling": True, "n_grid": 20}, "ignore": ["lm_head"],
                   "calibration": [int(n), int(seqlen)]},
        "notes": notes,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
