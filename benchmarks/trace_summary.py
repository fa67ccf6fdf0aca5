"""Where a profiled training step's GPU time goes: sum a torch.profiler trace's kernels by name.

    python benchmarks/trace_summary.py runs/x/tb/rank0.*.pt.trace.json [--top 25]

Takes the traces that `train.profile = {start = S, steps = N}` writes. Prints the GPU busy time,
the wall time the traced steps spanned (busy / wall = how often the GPU idles waiting on the host),
and the kernels grouped by name and by family (matmul, attention, Mamba Triton, elementwise...).
"""

import argparse
import json
import re
from collections import defaultdict

FAMILIES = [  # first match wins
    ("matmul (cuBLAS/CUTLASS)", r"gemm|cutlass|sm90_xmma|nvjet|cublas"),
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("Mamba SSD (Triton)", r"chunk|state_passing|bmm_chunk|ssd"),
    ("conv1d", r"conv1d|causal_conv"),
    ("norm", r"norm|rms"),
    ("cross-entropy / softmax", r"softmax|log_softmax|cross_entropy|nll|logsumexp"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("other Inductor-generated (Triton)", r"^triton_"),  # fused casts, GELU, adds...
    ("copy / cast", r"copy|cast|convert|memcpy|memset|fill"),
    ("reduction", r"reduce|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_"),
]


# Copies and fills that run as DMA (cudaMemcpyAsync/cudaMemsetAsync) are not kernels but take
# GPU time all the same.
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def family(name: str) -> str:
    low = name.lower()
    for label, pattern in FAMILIES:
        if re.search(pattern, low):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help="torch.profiler .pt.trace.json files")
    parser.add_argument("--top", type=int, default=25, help="kernels to list")
    args = parser.parse_args()
    by_name: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)  # the aten op (or module) that launched it
    count: dict[str, int] = defaultdict(int)
    first, last = float("inf"), 0.0
    for path in args.traces:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        # A kernel's "External id" is that of the CPU op that launched it (innermost op wins:
        # ops are listed outer first, so later ones with the same id overwrite).
        op_of = {
            e["args"]["External id"]: e["name"]
            for e in events
            if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
        }
        for e in events:
            if e.get("cat") not in GPU_WORK:
                continue
            by_op[op_of.get(e.get("args", {}).get("External id"), "?")] += e["dur"]
            by_name[e["name"]] += e["dur"]
            count[e["name"]] += 1
            first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
    busy = sum(by_name.values())
    if not busy:
        raise SystemExit("no GPU kernels in these traces (a CPU run, or the wrong files)")
    wall = last - first
    print(f"GPU busy {busy / 1e3:.1f} ms over {wall / 1e3:.1f} ms of wall ({busy / wall:.0%})")
    families: dict[str, float] = defaultdict(float)
    for name, us in by_name.items():
        families[family(name)] += us
    print("\nby family:")
    for label, us in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {us / 1e3:9.1f} ms  {us / busy:6.1%}  {label}")
    print(f"\ntop {args.top} launching ops:")
    for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {us / 1e3:9.1f} ms  {us / busy:6.1%}  {name[:110]}")
    print(f"\ntop {args.top} kernels:")
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {us / 1e3:9.1f} ms  {us / busy:6.1%}  x{count[name]:<5d} {name[:110]}")


if __name__ == "__main__":
    main()
