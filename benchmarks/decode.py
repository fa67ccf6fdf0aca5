"""Decode speed of the inference engine with random weights at a recipe's shapes.

For each recipe, context length and batch size: the engine's slots are filled as if every row
had a prompt of `context` tokens (the KV cache holds that many positions, the Mamba state is a
fixed size anyway), then whole engine steps are timed: one token per row, sampling and
bookkeeping included. Reports per-token latency, throughput, and at batch 1 the weight bytes
read per second (the memory-bandwidth roofline of decode: compare with the device's HBM speed).
Combinations that do not fit in memory are reported as OOM and skipped. On CUDA the engine
decodes through CUDA graphs unless --no-cuda-graphs. --mamba-ssm-reference also times
mamba-ssm's own CUDA-graph decode (MambaLMHeadModel, Mamba2 layers, random weights) at the
same shape, for recipes made of Mamba-2 blocks only. --sampling times the same engine steps
with each named sampling setting (SAMPLING) and prints each one's overhead over greedy.

    python benchmarks/decode.py --recipe recipes/8b_hybrid.toml --recipe recipes/8b_gpt3.toml \\
        --contexts 4096,32768 --batches 1,32,64 --device cuda --dtype bfloat16
    python benchmarks/decode.py --recipe recipes/tiny_hybrid.toml --contexts 64 --batches 1,4 \\
        --steps 5 --device cpu --dtype float32          # runs on a laptop in seconds
    python benchmarks/decode.py --recipe recipes/8b_hybrid.toml --contexts 4096 --batches 32 \
        --sampling greedy,temperature,topk,topp,seeded,logprobs --device cuda
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from decode_profile import hbm_bandwidth  # benchmarks/, this script's folder

from toolkit.build import build_model, resolve_device
from toolkit.config import Recipe, RecipeError, load_recipe
from toolkit.inference.engine import Engine, Request, memory_bytes
from toolkit.model import count_parameters
from toolkit.tokenizer import build_tokenizer

# --sampling's settings, every request alike (seeded: each its own seed).
SAMPLING = {
    "greedy": {},
    "temperature": dict(temperature=0.8),
    "topk": dict(temperature=0.8, top_k=50),
    "topp": dict(temperature=0.8, top_p=0.95),
    "seeded": dict(temperature=0.8, top_p=0.95, seed=...),
    "logprobs": dict(temperature=1.0, logprobs=True, top_logprobs=5),
}


def measure(
    engine: Engine, batch: int, context: int, steps: int, warmup: int, sampling: str = "greedy"
) -> tuple[float, float]:
    """(seconds per step, seconds per step's standard deviation) over `steps` engine steps,
    every request with the `sampling` setting. Timed as a run (one sync before, one after), not
    step by step: with --overlap a step's GPU work runs on into the next step."""
    setting = SAMPLING[sampling]
    requests = [
        Request(
            prompt=[0],
            max_new_tokens=warmup + steps + 1,
            stop_at_eod=False,
            **setting | ({"seed": i} if "seed" in setting else {}),
        )
        for i in range(batch)
    ]
    engine.occupy(requests, context)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        engine.step()
    sync()
    marks = [time.perf_counter()]
    for _ in range(steps):
        engine.step()
        marks.append(time.perf_counter())
    sync()
    marks[-1] = time.perf_counter()
    times = [b - a for a, b in zip(marks, marks[1:])]
    for r in requests:
        r.cancel()
    engine.step()  # frees the slots
    mean = sum(times) / len(times)
    std = (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5
    return mean, std


def release_memory(device: torch.device) -> None:
    """Free what dropped engines and models held (they refer to each other: gc first)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill_engine(model: torch.nn.Module, context: int, **kwargs) -> Engine:
    """An engine for one prompt of `context` tokens and its first token (kwargs: the engine's,
    e.g. prefill_chunk). One token: no decode step, so no decode graphs to record."""
    return Engine(
        model, build_tokenizer("byte"), slots=1, max_len=context + 2, cuda_graphs=False, **kwargs
    )


def first_token_seconds(engine: Engine, prompt: list[int]) -> float:
    """Seconds from `prompt`'s arrival to its first token, one request alone: the chunked scan
    and attention over the prompt, then one sample."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    engine.run([Request(prompt=prompt, max_new_tokens=1)])
    sync()
    return time.perf_counter() - start


def measure_prefill(model: torch.nn.Module, context: int) -> float:
    """first_token_seconds of a `context`-token prompt, after a warm-up at the same length (the
    kernels' autotuning depends on the shapes)."""
    engine = prefill_engine(model, context)
    prompt = torch.randint(0, model.vocab_size, (context,)).tolist()
    first_token_seconds(engine, prompt)
    return first_token_seconds(engine, prompt)


def measure_mamba_ssm(
    recipe: Recipe, vocab: int, batch: int, steps: int, warmup: int, dtype: torch.dtype
) -> tuple[float, float]:
    """mamba-ssm's generation loop at the recipe's shape: its CUDA-graph decode step (the one
    `generate(..., cg=True)` replays) plus a greedy pick read on the host, like an engine step.
    A Mamba-2 state does not grow with the context, so no context is needed."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import update_graph_cache

    m = recipe.model
    config = MambaConfig(
        d_model=m.hidden_size,
        d_intermediate=0,  # no MLP
        n_layer=m.num_layers,
        vocab_size=vocab,
        ssm_cfg=dict(
            layer="Mamba2",
            d_state=m.mamba_state_dim,
            headdim=m.mamba_head_dim,
            ngroups=m.mamba_num_groups,
            expand=m.mamba_expand,
            d_conv=m.mamba_conv_kernel,
            chunk_size=m.mamba_chunk_size,
        ),
        rms_norm=True,
        tie_embeddings=False,  # as ours: the output layer is read at every step
        pad_vocab_size_multiple=8,
    )
    model = MambaLMHeadModel(config, device="cuda", dtype=dtype).eval()
    cache = None
    try:
        with torch.inference_mode():  # its cache is made of inference tensors
            cache = update_graph_cache(model, None, batch, 1, warmup + steps + 2, dtype=dtype)
            ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
            positions = torch.zeros_like(ids)
            times = []
            for i in range(warmup + steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                logits = cache.run(ids, positions + 1 + i, 1 + i)
                picked = logits[:, -1].argmax(-1)
                picked.tolist()  # the host reads the tokens, as the engine's sampling does
                times.append(time.perf_counter() - start)
                ids = picked[:, None]
    finally:
        del model, cache
        gc.collect()  # the graphs hold the model's memory pool
        torch.cuda.empty_cache()
    times = times[warmup:]
    mean = sum(times) / len(times)
    return mean, (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def samplings(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in SAMPLING]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose among {','.join(SAMPLING)}")
    return ["greedy"] + [v for v in names if v != "greedy"]  # greedy first: the baseline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/decode.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--recipe", action="append", required=True, help="recipe file (repeatable)")
    p.add_argument("--set", action="append", default=[], help="recipe override key=value")
    p.add_argument("--contexts", type=ints, default=[4096, 32768], help="comma-separated tokens")
    p.add_argument("--batches", type=ints, default=[1, 32, 64], help="comma-separated sizes")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA (default: graphs)"
    )
    p.add_argument(
        "--ssm-state-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the engine's Mamba recurrent state while decoding (mamba-ssm's keeps bf16)",
    )
    p.add_argument(
        "--prefill",
        action="store_true",
        help="also time the first token of one prompt of each context length (prefill)",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each decode step before the host reads the last one's tokens (default: on "
        "with CUDA graphs, as the engine)",
    )
    p.add_argument(
        "--slots",
        type=int,
        help="the engine's slots (default: the batch): a batch below them decodes at the "
        "smallest of the engine's batch buckets that holds it, as a server's live batch does",
    )
    p.add_argument(
        "--decode-buckets",
        type=ints,
        help="comma-separated batch sizes the engine decodes at (default: the engine's, powers "
        "of two up to the slots; e.g. the slot count alone to decode every slot at each step)",
    )
    p.add_argument(
        "--sampling",
        type=samplings,
        help=f"comma-separated sampling settings to time at each point ({','.join(SAMPLING)}), "
        "each with its overhead over greedy",
    )
    p.add_argument(
        "--mamba-ssm-reference",
        action="store_true",
        help="also time mamba-ssm's own decode at pure Mamba-2 recipes' shapes (CUDA)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or not args.contexts or not args.batches:
        p.error("--steps >= 1, --warmup >= 0, and at least one context and batch size")
    if args.slots is not None and not 1 <= max(args.batches) <= args.slots:
        p.error("--slots must hold the largest of --batches")
    if args.decode_buckets and not (
        args.slots and all(1 <= n <= args.slots for n in args.decode_buckets)
    ):
        p.error("--decode-buckets needs --slots, and sizes in [1, --slots]")
    device = resolve_device(args.device)
    if args.mamba_ssm_reference and device.type != "cuda":
        p.error("--mamba-ssm-reference needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    cuda_graphs = device.type == "cuda" and not args.no_cuda_graphs
    results = []

    def save(row: dict) -> None:  # written at once: a crash later keeps what was measured
        results.append(row)
        if args.json:
            meta = {"device": str(device), "dtype": args.dtype}
            args.json.write_text(json.dumps(meta | {"results": results}, indent=1))

    ssm_dtype = getattr(torch, args.ssm_state_dtype)
    # The roofline's denominator, measured in this run: a bf16 sum reading 4 GiB.
    hbm = hbm_bandwidth()["sum_read_gb_per_s"] if device.type == "cuda" else None
    print(f"device {device}, {args.dtype}, CUDA graphs {'on' if cuda_graphs else 'off'}")
    if hbm:
        print(f"HBM read bandwidth {hbm:.0f} GB/s (bf16 sum over 4 GiB)")
    print(
        f"{'recipe':<16}{'context':>9}{'batch':>7}{'ms/token':>10}{'tokens/s':>12}"
        f"{'weights GB/s':>14}" + (f"{'roofline':>10}" if hbm else "")
    )
    for path in args.recipe:
        try:
            recipe = load_recipe(path, args.set)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        torch.manual_seed(0)
        model = build_model(recipe, build_tokenizer(recipe.data.tokenizer), device, dtype).eval()
        # Bytes a decode step reads: every weight but the embedding (one row per token).
        weight_bytes = (
            count_parameters(model)["total"] - model.embedding.weight.numel()
        ) * dtype.itemsize
        for context in args.contexts:
            for batch in args.batches:
                row = {"recipe": recipe.name, "context": context, "batch": batch}
                row["cuda_graphs"] = cuda_graphs
                if args.sampling:
                    row["sampling"] = "greedy"
                # A multiple of 256: the attention span of a graph never ends at an odd size.
                max_len = -(-(context + args.warmup + args.steps + 2) // 256) * 256
                slots = args.slots or batch
                row["slots"] = slots
                row["state_bytes"] = memory_bytes(model, slots, max_len, ssm_dtype)
                row["ssm_state_dtype"] = args.ssm_state_dtype
                try:
                    engine = Engine(
                        model,
                        build_tokenizer("byte"),
                        slots=slots,
                        max_len=max_len,
                        cuda_graphs=cuda_graphs,
                        overlap=args.overlap,
                        ssm_state_dtype=ssm_dtype,
                        decode_buckets=args.decode_buckets,
                    )
                    row["overlap"] = engine.overlap
                    mean, std = measure(engine, batch, context, args.steps, args.warmup)
                    sampled = {  # the same engine and shapes: only the sampling differs
                        name: measure(engine, batch, context, args.steps, args.warmup, name)
                        for name in (args.sampling or [])[1:]
                    }
                    if engine.decoder is not None and engine.decoder.error:
                        row["cuda_graph_error"] = engine.decoder.error[:500]
                except torch.OutOfMemoryError:
                    row["error"] = "OOM"
                    print(f"{recipe.name:<16}{context:>9}{batch:>7}{'OOM':>10}")
                    save(row)
                    continue
                finally:
                    engine = None  # it and its graph decoder refer to each other: gc frees them
                    release_memory(device)
                row |= {
                    "ms_per_step": 1e3 * mean,
                    "ms_std": 1e3 * std,
                    "tokens_per_s": batch / mean,
                }
                row["weights_gb_per_s"] = weight_bytes / mean / 1e9
                if hbm:  # batch 1's roofline: weight bytes over the measured read bandwidth
                    row["hbm_read_gb_per_s"] = hbm
                    row["of_hbm_roofline"] = row["weights_gb_per_s"] / hbm
                save(row)
                print(
                    f"{recipe.name:<16}{context:>9}{batch:>7}{1e3 * mean:>10.2f}"
                    f"{batch / mean:>12.1f}{weight_bytes / mean / 1e9:>14.1f}"
                    + (f"{row['of_hbm_roofline']:>10.1%}" if hbm else "")
                )
                for name, (s_mean, s_std) in sampled.items():
                    overhead = s_mean / mean - 1
                    save(
                        {k: row[k] for k in ("recipe", "context", "batch", "slots")}
                        | {"sampling": name, "ms_per_step": 1e3 * s_mean, "ms_std": 1e3 * s_std}
                        | {"tokens_per_s": batch / s_mean, "overhead_vs_greedy": overhead}
                    )
                    print(
                        f"{'  ' + name:<16}{context:>9}{batch:>7}{1e3 * s_mean:>10.2f}"
                        f"{batch / s_mean:>12.1f}  {overhead:+.1%} over greedy"
                    )
        for context in args.contexts if args.prefill else []:
            row = {"recipe": recipe.name, "impl": "prefill", "context": context, "batch": 1}
            try:
                seconds = measure_prefill(model, context)
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
                print(f"{recipe.name:<16}{context:>9}{'prefill OOM':>17}")
                save(row)
                continue
            finally:
                release_memory(device)
            row |= {"prefill_s": seconds, "prefill_tokens_per_s": context / seconds}
            save(row)
            print(
                f"{recipe.name:<16}{context:>9}  prefill {seconds:.3f} s, "
                f"{context / seconds:.0f} tokens/s"
            )
        vocab, pure_mamba = model.padded_vocab_size, set(model.layout.pattern) == {"M"}
        del model
        release_memory(device)
        if args.mamba_ssm_reference and pure_mamba:
            for batch in args.batches:
                row = {"recipe": recipe.name, "impl": "mamba_ssm", "context": None, "batch": batch}
                try:
                    mean, std = measure_mamba_ssm(
                        recipe, vocab, batch, args.steps, args.warmup, dtype
                    )
                except Exception as e:  # noqa: BLE001 - report (OOM, missing package) and go on
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    print(f"{'mamba-ssm':<16}{'-':>9}{batch:>7}  {row['error'][:80]}")
                    save(row)
                    continue
                row |= {"ms_per_step": 1e3 * mean, "ms_std": 1e3 * std}
                row |= {"tokens_per_s": batch / mean, "weights_gb_per_s": weight_bytes / mean / 1e9}
                save(row)
                print(
                    f"{'mamba-ssm':<16}{'-':>9}{batch:>7}{1e3 * mean:>10.2f}"
                    f"{batch / mean:>12.1f}{weight_bytes / mean / 1e9:>14.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
