"""The Triton kernels of flash_decoding.py (imported on first use: Triton takes 0.3 s to import).

Pass 1, one program per (split, group, row): the group's query heads against the split's keys,
an online softmax in fp32 (base 2: the scale folds in log2(e)) into the split's running max,
sum of exponentials and weighted sum of values. The row's new key and value come from their
inputs, not the cache, and the program whose split holds the row's position writes them there
(no other program reads that position). Pass 2, one program per (head, group, row): the splits'
partial results combined by their maxima, divided once, rounded once. With PDL
(toolkit/inference/pdl.py) each pass waits for the kernel before it, then lets the next launch.
"""

import torch
import triton
import triton.language as tl

from toolkit.inference import pdl
from toolkit.model.kernels import triton_interprets


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32. UPCAST (under the interpreter, whose bf16 dot is wrong in Triton 3.9):
    the operands go to fp32 first, which gives the same exact products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, k_new_ptr, v_new_ptr, lengths_ptr, m_ptr, l_ptr, acc_ptr,
    span, keys_per_split, splits, scale_log2,
    stride_qb, stride_qg, stride_qh, stride_kb, stride_kg, stride_ks,
    stride_vb, stride_vg, stride_vs, stride_nkb, stride_nkg, stride_nvb, stride_nvg,
    HEADS: tl.constexpr, HEADS_P: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # q and the new key and value are the kernels before's outputs; pass 2 may launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    split, group, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    groups = tl.num_programs(1)
    length = tl.load(lengths_ptr + row).to(tl.int32)  # keys 0..length are visible
    start = split * keys_per_split
    end = tl.minimum(tl.minimum(start + keys_per_split, length + 1), span)
    heads = tl.arange(0, HEADS_P)
    dims = tl.arange(0, D)
    offs = tl.arange(0, BLOCK)
    q = tl.load(
        q_ptr + row.to(tl.int64) * stride_qb + group * stride_qg
        + heads[:, None] * stride_qh + dims[None, :],
        mask=heads[:, None] < HEADS, other=0.0,
    )  # fmt: skip
    k_new = tl.load(k_new_ptr + row.to(tl.int64) * stride_nkb + group * stride_nkg + dims)
    v_new = tl.load(v_new_ptr + row.to(tl.int64) * stride_nvb + group * stride_nvg + dims)
    k_new = k_new.to(k_ptr.dtype.element_ty)
    v_new = v_new.to(v_ptr.dtype.element_ty)
    k_rows = k_ptr + row.to(tl.int64) * stride_kb + group.to(tl.int64) * stride_kg
    v_rows = v_ptr + row.to(tl.int64) * stride_vb + group.to(tl.int64) * stride_vg

    m = tl.full([HEADS_P], float("-inf"), dtype=tl.float32)
    total = tl.zeros([HEADS_P], dtype=tl.float32)
    acc = tl.zeros([HEADS_P, D], dtype=tl.float32)
    for first in range(start, end, BLOCK):  # no iteration past the row's length
        keys = first + offs
        visible = keys < end
        new = (keys == length)[:, None]
        k = tl.load(
            k_rows + keys[:, None] * stride_ks + dims[None, :], mask=visible[:, None], other=0.0
        )
        v = tl.load(
            v_rows + keys[:, None] * stride_vs + dims[None, :], mask=visible[:, None], other=0.0
        )
        k = tl.where(new, k_new[None, :], k)
        v = tl.where(new, v_new[None, :], v)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2  # [HEADS_P, BLOCK]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_next = tl.maximum(m, tl.max(s, axis=1))  # finite: key `first` is visible
        p = tl.exp2(s - m_next[:, None])
        alpha = tl.exp2(m - m_next)
        total = total * alpha + tl.sum(p, axis=1)
        pv = _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        acc = acc * alpha[:, None] + pv
        m = m_next

    at_length = tl.zeros([D], dtype=tl.int32) + length  # the owner's test, per channel
    owner = (at_length >= start) & (at_length < end)
    tl.store(k_rows + length * stride_ks + dims, k_new, mask=owner)
    tl.store(v_rows + length * stride_vs + dims, v_new, mask=owner)
    # Scratch [b, groups, heads, splits(, d)]: pass 2 reads a head's splits contiguously.
    at = ((row * groups + group) * HEADS + heads) * splits + split
    tl.store(m_ptr + at, m, mask=heads < HEADS)
    tl.store(l_ptr + at, total, mask=heads < HEADS)
    tl.store(
        acc_ptr + at[:, None].to(tl.int64) * D + dims[None, :], acc, mask=heads[:, None] < HEADS
    )


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, splits, stride_ob, stride_og, stride_oh,
    D: tl.constexpr, SPLITS_P: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # pass 1's results; the next product may start loading its weight
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    head, group, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = ((row * tl.num_programs(1) + group) * tl.num_programs(0) + head) * splits
    every = tl.arange(0, SPLITS_P)
    m = tl.load(m_ptr + first + every, mask=every < splits, other=float("-inf"))
    top = tl.max(m, axis=0)  # finite: split 0 holds key 0, always visible
    total = tl.sum(
        tl.exp2(m - top) * tl.load(l_ptr + first + every, mask=every < splits, other=0.0)
    )
    dims = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    for c in range(0, splits, CHUNK):  # empty splits: max -inf, weight 0, acc 0
        some = c + tl.arange(0, CHUNK)
        inside = some < splits
        weight = tl.exp2(tl.load(m_ptr + first + some, mask=inside, other=float("-inf")) - top)
        part = tl.load(
            acc_ptr + (first + some)[:, None].to(tl.int64) * D + dims[None, :],
            mask=inside[:, None], other=0.0,
        )  # fmt: skip
        acc += tl.sum(weight[:, None] * part, axis=0)
    out = acc / total
    at = out_ptr + row.to(tl.int64) * stride_ob + group * stride_og + head * stride_oh + dims
    tl.store(at, out.to(out_ptr.dtype.element_ty))


def launch(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor,
    plan,  # noqa: ANN001 (flash_decoding.Plan)
) -> None:
    """out [b, groups, heads, d] = attention of q over k, v [b, groups, span, d] with keys
    0..lengths[r] visible, the new keys k_new, v_new [b, groups, d] written at lengths[r]."""
    b, groups, heads, d = q.shape
    span = k.size(2)
    m = torch.empty(b, groups, heads, plan.splits, device=q.device, dtype=torch.float32)
    total = torch.empty_like(m)
    acc = torch.empty(b, groups, heads, plan.splits, d, device=q.device, dtype=torch.float32)
    scale_log2 = d**-0.5 * 1.4426950408889634  # exp(x) = exp2(x log2(e))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # bf16/fp16: exact products
    on = pdl.enabled(q.device)  # both passes wait for the kernel before them, then release it
    _split_kernel[(plan.splits, groups, b)](
        q, k, v, k_new, v_new, lengths, m, total, acc,
        span, plan.keys_per_split, plan.splits, scale_log2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        HEADS=heads, HEADS_P=max(16, triton.next_power_of_2(heads)), D=d, BLOCK=plan.block,
        PRECISION=precision, UPCAST=triton_interprets(), PDL=on,
        num_warps=plan.warps, num_stages=plan.stages, launch_pdl=on,
    )  # fmt: skip
    splits_p = triton.next_power_of_2(plan.splits)
    _combine_kernel[(heads, groups, b)](
        m, total, acc, out, plan.splits, out.stride(0), out.stride(1), out.stride(2),
        D=d, SPLITS_P=splits_p, CHUNK=min(16, splits_p), PDL=on, num_warps=4, launch_pdl=on,
    )  # fmt: skip
