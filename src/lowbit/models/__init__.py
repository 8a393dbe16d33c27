"""Architecture adapters as data: where a causal LM keeps its blocks, linears and foldable pairs."""

from .adapter import CONDITIONS, ModelAdapter, ResolvedPair, ScalePair
from .architectures import ADAPTERS, SUPPORTED_MODEL_TYPES, get_adapter
from .blocks import (
    block_linears,
    get_blocks,
    missing_paths,
    move_embeddings,
    move_head,
    resolve_scaling_pairs,
)
from .modules import (
    find_module,
    fold_scales,
    get_module,
    is_linear,
    linear_shape,
    linear_weight,
    norm_offset,
    set_linear_weight,
    set_module,
    untied_state_dict,
)

__all__ = [
    "ADAPTERS", "CONDITIONS", "SUPPORTED_MODEL_TYPES", "ModelAdapter", "ResolvedPair", "ScalePair",
    "block_linears", "find_module", "fold_scales", "get_adapter", "get_blocks", "get_module",
    "is_linear", "linear_shape", "linear_weight", "missing_paths", "move_embeddings", "move_head",
    "norm_offset", "resolve_scaling_pairs", "set_linear_weight", "set_module", "untied_state_dict",
]
