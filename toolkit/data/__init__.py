"""Data: the embedded default corpus and a resumable, deterministic sampler."""

from toolkit.data.corpus import load_corpus
from toolkit.data.sampler import SequenceSampler

__all__ = ["SequenceSampler", "load_corpus"]
