"""Tokenize a JSONL corpus into an indexed dataset (`<output-prefix>_<json-key>_document.bin/.idx`),
the reference framework's format: one JSON object per line, one document each.

    python -m toolkit.data.preprocess --input corpus.jsonl --json-key text --tokenizer byte \\
        --output-prefix data/corpus --workers 8 --append-eod

Worker processes tokenize; the main process writes documents in input order, so the output does
not depend on the number of workers. A line that is not JSON, or lacks the key, stops the run with
its line number, unless --skip-bad-lines (then it is counted and reported).
"""

import argparse
import json
import logging
import multiprocessing
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from toolkit.data.indexed import IndexedDatasetWriter, optimal_dtype
from toolkit.tokenizer import Tokenizer, TokenizerError, build_tokenizer

log = logging.getLogger("toolkit.data.preprocess")

_worker: dict[str, object] = {}  # each worker process's tokenizer and options


class PreprocessError(ValueError):
    """The input cannot be converted: the message names the file and line."""


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def _init_worker(spec: str, key: str, append_eod: bool) -> None:
    tokenizer = build_tokenizer(spec)
    dtype = optimal_dtype(tokenizer.vocab_size)
    _worker.update(tokenizer=tokenizer, key=key, append_eod=append_eod, dtype=dtype)


def _encode(item: tuple[int, bytes]) -> tuple[int, np.ndarray | str, int]:
    """(line number, token ids or the reason the line is bad, bytes read)."""
    lineno, line = item
    tokenizer: Tokenizer = _worker["tokenizer"]  # type: ignore[assignment]
    key = _worker["key"]
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return lineno, f"not JSON ({e.msg} at column {e.colno})", len(line)
    except UnicodeDecodeError as e:
        return lineno, f"not UTF-8 ({e.reason} at byte {e.start})", len(line)
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        return lineno, f"no string value for key {key!r}", len(line)
    ids = tokenizer.encode(record[key])
    # As in the reference: an empty document gets no <eod> (and so no sequence).
    if ids and _worker["append_eod"]:
        ids.append(tokenizer.eod)
    # An array pickles as one buffer: far cheaper to send back than a list of ints.
    return lineno, np.asarray(ids, dtype=_worker["dtype"]), len(line)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():  # blank lines (a trailing newline) are not documents
                yield lineno, line


def output_prefix(prefix: str | Path, key: str) -> str:
    return f"{prefix}_{key}_document"


def preprocess(
    input_path: str | Path,
    prefix: str | Path,
    *,
    tokenizer: str = "byte",
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    skip_bad_lines: bool = False,
    progress: bool = True,
) -> Summary:
    """Write `<prefix>_<json_key>_document.bin/.idx` from a JSONL file; returns the counts."""
    input_path = Path(input_path)
    if not input_path.is_file():
        what = "is a directory, not a JSONL file" if input_path.is_dir() else "no such input file"
        raise PreprocessError(f"{input_path}: {what}")
    vocab_size = build_tokenizer(tokenizer).vocab_size  # fails here, once, for a bad spec
    out = output_prefix(prefix, json_key)
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a file where the prefix needs a directory
        raise PreprocessError(f"--output-prefix {prefix}: {e.strerror}: {e.filename}") from None
    summary, start = Summary(), time.perf_counter()
    total = input_path.stat().st_size
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
        mininterval=1.0, file=sys.stderr,
    )  # fmt: skip
    init = (tokenizer, json_key, append_eod)
    with IndexedDatasetWriter(out, optimal_dtype(vocab_size)) as writer:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init)
            # imap keeps input order: the output is the same for any number of workers.
            results = pool.imap(_encode, _lines(input_path), chunksize=64)
        else:
            pool = None
            _init_worker(*init)
            results = map(_encode, _lines(input_path))
        try:
            for lineno, ids, nbytes in results:
                summary.bytes_read += nbytes
                bar.update(nbytes)
                if isinstance(ids, str):
                    where = f"{input_path}:{lineno}: {ids}"
                    if not skip_bad_lines:
                        raise PreprocessError(f"{where} (pass --skip-bad-lines to skip such lines)")
                    summary.bad_lines += 1
                    log.warning("skipped %s", where)
                    continue
                writer.add_document(ids)
                summary.documents += 1
                summary.tokens += len(ids)
        finally:
            if pool is not None:
                pool.terminate()
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.data.preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--json-key", default="text", help="the key holding the text")
    parser.add_argument(
        "--tokenizer", default="byte", help="'byte', a tokenizer .json file, or a .model file"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.*")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--append-eod", action="store_true", help="end every document with <eod>")
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip (and count) lines that are not JSON or lack the key, instead of stopping",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    try:
        s = preprocess(
            args.input,
            args.output_prefix,
            tokenizer=args.tokenizer,
            json_key=args.json_key,
            workers=args.workers,
            append_eod=args.append_eod,
            skip_bad_lines=args.skip_bad_lines,
            progress=not args.no_progress,
        )
    except (PreprocessError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = s.tokens / max(s.seconds, 1e-9)
    print(
        f"{output_prefix(args.output_prefix, args.json_key)}.bin/.idx: {s.documents} documents, "
        f"{s.tokens} tokens, {s.bad_lines} bad lines skipped, {s.bytes_read / 1e6:.1f} MB in "
        f"{s.seconds:.1f} s ({rate:,.0f} tokens/s, {rate / args.workers:,.0f} per worker)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
