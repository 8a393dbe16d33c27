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

Reused outputs: GPTQ's true-sequential steps run the block up to the next linears' inputs four times,
and mostly recompute what has not changed (the attention, once q/k/v/o are rounded, for the MLP's
steps). Inside `BlockContext.reuse_outputs()` a submodule called again on the same chunk, with equal
inputs and parameters untouched since, returns its earlier output instead of running (exactly what it
would compute: nothing is approximated). An algorithm that leaves the block's outputs in `ctx.outputs`
(computed that way) spares the runner its propagating forward.

Algorithms that need no data (RTN) run through the same loop with no inputs.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..kernels import autocast
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


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


def _same_call(a, b) -> bool:
    """Whether two (args, kwargs) structures are equal: tensors by value, everything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)) and all(_same_call(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_call(a[k], b[k]) for k in a))
    try:
        return bool(a is b or a == b)
    except Exception:  # objects without a usable ==
        return False


def _module_state(module: nn.Module) -> tuple:
    """What a module's output depends on besides its inputs: its tensors (and their in-place versions)
    and its submodules (a swapped module is another object)."""
    return tuple((t, t._version) for t in (*module.parameters(), *module.buffers())) + tuple(module.modules())


def _same_state(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            if x[0] is not y[0] or x[1] != y[1]:
                return False
        elif x is not y:
            return False
    return True


@dataclass
class _Memo:
    """One submodule's last output on one chunk, with what it was computed from."""

    state: tuple
    autocast: tuple
    call: tuple  # (args, kwargs)
    out: Any
    # (name, its output tensor as it appears in `out`, its call): the linear whose output the module
    # returns as such, and `rest`, the module's state without that linear's: while only the linear
    # changes, running it again on its call gives the module's new output
    tail: tuple | None = None
    rest: tuple | None = None
    versions: tuple = ()  # the in-place versions of every tensor above

    def __post_init__(self):
        self.versions = self.current_versions()

    def current_versions(self) -> tuple:
        return tuple(t._version for t in _flat_tensors((self.call, self.out, self.tail)))


def _without(state: tuple, module: nn.Module) -> tuple:
    """A `_module_state` less the entries of `module` (its tensors and submodules)."""
    own = {id(t) for t in (*module.parameters(), *module.buffers())} | {id(m) for m in module.modules()}
    return tuple(x for x in state if id(x[0] if isinstance(x, tuple) else x) not in own)


def _replace_tensor(obj, old: torch.Tensor, new: torch.Tensor):
    if obj is old:
        return new
    if isinstance(obj, tuple):
        return tuple(_replace_tensor(o, old, new) for o in obj)
    if isinstance(obj, list):
        return [_replace_tensor(o, old, new) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace_tensor(v, old, new) for k, v in obj.items()}
    return obj


def _autocast_state() -> tuple:
    return (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))


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
    # per chunk: the block's outputs on `inputs()` as the block now stands, left by the algorithm that
    # changed it last (the runner then propagates these instead of running the block again)
    outputs: list[torch.Tensor] | None = None
    wants_outputs: bool = True  # False where the runner propagates nothing from this block (the last one)
    # which chunk (and of which stream) the block is running on, for reuse_outputs
    _at: tuple | None = field(default=None, repr=False)
    _hooked: set = field(default_factory=set, repr=False)  # submodule names with input hooks now
    _memo: dict | None = field(default=None, repr=False)

    def autocast(self):
        return autocast(self.forward_dtype, self.device)

    @property
    def has_data(self) -> bool:
        return bool(self.chunks)

    @property
    def linears(self) -> dict[str, nn.Module]:
        return block_linears(self.block, self.adapter)

    def kwargs(self, chunk: Chunk) -> dict:
        return _to(chunk.kwargs[self.index], self.device)

    def inputs(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for i, c in enumerate(self.chunks):
            self._at = ("inputs", i)
            yield c.hidden.to(self.device), self.kwargs(c)
        self._at = None

    def float_inputs(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """The float model's hidden states entering this block (the inputs when none are kept apart)."""
        for i, c in enumerate(self.chunks):
            self._at = ("float", i) if c.float_hidden is not None else ("inputs", i)
            h = c.hidden if c.float_hidden is None else c.float_hidden
            yield h.to(self.device), self.kwargs(c)
        self._at = None

    @contextmanager
    def reuse_outputs(self, names: list[str] | None = None):
        """Within this context the named submodules (default: the block's children that hold a linear,
        and the linears) skip their forward when called again on the same chunk with equal inputs,
        unchanged parameters and the same autocast state, and return their earlier output. Exact: a
        deterministic module gives the same output on the same inputs. The outputs are kept (one per
        submodule and chunk) until the context ends.

        One change is allowed for: where a child's output *is* the output of its last linear (the
        attention's o_proj, the MLP's down_proj: checked by identity when the child runs, and no other
        tensor returned) and only that linear changed since, the linear alone runs again on its
        recorded input. `run_inputs` then lets the attention finish before it stops, so that a later
        step finds it recorded."""
        linears = self.linears
        if names is None:
            ids = {id(m) for m in linears.values()}
            names = [n for n, child in self.block.named_children() if any(id(d) in ids for d in child.modules())]
            names += [n for n in linears if n not in names]
        outer = self._memo
        self._memo = {} if outer is None else outer
        with ExitStack() as stack:
            for name in names:
                stack.enter_context(self._reusing(name, get_module(self.block, name), names))
            try:
                yield
            finally:
                self._memo = outer

    def _last_linear_of_child(self, name: str) -> str | None:
        """The attention: the block's direct child holding its first linear, if `name` is the last
        linear (in the adapter's order) inside it. Finishing it costs that linear and spares the next
        step the attention itself; the MLP's elementwise work between its linears is cheaper than its
        last linear, so finishing the MLP would cost more than it spares."""
        child = name.split(".")[0]
        inside = [n for n in self.adapter.linears if n.startswith(child + ".")]
        return child if inside and inside[-1] == name and inside[0] == self.adapter.linears[0] else None

    @contextmanager
    def _reusing(self, name: str, module: nn.Module, reused: list[str]):
        original = module.__dict__.get("forward")
        run = module.forward
        inner = [n for n, _ in module.named_modules(prefix=name)]
        tails = [n for n in reused if n.startswith(name + ".") and n in self.adapter.linears]

        def entry(call, out, tail) -> _Memo:
            state = _module_state(module)
            rest = None
            if tail is not None:
                lin = get_module(self.block, tail[0])
                rest = _without(state, lin)
            return _Memo(state, _autocast_state(), call, out, tail, rest)

        def lookup(key, call):
            m = self._memo.get(key)
            if (m is None or m.autocast != _autocast_state() or m.current_versions() != m.versions
                    or not _same_call(m.call, call)):
                return None
            state = _module_state(module)
            if _same_state(m.state, state):
                return m.out
            if m.tail is None:
                return None
            tail_name, tail_out, tail_call = m.tail
            lin = get_module(self.block, tail_name)
            if not _same_state(m.rest, _without(state, lin)):
                return None
            # the recorded call is what the linear's forward received, after its pre-hooks: calling the
            # module again would run them a second time (a hook that rotates or rescales x, twice)
            new_tail = lin.forward(*tail_call[0], **tail_call[1])
            out = _replace_tensor(m.out, tail_out, new_tail)
            self._memo[key] = entry(call, out, (tail_name, new_tail, tail_call))
            return out

        def forward(*args, **kwargs):
            at = self._at
            if at is None or self._memo is None:
                return run(*args, **kwargs)
            key, call = (name, at), (args, kwargs)
            # a hooked submodule must see its input: run it (and keep what it gives)
            if not any(n in self._hooked for n in inner):
                out = lookup(key, call)
                if out is not None:
                    return out
            self._memo.pop(key, None)
            out = run(*args, **kwargs)
            tail = None
            flat = _flat_tensors(out)
            # the linear whose output the module returns as such and as its only tensor (so nothing else
            # it returns can depend on the linear)
            for n in reversed(tails) if len(flat) == 1 else ():
                t = self._memo.get((n, at))
                if t is not None and t.out is flat[0]:
                    tail = (n, t.out, t.call)
                    break
            self._memo[key] = entry(call, out, tail)
            return out

        module.forward = forward
        try:
            yield
        finally:
            if original is None:
                del module.forward
            else:
                module.forward = original

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
        added = set(names) - self._hooked
        self._hooked |= added
        try:
            yield
        finally:
            self._hooked -= added
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run_inputs(self, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        """Calls fn(name, x) with each named submodule's input over all chunks, running each chunk's
        forward only until every named module has been reached (what comes after them is not needed,
        which saves most of a forward for the first linears of a block). Inside reuse_outputs, where
        the named module is the attention's last linear, the attention finishes first (its output can
        then be reused once the linear changes)."""
        pending: set[str] = set()
        children = {self._last_linear_of_child(n) for n in names} if self._memo is not None else {None}
        defer = None not in children

        def record(name, x):
            fn(name, x)
            pending.discard(name)
            if not pending and not defer:
                raise _StopForward

        def done(*_):
            if not pending:
                raise _StopForward

        with ExitStack() as stack:
            stack.enter_context(self.hook_inputs(names, record))
            stack.enter_context(self.autocast())
            if defer:
                for child in children:
                    stack.callback(get_module(self.block, child).register_forward_hook(done).remove)
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
                               forward_dtype=getattr(algorithms[-1], "forward_dtype", None), progress=self.progress,
                               wants_outputs=calibrated and not want_float and i < len(self.blocks) - 1)
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
                ctx.outputs = None  # only the last algorithm's outputs describe the block as it ends
                alg.quantize_block(ctx)
            if calibrated and i < len(self.blocks) - 1:
                if targets and ctx.float_outputs is None:
                    raise RuntimeError(f"{algorithms[0].name} promised the float outputs of block {i} and left none")
                if want_float:
                    outs = ctx.float_outputs
                else:
                    outs = ctx.outputs if ctx.outputs is not None else ctx.forward()
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
