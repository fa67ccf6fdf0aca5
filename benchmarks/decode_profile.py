"""Where a decode step's time goes on a GPU: the device's HBM bandwidth, the bandwidth of each
weight shape's matrix-vector product, and the kernels of one engine step.

1. HBM: a 4 GiB device-to-device copy (bytes read + written per second) and a bf16 sum
   (bytes read per second).
2. Every distinct nn.Linear weight shape of the recipe's model, at the decode batch: bytes of
   weight read per second by F.linear, replayed in a CUDA graph over enough copies of the
   weight (> 2 GiB) that the 50 MB L2 cache does not serve them; with --compiled-gemv also
   torch.compile's kernel for the same product (batch 1).
3. Decode attention at the model's shape over 4k and 32k keys: SDPA, two matmuls, and the
   static step's Triton flash decoding (toolkit/model/flash_decoding.py), bytes of keys and
   values read per second; then the flash-decoding kernels' time at batch 1 for a grid of
   plans (keys per step, programs per SM, stages), the data to tune its plan with.
4. One engine step (CUDA graph replay; the same with the next step launched ahead, --overlap;
   eagerly) under torch.profiler: step time, the sum of its kernels' times, their count, and the
   kernels that take the most time.

    python benchmarks/decode_profile.py --recipe recipes/8b_hybrid.toml --context 4096 \\
        --batch 1 --json profile.json
"""

import argparse
import functools
import gc
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

from toolkit.build import build_model
from toolkit.config import load_recipe
from toolkit.inference.engine import Engine, Request
from toolkit.model import attention, flash_decoding
from toolkit.tokenizer import build_tokenizer


def cuda_seconds(fn, repeats: int) -> float:
    """Seconds per call of `fn()` called `repeats` times back to back, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def graph_time(fn, reps: int) -> float:
    """Seconds per call of `fn`, replayed `reps` times inside one CUDA graph."""
    fn(0), fn(1)  # warm-up: workspaces, autotuning, compilation (before the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    return cuda_seconds(graph.replay, 5) / reps


def hbm_bandwidth() -> dict[str, float]:
    x = torch.randn(2**31 // 2, device="cuda", dtype=torch.bfloat16)  # 2 GiB... x2 below
    x = torch.cat([x, x])  # 4 GiB
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    copy = graph_time(lambda i, x=x, y=y: y.copy_(x), 4)
    read = graph_time(lambda i, x=x: x.sum(dtype=torch.float32), 4)
    return {"copy_gb_per_s": 2 * nbytes / copy / 1e9, "sum_read_gb_per_s": nbytes / read / 1e9}


@functools.cache
def compiled_gemv():
    """w @ x for one row as Inductor writes it (a Triton reduction reading w once; products and
    sums in fp32): a candidate against cuBLAS's kernels for batch-1 decode."""
    return torch.compile(lambda x, w: (w * x).sum(-1, dtype=torch.float32), dynamic=False)


def linear_shapes(model: nn.Module) -> dict[tuple[int, int], list[str]]:
    """Each distinct nn.Linear weight shape and the modules that have it."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shapes.setdefault(tuple(module.weight.shape), []).append(name)
    return shapes


def gemv_bandwidth(model: nn.Module, batch: int, compiled: bool) -> list[dict]:
    rows = []
    for (n, k), names in linear_shapes(model).items():
        copies = max(2, -(-(2 << 30) // (n * k * 2)))
        weights = torch.randn(copies, n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(batch, n, device="cuda", dtype=torch.bfloat16)
        reps = copies * max(1, 64 // copies)

        def linear(i: int, x=x, w=weights, out=out) -> None:
            torch.matmul(x, w[i % len(w)].t(), out=out)

        t = graph_time(linear, reps)
        row = {"shape": [n, k], "layers": len(names), "example": names[0], "us": t * 1e6}
        row["gb_per_s"] = n * k * 2 / t / 1e9
        if batch == 1 and compiled:  # Inductor's own matrix-vector kernel, for comparison

            def gemv(i: int, x=x, w=weights, out=out) -> None:
                out.view(-1).copy_(compiled_gemv()(x[0], w[i % len(w)]))

            tv = graph_time(gemv, reps)
            row["compiled_gb_per_s"] = n * k * 2 / tv / 1e9
        rows.append(row)
        print(
            f"linear {n}x{k} ({len(names)} layers, {names[0]}): {t * 1e6:.1f} us, "
            f"{row['gb_per_s']:.0f} GB/s"
            + (f", compiled {row['compiled_gb_per_s']:.0f} GB/s" if compiled else "")
        )
        del weights, linear
        torch.cuda.empty_cache()
    return rows


def attention_inputs(cfg, batch: int, span: int) -> dict:
    """A decode step's attention inputs at the model's shape, keys 0..span-8 visible, over
    enough copies of the cache (> 256 MiB) that the 50 MB L2 does not serve them, as in a step,
    where the weights pass through it between layers."""
    groups, d = cfg.num_query_groups, cfg.hidden_size // cfg.num_attention_heads
    heads = cfg.num_attention_heads // groups
    nbytes = 2 * batch * groups * span * d * 2  # keys and values read
    copies = -(-(256 << 20) // nbytes)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    mask = torch.arange(span, device="cuda") < span - 7
    return {
        "q": randn(batch, groups, heads, d),
        "new": randn(2, batch, groups, d),
        "k": randn(copies, batch, groups, span, d),
        "v": randn(copies, batch, groups, span, d),
        "mask": mask.expand(batch, 1, 1, span),
        "lengths": torch.full((batch,), span - 8, device="cuda"),
        "copies": copies,
        "nbytes": nbytes,
    }


def attention_time(a: dict, kind: str, plan: flash_decoding.Plan | None = None) -> float:
    """Seconds per call: decode_attention ('sdpa' or 'matmul', whichever way it goes now) or
    the static step's flash decoding ('triton', which also writes the new keys)."""
    copies = a["copies"]

    def step(i: int) -> None:
        k, v = a["k"][i % copies], a["v"][i % copies]
        if kind == "triton":
            flash_decoding.attend(a["q"], *a["new"], k, v, a["lengths"], plan)
        else:
            attention.decode_attention(a["q"], k, v, a["mask"])

    return graph_time(step, max(8, copies))


def attention_bandwidth(cfg, batches: list[int], spans: list[int]) -> list[dict]:
    """Decode attention over a `span`-key cache at the model's shape: SDPA with a mask,
    decode_attention's two matmuls, the static step's Triton flash decoding; bytes of keys and
    values read per second."""
    rows, below = [], attention.MATMUL_ATTENTION_BELOW
    for span, b in itertools.product(spans, batches):
        a = attention_inputs(cfg, b, span)
        row = {"batch": b, "span": span}
        for name, threshold in (("sdpa", 0), ("matmul", 1 << 30), ("triton", below)):
            attention.MATMUL_ATTENTION_BELOW = threshold  # which way decode_attention goes
            try:
                t = attention_time(a, name)
            finally:
                attention.MATMUL_ATTENTION_BELOW = below
            row[f"{name}_us"], row[f"{name}_gb_per_s"] = t * 1e6, a["nbytes"] / t / 1e9
        pairs = b * cfg.num_query_groups
        row["triton_plan"] = flash_decoding.plan_for(pairs, span, torch.device("cuda"))._asdict()
        print(
            f"attention b={b} span={span}: "
            + ", ".join(
                f"{name} {row[f'{name}_us']:.1f} us ({row[f'{name}_gb_per_s']:.0f} GB/s)"
                for name in ("sdpa", "matmul", "triton")
            )
        )
        rows.append(row)
        del a
        torch.cuda.empty_cache()
    return rows


def attention_plans(cfg, span: int, batch: int = 1) -> list[dict]:
    """The flash-decoding kernels' time at one (batch, span) for each plan of a small grid
    (keys per step, programs per SM, pipeline stages), fastest first: the data to tune
    flash_decoding.plan_for with."""
    a = attention_inputs(cfg, batch, span)
    out = []
    for block, per_sm, stages in itertools.product((32, 64, 128), (1, 2, 4, 8), (2, 3)):
        plan = flash_decoding.plan_for(
            batch * cfg.num_query_groups, span, torch.device("cuda"), block, per_sm
        )._replace(stages=stages)
        row: dict = {"plan": plan._asdict(), "per_sm": per_sm}
        try:
            t = attention_time(a, "triton", plan)
        except Exception as e:  # e.g. out of shared memory at 128 keys x 3 stages
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        else:
            row["us"], row["gb_per_s"] = t * 1e6, a["nbytes"] / t / 1e9
        out.append(row)
    out.sort(key=lambda r: r.get("us", float("inf")))
    for r in out[:4]:
        print(f"attention plan b={batch} span={span}: {r}")
    del a
    torch.cuda.empty_cache()
    return out


def profile_steps(engine: Engine, steps: int, label: str, trace: Path | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    step_ms = 1e3 * cuda_seconds(engine.step, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    replay_ms = None
    if engine.decoder is not None and engine.decoder.graphs:  # the graph alone, back to back
        graph = next(iter(engine.decoder.graphs.values()))[0]
        replay_ms = 1e3 * cuda_seconds(graph.replay, steps)
        print(f"{label}: graph replays alone {replay_ms:.3f} ms")
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    kernel_us = sum(sum(v) for v in by_name.values()) / steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    result = {
        "label": label,
        "step_ms": step_ms,
        "kernel_ms_per_step": kernel_us / 1e3,
        "kernels_per_step": len(kernels) / steps,
        "replay_ms": replay_ms,
        "top": [
            {
                "name": name[:140],
                "calls_per_step": len(v) / steps,
                "us_per_step": sum(v) / steps,
                "us_mean": sum(v) / len(v),
            }
            for name, v in top
        ],
    }
    print(
        f"{label}: step {step_ms:.3f} ms, kernels {kernel_us / 1e3:.3f} ms in "
        f"{len(kernels) / steps:.0f} kernels per step"
    )
    for t in result["top"]:
        print(
            f"  {t['us_per_step']:9.1f} us  {t['calls_per_step']:6.1f} x {t['us_mean']:7.2f} us"
            f"  {t['name'][:110]}"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/decode_profile.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", action="append", default=[], help="recipe override key=value")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--json", type=Path)
    p.add_argument("--trace", type=Path, help="Chrome trace of the graph steps")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument(
        "--attention",
        choices=("on", "off", "only"),
        default="on",
        help="the attention tables and flash decoding's plan sweep (only: nothing else)",
    )
    p.add_argument(
        "--compiled-gemv",
        action="store_true",
        help="at batch 1, also time torch.compile's matrix-vector kernel for every shape",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    result: dict = {"device": torch.cuda.get_device_name()}
    result["hbm"] = hbm_bandwidth()
    print(
        f"HBM: copy {result['hbm']['copy_gb_per_s']:.0f} GB/s, "
        f"sum {result['hbm']['sum_read_gb_per_s']:.0f} GB/s"
    )
    recipe = load_recipe(args.recipe, args.set)
    torch.manual_seed(0)
    if args.attention != "off":
        result["attention"] = attention_bandwidth(recipe.model, [1, 2, 4, 8, 32], [4096, 32768])
        result["attention_plans"] = {
            span: attention_plans(recipe.model, span) for span in (4096, 32768)
        }
    if args.attention == "only":
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    model = build_model(recipe, tokenizer, torch.device("cuda"), torch.bfloat16).eval()
    if not args.skip_gemv:
        result["gemv"] = gemv_bandwidth(model, args.batch, args.compiled_gemv)
    steps = args.steps
    max_len = -(-(args.context + 4 * steps + 8) // 256) * 256
    for label, graphs, overlap in (
        ("graph", True, False),
        ("graph_overlap", True, True),
        ("eager", False, False),
    ):
        engine = Engine(
            model,
            build_tokenizer("byte"),
            slots=args.batch,
            max_len=max_len,
            cuda_graphs=graphs,
            overlap=overlap,
        )
        requests = [
            Request(prompt=[0], max_new_tokens=4 * steps + 4, stop_at_eod=False)
            for _ in range(args.batch)
        ]
        engine.occupy(requests, args.context)
        for _ in range(3):
            engine.step()
        trace = args.trace if label == "graph" else None
        result[label] = profile_steps(engine, steps, label, trace)
        for r in requests:
            r.cancel()
        engine.step()
        engine = None
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
