"""Where a profiled step's GPU time goes: sum a torch.profiler trace's kernels by name and family.

    python benchmarks/trace_summary.py runs/x/tb/profile/rank0.*.pt.trace.json [--top 25]
    python benchmarks/trace_summary.py BF16_TRACE --vs FP8_TRACE --labels bf16,fp8 \\
        [--flops MATMUL_FLOPS_PER_STEP] [--json-out kernels.json]

Takes the traces that `train.profile = {start = S, steps = N}` writes (or the kernel tables that
--json-out wrote: a few hundred kB instead of a trace's hundreds of MB). Prints the GPU busy time
and the wall time the traced steps spanned (busy / wall = how often the GPU idles waiting on the
host), the idle gaps between GPU work by size (many small ones: the cost of many kernels; a few
large ones: waits on the host) with the largest and what ran around them, then the kernels grouped
by family (matmul bf16 / FP8, attention, Mamba SSD, FP8 amax and casts...), by the op that launched
them and by name. Times are per profiled step (the trace's ProfilerStep#N marks; 1 without them).
--vs: the same for a second set of traces, side by side, with the ratio and the difference per
family, and for an FP8 run against a bf16 one: how much faster the GEMMs that went to FP8 ran, and
what the quantisation cost. --flops: the matmul FLOPs of one step, for the achieved TFLOP/s of the
matmul kernels.

A kernel counts in the first family its name (or launching op, or one-block grid) matches, so a
kernel Inductor fused from a norm and an FP8 abs-max counts as amax; the bf16 column shows which
FP8 families also catch kernels that are not FP8 work.
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::_scaled_mm",
    "aten::_scaled_mm_v2",
}
FP8_MATMUL = r"f8|e4m3|e5m2|float8|scaled_mm|qqtst"  # cuBLASLt/CUTLASS fp8 kernels, nvjet "qq"
MATMUL = r"gemm|cutlass|sm90_xmma|nvjet|cublas"
MATMUL_LABEL, FP8_LABEL = "matmul (cuBLAS/CUTLASS)", "matmul FP8 (scaled_mm)"
AMAX_LABEL, SCALE_LABEL = "FP8 amax (abs-max reductions)", "one-block kernels (FP8 scales...)"
CAST_LABEL = "FP8 cast (scale, clamp, to float8)"
FP8_WORK = (AMAX_LABEL, SCALE_LABEL, CAST_LABEL)


OTHER_TRITON = "other Inductor-generated (Triton)"  # GELU, residual adds, casts to bf16...
LABELS = [  # every family, in the order of the side-by-side table
    MATMUL_LABEL,
    FP8_LABEL,
    AMAX_LABEL,
    CAST_LABEL,
    SCALE_LABEL,
    "Mamba SSD (Triton)",
    "conv1d",
    "attention",
    "norm",
    "cross-entropy / softmax",
    "optimizer",
    OTHER_TRITON,
    "copy / cast",
    "reduction",
    "elementwise",
    "other",
]


def family(name: str, op: str = "", one_block: bool = False) -> str:
    """The family of a kernel by its name, the op that launched it, and whether its grid is one
    block: the first test that matches wins."""
    n, triton, aten = name.lower(), name.startswith("triton_"), op.lower()
    # Names first: the innermost op of a kernel that a Triton or CUDA extension launched is
    # whatever op encloses it (mamba-ssm's MambaSplitConv1dScanCombinedFn runs the SSD kernels).
    if re.search(r"conv1d|causal_conv", n):
        return "conv1d"
    if not triton and re.search(r"chunk|state_passing|ssd|selective|scan_update", n):
        return "Mamba SSD (Triton)"
    if re.search(r"aten::.*convolution", aten):
        return "conv1d"
    if re.search(r"flash|fmha|cudnn|attention|sdpa", n) or re.search(
        r"aten::.*(attention|sdpa)", aten
    ):
        return "attention"
    if op in MATMUL_OPS or re.search(MATMUL, n):
        return FP8_LABEL if re.search(FP8_MATMUL, n + aten) else MATMUL_LABEL
    # The compiled loss: its log-sum-exp (a row's max, then the sum of exps) and its gradient
    # (the exps less the label's one-hot, an eq): in bf16 runs too, so before the amax test.
    if triton and "exp" in n.split("_") and re.search(r"_(amax|eq)_", n):
        return "cross-entropy / softmax"
    # torchao's tensorwise scaling under Inductor (torch.max(torch.abs(x)), then max / amax as
    # the scale, then a saturated cast): triton_red_fused_abs_amax_0 and the like (also fused into
    # a norm's or an activation's kernel), the scale (one block) unless fused into the cast,
    # triton_poi_fused__to_copy_clamp_div_...
    if "abs" in n and "max" in n:
        return AMAX_LABEL
    if one_block:
        return SCALE_LABEL
    if re.search(r"softmax|entropy|nll|logsumexp", n):
        return "cross-entropy / softmax"
    if triton and "_to_copy" in n and "clamp" in n and not re.search(r"exp|log|gather|scatter", n):
        return CAST_LABEL
    if re.search(r"adam|multi_tensor|foreach|lerp|addcdiv", n):
        return "optimizer"
    if re.search(r"norm|rms|rsqrt", n):
        return "norm"
    if triton:
        return OTHER_TRITON
    for label, pattern in (
        ("copy / cast", r"copy|cast|convert|memcpy|memset|fill"),
        ("reduction", r"reduce|sum|mean"),
        ("elementwise", r"elementwise|vectorized|unrolled"),
    ):
        if re.search(pattern, n):
            return label
    return "other"


# Copies and fills that run as DMA (cudaMemcpyAsync/cudaMemsetAsync) are not kernels but take
# GPU time all the same.
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
# Idle gaps between GPU work by size, microseconds (upper limit, label): many small ones are the
# cost of launching many kernels; a few large ones are the GPU waiting on the host.
GAP_SIZES = ((5, "under 5 us"), (20, "5-20 us"), (100, "20-100 us"), (float("inf"), "100 us+"))
LARGEST_GAPS = 8


@dataclass
class Profile:
    """GPU work of one or more traces: (kernel name, launching op, one-block grid) ->
    [microseconds, launches], summed over the traces."""

    kernels: dict[tuple[str, str, bool], list[float]] = field(
        default_factory=lambda: defaultdict(lambda: [0.0, 0])
    )
    wall_us: float = 0.0  # first kernel's start to last kernel's end, summed over the traces
    steps: int = 0  # profiled steps (ProfilerStep#N marks), summed over the traces
    # Kernels launched before recording began (the previous step's optimizer, still running
    # as the traced step starts): left out of every sum, or that work would count twice.
    before_us: float = 0.0
    # The GPU idle between one piece of work's end and the next's start: [microseconds, count]
    # by size (GAP_SIZES), and the largest ones as (us, the work before, the work after).
    gaps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0]))
    largest_gaps: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def busy_us(self) -> float:
        return sum(us for us, _ in self.kernels.values())

    def per_step(self, us: float) -> float:
        return us / max(self.steps, 1)

    def by(self, key) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for k, (us, _) in self.kernels.items():
            out[key(*k)] += us
        return out

    def families(self) -> dict[str, float]:
        return self.by(family)

    def top_kernels(self, top: int) -> list[tuple[str, float, str, float]]:
        """(name, microseconds, family, launches per step) of the `top` kernels by time."""
        names: dict[str, list] = {}
        for (n, op, one), (us, count) in sorted(self.kernels.items(), key=lambda kv: -kv[1][0]):
            row = names.setdefault(n, [0.0, family(n, op, one), 0])  # the largest's family
            row[0] += us
            row[2] += count
        rows = sorted(names.items(), key=lambda kv: -kv[1][0])[:top]
        return [(n, us, fam, count / max(self.steps, 1)) for n, (us, fam, count) in rows]

    def launches(self) -> int:
        return int(sum(n for _, n in self.kernels.values()))

    def add_gap(self, us: float, before: str, after: str) -> None:
        """The GPU idle for `us` between the end of `before` and the start of `after`."""
        label = next(label for limit, label in GAP_SIZES if us < limit)
        self.gaps[label][0] += us
        self.gaps[label][1] += 1
        self.largest_gaps = sorted([*self.largest_gaps, (us, before, after)], reverse=True)
        del self.largest_gaps[LARGEST_GAPS:]

    def table(self) -> dict:
        rows = sorted(self.kernels.items(), key=lambda kv: -kv[1][0])
        return {
            "kernel_table": 1,
            "wall_us": self.wall_us,
            "steps": self.steps,
            "before_us": self.before_us,
            "kernels": [[n, op, one, round(us, 3), int(c)] for (n, op, one), (us, c) in rows],
            "gaps": {label: [round(us, 3), int(c)] for label, (us, c) in self.gaps.items()},
            "largest_gaps": [[round(us, 3), a, b] for us, a, b in self.largest_gaps],
        }


class TraceError(ValueError):
    """A file that is not a trace (or kernel table) with GPU work: bad input."""


def _one_block(args: dict) -> bool:
    grid = args.get("grid")
    return isinstance(grid, list) and len(grid) == 3 and grid[0] * grid[1] * grid[2] == 1


def load(paths: list[str]) -> Profile:
    """Chrome traces of torch.profiler, or kernel tables that `table()` wrote."""
    prof = Profile()
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TraceError(f"{path}: not a readable JSON trace ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("kernel_table"), dict):
            data = data["kernel_table"]  # nested in another script's results (prefill_profile)
        if isinstance(data, dict) and data.get("kernel_table"):
            for name, op, one, us, count in data["kernels"]:
                row = prof.kernels[(name, op, bool(one))]
                row[0] += us
                row[1] += count
            prof.wall_us += data["wall_us"]
            prof.steps += data["steps"]
            prof.before_us += data.get("before_us", 0.0)
            for label, (us, count) in data.get("gaps", {}).items():
                prof.gaps[label][0] += us
                prof.gaps[label][1] += count
            for us, before, after in data.get("largest_gaps", []):
                prof.largest_gaps.append((us, before, after))
            prof.largest_gaps = sorted(prof.largest_gaps, reverse=True)[:LARGEST_GAPS]
            continue
        if not isinstance(data, dict) or "traceEvents" not in data:
            raise TraceError(f"{path}: no traceEvents (not a torch.profiler Chrome trace)")
        events = data["traceEvents"]
        # A kernel's "External id" is that of the CPU op that launched it (innermost op wins:
        # ops are listed outer first, so later ones with the same id overwrite).
        op_of = {
            e["args"]["External id"]: e["name"]
            for e in events
            if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
        }
        launched = {
            e["args"]["correlation"]
            for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver")
            and "correlation" in e.get("args", {})
        }
        work = []  # (start, end, name) of what is counted
        for e in events:
            if e.get("cat") not in GPU_WORK:
                continue
            args = e.get("args", {})
            if launched and e["cat"] == "kernel" and args.get("correlation") not in launched:
                prof.before_us += e["dur"]
                continue
            op = op_of.get(args.get("External id"), "?")
            row = prof.kernels[(e["name"], op, _one_block(args))]
            row[0] += e["dur"]
            row[1] += 1
            work.append((e["ts"], e["ts"] + e["dur"], e["name"]))
        work.sort()
        if work:
            prof.wall_us += max(end for _, end, _ in work) - work[0][0]
        ended, before = (work[0][1], work[0][2]) if work else (0.0, "")
        for start, end, name in work[1:]:
            if start > ended:
                prof.add_gap(start - ended, before, name)
            if end > ended:
                ended, before = end, name
        marks = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
        prof.steps += max(len(marks), 1)
    if not prof.kernels:
        raise TraceError(
            f"{', '.join(paths)}: no GPU kernels in these traces (a CPU run, or the wrong files)"
        )
    return prof


def matmul_us(fams: dict[str, float]) -> float:
    return fams.get(MATMUL_LABEL, 0.0) + fams.get(FP8_LABEL, 0.0)


def summarise(prof: Profile, top: int, flops: float | None) -> None:
    busy, wall, ms = prof.busy_us, prof.wall_us, lambda us: prof.per_step(us) / 1e3
    print(
        f"GPU busy {ms(busy):.1f} ms over {ms(wall):.1f} ms of wall ({busy / wall:.0%})"
        f"{f' per step, {prof.steps} steps' if prof.steps > 1 else ''}; "
        f"{prof.launches() / max(prof.steps, 1):.0f} kernels per step"
    )
    if prof.before_us:
        print(f"left out: {ms(prof.before_us):.1f} ms of kernels launched before the traced steps")
    if prof.gaps:
        idle = sum(us for us, _ in prof.gaps.values())
        count = sum(c for _, c in prof.gaps.values())
        sizes = ", ".join(
            f"{label} {ms(prof.gaps[label][0]):.1f} ms (x{prof.per_step(prof.gaps[label][1]):g})"
            for _, label in GAP_SIZES
            if label in prof.gaps
        )
        print(
            f"gaps between GPU work: {ms(idle):.1f} ms in {prof.per_step(count):g} a step; {sizes}"
        )
        for us, before, after in prof.largest_gaps[:5]:
            print(f"  {us:9.0f} us  after {before[:50]}  before {after[:50]}")
    fams = prof.families()
    if flops:
        t = ms(matmul_us(fams)) / 1e3
        print(
            f"matmuls: {flops / 1e12:.1f} TFLOP in {t * 1e3:.1f} ms = {flops / t / 1e12:.0f} TFLOP/s"
        )
    print("\nby family:")
    for label, us in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {ms(us):9.1f} ms  {us / busy:6.1%}  {label}")
    print(f"\ntop {top} launching ops:")
    for name, us in sorted(prof.by(lambda n, op, one: op).items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms(us):9.1f} ms  {us / busy:6.1%}  {name[:110]}")
    print(f"\ntop {top} kernels (calls per step):")
    for name, us, _, calls in prof.top_kernels(top):
        print(f"  {ms(us):9.1f} ms  {us / busy:6.1%}  x{calls:<5g} {name[:110]}")


def compare(a: Profile, b: Profile, labels: tuple[str, str], top: int, flops: float | None) -> None:
    """One table: each family's time per step in both, their ratio and difference."""
    la, lb = labels
    fa, fb = a.families(), b.families()
    ma, mb = (lambda us: a.per_step(us) / 1e3), (lambda us: b.per_step(us) / 1e3)
    print(f"{'per step':38} {la:>10} {lb:>10} {lb + '/' + la:>10} {'diff':>9}")

    def line(label: str, x: float, y: float, unit: str = "ms") -> None:
        ratio = f"{y / x:10.2f}" if x else f"{'-':>10}"
        print(f"{label[:38]:38} {x:10.1f} {y:10.1f} {ratio} {y - x:+9.1f} {unit}".rstrip())

    line("wall (first to last kernel)", ma(a.wall_us), mb(b.wall_us))
    line("GPU busy", ma(a.busy_us), mb(b.busy_us))
    line("gaps (GPU idle)", ma(a.wall_us - a.busy_us), mb(b.wall_us - b.busy_us))
    for _, size in GAP_SIZES:
        if size in a.gaps or size in b.gaps:
            line(f"  gaps {size}", ma(a.gaps.get(size, [0.0])[0]), mb(b.gaps.get(size, [0.0])[0]))
    line("kernels launched", a.launches() / max(a.steps, 1), b.launches() / max(b.steps, 1), "")
    line("left out: launched before the trace", ma(a.before_us), mb(b.before_us))
    print()
    for label in [lab for lab in LABELS if lab in fa or lab in fb]:
        line(label, ma(fa.get(label, 0.0)), mb(fb.get(label, 0.0)))
    mm_a, mm_b = ma(matmul_us(fa)), mb(matmul_us(fb))
    fp8_a = sum(ma(fa.get(k, 0.0)) for k in FP8_WORK)
    fp8_b = sum(mb(fb.get(k, 0.0)) for k in FP8_WORK)
    print()
    line("all matmuls", mm_a, mm_b)
    line("amax + one-block + casts", fp8_a, fp8_b)
    line("the rest", ma(a.busy_us) - mm_a - fp8_a, mb(b.busy_us) - mm_b - fp8_b)
    if flops:
        line("matmul TFLOP/s (all GEMMs)", flops / mm_a / 1e9, flops / mm_b / 1e9, "TFLOP/s")
    f8 = mb(fb.get(FP8_LABEL, 0.0))
    if f8 and not fa.get(FP8_LABEL):
        left = mb(fb.get(MATMUL_LABEL, 0.0))
        moved = ma(fa.get(MATMUL_LABEL, 0.0)) - left
        print(
            f"\nGEMMs that went to FP8: {moved:.1f} ms in {la} ({la}'s GEMMs less {lb}'s left in "
            f"bf16), {f8:.1f} ms as FP8 GEMMs"
            + (f" ({moved / f8:.2f}x faster)" if moved > 0 else "")
            + f"; left in bf16 in {lb} (first/last blocks, output layer...): {left:.1f} ms"
        )
        print(
            f"GEMM time saved {moved - f8:.1f} ms; FP8 work added {fp8_b - fp8_a:.1f} ms; the "
            f"rest {mb(b.busy_us) - mm_b - fp8_b - (ma(a.busy_us) - mm_a - fp8_a):+.1f} ms; "
            f"busy saved {ma(a.busy_us) - mb(b.busy_us):.1f} ms, wall saved "
            f"{ma(a.wall_us) - mb(b.wall_us):.1f} ms"
        )
    for label, prof in ((la, a), (lb, b)):
        print(f"\n{label}: top {top} kernels (ms per step, family, calls per step)")
        for name, us, fam, calls in prof.top_kernels(top):
            print(f"  {prof.per_step(us) / 1e3:9.1f} ms  {fam[:26]:26} x{calls:<5g} {name[:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/trace_summary.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("traces", nargs="+", help="torch.profiler .pt.trace.json files")
    parser.add_argument("--vs", nargs="+", metavar="TRACE", help="traces to set side by side")
    parser.add_argument("--labels", default="A,B", help="the two sides' names: A,B")
    parser.add_argument("--top", type=int, default=25, help="kernels to list")
    parser.add_argument("--flops", type=float, help="matmul FLOPs of one step")
    parser.add_argument(
        "--json-out",
        nargs="+",
        metavar="PATH",
        help="write the kernel table of the traces (and of --vs's, a second path) here",
    )
    args = parser.parse_args(argv)
    labels = tuple(args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        parser.error(f"--labels: two names joined by a comma, got {args.labels!r}")
    if args.flops is not None and args.flops <= 0:
        parser.error("--flops: a positive number of FLOPs per step")
    if args.json_out and len(args.json_out) != (2 if args.vs else 1):
        parser.error("--json-out: one path per set of traces")
    try:
        profiles = [load(args.traces)] + ([load(args.vs)] if args.vs else [])
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, prof in zip(args.json_out or [], profiles):
        with open(path, "w") as f:
            json.dump(prof.table(), f)
    if args.vs:
        compare(profiles[0], profiles[1], labels, args.top, args.flops)
    else:
        summarise(profiles[0], args.top, args.flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
