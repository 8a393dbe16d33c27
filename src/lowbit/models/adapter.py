"""What an architecture adapter is: plain data naming the parts of a causal LM.

Every path is a dotted attribute path. `blocks`, `embeddings`, `final_norm`, `post_blocks` and
`head` are relative to the *ForCausalLM root; everything else is relative to one decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from torch import nn

FoldKind = Literal["norm", "linear", "act"]


@dataclass(frozen=True)
class ScalePair:
    """An op whose output channels can absorb 1/s so that `linears` may take s on their inputs.

    `inspect` is the module whose output AWQ compares before and after scaling: the whole
    attention or MLP when the linears feed a non-linear mix, the linear itself otherwise.
    `when` names a condition on the model config (see CONDITIONS) that must hold for the fold
    to be exact; None means always.
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str
    kind: FoldKind
    when: str | None = None


@dataclass(frozen=True)
class ModelAdapter:
    model_type: str
    blocks: str  # the nn.ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules with state that run before block 0
    final_norm: str | None
    head: str
    # GPTQ's true-sequential order; the union is every linear of a block that gets quantized.
    sequential: tuple[tuple[str, ...], ...]
    shared_input: tuple[tuple[str, ...], ...]  # linears that read the same tensor
    scaling_pairs: tuple[ScalePair, ...]
    # Gemma's RMSNorm multiplies by (offset + weight); folding must rescale that sum.
    norm_offset: float = 0.0
    post_blocks: tuple[str, ...] = ()  # modules between the last block and the head besides final_norm
    optional: frozenset[str] = field(default_factory=frozenset)  # paths some configs leave as None

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for step in self.sequential for name in step)


@dataclass(frozen=True)
class ResolvedPair:
    """A ScalePair with its modules looked up in one block."""

    pair: ScalePair
    prev: nn.Module
    linears: tuple[nn.Module, ...]
    inspect: nn.Module

    @property
    def kind(self) -> FoldKind:
        return self.pair.kind

    @property
    def prev_name(self) -> str:
        return self.pair.prev

    @property
    def linear_names(self) -> tuple[str, ...]:
        return self.pair.linears

    @property
    def inspect_name(self) -> str:
        return self.pair.inspect


def text_config(config):
    """The language-model part of a config (multimodal configs nest it in text_config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _every_query_head_has_its_value_head(config) -> bool:
    # Under grouped-query attention v_proj is narrower than o_proj's input: one value channel
    # feeds several o_proj columns, so a per-column scale on o_proj has no exact inverse on v.
    c = text_config(config)
    kv = getattr(c, "num_key_value_heads", None)
    return kv is None or kv == c.num_attention_heads


def _norm_feeds_linears(config) -> bool:
    # OPT-350m puts its norms after the residual add; their output is then the residual itself,
    # not only the linears' input, so a scale folded into them would leak past the linears.
    return bool(getattr(text_config(config), "do_layer_norm_before", True))


CONDITIONS: dict[str, Callable[[object], bool]] = {
    "mha": _every_query_head_has_its_value_head,
    "pre_norm": _norm_feeds_linears,
}
