"""Where W8A8's error comes from: one kind of linear (q/k/v, o, gate/up, down) at a time, activations
and weights separately, scored by KL against the float model on a few windows.

Everything is simulated on the float model with hooks (the numbers lowbit's modules compute, without
the modules): weights on lowbit's symmetric int8 grid per output channel (`int8_weight`), activations
per token (each token's absmax / 127, lowbit's `quantize_per_token`), and LLM.int8()'s decomposition
(input columns with some |x| > threshold in this call left in float, the per-token scale taken over
the other columns). A row is "what this much quantization costs", so the rows of one kind add up to
about the all-linears row when the errors are independent.

    python bench/w8a8_attribution.py [--model smollm2-135m] [--windows 4] [--text valid|test]
        [--configs a8:all,w8:all,...] [--threshold 6.0[,4,3,...]] [--stats]
        [--smooth ALPHA [--calib-samples 16] [--pairs all] [--search-tokens 2048] [--objective block]]
        [--rotate 64] [--json out.json]

`--rotate B` quantizes every selected linear in a rotated basis (lowbit's `rotate: hadamard`: weight rows
and inputs times the randomized block-Hadamard R of B channels, signs seed 0), each rounding done there
and rotated back, so the rows show what the rotation leaves of each error.

`--smooth` first folds SmoothQuant's scales (lowbit's `smoothquant` step alone, calibrated on random
slices of wiki.valid.tokens) into the float model, so the rows show what is left after smoothing.

A config is `<what>:<kinds>`: what is `w8` (weights only), `a8` (activations per token), `a8o` (per
token with the LLM.int8() decomposition at --threshold), `w8a8`, `w8a8o`; kinds are `all` or a
`+`-joined subset of qkv, o, gateup, down, or `blockN` (every linear of block N). Several
`--threshold`s run each decomposition config (`a8o`, `w8a8o`) once per threshold, and print what
share of the linears' input columns each one leaves in float (the 16-bit matmul's width).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.eval import evaluate
from lowbit.eval.perplexity import ReferenceLogits, load_windows
from lowbit.kernels.int8_gemm import quantize_per_token
from lowbit.models import block_linears, get_adapter, get_blocks
from lowbit.nn.w8a8_linear import int8_weight
from lowbit.quant.rotation import rotate, rotation_signs, unrotate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import WIKI_TEST, WIKI_VALID, resolve_source  # noqa: E402

KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gateup": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
DEFAULT_CONFIGS = ("w8:all", "a8:all", "a8o:all", "w8a8:all", "w8a8o:all",
                   "a8:qkv", "a8:o", "a8:gateup", "a8:down", "a8o:qkv", "a8o:o", "a8o:gateup", "a8o:down",
                   "w8:qkv", "w8:o", "w8:gateup", "w8:down")


def fake_act(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """x after per-token int8 (codes * scale), with LLM.int8()'s outlier columns left as they are."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    cols = None
    if threshold is not None:
        cols = (x2.abs().amax(dim=0) > threshold).nonzero().reshape(-1)
        x_in = x2.index_fill(1, cols, 0.0)
    else:
        x_in = x2
    q, s = quantize_per_token(x_in.contiguous())
    y = q.float() * s
    if cols is not None and cols.numel():
        y[:, cols] = x2[:, cols]
    return y.to(x.dtype).reshape(x.shape)


def heldout_windows(tokenizer, text, seqlen: int, n: int, calib_samples: int = 128, seed: int = 0) -> torch.Tensor:
    """The first n windows of `text` that share no token with the calibration slices lowbit cuts from
    it (`calib_samples` x 512 at `seed`, a superset of the slices of any smaller count): validation
    text the settings can be chosen on without scoring on what calibrated them."""
    ids = tokenizer(Path(text).read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False).input_ids[0]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - 512, (calib_samples,), generator=gen)
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for st in starts.tolist():
        used[st : st + 512] = True
    out = [ids[i : i + seqlen] for i in range(0, ids.numel() - seqlen + 1, seqlen) if not used[i : i + seqlen].any()]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} held-out windows of {seqlen} tokens")
    return torch.stack(out[:n])


def select(model, kinds: str) -> dict[str, torch.nn.Module]:
    adapter = get_adapter(model)
    blocks = get_blocks(model, adapter)
    out = {}
    for i, block in enumerate(blocks):
        for name, mod in block_linears(block, adapter).items():
            leaf = name.split(".")[-1]
            for k in kinds.split("+"):
                if k == "all" or (k.startswith("block") and int(k[5:]) == i) or leaf in KINDS.get(k, ()):
                    out[f"{i}.{name}"] = mod
    return out


class Applied:
    """Quantizes the selected linears of `model` as `what` says until closed; with `rotate_block` each
    rounding happens in the rotated basis and is rotated back."""

    def __init__(self, model, config: str, threshold: float, rotate_block: int = 0):
        what, kinds = config.split(":")
        self.mods = select(model, kinds)
        self.saved, self.handles = {}, []
        b = rotate_block
        if "w8" in what:
            for n, m in self.mods.items():
                self.saved[n] = m.weight.data
                w = m.weight.data.float()
                sg = rotation_signs(w.shape[1]) if b else None
                q, s = int8_weight(rotate(w, sg, b, torch.float64) if b else w, "channel", n)
                wq = q.float() * s
                m.weight.data = (unrotate(wq, sg, b) if b else wq).to(m.weight.dtype)
        if "a8" in what:
            thr = threshold if what.endswith("o") else None
            for m in self.mods.values():
                if b:
                    sg = rotation_signs(m.in_features)
                    hook = lambda mod, args, t=thr, sg=sg: (  # noqa: E731
                        unrotate(fake_act(rotate(args[0], sg, b), t), sg, b).to(args[0].dtype),)
                else:
                    hook = lambda mod, args, t=thr: (fake_act(args[0], t),)  # noqa: E731
                self.handles.append(m.register_forward_pre_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()
        for n, w in self.saved.items():
            self.mods[n].weight.data = w


@torch.inference_mode()
def input_stats(model, ids: torch.Tensor, threshold: float) -> list[dict]:
    """Per kind of linear: how heavy-tailed its inputs are, per 512-token call."""
    rows = {k: {"kind": k, "calls": 0, "outlier_cols": 0, "in": 0, "absmax": 0.0, "ratio": []} for k in KINDS}
    mods = select(model, "all")

    def hook(name):
        leaf = name.split(".")[-1]
        kind = next(k for k, v in KINDS.items() if leaf in v)

        def f(mod, args):
            if leaf in ("k_proj", "v_proj", "up_proj"):
                return  # same input as q_proj / gate_proj
            x = args[0].reshape(-1, args[0].shape[-1]).float().abs()
            r = rows[kind]
            r["calls"] += 1
            r["in"] = x.shape[1]
            r["outlier_cols"] += int((x.amax(0) > threshold).sum())
            r["absmax"] = max(r["absmax"], float(x.max()))
            # per token: absmax over the mean |x| (how much of the int8 grid the typical value gets)
            r["ratio"].append((x.amax(1) / x.mean(1).clamp(min=1e-12)).median().item())
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    for w in ids:
        model(input_ids=w[None], use_cache=False)
    for h in hs:
        h.remove()
    out = []
    for r in rows.values():
        r["outlier_cols_per_call"] = r["outlier_cols"] / max(r["calls"], 1)
        r["median_token_absmax_over_mean"] = float(torch.tensor(r.pop("ratio")).median())
        out.append(r)
    return out


@torch.inference_mode()
def float_column_share(model, ids: torch.Tensor, thresholds: list[float], rotate_block: int = 0) -> dict[float, float]:
    """Per threshold: the input columns LLM.int8() leaves in float (some |x| > threshold in the call),
    as a share of all input columns, averaged over every linear's 512-token calls, weighted by the
    work they carry (columns x output features)."""
    mods = select(model, "all")
    kept = {t: 0.0 for t in thresholds}
    total = [0.0]

    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        if rotate_block:
            x = rotate(x, rotation_signs(x.shape[-1]), rotate_block)
        colmax = x.abs().amax(0)
        total[0] += colmax.numel() * mod.out_features
        for t in thresholds:
            kept[t] += float((colmax > t).sum()) * mod.out_features

    hs = [m.register_forward_pre_hook(hook) for m in mods.values()]
    for w in ids:
        model(input_ids=w[None], use_cache=False)
    for h in hs:
        h.remove()
    return {t: kept[t] / max(total[0], 1.0) for t in thresholds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", choices=("valid", "test"), default="valid")
    ap.add_argument("--threshold", default="6.0", help="LLM.int8() threshold(s), comma-separated")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--stats", action="store_true", help="also print the inputs' outlier statistics")
    ap.add_argument("--smooth", default=None, help="SmoothQuant alpha (a number or auto) folded in first")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--pairs", default="all")
    ap.add_argument("--search-tokens", type=int, default=None, help="alpha auto: tokens scored per pair")
    ap.add_argument("--objective", choices=("pair", "block"), default=None,
                    help="alpha auto: score alphas by the pair's outputs or by the block's output")
    ap.add_argument("--rotate", type=int, default=0, help="round in the basis of a block-Hadamard rotation of this block")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    thresholds = [float(t) for t in a.threshold.split(",")]
    model = lowbit.load(resolve_source(a.model))
    model.eval()
    text = WIKI_VALID if a.text == "valid" else WIKI_TEST
    if a.text == "valid":
        ids = heldout_windows(model.lowbit_tokenizer, text, a.seqlen, a.windows)
    else:
        ids = load_windows(model.lowbit_tokenizer, text, seqlen=a.seqlen, windows=a.windows)
    ref = ReferenceLogits(model, ids)
    with torch.inference_mode():
        for i in range(ids.shape[0]):  # the float logits now, before any hook changes the model
            ref.logits(i, ids[i : i + 1])
    # every window is cached now; without the model, evaluate() scores the hooked model against the
    # float logits instead of taking it for the reference and reading them back (KL 0)
    ref.model = None
    base = evaluate(model, ids, progress=False)
    result = {"model": a.model, "windows": a.windows, "text": str(text), "float_ppl": base["ppl"], "rotate": a.rotate,
              "rows": []}
    if a.smooth is not None:
        from lowbit.quant import PerChannel, QuantSpec
        from lowbit.recipes import Recipe

        rec = Recipe(name="smooth-only", description="", weights=QuantSpec(bits=8, symmetric=True,
                     granularity=PerChannel()), steps=[{"method": "smoothquant", "pairs": a.pairs,
                                              "alpha": a.smooth if a.smooth == "auto" else float(a.smooth),
                                              **({"search_tokens": a.search_tokens} if a.search_tokens else {}),
                                              **({"objective": a.objective} if a.objective else {})}])
        calib = lowbit.calib.text_file(WIKI_VALID, n_samples=a.calib_samples, seqlen=512)
        t0 = time.perf_counter()
        lowbit.quantize(model, rec, calib, progress=False)
        result["smooth_seconds"] = time.perf_counter() - t0
        print(f"smoothed: alpha {a.smooth}, pairs {a.pairs}, {a.calib_samples} x 512 calibration, "
              f"{result['smooth_seconds']:.0f} s", flush=True)
        alphas = model.lowbit_recipe["algorithms"][0].get("alphas")
        if alphas:
            result["alphas"] = alphas
            for prev in sorted({k.split(".")[-1] for k in alphas}):
                got = [v for k, v in alphas.items() if k.endswith("." + prev)]
                print(f"  alphas chosen after {prev}: {' '.join(f'{v:.2f}' for v in got)}", flush=True)
    print(f"{a.model}: {a.windows} x {a.seqlen} of {text.name}{' (held out from calibration)' if a.text == 'valid' else ''}, float ppl {base['ppl']:.3f}", flush=True)
    if any(c.split(":")[0].endswith("o") for c in a.configs.split(",")):
        share = float_column_share(model, ids, thresholds, a.rotate)
        result["float_column_share"] = {str(t): v for t, v in share.items()}
        print("  LLM.int8() columns left in float, share of the GEMM work: "
              + ", ".join(f"> {t:g}: {100 * v:.2f}%" for t, v in share.items()), flush=True)
    if a.stats:
        result["stats"] = input_stats(model, ids, thresholds[0])
        for r in result["stats"]:
            print(f"  {r['kind']:>6} inputs ({r['in']} wide): absmax {r['absmax']:.1f}, "
                  f"{r['outlier_cols_per_call']:.1f} columns > {thresholds[0]:g} per call, median token "
                  f"absmax/mean|x| {r['median_token_absmax_over_mean']:.1f}", flush=True)
    runs = [(cfg, t) for cfg in a.configs.split(",")
            for t in (thresholds if cfg.split(":")[0].endswith("o") else [None])]
    for cfg, thr in runs:
        t0 = time.perf_counter()
        app = Applied(model, cfg, thr if thr is not None else thresholds[0], a.rotate)
        try:
            res = evaluate(model, ids, ref_model=ref, progress=False)
        finally:
            app.close()
        row = {"config": cfg, "ppl": res["ppl"], "kl": res["kl"], "top1": res["top1_agreement"],
               "dppl_pct": 100 * (res["ppl"] / base["ppl"] - 1)}
        if thr is not None:
            row["threshold"] = thr
        result["rows"].append(row)
        label = cfg if thr is None else f"{cfg} @{thr:g}"
        print(f"  {label:>18}: KL {row['kl']:.5f}  ppl {row['ppl']:.3f} ({row['dppl_pct']:+.2f}%)  "
              f"top-1 {row['top1']:.3f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    ref.close()
    if a.json:
        import json

        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
