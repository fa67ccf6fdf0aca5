"""What the trainer measures beyond the loss: MFU against the GPU's peak, a torch.profiler trace
of chosen steps, and NVTX ranges for Nsight Systems. (NVIDIA's DLProf is retired; a package of
that name on the public index is a placeholder, not the tool. Use torch.profiler traces, viewed
in Perfetto or TensorBoard, and Nsight Systems: `nsys profile -t cuda,nvtx python ...`.)
"""

import logging
from pathlib import Path

import torch
from torch import nn

from toolkit.config import ProfileConfig

log = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets, by precision.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp8": 1978.9, "fp32": 494.7},  # fp32: TF32 tensor cores
    "H100": {"bf16": 989.4, "fp8": 1978.9, "fp32": 494.7},  # SXM
    "A100": {"bf16": 312.0, "fp32": 156.0},
}


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> float | None:
    """The per-GPU peak that MFU divides by: the recipe's value, else the data-sheet figure for
    this GPU, else None (CPUs and unknown GPUs get no MFU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, peaks in PEAK_TFLOPS.items():
        if model in name:
            return peaks.get(precision)
    return None


class StepProfiler:
    """A torch.profiler trace of steps [start, start + steps), written for TensorBoard's
    profiler plugin and Perfetto (`<dir>/rank<N>.<time>.pt.trace.json`). Steps before `start`
    run under the profiler's idle schedule (no recording); the step before is its warm-up."""

    def __init__(
        self,
        cfg: ProfileConfig,
        out_dir: str | Path,
        rank: int,
        device: torch.device,
        next_step: int = 1,
    ) -> None:
        self.profiler: torch.profiler.profile | None = None
        self.last = cfg.start + cfg.steps - 1
        if cfg.start < next_step or cfg.steps < 1:  # off, or already past (a resumed run)
            return
        warmup = 1 if cfg.start > next_step else 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                skip_first=cfg.start - next_step - warmup,
                wait=0,
                warmup=warmup,
                active=cfg.steps,
                repeat=1,
            ),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                str(out_dir), worker_name=f"rank{rank}"
            ),
        )
        self.profiler.__enter__()
        log.info("tracing steps %d-%d into %s", cfg.start, self.last, out_dir)

    def after_step(self, step: int) -> None:
        """`step` (1-based) has finished."""
        if self.profiler is None:
            return
        self.profiler.step()
        if step >= self.last:
            self.stop()

    def stop(self) -> None:
        """End the trace (and write what was recorded, if the run ended inside it)."""
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None


def add_nvtx_ranges(model: nn.Module) -> None:
    """Push an NVTX range around every block's forward (named `layers.3 (M)`), so Nsight Systems
    shows where each step's time goes. The model code is untouched: forward hooks do it."""
    for name, block in model.named_modules():
        if not (name.startswith("layers.") and name.count(".") == 1):
            continue
        label = f"{name} ({block.kind})"
        block.register_forward_pre_hook(
            lambda mod, args, label=label: torch.cuda.nvtx.range_push(label)
        )
        block.register_forward_hook(lambda mod, args, out: torch.cuda.nvtx.range_pop())


def measure_matmul_tflops(
    device: torch.device, precision: str = "bf16", size: int = 8192, iters: int = 20
) -> float | None:
    """The matmul rate this device really reaches, in TFLOP/s: a size^3 bf16 matmul, or for 'fp8'
    an e4m3 `torch._scaled_mm` (CUDA with compute capability >= 8.9; None elsewhere), or fp32 on
    CPUs (size capped at 1024 there). Median of `iters` timed calls after 3 warm-up calls."""
    import statistics
    import time

    if device.type == "cuda":
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    else:
        if precision == "fp8":
            return None
        size, dtype = min(size, 1024), torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    if precision == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            return None
        one = torch.ones((), device=device)
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as _scaled_mm wants

        def matmul() -> None:
            torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:

        def matmul() -> None:
            torch.mm(a, b)

    times = []
    for i in range(iters + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        matmul()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12
