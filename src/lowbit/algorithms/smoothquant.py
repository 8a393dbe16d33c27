"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights.

Activations of LLMs have a few input channels far larger than the rest, which a per-token or
per-tensor int8 grid cannot hold without crushing the small ones; weights are flat. Per input
channel j of the linears that read one tensor,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and X / s feeds W * s: the same product, with the activation's range divided and the weight's
multiplied so both quantize about as well. 1/s folds into the op that produces X (the norm
before q/k/v and gate/up; with `pairs: all` also v_proj before o_proj and up_proj before down_proj,
exact for the same reasons AWQ's folds are, see lowbit.models), so the smoothed float model
computes the same function. max|X_j| comes from calibration (lowbit.calib.stats), max|W_j| from
the linears of the pair together. alpha 0.5 is the paper's default; larger alphas move more of the
difficulty into the weights (the paper uses 0.75-0.85 for GLM-130B and Llama-like models).

This step only smooths: the linears stay `nn.Linear`; a rounding step after it (`w8a8`, GPTQ)
quantizes them. Channels that calibration never saw non-zero keep s = 1 (a fold by a tiny s would
blow them up on other inputs).
"""

from __future__ import annotations

import logging

import torch

from ..calib.stats import collect_activation_stats
from ..errors import SpecError
from ..models import fold_scales, linear_weight, resolve_scaling_pairs
from .base import Algorithm

log = logging.getLogger(__name__)

PAIR_KINDS = {"norm": ("norm",), "all": ("norm", "linear")}


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s `[in]` float32 from an input's channel absmax `[in]` and the `[out_i, in]` weights reading it."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device)
    live = (a > 0) & (w_absmax > 0)
    s = a.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s)).clamp(min=1e-5)


class SmoothQuant(Algorithm):
    name = "smoothquant"
    requires_calibration = True

    def __init__(self, spec=None, alpha: float | dict = 0.5, pairs: str = "norm"):
        # alpha: one number, or {model_type: alpha, "default": alpha} for per-model settings
        self.alpha_setting = alpha
        if pairs not in PAIR_KINDS:
            raise SpecError(f"smoothquant: pairs must be one of {sorted(PAIR_KINDS)}, got {pairs!r}")
        self.pairs = pairs
        self.alpha = self._alpha_for(None)
        self.last_scales: dict[str, torch.Tensor] = {}  # "model.layers.0.input_layernorm" -> s

    def _alpha_for(self, model_type: str | None) -> float:
        a = self.alpha_setting
        if isinstance(a, dict):
            a = a.get(model_type, a.get("default", 0.5))
        try:
            a = float(a)
        except (TypeError, ValueError):
            raise SpecError(f"smoothquant: alpha must be a number in [0, 1], got {a!r}") from None
        if not 0.0 <= a <= 1.0:
            raise SpecError(f"smoothquant: alpha must be in [0, 1], got {a}")
        return a

    def prepare(self, model, adapter) -> None:
        self._config = getattr(model, "config", None)
        self.alpha = self._alpha_for(getattr(self._config, "model_type", None))

    @torch.no_grad()
    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise RuntimeError("SmoothQuant needs calibration data")
        config = getattr(self, "_config", None) or getattr(ctx.block, "config", None)
        kinds = PAIR_KINDS[self.pairs]
        pairs = [p for p in resolve_scaling_pairs(ctx.block, ctx.adapter, config) if p.kind in kinds]
        if not pairs:
            return
        # One forward records every pair's input: a fold changes only its own linears' inputs
        # (prev's outputs / s times W * s), never what another pair reads.
        stats = collect_activation_stats(ctx, sorted({p.linear_names[0] for p in pairs}))
        for pair in pairs:
            st = stats.get(pair.linear_names[0])
            if st is None:
                log.info("%s: no calibration input reached %s; not smoothed", ctx.name, pair.linear_names)
                continue
            s = smooth_scales(st.channel_absmax, [linear_weight(m) for m in pair.linears], self.alpha)
            fold_scales(pair.prev, pair.linears, s, pair.kind)
            self.last_scales[f"{ctx.name}.{pair.prev_name}"] = s.cpu()

    def config(self) -> dict:
        return {"method": self.name, "alpha": self.alpha, "pairs": self.pairs}
