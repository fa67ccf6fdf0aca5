"""The loss's kernels alone (toolkit/loss.py) on bf16 logits of a large vocabulary: each row's
log-sum-exp as torch.logsumexp computes it (chunk 0: a maximum pass and a sum pass over the row)
against the chunked form (TOOLKIT_LSE_CHUNK: each chunk's maximum and sum from one read), and
the backward's gradient kernel beside them, in ms and TB/s over the bytes each must move.

    python3 benchmarks/cross_entropy.py [--rows 8192] [--vocab 256000] [--chunks 0,512,1024,2048]
        [--repeats 20] [--json OUT]

On CUDA each kernel goes through torch.compile as the loss compiles it; elsewhere they run eagerly
(the numbers then say nothing about a GPU; the script and its checks still run). Each form's
log-sum-exp is checked against float64 (max |difference|).
"""

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimizer_step import timed  # noqa: E402
from train_throughput import write_json  # noqa: E402

from toolkit import loss  # noqa: E402


def chunk_list(text: str) -> list[int]:
    try:
        chunks = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"integers, got {text!r}") from None
    if not chunks or any(c < 0 for c in chunks):
        raise argparse.ArgumentTypeError(f"integers >= 0, got {text!r}")
    return chunks


def timed_ms(work, repeats: int, device: torch.device) -> float:
    """Median milliseconds of `work` over `repeats` calls after two untimed ones (device time
    by CUDA events, wall time on CPUs: optimizer_step.timed)."""
    work(), work()
    return statistics.median(timed(work, device)[0] for _ in range(repeats))


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, generator=g, device=device) * 3).bfloat16()
    target = torch.randint(0, args.vocab, (args.rows,), generator=g, device=device)
    want = torch.logsumexp(logits.double(), -1)
    compile_ = (
        torch.compile(dynamic=False, fullgraph=True) if device.type == "cuda" else (lambda f: f)
    )
    gbytes = logits.numel() * logits.element_size() / 1e9  # the logits, read once
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "rows": args.rows, "vocab": args.vocab, "lse": {}}  # fmt: skip
    for chunk in args.chunks:
        fn = compile_(functools.partial(loss._block_lse, chunk=chunk))
        lse, _ = fn(logits, target)
        ms = timed_ms(lambda fn=fn: fn(logits, target), args.repeats, device)
        error = float((lse.double() - want).abs().max())
        result["lse"][chunk] = {"ms": ms, "tb_per_s": gbytes / ms, "max_abs_error": error}
        print(f"log-sum-exp, chunk {chunk or 'none (torch.logsumexp)':>28}: {ms:8.3f} ms "
              f"{gbytes / ms:6.2f} TB/s (the logits once)  |error| {error:.2e}")  # fmt: skip
    grad_into = compile_(loss._fusable_block_grad_into)
    out = torch.empty_like(logits)
    scale = torch.full((args.rows, 1), 1.0 / args.rows, device=device)
    lse = want.float()
    ms = timed_ms(lambda: grad_into(out, logits, target, lse, scale), args.repeats, device)
    result["grad"] = {"ms": ms, "tb_per_s": 2 * gbytes / ms}
    print(f"{'gradient (read the logits, write the gradient)':>49}: {ms:8.3f} ms "
          f"{2 * gbytes / ms:6.2f} TB/s")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/cross_entropy.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=8192, help="tokens (default 8192)")
    parser.add_argument("--vocab", type=int, default=256000, help="columns (default 256000)")
    parser.add_argument("--chunks", type=chunk_list, default=[0, 512, 1024, 2048],
                        help="chunk widths to time, 0 for torch.logsumexp (default "
                        "0,512,1024,2048)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.vocab < 1 or args.repeats < 1:
        parser.error("--rows, --vocab and --repeats must be >= 1")
    write_json(args.json, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
