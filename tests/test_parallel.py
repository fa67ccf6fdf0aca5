"""Tensor parallelism on real CPU processes (gloo) against the single-process model."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import tiny_model_config
from toolkit.config import ParallelConfig
from toolkit.distributed import init_distributed
from toolkit.model import HybridLM
from toolkit.parallel import apply_tp, vocab_parallel_cross_entropy
from toolkit.parallel.sharding import shard_indices

# fp32 everywhere; TP changes only the summation order of the row-parallel reductions.
TOL = dict(rtol=1e-5, atol=1e-6)

MODELS = {
    "hybrid_gelu": dict(),
    "gqa_swiglu": dict(
        pattern="*-M*", mlp_activation="swiglu", att_ratio=0.5, mlp_ratio=0.25, num_query_groups=2
    ),
    "rope_relu2": dict(
        pattern="*-*-",
        att_ratio=0.5,
        mlp_ratio=0.5,
        position_embedding="rope",
        rotary_percent=0.5,
        mlp_activation="relu2",
        norm="layernorm",
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    port = free_port()
    mp.spawn(fn, args=(world, port, *args), nprocs=world, join=True)


def setup(rank: int, world: int, port: int, **parallel) -> object:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    return init_distributed(ParallelConfig(**parallel))


def tp_worker(rank: int, world: int, port: int, model_kwargs: dict) -> None:
    env = setup(rank, world, port, tp=world)
    try:
        torch.manual_seed(0)
        model = HybridLM(tiny_model_config(**model_kwargs), vocab_size=50)
        tokens = torch.randint(0, 50, (2, 21))
        labels = torch.randint(0, 50, (2, 21))

        reference = copy.deepcopy(model)
        ref_logits = reference(tokens)
        ref_loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
        ref_loss.backward()

        group = env.group("tp")
        start = apply_tp(model, group=group, tp=world, rank=env.tp_rank)
        logits = model(tokens)
        loss = vocab_parallel_cross_entropy(logits, labels, start, group)
        loss.backward()

        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(logits, ref_logits[..., start : start + logits.size(-1)], **TOL)
        # Shard the reference gradients with the same plan: each rank must hold its slice.
        grads = copy.deepcopy(reference)
        for p, ref in zip(grads.parameters(), reference.parameters()):
            p.data = ref.grad
        apply_tp(grads, group=group, tp=world, rank=env.tp_rank)
        expected = dict(grads.named_parameters())
        names = [n for n, _ in model.named_parameters()]
        assert names == list(expected)  # sharding keeps every parameter name
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name].data, **TOL, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(MODELS))
def test_tp2_matches_single_process(case):
    spawn(tp_worker, 2, MODELS[case])


def test_shard_indices_take_a_piece_of_every_component():
    comps = [("z", 4), ("x", 4), ("B", 2), ("dt", 2)]
    assert shard_indices(comps, 2, 0).tolist() == [0, 1, 4, 5, 8, 10]
    assert shard_indices(comps, 2, 1).tolist() == [2, 3, 6, 7, 9, 11]
    with pytest.raises(ValueError, match="component B of size 2 does not split into TP=4"):
        shard_indices(comps, 4, 0)
