"""AWQ: activation-aware weight quantization (Lin et al., 2023), in AutoAWQ's vocabulary.

Per decoder block:

1. `get_input_feat`: one float forward of the block over the calibration tokens, which records, for
   each distinct linear input X `[tokens, in]`, its second moment X^T X and its mean |x| per channel
   (`InputStats`). The raw features are not kept.
2. `search_best_scale` for each foldable pair (norm -> linears, linear -> linear): a per-input-channel
   scale s = x_mean^a / w_mean^(1-a), a on a grid in [0, 1), chosen by the output error with
   weights pseudo_quantize(W * s) / s. The best s is folded (prev / s, linears * s), which leaves
   the float function unchanged, and the recorded statistics are rescaled to what the linears
   now read.
3. `search_best_clip` for each linear (except q/k, whose errors the softmax reshapes): per group,
   the clip of the weight range that least changes the group's partial output. `apply_clip` clamps
   the weight itself, as AutoAWQ does (see `apply_clip`).
4. `apply_quant`: every linear becomes a WQLinear.

Where this departs from AutoAWQ, and why:

- Where a pair's error is the output of its own linears (v -> o, up -> down), it is computed from
  the second moment instead of running the layer: mean_t ||(W' - W) x_t||^2 = tr(D G D^T) / n
  with D = W' - W and G = X^T X. Exact, out x in^2 per grid point instead of tokens x in x out,
  and the whole grid is one GEMM.
- Where the pair feeds a non-linear module (q/k/v -> attention, gate/up -> MLP), AutoAWQ's
  objective is kept: that module's output error (objective="output"). The linears' own error
  there (objective="linear") measured clearly worse: SmolLM2 W4 g64, 8 x 512 calibration, ppl 34.14
  against 33.77. It runs on `output_tokens` tokens (whole sequences for attention, a stride of
  every sequence for the MLP) in bf16, where AutoAWQ runs every token in the model's dtype. On the
  same setting 512 bf16 tokens (the default) gave 33.77 in 41 s, 1024 gave 33.40 in 54 s. With the
  statistics, Cholesky and clip changes below, 512 tokens took 37.6 s at 2 threads (machine otherwise
  idle: input_feat 8.9 s, attention/MLP objective 15.7, linear objective 5.9, clip 5.1, packing 1.0;
  see `last_timings`), test ppl 33.79. Most of what is left is the attention/MLP objective, which
  already runs its GEMMs at full speed (batching the candidates measured slower), so its cost grows
  with output_tokens; a coarse grid (`grid_stride`) was not made the default because these loss
  curves have several local minima (58 of 60 pairs), and stride 3 missed the grid's best in 5 of 60.
- The clip search sees every calibration token (AutoAWQ samples 512): the per-group second moments
  cost the same whatever the token count. Only linears whose scale is scored from X^T X keep the
  whole matrix; the others keep its diagonal group blocks (group / in of the work), and the
  products run in bf16, summed in float32 (`stats_dtype`).
- `clip_mode`: "abs" is AutoAWQ's clamp to +-r max|w|; "range" and "asym" shrink the lower and
  upper ends of an asymmetric group's range (by one ratio, or each by its own), see CLIP_MODES.
- `attention_tokens` sets the attention objective's tokens apart from the MLP's (`output_tokens`).
  On the AVX2 machine (SmolLM2 W4 g64, 8 x 512, validation ppl of bench/awq_valid.py) neither more
  attention sequences nor more MLP tokens beat the preset's 28.72: attention 1024 28.77, MLP 1024
  28.72, both 1024 28.75 (100-118 s against 67 s); nor did "refine" with the whole calibration
  (top 6 of 2048 tokens 28.79, top 4 of 4096 28.86). Differences this size are the search's noise.
- `duo_scaling="both"` is llm-compressor's grid (half the points without w_mean, the identity
  among them); `grid_stride` > 1 scores a coarse subset of the grid at the module's output, then
  the points around its best.
- Pseudo-quantization is the one WQLinear stores (the range holds 0, scales rounded up to fp16), so
  the search scores exactly the weights that get packed.

- `refit`: after the clip search, that many rounds of refitting each group's scale by least squares
  to its partial output error (the clip search's objective, d G_g d^T), with the codes re-rounded on
  the new scale and kept only where the error drops (`refit_scales`). The clip search picks the
  range from a grid of ratios and the scale follows from it; the refit moves the scale off that
  grid. SmolLM2 W4 g64 8 x 512, four calibration draws: validation 27.20 -> 27.01, better on every
  draw, at no measurable cost in time. Zero points stay as the clipped range gives them (trying
  z +- 1 gained nothing on synthetic groups).
- `refit_cross`: the refit on the linear's whole output error d G d^T instead of each group's block
  of it. The groups of a row share the output, so one group's error can cancel part of another's;
  the per-group fit cannot see that. Sweeps go over the groups in order (Gauss-Seidel), each
  group's least-squares scale taking the rest of the row's current error into account, codes still
  round-to-nearest on the group's grid. It needs the whole X^T X of every linear (in^2 floats, and
  out * in^2 multiply-adds per sweep). SmolLM2 g64 8 x 512, four draws, validation: W4 27.01 -> 26.45
  (4 sweeps), W3 44.61 -> 37.86 (2 sweeps), better on every draw; Gemma-3-270m W4, two draws: the
  same mean as the per-group refit (58.77 against 58.78).

- `tie_gqa`: under grouped-query attention AutoAWQ and llm-compressor drop v -> o (a per-column
  scale on o_proj has no inverse on the narrower v_proj), which leaves o_proj with no scale at all.
  A scale shared by the o_proj columns of the n_rep query heads that read one value channel does
  fold exactly into that channel's v_proj row; its grid is AutoAWQ's, tied by geometric mean over
  those heads (`tie_scales`), scored from o_proj's X^T X like any linear pair.

Pairs of kind "act" (a scale across GELU, which needs AutoAWQ's ScaledActivation) are skipped.
The next block is fed the float block's outputs (`propagate = "float"`), as AutoAWQ does, or the
quantized block's (`propagate: quantized`, as GPTQ: the searches then see the inputs the packed
model gives). Which one wins depends on the forward dtype: SmolLM2 W4 g64 8 x 512, mean validation
ppl over four calibration draws (bench/awq_valid.py --seeds 0,1,2,3), bf16 forwards 27.33 -> 27.21,
float32 forwards 27.20 -> 27.40, each on every draw; w4a16-awq uses float32 and float.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..calib.runner import call_block
from ..calib.stats import add_product_
from ..errors import SpecError
from ..kernels import matmul_dtype
from ..kernels.fake_quant import fake_quant_clamped, fake_quant_scaled, round_groups_
from ..models import (expand_tied, fold_scales, fold_tied_scales, gqa_value_pairs, linear_weight,
                      resolve_scaling_pairs, set_linear_weight, set_module, tie_scales)
from ..nn import WQLinear
from ..quant import PerGroup, QuantSpec, quantize_dequantize
from ..quant.primitives import fp16_scale
from .base import Algorithm
from .rtn import check_weights

log = logging.getLogger(__name__)

# Elements of float32 work buffer one grid chunk may use (128 MiB): bounds memory on 7B-sized layers
# while keeping the per-chunk GEMM large enough to run at full speed on small ones.
_CHUNK_ELEMS = 32 * 2**20
# The same where the rounding runs in the fake_quant kernel: chunks that stay in the CPU's caches
# between the rounding and the products that read them (16 MiB; one candidate at least).
_FQ_CHUNK_ELEMS = 4 * 2**20


def _fq_args(spec: QuantSpec):
    """The spec for kernels.fake_quant, or None where it is not a uniform grid (codebooks: the torch
    path)."""
    return None if spec.is_codebook else spec


def _group_spec(spec: QuantSpec, in_features: int) -> QuantSpec:
    """The spec with an explicit group size (per-channel = one group of the whole row)."""
    g = WQLinear.spec_group_size(spec, in_features)
    return dataclasses.replace(spec, granularity=PerGroup(g))


def _pseudo_quantize_(w: torch.Tensor, spec: QuantSpec, group_size: int, lo: torch.Tensor | None = None,
                      hi: torch.Tensor | None = None) -> torch.Tensor:
    """Rounds float32 w `[..., in]` in place onto its per-group grid, exactly as WQLinear.from_weight
    would store it. Unchecked (callers validated the weights once): the grid search calls this on
    tens of millions of elements per block, where out-of-place ops and NaN scans cost more than
    the arithmetic. lo, hi: each group's min and max where the caller knows them (a clamp it just
    applied), shaped `[..., in / group_size, 1]`; two passes fewer."""
    if spec.is_codebook:
        w.copy_(quantize_dequantize(w, _group_spec(spec, w.shape[-1])))
        return w
    wg = w.view(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    round_groups_(wg, wg.amin(dim=-1, keepdim=True) if lo is None else lo,
                  wg.amax(dim=-1, keepdim=True) if hi is None else hi, spec)
    return w


def pseudo_quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w `[out, in]` rounded onto its per-group min-max grid, in float32 (what WQLinear would hold)."""
    gs = WQLinear.spec_group_size(spec, w.shape[-1])
    return _pseudo_quantize_(w.detach().float().clone().contiguous(), spec, gs)


@dataclass
class InputStats:
    """What the output-error objective needs of one linear input X `[n, in]`: G = X^T X (whole, or only
    its diagonal blocks of one weight group each) and sum |x|.

    Each chunk's product runs in `dtype` and is summed in float32: bf16 runs the products 2-3x faster
    here, and the objectives compare errors whose gaps are far larger than bf16's rounding of G.
    """

    gram: torch.Tensor | None  # [in, in] float32; None where only the group blocks are kept
    abs_sum: torch.Tensor  # [in] float32
    n: int = 0
    blocks: torch.Tensor | None = None  # [in / group_size, group_size, group_size] float32, or None
    dtype: torch.dtype = torch.float32

    @classmethod
    def empty(cls, in_features: int, device, group_size: int | None = None,
              dtype: torch.dtype = torch.float32) -> "InputStats":
        """group_size: keep only G's diagonal blocks of that size (all the clip search reads), which
        costs group_size / in of the whole G."""
        abs_sum = torch.zeros(in_features, device=device)
        if group_size is None:
            return cls(torch.zeros(in_features, in_features, device=device), abs_sum, dtype=dtype)
        if in_features % group_size:
            raise SpecError(f"group size {group_size} does not divide {in_features} input features")
        ng = in_features // group_size
        return cls(None, abs_sum, blocks=torch.zeros(ng, group_size, group_size, device=device), dtype=dtype)

    @classmethod
    def of(cls, x: torch.Tensor, group_size: int | None = None, dtype: torch.dtype = torch.float32) -> "InputStats":
        st = cls.empty(x.shape[-1], x.device, group_size, dtype)
        st.add(x)
        return st

    @property
    def group_size(self) -> int | None:
        return None if self.blocks is None else self.blocks.shape[-1]

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        xc = x2.to(self.dtype)
        if self.gram is not None:
            add_product_(self.gram, xc, xc)
        else:
            gs = self.blocks.shape[-1]
            xg = xc.reshape(xc.shape[0], -1, gs).transpose(0, 1)  # [ng, n, gs]
            self.blocks.add_(torch.bmm(xg.transpose(1, 2), xg))
        self.abs_sum.add_(x2.float().abs().sum(0))
        self.n += x2.shape[0]

    @property
    def x_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    def scaled(self, s: torch.Tensor) -> "InputStats":
        """The statistics of X / s (what linears read after a fold)."""
        s = s.to(self.abs_sum.device, torch.float32)
        if self.gram is not None:
            return InputStats(self.gram / torch.outer(s, s), self.abs_sum / s, self.n, dtype=self.dtype)
        sg = s.view(self.blocks.shape[0], -1)
        return InputStats(None, self.abs_sum / s, self.n, self.blocks / (sg[:, :, None] * sg[:, None, :]),
                          dtype=self.dtype)

    def group_blocks(self, group_size: int) -> torch.Tensor:
        """The diagonal blocks of G / n, one per weight group: `[in / G, G, G]`."""
        if self.gram is None:
            if group_size != self.group_size:
                raise SpecError(f"these statistics hold groups of {self.group_size}, not {group_size}")
            return self.blocks / max(self.n, 1)
        ng = self.gram.shape[0] // group_size
        g4 = self.gram.view(ng, group_size, ng, group_size)
        return g4.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous() / max(self.n, 1)


def output_error(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Sum over rows of d_r G d_r^T for d `[k, rows, in]`: k summed output errors, float32 `[k]`."""
    k = d.shape[0]
    d2 = d.reshape(-1, d.shape[-1])
    # row by row, then summed in float32: each row's bf16 rounding is independent, so the k totals
    # keep float32-like relative accuracy (and a bf16 sum with a float32 accumulator is 2.5x slower)
    return torch.linalg.vecdot(d2 @ gram, d2).float().reshape(k, -1).sum(-1)


def gram_factor(gram: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor L of G (+ 1e-6 of its mean diagonal, for a G of deficient rank), so that
    d G d^T = ||d L||^2; None where G is not positive definite even so."""
    jitter = 1e-6 * float(gram.diagonal().mean().clamp(min=1e-30))
    L, info = torch.linalg.cholesky_ex(gram.float() + jitter * torch.eye(gram.shape[0], device=gram.device))
    return L if int(info) == 0 else None


def output_error_tri(d: torch.Tensor, L: torch.Tensor, n_blocks: int = 6) -> torch.Tensor:
    """`output_error` from G's Cholesky factor: sum of ||d_r L||^2 `[k]`, float32. L is lower
    triangular, so column block j of d L reads only d's columns from block j on: (B + 1) / 2B of
    the full product's work (about half, measured 2x faster than d G d^T here)."""
    k, in_f = d.shape[0], d.shape[-1]
    d2 = d.reshape(-1, in_f)
    edges = [round(i * in_f / n_blocks) for i in range(n_blocks + 1)]
    total = torch.zeros(k, device=d.device)
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            y = d2[:, a:] @ L[a:, a:b]
            total += y.float().pow_(2).reshape(k, -1).sum(-1)
    return total


def scale_grid(w: torch.Tensor, x_mean: torch.Tensor, group_size: int, n_grid: int = 20,
               duo_scaling: bool | str = True) -> torch.Tensor:
    """AutoAWQ's candidate scales `[n_grid, in]`: s = x_mean^a / w_mean^(1-a) for a = i / n_grid,
    normalised so that max(s) * min(s) = 1. w_mean is the mean over rows of |w| / max|w| of its group.

    duo_scaling False: s = x_mean^a. "both" (llm-compressor's option): n_grid / 2 values of a
    spanning [0, 1], each with and without w_mean (so the identity, a = 0 without, is a candidate)."""
    out_f, in_f = w.shape
    wg = w.abs().reshape(out_f, in_f // group_size, group_size)
    w_mean = (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(out_f, in_f).mean(0)
    if duo_scaling == "both":
        half = max(2, n_grid // 2)
        grid = torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1)
        s_all = torch.cat([x_mean.pow(grid[:, None]).expand(half, in_f),
                           x_mean.pow(grid[:, None]) / (w_mean.pow(1 - grid[:, None]) + 1e-4)])
    elif duo_scaling:
        grid = torch.arange(n_grid, dtype=torch.float32, device=w.device) / n_grid
        s_all = x_mean.pow(grid[:, None]) / (w_mean.pow(1 - grid[:, None]) + 1e-4)
    else:
        grid = torch.arange(n_grid, dtype=torch.float32, device=w.device) / n_grid
        s_all = x_mean.pow(grid[:, None]).expand(n_grid, in_f)
    s_all = s_all.clamp(min=1e-4)
    return s_all / (s_all.amax(dim=1, keepdim=True) * s_all.amin(dim=1, keepdim=True)).sqrt()


@torch.no_grad()
def search_best_scale(weights: list[torch.Tensor], stats: InputStats, spec: QuantSpec, n_grid: int = 20,
                      duo_scaling: bool = True, loss_dtype: torch.dtype = torch.bfloat16,
                      candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-input-channel scale `[in]` minimising the linears' summed output MSE, and every grid
    point's MSE `[n_grid]` (per token and output).

    weights: the `[out_i, in]` weights that read the input described by `stats`. The error of grid
    point a is tr(D G D^T) / n with D = pseudo_quantize(W s_a) / s_a - W, all rows stacked, computed
    as ||D L||^2 from G's Cholesky factor (`output_error_tri`, half the work of D G) in `loss_dtype`
    (bf16 GEMMs run 2-4x faster here than fp32; the relative error of a loss that sums millions of
    terms stays far below the gaps between grid points). candidates `[k, in]`: score these instead
    of `scale_grid`'s (the grid of a tied pair, `tie_scales`).
    """
    w = torch.cat([t.detach().float() for t in weights], dim=0)  # [O, in]
    out_f, in_f = w.shape
    gs = WQLinear.spec_group_size(spec, in_f)
    if stats.gram is None:
        raise RuntimeError("search_best_scale needs the whole second moment X^T X (InputStats with group_size None)")
    s_all = scale_grid(w, stats.x_mean.to(w.device), gs, n_grid, duo_scaling) if candidates is None else candidates
    n_grid = s_all.shape[0]
    gram = (stats.gram / max(stats.n, 1)).to(w.device)
    L = gram_factor(gram)
    factor = (L if L is not None else gram).to(loss_dtype)

    losses = torch.empty(n_grid)
    fq = _fq_args(spec)
    k = max(1, min(n_grid, (_CHUNK_ELEMS if fq is None else _FQ_CHUNK_ELEMS) // w.numel()))
    buf = torch.empty(k, out_f, in_f, device=w.device)
    for start in range(0, n_grid, k):
        s = s_all[start : start + k, None, :]  # [kk, 1, in]
        if fq is not None:
            d = fake_quant_scaled(w, s[:, 0], gs, fq, subtract=True, out=buf)
        else:
            d = torch.mul(w, s, out=buf[: s.shape[0]])
            _pseudo_quantize_(d, spec, gs).div_(s).sub_(w)
        dd = d.to(loss_dtype)
        losses[start : start + s.shape[0]] = (output_error_tri(dd, factor) if L is not None
                                              else output_error(dd, factor)).cpu()
    losses /= out_f
    finite = torch.isfinite(losses)
    if not bool(finite.any()):
        raise RuntimeError("AWQ scale search found no finite loss")
    best = int(torch.where(finite, losses, torch.full_like(losses, float("inf"))).argmin())
    return s_all[best].clone(), losses


def _inspect_outputs(module: nn.Module, xs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    if _takes_block_kwargs(module):
        return [call_block(module, x, kw) for x, kw in zip(xs, kwargs)]
    outs = []
    for x in xs:
        out = module(x)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def _takes_block_kwargs(module: nn.Module) -> bool:
    """Attention modules need the block's masks and position embeddings; MLPs take x alone."""
    try:
        params = pyinspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or "position_embeddings" in params


def _slice_batch(obj, b: int, k: int):
    """The first k sequences of a block's kwargs: tensors whose first dim is the batch b are cut."""
    if isinstance(obj, torch.Tensor):
        return obj[:k] if obj.dim() >= 1 and obj.shape[0] == b and b != 1 else obj
    if isinstance(obj, dict):
        return {key: _slice_batch(v, b, k) for key, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice_batch(v, b, k) for v in obj)
    return obj


def subsample_inputs(inspect: nn.Module, xs: list[torch.Tensor], kwargs: list[dict],
                     max_tokens: int | None) -> tuple[list[torch.Tensor], list[dict]]:
    """At most ~max_tokens of the inspect module's inputs: whole sequences for attention (it mixes
    tokens), evenly strided tokens from every sequence for token-wise modules (MLPs)."""
    total = sum(x[..., 0].numel() for x in xs)
    if max_tokens is None or total <= max_tokens:
        return xs, kwargs
    if not _takes_block_kwargs(inspect):
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        return [flat[:: max(1, total // max_tokens)][:max_tokens].unsqueeze(0)], [{}]
    out_x, out_kw, have = [], [], 0
    for x, kw in zip(xs, kwargs):
        seqlen = x.shape[1]
        k = min(x.shape[0], max(1, -(-(max_tokens - have) // seqlen)))
        out_x.append(x[:k])
        out_kw.append(_slice_batch(kw, x.shape[0], k))
        have += k * seqlen
        if have >= max_tokens:
            break
    return out_x, out_kw


class _ModuleObjective:
    """The `inspect` module's output error for candidate weights of its linears: set up once (the
    module in `compute_dtype`, its reference outputs), then scored for any subset of candidates.
    Use as a context manager: the module's parameters are restored exactly on exit."""

    def __init__(self, linears: list[nn.Module], inspect: nn.Module, xs: list[torch.Tensor], kwargs: list[dict],
                 spec: QuantSpec, compute_dtype: torch.dtype | None):
        self.linears, self.inspect, self.kwargs, self.spec = linears, inspect, kwargs, spec
        originals = [linear_weight(m).detach().float() for m in linears]
        self.rows = [o.shape[0] for o in originals]
        self.w = torch.cat(originals)
        self.gs = WQLinear.spec_group_size(spec, self.w.shape[1])
        self.cdt = compute_dtype or torch.float32
        self.amp = (torch.autocast(xs[0].device.type, dtype=self.cdt) if self.cdt != torch.float32
                    else nullcontext())
        self.xs = xs
        self.saved: list = []

    def __enter__(self):
        self.saved = [(p, p.data) for p in self.inspect.parameters()]
        for p in self.inspect.parameters():
            p.data = p.data.to(self.cdt, copy=True)  # a copy even in float32: the search writes into it
        self.xs = [x.to(self.cdt) for x in self.xs]
        with self.amp:
            self.ref = _inspect_outputs(self.inspect, self.xs, self.kwargs)
        self.n_out = sum(r.numel() for r in self.ref)
        return self

    def __exit__(self, *exc):
        for p, data in self.saved:
            p.data = data

    def losses(self, candidates: torch.Tensor) -> torch.Tensor:
        """Output MSE `[k]` of the linears rounded at each candidate scale `[k, in]`."""
        out_f, in_f = self.w.shape
        losses = torch.full((candidates.shape[0],), float("inf"))
        fq = _fq_args(self.spec)
        # one candidate at a time where the kernel rounds: its weights are still in cache for the forward
        k = 1 if fq is not None else max(1, min(candidates.shape[0], _CHUNK_ELEMS // self.w.numel()))
        buf = torch.empty(k, out_f, in_f, device=self.w.device)
        for start in range(0, candidates.shape[0], k):
            s = candidates[start : start + k, None, :]
            if fq is not None:
                wq = fake_quant_scaled(self.w, s[:, 0], self.gs, fq, out=buf)
            else:
                wq = torch.mul(self.w, s, out=buf[: s.shape[0]])
                _pseudo_quantize_(wq, self.spec, self.gs).div_(s)
            for j in range(s.shape[0]):
                for m, part in zip(self.linears, wq[j].split(self.rows)):
                    set_linear_weight(m, part)
                with self.amp:
                    out = _inspect_outputs(self.inspect, self.xs, self.kwargs)
                losses[start + j] = sum(float((a.float() - r.float()).pow(2).sum())
                                        for a, r in zip(out, self.ref)) / self.n_out
        return losses


def _argmin_finite(losses: torch.Tensor) -> int:
    finite = torch.isfinite(losses)
    if not bool(finite.any()):
        raise RuntimeError("AWQ scale search found no finite loss")
    return int(torch.where(finite, losses, torch.full_like(losses, float("inf"))).argmin())


@torch.no_grad()
def search_best_scale_output(linears: list[nn.Module], inspect: nn.Module, xs: list[torch.Tensor],
                             kwargs: list[dict], candidates: torch.Tensor, spec: QuantSpec,
                             compute_dtype: torch.dtype | None = None, coarse: int = 1
                             ) -> tuple[int, torch.Tensor]:
    """AutoAWQ's objective: the index of the candidate scale `[k, in]` whose rounded linears least
    change the `inspect` module's output (the attention or the MLP), and the k losses (NaN where a
    candidate was not scored).

    With `compute_dtype` bf16 the module runs in bf16 (its reference output too), which is 2-4x
    faster here; the candidates' weights are rounded in float32 as they will be stored. The
    module's parameters are restored exactly afterwards. (Running several candidates in one
    forward, as a batch of candidate-major copies through bmm'd linears, measured slower here
    than one forward per candidate: at 512-1024 tokens the GEMMs already run at full speed.)

    coarse > 1: the candidates are a path in a (ordered by the grid's exponent), and only every
    coarse-th one is scored, then the unscored ones between the best and its scored neighbours:
    the full grid's choice wherever the loss has a single minimum along the path, for about
    k / coarse + 2 (coarse - 1) module forwards instead of k.
    """
    n = candidates.shape[0]
    with _ModuleObjective(linears, inspect, xs, kwargs, spec, compute_dtype) as obj:
        if coarse <= 1 or n <= 2 * coarse:
            losses = obj.losses(candidates)
            return _argmin_finite(losses), losses
        losses = torch.full((n,), float("nan"))
        idx = torch.arange(0, n, coarse)
        if int(idx[-1]) != n - 1:
            idx = torch.cat([idx, torch.tensor([n - 1])])
        losses[idx] = obj.losses(candidates[idx])
        best = int(idx[_argmin_finite(losses[idx])])
        near = torch.tensor([i for i in range(max(0, best - coarse + 1), min(n, best + coarse))
                             if bool(losses[i].isnan())], dtype=torch.long)
        if near.numel():
            losses[near] = obj.losses(candidates[near])
    return _argmin_finite(torch.nan_to_num(losses, nan=float("inf"))), losses


def group_output_error(w: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over tokens of the squared error of each group's partial output: `[out, n_group]`.

    w, w_q `[out, in]`, x `[tokens, in]`. The direct definition; the search uses `InputStats`.
    """
    n_g = w.shape[1] // group_size
    xg = x.float().reshape(-1, n_g, group_size).transpose(0, 1)  # [ng, T, gs]
    d = (w.float() - w_q.float()).reshape(-1, n_g, group_size).permute(1, 2, 0)  # [ng, gs, out]
    return torch.bmm(xg, d).pow(2).mean(dim=1).t()  # [out, ng]


# How the clip search shrinks a group's range [lo, hi] (lo <= 0 <= hi) by ratios r:
# "abs": clamp to [-r m, r m] with m = max|w| (AutoAWQ: only the side that reaches m is cut);
# "range": clamp to [r lo, r hi] (both sides by the same r);
# "asym": both sides by their own ratio: the best "range" r, then the best upper ratio with the lower
#   one held, then the best lower ratio with the upper one held (each pass keeps the previous choice
#   among its candidates, so no pass raises a group's error).
CLIP_MODES = ("abs", "range", "asym")


def _clip_bounds(wf: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The unclipped (lo, hi) `[..., 1]` each ratio multiplies, of groups wf `[..., G]`."""
    if mode == "abs":
        m = wf.abs().amax(dim=-1, keepdim=True)
        return -m, m
    return wf.amin(dim=-1, keepdim=True).clamp(max=0), wf.amax(dim=-1, keepdim=True).clamp(min=0)


@torch.no_grad()
def search_best_clip(w: torch.Tensor, stats: InputStats, spec: QuantSpec, *, clip_grid: int = 20,
                     max_shrink: float = 0.5, mode: str = "abs") -> torch.Tensor:
    """Per group, the clip ratio r in (1 - max_shrink, 1] whose clamp of W (see CLIP_MODES) followed
    by rounding least changes the group's partial output: `[out, n_group]`, or `[out, n_group, 2]`
    (lower, upper ratio) for mode "asym".

    The partial-output error of a group is d G_g d^T / n with G_g the group's diagonal block of
    X^T X, so all ratios and groups are scored with batched `[G, G]` products and no token loop.
    The work is laid out group-major (`[n_group, ratio, out, G]`), which is what the batched
    product reads, so nothing is permuted per ratio.
    """
    if mode not in CLIP_MODES:
        raise SpecError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    out_f, in_f = w.shape
    gs = WQLinear.spec_group_size(spec, in_f)
    ng = in_f // gs
    n_ratio = max(1, int(max_shrink * clip_grid))
    ratios = torch.tensor([1 - i / clip_grid for i in range(n_ratio)], device=w.device)
    blocks = stats.group_blocks(gs).to(w.device)  # [ng, gs, gs]
    wg = w.detach().float().reshape(out_f, ng, gs).transpose(0, 1).contiguous().unsqueeze(1)  # [ng, 1, out, gs]
    lo, hi = _clip_bounds(wg, mode)  # [ng, 1, out, 1]
    wmin, wmax = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    fq = _fq_args(spec)
    k = max(1, min(n_ratio, (_CHUNK_ELEMS if fq is None else _FQ_CHUNK_ELEMS) // w.numel()))
    flat = torch.empty(k * w.numel(), device=w.device)
    w3 = wg[:, 0]  # [ng, out, gs]

    def best(lo_r: torch.Tensor | None, hi_r: torch.Tensor | None) -> torch.Tensor:
        """The best ratio per group `[out, ng]` for the side(s) whose fixed ratio `[out, ng]` is None."""
        errs = torch.empty(n_ratio, out_f, ng, device=w.device)
        for start in range(0, n_ratio, k):
            r = ratios[start : start + k]
            kk = r.shape[0]
            r4 = r.view(1, kk, 1, 1)
            lo_b = lo * (r4 if lo_r is None else lo_r.t().reshape(ng, 1, out_f, 1))
            hi_b = hi * (r4 if hi_r is None else hi_r.t().reshape(ng, 1, out_f, 1))
            lo_b, hi_b = lo_b.expand(ng, kk, out_f, 1), hi_b.expand(ng, kk, out_f, 1)
            if fq is not None:
                d = fake_quant_clamped(w3, lo_b[..., 0], hi_b[..., 0], fq, out=flat)
            else:
                d = flat[: kk * w.numel()].view(ng, kk, out_f, gs)
                torch.clamp(wg, min=lo_b, max=hi_b, out=d)
                # the clamped group's min and max, known without a pass over it
                _pseudo_quantize_(d, spec, gs, torch.maximum(wmin, lo_b)[..., None],
                                  torch.minimum(wmax, hi_b)[..., None])
                d.sub_(wg)
            dg = d.view(ng, kk * out_f, gs)
            e = torch.bmm(dg, blocks).mul_(dg).sum(-1)  # [ng, kk*out]
            errs[start : start + kk] = e.view(ng, kk, out_f).permute(1, 2, 0)
        # ties keep the larger ratio (less clipping): argmin returns the first minimum
        return ratios[errs.argmin(dim=0)]

    r = best(None, None)
    if mode != "asym":
        return r
    r_hi = best(r, None)
    r_lo = best(None, r_hi)
    return torch.stack([r_lo, r_hi], dim=-1)


@torch.no_grad()
def apply_clip(module: nn.Module, ratios: torch.Tensor, mode: str = "abs") -> None:
    """Clamps each group of the weight to its clipped range (CLIP_MODES; ratios from search_best_clip).

    Not the same as handing r to choose_qparams as clip_ratio: that shrinks the group's min and max
    by r each, while "abs" clamping (AutoAWQ's) keeps a group's smaller side (a group in [-0.5, 1]
    at r = 0.8 becomes [-0.5, 0.8]). The search scored the clamp, so the clamp is applied, and the
    weight is then quantized with clip_ratio 1.
    """
    w = linear_weight(module)
    out_f, in_f = w.shape
    ng = ratios.shape[1]
    wg = w.detach().float().reshape(out_f, ng, in_f // ng)
    lo, hi = _clip_bounds(wg, mode)
    r = ratios.to(wg.device)
    r_lo, r_hi = (r[..., 0], r[..., 1]) if mode == "asym" else (r, r)
    clamped = torch.maximum(torch.minimum(wg, hi * r_hi.unsqueeze(-1)), lo * r_lo.unsqueeze(-1))
    set_linear_weight(module, clamped.reshape(out_f, in_f).to(w.dtype))


@torch.no_grad()
def refit_scales(w: torch.Tensor, w_clip: torch.Tensor, blocks: torch.Tensor, spec: QuantSpec,
                 passes: int = 2, name: str = "", gram: torch.Tensor | None = None,
                 cross_weight: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scales `[out, n_group]` and zero points of w `[out, in]` on its groups' grids: the
    min-max grid of the clipped w_clip (what WQLinear.from_weight would store), then `passes` rounds
    of: each group's scale refitted by least squares to the group's partial output, d G_g d^T with
    G_g its block of X^T X (`blocks` [n_group, G, G], as search_best_clip scores), keeping the codes
    and zero point; the codes rounded again on the new scale. A group takes a round's result only
    where its error went down, so no group ends worse than the clip search left it. With `gram`
    (X^T X / n, `[in, in]`) the fit is on the linear's whole output error instead (_refit_cross),
    the cross-group terms weighted by `cross_weight`.
    """
    q, qp = WQLinear.round_weight(w_clip, spec, name=name)
    if spec.is_codebook or passes < 1:
        return q, qp.scale, qp.zero_point
    out_f, in_f = w.shape
    ng = qp.scale.reshape(out_f, -1).shape[1]
    gs = in_f // ng

    def grouped(t):  # [out, in] -> [ng, out, G]
        return t.float().reshape(out_f, ng, gs).transpose(0, 1)

    wg, qg = grouped(w), grouped(q)
    s = qp.scale.reshape(out_f, ng).t().unsqueeze(-1)  # [ng, out, 1]
    z = torch.zeros_like(s) if qp.zero_point is None else qp.zero_point.reshape(out_f, ng).t().unsqueeze(-1)
    if gram is not None:
        s, qg = _refit_cross(wg, qg, s, z, gram.to(w.device, torch.float32), spec, passes, cross_weight)
    else:
        blocks = blocks.to(w.device, torch.float32)

        def error(scale, codes):
            d = wg - scale * (codes - z)
            return torch.bmm(d, blocks).mul_(d).sum(-1)  # [ng, out]

        best = error(s, qg)
        for _ in range(passes):
            s_new, q_new = _ls_rescale(wg, qg, z, s, blocks, spec)
            e_new = error(s_new, q_new)
            take = e_new < best
            s = torch.where(take.unsqueeze(-1), s_new, s)
            qg = torch.where(take.unsqueeze(-1), q_new, qg)
            best = torch.where(take, e_new, best)
    codes = qg.transpose(0, 1).reshape(out_f, in_f).to(q.dtype)
    zeros = None if qp.zero_point is None else z.squeeze(-1).t().reshape(qp.zero_point.shape)
    return codes, s.squeeze(-1).t().reshape(qp.scale.shape), zeros


def _ls_rescale(wg, codes, z, s, G, spec, other=None):
    """One least-squares step on grids of w `[..., out, G]`: the scale minimising (w - s u) G (.)^T
    (+ 2 (w - s u) . other) with u = codes - z, rounded to fp16 (the old scale where the fit is not
    positive), and the codes rounded again on it."""
    u = codes - z
    hu = u @ G
    num = (hu * wg).sum(-1, keepdim=True)
    if other is not None:
        num = num + (u * other).sum(-1, keepdim=True)
    den = (hu * u).sum(-1, keepdim=True)
    ok = (num > 0) & (den > 0)
    s_new = fp16_scale(torch.where(ok, num / torch.where(ok, den, 1.0), s))
    return s_new, torch.clamp(torch.round(wg / s_new) + z, spec.qmin, spec.qmax)


def _refit_cross(wg, qg, s, z, gram, spec, passes, weight=1.0):
    """refit_scales on the whole output error d G d^T (G `[in, in]` = X^T X / n): `passes` sweeps over
    the groups in order, each group's scale fitted by least squares with the other groups' current
    error held (the cross terms d_g G_gh d_h^T that the per-group fit ignores), its codes re-rounded
    to nearest, and the result kept per row only where the whole row's error drops. `weight` < 1
    shrinks the cross terms towards the per-group fit (G's off-diagonal blocks times weight).
    Returns the scales and codes, grouped as given."""
    ng, out_f, gs = wg.shape
    s, qg = s.float().clone(), qg.clone()
    g4 = gram.view(ng, gs, ng, gs)
    d = (wg - s * (qg - z)).transpose(0, 1).reshape(out_f, ng * gs)  # [out, in]
    for _ in range(passes):
        for g in range(ng):
            sl = slice(g * gs, (g + 1) * gs)
            G_gg = g4[g, :, g, :]
            dg = d[:, sl]
            # [out, gs]: the rest of the row's error as group g sees it, times `weight`
            other = (d @ gram[:, sl] - dg @ G_gg).mul_(weight)

            def part(e):  # the terms of the row's error that involve group g
                return ((e @ G_gg) * e).sum(-1) + 2 * (e * other).sum(-1)

            s_new, q_new = _ls_rescale(wg[g], qg[g], z[g], s[g], G_gg, spec, other)
            d_new = wg[g] - s_new * (q_new - z[g])
            take = (part(d_new) < part(dg)).unsqueeze(-1)
            s[g] = torch.where(take, s_new, s[g])
            qg[g] = torch.where(take, q_new, qg[g])
            d[:, sl] = torch.where(take, d_new, dg)
    return s, qg


def _nonlinear_inspect(pair) -> bool:
    """Whether the pair is scored at a module other than its own linears (attention, MLP)."""
    return not any(pair.inspect is m for m in pair.linears)


class AWQ(Algorithm):
    name = "awq"
    requires_calibration = True
    propagate = "float"
    # get_input_feat's forward runs on the untouched block, so it doubles as the float forward
    # whose outputs feed the next block: the runner need not run one of its own.
    records_float_outputs = True

    def __init__(self, spec: QuantSpec, n_grid: int = 20, duo_scaling: bool = True, clip: bool = True,
                 max_shrink: float = 0.5, clip_grid: int = 20,
                 clip_skip=("q_proj", "k_proj", "query_key_value", "c_attn"), quantize: bool = True,
                 loss_dtype: str = "bfloat16", objective: str = "output", refine_topk: int = 3,
                 output_tokens: int | None = 512, output_dtype: str = "bfloat16", clip_mode: str = "abs",
                 stats_dtype: str = "bfloat16", forward_dtype: str = "float32", grid_stride: int = 1,
                 propagate: str = "float", tie_gqa: bool = False, attention_tokens: int | None = None,
                 refit: int = 0, refit_cross: float = 0.0):
        self.spec = spec
        # > 0: after the clip search, that many least-squares refits of each group's scale (refit_scales)
        if int(refit) < 0:
            raise SpecError(f"refit must be a number of passes >= 0, got {refit!r}")
        self.refit = int(refit)
        # the refit on the whole X^T X instead of its group blocks: a weight in [0, 1] on the
        # cross-group terms (true = 1; 0 = the per-group refit)
        try:
            rc = float(refit_cross)
        except (TypeError, ValueError):
            rc = -1.0
        if not 0.0 <= rc <= 1.0:
            raise SpecError(f"refit_cross must be a weight in [0, 1] (or true/false), got {refit_cross!r}")
        self.refit_cross = rc
        # v -> o under grouped-query attention (which AutoAWQ and llm-compressor skip): one scale per
        # value channel, shared by the o_proj columns of the query heads that read it
        self.tie_gqa = bool(tie_gqa)
        # what the next block is calibrated on: the float block's outputs (AutoAWQ), or the quantized
        # block's ("quantized", as GPTQ: the searches then see the inputs the packed model will give)
        if propagate not in ("float", "quantized"):
            raise SpecError(f"propagate must be 'float' or 'quantized', got {propagate!r}")
        self.propagate = propagate
        self.n_grid = int(n_grid)
        if duo_scaling not in (True, False, "both"):
            raise SpecError(f"duo_scaling must be true, false or 'both', got {duo_scaling!r}")
        self.duo_scaling = duo_scaling
        self.clip = bool(clip)
        self.max_shrink = float(max_shrink)
        self.clip_grid = int(clip_grid)
        self.clip_skip = tuple(clip_skip)
        if clip_mode not in CLIP_MODES:
            raise SpecError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        self.clip_mode = clip_mode
        # quantize=False: scale (and clip) only, leaving float nn.Linear for a later step or a test
        self.quantize = bool(quantize)
        for key, val in (("loss_dtype", loss_dtype), ("stats_dtype", stats_dtype), ("forward_dtype", forward_dtype),
                         ("output_dtype", output_dtype)):
            if val not in ("bfloat16", "float32"):
                raise SpecError(f"{key} must be 'bfloat16' or 'float32', got {val!r}")
        self.loss_dtype = loss_dtype
        # the dtype of the X^T X products (summed in float32), and of the float forward that records
        # them and feeds the next block (the runner reads forward_dtype as a torch dtype)
        self.stats_dtype = stats_dtype
        self.forward_dtype = getattr(torch, forward_dtype)
        # Where a pair's scale is scored when its linears feed a non-linear module (attention, MLP):
        # "linear": the linears' own outputs (exact, from second moments); "output": that module's
        # output, every grid point (AutoAWQ); "refine": rank by "linear", re-score the best
        # refine_topk at the module's output.
        if objective not in ("linear", "output", "refine"):
            raise ValueError(f"objective must be 'linear', 'output' or 'refine', got {objective!r}")
        self.objective = objective
        self.refine_topk = int(refine_topk)
        # the "output" objective's cost: tokens it runs through the module, and the dtype it runs in
        self.output_tokens = None if output_tokens is None else int(output_tokens)
        # the same for modules that mix tokens (attention), which take whole sequences; None: output_tokens
        self.attention_tokens = None if attention_tokens is None else int(attention_tokens)
        self.output_dtype = output_dtype
        # > 1: the module-output objective scores every grid_stride-th grid point, then the points
        # around the best (search_best_scale_output's `coarse`); 1 scores all, as AutoAWQ
        if int(grid_stride) < 1:
            raise SpecError(f"grid_stride must be at least 1, got {grid_stride!r}")
        self.grid_stride = int(grid_stride)
        self.last_scales: dict[str, torch.Tensor] = {}  # "model.layers.0.input_layernorm" -> s, for inspection
        self.last_losses: dict[str, torch.Tensor] = {}  # same keys -> the grid's losses
        self.last_timings: dict[str, float] = {}  # phase -> seconds summed over blocks (where the time goes)

    def prepare(self, model, adapter) -> None:
        check_weights(model, adapter, self.spec)
        self._config = getattr(model, "config", None)

    # ---- steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def get_input_feat(self, ctx, names: list[str], keep: tuple[str, ...] = (),
                       full: tuple[str, ...] | None = None) -> dict[str, InputStats]:
        """{linear name: InputStats of its input} from one float forward of the block; linears that
        read one tensor (q/k/v) share one object. Leaves the block's outputs in ctx.float_outputs,
        and the raw inputs of the linears in `keep` in self._raw {name: [chunk inputs]}. Linears
        in `full` (all, where None) get the whole second moment, the others its diagonal group
        blocks only (what the clip search reads)."""
        shared = {}
        for group in ctx.adapter.shared_input:
            for n in group[1:]:
                if group[0] in names:
                    shared[n] = group[0]
        capture = [n for n in names if n not in shared]
        whole = None if full is None else {shared.get(n, n) for n in full}
        stats_dtype = matmul_dtype(getattr(torch, self.stats_dtype), ctx.device)
        got: dict[str, InputStats] = {}

        self._raw = {n: [] for n in keep}
        chunk_shapes = [c.hidden.shape[:-1] for c in ctx.chunks]

        def record(name, x):
            if name in self._raw:
                self._raw[name].append(x.reshape(*chunk_shapes[len(self._raw[name])], x.shape[-1]))
            if name not in got:
                gs = None if whole is None or name in whole else WQLinear.spec_group_size(self.spec, x.shape[-1])
                got[name] = InputStats.empty(x.shape[-1], x.device, gs, stats_dtype)
            got[name].add(x)

        with ctx.hook_inputs(capture, record):
            outs = ctx.forward()
        if ctx.float_outputs is None:
            ctx.float_outputs = outs
        return {n: got[shared.get(n, n)] for n in names}

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise RuntimeError("AWQ needs calibration data")
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, WQLinear)}
        config = self._config if getattr(self, "_config", None) is not None else getattr(ctx.block, "config", None)
        pairs = resolve_scaling_pairs(ctx.block, ctx.adapter, config)
        ties = {}  # id(pair) -> (n_rep, head_dim) for v -> o under grouped-query attention
        if self.tie_gqa:
            for _, rp, n_rep, head_dim in gqa_value_pairs(ctx.block, ctx.adapter, config):
                pairs.append(rp)
                ties[id(rp)] = (n_rep, head_dim)
            order = {p: i for i, p in enumerate(ctx.adapter.scaling_pairs)}
            pairs.sort(key=lambda rp: order[rp.pair])
        keep = ()
        if self.objective != "linear":
            keep = tuple(p.linear_names[0] for p in pairs if p.kind != "act" and _nonlinear_inspect(p))
        # the whole X^T X only where a scale is scored from it; the clip search reads its group blocks
        full = tuple(n for p in pairs if p.kind != "act" and (self.objective != "output" or not _nonlinear_inspect(p))
                     for n in p.linear_names)
        refit_cross = bool(self.refit and self.refit_cross and self.quantize and not self.spec.is_codebook)
        if refit_cross:  # the refit reads every linear's whole X^T X
            full = None
        tick = time.perf_counter()
        feats = self.get_input_feat(ctx, list(linears), keep, full)
        tick = self._timed("input_feat", tick)
        loss_dtype = matmul_dtype(getattr(torch, self.loss_dtype), ctx.device)
        output_dtype = matmul_dtype(getattr(torch, self.output_dtype), ctx.device)

        for pair in pairs:
            if pair.kind == "act":
                log.info("%s: skipping %s -> %s (a scale across an activation needs ScaledActivation)",
                         ctx.name, pair.prev_name, pair.linear_names)
                continue
            if any(n not in feats for n in pair.linear_names):
                continue
            stats = feats[pair.linear_names[0]]
            weights = [linear_weight(m) for m in pair.linears]
            if self.objective != "linear" and pair.linear_names[0] in self._raw:
                cand = scale_grid(torch.cat([w.float() for w in weights]), stats.x_mean, 
                                  WQLinear.spec_group_size(self.spec, weights[0].shape[1]), self.n_grid, self.duo_scaling)
                idx = torch.arange(cand.shape[0])
                if self.objective == "refine":
                    _, proxy = search_best_scale(weights, stats, self.spec, self.n_grid, self.duo_scaling, loss_dtype)
                    idx = proxy.argsort()[: self.refine_topk]
                tokens = self.output_tokens
                if self.attention_tokens is not None and _takes_block_kwargs(pair.inspect):
                    tokens = self.attention_tokens
                xs, kwargs = subsample_inputs(pair.inspect, self._raw[pair.linear_names[0]],
                                              [ctx.kwargs(c) for c in ctx.chunks], tokens)
                stride = self.grid_stride if self.objective == "output" and self.duo_scaling != "both" else 1
                best, out_losses = search_best_scale_output(list(pair.linears), pair.inspect, xs, kwargs,
                                                            cand[idx], self.spec, output_dtype,
                                                            coarse=stride)
                s = cand[idx[best]]
                losses = torch.full((cand.shape[0],), float("nan"))
                losses[idx] = out_losses
                del self._raw[pair.linear_names[0]]
                tick = self._timed(f"scale_output:{type(pair.inspect).__name__}", tick)
            elif id(pair) in ties:
                n_rep, head_dim = ties[id(pair)]
                w_cat = torch.cat([w.float() for w in weights])
                grid = scale_grid(w_cat, stats.x_mean.to(w_cat.device),
                                  WQLinear.spec_group_size(self.spec, w_cat.shape[1]), self.n_grid, self.duo_scaling)
                s, losses = search_best_scale(weights, stats, self.spec, loss_dtype=loss_dtype,
                                              candidates=expand_tied(tie_scales(grid, n_rep, head_dim), n_rep, head_dim))
                # exactly the inverse of what v's rows take
                s = fold_tied_scales(pair, tie_scales(s, n_rep, head_dim), n_rep, head_dim)
                tick = self._timed("scale_linear_output", tick)
            else:
                s, losses = search_best_scale(weights, stats, self.spec, self.n_grid, self.duo_scaling, loss_dtype)
                tick = self._timed("scale_linear_output", tick)
            if id(pair) not in ties:
                fold_scales(pair.prev, pair.linears, s, pair.kind)
            scaled = stats.scaled(s)  # the linears now read prev(x) / s
            for n in pair.linear_names:
                feats[n] = scaled
            key = f"{ctx.name}.{pair.prev_name}"
            self.last_scales[key] = s.cpu()
            self.last_losses[key] = losses

        refit = {}  # linear name -> (its weight before the clip, its G's group blocks, G / n or None)
        if self.refit and self.quantize and not self.spec.is_codebook:
            grams = {}  # id(stats) -> G / n: q/k/v (and gate/up) share one statistics object
            for n, m in linears.items():
                w = linear_weight(m)
                st = feats[n]
                if refit_cross and id(st) not in grams:
                    grams[id(st)] = st.gram / max(st.n, 1)
                refit[n] = (w.detach().float().clone(), st.group_blocks(WQLinear.spec_group_size(self.spec, w.shape[1])),
                            grams.get(id(st)))
        if self.clip:
            for n, m in linears.items():
                if any(n.split(".")[-1] == k for k in self.clip_skip):
                    continue
                ratios = search_best_clip(linear_weight(m), feats[n], self.spec, clip_grid=self.clip_grid,
                                          max_shrink=self.max_shrink, mode=self.clip_mode)
                apply_clip(m, ratios, self.clip_mode)
            tick = self._timed("clip", tick)
        del feats
        self._raw = {}

        if self.quantize:
            self.apply_quant(ctx, refit)
            self._timed("quantize", tick)

    def _timed(self, phase: str, since: float) -> float:
        """Adds the seconds since `since` to last_timings[phase]; returns now."""
        now = time.perf_counter()
        self.last_timings[phase] = self.last_timings.get(phase, 0.0) + now - since
        return now

    def apply_quant(self, ctx, refit: dict | None = None) -> None:
        """Packs every float linear of the block; those in `refit` with refit_scales' grids."""
        for n, m in ctx.linears.items():
            if isinstance(m, WQLinear):
                continue
            w = linear_weight(m)
            bias, name = getattr(m, "bias", None), f"{ctx.name}.{n}"
            if refit and n in refit:
                target, blocks, gram = refit[n]
                codes, scales, zeros = refit_scales(target, w, blocks, self.spec, self.refit, name=name, gram=gram,
                                                    cross_weight=self.refit_cross)
                q = WQLinear.from_codes(codes, scales, zeros, self.spec, bias=bias, name=name)
            else:
                q = WQLinear.from_weight(w, bias, self.spec, name=name)
            set_module(ctx.block, n, q.to(w.device))

    def config(self) -> dict:
        return {"method": self.name, "n_grid": self.n_grid, "duo_scaling": self.duo_scaling, "clip": self.clip,
                "max_shrink": self.max_shrink, "clip_grid": self.clip_grid, "clip_skip": list(self.clip_skip),
                "loss_dtype": self.loss_dtype, "objective": self.objective, "refine_topk": self.refine_topk,
                "output_tokens": self.output_tokens, "output_dtype": self.output_dtype, "clip_mode": self.clip_mode,
                "stats_dtype": self.stats_dtype, "forward_dtype": str(self.forward_dtype).replace("torch.", ""),
                "grid_stride": self.grid_stride, "propagate": self.propagate, "tie_gqa": self.tie_gqa,
                "refit": self.refit, "refit_cross": self.refit_cross,
                "attention_tokens": self.attention_tokens}
