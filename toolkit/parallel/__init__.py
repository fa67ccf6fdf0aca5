"""Parallelism applied to a plain HybridLM from outside: the model files know nothing of it."""

from toolkit.parallel.sharding import mamba_components, shard_indices
from toolkit.parallel.tp import apply_tp, vocab_parallel_cross_entropy

__all__ = ["apply_tp", "mamba_components", "shard_indices", "vocab_parallel_cross_entropy"]
