"""The server's host work per decode step, on a CPU, against a simulated GPU.

A GPU hides the host's work per step only while that work (the engine thread's and, through
the GIL, the HTTP threads') fits inside the device's step. Here the decode step's forward is
replaced by a simulated device: each launch returns fixed logits at once and occupies the
"device" for --device-ms (at batch 64; --device-ms-1 at batch 1, linear between), and reading
the sampled tokens back waits (sleeping, as a CUDA event's wait releases the GIL) until the
device is done. Prefill runs the real tiny model on the CPU. Everything else is the real
engine (overlap on), the real server and real HTTP clients (in a subprocess).

It prints, for the engine alone (`Engine.run`) and for the server over HTTP with the same
requests: decode steps and their mean period (ms; the device's step when the host keeps up),
the engine thread's CPU and the other threads' CPU per step, HTTP threads woken per step,
and the engine thread's parts per step (wall / CPU ms), with the streams' HTTP threads' work
once woken ("http: ...", summed over the threads). --stream-wakes sets the server's budget of
stream wakes per step. A second wave of the same requests is
measured, after a first that sees every shape.

    python benchmarks/serve_host.py --clients 64 --kind stream
    python benchmarks/serve_host.py --clients 64 --kind mixed --tokens 128
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from toolkit.inference import engine as engine_module  # noqa: E402
from toolkit.inference import server as server_module  # noqa: E402

CLIENTS = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[5])
import serve_load
port, n, kind, tokens = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
specs = serve_load.build_specs(64, tokens, tokens)
specs = [s for s in specs if kind == "mixed" or s.kind == kind]
out = asyncio.run(serve_load.wave(port, specs, n, 2))
print(json.dumps([o.error or o.status for o in out if o.status != 200 or o.error][:3]))
"""


class Timers:
    """Wall and CPU seconds per named part of the engine thread."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kw: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                self.wall[name] += time.perf_counter() - wall
                self.cpu[name] += time.thread_time() - cpu

        return timed

    def per_step(self, steps: int) -> dict[str, str]:
        order = sorted(self.wall, key=lambda k: -self.wall[k])
        return {
            k: f"{1e3 * self.wall[k] / steps:.3f} / {1e3 * self.cpu[k] / steps:.3f}" for k in order
        }


class SimulatedDevice:
    """The decode forward as a device that takes `ms(rows)` per step, run asynchronously."""

    def __init__(self, engine: Any, ms_1: float, ms_64: float) -> None:
        self.free_at = 0.0
        self.ms = lambda rows: ms_1 + (ms_64 - ms_1) * (rows - 1) / 63
        generator = torch.Generator().manual_seed(0)
        vocab = engine.model.vocab_size
        logits = torch.randn(engine.slots, vocab, generator=generator)
        logits[:, engine.tokenizer.eod] = -1e9  # the same lengths as over a real model
        decoder = engine.decoder

        def step(rows: int, span: int) -> torch.Tensor:
            self.free_at = max(time.perf_counter(), self.free_at) + self.ms(rows) / 1e3
            return logits[:rows]

        decoder._step = step

    def copy_to_host(self, picked: list) -> tuple[list, Any]:
        return picked, Ready(self.free_at)  # once the device has run what is queued now


class Ready:
    """A CUDA event's stand-in: waiting for it sleeps until the device gets there."""

    def __init__(self, at: float) -> None:
        self.at = at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.at - time.perf_counter()))


def build(args: argparse.Namespace, timers: Timers) -> Any:
    from toolkit.build import build_model
    from toolkit.config import load_recipe
    from toolkit.inference.engine import Engine
    from toolkit.tokenizer import build_tokenizer

    recipe = load_recipe(
        ROOT / "recipes/tiny_hybrid.toml", ["model.hidden_size=64", "model.seq_length=1024"]
    )
    torch.manual_seed(0)
    tokenizer = build_tokenizer(recipe.data.tokenizer)
    model = build_model(recipe, tokenizer).float().eval()
    engine = Engine(model, tokenizer, slots=64, max_len=1024, cuda_graphs=True, overlap=True)
    device = SimulatedDevice(engine, args.device_ms_1, args.device_ms)
    engine_module.copy_to_host = device.copy_to_host
    for name in ("_drop_cancelled", "_compact", "_launch", "_apply", "_admit_and_sample"):
        setattr(engine, name, timers.wrap(name, getattr(engine, name)))
    engine_module.pick = timers.wrap("pick", engine_module.pick)
    engine_module.read_copy = timers.wrap(
        "read_copy (waits for the device)", engine_module.read_copy
    )
    engine_module.finish_reason = timers.wrap("finish_reason", engine_module.finish_reason)
    if hasattr(server_module, "Updates"):  # the HTTP threads' wake-up, on the engine thread
        server_module.Updates.__call__ = timers.wrap("wake", server_module.Updates.__call__)
    else:  # before the Updates class
        server_module._wake = timers.wrap("wake", server_module._wake)
    return engine


def requests(engine: Any, args: argparse.Namespace) -> list:
    """The clients' requests, parsed as the server parses them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_load

    from toolkit.inference import api

    limits = api.Limits(max_len=engine.max_len)
    specs = serve_load.build_specs(64, args.tokens, args.tokens)
    specs = [s for s in specs if args.kind == "mixed" or s.kind == args.kind]
    out = []
    for i in range(args.clients):
        s = specs[i % len(specs)]
        if s.kind == "api":
            out += api.parse_megatron(s.body, engine.tokenizer, limits)
        else:
            out += api.parse_completion(s.body, engine.tokenizer, limits).requests
    return out


def report(name: str, engine: Any, before: dict, cpu: tuple, wakes: int, timers: Timers) -> dict:
    stats = {k: engine.stats[k] - before[k] for k in engine.stats}
    steps = max(stats["decode_steps"], 1)
    out = {
        "run": name,
        "steps": stats["steps"],
        "decode_steps": stats["decode_steps"],
        "decode_ms_per_step": round(1e3 * stats["decode_seconds"] / steps, 3),
        "decode_tokens_per_step": round(stats["decode_tokens"] / steps, 1),
        "engine_thread_cpu_ms_per_step": round(1e3 * cpu[0] / stats["steps"], 3),
        "other_threads_cpu_ms_per_step": round(1e3 * cpu[1] / stats["steps"], 3),
        "wakes_per_step": round(wakes / stats["steps"], 2),
        "parts_ms_per_step (wall / cpu)": timers.per_step(stats["steps"]),
    }
    print(json.dumps(out, indent=1), flush=True)
    return out


def alone(args: argparse.Namespace) -> dict:
    timers = Timers()
    engine = build(args, timers)
    engine.warm_up(1)
    engine.run(requests(engine, args))  # a first wave: every shape seen once
    timers.__init__()
    before, cpu = dict(engine.stats), time.thread_time()
    engine.run(requests(engine, args))
    return report("engine alone", engine, before, (time.thread_time() - cpu, 0.0), 0, timers)


def served(args: argparse.Namespace) -> dict:
    from toolkit.inference.server import GenerationServer

    timers = Timers()
    engine = build(args, timers)
    # The streams' HTTP threads, woken: an event's text and fields, and its write (summed over
    # the threads, so wall time includes their waits for the GIL).
    handler = server_module.Handler
    handler._stream_news = timers.wrap("http: a stream's news", handler._stream_news)
    handler._event = timers.wrap("http: an event's write (in news)", handler._event)
    server = GenerationServer(
        ("127.0.0.1", 0),
        engine,
        warm_up=lambda: engine.warm_up(1),
        **({} if args.stream_wakes is None else {"stream_wakes": args.stream_wakes}),
    )
    thread = server.engine_thread
    ident: list[int] = []
    run = thread.run
    thread.run = lambda: (ident.append(threading.get_ident()), run())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    assert thread.ready.wait(300)
    port = server.server_address[1]

    def engine_cpu() -> float:
        return time.clock_gettime(time.pthread_getcpuclockid(ident[0]))

    cmd = [sys.executable, "-c", CLIENTS, str(port), str(args.clients), args.kind]
    cmd += [str(args.tokens), str(ROOT / "benchmarks")]
    out = {}
    for wave in range(2):  # the first: every shape seen once
        timers.__init__()
        before, wakes = dict(engine.stats), server.wakes
        e0, p0 = engine_cpu(), time.process_time()
        clients = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        while engine.has_work() or not thread.inbox.empty():
            time.sleep(0.01)
        e1, p1 = engine_cpu(), time.process_time()
        if clients.stdout.strip() != "[]":
            raise RuntimeError(f"clients failed: {clients.stdout[-500:]} {clients.stderr[-2000:]}")
        if wave:
            cpu = (e1 - e0, (p1 - p0) - (e1 - e0))
            out = report("server", engine, before, cpu, server.wakes - wakes, timers)
    server.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--kind", default="stream", choices=["api", "completion", "stream", "mixed"])
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--device-ms", type=float, default=9.17, help="a decode step at batch 64")
    p.add_argument("--device-ms-1", type=float, default=4.73, help="a decode step at batch 1")
    p.add_argument("--stream-wakes", type=int, help="the server's stream_wakes (none: its default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {"config": vars(args) | {"json": None}, "alone": alone(args), "server": served(args)}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
