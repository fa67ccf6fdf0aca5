"""Deterministic, resumable samples of seq_length + 1 tokens (inputs and shifted labels).

Sample number k of a run is a pure function of k (and the seed), for every kind of data, so the
position to resume from is one integer: consumed samples. Under data parallelism, DP rank r takes
the r-th contiguous slice of each global batch (`rank_samples`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class Samples:
    """Base of every sample source: subclasses define `sample(k)` and `describe()`."""

    seq_length: int
    # data.eod_mask_loss: the label after this token (the next document's first) is
    # IGNORE_INDEX, so the loss leaves it out (Megatron's --eod-mask-loss)
    loss_mask_eod: int | None = None

    def sample(self, k: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample k (k = 0, 1, ...; epochs repeat the data)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first_sample .. first_sample+size-1 as (inputs, labels), each [size, seq]."""
        import torch  # here: tokenizing workers import this package and need no torch

        rows = [self.sample(k).astype(np.int64) for k in range(first_sample, first_sample + size)]
        block = torch.from_numpy(np.stack(rows))
        inputs, labels = block[:, :-1], block[:, 1:]
        if self.loss_mask_eod is not None:
            from toolkit.loss import IGNORE_INDEX

            labels = labels.masked_fill(inputs == self.loss_mask_eod, IGNORE_INDEX)
        return inputs, labels


def rank_samples(consumed: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    """The samples DP rank `dp_rank` trains on in the global batch starting at `consumed`:
    its contiguous share, disjoint from every other rank's."""
    per_rank = global_batch // dp_size
    first = consumed + dp_rank * per_rank
    return range(first, first + per_rank)


class SequenceSampler(Samples):
    """A token stream in memory (the embedded corpus or a text file), cut into non-overlapping
    windows; each epoch visits them in a permutation drawn from (seed, epoch)."""

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_length = seq_length
        self.seed = seed
        self.num_windows = (len(tokens) - 1) // seq_length
        if self.num_windows < 1:
            raise ValueError(
                f"corpus of {len(tokens)} tokens is shorter than one sequence of {seq_length + 1}"
            )
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _window(self, sample: int) -> int:
        epoch, index = divmod(sample, self.num_windows)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return int(self._order[index])

    def sample(self, k: int) -> np.ndarray:
        start = self._window(k) * self.seq_length
        return self.tokens[start : start + self.seq_length + 1]

    def describe(self) -> str:
        return f"{len(self.tokens)} tokens, {self.num_windows} sequences of {self.seq_length}"
