"""Flash decoding for the static decode step (Attention._attend_static): one query token per
row over a fixed span of the KV cache, the keys split over many programs, then combined.

At batch 1 the 8B hybrid has 8 (row, group) pairs: attention parallelised over those alone
leaves most of the H200 idle, and decode_attention's two matmuls with a softmax between them
take ~15 small kernels (35 us per layer at 4k keys, 94 us at 32k, where reading the keys and
values once takes ~5 and ~40 us). Here pass 1 gives each program one split of one pair's
keys (the plan: about PROGRAMS_PER_SM programs per SM), all of the group's query heads at once,
and also writes the row's new key and value into the cache; pass 2 combines the splits. Keys
past a row's length are neither read nor computed; the shapes depend only on the span, so a
CUDA graph can capture the step. flash_decoding_kernel.py holds the kernels.

Policy (`takes`): CUDA tensors in bf16/fp16 (on a CPU under Triton's interpreter,
TRITON_INTERPRET=1: the tests); TOOLKIT_TRITON_ATTENTION=off keeps decode_attention.
"""

import functools
import os
from typing import NamedTuple

import torch

from toolkit.model.kernels import triton_imports, triton_runs_on

# The fastest of decode_profile.py's plan sweep on the H200 at batch 1 (8B shapes): 41.6 us at
# 32k keys against 48.2 for 3 per SM and 2 stages, 13.2 against 13.3 at 4k (RESULTS.md).
PROGRAMS_PER_SM = 2
MAX_SPLITS = 256  # pass 2 holds a head's split maxima at once
INTERPRETER_SMS = 8  # under the interpreter: a few splits, so that the tests combine some


class Plan(NamedTuple):
    block: int  # keys per step of a program's loop (>= 16: tl.dot's smallest)
    keys_per_split: int  # a multiple of block
    splits: int
    warps: int = 4
    stages: int = 3


def plan_for(
    pairs: int, span: int, device: torch.device, block: int = 64, per_sm: int | None = None
) -> Plan:
    """Splits of the span such that `pairs` (rows x groups) times them fill the GPU: about
    `per_sm` (PROGRAMS_PER_SM) programs per SM, none shorter than one block."""
    wanted = _sms(device) * (per_sm or PROGRAMS_PER_SM)
    splits = max(1, min(-(-wanted // pairs), -(-span // block), MAX_SPLITS))
    keys = -(-span // splits)
    keys = -(-keys // block) * block
    return Plan(block=block, keys_per_split=keys, splits=-(-span // keys))


def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    plan: Plan | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [b, groups, heads, d] over k, v [b, groups, span, d]
    (views of the cache, last dim contiguous) with keys 0..lengths[r] visible in row r, after
    writing k_new, v_new [b, groups, d] at position lengths[r] (which must lie in the span).
    Softmax in fp32, the output [b, groups, heads, d] rounded once to q's dtype. The same as
    writing the keys and calling attention.decode_attention with the mask
    lengths[r] >= arange(span)."""
    from toolkit.model import flash_decoding_kernel

    b, groups, _, d = q.shape
    if not (k.shape[:2] == k_new.shape[:2] == (b, groups) and k.shape == v.shape):
        raise ValueError(
            f"flash decoding: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, new "
            f"key {tuple(k_new.shape)} do not agree on rows and groups"
        )
    if any(t.stride(-1) != 1 for t in (q, k, v, k_new, v_new)) or d & (d - 1) or d < 16:
        raise ValueError(f"flash decoding: head_dim {d} must be a power of two >= 16, contiguous")
    plan = plan or plan_for(b * groups, k.size(2), q.device)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    flash_decoding_kernel.launch(q, k_new, v_new, k, v, lengths, out, plan)
    return out


def enabled() -> bool:
    return os.environ.get("TOOLKIT_TRITON_ATTENTION", "auto") != "off"


def takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the static decode step of queries q [b, groups, heads, d] over the cache k runs
    through the kernels: bf16/fp16 without gradients, on CUDA (or under Triton's interpreter),
    a power-of-two head_dim of 16 to 256, Triton importing, not switched off."""
    d = q.size(-1)
    return (
        enabled()
        and triton_runs_on(q.device)
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.dtype == q.dtype
        and not q.requires_grad
        and 16 <= d <= 256
        and not d & (d - 1)
        and triton_imports()
    )


@functools.cache
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
