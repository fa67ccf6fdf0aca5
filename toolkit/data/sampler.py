"""Deterministic, resumable sampling of fixed-length training sequences from a token stream.

The stream is cut into non-overlapping windows of seq_length + 1 tokens (inputs and shifted
labels); each epoch visits them in a permutation drawn from (seed, epoch). Sample number k of the
run is a pure function of k, so the position to resume from is one integer: consumed samples.
"""

import numpy as np
import torch


class SequenceSampler:
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

    def batch(self, first_sample: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first_sample .. first_sample+size-1 as (inputs, labels), each [size, seq]."""
        rows = []
        for k in range(first_sample, first_sample + size):
            start = self._window(k) * self.seq_length
            rows.append(self.tokens[start : start + self.seq_length + 1].astype(np.int64))
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1], block[:, 1:]
