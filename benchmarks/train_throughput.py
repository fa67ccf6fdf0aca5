"""Training throughput of a recipe's model on one device: tokens/s, step time, TFLOP/s, MFU, memory.

    python3 benchmarks/train_throughput.py recipes/800m_hybrid.toml --seq 4096 --mbs 4 \\
        [--steps 15] [--warmup 5] [--set train.compile=true ...] [--json OUT.json]

Builds the model on the device (train.device; random tokens, no data pipeline), applies what the
trainer applies (fp8 linears, activation checkpointing, per-block compile: the recipe's keys, or
--set), and times full optimizer steps of one micro-batch: forward, loss, backward, gradient
clipping and AdamW as the trainer does them (toolkit.parallel.runtime.clip_and_step: the global
norm always, the scale in place or, with train.flat_optimizer, folded into the update). With
--accumulate N a step is N micro-batches, their gradients accumulated (the trainer's StepRunner)
before one clip and update: what a recipe whose global batch is N micro-batches does on one GPU
(the 8B's 8 sequences at micro-batch 1: N=8), the update's cost spread over N. The warm-up steps
absorb compilation and Triton autotuning.

--cuda-graphs (with train.compile) replays the compiled regions as CUDA graphs (Inductor's
cudagraph trees), a lever against the gaps between kernels; no recipe key has it until it pays.
The gradients are then allocated once and zeroed in place: autograd would otherwise keep a
parameter's first gradient in the graph's memory, which the next micro-batch's replay
overwrites (a known failure of cudagraph trees with gradient accumulation).

--step-graph replays the whole step, forward to update, as one CUDA graph (toolkit.step_graph):
against the host's time to queue a step's kernels (the 800M's ~3,700). It needs the Triton
AdamW (train.adamw_kernel, the default on GPUs); on CPUs the same step runs eagerly.

--profile TRACE.json traces one more step after the timed ones with torch.profiler (CPU and
CUDA activity; with --step-graph, what the profiler records of the graph's replay) into a
Chrome trace that benchmarks/trace_summary.py sums by family: where a setting's step goes,
measured beside its tokens/s. The traced step is not among the timed ones (the profiler slows
the host).

--fp8-recast-input (with train.fp8_weight_cache) has the cached float8 linears cast their input
again in the backward for the weight gradient, as torchao's do, instead of reading the forward's
cast (the same bits): the A/B of that lever.

MFU = model FLOP/s (toolkit.model.flops_per_token: 6 x matmul parameters + attention + SSD scan,
forward and backward) / peak. Two peaks are reported: the data-sheet dense bf16 peak
(toolkit.profiling.PEAK_TFLOPS; `mfu`) and the bf16 matmul rate measured in the same run
(`mfu_of_measured_bf16`: 8192^3 on GPUs). fp8 runs also report the measured fp8 rate. On CPUs
there is no data-sheet peak: MFU is against the measured fp32 matmul rate.
"""

import argparse
import datetime
import gc
import importlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.build import build_model, describe_model, resolve_device, tokenizer_from_recipe  # noqa: E402
from toolkit.config import RecipeError, load_recipe  # noqa: E402
from toolkit.distributed import ParallelEnv  # noqa: E402
from toolkit.metrics import peak_memory_gb  # noqa: E402
from toolkit.model import flops_per_token  # noqa: E402
from toolkit.parallel.parallelize import ParallelModel, parallelize  # noqa: E402
from toolkit.parallel.runtime import clip_and_step  # noqa: E402
from toolkit.precision import PrecisionError  # noqa: E402
from toolkit.profiling import measure_matmul_tflops, peak_tflops  # noqa: E402
from toolkit.step_graph import StepGraph, training_body  # noqa: E402

log = logging.getLogger("train_throughput")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    out["cuda"] = torch.version.cuda
    for name in ("triton", "mamba_ssm", "causal_conv1d", "torchao", "transformer_engine"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            out[name] = None
    return out


# Inductor options the device runs set through the environment: recorded as this torch has
# them (None where it has no such option, so a run that set one measured nothing new).
INDUCTOR_OPTIONS = ("enable_pdl", "mix_order_reduction", "mix_order_reduction_autotune_split_size")


def environment() -> dict[str, object]:
    """The TOOLKIT_, TORCHINDUCTOR_ and TRITON_ variables a run was given, and the Inductor
    options above as this torch reads them."""
    import torch._inductor.config as inductor

    prefixes = ("TOOLKIT_", "TORCHINDUCTOR_", "TRITON_")
    return {
        "variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)},
        "inductor": {name: getattr(inductor.triton, name, None) for name in INDUCTOR_OPTIONS},
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_step_arguments(parser: argparse.ArgumentParser, steps: int = 10) -> None:
    """--steps and --warmup, as the step benchmarks here take them (check_step_arguments)."""
    parser.add_argument("--steps", type=int, default=steps, help=f"timed steps (default {steps})")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--manual-gc", action="store_true",
                        help="Python's garbage collector off in the timed steps, what the "
                        "warm-up left frozen out of its reach (time_steps)")  # fmt: skip


def check_step_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")


def write_json(path: str | None, result: dict) -> None:
    """`result` as JSON at `path` (--json), its folder made; nothing without one."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


class GcClock:
    """Python's cyclic garbage collector while inside: the seconds its collections ran and how
    many of each generation (gc.callbacks). A full collection walks every object the process
    holds (compiled code, modules), and where it lands between a step's synchronisation and its
    first launch the GPU waits for it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


def time_steps(
    step: Callable[[], torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
    manual_gc: bool = False,
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """(losses, warm-up step seconds, timed step seconds, the garbage collector's seconds in
    each timed step, the timed steps' span [start, end] in epoch seconds, for
    benchmarks/clock_summary.py): `warmup` steps (compilation, autotuning), then `steps` timed
    ones, each synchronised on the device. `manual_gc`: the objects left after the warm-up
    frozen out of the collector's reach and automatic collection off for the timed steps
    (Megatron's --manual-gc, torchtitan's gc_freq), restored after."""
    losses, warmup_times, times, gc_times, span = [], [], [], [], []
    try:
        for i in range(warmup + steps):
            if i == warmup and manual_gc:
                gc.collect()
                gc.freeze()
                gc.disable()
            synchronize(device)
            if i == warmup:  # after the collection above: the span holds the timed steps only
                span.append(time.time())
            with GcClock() as collector:
                start = time.perf_counter()
                loss = step()
                synchronize(device)
                seconds = time.perf_counter() - start
            (warmup_times if i < warmup else times).append(seconds)
            if i >= warmup:
                gc_times.append(collector.seconds)
            losses.append(float(loss))
            log.info(
                "step %d: %.3f s, loss %.4f, garbage collection %.1f ms (generations %s)",
                i + 1, seconds, losses[-1], 1e3 * collector.seconds, collector.collections,
            )  # fmt: skip
        span.append(time.time())
    finally:
        if manual_gc:
            gc.enable()
            gc.unfreeze()
    return losses, warmup_times, times, gc_times, span


def trace_step(step: Callable[[], torch.Tensor], device: torch.device, path: str) -> None:
    """One more step under torch.profiler, its trace written to `path` (Chrome's format, as
    the trainer's train.profile writes them; benchmarks/trace_summary.py reads it)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(path)
    log.info("traced one step into %s", path)


def graphed_step(
    parallel: ParallelModel,
    params: list[torch.Tensor],
    max_norm: float,
    env: ParallelEnv,
    grad_norms: list[float],
    seq: int,
    vocab: int,
) -> Callable[[], torch.Tensor]:
    """--step-graph: the whole step (forward, backward, clip, update) as one CUDA graph
    (toolkit.step_graph: two eager steps, then the capture); the tokens are drawn into a fixed
    buffer before each step."""
    runner = parallel.run_step
    tokens = torch.zeros((runner.micro_batch_size * runner.micro_batches, seq + 1),
                         dtype=torch.long, device=env.device)  # fmt: skip
    # As the eager step here: the update applied whatever the loss (a NaN is the run's error).
    body = training_body(parallel, params, max_norm, env, tokens[:, :-1], tokens[:, 1:],
                         skip_non_finite=False)  # fmt: skip
    try:
        graph = StepGraph(body, parallel.optimizer, env.device)
    except ValueError as e:
        raise RecipeError(f"--step-graph: {e}; it runs on GPUs") from e

    def step() -> torch.Tensor:
        tokens.random_(0, vocab)
        loss, norm = graph()
        grad_norms.append(float(norm))
        return loss

    return step


def benchmark(args: argparse.Namespace) -> dict:
    overrides = list(args.set)
    if args.seq:
        overrides.append(f"model.seq_length={args.seq}")
    if args.mbs:
        overrides.append(f"train.micro_batch_size={args.mbs}")
    # The global batch: --accumulate micro-batches on this one device (set with --mbs, which
    # need not divide the recipe's own global batch).
    mbs = args.mbs or load_recipe(args.recipe, overrides).train.micro_batch_size
    recipe = load_recipe(
        args.recipe, overrides + [f"train.global_batch_size={mbs * args.accumulate}"]
    )
    cfg, seq = recipe.train, recipe.model.seq_length
    if args.step_graph and args.cuda_graphs:
        raise RecipeError("--step-graph captures the whole step: leave out --cuda-graphs")
    if args.cuda_graphs and not cfg.compile:
        raise RecipeError("--cuda-graphs replays compiled code: set train.compile=true")
    if args.fp8_recast_input:
        if not (cfg.precision == "fp8" and cfg.fp8_weight_cache):
            raise RecipeError("--fp8-recast-input is a lever of train.fp8_weight_cache: set "
                              "train.precision=\"fp8\" and train.fp8_weight_cache=true")  # fmt: skip
        from toolkit.fp8_weight_cache import Float8LinearCastOnce

        Float8LinearCastOnce.reuse_input_cast = False
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    log.info("%s", describe_model(model))
    fpt = flops_per_token(model, seq)
    mamba = [b.mixer for b in model.layers if b.kind == "M"]
    # One process: the recipe's float8, checkpointing and compile, in parallelize's order.
    env = ParallelEnv(0, 1, 0, device, tp=1, pp=1, dp=1)
    torch._inductor.config.triton.cudagraphs = args.cuda_graphs  # read when compiling
    parallel = parallelize(model, recipe, env)
    engine, optimizer = parallel.fp8_engine, parallel.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if args.cuda_graphs:  # autograd then adds into these instead of keeping its own
        for p in params:
            p.grad = torch.zeros_like(p)
    vocab = model.vocab_size
    grad_norms: list[float] = []  # before clipping, as the trainer logs them

    def step() -> float:
        tokens = torch.randint(0, vocab, (mbs * args.accumulate, seq + 1), device=device)
        loss = parallel.run_step(tokens[:, :-1], tokens[:, 1:])  # the mean micro-batch loss
        grad_norms.append(clip_and_step(optimizer, params, cfg.max_grad_norm, env))
        optimizer.zero_grad(set_to_none=not args.cuda_graphs)
        return loss.detach()

    if args.step_graph:
        step = graphed_step(parallel, params, cfg.max_grad_norm, env, grad_norms, seq, vocab)

    model.train()
    losses, warmup_times, times, gc_times, span = time_steps(
        step, args.warmup, args.steps, device, args.manual_gc
    )
    memory = peak_memory_gb(device)
    if args.profile:
        timed_norms = len(grad_norms)
        trace_step(step, device, args.profile)
        del grad_norms[timed_norms:]  # the traced step is not a timed one

    step_time = statistics.median(times)
    tokens = mbs * args.accumulate * seq
    tflops = fpt * tokens / step_time / 1e12
    measured = {"bf16": measure_matmul_tflops(device, "bf16")}
    if cfg.precision == "fp8":
        measured["fp8"] = measure_matmul_tflops(device, "fp8")
    sheet = peak_tflops(device, "bf16", recipe.logging.peak_tflops)
    result = {
        "recipe": args.recipe,
        "overrides": overrides,
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "environment": environment(),
        "precision": cfg.precision,
        "fp8_engine": engine,
        "fp8_recipe": cfg.fp8_recipe if engine else None,
        "fp8_layers": cfg.fp8_layers if engine else None,
        "fp8_weight_cache": cfg.fp8_weight_cache if engine else None,
        "fp8_recast_input": args.fp8_recast_input,
        "compile": cfg.compile,
        "compile_scope": cfg.compile_scope,
        "compile_mode": cfg.compile_mode,
        "cuda_graphs": args.cuda_graphs,
        "step_graph": args.step_graph,
        "profile": args.profile,
        "optimizer_class": type(optimizer).__name__,
        "flat_optimizer": cfg.flat_optimizer,
        "te_fused_norm": cfg.te_fused_norm,
        "activation_checkpointing": cfg.activation_checkpointing,
        "mamba_fused": bool(mamba and mamba[0].fused and device.type == "cuda"),
        "mamba_conv": mamba[0].conv_backend if mamba and mamba[0].fused else None,
        "kernels": recipe.model.kernels,
        "seq": seq,
        "mbs": mbs,
        "micro_batches_per_step": args.accumulate,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": fpt,
        "step_time_s": step_time,
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "gc_times_s": gc_times,
        "timed_span_s": span,
        "manual_gc": args.manual_gc,
        "tokens_per_s": tokens / step_time,
        "tflops_per_gpu": tflops,
        "datasheet_bf16_tflops": sheet,
        "measured_matmul_tflops": measured,  # key 'bf16' is an fp32 matmul on CPUs
        "measured_matmul_size": 8192 if device.type == "cuda" else 1024,
        "mfu": tflops / sheet if sheet else None,
        "mfu_of_measured_bf16": tflops / measured["bf16"] if measured["bf16"] else None,
        "peak_memory_gb": memory,
        "losses": losses,
        "grad_norms": grad_norms,
    }
    if not all(math.isfinite(x) for x in losses):
        result["error"] = "non-finite loss"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/train_throughput.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/800m_hybrid.toml")
    add_step_arguments(parser)
    parser.add_argument("--seq", type=int, help="sequence length (model.seq_length)")
    parser.add_argument("--mbs", type=int, help="micro-batch size (sequences per micro-batch)")
    parser.add_argument("--accumulate", type=int, default=1, metavar="N",
                        help="micro-batches per optimizer step, gradients accumulated "
                        "(default 1: an update after each micro-batch)")  # fmt: skip
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the compiled blocks as CUDA graphs (needs train.compile; "
                        "gradients allocated once and zeroed in place)")  # fmt: skip
    parser.add_argument("--step-graph", action="store_true",
                        help="replay the whole step, forward to update, as one CUDA graph "
                        "(toolkit.step_graph; needs the Triton AdamW, train.adamw_kernel)")  # fmt: skip
    parser.add_argument("--fp8-recast-input", action="store_true",
                        help="with train.fp8_weight_cache: cast each float8 linear's input "
                        "again in the backward, as torchao does (the lever's A/B)")  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--profile", metavar="TRACE.json",
                        help="trace one more step after the timed ones into this Chrome trace "
                        "(benchmarks/trace_summary.py sums it)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_step_arguments(parser, args)
    if args.accumulate < 1:
        parser.error("--accumulate must be >= 1")
    try:
        result = benchmark(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PrecisionError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        result = {"recipe": args.recipe, "command": " ".join(sys.argv), "error": str(e)}
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory: {str(e)[:300]}", file=sys.stderr)
        result = {"recipe": args.recipe, "command": " ".join(sys.argv), "error": "out of memory"}
    write_json(args.json, result)
    if "error" in result:
        return 1
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    print(
        f"{result['tokens_per_s']:,.0f} tokens/s, step {result['step_time_s'] * 1e3:.1f} ms, "
        f"{result['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {mfu} of the data-sheet bf16 peak "
        f"({result['datasheet_bf16_tflops']}), {result['mfu_of_measured_bf16']:.1%} of the "
        f"measured bf16 matmul ({result['measured_matmul_tflops']['bf16']:.1f} TFLOP/s), "
        f"peak memory {result['peak_memory_gb']:.2f} GB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
