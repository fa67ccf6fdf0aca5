"""Cross-entropy over a large vocabulary without fp32 copies of the whole logits tensor.

F.cross_entropy(logits.float()) keeps an fp32 copy of the logits, its softmax for the backward,
and an fp32 gradient: for a 256k vocabulary and 8k tokens per micro-batch that is 8 GB each.
Here the loss and its gradient are computed a block of rows at a time in fp32, and only the
gradient, in the logits' own dtype, is kept for the backward pass. Same numbers: each row's
log-sum-exp and softmax are computed in fp32 exactly as before.
"""

import torch

ROWS_PER_BLOCK = 4096


class _BlockwiseCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        flat, targets = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
        rows = flat.size(0)
        grad = torch.zeros_like(flat)  # padding columns (>= vocab_size) get no gradient
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        for start in range(0, rows, ROWS_PER_BLOCK):
            block = flat[start : start + ROWS_PER_BLOCK, :vocab_size].to(torch.float32, copy=True)
            target = targets[start : start + ROWS_PER_BLOCK]
            lse = torch.logsumexp(block, dim=-1)
            picked = block.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total += (lse - picked).sum(dtype=torch.float64)
            softmax = block.sub_(lse.unsqueeze(-1)).exp_()  # in place: one fp32 block at a time
            softmax.scatter_add_(-1, target.unsqueeze(-1), softmax.new_full((len(target), 1), -1.0))
            grad[start : start + ROWS_PER_BLOCK, :vocab_size] = softmax.div_(rows)
        ctx.save_for_backward(grad)
        ctx.shape = logits.shape
        return (total / rows).float()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).reshape(ctx.shape), None, None


def blockwise_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `logits` [..., V] against `labels` [...], over the first
    `vocab_size` columns (the rest is vocabulary padding and takes no probability)."""
    return _BlockwiseCrossEntropy.apply(logits, labels, vocab_size or logits.size(-1))
