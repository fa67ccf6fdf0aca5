"""The input embedding's gradient kept as its touched rows (train.row_sparse_embedding_grad).

At a step's only micro-batch the embedding's backward touches at most one row of the table per
token (8k of 256k rows at the 8B's shapes), yet autograd hands the update a whole-table fp32
gradient: written as zeros and rows, read by the clip's norm, read again by the update, ~12
bytes a parameter over a 1.05B table (~2.9 ms a step on an H200). Here the backward keeps only
(rows, sums), the table's gradient rows summed per distinct token (grad_accumulation's
distinct_token_sums, the same sums), with `slots`, each table row's place among them:
- the clip's norm reads the sums (the untouched rows add nothing to it);
- TritonAdamW reads each row's gradient through `slots` (a row no token touched reads 0, as the
  whole table holds there: for a given clip coefficient the update is the dense one's bit for
  bit; the coefficient itself may differ in its last bits, from the norm's other order);
- a second micro-batch first makes the whole-table gradient from them (densify_), then adds
  into it as train.fused_grad_accumulation does; so does anything that reads `.grad`.

The pair lives on the parameter (held_rows) until the optimizer's zero_grad (clear_): zero the
gradients through TritonAdamW.zero_grad, since nn.Module.zero_grad knows nothing of it and would
leave the rows for the next step to add. `.grad` stays None meanwhile, so an optimizer that
knows nothing of it would skip the parameter: parallelize turns it on only for one that reads
it (TritonAdamW).
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


def held_rows(param: torch.Tensor) -> RowSparseGrad | None:
    """`param`'s row-sparse gradient, if it holds one (and no `.grad`: held_grad merges them)."""
    return getattr(param, ATTRIBUTE, None)


def held_grad(param: torch.Tensor) -> torch.Tensor | None:
    """What holds `param`'s gradient values: a row-sparse gradient's sums (whose squares sum to
    the whole table's, and which a clip may scale in place), else `.grad` (None if neither).
    Where both are held (`.grad` set by other code), the rows are added into `.grad` first."""
    rows = held_rows(param)
    if rows is not None and param.grad is not None:
        densify_(param)
    return rows.sums if param.grad is None and rows is not None else param.grad


def dense(param: torch.Tensor) -> torch.Tensor | None:
    """The whole-table gradient `param` holds: `.grad` plus its rows where it holds rows."""
    rows = held_rows(param)
    if rows is None:
        return param.grad
    table = torch.zeros_like(param) if param.grad is None else param.grad.clone()
    # Rows distinct but for zero sums added to row 0: any order of the adds gives the same.
    table.index_add_(0, rows.rows, rows.sums)
    return table


def densify_(param: torch.Tensor) -> None:
    """Make `param`'s row-sparse gradient `.grad`, the whole table's (added into a `.grad` held
    beside it); a second micro-batch adds into that."""
    if held_rows(param) is not None:
        param.grad = dense(param)
        delattr(param, ATTRIBUTE)


def clear_(params: list[torch.Tensor]) -> None:
    """Drop the row-sparse gradients of `params` (the optimizer's zero_grad)."""
    for p in params:
        if held_rows(p) is not None:
            delattr(p, ATTRIBUTE)
