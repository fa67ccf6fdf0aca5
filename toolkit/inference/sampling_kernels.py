"""Triton kernels for the sampler's whole-vocabulary rows (temperature, top-p without top-k).

The same arithmetic as the torch reference in sampling.py, fused so that a row's logits are read
a few times instead of written out as float32 weights, int64 masses and int32 keys by some
thirty small kernels (2.5 ms at batch 32 over a 256k vocabulary on an H200, against 7.9 ms for
the decode step). Each element's weight, mass and key come from one jitted function, so every
kernel sees the same bits; the sums are of integers, so their order does not matter. The torch
code between the kernels (the radix select over the histograms, the block search) is the
reference's own.

Each kernel runs over [rows, blocks] programs; a row whose flag is off does no work. On a CPU
they run under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them
against the reference without a GPU.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from toolkit.model.kernels import triton_interprets

BLOCK = 4096
_INTERPRET = triton_interprets()

if _INTERPRET:  # the interpreter has no libdevice: numpy's exp

    @triton.jit
    def _exp(x):
        return tl.exp(x)

else:  # libdevice's exp: the same float32 as torch's on CUDA (tl.exp is an approximation)

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)


@triton.jit
def _mass_and_key(logits_ptr, row, offs, vocab, best, inverse, scale, WIDTH: tl.constexpr):
    """Each token's exact integer mass floor(exp((x - best) * inverse) * scale) and its order key
    (the bit pattern as an int32 that orders as the logits do; sampling._order_key)."""
    inside = offs < vocab
    x = tl.load(logits_ptr + row * vocab + offs, mask=inside, other=float("-inf"))
    weight = _exp((x.to(tl.float32) - best) * inverse)
    mass = (weight * scale).to(tl.int64)
    if WIDTH == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        sign = bits >> 15
        key = ((bits & 0x7FFF) ^ sign) - sign
    else:
        bits = x.to(tl.int32, bitcast=True)
        sign = bits >> 31
        key = ((bits & 0x7FFFFFFF) ^ sign) - sign
    return tl.where(inside, mass, 0), key


@triton.jit
def _histogram_kernel(
    logits_ptr, best_ptr, inverse_ptr, on_ptr, prefix_ptr, hist_ptr, vocab, scale, low,
    WIDTH: tl.constexpr, DIGIT_BITS: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """One radix pass of the nucleus search: the masses summed per digit of the keys at `low`,
    largest logits in bin 0; after the first pass only the keys whose higher bits are the
    row's prefix found so far."""
    row, block = tl.program_id(0), tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    best, inverse = tl.load(best_ptr + row), tl.load(inverse_ptr + row)
    mass, key = _mass_and_key(logits_ptr, row, offs, vocab, best, inverse, scale, WIDTH)
    bins = 1 << DIGIT_BITS
    take = (mass > 0) & (tl.load(on_ptr + row) != 0)
    if FIRST:
        index = bins // 2 - 1 - (key >> low)
    else:
        index = bins - 1 - ((key >> low) & (bins - 1))
        take &= (key >> (low + DIGIT_BITS)) == tl.load(prefix_ptr + row)
    if INTERPRET:  # its atomics refuse a mask: add zeros (every index is a bin)
        tl.atomic_add(hist_ptr + row * bins + index, tl.where(take, mass, 0), sem="relaxed")
    else:
        tl.atomic_add(hist_ptr + row * bins + index, mass, mask=take, sem="relaxed")


@triton.jit
def _block_mass_kernel(
    logits_ptr, best_ptr, inverse_ptr, on_ptr, threshold_ptr, sums_ptr, vocab, scale, blocks,
    WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Each block's sum of the masses a row draws from (its keys at or above the threshold)."""
    row, block = tl.program_id(0), tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    best, inverse = tl.load(best_ptr + row), tl.load(inverse_ptr + row)
    mass, key = _mass_and_key(logits_ptr, row, offs, vocab, best, inverse, scale, WIDTH)
    keep = (key >= tl.load(threshold_ptr + row)) & (tl.load(on_ptr + row) != 0)
    tl.store(sums_ptr + row * blocks + block, tl.sum(tl.where(keep, mass, 0), 0))


@triton.jit
def _pick_kernel(
    logits_ptr, best_ptr, inverse_ptr, threshold_ptr, block_ptr, offset_ptr, out_ptr, vocab,
    scale, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The token where a row's draw lands in its block: the first whose running mass within the
    block exceeds the draw's offset there."""
    row = tl.program_id(0)
    offs = tl.load(block_ptr + row) * BLOCK + tl.arange(0, BLOCK)
    best, inverse = tl.load(best_ptr + row), tl.load(inverse_ptr + row)
    mass, key = _mass_and_key(logits_ptr, row, offs, vocab, best, inverse, scale, WIDTH)
    mass = tl.where(key >= tl.load(threshold_ptr + row), mass, 0)
    past = tl.cumsum(mass, 0) > tl.load(offset_ptr + row)
    tl.store(out_ptr + row, tl.min(tl.where(past, offs, vocab - 1), 0))


def histogram(
    logits: torch.Tensor,
    best: torch.Tensor,
    inverse: torch.Tensor,
    on: torch.Tensor,
    scale: float,
    width: int,
    low: int,
    digit_bits: int,
    prefix: torch.Tensor | None,
) -> torch.Tensor:
    """[b, 2**digit_bits] int64: sampling's radix pass at bit `low` (prefix None: the first)
    over order keys of `width` bits (sampling.key_width)."""
    b, vocab = logits.shape
    hist = torch.zeros(b, 1 << digit_bits, dtype=torch.long, device=logits.device)
    first = prefix is None
    prefix = on if first else prefix  # any tensor: the first pass does not read it
    _histogram_kernel[(b, triton.cdiv(vocab, BLOCK))](
        logits, best, inverse, on, prefix, hist, vocab, scale, low,
        WIDTH=width, DIGIT_BITS=digit_bits, FIRST=first, BLOCK=BLOCK,
        INTERPRET=_INTERPRET, num_warps=8,
    )  # fmt: skip
    return hist


def block_masses(
    logits: torch.Tensor,
    best: torch.Tensor,
    inverse: torch.Tensor,
    on: torch.Tensor,
    threshold: torch.Tensor,
    scale: float,
    width: int,
) -> torch.Tensor:
    """[b, blocks] int64: each block's kept mass in the rows where `on`, else 0."""
    b, vocab = logits.shape
    blocks = triton.cdiv(vocab, BLOCK)
    sums = torch.empty(b, blocks, dtype=torch.long, device=logits.device)
    _block_mass_kernel[(b, blocks)](
        logits, best, inverse, on, threshold, sums, vocab, scale, blocks,
        WIDTH=width, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return sums


def pick_in_block(
    logits: torch.Tensor,
    best: torch.Tensor,
    inverse: torch.Tensor,
    threshold: torch.Tensor,
    block: torch.Tensor,
    offset: torch.Tensor,
    scale: float,
    width: int,
) -> torch.Tensor:
    """[b] long: the token of each row's `block` where the running mass first exceeds `offset`."""
    b, vocab = logits.shape
    out = torch.empty(b, dtype=torch.long, device=logits.device)
    _pick_kernel[(b,)](
        logits, best, inverse, threshold, block, offset, out, vocab, scale,
        WIDTH=width, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return out
