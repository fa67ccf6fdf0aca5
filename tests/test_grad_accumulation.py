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
    adds, rows = [], []
    add = grad_accumulation.add_weight_grad
    monkeypatch.setattr(grad_accumulation, "add_weight_grad",
                        lambda grad, product: adds.append(product.dtype) or add(grad, product))  # fmt: skip
    add_rows = grad_accumulation.add_embedding_grad
    monkeypatch.setattr(grad_accumulation, "add_embedding_grad",
                        lambda grad, *sums: rows.append(grad.shape) or add_rows(grad, *sums))  # fmt: skip
    want = train(False, precision=precision)
    assert not adds and not rows
    got = train(True, precision=precision)
    # The input embedding's rows, in each micro-batch after a step's first, into its fp32 grad.
    embedding = got[3].module.embedding
    assert type(embedding) is grad_accumulation.EmbeddingIntoGrad
    assert rows == [embedding.weight.shape] * ((MICRO_BATCHES - 1) * 2)
    linears = [m for m in got[3].module.modules() if isinstance(m, LinearIntoGrad)]
    assert len(linears) == 2 * TINY_MODEL["num_layers"] + 1  # two a block, the output layer
    # Every linear's weight, in each micro-batch after a step's first, in its compute dtype.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert adds == [dtype] * (len(linears) * (MICRO_BATCHES - 1) * 2)
    # autograd accumulated each weight's gradient in every micro-batch, now in the first only.
    assert want[3].accumulated == len(linears) * MICRO_BATCHES * 2
    assert got[3].accumulated == len(linears) * 2
    assert_same_training(got, want)


def test_embedding_rows_summed_per_token_as_the_whole_tables_backward():
    """distinct_token_sums: each distinct token's gradient rows summed as autograd's backward
    sums them into the whole table (repeated tokens, token 0, tokens absent), so adding them
    into a gradient gives that gradient plus the table's, bit for bit; fixed sizes."""
    torch.manual_seed(0)
    vocab, dim = 50, 8
    tokens = torch.tensor([7, 0, 7, 31, 7, 0, 49, 3, 31, 7, 12, 3])
    grad = torch.randn(tokens.numel(), dim)
    table = torch.ops.aten.embedding_dense_backward(grad, tokens, vocab, -1, False)
    rows, sums = grad_accumulation.distinct_token_sums(tokens, grad)
    assert rows.shape == tokens.shape and sums.shape == grad.shape
    assert rows[:6].tolist() == [0, 3, 7, 12, 31, 49] and not sums[6:].any()
    held = torch.randn(vocab, dim)
    want = held + table
    grad_accumulation.add_embedding_grad(held, rows, sums)
    assert torch.equal(held, want)


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


def fp32_gemm_linear(on: bool) -> tuple[LinearIntoGrad, torch.Tensor, torch.Tensor]:
    """A LinearIntoGrad with train.fp32_weight_grad_gemm `on`, and bf16 inputs and output
    gradients whose products need more than bf16's 8 bits."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    grad_accumulation.fuse_grad_accumulation(nn.Sequential(linear), fp32_weight_grad_gemm=on)
    x = torch.randn(2, 40, 64).bfloat16()
    grad_output = torch.randn(2, 40, 48).bfloat16()
    return linear, x, grad_output


def backward_bf16(linear: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> None:
    with torch.autocast("cpu", torch.bfloat16):
        y = linear(x)
    y.backward(grad_output)


def test_fp32_weight_grad_gemm_writes_the_sums_unrounded():
    """train.fp32_weight_grad_gemm: a weight with no gradient yet gets the products summed in
    fp32 (here from fp32 copies: CPUs have no fp32-output bf16 GEMM), contiguous, where
    autograd rounds the sum to bf16 first; once it holds one, the bf16 product is added in as
    before."""
    x2d, g2d = (t.reshape(-1, t.shape[-1]) for t in fp32_gemm_linear(True)[1:])
    exact = g2d.t().float() @ x2d.float()
    rounded = (g2d.t() @ x2d).float()
    assert not torch.equal(exact, rounded)
    linear, x, grad_output = fp32_gemm_linear(True)
    backward_bf16(linear, x, grad_output)
    assert linear.weight.grad.is_contiguous() and torch.equal(linear.weight.grad, exact)
    backward_bf16(linear, x, grad_output)  # a second micro-batch: added into .grad
    assert torch.equal(linear.weight.grad, exact + rounded)
    plain, x, grad_output = fp32_gemm_linear(False)
    backward_bf16(plain, x, grad_output)
    assert torch.equal(plain.weight.grad, rounded)


def test_fp32_weight_grad_gemm_trains_close_to_autograds():
    """Through parallelize, eager and compiled (no graph break): the first step's loss is the
    same (the forward is), the gradients within bf16's rounding of autograd's (relative to each
    tensor's largest) and not equal to them, and the later losses close."""
    counters = torch._dynamo.utils.counters
    for compile in (False, True):
        want = train(True, steps=3, precision="bf16", compile=compile)
        breaks = sum(counters["graph_break"].values())
        got = train(True, steps=3, precision="bf16", fp32_weight_grad_gemm=True, compile=compile)
        assert sum(counters["graph_break"].values()) == breaks
        assert got[0][0] == want[0][0]
        assert got[0] == pytest.approx(want[0], rel=1e-3)
        assert any(not torch.equal(g, w) for g, w in zip(got[1][0], want[1][0]))
        for g, w in zip(got[1][0], want[1][0]):  # one micro-batch's bf16 rounding of 3
            assert (g - w).abs().max() <= 2**-8 * w.abs().max()


def test_the_fp32_gemm_key_needs_the_fused_linears_and_bf16():
    from toolkit.config import RecipeError, load_recipe

    key = "train.fp32_weight_grad_gemm=true"
    assert load_recipe("recipes/tiny_hybrid.toml", [key, 'train.precision="bf16"'])
    for bad in (['train.precision="fp32"'], ["train.fused_grad_accumulation=false"]):
        with pytest.raises(RecipeError, match="train.fp32_weight_grad_gemm"):
            load_recipe("recipes/tiny_hybrid.toml", [key, 'train.precision="bf16"', *bad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_weight_grad_gemm_on_gpu_sums_in_fp32():
    """On CUDA the fp32-output GEMM (aten::mm.dtype): the weight gradient within fp32
    summation of the exact sums (float64), where the bf16 product is off by bf16's rounding;
    and compiled blocks train with it."""
    linear, x, grad_output = fp32_gemm_linear(True)
    linear, x, grad_output = linear.cuda(), x.cuda(), grad_output.cuda()
    with torch.autocast("cuda", torch.bfloat16):
        y = linear(x)
    y.backward(grad_output)
    x2d, g2d = x.reshape(-1, 64), grad_output.reshape(-1, 48)
    exact = g2d.t().double() @ x2d.double()
    rounded = (g2d.t() @ x2d).double()
    got = linear.weight.grad
    assert got.dtype == torch.float32 and got.is_contiguous()
    scale = exact.abs().max()
    assert (got.double() - exact).abs().max() / scale < 1e-6
    assert (rounded - exact).abs().max() / scale > 1e-4
    cuda = torch.device("cuda")
    want = train(True, steps=3, device=cuda, compile=True)
    got = train(True, steps=3, device=cuda, compile=True, fp32_weight_grad_gemm=True)
    assert got[0] == pytest.approx(want[0], rel=1e-3)


def tp2_sp_losses(tmp_path, key: str) -> dict[str, dict]:
    """3 steps on two TP ranks with sequence parallelism (gloo), bf16, 2 micro-batches a step,
    with the recipe key `key` off and on: each run's losses by step ("false", "true"), each
    run logging the key's line only where it is on."""
    from tests.test_parallel import LAYOUTS, launch, losses, write_recipe

    runs = {}
    for value in ("false", "true"):
        (tmp_path / value).mkdir()
        recipe = write_recipe(tmp_path / value, "run", 3, **LAYOUTS["tp2_sp"])
        proc = launch(recipe, 2, 'train.precision="bf16"', f"{key}={value}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (f"{key}: " in proc.stderr) == (value == "true")
        runs[value] = losses(tmp_path / value / "run" / "tb")
    assert sorted(runs["true"]) == [1, 2, 3]
    return runs


@pytest.mark.long
def test_fused_accumulation_trains_as_autograd_under_tp_and_sp(tmp_path):
    """train.fused_grad_accumulation under TP and SP: the vocab-parallel embedding's and the
    sharded linears' gradients added in the backward give autograd's losses, bit for bit."""
    runs = tp2_sp_losses(tmp_path, "train.fused_grad_accumulation")
    assert runs["true"] == runs["false"]
