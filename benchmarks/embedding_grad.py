"""The input embedding's backward into a gradient it already holds (a micro-batch after a
step's first): autograd's (a whole-table gradient, then AccumulateGrad's add) against
train.fused_grad_accumulation's (toolkit.grad_accumulation.embedding_into_grad: the rows of the
micro-batch's distinct tokens added in place), at the 8B's table by default; milliseconds per
backward from CUDA events, and whether the two gradients are the same bits.

    python3 benchmarks/embedding_grad.py [--vocab 256000] [--dim 4096] [--tokens 8192]
"""

import argparse

import torch
import torch.nn.functional as F
from hbm_bandwidth import timed_ms  # a sibling script: benchmarks/ is on the path

from toolkit.grad_accumulation import embedding_into_grad


def backward_ms(lookup, weight: torch.Tensor, tokens: torch.Tensor, upstream: torch.Tensor,
                repeats: int) -> float:  # fmt: skip
    """Mean milliseconds of one forward and backward through `lookup` into weight.grad."""
    return timed_ms(lambda: lookup(tokens, weight).backward(upstream), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=256000, help="table rows")
    parser.add_argument("--dim", type=int, default=4096, help="row width (d_model)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens a micro-batch")
    parser.add_argument("--repeats", type=int, default=20, help="timed backwards of each")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("embedding_grad.py: needs CUDA")
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.dim, device="cuda", requires_grad=True)
    tokens = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    upstream = torch.randn(args.tokens, args.dim, device="cuda")
    grads = {}
    for name, lookup in (("autograd", F.embedding), ("fused", embedding_into_grad)):
        weight.grad = torch.zeros_like(weight)
        ms = backward_ms(lookup, weight, tokens, upstream, args.repeats)
        grads[name] = weight.grad
        print(f"{name:9s} {ms:8.3f} ms a micro-batch's backward into the held gradient")
    same = torch.equal(grads["autograd"], grads["fused"])
    print(f"table {args.vocab:,} x {args.dim:,} fp32, {args.tokens:,} tokens; same bits: {same}")


if __name__ == "__main__":
    main()
