"""Preprocessing throughput: tokens/s in total and per worker core.

Builds a JSONL corpus of about --mb megabytes from the installed Python standard library's source
files (one file per document, repeated), then runs toolkit.data.preprocess with each worker count
and tokenizer given.

    python benchmarks/data_preprocess.py --dir /tmp/pre --mb 50 --workers 1,2 \\
        --tokenizer byte --tokenizer path/to/tokenizer.model
"""

import argparse
import json
import sysconfig
import time
from pathlib import Path

from toolkit.data.preprocess import preprocess


def write_corpus(path: Path, megabytes: float) -> int:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    written, docs = 0, 0
    with open(path, "w") as out:
        while written < megabytes * 1e6:
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written, docs = written + len(line), docs + 1
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--tokenizer", action="append", help="tokenizer spec (repeatable)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    docs = write_corpus(corpus, args.mb)
    for spec in args.tokenizer or ["byte"]:
        for workers in map(int, args.workers.split(",")):
            t = time.perf_counter()
            s = preprocess(
                corpus, root / "out", tokenizer=spec, workers=workers, append_eod=True,
                progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t
            row = {
                "tokenizer": Path(spec).name,
                "workers": workers,
                "documents": s.documents,
                "input_mb": round(s.bytes_read / 1e6, 1),
                "tokens": s.tokens,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(s.tokens / seconds),
                "tokens_per_s_per_worker": round(s.tokens / seconds / workers),
                "input_mb_per_s": round(s.bytes_read / 1e6 / seconds, 2),
            }
            assert s.documents == docs
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
