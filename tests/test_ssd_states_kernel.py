"""Our SSD chunk-state kernel (toolkit/model/ssd_states_kernel.py) against the reference chunked
scan (toolkit/model/ssd.py): under Triton's interpreter on a CPU (in a subprocess:
TRITON_INTERPRET must be set before Triton compiles anything), compiled on a GPU, and there
against mamba-ssm's three kernels it replaces (fused_mamba.ssd_states_by_mamba_ssm) and in the
fused op's forward and backward."""

import pytest
import torch

from tests.test_ssd_scan_kernel import mixer_ssd_inputs
from tests.test_step_graph import in_subprocess, interpret

CUDA = torch.cuda.is_available()

# A length that ends in a partial chunk and one that does not, one chunk and several, heads in
# groups of 2 and of 1, one and two channel blocks a head (and a head narrower than a block),
# x a slice of a wider row (the conv's output), fp32 and bf16 (the reference in fp32 from the
# same bf16 values; bf16 on a GPU only). The states are the reference's final states of each
# prefix that ends before a chunk; kept in bf16, the fp32 ones rounded.
CASES = """
import sys
import torch
import torch.nn.functional as F
from tests.kernel_cases import (assert_close, assert_rounded_to_bf16, chunk_reference,
                                for_device)
import toolkit.model.ssd_states_kernel as sk

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
cases = for_device([
    (torch.float32, 1e-4, 37, 32, 16, 2, 16),
    (torch.float32, 1e-4, 64, 16, 32, 1, 32),
    (torch.float32, 1e-4, 20, 32, 32, 2, 32),
    (torch.bfloat16, 3e-2, 100, 64, 32, 2, 32),
], device)
for dtype, tol, L, P, block_p, heads_per_group, Q in cases:
    sk.BLOCK_P = block_p
    b, G, N = 2, 2, 16
    H = G * heads_per_group
    row = torch.randn(b, L, H * P + 2 * G * N + 8, device=device).to(dtype)
    x = row[..., : H * P].unflatten(-1, (H, P))
    B = row[..., H * P : H * P + G * N].unflatten(-1, (G, N))
    dt = torch.randn(b, L, H, device=device) - 1
    dt_bias = torch.randn(H, device=device) * 0.5
    A = -torch.rand(H, device=device) - 0.5
    dt_s, dA, states = sk.ssd_states(x, dt, A, B, Q, dt_bias)
    want = chunk_reference(x, F.softplus(dt + dt_bias), A, B, Q)
    for name, got, ref in zip(("dt", "dA", "states"), (dt_s, dA, states), want):
        assert got.dtype == torch.float32 and got.shape == ref.shape, (name, got.shape)
        assert_close(name, got, ref, tol, dtype, L, P)
    if L == 37:  # the states kept in bf16 (fused_mamba.LOWP_STATES): carried in fp32
        low = sk.ssd_states(x, dt, A, B, Q, dt_bias, torch.bfloat16)[2]
        assert_rounded_to_bf16("states", low, states)
print("ssd states kernel agrees")
"""


def test_ssd_states_kernel_is_the_reference_under_the_interpreter():
    interpret(CASES, "ssd states kernel agrees", timeout=300)


def test_ssd_states_kernel_refuses_what_it_cannot_read():
    pytest.importorskip("triton")
    from toolkit.model.ssd_states_kernel import ssd_states

    x, dt = torch.randn(1, 32, 4, 16), torch.randn(1, 32, 4)
    B = torch.randn(1, 32, 2, 16)
    A, bias = -torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="chunk 24"):
        ssd_states(x, dt, A, B, 24, bias)
    with pytest.raises(ValueError, match="heads 4 in 3 groups"):
        ssd_states(x, dt, A, torch.randn(1, 32, 3, 16), 16, bias)
    with pytest.raises(ValueError, match="adjacent channels"):
        ssd_states(x.transpose(2, 3).contiguous().transpose(2, 3), dt, A, B, 16, bias)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_ssd_states_kernel_is_the_reference_on_the_gpu():
    in_subprocess(CASES, "ssd states kernel agrees", "cuda", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_ssd_states_kernel_matches_mamba_ssms_on_the_gpu():
    """At the 800M's mixer widths (bf16, dt a slice of in_proj's output as the op passes it):
    dt, dA's sums and the states against mamba-ssm's three kernels, and the forward with either
    (y through mamba-ssm's scan) the same within bf16 roundings."""
    pytest.importorskip("mamba_ssm")
    import toolkit.model.fused_mamba as fm
    from toolkit.model.ssd_states_kernel import ssd_states

    x, dt, A, B, C, D, dt_bias = mixer_ssd_inputs()
    ours = ssd_states(x, dt, A, B, 128, dt_bias)
    theirs = fm.ssd_states_by_mamba_ssm(x, dt, A, B, 128, dt_bias)
    for name, a, t in zip(("dt", "dA", "states"), ours, theirs):
        err = (a - t).abs().max().item()
        assert err <= 1e-3 * t.abs().max().item(), (name, err)
    own = fm.TRITON_MAMBA
    try:
        ys = []
        for names in (own | {"states"}, own - {"states"}):
            fm.TRITON_MAMBA = names
            ys.append(fm.ssd_forward_keeping_states(x, dt, A, B, C, 128, D, dt_bias)[0].float())
    finally:
        fm.TRITON_MAMBA = own
    assert (ys[0] - ys[1]).abs().max().item() <= 1e-2 * ys[1].abs().max().item()
