"""GPTQ (Frantar et al., 2022): second-order, error-compensating rounding of each linear's weight.

For a linear with input X `[tokens, in]`, GPTQ minimises ||W X^T - Q X^T||^2 column by column: it
rounds column j, then spreads that column's error over the columns not yet rounded through the
inverse Hessian H^-1 with H = 2 X^T X. In the Cholesky form used here (and by the paper's code):

    U = chol(H^-1, upper)           err_j = (w_j - q_j) / U[j, j]       W[:, j:] -= err_j U[j, j:]

with the update applied lazily, `block_size` columns at a time (one GEMM per block for the columns
after it). Group parameters (scale and zero point of each group of `G` input columns) are chosen
when the group's first column comes up, from the weights as they stand then (already corrected for
the error of earlier groups), optionally with an MSE clip search (`clip_grid`, the `mse` option of
GPTQ's reference quantizer).

- `act_order` (desc_act): columns are processed by decreasing diag(H), the most active inputs
  first. Groups are then formed in that order, so the packed module keeps the permutation
  (`WQLinear.perm`, GPTQ's g_idx). With `static_groups` the group parameters are fixed from the
  unmodified weight in model order before any column moves: no permutation needs storing, at some
  accuracy cost.
- Dead inputs (a column of X that is always 0, so H[j, j] = 0) get H[j, j] = 1 and weight 0.
- Damping: `percdamp` times the mean of diag(H) added to the diagonal.
- `true_sequential`: within a block the linears are quantized in the adapter's order (q/k/v, o,
  gate/up, down), each step's Hessian collected with the steps before it already quantized.
  Linears that read the same input (q/k/v) share a Hessian, so they are rounded as one stacked
  matrix: one column loop for three layers, the same result.

The next block sees the quantized block's outputs (`propagate = "quantized"`), as in the paper.

Cost: the steps run inside `BlockContext.reuse_outputs`, so each step's forward recomputes only what the
steps before it changed (the attention once for o_proj's input, then o_proj alone for the MLP's steps,
down_proj alone for the block's outputs), and those outputs, through the rounded weights still held by
the float linears, are what the runner passes on (no forward through the packed modules). float32
Hessians are accumulated as their upper block triangle (`Hessian.SYMMETRIC_BLOCK`). On SmolLM2-135M
W3 g64 act-order, 64 x 512 calibration tokens, 2 threads: 160 -> 85 s plain, 243 -> 157 s with
asym_calib 0.25 (same machine and session).

`asym_calib` > 0 fits the float model instead of the quantized one (asymmetric calibration, the
objective of GPTAQ, Li et al., 2025, "GPTQv2"). Plain GPTQ fits each layer to what the *quantized*
model feeds it, Q X_q ~ W X_q, so the error earlier layers made is never corrected; asymmetric
calibration fits Q X_q ~ W X_fp, X_fp being the float model's input of the same layer. With
dX = X_fp - X_q and C = 2 dX^T X_q / n, ||W X_fp - Q X_q||^2 = ||(W* - Q) X_q||^2 + const for the
least-squares target W* = W + W C H^-1, so GPTQ run on W* (same H) minimises it. lowbit takes that
closed form, with `asym_calib` = alpha scaling the correction, W* = W + alpha W C H_damped^-1, where
GPTAQ spreads a triangular part of the same term through the column loop: on SmolLM2-135M W3 g64
act-order (64 x 512 calibration) alpha 0.25 gave ppl 43.90 here against 50.27 for GPTAQ's in-loop form
and 59.92 for plain GPTQ. X_fp comes from the runner's float stream (`Algorithm.float_input_names`):
recorded in the one float forward per block it runs anyway.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..calib.stats import add_product_
from ..errors import CalibrationError, SpecError
from ..kernels import matmul_dtype
from ..models import linear_weight, set_linear_weight, set_module
from ..nn import WQLinear
from ..nn.wq_linear import fp16_scale
from ..quant import QuantSpec
from ..quant.primitives import _range_qparams
from .base import Algorithm
from .rtn import check_weights

log = logging.getLogger(__name__)


class Hessian:
    """H = 2 X^T X / n accumulated in float32 over calibration batches; with `targets` (the float
    model's inputs of the same layer, one tensor per batch in batch order) also the cross term of
    asymmetric calibration, C = 2 (X_fp - X)^T X / n.

    `dtype` bfloat16 runs each batch's product as a bf16 GEMM (fp32 accumulation inside the kernel,
    about twice as fast as fp32 on CPUs with bf16 dot products) and adds the result, rounded to bf16,
    into the float32 sum. Under bf16 forwards the linears read bf16-rounded inputs anyway, so the operands
    lose nothing that mattered; what is lost is the rounding of each batch's product (relative 2^-9,
    averaging down over batches): 4e-4 to 1.2e-3 of |H| on SmolLM2-135M's layers, but where a few
    inputs dominate H that is more than the 1% damping (SmolLM2's first o_proj: smallest eigenvalue
    -2.3e-4 against a damping of 1.3e-5), so bf16 H is an option, not the default. `cross_dtype` (by
    default `dtype`) is the same choice for C alone, which only scales a correction of the target and
    needs no definiteness."""

    def __init__(self, in_features: int, device, targets: list[torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32, cross_dtype: torch.dtype | None = None):
        for dt in (dtype, cross_dtype):
            if dt not in (None, torch.float32, torch.bfloat16):
                raise ValueError(f"Hessian dtypes must be float32 or bfloat16, got {dt}")
        self.sum = torch.zeros(in_features, in_features, device=device)
        self._triangle = False  # whether `sum` holds only its upper block triangle
        self.n = 0
        self.dtype = matmul_dtype(dtype, device)
        self.cross_dtype = self.dtype if cross_dtype is None else matmul_dtype(cross_dtype, device)
        self.targets = targets
        self.cross = None if targets is None else torch.zeros(in_features, in_features, device=device)

    # float32 X^T X: only the blocks on and above the diagonal, in column blocks of at most this width
    # (SmolLM2's 576 and 1536 inputs: 2 and 3 blocks, 25-28% faster than one GEMM here; narrower blocks
    # lose more to GEMM efficiency than the triangle saves). bf16 GEMMs gained nothing from it.
    SYMMETRIC_BLOCK = 512

    def _accumulate_gram(self, x: torch.Tensor) -> None:
        """self.sum += x^T x; in float32 only its upper block triangle (H mirrors it)."""
        d = x.shape[1]
        if self.dtype != torch.float32 or d <= self.SYMMETRIC_BLOCK:
            add_product_(self.sum, x, x)
            return
        self._triangle = True
        b = -(-d // -(-d // self.SYMMETRIC_BLOCK))  # equal blocks
        for i in range(0, d, b):
            self.sum[i : i + b, i:].addmm_(x[:, i : i + b].t(), x[:, i:])

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        xm = x2.to(self.dtype)
        self._accumulate_gram(xm)
        self.n += x2.shape[0]
        if self.targets is not None:
            if not self.targets:
                raise RuntimeError("asymmetric calibration: more calibration batches than float inputs recorded")
            fp = self.targets.pop(0).to(x2.device).reshape(-1, x.shape[-1])
            if fp.shape != x2.shape:
                raise RuntimeError(f"asymmetric calibration: float input {tuple(fp.shape)} does not match "
                                   f"quantized input {tuple(x2.shape)}")
            cd = self.cross_dtype
            if fp.dtype == x2.dtype == cd:
                d = fp - x2  # (bf16 arithmetic rounds the float32 difference: the same values, one pass)
            else:
                d = (fp.float() - x2.float()).to(cd)
            add_product_(self.cross, d, xm if cd == self.dtype else x2.to(cd))

    @property
    def H(self) -> torch.Tensor:
        s = self.sum
        if self._triangle:  # the blocks below the diagonal are zero: mirror the upper triangle there
            s = s.triu() + s.triu(1).t()
        return s * (2.0 / max(self.n, 1))

    @property
    def C(self) -> torch.Tensor | None:
        return None if self.cross is None else self.cross * (2.0 / max(self.n, 1))


def group_qparams(w: torch.Tensor, spec: QuantSpec, clip_grid: int = 0, max_shrink: float = 0.8,
                  norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point `[rows, 1]` for the columns w `[rows, G]` of one group, stored as WQLinear
    stores them (range holds 0, scale rounded up to fp16). With clip_grid > 0 the range is shrunk by
    the factor in (1 - max_shrink, 1] that minimises sum |q(w) - w|^norm per row."""
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    if clip_grid <= 0:
        s, z = _range_qparams(lo, hi, spec)
        return fp16_scale(s), z
    n = max(1, int(max_shrink * clip_grid))
    p = 1 - torch.arange(n, device=w.device, dtype=torch.float32) / clip_grid  # [P]
    s, z = _range_qparams(lo * p, hi * p, spec)  # [rows, P]
    s = fp16_scale(s)[..., None]
    q = (w[:, None, :] / s).round_()
    if z is None:
        q.clamp_(spec.qmin, spec.qmax).mul_(s)
    else:
        q.add_(z[..., None]).clamp_(spec.qmin, spec.qmax).sub_(z[..., None]).mul_(s)
    err = q.sub_(w[:, None, :]).abs_().pow_(norm).sum(-1)  # [rows, P]
    s = s[..., 0]
    best = err.argmin(dim=1, keepdim=True)  # ties keep the wider range
    return s.gather(1, best), (None if z is None else z.gather(1, best))


@contextmanager
def _one_thread():
    """The column loop is thousands of small vector ops: with two OpenMP threads each op pays a fork
    and join, and when another process holds a core the join waits for it (measured here, a shared
    2-core machine: 0.2-0.4 s per layer on one thread against 3-10 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, group_size: int, *, percdamp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  clip_grid: int = 0, max_shrink: float = 0.8, C: torch.Tensor | None = None,
                  asym_calib: float = 0.0, qparams: tuple | None = None) -> dict:
    """GPTQ on one weight `[out, in]` with Hessian H `[in, in]` (run on one thread, see _one_thread);
    with C (`Hessian.C`) and asym_calib > 0, fitted to the float model's outputs (module docstring).
    `qparams` (scale and zero, or None, each `[out, 1]` for all groups or `[out, in / G]`) fixes every
    group's grid beforehand, as static groups do (`round_on_fixed_grids`: W8A8's and W4A8's grids).

    Returns {"codes" [out, in] float (integer valued, in stored column order), "scales" and
    "zeros" [out, in / G] (zeros None when symmetric), "perm" (LongTensor or None: stored column j is
    input channel perm[j]), "weight" [out, in] float32: the dequantized weight in model order}.
    """
    with _one_thread():
        return _gptq_quantize(w, H, spec, group_size, percdamp, block_size, act_order, static_groups, clip_grid,
                              max_shrink, C if asym_calib else None, asym_calib, qparams)


def _gptq_quantize(w, H, spec, group_size, percdamp, block_size, act_order, static_groups, clip_grid, max_shrink,
                   C, alpha, qparams=None):
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group size {group_size}")
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if C is not None:
        # the least-squares target W + alpha W C H_damped^-1 (dead columns stay 0: C[:, dead] = 0)
        C = C.detach().float().clone()
        C[:, dead] = 0
        Hd = H.clone()
        Hd.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        W = W + alpha * torch.linalg.solve(Hd, C.t() @ W.t()).t()
        del Hd, C

    n_groups = in_f // group_size
    static = None
    if qparams is not None:
        if any(t is not None and tuple(t.shape) not in ((out_f, 1), (out_f, n_groups)) for t in qparams):
            raise ValueError(f"fixed qparams must be [{out_f}, 1] or [{out_f}, {n_groups}], got "
                             f"{[None if t is None else tuple(t.shape) for t in qparams]}")
        s0, z0 = (None if t is None else t.float().expand(out_f, n_groups) for t in qparams)
        static = [(s0[:, g : g + 1], None if z0 is None else z0[:, g : g + 1]) for g in range(n_groups)]
    elif static_groups:
        static = [group_qparams(W[:, g * group_size : (g + 1) * group_size], spec, clip_grid, max_shrink)
                  for g in range(n_groups)]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    U = _inverse_cholesky(H)

    # Columns become rows: every per-column step below reads and writes contiguous memory.
    Wt = W.t().contiguous()  # [in, out]
    Q = torch.empty_like(Wt)  # codes, row j = column j
    col_scale = torch.empty_like(Wt)  # each column's scale and zero (rows of its group's)
    col_zero = None if spec.symmetric else torch.empty_like(Wt)
    s = z = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wt[i1:i2]  # a view: this block's columns are updated in place
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // group_size if perm is not None else col // group_size
                s, z = static[g]
                s, z = s[:, 0], (None if z is None else z[:, 0])
                col_scale[col] = s
                if z is not None:
                    col_zero[col] = z
            elif col % group_size == 0:
                # the group's columns as they stand now (this block's already corrected)
                s, z = group_qparams(Wt[col : col + group_size].t(), spec, clip_grid, max_shrink)
                s, z = s[:, 0], (None if z is None else z[:, 0])
                col_scale[col : col + group_size] = s  # the whole group's rows at once
                if z is not None:
                    col_zero[col : col + group_size] = z
            w = W1[i]
            q = torch.div(w, s, out=Q[col]).round_()  # the codes are computed in place in Q
            if z is not None:
                q.add_(z).clamp_(spec.qmin, spec.qmax)
                wq = (q - z).mul_(s)
            else:
                q.clamp_(spec.qmin, spec.qmax)
                wq = q * s
            err = torch.sub(w, wq, out=E1[i]).div_(U1[i, i])
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
        if i2 < in_f:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    Wq = ((Q - col_zero) * col_scale if col_zero is not None else Q * col_scale).t().contiguous()
    Q = Q.t().contiguous()
    scales = col_scale[::group_size].t().contiguous()
    zeros = None if col_zero is None else col_zero[::group_size].t().contiguous()

    if static is not None:  # groups live in model order: the codes go back there, no perm to keep
        if perm is not None:
            inv = torch.argsort(perm)
            Q, Wq = Q[:, inv], Wq[:, inv]
            perm = None
        scales = torch.cat([st[0] for st in static], 1)
        zeros = None if spec.symmetric else torch.cat([st[1] for st in static], 1)

    weight = Wq if perm is None else torch.empty_like(Wq).index_copy_(1, perm, Wq)
    return {"codes": Q, "scales": scales, "zeros": zeros, "perm": perm, "weight": weight}


@torch.no_grad()
def collect_hessians(ctx, names: list[str], targets: dict[str, list[torch.Tensor]] | None = None,
                     dtype: torch.dtype = torch.float32, cross_dtype: torch.dtype | None = None,
                     input_quant=None) -> dict[str, Hessian]:
    """H for each named linear's input, from a forward of the block as it stands (stopped as soon
    as the last of them has its input); with `targets` ({name: the float model's inputs, one per
    calibration batch}), the cross term of asymmetric calibration too. With `input_quant(name, x)`
    instead, H of the inputs as it rounds them and the cross term against the inputs themselves
    (GPTQ's `input_quant`). `dtype`: see Hessian."""
    if input_quant is not None and targets is not None:
        raise ValueError("collect_hessians: targets and input_quant both set the cross term; use one")
    hs: dict[str, Hessian] = {}

    def record(name, x):
        if name not in hs:
            t = [] if input_quant is not None else None if targets is None else targets[name]
            hs[name] = Hessian(x.shape[-1], x.device, t, dtype, cross_dtype)
        if input_quant is not None:
            hs[name].targets.append(x)
            x = input_quant(name, x)
        hs[name].add(x)

    ctx.run_inputs(names, record)
    return hs


def sequential_owners(adapter, linears, true_sequential: bool = True) -> list[list[tuple[str, ...]]]:
    """The block's linears (those named in `linears`) in the order they are rounded: one list per
    step (the adapter's sequential order, or a single step), each step a list of tuples of linears
    that read the same input and so share one Hessian (q/k/v, gate/up)."""
    steps = [tuple(n for n in step if n in linears) for step in adapter.sequential]
    steps = [s for s in steps if s]
    if not true_sequential:
        steps = [tuple(n for s in steps for n in s)]
    shared = {}
    for group in adapter.shared_input:
        for n in group:
            shared[n] = group
    out = []
    for step in steps:
        owners = []
        for n in step:
            key = shared.get(n, (n,))
            key = tuple(k for k in key if k in step) or (n,)
            if key not in owners:
                owners.append(key)
        out.append(owners)
    return out


ROUNDINGS = ("nearest", "gptq")
CALIB_FORWARDS = ("float", "quantized")


def check_rounding(method: str, rounding, percdamp) -> tuple[str, float]:
    """The `rounding` and `percdamp` options of the steps that round onto a fixed grid (w8a8, w4a8, llm_int8),
    refused by the step's name before any work."""
    if rounding not in ROUNDINGS:
        raise SpecError(f"{method}: rounding is one of {ROUNDINGS}, got {rounding!r}")
    if not 0 <= float(percdamp) < 1:
        raise SpecError(f"{method}: percdamp must be in [0, 1), got {percdamp!r}")
    return rounding, float(percdamp)


def check_act_calib(method: str, act_calib, rounding: str) -> float:
    """The `act_calib` option of the int8 steps (w8a8, llm_int8): how much of the activations' rounding
    GPTQ fits to (0..1, GPTQ's `input_calib`), only with `rounding: gptq`; refused by the step's name."""
    try:
        v = float(act_calib)
    except (TypeError, ValueError):
        raise SpecError(f"{method}: act_calib must be a number in [0, 1], got {act_calib!r}") from None
    if not 0 <= v <= 1:
        raise SpecError(f"{method}: act_calib must be in [0, 1], got {act_calib!r}")
    if v and rounding != "gptq":
        raise SpecError(f"{method}: act_calib applies to rounding: gptq")
    return v


def check_calib_forward(method: str, calib_forward, act_calib: float) -> str:
    """The `calib_forward` option of the int8 steps: "float" (the activations stay float while GPTQ
    calibrates, as llm-compressor's) or "quantized" (see round_on_fixed_grids; needs act_calib > 0)."""
    if calib_forward not in CALIB_FORWARDS:
        raise SpecError(f"{method}: calib_forward must be one of {CALIB_FORWARDS}, got {calib_forward!r}")
    if calib_forward == "quantized" and not act_calib:
        raise SpecError(f"{method}: calib_forward: quantized fits GPTQ to the rounded activations; "
                        f"it needs rounding: gptq and act_calib > 0")
    return calib_forward


@torch.no_grad()
def round_on_fixed_grids(ctx, linears: dict, spec: QuantSpec, grid, *, percdamp: float = 0.01,
                         act_order: bool = True, input_quant=None, input_calib: float = 0.0,
                         calib_forward: str = "float") -> dict[str, torch.Tensor]:
    """GPTQ's error-compensating rounding onto grids chosen beforehand: `grid(name, weight)` gives each
    linear's symmetric scales, `[out, 1]` or `[out, in / G]` with G the group size of `spec` (W8A8's
    and W4A8's grids, chosen as rounding to nearest would choose them, so the packed module and its
    kernel stay as they are and only the codes change). The linears are rounded in true-sequential
    order; the next block's inputs (`ctx.outputs`) come from the float linears holding the rounded
    weights, as GPTQ passes them on, the activations unquantized. `input_quant(name, x)` with
    `input_calib` > 0: fit the outputs on the inputs as the packed module will round them (see GPTQ).

    `calib_forward` "quantized" calibrates on the quantized forward instead: each rounded linear then
    rounds its inputs too, so the later steps' Hessians and the next block's inputs are those the
    packed model will see, every activation rounding before them included (as GPTQ passes quantized
    weights on). Each linear's target stays its own product on that stream, W X: fitting the float
    model's W X_fp instead (GPTAQ's target) was tried and lost badly on Gemma-3 (bench/RESULTS.md).
    Returns {name: integer-valued float codes `[out, in]` in model order}."""
    if not ctx.has_data:
        raise CalibrationError("GPTQ rounding needs calibration data (the Hessians of the linears' inputs)")
    rows = {n: linear_weight(m).shape[0] for n, m in linears.items()}

    def qparams(names, w):
        parts, start = [], 0
        for n in names:
            parts.append(grid(n, w[start : start + rows[n]]))
            start += rows[n]
        return torch.cat(parts), None

    gptq = GPTQ(spec, percdamp=percdamp, act_order=act_order, weight_qparams=qparams,
                input_quant=input_quant if input_calib else None, input_calib=input_calib,
                calib_forward=calib_forward)
    try:
        with ctx.reuse_outputs():
            results = gptq._quantize_steps(ctx, linears)
            if ctx.wants_outputs:
                ctx.outputs = ctx.forward()  # only down_proj runs again (reuse_outputs)
    finally:
        gptq.remove_input_hooks()
    out = {}
    for n, (q, _s, _z, perm) in results.items():
        if perm is not None:  # fixed grids put the codes back in model order; anything else is a bug
            raise RuntimeError(f"{ctx.name}.{n}: GPTQ returned permuted codes on a fixed grid")
        out[n] = q
    return out


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """chol(H^-1, upper), raising the damping if H is not positive definite in float32."""
    damp = torch.mean(torch.diag(H)) * 0.01
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        log.warning("GPTQ: Hessian not positive definite, adding %.3g to its diagonal", float(damp))
        H = H.clone()
        H.diagonal().add_(damp)
        damp = damp * 10
    raise RuntimeError("GPTQ: the Hessian stays singular after damping; check the calibration data")


class GPTQ(Algorithm):
    name = "gptq"
    requires_calibration = True
    propagate = "quantized"

    def __init__(self, spec: QuantSpec, percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
                 static_groups: bool = False, true_sequential: bool = True, clip_grid: int = 0,
                 max_shrink: float = 0.8, forward_dtype: str = "float32", asym_calib: float = 0.0,
                 hessian_dtype: str = "float32", cross_dtype: str = "float32", weight_qparams=None,
                 input_quant=None, input_calib: float = 0.0, calib_forward: str = "float"):
        if spec.is_codebook:
            raise ValueError("GPTQ here rounds onto a uniform grid; codebook (NF4) weights are not supported")
        if not 0 <= percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
        self.spec = spec
        self.percdamp = float(percdamp)
        self.block_size = int(block_size)
        self.act_order = bool(act_order)
        self.static_groups = bool(static_groups)
        self.true_sequential = bool(true_sequential)
        self.clip_grid = int(clip_grid)
        self.max_shrink = float(max_shrink)
        if not 0 <= asym_calib <= 1:
            raise ValueError(f"asym_calib must be in [0, 1] (0: plain GPTQ), got {asym_calib}")
        self.asym_calib = float(asym_calib)
        # asymmetric calibration reads the float model's inputs of the linears, from the runner's float stream
        self.needs_float_outputs = self.asym_calib > 0
        # the dtype of the calibration forwards that produce the Hessians and the next block's inputs
        if forward_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"forward_dtype must be 'float32' or 'bfloat16', got {forward_dtype!r}")
        self.forward_dtype = getattr(torch, forward_dtype)
        # the dtype of the GEMMs that accumulate H (and C); the sums are float32 either way (see Hessian)
        for key, val in (("hessian_dtype", hessian_dtype), ("cross_dtype", cross_dtype)):
            if val not in ("float32", "bfloat16"):
                raise ValueError(f"{key} must be 'float32' or 'bfloat16', got {val!r}")
        self.hessian_dtype = getattr(torch, hessian_dtype)
        self.cross_dtype = getattr(torch, cross_dtype)  # asymmetric calibration's C
        # (names, stacked weight) -> fixed (scale, zero) `[rows, 1]`, or None: grids chosen as GPTQ goes
        self.weight_qparams = weight_qparams
        # (name, x) -> x as the packed module will round it (W8A8's int8 activations), or None. With it,
        # H comes from the rounded inputs and GPTQ fits Q Xq ~ W X, the least-squares target taken by
        # input_calib (as asym_calib takes the float model's): the weights absorb part of the
        # activations' rounding error
        if input_quant is not None and self.asym_calib:
            raise ValueError("input_quant and asym_calib both set GPTQ's target; use one")
        if not 0 <= input_calib <= 1:
            raise ValueError(f"input_calib must be in [0, 1], got {input_calib}")
        self.input_quant, self.input_calib = input_quant, float(input_calib)
        # "quantized": once a step is rounded its linears round their inputs as input_quant says (forward
        # pre-hooks, until remove_input_hooks), so the later steps' Hessians and the block's outputs are
        # those of the quantized forward
        if calib_forward not in CALIB_FORWARDS:
            raise ValueError(f"calib_forward must be one of {CALIB_FORWARDS}, got {calib_forward!r}")
        if calib_forward == "quantized" and input_quant is None:
            raise ValueError("calib_forward 'quantized' needs input_quant (how the packed modules round inputs)")
        self.calib_forward = calib_forward
        self._input_hooks = []

    def prepare(self, model, adapter) -> None:
        check_weights(model, adapter, self.spec)

    def collect_hessians(self, ctx, names: list[str], targets=None) -> dict[str, Hessian]:
        return collect_hessians(ctx, names, targets, self.hessian_dtype, self.cross_dtype, self.input_quant)

    def float_input_names(self, ctx) -> list[str]:
        if not self.asym_calib:
            return []
        linears = {n for n, m in ctx.linears.items() if not isinstance(m, WQLinear)}
        return [o[0] for owners in sequential_owners(ctx.adapter, linears, self.true_sequential) for o in owners]

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise RuntimeError("GPTQ needs calibration data")
        # the steps' forwards recompute nothing that an earlier step's forward already ran unchanged
        with ctx.reuse_outputs():
            results = self._quantize_steps(ctx)
            if ctx.wants_outputs:
                # the next block's inputs, through the rounded weights still held by the float linears
                # (what the steps above saw), before the packed modules replace them
                ctx.outputs = ctx.forward()
        linears = ctx.linears
        for n, (q, s, z, perm) in results.items():
            m = linears[n]
            mod = WQLinear.from_codes(q, s, z, self.spec, bias=getattr(m, "bias", None), perm=perm,
                                      name=f"{ctx.name}.{n}")
            set_module(ctx.block, n, mod.to(linear_weight(m).device))

    def _quantize_steps(self, ctx, linears: dict | None = None) -> dict:
        """Rounds the block's float linears (or those given) in sequential order; returns, per linear,
        (codes, scales, zeros, perm), with each float linear now holding its rounded weight."""
        if linears is None:
            linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, WQLinear)}
        results = {}
        order = sequential_owners(ctx.adapter, linears, self.true_sequential)
        targets = None
        if self.asym_calib:
            targets = {n: list(xs) for n, xs in ctx.float_inputs_of.items()}
        for owners in order:
            hs = self.collect_hessians(ctx, [o[0] for o in owners], targets)
            for names in owners:
                mods = [linears[n] for n in names]
                ws = [linear_weight(m).detach().float() for m in mods]
                w = torch.cat(ws)
                gs = WQLinear.spec_group_size(self.spec, w.shape[1])
                r = gptq_quantize(w, hs[names[0]].H, self.spec, gs, percdamp=self.percdamp,
                                  block_size=self.block_size, act_order=self.act_order,
                                  static_groups=self.static_groups, clip_grid=self.clip_grid,
                                  max_shrink=self.max_shrink, C=hs[names[0]].C,
                                  asym_calib=self.input_calib if self.input_quant is not None else self.asym_calib,
                                  qparams=self.weight_qparams(names, w) if self.weight_qparams else None)
                rows = [t.shape[0] for t in ws]
                parts = zip(names, mods, r["codes"].split(rows), r["scales"].split(rows),
                            r["zeros"].split(rows) if r["zeros"] is not None else [None] * len(rows),
                            r["weight"].split(rows))
                for n, m, q, s, z, wq in parts:
                    # later steps must see this step's rounding (true-sequential)
                    set_linear_weight(m, wq.to(linear_weight(m).dtype))
                    results[n] = (q, s, z, r["perm"])
                    if self.calib_forward == "quantized":
                        self._input_hooks.append(m.register_forward_pre_hook(
                            lambda _m, args, _n=n: (self.input_quant(_n, args[0]), *args[1:])))
            del hs
        return results

    def remove_input_hooks(self) -> None:
        for h in self._input_hooks:
            h.remove()
        self._input_hooks = []

    def config(self) -> dict:
        return {"method": self.name, "percdamp": self.percdamp, "block_size": self.block_size,
                "act_order": self.act_order, "static_groups": self.static_groups,
                "true_sequential": self.true_sequential, "clip_grid": self.clip_grid, "max_shrink": self.max_shrink,
                "forward_dtype": str(self.forward_dtype).replace("torch.", ""), "asym_calib": self.asym_calib,
                "hessian_dtype": str(self.hessian_dtype).replace("torch.", ""),
                "cross_dtype": str(self.cross_dtype).replace("torch.", "")}
