"""mamba-ssm's Triton SSD (model.kernels = "mamba_ssm") against the pure-PyTorch reference on one
GPU: parity of outputs and gradients, and the time of the SSD alone.

    PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_kernels.py [--chunks 64,128,256]

`--chunks`: also time the kernels' forward and backward at each chunk length (model.
mamba_chunk_size; the recipes keep the reference's 128, mamba-ssm's own default is 256) on one
micro-batch of the 800M's and of the 8B's Mamba layers at seq 4096, and the output's distance
from the first chunk length's (the same sums, in another order).

`--fused-forward p64_w8,p32_w4`: our SSD forward in one kernel (toolkit/model/ssd_scan_kernel.py)
against mamba-ssm's kernels at those shapes, at each setting of channels a program and warps.
`--states p32_w4_s2,p64_w4_s1`: our chunk states in one kernel (toolkit/model/ssd_states_kernel.py)
against mamba-ssm's three kernels they replace (cumsum, chunk state, state passing).
`--state-grads p64_w4`: likewise our chunk-state gradients in one kernel
(toolkit/model/ssd_state_grad_kernel.py) against mamba-ssm's two kernels.
`--backward dstates,dstates+dx,dstates+bc`: the SSD backward from the forward's kept states with
those of our kernels (fused_mamba.TRITON_MAMBA's names) against mamba-ssm's kernels alone.

`--profile`: each of mamba-ssm's SSD kernels at those shapes (chunk 128), forward + backward
under torch.profiler: calls and ms per step, and the bytes the SSD's inputs, outputs and
gradients need at the least (each read or written once), to show where its time goes beside
what the HBM allows.

Parity is relative L2 error (||a - b|| / ||b||) against the reference run in fp32, for fp32 and
bf16 inputs; it runs first unless only our kernels' sweeps (--fused-forward, --states, --state-grads,
--backward) are asked for. Whole-model throughput: run the trainer twice with
`--set model.kernels=...`.
"""

import argparse
import functools
import time

import torch

from toolkit.model.kernels import mamba_ssm_available, ssd_mamba_ssm
from toolkit.model.ssd import ssd_chunked


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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


def triton_kernel_times(
    fn, reps: int = 5, everything: bool = False
) -> list[tuple[str, float, int]]:
    """fn's Triton kernels (named _..._kernel; with `everything` also the callers' torch copies,
    fills and sums) under torch.profiler: (name, ms, calls) a call of fn (mean of `reps`), the
    most time first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = sorted(
        (e for e in prof.key_averages()
         if e.device_time_total > 0 and (everything or e.key.startswith("_"))),
        key=lambda e: -e.device_time_total,
    )  # fmt: skip
    return [(e.key, e.device_time_total / reps / 1e3, e.count // reps) for e in rows]


def profile_kernels(chunk: int = 128) -> None:
    """Per-kernel GPU time of mamba-ssm's SSD forward + backward at each of SWEEP_SHAPES, and
    the least bytes it must move."""
    for name, shape in SWEEP_SHAPES.items():
        args = inputs(**shape, dtype=torch.bfloat16)
        run(ssd_mamba_ssm, args, chunk)  # autotune outside the profile
        rows = triton_kernel_times(functools.partial(run, ssd_mamba_ssm, args, chunk))
        total = sum(ms for _, ms, _ in rows)
        b, length, heads, p, groups, n = (
            shape[k] for k in ("b", "length", "heads", "p", "groups", "n")
        )
        tokens = b * length
        x_bytes, bc_bytes, dt_bytes = (
            tokens * heads * p * 2,
            tokens * groups * n * 2,
            tokens * heads * 4,
        )
        # forward: x, dt, B, C read, y written; backward: the same and dy read, dx, ddt, dB, dC
        # written
        least = 5 * x_bytes + 3 * dt_bytes + 6 * bc_bytes
        print(
            f"SSD kernels {name} {shape} chunk {chunk}: {total:.2f} ms a forward + backward in "
            f"mamba-ssm's kernels; the least bytes {least / 1e9:.2f} GB, {least / total / 1e6:.0f} "
            "GB/s at this time"
        )
        for key, ms, calls in rows:
            print(f"  {ms:7.3f} ms {ms / total:6.1%} {calls:3d}x  {key[:90]}")
        del args
        torch.cuda.empty_cache()


def op_inputs(b: int, length: int, heads: int, p: int, groups: int, n: int, **_):
    """The fused op's SSD inputs, bf16: x, B, C and dt slices of one row as in_proj's output
    (after the conv) gives them; A, D and dt_bias fp32."""
    torch.manual_seed(0)
    H, P, G, N = heads, p, groups, n
    row = torch.randn(b, length, H * P + 2 * G * N + H, device="cuda", dtype=torch.bfloat16)
    x = row[..., : H * P].unflatten(-1, (H, P))
    B = row[..., H * P : H * P + G * N].unflatten(-1, (G, N))
    C = row[..., H * P + G * N : H * P + 2 * G * N].unflatten(-1, (G, N))
    dt = row[..., H * P + 2 * G * N :].sub_(2)  # a view, as the op's dt is
    dt_bias, D = torch.randn(H, device="cuda") * 0.5, torch.randn(H, device="cuda")
    A = -torch.rand(H, device="cuda") - 0.5
    return x, dt, A, B, C, D, dt_bias


_DEFAULTS: dict[str, dict[str, int]] = {}  # each kernel module's settings as first seen


def apply_settings(module, variant: str) -> None:
    """'p64_n32_q32_m16_r64_w4_v8_s1' -> module.BLOCK_P, BLOCK_N, BLOCK_Q, BLOCK_M,
    BC_BLOCK_M, NUM_WARPS, BC_NUM_WARPS, NUM_STAGES (those named; the others back to the
    module's own)."""
    names = {"p": "BLOCK_P", "n": "BLOCK_N", "q": "BLOCK_Q", "m": "BLOCK_M", "r": "BC_BLOCK_M",
             "w": "NUM_WARPS", "v": "BC_NUM_WARPS", "s": "NUM_STAGES"}  # fmt: skip
    own = _DEFAULTS.setdefault(
        module.__name__, {a: getattr(module, a) for a in names.values() if hasattr(module, a)}
    )
    for attr, value in own.items():
        setattr(module, attr, value)
    for token in filter(None, variant.split("_")):
        setattr(module, names[token[0]], int(token[1:]))


def attempt(label: str, run):
    """run(), or None with the error said under `label`: a setting that does not compile (too
    much shared memory, say) is reported and the sweep goes on."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - any compile or launch error of that setting
        print(f"  {label}: failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def race_variants(title: str, theirs, module, ours, variants: list[str], pick, what: str,
                  reps: int = 20) -> None:  # fmt: skip
    """mamba-ssm's kernels (`theirs()`) against ours (`ours()` at each of `variants`, the
    settings of `module`: apply_settings): median ms of `reps` (with the host's launches), each
    kernel's GPU time, and how far `pick(ours())` is from `pick(theirs())`, relative to its
    largest (`what` names it)."""
    from cross_entropy import timed_ms  # benchmarks/, this script's folder

    want = pick(theirs()).float()
    their_ms = timed_ms(theirs, reps, want.device)
    print(f"{title}: mamba-ssm's kernels {their_ms:.3f} ms")
    print("    kernels (ms):", kernel_list(theirs))
    for variant in variants:
        apply_settings(module, variant)
        got = attempt(f"ours {variant:8}", ours)
        if got is None:
            continue
        ms = timed_ms(ours, reps, want.device)
        diff = float((pick(got).float() - want).abs().max() / want.abs().max())
        print(
            f"  ours {variant:8}: {ms:.3f} ms ({their_ms / ms:.2f}x), {what} differs by {diff:.1e}"
        )
        print("    kernels (ms):", kernel_list(ours))


def fused_forward(variants: list[str]) -> None:
    """Our SSD forward in one kernel (ssd_scan_kernel.py) against mamba-ssm's 5 kernels as the
    fused op's keeping forward runs them (fused_mamba.ssd_forward_keeping_states), at each of
    SWEEP_SHAPES, bf16, chunk 128 (race_variants: y compared)."""
    from toolkit.model import ssd_scan_kernel
    from toolkit.model.fused_mamba import ssd_forward_keeping_states

    for name, shape in SWEEP_SHAPES.items():
        x, dt, A, B, C, D, dt_bias = op_inputs(**shape)
        args = (x, dt, A, B, C, 128, D, dt_bias)
        race_variants(
            f"SSD forward {name}", functools.partial(ssd_forward_keeping_states, *args),
            ssd_scan_kernel, functools.partial(ssd_scan_kernel.ssd_forward_fused, *args),
            variants, lambda out: out[0], "y",
        )  # fmt: skip


def chunk_states(variants: list[str]) -> None:
    """Our chunk states in one kernel (ssd_states_kernel.py) against mamba-ssm's cumsum, chunk
    state and state passing (fused_mamba.ssd_states_by_mamba_ssm), at each of SWEEP_SHAPES, bf16,
    chunk 128 (race_variants: the states compared)."""
    from toolkit.model import ssd_states_kernel
    from toolkit.model.fused_mamba import ssd_states_by_mamba_ssm

    for name, shape in SWEEP_SHAPES.items():
        x, dt, A, B, _, _, dt_bias = op_inputs(**shape)
        args = (x, dt, A, B, 128, dt_bias)
        race_variants(
            f"SSD chunk states {name}", functools.partial(ssd_states_by_mamba_ssm, *args),
            ssd_states_kernel, functools.partial(ssd_states_kernel.ssd_states, *args),
            variants, lambda out: out[2], "the states",
        )  # fmt: skip


def state_grads(variants: list[str], reps: int = 20) -> None:
    """Our chunk-state gradients in one kernel (ssd_state_grad_kernel.py) against mamba-ssm's
    _chunk_scan_bwd_dstates + _state_passing_bwd as fused_mamba.ssd_backward_from_states runs
    them, at each of SWEEP_SHAPES, bf16, chunk 128, from mamba-ssm's forward's states: median
    ms of `reps` and the gradients' relative L2 distance."""
    from cross_entropy import timed_ms  # benchmarks/, this script's folder

    from toolkit.model import ssd_state_grad_kernel
    from toolkit.model.fused_mamba import ssd_forward_keeping_states
    from toolkit.model.fused_mamba import ssd_state_grads_by_mamba_ssm as theirs

    for name, shape in SWEEP_SHAPES.items():
        x, dt, A, B, C, D, dt_bias = op_inputs(**shape)
        _, (_, dA_sums, states) = ssd_forward_keeping_states(x, dt, A, B, C, 128, D, dt_bias)
        dy = torch.randn_like(x)
        args = (dy, C, dA_sums, states)
        want = theirs(*args)
        their_ms = timed_ms(functools.partial(theirs, *args), reps, x.device)
        print(f"SSD state grads {name}: mamba-ssm's kernels {their_ms:.3f} ms")
        for variant in variants:
            apply_settings(ssd_state_grad_kernel, variant)
            ours = functools.partial(ssd_state_grad_kernel.ssd_state_grads, *args)
            got = attempt(f"ours {variant:8}", ours)
            if got is None:
                continue
            ms = timed_ms(ours, reps, x.device)
            diffs = ", ".join(f"{rel_l2(a, b):.1e}" for a, b in zip(got, want))
            print(f"  ours {variant:8}: {ms:.3f} ms ({their_ms / ms:.2f}x), rel L2 {diffs}")


def kernel_list(fn) -> str:
    """'GPU T ms: name ms; ...; other kernels O ms (N)' of all fn's kernels: its Triton kernels
    by name, the most time first, then the torch kernels around them (sums, fills, copies: a
    graphed step runs them too)."""
    rows = triton_kernel_times(fn, everything=True)
    named = [(key, ms) for key, ms, _ in rows if key.startswith("_")]
    other = [(ms, calls) for key, ms, calls in rows if not key.startswith("_")]
    total = sum(ms for _, ms, _ in rows)
    listed = "; ".join(f"{key} {ms:.3f}" for key, ms in named)
    rest = sum(ms for ms, _ in other)
    return f"GPU {total:.3f} ms: {listed}; other kernels {rest:.3f} ({sum(c for _, c in other)})"


def backward_from_states(kernel_sets: list[str], reps: int = 20) -> None:
    """The SSD's backward from the kept states (fused_mamba.ssd_backward_from_states) with each
    set of our kernels in place of mamba-ssm's ('+'-joined TOOLKIT_TRITON_MAMBA names: dstates,
    dx, bc, ddacs; 'none' for mamba-ssm's alone; '@mM_wW_sS': the chunk-gradient kernels at M
    rows a step, W warps and S stages, else the module's settings), at each of SWEEP_SHAPES,
    bf16, chunk 128: median ms of `reps` and each gradient's relative L2 distance from
    mamba-ssm's."""
    from cross_entropy import timed_ms  # benchmarks/, this script's folder

    import toolkit.model.fused_mamba as fm
    from toolkit.model import ssd_chunk_grad_kernel

    grad_names = ("dx", "ddt", "dB", "dC", "dA", "dD", "ddt_bias")
    own = fm.TRITON_MAMBA
    for name, shape in SWEEP_SHAPES.items():
        x, dt, A, B, C, D, dt_bias = op_inputs(**shape)
        args = (x, dt, A, B, C, 128, D, dt_bias)
        _, kept = fm.ssd_forward_keeping_states(*args)
        dy = torch.randn_like(x)
        out = [torch.empty_like(t) for t in (x, dt, B, C)]

        def backward(dy=dy, args=args, kept=kept, out=out):
            return [*out, *fm.ssd_backward_from_states(dy, *args, kept, *out)]

        fm.TRITON_MAMBA = frozenset()
        want = [t.clone() for t in backward()]
        their_ms = timed_ms(backward, reps, x.device)
        print(f"SSD backward from the states {name}: mamba-ssm's kernels {their_ms:.3f} ms")
        print("    kernels (ms):", kernel_list(backward))
        for kernel_set in kernel_sets:
            names, _, settings = kernel_set.partition("@")
            apply_settings(ssd_chunk_grad_kernel, settings)
            fm.TRITON_MAMBA = frozenset(names.split("+")) - {"none"}
            got = attempt(f"{kernel_set:12}", backward)
            if got is None:
                continue
            diffs = ", ".join(f"{n} {rel_l2(a, b):.1e}" for n, a, b in zip(grad_names, got, want))
            ms = timed_ms(backward, reps, x.device)
            print(f"  {kernel_set:12}: {ms:.3f} ms ({their_ms / ms:.2f}x); rel L2 {diffs}")
            print("    kernels (ms):", kernel_list(backward))
    fm.TRITON_MAMBA = own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--chunks",
        type=lambda v: [int(c) for c in v.split(",")],
        help="comma-separated chunk lengths to time at the recipes' shapes, e.g. 64,128,256",
    )
    parser.add_argument(
        "--profile", action="store_true", help="each SSD kernel's time at the recipes' shapes"
    )
    parser.add_argument(
        "--fused-forward",
        type=lambda v: v.split(","),
        metavar="VARIANTS",
        help="time our one-kernel SSD forward against mamba-ssm's, e.g. p64_w8,p32_w4",
    )
    parser.add_argument(
        "--states",
        type=lambda v: v.split(","),
        metavar="VARIANTS",
        help="time our one-kernel chunk states against mamba-ssm's three, e.g. p32_w4_s2",
    )
    parser.add_argument(
        "--state-grads",
        type=lambda v: v.split(","),
        metavar="VARIANTS",
        help="time our one-kernel chunk-state gradients against mamba-ssm's, e.g. p64_w4,p32_w4",
    )
    parser.add_argument(
        "--backward",
        type=lambda v: v.split(","),
        metavar="SETS",
        help="time the SSD backward from kept states with our kernels, e.g. dstates,dstates+dx",
    )
    options = parser.parse_args()
    chunks = options.chunks
    if not (torch.cuda.is_available() and mamba_ssm_available()):
        raise SystemExit("error: needs a CUDA device and mamba-ssm (see benchmarks/gpu_setup.sh)")
    ours_sweeps = (options.fused_forward, options.states, options.state_grads, options.backward)
    ours_only = any(ours_sweeps) and not (chunks or options.profile)
    if not ours_only:  # (device time: our kernels' sweeps do not need it)
        mamba_ssm_against_reference()
    if chunks:
        sweep_chunks(chunks)
    if options.profile:
        profile_kernels()
    if options.fused_forward:
        fused_forward(options.fused_forward)
    if options.states:
        chunk_states(options.states)
    if options.state_grads:
        state_grads(options.state_grads)
    if options.backward:
        backward_from_states(options.backward)


def mamba_ssm_against_reference() -> None:
    """mamba-ssm's SSD against the reference in fp32 and bf16 (relative L2 of the outputs and
    gradients), and both timed, at one small shape."""
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


if __name__ == "__main__":
    main()
