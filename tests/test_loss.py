"""The blockwise cross-entropy against torch's own, in fp32 and bf16, across several blocks."""

import pytest
import torch
import torch.nn.functional as F

from toolkit import loss
from toolkit.loss import blockwise_cross_entropy


@pytest.mark.parametrize("padded", [64, 50])
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_cross_entropy(monkeypatch, dtype, path, padded):
    """Eager: blocks of 7 of the 30 rows (7, 7, 7, 7, 2). "compiled": the path GPUs take, one
    block of all rows (run eagerly here), whose gradient is used as is without padding."""
    monkeypatch.setattr(loss, "ROWS_PER_BLOCK", 7)
    if path == "compiled":
        monkeypatch.setattr(loss, "_block_function", lambda _: loss._fusable_block_loss_and_grad)
    g = torch.Generator().manual_seed(0)
    vocab = 50
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_form_compiled_on_gpus_equals_the_in_place_one(dtype):
    """GPUs run `_fusable_block_loss_and_grad` through torch.compile; CI checks its math here,
    eagerly, against the in-place form that CPUs run."""
    g = torch.Generator().manual_seed(1)
    block = (torch.randn(9, 300, generator=g) * 4).to(dtype)[:, :250]  # a padded, strided view
    target = torch.randint(0, 250, (9,), generator=g)
    want_loss, want_grad = loss._block_loss_and_grad(block, target, 1 / 9)
    got_loss, got_grad = loss._fusable_block_loss_and_grad(block, target, 1 / 9)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got_grad.dtype == want_grad.dtype == dtype
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-5, atol=1e-7)


def test_a_failing_compiled_loss_falls_back_to_the_eager_one(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(loss, "_block_function", lambda device: broken)
    monkeypatch.setattr(loss, "_compiled_block", broken)
    logits = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.randint(0, 16, (2, 5))
    got = blockwise_cross_entropy(logits, labels)
    assert got.item() == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    )
    assert "compiled cross-entropy failed (no Triton here)" in caplog.text
    assert loss._compiled_block is loss._block_loss_and_grad  # later calls go eager at once


def test_a_second_backward_is_refused_not_silently_rescaled():
    """The saved gradient is scaled in place by the first backward."""
    logits = torch.randn(4, 8, requires_grad=True)
    got = blockwise_cross_entropy(logits, torch.randint(0, 8, (4,)))
    got.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        got.backward()
