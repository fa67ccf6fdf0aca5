"""Host time per generated token of a request's text: the engine's stop-string check and a
stream's text so far (what the server computes at every token), by decoding the whole token
list each time (before) against toolkit/inference/incremental_text.py (now).

The tokens are real text (a Python standard-library file) encoded by the tokenizer; times are
per token, averaged over the tokens around each length. Runs on the CPU.

    python benchmarks/detokenize.py --tokenizer byte --lengths 256,1024,4096
"""

import argparse
import sysconfig
import time
from pathlib import Path

from toolkit.inference import api
from toolkit.inference.request import Request, finish_reason
from toolkit.tokenizer import build_tokenizer


def corpus_ids(tokenizer, n: int) -> list[int]:  # noqa: ANN001
    text, files = "", sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ids: list[int] = []
    for f in files:
        text = f.read_text(errors="replace")
        ids += tokenizer.encode(text)
        if len(ids) >= n:
            return ids[:n]
    return ids


def per_token_us(
    ids: list[int],
    tokenizer,  # noqa: ANN001
    lengths: list[int],
    whole: bool,
) -> dict:
    """Microseconds per token spent at each length (the 64 tokens before it) on the stop check
    and the stream's text, one request growing token by token."""
    r = Request(prompt=[0], max_new_tokens=len(ids) + 1, stop=["<never appears>"])
    if whole:  # the whole list decoded at every call, as before incremental_text
        r.text = lambda tok, r=r: tok.decode(r.tokens)  # type: ignore[method-assign]
    out, spent = {}, []
    for i, token in enumerate(ids, 1):
        r.tokens.append(token)
        start = time.perf_counter()
        finish_reason(r, token, tokenizer)
        api.generated_text(r, tokenizer, final=False)
        spent.append(time.perf_counter() - start)
        if i in lengths:
            out[i] = 1e6 * sum(spent[-64:]) / len(spent[-64:])
    out["total_s"] = sum(spent)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="byte", help="a tokenizer spec (byte, a file, ...)")
    p.add_argument("--lengths", default="256,1024,4096", help="comma-separated token counts")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    tokenizer = build_tokenizer(args.tokenizer)
    ids = corpus_ids(tokenizer, max(lengths))
    print(f"tokenizer {args.tokenizer}: {len(ids)} tokens; us per token at each length")
    for label, whole in (("whole list", True), ("incremental", False)):
        t = per_token_us(ids, tokenizer, lengths, whole)
        cells = ", ".join(f"{n}: {t[n]:.1f}" for n in lengths if n in t)
        print(f"{label:>12}: {cells}; {t['total_s']:.2f} s for the request")


if __name__ == "__main__":
    main()
