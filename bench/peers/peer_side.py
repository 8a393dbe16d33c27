"""What the peer scripts in bench/peers/ share. They run inside a peer's own venv (torch, safetensors and
the peer package; not lowbit), started with `python -P`, and import this file by appending its folder
to sys.path (appended, so that bench/peers/venv.py cannot shadow the standard library's `venv`).

The contract with bench/peers/common.py: read `--samples` (the calibration token ids), quantize, and
write into `--out`

    model.safetensors   every float parameter of the model (tied ones once), Linear weights replaced by
                        their dequantized values
    g_idx.safetensors   optional: the group of each input column, per Linear name (needed where
                        groups are not runs of consecutive inputs: act-order)
    result.json         quant_seconds / quant_cpu_seconds (the quantize call only, model load
                        excluded), versions, config, notes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def logger(tag: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log


def peer_args(extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--model --samples --bits --group-size --out, plus what `extra` adds; creates --out."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples-sha256", default=None, help="refuse calibration ids whose SHA-256 differs")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def load_calibration(path: str, log: Callable[[str], None], sha256: str | None = None) -> torch.Tensor:
    """The calibration windows `[n, seqlen]` (int64) the main script cut; with `sha256`, checked to be
    the very ids it hashed."""
    from safetensors.torch import load_file

    ids = load_file(path)["input_ids"].long()
    log(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens (from {path})")
    if sha256 is not None:
        got = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        if got != sha256:
            raise RuntimeError(f"calibration ids in {path} have SHA-256 {got[:12]}, expected {sha256[:12]}")
        log(f"calibration ids SHA-256 {got[:12]} as expected")
    return ids


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """fn()'s result, wall seconds and CPU seconds (all threads of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    return res, time.perf_counter() - t0, time.process_time() - c0


def save_outputs(out: str | Path, tensors: dict[str, torch.Tensor], log: Callable[[str], None], *, peer: str,
                 seconds: float, cpu_seconds: float, quantized_linears: int, versions: dict, config: dict,
                 notes: list[str], g_idx: dict[str, torch.Tensor] | None = None) -> None:
    """Writes OUT/model.safetensors, OUT/result.json and, given `g_idx`, OUT/g_idx.safetensors."""
    from safetensors.torch import save_file

    out = Path(out)
    save_file(tensors, str(out / "model.safetensors"))
    if g_idx:
        save_file({k: v.to(torch.int32).contiguous() for k, v in g_idx.items()}, str(out / "g_idx.safetensors"))
    result = {"peer": peer, "quant_seconds": seconds,
              "quant_cpu_seconds": cpu_seconds,  # all threads of the process
              "quantized_linears": quantized_linears, "versions": versions, "config": config, "notes": notes}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")


# ---------------------------------------------------------------------------------------------- llm-compressor


def llmc_oneshot(model_dir: str, ids: torch.Tensor, recipe_fn: Callable[[], list], what: str,
                 log: Callable[[str], None], notes: list[str]):
    """Loads the model (fp32) and runs llm-compressor's `oneshot` with `recipe_fn()` on the calibration
    windows `ids`, in order, one per batch. Returns (model, wall seconds, CPU seconds) of `oneshot`."""
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    # CPU only: the sequential pipeline pins cached activations for async host-to-device copies,
    # which needs an accelerator. Nothing is copied anywhere here, so pinning is skipped.
    if not torch.cuda.is_available():
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
        notes.append("IntermediatesCache._pin_intermediate patched to a no-op (CPU)")

    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    log(f"loading {model_dir}")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    recipe = recipe_fn()

    log(f"oneshot {what} (llmcompressor {llmcompressor.__version__})")
    model, secs, cpu = timed(lambda: oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe,
                                             num_calibration_samples=n, max_seq_length=seqlen,
                                             shuffle_calibration_samples=False, batch_size=1))
    log(f"oneshot done in {secs:.1f} s (CPU time {cpu:.1f} s)")
    return model, secs, cpu


def llmc_dense(model, log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], int, float]:
    """The model's float parameters with each quantized module's fake quantization baked into its weight
    (the modules keep float weights plus weight_scale / weight_zero_point and quantize on the fly in
    forward), the qparams left out. Returns (tensors, quantized Linears, largest change baking made)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    quant_params = set()
    n_quant = 0
    max_change = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            zp = getattr(module, "weight_zero_point", None)
            deq = fake_quantize(module.weight.data.float(), module.weight_scale.data, zp.data if zp is not None
                                else None, scheme.weights)
            max_change = max(max_change, float((deq - module.weight.data.float()).abs().max()))
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
    return tensors, n_quant, max_change


def llmc_versions() -> dict:
    import compressed_tensors
    import llmcompressor
    import transformers

    return {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}
