"""The decode step's matrix-vector kernel (toolkit/inference/gemv.py): its products against an
fp32 reference within bf16 rounding, and the decoder sending exactly the one-row products to it.
On a CPU the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET must be
set before Triton compiles anything); on a GPU, against cuBLAS at the 8B's shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from toolkit.inference import gemv

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def assert_one_rounding(
    got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, relative: float = 2.0**-8
) -> None:
    """`got` is the exact x @ w.T rounded once to bf16 (half an ulp: at most 2^-8 relative),
    plus fp32 summation-order error over a few thousand terms of size ~|x||w| (1e-4 of the
    row's scale is far above it). Triton's interpreter rounds fp32 to bf16 toward zero: a whole
    ulp there (relative=2^-7)."""
    want = x.double().reshape(-1, w.size(1)) @ w.double().t()
    scale = (x.double().abs().reshape(-1, w.size(1)) @ w.double().abs().t()).clamp_min(1e-6)
    error = (got.double().reshape(want.shape) - want).abs()
    assert (error <= relative * want.abs() + 1e-4 * scale).all(), (error / scale).max()


KERNEL_CHECK = r"""
import os, torch, torch.nn.functional as F
from tests.test_cuda_graph import record_decodes
from tests.test_gemv import assert_one_rounding
from tests.test_engine import build
from toolkit.inference import gemv, gemv_kernel
from toolkit.inference.engine import Engine, Request
from toolkit.tokenizer import ByteTokenizer

torch.manual_seed(0)
# Shapes that tiles do not divide (masked rows and columns), and one that they do.
for n, k, tile in [(50, 70, gemv.Tile(8, 32, 4, 1, False)), (48, 64, gemv.Tile(16, 32, 4, 1, True)),
                   (33, 200, gemv.Tile(4, 128, 4, 1, True)), (64, 96, None), (16, 3000, None)]:
    w = torch.randn(n, k, dtype=torch.bfloat16)
    x = torch.randn(1, 1, k, dtype=torch.bfloat16)
    y = gemv.gemv(x, w, tile)
    assert y.shape == (1, 1, n) and y.dtype == torch.bfloat16
    assert_one_rounding(y, x, w, relative=2.0**-7)  # the interpreter truncates

# Inside decode_products only one-row, bias-free, gradient-free products reach the kernel.
calls = []
launch = gemv_kernel.launch
def spy(weight, x, y, tile, activation=None):
    calls.append((tuple(weight.shape), activation))
    launch(weight, x, y, tile, activation)
gemv_kernel.launch = spy
w = torch.randn(24, 40, dtype=torch.bfloat16)
one, many = torch.randn(1, 40, dtype=torch.bfloat16), torch.randn(17, 40, dtype=torch.bfloat16)
with gemv.decode_products():
    with torch.no_grad():
        routed = F.linear(one, w)
        assert torch.equal(F.linear(many, w), many @ w.t())  # 17 rows: cuBLAS's (torch's here)
        F.linear(one, w, torch.zeros(24, dtype=torch.bfloat16))  # a bias
        F.linear(one.float(), w.float())  # fp32
    F.linear(one, w)  # gradients on
assert calls == [((24, 40), None)], calls
assert torch.equal(routed, gemv.gemv(one, w))

# fc1 and its activation in one kernel: the activation applied to the fp32 sums.
w = torch.randn(40, 64, dtype=torch.bfloat16)
x = torch.randn(1, 64, dtype=torch.bfloat16)
exact = x.double() @ w.double().t()
for activation, f in (("gelu", F.gelu), ("relu2", lambda h: F.relu(h).square())):
    got = gemv.gemv(x, w, activation=activation).double()
    want = f(exact)
    torch.testing.assert_close(got, want, rtol=2.0**-7, atol=1e-2 * exact.abs().max().item())
# A bf16 model's decode steps: every product of the step through the kernel (fc1 with its
# activation), logits as cuBLAS's (here the CPU's) within bf16
# rounding of the products, the same greedy tokens; eager and static steps alike.
for case, fused in (("hybrid", {"gelu": 1}), ("transformer", {"relu2": 1})):
    model = build(case).to(torch.bfloat16)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    mlp_or_mamba = sum(fused.values())
    os.environ.pop("TOOLKIT_TRITON_GEMV", None)
    runs = {}
    for label, graphs in (("kernel", True), ("eager", False), ("off", True)):
        calls.clear()
        if label == "off":
            os.environ["TOOLKIT_TRITON_GEMV"] = "off"
        engine = Engine(model, ByteTokenizer(), slots=1, max_len=64, cuda_graphs=graphs)
        seen = record_decodes(engine)
        done = engine.run([Request(prompt=[3, 1, 4, 1, 5], max_new_tokens=6, stop_at_eod=False)])
        runs[label] = (done[0].tokens, torch.cat(seen), list(calls))
    (tokens, logits, got), (tokens_off, logits_off, off) = runs["kernel"], runs["off"]
    # 5 decode steps after the prefill, one launch per linear (the fused pairs: one each).
    assert len(got) == 5 * linears and runs["eager"][2] == got and not off, (case, len(got))
    kinds = {k: sum(1 for c in got if c[1] == k) // 5 for k in ("gelu", "relu2")}
    assert {k: v for k, v in kinds.items() if v} == fused, (case, kinds)
    assert tokens == tokens_off == runs["eager"][0], (case, tokens, tokens_off)
    torch.testing.assert_close(logits, logits_off, rtol=0.05, atol=0.05)
print("gemv agrees")
"""


@pytest.mark.long  # make test-long (CI runs it): ~20 s under Triton's interpreter
def test_kernel_products_and_routing_under_the_interpreter():
    """Under Triton's interpreter: the kernel's products (tiles that do and do not divide the
    shape) within one bf16 rounding of the exact ones; inside decode_products only one-row bf16
    products without bias or gradients reach it; a bf16 hybrid's engine sends every product of
    its decode steps through it and picks the tokens it picks with TOOLKIT_TRITON_GEMV=off."""
    pytest.importorskip("triton")
    if CUDA:  # the GPU tests below run the compiled kernel (and Triton 3.6's interpreter fails
        pytest.skip("on a GPU the compiled kernel is tested")  # its loop bound on numpy 2.4)
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}"}
    env.pop("TOOLKIT_TRITON_GEMV", None)
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "gemv agrees" in out.stdout, out.stdout + out.stderr


def test_decode_products_is_a_no_op_where_the_kernel_does_not_run(monkeypatch):
    """On a CPU without the interpreter, or with TOOLKIT_TRITON_GEMV=off, F.linear is F.linear."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w, x = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(1, 16, dtype=torch.bfloat16)
    assert not gemv.takes(x, w, None)  # a CPU tensor
    monkeypatch.setenv("TOOLKIT_TRITON_GEMV", "off")
    assert not gemv.enabled()
    with gemv.decode_products(), torch.no_grad():
        assert torch.equal(F.linear(x, w), x @ w.t())


def test_gemv_refuses_more_than_one_row():
    with pytest.raises(ValueError, match="one row of 16"):
        gemv.gemv(torch.randn(2, 16), torch.randn(8, 16))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(18560, 4096), (4096, 8192), (4096, 16384), (6144, 4096)])
def test_gemv_on_cuda_within_one_rounding(shape, monkeypatch):
    """The 8B's decode shapes at their tuned tiles, against the exact product (and so within
    cuBLAS's own distance of it)."""
    from toolkit.inference import gemv_kernel

    torch.manual_seed(0)
    n, k = shape
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    calls = []
    launch = gemv_kernel.launch
    monkeypatch.setattr(gemv_kernel, "launch", lambda *a: (calls.append(a[3]), launch(*a))[1])
    with torch.no_grad(), gemv.decode_products():
        y = F.linear(x, w)
    assert calls == [gemv.tile_for(n, k)]
    assert_one_rounding(y.cpu(), x.cpu(), w.cpu())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graph_engine_decodes_as_with_cublas_on_cuda(monkeypatch):
    """A bf16 hybrid's engine on the GPU (CUDA graphs, batch 1; fc1 with its GELU in one
    kernel): each step's logits within bf16 rounding of cuBLAS's path with
    TOOLKIT_TRITON_GEMV=off, and the same greedy tokens up to a near-tie (random weights: the
    fused GELU skips a rounding, which may decide a tie)."""
    from tests.test_cuda_graph import record_decodes
    from tests.test_engine import build
    from toolkit.inference.engine import Engine, Request
    from toolkit.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = build("hybrid").to(device="cuda", dtype=torch.bfloat16)
    runs = {}
    for label in ("kernel", "off"):
        if label == "off":
            monkeypatch.setenv("TOOLKIT_TRITON_GEMV", "off")
        engine = Engine(model, ByteTokenizer(), slots=1, max_len=128, overlap=False)
        seen = record_decodes(engine)
        request = Request(prompt=[3, 1, 4, 1, 5, 9, 2, 6], max_new_tokens=24, stop_at_eod=False)
        runs[label] = (engine.run([request])[0].tokens, seen)
    (tokens, logits), (tokens_off, logits_off) = runs["kernel"], runs["off"]
    assert len(logits) == len(logits_off) == 23  # the first token comes from the prefill
    for step, (got, want) in enumerate(zip(logits, logits_off, strict=True)):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
        if tokens[step + 1] != tokens_off[step + 1]:  # from here on the inputs differ
            top2 = want.view(-1).topk(2).values
            assert top2[0] - top2[1] < 0.05, (step, top2)
            break


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fc1_with_gelu_on_cuda_at_the_8b_shape():
    """fc1 16384x4096 with GELU in one kernel, at its tuned tile: against the float64 definition
    within a bf16 rounding of the result."""
    torch.manual_seed(0)
    w = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    exact = x.double() @ w.double().t()
    got = gemv.gemv(x, w, activation="gelu").double()
    torch.testing.assert_close(got, F.gelu(exact), rtol=2.0**-8, atol=1e-3 * exact.abs().max())
