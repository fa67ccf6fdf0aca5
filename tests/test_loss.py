"""The blockwise cross-entropy against torch's own, in fp32 and bf16, across several blocks."""

import pytest
import torch
import torch.nn.functional as F

from toolkit import loss
from toolkit.loss import blockwise_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(loss, "ROWS_PER_BLOCK", 7)  # 3 x 10 rows: blocks of 7, 7, 7, 7 and 2
    g = torch.Generator().manual_seed(0)
    vocab, padded = 50, 64
    logits = (torch.randn(3, 10, padded, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (3, 10), generator=g)

    mine = logits.clone().requires_grad_()
    got = blockwise_cross_entropy(mine, labels, vocab)
    (got * 0.5).backward()  # a scaled loss, as gradient accumulation makes it

    ref = logits.clone().requires_grad_()
    want = F.cross_entropy(ref[..., :vocab].float().flatten(0, 1), labels.flatten())
    (want * 0.5).backward()

    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert mine.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(mine.grad, ref.grad, **tol)
    assert not mine.grad[..., vocab:].any()  # padding columns: no gradient
    assert torch.equal(mine.detach(), logits)  # the logits themselves are left alone


def test_trainer_loss_uses_it(monkeypatch):
    """The TP=1 trainer loss is the blockwise one (not an fp32 copy of the logits)."""
    from toolkit.parallel import runtime

    calls = []
    real = loss.blockwise_cross_entropy
    monkeypatch.setattr(runtime, "blockwise_cross_entropy", lambda *a: calls.append(a) or real(*a))
    logits, labels = torch.randn(2, 3, 8), torch.randint(0, 5, (2, 3))
    value = runtime.cross_entropy(logits, labels, vocab_size=5)
    assert calls and value.item() == pytest.approx(
        F.cross_entropy(logits[..., :5].flatten(0, 1), labels.flatten()).item(), rel=1e-6
    )
