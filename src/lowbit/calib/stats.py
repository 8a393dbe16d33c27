"""Activation statistics of a block's linear inputs, recorded with hooks while the runner feeds it.

What weight + activation methods read off calibration data:
- per input channel, the absolute maximum over all tokens (SmoothQuant's `act_scales`);
- per tensor, the minimum and maximum (static activation scales);
- per token, the absolute maximum of each token (the spread token-wise clipping searches over).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import matmul_dtype

__all__ = ["ActStats", "add_product_", "collect_activation_stats"]


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a^T b (second moments X^T X, cross terms), the GEMM in a's dtype: a float32 GEMM adds into
    acc directly; a bf16 one (about twice as fast on CPUs with bf16 dot products) accumulates in float32
    inside the kernel, but torch's CPU mm returns bf16, so each product is rounded once before the
    float32 sum."""
    if a.dtype != torch.float32 and matmul_dtype(a.dtype, a.device) == torch.float32:
        a, b = a.float(), b.float()  # no fast bf16 here: its scalar fallback runs 10-100x slower
    if a.dtype == torch.float32:
        acc.addmm_(a.t(), b)
    else:
        acc.add_(a.t() @ b)


@dataclass
class ActStats:
    """Running statistics of one linear input X `[tokens, in]`."""

    channel_absmax: torch.Tensor  # [in] float32
    min: float = float("inf")
    max: float = float("-inf")
    token_absmax: list[torch.Tensor] = field(default_factory=list)  # chunks of [tokens] float32

    @classmethod
    def empty(cls, in_features: int, device=None) -> "ActStats":
        return cls(torch.zeros(in_features, device=device))

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        a = x2.abs().float()
        torch.maximum(self.channel_absmax, a.amax(dim=0).to(self.channel_absmax.device), out=self.channel_absmax)
        self.token_absmax.append(a.amax(dim=1).cpu())
        self.min = min(self.min, float(x2.min()))
        self.max = max(self.max, float(x2.max()))

    @property
    def n_tokens(self) -> int:
        return sum(t.numel() for t in self.token_absmax)

    @property
    def absmax(self) -> float:
        """The tensor's absolute maximum over every calibration token."""
        return float(self.channel_absmax.max()) if self.channel_absmax.numel() else 0.0

    def tokens(self) -> torch.Tensor:
        """Each calibration token's absolute maximum, `[tokens]` float32."""
        return torch.cat(self.token_absmax) if self.token_absmax else torch.zeros(0)

    def scaled(self, s: torch.Tensor) -> "ActStats":
        """The statistics of X / s (s `[in]` positive), as far as they follow from these: the channel
        maxima exactly; the signed range and token maxima are no longer known and are dropped."""
        return ActStats(self.channel_absmax / s.to(self.channel_absmax.device, torch.float32))


def collect_activation_stats(ctx, names: list[str]) -> dict[str, ActStats]:
    """{linear name: ActStats of its input} over every calibration chunk of the block in `ctx` (a
    `BlockContext`). Linears that read one tensor (the adapter's shared_input groups: q/k/v,
    gate/up) share one object. The forwards stop once every named linear has been reached."""
    shared = {}
    for group in ctx.adapter.shared_input:
        present = [n for n in group if n in names]
        for n in present[1:]:
            shared[n] = present[0]
    capture = [n for n in names if n not in shared]
    got: dict[str, ActStats] = {}

    def record(name, x):
        if name not in got:
            got[name] = ActStats.empty(x.shape[-1], x.device)
        got[name].add(x)

    ctx.run_inputs(capture, record)
    return {n: got[shared.get(n, n)] for n in names if shared.get(n, n) in got}
