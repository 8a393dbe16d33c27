"""The block-sequential runner.

Calibration-based methods quantize one decoder block at a time: the inputs of block i are the
outputs of the already-quantized blocks 0..i-1 (GPTQ's choice, so each block corrects the error
of the ones before it). The runner

1. captures the hidden states entering block 0 and the keyword arguments every block receives
   (masks and rotary embeddings; Gemma-3 gives sliding-window and global layers different ones,
   so they are recorded per block), with cache objects removed;
2. for each block: moves it to the compute device, hands a `BlockContext` to each algorithm in
   turn, then re-runs the (now quantized) block to produce the next block's inputs;
3. keeps only the current block on the compute device.

Float targets: an algorithm that fits a block to what the float model computes there (Block-AP) sets
`needs_float_outputs`; the runner then hands it `ctx.float_outputs`, the untouched block's outputs on
the float model's own hidden states, computed before any step of the block changes it. Where the next
block is fed quantized outputs, that takes a second stream of hidden states (`Chunk.float_hidden`),
advanced by those same float outputs, so it costs one float forward per block and nothing else.

Algorithms that need no data (RTN) run through the same loop with no inputs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import block_linears, get_blocks, get_module, move_embeddings


class _StopForward(Exception):
    """Raised by the last recorder so the model's head never runs during capture."""


# Keyword arguments that carry decoding state: calibration runs each block once, without a cache.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache_position")


def sanitize_kwargs(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if k in _CACHE_KWARGS:
            continue
        if k in ("use_cache", "output_attentions"):
            v = False
        out[k] = v
    return out


class _Recorder(nn.Module):
    """Stands in for a block during capture: records what it receives, passes hidden states on."""

    def __init__(self, original: nn.Module, index: int, store: list, stop: bool):
        super().__init__()
        self.index, self.store, self.stop = index, store, stop
        object.__setattr__(self, "_original", original)  # not a submodule: no double registration

    def __getattr__(self, name):
        # models read attributes of their layers while iterating (Qwen2's `attention_type`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # some architectures pass the mask positionally; keep them as they came
            kwargs = {**kwargs, "__args__": args}
        self.store[self.index] = (hidden_states, sanitize_kwargs(kwargs))
        if self.stop:
            raise _StopForward
        return hidden_states


@dataclass
class Chunk:
    """A batch of calibration samples on its way through the blocks."""

    hidden: torch.Tensor  # [b, L, hidden]
    kwargs: list[dict]  # per block: what that block is called with
    # [b, L, hidden]: what the float model feeds the current block, kept only when an algorithm needs
    # float targets while quantized outputs are propagated (else `hidden` is that stream, or unused)
    float_hidden: torch.Tensor | None = None


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def call_block(module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    kwargs = dict(kwargs)
    args = kwargs.pop("__args__", ())
    out = module(hidden, *args, **kwargs)
    # transformers < 5 returned a tuple from decoder layers
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockContext:
    """What an algorithm sees of one block."""

    index: int
    name: str  # e.g. "model.layers.3"
    block: nn.Module
    adapter: object
    device: torch.device
    chunks: list[Chunk] = field(default_factory=list)
    # per chunk [b, L, hidden]: the untouched block on the float model's hidden states, when asked for
    float_outputs: list[torch.Tensor] | None = None
    # {submodule name: its input [tokens, in] per chunk} in that same float forward, for the names
    # algorithms ask for (Algorithm.float_input_names)
    float_inputs_of: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # algorithms may leave notes for the ones after them
    # bf16: the block's calibration forwards run under autocast (AMX), 3-4x faster than fp32 here
    forward_dtype: torch.dtype | None = None
    progress: bool = True  # whether algorithms that take long inside a block may show a progress bar

    def autocast(self):
        if self.forward_dtype in (None, torch.float32):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.forward_dtype)

    @property
    def has_data(self) -> bool:
        return bool(self.chunks)

    @property
    def linears(self) -> dict[str, nn.Module]:
        return block_linears(self.block, self.adapter)

    def kwargs(self, chunk: Chunk) -> dict:
        return _to(chunk.kwargs[self.index], self.device)

    def inputs(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for c in self.chunks:
            yield c.hidden.to(self.device), self.kwargs(c)

    def float_inputs(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """The float model's hidden states entering this block (the inputs when none are kept apart)."""
        for c in self.chunks:
            h = c.hidden if c.float_hidden is None else c.float_hidden
            yield h.to(self.device), self.kwargs(c)

    @torch.no_grad()
    def forward(self, module: nn.Module | None = None, *, float_inputs: bool = False) -> list[torch.Tensor]:
        """Runs the block (or another module taking the block's inputs) over all calibration chunks, on
        the propagated inputs or, with `float_inputs`, on the float model's hidden states."""
        module = self.block if module is None else module
        with self.autocast():
            return [call_block(module, h, kw) for h, kw in (self.float_inputs() if float_inputs else self.inputs())]

    @torch.no_grad()
    def forward_recording(self, names: list[str], *, float_inputs: bool = False) -> tuple[list, dict]:
        """`forward` that also returns {name: that submodule's input [tokens, in] per chunk}."""
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with self.hook_inputs(names, lambda n, x: got[n].append(x.clone())):
            outs = self.forward(float_inputs=float_inputs)
        return outs, got

    @contextmanager
    def hook_inputs(self, names: list[str], fn: Callable[[str, torch.Tensor], None]):
        """Calls fn(name, x [tokens, in]) with each named submodule's input while the block runs."""
        handles = []
        for name in names:
            mod = get_module(self.block, name)

            def hook(_m, args, _name=name):
                x = args[0]
                fn(_name, x.detach().reshape(-1, x.shape[-1]))

            handles.append(mod.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run_inputs(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Calls fn(name, x) with each named submodule's input over all chunks, running each chunk's
        forward only until every named module has been reached (what comes after them is not needed,
        which saves most of a forward for the first linears of a block)."""
        pending: set[str] = set()

        def record(name, x):
            fn(name, x)
            pending.discard(name)
            if not pending:
                raise _StopForward

        with self.hook_inputs(names, record), self.autocast():
            for h, kw in self.inputs():
                pending.update(names)
                try:
                    call_block(self.block, h, kw)
                except _StopForward:
                    pass

    @torch.no_grad()
    def collect_inputs(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The inputs of the named submodules over all calibration tokens: {name: [tokens, in]}."""
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with self.hook_inputs(names, lambda n, x: got[n].append(x)):
            self.forward()
        return {n: torch.cat(v) for n, v in got.items()}


class BlockRunner:
    def __init__(self, model: nn.Module, adapter, samples: torch.Tensor | None = None, *,
                 device: str | torch.device | None = None, batch_size: int = 8, progress: bool = True):
        self.model = model
        self.adapter = adapter
        self.samples = samples
        self.blocks = get_blocks(model, adapter)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.offload = _model_device(model)
        self.batch_size = batch_size
        self.progress = progress
        self.chunks: list[Chunk] = []

    @torch.no_grad()
    def capture(self) -> None:
        """Records block inputs for every sample batch, running only the embeddings."""
        n = len(self.blocks)
        originals = list(self.blocks)
        self.chunks = []
        # Only what runs before block 0 joins the samples on the compute device.
        move_embeddings(self.model, self.adapter, self.device)
        try:
            store: list = [None] * n
            for i in range(n):
                self.blocks[i] = _Recorder(originals[i], i, store, stop=(i == n - 1))
            for start in range(0, self.samples.shape[0], self.batch_size):
                ids = self.samples[start : start + self.batch_size].to(self.device)
                store[:] = [None] * n
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                if any(s is None for s in store):
                    missing = [i for i, s in enumerate(store) if s is None]
                    raise RuntimeError(f"blocks {missing} were never called during capture")
                self.chunks.append(Chunk(hidden=store[0][0].to(self.offload), kwargs=[_to(s[1], self.offload) for s in store]))
        finally:
            for i, b in enumerate(originals):
                self.blocks[i] = b
            move_embeddings(self.model, self.adapter, self.offload)

    @torch.no_grad()
    def run(self, algorithms: list) -> None:
        calibrated = self.samples is not None
        if calibrated:
            self.capture()
        prefix = self.adapter.blocks
        # The last step (the one that rounds) says what feeds the next block: AWQ alone passes float
        # outputs on as AutoAWQ does; AWQ's scales then GPTQ's rounding pass quantized ones.
        want_float = calibrated and getattr(algorithms[-1], "propagate", "quantized") == "float"
        targets = want_float or any(getattr(a, "needs_float_outputs", False) for a in algorithms)
        separate = calibrated and targets and not want_float  # a float stream beside the quantized one
        if separate:
            for c in self.chunks:
                c.float_hidden = c.hidden
        bar = tqdm(range(len(self.blocks)), desc="quantizing blocks", disable=not self.progress, unit="block")
        for i in bar:
            block = self.blocks[i].to(self.device)
            ctx = BlockContext(i, f"{prefix}.{i}", block, self.adapter, self.device, self.chunks,
                               forward_dtype=getattr(algorithms[-1], "forward_dtype", None), progress=self.progress)
            if calibrated and targets:
                # before any step touches the block; from the float stream where one is kept apart
                names = sorted({n for a in algorithms for n in a.float_input_names(ctx)})
                if names:
                    ctx.float_outputs, ctx.float_inputs_of = ctx.forward_recording(names, float_inputs=separate)
                elif separate:
                    ctx.float_outputs = ctx.forward(float_inputs=True)
                elif not getattr(algorithms[0], "records_float_outputs", False):
                    # (a first algorithm that runs the untouched block anyway records them for us)
                    ctx.float_outputs = ctx.forward()
            for alg in algorithms:
                alg.quantize_block(ctx)
            if calibrated and i < len(self.blocks) - 1:
                if targets and ctx.float_outputs is None:
                    raise RuntimeError(f"{algorithms[0].name} promised the float outputs of block {i} and left none")
                outs = ctx.float_outputs if want_float else ctx.forward()
                for c, o in zip(self.chunks, outs):
                    c.hidden = o.to(self.offload)
                if separate:
                    for c, o in zip(self.chunks, ctx.float_outputs):
                        c.float_hidden = o.to(self.offload)
            self.blocks[i] = block.to(self.offload)
        self.chunks = []


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
