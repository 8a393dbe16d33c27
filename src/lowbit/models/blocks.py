"""Adapters applied to a model: its blocks, their linears, their foldable pairs, device moves."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .adapter import CONDITIONS, ModelAdapter, ResolvedPair, text_config
from ..errors import UnsupportedArchitectureError
from .modules import (find_module, fold_scales, get_module, is_linear, linear_shape, linear_weight, norm_offset,
                      set_linear_weight)

log = logging.getLogger(__name__)


def get_blocks(model: nn.Module, adapter: ModelAdapter) -> nn.ModuleList:
    return get_module(model, adapter.blocks)


def block_linears(block: nn.Module, adapter: ModelAdapter) -> dict[str, nn.Module]:
    """{block-relative name: module} in sequential order.

    Returns whatever sits at each path, so a linear already swapped for a packed module shows up
    as that module.
    """
    return {name: get_module(block, name) for name in adapter.linears}


def _root_paths(adapter: ModelAdapter) -> list[str]:
    paths = [adapter.blocks, *adapter.embeddings, *adapter.post_blocks, adapter.head]
    if adapter.final_norm is not None:
        paths.append(adapter.final_norm)
    return paths


def missing_paths(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    """Paths the adapter requires that the model lacks (root paths, then those of block 0)."""
    missing = [p for p in _root_paths(adapter) if p not in adapter.optional and find_module(model, p) is None]
    if adapter.blocks in missing:
        return missing
    blocks = get_blocks(model, adapter)
    if len(blocks):
        block_paths = set(adapter.linears)
        for pair in adapter.scaling_pairs:
            block_paths.update((pair.prev, pair.inspect, *pair.linears))
        missing += [f"{adapter.blocks}.0.{p}" for p in sorted(block_paths) if find_module(blocks[0], p) is None]
    return missing


def _out_width(module: nn.Module, kind: str) -> int | None:
    if kind == "linear":
        return linear_shape(module)[0] if is_linear(module) else None
    weight = getattr(module, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def resolve_scaling_pairs(block: nn.Module, adapter: ModelAdapter, config) -> list[ResolvedPair]:
    """The adapter's scaling pairs that are exact for this block and config, with their modules.

    A pair is dropped when its condition fails for the config (v -> o under grouped-query
    attention, norm folds in post-norm OPT) or when the widths disagree (prev's output channels
    vs. each linear's inputs), which also covers layouts the condition did not foresee.
    Pairs of kind "act" are kept; fold_scales refuses them until ScaledActivation exists.
    Raises UnsupportedArchitectureError when a norm's detected flavour contradicts the adapter's
    norm_offset.
    """
    resolved = []
    for pair in adapter.scaling_pairs:
        if pair.when is not None and not CONDITIONS[pair.when](config):
            log.debug("dropping %s -> %s: condition %r fails", pair.prev, pair.linears, pair.when)
            continue
        prev = get_module(block, pair.prev)
        linears = tuple(get_module(block, name) for name in pair.linears)
        if pair.kind != "act":
            width = _out_width(prev, pair.kind)
            if width is None or any(linear_shape(m)[1] != width for m in linears):
                log.debug("dropping %s -> %s: widths do not match", pair.prev, pair.linears)
                continue
        if pair.kind == "norm" and norm_offset(prev) != adapter.norm_offset:
            # the table and the module disagree on how the norm applies its weight: a fold done
            # under the wrong belief would silently change the model
            raise UnsupportedArchitectureError(
                f"{pair.prev} is a {type(prev).__name__} with weight offset {norm_offset(prev)}, but the "
                f"{adapter.model_type} adapter expects {adapter.norm_offset}"
            )
        resolved.append(ResolvedPair(pair, prev, linears, get_module(block, pair.inspect)))
    return resolved


def _move(model: nn.Module, paths, optional, device) -> None:
    for path in paths:
        mod = find_module(model, path)
        if mod is None:
            if path in optional:
                continue
            raise AttributeError(f"{type(model).__name__} has no module at {path!r}")
        mod.to(device)


def move_embeddings(model: nn.Module, adapter: ModelAdapter, device) -> None:
    """Moves what runs before block 0 (token/position embeddings, rotary tables) to `device`."""
    _move(model, adapter.embeddings, adapter.optional, device)


def move_head(model: nn.Module, adapter: ModelAdapter, device) -> None:
    """Moves what runs after the last block (final norm, OPT's project_out, the head) to `device`.

    A head tied to the token embedding shares its weight, so this moves the embedding's weight too.
    """
    paths = ([adapter.final_norm] if adapter.final_norm else []) + [*adapter.post_blocks, adapter.head]
    _move(model, paths, adapter.optional, device)


# Grouped-query attention: v -> o with one scale per value channel, shared by the query heads that read it


def tie_scales(s: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Per-channel scales `[..., heads * head_dim]` of o_proj's input made equal across the n_rep
    query heads that read one value head (their geometric mean), so that v_proj's rows can carry
    the inverse: `[..., kv_heads * head_dim]`, value-channel order. `expand_tied` maps it back."""
    lead = s.shape[:-1]
    return s.log().reshape(*lead, -1, n_rep, head_dim).mean(-2).exp().reshape(*lead, -1)


def expand_tied(s_v: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Value-channel scales `[..., kv_heads * head_dim]` repeated onto o_proj's input channels the way
    grouped-query attention repeats value heads (query head h reads value head h // n_rep)."""
    lead = s_v.shape[:-1]
    v = s_v.reshape(*lead, -1, 1, head_dim)
    return v.expand(*lead, v.shape[-3], n_rep, head_dim).reshape(*lead, -1)


def gqa_value_pairs(block: nn.Module, adapter: ModelAdapter, config) -> list[tuple[int, ResolvedPair, int, int]]:
    """The adapter's v -> o pairs dropped for grouped-query attention (condition "mha"), as
    (index among the adapter's pairs, the resolved pair, n_rep, head_dim): a scale shared by the
    n_rep query heads of each value head folds exactly into v_proj's rows (`tie_scales`)."""
    c = text_config(config) if config is not None else None
    heads = getattr(c, "num_attention_heads", None)
    kv = getattr(c, "num_key_value_heads", None)
    if not heads or not kv or kv == heads or heads % kv:
        return []
    out = []
    for i, pair in enumerate(adapter.scaling_pairs):
        if pair.when != "mha" or pair.kind != "linear" or len(pair.linears) != 1:
            continue
        prev, lin = get_module(block, pair.prev), get_module(block, pair.linears[0])
        v_out, o_in = linear_shape(prev)[0], linear_shape(lin)[1]
        n_rep = heads // kv
        if v_out * n_rep != o_in or v_out % kv:
            continue
        out.append((i, ResolvedPair(pair, prev, (lin,), get_module(block, pair.inspect)), n_rep, v_out // kv))
    return out


def fold_tied_scales(pair: ResolvedPair, s_v: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Folds value-channel scales `s_v` into a `gqa_value_pairs` pair: v_proj's rows divided by s_v,
    o_proj's input columns multiplied by its expansion, which it returns (the same function, since
    every query head reads its value head's channels divided alike)."""
    s = expand_tied(s_v, n_rep, head_dim)
    fold_scales(pair.prev, (), s_v, pair.kind)
    for m in pair.linears:
        w = linear_weight(m)
        set_linear_weight(m, (w.float() * s.to(w.device)[None, :]).to(w.dtype))
    return s
