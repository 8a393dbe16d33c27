"""Outlier Suppression (Wei et al., 2022): gamma migration and token-wise clipping, then W8A8 with
static per-tensor activations.

Gamma migration. A norm's output is `x_hat * gamma (+ beta)`; the outlier channels of LLM
activations are largely gamma's doing (x_hat, the "non-scaling" norm output, is much flatter). So
gamma moves into the linears that read the norm: per channel j, the norm's gain becomes
sign(gamma_j) and the linears' input columns take |gamma_j| (beta becomes beta / |gamma_j|), which
`lowbit.models.fold_scales` does with s = |gamma| for every norm -> linear pair the adapter declares
(offset norms such as Gemma's `1 + w` included). The float model computes the same function
(tested); the activation that gets quantized is the flatter x_hat. Channels with |gamma| = 0 keep 1.

Token-wise clipping. The static activation range is not the calibration absmax: a few tokens hold
the extreme values, and clipping them costs less than the coarser grid they impose on all the
others. The paper's coarse stage clips at a quantile of the tokens' maxima and picks the quantile by
the quantized model's output loss; its reference implementation (wimh966/outlier_suppression,
`token_wise_clipping.py`) uses one ratio for every activation quantizer of the model, scored by the
MSE of the final output. In the block runner (one block in memory) that becomes, with
`clip_search: block` (the default): one quantile per block, from `quantiles`, every input of the
block clipped at that quantile of its own calibration tokens' absolute maxima, scored by the MSE of
the quantized block's output against the float block's on the first `block_chunks` calibration
chunks. `clip_search: layer` scores each input separately instead, by the squared error of every
linear reading it, `|| Q(X) Q(W)^T - X W^T ||^2` over up to `max_tokens` calibration tokens. The
paper's second, fine-grained stage (learning the range by gradient descent) is not done. Linears that
read one tensor (q/k/v, gate/up) share one clipping value.

`gamma_migration`: true (the paper: every foldable norm), false, or "auto": per norm, migrate only
where the clipped int8 output error of the linears it feeds (the per-layer search's) is lower with
gamma moved than without
(on Llama-like models a small gamma often sits on a channel of massive activations, and moving it
would expose that channel to the activation grid). The inputs are recorded once, before any fold:
a norm fold changes only its own linears' input, to exactly X / |gamma|.

Then every linear becomes a `W8A8Linear`: int8 weights per tensor (per channel if the recipe says
so), int8 activations on the static clipped per-tensor scale.

Measured on SmolLM2-135M (bench/w8a8.py, WikiText-2 test 40 x 512, calibration 16 x 512 tokens, one
thread under the shared lock; float perplexity 29.19):

    preset                         bits/weight   ppl     Δppl %   KL       top-1
    w8a8-naive (earlier run)       8.00          72.00   +146.7   0.9268   0.496
    w8a8-os                        8.00          54.37   +86.27   0.6240   0.588
    w8a8-os, gamma_migration auto  8.00          52.06   +78.38   0.5780   0.603
    w8a8-sq-o3 (earlier run)       8.00          43.19   +48.0    0.4252   0.638

Clipping and gamma migration recover part of what per-tensor static scales lose, SmoothQuant (with
its up_proj -> down_proj fold) more. Gamma migration only reaches the norms' outputs (q/k/v and
gate/up inputs), not down_proj's input, where the README's SmoothQuant measurements put most of the
per-tensor error on this model.
"""

from __future__ import annotations

import logging

import torch

from ..calib.runner import call_block
from ..errors import CalibrationError, SpecError
from ..kernels.int8_gemm import QMAX
from ..models import fold_scales, linear_weight, norm_offset, resolve_scaling_pairs, set_module
from ..nn import W8A8Linear
from ..nn.w8a8_linear import int8_weight
from .base import Algorithm
from .w8a8 import act_mode, check_finite_weights, weight_granularity

log = logging.getLogger(__name__)

DEFAULT_QUANTILES = (1.0, 0.99999, 0.9999, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9)


def gamma_scales(norm) -> torch.Tensor:
    """s = |gamma| `[channels]` float32 of a norm (its effective gain, offset included); a dead channel
    (gamma ~ 0) keeps 1, since dividing by ~0 would blow its input up elsewhere."""
    gamma = norm.weight.detach().float() + norm_offset(norm)
    s = gamma.abs()
    return torch.where(s > 1e-6 * float(s.max().clamp(min=1e-30)), s, torch.ones_like(s))


@torch.no_grad()
def migrate_gamma(block, adapter, config) -> dict[str, torch.Tensor]:
    """Moves every foldable norm's gamma into the linears it feeds; returns {norm name: |gamma|}."""
    out = {}
    for pair in resolve_scaling_pairs(block, adapter, config):
        if pair.kind != "norm":
            continue
        s = gamma_scales(pair.prev)
        fold_scales(pair.prev, pair.linears, s, "norm")
        out[pair.prev_name] = s.cpu()
    return out


def _fake_quant_x(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale


@torch.no_grad()
def search_clip(x: torch.Tensor, token_absmax: torch.Tensor, weights: list[torch.Tensor], wq: list[torch.Tensor],
                quantiles=DEFAULT_QUANTILES) -> tuple[float, float, list[float]]:
    """(clip value, its quantile, loss per candidate) for one input X `[T, in]` and the float / int8-
    rounded weights `[out, in]` of the linears reading it."""
    ta = token_absmax.float()
    qs = torch.tensor([float(q) for q in quantiles], dtype=torch.float32)
    cands = torch.quantile(ta, qs).tolist()
    xf = x.float()
    refs = [xf @ w.float().t() for w in weights]
    losses = []
    for c in cands:
        if c <= 0:
            losses.append(float("inf"))
            continue
        xq = _fake_quant_x(xf, c / QMAX)
        losses.append(sum(float((xq @ q.t() - r).pow(2).sum()) for q, r in zip(wq, refs)))
    i = min(range(len(cands)), key=lambda j: losses[j])
    return float(cands[i]), float(qs[i]), losses


GAMMA_MODES = (True, False, "auto")
CLIP_SEARCHES = ("block", "layer")


class OutlierSuppression(Algorithm):
    name = "outlier_suppression"
    takes_activations = True
    requires_calibration = True

    def __init__(self, spec, activations=None, gamma_migration: bool | str = True, quantiles=DEFAULT_QUANTILES,
                 clip_search: str = "block", block_chunks: int = 1, max_tokens: int = 2048, seed: int = 0):
        self.weight_granularity = weight_granularity(spec)
        if act_mode(activations) != "static":
            raise SpecError(f"Outlier Suppression calibrates static per-tensor activations (granularity tensor, "
                            f"dynamic false); the recipe has {activations}")
        if not (isinstance(gamma_migration, bool) or gamma_migration == "auto"):
            raise SpecError(f"outlier_suppression: gamma_migration must be true, false or auto, "
                            f"got {gamma_migration!r}")
        qs = list(quantiles) if isinstance(quantiles, (list, tuple)) else None
        if not qs or not all(isinstance(q, (int, float)) and 0 < q <= 1 for q in qs):
            raise SpecError(f"outlier_suppression: quantiles must be a list of numbers in (0, 1], got {quantiles!r}")
        if clip_search not in CLIP_SEARCHES:
            raise SpecError(f"outlier_suppression: clip_search must be one of {CLIP_SEARCHES}, got {clip_search!r}")
        if isinstance(block_chunks, bool) or not isinstance(block_chunks, int) or block_chunks < 1:
            raise SpecError(f"outlier_suppression: block_chunks must be a positive int, got {block_chunks!r}")
        self.clip_search, self.block_chunks = clip_search, block_chunks
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise SpecError(f"outlier_suppression: max_tokens must be a positive int, got {max_tokens!r}")
        self.gamma_migration, self.quantiles, self.max_tokens, self.seed = gamma_migration, qs, max_tokens, seed
        self.clip_log: dict[str, dict] = {}  # "model.layers.0.self_attn.q_proj" -> quantile, clip, absmax
        self.last_gammas: dict[str, torch.Tensor] = {}  # norms whose gamma was migrated -> |gamma|
        self.block_log: list[dict] = []  # clip_search "block": each block's quantile and output MSE

    def prepare(self, model, adapter) -> None:
        check_finite_weights(model, adapter)
        self._config = getattr(model, "config", None)

    def _inputs(self, ctx, names: list[str], gammas: dict[str, torch.Tensor]):
        """Sampled token rows `[<= max_tokens, in]` of each named linear's input, every token's absmax
        `[T]`, and for the inputs in `gammas` also every token's absmax of X / |gamma|."""
        n_tok = sum(c.hidden.shape[0] * c.hidden.shape[1] for c in ctx.chunks)
        keep = min(1.0, self.max_tokens / max(1, n_tok))
        gen = torch.Generator().manual_seed(self.seed + ctx.index)
        rows: dict[str, list] = {n: [] for n in names}
        tmax: dict[str, list] = {n: [] for n in names}
        tmax_m: dict[str, list] = {n: [] for n in gammas}

        def record(name, x):
            x = x.float()
            tmax[name].append(x.abs().amax(dim=1).cpu())
            if name in gammas:
                tmax_m[name].append((x / gammas[name].to(x.device)).abs().amax(dim=1).cpu())
            pick = torch.rand(x.shape[0], generator=gen) < keep
            rows[name].append(x[pick.to(x.device)].cpu())

        ctx.run_inputs(names, record)
        cat = lambda d: {n: torch.cat(v) for n, v in d.items() if v}  # noqa: E731
        return {n: v[: self.max_tokens] for n, v in cat(rows).items()}, cat(tmax), cat(tmax_m)

    def _search(self, x, tmax, weights, names, ctx_name):
        wq = []
        for n, w in zip(names, weights):
            q, s = int8_weight(w, self.weight_granularity, f"{ctx_name}.{n}")
            wq.append(q.float() * (s.reshape(-1, 1) if s.numel() > 1 else s))
        clip, quant, losses = search_clip(x, tmax, weights, wq, self.quantiles)
        return clip, quant, min(losses)

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise CalibrationError("Outlier Suppression needs calibration data (static activation scales)")
        config = getattr(self, "_config", None) or getattr(ctx.block, "config", None)
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, W8A8Linear)}
        # one clipping value per tensor read: linears sharing an input are searched together
        owner = {}
        for group in ctx.adapter.shared_input:
            present = [n for n in group if n in linears]
            for n in present:
                owner[n] = present[0]
        readers: dict[str, list[str]] = {}
        for n in linears:
            readers.setdefault(owner.get(n, n), []).append(n)
        pairs = {}  # reader head -> the norm pair feeding it
        if self.gamma_migration is not False:
            for p in resolve_scaling_pairs(ctx.block, ctx.adapter, config):
                head = owner.get(p.linear_names[0], p.linear_names[0])
                if p.kind == "norm" and head in readers and sorted(p.linear_names) == sorted(readers[head]):
                    pairs[head] = p
        gammas = {h: gamma_scales(p.prev) for h, p in pairs.items()}
        # one pass over the calibration data, before any fold: a norm fold changes only its own
        # linears' input, to exactly X / |gamma| (what `_inputs` also records the maxima of)
        xs, tmax, tmax_m = self._inputs(ctx, list(readers), gammas)
        tokens = {}  # head -> every calibration token's absmax of the input as it will be quantized
        layer_clip = {}  # head -> (clip, quantile, loss) of the per-layer search
        for head, names in readers.items():
            if head not in xs or float(tmax[head].max()) <= 0:
                raise CalibrationError(f"{ctx.name}.{head}: calibration never reached this layer with a non-zero "
                                       f"input; no static scale can be set")
            # the per-layer search is needed for a per-layer clip or to decide on gamma, else skipped
            use_moved = head in gammas and self.gamma_migration is True
            if self.clip_search == "layer" or self.gamma_migration == "auto":
                ws = [linear_weight(linears[n]).detach().float().cpu() for n in names]
                plain = moved = None
                if not use_moved:
                    plain = self._search(xs[head], tmax[head], ws, names, ctx.name)
                if head in gammas:
                    g = gammas[head].cpu()
                    moved = self._search(xs[head] / g, tmax_m[head], [w * g for w in ws], names, ctx.name)
                use_moved = moved is not None and (plain is None or moved[2] < plain[2])
                layer_clip[head] = moved if use_moved else plain
            else:
                layer_clip[head] = (None, None, None)
            tokens[head] = tmax_m[head] if use_moved else tmax[head]
            if use_moved:
                pair = pairs[head]
                fold_scales(pair.prev, pair.linears, gammas[head], "norm")
                self.last_gammas[f"{ctx.name}.{pair.prev_name}"] = gammas[head].cpu()
        if self.clip_search == "layer":
            clips = {h: (c, q) for h, (c, q, _) in layer_clip.items()}
        else:
            clips = self._block_search(ctx, linears, readers, tokens)
        for head, names in readers.items():
            clip, quant = clips[head]
            for n in names:
                self.clip_log[f"{ctx.name}.{n}"] = {"quantile": quant, "clip": clip,
                                                    "gamma_migrated": f"{ctx.name}.{pairs[head].prev_name}" in
                                                    self.last_gammas if head in pairs else False,
                                                    "layer_loss": layer_clip[head][2],
                                                    "absmax": float(tokens[head].max())}
        for n, m in self._quantized(ctx, linears, readers, {h: c for h, (c, _) in clips.items()}).items():
            set_module(ctx.block, n, m)

    def _quantized(self, ctx, linears, readers, clips: dict[str, float]) -> dict[str, W8A8Linear]:
        out = {}
        for head, names in readers.items():
            for n in names:
                m = linears[n]
                out[n] = W8A8Linear.from_weight(linear_weight(m), getattr(m, "bias", None),
                                                weight_granularity=self.weight_granularity, act_mode="static",
                                                input_scale=clips[head] / QMAX, name=f"{ctx.name}.{n}")
        return out

    @torch.no_grad()
    def _block_search(self, ctx, linears, readers, tokens) -> dict[str, tuple[float, float]]:
        """One quantile for the whole block (every input clipped at that quantile of its own tokens'
        maxima), chosen by the MSE of the quantized block's output against the float block's on the
        first `block_chunks` calibration chunks, as the reference implementation picks one ratio for
        the model by its final output."""
        chunks = ctx.chunks[: self.block_chunks]
        inputs = [(c.hidden.to(ctx.device), ctx.kwargs(c)) for c in chunks]
        want = [call_block(ctx.block, h, kw).float() for h, kw in inputs]  # the folds kept the float function
        qs = torch.tensor(self.quantiles, dtype=torch.float32)
        cands = {h: torch.quantile(t.float(), qs).tolist() for h, t in tokens.items()}
        best, best_loss = 0, float("inf")
        try:
            for i in range(len(self.quantiles)):
                for n, m in self._quantized(ctx, linears, readers, {h: c[i] for h, c in cands.items()}).items():
                    set_module(ctx.block, n, m)
                loss = sum(float((call_block(ctx.block, h, kw).float() - w).pow(2).mean())
                           for (h, kw), w in zip(inputs, want))
                if loss < best_loss:
                    best, best_loss = i, loss
        finally:
            for n, m in linears.items():
                set_module(ctx.block, n, m)
        self.block_log.append({"block": ctx.index, "quantile": self.quantiles[best], "loss": best_loss})
        return {h: (c[best], self.quantiles[best]) for h, c in cands.items()}

    def config(self) -> dict:
        clipped = sum(1 for v in self.clip_log.values() if v["quantile"] < 1.0)
        return {"method": self.name, "gamma_migration": self.gamma_migration, "weights": self.weight_granularity,
                "activations": "static", "quantiles": self.quantiles, "clip_search": self.clip_search,
                "layers_clipped": clipped,
                "norms_migrated": len(self.last_gammas)}
