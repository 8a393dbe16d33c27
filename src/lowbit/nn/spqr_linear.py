"""`SpQRLinear`: SpQR's sparse-quantized weight (Dettmers et al., 2023) as a replacement for `nn.Linear`.

A weight `W [out, in]` is a dense low-bit part with tiny groups (G input columns, 16 in the paper)
plus a few unstructured outliers. The dense part's group statistics are quantized themselves:

- `qweight`      uint8 `[out, in * bits / 8]`: codes u in [0, 2^bits), packed along `in` (stored
                 column order; `lowbit.quant.pack` layout);
- `scale_codes`  uint8 `[in / G, out * qq_scale_bits / 8]`: each group's scale as a second-level code,
                 packed along `out` (the second-level groups are `qq_groupsize` consecutive rows);
- `scale_stats`  fp16 `[in / G, out / qq_groupsize, 2]`: the second level's (scale, minimum);
- `zero_codes`, `zero_stats`: the same for the zero points (floats in code units, not rounded);
- `outlier_row_ptr` int32 `[out + 1]`, `outlier_col` int16 `[nnz]`, `outlier_val` fp16 `[nnz]`: the
  outliers in CSR, in stored column order. A value is what the outlier adds to the dense part at
  its place (the weight minus its rounded value), so dense + sparse is the weight to fp16 precision;
- `perm` int16 `[in]` with act-order: stored column j is input channel perm[j].

So, with g = j // G and second-level group r // qq_groupsize,

    s[r, g] = scale_codes[g, r] * scale_stats[g, r // qq, 0] + scale_stats[g, r // qq, 1]
    z[r, g] = zero_codes[g, r] * zero_stats[g, r // qq, 0] + zero_stats[g, r // qq, 1]
    W[r, perm[j]] = (u[r, j] - z[r, g]) * s[r, g] + outlier(r, j)

The second level keeps (scale, minimum), the value of code 0, rather than the paper's (scale, zero
point): the same affine map, but a minimum always fits fp16 where `-min / scale` overflows it for a
nearly constant group.

The forward hands the dense part to `lowbit.kernels` (the zero points' integer part in the kernel's
zeros, their fraction as one small correction GEMM over group sums of x) and adds the outliers with
a sparse CSR matmul.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .. import kernels
from ..errors import SpecError
from ..quant import check_group_size, pack, unpack
from ..quant.primitives import fp16_scale

INT16_MAX = 2**15 - 1


def quantize_stats(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-level min-max quantization of a statistic x `[n]` in groups of `group_size` consecutive
    values: (codes uint8 `[n]`, stats fp16 `[n / group_size, 2]` holding each group's scale and
    minimum). A constant group gets scale 0 and is its minimum exactly (to fp16)."""
    xg = x.float().reshape(-1, group_size)
    lo, hi = xg.amin(1), xg.amax(1)
    maxq = 2**bits - 1
    # scale rounded up to fp16 so the top of the range still fits the grid
    scale = fp16_scale((hi - lo) / maxq)
    lo16 = lo.to(torch.float16).float()
    scale = torch.where(hi > lo, scale, torch.zeros_like(scale))
    q = torch.where(scale[:, None] > 0, ((xg - lo16[:, None]) / scale[:, None]).round_(), torch.zeros_like(xg))
    q = q.clamp_(0, maxq).to(torch.uint8).reshape(x.shape)
    return q, torch.stack([scale, lo16], dim=1).to(torch.float16)


def dequantize_stats(codes: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_stats` (any leading dims): codes `[..., n]`, stats `[..., n / qq, 2]` -> float32 `[..., n]`."""
    qq = codes.shape[-1] // stats.shape[-2]
    s = stats[..., 0].float().repeat_interleave(qq, dim=-1)
    m = stats[..., 1].float().repeat_interleave(qq, dim=-1)
    return codes.float() * s + m


class SpQRLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int = 3, group_size: int = 16,
                 qq_scale_bits: int = 3, qq_zero_bits: int = 3, qq_groupsize: int = 16, n_outliers: int = 0,
                 bias: bool = False, bias_dtype: torch.dtype = torch.float32, act_order: bool = False,
                 name: str = ""):
        super().__init__()
        where = f"layer {name or '?'}"
        for what, b in (("bits", bits), ("qq_scale_bits", qq_scale_bits), ("qq_zero_bits", qq_zero_bits)):
            if not 2 <= b <= 8:
                raise SpecError(f"{where}: {what} must be in 2..8, got {b}")
        check_group_size(in_features, group_size, name)
        if out_features % qq_groupsize:
            raise SpecError(f"{where}: out_features={out_features} is not a multiple of qq_groupsize={qq_groupsize}")
        if (in_features * bits) % 8 or (out_features * qq_scale_bits) % 8 or (out_features * qq_zero_bits) % 8:
            raise SpecError(f"{where}: {in_features}x{out_features} codes do not pack into whole bytes")
        if in_features > INT16_MAX + 1:
            raise SpecError(f"{where}: in_features={in_features} does not fit the int16 column indices")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.qq_scale_bits, self.qq_zero_bits, self.qq_groupsize = qq_scale_bits, qq_zero_bits, qq_groupsize
        ng, nq = in_features // group_size, out_features // qq_groupsize
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scale_codes", torch.zeros(ng, out_features * qq_scale_bits // 8, dtype=torch.uint8))
        self.register_buffer("scale_stats", torch.zeros(ng, nq, 2, dtype=torch.float16))
        self.register_buffer("zero_codes", torch.zeros(ng, out_features * qq_zero_bits // 8, dtype=torch.uint8))
        self.register_buffer("zero_stats", torch.zeros(ng, nq, 2, dtype=torch.float16))
        self.register_buffer("outlier_row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("outlier_col", torch.zeros(n_outliers, dtype=torch.int16))
        self.register_buffer("outlier_val", torch.zeros(n_outliers, dtype=torch.float16))
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int16))
        else:
            self.perm = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._runtime: dict | None = None  # the kernels' tensors, built on first forward
        self._runtime_device: torch.device | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale_codes: torch.Tensor, scale_stats: torch.Tensor,
                   zero_codes: torch.Tensor, zero_stats: torch.Tensor, outliers: torch.Tensor | None = None, *,
                   bits: int, qq_scale_bits: int, qq_zero_bits: int, perm: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, name: str = "") -> "SpQRLinear":
        """From codes `[out, in]` (stored column order), the statistics' second-level codes `[in / G, out]`
        and stats `[in / G, out / qq, 2]`, and the outliers as a float `[out, in]` matrix (stored order)
        that is nonzero only at outliers (their values are rounded to fp16)."""
        out_f, in_f = codes.shape
        ng, nq = scale_stats.shape[0], scale_stats.shape[1]
        if in_f % ng or out_f % nq:
            raise SpecError(f"layer {name or '?'}: statistics of shape {tuple(scale_stats.shape)} do not fit a "
                            f"{out_f}x{in_f} weight")
        nnz = 0 if outliers is None else int((outliers != 0).sum())
        m = cls(in_f, out_f, bits=bits, group_size=in_f // ng, qq_scale_bits=qq_scale_bits,
                qq_zero_bits=qq_zero_bits, qq_groupsize=out_f // nq, n_outliers=nnz, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, act_order=perm is not None, name=name)
        m.qweight.copy_(pack(codes.to(torch.uint8), bits))
        m.scale_codes.copy_(pack(scale_codes.to(torch.uint8), qq_scale_bits))
        m.zero_codes.copy_(pack(zero_codes.to(torch.uint8), qq_zero_bits))
        m.scale_stats.copy_(scale_stats)
        m.zero_stats.copy_(zero_stats)
        if nnz:
            rows, cols = (outliers != 0).nonzero(as_tuple=True)  # row-major: CSR order
            counts = torch.bincount(rows, minlength=out_f)
            m.outlier_row_ptr[1:].copy_(counts.cumsum(0))
            m.outlier_col.copy_(cols)
            m.outlier_val.copy_(outliers[rows, cols])
        if perm is not None:
            perm = perm.reshape(-1).to(torch.int64)
            if perm.numel() != in_f or not torch.equal(perm.sort().values, torch.arange(in_f, device=perm.device)):
                raise SpecError(f"layer {name or '?'}: perm is not a permutation of {in_f} input channels")
            m.perm.copy_(perm)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    # ---- views of the stored weight -----------------------------------------------------------
    @property
    def n_outliers(self) -> int:
        return self.outlier_val.numel()

    def codes(self) -> torch.Tensor:
        """Codes `[out, in]` uint8, stored column order."""
        return unpack(self.qweight, self.bits, self.in_features)

    def group_scales(self) -> torch.Tensor:
        """First-level scales `[out, in / G]` float32, as the second level reconstructs them."""
        c = unpack(self.scale_codes, self.qq_scale_bits, self.out_features)
        return dequantize_stats(c, self.scale_stats).t()

    def group_zeros(self) -> torch.Tensor:
        """First-level zero points `[out, in / G]` float32 (code units, not integers)."""
        c = unpack(self.zero_codes, self.qq_zero_bits, self.out_features)
        return dequantize_stats(c, self.zero_stats).t()

    def dense_weight(self) -> torch.Tensor:
        """The dense part `[out, in]` float32, stored column order."""
        s = self.group_scales().repeat_interleave(self.group_size, dim=1)
        z = self.group_zeros().repeat_interleave(self.group_size, dim=1)
        return (self.codes().float() - z) * s

    def outlier_matrix(self) -> torch.Tensor:
        """The outliers as a sparse CSR float32 `[out, in]`, stored column order."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.outlier_row_ptr.long(), self.outlier_col.long(),
                                           self.outlier_val.float(), size=(self.out_features, self.in_features),
                                           check_invariants=True)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out, in]` this module computes with, input channels in model order."""
        w = self.dense_weight()
        if self.n_outliers:
            rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device),
                                           self.outlier_row_ptr.diff().long())
            w.index_put_((rows, self.outlier_col.long()), self.outlier_val.float(), accumulate=True)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)
        return w

    def bits_breakdown(self) -> dict[str, int]:
        """Bits stored for the weight, by part (bias not counted)."""
        return {
            "codes": self.qweight.numel() * 8,
            "stats_codes": (self.scale_codes.numel() + self.zero_codes.numel()) * 8,  # first-level, quantized
            "stats_second_level": (self.scale_stats.numel() + self.zero_stats.numel()) * 16,
            "outlier_values": self.outlier_val.numel() * 16,
            "outlier_indices": self.outlier_col.numel() * 16 + self.outlier_row_ptr.numel() * 32,
            "perm": 0 if self.perm is None else self.perm.numel() * 16,
        }

    def storage_bits(self) -> int:
        return sum(self.bits_breakdown().values())

    # ---- compute ------------------------------------------------------------------------------
    def _prepared(self) -> dict:
        if self._runtime is None or self._runtime_device != self.qweight.device:
            s, z = self.group_scales(), self.group_zeros()
            # the kernels take integer zero points: the integer part goes there, the fraction is
            # subtracted after the GEMM as (group sums of x) @ (s * frac)^T
            zi = z.round().clamp_(0, 2**self.bits - 1)
            forced = os.environ.get(kernels.WINT_BACKEND_ENV, "auto")
            dense = kernels.prepare_wint(self.codes(), s, zi, self.bits, self.group_size,
                                         backends="auto" if forced == "auto" else (forced,))
            rt = {"dense": dense, "zero_fraction": (s * (z - zi)).contiguous()}  # [out, in / G]
            if self.n_outliers:
                rt["outliers"] = self.outlier_matrix()
            self._runtime = rt
            self._runtime_device = self.qweight.device
        return self._runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rt = self._prepared()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(-1, self.perm.long())
        y = kernels.wint_gemm(x2, rt["dense"], out_features=self.out_features)
        with torch.autocast(x.device.type, enabled=False):
            xf = x2.float()
            yf = y.float()
            groups = xf.reshape(-1, self.in_features // self.group_size, self.group_size).sum(-1)
            yf.addmm_(groups, rt["zero_fraction"].t(), alpha=-1)
            if "outliers" in rt:
                yf.add_(torch.sparse.mm(rt["outliers"], xf.t()).t())
            if self.bias is not None:
                yf.add_(self.bias.float())
        return yf.to(x.dtype).reshape(*lead, self.out_features)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._runtime = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, stats={self.qq_scale_bits}/{self.qq_zero_bits}-bit "
                f"g{self.qq_groupsize}, outliers={self.n_outliers}, bias={self.bias is not None}"
                + (", act_order" if self.perm is not None else ""))


def spqr_summary(model: nn.Module) -> dict:
    """Bits by part over every `SpQRLinear` of `model`, per weight, and the outlier fraction."""
    parts: dict[str, int] = {}
    weights = outliers = 0
    for m in model.modules():
        if isinstance(m, SpQRLinear):
            for k, v in m.bits_breakdown().items():
                parts[k] = parts.get(k, 0) + v
            weights += m.in_features * m.out_features
            outliers += m.n_outliers
    per_weight = {k: v / weights for k, v in parts.items()} if weights else {}
    return {"weights": weights, "outliers": outliers, "outlier_fraction": outliers / weights if weights else 0.0,
            "bits_per_weight": sum(per_weight.values()), "bits_per_weight_by_part": per_weight}
