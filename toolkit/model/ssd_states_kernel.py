"""The Mamba-2 SSD's chunk states for training in one Triton kernel, for our fused training op
(fused_mamba.py): what mamba-ssm's first three forward kernels make for its scan.

mamba-ssm's forward runs its cumsum kernel (dt's softplus and dA's sums within each chunk), its
chunk-state kernel (each chunk's own state, written in fp32) and its state-passing kernel (each
chunk's state read back and the states passed on written): 0.41 of its 0.95 ms a layer at the
800M's widths on an H100 (RESULTS.md 2026-12-06 night), the chunk states crossing memory three
times. Here a program walks one sequence's chunks for one head and a block of its channels,
carrying the state in registers, and writes only dt, dA's sums and the state passed into each
chunk; mamba-ssm's C Bt and scan kernels make the output from them, as before. Unlike
ssd_scan_kernel.py (the whole forward in one kernel, 0.70x mamba-ssm's: each program's output
rows make it latency-bound), a chunk here is one product of x and B with no output to make.
The rounding is mamba-ssm's: B weighted by each step's decay to the chunk's end and dt, rounded
to x's dtype for the product, sums in fp32. The op takes it where TOOLKIT_TRITON_MAMBA names
"states", as it does by default (tests/test_ssd_states_kernel.py, benchmarks/gpu_kernels.py
--states). On an H100 (RESULTS.md 2026-12-07 morning): 0.179 ms at the 800M's widths and
micro-batch 8 against mamba-ssm's three kernels' 0.419 (64 channels a program, 4 warps, 2
stages; 32 channels 0.269), 0.147 against 0.191 at the 8B's (32 channels 0.126: half the
programs there, 128, leave SMs idle).
"""

import torch

from toolkit.model.kernels import triton_imports

BLOCK_P = 64  # a head's channels a program carries (its state: BLOCK_P x state in fp32)
NUM_WARPS = 4
NUM_STAGES = 2  # the next chunk's x, B and dt loaded while this one's product runs
# (benchmarks/gpu_kernels.py --states times other settings of these three)

if triton_imports():
    import triton
    import triton.language as tl

    from toolkit.model.ssd_scan_kernel import _chunk_start

    @triton.jit
    def _ssd_states_kernel(x, dt, dt_bias, A, B, dt_out, dA_out, states, L, CHUNKS, stride_x_b,
                           stride_x_l, stride_x_h, stride_dt_b, stride_dt_l, stride_b_b,
                           stride_b_l, stride_b_g, HEADS_PER_GROUP: tl.constexpr,
                           P: tl.constexpr, N: tl.constexpr, Q: tl.constexpr,
                           BLOCK_P: tl.constexpr):  # fmt: skip
        pid_p, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        H = tl.num_programs(1)
        g = h // HEADS_PER_GROUP
        cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        col_ok = cols < P
        n = tl.arange(0, N)
        i = tl.arange(0, Q)
        bias, a = tl.load(dt_bias + h).to(tl.float32), tl.load(A + h).to(tl.float32)
        b64 = b.to(tl.int64)
        state = tl.zeros([BLOCK_P, N], dtype=tl.float32)
        for c in range(CHUNKS):
            t_ok, t64, dt_s, dA, last = _chunk_start(
                dt, dt_out, dA_out, states, state, pid_p == 0, b64, h, c, i, cols, col_ok, L,
                bias, a, stride_dt_b, stride_dt_l, H, CHUNKS, P, N, Q,
            )  # fmt: skip
            Bc = tl.load(B + b64 * stride_b_b + t64[:, None] * stride_b_l + g * stride_b_g
                         + n[None, :], t_ok[:, None], 0.0)  # fmt: skip
            xo = b64 * stride_x_b + t64[:, None] * stride_x_l + h * stride_x_h + cols[None, :]
            xc = tl.load(x + xo, t_ok[:, None] & col_ok[None, :], 0.0)
            # each step's B weighted by its decay to the chunk's end and its dt, in x's dtype
            # for the product (mamba-ssm's chunk-state kernel rounds so)
            weight = tl.exp(tl.minimum(last - dA, 0.0)) * dt_s
            scaled = (Bc.to(tl.float32) * weight[:, None]).to(xc.dtype)
            state = state * tl.exp(last) + tl.dot(tl.trans(xc), scaled)


def ssd_states(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    chunk_size: int,
    dt_bias: torch.Tensor,
    states_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dt after softplus(dt + dt_bias), dA's sums within each chunk [b, h, chunks, chunk], the
    state passed into each chunk [b, chunks, h, p, n]), fp32 (the states in `states_dtype`:
    carried in fp32 from chunk to chunk, rounded where written), of x [b, l, h, p],
    dt [b, l, h], A [h] and B [b, l, g, n]: what mamba-ssm's cumsum, chunk-state and
    state-passing kernels make for its scan, in one kernel (BLOCK_P of a head's channels a
    program)."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    if x.stride(3) != 1 or B.stride(3) != 1 or dt.stride(2) != 1:
        raise ValueError("x, B and dt need adjacent channels")
    if H % G or chunk_size & (chunk_size - 1) or N & (N - 1) or min(chunk_size, N) < 16:
        raise ValueError(
            f"heads {H} in {G} groups; chunk {chunk_size} and state {N} powers of 2 from 16"
        )
    chunks = triton.cdiv(L, chunk_size)
    fp32 = dict(dtype=torch.float32, device=x.device)
    dt_out = torch.empty(b, H, chunks, chunk_size, **fp32)
    dA_out = torch.empty(b, H, chunks, chunk_size, **fp32)
    states = torch.empty(b, chunks, H, P, N, dtype=states_dtype, device=x.device)
    block_p = max(16, min(BLOCK_P, triton.next_power_of_2(P)))
    _ssd_states_kernel[(triton.cdiv(P, block_p), H, b)](
        x, dt, dt_bias, A, B, dt_out, dA_out, states, L, chunks, x.stride(0), x.stride(1),
        x.stride(2), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), B.stride(2),
        HEADS_PER_GROUP=H // G, P=P, N=N, Q=chunk_size, BLOCK_P=block_p,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return dt_out, dA_out, states
