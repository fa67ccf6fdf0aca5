"""The first token after a long prompt, and where its time goes: one request's prefill through
the inference engine (random weights, batch 1, the engine's chunked prefill), timed after a
warm-up at the same length, then run once more under torch.profiler. Prints the time to the
first token, the kernels by family (benchmarks/trace_summary.py: matmuls, Mamba SSD, attention,
conv1d...) and the matmuls' achieved TFLOP/s: 2 x prompt tokens x the blocks' linear weights,
plus the output layer for the one position that is sampled. --json keeps the numbers and the
kernel table (trace_summary.py reads it back); --trace keeps the Chrome trace.

    python benchmarks/prefill_profile.py --recipe recipes/8b_hybrid.toml --context 32768 \\
        --json prefill.json
    python benchmarks/prefill_profile.py --recipe recipes/tiny_hybrid.toml --context 64 \\
        --device cpu        # the plumbing on a laptop: no GPU kernels, so no families
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import trace_summary  # benchmarks/, this script's folder
from decode import first_token_seconds, prefill_engine  # benchmarks/ too
from torch import nn
from torch.profiler import ProfilerActivity, profile

from toolkit.build import build_model, resolve_device
from toolkit.config import RecipeError, load_recipe
from toolkit.profiling import measure_matmul_tflops
from toolkit.tokenizer import build_tokenizer


def matmul_flops(model: nn.Module, context: int) -> float:
    """FLOPs of the prefill's matmuls: every linear of the blocks over the prompt, and the output
    layer for the last position only (the engine computes no other logits)."""
    blocks = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear))
    return 2.0 * context * blocks + 2.0 * model.output_layer.weight.numel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/prefill_profile.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", action="append", default=[], help="recipe override key=value")
    p.add_argument("--context", type=int, default=32768, help="prompt tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--top", type=int, default=20, help="kernels to list")
    p.add_argument(
        "--prefill-chunk", type=int, help="the engine's prefill_chunk (default: the engine's)"
    )
    p.add_argument("--json", type=Path, help="the numbers and the kernel table")
    p.add_argument("--trace", type=Path, help="keep the profiled run's Chrome trace here")
    args = p.parse_args(argv)
    if args.context < 1 or args.top < 0:
        p.error("--context >= 1 and --top >= 0")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error("--prefill-chunk >= 1")
    try:
        recipe = load_recipe(args.recipe, args.set)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(
        recipe, build_tokenizer(recipe.data.tokenizer), device, getattr(torch, args.dtype)
    )
    model.eval()
    chunk = {} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}
    engine = prefill_engine(model, args.context, **chunk)
    prompt = torch.randint(0, model.vocab_size, (args.context,)).tolist()
    warm = first_token_seconds(engine, prompt)  # autotuning at these shapes, allocator warm-up
    seconds = first_token_seconds(engine, prompt)
    flops = matmul_flops(model, args.context)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = first_token_seconds(engine, prompt)
    result = {
        "recipe": recipe.name,
        "context": args.context,
        "prefill_chunk": engine.prefill_chunk,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "warmup_s": warm,
        "first_token_s": seconds,
        "profiled_s": profiled,
        "matmul_flops": flops,
        "matmul_tflops_if_all_time": flops / seconds / 1e12,
    }
    print(
        f"{recipe.name}, {args.context}-token prompt in pieces of {engine.prefill_chunk}: first "
        f"token {seconds:.3f} s "
        f"(warm-up {warm:.3f} s, under the profiler {profiled:.3f} s); matmuls "
        f"{flops / 1e12:.3g} TFLOP"
    )
    if device.type == "cuda":  # the matmuls alone at the rate a large bf16 matmul reaches here
        peak = measure_matmul_tflops(device, "bf16")
        result |= {"measured_bf16_matmul_tflops": peak, "matmul_ceiling_s": flops / peak / 1e12}
        print(f"matmul ceiling {flops / peak / 1e12:.3f} s at the measured {peak:.0f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace or Path(tmp) / "prefill.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        try:
            kernels = trace_summary.load([str(trace)])
        except trace_summary.TraceError as e:  # a CPU run: nothing on a GPU to sum
            print(f"no summary: {e}")
            kernels = None
    if kernels is not None:
        fams = kernels.families()
        mm = trace_summary.matmul_us(fams) / 1e6
        result |= {
            "families_ms": {k: v / 1e3 for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
            "busy_ms": kernels.busy_us / 1e3,
            "wall_ms": kernels.wall_us / 1e3,
            "matmul_ms": mm * 1e3,
            "matmul_tflops": flops / mm / 1e12 if mm else None,
            "kernel_table": kernels.table(),
        }
        trace_summary.summarise(kernels, args.top, flops)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
