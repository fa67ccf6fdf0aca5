"""Tiles of toolkit/inference/gemv.py's matrix-vector kernel against cuBLAS, per weight shape of
a recipe's model, at batch 1: bytes of weight read per second, each product replayed in a CUDA
graph over enough copies of the weight (> 2 GiB) that the L2 cache does not serve them (as
decode_profile.py measures cuBLAS). Prints the fastest tile per shape as gemv.TILES entries.
--rows 2,4,8,16 does the same for gemm_rows.py's kernel at those batches (every candidate at the
largest, the four fastest there at the others) and prints gemm_rows.TILES entries.

    python benchmarks/gemv_sweep.py --recipe recipes/8b_hybrid.toml --json sweep.json
    python benchmarks/gemv_sweep.py --rows 2,4,8,16 --json rows.json
"""

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_profile import graph_time, hbm_bandwidth, linear_shapes  # noqa: E402
from toolkit.config import load_recipe  # noqa: E402
from toolkit.inference import gemm_rows, gemv  # noqa: E402
from toolkit.model.hybrid import HybridLM  # noqa: E402


def tiles(quick: bool) -> list[gemv.Tile]:
    """The sweep: tiles of at most 16k weights (registers), 4 or 8 warps, 1 or 3 stages, with
    and without evict-first loads (quick: a dozen around the default)."""
    if quick:
        pairs = [(4, 512), (8, 256), (8, 512), (16, 256)]
        return [gemv.Tile(n, k, 4, 1, e) for n, k in pairs for e in (False, True)]
    out = []
    for n, k, warps, stages, evict in itertools.product(
        (2, 4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8), (1, 3), (False, True)
    ):
        if n * k <= 16384:
            out.append(gemv.Tile(n, k, warps, stages, evict))
    return out


def row_tiles() -> list[gemm_rows.Tile]:
    """gemm_rows.py's candidates: weight tiles of at most 16k (registers), 4 or 8 warps, 3 or 4
    stages of loads in flight (21: a minute on an H200 for the 8B's seven shapes)."""
    pairs = [(16, 256), (16, 512), (32, 128), (32, 256), (32, 512), (64, 128), (64, 256)]
    return [gemm_rows.Tile(n, k, w, s) for n, k in pairs for w, s in ((4, 3), (4, 4), (8, 3))]


def meta_model(recipe_path: str) -> HybridLM:
    recipe = load_recipe(recipe_path)
    with torch.device("meta"):
        return HybridLM(recipe.model, recipe.model.vocab_size or 256)


def weight_shapes(recipe_path: str) -> dict[tuple[int, int], list[str]]:
    """Distinct nn.Linear weight shapes of the recipe's model (built on the meta device)."""
    return linear_shapes(meta_model(recipe_path))


def _compile(tile_list: list) -> int:
    """Compile the tiles in this process (a pool worker): Triton's on-disk cache keeps them."""
    w = torch.empty(64, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.zeros(16, 4096, device="cuda", dtype=torch.bfloat16)
    for tile in tile_list:
        if isinstance(tile, gemm_rows.Tile):  # 16 rows: Triton's own specialization (M % 16)
            gemm_rows.gemm_rows(x[:2], w, tile), gemm_rows.gemm_rows(x, w, tile)
        else:
            gemv.gemv(x[0], w, tile)
    torch.cuda.synchronize()
    return len(tile_list)


def precompile(tile_list: list, workers: int) -> None:
    """Triton compiles one tile at a time (~0.5 s each); a pool of processes fills the cache."""
    chunks = [tile_list[i::workers] for i in range(workers)]
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        done = sum(pool.map(_compile, chunks))
    print(f"compiled {done} tiles in {workers} processes", flush=True)


def weight_copies(n: int, k: int) -> torch.Tensor:
    """[copies, n, k] random bf16 weights, more than 2 GiB in all: L2 does not serve them."""
    copies = max(2, -(-(2 << 30) // (n * k * 2)))
    return torch.randn(copies, n, k, device="cuda", dtype=torch.bfloat16)


def replays(weights: torch.Tensor) -> int:
    """Products a timed graph replays: each copy at least once, 64 or more in all."""
    return len(weights) * max(1, 64 // len(weights))


def time_tiles(weights: torch.Tensor, m: int, product: Callable, tile_list: list) -> dict:
    """cuBLAS and `product(x, weight, tile)` at each tile for x of `m` rows over `weights`
    [copies, N, K] (one replayed graph each), the tiles fastest first, with their error."""
    copies, n, k = weights.shape
    reps = replays(weights)
    nbytes = n * k * 2
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    cublas = graph_time(lambda i: torch.matmul(x, weights[i % copies].t(), out=out), reps)
    want = x.float() @ weights[0].float().t()
    timed = []
    for tile in tile_list:
        got = product(x, weights[0], tile).float()
        error = ((got - want).abs() / (want.abs() + 1)).max().item()
        t = graph_time(lambda i, t=tile: product(x, weights[i % copies], t), reps)
        timed.append({"tile": list(tile), "us": t * 1e6, "gb_per_s": nbytes / t / 1e9,
                      "error": error})  # fmt: skip
    timed.sort(key=lambda r: r["us"])
    return {"cublas_us": cublas * 1e6, "cublas_gb_per_s": nbytes / cublas / 1e9, "tiles": timed}


def sweep(n: int, k: int, tile_list: list[gemv.Tile]) -> dict:
    """gemv.py's tiles against cuBLAS for one row."""
    return {"shape": [n, k]} | time_tiles(weight_copies(n, k), 1, gemv.gemv, tile_list)


def report(label: str, row: dict) -> None:
    """One line: cuBLAS, the fastest tile of row["tiles"] (sorted) and its speed-up, the next."""
    best, cublas = row["tiles"][0], row["cublas_us"]
    print(
        f"{label}: cuBLAS {cublas:.1f} us {row['cublas_gb_per_s']:.0f} GB/s; best {best['tile']} "
        f"{best['us']:.1f} us {best['gb_per_s']:.0f} GB/s (x{cublas / best['us']:.2f}, error "
        f"{best['error']:.1e}); next "
        + ", ".join(f"{r['tile']} {r['gb_per_s']:.0f}" for r in row["tiles"][1:4]),
        flush=True,
    )


def sweep_rows(n: int, k: int, ms: list[int], tile_list: list[gemm_rows.Tile]) -> dict:
    """gemm_rows.py's tiles against cuBLAS at each of `ms` rows: every tile at the most rows (the
    kernel's work does not depend on them: x is padded to 16), the four fastest there at the
    others; "best": the fastest of those four summed over `ms`."""
    weights = weight_copies(n, k)
    row: dict = {"shape": [n, k], "rows": {}}
    top = tile_list
    for m in sorted(ms, reverse=True):
        result = row["rows"][m] = time_tiles(weights, m, gemm_rows.gemm_rows, top)
        top = [gemm_rows.Tile(*r["tile"]) for r in result["tiles"][:4]]
        report(f"{n}x{k} M={m}", result)
    total = {tuple(tile): 0.0 for tile in top}
    for result in row["rows"].values():
        for r in result["tiles"]:
            if tuple(r["tile"]) in total:
                total[tuple(r["tile"])] += r["us"]
    row["best"] = list(min(total, key=total.get))
    return row


def main_rows(recipe_path: str, ms: list[int], workers: int) -> dict:
    if not all(2 <= m <= gemm_rows.MAX_ROWS for m in ms):
        sys.exit(f"--rows: between 2 and {gemm_rows.MAX_ROWS}, got {ms}")
    tile_list = row_tiles()
    if workers > 1:
        precompile(tile_list, workers)
    result = {"device": torch.cuda.get_device_name(0), "hbm": hbm_bandwidth(), "shapes": []}
    print(f"HBM: {result['hbm']}", flush=True)
    for (n, k), names in weight_shapes(recipe_path).items():
        row = sweep_rows(n, k, ms, tile_list)
        torch.cuda.empty_cache()
        row["layers"], row["example"] = len(names), names[0]
        result["shapes"].append(row)
    print("TILES = {  # gemm_rows.py")
    for row in result["shapes"]:
        print(f"    ({row['shape'][0]}, {row['shape'][1]}): Tile{tuple(row['best'])},")
    print("}")
    return result


def sweep_fused(recipe_path: str) -> list[dict]:
    """An MLP's fc1 with its activation in one kernel (at fc1's tile) against fc1 alone."""
    model = meta_model(recipe_path)
    mlp = next((b.mixer for b in model.layers if b.kind == "-"), None)
    if mlp is None or mlp.activation not in ("gelu", "relu2"):
        return []
    n, k = mlp.linear_fc1.weight.shape
    weights = weight_copies(n, k)
    copies, reps = len(weights), replays(weights)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    plain = graph_time(lambda i: gemv.gemv(x, weights[i % copies]), reps)
    fused = graph_time(lambda i: gemv.gemv(x, weights[i % copies], None, mlp.activation), reps)
    print(f"fc1 {n}x{k}: {plain * 1e6:.1f} us, with {mlp.activation} {fused * 1e6:.1f} us")
    return [{"shape": [n, k], "activation": mlp.activation, "plain_us": plain * 1e6,
             "fused_us": fused * 1e6}]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/8b_hybrid.toml")
    p.add_argument("--quick", action="store_true", help="a dozen tiles, not the whole sweep")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--fused", action="store_true", help="only fc1 with its activation fused")
    p.add_argument("--rows", help="comma-separated rows (2-16): gemm_rows.py's kernel")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_sweep.py needs a CUDA device")
    if args.rows:
        result = main_rows(args.recipe, [int(m) for m in args.rows.split(",")], args.workers)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    if args.fused:
        result = {"device": torch.cuda.get_device_name(0), "fused": sweep_fused(args.recipe)}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    tile_list = tiles(args.quick)
    if args.workers > 1:
        precompile(tile_list, args.workers)
    result = {"device": torch.cuda.get_device_name(0), "hbm": hbm_bandwidth(), "shapes": []}
    print(f"HBM: {result['hbm']}", flush=True)
    for (n, k), names in weight_shapes(args.recipe).items():
        row = sweep(n, k, tile_list)
        torch.cuda.empty_cache()  # the copies of this shape's weight
        row["layers"], row["example"] = len(names), names[0]
        report(f"{n}x{k} ({len(names)} layers)", row)
        result["shapes"].append(row)
    print("TILES = {")
    for row in result["shapes"]:
        print(f"    ({row['shape'][0]}, {row['shape'][1]}): Tile{tuple(row['tiles'][0]['tile'])},")
    print("}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
