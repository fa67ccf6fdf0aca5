"""The Triton kernel tests' cases for the device their script runs on (the scripts run in a
fresh process: tests/test_step_graph.interpret and in_subprocess)."""

import torch


def for_device(cases: list[tuple], device: str) -> list[tuple]:
    """cases (dtype, tolerance, ...) as they can run on `device`: on a CPU, under Triton's
    interpreter, the fp32 ones alone (its tl.dot of bf16 tiles is wrong: 2.7e10 off at 16 x 16);
    on a GPU, the fp32 ones to 5e-3 (tl.dot of fp32 tiles is TF32 there, as in mamba-ssm's
    kernels)."""
    if device == "cpu":
        return [case for case in cases if case[0] == torch.float32]
    return [(d, 5e-3 if d == torch.float32 else tol, *rest) for d, tol, *rest in cases]


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, *case) -> None:
    """got within tol of ref's largest magnitude (of 1 where that is smaller), the case named
    in the error."""
    err = (got.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * max(scale, 1.0), (name, *case, err, scale)


def assert_rounded_to_bf16(name: str, low: torch.Tensor, exact: torch.Tensor) -> None:
    """`low` is `exact` (fp32) kept in bf16: each value within one bf16 step of it (a GPU rounds
    to the nearest, Triton's interpreter truncates)."""
    off = (low.float() - exact).abs() - exact.abs() * 2**-7
    assert low.dtype == torch.bfloat16 and off.max() <= 0, (name, low.dtype, off.max().item())


def refused(call, words: str, why: str = "") -> None:
    """call() raises a RuntimeError that says `words` (`why` names the case if it does not)."""
    try:
        call()
    except RuntimeError as e:
        assert words in str(e), e
    else:
        raise AssertionError(f"{why or words} was not refused")


def chunk_reference(
    x: torch.Tensor, soft: torch.Tensor, A: torch.Tensor, B: torch.Tensor, Q: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the SSD forward kernels keep for the backward, by the reference scan
    (toolkit/model/ssd.py) in fp32 from x [b, l, h, p], dt after its softplus [b, l, h], A [h]
    and B [b, l, g, n]: (dt [b, h, chunks, Q] and dA's sums within each chunk, padded with 0 past
    the end; the state passed into each chunk [b, chunks, h, p, n], the final state of each
    prefix that ends before it)."""
    import torch.nn.functional as F

    from toolkit.model.ssd import ssd_chunked

    b, L, H, P = x.shape
    chunks = -(-L // Q)
    soft_chunks = F.pad(soft, (0, 0, 0, chunks * Q - L)).unflatten(1, (chunks, Q))
    soft_chunks = soft_chunks.permute(0, 3, 1, 2)
    states = torch.zeros(b, chunks, H, P, B.size(-1), device=x.device)
    for c in range(1, chunks):  # C plays no part in the states: B in its place
        prefix = B[:, : c * Q].float()
        _, states[:, c] = ssd_chunked(x[:, : c * Q].float(), soft[:, : c * Q], A, prefix, prefix, Q)
    return soft_chunks, torch.cumsum(soft_chunks * A[:, None, None], -1), states
