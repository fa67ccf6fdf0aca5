"""Our gated RMSNorm kernels (toolkit/model/gated_norm_kernel.py, the fused Mamba op's norm)
against the mixer's torch norm and autograd: under Triton's interpreter on a CPU (in a
subprocess: TRITON_INTERPRET must be set before Triton compiles anything), compiled on a GPU,
and there against mamba-ssm's own norm kernels."""

import pytest
import torch

from tests.test_step_graph import in_subprocess, interpret

CUDA = torch.cuda.is_available()

# z a slice of a wider tensor (in_proj's rows) and its gradient written into such a slice,
# whose other columns stay; groups of 24 and 20 channels (a tile padded to 32), 10 and 16 (8
# groups); row counts that end in a partial tile; tiles of 4 rows and programs of 16 (several
# programs summing the weight's gradient) beside the defaults; fp32 and bf16 (the reference in
# fp32 from the same bf16 values).
CASES = """
import sys
import torch
import toolkit.model.gated_norm_kernel as gk
from toolkit.model.norms import GatedRMSNorm

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
cases = [(torch.float32, 1e-5, 100, 48, 2, tile) for tile in ((8192, 512), (128, 16))]
cases += [(torch.float32, 1e-5, 37, 40, 2, (8192, 512)), (torch.float32, 1e-5, 70, 80, 8, (64, 16))]
cases += [(torch.bfloat16, 2e-2, 70, 128, 8, (8192, 512)), (torch.bfloat16, 2e-2, 33, 64, 4, (128, 16))]
for dtype, tol, M, N, groups, (elements, rows) in cases:
    gk.ELEMENTS_PER_TILE, gk.ROWS_PER_PROGRAM = elements, rows
    width = N + 40
    z = torch.randn(M, width, device=device).to(dtype)[:, 5:5 + N]
    y = torch.randn(M, N, device=device).to(dtype)
    norm = GatedRMSNorm(N, groups, 1e-5).to(device)
    with torch.no_grad():
        norm.weight.add_(torch.randn_like(norm.weight))
    dout = torch.randn(M, N, device=device).to(dtype)
    yr, zr = y.float().requires_grad_(), z.float().requires_grad_()
    want = norm(yr, zr)
    want.backward(dout.float())
    out, rstd = gk.gated_norm_forward(y, z, norm.weight, groups, 1e-5)
    grad_in = torch.full((M, width), 7.0, dtype=dtype, device=device)
    dy, dw = gk.gated_norm_backward(dout, y, z, norm.weight, rstd, grad_in[:, 5:5 + N])
    assert out.dtype == dy.dtype == dtype and dw.dtype == norm.weight.dtype
    assert (grad_in[:, :5] == 7).all() and (grad_in[:, 5 + N:] == 7).all()
    for name, got, ref in (("out", out, want.detach()), ("dy", dy, yr.grad),
                           ("dz", grad_in[:, 5:5 + N], zr.grad), ("dweight", dw, norm.weight.grad)):
        err = (got.float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= tol * max(scale, 1.0), (name, dtype, M, N, groups, err, scale)
print("gated norm kernels agree")
"""


def test_gated_norm_kernels_are_the_torch_norm_under_the_interpreter():
    interpret(CASES, "gated norm kernels agree", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_gated_norm_kernels_are_the_torch_norm_on_the_gpu():
    in_subprocess(CASES, "gated norm kernels agree", "cuda", timeout=300)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gated_norm_kernels_match_mamba_ssms_on_the_gpu():
    """The 800M's mixer widths (2,048 channels in 8 groups, 8 x 1,000 rows, bf16, z a slice of
    in_proj's 6,176-wide rows): ours against mamba-ssm's norm kernels, each as the fused op
    calls it (fused_mamba.norm_forward/norm_backward), within a bf16 rounding of the largest
    value."""
    pytest.importorskip("mamba_ssm")
    from toolkit.model.fused_mamba import norm_backward, norm_forward

    torch.manual_seed(0)
    M, N, groups = 8000, 2048, 8
    z = torch.randn(M, 6176, device="cuda", dtype=torch.bfloat16)[:, 2048 : 2048 + N]
    y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(N, device="cuda")
    dout = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    results = []
    for backend in ("triton", "mamba_ssm"):
        out, rstd = norm_forward(y, z, weight, groups, 1e-5, backend)
        dz = torch.empty_like(y)
        dy, dw = norm_backward(dout, y, z, weight, rstd, groups, 1e-5, dz, backend)
        results.append((out, dy, dz, dw))
    for name, a, b in zip(("out", "dy", "dz", "dweight"), *results):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 1e-2 * b.float().abs().max().item(), (name, err)
