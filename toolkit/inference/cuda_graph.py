"""The engine's decode step at static shapes, replayed as CUDA graphs on the GPU.

Eager decode is launch-bound (21x slower at batch 1 on the H200: benchmarks/RESULTS.md), so every
step of the running batch replays a recorded graph instead. A graph fixes the shapes and the
addresses of its inputs, hence:
- a step decodes the first rows of the engine's slots, as many as the smallest live-batch bucket
  (batch_buckets) that holds the running rows (the engine keeps them in the lowest slots): free
  rows inside compute garbage in their own rows only (a prefill overwrites a slot it seats);
- inputs live in static buffers: the tokens here, the per-row positions in the engine's tensor,
  changed in place between steps, never rebound;
- attention reads a fixed span of the cache, masked per row; the span is the longest row rounded
  up to a bucket (span_bucket), with one graph per (batch, span) bucket, recorded when first
  needed or by the engine's warm_up;
- nothing inside reads a device value on the host.
On the CPU, or with graphs off, the same static step runs eagerly (what the CPU tests check).
"""

import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from toolkit.inference import gemv
from toolkit.model.kernels import triton_runs_on
from toolkit.model.states import DecodeStates

log = logging.getLogger(__name__)

# forward(tokens [slots, 1], per-layer state views) -> logits [slots, vocab]
DecodeForward = Callable[[torch.Tensor, DecodeStates], torch.Tensor]


def span_bucket(needed: int, max_len: int, minimum: int = 256) -> int:
    """Cache positions a static decode step attends to when its longest row needs `needed`
    (its position + 1): rounded up to a multiple of 1/16 of the next power of two, at least
    `minimum`, at most `max_len`. At most ~1/8 of the keys read are masked waste, and a context
    growing from 4k to 32k tokens passes through 24 buckets (graphs)."""
    if not 1 <= needed <= max_len:
        raise ValueError(f"decode needs {needed} cache positions; the cache holds {max_len}")
    octave = 1 << (needed - 1).bit_length()
    step = max(minimum, octave // 16)
    return min(max_len, -(-needed // step) * step)


def batch_buckets(slots: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The live-batch sizes a decode step runs at, ascending: `sizes` (None: the powers of two
    below `slots`) and `slots` itself. A lone request then pays for one row, not every slot."""
    sizes = [1 << i for i in range((slots - 1).bit_length())] if sizes is None else list(sizes)
    if any(not 1 <= n <= slots for n in sizes):
        raise ValueError(f"decode batch buckets {sizes} must lie in [1, {slots}] (the slots)")
    return sorted({*sizes, slots})


class StaticDecoder:
    """Decodes one token for each of the first rows: `decoder(tokens, needed)` -> logits
    [bucket, vocab], the smallest bucket >= len(tokens).

    `positions` [slots] (device) is read for each row's position and must be advanced by the
    caller, in place. `cuda_graphs`: record and replay graphs (CUDA only; elsewhere the static
    step runs eagerly, with the same buckets)."""

    def __init__(
        self,
        forward: DecodeForward,
        states: DecodeStates,
        positions: torch.Tensor,
        *,
        max_len: int,
        cuda_graphs: bool,
        buckets: Sequence[int] | None = None,
    ) -> None:
        self.forward, self.states, self.positions = forward, states, positions
        self.max_len = max_len
        self.buckets = batch_buckets(positions.size(0), buckets)
        self.device = positions.device
        self.tokens = torch.zeros(positions.size(0), 1, dtype=torch.long, device=self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        if cuda_graphs and not self.cuda_graphs:
            log.info("CUDA graphs need a CUDA device; decoding eagerly on %s", self.device)
        # (rows, span) -> the graph and its output
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # one memory pool shared by all graphs (never replayed together)
        self.error: str | None = None  # why recording failed (then the step runs eagerly)

    def bucket(self, live: int) -> int:
        """The rows a step decodes when the running rows lie below `live`."""
        return next(b for b in self.buckets if b >= live)

    def __call__(self, tokens: torch.Tensor, needed: int) -> torch.Tensor:
        """`tokens` [live] (any device; free rows: anything valid) for the first rows; `needed`:
        the longest running row's position + 1. The result is overwritten by the next call:
        index it now."""
        self.tokens[: tokens.numel()].copy_(tokens.view(-1, 1))
        return self.launch(needed, tokens.numel())

    def launch(self, needed: int, live: int) -> torch.Tensor:
        """The step for the tokens already in `self.tokens` (written on the device by the
        previous step's sampling, with overlap); the same result as __call__."""
        key = (self.bucket(live), span_bucket(needed, self.max_len))
        if not self.cuda_graphs:
            return self._step(*key)
        if key not in self.graphs:
            return self._record(*key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _step(self, rows: int, span: int) -> torch.Tensor:
        # New views each step: the step's Python-side bookkeeping (MambaState.seen += 1) lands
        # on them, and the KV views read the engine's positions, never rebind them.
        views = self.states.decode_rows(rows, self.positions, span)
        with gemv.decode_products(triton_runs_on(self.device)):  # 1-16 rows: gemv.py, gemm_rows.py
            return self.forward(self.tokens[:rows], views)

    def _record(self, rows: int, span: int) -> torch.Tensor:
        """The first step at a new shape runs eagerly on a side stream, which is the warm-up
        (cuBLAS/cuDNN workspaces, Triton compilation happen outside the capture) and also this
        step's result: the states must not be stepped twice. Recording then runs nothing."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self._step(rows, span)
        current.wait_stream(side)
        logits.record_stream(current)
        graph = torch.cuda.CUDAGraph()
        # No cyclic collection during the capture: garbage holding another graph (its reset) or
        # CUDA memory would invalidate it (seen on an H200: a generate call's decoder in a
        # reference cycle, collected while the next call recorded).
        collecting = gc.isenabled()
        gc.disable()
        try:
            # thread_local: a server's other threads may touch CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                static_logits = self._step(rows, span)
        except Exception as e:  # an op that cannot be captured: slow beats down
            self.error = f"{type(e).__name__}: {e}"
            self.cuda_graphs = False
            log.error("recording a decode graph failed; decoding eagerly: %s", self.error)
            return logits
        finally:
            if collecting:
                gc.enable()
        self.pool = graph.pool()
        self.graphs[rows, span] = (graph, static_logits)
        log.info("recorded a decode graph for %d rows x %d cache positions", rows, span)
        return logits
