"""Checkpoint I/O against the disk's own bandwidth, in one run on one machine.

Measures, for one process holding a recipe's whole model plus Adam state (fp32):
- the disk: `dd` sequential write (fsync'd) and read of a file as large as the checkpoint, of
  zeros and (when /dev/shm can hold the source) of random bytes: a disk that compresses or
  skips zeros writes and reads them faster than a checkpoint's incompressible data;
- a blocking save (write with checksums, fsync, publish) in GB/s;
- an asynchronous save: how long training is blocked (the CPU snapshot) versus the whole save;
- a full restore (model and optimizer) in GB/s; with --rounds N, the median of N restores, each
  right after a dd read of a file as large (a shared virtual disk's speed drifts from minute to
  minute): the ratio of each pair, and their median;
- lazy restores at TP=2 and TP=4 (every rank, shards cut by the real TP code): bytes read over
  bytes needed (read amplification).
Page cache: reads are right after writes, so they may come from memory; with --drop-caches (root)
the script asks the kernel to drop clean caches before each read.

    python benchmarks/checkpoint_io.py --recipe recipes/800m_hybrid.toml --dir /tmp/ckpt-bench
"""

import argparse
import copy
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.build import build_model
from toolkit.checkpoint import CheckpointSaver, Comm, RankView, ReadCounter, chunks, restore
from toolkit.config import RecipeError, load_recipe, validate
from toolkit.parallel import apply_tp
from toolkit.tokenizer import build_tokenizer


def dd(args: list[str]) -> float:
    """GB/s that dd reports."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    copied, seconds = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out).groups()
    return int(copied) / float(seconds) / 1e9


def dd_read(path: Path) -> float:
    """GB/s of dd reading `path` sequentially."""
    return dd([f"if={path}", "of=/dev/null", "bs=64M"])


def random_file(path: Path, nbytes: int) -> None:
    """`nbytes` of random data (fresh in every 64 MiB block: nothing to deduplicate)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, nbytes, 64 << 20):
            f.write(rng.bytes(min(64 << 20, nbytes - start)))


def drop_caches(enabled: bool) -> bool:
    """Ask the kernel to drop clean page cache (root only); whether it did."""
    if not enabled:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        print(f"cannot drop the page cache ({e}): reads may come from memory")
        return False
    return True


def with_adam_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    """An AdamW whose state exists (one step on zero gradients), as in a real run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/800m_hybrid.toml")
    parser.add_argument("--dir", default="/tmp/ckpt-bench", help="scratch directory (wiped)")
    parser.add_argument("--drop-caches", action="store_true", help="drop page cache before reads")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--quick", action="store_true", help="no async save, no TP restores")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the model and its Adam state live: cuda measures a GPU run's save (copies "
        "to the host included) and resume (copies to the GPU included)",
    )
    parser.add_argument("--no-dd", action="store_true", help="skip dd (e.g. in a thread sweep)")
    parser.add_argument(
        "--rounds", type=int, default=1, metavar="N",
        help="restore N times, each right after a dd read of a file as large (default 1)",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. --set model.num_layers=12")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the save's phases

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    recipe = load_recipe(args.recipe, args.set)
    torch.manual_seed(0)
    model = build_model(recipe, build_tokenizer(recipe.data.tokenizer), torch.device(args.device))
    optimizer = with_adam_state(model)
    view = RankView(model.cfg, model.vocab_size)
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # weights + two moments
    results: dict[str, float | str] = {
        "recipe": " ".join([args.recipe, *args.set]),
        "device": args.device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_gb": nbytes / 1e9,
    }

    results["chunk_threads"] = chunks.CHUNK_THREADS
    results["early_writeback"] = str(chunks.EARLY_WRITEBACK)
    ddfile = root / "dd.bin"
    if not args.no_dd:
        count = max(1, nbytes // (64 << 20))
        results["dd_write_gbps"] = dd(
            ["if=/dev/zero", f"of={ddfile}", "bs=64M", f"count={count}", "conv=fsync"]
        )
        results["page_cache_dropped"] = str(drop_caches(args.drop_caches))
        results["dd_read_gbps"] = dd_read(ddfile)
        source = Path("/dev/shm/checkpoint_io_random.bin")
        if shutil.disk_usage(source.parent).free > 1.2 * nbytes:
            ddfile.unlink()
            try:
                random_file(source, count * (64 << 20))
                results["dd_random_write_gbps"] = dd(
                    [f"if={source}", f"of={ddfile}", "bs=64M", "conv=fsync"]
                )
            finally:
                source.unlink(missing_ok=True)
            drop_caches(args.drop_caches)
            results["dd_random_read_gbps"] = dd_read(ddfile)
        else:
            print("skipping dd of random data: /dev/shm cannot hold a source that large")
        results["rounds_read"] = "random" if "dd_random_read_gbps" in results else "zeros"
        if args.rounds == 1:
            ddfile.unlink()  # the disk space is the checkpoint's

    saver = CheckpointSaver(root / "ckpt", Comm())
    start = time.perf_counter()
    saver.save(1, model, optimizer, view, {"step": 1})
    results["save_s"] = time.perf_counter() - start
    results["save_gbps"] = nbytes / results["save_s"] / 1e9

    if not args.quick:
        async_saver = CheckpointSaver(root / "ckpt", Comm(), asynchronous=True)
        start = time.perf_counter()
        async_saver.save(2, model, optimizer, view, {"step": 2})
        results["async_blocked_s"] = time.perf_counter() - start
        async_saver.wait()
        results["async_total_s"] = time.perf_counter() - start

    fresh = copy.deepcopy(model)
    fresh_optimizer = with_adam_state(fresh)
    load_times, rounds = [], []  # rounds: (dd read GB/s, restore GB/s), back to back
    paired = args.rounds > 1 and ddfile.exists()
    for _ in range(args.rounds):
        if paired:
            drop_caches(args.drop_caches)
            dd_gbps = dd_read(ddfile)
        drop_caches(args.drop_caches)
        start = time.perf_counter()
        restore(root / "ckpt", fresh, fresh_optimizer, view)
        if fresh.embedding.weight.is_cuda:
            torch.cuda.synchronize()
        load_times.append(time.perf_counter() - start)
        if paired:
            rounds.append((dd_gbps, nbytes / load_times[-1] / 1e9))
            print(f"round {len(rounds)}: dd read {dd_gbps:.3f} GB/s, restore "
                  f"{rounds[-1][1]:.3f} GB/s ({rounds[-1][1] / dd_gbps:.0%})")  # fmt: skip
    ddfile.unlink(missing_ok=True)
    results["load_s"] = float(np.median(load_times))
    results["load_gbps"] = nbytes / results["load_s"] / 1e9
    if rounds:
        results["rounds"] = json.dumps([[round(d, 3), round(r, 3)] for d, r in rounds])
        results["load_vs_dd_read_rounds_median"] = float(np.median([r / d for d, r in rounds]))

    for tp in () if args.quick else (2, 4):
        try:
            validate(load_recipe(args.recipe, [*args.set, f"parallel.tp={tp}"]))
        except RecipeError as e:
            print(f"skipping TP={tp}: {e}")
            continue
        read = needed = 0
        for rank in range(tp):
            shard = copy.deepcopy(model)
            apply_tp(shard, group=None, tp=tp, rank=rank)
            counter = ReadCounter()
            drop_caches(args.drop_caches)
            restore(root / "ckpt", shard, None, RankView(model.cfg, model.vocab_size, tp, rank),
                    counter=counter)  # fmt: skip
            read += counter.bytes
            needed += sum(p.numel() * 4 for p in shard.parameters())
        # `needed` counts vocabulary padding rows, which are not stored: a slight underestimate
        # of the amplification for small vocabularies, none for the 256k one.
        results[f"tp{tp}_read_amplification"] = read / needed

    if not args.no_dd:
        results["save_vs_dd_write"] = results["save_gbps"] / results["dd_write_gbps"]
        results["load_vs_dd_read"] = results["load_gbps"] / results["dd_read_gbps"]
        if "dd_random_write_gbps" in results:
            results["save_vs_dd_random_write"] = (
                results["save_gbps"] / results["dd_random_write_gbps"]
            )
            results["load_vs_dd_random_read"] = (
                results["load_gbps"] / results["dd_random_read_gbps"]
            )
    for key, value in results.items():
        print(f"{key:28} {value:.3f}" if isinstance(value, float) else f"{key:28} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
