"""Activation statistics recorded through the block runner match the inputs the linears really see."""

import torch

from lowbit.algorithms import Algorithm
from lowbit.calib import BlockRunner
from lowbit.calib.stats import ActStats, collect_activation_stats
from lowbit.models import get_adapter

from ..conftest import tiny_model


def test_stats_match_hooked_inputs():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    got, raw = {}, {}

    class Collect(Algorithm):
        def quantize_block(self, ctx):
            names = list(ctx.linears)
            got[ctx.index] = collect_activation_stats(ctx, names)
            raw[ctx.index] = ctx.collect_inputs(names)

    with torch.no_grad():
        BlockRunner(model, adapter, ids, batch_size=2, progress=False).run([Collect()])
    for i in (0, 1):
        stats, xs = got[i], raw[i]
        assert set(stats) == set(adapter.linears)
        assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]  # one tensor, one record
        for name, x in xs.items():
            st = stats[name]
            assert torch.equal(st.channel_absmax, x.abs().amax(0))
            assert st.min == float(x.min()) and st.max == float(x.max())
            assert st.n_tokens == 60 and torch.equal(st.tokens(), x.abs().amax(1))
            assert st.absmax == float(x.abs().max())


def test_scaled_stats_are_those_of_the_scaled_input():
    x = torch.randn(50, 8) * torch.arange(1, 9)
    st = ActStats.empty(8)
    st.add(x)
    s = torch.rand(8) + 0.5
    assert torch.allclose(st.scaled(s).channel_absmax, (x / s).abs().amax(0))
