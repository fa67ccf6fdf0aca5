"""Normalisation layers: RMSNorm, the gated group-wise RMSNorm of Mamba-2, and a builder."""

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

# Under autocast the norm's output is in autocast's dtype, not the residual stream's (fp32 in
# bf16 training): its readers are linears (a block's mixer, the output layer) that would cast
# it there first, so the numbers are the same, but the cast is made inside the norm's kernel:
# the fp32 copy is neither written nor read again, nor is its gradient cast back in the
# backward (two casts a block, ~100 MB each at the 800M's micro-batch 4): a step 1.017x on an
# H100 (RESULTS.md 2026-12-07 noon). TOOLKIT_NORM_AUTOCAST_OUTPUT=0: the residual stream's
# dtype, as before (for A/B runs: benchmarks/gpu_train.sh).
AUTOCAST_OUTPUT = os.environ.get("TOOLKIT_NORM_AUTOCAST_OUTPUT", "1") != "0"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's readers compute in: autocast's where it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 mean-of-squares loses too many bits on wide hidden sizes.
        # x * rsqrt(mean(x^2) + eps) * weight; on CUDA one fused kernel, not ~6 eager passes.
        dtype = compute_dtype(x) if AUTOCAST_OUTPUT else x.dtype
        if x.is_cuda and x.dtype == self.weight.dtype == dtype:
            # CUDA's kernel already computes in fp32 for bf16/fp16 and rounds once at the end:
            # the same numbers without the two casts (bf16 inference: 2 of ~12 kernels a block).
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) computed per group of `dim // groups` channels (Mamba-2 output norm)."""

    def __init__(self, dim: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % groups:
            raise ValueError(f"gated norm: dim {dim} is not divisible by groups {groups}")
        self.eps = eps
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        yf = y.float() * F.silu(z.float())
        grouped = yf.unflatten(-1, (self.groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight.float()).to(y.dtype)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """`rmsnorm` (hybrid models) or `layernorm` (the GPT baseline; weight and bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}: expected 'rmsnorm' or 'layernorm'")


@functools.cache
def _fused_add_norm() -> Callable[..., Any] | None:
    """mamba-ssm's Triton residual-add + (RMS|Layer)Norm, where it imports."""
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
    except Exception:  # ImportError, or its missing compiled Mamba-1 extension
        return None
    return layer_norm_fn


def add_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(s), s) with s = residual + x (x alone when residual is None): a block's residual
    sum and the next block's normalised input. On CUDA, with mamba-ssm, one kernel instead of
    an add and a norm (a decode step at batch 1 is ~100 such pairs of tiny kernels); the same
    numbers: the sum rounded to x's dtype, the norm computed in fp32. A TorchFunctionMode may
    take it: the decode step's own kernel (toolkit/inference/decode_norms.py)."""
    if has_torch_function((x,)):
        return handle_torch_function(add_norm, (x,), x, residual, norm)
    fused = _fused_add_norm() if x.is_cuda else None
    if fused is not None and isinstance(norm, RMSNorm | nn.LayerNorm) and not x.requires_grad:
        if x.dtype == norm.weight.dtype and (residual is None or residual.dtype == x.dtype):
            out, total = fused(
                x,
                norm.weight,
                getattr(norm, "bias", None),
                residual=residual,
                eps=norm.eps,
                prenorm=True,
                is_rms_norm=isinstance(norm, RMSNorm),
            )
            return out, total
    total = x if residual is None else residual + x
    return norm(total), total


def gated_norm(
    norm: GatedRMSNorm,
    y: torch.Tensor,
    z: torch.Tensor,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """norm(y, z), through mamba-ssm's Triton rmsnorm_fn `kernel` where the caller has it (one
    kernel instead of ~8 small ones). A TorchFunctionMode may take it: the decode step's own
    kernel (toolkit/inference/decode_norms.py)."""
    if has_torch_function((y,)):
        return handle_torch_function(gated_norm, (y,), norm, y, z, kernel)
    if kernel is None:
        return norm(y, z)
    return kernel(
        y.contiguous(),
        norm.weight,
        None,
        z=z.contiguous(),
        eps=norm.eps,
        group_size=y.size(-1) // norm.groups,
        norm_before_gate=False,  # rmsnorm(y * silu(z)), as GatedRMSNorm
    )
