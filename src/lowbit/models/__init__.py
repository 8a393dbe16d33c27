"""Architecture adapters as data: where a causal LM keeps its blocks, linears and foldable pairs."""

from .adapter import CONDITIONS, ModelAdapter, ResolvedPair, ScalePair
from .architectures import ADAPTERS, SUPPORTED_MODEL_TYPES, expects_bos, get_adapter
from .blocks import (
    block_linears,
    expand_tied,
    fold_tied_scales,
    get_blocks,
    gqa_value_pairs,
    missing_paths,
    move_embeddings,
    move_head,
    resolve_scaling_pairs,
    tie_scales,
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
    "block_linears", "expects_bos", "expand_tied", "find_module", "fold_scales", "fold_tied_scales", "get_adapter", "get_blocks",
    "get_module", "gqa_value_pairs",
    "is_linear", "linear_shape", "linear_weight", "missing_paths", "move_embeddings", "move_head",
    "norm_offset", "resolve_scaling_pairs", "set_linear_weight", "set_module", "tie_scales",
    "untied_state_dict",
]
