"""Our SSD forward in one kernel (toolkit/model/ssd_scan_kernel.py) against the reference
chunked scan (toolkit/model/ssd.py) and what the fused op's backward reads from it: under
Triton's interpreter on a CPU (in a subprocess: TRITON_INTERPRET must be set before Triton
compiles anything), compiled on a GPU, and there against mamba-ssm's kernels
(fused_mamba.ssd_forward_keeping_states)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.test_step_graph import in_subprocess, interpret

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]

# A length that ends in a partial chunk, several chunks, chunks of one and two blocks of output
# rows, heads in groups of 2, one and two channel blocks a head, x a slice of a wider row (the
# conv's output), D and none, fp32 and bf16
# (the reference in fp32 from the same bf16 values; bf16 on a GPU only). The states are the
# reference's final states of each prefix that ends before a chunk; kept in bf16, rounded.
CASES = """
import sys
import torch
from tests.kernel_cases import (assert_close, assert_rounded_to_bf16, chunk_reference,
                                for_device)
import torch.nn.functional as F
import toolkit.model.ssd_scan_kernel as sk
from toolkit.model.ssd import ssd_chunked

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
cases = for_device([
    (torch.float32, 1e-4, 37, 16, 16, True, 16),
    (torch.float32, 1e-4, 80, 32, 16, False, 32),
    (torch.bfloat16, 3e-2, 37, 32, 16, True, 32),
], device)
for dtype, tol, L, P, block_p, with_d, Q in cases:
    sk.BLOCK_P, sk.BLOCK_M = block_p, 16  # chunks of 32: two blocks of output rows
    b, H, G, N = 2, 4, 2, 16
    row = torch.randn(b, L, H * P + 2 * G * N + 8, device=device).to(dtype)
    x = row[..., : H * P].unflatten(-1, (H, P))
    B = row[..., H * P : H * P + G * N].unflatten(-1, (G, N))
    C = row[..., H * P + G * N : H * P + 2 * G * N].unflatten(-1, (G, N))
    dt = torch.randn(b, L, H, device=device) - 1
    dt_bias = torch.randn(H, device=device) * 0.5
    A = -torch.rand(H, device=device) - 0.5
    D = torch.randn(H, device=device) if with_d else None
    y, (dt_s, dA, states) = sk.ssd_forward_fused(x, dt, A, B, C, Q, D, dt_bias)
    soft = F.softplus(dt + dt_bias)
    want, _ = ssd_chunked(x.float(), soft, A, B.float(), C.float(), Q)
    if with_d:
        want = want + x.float() * D[:, None]
    want_dt, want_dA, want_states = chunk_reference(x, soft, A, B, Q)
    assert y.dtype == dtype and y.is_contiguous()
    for name, got, ref in (("y", y, want), ("dt", dt_s, want_dt), ("dA", dA, want_dA),
                           ("states", states, want_states)):
        assert_close(name, got, ref, tol, dtype, L, P)
    if L == 37:  # the states kept in bf16 (fused_mamba.LOWP_STATES): y from the fp32 carry
        y_low, (_, _, low) = sk.ssd_forward_fused(x, dt, A, B, C, Q, D, dt_bias, torch.bfloat16)
        assert_rounded_to_bf16("states", low, states)
        assert device != "cpu" or torch.equal(y_low, y)  # (compiled: two kernels, any order)
        assert_close("y from bf16 states", y_low, y.float(), tol, dtype, L, P)
print("ssd forward kernel agrees")
"""


def test_ssd_forward_kernel_is_the_reference_under_the_interpreter():
    interpret(CASES, "ssd forward kernel agrees", timeout=300)


def test_ssd_forward_kernel_refuses_what_it_cannot_read():
    pytest.importorskip("triton")
    from toolkit.model.ssd_scan_kernel import ssd_forward_fused

    x, dt = torch.randn(1, 32, 4, 16), torch.randn(1, 32, 4)
    B = torch.randn(1, 32, 2, 16)
    A, bias = -torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="chunk 24"):
        ssd_forward_fused(x, dt, A, B, B, 24, None, bias)
    with pytest.raises(ValueError, match="adjacent channels"):
        ssd_forward_fused(x.transpose(2, 3).contiguous().transpose(2, 3), dt, A, B, B, 16, None, bias)  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_ssd_forward_kernel_is_the_reference_on_the_gpu():
    in_subprocess(CASES, "ssd forward kernel agrees", "cuda", timeout=300)


def mixer_ssd_inputs(L: int = 1000):
    """The fused op's SSD inputs at the 800M's mixer widths on the GPU, two sequences of L:
    benchmarks/gpu_kernels.py's op_inputs (x, B, C and dt bf16 views of one row as the conv's
    output and in_proj's give them; A, D and dt_bias fp32)."""
    spec = importlib.util.spec_from_file_location("gpu_kernels", ROOT / "benchmarks/gpu_kernels.py")
    gpu_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_kernels)
    return gpu_kernels.op_inputs(b=2, length=L, heads=32, p=64, groups=8, n=128)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_ssd_forward_kernel_matches_mamba_ssms_on_the_gpu():
    """At the 800M's mixer widths (bf16, dt a slice of in_proj's output as the op passes it):
    y, dt, dA's sums and the states against mamba-ssm's kernels
    (fused_mamba.ssd_forward_keeping_states) within bf16 roundings, and the gradients mamba-ssm's
    backward kernels make from each side's kept tensors within 2e-2 of each other."""
    pytest.importorskip("mamba_ssm")
    from toolkit.model.fused_mamba import ssd_backward_from_states, ssd_forward_keeping_states
    from toolkit.model.ssd_scan_kernel import ssd_forward_fused

    x, dt, A, B, C, D, dt_bias = mixer_ssd_inputs()
    Q = 128
    ours = ssd_forward_fused(x, dt, A, B, C, Q, D, dt_bias)
    theirs = ssd_forward_keeping_states(x, dt, A, B, C, Q, D, dt_bias)
    for name, a, t in zip(("y", "dt", "dA", "states"), (ours[0], *ours[1]), (theirs[0], *theirs[1])):  # fmt: skip
        err = (a.float() - t.float()).abs().max().item()
        assert err <= 1e-2 * t.float().abs().max().item(), (name, err)
    dy = torch.randn_like(ours[0])
    grads = []
    for _, kept in (ours, theirs):
        out = [torch.empty_like(t) for t in (x, dt, B, C)]
        rest = ssd_backward_from_states(dy, x, dt, A, B, C, Q, D, dt_bias, kept, *out)
        grads.append([*out, *rest])
    for name, a, t in zip(("dx", "ddt", "dB", "dC", "dA", "dD", "ddt_bias"), *grads):
        err = ((a.float() - t.float()).norm() / t.float().norm()).item()
        assert err <= 2e-2, (name, err)
