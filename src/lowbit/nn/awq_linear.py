"""Packed modules in AutoAWQ's two layouts, so its checkpoints load (and are written) tensor for tensor.

Both hold what an asymmetric 4-bit `WQLinear` holds: codes u and zero points z in [0, 16), fp16
scales s, `W[n, k] = (u[n, k] - z[n, k // G]) * s[n, k // G]`; only the packing differs. Values go
eight to an int32 word, nibble i in bits 4i..4i+3.

`AWQLinearGEMM` (AutoAWQ version "gemm", its `WQLinear_GEMM`), packed along the output:

    qweight  int32 [in, out / 8]      W^T; nibble i of word c holds column 8c + AWQ_ORDER[i]
    qzeros   int32 [in / G, out / 8]  same interleave
    scales   fp16  [in / G, out]

`AWQLinearGEMV` (version "gemv", its `WQLinear_GEMV`), packed along the input, in order:

    qweight  int32 [out, in / 8]      nibble i of word c holds input 8c + i
    qzeros   int32 [out, Z]           groups packed the same way; words past in / G / 8 are zero
    scales   fp16  [out, 8 * Z]       columns past in / G are zero

with Z = `gemv_zeros_width(in, G)`. Both may carry a `bias [out]`: fp16 in AutoAWQ's files; in
memory it keeps the dtype it came with, so conversions from and to `WQLinear` lose nothing.

The forward unpacks the words to codes once (first call, and again after the tensors change) and
hands them to `lowbit.kernels.prepare_wint`: the same fast paths `WQLinear` runs on.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import kernels
from ..errors import GroupSizeError, SpecError
from ..quant import PerGroup, QuantSpec, check_group_size
from .wq_linear import WQLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column each nibble of a GEMM word holds
SEQUENTIAL = tuple(range(8))
BITS = 4

__all__ = ["AWQ_ORDER", "SEQUENTIAL", "AWQLinear", "AWQLinearGEMM", "AWQLinearGEMV", "AWQ_LAYOUTS", "pack_int32",
           "unpack_int32", "gemv_zeros_width", "check_awq_compatible"]


# ---- the words ------------------------------------------------------------------------------------

def pack_int32(codes: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """4-bit codes `[..., n]` (any int dtype) -> int32 `[..., n / 8]`; nibble i of word c holds
    value 8c + order[i]."""
    if codes.is_floating_point() or codes.is_complex():
        raise SpecError(f"pack_int32 needs integer codes, got {codes.dtype}")
    n = codes.shape[-1] if codes.dim() else 0
    if codes.dim() == 0 or n % 8:
        raise SpecError(f"pack_int32 puts 8 values in a word: the last dim must be a multiple of 8, got {n}")
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise SpecError(f"4-bit codes must lie in [0, 15], got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(*codes.shape[:-1], n // 8, 8)[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    word = (v << shifts).sum(dim=-1)  # < 2**32: the disjoint nibbles never carry
    # int32 holds the same 32 bits as a signed number
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int32(words: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 `[..., m]` -> uint8 codes `[..., 8m]`."""
    if words.dtype != torch.int32:
        raise SpecError(f"unpack_int32 needs int32 words, got {words.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    # an arithmetic shift smears the sign bit above bit 31 only, and the mask drops it
    nibbles = (words.unsqueeze(-1) >> shifts) & 15  # [..., m, 8]: nibble i of each word
    inverse = sorted(range(8), key=lambda i: order[i])  # value j sits in nibble inverse[j]
    return nibbles[..., inverse].to(torch.uint8).reshape(*words.shape[:-1], words.shape[-1] * 8)


def gemv_zeros_width(in_features: int, group_size: int, name: str = "") -> int:
    """Words per row of a GEMV `qzeros` (AutoAWQ's `calculate_zeros_width`): the groups of a row in
    whole words, rounded up to a multiple of 2 words for G = 64 and of 4 for G = 32. AutoAWQ's
    GEMV has no width for other group sizes under 128, so neither do we: such a checkpoint
    would not load there."""
    multiple = 1 if group_size >= 128 else {64: 2, 32: 4}.get(group_size)
    if multiple is None:
        where = f"layer {name}: " if name else ""
        raise GroupSizeError(f"{where}AutoAWQ's GEMV layout takes group sizes 32, 64 or >= 128, got {group_size} "
                             f"(the GEMM layout takes any group size)")
    words = -(-(in_features // group_size) // 8)
    return -(-words // multiple) * multiple


def check_awq_compatible(m: WQLinear, name: str = "") -> None:
    """Raise SpecError unless `m` holds what AutoAWQ's layouts can: 4-bit codes with zero points."""
    where = f"layer {name}: " if name else ""
    if m.codebook is not None:
        raise SpecError(f"{where}AutoAWQ layouts hold 4-bit integer codes with zero points; this layer "
                        f"uses a {m.bits}-bit codebook (non-uniform levels)")
    if m.bits != BITS:
        raise SpecError(f"{where}AutoAWQ layouts hold 4-bit codes only; this layer is {m.bits}-bit")
    if m.symmetric or m.qzeros is None:
        raise SpecError(f"{where}AutoAWQ layouts hold asymmetric weights (zero_point=True); this layer is "
                        f"symmetric (quantize with symmetric=False)")
    if getattr(m, "perm", None) is not None:
        raise SpecError(f"{where}AutoAWQ layouts have no act-order permutation; this layer was quantized with "
                        f"act_order (save it in the lowbit or GPTQ format)")


# ---- the modules ----------------------------------------------------------------------------------

class AWQLinear(nn.Module):
    """What both layouts share; `AWQLinearGEMM` and `AWQLinearGEMV` say how the words are laid out."""

    version = ""

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 128, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float16, name: str = ""):
        super().__init__()
        group_size = in_features if group_size in (-1, None, 0) else group_size
        check_group_size(in_features, group_size, name)
        if out_features % 8:
            raise SpecError(f"layer {name or '?'}: out_features={out_features} is not a multiple of 8, which "
                            f"AutoAWQ's {self.version.upper()} layout needs (8 columns per int32 word)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.name = BITS, group_size, name
        self._check_layout()
        for key, (shape, dtype) in self._buffer_shapes().items():
            self.register_buffer(key, torch.zeros(shape, dtype=dtype))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._runtime: dict | None = None  # the kernels' tensors, built on first forward
        self._runtime_device: torch.device | None = None

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    # layout: subclasses say how the three tensors look and how codes go in and out of them
    def _check_layout(self) -> None:
        pass

    def _buffer_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def _pack(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        raise NotImplementedError

    def codes(self) -> torch.Tensor:
        """Unsigned codes `[out, in]` uint8."""
        raise NotImplementedError

    def zeros(self) -> torch.Tensor:
        """Zero points `[out, in / G]` float (code units)."""
        raise NotImplementedError

    def group_scales(self) -> torch.Tensor:
        """Scales `[out, in / G]` as stored (fp16)."""
        raise NotImplementedError

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, group_size: int,
                   bias: torch.Tensor | None = None, name: str = ""):
        """From unsigned codes `[out, in]`, scales and integer zero points `[out, in / G]`."""
        out_f, in_f = codes.shape
        m = cls(in_f, out_f, group_size=group_size, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float16, name=name)
        want = (out_f, m.n_groups)
        for what, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != want:
                raise SpecError(f"layer {name or '?'}: {what} must have shape {want}, got {tuple(t.shape)}")
        z = zeros.float()
        if not torch.equal(z, z.round()):
            raise SpecError(f"layer {name or '?'}: zero points must be integers (code units)")
        m._pack(codes, scales.to(torch.float16), z.to(torch.int32))
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    @classmethod
    def from_wqlinear(cls, m: WQLinear, name: str = ""):
        """The same weight, bit for bit, in this layout (4-bit asymmetric `WQLinear` only)."""
        name = name or getattr(m, "name", "")
        check_awq_compatible(m, name)
        return cls.from_codes(m.codes(), m.scales, m.zeros(), group_size=m.group_size, bias=m.bias, name=name)

    def to_wqlinear(self) -> WQLinear:
        """The same weight, bit for bit, as lowbit's `WQLinear` (the bias keeps its dtype)."""
        spec = QuantSpec(bits=BITS, symmetric=False, granularity=PerGroup(self.group_size))
        return WQLinear.from_codes(self.codes(), self.group_scales(), self.zeros(), spec, bias=self.bias,
                                   name=self.name)

    # ---- views of the stored weight ---------------------------------------------------------------
    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out, in]` this module computes with."""
        s = self.group_scales().float().repeat_interleave(self.group_size, dim=1)
        z = self.zeros().repeat_interleave(self.group_size, dim=1)
        return (self.codes().float() - z) * s

    def storage_bits(self) -> int:
        """Bits stored for the weight: codes, scales, zeros, padding included (bias not counted)."""
        return self.qweight.numel() * 32 + self.qzeros.numel() * 32 + self.scales.numel() * 16

    # ---- compute ----------------------------------------------------------------------------------
    def _prepared(self) -> dict:
        if self._runtime is None or self._runtime_device != self.qweight.device:
            # A backend forced through the environment (tests, benchmarks) must be prepared too.
            forced = os.environ.get(kernels.WINT_BACKEND_ENV, "auto")
            self._runtime = kernels.prepare_wint(self.codes(), self.group_scales().float(), self.zeros(), BITS,
                                                 self.group_size,
                                                 backends="auto" if forced == "auto" else (forced,))
            self._runtime_device = self.qweight.device
        return self._runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.wint_gemm(x, self._prepared(), out_features=self.out_features, bias=self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime = None  # new codes: rebuild the kernels' tensors on the next forward
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._runtime = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={BITS}, "
                f"group_size={self.group_size}, version={self.version}, bias={self.bias is not None}")


class AWQLinearGEMM(AWQLinear):
    """AutoAWQ's "gemm" layout: W^T packed along the output, interleaved (see the module docstring)."""

    version = "gemm"

    def _buffer_shapes(self):
        i, o, ng = self.in_features, self.out_features, self.n_groups
        return {"qweight": ((i, o // 8), torch.int32), "qzeros": ((ng, o // 8), torch.int32),
                "scales": ((ng, o), torch.float16)}

    def _pack(self, codes, scales, zeros):
        self.qweight.copy_(pack_int32(codes.t(), AWQ_ORDER))
        self.qzeros.copy_(pack_int32(zeros.t(), AWQ_ORDER))
        self.scales.copy_(scales.t())

    def codes(self):
        return unpack_int32(self.qweight, AWQ_ORDER).t()

    def zeros(self):
        return unpack_int32(self.qzeros, AWQ_ORDER).t().float()

    def group_scales(self):
        return self.scales.t()


class AWQLinearGEMV(AWQLinear):
    """AutoAWQ's "gemv" layout: W packed along the input in order, zeros and scales padded."""

    version = "gemv"

    def _check_layout(self):
        if self.in_features % 8:
            raise SpecError(f"layer {self.name or '?'}: in_features={self.in_features} is not a multiple of 8, "
                            f"which AutoAWQ's GEMV layout needs (8 inputs per int32 word)")
        self.zeros_width = gemv_zeros_width(self.in_features, self.group_size, self.name)

    def _buffer_shapes(self):
        i, o, w = self.in_features, self.out_features, self.zeros_width
        return {"qweight": ((o, i // 8), torch.int32), "qzeros": ((o, w), torch.int32),
                "scales": ((o, 8 * w), torch.float16)}

    def _pack(self, codes, scales, zeros):
        ng, padded = self.n_groups, 8 * self.zeros_width
        self.qweight.copy_(pack_int32(codes))
        z = torch.zeros(self.out_features, padded, dtype=torch.int32)
        z[:, :ng] = zeros
        self.qzeros.copy_(pack_int32(z))
        self.scales.zero_()
        self.scales[:, :ng] = scales

    def codes(self):
        return unpack_int32(self.qweight)

    def zeros(self):
        return unpack_int32(self.qzeros)[:, : self.n_groups].float()

    def group_scales(self):
        return self.scales[:, : self.n_groups]


AWQ_LAYOUTS = {"gemm": AWQLinearGEMM, "gemv": AWQLinearGEMV}
