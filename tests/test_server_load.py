"""benchmarks/serve_load.py against a real server process: 256 concurrent clients (PUT /api,
POST /v1/completions, streams, streams dropped mid-way) each get the answer the same request
gets alone, and the server's memory, threads and open files do not grow from one wave to the
next. No timing is asserted."""

import importlib.util
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks/serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)

TINY = ["--set", "model.hidden_size=64", "--dtype", "float64", "--threads", "1"]


@pytest.mark.long  # make test-long (CI runs it)
def test_256_mixed_clients_get_their_answer_alone_and_memory_stays_bounded():
    args = serve_load.parse_args(
        ["--clients", "256", "--waves", "2", "--distinct", "64", "--tokens", "8"]
        + ["--cancel-tokens", "32", "--slots", "64", *TINY]
    )
    results = serve_load.run(args)
    assert results["mismatches"] == [] and results["equal"]
    waves = results["waves"]
    assert [w["clients"] for w in waves] == [256, 256]
    assert all(
        w["dropped"] > 0 and w["dropped"] + w["all"]["latency_ms"]["n"] == 256 for w in waves
    )
    assert results["engine"]["active"] == results["engine"]["waiting"] == 0
    assert results["engine"]["cancelled"] > 0  # the dropped streams were cancelled
    assert results["server_log"]["tracebacks"] == 0
    # Connection threads and sockets all end; memory returns to where one wave left it (the
    # allocator's noise over ten such waves was within 17 MiB; a leak of 128 KiB per request
    # would add 32 MiB per wave).
    before, (first, second) = results["memory"]["before"], results["memory"]["after_wave"]
    assert (second["threads"], second["fds"]) == (before["threads"], before["fds"])
    assert second["rss_mib"] < first["rss_mib"] + 32, results["memory"]
    assert second["peak_mib"] < first["peak_mib"] + 32, results["memory"]


def test_serve_load_benchmark_smoke(tmp_path):
    """The script end to end with small numbers: exit 0, every field written."""
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--clients", "1,4"]
        + ["--waves", "2", "--distinct", "8", "--tokens", "4", "--cancel-tokens", "24"]
        + ["--json", str(out), *TINY]
        # A 96-token prompt admitted 16 positions a step while 2 streams decode.
        + ["--long-prompt", "96", "--max-prefill-tokens", "16", "--long-streams", "2"]
        + ["--long-before", "4", "--long-after", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["equal"] and results["mismatches"] == []
    assert results["ready_s"] > 0 and results["first_request_ms"] > 0
    assert results["tenth_request_ms"] > 0 and results["first_over_tenth"] > 0
    assert "first/tenth" in proc.stdout
    assert results["alone"]["requests"] == 8
    assert [w["clients"] for w in results["waves"]] == [1, 4, 4]
    for wave in results["waves"]:
        assert wave["tokens_per_s"] > 0 and set(wave["all"]["latency_ms"]) == {"p50", "p99", "n"}
        # The server's counters over the wave: every request's first token, steps to reach it.
        server = wave["server"]
        assert server["first_tokens"] == wave["clients"] and server["steps_to_first_token"] >= 1
        assert server["steps"] > 0 and server["prefill_passes"] > 0 and server["wakes_per_step"] > 0
    assert "steps to the first token" in proc.stdout
    stream = results["waves"][-1]["stream/greedy"]
    assert stream["ttft_ms"]["p50"] > 0 and stream["per_token_ms"]["p99"] > 0
    memory = results["memory"]
    assert len(memory["after_wave"]) == 3 and memory["before"]["rss_mib"] > 0
    assert "not equal to alone" in proc.stdout
    long = results["long_prompt"]
    assert long["tokens"] == 96 and long["ttft_ms"] > 0 and long["ttft_alone_ms"] > 0
    assert all(long["per_token_ms"][phase]["p99"] > 0 for phase in ("before", "during", "after"))
    assert "long prompt of 96 tokens: first token in" in proc.stdout
    # The engine's own decode step, from the same run, beside each N's HTTP numbers.
    engine = results["engine_decode"]
    assert engine["steps"] == 3 and engine["context"] > 1
    rows = {r["clients"]: r for r in results["comparison"]}
    assert sorted(rows) == [1, 4] and rows[1]["per_token_from"] == "alone"
    for n, row in rows.items():
        assert row["engine_batch"] == n and row["http_per_token_ms"]["p50"] > 0
        assert row["engine_ms_per_step"] > 0 and row["engine_tokens_per_s"] > 0
        assert row["per_token_ratio"] > 0 and row["tokens_per_s_ratio"] > 0
    table = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 5]
    assert "engine ms/step" in table[0][3]
    printed = {int(cells[0]): cells for cells in table[1:]}
    for cells in printed.values():  # numbers, not "-": float() raises on a placeholder
        engine_ms, engine_tps, ratio = cells[3].split()[0], cells[4], cells[5].split(",")[0]
        assert float(engine_ms) > 0 and float(engine_tps) > 0 and float(ratio) > 0
    assert sorted(printed) == [1, 4]
    # The server's decode steps beside the engine's at the batch it decoded most at.
    for wave in results["waves"]:
        decode, batch = wave["server"]["decode"], wave["server"]["decode_batch"]
        assert decode["steps"] > 0 and decode["tokens_per_s"] > 0
        assert 1 <= batch["batch"] <= wave["clients"] and batch["tokens"] <= decode["tokens"]
    engine_batches = {b["batch"] for b in engine["batches"]}
    for row in rows.values():
        assert row["decode_batch"] in engine_batches and row["server_decode_tokens_per_s"] > 0
        assert row["engine_decode_tokens_per_s"] > 0 and row["decode_ratio"] > 0
    decode_table = [
        line.split(" : ") for line in proc.stdout.splitlines() if line.count(" : ") == 4
    ]
    assert "server decode tokens/s" in decode_table[0][2]
    assert sorted(int(cells[0]) for cells in decode_table[1:]) == [1, 4]
    assert all(float(cells[4]) > 0 for cells in decode_table[1:])


def test_serve_load_refuses_bad_flags():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/serve_load.py"), "--clients", "8,x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--clients" in proc.stderr.splitlines()[-1]


@pytest.mark.long  # make test-long (CI runs it)
def test_cpu_server_memory_does_not_grow_with_each_new_prompt_length(tmp_path):
    """oneDNN caches a compiled convolution per input shape (up to 1,024 by default): each new
    prompt length cost a float32 CPU server ~0.6 MiB for good, ~90 MiB per 150 lengths here."""
    checkpoint = serve_load.tiny_checkpoint(tmp_path / "ckpt", ["model.hidden_size=64"])
    server = serve_load.parse_args(["--dtype", "float32", "--slots", "4", "--threads", "1"])
    proc, port, _ = serve_load.start_server(checkpoint, server, tmp_path / "server.log")
    try:
        rss = []
        for lengths in (range(1, 151), range(151, 301)):
            for n in lengths:  # one prompt at a time: one new prefill shape each
                body = json.dumps({"prompts": ["x" * n], "tokens_to_generate": 1}).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api",
                    body,
                    {"Content-Type": "application/json"},
                    method="PUT",
                )
                with urllib.request.urlopen(request, timeout=120) as reply:
                    assert reply.status == 200
            rss.append(serve_load.resources(proc.pid)["rss_mib"])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert rss[1] < rss[0] + 45, rss
