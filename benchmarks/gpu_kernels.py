"""mamba-ssm's Triton SSD (model.kernels = "mamba_ssm") against the pure-PyTorch reference on one
GPU: parity of outputs and gradients, and the time of the SSD alone.

    PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_kernels.py [--chunks 64,128,256]

`--chunks`: also time the kernels' forward and backward at each chunk length (model.
mamba_chunk_size; the recipes keep the reference's 128, mamba-ssm's own default is 256) on one
micro-batch of the 800M's and of the 8B's Mamba layers at seq 4096, and the output's distance
from the first chunk length's (the same sums, in another order).

Parity is relative L2 error (||a - b|| / ||b||) against the reference run in fp32, for fp32 and
bf16 inputs. Whole-model throughput: run the trainer twice with `--set model.kernels=...`.
"""

import argparse
import time

import torch

from toolkit.model.kernels import mamba_ssm_available, ssd_mamba_ssm
from toolkit.model.ssd import ssd_chunked


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def inputs(b: int, length: int, heads: int, p: int, groups: int, n: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    x = randn(b, length, heads, p).to(dtype)
    dt = torch.nn.functional.softplus(randn(b, length, heads) - 4)  # fp32, as the mixer passes it
    A = -torch.exp(randn(heads) * 0.5)
    B, C = randn(b, length, groups, n).to(dtype), randn(b, length, groups, n).to(dtype)
    init = randn(b, heads, p, n) * 0.1
    return [t.requires_grad_() for t in (x, dt, A, B, C, init)]


def run(fn, args, chunk):
    x, dt, A, B, C, init = args
    y, final = fn(x, dt, A, B, C, chunk, init)
    (y.float().square().mean() + final.square().mean()).backward()
    grads = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    return y.detach(), final.detach(), grads


def timed(fn, args, chunk, reps=10) -> float:
    run(fn, args, chunk)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        run(fn, args, chunk)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


# One micro-batch of the recipes' Mamba layers at seq 4096 (800M: micro-batch 8, d_inner 2048;
# 8B: micro-batch 1, d_inner 8192), state 128, heads of 64, 8 groups.
SWEEP_SHAPES = {
    "800m": dict(b=8, length=4096, heads=32, p=64, groups=8, n=128),
    "8b": dict(b=1, length=4096, heads=128, p=64, groups=8, n=128),
}


def sweep_chunks(chunks: list[int]) -> None:
    """SSD forward+backward time at each chunk length, bf16, and how far its output is from the
    first length's (relative L2 of y and of dx)."""
    for name, shape in SWEEP_SHAPES.items():
        args = inputs(**shape, dtype=torch.bfloat16)
        first = run(ssd_mamba_ssm, args, chunks[0])
        base_ms = None
        for chunk in chunks:
            got = run(ssd_mamba_ssm, args, chunk)
            ms = timed(ssd_mamba_ssm, args, chunk)
            base_ms = base_ms or ms
            print(
                f"SSD chunks {name:5} chunk {chunk:4}: fwd+bwd {ms:7.2f} ms "
                f"({base_ms / ms:.3f}x chunk {chunks[0]}), y vs chunk {chunks[0]} "
                f"{rel_l2(got[0], first[0]):.1e}, dx {rel_l2(got[2][0], first[2][0]):.1e}"
            )
        del args, first, got
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--chunks",
        type=lambda v: [int(c) for c in v.split(",")],
        help="comma-separated chunk lengths to time at the recipes' shapes, e.g. 64,128,256",
    )
    chunks = parser.parse_args().chunks
    if not (torch.cuda.is_available() and mamba_ssm_available()):
        raise SystemExit("error: needs a CUDA device and mamba-ssm (see benchmarks/gpu_setup.sh)")
    shape = dict(b=2, length=2048, heads=32, p=64, groups=8, n=128)
    print(f"shape {shape}, chunk 128")
    names = ["y", "final state", "dx", "ddt", "dA", "dB", "dC", "dinit"]
    reference = run(ssd_chunked, inputs(**shape, dtype=torch.float32), 128)
    for dtype in (torch.float32, torch.bfloat16):
        got = run(ssd_mamba_ssm, inputs(**shape, dtype=dtype), 128)
        errors = [rel_l2(a, b) for a, b in zip([got[0], got[1], *got[2]], [reference[0], reference[1], *reference[2]])]  # fmt: skip
        print(f"{str(dtype):15} " + "  ".join(f"{n} {e:.1e}" for n, e in zip(names, errors)))
    for dtype in (torch.bfloat16,):
        args = inputs(**shape, dtype=dtype)
        ref_ms, kernel_ms = timed(ssd_chunked, args, 128), timed(ssd_mamba_ssm, args, 128)
        print(
            f"SSD fwd+bwd {dtype}: reference {ref_ms:.2f} ms, mamba_ssm {kernel_ms:.2f} ms "
            f"({ref_ms / kernel_ms:.1f}x)"
        )
    if chunks:
        sweep_chunks(chunks)


if __name__ == "__main__":
    main()
