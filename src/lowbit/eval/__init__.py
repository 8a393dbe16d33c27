"""Evaluation: perplexity, KL and top-1 agreement against the original model, size, speed and memory."""

from lowbit.eval.perplexity import ReferenceLogits, evaluate, load_windows
from lowbit.eval.size import bits_per_weight, model_bytes
from lowbit.eval.speed import measure_throughput

__all__ = ["ReferenceLogits", "bits_per_weight", "evaluate", "load_windows", "measure_throughput", "model_bytes"]
