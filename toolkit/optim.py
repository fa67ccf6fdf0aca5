"""AdamW with parameter groups, and learning-rate schedules (warmup + cosine / WSD / constant)."""

import math

import torch
import torch.distributed as dist
from torch import nn

from toolkit.config import TrainConfig
from toolkit.flat_adamw import FlatAdamW
from toolkit.model.kernels import triton_imports, triton_interprets
from toolkit.parallel.zero import ShardedOptimizer
from toolkit.triton_adamw import TritonAdamW


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, or Mamba's A_log, D and dt_bias."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or getattr(p, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def gpu_adamw_kernel(cfg: TrainConfig) -> str:
    """What train.adamw_kernel picks on GPUs: 'triton' or 'torch' ('auto': the Triton kernel
    where Triton imports, as it does beside any CUDA build of torch)."""
    if cfg.adamw_kernel == "auto":
        return "triton" if triton_imports() else "torch"
    if cfg.adamw_kernel == "triton" and not triton_imports():
        raise ValueError("train.adamw_kernel='triton' needs Triton, which does not import here; "
                         "use 'torch'")  # fmt: skip
    return cfg.adamw_kernel


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, shard_over: dist.ProcessGroup | None = None
) -> torch.optim.Optimizer | FlatAdamW | ShardedOptimizer:
    """AdamW (train.flat_optimizer: over flat buffers, toolkit.flat_adamw; on GPUs
    train.adamw_kernel picks torch's fused kernel or toolkit.triton_adamw's); with `shard_over`
    (the DP group), each rank holds only its share of the state."""

    def adamw(groups: list[dict]) -> torch.optim.Optimizer | FlatAdamW:
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        if cfg.flat_optimizer:
            return FlatAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
        # On GPUs one fused kernel per step instead of a dozen multi-tensor passes.
        if all(p.is_cuda for g in groups for p in g["params"]):
            if gpu_adamw_kernel(cfg) == "triton":
                return TritonAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
            kind = {"fused": True}
        elif cfg.adamw_kernel == "triton" and triton_interprets():
            # The kernel on CPU tensors under Triton's interpreter: how tests run it (slowly).
            return TritonAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
        else:
            kind = {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, **kind)

    groups = parameter_groups(model, cfg.weight_decay)
    return adamw(groups) if shard_over is None else ShardedOptimizer(groups, adamw, shard_over)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The lr for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps or cfg.steps
    if cfg.lr_schedule == "cosine":
        span = max(decay_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    # WSD: warmup, stable at lr, then a decay to min_lr over the last wsd_decay_steps.
    decaying = cfg.wsd_decay_steps or int(cfg.wsd_decay_fraction * decay_steps)
    decay_start = decay_steps - decaying
    if step < decay_start:
        return cfg.lr
    progress = min((step - decay_start) / max(decaying, 1), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * WSD_DECAYS[cfg.wsd_decay_style](progress)


# WSD's decays: the share of (lr - min_lr) left at `progress` through the decay, 1 -> 0 (the
# coefficients of Megatron's --lr-wsd-decay-style).
WSD_DECAYS = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (math.cos(math.pi * progress) + 1.0),
    "exponential": lambda progress: 2.0 * 0.5**progress - 1.0,
    "minus_sqrt": lambda progress: 1.0 - math.sqrt(progress),
}
