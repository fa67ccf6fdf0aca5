"""Mamba's decode conv step folded into in_proj's matrix-vector kernel (gemv.gemv_conv): the conv
state shifted with exactly in_proj's rounded output, the conv's SiLU within one bf16 rounding of
its definition, against the torch reference step; on a GPU, against causal-conv1d's update at
the 8B's shapes. On a CPU the kernel runs under Triton's interpreter in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toolkit.inference import gemv
from toolkit.model.mamba2 import Mamba2Mixer

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def mixer(hidden: int, d_conv: int, bias: bool = True, **shape) -> Mamba2Mixer:
    m = Mamba2Mixer(hidden, d_conv=d_conv, **shape).to(torch.bfloat16).eval()
    if not bias:
        m.conv1d.bias = None
    return m


def check_fused_step(
    m: Mamba2Mixer, u: torch.Tensor, state: torch.Tensor, relative: float = 2.0**-8
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Runs gemv_conv on a copy of `state` and checks it against the plain kernel's product:
    z and dt are its rows, the state shifted left by one with its xBC rows (exactly: the same
    sums, rounded once), xBC the SiLU of the new state's conv within one rounding (`relative`:
    2^-7 under the interpreter, which truncates). Returns the outputs and the new state."""
    before, after = state, state.clone()
    with torch.no_grad():
        assert gemv.takes_conv(m, u, after)
        z, xbc, dt = gemv.gemv_conv(m, u, after)
        pz, pxbc, pdt = gemv.gemv(u, m.in_proj.weight).split(m.split_sizes, dim=-1)
    assert torch.equal(z, pz) and torch.equal(dt, pdt)
    assert torch.equal(after[..., :-1], before[..., 1:]) and torch.equal(after[..., -1], pxbc)
    w = m.conv1d.weight.squeeze(1).double()
    terms = after.double() * w
    exact = terms.sum(-1) + (0 if m.conv1d.bias is None else m.conv1d.bias.double())
    want = F.silu(exact)
    scale = terms.abs().sum(-1) + 1e-3  # fp32 summation error is far below 1e-5 of it
    error = (xbc.double() - want).abs()
    assert (error <= relative * want.abs() + 1e-5 * scale).all(), (error / scale).max()
    return (z, xbc, dt), after


CONV_CHECK = r"""
import torch
from tests.test_gemv_conv import check_fused_step, mixer
from toolkit.inference import gemv
from toolkit.model.mamba2 import in_proj_conv

torch.manual_seed(0)
# z 12 rows, xBC 12 + 2 * 2 * 3 = 24, dt 4: 40 rows; and z 10, xBC 10 + 2 * 3 = 16, dt 2: 28
# rows. Tiles of 8 and 16 rows: z/xBC/dt boundaries inside a tile, the last tile part masked.
shapes = [(6, dict(head_dim=3, num_groups=2, d_state=3)),
          (5, dict(head_dim=5, num_groups=1, d_state=3))]
for hidden, shape in shapes:
    for d_conv in (2, 3, 4):
        for bias in (True, False):
            for block_n in (8, 16):
                m = mixer(hidden, d_conv, bias, **shape)
                n = sum(m.split_sizes)
                gemv.TILES[n, hidden] = gemv.Tile(block_n, 8, 4, 1, False)
                u = torch.randn(1, hidden, dtype=torch.bfloat16)
                state = torch.randn(1, m.conv_dim, d_conv, dtype=torch.bfloat16)
                got, after = check_fused_step(m, u, state, relative=2.0**-7)
                # The torch reference step (CPU products): within a rounding of in_proj's output.
                reference = state.clone()
                with torch.no_grad():
                    want = in_proj_conv(m, u, reference)
                    with gemv.decode_products():  # the mode takes the pair whole
                        routed_state = state.clone()
                        routed = in_proj_conv(m, u, routed_state)
                assert torch.equal(routed_state, after)
                assert all(torch.equal(a, b) for a, b in zip(routed, got))
                torch.testing.assert_close(after, reference, rtol=2.0**-7, atol=0)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=2.0**-6, atol=2.0**-6)
# Not taken: two rows, a conv state of another dtype, a width of 5.
m = mixer(6, 4, **shapes[0][1])
one = torch.randn(1, 6, dtype=torch.bfloat16)
state = torch.zeros(1, m.conv_dim, 4, dtype=torch.bfloat16)
with torch.no_grad():
    assert gemv.takes_conv(m, one, state)
    assert not gemv.takes_conv(m, torch.randn(2, 6, dtype=torch.bfloat16), state.expand(2, -1, -1))
    assert not gemv.takes_conv(m, one, state.float())
    assert not gemv.takes_conv(m, one, state.transpose(1, 2).contiguous().transpose(1, 2))
    wide = torch.zeros(1, m.conv_dim, 5, dtype=torch.bfloat16)
    assert not gemv.takes_conv(mixer(6, 5, **shapes[0][1]), one, wide)
assert not gemv.takes_conv(m, one, state)  # gradients on
print("conv step agrees")
"""


@pytest.mark.long  # ~15 s under Triton's interpreter
def test_conv_step_in_the_product_under_the_interpreter():
    """Under Triton's interpreter, widths 2 to 4 with and without the conv's bias, tiles that
    split the z/xBC/dt boundaries and mask rows: the state shifted with exactly in_proj's
    rounded output, the SiLU'd conv within one rounding of its definition and of the torch
    reference step; the mode runs it for one-row steps only."""
    pytest.importorskip("triton")
    if CUDA:
        pytest.skip("on a GPU the compiled kernel is tested")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}"}
    env.pop("TOOLKIT_TRITON_GEMV", None)
    out = subprocess.run(
        [sys.executable, "-c", CONV_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "conv step agrees" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bias", [True, False])
def test_conv_step_against_causal_conv1d_at_the_8b_shape(bias):
    """in_proj 18560x4096 at its tuned tile (conv_dim 10240, width 4): the state exactly as
    causal-conv1d's update leaves it given the plain kernel's product, its output within a
    bf16 rounding (both sum in fp32, in different orders)."""
    causal_conv1d = pytest.importorskip("causal_conv1d")
    torch.manual_seed(0)
    m = mixer(4096, 4, bias, d_state=128, head_dim=64, num_groups=8).cuda()
    assert sum(m.split_sizes) == 18560 and m.conv_dim == 10240
    u = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(1, m.conv_dim, 4, device="cuda", dtype=torch.bfloat16)
    (_, xbc, _), after = check_fused_step(m, u, state)
    with torch.no_grad():
        plain = gemv.gemv(u, m.in_proj.weight).split(m.split_sizes, dim=-1)[1]
        reference = state.clone()
        want = causal_conv1d.causal_conv1d_update(
            plain.contiguous(), reference, m.conv1d.weight.squeeze(1), m.conv1d.bias, "silu"
        )
    assert torch.equal(after, reference)
    torch.testing.assert_close(xbc, want, rtol=2.0**-7, atol=1e-3)
