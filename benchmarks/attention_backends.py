"""Causal self-attention's forward and backward at a recipe's attention widths, by each of
SDPA's backends: with the keys' groups as the model passes them (enable_gqa=True) and with the
keys and values repeated to every head first (as a backend without GQA needs them). For each:
milliseconds, TFLOP/s (the causal half of the square; the backward counted as 2.5 forwards),
the GPU kernels that ran, and the relative L2 distance of the output and gradients from the
default's. Where a backend refuses the inputs, the reason is printed and the sweep goes on.

    python3 benchmarks/attention_backends.py [--recipe recipes/800m_hybrid.toml] [--batch 8]
        [--seq 4096] [--repeats 20] [--json OUT]

On a CPU only the math backend runs (a check that the script runs, no timing worth reading).
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_entropy import timed_ms  # noqa: E402
from gpu_kernels import rel_l2  # noqa: E402
from train_throughput import write_json  # noqa: E402

from toolkit.config import load_recipe  # noqa: E402

BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_step(q, k, v, dout, backend, repeat: bool):
    """A function of no arguments: the forward and the backward, (out, dq, dk, dv)."""
    heads, groups = q.size(1), k.size(1)

    def step():
        ks, vs = k, v
        if repeat:
            ks, vs = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, ks, vs, is_causal=True, enable_gqa=not repeat and heads != groups
            )
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    return step


def kernels(step, device: torch.device) -> list[str]:
    """The GPU kernels a call of `step` runs, the most time first: 'name ms' (none on CPUs)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = sorted(
        (e for e in prof.key_averages() if e.device_time_total > 0),
        key=lambda e: -e.device_time_total,
    )
    return [f"{e.key[:80]} {e.device_time_total / 1e3:.3f}" for e in rows[:4]]


def run(args: argparse.Namespace) -> dict:
    model = load_recipe(args.recipe).model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, groups = model.num_attention_heads, model.num_query_groups
    head_dim = model.hidden_size // heads
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(n):
        shape = (args.batch, n, args.seq, head_dim)
        return torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()

    q, k, v = leaf(heads), leaf(groups), leaf(groups)
    dout = torch.randn(q.shape, generator=g, device=device).to(dtype)
    forward_flop = 4 * args.batch * heads * args.seq * args.seq * head_dim / 2
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": dict(batch=args.batch, heads=heads, groups=groups, seq=args.seq,
                      head_dim=head_dim),
        "runs": {},
    }  # fmt: skip
    print(f"{result['device']}: attention {result['shape']}")
    want = attention_step(q, k, v, dout, None, repeat=False)()
    backends = BACKENDS if device.type == "cuda" else {"math": SDPBackend.MATH}
    for repeat in (False, True):
        for name, backend in backends.items():
            label = f"{name} {'repeated' if repeat else 'gqa'}"
            step = attention_step(q, k, v, dout, backend, repeat)
            try:
                got = step()
            except RuntimeError as e:  # a backend that refuses these inputs
                print(f"  {label:18}: refused: {str(e).splitlines()[0][:160]}")
                continue
            ms = timed_ms(step, args.repeats, device)
            tflops = 3.5 * forward_flop / ms / 1e9
            diffs = {n: rel_l2(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
            ran = kernels(step, device)
            result["runs"][label] = dict(ms=ms, tflops=tflops, rel_l2=diffs, kernels=ran)
            worst = max(diffs.values())
            print(f"  {label:18}: {ms:.3f} ms, {tflops:.0f} TFLOP/s, rel L2 <= {worst:.1e}")
            for line in ran:
                print(f"      {line}")
    write_json(args.json, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/800m_hybrid.toml")
    p.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--seq", type=int, default=4096, help="tokens a sequence (default 4096)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls (median)")
    p.add_argument("--json", help="write the numbers here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
