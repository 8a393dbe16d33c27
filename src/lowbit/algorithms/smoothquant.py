"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights.

Activations of LLMs have a few input channels far larger than the rest, which a per-token or
per-tensor int8 grid cannot hold without crushing the small ones; weights are flat. Per input
channel j of the linears that read one tensor,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and X / s feeds W * s: the same product, with the activation's range divided and the weight's
multiplied so both quantize about as well. 1/s folds into the op that produces X (the norm
before q/k/v and gate/up; with `pairs: all` also v_proj before o_proj and up_proj before down_proj,
exact for the same reasons AWQ's folds are, see lowbit.models), so the smoothed float model
computes the same function. max|X_j| comes from calibration (lowbit.calib.stats), max|W_j| from
the linears of the pair together. alpha 0.5 is the paper's default; larger alphas move more of the
difficulty into the weights (the paper uses 0.75-0.85 for GLM-130B and Llama-like models).

This step only smooths: the linears stay `nn.Linear`; a rounding step after it (`w8a8`, GPTQ)
quantizes them. Channels that calibration never saw non-zero keep s = 1 (a fold by a tiny s would
blow them up on other inputs).

`alpha: auto` picks alpha per pair from `alpha_grid` (the way Intel Neural Compressor's SmoothQuant
auto-tunes it, here by each pair's own output): the alpha whose smoothed, int8-rounded linears
(weights on the recipe's grid, activations as the recipe quantizes them) reproduce the float
outputs on calibration tokens with the least squared error. Only calibration data is read.
On SmolLM2-135M (bench/w8a8_attribution.py, W8A8 O1 simulated, KL on 4 x 512 validation tokens held
out from the 16 x 512 calibration slices) it picks 0.65-0.9 after the norms and 0.5-0.85 after
up_proj, and KL goes 0.0103 (alpha 0.5) -> 0.0088, q/k/v's share 0.0031 -> 0.0018.

The search costs one float GEMM per pair (the reference outputs) and, per alpha, one integer GEMM
of the whole pair (its linears' int8 weights stacked; what W8A8Linear computes) on `search_tokens`
tokens sampled from the calibration set. On SmolLM2-135M's shapes (random inputs, one thread, a
busy machine): 6.0 s a block when every alpha redid both products in float32 on 2048 tokens, 2.3 s
with the reference kept and the integer GEMM; 512 tokens (the default) quarter that. 16 x 512 calibration, the whole smoothing
step: 114 s at 2048 tokens, 69 s at 512, with the same alpha for 79 of the 90 pairs (the others one
grid step away, one up_proj 0.30 against 0.50).

`objective: block` scores each alpha by the whole block's output instead, with only that pair
rounded to int8 (simulated on the float linears: x / s and W * s rounded as W8A8Linear rounds them)
and the block run on whole calibration sequences of about `search_tokens` tokens (attention needs
whole sequences): what an error in q/k/v does after the softmax, and in gate/up after the gating,
counts as it will, where the pair objective weighs every output of the pair alike. down_proj's (and
o_proj's) errors reach the block output unchanged, so there the two objectives agree up to the
sample. Cost: one block forward per alpha and pair on the sampled sequences.

`error: relative` divides each sampled token's squared error by its float output's squared norm
before summing (pair and block objectives alike): with the default `absolute`, a handful of tokens
whose outputs are hundreds of times the rest (attention sinks; BOS in Gemma) carry most of the sum
and choose alpha for everyone.

`tie_gqa: true` (with `pairs: all`) smooths v_proj -> o_proj under grouped-query attention too,
where the adapter drops the pair: the scale of o_proj's input channel (head h, d) must equal that of
(h', d) whenever h and h' read the same value head, so each value channel gets the geometric mean of
its query heads' scales and v_proj's row carries the inverse (`lowbit.models.fold_tied_scales`).

With a fixed alpha, more calibration is not better: max|X_j| only grows with more tokens, so the
scales follow the rarest tokens and the weights take more of the range than the typical token needs
(alpha 0.5, the same held-out windows: KL 0.0103 with 16 x 512, 0.0122 with 64 x 512; down_proj's
input, where single tokens reach |x| ~ 3000, and q/k/v's carry the growth).
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from ..calib.runner import call_block
from ..calib.stats import ActStats
from ..errors import SpecError
from ..kernels.int8_gemm import int8_gemm, prepare_int8, quantize_activation
from ..models import (expand_tied, fold_scales, fold_tied_scales, gqa_value_pairs, linear_weight,
                      resolve_scaling_pairs, tie_scales)
from ..nn.w8a8_linear import int8_weight
from ..quant import PerTensor, PerToken
from .base import Algorithm

log = logging.getLogger(__name__)

PAIR_KINDS = {"norm": ("norm",), "all": ("norm", "linear")}
OBJECTIVES = ("pair", "block")
ERRORS = ("absolute", "relative")
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(4, 20))  # 0.2 .. 0.95


def _token_error(y: torch.Tensor, ref: torch.Tensor, error: str) -> float:
    """Squared error of outputs `[..., features]` summed over tokens; "relative" divides each token's
    by its float output's squared norm, so that the few tokens with outputs hundreds of times the
    others' (attention sinks, BOS) do not choose alpha alone."""
    d = (y.float() - ref.float()).pow(2).sum(-1)
    if error == "relative":
        d = d / ref.float().pow(2).sum(-1).clamp(min=1e-12)
    return float(d.sum())


def _tied(s: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """o_proj-input scales made equal across the query heads that read one value head."""
    return expand_tied(tie_scales(s, n_rep, head_dim), n_rep, head_dim)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, tie=None) -> torch.Tensor:
    """s `[in]` float32 from an input's channel absmax `[in]` and the `[out_i, in]` weights reading it.
    `tie` (a v -> o pair under grouped-query attention) makes the channels that must share a scale equal."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device)
    live = (a > 0) & (w_absmax > 0)
    s = a.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where(live, s, torch.ones_like(s)).clamp(min=1e-5)
    return s if tie is None else tie(s)


def _rounded_pair(weights: list[torch.Tensor], s: torch.Tensor, weight_granularity: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's smoothed weights `W * s` as int8, stacked `[sum out_i, in]`, and a scale per row
    (a per-tensor scale repeated over its linear's rows), so one integer GEMM scores the whole pair."""
    codes, scales = [], []
    for w in weights:
        q, sc = int8_weight(w.detach().float() * s, weight_granularity)
        codes.append(q)
        scales.append(sc.reshape(-1).expand(q.shape[0]))
    return torch.cat(codes), torch.cat(scales).contiguous()


def _reference(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return x.float() @ torch.cat([w.detach().float() for w in weights]).t()


def _rounded_error(x: torch.Tensor, ref: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor],
                   alpha: float, weight_granularity: str, act: str, tie=None, error: str = "absolute") -> float:
    s = smooth_scales(act_absmax, weights, alpha, tie).to(x.device)
    qx, sx = quantize_activation((x.float() / s).contiguous(), act)
    qw, sw = _rounded_pair(weights, s, weight_granularity)
    # the product W8A8Linear computes, in int32 (a float32 matmul of the dequantized operands cost
    # 2.4-4.4x the time here and was most of the search)
    y = int8_gemm(qx, sx, prepare_int8(qw), sw)
    return _token_error(y, ref, error)


def smoothing_error(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                    weight_granularity: str = "channel", act: str = "per_token", error: str = "absolute") -> float:
    """Squared error of the linears' outputs on x `[tokens, in]` once smoothed with alpha and rounded
    to int8 (weights per `weight_granularity`, activations per `act`, as W8A8Linear rounds them:
    per token, or one scale for all of x, dynamic per tensor or a static scale calibrated as these
    tokens' absmax), against the float outputs (`error`: see `_token_error`)."""
    return _rounded_error(x, _reference(x, weights), act_absmax, weights, alpha, weight_granularity, act, error=error)


def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor],
                 grid=ALPHA_GRID, weight_granularity: str = "channel", act: str = "per_token", tie=None,
                 error: str = "absolute") -> tuple[float, dict[float, float]]:
    """The alpha of `grid` with the least `smoothing_error`, and every alpha's error."""
    ref = _reference(x, weights)  # the same float outputs for every alpha
    errs = {float(a): _rounded_error(x, ref, act_absmax, weights, float(a), weight_granularity, act, tie, error)
            for a in grid}
    return min(errs, key=errs.get), errs


def _fake_int8_pair(linears, s: torch.Tensor, weight_granularity: str, act: str):
    """Makes `linears` (float, not folded) compute what they will once s is folded and they run in
    W8A8: int8(x / s) @ int8(W * s)^T, dequantized. Returns an undo callable."""
    saved, handles = [], []

    def pre(_m, args):
        x = args[0]
        x2 = (x.reshape(-1, x.shape[-1]).float() / s).contiguous()
        q, sc = quantize_activation(x2, act)
        return ((q.float() * sc).reshape(x.shape).to(x.dtype), *args[1:])

    for lin in linears:
        w = linear_weight(lin)
        q, sc = int8_weight(w.detach().float() * s, weight_granularity)
        saved.append((w, w.detach().clone()))
        w.copy_(q.float() * sc)  # in place: a Conv1D's [out, in] weight is a view
        handles.append(lin.register_forward_pre_hook(pre))

    def undo():
        for h in handles:
            h.remove()
        for w, orig in saved:
            w.copy_(orig)
    return undo


def search_alpha_block(run, ref: list[torch.Tensor], act_absmax: torch.Tensor, linears, grid=ALPHA_GRID,
                       weight_granularity: str = "channel", act: str = "per_token", tie=None,
                       error: str = "absolute") -> tuple[float, dict[float, float]]:
    """The alpha of `grid` whose int8-rounded pair (the other linears of the block left in float)
    gives the block outputs nearest `ref` (squared error), and every alpha's error. `run()` runs the
    block on the sampled calibration sequences and returns its outputs, one per sequence."""
    weights = [linear_weight(m) for m in linears]
    errs = {}
    for a in grid:
        s = smooth_scales(act_absmax, weights, float(a), tie).to(weights[0].device)
        undo = _fake_int8_pair(linears, s, weight_granularity, act)
        try:
            outs = run()
        finally:
            undo()
        errs[float(a)] = sum(_token_error(o, r, error) for o, r in zip(outs, ref))
    return min(errs, key=errs.get), errs


class SmoothQuant(Algorithm):
    name = "smoothquant"
    requires_calibration = True
    takes_activations = True  # alpha: auto scores each alpha with the activations rounded as the recipe says

    def __init__(self, spec=None, alpha: float | str | dict = 0.5, pairs: str = "norm", alpha_grid=None,
                 search_tokens: int = 512, objective: str = "pair", activations=None, tie_gqa: bool = False,
                 error: str = "absolute"):
        # alpha: one number, "auto", or {model_type: alpha, "default": alpha} for per-model settings
        self.alpha_setting = alpha
        if pairs not in PAIR_KINDS:
            raise SpecError(f"smoothquant: pairs must be one of {sorted(PAIR_KINDS)}, got {pairs!r}")
        self.pairs = pairs
        self.alpha_grid = self._check_grid(ALPHA_GRID if alpha_grid is None else alpha_grid)
        if not isinstance(search_tokens, int) or isinstance(search_tokens, bool) or search_tokens < 1:
            raise SpecError(f"smoothquant: search_tokens must be a positive integer, got {search_tokens!r}")
        self.search_tokens = search_tokens
        if objective not in OBJECTIVES:
            raise SpecError(f"smoothquant: objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        # alpha auto scores each alpha by the pair's own outputs ("pair") or by the whole block's output
        # with that pair rounded ("block": whole calibration sequences of about search_tokens tokens,
        # since attention needs them; what q/k/v's and gate/up's errors do after softmax and gating)
        self.objective = objective
        if error not in ERRORS:
            raise SpecError(f"smoothquant: error must be one of {list(ERRORS)}, got {error!r}")
        self.error = error
        if not isinstance(tie_gqa, bool):
            raise SpecError(f"smoothquant: tie_gqa is true or false, got {tie_gqa!r}")
        # with pairs: all, v -> o under grouped-query attention too: one scale per value channel, shared
        # by the o_proj columns of the query heads that read it (their geometric mean; see lowbit.models)
        self.tie_gqa = tie_gqa
        # what the rounding step after this one will do, for the alpha search (the recipe's specs;
        # without them, W8A8 O1's: per-channel weights, per-token activations)
        self.weight_granularity = "tensor" if isinstance(getattr(spec, "granularity", None), PerTensor) else "channel"
        self.act = "per_token" if activations is None or isinstance(activations.granularity, PerToken) \
            else "per_tensor"
        self.alpha = self._alpha_for(None)
        self.last_scales: dict[str, torch.Tensor] = {}  # "model.layers.0.input_layernorm" -> s
        self.last_alphas: dict[str, float] = {}  # the same keys -> the alpha used (auto: the one chosen)

    @staticmethod
    def _check_grid(grid) -> tuple[float, ...]:
        try:
            g = tuple(float(a) for a in grid)
        except (TypeError, ValueError):
            raise SpecError(f"smoothquant: alpha_grid must be a list of numbers in [0, 1], got {grid!r}") from None
        if not g or not all(0.0 <= a <= 1.0 for a in g):
            raise SpecError(f"smoothquant: alpha_grid must be a non-empty list of numbers in [0, 1], got {grid!r}")
        return g

    def _alpha_for(self, model_type: str | None) -> float | str:
        a = self.alpha_setting
        if isinstance(a, dict):
            a = a.get(model_type, a.get("default", 0.5))
        if a == "auto":
            return "auto"
        try:
            a = float(a)
        except (TypeError, ValueError):
            raise SpecError(f"smoothquant: alpha must be a number in [0, 1] or 'auto', got {a!r}") from None
        if not 0.0 <= a <= 1.0:
            raise SpecError(f"smoothquant: alpha must be in [0, 1], got {a}")
        return a

    def prepare(self, model, adapter) -> None:
        self._config = getattr(model, "config", None)
        self.alpha = self._alpha_for(getattr(self._config, "model_type", None))

    def _record(self, ctx, names: list[str]) -> tuple[dict[str, ActStats], dict[str, torch.Tensor]]:
        """Channel maxima of each named linear's input over every calibration token and, for the alpha
        search, a seeded sample of about `search_tokens` of those tokens (the same rows for every name)."""
        stats: dict[str, ActStats] = {}
        kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        seen: dict[str, int] = {n: 0 for n in names}
        total = sum(c.hidden.shape[0] * c.hidden.shape[1] for c in ctx.chunks)
        frac = min(1.0, self.search_tokens / max(total, 1))

        def record(name, x):
            if name not in stats:
                stats[name] = ActStats.empty(x.shape[-1], x.device)
            stats[name].add(x)
            if self.alpha == "auto" and self.objective == "pair":
                k = max(1, round(x.shape[0] * frac))
                gen = torch.Generator().manual_seed(seen[name])
                rows = torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)
                kept[name].append(x.index_select(0, rows).float())
            seen[name] += 1

        ctx.run_inputs(names, record)
        return stats, {n: torch.cat(v) for n, v in kept.items() if v}

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise RuntimeError("SmoothQuant needs calibration data")
        config = getattr(self, "_config", None) or getattr(ctx.block, "config", None)
        kinds = PAIR_KINDS[self.pairs]
        pairs = [p for p in resolve_scaling_pairs(ctx.block, ctx.adapter, config) if p.kind in kinds]
        ties = {}  # id(pair) -> (n_rep, head_dim) for v -> o under grouped-query attention
        if self.tie_gqa and "linear" in kinds:
            for _, rp, n_rep, head_dim in gqa_value_pairs(ctx.block, ctx.adapter, config):
                pairs.append(rp)
                ties[id(rp)] = (n_rep, head_dim)
        if not pairs:
            return
        # One forward records every pair's input: a fold changes only its own linears' inputs
        # (prev's outputs / s times W * s), never what another pair reads.
        stats, samples = self._record(ctx, sorted({p.linear_names[0] for p in pairs}))
        if self.alpha == "auto" and self.objective == "block":
            run, ref = self._block_sample(ctx)
        for pair in pairs:
            st = stats.get(pair.linear_names[0])
            if st is None:
                log.info("%s: no calibration input reached %s; not smoothed", ctx.name, pair.linear_names)
                continue
            weights = [linear_weight(m) for m in pair.linears]
            alpha = self.alpha
            tie = None
            if id(pair) in ties:
                n_rep, head_dim = ties[id(pair)]
                tie = partial(_tied, n_rep=n_rep, head_dim=head_dim)
            if alpha == "auto" and self.objective == "block":
                alpha, errs = search_alpha_block(run, ref, st.channel_absmax, pair.linears, self.alpha_grid,
                                                 self.weight_granularity, self.act, tie, self.error)
                log.debug("%s.%s: alpha %.2f (block errors %s)", ctx.name, pair.prev_name, alpha, errs)
            elif alpha == "auto":
                alpha, errs = search_alpha(samples[pair.linear_names[0]], st.channel_absmax, weights,
                                           self.alpha_grid, self.weight_granularity, self.act, tie, self.error)
                log.debug("%s.%s: alpha %.2f (errors %s)", ctx.name, pair.prev_name, alpha, errs)
            s = smooth_scales(st.channel_absmax, weights, alpha, tie)
            if tie is None:
                fold_scales(pair.prev, pair.linears, s, pair.kind)
            else:
                fold_tied_scales(pair, tie_scales(s, n_rep, head_dim), n_rep, head_dim)
            self.last_scales[f"{ctx.name}.{pair.prev_name}"] = s.cpu()
            self.last_alphas[f"{ctx.name}.{pair.prev_name}"] = float(alpha)

    def _block_sample(self, ctx):
        """(run, ref): a function running the block on calibration sequences of about `search_tokens`
        tokens in all (whole chunks, spread evenly over the calibration set), and the block's outputs
        on them now (float: a fold keeps them)."""
        per = [c.hidden.shape[0] * c.hidden.shape[1] for c in ctx.chunks]
        n = min(len(per), max(1, -(-self.search_tokens // max(per))))
        picks = sorted({round(i * (len(per) - 1) / max(n - 1, 1)) for i in range(n)}) if n > 1 else [len(per) // 2]
        chunks = [ctx.chunks[i] for i in picks]

        def run() -> list[torch.Tensor]:
            with ctx.autocast():
                return [call_block(ctx.block, c.hidden.to(ctx.device), ctx.kwargs(c)) for c in chunks]
        return run, run()

    def config(self) -> dict:
        d = {"method": self.name, "alpha": self.alpha, "pairs": self.pairs}
        if self.tie_gqa:
            d["tie_gqa"] = True
        if self.alpha == "auto":
            d.update(alpha_grid=list(self.alpha_grid), search_tokens=self.search_tokens, objective=self.objective,
                     error=self.error, alphas=dict(self.last_alphas))
        return d
