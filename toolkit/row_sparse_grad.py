"""The input embedding's gradient kept as its touched rows (train.row_sparse_embedding_grad).

At a step's only micro-batch the embedding's backward touches at most one row of the table per
token (8k of 256k rows at the 8B's shapes), yet autograd hands the update a whole-table fp32
gradient: written as zeros and rows, read by the clip's norm, read again by the update, ~12
bytes a parameter over a 1.05B table (~2.9 ms a step on an H200). Here the backward keeps only
(rows, sums), the table's gradient rows summed per distinct token (grad_accumulation's
distinct_token_sums, the same sums), with `slots`, each table row's place among them:
- the clip's norm reads the sums (the untouched rows add nothing to it);
- TritonAdamW reads each row's gradient through `slots` (a row no token touched reads 0, as the
  whole table holds there, so the update is the dense one's bit for bit);
- a second micro-batch first makes the whole-table gradient from them (densify_), then adds
  into it as train.fused_grad_accumulation does; so does anything that reads `.grad`.

The pair lives on the parameter (held_grad reads it) until the optimizer's zero_grad (clear_);
`.grad` stays None meanwhile, so an optimizer that knows nothing of it would skip the
parameter: parallelize turns it on only for one that reads it (TritonAdamW).
"""

from typing import NamedTuple

import torch

ATTRIBUTE = "_row_sparse_grad"


class RowSparseGrad(NamedTuple):
    """A table's gradient as rows: table row `rows[i]` holds `sums[i]` (the same row may repeat
    past the distinct tokens with zero sums), every other row 0. `slots` [table rows] int32:
    each row's index in `sums` (the first, where a row repeats), -1 where none."""

    rows: torch.Tensor
    sums: torch.Tensor
    slots: torch.Tensor


def keep(param: torch.Tensor, rows: torch.Tensor, sums: torch.Tensor) -> None:
    """Hold (rows, sums) as `param`'s gradient; its slots built here (no host sync)."""
    n = rows.numel()
    slots = torch.full((param.size(0),), n, dtype=torch.int32, device=rows.device)
    order = torch.arange(n, dtype=torch.int32, device=rows.device)
    # The smallest index of each row: a real row before the zero sums that repeat row 0.
    slots.scatter_reduce_(0, rows, order, "amin")
    slots = torch.where(slots == n, -1, slots)
    setattr(param, ATTRIBUTE, RowSparseGrad(rows, sums.to(param.dtype), slots))


def row_sparse_grad(param: torch.Tensor) -> RowSparseGrad | None:
    return getattr(param, ATTRIBUTE, None)


def held_grad(param: torch.Tensor) -> torch.Tensor | None:
    """What holds `param`'s gradient values: `.grad`, else a row-sparse gradient's sums (whose
    squares sum to the whole table's, and which a clip may scale in place), else None."""
    if param.grad is not None:
        return param.grad
    sparse = row_sparse_grad(param)
    return None if sparse is None else sparse.sums


def dense(param: torch.Tensor) -> torch.Tensor:
    """The whole-table gradient a row-sparse one stands for (`.grad` if there is one)."""
    sparse = row_sparse_grad(param)
    if sparse is None:
        return param.grad
    table = torch.zeros_like(param)
    # Rows distinct but for zero sums added to row 0: any order of the adds gives the same.
    table.index_add_(0, sparse.rows, sparse.sums)
    return table


def densify_(param: torch.Tensor) -> None:
    """Make a row-sparse gradient `param.grad`, the whole table's (a second micro-batch adds into
    it)."""
    if row_sparse_grad(param) is not None:
        param.grad = dense(param)
        delattr(param, ATTRIBUTE)


def clear_(params: list[torch.Tensor]) -> None:
    """Drop the row-sparse gradients of `params` (the optimizer's zero_grad)."""
    for p in params:
        if row_sparse_grad(p) is not None:
            delattr(p, ATTRIBUTE)
