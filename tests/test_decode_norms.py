"""The decode step's norm kernels (toolkit/inference/decode_norms.py): residual-add + RMSNorm and
Mamba-2's gated RMSNorm against the torch reference within one rounding (the residual sum exact
where both round the same way), and the decoder sending its norms to them. On a CPU the kernels
run under Triton's interpreter in a subprocess; on a GPU, at the 8B's widths."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.inference import decode_norms, gemv
from toolkit.model.norms import GatedRMSNorm, RMSNorm, add_norm, gated_norm

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def norms_with_random_weights(
    width: int, groups: int, dtype: torch.dtype, device: str = "cpu"
) -> tuple[RMSNorm, GatedRMSNorm]:
    norm, gated = RMSNorm(width), GatedRMSNorm(width, groups)
    for n in (norm, gated):
        n.weight.data = 1 + 0.5 * torch.randn(width)
    return norm.to(device=device, dtype=dtype), gated.to(device=device, dtype=dtype)


def check_against_the_reference(
    width: int,
    groups: int,
    rows: int,
    dtype: torch.dtype,
    device: str,
    ulps: float = 1,
    exact_sum: bool = True,
) -> None:
    """Ours (through decode_norms) against norms.py's torch code for `rows` rows of `width`:
    the sum equal to torch's residual + x (or within an ulp), the norms within `ulps` of
    dtype's rounding."""
    rtol = ulps * torch.finfo(dtype).eps
    norm, gated = norms_with_random_weights(width, groups, dtype, device)
    x, r, z = (torch.randn(rows, 1, width, dtype=dtype, device=device) for _ in range(3))
    z_view = torch.randn(rows, 3 * width, dtype=dtype, device=device)[:, width : 2 * width]
    with torch.no_grad():
        assert decode_norms.takes_add_norm(x, r, norm)
        assert decode_norms.takes_gated_norm(gated, x, z)
        out, total = decode_norms.add_norm(x, r, norm)
        if exact_sum:
            assert torch.equal(total, r + x)
        else:
            torch.testing.assert_close(total, r + x, rtol=torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(out, norm(r + x), rtol=rtol, atol=1e-5)
        out, total = decode_norms.add_norm(x, None, norm)  # the first block: no residual yet
        assert total is x
        torch.testing.assert_close(out, norm(x), rtol=rtol, atol=1e-5)
        y2, z2 = x.view(rows, width), z_view  # z: a strided slice of in_proj's output
        torch.testing.assert_close(
            decode_norms.gated_norm(gated, y2, z2), gated(y2, z2), rtol=rtol, atol=1e-5
        )


def run_interpreted(script: str, done: str) -> None:
    """`script` in a subprocess under Triton's interpreter, the decode kernels at their defaults
    (our norms taken; PDL itself is off under the interpreter); it must print `done`."""
    pytest.importorskip("triton")
    if CUDA:
        pytest.skip("on a GPU the compiled kernels are tested")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}"}
    for switch in ("GEMV", "ROWS", "ATTENTION", "PDL"):
        env.pop(f"TOOLKIT_TRITON_{switch}", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and done in out.stdout, out.stdout + out.stderr


KERNEL_CHECK = r"""
import os, torch
from tests.test_decode_norms import check_against_the_reference
from tests.test_engine import build
from toolkit.inference import decode_norms_kernel as kernels
from toolkit.inference.engine import Engine, Request
from toolkit.tokenizer import ByteTokenizer

torch.manual_seed(0)
# Widths that the power-of-two blocks do not divide, groups of 30 and 32, 1 and 3 rows. fp16:
# the interpreter rounds fp32 to fp16 as torch does, so the sum is exact; bf16: it truncates
# (one more ulp on the norms, and the sum within an ulp: checked exact at fp16).
for width, groups, rows in ((120, 4, 1), (96, 3, 3), (100, 1, 1)):
    check_against_the_reference(width, groups, rows, torch.float16, "cpu")
check_against_the_reference(96, 3, 3, torch.bfloat16, "cpu", ulps=2, exact_sum=False)

# A bf16 hybrid's decode steps send every norm to our kernels: one add_norm per block and the
# final norm, one gated norm per Mamba layer, and decode as with TOOLKIT_TRITON_GEMV=off.
calls = []
for name in ("launch_add_norm", "launch_gated_norm"):
    launch = getattr(kernels, name)
    setattr(kernels, name, lambda *a, n=name, f=launch: (calls.append(n), f(*a))[1])
model = build("hybrid").to(torch.bfloat16)
blocks = len(model.layers)
mamba = sum(type(b.mixer).__name__ == "Mamba2Mixer" for b in model.layers)
assert mamba > 0
runs = {}
for label in ("kernel", "off"):
    if label == "off":
        os.environ["TOOLKIT_TRITON_GEMV"] = "off"
    calls.clear()
    engine = Engine(model, ByteTokenizer(), slots=1, max_len=64, cuda_graphs=True)
    request = Request(prompt=[3, 1, 4, 1, 5], max_new_tokens=4, stop_at_eod=False)
    runs[label] = (engine.run([request])[0].tokens, list(calls))
(tokens, got), (tokens_off, off) = runs["kernel"], runs["off"]
steps = 3  # the first token comes from the prefill
assert got.count("launch_add_norm") == steps * (blocks + 1), got
assert got.count("launch_gated_norm") == steps * mamba and not off, got
assert tokens == tokens_off, (tokens, tokens_off)
print("decode norms agree")
"""


@pytest.mark.long  # make test-long (CI runs it): ~15 s under Triton's interpreter
def test_norm_kernels_and_routing_under_the_interpreter():
    """Under Triton's interpreter: both kernels against the torch reference at odd widths and
    groups, and a bf16 hybrid's engine sending each decode step's norms to them (a spy on the
    launches) and decoding the tokens it decodes with TOOLKIT_TRITON_GEMV=off."""
    run_interpreted(KERNEL_CHECK, "decode norms agree")


def test_norms_stay_mamba_ssms_with_pdl_off(monkeypatch):
    """With TOOLKIT_TRITON_PDL=off the decode mode hands no norm to our kernels, even where they
    would take it; by default it does."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that the mode is on here on a CPU
    monkeypatch.setenv("TOOLKIT_TRITON_PDL", "off")
    calls = []
    monkeypatch.setattr(decode_norms, "add_norm", lambda *a: calls.append(a) or (a[0], a[0]))
    norm, _ = norms_with_random_weights(64, 2, torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with gemv.decode_products(), torch.no_grad():
        out, total = add_norm(x, x, norm)
        assert not calls and torch.equal(total, x + x)
        monkeypatch.delenv("TOOLKIT_TRITON_PDL")
        add_norm(x, x, norm)
        assert len(calls) == 1


def test_norms_stay_torch_where_the_kernels_do_not_take_them(monkeypatch):
    """On a CPU without the interpreter, with gradients, fp32, a LayerNorm or 17 rows: the
    decode mode leaves add_norm and gated_norm to norms.py's code."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    norm, gated = norms_with_random_weights(64, 2, torch.bfloat16)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not decode_norms.takes_add_norm(x, x, norm)  # a CPU tensor
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert decode_norms.takes_add_norm(x, x, norm)
        assert decode_norms.takes_gated_norm(gated, x[0], x[0])
        assert not decode_norms.takes_add_norm(x.float(), x.float(), norm)
        assert not decode_norms.takes_add_norm(torch.randn(17, 1, 64).bfloat16(), None, norm)
        assert not decode_norms.takes_add_norm(x, x, torch.nn.LayerNorm(64).bfloat16())
        assert not decode_norms.takes_gated_norm(gated, x[0], x[0].float())
    assert not decode_norms.takes_add_norm(x, x, norm)  # gradients on
    monkeypatch.delenv("TRITON_INTERPRET")
    with gemv.decode_products(), torch.no_grad():  # routed, not taken: the torch code's
        out, total = add_norm(x, x, norm)
        assert torch.equal(total, x + x) and torch.equal(out, norm(x + x))
        assert torch.equal(gated_norm(gated, x[0], x[0]), gated(x[0], x[0]))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8])
def test_norm_kernels_on_cuda_at_the_8b_widths(rows):
    """hidden 4096 and the gated norm's 8192 in 8 groups: the sum exactly torch's, the norms
    within two bf16 roundings of torch's (each rounds once from its own fp32 sums)."""
    torch.manual_seed(0)
    check_against_the_reference(4096, 8, rows, torch.bfloat16, "cuda", ulps=2)
