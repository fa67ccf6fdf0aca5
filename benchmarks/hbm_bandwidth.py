"""What a GPU's memory moves for streaming kernels, the ceiling the optimizer's update is held
to: torch's copy (1 read, 1 write), an add (2 reads, 1 write), a sum (reads only) and a
multi-tensor in-place scale, each over 4 GiB fp32 tensors, in TB/s from CUDA events. Also the
gradient clip's norm both ways (toolkit.parallel.runtime.global_grad_squares): the multi-tensor
norm, which takes 320 blocks of 64k elements a launch (the 8B Mamba-2 race's 2.97B gradients:
142 launches, 3.3 ms on an H200 where a read-only pass at the sum's rate would take 2.8), and
one reduction per tensor.

    python3 benchmarks/hbm_bandwidth.py [--gib 4] [--repeats 20]
"""

import argparse

import torch
from decode_profile import cuda_seconds  # a sibling script: benchmarks/ is on the path


def timed_ms(work, repeats: int) -> float:
    """Mean milliseconds of `work` over `repeats` calls after one untimed call."""
    work()
    torch.cuda.synchronize()
    return 1e3 * cuda_seconds(work, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="size of each tensor (GiB)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("hbm_bandwidth.py: needs CUDA")
    n = int(args.gib * 2**30) // 4
    a, b, c = (torch.randn(n, device="cuda") for _ in range(3))
    cases = [
        ("copy (1 read, 1 write)", lambda: b.copy_(a), 8),
        ("add (2 reads, 1 write)", lambda: torch.add(a, b, out=c), 12),
        ("sum (1 read)", lambda: a.sum(), 4),
        (
            "foreach mul_ over 3 (1 read, 1 write each)",
            lambda: torch._foreach_mul_([a, b, c], 1.0),
            24,
        ),
        ("foreach norm over 3 (1 read each)", lambda: torch._foreach_norm([a, b, c], 2), 12),
        ("vector_norm of each of 3 (1 read each)", lambda: [x.norm() for x in (a, b, c)], 12),
    ]
    print(f"{torch.cuda.get_device_name()}: tensors of {n:,} fp32 ({args.gib} GiB)")
    for name, work, bytes_per_element in cases:
        ms = timed_ms(work, args.repeats)
        print(f"{name:45s} {ms:8.3f} ms  {n * bytes_per_element / ms / 1e9:6.2f} TB/s")


if __name__ == "__main__":
    main()
