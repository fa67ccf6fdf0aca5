"""train.fused_grad_accumulation: weight gradients added into `.grad` inside the backward.

Checked against autograd's own accumulation (a new fp32 gradient, then AccumulateGrad's add):
bit for bit the same losses, gradients and weights over steps of several micro-batches, in bf16
autocast and fp32, eager and with compiled blocks, and for train.fp8_weight_cache's float8
linears; and the fused path is the one that ran (its adds counted), not autograd's.
"""

import importlib.util

import pytest
import torch
from torch import nn

import toolkit.grad_accumulation as grad_accumulation
from tests.conftest import TINY_MODEL
from toolkit.build import build_model
from toolkit.config import recipe_from_dict
from toolkit.distributed import ParallelEnv
from toolkit.grad_accumulation import LinearIntoGrad
from toolkit.parallel.parallelize import parallelize
from toolkit.tokenizer import ByteTokenizer

CPU = torch.device("cpu")
MICRO_BATCHES = 3


def train(
    fused: bool, steps: int = 2, device: torch.device = CPU, **train_keys: object
) -> tuple[list, list, list, object]:
    """`steps` optimizer steps of MICRO_BATCHES micro-batches through parallelize on `device`:
    (losses, each step's gradients, the weights after, the parallel model)."""
    train_cfg = {"steps": steps, "micro_batch_size": 1, "global_batch_size": MICRO_BATCHES,
                 "fused_grad_accumulation": fused, "lr": 1e-2, "warmup_steps": 0,
                 "device": device.type} | train_keys  # fmt: skip
    r = recipe_from_dict({"model": TINY_MODEL | {"seq_length": 16}, "train": train_cfg})
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer(), device)
    parallel = parallelize(model, r, ParallelEnv(0, 1, 0, device, tp=1, pp=1, dp=1))
    parallel.accumulated = 0  # gradients autograd hands the linears' weights to accumulate

    def count(grad: torch.Tensor | None) -> None:
        parallel.accumulated += grad is not None  # None: the fused path returned none

    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.register_hook(count)
    tokens = torch.randint(0, 256, (MICRO_BATCHES, 17), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)
    losses, grads = [], []
    for _ in range(steps):
        losses.append(float(parallel.run_step(tokens[:, :-1], tokens[:, 1:])))
        grads.append([p.grad.clone() for p in model.parameters()])
        parallel.optimizer.step()
        parallel.optimizer.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in model.parameters()], parallel


def assert_same_training(got: tuple, want: tuple) -> None:
    assert got[0] == want[0]
    for step_got, step_want in zip(got[1], want[1]):
        assert all(torch.equal(g, w) for g, w in zip(step_got, step_want))
    assert all(torch.equal(p, w) for p, w in zip(got[2], want[2]))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_weight_grads_added_in_the_backward_train_as_autograd_accumulates(precision, monkeypatch):
    adds = []
    add = grad_accumulation.add_weight_grad
    monkeypatch.setattr(grad_accumulation, "add_weight_grad",
                        lambda grad, product: adds.append(product.dtype) or add(grad, product))  # fmt: skip
    want = train(False, precision=precision)
    assert not adds
    got = train(True, precision=precision)
    linears = [m for m in got[3].module.modules() if isinstance(m, LinearIntoGrad)]
    assert len(linears) == 2 * TINY_MODEL["num_layers"] + 1  # two a block, the output layer
    # Every linear's weight, in each micro-batch after a step's first, in its compute dtype.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert adds == [dtype] * (len(linears) * (MICRO_BATCHES - 1) * 2)
    # autograd accumulated each weight's gradient in every micro-batch, now in the first only.
    assert want[3].accumulated == len(linears) * MICRO_BATCHES * 2
    assert got[3].accumulated == len(linears) * 2
    assert_same_training(got, want)


def test_weight_grads_added_in_compiled_blocks():
    """With compiled blocks the adds trace into the blocks' backward graphs (no graph break;
    autograd accumulates the weights' gradients in a step's first micro-batch only), the
    blocks compile once more for the micro-batches that find a gradient; the same training as
    the compiled blocks without."""
    counters = torch._dynamo.utils.counters
    frames = [counters["frames"]["ok"]]
    want = train(False, steps=3, compile=True)
    frames.append(counters["frames"]["ok"])
    breaks = sum(counters["graph_break"].values())
    got = train(True, steps=3, compile=True)
    frames.append(counters["frames"]["ok"])
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    linears = 2 * TINY_MODEL["num_layers"] + 1
    assert want[3].accumulated == linears * MICRO_BATCHES * 3
    assert got[3].accumulated == linears * 3
    assert frames[2] - frames[1] > frames[1] - frames[0] > 0, frames  # the second variant
    assert_same_training(got, want)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.parametrize("flat", [False, True], ids=["own_grads", "flat_optimizer"])
def test_fp8_weight_cache_linears_add_their_weight_grads(flat, monkeypatch):
    """train.fp8_weight_cache's float8 linears (here every block's and the output layer) add
    their weight gradients into `.grad` too: the same training as the cache alone, also into
    train.flat_optimizer's views of one buffer (test_with_the_flat_optimizer... says why)."""
    import toolkit.fp8_weight_cache as cache

    adds = []
    add = cache.add_weight_grad
    monkeypatch.setattr(cache, "add_weight_grad",
                        lambda grad, product: adds.append(1) or add(grad, product))  # fmt: skip
    fp8 = {"precision": "fp8", "fp8_engine": "torchao", "fp8_layers": "all",
           "fp8_weight_cache": True, "flat_optimizer": flat}  # fmt: skip
    monkeypatch.setattr("toolkit.precision.check_fp8_device", lambda device: None)
    want = train(False, **fp8)
    assert not adds
    got = train(True, **fp8)
    linears = [m for m in got[3].module.modules() if isinstance(m, cache.Float8LinearCastOnce)]
    assert linears and all(m.weight_grad_into_grad for m in linears)
    # Autograd's gradient in each step's first micro-batch, but the flat optimizer's first.
    assert len(adds) == len(linears) * ((MICRO_BATCHES - 1) * 2 + flat)
    assert_same_training(got, want)


def test_keys_that_need_accumulation_warn_on_a_step_of_one(caplog):
    """train.fp8_weight_cache with fp8 on a step of one micro-batch: a warning naming the key;
    none where a step accumulates, and none for the cache without fp8 (it does nothing then).
    train.fused_grad_accumulation, on by default, changes nothing there: no warning."""
    from toolkit.parallel.parallelize import warn_where_nothing_accumulates

    base = {"model": TINY_MODEL, "train": {"steps": 1, "fp8_weight_cache": True}}
    fp8 = recipe_from_dict(base, ["train.precision='fp8'"]).train
    with caplog.at_level("WARNING", logger="toolkit.parallel.parallelize"):
        assert warn_where_nothing_accumulates(fp8, 1) == ["fp8_weight_cache"]
    assert "train.fp8_weight_cache pays where a step accumulates" in caplog.text
    assert warn_where_nothing_accumulates(fp8, 2) == []
    assert warn_where_nothing_accumulates(recipe_from_dict(base).train, 1) == []
    caplog.clear()
    with caplog.at_level("WARNING", logger="toolkit.parallel.parallelize"):
        train(True, steps=1, global_batch_size=1)
    assert "pays where" not in caplog.text


def test_outside_a_backward_the_linears_run_as_nn_linear():
    """No gradient held, or no autograd (evaluation): nn.Linear's own forward."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 4, bias=False)
    plain = nn.Linear(8, 4, bias=False)
    plain.load_state_dict(linear.state_dict())
    assert grad_accumulation.fuse_grad_accumulation(nn.Sequential(linear)) == ["0"]
    assert type(linear) is LinearIntoGrad
    x = torch.randn(3, 8)
    linear.weight.grad = torch.zeros_like(linear.weight)
    with torch.no_grad():
        assert torch.equal(linear(x), plain(x))
    assert not linear.weight.grad.any()
    linear(x).sum().backward()
    plain(x).sum().backward()
    assert torch.equal(linear.weight.grad, plain.weight.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flat", [False, True], ids=["own_grads", "flat_optimizer"])
def test_weight_grads_added_in_compiled_blocks_on_gpu(flat):
    """On the GPU, compiled blocks in bf16: autograd accumulates in a step's first micro-batch
    only (none in the flat optimizer's first step), and the training tracks autograd's
    accumulation (the products' kernels may differ from autograd's transposed ones there:
    fp32 rounding apart)."""
    cuda = torch.device("cuda")
    want = train(False, steps=3, device=cuda, compile=True, flat_optimizer=flat)
    got = train(True, steps=3, device=cuda, compile=True, flat_optimizer=flat)
    assert got[3].accumulated == (2 * TINY_MODEL["num_layers"] + 1) * (3 - flat)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    for p, w in zip(got[2], want[2]):
        torch.testing.assert_close(p, w, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("compile", [False, True])
def test_with_the_flat_optimizer_gradients_views_of_one_buffer(compile):
    """train.flat_optimizer's gradients are views of one buffer, sharing its version counter:
    an add into one linear's gradient in the backward must not fail another's check of what it
    saved ('modified by an inplace operation', seen when the gradient was a saved tensor). Its
    gradients are views from the start, so every micro-batch adds into them: the same training
    as autograd's accumulation into the same optimizer."""
    steps = 3 if compile else 2
    want = train(False, steps=steps, compile=compile, flat_optimizer=True)
    got = train(True, steps=steps, compile=compile, flat_optimizer=True)
    linears = 2 * TINY_MODEL["num_layers"] + 1
    assert want[3].accumulated == linears * MICRO_BATCHES * steps
    # Autograd accumulates in the first micro-batch of every step but the first: there the
    # weights hold the zeroed views already, and the linears add into them.
    assert got[3].accumulated == linears * (steps - 1)
    assert_same_training(got, want)
