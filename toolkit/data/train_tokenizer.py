"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on a JSONL corpus:

    python -m toolkit.data.train_tokenizer --input corpus.jsonl --json-key text \\
        --vocab-size 32000 --output tok.json

The result is a plain `tokenizer.json`: `data.tokenizer = "tok.json"` in a recipe,
`--tokenizer tok.json` for preprocess and submit.py, and transformers' tokenizer files on export.
Byte-level: every text encodes (no unknown token) and decodes back exactly. Its one special token
is <|endoftext|>, the end-of-document token (toolkit.tokenizer finds it by that name). The input
is read once; a line that is not JSON or lacks the key stops the run with its number, and nothing
is written. Exit status: 0 done, 2 bad input, 1 failure.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

EOD = "<|endoftext|>"
MAX_VOCAB = 2**24


class CorpusError(ValueError):
    """The corpus cannot be read: the message names the file and line."""


def documents(path: Path, key: str, bar: tqdm) -> Iterator[str]:
    """The `key` strings of a JSONL file, in order; CorpusError for the first bad line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            bar.update(len(line))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorpusError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise CorpusError(f"{path}:{lineno}: no string value for key {key!r}")
            yield record[key]


def build_trainer_and_tokenizer(vocab_size: int, min_frequency: int, progress: bool):  # noqa: ANN201
    """An empty byte-level BPE tokenizer and its trainer (the 256 byte symbols are always in the
    vocabulary, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    return tokenizer, trainer


def train_tokenizer(
    input_path: str | Path,
    output: str | Path,
    *,
    vocab_size: int,
    json_key: str = "text",
    min_frequency: int = 2,
    progress: bool = True,
) -> dict[str, float]:
    """Train and write `output` (atomically: a failure leaves nothing); returns counts."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.is_file():
        what = "is a directory, not a JSONL file" if input_path.is_dir() else "no such input file"
        raise CorpusError(f"--input {input_path}: {what}")
    if output.is_dir() or not output.parent.is_dir():
        raise CorpusError(f"--output {output}: not a file in an existing directory")
    if not 257 <= vocab_size <= MAX_VOCAB:
        raise CorpusError(
            f"--vocab-size {vocab_size}: must be in [257, {MAX_VOCAB}] (256 bytes + {EOD})"
        )
    start = time.perf_counter()
    tokenizer, trainer = build_trainer_and_tokenizer(vocab_size, min_frequency, progress)
    counts = {"documents": 0, "bytes": 0}
    bar = tqdm(
        total=input_path.stat().st_size, unit="B", unit_scale=True, desc="read",
        disable=not progress, mininterval=1.0, file=sys.stderr,
    )  # fmt: skip

    def counted() -> Iterator[str]:
        for text in documents(input_path, json_key, bar):
            counts["documents"] += 1
            counts["bytes"] += len(text.encode("utf-8"))
            yield text

    tokenizer.train_from_iterator(counted(), trainer)
    bar.close()
    if counts["documents"] == 0:
        raise CorpusError(f"--input {input_path}: no documents (key {json_key!r})")
    tmp = output.with_name(f".{output.name}.{os.getpid()}.partial")
    tokenizer.save(str(tmp))
    tmp.replace(output)
    return counts | {
        "vocab_size": tokenizer.get_vocab_size(),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.data.train_tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--json-key", default="text", help="the key holding the text (text)")
    parser.add_argument(
        "--vocab-size", type=int, required=True, help=f"tokens including the 256 bytes and {EOD}"
    )
    parser.add_argument("--output", required=True, help="the tokenizer.json file to write")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="merge only pairs seen this often (2)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.min_frequency < 1:
        parser.error("--min-frequency must be >= 1")
    try:
        s = train_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            json_key=args.json_key,
            min_frequency=args.min_frequency,
            progress=not args.no_progress,
        )
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    short = " (the corpus has too few distinct pairs for more)" * (
        s["vocab_size"] < args.vocab_size
    )
    print(
        f"wrote {args.output}: byte-level BPE, {s['vocab_size']} tokens{short}, trained on "
        f"{s['documents']} documents ({s['bytes'] / 1e6:.1f} MB) in {s['seconds']:.1f} s; "
        f"end of document: {EOD}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
