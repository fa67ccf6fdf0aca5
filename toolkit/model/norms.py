"""Normalisation layers: RMSNorm, the gated group-wise RMSNorm of Mamba-2, and a builder."""

import torch
import torch.nn.functional as F
from torch import nn


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
        if x.is_cuda and x.dtype == self.weight.dtype:
            # CUDA's kernel already computes in fp32 for bf16/fp16 and rounds once at the end:
            # the same numbers without the two casts (bf16 inference: 2 of ~12 kernels a block).
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)


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
