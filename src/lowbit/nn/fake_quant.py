"""Fake-quant modules for quantization-aware training (QAT).

`FakeQuantize` rounds a tensor onto the grid of a `QuantSpec` in the forward and lets gradients
through straight (`lowbit.quant.fake_quantize`): weights `[out, in]` per group or per channel,
activations `[..., tokens, features]` per tensor or per token, symmetric or asymmetric, 2..8 bits.
Its step sizes are buffers, or parameters learned with LSQ (Esser et al., 2020) when `learnable`;
zero points are integer buffers, or, with `learnable_zero`, float parameters rounded (and clamped to
the code range) straight-through in every forward, so what is learned always packs as an integer
(EfficientQAT's Block-AP trains them this way).

`FakeQuantLinear` is the trainable stand-in for a packed `WQLinear`: a float latent weight that the
optimizer updates, and the grid it is rounded onto. It starts either from a float linear (`from_float`:
round-to-nearest grid, the float weight as latent weight) or from a PTQ result (`from_wqlinear`: the
packed module's scales, zero points and act-order permutation as the grid, its dequantized weight as
the latent weight, so training starts exactly where RTN, AWQ or GPTQ ended). `to_wqlinear` packs it
back into the `WQLinear` PTQ produces, computing what the fake-quant forward computed: the forward
already rounds scales to the fp16 that `WQLinear` stores.

With quantized activations (`input_spec`) it trains the W4A8 layout and packs to `W4A8Linear`
(`to_w4a8linear`): symmetric int4 codes whose group scales are a float scale per output row times
an integer multiplier k in [1, 16] per group (`two_level`; the multipliers come from the PTQ start,
`from_w4a8linear`; the integer GEMM needs them integral, so they stay fixed, or train as floats that
the forward rounds straight-through, like learned zero points; the row scales train with LSQ), the input rounded per token onto the kernel's int8 grid
(`kernels.int8_gemm.fake_quantize_per_token`), so the packed module computes what training saw.

`freeze_codes()` fixes the integer codes the latent weight rounds to now, after which the forward is
(codes - zero) * scale and only the scale trains (EfficientQAT's E2E-QP). Training scales by LSQ
through the rounding does not work there: a latent weight that sits on its grid (any PTQ start)
gives round(v) - v = 0, no gradient at all; with fixed codes the gradient is the code itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..quant import (PerChannel, PerGroup, PerTensor, PerToken, QParams, QuantSpec, check_group_size,
                     choose_qparams, fake_quantize, grad_scale, lsq_grad_factor, quantize, straight_through)
from ..kernels.int8_gemm import fake_quantize_per_token
from ..kernels.w4a8 import GROUP_SCALE_MAX
from ..quant.primitives import SCALE_EPS, fp16_scale
from .w4a8_linear import W4A8Linear
from .wq_linear import WQLinear

__all__ = ["FakeQuantize", "FakeQuantLinear", "is_int8_per_token"]


def _stored_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The scale as the packed module will hold it (positive, rounded to `dtype`: fp16 for WQLinear,
    float32 for W4A8Linear's row scales), with a straight-through gradient to the float one learned."""
    s = scale.clamp_min(SCALE_EPS)
    if dtype == torch.float32:
        return s
    return straight_through(s, s.detach().to(dtype).float().clamp_min(SCALE_EPS))


class FakeQuantize(nn.Module):
    """Rounds a tensor onto the grid of `spec` (straight-through gradients).

    Static (`spec.dynamic` False): `scale` (and `zero_point` when asymmetric) in the public qparam shape
    of lowbit.quant (`[out, in / G]` for a weight in groups, `[]` per tensor), given at construction or
    set by `observe(x)` (min-max). `learnable`: the scale is a parameter trained with LSQ, its gradient
    scaled by 1 / sqrt(N * Q_P) unless `lsq_grad_scale` is False. Dynamic: qparams from each input
    (per token or per tensor), nothing stored.
    """

    def __init__(self, spec: QuantSpec, scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                 *, learnable: bool = False, lsq_grad_scale: bool = True, learnable_zero: bool = False,
                 scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        if spec.is_codebook:
            raise SpecError(f"fake quantization trains integer grids only, got {spec}")
        self.spec = spec
        self.scale_dtype = scale_dtype
        self.learnable = bool(learnable)
        self.lsq_grad_scale = bool(lsq_grad_scale)
        self.learnable_zero = bool(learnable_zero) and not spec.symmetric
        if spec.dynamic:
            if learnable or learnable_zero:
                raise SpecError("a dynamic spec computes its qparams per input: nothing to learn")
            self.scale = self.zero_point = None
            return
        scale = torch.ones(()) if scale is None else scale.detach().float().clone()
        self.scale = nn.Parameter(scale, requires_grad=True) if learnable else nn.Parameter(scale, requires_grad=False)
        if spec.symmetric:
            self.zero_point = None
        else:
            zero = torch.zeros_like(scale) if zero_point is None else zero_point.detach().float().round()
            if zero.shape != scale.shape:
                raise SpecError(f"zero_point of shape {tuple(zero.shape)} does not match the scale's {tuple(scale.shape)}")
            if self.learnable_zero:
                self.zero_point = nn.Parameter(zero.clone())
            else:
                self.register_buffer("zero_point", zero.clone())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Sets the static qparams to the min-max ones of x."""
        if self.spec.dynamic:
            return
        qp = choose_qparams(x.detach(), self.spec)
        self.scale.data = fp16_scale(qp.scale)
        if self.zero_point is not None:
            self.zero_point.data = qp.zero_point.clone()

    def qparams(self, numel_per_scale: int) -> QParams:
        """The qparams the forward uses: the stored scale rounded to fp16 and the zero point rounded
        into the code range, both straight through."""
        scale = self.scale
        if self.learnable and self.lsq_grad_scale:
            scale = grad_scale(scale, lsq_grad_factor(self.spec, numel_per_scale))
        zero = self.zero_point
        if zero is not None:
            zero = straight_through(zero, zero.detach().round().clamp(self.spec.qmin, self.spec.qmax))
        return QParams(scale=_stored_scale(scale, self.scale_dtype), zero_point=zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            return fake_quantize(x, self.spec)
        return fake_quantize(x, self.spec, self.qparams(_numel_per_scale(x, self.spec)))

    def extra_repr(self) -> str:
        return (f"{self.spec}" + (", learnable (LSQ)" if self.learnable else "")
                + (", learnable zero point" if self.learnable_zero else ""))


def _numel_per_scale(x: torch.Tensor, spec: QuantSpec) -> int:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return x.numel()
    if isinstance(g, PerGroup) and g.group_size != -1:
        return g.group_size
    return x.shape[-1]


def _weight_spec(spec: QuantSpec, in_features: int, name: str) -> QuantSpec:
    """The spec in the grouped form `WQLinear` stores (per channel is one group of the whole row)."""
    if spec.is_codebook:
        raise SpecError(f"layer {name or '?'}: QAT trains integer grids only, got {spec}")
    if spec.dynamic:
        raise SpecError(f"layer {name or '?'}: weights are quantized statically, got a dynamic spec {spec}")
    g = WQLinear.spec_group_size(spec, in_features)
    check_group_size(in_features, g, name)
    return spec.replace(granularity=PerGroup(g))


KERNEL_INPUT_SPEC = QuantSpec(bits=8, symmetric=True, granularity=PerToken(), dynamic=True)


def is_int8_per_token(spec: QuantSpec | None) -> bool:
    """int8 per token, dynamic: what W8A8/W4A8 kernels do to their input (`quantize_per_token`)."""
    return (spec is not None and spec.bits == 8 and spec.symmetric and spec.dtype == "int" and spec.dynamic
            and isinstance(spec.granularity, PerToken))


def _activation_spec(spec: QuantSpec | None) -> QuantSpec | None:
    if spec is None:
        return None
    if not isinstance(spec.granularity, (PerTensor, PerToken, PerChannel)):
        raise SpecError(f"activations are quantized per tensor or per token, got {spec.granularity}")
    if not spec.dynamic and not isinstance(spec.granularity, PerTensor):
        raise SpecError(f"static activation scales are per tensor; per-token scales need dynamic=True ({spec})")
    return spec


class FakeQuantLinear(nn.Module):
    """A linear whose weight (and optionally input) is fake-quantized; trains, then packs to `WQLinear`.

    weight  float `[out, in]` latent weight, input channels in model order (a Parameter);
    perm    int64 `[in]` act-order permutation (GPTQ's desc_act), or None: groups are formed over the
            columns `weight[:, perm]`, as `WQLinear` stores them;
    weight_quant  the grid: scale `[out, in / G]`, zero point `[out, in / G]` (asymmetric); with
            `two_level`, scale `[out, 1]` (float32, per row) times `group_mult`;
    group_mult    float `[out, in / G]` multipliers (two_level only), used rounded to integers in
            [1, 16]; a frozen Parameter unless QAT trains it (straight-through);
    input_quant   an activation `FakeQuantize`, or None (weight-only); int8 per token, dynamic, uses
            the kernel's grid;
    codes   uint8 / int8 `[out, in]` in stored column order once `freeze_codes()` ran, else None.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, *, bias: bool = False,
                 act_order: bool = False, learnable_scales: bool = True, lsq_grad_scale: bool = True,
                 learnable_zeros: bool = False, input_spec: QuantSpec | None = None, two_level: bool = False,
                 name: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = _weight_spec(spec, in_features, name)
        self.group_size = self.spec.granularity.group_size
        self.name = name
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        ng = in_features // self.group_size
        if two_level:
            if not (self.spec.symmetric and self.spec.bits == 4 and self.spec.dtype == "int"):
                raise SpecError(f"layer {name or '?'}: two-level group scales are W4A8's layout: 4-bit symmetric "
                                f"integer weights, got {self.spec}")
            self.weight_quant = FakeQuantize(self.spec.replace(granularity=PerGroup(in_features)),
                                             torch.ones(out_features, 1), learnable=learnable_scales,
                                             lsq_grad_scale=lsq_grad_scale, scale_dtype=torch.float32)
            # a parameter so that QAT may train it (`QATConfig.mult_lr`), rounded straight-through to an
            # integer in the forward; frozen unless the trainer turns its gradient on
            self.group_mult = nn.Parameter(torch.ones(out_features, ng), requires_grad=False)
        else:
            # a layer with int8 inputs packs into W4A8Linear, whose scales are float32; WQLinear's are fp16
            self.weight_quant = FakeQuantize(self.spec, torch.ones(out_features, ng),
                                             None if self.spec.symmetric else torch.zeros(out_features, ng),
                                             learnable=learnable_scales, lsq_grad_scale=lsq_grad_scale,
                                             learnable_zero=learnable_zeros,
                                             scale_dtype=torch.float32 if is_int8_per_token(input_spec) else torch.float16)
            self.group_mult = None
        if act_order:
            self.register_buffer("perm", torch.arange(in_features))
        else:
            self.perm = None
        input_spec = _activation_spec(input_spec)
        self.input_quant = None if input_spec is None else FakeQuantize(input_spec)
        self.register_buffer("codes", None)  # a tensor (in the state dict) once frozen

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec, *, learnable_scales: bool = True,
                   lsq_grad_scale: bool = True, learnable_zeros: bool = False, input_spec: QuantSpec | None = None,
                   name: str = "") -> "FakeQuantLinear":
        """Round-to-nearest grid (min-max per group, as `WQLinear.from_weight`), the float weight as
        the latent weight."""
        w = linear.weight.detach().float()
        m = cls(w.shape[1], w.shape[0], spec, bias=linear.bias is not None, learnable_scales=learnable_scales,
                lsq_grad_scale=lsq_grad_scale, learnable_zeros=learnable_zeros, input_spec=input_spec, name=name)
        qp = choose_qparams(w, m.spec)
        m._set(w, fp16_scale(qp.scale), qp.zero_point, linear.bias, None)
        return m.to(linear.weight.device)

    @classmethod
    def from_wqlinear(cls, q: WQLinear, *, learnable_scales: bool = True, lsq_grad_scale: bool = True,
                      learnable_zeros: bool = False, input_spec: QuantSpec | None = None,
                      name: str = "") -> "FakeQuantLinear":
        """The PTQ result as the starting point: its grid, and its dequantized weight as latent weight
        (so the fake-quant forward starts out computing what the packed module computes)."""
        if q.codebook is not None:
            raise SpecError(f"layer {name or '?'}: QAT trains integer grids; this layer holds a codebook")
        spec = QuantSpec(bits=q.bits, symmetric=q.symmetric, granularity=PerGroup(q.group_size))
        m = cls(q.in_features, q.out_features, spec, bias=q.bias is not None, act_order=q.perm is not None,
                learnable_scales=learnable_scales, lsq_grad_scale=lsq_grad_scale, learnable_zeros=learnable_zeros,
                input_spec=input_spec, name=name)
        zeros = None if q.symmetric else q.zeros()
        m._set(q.dequantize_weight(), q.scales.float(), zeros, q.bias, q.perm)
        return m.to(q.scales.device)

    @classmethod
    def from_w4a8linear(cls, q: W4A8Linear, *, learnable_scales: bool = True, lsq_grad_scale: bool = True,
                        name: str = "") -> "FakeQuantLinear":
        """A W4A8 PTQ result as the starting point: its int4 codes on its grid (per row, or the two-level
        groups with their integer multipliers), its input rounded per token to int8 as the kernel does."""
        if getattr(q, "rotate_block", 0):
            raise SpecError(f"layer {name or '?'}: QAT does not train input-rotated W4A8 layers; quantize without "
                            f"`rotate` to start QAT from W4A8")
        spec = QuantSpec(bits=4, symmetric=True,
                         granularity=PerGroup(q.group_size if q.weight_granularity == "group" else -1))
        m = cls(q.in_features, q.out_features, spec, bias=q.bias is not None, learnable_scales=learnable_scales,
                lsq_grad_scale=lsq_grad_scale, input_spec=KERNEL_INPUT_SPEC,
                two_level=q.weight_granularity == "group", name=name)
        row = q.weight_scale.float().reshape(-1, 1).expand(q.out_features, 1)  # a per-tensor scale trains per row
        if m.group_mult is not None:
            m.group_mult.copy_(q.group_scale.float())
        m._set(q.dequantize_weight(), row, None, q.bias, None)
        return m.to(q.qweight.device)

    @torch.no_grad()
    def _set(self, weight, scale, zero, bias, perm) -> None:
        self.weight.copy_(weight.float())
        self.weight_quant.scale.copy_(scale.float())
        if zero is not None:
            self.weight_quant.zero_point.copy_(zero.float())
        if bias is not None:
            self.bias.copy_(bias.detach().float())
        if perm is not None:
            self.perm.copy_(perm.long())

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fixes the codes the latent weight rounds to now; from here on the forward dequantizes them
        with the (trainable) scale, and the latent weight is left alone (no gradient)."""
        if self.codes is None:
            self.codes = self._codes(self.weight_qparams())
        self.weight.requires_grad_(False)

    def _codes(self, qp: QParams) -> torch.Tensor:
        w = self.weight.detach().float()
        if self.perm is not None:
            w = w.index_select(1, self.perm)
        return quantize(w, QParams(scale=qp.scale.detach(), zero_point=None if qp.zero_point is None
                                   else qp.zero_point.detach()), self.spec)

    # ---- compute ------------------------------------------------------------------------------
    def weight_qparams(self) -> QParams:
        """The grid the forward uses: scale `[out, in / G]` (two-level: row scale times multiplier)."""
        if self.group_mult is None:
            return self.weight_quant.qparams(self.group_size)
        row = self.weight_quant.qparams(self.in_features)
        return QParams(scale=row.scale * straight_through(self.group_mult, self._multipliers()), zero_point=None)

    def _multipliers(self) -> torch.Tensor:
        """The two-level group multipliers as the packed module holds them: integers in [1, 16]."""
        return self.group_mult.detach().round().clamp(1, GROUP_SCALE_MAX)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight `[out, in]`, input channels in model order."""
        qp = self.weight_qparams()
        if self.codes is not None:
            q = self.codes.float().view(self.out_features, -1, self.group_size)  # [out, in / G, G]
            if qp.zero_point is not None:
                q = q - qp.zero_point.unsqueeze(-1)
            wq = (q * qp.scale.unsqueeze(-1)).reshape(self.out_features, self.in_features)
        else:
            w = self.weight if self.perm is None else self.weight.index_select(1, self.perm)
            wq = fake_quantize(w, self.spec, qp)
        if self.perm is not None:
            wq = wq.index_select(1, torch.argsort(self.perm))
        return wq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            if is_int8_per_token(self.input_quant.spec):
                x = fake_quantize_per_token(x).to(x.dtype)
            else:
                x = self.input_quant(x)
        return F.linear(x, self.quantized_weight().to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    # ---- conversion ---------------------------------------------------------------------------
    @torch.no_grad()
    def to_wqlinear(self) -> WQLinear:
        """The packed module computing what this one computes (weight-only: no input quantization)."""
        if self.input_quant is not None or self.group_mult is not None:
            raise SpecError(f"layer {self.name or '?'}: quantized activations or two-level group scales pack into "
                            f"W4A8Linear (to_w4a8linear); only weight-only fake quantization converts to WQLinear")
        qp = self.weight_qparams()
        codes = self.codes if self.codes is not None else self._codes(qp)
        zero = None if qp.zero_point is None else qp.zero_point.detach()
        return WQLinear.from_codes(codes, qp.scale.detach(), zero, self.spec, bias=self.bias, perm=self.perm,
                                   name=self.name).to(self.weight.device)

    @torch.no_grad()
    def to_w4a8linear(self) -> W4A8Linear:
        """The W4A8 module computing what this one computes: int4 codes, the row scales, and the group
        multipliers (two-level) or one group per row; the input per token in int8."""
        if not is_int8_per_token(None if self.input_quant is None else self.input_quant.spec):
            raise SpecError(f"layer {self.name or '?'}: W4A8Linear quantizes its input to int8 per token (dynamic); "
                            f"this layer's input is {None if self.input_quant is None else self.input_quant.spec}")
        if not (self.spec.symmetric and self.spec.bits == 4) or self.perm is not None:
            raise SpecError(f"layer {self.name or '?'}: W4A8Linear holds symmetric int4 weights in model order, "
                            f"got {self.spec}{' with act-order' if self.perm is not None else ''}")
        if self.group_mult is None and self.group_size != self.in_features:
            raise SpecError(f"layer {self.name or '?'}: float scales per group of {self.group_size} do not fit the "
                            f"integer GEMM; W4A8 groups are two-level (train from a W4A8Linear start)")
        qp = self.weight_qparams()
        codes = (self.codes if self.codes is not None else self._codes(qp)).to(torch.int8)
        if self.group_mult is None:
            return W4A8Linear.from_codes(codes, qp.scale.detach(), self.bias, name=self.name)
        row = self.weight_quant.qparams(self.in_features).scale.detach()
        return W4A8Linear.from_codes(codes, row, self.bias, group_scale=self._multipliers().to(torch.uint8),
                                     group_size=self.group_size,
                                     name=self.name)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec}, "
                f"bias={self.bias is not None}" + (", act_order" if self.perm is not None else "")
                + (", two-level group scales" if self.group_mult is not None else "")
                + (", frozen codes" if self.codes is not None else ""))
