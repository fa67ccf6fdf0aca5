"""Data: the embedded default corpus, indexed (.bin/.idx) datasets, blends, and resumable,
deterministic samplers."""

from toolkit.data.corpus import load_corpus
from toolkit.data.sampler import SequenceSampler

__all__ = ["SequenceSampler", "load_corpus"]
