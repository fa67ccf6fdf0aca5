"""Cross-entropy over a large vocabulary without fp32 copies of the whole logits tensor.

F.cross_entropy(logits.float()) keeps an fp32 copy of the logits, its softmax for the backward,
and an fp32 gradient: for a 256k vocabulary and 8k tokens per micro-batch that is 8 GB each.
Here the forward pass computes each row's log-sum-exp in fp32, a block of rows at a time, and
keeps only that (4 bytes a row) besides the logits. The backward pass writes the gradient,
(softmax - one_hot) * upstream gradient / rows, straight into one buffer in the logits' dtype,
a block at a time: one read of the logits and one write of the gradient, with the upstream scale
applied in fp32 before rounding (no extra pass over the 256k-wide gradient to scale it).

torch.logsumexp compiled for GPUs reads each 256k-wide row twice, once for its maximum and once
for the sum of exponentials. Here, compiled, it is combined from chunks of TOOLKIT_LSE_CHUNK
columns (default 1024; 0: torch.logsumexp), each chunk's maximum and sum taken from one read of
it (`_chunked_lse`): 1.54 against 2.82 ms for 8k rows of 256k on an H100
(benchmarks/cross_entropy.py, 2026-12-06), the same sums within fp32 rounding.
"""

import functools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

ROWS_PER_BLOCK = 4096  # eager blocks: a 4096 x 256k fp32 copy is 4 GB
LSE_CHUNK = int(os.environ.get("TOOLKIT_LSE_CHUNK", "1024"))  # 0: torch.logsumexp (docstring)
IGNORE_INDEX = -100  # a label that takes no part in the loss (data.eod_mask_loss), as torch's
log = logging.getLogger(__name__)


def counted_labels(labels: Tensor) -> Tensor:
    """Where labels take part in the loss: all but IGNORE_INDEX (any negative label). The one
    rule for the loss, its per-token weighting (train.per_token_loss) and validation."""
    return labels >= 0


def _target_columns(target: Tensor, columns: int) -> tuple[Tensor, Tensor]:
    """(whether each row's target is among these `columns`, its column as a [r, 1] index, clamped
    into range where it is not: another tensor-parallel rank's column)."""
    here = (target >= 0) & (target < columns)
    return here, target.clamp(0, columns - 1).unsqueeze(-1)


def _block_lse(block: Tensor, target: Tensor, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Rows of logits [r, V] (any float dtype) -> (log-sum-exp, the target's logit), both fp32
    [r]; a target outside [0, V) (another tensor-parallel rank's column) has logit 0 here. The
    log-sum-exp torch.logsumexp's, or with `chunk` _chunked_lse's (the same sums, grouped
    otherwise: within fp32 rounding)."""
    x = block.float()
    here, index = _target_columns(target, x.size(-1))
    picked = x.gather(-1, index).squeeze(-1)
    lse = _chunked_lse(x, chunk) if chunk else torch.logsumexp(x, dim=-1)
    return lse, torch.where(here, picked, 0.0)


def _chunked_lse(x: Tensor, chunk: int) -> Tensor:
    """Each row's log-sum-exp of fp32 `x` [r, V] combined from chunks of `chunk` columns (the
    last one shorter where the width is not a multiple): each chunk's maximum m and sum s of
    exp(x - m), then M + log(sum(s * exp(m - M))) with M the row's maximum. Compiled, a chunk of
    up to ~1k columns is one persistent reduction that loads it once for both its m and its s."""
    whole = x.size(-1) // chunk * chunk
    parts = [x[:, :whole].unflatten(-1, (whole // chunk, chunk))] if whole else []
    if whole < x.size(-1):
        parts.append(x[:, whole:].unsqueeze(1))  # the last, shorter chunk
    maxes, sums = [], []
    for part in parts:
        m = part.amax(-1)
        # Shifted by 0 where the maximum is infinite: a chunk of -inf sums to 0, one with +inf
        # to +inf, as they should (x - m would be NaN).
        m_shift = torch.where(m.isfinite(), m, 0.0)
        maxes.append(m)
        sums.append(torch.exp(part - m_shift.unsqueeze(-1)).sum(-1))
    m, s = torch.cat(maxes, -1), torch.cat(sums, -1)  # [r, chunks]
    top = m.amax(-1, keepdim=True)
    top = torch.where(top.isfinite(), top, 0.0)
    return top.squeeze(-1) + torch.log((s * torch.exp(m - top)).sum(-1))


def _block_grad_into(out: Tensor, block: Tensor, target: Tensor, lse: Tensor, scale: Tensor):
    """out[r, V] = (softmax(block) - one_hot(target)) * scale, every step in fp32, in place on
    one fp32 copy of the block (no one-hot in a row whose target is outside [0, V))."""
    x = block.to(torch.float32, copy=True)
    softmax = x.sub_(lse.unsqueeze(-1)).exp_()
    here, index = _target_columns(target, x.size(-1))
    softmax.scatter_add_(-1, index, -here.to(softmax.dtype).unsqueeze(-1))
    out.copy_(softmax.mul_(scale))


def _fusable_block_grad_into(out: Tensor, block: Tensor, target: Tensor, lse: Tensor, scale):
    """The same, written out of place for torch.compile, which fuses it into one kernel that
    reads the logits and stores the gradient into `out` without any fp32 copy of the block."""
    x = block.float()
    one_hot = torch.arange(x.size(-1), device=x.device) == target.unsqueeze(-1)
    out.copy_((torch.exp(x - lse.unsqueeze(-1)) - one_hot.float()) * scale)


class _Kernels(NamedTuple):
    lse: Callable[..., tuple[Tensor, Tensor]]
    grad_into: Callable[..., None]
    compiled: bool


EAGER = _Kernels(_block_lse, _block_grad_into, compiled=False)
_compiled: _Kernels | None = None


def _kernels(device: torch.device) -> _Kernels:
    """On CUDA, both block functions through torch.compile (a few Triton kernels instead of ~10
    passes of eager fp32 elementwise work over 2 billion logits per micro-batch). Eager
    elsewhere, or with TOOLKIT_COMPILE_LOSS=0, or once compiling has failed (logged once)."""
    global _compiled
    if device.type != "cuda" or os.environ.get("TOOLKIT_COMPILE_LOSS", "1") == "0":
        return EAGER
    if _compiled is None:
        compile_ = torch.compile(dynamic=False, fullgraph=True)
        lse = functools.partial(_block_lse, chunk=LSE_CHUNK) if LSE_CHUNK else _block_lse
        _compiled = _Kernels(compile_(lse), compile_(_fusable_block_grad_into), True)
    return _compiled


def _with_fallback(device: torch.device, work: Callable[[_Kernels], object]):
    """Run `work` with this device's kernels; a compiler problem must not stop training, so a
    failing compiled kernel is replaced by the eager one for good."""
    global _compiled
    kernels = _kernels(device)
    try:
        return work(kernels)
    except Exception as e:
        if not kernels.compiled:
            raise
        log.warning("compiled cross-entropy failed (%s); using the eager one", e)
        _compiled = EAGER
        return work(EAGER)


def _row_blocks(flat: Tensor, kernels: _Kernels) -> list[slice]:
    """Compiled: blocks as large as 32-bit indices allow (8,388 rows of a 256k vocabulary)."""
    rows = flat.size(0)
    size = ROWS_PER_BLOCK
    if kernels.compiled:
        size = min(rows, max(1, (2**31 - 1) // flat.size(1)))
    return [slice(start, start + size) for start in range(0, rows, size)]


def _row_lse(flat: Tensor, targets: Tensor, columns: int) -> tuple[Tensor, Tensor]:
    """Each row's log-sum-exp over the first `columns` of `flat` [rows, V] and its target's
    logit (0 where the target is not among them), fp32, a block of rows at a time."""
    lse = torch.empty(flat.size(0), dtype=torch.float32, device=flat.device)
    picked = torch.zeros_like(lse)
    if columns == 0:  # a tensor-parallel shard of padding only
        return lse.fill_(-torch.inf), picked

    def fill(kernels: _Kernels) -> None:
        for rows in _row_blocks(flat, kernels):
            lse[rows], picked[rows] = kernels.lse(flat[rows, :columns], targets[rows])

    _with_fallback(flat.device, fill)
    return lse, picked


def _softmax_grad(
    flat: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, columns: int
) -> Tensor:
    """d(loss)/d(flat) in flat's dtype: (exp(flat - lse) - one_hot(targets)) * scale over the
    first `columns`, zero beyond (padding), written straight into one buffer."""
    grad = torch.empty_like(flat)
    grad[:, columns:] = 0
    if columns == 0:
        return grad

    def fill(kernels: _Kernels) -> None:
        for rows in _row_blocks(flat, kernels):
            kernels.grad_into(
                grad[rows, :columns], flat[rows, :columns], targets[rows], lse[rows], scale[rows]
            )

    _with_fallback(flat.device, fill)
    return grad


class _CrossEntropy(torch.autograd.Function):
    """The mean loss over the rows not labelled IGNORE_INDEX, and its gradient. With `group`
    (tensor parallelism), `logits` are this rank's columns from `vocab_start`: each rank
    computes its rows' log-sum-exp over its own columns, and the ranks combine those and the
    target logits (a few bytes per row)."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start: int, vocab_size: int, group) -> Tensor:
        flat = logits.reshape(-1, logits.size(-1))
        counted = counted_labels(labels.reshape(-1))  # IGNORE_INDEX rows take no part
        targets = labels.reshape(-1) - vocab_start  # outside [0, columns): another rank's
        columns = max(0, min(flat.size(1), vocab_size - vocab_start))  # the rest is padding
        lse, picked = _row_lse(flat, targets, columns)
        if group is not None:
            shards = [torch.empty_like(lse) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, lse, group=group)
            lse = torch.logsumexp(torch.stack(shards), dim=0)
            dist.all_reduce(picked, group=group)  # each target's logit lives on one rank
        count = counted.sum().clamp_(min=1)  # a tensor: no host sync
        ctx.save_for_backward(flat, targets, lse, counted, count)
        ctx.columns, ctx.shape = columns, logits.shape
        losses = torch.where(counted, lse - picked, 0.0)
        return (losses.sum(dtype=torch.float64) / count).float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        flat, targets, lse, counted, count = ctx.saved_tensors
        scale = (grad_loss.float() / count * counted).unsqueeze(-1)  # [rows, 1]: 0 if ignored
        grad = _softmax_grad(flat, targets, lse, scale, ctx.columns)
        return grad.view(ctx.shape), None, None, None, None


def blockwise_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int | None = None,
    *,
    vocab_start: int = 0,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Mean cross-entropy of `logits` [..., V] against `labels` [...], over the first
    `vocab_size` columns (the rest is vocabulary padding and takes no probability); rows
    labelled IGNORE_INDEX count in neither the sum nor the mean (0 if every row is). With
    `group`, `logits` are this tensor-parallel rank's vocabulary columns from `vocab_start`,
    and `vocab_size` counts the whole vocabulary."""
    if vocab_size is None:
        vocab_size = vocab_start + logits.size(-1) * (dist.get_world_size(group) if group else 1)
    return _CrossEntropy.apply(logits, labels, vocab_start, vocab_size, group)
