"""Rewrite a checkpoint for another parallel layout.

Every layout can already read every checkpoint (its arrays are global), so resharding a Zarr
store only re-chunks it so that each rank of the target layout writes and reads whole chunks of
its own: use it before a long run at a very different TP. `--format megatron` writes the
reference framework's per-rank directory instead (iter_*/mp_rank_*/model_optim_rng.pt), with
the state-dict keys of Megatron-core's 2024-era hybrid layer specs (the released checkpoints':
Mamba pre-norm `norm.weight`), or with `--megatron-generation current` of today's
(`mixer.in_proj.layer_norm_weight`, `mixer.conv1d_weight`); attention and MLP pre-norms are
fused into `linear_qkv` / `linear_fc1` in both.

    python checkpoints_tools/reshard.py --in runs/x/checkpoints --out runs/x-tp4 --tp 4 --pp 2
"""

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from toolkit.build import build_model, checkpoint_recipe, model_from_checkpoint
from toolkit.checkpoint import (
    CheckpointError,
    RankView,
    ReadCounter,
    resolve_checkpoint,
    store,
)
from toolkit.checkpoint.megatron import save_megatron
from toolkit.checkpoint.megatron_layout import GENERATIONS
from toolkit.config import RecipeError, recipe_from_dict, validate
from toolkit.parallel import apply_tp
from toolkit.tokenizer import build_tokenizer

BLOCK_BYTES = 256 << 20  # copy at most this much of an array at a time


def target_specs(recipe_table: dict, tp: int) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Array name -> (global shape, chunks) for a writer at tensor parallelism `tp`, from the
    model cut by the real TP code on the meta device (no memory)."""
    recipe = recipe_from_dict(recipe_table)
    model = build_model(recipe, build_tokenizer(recipe.data.tokenizer), "meta")
    if tp > 1:
        apply_tp(model, group=None, tp=tp, rank=0)
    view = RankView(model.cfg, model.vocab_size, tp, 0)
    return {
        piece.array: (piece.shape, piece.chunks)
        for name, p in model.named_parameters()
        for piece in view.pieces(name, p)
    }


def copy_blocks(
    src: store.StoredArray, dst_group: Path, key: str, path: str, counter: ReadCounter
) -> int:
    """Copy one array in row blocks aligned with both chunkings; returns the bytes copied."""
    dst = store.open_array(dst_group, key)
    if src.ndim == 0:
        files = store.write_region(dst_group, key, (), store.read_region(src, (), path, counter))
        store.fsync_files(files)
        return src.dtype.itemsize
    unit = math.lcm(src.chunks[0], dst.chunks[0])
    row_bytes = src.dtype.itemsize * math.prod(src.shape[1:])
    rows = max(unit, (BLOCK_BYTES // max(row_bytes * unit, 1)) * unit)
    files = []
    for start in range(0, src.shape[0], rows):
        index = (slice(start, min(start + rows, src.shape[0])),)
        data = store.read_region(src, index, path, counter)
        files += store.write_region(dst_group, key, index, data)
    store.fsync_files(files)
    return row_bytes * src.shape[0]


def reshard_zarr(src_path: Path, out: Path, tp: int, pp: int) -> dict:
    counter = ReadCounter()
    src = store.open_checkpoint(src_path)
    meta = store.metadata(src)
    recipe_table = meta["recipe"]
    recipe_table["parallel"] = recipe_table.get("parallel", {}) | {"tp": tp, "pp": pp, "dp": -1}
    validate(recipe_from_dict(recipe_table))  # the target layout must fit the model
    specs = target_specs(recipe_table, tp)
    keys = [k for prefix in ("model", "optim") for k in store.array_keys(src, prefix)]
    arrays = {key: store.open_array(src, key) for key in keys}
    array_specs = []
    for key, arr in arrays.items():
        name = key.split("/")[1]
        if name not in specs:
            raise CheckpointError(f"{src_path}: {key} is not an array of this recipe's model")
        shape, chunks = specs[name]
        if arr.ndim == 0:
            shape, chunks = (), ()
        elif tuple(arr.shape) != shape:
            raise CheckpointError(f"{src_path}: {key} has shape {arr.shape}, expected {shape}")
        array_specs.append(store.ArraySpec(key, shape, arr.attrs["dtype"], chunks))
    meta = meta | {"layout": {"tp": tp, "pp": pp, "dp": None, "world_size": None}}
    meta["recipe"] = recipe_table
    meta["resharded_from"] = str(src_path)
    tmp = store.begin(out, int(dict(src.attrs)["step"]), meta)
    store.create_arrays(tmp, array_specs)
    start, written = time.perf_counter(), 0
    with (
        ThreadPoolExecutor(8) as pool,
        tqdm(total=len(keys), desc="reshard", unit="array", disable=None) as bar,
    ):
        futures = [
            pool.submit(copy_blocks, arr, tmp, key, str(src_path), counter)
            for key, arr in arrays.items()
        ]
        for future in futures:
            written += future.result()
            bar.update(1)
    final = store.publish(tmp)
    seconds = time.perf_counter() - start
    return {
        "path": final,
        "arrays": len(keys),
        "bytes": written,
        "bytes_read": counter.bytes,
        "seconds": seconds,
    }


def check_target(src: Path, out: Path, tp: int, pp: int, fmt: str) -> None:
    """RecipeError if the model does not split into the target layout (naming the flag and the
    key) or --out cannot take the result."""
    try:
        checkpoint_recipe(src, [f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.dp=-1"])
    except RecipeError as e:
        raise RecipeError(f"--tp {tp} --pp {pp} do not fit the model of {src}: {e}") from None
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out}: exists and is not a directory")
    if fmt == "zarr" and (out / src.name).exists():
        raise RecipeError(f"--out {out} already holds {src.name}: give a new directory")


@torch.no_grad()  # a copy of arrays: no autograd graph, also as a console script
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/reshard.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--in", dest="src", required=True, help="checkpoint root or step dir")
    parser.add_argument("--out", required=True, help="output directory (a new checkpoint root)")
    parser.add_argument("--tp", type=int, default=1, help="target tensor parallelism")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline parallelism")
    parser.add_argument("--format", choices=["zarr", "megatron"], default="zarr")
    parser.add_argument(
        "--megatron-generation",
        choices=GENERATIONS,
        help="with --format megatron: whose key names (default 2024, as released checkpoints)",
    )
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.error("--tp and --pp must be at least 1")
    if args.megatron_generation and args.format != "megatron":
        parser.error("--megatron-generation needs --format megatron")
    try:  # bad input: exit 2 before anything is read in full or written
        src = resolve_checkpoint(args.src)
        check_target(src, Path(args.out), args.tp, args.pp, args.format)
    except (CheckpointError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.format == "megatron":
            model, recipe, _ = model_from_checkpoint(src)
            step = store.read_metadata(src).get("step", 0)
            generation = args.megatron_generation or "2024"
            out = save_megatron(
                model,
                recipe,
                args.out,
                tp=args.tp,
                pp=args.pp,
                iteration=step,
                generation=generation,
            )
            print(
                f"wrote a Megatron checkpoint ({generation} keys) at TP={args.tp} PP={args.pp}: "
                f"{out}"
            )
            return 0
        summary = reshard_zarr(src, Path(args.out), args.tp, args.pp)
    except (CheckpointError, RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    gb = summary["bytes"] / 1e9
    print(
        f"wrote {summary['path']} for TP={args.tp} PP={args.pp}: {summary['arrays']} arrays, "
        f"{gb:.3f} GB in {summary['seconds']:.1f} s ({gb / max(summary['seconds'], 1e-9):.2f} "
        f"GB/s); read {summary['bytes_read'] / max(summary['bytes'], 1):.3f}x the bytes written"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
