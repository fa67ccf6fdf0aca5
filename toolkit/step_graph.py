"""A whole training step, forward to update, replayed as one CUDA graph.

Where a step launches thousands of small kernels (the 800M's 48 blocks: ~3,700 a step, most of
the host's time in mamba-ssm's backward launching its Triton kernels), the host cannot queue
them as fast as the GPU runs them: on an H100 the 800M race's step took 361-383 ms for 262 ms
of GPU work. Captured once, the step costs the host one graph launch.

What a replay needs, and this module arranges:
- inputs read from tensors the caller refills in place before each call (the tokens);
- gradients as eager steps have them: the body sets them to None after its update, and the
  backward makes them anew; inside the capture they come from the graph's memory pool, where
  each replay writes them again (zeroing them in place instead cost a memset and an add, ~8
  bytes a parameter: the graph was no faster than eager steps at the 8B widths);
- no host sync inside the body: the clip through clip_and_queue_step, its norm returned as a
  device tensor;
- an optimizer whose host work can leave the graph: TritonAdamW (train.adamw_kernel), whose
  capture() fixes its tables and whose stage(), called before each replay, writes the step's
  lr and bias corrections to the device; its settle(), after the replay is queued, does the
  host's bookkeeping while the GPU runs.

The first calls run eagerly, on a side stream (compilation, autotuning, cuBLAS workspaces, the
optimizer's state), as CUDA graphs need; every call is a training step. Without CUDA (CPUs, the
tests) the body runs eagerly each call with the optimizer captured and staged all the same: the
split between host and device that a replay relies on is what runs.
"""

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from toolkit.distributed import ParallelEnv
from toolkit.parallel.runtime import clip_and_queue_step

if TYPE_CHECKING:
    from toolkit.parallel.parallelize import ParallelModel

log = logging.getLogger(__name__)

Outputs = TypeVar("Outputs")


class StepGraph(Generic[Outputs]):
    """`body()` (one training step that returns device tensors) called once per training step:
    the first `warmup` calls eagerly (on a side stream where CUDA is used), then, on CUDA, the
    next one captured and every call from there a replay, `optimizer` staged before each. The
    caller refills the body's inputs in place before every call; each call is one step."""

    def __init__(
        self,
        body: Callable[[], Outputs],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        warmup: int = 2,
    ) -> None:
        if not all(hasattr(optimizer, name) for name in ("capture", "stage", "settle")):
            raise ValueError(
                f"a step replayed as a CUDA graph needs its update on the device alone: "
                f"{type(optimizer).__name__} is not one (train.adamw_kernel='triton' is)"
            )
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (the optimizer's state), got {warmup}")
        self.body, self.optimizer, self.device, self.warmup = body, optimizer, device, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Outputs | None = None

    def __call__(self) -> Outputs:
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager()
        if self.calls == self.warmup + 1:
            self.optimizer.capture()
            if self.device.type == "cuda":
                started = time.perf_counter()
                self.graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(self.graph):
                        self.outputs = self.body()
                except RuntimeError as e:
                    raise RuntimeError(
                        f"capturing the training step as a CUDA graph failed ({e}): something in "
                        "the step waits for the GPU or copies from pageable host memory; run "
                        "without train.step_graph (--step-graph)"
                    ) from e
                log.info("step %d captured as a CUDA graph in %.1f s; replayed from here on",
                         self.calls, time.perf_counter() - started)  # fmt: skip
        self.optimizer.stage()
        if self.graph is None:
            outputs = self.body()
        else:
            self.graph.replay()
            outputs = self.outputs
        self.optimizer.settle()  # host work while the GPU runs the step
        return outputs

    def _eager(self) -> Outputs:
        if self.device.type != "cuda":
            return self.body()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            outputs = self.body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return outputs


def training_body(
    parallel: "ParallelModel",
    params: list[torch.Tensor],
    max_norm: float,
    env: ParallelEnv,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    skip_non_finite: bool = True,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A StepGraph body of one training step over `inputs` and `labels` (buffers the caller
    refills): forward and backward, the clip and the update queued with no host sync (with
    `skip_non_finite`, no update for a non-finite loss: train.nan_policy 'skip'), the gradients
    set to None. It returns (the loss, the gradient norm before clipping), device tensors."""
    optimizer = parallel.optimizer

    def body() -> tuple[torch.Tensor, torch.Tensor]:
        loss = parallel.run_step(inputs, labels)
        skip = loss if skip_non_finite else None
        norm = clip_and_queue_step(optimizer, params, max_norm, env, skip_unless_finite=skip)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), norm

    return body
