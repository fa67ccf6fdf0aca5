"""train.bf16_weight_cache: each linear's fp32 weight cast to bf16 once per optimizer step.

Against the same training without it (autocast casting every weight in each micro-batch's
forward): bit for bit the same losses, gradients and weights over steps of several
micro-batches, eager and with compiled blocks; and the casts counted: once a step, not once a
micro-batch. With the Triton AdamW (under Triton's interpreter on CPUs, in a subprocess) the
update writes the casts: none after the first step's, unless a weight changed in place.
"""

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_grad_accumulation import MICRO_BATCHES, assert_same_training, train
from tests.test_step_graph import interpret
from toolkit.config import RecipeError, load_recipe
from toolkit.grad_accumulation import LinearIntoGrad


class WeightCasts(TorchDispatchMode):
    """Records where each fp32 -> bf16 copy reads from; count() says how many read a weight of
    the given linears (autocast's casts and the cache's alike, into new tensors or in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args else None
        if func is torch.ops.aten.copy_.default:  # copy_(into, source)
            into, source = args[0], args[1]
            if into.dtype != torch.bfloat16:
                source = None
        elif not (
            func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
        ):
            source = None
        if source is not None and source.dtype == torch.float32:
            try:
                self.sources.append(source.untyped_storage().data_ptr())
            except RuntimeError:  # a tensor subclass's (float8's) storage: not a weight's
                pass
        return func(*args, **kwargs)

    def count(self, linears: list[LinearIntoGrad]) -> int:
        weights = {m.weight.untyped_storage().data_ptr() for m in linears}
        return sum(source in weights for source in self.sources)


def counted_training(cache: bool, steps: int = 2, **keys: object) -> tuple:
    """train() with train.bf16_weight_cache = `cache`: its results, its LinearIntoGrad
    linears, and how many times their weights were cast to bf16."""
    with WeightCasts() as casts:
        run = train(True, steps=steps, bf16_weight_cache=cache, **keys)
    linears = [m for m in run[3].module.modules() if isinstance(m, LinearIntoGrad)]
    return run, linears, casts.count(linears)


def test_weights_cast_once_a_step_train_as_autocast_casts():
    want, _, autocast_casts = counted_training(False, precision="bf16")
    got, linears, cached_casts = counted_training(True, precision="bf16")
    # Every linear's weight in each micro-batch's forward without; once a step with.
    assert autocast_casts == len(linears) * MICRO_BATCHES * 2
    assert cached_casts == len(linears) * 2
    assert_same_training(got, want)
    assert all(m.weight_cast is None for m in linears)  # dropped after each step


def test_weights_cast_once_in_compiled_blocks(monkeypatch):
    """Compiled blocks read the cast as a buffer: the same training, no graph break, no more
    compiles; and it is the cast they read (a cast scaled by 2 changes the losses)."""
    import toolkit.bf16_weight_cache as cache

    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    frames = [counters["frames"]["ok"]]
    want = train(True, steps=3, compile=True)
    frames.append(counters["frames"]["ok"])
    got = train(True, steps=3, compile=True, bf16_weight_cache=True)
    frames.append(counters["frames"]["ok"])
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    # As many compiles as without: a new cast each step is a new input, not a recompile.
    assert frames[2] - frames[1] == frames[1] - frames[0] > 0, frames
    assert_same_training(got, want)
    cast = cache.cast
    monkeypatch.setattr(cache, "cast", lambda weight, dtype: cast(weight, dtype) * 2)
    doubled = train(True, steps=3, compile=True, bf16_weight_cache=True)
    assert all(a != b for a, b in zip(doubled[0], want[0])), (doubled[0], want[0])


def test_outside_a_step_the_linears_cast_as_autocast():
    """Evaluation in fp32 (no autocast) with a cast left in place reads the fp32 weight."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4, bias=False)
    from toolkit.bf16_weight_cache import cast_weights_once
    from toolkit.grad_accumulation import fuse_grad_accumulation

    fuse_grad_accumulation(torch.nn.Sequential(linear))
    x = torch.randn(3, 8)
    want = linear(x)
    with cast_weights_once(linear) as cast:
        assert cast == 1 and linear.weight_cast.dtype == torch.bfloat16
        assert torch.equal(linear(x), want)  # fp32: the cast is not the compute dtype
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight))
    assert linear.weight_cast is None
    assert "weight_cast" not in linear.state_dict()


@pytest.mark.long
def test_the_cache_trains_as_autocast_under_tp_and_sp(tmp_path):
    """Two TP ranks with sequence parallelism (gloo), bf16, 2 micro-batches a step: the
    sharded weights cast once a step give the losses of autocast's casts, bit for bit."""
    from tests.test_grad_accumulation import tp2_sp_losses

    runs = tp2_sp_losses(tmp_path, "train.bf16_weight_cache")
    assert runs["true"] == runs["false"]


def test_the_key_needs_the_fused_linears_and_bf16():
    assert load_recipe("recipes/tiny_hybrid.toml", ["train.bf16_weight_cache=true",
                                                    'train.precision="bf16"'])  # fmt: skip
    for bad in (['train.precision="fp32"'], ["train.fused_grad_accumulation=false"]):
        with pytest.raises(RecipeError, match="train.bf16_weight_cache"):
            load_recipe("recipes/tiny_hybrid.toml",
                        ["train.bf16_weight_cache=true", 'train.precision="bf16"', *bad])  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
def test_with_float8_the_bf16_linears_cast_once_beside_the_float8_cache(monkeypatch):
    """precision='fp8' with fp8_layers='inner': the first and last blocks and the output layer
    stay bf16. Both caches at once (StepRunner enters both): the bf16 linears' weights cast
    once a step, the float8 ones as train.fp8_weight_cache alone casts them; the same
    training as the float8 cache alone."""
    monkeypatch.setattr("toolkit.precision.check_fp8_device", lambda device: None)
    fp8 = {"precision": "fp8", "fp8_engine": "torchao", "fp8_layers": "inner",
           "fp8_weight_cache": True}  # fmt: skip
    want, _, autocast_casts = counted_training(False, **fp8)
    got, bf16, cached_casts = counted_training(True, **fp8)
    assert bf16 and cached_casts == len(bf16) * 2
    assert autocast_casts == len(bf16) * MICRO_BATCHES * 2
    assert_same_training(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_cast_once_in_compiled_blocks_on_gpu():
    """On the GPU, compiled blocks in bf16: the same casts read by the same kernels, so the
    training tracks autocast's within fp32 rounding (GPU kernels need not be deterministic)."""
    cuda = torch.device("cuda")
    want = train(True, steps=3, device=cuda, compile=True)
    got = train(True, steps=3, device=cuda, compile=True, bf16_weight_cache=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    for p, w in zip(got[2], want[2]):
        torch.testing.assert_close(p, w, rtol=1e-3, atol=1e-5)


UPDATED = """
import torch
from tests.test_bf16_weight_cache import WeightCasts, counted_training
from tests.test_grad_accumulation import MICRO_BATCHES, assert_same_training
from toolkit.triton_adamw import TritonAdamW

keys = {"precision": "bf16", "adamw_kernel": "triton", "steps": 3}
want, _, autocast_casts = counted_training(False, **keys)
got, linears, casts = counted_training(True, **keys)
assert isinstance(got[3].optimizer, TritonAdamW)
assert autocast_casts == len(linears) * MICRO_BATCHES * 3
assert casts == len(linears), casts  # the first step's; the update wrote the others
assert_same_training(got, want)

# A weight changed in place between steps (its version counter moves) is cast again, the others
# read as the update wrote them: every copy the step reads is its weight's cast.
parallel, updated = got[3], got[3].optimizer._casts
edited = linears[1].weight
with torch.no_grad():
    edited.add_(1e-2)
tokens = torch.randint(0, 256, (MICRO_BATCHES, 17), generator=torch.Generator().manual_seed(2))
with WeightCasts() as recast:
    parallel.run_step(tokens[:, :-1], tokens[:, 1:])
assert recast.count(linears) == 1 and recast.count([linears[1]]) == 1
for layer in linears:
    assert torch.equal(updated.copy_of(layer.weight), layer.weight.to(torch.bfloat16))

# The trainer with train.step_graph: the captured update writes the copies the next step reads.
import tempfile
from pathlib import Path
from tests.test_train import RANDOM_TEXT, make_recipe
from toolkit.train import train

with tempfile.TemporaryDirectory() as tmp:
    keys = {"adamw_kernel": "triton", "precision": "bf16", "steps": 5}
    want = train(make_recipe(Path(tmp, "a"), RANDOM_TEXT, **keys))
    got = train(make_recipe(Path(tmp, "b"), RANDOM_TEXT, step_graph=True, bf16_weight_cache=True,
                            **keys))  # fmt: skip
    assert got.losses == want.losses, (got.losses, want.losses)
print("the update's casts agree")
"""


def test_the_triton_update_writes_the_casts_under_the_interpreter():
    """train.bf16_weight_cache with the Triton AdamW (under Triton's interpreter): 3 steps of 3
    micro-batches bit for bit autocast's, with the weights cast in the first step only (the
    update writes each new weight's bf16 copy); a weight edited in place between steps is cast
    again, and every copy a step reads is its weight's cast; and the trainer's step graph with
    the cache, 5 steps, bit for bit the losses without either."""
    interpret(UPDATED, "the update's casts agree")
