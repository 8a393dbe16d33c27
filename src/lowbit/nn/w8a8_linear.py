"""`W8A8Linear`: int8 weights and int8 activations, the GEMM itself in integers.

Storage (what checkpoints hold; the names and shapes compressed-tensors' int-quantized uses):
- `weight`       int8 `[out, in]`, symmetric codes;
- `weight_scale` float32 `[out, 1]` (per output channel) or `[1]` (per tensor);
- `input_scale`  float32 `[1]`, only for static activations (calibrated);
- `bias`         optional, in the float model's dtype.

`W[n, k] = weight[n, k] * weight_scale[n]`. The forward quantizes x (per token or per tensor from
this call's absmax, or on the static `input_scale`), straight into the code form the GEMM backend
reads (int8, or uint8 + 128 for oneDNN), and calls `lowbit.kernels.int8_gemm`, which applies both
scales and the bias to the int32 accumulator and returns x's dtype. Where the preceding norm
quantizes its output once for several linears (`lowbit.nn.act_quant_norm`), the forward takes
those codes instead of quantizing x again.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import kernels
from ..errors import InvalidWeightsError, SpecError
from ..kernels.int8_gemm import act_offset
from ..quant import PerChannel, PerTensor, QuantSpec, choose_qparams, quantize

WEIGHT_GRANULARITIES = ("tensor", "channel")


def int8_weight(weight: torch.Tensor, granularity: str, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes `[out, in]` and float32 scales `[out, 1]` / `[1]` of a float weight, on
    lowbit.quant's grid (scale = absmax / 127.5, codes in [-128, 127], as compressed-tensors does)."""
    if granularity not in WEIGHT_GRANULARITIES:
        raise SpecError(f"int8 weight granularity must be 'tensor' or 'channel', got {granularity!r}")
    spec = QuantSpec(bits=8, symmetric=True, granularity=PerChannel() if granularity == "channel" else PerTensor())
    try:
        qp = choose_qparams(weight.detach().float(), spec)
    except InvalidWeightsError as e:  # say which layer
        raise InvalidWeightsError(f"layer {name or '?'}: {e}") from None
    q = quantize(weight.detach().float(), qp, spec)
    return q, qp.scale.float().reshape(-1, 1) if granularity == "channel" else qp.scale.float().reshape(1)


class W8A8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, weight_granularity: str = "channel",
                 act_mode: str = "per_token", bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 name: str = ""):
        super().__init__()
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise SpecError(f"layer {name or '?'}: weight granularity must be one of {WEIGHT_GRANULARITIES}, "
                            f"got {weight_granularity!r}")
        if act_mode not in kernels.INT8_ACT_MODES:
            raise SpecError(f"layer {name or '?'}: activation mode must be one of {kernels.INT8_ACT_MODES}, "
                            f"got {act_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity, self.act_mode = weight_granularity, act_mode
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        n_scales = (out_features, 1) if weight_granularity == "channel" else (1,)
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32))
        if act_mode == "static":
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._runtime: dict | None = None
        self._runtime_device: torch.device | None = None

    @classmethod
    def from_float(cls, linear: nn.Module, *, weight_granularity: str = "channel", act_mode: str = "per_token",
                   input_scale: torch.Tensor | float | None = None, name: str = "") -> "W8A8Linear":
        """From an `nn.Linear` (or anything with an `[out, in]` `weight` and optional `bias`).
        Static activations need `input_scale` (absmax / 127 of the calibrated input)."""
        weight = linear.weight
        bias = getattr(linear, "bias", None)
        return cls.from_weight(weight, bias, weight_granularity=weight_granularity, act_mode=act_mode,
                               input_scale=input_scale, name=name)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, weight_granularity: str = "channel",
                    act_mode: str = "per_token", input_scale: torch.Tensor | float | None = None,
                    name: str = "") -> "W8A8Linear":
        q, s = int8_weight(weight, weight_granularity, name)
        return cls.from_codes(q, s, bias, weight_granularity=weight_granularity, act_mode=act_mode,
                              input_scale=input_scale, name=name)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                   weight_granularity: str = "channel", act_mode: str = "per_token",
                   input_scale: torch.Tensor | float | None = None, name: str = "") -> "W8A8Linear":
        """From integer codes `[out, in]` (in [-128, 127]) and their scales (`[out, 1]` per channel, one
        number per tensor), rounded by someone else (GPTQ: `lowbit.algorithms.w8a8`'s `rounding`)."""
        out_f, in_f = codes.shape
        codes = codes.detach()
        if codes.is_floating_point():
            if not bool((codes == codes.round()).all()):
                raise SpecError(f"layer {name or '?'}: int8 codes must be integers")
        if int(codes.min()) < -128 or int(codes.max()) > 127:
            raise SpecError(f"layer {name or '?'}: int8 codes outside [-128, 127]")
        m = cls(in_f, out_f, weight_granularity=weight_granularity, act_mode=act_mode, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, name=name)
        m.weight.copy_(codes.to(torch.int8))
        m.weight_scale.copy_(torch.as_tensor(weight_scale, dtype=torch.float32).reshape(m.weight_scale.shape))
        if act_mode == "static":
            if input_scale is None:
                raise SpecError(f"layer {name or '?'}: static activations need a calibrated input_scale")
            sc = torch.as_tensor(input_scale, dtype=torch.float32).reshape(-1)
            if sc.numel() != 1 or not bool(torch.isfinite(sc).all()) or float(sc) <= 0:
                raise SpecError(f"layer {name or '?'}: input_scale must be one finite positive number, got {sc}")
            m.input_scale.copy_(sc)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m.to(codes.device)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out, in]` this module computes with."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def storage_bits(self) -> int:
        total = self.weight.numel() * 8 + self.weight_scale.numel() * 32
        if self.input_scale is not None:
            total += 32
        return total

    def _prepared(self) -> dict:
        if self._runtime is None or self._runtime_device != self.weight.device:
            forced = os.environ.get(kernels.INT8_BACKEND_ENV, "auto").strip().lower() or "auto"
            self._runtime = kernels.prepare_int8(self.weight, backends=(forced,) if forced in ("onednn", "avx2") else "auto")
            self._runtime_device = self.weight.device
        return self._runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = self._prepared()
        # codes the preceding norm already made from this very x (lowbit.nn.act_quant_norm), if any
        source = self.__dict__.get("_act_source")
        hit = source.take(x) if source is not None else None
        if hit is not None:
            qx, xs = hit
        else:
            m = x.numel() // max(x.shape[-1], 1)
            qx, xs = kernels.quantize_activation(x, self.act_mode, self.input_scale,
                                                 offset=act_offset(prepared, m))
        return kernels.int8_gemm(qx, xs, prepared, self.weight_scale, self.bias, x.dtype)

    def __getstate__(self):
        # copies and pickles leave the run-time tensors behind (oneDNN's prepacked weight is an opaque
        # tensor that can be neither copied nor pickled); the next forward rebuilds them
        state = dict(self.__dict__)
        state["_runtime"] = state["_runtime_device"] = None
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._runtime = None
        # model.to(bfloat16) must not round the scales: they are part of the quantized weight
        keep = {k: t for k in ("weight_scale", "input_scale") if (t := self._buffers.get(k)) is not None}
        out = super()._apply(fn, *args, **kwargs)
        for k, t in keep.items():
            if self._buffers[k].dtype != t.dtype:
                self._buffers[k] = t.to(self._buffers[k].device)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight=per-{self.weight_granularity}, act={self.act_mode}, bias={self.bias is not None}")
