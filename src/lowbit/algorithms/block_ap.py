"""Block-AP (EfficientQAT, Chen et al., 2024): block-wise training of all quantization parameters.

QAT through the whole model costs a full forward and backward (the vocabulary-sized head included)
per step; on a CPU that is seconds per 512 tokens, and a few dozen steps move nothing (see qat.py).
Block-AP trains one decoder block at a time instead, inside the block-sequential runner: every
linear of the block becomes a `FakeQuantLinear` (its grid the PTQ result of the steps before it in
the recipe, GPTQ or AWQ + GPTQ, or round-to-nearest for a float linear), and its latent weights, step
sizes and zero points are trained with AdamW to minimise

    MSE( fake-quant block(x_q), float block(x_f) )

over the calibration windows, where x_q are the hidden states the already-quantized blocks produce
(the runner's propagated inputs) and x_f the float model's own (`ctx.float_outputs`, which the runner
computes on a float stream kept beside the quantized one because `needs_float_outputs` is set). Each
block so learns to undo part of the error of the blocks before it, as in EfficientQAT and OmniQuant.
A step of one block costs about 1/30 of a model step and needs no head, which is what makes it fit
on a CPU. The block is then packed back into `WQLinear` modules, and the runner feeds its quantized
outputs to the next block.

Settings follow EfficientQAT's: two epochs, AdamW without weight decay, a small rate for the latent
weights (1e-5) and a larger one for step sizes and zero points (1e-4), cosine decay to 1/20 of them,
gradient norm clipped at 0.3, two windows per step; zero points are float parameters rounded (and
clamped into the code range) straight-through, so they pack as integers. The data order is a function
of (seed, block, epoch), so a run is deterministic. Forwards and backwards run under bf16 autocast.

What the small calibration sets this runs on allow (SmolLM2-135M W3 g64, a shared 2-core CPU, one
thread): a Block-AP step of one block on 2 x 512 tokens takes about 0.3-0.5 s, so two epochs over 64
windows are ~20 s a block, ~10 min for the model, i.e. 64 steps a block where EfficientQAT takes
thousands. At that step count EfficientQAT's rates do little and larger ones hurt. Pilots on the first
3 blocks (16 windows, 16 steps a block; validation MSE on 8 other windows against the GPTQ start):
scale_lr 1e-3 raised every block's error 1.2-2.7x (from GPTQ and from AWQ + GPTQ alike; a step size of
~0.02-0.05 moved by 1e-3 a step); scale_lr 1e-5 with weight lr 1e-4..3e-3 kept it within 1%; starting
from round-to-nearest on the float weights (EfficientQAT's own start) lowered block 0's error by 1.6%
but left it 4x GPTQ's. A PTQ start hands Block-AP latent weights that sit exactly on their grid: a code
flips only once its weight has moved half a step, and LSQ's scale gradient round(v) - v starts at 0,
which is why so few steps change so little. The presets therefore use weight lr 1e-3 and scale lr 1e-5.

Every calibration window must share the block's keyword arguments (same length, no padding, which
is how lowbit cuts calibration text): one window's masks and rotary embeddings then serve any batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calib.runner import call_block
from ..errors import CalibrationError, SpecError
from ..kernels import autocast
from ..models import is_linear, set_module
from ..nn import FakeQuantLinear, WQLinear
from ..quant import QuantSpec
from .base import Algorithm, settings_from_dict
from .rtn import check_weights


@dataclass
class BlockAPConfig:
    """A recipe's `method: block_ap` step sets these."""

    epochs: int = 2
    batch_size: int = 2  # calibration windows per step
    lr: float = 1e-5  # latent weights
    scale_lr: float = 1e-4  # step sizes and zero points
    min_lr_ratio: float = 0.05  # cosine decay ends at this fraction of the rates
    weight_decay: float = 0.0
    grad_clip: float = 0.3
    learnable_zeros: bool = True
    autocast: str | None = "bfloat16"
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1:
            raise SpecError(f"block_ap: epochs must be >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr < 0 or self.scale_lr < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise SpecError("block_ap: learning rates must be >= 0 and min_lr_ratio in [0, 1]")
        if self.autocast not in (None, "bfloat16", "float32"):
            raise SpecError(f"block_ap: autocast must be bfloat16, float32 or null, got {self.autocast!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "BlockAPConfig":
        return settings_from_dict(cls, d, "block_ap")


def _one_window(obj, n: int):
    """The keyword arguments of one window out of a chunk of `n`: tensors batched over the windows are
    cut to their first row (and broadcast against any batch), after checking the rows agree."""
    if isinstance(obj, torch.Tensor):
        if n > 1 and obj.dim() > 0 and obj.shape[0] == n:
            if not torch.equal(obj, obj[:1].expand_as(obj)):
                raise CalibrationError("block_ap: calibration windows differ in masks or positions (padding?); "
                                       "it needs windows of one length without padding")
            return obj[:1]
        return obj
    if isinstance(obj, tuple):
        return tuple(_one_window(o, n) for o in obj)
    if isinstance(obj, list):
        return [_one_window(o, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _one_window(v, n) for k, v in obj.items()}
    return obj


class BlockAP(Algorithm):
    """A recipe's `method: block_ap` step; see the module docstring."""

    name = "block_ap"
    requires_calibration = True
    propagate = "quantized"
    needs_float_outputs = True

    def __init__(self, spec: QuantSpec, **settings):
        if spec.is_codebook:
            raise SpecError(f"block_ap trains integer grids only, got {spec}")
        self.spec = spec
        self.settings = BlockAPConfig.from_dict(settings)
        # the runner's calibration forwards (targets, the next block's inputs) in the training dtype
        self.forward_dtype = getattr(torch, self.settings.autocast) if self.settings.autocast else None
        self.history: list[dict] = []  # per block: losses and time

    def prepare(self, model, adapter) -> None:
        check_weights(model, adapter, self.spec)

    # ---- one block ------------------------------------------------------------------------------
    def _fake_quant(self, ctx) -> dict[str, FakeQuantLinear]:
        mods = {}
        kw = dict(learnable_scales=True, lsq_grad_scale=False, learnable_zeros=self.settings.learnable_zeros)
        for name, m in ctx.linears.items():
            full = f"{ctx.name}.{name}"
            if isinstance(m, WQLinear):
                fq = FakeQuantLinear.from_wqlinear(m, name=full, **kw)
            elif is_linear(m) and isinstance(m, torch.nn.Linear):
                fq = FakeQuantLinear.from_float(m, self.spec, name=full, **kw)
            else:
                raise SpecError(f"layer {full}: block_ap cannot train a {type(m).__name__}")
            mods[name] = fq
        return mods

    def lr_factor(self, step: int, total: int) -> float:
        t = step / max(1, total - 1)
        r = self.settings.min_lr_ratio
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t))

    def quantize_block(self, ctx) -> None:
        if not ctx.has_data:
            raise CalibrationError("block_ap needs calibration data")
        if ctx.float_outputs is None:
            raise RuntimeError("block_ap: the runner gave no float outputs (needs_float_outputs)")
        c = self.settings
        t0 = time.perf_counter()
        mods = self._fake_quant(ctx)
        for p in ctx.block.parameters():
            p.requires_grad_(False)
        for name, fq in mods.items():
            set_module(ctx.block, name, fq)
        weights = [m.weight for m in mods.values()]
        qparams = [m.weight_quant.scale for m in mods.values()]
        qparams += [m.weight_quant.zero_point for m in mods.values() if m.weight_quant.learnable_zero]
        for p in weights + qparams:
            p.requires_grad_(True)
        groups = [g for g in ({"params": weights, "lr": c.lr}, {"params": qparams, "lr": c.scale_lr}) if g["lr"] > 0]
        for g in groups:
            g["base_lr"] = g["lr"]

        x = torch.cat([ch.hidden for ch in ctx.chunks])  # [n, L, hidden], on the offload device
        y = torch.cat([o.to(x.device) for o in ctx.float_outputs])
        kwargs = _one_window(ctx.kwargs(ctx.chunks[0]), ctx.chunks[0].hidden.shape[0])
        n = x.shape[0]
        per_epoch = math.ceil(n / c.batch_size)
        total = c.epochs * per_epoch
        rec = {"block": ctx.index, "steps": total, "epoch_loss": []}
        if total and groups:
            opt = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
            params = [p for g in groups for p in g["params"]]
            bar = tqdm(total=total, desc=f"block_ap {ctx.name}", unit="step", leave=False,
                       disable=not ctx.progress)
            step = 0
            with torch.enable_grad():
                for epoch in range(c.epochs):
                    gen = torch.Generator().manual_seed((c.seed * 1000003 + ctx.index) * 1009 + epoch)
                    order = torch.randperm(n, generator=gen)
                    losses = []
                    for start in range(0, n, c.batch_size):
                        idx = order[start : start + c.batch_size]
                        for g in opt.param_groups:
                            g["lr"] = g["base_lr"] * self.lr_factor(step, total)
                        with autocast(self.settings.autocast, ctx.device):
                            out = call_block(ctx.block, x[idx].to(ctx.device), kwargs)
                        loss = F.mse_loss(out.float(), y[idx].to(ctx.device).float())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if c.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                        opt.step()
                        losses.append(float(loss.detach()))
                        if step == 0:
                            rec["first_loss"] = losses[0]
                        step += 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{losses[-1]:.4g}")
                    rec["epoch_loss"].append(sum(losses) / len(losses))
            bar.close()
            del opt
        with torch.no_grad():
            for name, fq in mods.items():
                fq.requires_grad_(False)
                set_module(ctx.block, name, fq.to_wqlinear())
        rec["seconds"] = time.perf_counter() - t0
        self.history.append(rec)

    def config(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.settings)}
