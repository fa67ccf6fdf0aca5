"""Show what a checkpoint holds: metadata, the layout it was written with, the layer pattern, and a
table of arrays (global shape, dtype, bytes, chunking). --verify reads every chunk and checks its
CRC32C checksum and that no chunk file is missing.

    python checkpoints_tools/inspect_checkpoint.py runs/tiny_hybrid/checkpoints [--verify] [--all]
"""

import argparse
import fnmatch
import math
import sys

from tqdm import tqdm

from toolkit.checkpoint import CheckpointError, resolve_checkpoint, store


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def array_rows(group, keys: list[str]) -> list[tuple[str, str, str, int, str]]:
    rows = []
    for key in keys:
        arr = store.open_array(group, key)
        dtype = arr.attrs.get("dtype", str(arr.dtype))
        nbytes = math.prod(arr.shape) * arr.dtype.itemsize
        rows.append((key, str(tuple(arr.shape)), dtype, nbytes, str(tuple(arr.chunks))))
    return rows


def print_table(rows: list[tuple[str, str, str, int, str]]) -> None:
    header = ("array", "global shape", "dtype", "bytes", "chunks")
    widths = [max(len(header[i]), *(len(str(r[i])) for r in rows)) for i in (0, 1, 2, 4)]
    print(
        f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]:<{widths[2]}}  "
        f"{header[3]:>10}  {header[4]}"
    )
    for name, shape, dtype, nbytes, chunks in rows:
        print(
            f"{name:<{widths[0]}}  {shape:<{widths[1]}}  {dtype:<{widths[2]}}  "
            f"{human(nbytes):>10}  {chunks}"
        )


def verify(group, keys: list[str], path: str) -> list[str]:
    """Read every chunk of every array; returns the errors (each names its array)."""
    errors = []
    for key in tqdm(keys, desc="verify", unit="array", disable=None):
        try:
            arr = store.open_array(group, key)
            step = max(arr.chunks[0], 1) if arr.ndim else 1
            for start in range(0, arr.shape[0] if arr.ndim else 1, step):
                index = (slice(start, start + step),) if arr.ndim else ()
                store.read_region(arr, index, path)
        except CheckpointError as e:
            errors.append(str(e))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/inspect_checkpoint.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint root (uses its latest) or step directory")
    parser.add_argument("--verify", action="store_true", help="read and checksum every chunk")
    parser.add_argument(
        "--all", action="store_true", help="list optimizer and RNG arrays too, not only the model"
    )
    parser.add_argument("--arrays", metavar="GLOB", help="only arrays matching, e.g. '*.in_proj*'")
    args = parser.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint)
        group = store.open_checkpoint(path)
    except CheckpointError as e:  # not a checkpoint: bad input (a damaged one fails --verify: 1)
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = store.metadata(group)
    attrs = dict(group.attrs)
    print(f"checkpoint   {path}")
    print(f"format       {attrs['format']} v{attrs['format_version']}")
    print(f"step         {attrs.get('step')}  (consumed samples {meta.get('consumed_samples')})")
    print(f"written at   {meta.get('layout')}")
    print(f"pattern      {meta.get('pattern')}  (vocabulary {meta.get('vocab_size')})")
    keys = {prefix: store.array_keys(group, prefix) for prefix in ("model", "optim", "rng")}
    shown = keys["model"] + (keys["optim"] + keys["rng"] if args.all else [])
    if args.arrays:
        shown = [k for k in shown if fnmatch.fnmatch(k, args.arrays)]
    rows = array_rows(group, shown)
    if rows:
        print()
        print_table(rows)
    print()
    for prefix, names in keys.items():
        total = sum(r[3] for r in array_rows(group, names))
        print(f"{prefix:<6} {len(names):>6} arrays  {human(total):>10}")
    if args.verify:
        errors = verify(group, [k for names in keys.values() for k in names], str(path))
        if errors:
            print(f"\nverify: {len(errors)} damaged array(s):", file=sys.stderr)
            for e in errors:
                print(f"  {e}", file=sys.stderr)
            return 1
        print("verify: every chunk is present and its checksum matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
