"""`WQLinear`: a weight-only quantized replacement for `nn.Linear`.

Canonical storage (what checkpoints hold), for a weight `W [out, in]` with groups of G along `in`:
- `qweight`  uint8 `[out, in * bits / 8]`: unsigned codes u in [0, 2^bits), packed along `in`
  (lowbit.quant.pack layout);
- `scales`   fp16 `[out, in / G]`;
- `qzeros`   uint8 `[out, ceil8(in / G) * bits / 8]`: zero points in code units, packed the same
  way (asymmetric only; symmetric codes are stored offset by 2^(bits-1), which is the implied zero);
- `codebook` fp32 `[2^bits]` for non-linear (NF4, learned) quantization, where W = codebook[u] * scale;
- `perm`     int32 `[in]`, only for act-order (GPTQ's desc_act): column j of the stored codes holds input
  channel perm[j]. Groups are contiguous in that order, so the kernels stay the same and the forward
  gathers x[..., perm] first (what exllama and Marlin do with GPTQ's g_idx at load time).

So `W[n, perm[k]] = (u[n, k] - z[n, k // G]) * s[n, k // G]` (perm the identity without act-order). The forward never dequantizes the whole
matrix for a few tokens: it hands the canonical form once to `lowbit.kernels.prepare_wint`, which
builds the tensors of the fast CPU paths, and calls the dispatcher `wint_gemm`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import InvalidWeightsError, SpecError
from ..quant.primitives import fp16_scale
from ..quant import (PerChannel, PerGroup, QParams, QuantSpec, check_group_size, choose_qparams, pack, quantize,
                     unpack)


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


class WQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False, bias: bool = False, codebook: bool = False,
                 bias_dtype: torch.dtype = torch.float32, act_order: bool = False, name: str = ""):
        super().__init__()
        if not 2 <= bits <= 8:
            raise SpecError(f"bits must be in 2..8, got {bits}")
        group_size = in_features if group_size in (-1, None, 0) else group_size
        check_group_size(in_features, group_size, name)
        if (in_features * bits) % 8:
            raise SpecError(f"layer {name or '?'}: in_features={in_features} times {bits} bits is not whole bytes")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        ng = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, ng, dtype=torch.float16))
        if not symmetric and not codebook:
            self.register_buffer("qzeros", torch.zeros(out_features, _pad8(ng) * bits // 8, dtype=torch.uint8))
        else:
            self.qzeros = None
        if codebook:
            self.register_buffer("codebook", torch.zeros(2**bits, dtype=torch.float32))
        else:
            self.codebook = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32))
        else:
            self.perm = None
        self._runtime: dict | None = None  # the kernels' tensors, built on first forward
        self._runtime_device: torch.device | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def spec_group_size(cls, spec: QuantSpec, in_features: int) -> int:
        g = spec.granularity
        if isinstance(g, PerGroup):
            return in_features if g.group_size in (-1, None) else g.group_size
        if isinstance(g, PerChannel):
            return in_features
        raise SpecError(f"weight-only quantization needs per-group or per-channel weights, got {g}")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, *,
                    clip_ratio: float | torch.Tensor = 1.0, name: str = "") -> "WQLinear":
        """Round-to-nearest from a float weight `[out, in]` (clip_ratio shrinks each group's range)."""
        q, qp = cls.round_weight(weight, spec, clip_ratio=clip_ratio, name=name)
        return cls.from_codes(q, qp.scale, qp.zero_point, spec, bias=bias, codebook=qp.codebook, name=name)

    @classmethod
    def round_weight(cls, weight: torch.Tensor, spec: QuantSpec, *, clip_ratio: float | torch.Tensor = 1.0,
                     name: str = "") -> tuple[torch.Tensor, QParams]:
        """(codes, qparams) of a float weight `[out, in]` on its min-max grid, scales as stored (fp16):
        what from_weight packs."""
        in_f = weight.shape[1]
        check_group_size(in_f, cls.spec_group_size(spec, in_f), name)
        w = weight.detach().float()
        gspec = spec if isinstance(spec.granularity, PerGroup) else _with_group(spec, in_f)
        try:
            qp = choose_qparams(w, gspec, clip_ratio=clip_ratio)
        except InvalidWeightsError as e:  # say which layer
            raise InvalidWeightsError(f"layer {name or '?'}: {e}") from None
        qp.scale = fp16_scale(qp.scale)
        return quantize(w, qp, gspec), qp

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec, *,
                   bias: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
                   perm: torch.Tensor | None = None, name: str = "") -> "WQLinear":
        """From integer codes as `lowbit.quant.quantize` returns them (signed when symmetric). With
        `perm`, column j of q (and group j // G) belongs to input channel perm[j]."""
        out_f, in_f = q.shape
        g = cls.spec_group_size(spec, in_f)
        m = cls(in_f, out_f, bits=spec.bits, group_size=g, symmetric=spec.symmetric and codebook is None,
                bias=bias is not None, codebook=codebook is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, act_order=perm is not None,
                name=name)
        if perm is not None:
            perm = perm.reshape(-1).to(torch.int64)
            if perm.numel() != in_f or not torch.equal(perm.sort().values, torch.arange(in_f, device=perm.device)):
                raise SpecError(f"layer {name or '?'}: perm is not a permutation of {in_f} input channels")
            m.perm.copy_(perm.to(torch.int32))
        u = q.to(torch.int32)
        if m.symmetric:
            u = u + 2 ** (spec.bits - 1)
        m.qweight.copy_(pack(u.to(torch.uint8), spec.bits))
        m.scales.copy_(scales.reshape(out_f, -1).to(torch.float16))
        if m.qzeros is not None:
            z = zeros.reshape(out_f, -1).round().to(torch.int32)
            zp = torch.zeros(out_f, _pad8(z.shape[1]), dtype=torch.int32)
            zp[:, : z.shape[1]] = z
            m.qzeros.copy_(pack(zp.to(torch.uint8), spec.bits))
        if m.codebook is not None:
            m.codebook.copy_(codebook.float())
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    # ---- views of the stored weight -----------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unsigned codes `[out, in]` uint8."""
        return unpack(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Zero points `[out, in / G]` float (code units)."""
        ng = self.in_features // self.group_size
        if self.qzeros is None:
            return torch.full((self.out_features, ng), float(2 ** (self.bits - 1)), device=self.scales.device)
        return unpack(self.qzeros, self.bits, _pad8(ng))[:, :ng].float()

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out, in]` this module computes with, input channels in model order."""
        s = self.scales.float().repeat_interleave(self.group_size, dim=1)
        u = self.codes()
        if self.codebook is not None:
            w = self.codebook[u.long()] * s
        else:
            w = (u.float() - self.zeros().repeat_interleave(self.group_size, dim=1)) * s
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)
        return w

    def _stored_weight(self) -> torch.Tensor:
        s = self.scales.float().repeat_interleave(self.group_size, dim=1)
        return self.codebook[self.codes().long()] * s

    def g_idx(self) -> torch.Tensor:
        """GPTQ's g_idx: the group of each input channel in model order, int32 `[in]`."""
        j = torch.arange(self.in_features, dtype=torch.int32, device=self.scales.device) // self.group_size
        if self.perm is None:
            return j
        return torch.empty_like(j).index_copy_(0, self.perm.long(), j)

    def storage_bits(self) -> int:
        """Bits stored for the weight: codes, scales, zeros, codebook (bias not counted)."""
        total = self.qweight.numel() * 8 + self.scales.numel() * 16
        if self.perm is not None:  # stored as int32; a reader could derive it from 16-bit indices
            total += self.perm.numel() * 32
        if self.qzeros is not None:
            total += self.qzeros.numel() * 8
        if self.codebook is not None:
            total += self.codebook.numel() * 32
        return total

    # ---- compute ------------------------------------------------------------------------------
    def _prepared(self) -> dict:
        if self._runtime is None or self._runtime_device != self.qweight.device:
            if self.codebook is not None:
                # 4-bit codebooks (NF4): nibbles, a table lookup a weight in C++; others: see forward
                self._runtime = (kernels.prepare_codebook4(self.codes(), self.scales, self.codebook)
                                 if self.bits == 4 else None) or {}
            else:
                # A backend forced through the environment (tests, benchmarks) must be prepared too.
                forced = os.environ.get(kernels.WINT_BACKEND_ENV, "auto")
                self._runtime = kernels.prepare_wint(self.codes(), self.scales.float(), self.zeros(), self.bits,
                                                     self.group_size,
                                                     backends="auto" if forced == "auto" else (forced,))
            self._runtime_device = self.qweight.device
        return self._runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm.long())
        if self.codebook is not None:
            prepared = self._prepared()
            if prepared:
                return kernels.codebook4_linear(x, prepared, self.bias)
            # other codebooks have no kernel: the whole weight looked up, then a GEMM in x's dtype
            w = self._stored_weight().to(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return kernels.wint_gemm(x, self._prepared(), out_features=self.out_features, bias=self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime = None  # new codes: rebuild the kernels' tensors on the next forward
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._runtime = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        kind = "codebook" if self.codebook is not None else ("sym" if self.symmetric else "asym")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, bias={self.bias is not None}"
                + (", act_order" if self.perm is not None else ""))


def _with_group(spec: QuantSpec, in_features: int) -> QuantSpec:
    import dataclasses
    return dataclasses.replace(spec, granularity=PerGroup(in_features))
