"""The blockwise cross-entropy against torch's own, in fp32 and bf16, across several blocks, with
and without ignored labels (torch's ignore_index)."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_benchmark
from toolkit import loss
from toolkit.loss import blockwise_cross_entropy


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("padded", [64, 50])
@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_cross_entropy(monkeypatch, dtype, path, padded, masked):
    """Eager: blocks of 7 of the 30 rows (7, 7, 7, 7, 2). "compiled": the functions GPUs
    compile, run eagerly here, in one block of all rows. Masked: a third of the rows labelled
    IGNORE_INDEX, which take no part in the mean and get no gradient."""
    monkeypatch.setattr(loss, "ROWS_PER_BLOCK", 7)
    if path == "compiled":
        fusable = loss._Kernels(loss._block_lse, loss._fusable_block_grad_into, compiled=True)
        monkeypatch.setattr(loss, "_kernels", lambda _: fusable)
    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = (torch.randn(3, 10, padded, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (3, 10), generator=g)
    if masked:
        labels[:, ::3] = loss.IGNORE_INDEX

    mine = logits.clone().requires_grad_()
    got = blockwise_cross_entropy(mine, labels, vocab)
    (got * 0.5).backward()  # a scaled loss, as gradient accumulation makes it

    ref = logits.clone().requires_grad_()
    want = F.cross_entropy(
        ref[..., :vocab].float().flatten(0, 1), labels.flatten(), ignore_index=loss.IGNORE_INDEX
    )
    (want * 0.5).backward()

    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert mine.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(mine.grad, ref.grad, **tol)
    assert not mine.grad[..., vocab:].any()  # padding columns: no gradient
    assert mine.grad[labels != loss.IGNORE_INDEX].abs().sum() > 0
    assert not mine.grad[labels == loss.IGNORE_INDEX].any()  # ignored rows: none either
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
    """GPUs run `_fusable_block_grad_into` through torch.compile; CI checks its math here,
    eagerly, against the in-place form that CPUs run, writing into a strided (padded) view.
    Targets outside the block (another tensor-parallel rank's columns) get no one-hot."""
    g = torch.Generator().manual_seed(1)
    block = (torch.randn(9, 300, generator=g) * 4).to(dtype)[:, :250]  # a padded, strided view
    target = torch.tensor([0, 249, -1, 250, 7, -250, 400, 3, 100])
    lse, _ = loss._block_lse(block, target)
    scale = torch.tensor(0.5 / 9)
    want, got = torch.zeros(9, 300, dtype=dtype), torch.zeros(9, 300, dtype=dtype)
    loss._block_grad_into(want[:, :250], block, target, lse, scale)
    loss._fusable_block_grad_into(got[:, :250], block, target, lse, scale)
    assert want.abs().sum() > 0 and not want[:, 250:].any() and not got[:, 250:].any()
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-7)
    softmax = torch.softmax(block.float(), -1) * scale
    here = (target >= 0) & (target < 250)
    assert torch.all(want[~here, :250].float() >= 0)  # no one-hot: softmax only
    torch.testing.assert_close(want[~here, :250].float(), softmax[~here], rtol=1e-2, atol=1e-7)
    assert torch.all(want[here, target[here]].float() < 0)  # softmax - 1 at the target


def test_the_compiled_kernels_write_the_gradient_in_place(monkeypatch):
    """The GPU path end to end through torch.compile (Inductor's C++ backend here, Triton on
    GPUs): two blocks of rows, each kernel storing into its slice of one gradient buffer, which
    must equal torch's gradient (a block left unwritten would hold garbage)."""
    monkeypatch.setattr(loss, "_compiled", None)
    monkeypatch.setattr(loss, "_row_blocks", lambda flat, k: [slice(0, 8), slice(8, 16)])
    kernels = loss._kernels(torch.device("cuda"))  # the device type picks compile; runs on CPU
    assert kernels.compiled
    monkeypatch.setattr(loss, "_kernels", lambda _: kernels)
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 8, 40, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 33, (2, 8), generator=g)
    labels[1, 2:5] = loss.IGNORE_INDEX  # ignored rows: a zero scale in the compiled kernel
    got = blockwise_cross_entropy(logits, labels, 33)
    (got * 0.25).backward()
    ref = logits.detach().clone().requires_grad_()
    want = F.cross_entropy(ref[..., :33].flatten(0, 1), labels.flatten())
    (want * 0.25).backward()
    assert loss._compiled is kernels  # no fallback to the eager kernels happened
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_a_failing_compiled_loss_falls_back_to_the_eager_one(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no Triton here")

    broken_kernels = loss._Kernels(broken, broken, compiled=True)
    monkeypatch.setattr(loss, "_compiled", broken_kernels)
    monkeypatch.setattr(loss, "_kernels", lambda device: loss._compiled)
    logits = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.randint(0, 16, (2, 5))
    got = blockwise_cross_entropy(logits, labels)
    assert got.item() == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    )
    assert "compiled cross-entropy failed (no Triton here)" in caplog.text
    assert loss._compiled is loss.EAGER  # later calls go eager at once
    got.backward()
    ref = logits.detach().clone().requires_grad_()
    F.cross_entropy(ref.flatten(0, 1), labels.flatten()).backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_a_second_backward_gives_the_same_gradient():
    """Nothing saved is modified by a backward pass: retain_graph works as for any loss."""
    logits = torch.randn(4, 8, requires_grad=True)
    got = blockwise_cross_entropy(logits, torch.randint(0, 8, (4,)))
    got.backward(retain_graph=True)
    first = logits.grad.clone()
    got.backward()
    torch.testing.assert_close(logits.grad, 2 * first)


def test_every_row_ignored_gives_zero_loss_and_no_gradient():
    """A micro-batch with nothing to count (every position after an end of document, say) adds
    0 and no gradient, where a mean over no rows would be NaN."""
    logits = torch.randn(2, 3, 8, requires_grad=True)
    got = blockwise_cross_entropy(logits, torch.full((2, 3), loss.IGNORE_INDEX))
    got.backward()
    assert got.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("chunk", [1, 16, 50, 64, 250, 1024])
def test_the_chunked_log_sum_exp_is_logsumexps(chunk):
    """TOOLKIT_LSE_CHUNK's form: the same log-sum-exp within fp32 rounding whether the width is
    a multiple of the chunk or not (a shorter last chunk), on a strided view, with rows and
    chunks of -inf and a +inf, and the same target logits (0 outside the columns)."""
    g = torch.Generator().manual_seed(3)
    block = (torch.randn(7, 300, generator=g) * 4)[:, :250]  # a padded, strided view
    block[0] = -torch.inf  # a row of -inf: -inf, as torch's
    block[1, :100] = -torch.inf  # whole chunks of -inf: they add nothing
    block[2, 7] = torch.inf
    target = torch.tensor([0, 249, -1, 250, 7, 120, 3])
    want, want_picked = loss._block_lse(block, target)
    got, picked = loss._block_lse(block, target, chunk)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got[0] == -torch.inf and got[2] == torch.inf and torch.isfinite(got[3:]).all()
    assert torch.equal(picked, want_picked)
    wider = loss._block_lse(block * 30, target, chunk)[0]  # no overflow in the exps
    torch.testing.assert_close(wider, loss._block_lse(block * 30, target)[0], rtol=1e-6, atol=1e-5)


def test_lse_chunk_picks_the_compiled_log_sum_exp(monkeypatch):
    """With LSE_CHUNK set the kernels GPUs compile take the chunked form, and the loss and its
    gradient stay torch's; unset, torch.logsumexp's."""
    monkeypatch.setattr(torch, "compile", lambda **kw: lambda fn: fn)  # the functions as given
    monkeypatch.setattr(loss, "_compiled", None)
    monkeypatch.setattr(loss, "LSE_CHUNK", 0)
    assert loss._kernels(torch.device("cuda")).lse is loss._block_lse
    monkeypatch.setattr(loss, "_compiled", None)
    monkeypatch.setattr(loss, "LSE_CHUNK", 16)
    kernels = loss._kernels(torch.device("cuda"))
    assert kernels.compiled and kernels.lse.func is loss._block_lse
    assert kernels.lse.keywords == {"chunk": 16}
    monkeypatch.setattr(loss, "_kernels", lambda _: kernels)
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 5, 40, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 37, (3, 5), generator=g)
    got = blockwise_cross_entropy(logits, labels, 37)
    got.backward()
    ref = logits.detach().clone().requires_grad_()
    want = F.cross_entropy(ref[..., :37].flatten(0, 1), labels.flatten())
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_the_cross_entropy_benchmark_runs_and_checks_each_form(tmp_path, capsys, monkeypatch):
    import json

    bench = load_benchmark("cross_entropy", monkeypatch)
    out = tmp_path / "ce.json"
    args = ["--rows", "16", "--vocab", "300", "--chunks", "0,64", "--repeats", "2"]
    assert bench.main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and set(r["lse"]) == {"0", "64"}
    assert all(v["max_abs_error"] < 1e-5 and v["ms"] > 0 for v in r["lse"].values())
    assert r["grad"]["ms"] > 0 and "log-sum-exp, chunk" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--chunks", "-1"])
    assert e.value.code == 2 and "integers >= 0" in capsys.readouterr().err
