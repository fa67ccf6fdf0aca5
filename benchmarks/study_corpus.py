"""Make the corpus of the small-scale study (recipes/study/*.toml): real text nobody here wrote,
available offline, tokenized with a byte-level BPE trained on it (toolkit.data.train_tokenizer).

    python benchmarks/study_corpus.py --out data/study [--docs DIR ...] [--vocab-size 16384]

Sources, one document per file, in sorted path order:
- the CPython standard library's own source (every .py file under this Python's stdlib
  directory, site-packages excluded; 1,790 files, 31.5 MB for CPython 3.11.7);
- optionally --docs DIR: English text files (.txt, .rst, .md) under DIR, e.g. Debian's Python
  documentation sources after `apt-get install python3.11-doc`:
  /usr/share/doc/python3.11/html/_sources;
- optionally --package NAME: the .py source of an installed third-party package (e.g. torch,
  transformers), found without importing it; its version goes into the manifest.
--max-bytes caps the text: sources are taken in the order given (stdlib, docs, packages) and the
first file that would pass the cap ends the corpus. Documents are then shuffled (seed 0), so
that the recipes' contiguous train/valid split samples every source.
Writes OUT/corpus.jsonl, OUT/tok.json, OUT/corpus_text_document.bin/.idx (end-of-document
tokens appended) and OUT/manifest.json (sources, files, bytes, tokens, SHA-256 of the JSONL,
Python version): what the study's report cites for where the corpus comes from and its size.
"""

import argparse
import hashlib
import importlib.util
import json
import platform
import random
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from toolkit.data.indexed import IndexedDataset  # noqa: E402
from toolkit.data.preprocess import output_prefix, preprocess  # noqa: E402
from toolkit.data.train_tokenizer import train_tokenizer  # noqa: E402

DOC_SUFFIXES = (".txt", ".rst", ".md")


def stdlib_sources() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    return root, files


def package_sources(name: str) -> tuple[Path, list[Path], str]:
    """An installed package's directory, its .py files and its version (no import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(name)
    root = Path(next(iter(spec.submodule_search_locations)))
    return root, sorted(p for p in root.rglob("*.py") if p.is_file()), metadata.version(name)


def doc_sources(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DOC_SUFFIXES)


def write_jsonl(out: Path, groups: list[tuple[str, Path, list[Path]]], max_bytes: int) -> dict:
    """One JSON line per file ({"text", "source"}), in a shuffled order (seed 0) so that the
    contiguous train/valid/test document ranges each sample every source; returns the
    per-source counts. The cap applies in source order, before the shuffle."""
    counts: dict[str, dict] = {}
    records = []
    total = 0
    for name, root, files in groups:
        c = counts.setdefault(name, {"root": str(root), "files": 0, "bytes": 0})
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                continue
            size = len(text.encode("utf-8"))
            if total + size > max_bytes:
                break
            records.append({"text": text, "source": f"{name}:{path.relative_to(root)}"})
            c["files"] += 1
            c["bytes"] += size
            total += size
        else:
            continue
        break
    random.Random(0).shuffle(records)
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/study_corpus.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory to write (e.g. data/study)")
    parser.add_argument("--docs", action="append", default=[], help="a directory of text files")
    parser.add_argument(
        "--package", action="append", default=[], help="an installed package's .py source"
    )
    parser.add_argument("--no-stdlib", action="store_true", help="leave the stdlib source out")
    parser.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary (16384)")
    parser.add_argument("--max-bytes", type=int, default=10**12, help="cap on the text (bytes)")
    parser.add_argument("--workers", type=int, default=4, help="tokenizing processes (4)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    groups = []
    if not args.no_stdlib:
        root, files = stdlib_sources()
        groups.append(("stdlib", root, files))
    for d in map(Path, args.docs):
        if not d.is_dir():
            print(f"error: --docs {d}: not a directory", file=sys.stderr)
            return 2
        groups.append((f"docs:{d}", d, doc_sources(d)))
    versions = {}
    for name in args.package:
        try:
            root, files, versions[name] = package_sources(name)
        except (LookupError, metadata.PackageNotFoundError):
            print(f"error: --package {name}: not installed in this Python", file=sys.stderr)
            return 2
        groups.append((f"package:{name}", root, files))
    if not groups:
        print("error: no sources: drop --no-stdlib or give --docs DIR", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "corpus.jsonl"
    counts = write_jsonl(jsonl, groups, args.max_bytes)
    print(f"{jsonl}: {json.dumps(counts)}", flush=True)
    tok = out / "tok.json"
    trained = train_tokenizer(jsonl, tok, vocab_size=args.vocab_size)
    summary = preprocess(
        jsonl, out / "corpus", tokenizer=str(tok), append_eod=True, workers=args.workers
    )
    prefix = output_prefix(out / "corpus", "text")
    manifest = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sources": counts,
        "package_versions": versions,
        "documents": summary.documents,
        "bytes": sum(c["bytes"] for c in counts.values()),
        "tokens": summary.tokens,
        "vocab_size": trained["vocab_size"],
        "jsonl_sha256": hashlib.sha256(jsonl.read_bytes()).hexdigest(),
        "dataset": prefix,
        "tokenizer": str(tok),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    assert len(IndexedDataset(prefix)) == summary.documents
    print(
        f"{prefix}.bin/.idx: {summary.documents} documents, {manifest['bytes'] / 1e6:.1f} MB, "
        f"{summary.tokens:,} tokens ({manifest['bytes'] / summary.tokens:.2f} bytes/token), "
        f"tokenizer {tok} ({trained['vocab_size']} tokens); manifest {out / 'manifest.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
