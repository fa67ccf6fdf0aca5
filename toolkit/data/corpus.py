"""The embedded default corpus: the installed Python standard library's own source files.

It needs no download and is the same on every machine with the same Python. Documents are the
files, in sorted path order, each followed by the end-of-document token.
"""

import sysconfig
from pathlib import Path

import numpy as np

from toolkit.tokenizer import ByteTokenizer


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # Top-level modules only: site-packages and tests would make the corpus depend on what is
    # installed and make it larger than a demo needs.
    return sorted(p for p in root.glob("*.py") if p.is_file())


def load_corpus(source: str, tokenizer: ByteTokenizer, max_bytes: int) -> np.ndarray:
    """Token ids (uint16) of the corpus: 'stdlib' or the path of a UTF-8 text file."""
    if source == "stdlib":
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data.source={source!r}: no such file")
        texts = iter([path.read_text(encoding="utf-8", errors="replace")])
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eod)
        if len(ids) >= max_bytes:
            break
    return np.asarray(ids[:max_bytes], dtype=np.uint16)
