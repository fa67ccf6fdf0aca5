"""Decode states: what a layer carries from one token to the next, one row per sequence.

Every kind (KVCache in attention.py, MambaState in mamba2.py) answers the same few questions
(bytes, a view of some rows, copy a row), so the inference code never asks which kind it holds.
`DecodeStates` is the stack's list of them (None for MLP blocks, which carry nothing), as
`HybridLM.allocate_states` returns it.
"""

from collections.abc import Iterable
from typing import Protocol, Self

import torch


class DecodeState(Protocol):
    @property
    def nbytes(self) -> int: ...

    def rows(
        self,
        n: int,
        seen: int = 0,
        valid: torch.Tensor | None = None,
        shared: dict | None = None,
    ) -> Self: ...

    def decode_rows(
        self,
        n: int,
        positions: torch.Tensor,
        span: int | None = None,
        shared: dict | None = None,
    ) -> Self: ...

    def copy_row(self, row: int, source: Self, source_row: int, length: int) -> None: ...

    def copy_rows(
        self, rows: torch.Tensor, source: Self, source_rows: torch.Tensor, length: int
    ) -> None: ...


class DecodeStates(list):
    """The per-layer decode states of a model, in layer order (None for layers without one),
    each of `batch_size` rows."""

    def __init__(self, states: Iterable[DecodeState | None], batch_size: int) -> None:
        super().__init__(states)
        self.batch_size = batch_size

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self if s is not None)

    def rows(self, n: int, seen: int = 0, valid: torch.Tensor | None = None) -> "DecodeStates":
        """The first n rows, having consumed `seen` tokens (views, no copies): a prefill.
        `valid` [n]: the real positions of each row in the piece, the rest padding after them
        that leaves the row's state as it was (None: all real)."""
        shared: dict = {}  # one forward's scratch for all layers (KVCache.shared)
        views = (None if s is None else s.rows(n, seen, valid, shared) for s in self)
        return DecodeStates(views, n)

    def decode_rows(
        self, n: int, positions: torch.Tensor, span: int | None = None
    ) -> "DecodeStates":
        """The first n rows for one token each, row r at positions[r] (the caller's tensor: a
        KV view reads it; with `span`, over that many cache positions at static shapes)."""
        shared: dict = {}  # one forward's scratch for all layers (KVCache.shared)
        views = (None if s is None else s.decode_rows(n, positions, span, shared) for s in self)
        return DecodeStates(views, n)

    def copy_row(self, row: int, source: "DecodeStates", source_row: int, length: int) -> None:
        """Row `row` takes row `source_row` of `source`, a sequence of `length` tokens."""
        for mine, theirs in zip(self, source, strict=True):
            if mine is not None:
                mine.copy_row(row, theirs, source_row, length)

    def copy_rows(
        self, rows: torch.Tensor, source: "DecodeStates", source_rows: torch.Tensor, length: int
    ) -> None:
        """Rows `rows` take rows `source_rows` of `source`, sequences of at most `length`
        tokens (past a row's own length what is copied is garbage that nothing reads): a few
        kernels per layer however many rows, where copy_row for each would take a few per
        row (64 requests admitted at once on the 8B: thousands of launches)."""
        for mine, theirs in zip(self, source, strict=True):
            if mine is not None:
                mine.copy_rows(rows, theirs, source_rows, length)
