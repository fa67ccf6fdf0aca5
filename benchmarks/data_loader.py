"""Loader throughput and memory on a large indexed dataset (one core).

Writes a synthetic dataset of --gb gigabytes (uint16 tokens, documents of random length), then
for a blend of two halves of it: index build time (first run) and cached open time (second run),
samples/s of `batch()` (what the trainer calls) on one thread, and peak RSS against the dataset
size: the data is memory-mapped, so memory stays flat however large the dataset is.

    python benchmarks/data_loader.py --dir /tmp/loader --gb 4 --seq-length 4096
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.build import build_blend
from toolkit.config import recipe_from_dict
from toolkit.data.indexed import IndexedDatasetWriter


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_split_mb() -> dict[str, int]:
    """Resident memory now: anonymous (the process's own) vs file-backed (mapped dataset pages,
    clean page cache the kernel reclaims under pressure)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) // 1024 for k in ("RssAnon", "RssFile")}


def write_dataset(prefix: Path, tokens: int, seed: int) -> None:
    """Documents of 200..20000 tokens, written a chunk at a time (never all in memory)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        written = 0
        while written < tokens:
            sizes = rng.integers(200, 20000, 1000)
            block = rng.integers(0, 65000, int(sizes.sum()), dtype=np.uint16)
            for doc in np.split(block, np.cumsum(sizes)[:-1]):
                w.add_document(doc)
            written += len(block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="where the dataset and index files go")
    parser.add_argument("--gb", type=float, default=2.0, help="dataset size (both halves)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=2000, help="samples to time")
    parser.add_argument("--batch", type=int, default=4, help="samples per batch() call")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.dir)
    half = int(args.gb * 1e9 / 2 / 2)  # tokens per half (2 bytes each)
    for name, seed in (("a", 1), ("b", 2)):
        if not (root / f"{name}.idx").exists():
            t = time.perf_counter()
            write_dataset(root / name, half, seed)
            print(f"wrote {root / name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    rss_before = peak_rss_mb()
    anon_before = rss_split_mb()["RssAnon"]
    table = {
        "model": {"num_layers": 1, "hidden_size": 8, "seq_length": args.seq_length, "pattern": "-"},
        "data": {"blend": [[0.6, str(root / "a")], [0.4, str(root / "b")]], "split": "99,1,0"},
        "train": {"steps": 1},
    }
    table["data"]["cache_dir"] = str(root / "cache")
    recipe = recipe_from_dict(table)
    timings = {}
    for run in ("first", "cached"):
        t = time.perf_counter()
        samples = build_blend(recipe, "train")
        samples.sample(0)  # builds (or reads) epoch 0's index files
        timings[run] = time.perf_counter() - t
    samples.batch(0, args.batch)  # warm
    t = time.perf_counter()
    for first in range(0, args.samples, args.batch):
        samples.batch(first * 97, args.batch)  # spread over the shuffled epoch
    seconds = time.perf_counter() - t
    dataset_bytes = sum(p.stat().st_size for p in root.glob("*.bin"))
    print(
        json.dumps(
            {
                "dataset_gb": round(dataset_bytes / 1e9, 2),
                "seq_length": args.seq_length,
                "index_build_s": round(timings["first"], 2),
                "index_cached_open_s": round(timings["cached"], 3),
                "samples_per_s": round(args.samples / seconds, 1),
                "tokens_per_s": round(args.samples * (args.seq_length + 1) / seconds),
                "peak_rss_mb_before_loading": round(rss_before),
                "peak_rss_mb": round(peak_rss_mb()),
                "anon_rss_mb_before_loading": anon_before,
                "anon_rss_mb_after": rss_split_mb()["RssAnon"],
                "file_rss_mb_after": rss_split_mb()["RssFile"],
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
