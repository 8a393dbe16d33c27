"""Quantization-aware training (QAT): fine-tune through fake quantization, then pack.

PTQ decides each weight's code once; QAT keeps a float latent weight and trains it (and, with LSQ,
each group's step size) through the rounding with straight-through gradients, so the rest of the
network adapts to the grid. It is what makes 3- and 2-bit weights usable. Here it starts where a
PTQ recipe ended (RTN, AWQ or GPTQ: the packed modules give the grid and the latent weight, see
`FakeQuantLinear.from_wqlinear`), trains on calibration text, and `convert` packs the result into the
same `WQLinear` modules PTQ produces, so the model saves, loads and runs like a PTQ one.

    prepare(model, spec)            decoder-block linears -> FakeQuantLinear (never lm_head/embeddings)
    QATTrainer(model, samples, config, teacher=float_model).train()
    convert(model)                  FakeQuantLinear -> WQLinear (W4A8Linear with int8 activations)

Loss: next-token cross-entropy (`ce` weight) plus, with a teacher (the original float model), the
distillation KL(teacher || student) over the vocabulary (`distill` weight), per token. AdamW with one
learning rate for latent weights and another for scales (a step size is ~1/8 of a weight's range at
3 bits, so it moves with a larger rate), linear warmup then cosine decay; everything that is not a
latent weight or scale stays frozen.

Checkpoints (every `checkpoint_every` steps and at the end) hold the whole training state: the model's
tensors (latent weights, scales, zero points and the float parts PTQ may have changed), AdamW's state
flattened into named tensors, the RNG state and the training ids (model.safetensors, optimizer.safetensors,
data.safetensors), and the step, loss history, config and module layout (trainer.json); no pickle. The
data order is a function of (seed, step), so `QATTrainer.resume` on a fresh float model continues the
exact same run.

Measured on SmolLM2-135M (W3 and W2, g64, from GPTQ with act-order; a shared 2-core CPU, one torch
thread: two threads ran 5-10x slower there while other jobs held the cores): a 512-token step with
distillation takes about 13-16 s (bf16 autocast; fp32 about 1.7x slower). In the 30 steps that fit
next to PTQ and evaluation, QAT did not move the test perplexity (W3 59.92 -> 60.07, W2 11810 -> 11896;
`bench/qat.py`): 15k training tokens are far too few for end-to-end QAT at these learning rates, and
larger rates (1e-4) made it worse within 10 steps. The packed model matches the fake-quant one exactly
with the fp32 reference kernel (60.0744 both) and within 0.26% with the default bf16 kernels.

The W3/W2 presets therefore go EfficientQAT's way (Chen et al., 2024): Block-AP (`block_ap.py`, a recipe
step in the block runner) trains each block's latent weights, step sizes and zero points against the
float block's output, at ~1/30 of a model step per block step, then E2E-QP trains the step sizes alone
(`train_weights: false`: codes frozen, `FakeQuantLinear.freeze_codes`) with this trainer. Measured
(`bench/qat.py --bits 3 --group-size 64 --ptq gptq --calib-samples 64 --skip-ptq --bap-lr 1e-3
--bap-scale-lr 1e-5 --scale-lr 5e-5 --budget-minutes 13 --eval-every 10 --ref-kernel`; one thread, the
machine's other jobs idle behind the shared lock): GPTQ act-order W3 g64 59.92 (earlier run) -> Block-AP
53.54 (2 epochs of 64 windows, 64 steps a block, 465 s; GPTQ and Block-AP together 807 s) -> E2E-QP
43.54 (60 steps of 512 tokens, 5.5 s a step with frozen codes, 332 s; held-out wiki.valid ppl 50.89 ->
41.01 over those steps). QAT time (Block-AP + E2E) 797 s, inside 20 minutes. That halves GPTQ's increase
over float 29.19 (target <= 44.6), not that of the AWQ + GPTQ chain's 49.66 (<= 39.4; not run as a
start here). The packed model reloads at 43.540 with the default kernels and 43.5448 with the fp32
reference one, against 43.5448 fake-quant (0.01% and 0.000%).

The presets now start from GPTQ with asym_calib 0.25 (the better PTQ W3) and w3a16-qat's E2E step
sizes train at 5e-5 -> 1.5e-4 (`bench/qat.py --bits 3 --group-size 64 --calib-samples 64 --ptq gptq
--budget-minutes 20 --threads 2`; two threads, helper sessions' jobs beside it): PTQ 44.84 -> Block-AP
42.24 (283 s) -> E2E 37.70 with 5e-5 (160 steps, budget-bound) and 36.01 with 1.5e-4 (200 steps, 717 s;
held-out ppl 40.96 -> 35.77), reloaded within 0.04% of the fake-quant model: 0.46x the increase of the
best PTQ W3 (43.90). W2 g64 (5e-5): 245.08 -> 246.81 (Block-AP does not help at 2 bits with these rates)
-> 151.89 (200 steps, 723 s).

W4A8 (`w4a8-qat`): the two-level int4 grid of `W4A8Linear` (a float scale per row times an integer
multiplier in [1, 16] per group of 64) with int8 activations per token rounded as the kernel rounds
them, started from ZeroQuant's LKD and packed back into `W4A8Linear`. SmolLM2-135M, WikiText-2 test
40 x 512, 60 E2E steps (`bench/qat.py --model smollm2-135m --recipe w4a8-qat --ptq zeroquant --bits 4
--group-size 64 --calib-samples 16 --check-bits 4 --steps 60 --threads 2`; under the shared lock, with
other sessions' unit tests possibly beside it): LKD start 39.32 (float 29.19) -> 32.00 reloaded with the codes fixed and the row
scales (lr 2e-5) and multipliers (lr 0.03) trained, 215 s of training; 32.27 with the row scales
alone. Training the latent weights (lr 1e-5, row scales 1e-6) instead made the held-out perplexity
worse over 50 steps (39.89 -> 40.59). The packed model reloads within 0.15% of the fake-quant one
(32.04): each layer agrees to 3e-7, but per-token int8 rounding amplifies float32-order differences
through the model (a code flipped at a rounding boundary in block 1 is a 1e-4 difference there and
a few % in the hidden states by block 5), so W4A8 cannot reproduce it bit for bit the way the
weight-only modules do.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, CheckpointError, LowbitError, SpecError
from ..kernels import autocast
from ..models import block_linears, get_adapter, get_blocks, is_linear, set_module, untied_state_dict
from ..nn import FakeQuantLinear, W4A8Linear, WQLinear
from ..quant import QuantSpec
from .base import Algorithm, settings_from_dict

STATE_VERSION = 1


@dataclass
class QATConfig:
    """Training settings; a recipe's `method: qat` step sets them (see recipes/w3a16-qat.yaml)."""

    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-5  # latent weights
    scale_lr: float = 1e-4  # step sizes (LSQ)
    # False: the codes are fixed where they are and only the step sizes train (EfficientQAT's E2E-QP);
    # the latent weights stay bit-identical (FakeQuantLinear.freeze_codes)
    train_weights: bool = True
    weight_decay: float = 0.0
    warmup: int = 10
    min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the learning rates
    grad_clip: float = 1.0
    learnable_scales: bool = True
    lsq_grad_scale: bool = True
    # W4A8's integer group multipliers (two-level grids): > 0 trains them at this rate as floats rounded
    # straight-through to integers in [1, 16]; 0 keeps the PTQ start's
    mult_lr: float = 0.0
    ce: float = 0.0  # weight of the next-token loss
    distill: float = 1.0  # weight of KL(teacher || student); needs the float model as teacher
    autocast: str | None = "bfloat16"  # forward/backward matmuls under CPU autocast (AMX / AVX512-BF16)
    grad_checkpointing: bool = False
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise SpecError(f"qat: steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.lr < 0 or self.scale_lr < 0 or self.mult_lr < 0:
            raise SpecError("qat: learning rates must be >= 0")
        if self.ce < 0 or self.distill < 0 or self.ce + self.distill == 0:
            raise SpecError(f"qat: needs a loss: ce={self.ce}, distill={self.distill}")
        if self.autocast not in (None, "bfloat16", "float32"):
            raise SpecError(f"qat: autocast must be bfloat16, float32 or null, got {self.autocast!r}")
        if self.checkpoint_every < 1:
            raise SpecError(f"qat: checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @classmethod
    def from_dict(cls, d: dict) -> "QATConfig":
        return settings_from_dict(cls, d, "qat")


class QAT(Algorithm):
    """A recipe's `method: qat` step: the training settings. It trains a whole model, not a block at a
    time, so it runs through `train-qat` (`lowbit.algorithms.qat.split_recipe`), not `quantize`."""

    name = "qat"

    def __init__(self, spec: QuantSpec, **settings):
        self.spec = spec
        self.settings = QATConfig.from_dict(settings)

    def prepare(self, model, adapter) -> None:
        raise LowbitError("a QAT recipe trains the model: run it with `lowbit train-qat` "
                          "(or lowbit.algorithms.qat.split_recipe + QATTrainer), not `quantize`")

    def config(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.settings)}


def split_recipe(recipe):
    """(the PTQ recipe QAT starts from, the QATConfig): a QAT recipe is PTQ steps then one `qat` step."""
    qat_steps = [s for s in recipe.steps if s.get("method") == "qat"]
    if len(qat_steps) != 1 or recipe.steps[-1].get("method") != "qat":
        raise LowbitError(f"recipe {recipe.name}: a QAT recipe ends with exactly one `method: qat` step")
    settings = {k: v for k, v in qat_steps[0].items() if k != "method"}
    start = dataclasses.replace(recipe, steps=recipe.steps[:-1])
    if not start.steps:
        start.steps = [{"method": "rtn"}]
    return start, QATConfig.from_dict(settings)


# ---- model surgery --------------------------------------------------------------------------------

def prepare(model: nn.Module, spec: QuantSpec | None = None, *, adapter=None, learnable_scales: bool = True,
            lsq_grad_scale: bool = True, input_spec: QuantSpec | None = None) -> dict[str, FakeQuantLinear]:
    """Swaps every decoder-block linear for a FakeQuantLinear, in place; returns them by name.

    A `WQLinear` (a PTQ result) keeps its grid and becomes the latent weight; a `W4A8Linear` too, with
    its input rounded per token to int8 (`input_spec` does not apply to it); a float linear gets a
    round-to-nearest grid under `spec`. Embeddings and the head are never touched. Everything in the
    model but the new latent weights and scales is frozen.
    """
    adapter = adapter or get_adapter(model)
    swapped: dict[str, FakeQuantLinear] = {}
    kw = dict(learnable_scales=learnable_scales, lsq_grad_scale=lsq_grad_scale, input_spec=input_spec)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(get_blocks(model, adapter)):
        for name, mod in block_linears(block, adapter).items():
            full = f"{adapter.blocks}.{i}.{name}"
            if isinstance(mod, FakeQuantLinear):
                fq = mod
            elif isinstance(mod, WQLinear):
                fq = FakeQuantLinear.from_wqlinear(mod, name=full, **kw)
            elif isinstance(mod, W4A8Linear):
                fq = FakeQuantLinear.from_w4a8linear(mod, learnable_scales=learnable_scales,
                                                     lsq_grad_scale=lsq_grad_scale, name=full)
            elif is_linear(mod) and isinstance(mod, nn.Linear):
                if spec is None:
                    raise SpecError(f"layer {full} is a float linear: prepare needs a weight spec for it")
                fq = FakeQuantLinear.from_float(mod, spec, name=full, **kw)
            else:
                raise SpecError(f"layer {full}: QAT cannot train a {type(mod).__name__}")
            set_module(block, name, fq)
            swapped[full] = fq
    for fq in swapped.values():
        fq.weight.requires_grad_(True)
        fq.weight_quant.scale.requires_grad_(fq.weight_quant.learnable)
    return swapped


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Packs every FakeQuantLinear into the module it computes, in place: `W4A8Linear` where the input
    is quantized, `WQLinear` otherwise. Returns the model."""
    for name, m in fake_quant_modules(model).items():
        set_module(model, name, m.to_wqlinear() if m.input_quant is None else m.to_w4a8linear())
    _checkpointing(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing of the decoder blocks on or off (transformers 5 renamed the switch)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        elif getattr(model, "is_activation_checkpointing", False):
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def _layout(modules: dict[str, FakeQuantLinear]) -> dict:
    """What `resume` needs to rebuild the fake-quant modules on a float model (JSON)."""
    out = {}
    for name, m in modules.items():
        out[name] = {"in_features": m.in_features, "out_features": m.out_features, "spec": m.spec.to_dict(),
                     "bias": m.bias is not None, "act_order": m.perm is not None,
                     "learnable_scales": m.weight_quant.learnable, "lsq_grad_scale": m.weight_quant.lsq_grad_scale,
                     "frozen_codes": m.codes is not None, "two_level": m.group_mult is not None,
                     "input_spec": None if m.input_quant is None else m.input_quant.spec.to_dict()}
    return out


def _rebuild(model: nn.Module, layout: dict) -> dict[str, FakeQuantLinear]:
    for p in model.parameters():
        p.requires_grad_(False)
    mods = {}
    for name, c in layout.items():
        inp = c.get("input_spec")
        m = FakeQuantLinear(c["in_features"], c["out_features"], QuantSpec.from_dict(c["spec"]), bias=c["bias"],
                            act_order=c["act_order"], learnable_scales=c["learnable_scales"],
                            lsq_grad_scale=c["lsq_grad_scale"], input_spec=None if inp is None else QuantSpec.from_dict(inp),
                            two_level=c.get("two_level", False), name=name)
        try:
            set_module(model, name, m)
        except AttributeError as e:
            raise CheckpointError(f"training state names layer {name}, which this model does not have") from e
        m.weight.requires_grad_(True)
        m.weight_quant.scale.requires_grad_(m.weight_quant.learnable)
        if c.get("frozen_codes"):
            m.freeze_codes()  # a codes buffer for the state to fill
        mods[name] = m
    return mods


# ---- training ------------------------------------------------------------------------------------

class QATTrainer:
    """Trains a prepared model on token windows `samples` `[n, L]`; see the module docstring."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, config: QATConfig | None = None, *,
                 teacher: nn.Module | None = None, state_dir: str | Path | None = None, progress: bool = True):
        self.model = model
        self.config = config or QATConfig()
        self.teacher = teacher
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.progress = progress
        if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.shape[1] < 2 or samples.shape[0] < 1:
            raise CalibrationError(f"QAT needs token windows [n >= 1, L >= 2], got "
                                   f"{list(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}")
        if self.config.distill > 0 and teacher is None:
            raise LowbitError("qat: distill > 0 needs the float model as teacher (or set distill: 0 and ce > 0)")
        self.samples = samples.long().cpu()
        self.modules = fake_quant_modules(model)
        if not self.modules:
            raise LowbitError("the model has no fake-quant layers: call lowbit.algorithms.qat.prepare first")
        self.step = 0
        self.history: list[dict] = []
        groups = []
        if self.config.train_weights:
            groups.append({"params": [m.weight for m in self.modules.values()], "lr": self.config.lr, "name": "weights"})
        else:
            for m in self.modules.values():
                m.freeze_codes()
        scales = [m.weight_quant.scale for m in self.modules.values() if m.weight_quant.learnable]
        if scales:
            groups.append({"params": scales, "lr": self.config.scale_lr, "name": "scales"})
        mults = [m.group_mult for m in self.modules.values() if m.group_mult is not None]
        if mults and self.config.mult_lr > 0:
            for p in mults:
                p.requires_grad_(True)
            groups.append({"params": mults, "lr": self.config.mult_lr, "name": "multipliers"})
        if not groups:
            raise LowbitError("qat: nothing to train (train_weights is off and the scales are not learnable)")
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        if self.config.grad_checkpointing:
            _checkpointing(model, True)

    # ---- one step ---------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup:
            return (step + 1) / c.warmup
        t = (step - c.warmup) / max(1, c.steps - c.warmup)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def batch(self, step: int) -> torch.Tensor:
        """The windows of `step`: epochs of a permutation seeded by (seed, epoch), so the data position
        is the step itself."""
        n, b = self.samples.shape[0], self.config.batch_size
        idx = []
        for pos in range(step * b, (step + 1) * b):
            epoch, k = divmod(pos, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch))
            idx.append(int(order[k]))
        return self.samples[idx]

    def _autocast(self):
        return autocast(self.config.autocast, self.modules[next(iter(self.modules))].weight.device)

    def loss(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        c = self.config
        device = self.modules[next(iter(self.modules))].weight.device
        ids = ids.to(device)
        with self._autocast():
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1).flatten(0, 1)  # [b * (L - 1), vocab]
        parts = {}
        total = logits.new_zeros(())
        if c.ce > 0:
            parts["ce"] = F.nll_loss(logp, ids[:, 1:].flatten())
            total = total + c.ce * parts["ce"]
        if c.distill > 0:
            with torch.no_grad(), self._autocast():
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            t_logp = F.log_softmax(t_logits, dim=-1).flatten(0, 1)
            parts["kl"] = F.kl_div(logp, t_logp, log_target=True, reduction="batchmean")
            total = total + c.distill * parts["kl"]
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def train_step(self) -> dict:
        self.model.train()
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.lr_factor(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self.loss(self.batch(self.step))
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip) if self.config.grad_clip > 0 else None
        self.optimizer.step()
        self.step += 1
        rec = {"step": self.step, "loss": float(loss.detach()), **parts}
        if gnorm is not None:
            rec["grad_norm"] = float(gnorm)
        self.history.append(rec)
        return rec

    def train(self, until: int | None = None, callback=None) -> list[dict]:
        """Trains to step `until` (default: config.steps), checkpointing every `checkpoint_every`
        steps and at the end when there is a state_dir. `callback(trainer)` runs after every step."""
        until = self.config.steps if until is None else until
        bar = tqdm(total=until, initial=self.step, desc="QAT", unit="step", disable=not self.progress)
        try:
            while self.step < until:
                rec = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.state_dir is not None and (self.step % self.config.checkpoint_every == 0 or self.step == until):
                    self.save_state(self.state_dir)
                if callback is not None:
                    callback(self)
        finally:
            bar.close()
        self.model.eval()
        return self.history

    # ---- state --------------------------------------------------------------------------------------
    def save_state(self, state_dir: str | Path) -> Path:
        """The whole training state, written atomically (a crash leaves the previous one in place)."""
        from ..formats.atomic import atomic_dir  # only lowbit.errors below it: no layering cycle

        model_state = untied_state_dict(self.model)
        opt = self.optimizer.state_dict()
        opt_tensors = {}
        for pid, st in opt["state"].items():
            for k, v in st.items():
                opt_tensors[f"{pid}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        meta = {"version": STATE_VERSION, "step": self.step, "history": self.history,
                "config": dataclasses.asdict(self.config), "layout": _layout(self.modules),
                "param_groups": opt["param_groups"], "base_lrs": self.base_lrs,
                "teacher": self.teacher is not None}
        with atomic_dir(state_dir, overwrite=True) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
            save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
            save_file({"samples": self.samples.contiguous(), "torch_rng": torch.get_rng_state()},
                      str(tmp / "data.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        return Path(state_dir)

    @classmethod
    def resume(cls, model: nn.Module, state_dir: str | Path, *, teacher: nn.Module | None = None,
               progress: bool = True, steps: int | None = None) -> "QATTrainer":
        """A trainer continuing the run saved in `state_dir`, on `model`: the original float model (its
        block linears are replaced) or the same prepared model. `steps` extends or shortens the run."""
        state_dir = Path(state_dir)
        meta, model_state, opt_tensors, data = _read_state(state_dir)
        mods = _rebuild(model, meta["layout"])
        _load_model_state(model, model_state, state_dir)
        cfg = QATConfig.from_dict(meta["config"])
        if steps is not None:
            cfg = dataclasses.replace(cfg, steps=steps)
        if meta.get("teacher") and teacher is None and cfg.distill > 0:
            raise LowbitError(f"{state_dir}: the run distils from the float model: pass it as teacher")
        self = cls(model, data["samples"], cfg, teacher=teacher, state_dir=state_dir, progress=progress)
        self.modules = mods
        self.step = int(meta["step"])
        self.history = list(meta["history"])
        state: dict[int, dict] = {}
        for key, v in opt_tensors.items():
            pid, _, name = key.partition(".")
            state.setdefault(int(pid), {})[name] = v
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{state_dir}: optimizer state does not fit this model ({e})") from e
        self.base_lrs = list(meta["base_lrs"])
        torch.set_rng_state(data["torch_rng"])
        return self


def _read_state(state_dir: Path):
    files = ["trainer.json", "model.safetensors", "optimizer.safetensors", "data.safetensors"]
    missing = [f for f in files if not (state_dir / f).is_file()]
    if missing:
        raise CheckpointError(f"{state_dir} is not a QAT training state (missing {', '.join(missing)})")
    try:
        meta = json.loads((state_dir / "trainer.json").read_text())
        tensors = [load_file(str(state_dir / f)) for f in files[1:]]
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{state_dir}: training state is truncated or corrupt ({e})") from e
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{state_dir}: training state version {meta.get('version')} (this lowbit reads {STATE_VERSION})")
    return (meta, *tensors)


def _load_model_state(model: nn.Module, state: dict[str, torch.Tensor], state_dir: Path) -> None:
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{state_dir}: tensors {unexpected[:3]} are not part of this model")
    bad = [k for k, v in state.items() if tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{state_dir}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, the model "
                              f"expects {tuple(own[bad[0]].shape)}")
    loaded = {own[k].data_ptr() for k in state}
    missing = [k for k, v in own.items() if k not in state and v.data_ptr() not in loaded]
    if missing:
        raise CheckpointError(f"{state_dir}: missing tensors {missing[:3]}")
    model.load_state_dict(state, strict=False)
