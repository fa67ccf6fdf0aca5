"""Load on the generation server over HTTP: concurrent clients, each answer checked against the
same request sent alone, latency percentiles, and the server's memory.

Starts `launchers/serve.py` on a checkpoint (--tiny, the default: a random-weight tiny hybrid it
writes itself, served on CPU) and measures over HTTP:
- ready: seconds from the start of the process to /health answering 200 (it answers 503
  "starting" while the server warms up); first and tenth: the latency of the first request after
  that and of the tenth, the same request sent ten times one after another (a warm server: the
  first within 20% of the tenth);
- alone: each of --distinct requests sent once, one at a time: the reference answers;
- for each N of --clients: N clients at once, each sending one of those requests: a mix of
  `PUT /api`, `POST /v1/completions`, the same streamed, and streams the client drops after
  --cancel-after events (half with a reset, half with a plain close), greedy and seeded
  sampling. Per kind: latency p50/p99; for streams also the time to the first token and the
  per-token latency ((last event - first event) / (tokens - 1); the streams ignore the end of
  document so every one generates --tokens tokens); tokens/s of the whole wave. Every answer
  is compared with the one alone (a dropped stream: what it received is a prefix of it);
  and what the server's own counters (/health) say of the wave: engine steps, host ms per step
  and its share in prefill, prefill passes, mean steps from arrival to first token, HTTP
  threads woken per step, and its decode steps (those without a prefill pass: ms per step,
  tokens/s, in all and at the live batch that decoded the most tokens);
- memory: the server's resident set (VmRSS) and its peak (VmHWM) from /proc before the load and
  after each wave; the largest N runs --waves times, so memory that grows with the number of
  requests shows as growth from one of those waves to the next;
- engine: after the server has exited (the two never share the device), the same checkpoint
  loaded in this process with the server's own flags and code (serve.py's load_model and
  build_engine: dtype, --slots, --max-len, --decode-buckets, warm-up), and its decode step timed
  as benchmarks/decode.py times it (whole engine steps, greedy) at batch N for each N of
  --clients (at most --slots), seated at the context the requests reach (the median prompt's
  tokens + 1), --tokens - 1 steps after 2 warm-up steps. Printed beside each N's HTTP numbers
  (the last wave of N): the per-token latency of its greedy streams (N = 1: of the streams sent
  alone, whose live batch is 1 too), its tokens/s (generated tokens over the wave's wall time,
  prefill and queueing included), and the ratios HTTP/engine of the per-token p50 to the step
  time and of the tokens/s; and, in a second table, the server's decode tokens/s at the live
  batch it decoded most at beside the engine's at that batch (timed too), with their ratio:
  the decode rate without the prefill, queueing and HTTP that the wave's tokens/s include;
  --no-engine skips it;
- long prompt (--long-prompt N): a prompt of N tokens sent alone (its time to first token, and
  the first prefill of that length, untimed otherwise), then --long-streams greedy streams that,
  once each has received --long-before tokens, see the same prompt sent and keep reading until
  --long-after tokens past its first token. The streams' per-token latency (the time between
  events over the tokens they carry) before it was sent, during its admission (the events
  after it was sent up to and including the first one after its first token) and after; its
  time to first token beside the one alone. The server prefills at most --max-prefill-tokens
  prompt positions per step (its own default if not given).

    python benchmarks/serve_load.py                          # tiny model, 1/8/32/64 clients
    python benchmarks/serve_load.py --clients 256 --waves 2 --json load.json
    python benchmarks/serve_load.py --clients 1 --long-prompt 4096 --max-len 4608 \\
        --max-prefill-tokens 512
    python benchmarks/serve_load.py --checkpoint runs/x/checkpoints --device cuda \\
        --dtype bfloat16 --clients 1,8,32,64

Exits 1 when an answer differs from the same request alone (bf16 on GPUs may flip near ties:
--no-check reports without failing).
"""

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("api", "completion", "stream", "cancel")
PROMPTS = ["def main():", "The capital of", "import numpy as np\n", "1, 2, 3,", "# TODO", "x = "]


@dataclass
class Spec:
    """One distinct request: what is sent, and how the client behaves."""

    index: int
    kind: str  # one of KINDS
    sampled: bool
    body: dict[str, Any]

    @property
    def path(self) -> str:
        return "/api" if self.kind == "api" else "/v1/completions"


@dataclass
class Outcome:
    spec: Spec
    status: int = 0
    answer: Any = None  # what must equal the same request alone
    latency: float = 0.0  # seconds, request sent -> answer complete
    first_event: float | None = None  # streams: seconds to the first text
    last_event: float | None = None
    dropped: bool = False  # a cancelling client left before the end
    error: str = ""


def build_specs(count: int, tokens: int, cancel_tokens: int) -> list[Spec]:
    """`count` distinct requests cycling through the kinds, greedy and seeded-sampled."""
    specs = []
    for i in range(count):
        kind, sampled = KINDS[i % len(KINDS)], (i // len(KINDS)) % 2 == 1
        prompt = f"{PROMPTS[i % len(PROMPTS)]} {i}"
        if kind == "api":
            body = {"prompts": [prompt], "tokens_to_generate": tokens, "random_seed": i}
            body |= {"temperature": 0.8, "top_k": 0} if sampled else {"top_k": 1}
        else:
            body = {"prompt": prompt, "max_tokens": tokens, "seed": i, "ignore_eos": True}
            body["temperature"] = 0.8 if sampled else 0.0
            if kind != "completion":
                # logprobs: every token is an event, even one whose text is held back (not yet
                # valid UTF-8), so the per-token latency reads the tokens, not the text.
                body |= {"stream": True, "logprobs": 0}
            if kind == "cancel":  # long enough to be still running when the client leaves
                body["max_tokens"] = cancel_tokens
        specs.append(Spec(i, kind, sampled, body))
    return specs


async def send(port: int, spec: Spec, cancel_after: int | None = None) -> Outcome:
    """One request on its own connection. `cancel_after`: drop a stream after that many events
    (odd specs reset the connection, even ones close it)."""
    out = Outcome(spec)
    data = json.dumps(spec.body).encode()
    method = "PUT" if spec.kind == "api" else "POST"
    head = (
        f"{method} {spec.path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        writer.write(head.encode() + data)
        status_line = await reader.readline()
        out.status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("content-type") != "text/event-stream":
            reply = json.loads(await reader.readexactly(int(headers["content-length"])))
            out.latency = time.perf_counter() - start
            if out.status != 200:
                out.error = json.dumps(reply)[:300]
            elif spec.kind == "api":
                out.answer = [reply["text"][0], reply["tokens"][0]]
            else:
                choice = reply["choices"][0]
                out.answer = [choice["text"], choice["finish_reason"]]
            return out
        text, reason, events = "", None, 0
        while line := await reader.readline():
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                break
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"] or (choice.get("logprobs") or {}).get("tokens"):
                now = time.perf_counter() - start
                out.first_event = now if out.first_event is None else out.first_event
                out.last_event = now
            text += choice["text"]
            reason = choice["finish_reason"] or reason
            events += 1
            if cancel_after is not None and events >= cancel_after:
                out.dropped = True
                if spec.index % 2:  # an RST, as a killed client or a proxy sends
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                break
        out.latency = time.perf_counter() - start
        out.answer = text if out.dropped else [text, reason]
        return out
    except (OSError, ValueError, KeyError, IndexError, asyncio.IncompleteReadError) as e:
        out.error = f"{type(e).__name__}: {e}"
        return out
    finally:
        writer.close()


def equal(outcome: Outcome, alone: Outcome) -> bool:
    if outcome.status != 200 or outcome.error:
        return False
    if outcome.dropped:  # what arrived before the client left is the start of the answer
        return alone.answer[0].startswith(outcome.answer)
    return outcome.answer == alone.answer


async def wave(port: int, specs: list[Spec], clients: int, cancel_after: int) -> list[Outcome]:
    """`clients` clients at once, client i sending specs[i % len(specs)]."""
    chosen = [specs[i % len(specs)] for i in range(clients)]
    return list(
        await asyncio.gather(
            *(send(port, s, cancel_after if s.kind == "cancel" else None) for s in chosen)
        )
    )


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50 and p99 in milliseconds (nearest rank), None without values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {"p50": round(rank(0.50), 2), "p99": round(rank(0.99), 2), "n": len(values)}


def summarize(outcomes: list[Outcome], tokens: int) -> dict[str, Any]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if not o.dropped:
            key = f"{o.spec.kind}/{'sampled' if o.spec.sampled else 'greedy'}"
            groups.setdefault(key, []).append(o)
    out = {"all": {"latency_ms": percentiles([o.latency for o in outcomes if not o.dropped])}}
    for key, group in sorted(groups.items()):
        stats: dict[str, Any] = {"latency_ms": percentiles([o.latency for o in group])}
        if key.startswith("stream"):
            stats["ttft_ms"] = percentiles([o.first_event for o in group if o.first_event])
            stats["per_token_ms"] = percentiles(
                [
                    (o.last_event - o.first_event) / (tokens - 1)
                    for o in group
                    if o.first_event is not None and o.last_event is not None and tokens > 1
                ]
            )
        out[key] = stats
    return out


def resources(pid: int) -> dict[str, float]:
    """The process's resident set and its peak so far (MiB), threads and open files (Linux)."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "peak_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def settle(
    pid: int, port: int, threads: int | None = None, timeout: float = 60
) -> tuple[dict[str, Any], dict[str, float]]:
    """Wait until the engine is idle (dropped streams cancelled, slots freed) and the
    connection threads have ended: at most `threads` left (None: the same count twice in a
    row); at most `timeout` seconds. The engine's counters and the process's resources."""
    deadline, last = time.monotonic() + timeout, -1
    while True:
        r = resources(pid)  # before asking /health: its own thread is not counted
        h = health(port)
        idle = not h["active"] and not h["waiting"]
        if idle and r["threads"] <= (last if threads is None else threads):
            return h, r
        if time.monotonic() > deadline:
            return h, r
        last = r["threads"]
        time.sleep(0.05)


def server_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the server's /health counters say of a wave (their growth from `before` to
    `after`): engine steps, host ms per step and the share of it in prefill, prefill passes
    through the model, the mean steps from a request's arrival at the engine to its first
    token, and HTTP threads woken per step. Empty for a server without these counters."""
    keys = ("steps", "step_seconds", "prefill_seconds", "prefill_passes", "first_tokens")
    keys += ("first_token_steps", "wakes")
    if not all(k in before and k in after for k in keys):
        return {}
    d = {k: after[k] - before[k] for k in keys}
    steps, first = max(d["steps"], 1), max(d["first_tokens"], 1)
    return {
        "steps": d["steps"],
        "host_ms_per_step": round(1000 * d["step_seconds"] / steps, 3),
        "prefill_share": round(d["prefill_seconds"] / max(d["step_seconds"], 1e-9), 3),
        "prefill_passes": d["prefill_passes"],
        "first_tokens": d["first_tokens"],
        "steps_to_first_token": round(d["first_token_steps"] / first, 2),
        "wakes_per_step": round(d["wakes"] / steps, 2),
    } | decode_counters(before, after)


def decode_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The wave's decode steps (no prefill pass; their time includes the engine loop between
    steps): in all, and at the live batch that decoded the most tokens (the batch the engine
    alone is timed at beside it). Empty for a server without these counters."""
    if "decode_by_batch" not in after:
        return {}
    out: dict[str, Any] = {"decode": rate(before, after, "decode_")}
    by_batch = {}
    for batch, d in after["decode_by_batch"].items():
        since = before["decode_by_batch"].get(batch, dict.fromkeys(d, 0))
        if d["steps"] > since["steps"]:
            by_batch[int(batch)] = rate(since, d)
    out["decode_by_batch"] = dict(sorted(by_batch.items()))
    if by_batch:
        batch = max(by_batch, key=lambda b: (by_batch[b]["tokens"], b))
        out["decode_batch"] = {"batch": batch} | by_batch[batch]
    return out


def rate(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Steps, tokens, ms per step and tokens/s from counters `steps`, `seconds`, `tokens`."""
    steps, tokens, seconds = (
        after[prefix + k] - before[prefix + k] for k in ("steps", "tokens", "seconds")
    )
    return {
        "steps": steps,
        "tokens": tokens,
        "ms_per_step": round(1000 * seconds / max(steps, 1), 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }


def format_counters(c: dict[str, Any]) -> str:
    line = (
        f"{c['steps']} steps at {c['host_ms_per_step']} ms ({100 * c['prefill_share']:.0f}% "
        f"prefill, {c['prefill_passes']} passes), {c['steps_to_first_token']} steps to the first "
        f"token (mean of {c['first_tokens']}), {c['wakes_per_step']} HTTP threads woken per step"
    )
    if "decode" in c:
        d = c["decode"]
        line += (
            f"; {d['steps']} decode steps at {d['ms_per_step']} ms, {d['tokens_per_s']} tokens/s"
        )
    if "decode_batch" in c:
        b = c["decode_batch"]
        line += f" (at batch {b['batch']}: {b['steps']} at {b['ms_per_step']} ms)"
    return line


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as reply:
        return json.loads(reply.read())


def tiny_checkpoint(directory: Path, overrides: list[str]) -> Path:
    """A random-weight checkpoint of the tiny hybrid recipe."""
    import torch

    from toolkit.build import build_model, save_model_checkpoint
    from toolkit.config import load_recipe
    from toolkit.tokenizer import build_tokenizer

    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml", overrides)
    torch.manual_seed(0)
    model = build_model(recipe, build_tokenizer(recipe.data.tokenizer))
    return save_model_checkpoint(directory, model, recipe)


def serve_flags(checkpoint: Path, args: argparse.Namespace) -> list[str]:
    """serve.py's flags: the server runs with them, the engine measured alone is built from them."""
    flags = ["--checkpoint", str(checkpoint), "--device", args.device, "--dtype", args.dtype]
    flags += ["--slots", str(args.slots), "--max-len", str(args.max_len)]
    if args.decode_buckets:
        flags += ["--decode-buckets", args.decode_buckets]
    if args.max_prefill_tokens:
        flags += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
    if args.stream_wakes is not None:
        flags += ["--stream-wakes", str(args.stream_wakes)]
    return flags


def start_server(checkpoint: Path, args: argparse.Namespace, log: Path) -> tuple:
    """(process, port, seconds to ready)."""
    from toolkit.distributed import free_port

    port = free_port()
    cmd = [sys.executable, str(ROOT / "launchers/serve.py"), *serve_flags(checkpoint, args)]
    cmd += ["--port", str(port)]
    env = os.environ | {"TOOLKIT_SERVE_TOKEN": ""}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    while True:
        if proc.poll() is not None or time.perf_counter() - start > args.start_timeout:
            proc.kill()
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
        try:
            health(port)
            return proc, port, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the module docstring lists, as a dictionary (what --json writes)."""
    specs = build_specs(args.distinct, args.tokens, args.cancel_tokens)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"config": config}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as scratch:
        checkpoint = args.checkpoint or tiny_checkpoint(Path(scratch) / "ckpt", args.set)
        log = args.log or Path(scratch) / "server.log"
        proc, port, ready = start_server(Path(checkpoint), args, log)
        try:
            results |= measure(proc.pid, port, specs, args)
            results["ready_s"] = round(ready, 3)
            if args.long_prompt:
                results["long_prompt"] = long_prompt(port, Path(checkpoint), args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        text = log.read_text()
        results["server_log"] = {"tracebacks": text.count("Traceback"), "lines": text.count("\n")}
        if not args.no_engine:  # the server has exited: the device is the engine's alone
            results["engine_decode"] = engine_decode(
                Path(checkpoint), args, specs, results["waves"]
            )
    results["comparison"] = compare(results, args)
    return results


ENGINE_WARMUP = 2  # untimed engine steps before the timed ones


def engine_decode(
    checkpoint: Path, args: argparse.Namespace, specs: list[Spec], results_waves: list[dict]
) -> dict[str, Any]:
    """The engine's decode step in this process, built by serve.py's own code from the server's
    flags, timed by benchmarks/decode.py's `measure` at each batch the waves had (at most
    --slots) and at the live batch each wave decoded at most, greedy, at the context the
    requests reach."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))  # decode.py imports its sibling decode_profile
    from decode import measure, release_memory

    from toolkit.cli import serve

    if args.threads:  # the server's OMP_NUM_THREADS
        torch.set_num_threads(args.threads)
    flags = serve.parse_args(serve_flags(checkpoint, args))
    model, recipe, tokenizer, _ = serve.load_model(flags, None)
    engine = serve.build_engine(flags, model, recipe, tokenizer, None, warm=False)
    device = engine.device
    # The server's warm-up of the decode step (every graph before timing); its prefill shapes
    # are no part of a decode step.
    engine.warm_up(None if device.type == "cuda" else 1, prefill=False)
    prompts = [s.body["prompts"][0] if s.kind == "api" else s.body["prompt"] for s in specs]
    lengths = sorted(len(tokenizer.encode(p)) for p in prompts)
    steps = args.tokens - 1  # the decode steps a stream's per-token latency spans
    # A stream's decode steps start after its prompt and first token (occupy needs the room).
    context = lengths[len(lengths) // 2] + 1
    context = max(1, min(context, engine.max_len - ENGINE_WARMUP - steps - 1))
    out: dict[str, Any] = {"context": context, "steps": steps, "warmup": ENGINE_WARMUP}
    out["batches"] = []
    try:
        for batch in engine_batches(results_waves, args):
            row: dict[str, Any] = {"batch": batch}
            try:
                mean, _ = measure(engine, batch, context, steps, ENGINE_WARMUP)
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
            else:
                row |= {"ms_per_step": round(1e3 * mean, 3), "tokens_per_s": round(batch / mean, 1)}
            out["batches"].append(row)
        if engine.decoder is not None and engine.decoder.error:
            out["cuda_graph_error"] = engine.decoder.error[:500]
    finally:
        engine = model = None  # the engine and its graph decoder refer to each other: gc frees them
        release_memory(device)
    return out


def engine_batches(waves: list[dict[str, Any]], args: argparse.Namespace) -> list[int]:
    """The batches the engine alone is timed at: each N of --clients (at most --slots) and
    the live batch at which each wave decoded the most tokens."""
    batches = {min(n, args.slots) for n in args.clients}
    batches |= {
        w["server"]["decode_batch"]["batch"] for w in waves if "decode_batch" in w["server"]
    }
    return sorted(batches)


def compare(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per N of --clients: the last wave of N over HTTP beside the engine at batch N."""
    engine = {r["batch"]: r for r in results.get("engine_decode", {}).get("batches", [])}
    rows = []
    for clients in dict.fromkeys(args.clients):
        wave = [w for w in results["waves"] if w["clients"] == clients][-1]
        streams, source = wave.get("stream/greedy"), "wave"
        if streams is None and clients == 1:  # a wave of 1 sends no stream; alone, each did
            streams, source = results["alone"].get("stream/greedy"), "alone"
        per_token = streams["per_token_ms"] if streams else None
        step = engine.get(min(clients, args.slots), {})
        ms, tps = step.get("ms_per_step"), step.get("tokens_per_s")
        rows.append(
            {
                "clients": clients,
                "http_per_token_ms": per_token,
                "per_token_from": source,
                "http_tokens_per_s": wave["tokens_per_s"],
                "engine_batch": step.get("batch"),
                "engine_ms_per_step": ms,
                "engine_tokens_per_s": tps,
                # > 1: HTTP slower than the engine alone
                "per_token_ratio": round(per_token["p50"] / ms, 2) if per_token and ms else None,
                # < 1: HTTP delivers less than the engine alone
                "tokens_per_s_ratio": round(wave["tokens_per_s"] / tps, 2) if tps else None,
            }
            | decode_comparison(wave["server"].get("decode_batch"), engine)
        )
    return rows


def decode_comparison(server: dict[str, Any] | None, engine: dict[int, dict]) -> dict[str, Any]:
    """The server's decode steps at the live batch it decoded most at, beside the engine's
    own steps at that batch: the issue's "at 64 concurrent, >= 95% of the engine's tokens/s"
    read without the prefill, queueing and HTTP that the wave's tokens/s include."""
    if server is None:
        return {}
    alone = engine.get(server["batch"], {})
    ratio = None
    if server["tokens_per_s"] and alone.get("tokens_per_s"):
        ratio = round(server["tokens_per_s"] / alone["tokens_per_s"], 3)
    return {
        "decode_batch": server["batch"],
        "server_decode_steps": server["steps"],
        "server_decode_ms_per_step": server["ms_per_step"],
        "server_decode_tokens_per_s": server["tokens_per_s"],
        "engine_decode_tokens_per_s": alone.get("tokens_per_s"),
        "decode_ratio": ratio,  # < 1: the server's decode steps slower than the engine's
    }


def print_comparison(rows: list[dict[str, Any]]) -> None:
    def num(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    print(
        f"{'clients':>7} | {'HTTP ms/token p50 / p99':>23} | {'HTTP tokens/s':>13} | "
        f"{'engine ms/step':>14} | {'engine tokens/s':>15} | {'HTTP/engine ms, tokens/s':>24}"
    )
    for r in rows:
        pt = r["http_per_token_ms"] or {}
        http = f"{num(pt.get('p50'))} / {num(pt.get('p99'))}"
        if r["per_token_from"] == "alone":
            http = "(alone) " + http
        ratios = f"{num(r['per_token_ratio'])}, {num(r['tokens_per_s_ratio'])}"
        batch = "" if r["engine_batch"] is None else f" @{r['engine_batch']}"
        print(
            f"{r['clients']:>7} | {http:>23} | {num(r['http_tokens_per_s'], '.1f'):>13} | "
            f"{num(r['engine_ms_per_step']) + batch:>14} | "
            f"{num(r['engine_tokens_per_s'], '.1f'):>15} | {ratios:>24}"
        )
    print(
        f"{'clients':>7} : {'server decode batch, steps':>26} : {'server decode tokens/s':>22} "
        f": {'engine tokens/s':>15} : {'server/engine':>13}"
    )
    for r in rows:
        if "decode_batch" not in r:
            continue
        steps = f"{r['decode_batch']}, {r['server_decode_steps']}"
        print(
            f"{r['clients']:>7} : {steps:>26} : {num(r['server_decode_tokens_per_s'], '.1f'):>22} "
            f": {num(r['engine_decode_tokens_per_s'], '.1f'):>15} : {num(r['decode_ratio'], '.3f'):>13}"
        )


def checkpoint_tokenizer(checkpoint: Path) -> Any:
    """The tokenizer of a checkpoint's recipe, without loading the model."""
    from toolkit.build import tokenizer_from_recipe
    from toolkit.checkpoint.store import read_metadata, resolve_checkpoint
    from toolkit.config import recipe_from_dict

    recipe = recipe_from_dict(read_metadata(resolve_checkpoint(checkpoint))["recipe"])
    return tokenizer_from_recipe(recipe)


def text_of_tokens(tokenizer: Any, count: int) -> tuple[str, int]:
    """Text that encodes to about `count` tokens (exactly, for most tokenizers), and its count."""
    # About `count` entries of a few tokens each (2 at least, with any tokenizer): enough.
    ids = tokenizer.encode(" ".join(f"{w} {i}" for i, w in enumerate(PROMPTS * (count // 6 + 1))))
    n = count
    for _ in range(8):  # decode and encode need not round-trip: trim until they do
        text = tokenizer.decode(ids[:n])
        got = len(tokenizer.encode(text))
        if got <= count:
            break
        n -= got - count
    return text, got


async def stream_events(
    port: int,
    body: dict[str, Any],
    events: list[tuple[float, int]],
    leave: asyncio.Event,
    progress: asyncio.Event,
) -> str:
    """A streamed completion with logprobs (so every event says how many tokens it carries):
    (perf_counter time, tokens) per event into `events`, until the end or until `leave` is set;
    sets `progress` at each event and at the end. Returns why it stopped: "left", "ended" or
    an error."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        writer.write(head.encode() + data)
        status = int((await reader.readline()).split()[1])
        if status != 200:
            return f"HTTP {status}: {(await reader.read(300)).decode(errors='replace')}"
        while line := await reader.readline():
            if leave.is_set():
                return "left"
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens = len((choice.get("logprobs") or {}).get("tokens") or [])
            if tokens:
                events.append((time.perf_counter(), tokens))
                progress.set()
        return "ended"
    except (OSError, ValueError, KeyError, IndexError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        writer.transport.abort()  # the server cancels the request and frees its slot
        progress.set()


def long_prompt(port: int, checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The --long-prompt scenario of the module docstring."""
    tokenizer = checkpoint_tokenizer(checkpoint)
    text, count = text_of_tokens(tokenizer, args.long_prompt)
    body = {"prompt": text, "max_tokens": 1, "temperature": 0.0, "stream": True}
    body["logprobs"] = 0
    alone = asyncio.run(send(port, Spec(-1, "stream", False, body)))
    if alone.status != 200 or alone.first_event is None:
        raise RuntimeError(f"the long prompt alone failed: {alone.status} {alone.error}")
    out: dict[str, Any] = {"tokens": count, "streams": args.long_streams}
    out["ttft_alone_ms"] = round(1000 * alone.first_event, 2)
    out |= asyncio.run(long_prompt_while_streaming(port, tokenizer, body, args))
    print(
        f"long prompt of {count} tokens: first token in {out['ttft_ms']} ms "
        f"({out['ttft_alone_ms']} ms alone); {args.long_streams} running streams, ms per token "
        f"p50/p99 before {fmt(out['per_token_ms']['before'])}, during its admission "
        f"{fmt(out['per_token_ms']['during'])} (longest gap {out['longest_gap_during_ms']} ms), "
        f"after {fmt(out['per_token_ms']['after'])}",
        flush=True,
    )
    return out


def fmt(p: dict[str, float] | None) -> str:
    return "-" if p is None else f"{p['p50']}/{p['p99']}"


async def long_prompt_while_streaming(
    port: int, tokenizer: Any, long_body: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    events: list[list[tuple[float, int]]] = [[] for _ in range(args.long_streams)]
    leave, progress = asyncio.Event(), asyncio.Event()
    tasks = []
    for i in range(args.long_streams):
        prompt = f"{PROMPTS[i % len(PROMPTS)]} {i}"
        room = args.max_len - len(tokenizer.encode(prompt)) - 1
        body = {"prompt": prompt, "max_tokens": room, "temperature": 0.0, "ignore_eos": True}
        body |= {"stream": True, "logprobs": 0}
        task = stream_events(port, body, events[i], leave, progress)
        tasks.append(asyncio.create_task(task))

    async def until_each_has(tokens: int, since: float = 0.0) -> None:
        """Until every stream has received `tokens` since `since`, or one has stopped."""
        while not any(t.done() for t in tasks) and any(
            sum(n for t, n in stream if t > since) < tokens for stream in events
        ):
            progress.clear()
            await progress.wait()

    await until_each_has(args.long_before)
    sent = time.perf_counter()
    outcome = await send(port, Spec(-1, "stream", False, long_body))
    first = None if outcome.first_event is None else sent + outcome.first_event
    if first is not None:
        await until_each_has(args.long_after, first)
    leave.set()
    stopped = await asyncio.gather(*tasks)
    if first is None or any(s != "left" for s in stopped):
        raise RuntimeError(
            f"long prompt: {outcome.status} {outcome.error}; streams: {sorted(set(stopped))}"
        )
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    longest = 0.0
    started = max(stream[0][0] for stream in events)  # every stream runs: no more admissions
    for stream in events:
        for (t0, _), (t1, n) in zip(stream, stream[1:]):
            if t1 <= sent:
                if t0 < started:
                    continue
                phase = "before"
            elif t0 < first:  # the gap overlaps the admission (the first after it included)
                phase = "during"
                longest = max(longest, t1 - t0)
            else:
                phase = "after"
            phases[phase] += [(t1 - t0) / n] * n
    return {
        "ttft_ms": round(1000 * outcome.first_event, 2),
        "per_token_ms": {k: percentiles(v) for k, v in phases.items()},
        "longest_gap_during_ms": round(1000 * longest, 2),
    }


def measure(pid: int, port: int, specs: list[Spec], args: argparse.Namespace) -> dict[str, Any]:
    # The same request ten times in a row: what the first pays that the tenth does not is
    # warm-up the server left undone.
    ten = [asyncio.run(send(port, specs[0])).latency for _ in range(10)]
    results: dict[str, Any] = {"first_request_ms": round(1000 * ten[0], 2)}
    results["tenth_request_ms"] = round(1000 * ten[9], 2)
    results["first_over_tenth"] = round(ten[0] / ten[9], 2)
    start = time.perf_counter()
    alone = [asyncio.run(send(port, s)) for s in specs]  # one at a time
    failed = [f"{o.spec.index}: {o.status} {o.error}" for o in alone if o.status != 200 or o.error]
    if failed:
        raise RuntimeError(f"requests alone failed: {failed[:5]}")
    results["alone"] = {"requests": len(specs), "seconds": round(time.perf_counter() - start, 3)}
    results["alone"] |= summarize(alone, args.tokens)
    _, before = settle(pid, port)
    results["memory"] = {"before": before, "after_wave": []}
    results["waves"], mismatches = [], []
    counts = list(args.clients[:-1]) + [args.clients[-1]] * args.waves
    for clients in counts:
        h0 = health(port)
        start = time.perf_counter()
        outcomes = asyncio.run(wave(port, specs, clients, args.cancel_after))
        seconds = time.perf_counter() - start
        generated = health(port)["generated_tokens"] - h0["generated_tokens"]
        wrong = [o for o in outcomes if not equal(o, alone[o.spec.index])]
        mismatches += [
            {"clients": clients, "spec": o.spec.index, "kind": o.spec.kind, "status": o.status}
            | {"error": o.error, "got": o.answer, "alone": alone[o.spec.index].answer}
            for o in wrong
        ]
        h, after = settle(pid, port, before["threads"])
        results["memory"]["after_wave"].append({"clients": clients} | after)
        results["waves"].append(
            {
                "clients": clients,
                "seconds": round(seconds, 3),
                "dropped": sum(o.dropped for o in outcomes),
                "mismatches": len(wrong),
                "generated_tokens": generated,
                "tokens_per_s": round(generated / seconds, 1),
                "server": server_counters(h0, h),
            }
            | summarize(outcomes, args.tokens)
        )
        w = results["waves"][-1]
        print(
            f"{clients:4d} clients: {seconds:6.2f} s, {w['tokens_per_s']:8.1f} tokens/s, "
            f"latency p50 {w['all']['latency_ms']['p50']:8.1f} ms p99 "
            f"{w['all']['latency_ms']['p99']:8.1f} ms, {w['dropped']} dropped, "
            f"{len(wrong)} not equal to alone; then {results['memory']['after_wave'][-1]}",
            flush=True,
        )
        if w["server"]:
            print(f"{'':14}server: {format_counters(w['server'])}", flush=True)
    results["engine"] = {k: h[k] for k in ("active", "waiting", "finished", "cancelled")}
    last = results["memory"]["after_wave"][-args.waves :]
    results["memory"]["growth_last_waves_mib"] = round(last[-1]["rss_mib"] - last[0]["rss_mib"], 1)
    results["mismatches"] = mismatches
    results["equal"] = not mismatches
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/serve_load.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="serve this checkpoint (root or step)")
    which.add_argument(
        "--tiny",
        action="store_true",
        help="serve a random-weight tiny hybrid written to a temporary directory (the default)",
    )
    p.add_argument("--set", action="append", default=[], help="--tiny recipe override key=value")
    p.add_argument("--clients", default="1,8,32,64", help="comma-separated concurrent clients")
    p.add_argument("--waves", type=int, default=2, help="waves at the largest --clients")
    p.add_argument("--distinct", type=int, default=64, help="distinct requests (sent alone once)")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--cancel-tokens", type=int, default=64, help="max_tokens of dropped streams")
    p.add_argument("--cancel-after", type=int, default=2, help="events a dropping client reads")
    p.add_argument("--slots", type=int, default=64, help="the server's --slots")
    p.add_argument("--max-len", type=int, default=512, help="the server's --max-len")
    p.add_argument("--decode-buckets", help="the server's --decode-buckets (default: its own)")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        help="the server's --max-prefill-tokens (default: its own)",
    )
    p.add_argument(
        "--stream-wakes", type=int, help="the server's --stream-wakes (default: its own)"
    )
    p.add_argument(
        "--long-prompt",
        type=int,
        default=0,
        metavar="N",
        help="also send an N-token prompt while --long-streams streams decode (0: off)",
    )
    p.add_argument("--long-streams", type=int, default=8, help="streams running meanwhile")
    p.add_argument(
        "--long-before", type=int, default=16, help="tokens each stream reads before it is sent"
    )
    p.add_argument(
        "--long-after", type=int, default=16, help="tokens each stream reads after its first"
    )
    p.add_argument("--device", default="cpu", help="the server's --device")
    p.add_argument("--dtype", default="float32", help="the server's --dtype")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server")
    p.add_argument(
        "--start-timeout", type=float, default=900, help="seconds for the server to load"
    )
    p.add_argument("--log", type=Path, help="keep the server's log here")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--no-check", action="store_true", help="report mismatches, exit 0 anyway")
    p.add_argument(
        "--no-engine",
        action="store_true",
        help="skip timing the engine's decode step in this process after the server exits",
    )
    args = p.parse_args(argv)
    args.tiny = args.checkpoint is None
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients must be whole numbers separated by commas, not {args.clients!r}")
    if min(args.clients) < 1 or args.waves < 1 or args.distinct < len(KINDS) or args.tokens < 2:
        p.error("--clients and --waves >= 1, --distinct >= 4, --tokens >= 2")
    if args.cancel_tokens + 16 > args.max_len or args.cancel_after < 1:
        p.error("--cancel-tokens must leave room for a prompt under --max-len; --cancel-after >= 1")
    if args.max_prefill_tokens is not None and args.max_prefill_tokens < 1:
        p.error("--max-prefill-tokens must be >= 1")
    if args.long_prompt:
        if args.long_prompt < 0 or args.long_prompt + 1 > args.max_len:
            p.error(f"--long-prompt must lie in [1, {args.max_len - 1}] (raise --max-len)")
        if not 1 <= args.long_streams < args.slots:
            p.error("--long-streams must be >= 1 and leave a slot free (--slots)")
        if min(args.long_before, args.long_after) < 2:
            p.error("--long-before and --long-after must be >= 2")
        if args.long_before + args.long_after + 256 > args.max_len:
            p.error("--max-len must leave the streams room for --long-before + --long-after")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(
        f"ready {results['ready_s']} s, first request {results['first_request_ms']} ms, "
        f"tenth {results['tenth_request_ms']} ms (first/tenth {results['first_over_tenth']}), "
        f"{results['alone']['requests']} requests alone in {results['alone']['seconds']} s; "
        f"RSS growth over the last {args.waves} waves "
        f"{results['memory']['growth_last_waves_mib']} MiB; "
        f"{len(results['mismatches'])} answers not equal to alone"
    )
    for m in results["mismatches"][:5]:
        print(f"  not equal: {m}")
    print_comparison(results["comparison"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if results["mismatches"] and not args.no_check else 0


if __name__ == "__main__":
    sys.exit(main())
