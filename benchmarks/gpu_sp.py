#!/usr/bin/env python3
"""Sequence parallelism, FP8 under TP, and the memory planner, on one GPU.

    python benchmarks/gpu_sp.py tp [--layers 6 --seq 2048 --steps 5]
    python benchmarks/gpu_sp.py memory RECIPE [--set key=value ...] [--steps 3]

`tp`: the CUDA paths of TP=2 with sequence parallelism, in bf16 and in float8 (torchao), on
two ranks that share the one GPU. NCCL refuses two ranks on one device, so the ranks talk
through gloo, which takes CUDA tensors for its collectives (staged through the host: slow, but
the same code path otherwise). Prints each case's losses beside one rank's (TP=1) on the same
batches, from the same initial weights, at the 8B hybrid's widths with fewer layers.

`memory`: trains a few steps of RECIPE on this GPU as toolkit.train does (parallelize, the step
runner, the optimizer) and prints torch.cuda.max_memory_allocated beside the planner's peak
(toolkit/memory.py) as one JSON line.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.build import build_model, tokenizer_from_recipe  # noqa: E402
from toolkit.config import RecipeError, load_recipe  # noqa: E402
from toolkit.distributed import ParallelEnv, free_port, init_distributed  # noqa: E402
from toolkit.memory import plan_memory  # noqa: E402
from toolkit.parallel.parallelize import parallelize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tp_overrides(args: argparse.Namespace, precision: str, tp: int) -> list[str]:
    pattern = "M-M*-M"[: args.layers] if args.layers <= 6 else None
    sets = [
        f"model.num_layers={args.layers}",
        f"model.seq_length={args.seq}",
        "model.vocab_size=32000",
        f"train.precision='{precision}'",
        f"train.device='{args.device}'",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "train.lr=1e-4",
        f"parallel.tp={tp}",
        "parallel.dp=1",
        f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}",
    ]
    sets += args.set
    if pattern:  # each kind's share of these few layers, as the pattern check wants
        att, mlp = pattern.count("*") / len(pattern), pattern.count("-") / len(pattern)
        sets += [f"model.pattern='{pattern}'", f"model.att_ratio={att}", f"model.mlp_ratio={mlp}"]
    return sets


def train_losses(recipe, env: ParallelEnv, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer_from_recipe(recipe), env.device)
    parallel = parallelize(model, recipe, env)
    g = torch.Generator().manual_seed(1)
    vocab, seq = model.vocab_size, recipe.model.seq_length
    batch = recipe.train.global_batch_size  # one optimizer step's sequences, as the plan has it
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(env.device)
        loss = parallel.run_step(tokens[:, :-1], tokens[:, 1:])
        parallel.optimizer.step()
        parallel.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def tp_rank(rank: int, world: int, port: int, args: argparse.Namespace, precision: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK="0")  # both ranks on GPU 0
    dist.init_process_group("gloo", rank=rank, world_size=world)  # NCCL: one rank per GPU
    try:
        recipe = load_recipe(ROOT / "recipes/8b_hybrid.toml", tp_overrides(args, precision, world))
        env = init_distributed(recipe.parallel, args.device)
        losses = train_losses(recipe, env, args.steps)
        if rank == 0:
            out.put(losses)
    finally:
        dist.destroy_process_group()


def run_tp(args: argparse.Namespace) -> None:
    for precision in ("bf16", "fp8") if args.device == "cuda" else ("fp32",):
        one = load_recipe(ROOT / "recipes/8b_hybrid.toml", tp_overrides(args, precision, 1))
        env = ParallelEnv(0, 1, 0, torch.device(args.device), tp=1, pp=1, dp=1)
        start = time.perf_counter()
        reference = train_losses(one, env, args.steps)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        mp.start_processes(
            tp_rank,
            args=(2, free_port(), args, precision, queue),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        got = queue.get()
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, reference))
        row = {
            "case": f"{precision} TP=2+SP vs TP=1",
            "layers": args.layers,
            "seq": args.seq,
            "tp1": [round(x, 5) for x in reference],
            "tp2_sp": [round(x, 5) for x in got],
            "max_rel_diff": worst,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)


def run_memory(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, [*args.set, "train.device='cuda'"])
    env = ParallelEnv(0, 1, 0, torch.device("cuda"), tp=1, pp=1, dp=1)
    [plan] = plan_memory(recipe, 1, target="cuda")
    torch.cuda.reset_peak_memory_stats()
    losses = train_losses(recipe, env, args.steps)
    measured = torch.cuda.max_memory_allocated()
    print(
        json.dumps(
            {
                "recipe": str(args.recipe),
                "set": args.set,
                "planned_peak_gb": round(plan.peak / 1e9, 2),
                "measured_peak_gb": round(measured / 1e9, 2),
                "planned_over_measured": round(plan.peak / measured, 3),
                "planned_terms_gb": {k: round(v / 1e9, 2) for k, v in plan.terms().items()},
                "losses": [round(x, 4) for x in losses],
            }
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("tp", help="TP=2+SP (bf16, fp8) on two ranks sharing the GPU vs TP=1")
    tp.add_argument("--layers", type=int, default=6, help="layers of the 8B hybrid's mix")
    tp.add_argument("--seq", type=int, default=2048)
    tp.add_argument("--steps", type=int, default=5)
    tp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. widths")
    tp.add_argument("--device", default="cuda", help="cpu: a smoke run of the same code (fp32)")
    mem = sub.add_parser("memory", help="measured peak memory against the planner's")
    mem.add_argument("recipe")
    mem.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    mem.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        print("gpu_sp.py needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        run_tp(args) if args.mode == "tp" else run_memory(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
