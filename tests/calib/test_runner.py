"""The block-sequential runner must feed each block exactly what the model would."""

import pytest
import torch

from lowbit.algorithms import Algorithm
from lowbit.calib import BlockRunner
from lowbit.models import get_adapter, get_module

from ..conftest import tiny_model


class Recorder(Algorithm):
    """Keeps each block's output computed from the runner's inputs."""

    def __init__(self):
        self.outputs = {}
        self.seen_linears = {}

    def quantize_block(self, ctx):
        self.outputs[ctx.index] = torch.cat(ctx.forward())
        self.seen_linears[ctx.index] = sorted(ctx.linears)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2", "opt", "gpt2", "gpt_neox"])
def test_runner_reproduces_the_models_hidden_states(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
        rec = Recorder()
        BlockRunner(model, adapter, ids, batch_size=2, progress=False).run([rec])
    n = len(rec.outputs)
    assert n == model.config.num_hidden_layers
    # hidden_states[i + 1] is the output of block i, except the last, which HF reports after the final norm
    for i in range(n - 1):
        torch.testing.assert_close(rec.outputs[i], ref[i + 1], rtol=1e-4, atol=1e-4)
    final_norm = get_module(model, adapter.final_norm)
    torch.testing.assert_close(final_norm(rec.outputs[n - 1]), ref[n], rtol=1e-4, atol=1e-4)
    assert rec.seen_linears[0] == sorted(adapter.linears)


def test_runner_without_data_still_visits_every_block(tiny_llama):
    seen = []

    class Visit(Algorithm):
        requires_calibration = False

        def quantize_block(self, ctx):
            assert not ctx.has_data
            seen.append(ctx.name)

    BlockRunner(tiny_llama, get_adapter(tiny_llama), None, progress=False).run([Visit()])
    assert seen == ["model.layers.0", "model.layers.1"]


def test_next_block_sees_the_quantized_outputs(tiny_llama):
    """After block 0 is changed, block 1 must receive the changed block 0's outputs."""
    model = tiny_llama
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    got = {}

    class ZeroFirstBlockMLP(Algorithm):
        def quantize_block(self, ctx):
            if ctx.index == 0:
                ctx.block.mlp.down_proj.weight.zero_()
            got[ctx.index] = torch.cat([h for h, _ in ctx.inputs()])

    with torch.no_grad():
        BlockRunner(model, get_adapter(model), ids, progress=False).run([ZeroFirstBlockMLP()])
        expected = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got[1], expected, rtol=1e-5, atol=1e-5)


def test_float_outputs_come_from_the_float_stream_while_quantized_outputs_propagate(tiny_llama):
    """An algorithm with needs_float_outputs sees, for every block, what the float model computes there
    (not the changed block's outputs, nor the float block on changed inputs), and the next block is
    still fed the changed outputs."""
    model = tiny_llama
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    targets, inputs = {}, {}

    class Damage(Algorithm):
        needs_float_outputs = True

        def quantize_block(self, ctx):
            targets[ctx.index] = torch.cat(ctx.float_outputs)
            inputs[ctx.index] = torch.cat([h for h, _ in ctx.inputs()])
            ctx.block.mlp.down_proj.weight.mul_(0.5)

    with torch.no_grad():
        BlockRunner(model, get_adapter(model), ids, batch_size=2, progress=False).run([Damage()])
    torch.testing.assert_close(targets[0], ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(inputs[1], ref[1], rtol=1e-3, atol=1e-3)  # block 1 got the damaged outputs
    for i in range(1, len(targets) - 1):
        torch.testing.assert_close(targets[i], ref[i + 1], rtol=1e-4, atol=1e-4)


def test_float_inputs_of_named_linears_come_from_the_float_model(tiny_llama):
    """Algorithm.float_input_names: the inputs those linears get in the float model, recorded in the
    runner's float forward, even though the propagated (damaged) stream feeds the block otherwise."""
    model = tiny_llama
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    want = {}
    hooks = [get_module(b, "mlp.down_proj").register_forward_pre_hook(
        lambda _m, a, i=i: want.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
        for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    got, seen = {}, {}

    class Damage(Algorithm):
        needs_float_outputs = True

        def float_input_names(self, ctx):
            return ["mlp.down_proj"]

        def quantize_block(self, ctx):
            got[ctx.index] = torch.cat(ctx.float_inputs_of["mlp.down_proj"])
            ctx.run_inputs(["mlp.down_proj"], lambda n, x: seen.setdefault(ctx.index, []).append(x))
            ctx.block.mlp.down_proj.weight.mul_(0.5)

    with torch.no_grad():
        BlockRunner(model, get_adapter(model), ids, batch_size=2, progress=False).run([Damage()])
    assert len(got) == model.config.num_hidden_layers
    for i in got:
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.cat(seen[1]), want[1], rtol=1e-3, atol=1e-3)  # the propagated stream differs


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "opt"])
def test_reused_outputs_are_exact(model_type):
    """Inside reuse_outputs a second forward of the unchanged block gives the same outputs bit for bit;
    after a parameter changes in place, the outputs equal a plain forward's of the changed block."""
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    got = {}

    class Check(Algorithm):
        def quantize_block(self, ctx):
            if ctx.index:
                return
            plain = ctx.forward()
            with ctx.reuse_outputs():
                first, again = ctx.forward(), ctx.forward()
                get_module(ctx.block, adapter.sequential[-1][0]).weight.mul_(0.5)
                changed = ctx.forward()
            got.update(plain=plain, first=first, again=again, changed=changed, after=ctx.forward())

    with torch.no_grad():
        BlockRunner(model, adapter, ids, batch_size=2, progress=False).run([Check()])
    for a, b, c in zip(got["plain"], got["first"], got["again"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(got["changed"], got["after"]):
        assert torch.equal(a, b)
    assert not any(torch.equal(a, b) for a, b in zip(got["changed"], got["plain"]))


def test_reused_tail_does_not_rerun_input_hooks():
    """A pre-hook that changes a linear's input (a rotation, a rescale) runs once per call: when only
    o_proj / down_proj changed, the memo re-runs that linear on the input its forward received."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    got = {}

    class Check(Algorithm):
        def quantize_block(self, ctx):
            if ctx.index:
                return
            hooks = [get_module(ctx.block, n).register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
                     for n in ("self_attn.o_proj", "mlp.down_proj")]
            with ctx.reuse_outputs():
                ctx.forward()
                for n in ("self_attn.o_proj", "mlp.down_proj"):
                    get_module(ctx.block, n).weight.mul_(0.5)
                got["reused"] = ctx.forward()
            got["plain"] = ctx.forward()
            for h in hooks:
                h.remove()

    with torch.no_grad():
        BlockRunner(model, adapter, ids, batch_size=2, progress=False).run([Check()])
    for a, b in zip(got["reused"], got["plain"]):
        assert torch.equal(a, b)


def test_reuse_skips_the_forward_of_unchanged_modules(tiny_llama):
    model = tiny_llama
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    runs = {}

    class Check(Algorithm):
        def quantize_block(self, ctx):
            if ctx.index:
                return
            # count the modules' own forward (what reuse replaces), not __call__
            for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
                m = get_module(ctx.block, n)
                f = type(m).forward
                m.forward = lambda x, _m=m, _f=f, _n=n: (runs.__setitem__(_n, runs.get(_n, 0) + 1), _f(_m, x))[1]
            with ctx.reuse_outputs():
                ctx.forward()
                ctx.forward()
                assert runs == {"self_attn.q_proj": 2, "self_attn.o_proj": 2, "mlp.down_proj": 2}  # 2 chunks
                get_module(ctx.block, "mlp.down_proj").weight.mul_(0.5)
                seen = []
                # an input hook on a reused module still sees every chunk's input
                ctx.run_inputs(["mlp.down_proj"], lambda n, x: seen.append(x))
                ctx.forward()
            assert len(seen) == 2
            assert runs == {"self_attn.q_proj": 2, "self_attn.o_proj": 2, "mlp.down_proj": 4}

    with torch.no_grad():
        BlockRunner(model, adapter, ids, batch_size=2, progress=False).run([Check()])
    assert runs


def test_outputs_left_by_the_last_algorithm_are_propagated(tiny_llama):
    """ctx.outputs replaces the runner's forward only when the last algorithm left it; an earlier
    algorithm's outputs are dropped (a later one may change the block)."""
    model = tiny_llama
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    seen = {}

    class Leave(Algorithm):
        def quantize_block(self, ctx):
            assert ctx.wants_outputs == (ctx.index == 0)
            ctx.outputs = [torch.zeros_like(h) for h, _ in ctx.inputs()]

    class Look(Algorithm):
        def quantize_block(self, ctx):
            seen[ctx.index] = torch.cat([h for h, _ in ctx.inputs()])

    with torch.no_grad():
        BlockRunner(model, get_adapter(model), ids, progress=False).run([Look(), Leave()])
        assert torch.equal(seen[1], torch.zeros_like(seen[1]))
        BlockRunner(model, get_adapter(model), ids, progress=False).run([Leave(), Look()])
        expected = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-5)
