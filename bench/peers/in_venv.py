"""Peer side of bench/peers.py for the peers whose quantized model only runs inside their own package
(bitsandbytes, torchao, optimum-quanto, hqq; llm-compressor's W8A8, whose activation quantization
lives in its modules' forward): quantize in memory, then score the model right there with
lowbit's own evaluation code (lowbit's src/ is put on the path; the venv has lowbit's dependencies and the
main venv's transformers), on the very windows the main script cut.

    PEER_PYTHON -P bench/peers/in_venv.py --method bnb-nf4 --model DIR --windows W.safetensors \
        --samples S.safetensors --out OUT [--group-size 64] [--new-tokens 64] [--no-speed]

Writes OUT/result.json: quant_seconds (what quantizing took: for bitsandbytes the quantizing load,
less a plain load of the same checkpoint), ppl, kl, top1_agreement, bits_per_weight (bytes of the
decoder linears' tensors, packed data and scales, over their weight count), prefill/decode tokens/s,
peak RSS (this process: float reference, quantizing and the speed test), versions, config, notes.
Run with `-P` so that bench/peers/venv.py cannot shadow the standard library's `venv`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE))  # after the standard library (see peer_side.py)
sys.path.append(str(HERE.parents[1] / "src"))  # lowbit's evaluation, the same code that scores lowbit's rows

import torch  # noqa: E402
from peer_side import load_calibration, logger, peer_args  # noqa: E402

log = logger("in_venv")

METHODS = ("bnb-nf4", "bnb-int8", "torchao-int4", "torchao-w8a8", "quanto-w4", "quanto-w8a8", "hqq-w4", "llmc-w8a8")


def load_float(model_dir: str, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()


def decoder_linear(name: str) -> bool:
    # every method leaves lm_head (tied to the embedding in SmolLM2) and the embeddings in float
    return ".layers." in f".{name}." and not name.endswith("lm_head")


# ---------------------------------------------------------------------------------------------- methods
# Each returns (model, quantize seconds, config, notes); the model is ready to run on CPU.


def bnb(args, four_bit: bool):
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    if four_bit:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        desc = {"quant_type": "nf4", "blocksize": 64, "compute_dtype": "float32"}
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        desc = {"scheme": "LLM.int8()", "threshold": 6.0}
    t0 = time.perf_counter()
    load_float(args.model)  # the plain load, to take away from the quantizing one
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_float(args.model, quantization_config=cfg)
    secs = max(0.0, time.perf_counter() - t0 - plain)
    return model, secs, {**desc, "bitsandbytes": bitsandbytes.__version__}, [
        "quantizes while loading: time = quantizing load - plain load"]


def torchao(args, int4: bool):
    import torchao as ao
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = load_float(args.model)
    notes = []
    if int4:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        # its CPU int4 kernel takes bfloat16 activations and weights
        model = model.to(torch.bfloat16)
        cfg = PrototypeInt4WeightOnlyConfig(group_size=args.group_size)
        notes.append("model in bfloat16 (the int4 CPU kernel's dtype)")
        desc = {"config": "PrototypeInt4WeightOnlyConfig", "group_size": args.group_size, "dtype": "bfloat16"}
    else:
        cfg = Int8DynamicActivationInt8WeightConfig()
        desc = {"config": "Int8DynamicActivationInt8WeightConfig", "granularity": "per row", "dtype": "float32"}
    t0 = time.perf_counter()
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and decoder_linear(fqn))
    return model, time.perf_counter() - t0, {**desc, "torchao": ao.__version__}, notes


class OutsideInferenceMode(torch.nn.Module):
    """Runs a model under no_grad even inside torch.inference_mode (which lowbit.eval uses): quanto's
    int4 linear goes through an autograd Function that views its weight, which inference tensors
    refuse ("Cannot set version_counter for inference tensor")."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids=None, logits_to_keep=0, **kw):
        with torch.inference_mode(False), torch.no_grad():
            return self.model(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()


def quanto(args, w8a8: bool):
    import optimum.quanto as q

    model = load_float(args.model)
    notes = []
    t0 = time.perf_counter()
    if w8a8:
        q.quantize(model, weights=q.qint8, activations=q.qint8, exclude=["lm_head"])
        ids = load_calibration(args.samples, log, args.samples_sha256)
        with torch.no_grad(), q.Calibration():
            for row in ids:
                model(input_ids=row[None], use_cache=False)
        notes.append(f"activation ranges calibrated on {ids.shape[0]} x {ids.shape[1]} tokens")
        desc = {"weights": "qint8", "activations": "qint8 (static, calibrated)"}
    else:
        q.quantize(model, weights=q.qint4, exclude=["lm_head"])
        desc = {"weights": "qint4 (quanto's own group size)"}
    q.freeze(model)
    secs = time.perf_counter() - t0
    if not w8a8:
        model = OutsideInferenceMode(model)
        notes.append("runs under no_grad: its int4 matmul fails under inference_mode")
    from importlib.metadata import version

    return model, secs, {**desc, "optimum-quanto": version("optimum-quanto")}, notes


def hqq(args):
    import hqq as hqq_pkg
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    model = load_float(args.model)
    cfg = BaseQuantizeConfig(nbits=4, group_size=args.group_size)
    t0 = time.perf_counter()
    AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float32, device="cpu")
    secs = time.perf_counter() - t0
    n = sum(isinstance(m, HQQLinear) for m in model.modules())
    return model, secs, {"nbits": 4, "group_size": args.group_size, "hqq": hqq_pkg.__version__,
                         "compute_dtype": "float32", "hqq_linears": n}, ["dequantizes each weight on every call (CPU)"]


def llmc_w8a8(args):
    """llm-compressor's SmoothQuant (its default strength 0.5 and Llama mappings) then GPTQ with the
    scheme it ships as "W8A8": int8 weights per output channel, int8 activations per token, dynamic.
    The model it leaves keeps float weights and fake-quantizes weights and inputs in every Linear's
    forward (compressed-tensors), which is what gets scored: its W8A8 numerics, not its speed."""
    from peer_side import llmc_oneshot, llmc_versions

    ids = load_calibration(args.samples, log, args.samples_sha256)
    notes = []

    def recipe() -> list:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=0.5),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]

    model, secs, _ = llmc_oneshot(args.model, ids, recipe, "SmoothQuant 0.5 + GPTQ W8A8", log, notes)
    model.eval()
    # what runs in forward: count the Linears whose inputs are fake-quantized per token on the fly
    acts = [m.quantization_scheme.input_activations for m in model.modules()
            if getattr(m, "quantization_scheme", None) is not None and getattr(m, "quantization_status", None)]
    dyn = sum(1 for a in acts if a is not None and a.dynamic and str(a.strategy).endswith("token"))
    notes.append(f"{dyn} Linears quantize their input per token at run time (compressed-tensors fake quantization); "
                 f"weights float on the int8 grid, so no bits/weight or speed")
    if dyn == 0:
        raise RuntimeError("llm-compressor left no Linear with dynamic per-token input quantization")
    return model, secs, {"recipe": "SmoothQuantModifier(smoothing_strength=0.5) + GPTQModifier(scheme='W8A8')",
                         "calibration": list(ids.shape), **llmc_versions()}, notes


def quantize(args):
    return {"bnb-nf4": lambda: bnb(args, True), "bnb-int8": lambda: bnb(args, False),
            "torchao-int4": lambda: torchao(args, True), "torchao-w8a8": lambda: torchao(args, False),
            "quanto-w4": lambda: quanto(args, False), "quanto-w8a8": lambda: quanto(args, True),
            "hqq-w4": lambda: hqq(args), "llmc-w8a8": lambda: llmc_w8a8(args)}[args.method]()


# ---------------------------------------------------------------------------------------------- size


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking through tensor subclasses (torchao, quanto) to their inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def linear_bits(model, float_weights: dict[str, int]) -> float | None:
    """Bits per weight over the decoder linears: every tensor their state_dict holds (packed data,
    scales, zeros; quant state for bitsandbytes; hqq's meta), biases excluded, over the float weights."""
    bits = 0
    for name, m in model.named_modules():
        if name not in float_weights:
            continue
        for key, t in m.state_dict().items():
            if isinstance(t, torch.Tensor) and not key.endswith("bias"):
                bits += 8 * tensor_bytes(t)
    total = sum(float_weights.values())
    return bits / total if total else None


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    def extra(ap):
        ap.add_argument("--method", required=True, choices=METHODS)
        ap.add_argument("--windows", required=True, help="evaluation windows (safetensors, input_ids)")
        ap.add_argument("--new-tokens", type=int, default=64)
        ap.add_argument("--no-speed", action="store_true")

    args = peer_args(extra)
    from safetensors.torch import load_file

    from lowbit.eval import evaluate, measure_throughput

    windows = load_file(args.windows)["input_ids"].long()
    ref = load_float(args.model)
    float_weights = {n: m.weight.numel() for n, m in ref.named_modules()
                     if isinstance(m, torch.nn.Linear) and decoder_linear(n)}
    log(f"{args.method}: quantizing")
    model, secs, config, notes = quantize(args)
    log(f"{args.method}: quantized in {secs:.1f} s; scoring on {windows.shape[0]} x {windows.shape[1]} tokens")
    result = {"method": args.method, "quant_seconds": secs, "config": config, "notes": notes,
              "bits_per_weight": None if args.method == "llmc-w8a8" else
              linear_bits(model.model if isinstance(model, OutsideInferenceMode) else model, float_weights)}
    r = evaluate(model, windows, ref_model=ref)
    result.update(ppl=r["ppl"], kl=r["kl"], top1_agreement=r["top1_agreement"])
    log(f"{args.method}: ppl {r['ppl']:.3f}, KL {r['kl']:.4f}")
    del ref
    if not args.no_speed:
        s = measure_throughput(model, new_tokens=args.new_tokens)
        result.update({k: s[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token",
                                         "peak_rss_mb")})
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {args.out}/result.json")


if __name__ == "__main__":
    main()
