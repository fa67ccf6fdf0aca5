"""Tensor-parallel serving as real processes on CPU: `serve.py --tp 2` (two ranks over gloo)
answers exactly like the engine alone, for hybrid and Transformer models, under concurrent
clients and a client that disconnects mid-stream, and stops every rank on SIGTERM or Ctrl-C."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_engine import one_thread  # noqa: F401 (autouse fixture)
from tests.test_server import Server, reference_runner, same
from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint
from toolkit.config import load_recipe
from toolkit.distributed import free_port
from toolkit.inference import tp_serving
from toolkit.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "hybrid": ["model.hidden_size=64"],  # Mamba-2, attention and MLP blocks
    "transformer": [
        "model.hidden_size=64",
        "model.num_layers=4",
        "model.att_ratio=0.5",
        "model.mlp_ratio=0.5",
    ],
}
BODIES = [
    ("/api", {"prompts": ["def f(x):", "import"], "tokens_to_generate": 12, "top_k": 1}),
    (
        "/api",
        {
            "prompts": ["class A", "x = [", "# a"],
            "tokens_to_generate": 10,
            "temperature": 0.9,
            "top_p": 0.9,
            "random_seed": 7,
            "logprobs": True,
        },
    ),
    (
        "/v1/completions",
        {"prompt": "for i in", "max_tokens": 9, "temperature": 1.2, "top_k": 5, "seed": 3},
    ),
    (
        "/v1/completions",
        {"prompt": ["if x", "while"], "max_tokens": 8, "temperature": 0, "logprobs": 2},
    ),
]


def _as_from_a_terminal() -> None:
    # A job started in the background by a shell (`make test &`) inherits SIGINT ignored; a
    # terminal's foreground job has it: so does the server, whoever started the tests.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class TPServer(Server):
    """A server in its own session, so that a test can signal the whole group like a terminal."""

    def __init__(self, checkpoint: Path, log: Path, *args: str) -> None:
        popen = subprocess.Popen
        subprocess.Popen = lambda *a, **kw: popen(
            *a, **kw, start_new_session=True, preexec_fn=_as_from_a_terminal
        )
        try:
            super().__init__(checkpoint, log, "--slots", "4", *args)
        finally:
            subprocess.Popen = popen

    def ranks(self) -> list[int]:
        """Process ids of this server's other ranks (its children running toolkit.cli.serve)."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and b"toolkit.cli.serve" in cmdline:
                out.append(int(stat.parent.name))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                super().stop()
            finally:  # a stuck rank must not outlive the test run
                if self.proc.poll() is None:
                    os.killpg(self.proc.pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def make_checkpoint(root: Path, overrides: list[str]) -> Path:
    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml", overrides)
    torch.manual_seed(0)
    return save_model_checkpoint(root, build_model(recipe, build_tokenizer("byte")), recipe)


served_models: dict[int, torch.nn.Module] = {}  # port -> the model alone, in float64


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    """(TP=2 server, the engine alone) for one model."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = make_checkpoint(root / "ckpt", MODELS[request.param])
    server = TPServer(checkpoint, root / "server.log", "--tp", "2")
    model, _, tokenizer = model_from_checkpoint(str(checkpoint))
    model = model.double()
    served_models[server.port] = model
    yield server, reference_runner(model, tokenizer)
    server.stop()


def call(server: Server, path: str, body: dict) -> dict:
    status, reply = server.call("PUT" if path == "/api" else "POST", path, body)
    assert status == 200, reply
    return reply


def test_two_ranks_serve_like_the_engine_alone(served):
    server, reference = served
    (rank,) = server.ranks()  # rank 1 runs in its own process
    assert alive(rank)
    assert "loaded TP shard 0/2" in server.log.read_text()
    for path, body in BODIES:
        same(call(server, path, body), reference(path, body))


def test_concurrent_clients_each_get_their_own_answer(served):
    server, reference = served
    bodies = [
        (
            "/v1/completions",
            {"prompt": "ab" * (i + 1), "max_tokens": 6 + i, "temperature": 0.8, "seed": i},
        )
        if i % 2
        else ("/api", {"prompts": [f"n{i} = "], "tokens_to_generate": 5 + i, "random_seed": i})
        for i in range(10)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: call(server, *b), bodies))
    for (path, body), reply in zip(bodies, replies, strict=True):
        same(reply, reference(path, body))


def test_cancelled_stream_is_dropped_on_every_rank(served):
    """The leader decides cancellations for all ranks; a rank that kept the request would run
    a different batch and the next collective would fail or answer wrongly."""
    server, reference = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
        body = b'{"prompt": "stream", "max_tokens": 2000, "stream": true, "seed": 1}'
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: " not in received:  # the first tokens arrived: the request runs
            chunk = conn.recv(4096)
            assert chunk, received
            received += chunk
    deadline = time.monotonic() + 60
    while server.health()["cancelled"] < 1:
        assert time.monotonic() < deadline, "the stream was never cancelled"
        time.sleep(0.2)
    for path, body in BODIES[:2]:
        same(call(server, path, body), reference(path, body))
    assert server.health()["active"] == 0


def test_unseeded_sampling_is_one_consistent_draw(served):
    """Without a seed each rank would draw its own tokens: they would feed the shards different
    inputs and end requests at different steps (stop strings), and the ranks' batches would part.
    The leader draws the seed for all: every answer is a continuation that the model alone scores
    exactly as reported."""
    server, _ = served
    body = {
        "prompts": ["seedless", "x", "abc = 1", "#"],
        "tokens_to_generate": 48,
        "temperature": 100.0,  # near-uniform draws: ranks with their own seeds would differ
        "stop_strings": list("etaoinshrd"),
        "logprobs": True,
    }
    reply = call(server, "/api", body)
    model = served_models[server.port]
    for tokens, reported in zip(reply["tokens"], reply["logprobs"], strict=True):
        tokens = torch.tensor(tokens)
        with torch.no_grad():
            logprobs = model(tokens[None, :-1])[0, :, : model.vocab_size].log_softmax(-1)
        scored = logprobs.gather(-1, tokens[1:, None]).squeeze(-1)
        assert reported == pytest.approx(scored.tolist())


def shard_worker(rank: int, world: int, port: int, checkpoint: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = tp_serving.start(world, torch.device("cpu"), [])
    shard, _, _ = model_from_checkpoint(checkpoint, env=ranks.env)
    full, _, _ = model_from_checkpoint(checkpoint)
    whole = dict(full.named_parameters())
    vocab = full.vocab_size
    for name, param in shard.named_parameters():
        if not hasattr(param, "_tp_dim"):  # norms: replicated
            torch.testing.assert_close(param, whole[name], rtol=0, atol=0)
            continue
        dim, index = param._tp_dim, param._tp_index
        assert param.shape[dim] < whole[name].shape[dim], name  # a slice, not the whole
        value = param.detach()
        if name in ("embedding.weight", "output_layer.weight"):
            # padding rows (past the real vocabulary) are not stored: zeros here
            assert not value[index >= vocab].any(), name
            value, index = value[index < vocab], index[index < vocab]
        expected = whole[name].detach().index_select(dim, index)
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    tokens = ranks.broadcast(torch.randint(0, vocab, (2, 9)))
    with torch.no_grad():
        local = shard(tokens)
        expected = full(tokens)[..., rank * local.size(-1) : (rank + 1) * local.size(-1)]
    torch.testing.assert_close(local[..., : expected.size(-1)], expected, rtol=1e-5, atol=1e-6)
    ranks.close()


@pytest.mark.parametrize("model", list(MODELS))
def test_each_rank_loads_its_slice_of_the_checkpoint(tmp_path, model):
    """Built on the meta device, sharded, then filled from the checkpoint: every parameter is
    this rank's slice of the model alone, and the shards' logits are the model's."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", MODELS[model])
    mp.spawn(shard_worker, args=(2, free_port(), str(checkpoint)), nprocs=2, join=True)


def stop_and_check(server: TPServer, how: str) -> None:
    ranks = server.ranks()
    assert len(ranks) == 1
    if how == "ctrl-c":  # the terminal signals the whole foreground group
        os.killpg(server.proc.pid, signal.SIGINT)
    elif how == "group-sigterm":  # `timeout`, or a container runtime
        os.killpg(server.proc.pid, signal.SIGTERM)
    else:
        server.proc.terminate()
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, f"rank processes {ranks} outlived the server"
        time.sleep(0.1)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()


@pytest.mark.parametrize(
    "how",  # the other two ways in make test-long (CI runs it): 13 s each
    ["sigterm", *(pytest.param(h, marks=pytest.mark.long) for h in ("ctrl-c", "group-sigterm"))],
)
def test_stopping_the_server_stops_every_rank(tmp_path, how):
    checkpoint = make_checkpoint(tmp_path / "ckpt", MODELS["hybrid"])
    server = TPServer(checkpoint, tmp_path / "server.log", "--tp", "2")
    try:
        call(server, *BODIES[0])
        stop_and_check(server, how)
    finally:
        server.stop()


@pytest.mark.long  # make test-long (CI runs it): four refused starts, 13 s
def test_bad_tp_is_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", MODELS["hybrid"])  # 4 attention heads
    cmd = [sys.executable, str(ROOT / "launchers/serve.py"), "--checkpoint", str(checkpoint)]
    cmd += ["--tp", "3", "--port", str(free_port())]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "parallel.tp" in run.stderr and "not divisible by TP=3" in run.stderr


@pytest.mark.long  # make test-long: make test keeps within 15 minutes
def test_tp_serving_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/tp_serve.py end to end (gloo): both servers start, answer, and agree."""
    out = tmp_path / "tp.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/tp_serve.py"), "--device", "cpu"]
        + ["--dtype", "float32", "--tokens", "6", "--batches", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["same_texts"] == 6 and got["first_difference"] == [None] * 6
    assert got["tp1"]["speed"]["2"]["tokens_per_s"] > 0 < got["tp2"]["speed"]["2"]["tokens_per_s"]


def test_two_ranks_on_the_static_decode_step_serve_like_the_engine_alone(tmp_path):
    """--tp-cuda-graphs: every rank decodes all slots at static shapes (the step a GPU records
    with its collectives inside; run eagerly on CPUs) and answers as the engine alone."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", MODELS["hybrid"])
    model, _, tokenizer = model_from_checkpoint(str(checkpoint))
    reference = reference_runner(model.double(), tokenizer)
    server = TPServer(checkpoint, tmp_path / "server.log", "--tp", "2", "--tp-cuda-graphs")
    try:
        text = server.log.read_text()
        assert "decoding eagerly on cpu" in text  # the static decoder
        # The server listened first; every live-batch bucket ran on every rank before it said
        # ready (on a GPU: recorded at every span up to --max-len; on CPUs the first span).
        warmed = text.index("decode warmed up: 3 steps, batch buckets [1, 2, 4]")
        assert text.index("serving on") < warmed < text.index("warm-up took")
        assert re.search(r"every rank warm: rank 0 [\d.]+ s, rank 1 [\d.]+ s; ready\n", text), text
        for path, body in BODIES:
            same(call(server, path, body), reference(path, body))
    finally:
        server.stop()
