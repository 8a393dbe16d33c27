"""Activation quantization fused into the norm that feeds W8A8 linears.

In a Llama-like block `input_layernorm` feeds q/k/v and `post_attention_layernorm` feeds gate/up: the
three (or two) `W8A8Linear`s read the very same tensor, and each would quantize it again (absmax,
divide, round: a pass over the activation apiece). `NormActQuant` makes the norm emit the int8 codes
and scales once, right after it computes its output (still hot in cache), and the consumers take
them instead of quantizing.

It is a forward hook on the model's own norm module, not a replacement of it: the norm's output is
the float tensor the model always computed (so nothing else that reads it changes, and the state dict
keeps its names), and the codes are exactly what each consumer would have computed from that tensor
(same quantizer, same mode, same static scale), so the fused model's outputs equal the unfused
model's bit for bit. A consumer takes the codes only when it is called with that very tensor
object, unmodified; anything else (another input, an in-place change) falls back to quantizing
as before. The codes are dropped once every consumer has taken them.

`attach(norm, consumers)` links them (the consumers must share one activation mode, and one static
scale if static); `fused_norms(model)` lists the links (what a checkpoint records); `detach(norm)`
undoes one. Which norms feed which linears is the model adapter's knowledge: the w8a8 step
(lowbit.algorithms.w8a8) attaches them from the adapter's norm -> linears pairs.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import SpecError
from ..kernels.int8_gemm import act_offset, quantize_activation
from .w8a8_linear import W8A8Linear

ATTR = "_act_source"  # on each consumer: the NormActQuant it takes codes from


class NormActQuant:
    """Quantizes `norm`'s output once for `consumers` (W8A8Linears reading exactly that output)."""

    def __init__(self, norm: nn.Module, consumers: list[W8A8Linear]):
        # strong references, no hook handle: a deepcopy of the model then copies norm, consumers and
        # the hook (a bound method of this object) together (weakrefs and handles would still point
        # at the original)
        self.norm = norm
        self.consumers = list(consumers)
        self.act_mode = self.consumers[0].act_mode
        self._entry = None  # (weakref to the norm output, its version or None, codes, scales, takes left)
        self._hook_id = norm.register_forward_hook(self._hook).id

    def _hook(self, module, args, output):
        self._entry = None
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() == 0:
            return None
        m = output.numel() // max(output.shape[-1], 1)
        first = self.consumers[0]  # read at run time: a later load_state_dict may change a static scale
        codes, scales = quantize_activation(output, self.act_mode, first.input_scale,
                                            offset=act_offset(first._prepared(), m))
        version = None if output.is_inference() else output._version
        self._entry = [weakref.ref(output), version, codes, scales, len(self.consumers)]
        return None

    def take(self, x: torch.Tensor):
        """(codes, scales) of x if x is the norm's latest output, unchanged since; else None."""
        e = self._entry
        if e is None or e[0]() is not x:
            return None
        if e[1] is not None and (x.is_inference() or x._version != e[1]):
            self._entry = None
            return None
        e[4] -= 1
        if e[4] <= 0:
            self._entry = None
        return e[2], e[3]

    def remove(self) -> None:
        for hooks in (self.norm._forward_hooks, self.norm._forward_hooks_with_kwargs,
                      self.norm._forward_hooks_always_called):
            hooks.pop(self._hook_id, None)
        self._entry = None
        for c in self.consumers:
            if c.__dict__.get(ATTR) is self:
                del c.__dict__[ATTR]


def _check_consumers(consumers) -> None:
    if not consumers:
        raise SpecError("norm activation fusion: no consumer linears given")
    for c in consumers:
        if type(c) is not W8A8Linear:  # MixedInt8Linear needs the float input for its outlier columns
            raise SpecError(f"norm activation fusion: consumers must be W8A8Linear, got {type(c).__name__}")
        if c.__dict__.get(ATTR) is not None:
            raise SpecError("norm activation fusion: a consumer already takes its codes from a norm")
    first = consumers[0]
    for c in consumers[1:]:
        if c.act_mode != first.act_mode or c.in_features != first.in_features:
            raise SpecError(f"norm activation fusion: consumers disagree ({c.act_mode}, {c.in_features} inputs vs "
                            f"{first.act_mode}, {first.in_features})")
        if c.input_scale is not None and not torch.equal(c.input_scale, first.input_scale):
            raise SpecError("norm activation fusion: static consumers need one input_scale")


def attach(norm: nn.Module, consumers: list[W8A8Linear]) -> NormActQuant:
    """Makes `norm` quantize its output once for `consumers`; refuses consumers that could not share
    the codes (not plain W8A8Linear, different modes or static scales, already fused)."""
    consumers = list(consumers)
    _check_consumers(consumers)
    detach(norm)
    fusion = NormActQuant(norm, consumers)
    for c in consumers:
        c.__dict__[ATTR] = fusion  # a plain attribute: not a submodule, not in the state dict
    norm.__dict__[ATTR] = fusion
    return fusion


def detach(norm: nn.Module) -> None:
    fusion = norm.__dict__.pop(ATTR, None)
    if fusion is not None:
        fusion.remove()


def source_of(linear: nn.Module) -> NormActQuant | None:
    return linear.__dict__.get(ATTR)


def fused_norms(model: nn.Module) -> dict[str, list[str]]:
    """{norm path: [consumer paths]} of every fusion inside `model`."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for n, m in model.named_modules():
        fusion = m.__dict__.get(ATTR)
        if isinstance(fusion, NormActQuant) and fusion.norm is m:
            consumers = [names.get(id(c)) for c in fusion.consumers]
            if all(c is not None for c in consumers):
                out[n] = consumers
    return out
