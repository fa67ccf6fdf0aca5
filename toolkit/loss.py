"""Cross-entropy over a large vocabulary without fp32 copies of the whole logits tensor.

F.cross_entropy(logits.float()) keeps an fp32 copy of the logits, its softmax for the backward,
and an fp32 gradient: for a 256k vocabulary and 8k tokens per micro-batch that is 8 GB each.
Here the loss and its gradient are computed a block of rows at a time in fp32, and only the
gradient, in the logits' own dtype, is kept for the backward pass. Same numbers: each row's
log-sum-exp and softmax are computed in fp32 exactly as before.
"""

import logging
import os

import torch

ROWS_PER_BLOCK = 4096
log = logging.getLogger(__name__)


def _block_loss_and_grad(
    block: torch.Tensor, target: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits [r, V] (any float dtype) -> (per-row loss in fp32, d(loss)/d(block) * scale
    in the block's dtype), every step in fp32, in place: one fp32 copy of the block at a time."""
    x = block.to(torch.float32, copy=True)
    lse = torch.logsumexp(x, dim=-1)
    losses = lse - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    softmax = x.sub_(lse.unsqueeze(-1)).exp_()
    softmax.scatter_add_(-1, target.unsqueeze(-1), softmax.new_full((len(target), 1), -1.0))
    return losses, softmax.mul_(scale).to(block.dtype)


def _fusable_block_loss_and_grad(
    block: torch.Tensor, target: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, written out of place for torch.compile, which fuses it into a couple of kernels
    that read the logits and write the gradient without any fp32 copy of the block."""
    x = block.float()
    lse = torch.logsumexp(x, dim=-1)
    losses = lse - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    one_hot = torch.arange(x.size(-1), device=x.device) == target.unsqueeze(-1)
    grad = (torch.exp(x - lse.unsqueeze(-1)) - one_hot.float()) * scale
    return losses, grad.to(block.dtype)


_compiled_block = None


def _block_function(device: torch.device):
    """On CUDA, the block function through torch.compile (Triton kernels instead of ~10 passes
    of eager fp32 elementwise work over 2 billion logits per micro-batch). Eager elsewhere, or
    with TOOLKIT_COMPILE_LOSS=0, or if compiling fails (logged once)."""
    global _compiled_block
    if device.type != "cuda" or os.environ.get("TOOLKIT_COMPILE_LOSS", "1") == "0":
        return _block_loss_and_grad
    if _compiled_block is None:
        _compiled_block = torch.compile(_fusable_block_loss_and_grad, dynamic=False, fullgraph=True)
    return _compiled_block


def _loss_and_grad(
    flat: torch.Tensor, targets: torch.Tensor, vocab_size: int, block_fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over the rows of `flat` [rows, V] and its gradient, `block_fn` a block at a time.
    Compiled, nothing is materialised in fp32: blocks as large as 32-bit indices allow (8,388
    rows of a 256k vocabulary); a single block's gradient, without vocabulary padding, is the
    whole gradient (no copy, no zero-fill)."""
    rows = flat.size(0)
    block_rows = ROWS_PER_BLOCK
    if block_fn is not _block_loss_and_grad:  # compiled: as many rows as 32-bit indexing allows
        block_rows = min(rows, max(1, (2**31 - 1) // flat.size(1)))
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    grad = None
    for start in range(0, rows, block_rows):
        block = flat[start : start + block_rows, :vocab_size]
        losses, block_grad = block_fn(block, targets[start : start + block_rows], 1.0 / rows)
        total += losses.sum(dtype=torch.float64)
        if block_rows == rows and vocab_size == flat.size(1):
            return (total / rows).float(), block_grad
        if grad is None:
            grad = torch.empty_like(flat)
            grad[:, vocab_size:] = 0  # padding columns get no gradient
        grad[start : start + block_rows, :vocab_size] = block_grad
    return (total / rows).float(), grad


class _BlockwiseCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        global _compiled_block
        flat, targets = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
        block_fn = _block_function(flat.device)
        try:
            loss, grad = _loss_and_grad(flat, targets, vocab_size, block_fn)
        except Exception as e:  # a compiler problem must not stop training: eager instead
            if block_fn is _block_loss_and_grad:
                raise
            log.warning("compiled cross-entropy failed (%s); using the eager one", e)
            _compiled_block = _block_loss_and_grad
            loss, grad = _loss_and_grad(flat, targets, vocab_size, _block_loss_and_grad)
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # Scaled in place: no second 4 GB buffer. A second backward (retain_graph) is refused
        # by autograd's version check on the saved tensor.
        return grad.mul_(grad_loss.to(grad.dtype)).reshape(ctx.shape), None, None


def blockwise_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `logits` [..., V] against `labels` [...], over the first
    `vocab_size` columns (the rest is vocabulary padding and takes no probability)."""
    return _BlockwiseCrossEntropy.apply(logits, labels, vocab_size or logits.size(-1))
