"""The decode step's kernel for 2-16 rows (toolkit/inference/gemm_rows.py): its products
against the exact ones within one bf16 rounding, and decode_products sending exactly the 2-16-row
products to it. On a CPU the kernel runs under Triton's interpreter in a subprocess; on a GPU,
at the 8B's shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.test_gemv import assert_one_rounding
from toolkit.inference import gemm_rows, gemv

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

KERNEL_CHECK = r"""
import os, torch, torch.nn.functional as F
from tests.test_gemv import assert_one_rounding
from tests.test_cuda_graph import record_decodes
from tests.test_engine import build
from toolkit.inference import gemm_rows, gemm_rows_kernel, gemv, gemv_kernel
from toolkit.inference.engine import Engine, Request
from toolkit.tokenizer import ByteTokenizer
from toolkit.model.mlp import linear_activation

torch.manual_seed(0)
# Rows padded to 16, shapes the tiles do not divide (masked rows and columns), and one they do.
T = gemm_rows.Tile
for m in (2, 3, 8, 16):
    for n, k, tile in [(50, 70, T(16, 32, 4, 3)), (33, 200, T(32, 64, 4, 3)),
                       (64, 128, T(16, 64, 4, 3)), (40, 300, None)]:
        w = torch.randn(n, k, dtype=torch.bfloat16)
        x = torch.randn(m, 1, k, dtype=torch.bfloat16)
        y = gemm_rows.gemm_rows(x, w, tile)
        assert y.shape == (m, 1, n) and y.dtype == torch.bfloat16
        assert_one_rounding(y, x, w, relative=2.0**-7)  # the interpreter truncates

# fc1 and its activation in one kernel: the activation applied to the fp32 sums.
w = torch.randn(40, 64, dtype=torch.bfloat16)
x = torch.randn(5, 64, dtype=torch.bfloat16)
exact = x.double() @ w.double().t()
for activation, f in (("gelu", F.gelu), ("relu2", lambda h: F.relu(h).square())):
    got = gemm_rows.gemm_rows(x, w, activation=activation).double()
    torch.testing.assert_close(got, f(exact), rtol=2.0**-7, atol=1e-2 * exact.abs().max().item())

# Inside decode_products: 2-16 bias-free, gradient-free half-precision rows reach the kernel.
calls, one_row = [], []
launch = gemm_rows_kernel.launch
def spy(weight, x, y, tile, activation=None):
    calls.append((x.size(0), tuple(weight.shape), activation))
    launch(weight, x, y, tile, activation)
gemm_rows_kernel.launch = spy
gemv_launch = gemv_kernel.launch
gemv_kernel.launch = lambda *a: (one_row.append(a[0].shape), gemv_launch(*a))[1]
w = torch.randn(24, 40, dtype=torch.bfloat16)
fc1 = torch.nn.Linear(40, 24, bias=False).to(torch.bfloat16)
rows = {m: torch.randn(m, 1, 40, dtype=torch.bfloat16) for m in (1, 2, 16, 17)}
with gemv.decode_products():
    with torch.no_grad():
        routed = F.linear(rows[2], w)
        F.linear(rows[16], w)
        F.linear(rows[1], w)  # one row: gemv's
        assert torch.equal(F.linear(rows[17], w), rows[17] @ w.t())  # 17: torch's
        F.linear(rows[2], w, torch.zeros(24, dtype=torch.bfloat16))  # a bias
        F.linear(rows[2].float(), w.float())  # fp32
        linear_activation(fc1, rows[2], "relu2")
        os.environ["TOOLKIT_TRITON_ROWS"] = "off"
        F.linear(rows[2], w)
        del os.environ["TOOLKIT_TRITON_ROWS"]
    F.linear(rows[2], w)  # gradients on
assert calls == [(2, (24, 40), None), (16, (24, 40), None), (2, (24, 40), "relu2")], calls
assert one_row == [(24, 40)], one_row
assert torch.equal(routed, gemm_rows.gemm_rows(rows[2], w))

# A bf16 hybrid's eager decode of three requests at once: every product of the step through the
# kernel at three rows (fc1 with its GELU), logits as with TOOLKIT_TRITON_ROWS=off (torch's
# products here) within bf16 rounding of the products.
model = build("hybrid").to(torch.bfloat16)
linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
runs = {}
for label in ("kernel", "off"):
    if label == "off":
        os.environ["TOOLKIT_TRITON_ROWS"] = "off"
    calls.clear()
    engine = Engine(model, ByteTokenizer(), slots=4, max_len=64, cuda_graphs=False)
    seen = record_decodes(engine)
    requests = [Request(prompt=p, max_new_tokens=5, stop_at_eod=False)
                for p in ([3, 1, 4, 1, 5], [2, 7, 1], [8, 2, 8, 1, 8, 2])]
    done = engine.run(requests)
    runs[label] = ([r.tokens for r in done], torch.cat(seen), list(calls))
(tokens, logits, got), (tokens_off, logits_off, off) = runs["kernel"], runs["off"]
assert len(got) == 4 * linears and {c[0] for c in got} == {3} and not off, (len(got), got[:3])
assert sum(c[2] == "gelu" for c in got) == 4, got
assert logits.shape == logits_off.shape == (12, logits.size(-1))
torch.testing.assert_close(logits, logits_off, rtol=0.05, atol=0.05)
assert tokens == tokens_off, (tokens, tokens_off)
print("gemm_rows agrees")
"""


@pytest.mark.long  # under Triton's interpreter
def test_kernel_products_and_routing_under_the_interpreter():
    """Under Triton's interpreter: 2, 3, 8 and 16 rows (with and without an activation) within
    one bf16 rounding of the exact products; inside decode_products exactly the 2-16-row bf16
    products without bias or gradients reach the kernel; a bf16 hybrid decoding three requests
    at once sends every product there and gets the logits it gets without it."""
    pytest.importorskip("triton")
    if CUDA:
        pytest.skip("on a GPU the compiled kernel is tested")
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}"}
    env.pop("TOOLKIT_TRITON_GEMV", None)
    env.pop("TOOLKIT_TRITON_ROWS", None)
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "gemm_rows agrees" in out.stdout, out.stdout + out.stderr


def test_rows_counts_only_two_to_sixteen(monkeypatch):
    monkeypatch.delenv("TOOLKIT_TRITON_ROWS", raising=False)
    counts = {m: gemm_rows.rows(torch.empty(m, 1, 8)) for m in (1, 2, 16, 17)}
    assert counts == {1: 0, 2: 2, 16: 16, 17: 0}
    monkeypatch.setenv("TOOLKIT_TRITON_ROWS", "off")
    assert gemm_rows.rows(torch.empty(4, 8)) == 0


def test_gemm_rows_refuses_more_than_sixteen_rows():
    with pytest.raises(ValueError, match="1-16 rows of 16"):
        gemm_rows.gemm_rows(torch.randn(17, 16), torch.randn(8, 16))


def test_tiles_fit_a_dot():
    """Every tile's steps are whole tl.dot tiles (at least 16 each way, powers of two)."""
    for tile in [*gemm_rows.TILES.values(), gemm_rows.DEFAULT, gemm_rows.tile_for(24, 40)]:
        for size in (tile.block_n, tile.block_k):
            assert size >= 16 and size & (size - 1) == 0, tile


SHAPES_8B = [(18560, 4096), (4096, 8192), (16384, 4096), (4096, 16384), (6144, 4096),
             (4096, 4096), (256000, 4096)]  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [2, 8])
@pytest.mark.parametrize("shape", SHAPES_8B)
def test_gemm_rows_on_cuda_within_one_rounding(shape, m, monkeypatch):
    """The 8B's decode shapes at their tiles, through decode_products, against the exact
    product (float64 on the GPU)."""
    from toolkit.inference import gemm_rows_kernel

    torch.manual_seed(0)
    n, k = shape
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16)
    calls = []
    launch = gemm_rows_kernel.launch
    monkeypatch.setattr(gemm_rows_kernel, "launch", lambda *a: (calls.append(a[3]), launch(*a))[1])
    monkeypatch.delenv("TOOLKIT_TRITON_ROWS", raising=False)
    with torch.no_grad(), gemv.decode_products():
        y = F.linear(x, w)
    assert calls == [gemm_rows.tile_for(n, k)]
    assert_one_rounding(y, x, w)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_fc1_with_gelu_on_cuda_at_four_rows():
    torch.manual_seed(0)
    w = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    exact = x.double() @ w.double().t()
    got = gemm_rows.gemm_rows(x, w, activation="gelu").double()
    torch.testing.assert_close(got, F.gelu(exact), rtol=2.0**-8, atol=1e-3 * exact.abs().max())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graph_engine_at_three_rows_decodes_as_with_cublas(monkeypatch):
    """A bf16 hybrid's engine on the GPU decoding three requests (CUDA graphs at the 4-row
    bucket): each step's logits within bf16 rounding of cuBLAS's with TOOLKIT_TRITON_ROWS=off."""
    from tests.test_cuda_graph import record_decodes
    from tests.test_engine import build
    from toolkit.inference.engine import Engine, Request
    from toolkit.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    monkeypatch.delenv("TOOLKIT_TRITON_ROWS", raising=False)
    model = build("hybrid").to(device="cuda", dtype=torch.bfloat16)
    runs = {}
    for label in ("kernel", "off"):
        if label == "off":
            monkeypatch.setenv("TOOLKIT_TRITON_ROWS", "off")
        engine = Engine(model, ByteTokenizer(), slots=4, max_len=128, overlap=False)
        seen = record_decodes(engine)
        requests = [
            Request(prompt=p, max_new_tokens=8, stop_at_eod=False)
            for p in ([3, 1, 4, 1, 5], [2, 7, 1], [8, 2, 8, 1, 8, 2])
        ]
        engine.run(requests)
        runs[label] = torch.cat(seen)
    assert runs["kernel"].shape == runs["off"].shape and runs["kernel"].size(0) == 3 * 7
    torch.testing.assert_close(runs["kernel"], runs["off"], rtol=0.02, atol=0.02)
