"""SpQR (Dettmers et al., 2023): GPTQ's error-compensating rounding with tiny groups, quantized group
statistics and unstructured outliers kept in 16 bits.

Per linear, with the Hessian H = 2 X^T X of its input and U = chol(H^-1, upper) as in GPTQ:

1. Columns are processed GPTQ-style (`lowbit.algorithms.gptq`): dead inputs zeroed (and left out of
   statistics and outliers), `percdamp` times
   mean(diag H) added to the diagonal, optional act-order permutation (decreasing diag H, kept in the
   packed module), lazy updates `block_size` columns at a time.
2. Groups are tiny (`group_size` 16 input columns). When a group's first column comes up, each row's
   scale and zero point are fitted by min-max (zero point not rounded) over the group's weights as they
   stand then, leaving out the likely outliers (step 4), and are then quantized themselves: the
   scales of `qq_groupsize` consecutive output rows share one second-level `qq_scale_bits` min-max
   grid, and so do the zero points (`qq_zero_bits`); the second level is kept in fp16. Weights are
   rounded against the statistics as quantized.
3. The sensitivity of weight (r, j) is its GPTQ error err_rj = (w_rj - q(w_rj)) / U_jj, squared:
   U_jj^2 is the diagonal of the inverse Hessian of the columns not yet quantized (what the paper
   writes [H^-1]_jj). A weight whose err^2 exceeds tau is an outlier: it is kept (as an fp16
   correction on top of its code, `SpQRLinear`), so its error is 0 in the error feedback.
   tau = `outlier_threshold` times mean_j(Var_r(W_rj) / U_jj^2), per linear, as the paper's code
   scales its relative threshold.
4. Before fitting a group's statistics, each weight's leave-one-out value is measured: how much the
   row's Hessian-weighted squared error over the group, sum_k ((w_k - q(w_k)) / U_kk)^2 with
   unquantized min-max statistics, drops when that weight is left out of the fit (and not
   quantized). Weights whose drop exceeds tau do not take part in the fit. `simplified_outliers`
   skips this step (statistics from all weights; outliers still chosen by step 3).

Linears reading the same input (q/k/v, gate/up) share a Hessian and are rounded as one stacked matrix;
every step above is per row except tau, which is computed for each linear's rows separately, so the
result is that of rounding them one by one. Second-level groups never straddle two linears (each
linear's out_features must be a multiple of `qq_groupsize`).

Defaults follow the paper's near-lossless configuration in its code (groups of 16, 3-bit statistics in
groups of 16, outlier threshold 0.2, act-order, percdamp 1.0: the damping is relative to mean(diag H),
as GPTQ's, and the paper's runs use 1.0, not GPTQ's 0.01).

Measured (WikiText-2 test, 40 windows x 512; calibration 64 x 512 tokens of wiki.valid.tokens,
bfloat16 calibration forwards; bits per weight over the decoder blocks' linears, everything counted):

    model          recipe       ppl (float)     bits/weight  outliers
    smollm2-135m   w3a16-spqr   36.20 (29.19)   4.26         1.78%
    smollm2-135m   w4a16-spqr   32.08 (29.19)   4.45         0.20%    (32.08 with percdamp 0.01 too)
    gemma3-270m    w4a16-spqr   25.89 (23.88)   4.45         0.26%

Far from the paper's near-lossless on these small models: 4-bit weights alone cost them about 10%.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import SpecError
from ..models import block_linears, get_blocks, linear_weight, set_linear_weight, set_module
from ..nn import SpQRLinear, WQLinear
from ..nn.spqr_linear import INT16_MAX, dequantize_stats, quantize_stats
from ..quant import QuantSpec
from .base import Algorithm
from .gptq import _inverse_cholesky, collect_hessians, sequential_owners
from .rtn import check_weights

log = logging.getLogger(__name__)


def _minmax_round(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> torch.Tensor:
    """x rounded onto the min-max grid of [lo, hi] (broadcast; zero point not rounded)."""
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((x - lo) / scale).round_().clamp_(0, maxq).mul_(scale).add_(lo)


def loo_error_reduction(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """For a group w `[rows, G]` with U's diagonal d `[G]` over its columns: `[rows, G]`, how much the
    row's sum_k ((w_k - q(w_k)) / d_k)^2 drops when weight k is left out of the min-max fit and of the
    sum (it would be kept exactly).

    Leaving out a weight that is neither the row's minimum nor its maximum leaves the grid as it was:
    the drop is that weight's own error term. Only the two extremes need a refit (on the second
    smallest or second largest value), so this costs three roundings of the group, not G."""
    maxq = 2**bits - 1
    low2, ilow = w.topk(2, dim=1, largest=False)  # [rows, 2]
    high2, ihigh = w.topk(2, dim=1)
    lo, hi = low2[:, :1], high2[:, :1]
    e = ((_minmax_round(w, lo, hi, maxq) - w) / d).square_()  # [rows, G]
    base = e.sum(1, keepdim=True)
    red = e.clone()
    for grid_lo, grid_hi, k in ((low2[:, 1:], hi, ilow[:, :1]), (lo, high2[:, 1:], ihigh[:, :1])):
        ek = ((_minmax_round(w, grid_lo, grid_hi, maxq) - w) / d).square_()
        loo = ek.sum(1, keepdim=True) - ek.gather(1, k)
        red.scatter_(1, k, base - loo)
    return red


def group_minmax(w: torch.Tensor, bits: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First-level (scale, zero) `[rows]` of a group w `[rows, G]` by min-max over the weights not in
    `exclude`; the zero point is a float (code units). Rows with no spread (or nothing left) borrow
    the group's mean scale, so they do not stretch the second-level grid of their neighbours."""
    if exclude is not None:
        keep = ~exclude
        mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
        w = torch.where(keep, w, mean)
    lo, hi = w.amin(1), w.amax(1)  # (aminmax stalls under thread contention on CPU)
    scale = (hi - lo) / (2**bits - 1)
    ok = scale > 0
    if not bool(ok.all()):
        fill = scale[ok].mean() if bool(ok.any()) else scale.new_tensor(1.0)
        scale = torch.where(ok, scale, fill)
    return scale, -lo / scale


@torch.no_grad()
def spqr_quantize(w: torch.Tensor, H: torch.Tensor, *, bits: int = 3, group_size: int = 16, qq_scale_bits: int = 3,
                  qq_zero_bits: int = 3, qq_groupsize: int = 16, outlier_threshold: float = 0.2,
                  percdamp: float = 1.0, block_size: int = 128, act_order: bool = True,
                  simplified_outliers: bool = False, parts: list[int] | None = None) -> dict:
    """SpQR on one weight `[out, in]` (or several stacked, `parts` giving each one's rows) with Hessian
    H `[in, in]`.

    Returns, all in stored column order except "weight":
    {"codes" uint8 [out, in], "scale_codes"/"zero_codes" uint8 [in / G, out] and
    "scale_stats"/"zero_stats" fp16 [in / G, out / qq, 2] (see `SpQRLinear`), "outliers" float32
    [out, in] (the fp16 correction at each outlier, 0 elsewhere), "outlier_mask" bool [out, in],
    "perm" (LongTensor or None), "threshold" float32 [out] (tau of each row), "weight" float32
    [out, in]: dense + outliers in model order, exactly what `SpQRLinear` computes with}.
    """
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    parts = list(parts) if parts else [out_f]
    if sum(parts) != out_f:
        raise ValueError(f"parts {parts} do not add up to {out_f} rows")
    if in_f % group_size:
        raise SpecError(f"in_features {in_f} is not a multiple of group size {group_size}")
    if group_size < 2:
        raise SpecError(f"SpQR needs groups of at least 2 columns, got {group_size}")
    if any(p % qq_groupsize for p in parts):
        raise SpecError(f"out_features {parts} are not multiples of qq_groupsize {qq_groupsize}")
    maxq = 2**bits - 1
    G = group_size
    block_size = max(G, block_size // G * G)  # a group's columns must all have had the earlier blocks' updates

    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H, dead = W[:, perm], H[perm][:, perm], dead[perm]
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    U = _inverse_cholesky(H)
    del H
    d = U.diagonal().clone()  # [in]

    find_outliers = math.isfinite(outlier_threshold)
    tau = torch.full((out_f,), math.inf)
    if find_outliers:
        r0 = 0
        for p in parts:
            scale = (W[r0 : r0 + p].var(dim=0) / d.square()).mean()
            tau[r0 : r0 + p] = outlier_threshold * scale
            r0 += p
    tau = tau.to(W.device)

    dead_cols = dead.tolist()
    Wt = W.t().contiguous()  # [in, out]: column j is row j
    Q = torch.empty_like(Wt)
    Wq = torch.empty_like(Wt)
    O = torch.zeros_like(Wt)  # fp16 corrections at outliers
    n_groups = in_f // G
    scale_codes = torch.empty(n_groups, out_f, dtype=torch.uint8, device=W.device)
    zero_codes = torch.empty_like(scale_codes)
    scale_stats = torch.empty(n_groups, out_f // qq_groupsize, 2, dtype=torch.float16, device=W.device)
    zero_stats = torch.empty_like(scale_stats)
    s = z = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wt[i1:i2]
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:
                g = col // G
                grp = Wt[col : col + G].t().contiguous()  # [out, G] as it stands now
                # dead inputs (weight 0, which no input ever multiplies) shape no statistics
                dead_g = dead[col : col + G]
                exclude = dead_g[None, :].expand_as(grp) if bool(dead_g.any()) else None
                if find_outliers and not simplified_outliers:
                    loo = loo_error_reduction(grp, d[col : col + G], bits) > tau[:, None]
                    exclude = loo if exclude is None else loo | exclude
                s, z = group_minmax(grp, bits, exclude)
                scale_codes[g], scale_stats[g] = quantize_stats(s, qq_scale_bits, qq_groupsize)
                zero_codes[g], zero_stats[g] = quantize_stats(z, qq_zero_bits, qq_groupsize)
                s = dequantize_stats(scale_codes[g], scale_stats[g])
                z = dequantize_stats(zero_codes[g], zero_stats[g])
                s_div = s.clamp_min(1e-9)
            w_col = W1[i]
            q = torch.div(w_col, s_div).add_(z).round_().clamp_(0, maxq)
            Q[col] = q
            wq = (q - z).mul_(s)
            if find_outliers and not dead_cols[col]:
                r = w_col - wq
                hit = torch.mul(tau, d[col] * d[col]).lt_(r.square())
                # kept: the fp16 correction takes the weight to itself (to fp16), its error to ~0
                o = r.mul_(hit).to(torch.float16).float()
                O[col] = o
                wq.add_(o)
            Wq[col] = wq
            err = w_col.sub_(wq).div_(U1[i, i])
            E1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)

    weight = Wq.t().contiguous()
    outliers = O.t().contiguous()
    if perm is not None:
        weight = torch.empty_like(weight).index_copy_(1, perm, weight)
    return {"codes": Q.t().to(torch.uint8), "scale_codes": scale_codes, "scale_stats": scale_stats,
            "zero_codes": zero_codes, "zero_stats": zero_stats, "outliers": outliers,
            "outlier_mask": outliers != 0, "perm": perm, "threshold": tau, "weight": weight}


class SpQR(Algorithm):
    name = "spqr"
    requires_calibration = True
    propagate = "quantized"

    def __init__(self, spec: QuantSpec, qq_scale_bits: int = 3, qq_zero_bits: int = 3, qq_groupsize: int = 16,
                 outlier_threshold: float = 0.2, percdamp: float = 1.0, block_size: int = 128,
                 act_order: bool = True, simplified_outliers: bool = False, true_sequential: bool = True,
                 forward_dtype: str = "float32"):
        if spec.is_codebook or spec.symmetric:
            raise SpecError("SpQR quantizes weights on an asymmetric uniform grid (symmetric: false, no codebook)")
        if not 2 <= spec.bits <= 8:
            raise SpecError(f"SpQR: bits must be in 2..8, got {spec.bits}")
        for what, b in (("qq_scale_bits", qq_scale_bits), ("qq_zero_bits", qq_zero_bits)):
            if not 2 <= int(b) <= 8:
                raise SpecError(f"SpQR: {what} must be in 2..8, got {b}")
        if percdamp < 0:
            raise SpecError(f"SpQR: percdamp must be >= 0, got {percdamp}")
        if not outlier_threshold > 0:
            raise SpecError(f"SpQR: outlier_threshold must be > 0 (inf: no outliers), got {outlier_threshold}")
        self.spec = spec
        self.qq_scale_bits, self.qq_zero_bits, self.qq_groupsize = int(qq_scale_bits), int(qq_zero_bits), int(qq_groupsize)
        self.outlier_threshold = float(outlier_threshold)
        self.percdamp = float(percdamp)
        self.block_size = int(block_size)
        self.act_order = bool(act_order)
        self.simplified_outliers = bool(simplified_outliers)
        self.true_sequential = bool(true_sequential)
        if forward_dtype not in ("float32", "bfloat16"):
            raise SpecError(f"forward_dtype must be 'float32' or 'bfloat16', got {forward_dtype!r}")
        self.forward_dtype = getattr(torch, forward_dtype)
        self.n_outliers = 0  # over the layers quantized so far
        self.n_weights = 0

    def prepare(self, model, adapter) -> None:
        check_weights(model, adapter, self.spec)
        for i, block in enumerate(get_blocks(model, adapter)):
            for name, mod in block_linears(block, adapter).items():
                out_f, in_f = linear_weight(mod).shape
                where = f"layer {adapter.blocks}.{i}.{name}"
                if out_f % self.qq_groupsize:
                    raise SpecError(f"{where}: out_features={out_f} is not a multiple of qq_groupsize={self.qq_groupsize}")
                if in_f > INT16_MAX + 1:
                    raise SpecError(f"{where}: in_features={in_f} is more than SpQRLinear's int16 indices hold")

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise RuntimeError("SpQR needs calibration data")
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, (WQLinear, SpQRLinear))}
        results = {}
        for owners in sequential_owners(ctx.adapter, linears, self.true_sequential):
            hs = collect_hessians(ctx, [o[0] for o in owners])
            for names in owners:
                mods = [linears[n] for n in names]
                ws = [linear_weight(m).detach().float() for m in mods]
                rows = [t.shape[0] for t in ws]
                r = spqr_quantize(torch.cat(ws), hs[names[0]].H, bits=self.spec.bits,
                                  group_size=WQLinear.spec_group_size(self.spec, ws[0].shape[1]),
                                  qq_scale_bits=self.qq_scale_bits, qq_zero_bits=self.qq_zero_bits,
                                  qq_groupsize=self.qq_groupsize, outlier_threshold=self.outlier_threshold,
                                  percdamp=self.percdamp, block_size=self.block_size, act_order=self.act_order,
                                  simplified_outliers=self.simplified_outliers, parts=rows)
                qq_rows = [n // self.qq_groupsize for n in rows]
                split = zip(names, mods, r["codes"].split(rows), r["scale_codes"].split(rows, 1),
                            r["scale_stats"].split(qq_rows, 1), r["zero_codes"].split(rows, 1),
                            r["zero_stats"].split(qq_rows, 1), r["outliers"].split(rows), r["weight"].split(rows))
                for n, m, q, sc, ss, zc, zs, o, wq in split:
                    set_linear_weight(m, wq.to(linear_weight(m).dtype))  # later steps see this rounding
                    results[n] = (q, sc.contiguous(), ss.contiguous(), zc.contiguous(), zs.contiguous(), o, r["perm"])
            del hs
        n_out = 0
        for n, (q, sc, ss, zc, zs, o, perm) in results.items():
            m = linears[n]
            mod = SpQRLinear.from_codes(q, sc, ss, zc, zs, o, bits=self.spec.bits, qq_scale_bits=self.qq_scale_bits,
                                        qq_zero_bits=self.qq_zero_bits, perm=perm, bias=getattr(m, "bias", None),
                                        name=f"{ctx.name}.{n}")
            n_out += mod.n_outliers
            self.n_weights += mod.in_features * mod.out_features
            set_module(ctx.block, n, mod.to(linear_weight(m).device))
        self.n_outliers += n_out
        log.info("SpQR %s: %d outliers (%.3f%% so far)", ctx.name, n_out,
                 100 * self.n_outliers / max(self.n_weights, 1))

    def config(self) -> dict:
        return {"method": self.name, "qq_scale_bits": self.qq_scale_bits, "qq_zero_bits": self.qq_zero_bits,
                "qq_groupsize": self.qq_groupsize, "outlier_threshold": self.outlier_threshold,
                "percdamp": self.percdamp, "block_size": self.block_size, "act_order": self.act_order,
                "simplified_outliers": self.simplified_outliers, "true_sequential": self.true_sequential,
                "forward_dtype": str(self.forward_dtype).replace("torch.", "")}
