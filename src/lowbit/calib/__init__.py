"""Calibration data and the block-sequential runner."""

from .data import CalibSource, HFDataset, TextFile, Texts, hf_dataset, text_file, texts
from .runner import BlockContext, BlockRunner, Chunk, call_block, sanitize_kwargs
from .stats import ActStats, collect_activation_stats

__all__ = [
    "CalibSource", "HFDataset", "TextFile", "Texts", "hf_dataset", "text_file", "texts",
    "BlockContext", "BlockRunner", "Chunk", "call_block", "sanitize_kwargs",
    "ActStats", "collect_activation_stats",
]
