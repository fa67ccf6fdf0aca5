"""train.precision: autocast contexts, and fp8's conversion of the blocks' linears (torchao's
module swap runs on CPUs; its float8 matmuls need a GPU with compute capability >= 8.9). The
Transformer Engine tests need TE and such a GPU (benchmarks/gpu_setup_te.sh brings TE to the
H200) and are skipped elsewhere."""

import copy
import dataclasses
import importlib.util
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import TINY_MODEL, load_benchmark
from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint
from toolkit.checkpoint import RankView, restore
from toolkit.config import RecipeError, recipe_from_dict
from toolkit.model import HybridLM
from toolkit.optim import build_optimizer
from toolkit.parallel.runtime import cross_entropy
from toolkit.precision import (
    PrecisionError,
    _te_imports,
    apply_fp8,
    autocast_context,
    carry_forward_hooks,
    check_fp8_device,
    fp8_engine,
    fp8_filter,
)
from toolkit.tokenizer import ByteTokenizer

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed (pip install torchao, or the 'fp8' extra)",
)
CPU = torch.device("cpu")
CUDA = torch.device("cuda")
needs_te_gpu = pytest.mark.skipif(
    not (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 9)
        and importlib.util.find_spec("transformer_engine") is not None
        and _te_imports()
    ),
    reason="needs Transformer Engine and a GPU with compute capability >= 8.9",
)
# Block widths that float8 GEMMs accept (multiples of 16): 6 blocks, all three kinds in the middle.
FP8_MODEL = TINY_MODEL | dict(
    num_layers=6,
    pattern="M*-M-M",
    att_ratio=0.17,
    mlp_ratio=0.33,
    hidden_size=64,
    ffn_hidden_size=128,
    mamba_head_dim=16,
)


def recipe(tmp_path, **train):
    return recipe_from_dict(
        {
            "model": FP8_MODEL,
            "train": {"steps": 1, "device": "cpu", "precision": "fp32"} | train,
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
        }
    )


def test_fp8_refuses_cpus_naming_the_key():
    with pytest.raises(PrecisionError, match=r"train\.precision='fp8' needs a CUDA GPU .* cpu"):
        check_fp8_device(CPU)


def test_fp8_training_on_cpu_fails_with_the_key(tmp_path):
    from toolkit.train import train

    r = recipe(tmp_path, precision="fp8")
    with pytest.raises(PrecisionError, match=r"train\.precision='fp8'"):
        train(r)


def test_fp8_filter_keeps_first_and_last_blocks_embedding_and_output():
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)
    keep = fp8_filter(model)
    chosen = [n for n, m in model.named_modules() if keep(m, n)]
    assert chosen and all(n.split(".")[1] in {"1", "2", "3", "4"} for n in chosen)
    kinds = {model.layers[int(n.split(".")[1])].kind for n in chosen}
    assert kinds == {"M", "*", "-"}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "output_layer" in linears and "output_layer" not in chosen
    assert not any(n.startswith(("layers.0.", "layers.5.")) for n in chosen)
    # a width that is not a multiple of 16 stays bf16
    odd = nn.Linear(24, 32, bias=False)
    assert not keep(odd, "layers.2.mixer.linear_fc1")


def test_fp8_layers_blocks_and_all():
    """train.fp8_layers: 'blocks' adds the first and last blocks' linears to 'inner''s, 'all'
    the output layer too; the embedding is never a linear. 'all' is a valid recipe at any TP
    (test_parallel runs it at TP=2)."""
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)

    def chosen(layers: str) -> set[str]:
        keep = fp8_filter(model, layers)
        return {n for n, m in model.named_modules() if keep(m, n)}

    inner, blocks, every = chosen("inner"), chosen("blocks"), chosen("all")
    edge = {n for n in blocks if n.startswith(("layers.0.", "layers.5."))}
    assert edge and blocks == inner | edge and every == blocks | {"output_layer"}
    every_tp2 = {"train": {"steps": 1, "fp8_layers": "all"}, "parallel": {"tp": 2}}
    assert recipe_from_dict({"model": FP8_MODEL} | every_tp2).train.fp8_layers == "all"


def test_swapped_linear_keeps_its_forward_hooks():
    """carry_forward_hooks: the hooks on a linear (TP's input hook on the output layer) run on
    the module that replaced it, and their handles still remove them there."""
    old, new, x = nn.Linear(4, 4), nn.Linear(4, 4), torch.ones(1, 4)
    seen = []
    pre = old.register_forward_pre_hook(lambda mod, args: (2 * args[0],))
    old.register_forward_hook(lambda mod, args, out: seen.append(args[0].sum().item()))
    carry_forward_hooks(old, new)
    new(x)
    assert seen == [8.0]  # the input doubled by the pre-hook, seen by the hook
    pre.remove()
    new(x)
    assert seen == [8.0, 4.0]


@needs_torchao
@pytest.mark.parametrize(
    "train, compiled",
    [
        ({"fp8_layers": "all", "compile": True}, True),
        ({"fp8_layers": "all", "compile": ["mlp"]}, True),
        ({"fp8_layers": "all", "compile": True, "compile_scope": "model"}, False),
        ({"fp8_layers": "all"}, False),
        ({"fp8_layers": "blocks", "compile": True}, False),
    ],
)
def test_float8_output_layer_compiled_with_the_blocks(train, compiled):
    """With the output layer in float8 and per-block compile, parallelize compiles it on its own
    (a float8 linear pays only compiled); not when the whole model is one region, nor when
    nothing compiles or the output layer stays bf16."""
    from torchao.float8.float8_linear import Float8Linear

    from toolkit.parallel.parallelize import compile_fp8_output_layer

    r = recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1, "precision": "fp8"} | train})
    model = build_model(r, ByteTokenizer())
    apply_fp8(model, device=CPU, engine="torchao", check_device=False, layers=r.train.fp8_layers)
    assert isinstance(model.output_layer, Float8Linear) == (r.train.fp8_layers == "all")
    assert compile_fp8_output_layer(model, r.train) == compiled
    assert (model.output_layer._compiled_call_impl is not None) == compiled


def test_autocast_contexts():
    assert not isinstance(autocast_context("fp32", CPU), torch.autocast)
    for precision, engine in (("bf16", None), ("fp8", "torchao"), ("fp8", None)):
        with autocast_context(precision, CPU, engine):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_context("fp16", CPU)


def test_a_bf16_residual_stream_is_rounded_once_after_the_embedding():
    """model.fp32_residual = false: under bf16 autocast every block takes and returns bf16 (as
    Megatron's --bf16 runs without --fp32-residual-connection), not the fp32 the embedding
    writes; the loss and gradients within bf16 rounding of the fp32 stream's. In fp32 training
    (no autocast) the key changes nothing."""
    import torch.nn.functional as F

    from tests.conftest import tiny_model_config

    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))

    def run(fp32_residual: bool, precision: str = "bf16"):
        torch.manual_seed(0)
        model = HybridLM(tiny_model_config(fp32_residual=fp32_residual), vocab_size=100)
        dtypes = set()
        for block in model.layers:
            block.register_forward_hook(lambda m, args, out: dtypes.add((args[0].dtype, out.dtype)))
        with autocast_context(precision, CPU):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}, dtypes

    loss, grads, dtypes = run(False)
    assert dtypes == {(torch.bfloat16, torch.bfloat16)}
    want_loss, want_grads, want_dtypes = run(True)
    assert want_dtypes == {(torch.float32, torch.float32)}
    assert not torch.equal(loss, want_loss)
    # Measured: the losses 1.2e-5 apart (relative), the gradients at most 1.3e-2 (relative L2).
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-3)
    for name, grad in grads.items():
        assert (grad - want_grads[name]).norm() <= 5e-2 * want_grads[name].norm(), name
    fp32 = run(False, "fp32")
    assert fp32[2] == {(torch.float32, torch.float32)}
    assert torch.equal(fp32[0], run(True, "fp32")[0])


def test_no_engine_is_a_clear_error(monkeypatch):
    import toolkit.precision as precision

    monkeypatch.setattr(precision, "fp8_engine", lambda compiled=False: None)
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)
    with pytest.raises(PrecisionError, match="needs Transformer Engine or torchao"):
        apply_fp8(model, device=CPU, check_device=False)


@needs_torchao
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_torchao_conversion_keeps_names_and_weights(scaling):
    from torchao.float8.float8_linear import Float8Linear

    r = recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}})
    torch.manual_seed(0)
    plain = build_model(r, ByteTokenizer())
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer())
    engine, names = apply_fp8(
        model, device=CPU, engine="torchao", recipe=scaling, check_device=False
    )
    assert engine == "torchao"
    swapped = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert swapped == names and len(names) >= 6
    assert not isinstance(model.output_layer, Float8Linear)
    assert not any(isinstance(m, Float8Linear) for m in model.layers[0].modules())
    assert not any(isinstance(m, Float8Linear) for m in model.layers[-1].modules())
    want = plain.state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def two_micro_batch_steps(model: nn.Module, cast_weights_once: bool) -> object:
    """StepRunner on the CPU, 2 micro-batches of 1 x 16 tokens a step, bf16 autocast; with
    `cast_weights_once`, train.fp8_weight_cache's step context."""
    import toolkit.fp8_weight_cache as cache
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel.runtime import StepRunner

    return StepRunner(
        model, ParallelEnv(0, 1, 0, CPU, tp=1, pp=1, dp=1),
        partial(cross_entropy, vocab_size=model.vocab_size),
        micro_batch_size=1, micro_batches=2, seq_length=16,
        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        logits_dtype=torch.bfloat16,
        step_context=cache.cast_weights_once if cast_weights_once else None,
    )  # fmt: skip


@needs_torchao
def test_weights_cast_once_a_step_train_as_torchaos_casts_every_time(monkeypatch):
    """train.fp8_weight_cache: through StepRunner (2 micro-batches a step, 2 steps with AdamW
    between), each float8 weight is cast once a step, none inside torchao's matmuls, no float8
    weight is copied into the column-major layout a product takes (torchao's backward copies
    each), and loss, gradients and weights stay bit for bit those of torchao's casting in every
    forward and backward; after a step the casts are dropped and an evaluation forward casts as
    torchao's."""
    import torchao.float8.float8_linear as float8_linear
    import torchao.float8.float8_ops as float8_ops
    from torchao.float8.float8_training_tensor import GemmInputRole
    from torchao.float8.float8_utils import is_row_major

    import toolkit.fp8_weight_cache as cache

    casts = {"matmul": 0, "once": 0}

    def counting(where: str, cast):
        def count(*args, **kwargs):
            casts[where] += kwargs.get("gemm_input_role") == GemmInputRole.WEIGHT
            return cast(*args, **kwargs)

        return count

    monkeypatch.setattr(float8_linear, "hp_tensor_to_float8_dynamic",
                        counting("matmul", float8_linear.hp_tensor_to_float8_dynamic))  # fmt: skip
    both_layouts = cache._both_layouts

    def cast_once(*args):  # cast_all's cast of one weight into both layouts
        casts["once"] += 1
        return both_layouts(*args)

    monkeypatch.setattr(cache, "_both_layouts", cast_once)
    preprocess, weight_copies = float8_ops.preprocess_addmm, [0]

    def copies_counted(a, b):  # torchao copies a row-major second operand to column-major
        weight_copies[0] += b._gemm_input_role == GemmInputRole.WEIGHT and is_row_major(
            b._data.stride()
        )
        return preprocess(a, b)

    monkeypatch.setattr(float8_ops, "preprocess_addmm", copies_counted)
    r = recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}})
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    runs = {}
    for once in (False, True):
        torch.manual_seed(0)
        model = build_model(r, ByteTokenizer())
        _, names = apply_fp8(model, device=CPU, engine="torchao", check_device=False,
                             layers="all", cast_weights_once=once)  # fmt: skip
        assert all(isinstance(model.get_submodule(n), cache.Float8LinearCastOnce) == once
                   for n in names)  # fmt: skip
        run_step = two_micro_batch_steps(model, cast_weights_once=once)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
        losses, grads = [], []
        for _ in range(2):
            casts.update(matmul=0, once=0)
            weight_copies[0] = 0
            losses.append(run_step(tokens[:, :-1], tokens[:, 1:]))
            grads.append([p.grad.clone() for p in model.parameters()])
            counted = dict(casts)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Each forward and each backward of the 2 micro-batches casts every weight, or once.
        assert counted == ({"matmul": 4 * len(names), "once": 0} if not once else
                           {"matmul": 0, "once": len(names)})  # fmt: skip
        # One copy per layer in each micro-batch's backward (2 a step), or none.
        assert weight_copies[0] == (0 if once else 2 * len(names)), weight_copies
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        if once:
            assert all(m.weight_fp8 is None for m in model.modules()
                       if isinstance(m, cache.Float8LinearCastOnce))  # fmt: skip
            assert casts["matmul"] == len(names)  # evaluation: torchao's own cast
        runs[once] = losses, grads, list(model.parameters()), logits
    (want_losses, want_grads, want_params, want_logits), got = runs[False], runs[True]
    assert [float(x) for x in got[0]] == [float(x) for x in want_losses]
    for step_grads, step_want in zip(got[1], want_grads):
        assert all(torch.equal(g, w) for g, w in zip(step_grads, step_want))
    assert all(torch.equal(p, w) for p, w in zip(got[2], want_params))
    assert torch.equal(got[3], want_logits)


@needs_torchao
def test_weights_cast_once_compile_with_the_blocks_on_cpu():
    """Compiled blocks (train.compile) with train.fp8_weight_cache: the matmul reading the
    cached casts traces into the blocks' graphs without a graph break, nothing compiles after
    the second step, and the losses are those of the compiled blocks casting every time."""
    from toolkit.activation_checkpoint import apply_compile

    r = recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}})
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    counters = torch._dynamo.utils.counters
    runs = []
    for once in (False, True):
        torch.manual_seed(0)
        model = build_model(r, ByteTokenizer())
        apply_fp8(model, device=CPU, engine="torchao", check_device=False, layers="all",
                  cast_weights_once=once)  # fmt: skip
        apply_compile(model, True)
        run_step = two_micro_batch_steps(model, cast_weights_once=once)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
        breaks, losses, frames = sum(counters["graph_break"].values()), [], []
        for _ in range(3):
            losses.append(float(run_step(tokens[:, :-1], tokens[:, 1:])))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            frames.append(counters["frames"]["ok"])
        assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
        assert frames[2] == frames[1] > 0, frames
        runs.append(losses)
    assert runs[1] == runs[0]


@needs_torchao
def test_the_compiled_weight_cast_gives_torchaos_bits():
    """train.fp8_weight_cache casts through a compiled cast on CUDA (one graph for every weight
    shape): the same float8 bits and scale as torchao's eager cast, on two shapes; and so for
    the compiled column-major copy."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    from toolkit.fp8_weight_cache import Float8LinearCastOnce, cast_once_linears

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.Linear(48, 32, bias=False))
    config = Float8LinearConfig.from_recipe_name("tensorwise")
    assert cast_once_linears(convert_to_float8_training(model, config=config)) == ["0", "1"]
    torch._dynamo.reset()  # compiled afresh here, whatever ran before
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for layer in model:
        assert isinstance(layer, Float8LinearCastOnce)
        with torch.no_grad():
            eager, compiled = layer.cast_weight(compiled=False), layer.cast_weight(compiled=True)
        assert compiled._data.dtype == eager._data.dtype == torch.float8_e4m3fn
        assert torch.equal(compiled._data.view(torch.uint8), eager._data.view(torch.uint8))
        assert torch.equal(compiled._scale, eager._scale)
        # Its column-major copy, compiled (a tiled transpose) and eager: the same bytes, layout
        # and scale.
        cm, cm_eager = layer.column_major(compiled, compiled=True), layer.column_major(eager, False)
        assert isinstance(cm, Float8TrainingTensor) and cm.shape == eager.shape
        assert cm._data.stride() == cm_eager._data.stride() == (1, eager.shape[0])
        assert torch.equal(cm._data.view(torch.uint8), cm_eager._data.view(torch.uint8))
        assert cm._scale is compiled._scale and cm._gemm_input_role == eager._gemm_input_role
    # One graph each for the cast and the copy, whatever the shape.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2


@needs_torchao
def test_the_cast_benchmark_compares_both_ways_on_the_same_bits(monkeypatch):
    """benchmarks/fp8_weight_cast.py's A/B, run on the CPU (its timer and device swapped for
    the host's): the per-layer casts and cast_all over the tiny recipe's float8 linears give the
    same bits, and each way is timed."""
    import argparse
    import time

    root = Path(__file__).resolve().parents[1]
    bench = load_benchmark("fp8_weight_cast", monkeypatch)

    def host_timed(fn, device):
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return ms, ms

    convert = bench.apply_fp8
    monkeypatch.setattr(bench, "timed", host_timed)
    monkeypatch.setattr(bench, "resolve_device", lambda name: CPU)
    monkeypatch.setattr(bench, "apply_fp8", partial(convert, check_device=False))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "cpu")
    args = argparse.Namespace(recipe=str(root / "recipes/tiny_hybrid.toml"), set=[],
                              layers="all", warmup=1, steps=2)  # fmt: skip
    result = bench.benchmark(args)
    assert result["same_bits"] is True
    assert result["layers"] > 0 and result["weights"] > 0
    assert set(result["ms"]) == {"per_layer", "cast_all"}
    assert all(ms > 0 for ms in result["ms"].values())


@needs_torchao
@pytest.mark.parametrize("compiled", [False, True])
def test_all_weights_cast_at_once_give_each_layers_torchao_bits(compiled):
    """cast_all (cast_weights_once's cast: one multi-tensor amax pass, then one pass a weight
    writing both layouts; compiled on CUDA) gives each layer torchao's own cast of its weight:
    the same float8 bytes and scale, row-major and column-major, also with the scales rounded
    to powers of 2 (for all layers, or one among others) and on weights whose amaxes differ by
    orders of magnitude."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from toolkit.fp8_weight_cache import cast_all, cast_once_linears

    for round_scales in (False, True, "mixed"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.Linear(48, 32, bias=False),
                              nn.Linear(32, 24, bias=False))  # fmt: skip
        with torch.no_grad():
            model[1].weight.mul_(1e-3)
            model[2].weight.mul_(300.0)
        config = Float8LinearConfig.from_recipe_name("tensorwise")
        config = dataclasses.replace(config, round_scales_to_power_of_2=round_scales is True)
        cast_once_linears(convert_to_float8_training(model, config=config))
        if round_scales == "mixed":  # the middle layer's scales rounded, the others' not
            model[1].config = dataclasses.replace(config, round_scales_to_power_of_2=True)
        torch._dynamo.reset()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        cast_all(list(model), compiled=compiled)
        for layer in model:
            with torch.no_grad():
                want = layer.cast_weight(compiled=False)
            want_cm = layer.column_major(want, compiled=False)
            for got, expected in ((layer.weight_fp8, want), (layer.weight_fp8_cm, want_cm)):
                assert got._data.dtype == torch.float8_e4m3fn
                assert got._data.stride() == expected._data.stride()
                assert torch.equal(got._data.view(torch.uint8), expected._data.view(torch.uint8))
                assert torch.equal(got._scale, expected._scale)
                assert got._gemm_input_role == expected._gemm_input_role
                assert got._orig_dtype == expected._orig_dtype
            assert layer.weight_fp8_cm._scale is layer.weight_fp8._scale
        # Compiled: one graph for every shape (with one config, as a model has; mixed ones hand
        # in scales that are views of differently sized tensors, a second graph).
        new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        assert new_graphs == (0 if not compiled else 1 if round_scales != "mixed" else 2)


@needs_torchao
@pytest.mark.parametrize("reuse", [True, False])
def test_weight_gradient_reads_the_forwards_float8_input(reuse, monkeypatch):
    """train.fp8_weight_cache's linears: the weight gradient's product reads the input's float8
    cast made in the forward, so the backward casts only the output gradient: eagerly no cast
    of the input, compiled one amax reduction a linear in the backward graph (the gradient's),
    where torchao's casts the input again (with reuse_input_cast off, the benchmark's A/B:
    two). The output gradient is cast once a backward either way, where torchao's eager one
    casts it for each of its two products. Output and gradients bit for bit torchao's."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_training_tensor import GemmInputRole

    import toolkit.fp8_weight_cache as cache

    monkeypatch.setattr(cache.Float8LinearCastOnce, "reuse_input_cast", reuse)
    casts = []  # the role of each activation's or gradient's cast
    cast = cache.hp_tensor_to_float8_dynamic
    monkeypatch.setattr(
        cache,
        "hp_tensor_to_float8_dynamic",
        lambda *a, **k: casts.append(k["gemm_input_role"]) or cast(*a, **k),
    )
    torch.manual_seed(0)
    torchaos = nn.Sequential(nn.RMSNorm(64), nn.Linear(64, 128, bias=False), nn.ReLU(),
                             nn.Linear(128, 64, bias=False))  # fmt: skip
    config = Float8LinearConfig.from_recipe_name("tensorwise")
    convert_to_float8_training(torchaos, config=config)
    cached = copy.deepcopy(torchaos)
    assert cache.cast_once_linears(cached) == ["1", "3"]
    x = torch.randn(2, 16, 64)

    def run(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), cache.cast_weights_once(model):
            out = model(x)
            out.float().pow(2).mean().backward()
        return out, [p.grad for p in model.parameters()]

    want, got = run(torchaos), run(cached)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(g, w) for g, w in zip(got[1], want[1]))
    # The cached linears' casts: the input's one a forward, and one a backward without the
    # reuse; the output gradient's one a backward.
    casts.clear()
    run(cached)
    assert casts.count(GemmInputRole.INPUT) == (2 if reuse else 4), casts
    assert casts.count(GemmInputRole.GRAD_OUTPUT) == 2, casts

    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        def keep(graph: torch.fx.GraphModule, _: list) -> object:
            graphs.append(graph)
            return make_boxed_func(graph)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep,
                                     partition_fn=min_cut_rematerialization_partition)  # fmt: skip

    monkeypatch.setattr(cache, "hp_tensor_to_float8_dynamic", cast)  # not counted in graphs
    torch._dynamo.reset()
    compiled = run(torch.compile(cached, backend=capture, fullgraph=True))
    assert torch.equal(compiled[0], want[0])
    assert all(torch.equal(g, w) for g, w in zip(compiled[1], want[1]))
    forward, backward = graphs
    amax = [torch.ops.aten.max.default, torch.ops.aten.amax.default]
    reductions = [n for n in backward.graph.nodes if n.target in amax]
    assert len(reductions) == (2 if reuse else 4), backward.code


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
         and importlib.util.find_spec("torchao") is not None),
    reason="needs torchao and a GPU with compute capability >= 8.9",
)  # fmt: skip
def test_weights_cast_once_train_as_torchao_compiled_on_gpu():
    """On the GPU, through parallelize with compiled blocks and the float8 output layer (the
    benchmark's setting): 4 steps of 2 micro-batches with train.fp8_weight_cache track those
    without it (the casts compiled apart, not fused into the blocks: fp32 rounding apart), and
    after the first steps nothing compiles again (the cast weights are new tensors each step)."""
    from toolkit.distributed import ParallelEnv
    from toolkit.parallel.parallelize import parallelize
    from toolkit.parallel.runtime import clip_and_step

    env = ParallelEnv(0, 1, 0, CUDA, tp=1, pp=1, dp=1)
    tokens = torch.randint(0, 256, (2, 65), device=CUDA)
    runs = []
    for once in (False, True):
        train = {"steps": 4, "device": "cuda", "precision": "fp8", "fp8_engine": "torchao",
                 "fp8_layers": "all", "compile": True, "micro_batch_size": 1,
                 "global_batch_size": 2, "fp8_weight_cache": once}  # fmt: skip
        r = recipe_from_dict({"model": FP8_MODEL, "train": train})
        torch.manual_seed(0)
        model = build_model(r, ByteTokenizer(), CUDA)
        parallel = parallelize(model, r, env)
        params = list(parallel.module.parameters())
        losses, compiled = [], []
        for _ in range(4):
            losses.append(float(parallel.run_step(tokens[:, :-1], tokens[:, 1:])))
            clip_and_step(parallel.optimizer, params, 1.0, env)
            parallel.optimizer.zero_grad(set_to_none=True)
            compiled.append(torch._dynamo.utils.counters["frames"]["ok"])
        assert compiled[-1] == compiled[1], compiled  # no compiles after the second step
        runs.append(losses)
    torch.testing.assert_close(runs[1], runs[0], rtol=2e-3, atol=0)
    assert runs[1][-1] < runs[1][0]


def test_weight_cache_is_refused_where_it_cannot_run():
    """train.fp8_weight_cache casts tensorwise weights through torchao: rowwise scaling or
    Transformer Engine named in the recipe are recipe errors; apply_fp8 refuses the same."""
    base = {"model": FP8_MODEL}
    ok = {"steps": 1, "precision": "fp8", "fp8_weight_cache": True}
    assert recipe_from_dict(base | {"train": ok}).train.fp8_weight_cache
    for other in ({"fp8_recipe": "rowwise"}, {"fp8_engine": "transformer_engine"}):
        with pytest.raises(RecipeError, match=r"^train\.fp8_weight_cache: casts torchao's"):
            recipe_from_dict(base | {"train": ok | other})
    if importlib.util.find_spec("torchao") is not None:
        model = HybridLM(recipe_from_dict(base | {"train": {"steps": 1}}).model, 100)
        with pytest.raises(PrecisionError, match=r"train\.fp8_weight_cache .*fp8_recipe='rowwise'"):
            apply_fp8(model, device=CPU, engine="torchao", recipe="rowwise", check_device=False,
                      cast_weights_once=True)  # fmt: skip


@needs_torchao
def test_torchao_converted_checkpoint_round_trip(tmp_path):
    """A float8-converted model saves the same checkpoint a bf16 one does, and loads one."""
    r = recipe(tmp_path)
    model = build_model(r, ByteTokenizer())
    apply_fp8(model, device=CPU, engine="torchao", check_device=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from a fresh init
    path = save_model_checkpoint(tmp_path / "ckpt", model, r, step=3)
    loaded, _, _ = model_from_checkpoint(str(path))  # a plain model
    want = model.state_dict()
    rows = model.vocab_size  # checkpoints keep the real vocabulary rows, not the padding

    def check(got: dict) -> None:
        assert list(got) == list(want)
        for name, t in got.items():
            keep = slice(rows) if name in ("embedding.weight", "output_layer.weight") else ...
            assert torch.equal(t[keep], want[name][keep]), name

    check(loaded.state_dict())
    # and back into a converted model
    other = build_model(r, ByteTokenizer())
    apply_fp8(other, device=CPU, engine="torchao", check_device=False)
    restore(path, other, None, RankView(other.cfg, other.vocab_size))
    check(other.state_dict())


def test_fp8_engine_with_both_installed_follows_compilation(monkeypatch):
    """Both libraries: torchao for compiled blocks (faster there on the H200), Transformer
    Engine for eager ones (torchao's float8 is 0.6x bf16 uncompiled); one: that one."""
    import toolkit.precision as precision

    found = {"transformer_engine": True, "torchao": object()}
    monkeypatch.setattr(precision, "_te_imports", lambda: found["transformer_engine"])
    monkeypatch.setattr(precision.importlib.util, "find_spec", lambda name: found.get(name))
    assert fp8_engine(compiled=True) == "torchao"
    assert fp8_engine(compiled=False) == "transformer_engine"
    found["torchao"] = None
    assert fp8_engine(compiled=True) == "transformer_engine"
    found["transformer_engine"], found["torchao"] = False, object()
    assert fp8_engine(compiled=False) == "torchao"
    found["torchao"] = None
    assert fp8_engine() is None


def test_trainer_tells_auto_whether_blocks_are_compiled(tmp_path, monkeypatch):
    import toolkit.precision as precision
    from toolkit.parallel.parallelize import apply_float8

    seen = []
    monkeypatch.setattr(precision, "fp8_engine", lambda compiled=False: seen.append(compiled))
    monkeypatch.setattr(precision, "check_fp8_device", lambda device: None)
    for compile_spec, want in ((True, True), (["mlp"], True), (False, False)):
        r = recipe(tmp_path, precision="fp8", compile=compile_spec)
        model = build_model(r, ByteTokenizer())
        with pytest.raises(PrecisionError):  # the stand-in finds no engine; the call is the test
            apply_float8(model, r.train, CPU)
        assert seen.pop() is want


@pytest.mark.parametrize(
    "engine, fp8_recipe", [("torchao", "delayed"), ("transformer_engine", "rowwise")]
)
def test_recipe_of_the_other_engine_is_a_recipe_error(engine, fp8_recipe):
    table = {"model": FP8_MODEL, "train": {"steps": 1, "precision": "fp8"}}
    overrides = [f"train.fp8_engine='{engine}'", f"train.fp8_recipe='{fp8_recipe}'"]
    with pytest.raises(RecipeError, match=rf"^train\.fp8_recipe: '{fp8_recipe}' is"):
        recipe_from_dict(table, overrides)
    # only checked when fp8 runs
    recipe_from_dict(table, overrides + ["train.precision='bf16'"])


def test_delayed_scaling_takes_the_recipes_amax_history(monkeypatch):
    """train.fp8_amax_history and train.fp8_amax_algo reach Transformer Engine's DelayedScaling
    (a stand-in module here: TE is not installed on CPUs) through the step's autocast; the
    defaults are TE's own (1024, max); other recipes refuse them by name."""
    import sys
    import types

    import toolkit.parallel.parallelize as parallelize_module
    import toolkit.precision as precision
    from toolkit.distributed import ParallelEnv

    fake = types.ModuleType("transformer_engine.common.recipe")
    fake.DelayedScaling = lambda **kwargs: kwargs  # what TE was asked to make
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common",
                        types.SimpleNamespace(recipe=fake))  # fmt: skip
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", fake)
    precision.te_recipe.cache_clear()
    try:
        assert precision.te_recipe("delayed") == {"amax_history_len": 1024,
                                                  "amax_compute_algo": "max"}  # fmt: skip
        assert precision.te_recipe("delayed", (1, "most_recent")) == {
            "amax_history_len": 1, "amax_compute_algo": "most_recent"}  # fmt: skip
    finally:
        precision.te_recipe.cache_clear()
    # The trainer's step passes the recipe's history to the autocast it enters.
    seen = []
    real = parallelize_module.autocast_context
    monkeypatch.setattr(parallelize_module, "autocast_context",
                        lambda *a: seen.append(a[3:]) or real(*a))  # fmt: skip
    table = {"model": FP8_MODEL, "train": {"steps": 1, "micro_batch_size": 1,
             "global_batch_size": 1, "precision": "bf16", "device": "cpu"}}  # fmt: skip
    r = recipe_from_dict(table, ["train.fp8_recipe='delayed'", "train.fp8_amax_history=16",
                                 "train.fp8_amax_algo='most_recent'"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer())
    parallel = parallelize_module.parallelize(model, r, ParallelEnv(0, 1, 0, CPU, tp=1, pp=1,
                                                                    dp=1))  # fmt: skip
    tokens = torch.randint(0, 100, (1, FP8_MODEL["seq_length"] + 1))
    parallel.run_step(tokens[:, :-1], tokens[:, 1:])
    assert seen and set(seen) == {("delayed", (16, "most_recent"))}
    for key, value in (("fp8_amax_history", "16"), ("fp8_amax_algo", "'most_recent'")):
        with pytest.raises(RecipeError, match=rf"^train\.{key}: is read by train\.fp8_recipe="):
            recipe_from_dict(table, [f"train.{key}={value}"])


def test_auto_engine_refuses_a_recipe_it_cannot_run(monkeypatch):
    import toolkit.precision as precision

    monkeypatch.setattr(precision, "fp8_engine", lambda compiled=False: "torchao")
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)
    with pytest.raises(
        PrecisionError, match=r"train\.fp8_recipe='delayed' does not run with torchao"
    ):
        apply_fp8(model, device=CPU, recipe="delayed", check_device=False)


def test_requested_engine_that_does_not_import_names_the_key(monkeypatch):
    import toolkit.precision as precision

    monkeypatch.setattr(precision, "_te_imports", lambda: False)
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)
    with pytest.raises(PrecisionError, match=r"train\.fp8_engine='transformer_engine' but"):
        apply_fp8(model, device=CPU, engine="transformer_engine", check_device=False)


def store_arrays(path) -> list[str]:
    return sorted(
        str(m.parent.relative_to(path))
        for m in path.rglob("zarr.json")
        if json.loads(m.read_text()).get("node_type") == "array"
    )


class LinearWithExtraState(nn.Linear):
    """An nn.Linear carrying module extra state the way te.Linear carries its FP8 scaling history
    (`_extra_state` in state_dict): the checkpoint must not store it."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.arange(8, dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        pass


def test_checkpoint_stores_parameters_not_module_extra_state(tmp_path):
    r = recipe(tmp_path)
    torch.manual_seed(0)
    plain = build_model(r, ByteTokenizer())
    model = copy.deepcopy(plain)
    keep = fp8_filter(model)
    for name in [n for n, m in model.named_modules() if keep(m, n)]:
        parent, _, child = name.rpartition(".")
        old = getattr(model.get_submodule(parent), child)
        new = LinearWithExtraState(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        setattr(model.get_submodule(parent), child, new)
    assert any(k.endswith("_extra_state") for k in model.state_dict())
    a = save_model_checkpoint(tmp_path / "a", model, r, step=1)
    b = save_model_checkpoint(tmp_path / "b", plain, r, step=1)
    assert store_arrays(a) == store_arrays(b)
    assert not any("extra_state" in name for name in store_arrays(a))


def te_recipe_dict(tmp_path=None, **train) -> dict:
    table = {
        "model": FP8_MODEL | {"kernels": "reference"},
        "train": {"steps": 1, "device": "cuda", "precision": "fp8", "lr": 1e-3}
        | {"fp8_engine": "transformer_engine"}
        | train,
    }
    if tmp_path is not None:
        table["checkpoint"] = {"dir": str(tmp_path / "ckpt")}
    return table


@needs_te_gpu
def test_te_conversion_keeps_names_and_weights():
    import transformer_engine.pytorch as te

    r = recipe_from_dict(te_recipe_dict())
    torch.manual_seed(0)
    plain = build_model(r, ByteTokenizer(), CUDA)
    model = copy.deepcopy(plain)
    engine, names = apply_fp8(model, device=CUDA, engine="transformer_engine")
    assert engine == "transformer_engine"
    swapped = [n for n, m in model.named_modules() if isinstance(m, te.Linear)]
    assert swapped == names and len(names) >= 6
    assert not any(isinstance(m, te.Linear) for m in model.layers[0].modules())
    got, want = dict(model.named_parameters()), dict(plain.named_parameters())
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@needs_te_gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("fp8_recipe", ["tensorwise", "delayed"])
def test_te_fp8_training_steps_on_gpu(fp8_recipe, compile):
    """Optimizer steps through the trainer's transforms and autocast with te.Linear in FP8: the
    swapped layers ran FP8, the loss is finite and falls, and the first loss is bf16's."""
    import transformer_engine.pytorch as te

    from toolkit.activation_checkpoint import apply_ac, apply_compile
    from toolkit.parallel.parallelize import apply_float8

    r = recipe_from_dict(te_recipe_dict(fp8_recipe=fp8_recipe, compile=compile))
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer(), CUDA)
    ref = copy.deepcopy(model)
    engine = apply_float8(model, r.train, CUDA)
    apply_ac(model, r.train.activation_checkpointing)
    apply_compile(model, r.train.compile)
    assert engine == "transformer_engine"
    optimizer = build_optimizer(model, r.train)
    tokens = torch.randint(0, model.vocab_size, (2, 65), device=CUDA)
    with torch.autocast("cuda", torch.bfloat16):
        want = cross_entropy(ref(tokens[:, :-1]), tokens[:, 1:], ref.vocab_size).item()
    losses = []
    for _ in range(5):
        with autocast_context("fp8", CUDA, engine, fp8_recipe):
            logits = model(tokens[:, :-1])
        loss = cross_entropy(logits, tokens[:, 1:], model.vocab_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    layers = [m for m in model.modules() if isinstance(m, te.Linear)]
    assert layers and all(m.fp8 for m in layers)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses
    assert abs(losses[0] - want) < 0.05, (losses[0], want)


@needs_te_gpu
def test_te_checkpoint_round_trip_on_gpu(tmp_path):
    """A TE-converted model's checkpoint is a bf16 model's (no _extra_state) and loads as one;
    a bf16 checkpoint loads into a TE-converted model."""
    r = recipe_from_dict(te_recipe_dict(tmp_path))
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer(), CUDA)
    apply_fp8(model, device=CUDA, engine="transformer_engine")
    tokens = torch.randint(0, model.vocab_size, (2, 65), device=CUDA)
    with autocast_context("fp8", CUDA, "transformer_engine", "delayed"):
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], model.vocab_size).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert any(k.endswith("_extra_state") for k in model.state_dict())
    te_path = save_model_checkpoint(tmp_path / "te", model, r, step=1)
    plain = build_model(r, ByteTokenizer(), CUDA)
    bf16_path = save_model_checkpoint(tmp_path / "bf16", plain, r, step=1)
    assert store_arrays(te_path) == store_arrays(bf16_path)
    rows = model.vocab_size

    def same(a: nn.Module, b: nn.Module) -> None:
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert list(pa) == list(pb)
        for n, t in pa.items():
            keep = slice(rows) if n in ("embedding.weight", "output_layer.weight") else ...
            assert torch.equal(t.detach().cpu()[keep], pb[n].detach().cpu()[keep]), n

    loaded, _, _ = model_from_checkpoint(str(te_path))
    same(loaded, model)
    other = build_model(r, ByteTokenizer(), CUDA)
    apply_fp8(other, device=CUDA, engine="transformer_engine")
    restore(bf16_path, other, None, RankView(other.cfg, other.vocab_size))
    same(other, plain)


@needs_te_gpu
def test_te_fused_norms_compute_the_unfused_block_and_keep_parameters(tmp_path):
    """train.te_fused_norm: each FP8 block's pre-norm moves into te.LayerNormLinear sharing the
    norm's Parameter: names, parameter count and checkpoints stay; loss and the norm weights'
    gradients match the unfused model's (bf16, and FP8 within FP8's own noise); training falls."""
    import transformer_engine.pytorch as te

    from toolkit.parallel.parallelize import apply_float8
    from toolkit.precision import FIRST_LINEAR, NormInNextLinear

    table = te_recipe_dict(tmp_path, te_fused_norm=True)
    table["model"] = table["model"] | {"mamba_head_dim": 8}  # in_proj rows a multiple of 16
    r = recipe_from_dict(table)
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer(), CUDA)
    unfused = copy.deepcopy(model)
    apply_fp8(unfused, device=CUDA, engine="transformer_engine")
    assert apply_float8(model, r.train, CUDA, tp=1) == "transformer_engine"
    fused = [n for n, m in model.named_modules() if isinstance(m, te.LayerNormLinear)]
    kinds = [model.layers[i].kind for i in range(1, 5)]
    assert kinds == ["*", "-", "M", "-"]
    assert fused == [f"layers.{i}.mixer.{FIRST_LINEAR[k]}" for i, k in enumerate(kinds, 1)]
    assert isinstance(model.layers[3].norm, NormInNextLinear)
    assert model.layers[3].mixer.in_proj.layer_norm_weight is model.layers[3].norm.weight
    assert not isinstance(model.layers[0].norm, NormInNextLinear)  # bf16 first block
    got, want = dict(model.named_parameters()), dict(unfused.named_parameters())
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    tokens = torch.randint(0, model.vocab_size, (2, 65), device=CUDA)

    def loss_and_norm_grads(m, precision):
        m.zero_grad(set_to_none=True)
        with autocast_context(precision, CUDA, "transformer_engine", "tensorwise"):
            logits = m(tokens[:, :-1])
        loss = cross_entropy(logits, tokens[:, 1:], m.vocab_size)
        loss.backward()
        return loss.item(), torch.cat([m.layers[i].norm.weight.grad for i in (1, 2, 3, 4)])

    for precision, tol in (("bf16", 2e-3), ("fp8", 2e-2)):
        (lf, gf), (lu, gu) = (loss_and_norm_grads(m, precision) for m in (model, unfused))
        assert abs(lf - lu) < tol, (precision, lf, lu)
        rel = (gf - gu).norm() / gu.norm()
        assert rel < (0.05 if precision == "bf16" else 0.15), (precision, rel.item())
    te_path = save_model_checkpoint(tmp_path / "fused", model, r, step=1)
    plain_path = save_model_checkpoint(tmp_path / "plain", unfused, r, step=1)
    assert store_arrays(te_path) == store_arrays(plain_path)
    optimizer = build_optimizer(model, r.train)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_and_norm_grads(model, "fp8")[0])
        optimizer.step()
    assert losses[-1] < losses[0] - 0.05, losses


@needs_te_gpu
@pytest.mark.parametrize("fp8_recipe", ["tensorwise", "delayed"])
def test_te_activation_checkpointing_recomputes_the_fp8_forward(fp8_recipe):
    """train.activation_checkpointing with Transformer Engine: the blocks recompute through TE's
    checkpoint, inside the FP8 autocast with the forward pass's scales, so the loss and every
    gradient equal those of the same model without checkpointing."""
    import transformer_engine.pytorch as te

    from toolkit.activation_checkpoint import apply_ac

    r = recipe_from_dict(te_recipe_dict(fp8_recipe=fp8_recipe))
    torch.manual_seed(0)
    plain = build_model(r, ByteTokenizer(), CUDA)
    apply_fp8(plain, device=CUDA, engine="transformer_engine", recipe=fp8_recipe)
    model = copy.deepcopy(plain)
    assert apply_ac(model, "full", "transformer_engine") == list(range(6))
    tokens = torch.randint(0, model.vocab_size, (2, 65), device=CUDA)
    results = []
    for m in (plain, model):
        with autocast_context("fp8", CUDA, "transformer_engine", fp8_recipe):
            loss = cross_entropy(m(tokens[:, :-1]), tokens[:, 1:], m.vocab_size)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in m.named_parameters()}))
    (want_loss, want), (got_loss, got) = results
    assert any(isinstance(m, te.Linear) and m.fp8 for m in model.modules())
    assert abs(got_loss - want_loss) < 1e-6, (got_loss, want_loss)
    for name, g in want.items():
        rel = ((got[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, (name, rel)
