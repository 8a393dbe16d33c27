"""The rounding step of weight + activation int8 recipes: every linear becomes a `W8A8Linear`.

Weights are rounded to nearest on a symmetric int8 grid, per tensor or per output channel (the
recipe's `weights`); activations are quantized as the recipe's `activations` spec says:

    activations spec                      W8A8Linear act_mode
    granularity token,  dynamic: true     per_token   (scale from each token's absmax, at run time)
    granularity tensor, dynamic: true     per_tensor  (scale from the whole input's absmax, at run time)
    granularity tensor, dynamic: false    static      (input_scale calibrated: absmax / 127 over the
                                                       calibration tokens of the block's float inputs)

After SmoothQuant this is SmoothQuant's O1 / O2 / O3; alone it is naive W8A8.

`rounding: gptq` rounds the weights with GPTQ instead of to nearest, on the very same int8 grid (the
scale is still absmax / 127.5 per channel or per tensor, fixed before any column moves, so the
checkpoint and the GEMM are unchanged): each code absorbs the output error of the codes before it,
through the Hessian of the linear's calibration inputs (smoothed, when SmoothQuant ran first).
llm-compressor's W8A8 recipe does the same (SmoothQuant, then GPTQ at 8 bits). The linears are
rounded in GPTQ's true-sequential order, each step's Hessian read with the steps before it rounded;
the activations stay float throughout calibration (as in llm-compressor): the Hessians and the
outputs passed to the next block come from the float linears holding the rounded weights.

`act_calib` (0..1, with `rounding: gptq`) fits the rounding to the activations the GEMM will see:
the Hessian comes from the calibration inputs rounded to int8 as W8A8Linear rounds them, and the
target is the float product W X, taken by that fraction of its least-squares correction (the closed
form of GPTQ's `asym_calib`). Only the part of the activations' rounding error that correlates with
the rounded inputs can move into the weights, so per layer the gain is small (a 32 x 64 test layer,
4096 tokens with outlier channels: 3.7% less output error at 1.0); through a model it adds up
(SmolLM2-135M W8A8 SmoothQuant O1, held-out validation: ppl +0.75% -> +0.36% at 1.0).

`calib_forward: quantized` (with act_calib) calibrates on the quantized forward instead: once a linear
is rounded it also rounds its inputs during calibration, so the later linears' Hessians and the next
block's inputs carry every activation rounding before them (see gptq.round_on_fixed_grids). Held-out
validation, 64 x 512 calibration, `w8a8-sq-o1`: SmolLM2 25.873 -> 25.904 (float 25.779), Gemma-3
54.603 -> 54.094 (float 54.375); for `w8a8-llm-int8-gptq` the other way round. Off by default (`float`).

With `fuse_norm` (the default), every norm the adapter pairs with the linears reading its output
(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up) quantizes that output once for them
(`lowbit.nn.act_quant_norm`) instead of each linear quantizing the same tensor again; the outputs are
unchanged bit for bit.
"""

from __future__ import annotations

import logging

import torch

from ..calib.stats import collect_activation_stats
from ..errors import CalibrationError, InvalidWeightsError, SpecError, UnsupportedArchitectureError
from ..kernels.int8_gemm import QMAX, quantize_activation
from ..models import get_blocks, block_linears, get_module, linear_weight, resolve_scaling_pairs, set_module
from ..nn import W8A8Linear
from ..nn import act_quant_norm
from ..nn.w8a8_linear import int8_weight
from ..quant import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from .base import Algorithm
from .gptq import check_act_calib, check_calib_forward, check_rounding, round_on_fixed_grids


def weight_granularity(spec: QuantSpec) -> str:
    """"tensor" or "channel" for a symmetric 8-bit integer weight spec; anything else is refused."""
    g = spec.granularity
    if spec.bits != 8 or not spec.symmetric or spec.dtype != "int":
        raise SpecError(f"W8A8 needs 8-bit symmetric integer weights, the recipe has {spec}")
    if isinstance(g, PerTensor):
        return "tensor"
    if isinstance(g, PerChannel) or (isinstance(g, PerGroup) and g.group_size == -1):
        return "channel"
    raise SpecError(f"W8A8 weights are per tensor or per channel, the recipe has {g}")


def act_mode(spec: QuantSpec | None) -> str:
    """W8A8Linear's act_mode for an 8-bit symmetric activation spec."""
    if spec is None:
        raise SpecError("a W8A8 recipe needs an `activations` block (bits 8, symmetric, granularity "
                        "token/tensor, dynamic true/false)")
    if spec.bits != 8 or not spec.symmetric or spec.dtype != "int":
        raise SpecError(f"W8A8 activations are 8-bit symmetric integers, the recipe has {spec}")
    g = spec.granularity
    if isinstance(g, PerToken) and spec.dynamic:
        return "per_token"
    if isinstance(g, PerTensor):
        return "per_tensor" if spec.dynamic else "static"
    raise SpecError(f"W8A8 activations are per token (dynamic) or per tensor (dynamic or static), "
                    f"the recipe has {spec}")


def check_finite_weights(model, adapter) -> None:
    """Refuses NaN/Inf weights before any work, naming the layer."""
    for i, block in enumerate(get_blocks(model, adapter)):
        for name, mod in block_linears(block, adapter).items():
            w = linear_weight(mod)
            if w.is_floating_point() and not bool(w.isfinite().all()):
                raise InvalidWeightsError(f"layer {adapter.blocks}.{i}.{name} has NaN or Inf in its weight")


log = logging.getLogger(__name__)


def norm_pairs(block, adapter, config) -> list[tuple[str, tuple[str, ...]]]:
    """(norm, linears reading its output) of the adapter's norm pairs that hold for this block, found
    while the linears are still float (the width checks read nn.Linear shapes)."""
    try:
        return [(p.prev_name, p.linear_names) for p in resolve_scaling_pairs(block, adapter, config)
                if p.kind == "norm"]
    except UnsupportedArchitectureError as e:  # the folds' concern, not this one's: just leave it unfused
        log.debug("no norm fusion: %s", e)
        return []


def fuse_norm_quantization(block, pairs: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """Attaches norm activation quantization (lowbit.nn.act_quant_norm) for each (norm, linears) pair
    whose linears are all plain W8A8Linear sharing one activation setting; returns the norms fused."""
    fused = []
    for norm, names in pairs:
        consumers = [get_module(block, n) for n in names]
        if not all(type(c) is W8A8Linear for c in consumers):
            continue
        try:
            act_quant_norm.attach(get_module(block, norm), consumers)
        except SpecError as e:
            log.debug("%s not fused: %s", norm, e)
            continue
        fused.append(norm)
    return fused


def gptq_int8_codes(ctx, linears: dict, granularity: str, *, percdamp: float, act_order: bool,
                    input_quant=None, act_calib: float = 0.0, calib_forward: str = "float"
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-rounded int8 codes on the grid rounding to nearest would use (`int8_weight`'s scales, per
    tensor or per output channel): {name: (codes `[out, in]`, scales)}. `input_quant(name, x)` is x as
    the packed module will round it, used with `act_calib` > 0 (see the module doc); `calib_forward`:
    see round_on_fixed_grids."""
    scales = {}

    def grid(n, w):
        _, scales[n] = int8_weight(w, granularity, n)
        return scales[n].reshape(-1, 1).expand(w.shape[0], 1)

    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel())
    codes = round_on_fixed_grids(ctx, linears, spec, grid, percdamp=percdamp, act_order=act_order,
                                 input_quant=input_quant, input_calib=act_calib, calib_forward=calib_forward)
    return {n: (q, scales[n]) for n, q in codes.items()}


class W8A8(Algorithm):
    name = "w8a8"
    takes_activations = True

    def __init__(self, spec: QuantSpec, activations: QuantSpec | None = None, fuse_norm: bool = True,
                 rounding: str = "nearest", percdamp: float = 0.01, act_order: bool = True,
                 act_calib: float = 0.0, calib_forward: str = "float"):
        self.spec = spec
        if not isinstance(fuse_norm, bool):
            raise SpecError(f"w8a8: fuse_norm is true or false, got {fuse_norm!r}")
        self.fuse_norm = fuse_norm
        self.rounding, self.percdamp = check_rounding("w8a8", rounding, percdamp)
        self.act_order = bool(act_order)
        self.activations = activations
        self.weight_granularity = weight_granularity(spec)
        self.act_mode = act_mode(activations)
        # static scales and GPTQ's Hessians come from calibration; dynamic rounding to nearest needs no data
        self.requires_calibration = self.act_mode == "static" or rounding == "gptq"
        # GPTQ rounding fitted to the int8 activations the GEMM will see: 0 (GPTQ on float inputs, as
        # llm-compressor) .. 1 (the whole least-squares correction for the activations' rounding)
        self.act_calib = check_act_calib("w8a8", act_calib, rounding)
        self.calib_forward = check_calib_forward("w8a8", calib_forward, self.act_calib)

    def prepare(self, model, adapter) -> None:
        check_finite_weights(model, adapter)
        self._config = getattr(model, "config", None)

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        linears = {n: m for n, m in ctx.linears.items() if not isinstance(m, W8A8Linear)}
        pairs = []
        if self.fuse_norm:
            pairs = norm_pairs(ctx.block, ctx.adapter, getattr(self, "_config", None) or getattr(ctx.block, "config", None))
        scales: dict[str, float] = {}
        if self.act_mode == "static":
            if not ctx.has_data:
                raise CalibrationError("static activation scales need calibration data")
            stats = collect_activation_stats(ctx, list(linears))
            for n in linears:
                if n not in stats or stats[n].absmax <= 0:
                    raise CalibrationError(f"{ctx.name}.{n}: calibration never reached this layer with a non-zero "
                                           f"input; no static scale can be set")
                scales[n] = stats[n].absmax / QMAX
        codes = self._gptq_codes(ctx, linears, scales) if self.rounding == "gptq" else {}
        for n, m in linears.items():
            kw = dict(weight_granularity=self.weight_granularity, act_mode=self.act_mode,
                      input_scale=scales.get(n), name=f"{ctx.name}.{n}")
            if n in codes:
                q = W8A8Linear.from_codes(*codes[n], getattr(m, "bias", None), **kw)
            else:
                q = W8A8Linear.from_weight(linear_weight(m), getattr(m, "bias", None), **kw)
            set_module(ctx.block, n, q.to(linear_weight(m).device))
        fuse_norm_quantization(ctx.block, pairs)

    def _gptq_codes(self, ctx, linears: dict, input_scales: dict[str, float]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        def input_quant(n, x):  # x as W8A8Linear will round it
            x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
            s = input_scales.get(n)
            q, sx = quantize_activation(x2, self.act_mode, None if s is None else torch.tensor(s))
            return (q.float() * sx).reshape(x.shape)

        return gptq_int8_codes(ctx, linears, self.weight_granularity, percdamp=self.percdamp,
                               act_order=self.act_order, input_quant=input_quant, act_calib=self.act_calib,
                               calib_forward=self.calib_forward)

    def config(self) -> dict:
        d = {"method": self.name, "weights": self.weight_granularity, "activations": self.act_mode,
             "fuse_norm": self.fuse_norm, "rounding": self.rounding}
        if self.rounding == "gptq":
            d.update(percdamp=self.percdamp, act_order=self.act_order, act_calib=self.act_calib,
                     calib_forward=self.calib_forward)
        return d
