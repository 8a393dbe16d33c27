"""AWQ: activation-aware weight quantization (Lin et al., 2023), in AutoAWQ's vocabulary.

Per decoder block:

1. `get_input_feat`: the inputs of the block's linears over the calibration tokens (float block).
2. `search_best_scale` for each foldable pair (norm -> linears, linear -> linear): a per-input-channel
   scale s = x_mean^a / w_mean^(1-a), a on a grid in [0, 1), chosen by the output error of the
   pair's `inspect` module with weights pseudo_quantize(W * s) / s. The best s is folded
   (prev / s, linears * s), which leaves the float function unchanged; the captured inputs of the
   pair's linears are divided by s so later steps see what the linears now read.
3. `search_best_clip` for each linear (except q/k, whose errors the softmax reshapes): per group,
   the clip of the weight range that least changes the group's partial output on sampled tokens.
   `apply_clip` clamps the weight itself, as AutoAWQ does (see `apply_clip` for why clip_ratio is
   not the same thing).
4. `apply_quant`: every linear becomes a WQLinear.

Pairs of kind "act" (a scale across GELU, which needs AutoAWQ's ScaledActivation) are skipped.
The next block is fed the float block's outputs (`propagate = "float"`), as AutoAWQ does.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
import logging

import torch
from torch import nn

from ..calib.runner import call_block
from ..models import fold_scales, get_module, linear_weight, resolve_scaling_pairs, set_linear_weight, set_module
from ..nn import WQLinear
from ..quant import PerGroup, QuantSpec, quantize_dequantize
from .base import Algorithm
from .rtn import check_weights

log = logging.getLogger(__name__)


def _group_spec(spec: QuantSpec, in_features: int) -> QuantSpec:
    """The spec with an explicit group size (per-channel = one group of the whole row)."""
    g = WQLinear.spec_group_size(spec, in_features)
    return dataclasses.replace(spec, granularity=PerGroup(g))


def pseudo_quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w `[out, in]` rounded onto its per-group min-max grid, in float32."""
    return quantize_dequantize(w.float(), _group_spec(spec, w.shape[-1]))


def _takes_block_kwargs(module: nn.Module) -> bool:
    """Attention modules need the block's masks and position embeddings; MLPs and linears take x."""
    try:
        params = pyinspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or "position_embeddings" in params


@torch.no_grad()
def _run_inspect(module: nn.Module, xs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    if _takes_block_kwargs(module):
        return [call_block(module, x, kw) for x, kw in zip(xs, kwargs)]
    outs = []
    for x in xs:
        out = module(x)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


@torch.no_grad()
def search_best_scale(linears: list[nn.Module], inspect: nn.Module, xs: list[torch.Tensor], kwargs: list[dict],
                      spec: QuantSpec, n_grid: int = 20, duo_scaling: bool = True) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale `[in]` that minimises the inspect module's output MSE, and that MSE.

    xs: the linears' common input, one `[b, L, in]` tensor per calibration chunk. Weights are left
    as they were found.
    """
    in_f = xs[0].shape[-1]
    n_tok = sum(x[..., 0].numel() for x in xs)
    x_mean = sum(x.detach().float().abs().reshape(-1, in_f).sum(0) for x in xs) / n_tok  # [in]

    originals = [linear_weight(m).detach().clone() for m in linears]
    w = torch.cat([o.float() for o in originals], dim=0)  # [sum out, in]
    g = WQLinear.spec_group_size(spec, in_f)
    wg = w.abs().reshape(w.shape[0], in_f // g, g)
    w_mean = (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)  # [in]

    ref = _run_inspect(inspect, xs, kwargs)
    n_out = sum(r.numel() for r in ref)
    best = (float("inf"), None, -1)
    try:
        for i in range(n_grid):
            a = i / n_grid
            if duo_scaling:
                s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)
            else:
                s = x_mean.pow(a)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for m, o in zip(linears, originals):
                set_linear_weight(m, pseudo_quantize_tensor(o.float() * s, spec) / s)
            out = _run_inspect(inspect, xs, kwargs)
            loss = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref)) / n_out
            if loss < best[0]:
                best = (loss, s.clone(), i)
    finally:
        for m, o in zip(linears, originals):
            set_linear_weight(m, o)
    if best[1] is None:  # every loss was NaN
        raise RuntimeError("AWQ scale search found no finite loss")
    return best[1], best[0]


@torch.no_grad()
def group_output_error(w: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over tokens of the squared error of each group's partial output: `[out, n_group]`.

    w, w_q `[out, in]`, x `[tokens, in]`.
    """
    n_g = w.shape[1] // group_size
    xg = x.float().reshape(-1, n_g, group_size).transpose(0, 1)  # [ng, T, gs]
    d = (w.float() - w_q.float()).reshape(-1, n_g, group_size).permute(1, 2, 0)  # [ng, gs, out]
    return torch.bmm(xg, d).pow(2).mean(dim=1).t()  # [out, ng]


@torch.no_grad()
def search_best_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, *, clip_grid: int = 20,
                     max_shrink: float = 0.5, n_sample_token: int = 512,
                     oc_chunk: int = 256) -> torch.Tensor:
    """Per group, the clip ratio r in (1 - max_shrink, 1] whose clamp of W to [-r max|W|, r max|W|]
    followed by rounding least changes the group's partial output: `[out, n_group]`.

    w `[out, in]`; x `[tokens, in]`, of which n_sample_token evenly spaced tokens are used.
    Vectorised over groups and output rows (rows in chunks of oc_chunk); loops over the ratios.
    """
    out_f, in_f = w.shape
    gspec = _group_spec(spec, in_f)
    gs = gspec.granularity.group_size
    step = max(1, x.shape[0] // n_sample_token)
    xs = x[::step][:n_sample_token].float()
    n_ratio = max(1, int(max_shrink * clip_grid))
    ratios = [1 - i / clip_grid for i in range(n_ratio)]
    best = torch.ones(out_f, in_f // gs, device=w.device)
    for start in range(0, out_f, oc_chunk):
        wc = w[start : start + oc_chunk].float()
        amax = wc.abs().reshape(wc.shape[0], -1, gs).amax(dim=-1, keepdim=True)  # [oc, ng, 1]
        min_err = torch.full_like(best[start : start + oc_chunk], float("inf"))
        for r in ratios:
            m = amax * r
            wclip = torch.maximum(torch.minimum(wc.reshape(wc.shape[0], -1, gs), m), -m).reshape_as(wc)
            wq = quantize_dequantize(wclip, gspec)
            err = group_output_error(wc, wq, xs, gs)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best[start : start + oc_chunk] = torch.where(better, torch.full_like(err, r), best[start : start + oc_chunk])
    return best


@torch.no_grad()
def apply_clip(module: nn.Module, ratios: torch.Tensor) -> None:
    """Clamps each group of the weight to [-r max|W|, r max|W|].

    Not the same as handing r to choose_qparams as clip_ratio: that shrinks the group's min and max
    by r each (a group in [-0.5, 1] at r = 0.8 gets [-0.4, 0.8]), while clamping keeps -0.5 (the
    range becomes [-0.5, 0.8]). The search scored the clamp, so the clamp is applied, and the
    weight is then quantized with clip_ratio 1.
    """
    w = linear_weight(module)
    out_f, in_f = w.shape
    ng = ratios.shape[1]
    wg = w.detach().float().reshape(out_f, ng, in_f // ng)
    m = wg.abs().amax(dim=-1, keepdim=True) * ratios.to(wg.device).unsqueeze(-1)
    set_linear_weight(module, torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, in_f).to(w.dtype))


class AWQ(Algorithm):
    name = "awq"
    requires_calibration = True
    propagate = "float"

    def __init__(self, spec: QuantSpec, n_grid: int = 20, duo_scaling: bool = True, clip: bool = True,
                 max_shrink: float = 0.5, clip_grid: int = 20, n_sample_token: int = 512,
                 clip_skip=("q_proj", "k_proj", "query_key_value", "c_attn"), quantize: bool = True):
        self.spec = spec
        self.n_grid = int(n_grid)
        self.duo_scaling = bool(duo_scaling)
        self.clip = bool(clip)
        self.max_shrink = float(max_shrink)
        self.clip_grid = int(clip_grid)
        self.n_sample_token = int(n_sample_token)
        self.clip_skip = tuple(clip_skip)
        # quantize=False: scale (and clip) only, leaving float nn.Linear for a later step or a test
        self.quantize = bool(quantize)
        self.last_scales: dict[str, torch.Tensor] = {}  # "model.layers.0.input_layernorm" -> s, for inspection

    def prepare(self, model, adapter) -> None:
        check_weights(model, adapter, self.spec)
        self._config = getattr(model, "config", None)

    # ---- steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def get_input_feat(self, ctx, names: list[str]) -> dict[str, list[torch.Tensor]]:
        """{linear name: one `[b, L, in]` input per calibration chunk}; linears that read one tensor
        (q/k/v) share one list."""
        shared = {}
        for group in ctx.adapter.shared_input:
            for n in group[1:]:
                if group[0] in names:
                    shared[n] = group[0]
        capture = [n for n in names if n not in shared]
        got: dict[str, list[torch.Tensor]] = {n: [] for n in capture}
        handles = []
        for n in capture:
            def hook(_m, args, _n=n):
                got[_n].append(args[0].detach())
            handles.append(get_module(ctx.block, n).register_forward_pre_hook(hook))
        try:
            ctx.forward()
        finally:
            for h in handles:
                h.remove()
        return {n: got[shared.get(n, n)] for n in names}

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise RuntimeError("AWQ needs calibration data")
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, WQLinear)}
        feats = self.get_input_feat(ctx, list(linears))
        kwargs = [ctx.kwargs(c) for c in ctx.chunks]
        config = self._config if getattr(self, "_config", None) is not None else getattr(ctx.block, "config", None)

        for pair in resolve_scaling_pairs(ctx.block, ctx.adapter, config):
            if pair.kind == "act":
                log.info("%s: skipping %s -> %s (a scale across an activation needs ScaledActivation)",
                         ctx.name, pair.prev_name, pair.linear_names)
                continue
            if any(n not in feats for n in pair.linear_names):
                continue
            xs = feats[pair.linear_names[0]]
            s, _ = search_best_scale(list(pair.linears), pair.inspect, xs, kwargs, self.spec,
                                     self.n_grid, self.duo_scaling)
            fold_scales(pair.prev, pair.linears, s, pair.kind)
            # the linears now read prev(x) / s
            scaled = [x / s.to(x.device, x.dtype) for x in xs]
            for n in pair.linear_names:
                feats[n] = scaled
            self.last_scales[f"{ctx.name}.{pair.prev_name}"] = s.cpu()

        if self.clip:
            for n, m in linears.items():
                if any(n.split(".")[-1] == k for k in self.clip_skip):
                    continue
                x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[n]])
                ratios = search_best_clip(linear_weight(m), x, self.spec, clip_grid=self.clip_grid,
                                          max_shrink=self.max_shrink, n_sample_token=self.n_sample_token)
                apply_clip(m, ratios)
        del feats

        if self.quantize:
            self.apply_quant(ctx)

    def apply_quant(self, ctx) -> None:
        for n, m in ctx.linears.items():
            if isinstance(m, WQLinear):
                continue
            w = linear_weight(m)
            q = WQLinear.from_weight(w, getattr(m, "bias", None), self.spec, name=f"{ctx.name}.{n}")
            set_module(ctx.block, n, q.to(w.device))

    def config(self) -> dict:
        return {"method": self.name, "n_grid": self.n_grid, "duo_scaling": self.duo_scaling, "clip": self.clip,
                "max_shrink": self.max_shrink, "clip_grid": self.clip_grid, "n_sample_token": self.n_sample_token,
                "clip_skip": list(self.clip_skip)}
