"""`W4A8Linear`: 4-bit weights, int8 activations per token (dynamic), the GEMM in int8.

Storage (what lowbit checkpoints hold):
- `qweight`      uint8 `[out, in / 2]`, 4-bit codes `q + 8` (q in [-8, 7]) packed by
                 `lowbit.quant.packing.pack` (value 2j in the low nibble of byte j);
- `weight_scale` float32 `[out, 1]` (per output channel) or `[1]` (per tensor);
- `group_scale`  uint8 `[out, in / G]`, integer scales k in [1, 16], only for granularity "group";
- `bias`         optional, in the float model's dtype.

`W[n, j] = weight_scale[n] * q[n, j] * k[n, j // G]`. The forward quantizes x per token and calls
`lowbit.kernels.w4a8_gemm`, which unpacks `q * k` to an int8 weight (never a float one) and runs the
int8 GEMM; `weight_scale` and the token scales are applied to the int32 accumulator.

Weight granularities and how they are rounded (`int4_weight`):
- "tensor" / "channel": symmetric int4 on one scale per tensor / row, `absmax / 7.5` (lowbit.quant's
  symmetric grid, as GPTQ and compressed-tensors use), codes clamped to [-8, 7].
- "group" (groups of G along the input dim): the two-level scheme of `lowbit.kernels.w4a8`. The
  row's float scale is `absmax / (7.5 * 16)`, so the group holding the row's absmax uses k = 16 and
  gets the plain per-group grid; every other group picks the integer k in [1, 16] whose grid gives
  the smallest squared error on that group (clipping included). Group scales are thus quantized to
  integers: a group much smaller than its row's largest is rounded more coarsely than a float
  per-group scale would (k = 1 is the floor); the test in tests/nn bounds the loss against float
  per-group int4 on random weights.

The `w4a8` preset (groups of 64) on SmolLM2-135M, WikiText-2 test 40 x 512, reloaded from lowbit's
format: 4.17 bits/weight, perplexity 44.99 against 29.19 in float (+54.15%), KL 0.5099, top-1 0.619
(bench/w8a8.py, one thread; per-token int8 activations included). With ZeroQuant's LKD on the same
grid (`w4a8-zeroquant`): 39.32 (+34.71%). `group_scale` keeps a byte per group although k needs 4 bits
(0.06 bits/weight at G = 64).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..errors import GroupSizeError, InvalidWeightsError, SpecError
from .input_rotation import InputRotation, rotate_weight
from ..kernels.w4a8 import GROUP_SCALE_MAX, INT4_MAX, INT4_MIN, unpack_int4, w4a8_gemm, w4a8_int8_weight
from ..quant.packing import pack

__all__ = ["W4A8Linear", "WEIGHT_GRANULARITIES", "int4_weight"]

WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
_HALF_RANGE = (INT4_MAX - INT4_MIN) / 2  # 7.5: lowbit.quant's symmetric step is absmax / 7.5


def _check_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    w = weight.detach().float()
    if w.dim() != 2:
        raise SpecError(f"layer {name or '?'}: a linear weight is [out, in], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise InvalidWeightsError(f"layer {name or '?'} has NaN or Inf in its weight")
    return w


def int4_weight(weight: torch.Tensor, granularity: str, group_size: int | None = None, name: str = ""
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes int8 `[out, in]` in [-8, 7], weight_scale float32 `[out, 1]` / `[1]`, group_scale uint8
    `[out, in / G]` or None) of a float weight; see the module docstring for each granularity."""
    w = _check_weight(weight, name)
    if granularity not in WEIGHT_GRANULARITIES:
        raise SpecError(f"layer {name or '?'}: int4 weights are per 'tensor', 'channel' or 'group', "
                        f"got {granularity!r}")
    if granularity == "tensor":
        s = (w.abs().amax() / _HALF_RANGE).clamp(min=1e-12).reshape(1)
        return torch.clamp(torch.round(w / s), INT4_MIN, INT4_MAX).to(torch.int8), s, None
    if granularity == "channel":
        s = (w.abs().amax(dim=1, keepdim=True) / _HALF_RANGE).clamp(min=1e-12)
        return torch.clamp(torch.round(w / s), INT4_MIN, INT4_MAX).to(torch.int8), s, None
    n, k = w.shape
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise GroupSizeError(f"layer {name or '?'}: group size {group_size} does not divide {k} input features")
    s = (w.abs().amax(dim=1, keepdim=True) / (_HALF_RANGE * GROUP_SCALE_MAX)).clamp(min=1e-12)  # [n, 1]
    cand = torch.arange(1, GROUP_SCALE_MAX + 1, dtype=torch.float32, device=w.device).reshape(1, 1, -1, 1)
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    gscale = torch.empty(n, k // group_size, dtype=torch.uint8, device=w.device)
    rows = max(1, (1 << 22) // (k * GROUP_SCALE_MAX))  # bounds the [rows, groups, 16, G] trial tensor
    for r in range(0, n, rows):
        wg = (w[r : r + rows] / s[r : r + rows]).reshape(-1, k // group_size, 1, group_size)  # row-scale units
        q = torch.clamp(torch.round(wg / cand), INT4_MIN, INT4_MAX)  # [rows, groups, 16, G]
        err = (q * cand - wg).pow(2).sum(dim=-1)  # [rows, groups, 16]
        best = err.argmin(dim=-1)  # first minimum: an all-zero group keeps k = 1
        codes[r : r + rows] = q.gather(2, best[:, :, None, None].expand(-1, -1, 1, group_size)).reshape(-1, k)
        gscale[r : r + rows] = (best + 1).to(torch.uint8)
    return codes, s, gscale


class W4A8Linear(InputRotation, nn.Module):
    def __init__(self, in_features: int, out_features: int, *, weight_granularity: str = "group",
                 group_size: int | None = 128, bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 rotate_block: int = 0, name: str = ""):
        super().__init__()
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise SpecError(f"layer {name or '?'}: weight granularity must be one of {WEIGHT_GRANULARITIES}, "
                            f"got {weight_granularity!r}")
        if in_features % 2:
            raise SpecError(f"layer {name or '?'}: 4-bit packing needs an even number of input features, "
                            f"got {in_features}")
        if weight_granularity == "group":
            if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
                raise GroupSizeError(f"layer {name or '?'}: group size {group_size} does not divide "
                                     f"{in_features} input features")
        else:
            group_size = None
        self.in_features, self.out_features = in_features, out_features
        self.weight_granularity, self.group_size = weight_granularity, group_size
        self.act_mode = "per_token"
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        n_scales = (1,) if weight_granularity == "tensor" else (out_features, 1)
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32))
        if weight_granularity == "group":
            self.register_buffer("group_scale", torch.ones(out_features, in_features // group_size,
                                                           dtype=torch.uint8))
        else:
            self.group_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None
        self._init_rotation(in_features, rotate_block, name)

    @classmethod
    def from_float(cls, linear: nn.Module, *, weight_granularity: str = "group", group_size: int | None = 128,
                   rotate_block: int = 0, rotate_seed: int = 0, name: str = "") -> "W4A8Linear":
        return cls.from_weight(linear.weight, getattr(linear, "bias", None), weight_granularity=weight_granularity,
                               group_size=group_size, rotate_block=rotate_block, rotate_seed=rotate_seed, name=name)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, weight_granularity: str = "group",
                    group_size: int | None = 128, rotate_block: int = 0, rotate_seed: int = 0,
                    name: str = "") -> "W4A8Linear":
        """From a float weight `[out, in]`; with `rotate_block` its rows are rotated first (`W R^T`, see
        `InputRotation`) with the signs `rotation_signs(in, rotate_seed)`."""
        weight, signs = rotate_weight(weight, rotate_block, rotate_seed, name)
        codes, scale, gscale = int4_weight(weight, weight_granularity, group_size, name)
        return cls.from_codes(codes, scale, bias, group_scale=gscale, group_size=group_size,
                              rotate_block=rotate_block, rotation_signs=signs, name=name)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                   group_scale: torch.Tensor | None = None, group_size: int | None = None,
                   rotate_block: int = 0, rotation_signs: torch.Tensor | None = None,
                   name: str = "") -> "W4A8Linear":
        """From int4 codes `[out, in]` in [-8, 7] and their scales (an algorithm that chose its own
        grid, ZeroQuant's row groups, builds the module this way); with `rotate_block`, codes of the
        rotated weight and the signs that rotated it."""
        out_f, in_f = codes.shape
        ws = weight_scale.detach().float().reshape(-1)
        if ws.numel() not in (1, out_f):
            raise SpecError(f"layer {name or '?'}: weight_scale must have 1 or {out_f} elements, got {ws.numel()}")
        if codes.numel() and (int(codes.min()) < INT4_MIN or int(codes.max()) > INT4_MAX):
            raise SpecError(f"layer {name or '?'}: int4 codes must lie in [{INT4_MIN}, {INT4_MAX}]")
        gran = "group" if group_scale is not None else ("tensor" if ws.numel() == 1 else "channel")
        m = cls(in_f, out_f, weight_granularity=gran, group_size=group_size, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, rotate_block=rotate_block, name=name)
        m._set_rotation_signs(rotation_signs, name)
        m.qweight.copy_(pack((codes.to(torch.int16) - INT4_MIN).cpu(), 4))
        m.weight_scale.copy_(ws.reshape(m.weight_scale.shape))
        if group_scale is not None:
            if int(group_scale.min()) < 1 or int(group_scale.max()) > GROUP_SCALE_MAX:
                raise SpecError(f"layer {name or '?'}: group scales must lie in [1, {GROUP_SCALE_MAX}]")
            m.group_scale.copy_(group_scale)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m.to(codes.device)

    def int4_codes(self) -> torch.Tensor:
        """Signed codes `[out, in]` int8 in [-8, 7]."""
        return unpack_int4(self.qweight, self.in_features)

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight `[out, in]` the GEMM multiplies (codes times integer group scales)."""
        return w4a8_int8_weight(self.qweight, self.in_features, self.group_scale)

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight `[out, in]` this module computes with, in the input's own basis."""
        return self._unrotate_weight(self.int8_weight().float() * self.weight_scale.reshape(-1, 1))

    def storage_bits(self) -> int:
        total = self.qweight.numel() * 8 + self.weight_scale.numel() * 32
        if self.group_scale is not None:
            # k in [1, 16] needs 4 bits; the buffer keeps a byte per group for simplicity
            total += self.group_scale.numel() * 8
        return total + self._rotation_bits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, xs = kernels.quantize_per_token(self.rotate_input(x))
        return w4a8_gemm(qx, xs, self.qweight, self.in_features, self.weight_scale.reshape(-1), self.group_scale,
                         self.bias, x.dtype)

    def _apply(self, fn, *args, **kwargs):
        # model.to(bfloat16) must not round the scales: they are part of the quantized weight
        keep = self._buffers.get("weight_scale")
        out = super()._apply(fn, *args, **kwargs)
        if keep is not None and self._buffers["weight_scale"].dtype != keep.dtype:
            self._buffers["weight_scale"] = keep.to(self._buffers["weight_scale"].device)
        return out

    def extra_repr(self) -> str:
        g = (f"g{self.group_size} (two-level)" if self.weight_granularity == "group"
             else f"per-{self.weight_granularity}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=int4 {g}, "
                f"act=per_token int8{self._rotation_repr()}, bias={self.bias is not None}")
