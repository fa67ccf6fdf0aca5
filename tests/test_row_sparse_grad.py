"""train.row_sparse_embedding_grad (toolkit/row_sparse_grad.py): the input embedding's gradient
kept as the rows of a step's first micro-batch and read so by the Triton AdamW.

Checked against the whole-table gradient autograd writes: the kernel's update from the rows bit
for bit the update from the table (row widths below, at and above its block, tensors ending in
a partial block, a table row repeated with zero sums, beside dense tensors), and whole runs of
the tiny hybrid with the key on and off the same losses, and norms and weights within fp32
rounding (steps of one and of three micro-batches, the clip active, the step graph's captured
optimizer). The kernel runs under Triton's interpreter in a subprocess on CPUs (the variable
must be set before Triton compiles anything), compiled on a GPU."""

import pytest
import torch

from tests.test_step_graph import in_subprocess, interpret  # in a fresh process
from toolkit import row_sparse_grad
from toolkit.grad_accumulation import distinct_token_sums

CUDA = torch.cuda.is_available()

# Shared by the interpreter's subprocess and the GPU test.
KERNEL = """
import torch
import toolkit.triton_adamw as module
from toolkit import row_sparse_grad
from toolkit.grad_accumulation import distinct_token_sums
from toolkit.triton_adamw import BLOCK, TritonAdamW

# (table rows, row width): widths below, at and above the kernel's block, tables ending in a
# partial block; beside them dense tensors.
TABLES = [(37, 5), (9, BLOCK + 3), (6, 2 * BLOCK), (300, 64)]
DENSE = [(3, BLOCK - 5), (7,)]


def race(device, steps=3):
    torch.manual_seed(0)
    shapes = TABLES + DENSE
    ours = [torch.randn(s, device=device).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    groups = lambda ps: [{"params": ps[:3], "weight_decay": 0.1},
                         {"params": ps[3:], "weight_decay": 0.0}]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt, ref = TritonAdamW(groups(ours), **kw), TritonAdamW(groups(theirs), **kw)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if i < len(TABLES):  # tokens with repeats, row 0 among them on odd steps
                tokens = torch.randint(int(step % 2 == 0), p.size(0), (11,), device=device)
                rows, sums = distinct_token_sums(tokens, torch.randn(11, p.size(1), device=device))
                row_sparse_grad.keep(p, rows, sums)
                q.grad = row_sparse_grad.dense(p)
                assert p.grad is None
            else:
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
        coef = torch.tensor(0.37 if step % 2 else 1.0, dtype=torch.float64, device=device)
        opt.step(grad_scale=coef)
        ref.step(grad_scale=coef)
        for o in (opt, ref):
            o.zero_grad(set_to_none=True)
            for group in o.param_groups:
                group["lr"] *= 0.7
    assert all(row_sparse_grad.held_rows(p) is None for p in ours), "zero_grad drops them"
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q), (p.shape, float((p - q).abs().max()))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), (p.shape, key)
"""

INTERPRETED = (
    KERNEL
    + """
def refuse(*args, **kwargs):
    raise AssertionError("the eager reference ran: the kernel did not take these tensors")

eager = module.adamw_update_
module.adamw_update_ = refuse
race("cpu")
module.BLOCK, module.SPAN = 256, 3  # a span of blocks, each one's loads before the last's stores
race("cpu")
module.BLOCK, module.SPAN = BLOCK, 1
print("row-sparse kernel agrees")
"""
)

# The tiny hybrid trained through parallelize and the trainer's clip_and_step (or StepGraph's
# body), the key on against off: with it on, the embedding's first gradient of each step kept
# as rows (counted) and a later micro-batch's made whole first (counted).
TRAINING = """
import torch
from tests.conftest import TINY_MODEL
from toolkit import row_sparse_grad
from toolkit.build import build_model
from toolkit.config import recipe_from_dict
from toolkit.tokenizer import ByteTokenizer
from toolkit.distributed import ParallelEnv
from toolkit.parallel.parallelize import parallelize
from toolkit.parallel.runtime import clip_and_queue_step, clip_and_step
from toolkit.step_graph import StepGraph

calls = {"keep": 0, "densify_": 0}  # densify_ counted only where there are rows to make whole
for name in calls:
    def counted(p, *args, name=name, function=getattr(row_sparse_grad, name)):
        if name == "keep" or row_sparse_grad.held_rows(p) is not None:
            calls[name] += 1
        return function(p, *args)
    setattr(row_sparse_grad, name, counted)


def run(sparse, clip, micro_batches, graphed=False, steps=3, device="cpu"):
    recipe = recipe_from_dict({"model": TINY_MODEL | {"seq_length": 32}, "train": {
        "steps": steps, "device": device, "micro_batch_size": 2,
        "global_batch_size": 2 * micro_batches,
        "adamw_kernel": "triton", "grad_clip": clip, "row_sparse_embedding_grad": sparse}})
    torch.manual_seed(0)
    model = build_model(recipe, ByteTokenizer(), torch.device(device))
    env = ParallelEnv(0, 1, 0, torch.device(device), tp=1, pp=1, dp=1)
    parallel = parallelize(model, recipe, env)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.zeros(2 * micro_batches, 33, dtype=torch.long, device=device)
    clip = recipe.train.max_grad_norm

    def body():
        loss = parallel.run_step(tokens[:, :-1], tokens[:, 1:])
        if sparse:  # the embedding's gradient as rows, not a table
            assert (model.embedding.weight.grad is None) == (micro_batches == 1)
        norm = clip_and_queue_step(parallel.optimizer, params, clip, env)
        parallel.optimizer.zero_grad(set_to_none=True)
        return loss, norm

    graph = StepGraph(body, parallel.optimizer, torch.device(device)) if graphed else None
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        tokens.copy_(torch.randint(0, 256, tokens.shape, generator=gen))
        if graph is not None:
            out.append(tuple(map(float, graph())))
            continue
        loss = float(parallel.run_step(tokens[:, :-1], tokens[:, 1:]))
        out.append((loss, clip_and_step(parallel.optimizer, params, clip, env)))
        parallel.optimizer.zero_grad(set_to_none=True)
    return out, [p.detach().clone() for p in params]


def check(device, tol):  # losses within tol (0: bit for bit), norms and weights 1e-6 + tol
    for clip, micro_batches, graphed in ((0.5, 1, False), (0, 3, False), (0.5, 1, True)):
        want = run(False, clip, micro_batches, graphed, device=device)
        assert calls == {"keep": 0, "densify_": 0}, calls
        got = run(True, clip, micro_batches, graphed, device=device)
        assert calls == {"keep": 3, "densify_": 3 if micro_batches > 1 else 0}, calls
        calls.update(keep=0, densify_=0)
        for (loss, norm), (want_loss, want_norm) in zip(got[0], want[0]):
            assert abs(loss - want_loss) <= tol * want_loss, (got[0], want[0])
            assert abs(norm - want_norm) <= (1e-6 + tol) * want_norm, (got[0], want[0])
        if clip:
            assert min(norm for _, norm in want[0]) > clip  # the clip scaled every step
        for p, q in zip(got[1], want[1]):
            close = torch.allclose(p, q, rtol=1e-6 + tol, atol=1e-7 + tol)
            assert close, float((p - q).abs().max())
"""


# The trainer itself (toolkit.train: data, the step, checkpoints, logs), key on against off, at
# one micro-batch a step in the step graph and at two a step in eager steps.
TRAINER = """
import math
import tempfile
from pathlib import Path

from tests.test_train import RANDOM_TEXT, make_recipe
from toolkit import row_sparse_grad
from toolkit.train import train

kept = []
keep = row_sparse_grad.keep
row_sparse_grad.keep = lambda p, *rows: kept.append(p.shape) or keep(p, *rows)

with tempfile.TemporaryDirectory() as tmp:
    for n, keys in enumerate([{"global_batch_size": 2, "step_graph": True},
                              {"global_batch_size": 4}]):
        keys |= {"steps": 4, "adamw_kernel": "triton"}
        want = train(make_recipe(Path(f"{tmp}/{n}a"), RANDOM_TEXT, **keys))
        assert not kept
        got = train(make_recipe(Path(f"{tmp}/{n}b"), RANDOM_TEXT, **keys,
                                row_sparse_embedding_grad=True))
        assert len(kept) == 4, kept  # a step's first gradient, every step
        kept.clear()
        assert sorted(got.losses) == sorted(want.losses) == [1, 2, 3, 4]
        for step, loss in want.losses.items():
            assert math.isclose(got.losses[step], loss, rel_tol=1e-6), (got.losses, want.losses)
print("row-sparse trainer agrees")
"""


def test_the_trainer_with_the_key_under_the_interpreter():
    """toolkit.train with the key on against off (the Triton AdamW under the interpreter, the
    clip at its default): the same losses within 1e-6 over 4 steps, at one micro-batch a step
    through the step graph and at two in eager steps, the rows kept at each step's first."""
    interpret(TRAINER, "row-sparse trainer agrees")


def test_the_kernel_reads_rows_as_the_whole_table_under_the_interpreter():
    """The update from (rows, sums) against the same optimizer from the whole table they stand
    for, 3 steps, the clip coefficient on odd ones: parameters and moments bit for bit, and
    the kernel, not the eager reference, took every tensor."""
    interpret(INTERPRETED, "row-sparse kernel agrees")


def test_training_with_the_key_is_training_without_under_the_interpreter():
    """The tiny hybrid, 3 steps, key on against off: the losses bit for bit, the norms within
    1e-6 (the sums' squares summed in another order), the weights within 1e-6; at one
    micro-batch a step the rows kept every step and never made whole, at three made whole once
    a step; through StepGraph's captured optimizer too."""
    interpret(TRAINING + 'check("cpu", 0.0)\nprint("row-sparse training agrees")\n',
              "row-sparse training agrees")  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_training_with_the_key_is_training_without_on_gpu():
    """As under the interpreter, with the compiled kernel and, graphed, a real CUDA graph of
    the step whose captured update gathers the rows: losses, norms and weights within 1e-5."""
    script = TRAINING + 'check("cuda", 1e-5)\nprint("row-sparse training agrees")\n'
    in_subprocess(script, "row-sparse training agrees")  # its counting wrappers stay there


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_the_compiled_kernel_reads_rows_as_the_whole_table_on_gpu():
    namespace: dict = {}
    exec(KERNEL, namespace)
    namespace["race"]("cuda")


def test_rows_slots_and_the_whole_table():
    """keep(): each table row's slot (row 0 a real token and repeated with zero sums past the
    distinct ones: the real one's), -1 for untouched rows; dense() is the whole table
    embedding_dense_backward writes; densify_ makes it .grad; held_grad and clear_."""
    torch.manual_seed(0)
    tokens = torch.tensor([7, 0, 7, 31, 0, 7])
    grad = torch.randn(tokens.numel(), 4)
    weight = torch.zeros(40, 4, requires_grad=True)
    rows, sums = distinct_token_sums(tokens, grad)
    row_sparse_grad.keep(weight, rows, sums)
    held = row_sparse_grad.held_rows(weight)
    assert held.slots.dtype == torch.int32 and held.slots.shape == (40,)
    assert held.slots[[0, 7, 31]].tolist() == [0, 1, 2]
    assert (held.slots.tolist().count(-1)) == 37
    assert row_sparse_grad.held_grad(weight) is held.sums and weight.grad is None
    table = torch.ops.aten.embedding_dense_backward(grad, tokens, 40, -1, False)
    assert torch.equal(row_sparse_grad.dense(weight), table)
    row_sparse_grad.densify_(weight)
    assert torch.equal(weight.grad, table) and row_sparse_grad.held_rows(weight) is None
    row_sparse_grad.keep(weight, rows, sums)
    row_sparse_grad.clear_([weight])
    assert row_sparse_grad.held_rows(weight) is None


def test_the_norm_reads_the_rows():
    """global_grad_squares counts a row-sparse gradient by its sums: the whole table's squared
    norm within fp32 rounding."""
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel.runtime import global_grad_squares

    torch.manual_seed(0)
    weight = torch.zeros(50, 8, requires_grad=True)
    other = torch.zeros(3, requires_grad=True)
    other.grad = torch.randn(3)
    row_sparse_grad.keep(weight, *distinct_token_sums(torch.randint(0, 50, (20,)),
                                                      torch.randn(20, 8)))  # fmt: skip
    env = ParallelEnv(0, 1, 0, torch.device("cpu"), tp=1, pp=1, dp=1)
    want = (
        row_sparse_grad.dense(weight).double().square().sum() + other.grad.double().square().sum()
    )
    got = global_grad_squares([weight, other], env)
    assert torch.allclose(got, want, rtol=1e-6), (got, want)


def test_without_an_update_that_reads_rows_the_key_is_off(caplog):
    """torch's AdamW (CPUs without Triton's interpreter) reads `.grad` only: the key is left off
    with a warning naming it, and the embedding's gradient is the whole table."""
    from toolkit.build import build_model, tokenizer_from_recipe
    from toolkit.config import load_recipe
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel.parallelize import parallelize

    recipe = load_recipe("recipes/tiny_hybrid.toml", [
        'train.device="cpu"', "model.seq_length=16", "train.micro_batch_size=1",
        "train.global_batch_size=1", 'train.adamw_kernel="auto"',
        "train.row_sparse_embedding_grad=true"])  # fmt: skip
    model = build_model(recipe, tokenizer_from_recipe(recipe), torch.device("cpu"))
    env = ParallelEnv(0, 1, 0, torch.device("cpu"), tp=1, pp=1, dp=1)
    with caplog.at_level("WARNING"):
        parallel = parallelize(model, recipe, env)
    assert "train.row_sparse_embedding_grad left off" in caplog.text
    tokens = torch.randint(0, 256, (1, 17))
    parallel.run_step(tokens[:, :-1], tokens[:, 1:])
    assert model.embedding.weight.grad is not None
    assert row_sparse_grad.held_rows(model.embedding.weight) is None


class ReadsRows:
    """An optimizer as keep_row_sparse_embedding_grads sees TritonAdamW."""

    reads_row_sparse_grads = True


@pytest.mark.parametrize(
    "layout, tie, words",
    [
        ({"dp": 2}, False, "DP=2 PP=1"),
        ({"pp": 2}, False, "DP=1 PP=2"),
        ({}, True, "shared (tied)"),
        ({}, None, "no plain embedding"),
        ({}, False, None),
    ],
)
def test_the_key_is_left_off_where_whole_gradients_are_read(caplog, layout, tie, words):
    """keep_row_sparse_embedding_grads: off with a warning that says why at DP or PP > 1, with
    the embedding's weight shared, or with no plain embedding; on otherwise."""
    from torch import nn

    from toolkit.distributed import ParallelEnv
    from toolkit.grad_accumulation import EmbeddingIntoGrad
    from toolkit.parallel.parallelize import keep_row_sparse_embedding_grads

    embedding = EmbeddingIntoGrad(10, 4) if tie is not None else nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    if tie:
        head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    env = ParallelEnv(0, 1, 0, torch.device("cpu"), **({"tp": 1, "pp": 1, "dp": 1} | layout))
    with caplog.at_level("WARNING"):
        kept = keep_row_sparse_embedding_grads(model, ReadsRows(), env)
    if words is None:
        assert kept == 1 and embedding.keeps_row_sparse_grad and not caplog.text
    else:
        assert kept == 0 and not getattr(embedding, "keeps_row_sparse_grad", False)
        assert "train.row_sparse_embedding_grad left off" in caplog.text and words in caplog.text


def test_both_held_are_added_and_an_in_place_clip_scales_the_rows():
    """A `.grad` set beside the rows (by other code) is not lost: held_grad adds the rows into
    it; clip_grad_norm (the clip in place, for optimizers that do not take the coefficient)
    scales the rows as it scales the whole table."""
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel.runtime import clip_grad_norm

    torch.manual_seed(0)
    tokens, grad = torch.randint(0, 30, (12,)), torch.randn(12, 4)
    table = torch.ops.aten.embedding_dense_backward(grad, tokens, 30, -1, False)
    weight = torch.zeros(30, 4, requires_grad=True)
    row_sparse_grad.keep(weight, *distinct_token_sums(tokens, grad))
    weight.grad = torch.ones(30, 4)
    assert torch.equal(row_sparse_grad.held_grad(weight), table + 1)
    assert row_sparse_grad.held_rows(weight) is None

    weight.grad = None
    row_sparse_grad.keep(weight, *distinct_token_sums(tokens, grad))
    env = ParallelEnv(0, 1, 0, torch.device("cpu"), tp=1, pp=1, dp=1)
    norm = clip_grad_norm([weight], 0.5, env)
    assert norm == pytest.approx(float(table.norm()), rel=1e-6) and norm > 0.5
    want = table * (0.5 / (norm + 1e-6))
    assert weight.grad is None and torch.allclose(row_sparse_grad.dense(weight), want)


@pytest.mark.parametrize(
    "bad",
    [
        ["train.fused_grad_accumulation=false"],
        ['train.adamw_kernel="torch"'],
        ["train.flat_optimizer=true"],
        ["train.compile=true", 'train.compile_scope="model"'],
    ],
)
def test_the_key_is_checked(bad):
    from toolkit.config import RecipeError, load_recipe

    key = "train.row_sparse_embedding_grad=true"
    assert load_recipe("recipes/tiny_hybrid.toml", [key]).train.row_sparse_embedding_grad
    load_recipe("recipes/tiny_hybrid.toml", bad)  # fine without the key
    with pytest.raises(RecipeError, match="train.row_sparse_embedding_grad"):
        load_recipe("recipes/tiny_hybrid.toml", [key, *bad])


@pytest.mark.parametrize("alone", [0, 100, 1 << 30])
def test_the_norm_of_large_and_small_gradients(monkeypatch, alone):
    """The large gradients' norms taken one reduction each (NORM_ALONE elements and more),
    the small ones' in one multi-tensor launch, or all either way: the squared norm float64's
    within fp32 rounding, a row-sparse gradient among them."""
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel import runtime

    monkeypatch.setattr(runtime, "NORM_ALONE", alone)
    alone_norms = []
    vector_norm = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm",
                        lambda g, **kw: alone_norms.append(g.numel()) or vector_norm(g, **kw))  # fmt: skip
    torch.manual_seed(0)
    params = [torch.zeros(s, requires_grad=True) for s in [(30, 7), (5,), (1000,), (2, 3, 4)]]
    for p in params:
        p.grad = torch.randn(p.shape)
    table = torch.zeros(64, 8, requires_grad=True)
    row_sparse_grad.keep(table, *distinct_token_sums(torch.randint(0, 64, (40,)),
                                                     torch.randn(40, 8)))  # fmt: skip
    env = ParallelEnv(0, 1, 0, torch.device("cpu"), tp=1, pp=1, dp=1)
    grads = [p.grad for p in params] + [row_sparse_grad.dense(table)]
    want = sum(g.double().square().sum() for g in grads)
    got = runtime.global_grad_squares([*params, table], env)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6), (got, want)
    sizes = [210, 5, 1000, 24, 40 * 8]  # the sums' rows, not the table's
    assert sorted(alone_norms) == sorted(n for n in sizes if n >= alone)
