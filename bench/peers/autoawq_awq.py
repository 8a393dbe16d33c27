"""Peer side of bench/awq_peers.py: AWQ with AutoAWQ 0.2.9, run in its own venv.

    PEER_PYTHON -P bench/peers/autoawq_awq.py --model DIR --samples S.safetensors --bits 4 --group-size 64 \
        --out OUT [--stock]

Quantizes with AutoAWQ's own search (scale grid, clip grid, zero point, GEMM packing) on the very
calibration token windows the main script wrote, then unpacks every WQLinear_GEMM back to a dense
weight and writes

    OUT/model.safetensors   every float parameter of the model, Linear weights replaced by their
                            dequantized values (what AutoAWQ's own dequantize kernel computes)
    OUT/result.json         quantization wall time (the `quantize` call only, model load excluded),
                            versions, notes

CPU bug and its fix. `AwqQuantizer._compute_best_scale` snapshots the block's weights with
`{k: v.cpu() for k, v in state_dict().items()}` and later multiplies the live weights in place. On a
GPU `.cpu()` copies; on CPU it returns the same storage, so the snapshot is scaled along with the
weights, the restore after each grid point brings back W*s instead of W, and the scales pile up over
the 20 grid points. The folded model then no longer computes the float function (on SmolLM2, two
blocks of scale folding alone move the logits by ~25). Unless `--stock` is given, the snapshot is made
with real copies (the only change; the search itself is AutoAWQ's). `--stock` runs it unmodified.

Run with `-P` so bench/peers/venv.py cannot shadow the standard library's `venv`; the helpers shared
with the other peer scripts come from bench/peers/peer_side.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # after the standard library (see peer_side.py)
from peer_side import load_calibration, logger, peer_args, save_outputs, timed  # noqa: E402

log = logger("autoawq")


def main() -> None:
    args = peer_args(lambda ap: ap.add_argument(
        "--stock", action="store_true", help="run AutoAWQ unmodified (keeps its CPU aliasing bug)"))

    import awq
    import transformers
    from awq import AutoAWQForCausalLM
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.packing_utils import dequantize_gemm

    notes = []

    class CopySnapshotQuantizer(AwqQuantizer):
        """AwqQuantizer whose scale search snapshots the block with copies (see the module docstring)."""

        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
            state_dict = module2inspect.state_dict

            def copied_state_dict(*a, **k):
                return {name: t.clone() for name, t in state_dict(*a, **k).items()}

            module2inspect.state_dict = copied_state_dict  # instance attribute, shadows the method
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, linears2scale,
                                                   fp16_output, kwargs)
            finally:
                del module2inspect.state_dict

    quantizer_cls = AwqQuantizer
    if args.stock:
        notes.append("stock AutoAWQ (CPU state-restore aliasing bug left in)")
    elif not torch.cuda.is_available():
        quantizer_cls = CopySnapshotQuantizer
        notes.append("scale-search snapshot made with copies (fixes CPU aliasing bug in _compute_best_scale)")

    ids = load_calibration(args.samples, log, args.samples_sha256)
    n, seqlen = ids.shape

    log(f"loading {args.model}")
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = AutoAWQForCausalLM.from_pretrained(args.model)  # dtype from config.json (float32 here)

    quant_config = {"w_bit": args.bits, "q_group_size": args.group_size, "zero_point": True, "version": "GEMM"}
    log(f"quantize {quant_config} (autoawq {awq.__version__}; slow on CPU: several minutes)")
    # A list of token-id lists is taken as is; AutoAWQ concatenates the samples and cuts blocks of
    # max_calib_seq_len, which gives back exactly these n windows.
    _, quant_seconds, quant_cpu_seconds = timed(lambda: model.quantize(
        tok, quant_config=quant_config, calib_data=ids.tolist(), max_calib_samples=n, max_calib_seq_len=seqlen,
        quantizer_cls=quantizer_cls))
    log(f"quantize done in {quant_seconds:.1f} s (CPU time {quant_cpu_seconds:.1f} s)")

    hf = model.model
    tensors = {}
    n_quant = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, WQLinear_GEMM):
                w = dequantize_gemm(module.qweight, module.qzeros, module.scales, module.w_bit, module.group_size)
                tensors[f"{name}.weight"] = w.t().to(torch.float32).contiguous()  # [in, out] -> [out, in]
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias.detach().to(torch.float32).contiguous()
                n_quant += 1
        for pname, p in hf.named_parameters():  # norms, embeddings, lm_head (tied ones once)
            tensors.setdefault(pname, p.detach().to(torch.float32).contiguous().clone())
    log(f"unpacked {n_quant} WQLinear_GEMM modules")
    save_outputs(args.out, tensors, log, peer="autoawq", seconds=quant_seconds, cpu_seconds=quant_cpu_seconds,
                 quantized_linears=n_quant, notes=notes,
                 versions={"autoawq": awq.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
                 config={**quant_config, "calibration": [int(n), int(seqlen)], "stock": bool(args.stock)})


if __name__ == "__main__":
    main()
