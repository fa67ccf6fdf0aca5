"""Samples packed from one split of an indexed dataset, as the reference's GPT dataset does:
sequences (documents) are concatenated in a shuffled order and cut into samples of
seq_length + 1 tokens that run across document boundaries (documents end with <eod> when
preprocessed with --append-eod); the samples are then shuffled.

Each epoch has its own document order and sample order, drawn from (seed, epoch), and its own
index files: sample k is a pure function of k whatever the run length, so resuming needs only
the number of consumed samples, and a longer run reuses a shorter run's index files.
"""

import numpy as np

from toolkit.data.index_cache import IndexCache, cache_key
from toolkit.data.indexed import IndexedDataset
from toolkit.data.sampler import Samples

SPLITS = ("train", "valid", "test")


def parse_split(text: str) -> list[float]:
    """'969,30,1' -> normalised train/valid/test shares (missing trailing parts are 0)."""
    try:
        parts = [float(p) for p in text.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"{text!r} is not a list of numbers like '98,1,1'") from None
    if len(parts) > 3 or any(not np.isfinite(p) or p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"{text!r}: need up to 3 non-negative shares with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_ranges(num_sequences: int, shares: list[float]) -> list[range]:
    """Contiguous ranges of sequence ids per split, rounded as the reference rounds them."""
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + int(round(share * num_sequences)))
    excess = bounds[-1] - num_sequences
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class PackedSamples(Samples):
    def __init__(
        self,
        dataset: IndexedDataset,
        sequences: range,
        seq_length: int,
        seed: int,
        cache: IndexCache,
        split: str = "train",
    ) -> None:
        self.dataset, self.sequences, self.seq_length = dataset, sequences, seq_length
        self.seed, self.cache, self.split = seed, cache, split
        self.tokens_per_epoch = int(
            np.asarray(dataset.sizes[sequences.start : sequences.stop], dtype=np.int64).sum()
        )
        # Samples overlap by one token (the last label is the next input), as in the reference.
        self.samples_per_epoch = (self.tokens_per_epoch - 1) // seq_length
        if self.samples_per_epoch < 1:
            raise ValueError(
                f"{dataset.idx_path}: the {split} split (sequences {sequences.start}.."
                f"{sequences.stop}) has {self.tokens_per_epoch} tokens, fewer than one sample of "
                f"{seq_length + 1}"
            )
        self._key = cache_key(
            index=dataset.idx_path.name,
            index_bytes=dataset.idx_path.stat().st_size,
            bin_bytes=dataset.bin_path.stat().st_size,
            sequences=[sequences.start, sequences.stop],
            seq_length=seq_length,
            seed=seed,
        )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def describe(self) -> str:
        return (
            f"{self.dataset.bin_path.with_suffix('')} {self.split}: {len(self.sequences)} "
            f"documents, {self.tokens_per_epoch} tokens, {self.samples_per_epoch} samples of "
            f"{self.seq_length}"
        )

    def epoch_index(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, sample starts as [position in the order, offset], sample shuffle)."""
        if epoch not in self._epochs:
            name = f"{self._key}_{self.split}_epoch{epoch}"
            order = self.cache.get(f"{name}_documents", lambda: self._documents(epoch))
            starts = self.cache.get(f"{name}_samples", lambda: self._starts(order))
            shuffle = self.cache.get(f"{name}_shuffle", lambda: self._shuffle(epoch))
            if len(self._epochs) >= 2:  # a batch spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, starts, shuffle)
        return self._epochs[epoch]

    def _documents(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return self.sequences.start + rng.permutation(len(self.sequences)).astype(np.int64)

    def _starts(self, order: np.ndarray) -> np.ndarray:
        lengths = self.dataset.sizes[order].astype(np.int64)
        ends = np.cumsum(lengths)
        positions = np.arange(self.samples_per_epoch, dtype=np.int64) * self.seq_length
        # The document holding each sample's first token, and where in it the sample starts.
        doc = np.searchsorted(ends, positions, side="right")
        return np.stack([doc, positions - (ends[doc] - lengths[doc])], axis=1)

    def _shuffle(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 1])
        return rng.permutation(self.samples_per_epoch).astype(np.int64)

    def sample(self, k: int) -> np.ndarray:
        epoch, j = divmod(k, self.samples_per_epoch)
        order, starts, shuffle = self.epoch_index(epoch)
        position, offset = (int(v) for v in starts[shuffle[j]])
        out = np.empty(self.seq_length + 1, dtype=self.dataset.dtype)
        filled = 0
        while filled < len(out):
            seq = int(order[position])
            take = min(int(self.dataset.sizes[seq]) - offset, len(out) - filled)
            out[filled : filled + take] = self.dataset.get(seq, offset, take)
            filled, position, offset = filled + take, position + 1, 0
        return out
