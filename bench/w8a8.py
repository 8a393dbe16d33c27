"""Weight + activation int8 presets on a reference model, and the speed of the integer GEMM.

Quality: every W8A8 preset is quantized (calibration: random 512-token slices of WikiText-2
validation, `--calib-samples` of them), saved in lowbit's format and reloaded, then scored on the
WikiText-2 test windows: perplexity, KL divergence and top-1 agreement against the float model,
bits per weight of the decoder-block linears. Naive W8A8 (per-tensor static, no smoothing) sits
next to the SmoothQuant, LLM.int8(), ZeroQuant, Outlier Suppression and W4A8 rows so the table shows
what each method fixes.

Speed: `W8A8Linear` (per-token dynamic activations, quantization of x included in the time) against
fp32 and bf16 `F.linear` at M = 1, 128, 512 tokens on 4096x4096, 4096x11008 and the model's own MLP
shape, with where the time goes at the largest M (activation quantization: lowbit's kernel against
the plain torch expression; the integer GEMM alone on each backend; the epilogue); and one 512-token
prefill of the whole model, bf16 float against W8A8 (sq-o1) in bf16, with and without the norms
quantizing q/k/v's and gate/up's input once (lowbit.nn.act_quant_norm). Threads: OMP_NUM_THREADS.

    python bench/w8a8.py --model smollm2-135m [--windows 40] [--calib-samples 64] [--only w8a8-sq-o1,...]
        [--no-speed] [--speed-only] [--ref-logits FILE] [--json out.json]

`--only` also takes recipe .yaml files (variants of a preset: another alpha, LKD off), each row named
by the file's stem.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit.api import resolve_model_path
from lowbit.eval import bits_per_weight
from lowbit.nn import W8A8Linear, act_quant_norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import REPO, WIKI_TEST, WIKI_VALID, load_reference, markdown_table, quality, write_json  # noqa: E402

PRESETS = ("w8a8-naive", "w8a8-sq-o1", "w8a8-sq-o2", "w8a8-sq-o3", "w8a8-llm-int8", "w8a8-llm-int8-paper", "w8a8-llm-int8-gptq", "w8a8-zeroquant", "w4a8-zeroquant",
           "w8a8-os", "w4a8")
COLUMNS = [("bits/weight", "bits_per_weight", ".2f"), ("ppl", "ppl", ".3f"), ("Δppl", "delta_ppl", "+.3f"),
           ("Δppl %", "delta_pct", "+.2f"), ("KL", "kl", ".4f"), ("top-1", "top1_agreement", ".3f"),
           ("quant s", "quant_seconds", ".1f")]


def median_ms(fn, reps: int = 7) -> float:
    fn()  # warm-up: oneDNN primitives, first-touch of buffers
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _kernels():
    import importlib

    return importlib.import_module("lowbit.kernels.int8_gemm")  # the package re-exports a function of that name


@torch.inference_mode()
def breakdown(w8: W8A8Linear, xb: torch.Tensor) -> dict:
    """Where W8A8Linear's time goes for one bf16 input: quantizing x (lowbit's kernel, and the plain
    torch expression it replaced), the int8 GEMM alone on each prepared backend, the epilogue."""
    K = _kernels()
    prep = w8._prepared()
    m = xb.shape[0]
    out = {"backend": K.select_int8_backend(prep, m=m)}
    off = K.act_offset(prep, m)
    out["quant_ms"] = median_ms(lambda: K.quantize_per_token(xb, offset=off))

    def torch_quant():
        s = xb.abs().amax(dim=-1, keepdim=True).float().div_(127).clamp_(min=1e-12)
        return torch.clamp(torch.round(xb.float() / s), -127, 127).to(torch.int8), s

    out["quant_torch_ms"] = median_ms(torch_quant)
    q8, xs = K.quantize_per_token(xb)
    qu, _ = K.quantize_per_token(xb, offset=128)
    ws = w8.weight_scale.reshape(-1)
    if K._has_vnni():  # elsewhere torch._int_mm is a scalar loop (minutes at this size)
        out["gemm_int_mm_ms"] = median_ms(lambda: torch._int_mm(q8, w8.weight.t()))
    if "onednn" in K.int8_available_backends(prep):
        out["gemm_onednn_ms"] = median_ms(lambda: K._run_onednn(qu, prep, ws, w8.out_features))
    if "avx2" in K.int8_available_backends(prep):
        out["gemm_avx2_ms"] = median_ms(lambda: K._avx2_ext().i8_gemm(q8, prep["i8_avx2_weight"]))
    acc = K._run_fp32(q8, w8.weight)  # the int32 accumulator (exact) the epilogue reads
    out["epilogue_ms"] = median_ms(lambda: K._epilogue(acc, xs, ws, None, torch.bfloat16))
    return out


@torch.inference_mode()
def layer_speed(shapes, ms=(1, 128, 512), bf16: bool = True) -> list[dict]:
    rows = []
    for k, n in shapes:
        lin = torch.nn.Linear(k, n, bias=False)
        w8 = W8A8Linear.from_float(lin, weight_granularity="channel", act_mode="per_token")
        wb = lin.weight.detach().bfloat16()
        for m in ms:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            row = {"K": k, "N": n, "M": m, "backend": _kernels().select_int8_backend(w8._prepared(), m=m),
                   "fp32_ms": median_ms(lambda: F.linear(x, lin.weight)),
                   "w8a8_fp32_ms": median_ms(lambda: w8(x))}
            if bf16:
                row["bf16_ms"] = median_ms(lambda: F.linear(xb, wb))
                row["w8a8_bf16_ms"] = median_ms(lambda: w8(xb))
                row["speedup_vs_bf16"] = row["bf16_ms"] / row["w8a8_bf16_ms"]
            # where bf16 GEMMs are slow (CPUs without AVX512-BF16) float32 is the baseline that counts
            row["speedup_vs_fp32"] = row["fp32_ms"] / row["w8a8_fp32_ms"]
            rows.append(row)
            print(f"  {k}x{n} M={m}: fp32 {row['fp32_ms']:.2f} ms"
                  + (f", bf16 {row['bf16_ms']:.2f} ms" if bf16 else "") + f", W8A8 ({row['backend']})"
                  + (f" bf16 in/out {row['w8a8_bf16_ms']:.2f} ms ({row['speedup_vs_bf16']:.2f}x bf16)," if bf16 else "")
                  + f" fp32 in/out {row['w8a8_fp32_ms']:.2f} ms ({row['speedup_vs_fp32']:.2f}x fp32)", flush=True)
            if m == max(ms):
                b = row["breakdown"] = breakdown(w8, xb if bf16 else x)
                print(f"    M={m} parts ({b['backend']}): quantize x {b['quant_ms']:.2f} ms (torch ops "
                      f"{b['quant_torch_ms']:.2f}), GEMM alone:"
                      + (f" _int_mm {b['gemm_int_mm_ms']:.2f} ms" if "gemm_int_mm_ms" in b else "")
                      + (f", oneDNN u8 {b['gemm_onednn_ms']:.2f} ms" if "gemm_onednn_ms" in b else "")
                      + (f" AVX2 {b['gemm_avx2_ms']:.2f} ms" if "gemm_avx2_ms" in b else "")
                      + f", epilogue {b['epilogue_ms']:.2f} ms", flush=True)
    return rows


@torch.inference_mode()
def prefill_speed(src, recipe: str, calib, tokens: int = 512, bf16: bool = True) -> dict:
    ids = torch.randint(100, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    fp = lowbit.load(src)
    t_fp32 = median_ms(functools.partial(fp, ids), reps=3)
    t_fp = median_ms(functools.partial(fp.to(torch.bfloat16), ids), reps=3) if bf16 else float("nan")
    fp = None
    q = lowbit.quantize(lowbit.load(src), recipe, calib, progress=False)
    t_q32 = median_ms(functools.partial(q, ids), reps=3)  # float32 activations around the int8 GEMMs
    if not bf16:
        return {"tokens": tokens, "recipe": recipe, "fp32_ms": t_fp32, "w8a8_fp32_ms": t_q32,
                "fp32_tok_s": tokens / t_fp32 * 1e3, "w8a8_fp32_tok_s": tokens / t_q32 * 1e3,
                "speedup_vs_fp32": t_fp32 / t_q32}
    q = q.to(torch.bfloat16)
    fused = act_quant_norm.fused_norms(q)
    t_q = median_ms(lambda: q(ids), reps=3)
    for name in fused:  # the same model with every linear quantizing its own input
        act_quant_norm.detach(q.get_submodule(name))
    t_unfused = median_ms(lambda: q(ids), reps=3)
    return {"tokens": tokens, "bf16_ms": t_fp, "w8a8_ms": t_q, "bf16_tok_s": tokens / t_fp * 1e3,
            "w8a8_tok_s": tokens / t_q * 1e3, "speedup": t_fp / t_q, "recipe": recipe,
            "fused_norms": len(fused), "w8a8_unfused_ms": t_unfused, "w8a8_unfused_tok_s": tokens / t_unfused * 1e3,
            "fp32_ms": t_fp32, "w8a8_fp32_ms": t_q32, "fp32_tok_s": tokens / t_fp32 * 1e3,
            "w8a8_fp32_tok_s": tokens / t_q32 * 1e3, "speedup_vs_fp32": t_fp32 / t_q32}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default=str(WIKI_VALID))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated presets")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--no-bf16", action="store_true",
                    help="time float32 only (on CPUs without AVX512-BF16 torch's bf16 GEMM is a scalar loop, and "
                         "its timings take most of the run)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "w8a8"))
    ap.add_argument("--ref-logits", default=None, metavar="FILE",
                    help="keep the float model's logits on the windows in FILE (SmolLM2 40 x 512: 4 GB; Gemma-3: "
                         "21 GB) for later runs on the same windows, which then skip the float forward")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    calib = lowbit.calib.text_file(a.calib, n_samples=a.calib_samples, seqlen=512)
    result: dict = {"model": a.model, "windows": a.windows, "seqlen": a.seqlen, "calib_samples": a.calib_samples,
                    "threads": torch.get_num_threads()}

    if not a.speed_only:
        ref = load_reference(a.model, WIKI_TEST, a.windows, a.seqlen)
        ref.logits_path = a.ref_logits
        rows = [dict(method="float (fp32)", bits_per_weight=32.0, quant_seconds=0.0, **quality(ref.fp, ref))]
        for preset in (a.only.split(",") if a.only else PRESETS):
            recipe = preset  # a preset name, or a recipe .yaml (a variant), whose row is named by its file stem
            preset = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
            model = lowbit.load(ref.src)
            t0 = time.perf_counter()
            q = lowbit.quantize(model, recipe, calib, progress=False)
            qtime = time.perf_counter() - t0
            out = lowbit.save(q, Path(a.out) / a.model / preset, tokenizer=ref.fp.lowbit_tokenizer, overwrite=True)
            del q, model
            q = lowbit.load(out)  # what a user gets back from disk
            row = dict(method=preset, quant_seconds=qtime,
                       bits_per_weight=bits_per_weight(q)["bits_per_weight"], **quality(q, ref))
            row["delta_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
            rows.append(row)
            print(f"  {preset}: {row['bits_per_weight']:.2f} bits/weight, ppl {row['ppl']:.3f} ({row['delta_pct']:+.2f}%), "
                  f"KL {row['kl']:.4f}, top-1 {row['top1_agreement']:.3f}, {qtime:.1f} s", flush=True)
            del q
        result["rows"] = rows
        print()
        print(markdown_table(rows, COLUMNS, status=False))

    if not a.no_speed:
        cfg = lowbit.load(resolve_model_path(a.model)).config
        shapes = [(4096, 4096), (4096, 11008), (cfg.hidden_size, cfg.intermediate_size)]
        print(f"\nlayer speed ({torch.get_num_threads()} threads; W8A8 = per-token int8 quantization of x + "
              f"int8 GEMM + epilogue, {'float32 in and out' if a.no_bf16 else 'in and out in bf16, then in float32'})")
        result["layers"] = layer_speed(shapes, bf16=not a.no_bf16)
        p = prefill_speed(resolve_model_path(a.model), "w8a8-sq-o1", calib, bf16=not a.no_bf16)
        result["prefill"] = p
        if a.no_bf16:
            print(f"\nprefill of {p['tokens']} tokens, whole model, float32: {p['fp32_ms']:.0f} ms ({p['fp32_tok_s']:.0f} "
                  f"tok/s) against W8A8 sq-o1 {p['w8a8_fp32_ms']:.0f} ms ({p['w8a8_fp32_tok_s']:.0f} tok/s): "
                  f"{p['speedup_vs_fp32']:.2f}x")
    if not a.no_speed and not a.no_bf16:
        print(f"\nprefill of {p['tokens']} tokens, whole model: bf16 {p['bf16_ms']:.0f} ms "
              f"({p['bf16_tok_s']:.0f} tok/s), W8A8 sq-o1 in bf16 {p['w8a8_ms']:.0f} ms "
              f"({p['w8a8_tok_s']:.0f} tok/s): {p['speedup']:.2f}x; without the {p['fused_norms']} norm-fused "
              f"quantizations {p['w8a8_unfused_ms']:.0f} ms ({p['w8a8_unfused_tok_s']:.0f} tok/s); in float32: "
              f"{p['fp32_ms']:.0f} ms ({p['fp32_tok_s']:.0f} tok/s) against W8A8 {p['w8a8_fp32_ms']:.0f} ms "
              f"({p['w8a8_fp32_tok_s']:.0f} tok/s): {p['speedup_vs_fp32']:.2f}x")
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
