"""Kernel selection for the Mamba-2 mixer (`model.kernels`): which of mamba-ssm's and
causal-conv1d's GPU kernels import and run here, and the fallback to the PyTorch reference
(ssd.py) where they do not. The mixer (mamba2.py) takes what these functions choose.
"""

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from toolkit.model.ssd import SSDFunction, ssd_chunked

if TYPE_CHECKING:
    from toolkit.model.mamba2 import Mamba2Mixer


def ssd_mamba_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contract as ssd_chunked, through mamba-ssm's Triton chunked scan on CUDA tensors
    (same group-to-head mapping); CPU tensors take the reference."""
    if not x.is_cuda:
        return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final_state = mamba_chunk_scan_combined(
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        initial_states=None if initial_state is None else initial_state.contiguous(),
        return_final_states=True,
    )
    return y.to(x.dtype), final_state.float()


def mamba_ssm_available() -> bool:
    """Whether mamba-ssm's Triton SSD can run here (the package imports and CUDA is present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except Exception:  # ImportError, or its missing compiled Mamba-1 extension
        return False
    return True


def fused_mamba_available() -> bool:
    """Whether mamba-ssm's fused training op (causal conv, SSD and gated norm in one autograd
    function) can run here: mamba-ssm's Triton kernels plus the causal-conv1d extension."""
    if not mamba_ssm_available():
        return False
    try:
        import causal_conv1d  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined  # noqa: F401
    except Exception:  # ImportError, or an extension built for another GPU
        return False
    return True


def use_fused_mamba(kernels: str) -> bool:
    """`model.kernels` 'auto' and 'mamba_ssm' take the fused op when it is available."""
    return kernels in ("auto", "mamba_ssm") and fused_mamba_available()


SSD_KERNELS: dict[str, SSDFunction] = {"reference": ssd_chunked, "mamba_ssm": ssd_mamba_ssm}


def select_ssd(kernels: str) -> SSDFunction:
    """The SSD implementation for `model.kernels`; 'auto' picks the fastest one available."""
    if kernels == "auto":
        return SSD_KERNELS["mamba_ssm" if mamba_ssm_available() else "reference"]
    if kernels not in SSD_KERNELS:
        raise ValueError(f"model.kernels={kernels!r} is not one of {sorted(SSD_KERNELS)}")
    if kernels == "mamba_ssm" and not mamba_ssm_available():
        raise ValueError(
            "model.kernels='mamba_ssm' needs CUDA and the mamba-ssm package (pip install "
            "mamba-ssm, or the image from containers/); use 'auto' to fall back to 'reference'"
        )
    return SSD_KERNELS[kernels]


class DecodeKernels(NamedTuple):
    """Kernels for a decode step; None: the torch code."""

    ssm_update: Callable[..., torch.Tensor] | None = None  # mamba-ssm selective_state_update
    conv_update: Callable[..., torch.Tensor] | None = None  # causal_conv1d_update
    gated_norm: Callable[..., torch.Tensor] | None = None  # mamba-ssm rmsnorm_fn (Triton)


@functools.cache
def _import_decode_kernels() -> DecodeKernels:
    """Each kernel that imports here."""
    found: dict[str, Any] = {}
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        found |= dict(ssm_update=selective_state_update, gated_norm=rmsnorm_fn)
    except Exception:  # ImportError, or its missing compiled Mamba-1 extension
        pass
    try:
        from causal_conv1d import causal_conv1d_update

        found["conv_update"] = causal_conv1d_update
    except Exception:  # ImportError, or an extension built for another GPU
        pass
    return DecodeKernels(**found)


def decode_kernels(mixer: "Mamba2Mixer", u: torch.Tensor) -> DecodeKernels:
    """The kernels for a decode step. Only for CUDA input of a mixer built with mamba-ssm's SSD
    (`model.kernels` 'auto' where it is available, or 'mamba_ssm'); the conv kernel only where
    causal-conv1d imports."""
    if not u.is_cuda or mixer.ssd is not ssd_mamba_ssm:
        return DecodeKernels()
    return _import_decode_kernels()
