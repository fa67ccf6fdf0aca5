"""Per-block training transforms applied from outside the model (torchtitan's apply_ac and
apply_compile): activation checkpointing and torch.compile, each chosen per block kind.

Both replace behaviour, never structure: a block keeps its module path and parameter names
(`layers.3.mixer.in_proj.weight`), so checkpoints, the tensor-parallel hooks and the sharding
layout see the same model whatever runs.
"""

import logging
import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from toolkit.config import BLOCK_KINDS

log = logging.getLogger(__name__)


def selected_kinds(spec: Any) -> set[str]:
    """Pattern symbols ('M', '*', '-') chosen by a recipe switch ('full'/'none', true/false, or a
    list of block kinds, as validated by toolkit.config)."""
    if isinstance(spec, list):
        return {BLOCK_KINDS[k] for k in spec}
    return set(BLOCK_KINDS.values()) if spec in ("full", True) else set()


def _checkpointed_forward(self: nn.Module, x: torch.Tensor, state: Any = None) -> torch.Tensor:
    # Decoding (a state) and no-grad passes save nothing: no reason to recompute.
    if state is not None or not torch.is_grad_enabled():
        return type(self).forward(self, x, state)
    # Non-reentrant: works with inputs that do not require grad, keyword args and autocast, and
    # replays the RNG state (none of the blocks uses dropout today).
    return checkpoint(type(self).forward, self, x, None, use_reentrant=False)


def _te_checkpointed_forward(self: nn.Module, x: torch.Tensor, state: Any = None) -> torch.Tensor:
    # Transformer Engine's checkpoint recomputes inside the forward pass's FP8 autocast, with the
    # scales that pass used (torch's would recompute in bf16, or move delayed scaling's history).
    if state is not None or not torch.is_grad_enabled():
        return type(self).forward(self, x, state)
    from transformer_engine.pytorch.distributed import checkpoint as te_checkpoint

    return te_checkpoint(lambda h: type(self).forward(self, h, None), x, use_reentrant=False)


def apply_ac(model: nn.Module, spec: Any, fp8_engine: str | None = None) -> list[int]:
    """Recompute the chosen blocks' activations in the backward pass: only each block's input is
    kept. `fp8_engine` 'transformer_engine': through its checkpoint function (it runs eagerly,
    also inside compiled blocks). Returns the indices of the checkpointed blocks."""
    kinds, chosen = selected_kinds(spec), []
    forward = (
        _te_checkpointed_forward if fp8_engine == "transformer_engine" else _checkpointed_forward
    )
    for i, block in enumerate(model.layers):
        if block.kind in kinds:
            block.forward = types.MethodType(forward, block)
            chosen.append(i)
    if chosen:
        log.info("activation checkpointing: %d of %d blocks (%s)", len(chosen), len(model.layers),
                 spec)  # fmt: skip
    return chosen


# train.compile_mode values that are Inductor options, not torch.compile modes: what
# 'coordinate-descent-tuning' turns on is the half of max-autotune that tunes Inductor's own
# kernels (block sizes, warps), not the matmuls (seconds of tuning, not minutes).
INDUCTOR_OPTIONS = {"coordinate-descent-tuning": {"coordinate_descent_tuning": True}}


def compile_options(mode: str) -> dict[str, str | dict | None]:
    """torch.compile's keyword for train.compile_mode ('default': torch's own default)."""
    if mode in INDUCTOR_OPTIONS:
        return {"options": dict(INDUCTOR_OPTIONS[mode])}
    return {"mode": None if mode == "default" else mode}


def apply_compile(
    model: nn.Module, spec: Any, *, mode: str = "default", scope: str = "block"
) -> list[int]:
    """torch.compile each chosen block on its own (bounded compile time; the blocks of one kind
    share their compiled code through dynamo's cache). Call after apply_ac so that the
    recomputation is compiled too. Returns the indices of the compiled blocks.

    `mode`: torch.compile's (train.compile_mode). `scope` 'model' (train.compile_scope, with
    every block chosen): the whole model's forward as one region instead, so that a block's
    residual add fuses with the next block's norm and fewer kernels run between graphs; longer
    to compile, and only where the model runs as a whole (not a pipeline stage)."""
    kinds, chosen = selected_kinds(spec), []
    options = compile_options(mode)
    if scope == "model" and kinds:
        model.compile(**options)  # in place: same module, same parameter names
        chosen = list(range(len(model.layers)))
        log.info("torch.compile: the whole model (%d blocks), mode %s", len(chosen), mode)
        return chosen
    for i, block in enumerate(model.layers):
        if block.kind in kinds:
            block.compile(**options)
            chosen.append(i)
    if chosen:
        # Every block runs the same Block code object: leave room for one entry per block and
        # mode (train / no_grad) before dynamo gives up and silently runs it eagerly.
        limit = 2 * len(chosen) + 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, limit
        )
        log.info("torch.compile: %d of %d blocks (%s), mode %s", len(chosen), len(model.layers),
                 spec, mode)  # fmt: skip
    return chosen
