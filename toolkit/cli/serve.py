"""Serve a checkpoint over HTTP: PUT /api (the reference's API), POST /v1/completions and POST
/v1/chat/completions (OpenAI style, also at /completions and /chat/completions as Megatron's
server has them; `stream: true` for server-sent events), GET /health.

    python launchers/serve.py --checkpoint runs/tiny_hybrid/checkpoints [--port 5000]

Binds 127.0.0.1 unless --host says otherwise. With --token (or the TOOLKIT_SERVE_TOKEN
environment variable) every generation request needs `Authorization: Bearer TOKEN`.
"""

import argparse
import logging
import os
import signal
import sys
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolkit.config import Recipe
    from toolkit.inference.chat_template import ChatTemplate
    from toolkit.inference.engine import Engine
    from toolkit.model import HybridLM

TOKEN_ENV = "TOOLKIT_SERVE_TOKEN"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """How the engine decodes: slots, lengths, prefill budget, CUDA graphs, state dtype."""
    p.add_argument("--slots", type=int, default=64, help="requests decoded together at most")
    p.add_argument(
        "--max-len", type=int, help="prompt + generation limit (none: the recipe's seq_length)"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=8192,
        help="prompt tokens prefilled per step; a longer prompt takes several steps, the running "
        "requests decoding meanwhile",
    )
    p.add_argument("--prefill-chunk", type=int, default=2048, help="longest prompt piece per pass")
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="decode eagerly on GPUs (default: CUDA graphs at static shapes; off with --tp > 1)",
    )
    p.add_argument(
        "--decode-buckets",
        help="comma-separated live-batch sizes the decode step runs at, each step the smallest "
        "that holds the running requests, all recorded before the server says ready (default: "
        "powers of two below --slots, and --slots)",
    )
    p.add_argument(
        "--ssm-state-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the Mamba recurrent state kept per request while decoding: bfloat16 halves what "
        "each step reads and writes for it (as mamba-ssm's generation), float32 is exact",
    )
    p.add_argument(
        "--tp-cuda-graphs",
        action="store_true",
        help="with --tp, record the decode step with its collectives as CUDA graphs too "
        "(tested on CPU, not yet measured on GPUs)",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,  # unset: the engine decides (on with CUDA graphs)
        help="with CUDA graphs, launch each decode step before the host reads the last one's "
        "tokens, so the GPU does not wait for the host between steps (default: on with CUDA "
        "graphs, off with --tp)",
    )


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ranges argparse cannot state; --decode-buckets parsed into a list of ints."""
    for name in ("slots", "max_prefill_tokens", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tp < 1:
        p.error("--tp must be >= 1")
    if args.stream_wakes < 0:
        p.error("--stream-wakes must be >= 0 (0: every stream at every step)")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in [0, 65535] (0: any free port)")
    if args.max_len is not None and args.max_len < 2:
        p.error("--max-len must be >= 2")
    if args.decode_buckets is not None:
        try:
            args.decode_buckets = [int(n) for n in args.decode_buckets.split(",")]
        except ValueError:
            p.error("--decode-buckets takes comma-separated integers, e.g. 1,4,16")
        if not all(1 <= n <= args.slots for n in args.decode_buckets):
            p.error(f"--decode-buckets must lie in [1, {args.slots}] (--slots)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python launchers/serve.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint root or one step directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--token", help=f"require this bearer token (none given: ${TOKEN_ENV}, if set)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPUs")
    add_engine_arguments(p)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--log-prompts", action="store_true", help="log prompt text with each request")
    p.add_argument(
        "--chat-template",
        default="auto",
        metavar="auto|none|PATH",
        help="the chat endpoint's prompt: a Jinja chat template file (rendered in a sandbox, "
        "its turn ending at the eos and end tokens of chat_template.json beside it); auto: the one "
        "beside the checkpoint's tokenizer file, which checkpoints_tools/import_hf.py copies "
        "from an instruct model, if any; none (or no file): Megatron's template for "
        "pretrained models",
    )
    p.add_argument(
        "--stream-wakes",
        type=int,
        default=8,
        help="streams' threads woken per decode step, at most about: with more streams getting "
        "tokens, each gets them every ceil(streams / N) steps, several to an event (each wake "
        "takes the GIL from the engine thread); a stream alone gets every token at once; 0: "
        "every stream at every step",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks, one per GPU of this node (gloo on CPUs); started here, or "
        "one task each under srun/torchrun",
    )
    p.add_argument(
        "--address-file",
        metavar="PATH",
        help="once listening, write the reachable host and port here as JSON (removed on exit); "
        "launchers/serve_slurm.py sets it",
    )
    args = p.parse_args(argv)
    check_arguments(p, args)
    return args


def load_model(
    args: argparse.Namespace, argv: list[str] | None
) -> tuple["HybridLM", "Recipe", Any, Any]:
    """The model (whole, or this rank's TP shard), its recipe and tokenizer, the ranks (None at
    TP=1); the model in the serving dtype. Exit-2 errors raise as they are."""
    import torch

    from toolkit.build import model_from_checkpoint, resolve_device
    from toolkit.inference import tp_serving

    ranks = None  # TP > 1: this process's place among the ranks
    device = resolve_device(args.device, "--device")
    if args.tp == 1:
        model, recipe, tokenizer = model_from_checkpoint(args.checkpoint, device)
    else:
        args_given = sys.argv[1:] if argv is None else argv
        command = [sys.executable, "-m", "toolkit.cli.serve", *args_given]
        ranks = tp_serving.start(args.tp, device, command)
        device = ranks.env.device
        model, recipe, tokenizer = model_from_checkpoint(args.checkpoint, env=ranks.env)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return model.to(getattr(torch, dtype)), recipe, tokenizer, ranks


def build_engine(
    args: argparse.Namespace,
    model: "HybridLM",
    recipe: "Recipe",
    tokenizer: Any,
    ranks: Any,
    warm: bool = True,
) -> "Engine":
    """The engine (TP: each rank's), warmed up (`warm_up`) unless `warm` is false (the server
    warms it once it listens)."""
    import torch

    from toolkit.inference import tp_serving
    from toolkit.inference.engine import Engine, memory_bytes

    max_len = args.max_len or recipe.model.seq_length
    log.info(
        "%s: %s, %d slots x %d tokens of decode state (%.1f MiB)",
        recipe.name,
        str(next(model.parameters()).dtype).removeprefix("torch."),
        args.slots,
        max_len,
        memory_bytes(model, args.slots, max_len) / 2**20,
    )
    engine_class = Engine if ranks is None else partial(tp_serving.TPEngine, ranks=ranks)
    engine = engine_class(
        model,
        tokenizer,
        slots=args.slots,
        max_len=max_len,
        max_prefill_tokens=args.max_prefill_tokens,
        prefill_chunk=args.prefill_chunk,
        # TP ranks decode eagerly unless asked: graphs with NCCL collectives inside are new here.
        cuda_graphs=False
        if args.no_cuda_graphs or (ranks is not None and not args.tp_cuda_graphs)
        else (None if ranks is None else True),
        overlap=getattr(args, "overlap", None),
        ssm_state_dtype=getattr(torch, args.ssm_state_dtype),
        decode_buckets=args.decode_buckets,
    )
    if warm:
        warm_up(engine, ranks)
    return engine


def warm_up(engine: "Engine", ranks: Any) -> dict[str, Any]:
    """Record every decode graph and tune the kernels requests use (Engine.warm_up), timed and
    logged. Under TP every rank runs it (the collectives inside pair up) and the ranks then
    exchange what each did, so that the leader says ready only once every rank is warm.
    Returns this rank's numbers."""
    import time

    import torch.distributed as dist

    start = time.perf_counter()
    # Every attention span where CUDA graphs are recorded; on CPUs nothing is recorded or
    # tuned, so the first span shows the path works without the others' cost.
    steps = engine.warm_up(None if engine.device.type == "cuda" else 1)
    decoder = engine.decoder
    done = {
        "rank": 0 if ranks is None else ranks.env.rank,
        "seconds": round(time.perf_counter() - start, 2),
        "decode_steps": steps,
        "batch_buckets": decoder.buckets if decoder is not None else None,
        "cuda_graphs": len(decoder.graphs) if decoder is not None else 0,
    }
    everyone = [done]
    if ranks is not None:
        everyone = [None] * ranks.tp
        dist.all_gather_object(everyone, done, group=ranks.events)
    if ranks is None or ranks.leader:
        decode = "eager decode, no graphs"
        if decoder is not None:
            decode = (
                f"{steps} decode steps over batch buckets {decoder.buckets}, "
                f"{done['cuda_graphs']} CUDA graphs recorded"
            )
        ranks_warm = ""
        if ranks is not None:
            times = ", ".join(f"rank {d['rank']} {d['seconds']:.2f} s" for d in everyone)
            ranks_warm = f"; every rank warm: {times}"
        log.info(
            "warm-up took %.2f s (%s; prefill and sampling run)%s; ready",
            done["seconds"],
            decode,
            ranks_warm,
        )
    return done


def serve(
    args: argparse.Namespace,
    engine: "Engine",
    recipe: "Recipe",
    ranks: Any,
    chat_template: "ChatTemplate | None" = None,
) -> int:
    """Listen and answer until SIGTERM or Ctrl-C (the TP leader, or the only rank)."""
    from toolkit.inference import tp_serving
    from toolkit.inference.server import GenerationServer

    server_class = GenerationServer if ranks is None else tp_serving.TPGenerationServer
    try:
        server = server_class(
            (args.host, args.port),
            engine,
            model_name=recipe.name,
            token=args.token or os.environ.get(TOKEN_ENV) or None,
            max_body_bytes=args.max_body_bytes,
            log_prompts=args.log_prompts,
            stream_wakes=args.stream_wakes,
            warm_up=partial(warm_up, engine, ranks),
            chat_template=chat_template,
        )
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    # SIGTERM (Slurm, docker stop) ends the server like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.server_address[:2]
    log.info(
        "serving on http://%s:%d (token %s); warming up: /health answers 503 until ready",
        host,
        port,
        "required" if server.token else "off",
    )
    if args.address_file:
        write_address(Path(args.address_file), host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if args.address_file:
            Path(args.address_file).unlink(missing_ok=True)  # a stale address misleads
    if server.engine_thread.failed:
        print(f"error: {server.engine_thread.failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # oneDNN (CPU convolutions: the Mamba prefill's conv1d) keeps a compiled primitive per input
    # shape, up to 1,024 of them, and prefill shapes change with every batch of prompts: a CPU
    # server grew by ~400 MiB over its first thousand requests. A few dozen cover the shapes
    # that recur. Set before torch loads oneDNN.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    from toolkit.checkpoint import CheckpointError
    from toolkit.config import RecipeError
    from toolkit.inference import tp_serving
    from toolkit.inference.chat_template import ChatTemplateError

    try:
        model, recipe, tokenizer, ranks = load_model(args, argv)
        chat_template = load_chat(args.chat_template, tokenizer)
    except (CheckpointError, FileNotFoundError, RuntimeError, RecipeError, ChatTemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The server listens first and answers 503 "starting" while its engine thread warms up.
    engine = build_engine(args, model, recipe, tokenizer, ranks, warm=False)
    if ranks is not None and not ranks.leader:
        warm_up(engine, ranks)
        return tp_serving.follow(engine)
    return serve(args, engine, recipe, ranks, chat_template)


def load_chat(given: str, tokenizer: Any) -> "ChatTemplate | None":
    """--chat-template: the template the chat endpoint renders, or None for Megatron's
    template for pretrained models; logged. ChatTemplateError names the file."""
    from toolkit.inference.chat_template import chat_template_for

    template = chat_template_for(given, tokenizer)
    if template is None:
        log.info("chat template: Megatron's for pretrained models (--chat-template %s)", given)
        return None
    end = ", ".join(tokenizer.token_string(i) for i in sorted(template.end_ids))
    log.info("chat template: %s (rendered in a sandbox; a turn ends at %s)", template.path, end)
    return template


def write_address(path: Path, host: str, port: int) -> None:
    """Where clients reach this server, for whoever started it elsewhere (a Slurm job)."""
    import json
    import socket

    if host in ("0.0.0.0", "::", ""):  # every interface: the node's name reaches one of them
        host = socket.gethostname()
    info = {"host": host, "port": port, "url": f"http://{host}:{port}", "pid": os.getpid()}
    info["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, path)  # readers never see half a file
    log.info("address written to %s", path)


log = logging.getLogger("serve")

if __name__ == "__main__":
    sys.exit(main())
