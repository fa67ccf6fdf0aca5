"""Checkpoints: model and optimizer state <-> a Zarr store (see store.py for the format).

This is the single-rank (TP=1) seam: `model_tensors`/`optimizer_tensors` flatten the live state
into name -> tensor dicts and `restore_*` put it back. The sharded store replaces what lies
behind these functions without changing the trainer.
"""

from collections.abc import Callable

import torch
from torch import nn

from toolkit.checkpoint.store import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from toolkit.parallel.sharding import shard_like

# gather(param, local state) -> the global tensor (identity on one rank).
Gather = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "model_tensors",
    "optimizer_tensors",
    "resolve_checkpoint",
    "restore_model",
    "restore_optimizer",
    "save_checkpoint",
]


def _as_is(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    return local.detach()


def model_tensors(model: nn.Module, gather: Gather = _as_is) -> dict[str, torch.Tensor]:
    """Parameters by name; `gather(param, local)` turns a shard into the global tensor."""
    return {name: gather(p, p) for name, p in model.named_parameters()}


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, gather: Gather = _as_is
) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state keyed '<param name>/<state key>' (e.g. exp_avg, step)."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            value = torch.as_tensor(value)
            out[f"{name}/{key}"] = gather(p, value) if value.shape == p.shape else value.detach()
    return out


def restore_model(model: nn.Module, ckpt: Checkpoint, whole: bool = True) -> None:
    """Copy global tensors into the model; TP-sharded parameters take their own slice. With
    whole=False (a pipeline stage) the checkpoint may hold parameters the module lacks."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(ckpt.model))
    unexpected = sorted(set(ckpt.model) - set(params)) if whole else []
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: parameters do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written for another recipe?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            saved = shard_like(p, ckpt.model[name])
            if saved.shape != p.shape:
                shard = " (this rank's shard)" if hasattr(p, "_tp_dim") else ""
                raise CheckpointError(
                    f"{ckpt.path}: {name} has shape {tuple(ckpt.model[name].shape)}, model has "
                    f"{tuple(p.shape)}{shard}"
                )
            p.copy_(saved)


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    owns = getattr(optimizer, "owns", lambda p: True)  # a sharded optimizer keeps its share only
    for name, p in model.named_parameters():
        if not owns(p):
            continue
        state = {}
        for key, value in ckpt.optim.items():
            owner, _, moment = key.rpartition("/")
            if owner == name:
                is_moment = value.shape == ckpt.model[name].shape
                state[moment] = shard_like(p, value).to(p.device) if is_moment else value.clone()
        if state:
            optimizer.state[p] = state
