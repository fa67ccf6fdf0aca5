"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

At batch 1 the 8B hybrid's decode step is ~110 matrix-vector products with ~150 kernels of 2-4
us between them (norms, state updates, attention), each launched only when the one before has
finished. On Hopper a kernel launched with PDL may start while the kernel before it in the
stream still runs (CUDA graphs keep the edge); it must call Triton's gdc_wait() before it reads
anything that earlier kernels write, and a kernel's gdc_launch_dependents() lets the next one
start early. The products' weights are constants, so a product launched with PDL loads its
first weight tile before its wait, while the small kernel before it runs; our small kernels
(decode_norms.py) wait first and release the next product at once.

TOOLKIT_TRITON_PDL: `on` (the default) takes our norm kernels and launches our kernels with PDL
(the kernels compiled with the grid dependency calls): the 8B hybrid's batch-1 step at 4k
context went from 4.21 ms to 4.05 ms on an H200 (benchmarks/RESULTS.md); `norms` takes our norm
kernels, launched as usual (4.22 ms); `off` keeps mamba-ssm's norms and launches every kernel as
usual. PDL itself stays off under Triton's interpreter (it has no grid dependency control) and on
GPUs before compute capability 9.0.
"""

import functools
import importlib.util
import os

import torch

from toolkit.model.kernels import triton_interprets


@functools.cache
def _supported(index: int) -> bool:
    """Hopper or later, and a Triton with grid dependency control (3.3 and later)."""
    if torch.cuda.get_device_capability(index) < (9, 0):
        return False
    return importlib.util.find_spec("triton.language.extra.cuda.gdc") is not None


SETTINGS = ("off", "norms", "on")


def setting() -> str:
    """TOOLKIT_TRITON_PDL's value (see the module's docstring)."""
    value = os.environ.get("TOOLKIT_TRITON_PDL", "on")
    if value not in SETTINGS:
        raise ValueError(f"TOOLKIT_TRITON_PDL={value!r}: expected one of {SETTINGS}")
    return value


def our_norms() -> bool:
    """Whether the decode step's norms go to our kernels (decode_norms.py)."""
    return setting() != "off"


def enabled(device: torch.device) -> bool:
    """Whether our kernels for tensors on `device` launch with PDL (see the module's docstring)."""
    if setting() != "on":
        return False
    if triton_interprets() or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _supported(index)
