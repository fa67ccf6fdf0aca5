"""Kernel selection for the Mamba-2 mixer (`model.kernels`): which of mamba-ssm's and
causal-conv1d's GPU kernels import and run here, and the fallback to the PyTorch reference
(ssd.py) where they do not. The mixer (mamba2.py) takes what these functions choose.
"""

import functools
import importlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from toolkit.model.ssd import SSDFunction, ssd_chunked

if TYPE_CHECKING:
    from toolkit.model.mamba2 import Mamba2Mixer

log = logging.getLogger(__name__)


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


def import_error(*modules: str) -> str | None:
    """Why importing `modules` fails here ("ModuleNotFoundError: No module named 'einops'"), or
    None when they import."""
    try:
        for module in modules:
            __import__(module)
    except Exception as e:  # ImportError, a missing compiled extension, one built for another GPU
        return f"{type(e).__name__}: {e}"
    return None


def triton_interprets() -> bool:
    """Whether Triton's interpreter runs our kernels (TRITON_INTERPRET=1: how the CPU tests run
    them)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether our Triton kernels are meant for tensors on `device`: CUDA, or any device under
    Triton's interpreter."""
    return device.type == "cuda" or triton_interprets()


@functools.cache
def triton_imports() -> bool:
    """Whether Triton imports here (a broken install counts as no: the torch code runs)."""
    return import_error("triton") is None


_WARNED: set[str] = set()


def _warn_fallback(what: str, error: str) -> None:
    """Once per process: 'auto' took the slow path on a GPU because a kernel package is broken
    (a silent fallback costs several times the step time and nobody notices)."""
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning(
            "model.kernels='auto' on a GPU: %s, because it does not import (%s). Install it and "
            "what it imports (mamba-ssm needs einops and transformers), or use the image from "
            "containers/",
            what,
            error,
        )


def mamba_ssm_available(kernels: str = "") -> bool:
    """Whether mamba-ssm's Triton SSD can run here (the package imports and CUDA is present).
    With kernels='auto', a GPU without it is worth a warning."""
    if not torch.cuda.is_available():
        return False
    error = import_error("mamba_ssm.ops.triton.ssd_combined")
    if error and kernels == "auto":
        _warn_fallback("the reference SSD kernels run instead of mamba-ssm's (mamba_ssm)", error)
    return error is None


def fused_mamba_conv(kernels: str, conv: str = "auto", width: int = 4) -> str | None:
    """The causal conv the fused training op (conv, SSD and gated norm in one autograd
    function) runs with here, or None where no fused op can run (the torch path). `kernels`:
    model.kernels ('auto' and 'mamba_ssm' take the fused op); `conv`: model.mamba_conv_backend.
    'causal_conv1d': mamba-ssm's own op, which needs the causal-conv1d extension; 'triton':
    ours (fused_mamba.py), which needs only Triton beside mamba-ssm; 'auto': causal-conv1d's
    where it imports (its backward is faster: RESULTS.md 2026-12-06), else ours, with a
    warning. Both convs take widths (model.mamba_conv_kernel) of 2 to 4 only."""
    if kernels not in ("auto", "mamba_ssm") or not mamba_ssm_available(kernels):
        return None
    if not 2 <= width <= 4:
        if "width" not in _WARNED:
            _WARNED.add("width")
            log.warning(
                "model.mamba_conv_kernel=%d: the fused Mamba training op takes conv widths of 2 "
                "to 4 (causal-conv1d's and ours); the torch path runs instead",
                width,
            )
        return None
    if conv == "triton":
        return "triton" if triton_imports() else None
    error = import_error("causal_conv1d", "mamba_ssm.ops.triton.ssd_combined")
    if error is None:
        return "causal_conv1d"
    if conv == "auto" and triton_imports():
        if "conv" not in _WARNED:
            _WARNED.add("conv")
            log.warning(
                "causal-conv1d does not import (%s): the fused Mamba training op runs with our "
                "Triton conv (model.mamba_conv_backend='triton': ~0.3 ms more a Mamba layer "
                "than causal-conv1d's at the 800M's widths on an H100, in its backward)",
                error,
            )
        return "triton"
    if kernels == "auto":
        _warn_fallback("the fused Mamba training op is off (causal_conv1d)", error)
    return None


def fused_mamba_available(kernels: str = "", conv: str = "causal_conv1d") -> bool:
    """Whether a fused training op with `conv` can run here (fused_mamba_conv): by default
    mamba-ssm's own, with causal-conv1d."""
    return fused_mamba_conv(kernels or "mamba_ssm", conv) is not None


SSD_KERNELS: dict[str, SSDFunction] = {"reference": ssd_chunked, "mamba_ssm": ssd_mamba_ssm}


def select_ssd(kernels: str) -> SSDFunction:
    """The SSD implementation for `model.kernels`; 'auto' picks the fastest one available."""
    if kernels == "auto":
        return SSD_KERNELS["mamba_ssm" if mamba_ssm_available("auto") else "reference"]
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


def _imported(*names: str) -> list[Any]:
    """The objects named "module:attribute", or Nones for all of them if any fails to import
    here (ImportError, a missing compiled extension, one built for another GPU)."""
    try:
        return [getattr(importlib.import_module(m), a) for m, a in (n.split(":") for n in names)]
    except Exception:
        return [None] * len(names)


_GATED_NORM = "mamba_ssm.ops.triton.layernorm_gated:rmsnorm_fn"


@functools.cache
def _import_decode_kernels() -> DecodeKernels:
    """Each kernel that imports here (the state update and the norm come from mamba-ssm
    together)."""
    update, norm = _imported(
        "mamba_ssm.ops.triton.selective_state_update:selective_state_update", _GATED_NORM
    )
    (conv,) = _imported("causal_conv1d:causal_conv1d_update")
    return DecodeKernels(ssm_update=update, conv_update=conv, gated_norm=norm)


def _kernels_wanted(mixer: "Mamba2Mixer", u: torch.Tensor) -> bool:
    """CUDA input of a mixer built with mamba-ssm's SSD (`model.kernels` 'auto' where it is
    available, or 'mamba_ssm')."""
    return u.is_cuda and mixer.ssd is ssd_mamba_ssm


def decode_kernels(mixer: "Mamba2Mixer", u: torch.Tensor) -> DecodeKernels:
    """The kernels for a decode step where _kernels_wanted; the conv kernel only where
    causal-conv1d imports."""
    if not _kernels_wanted(mixer, u):
        return DecodeKernels()
    return _import_decode_kernels()


class PrefillKernels(NamedTuple):
    """Kernels for a forward that continues from decode states (prefill); None: the torch code."""

    conv: Callable[..., torch.Tensor] | None = None  # causal_conv1d_fn
    scan: Callable[..., Any] | None = None  # mamba-ssm mamba_chunk_scan_combined
    gated_norm: Callable[..., torch.Tensor] | None = None  # mamba-ssm rmsnorm_fn (Triton)


@functools.cache
def _import_prefill_kernels() -> PrefillKernels:
    """Each kernel that imports here (the scan and the norm come from mamba-ssm together)."""
    scan, norm = _imported(
        "mamba_ssm.ops.triton.ssd_combined:mamba_chunk_scan_combined", _GATED_NORM
    )
    (conv,) = _imported("causal_conv1d:causal_conv1d_fn")
    return PrefillKernels(conv=conv, scan=scan, gated_norm=norm)


def prefill_kernels(mixer: "Mamba2Mixer", u: torch.Tensor) -> PrefillKernels:
    """The kernels for a prefill (a forward with states) where _kernels_wanted; the conv
    kernel only where causal-conv1d imports."""
    if not _kernels_wanted(mixer, u):
        return PrefillKernels()
    return _import_prefill_kernels()
