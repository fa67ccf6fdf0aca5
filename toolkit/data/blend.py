"""A weighted blend of sample sources: in every block of BLOCK samples, source d contributes
exactly its share (largest-remainder rounding of weight x BLOCK), spread evenly over the block.

Sample k is a pure function of k, like every source's, so a blend resumes exactly too. The block
layout is cached with the other index files.
"""

import numpy as np

from toolkit.data.index_cache import IndexCache, cache_key
from toolkit.data.sampler import Samples

BLOCK = 10_000


def apportion(weights: list[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainders)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def block_layout(counts: np.ndarray) -> np.ndarray:
    """[2, sum(counts)]: for each position of a block, its source and that source's sample
    number within the block. Source d's samples sit at evenly spaced fractions (j + 0.5) / n_d."""
    sources = np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(counts)])
    within = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    fractions = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
    order = np.argsort(fractions, kind="stable")  # ties: the earlier source first
    return np.stack([sources[order], within[order]])


class BlendedSamples(Samples):
    def __init__(self, parts: list[Samples], weights: list[float], cache: IndexCache) -> None:
        self.parts, self.weights = parts, weights
        self.seq_length = parts[0].seq_length
        self.counts = apportion(weights, BLOCK)
        for d, (w, n) in enumerate(zip(weights, self.counts)):
            if w > 0 and n == 0:
                raise ValueError(
                    f"entry {d} has weight {w}: less than 1/{BLOCK} of the blend, never sampled"
                )
        key = cache_key(counts=self.counts.tolist())
        self.layout = cache.get(f"{key}_blend", lambda: block_layout(self.counts))

    def sample(self, k: int) -> np.ndarray:
        block, i = divmod(k, BLOCK)
        source, within = (int(v) for v in self.layout[:, i])
        return self.parts[source].sample(block * int(self.counts[source]) + within)

    def describe(self) -> str:
        shares = self.counts / BLOCK
        return "blend of " + "; ".join(
            f"{s:.4f} x {p.describe()}" for s, p in zip(shares, self.parts)
        )
