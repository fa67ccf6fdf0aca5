"""Tensor-parallel serving against one device: `serve.py --tp N` and `--tp 1` on the same
checkpoint, the same greedy requests, their texts compared and their speed measured.

Writes a random-weight checkpoint of the recipe (in --dtype), then runs each server in turn (NCCL
between GPUs with --device cuda, gloo on CPUs): a set of greedy requests whose texts must agree
(a TP split sums in another order, so a near tie may still flip a token: the report says where),
then, per batch size, one request of that many prompts generating --tokens tokens each, timed
end to end over HTTP (tokens per second, prefill of the short prompts included).

    python benchmarks/tp_serve.py --recipe recipes/8b_hybrid.toml --tp 2 --device cuda \\
        --dtype bfloat16 --json tp.json
    python benchmarks/tp_serve.py --recipe recipes/tiny_hybrid.toml --tp 2 --device cpu \\
        --dtype float32 --tokens 16 --batches 1,2        # a laptop, in seconds
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from toolkit.build import build_model, save_model_checkpoint
from toolkit.checkpoint import latest_checkpoint
from toolkit.config import load_recipe
from toolkit.distributed import free_port
from toolkit.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def main():", "The capital of", "import numpy as np\n", "1, 2, 3,", "# TODO", "x = "]


def request(port: int, body: dict, timeout: float = 600) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read())


def serve(checkpoint: Path, tp: int, args: argparse.Namespace, log: Path) -> tuple:
    """Start a server; (process, port) once it answers."""
    port = free_port()
    address = log.with_suffix(".address")
    cmd = [sys.executable, str(ROOT / "launchers/serve.py"), "--checkpoint", str(checkpoint)]
    cmd += ["--port", str(port), "--tp", str(tp), "--device", args.device]
    cmd += ["--dtype", args.dtype, "--slots", str(max(args.batches))]
    cmd += ["--address-file", str(address)] + (["--no-cuda-graphs"] if args.no_cuda_graphs else [])
    if tp > 1 and args.tp_cuda_graphs:
        cmd.append("--tp-cuda-graphs")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + args.start_timeout
    while not (address.exists() and ready(port)):  # listening, then warm (200)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the --tp {tp} server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, port


def ready(port: int) -> bool:
    """/health answers 200 (503 "starting" while the server warms up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as reply:
            return reply.status == 200
    except OSError:  # HTTPError 503 included
        return False


def measure(port: int, args: argparse.Namespace) -> dict:
    greedy = {"prompts": PROMPTS, "tokens_to_generate": args.tokens, "top_k": 1}
    texts = request(port, greedy)["text"]
    speed = {}
    for batch in args.batches:
        body = {"prompts": (PROMPTS * batch)[:batch], "tokens_to_generate": args.tokens}
        body["top_k"] = 1
        request(port, body | {"tokens_to_generate": 2})  # warm-up: graphs, kernels
        start = time.perf_counter()
        request(port, body)
        seconds = time.perf_counter() - start
        speed[batch] = {"seconds": seconds, "tokens_per_s": batch * args.tokens / seconds}
    return {"texts": texts, "speed": speed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/tp_serve.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--recipe", default=str(ROOT / "recipes/tiny_hybrid.toml"))
    p.add_argument("--set", action="append", default=[], help="recipe override key=value")
    p.add_argument("--tp", type=int, default=2, help="ranks of the split server")
    p.add_argument("--device", default="cuda", help="cuda (one GPU per rank) or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--batches", default="1,8", help="comma-separated prompts per timed request")
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="the --tp 1 server decodes eagerly too (as TP ranks do by default)",
    )
    p.add_argument(
        "--tp-cuda-graphs",
        action="store_true",
        help="the TP server records its decode steps, collectives inside, as CUDA graphs",
    )
    p.add_argument("--start-timeout", type=float, default=900, help="seconds for a server to load")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="write the random checkpoint here, or use the one already there (default: a "
        "temporary directory); its recipe must be --recipe's",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.tp < 2 or not args.batches or min(args.batches) < 1 or args.tokens < 1:
        p.error("--tp >= 2, --tokens >= 1 and batch sizes >= 1")

    recipe = load_recipe(args.recipe, args.set)
    results: dict = {"recipe": recipe.name, "tp": args.tp, "device": args.device}
    results |= {"dtype": args.dtype, "tokens": args.tokens, "eager": args.no_cuda_graphs}
    results["tp_cuda_graphs"] = args.tp_cuda_graphs
    with tempfile.TemporaryDirectory(prefix="tp_serve_") as scratch:
        scratch = Path(scratch)
        root = args.checkpoint_dir or scratch / "ckpt"
        checkpoint = latest_checkpoint(root)
        if checkpoint is None:
            torch.manual_seed(0)
            tokenizer = build_tokenizer(recipe.data.tokenizer)
            model = build_model(recipe, tokenizer, dtype=getattr(torch, args.dtype))
            checkpoint = save_model_checkpoint(root, model, recipe)
            del model
        for tp in (1, args.tp):
            proc, port = serve(checkpoint, tp, args, scratch / f"tp{tp}.log")
            try:
                results[f"tp{tp}"] = measure(port, args)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
            for batch, s in results[f"tp{tp}"]["speed"].items():
                print(f"--tp {tp}: batch {batch}: {s['tokens_per_s']:.1f} tokens/s")
    one, split = results["tp1"]["texts"], results[f"tp{args.tp}"]["texts"]
    results["same_texts"] = sum(a == b for a, b in zip(one, split))
    results["first_difference"] = [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a != b
        else None
        for a, b in zip(one, split)
    ]
    print(f"same greedy texts: {results['same_texts']} of {len(one)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
