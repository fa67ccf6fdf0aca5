"""Checkpoints: model and optimizer state <-> a Zarr store (see store.py for the format).

This is the single-rank (TP=1) seam: `model_tensors`/`optimizer_tensors` flatten the live state
into name -> tensor dicts and `restore_*` put it back. The sharded store replaces what lies
behind these functions without changing the trainer.
"""

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


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state keyed '<param name>/<state key>' (e.g. exp_avg, step)."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}/{key}"] = torch.as_tensor(value).detach()
    return out


def restore_model(model: nn.Module, ckpt: Checkpoint) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(ckpt.model))
    unexpected = sorted(set(ckpt.model) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: parameters do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it written for another recipe?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            saved = ckpt.model[name]
            if saved.shape != p.shape:
                raise CheckpointError(
                    f"{ckpt.path}: {name} has shape {tuple(saved.shape)}, model has {tuple(p.shape)}"
                )
            p.copy_(saved)


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    for name, p in model.named_parameters():
        keys = {k.split("/", 1)[1]: v for k, v in ckpt.optim.items() if k.split("/", 1)[0] == name}
        if keys:
            optimizer.state[p] = {
                k: v.to(p.device) if k != "step" else v.clone() for k, v in keys.items()
            }
