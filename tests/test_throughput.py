"""benchmarks/train_throughput.py on the CPU: the tiny recipe for 2 timed steps, its JSON fields."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from toolkit.model import HybridLM
from toolkit.parallel.runtime import clip_and_step

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "train_throughput", ROOT / "benchmarks/train_throughput.py"
)
train_throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_throughput)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "--mbs" in out and "MFU" in out


def test_tiny_recipe_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "1")  # read at Inductor's import: recorded only
    monkeypatch.setenv("TOOLKIT_NOT_READ", "x")
    monkeypatch.setenv("UNRELATED_VARIABLE", "y")
    out = tmp_path / "r.json"
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "2", "--warmup", "1", "--seq", "64"]
    args += ["--mbs", "2", "--set", 'train.activation_checkpointing=["mlp"]', "--json", str(out)]
    assert train_throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["seq"] == 64 and r["mbs"] == 2 and r["steps"] == 2
    assert len(r["step_times_s"]) == 2 and len(r["warmup_times_s"]) == 1 and len(r["losses"]) == 3
    assert r["step_time_s"] > 0 and all(math.isfinite(x) for x in r["losses"])
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_time_s"])
    assert r["tflops_per_gpu"] == pytest.approx(
        r["flops_per_token"] * 128 / r["step_time_s"] / 1e12
    )
    assert r["mfu"] is None and r["datasheet_bf16_tflops"] is None  # no data-sheet peak on CPUs
    assert r["measured_matmul_tflops"]["bf16"] > 0 and 0 < r["mfu_of_measured_bf16"]
    assert r["peak_memory_gb"] > 0 and r["versions"]["torch"]
    env = r["environment"]["variables"]
    assert env["TORCHINDUCTOR_ENABLE_PDL"] == "1" and env["TOOLKIT_NOT_READ"] == "x"
    assert "UNRELATED_VARIABLE" not in env
    import torch._inductor.config as inductor

    assert r["environment"]["inductor"]["enable_pdl"] is inductor.triton.enable_pdl
    assert r["activation_checkpointing"] == ["mlp"] and r["compile"] is False
    assert r["precision"] == "fp32" and r["fp8_engine"] is None
    assert "tokens/s" in capsys.readouterr().out


def test_profile_traces_one_more_step(tmp_path):
    """--profile writes a Chrome trace of one step after the timed ones, which leaves the timed
    steps' numbers as they are."""
    trace, out = tmp_path / "t" / "step.json", tmp_path / "r.json"
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "2", "--warmup", "0", "--seq", "32"]
    args += ["--mbs", "1", "--json", str(out), "--profile", str(trace)]
    assert train_throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert r["profile"] == str(trace) and len(r["losses"]) == len(r["grad_norms"]) == 2
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names  # the model's matmuls, traced


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # garbage only the cyclic collector frees


def test_time_steps_counts_collections_and_turns_them_off(monkeypatch):
    import gc

    device = train_throughput.torch.device("cpu")

    def step():  # garbage with a cycle, then a full collection, as a heavy step triggers
        _Cycle()
        gc.collect()
        return train_throughput.torch.tensor(1.0)

    before = gc.isenabled()
    losses, warm, times, gc_times, span = train_throughput.time_steps(step, 1, 3, device)
    assert len(losses) == 4 and len(warm) == 1 and len(times) == len(gc_times) == 3
    assert len(span) == 2 and span[1] - span[0] >= sum(times)  # the timed steps inside it
    assert all(0 < g <= t for g, t in zip(gc_times, times, strict=True))  # each step's collect

    seen = []

    def step_manual():
        seen.append((gc.isenabled(), gc.get_freeze_count()))
        return train_throughput.torch.tensor(1.0)

    *_, gc_times, _ = train_throughput.time_steps(step_manual, 2, 2, device, manual_gc=True)
    assert [on for on, _ in seen] == [before, before, False, False]  # off in the timed steps
    assert all(frozen > 0 for _, frozen in seen[2:]) and gc_times == [0.0, 0.0]
    assert gc.isenabled() == before and gc.get_freeze_count() == 0  # restored


def test_steps_clip_as_the_trainer_does_flat_optimizer_or_not(tmp_path, monkeypatch):
    # The trainer's clip_and_step at the recipe's grad_clip: with the flat optimizer the
    # coefficient folded into its update, the same losses and norms as clipping in place.
    calls = []

    def spy(optimizer, params, max_norm, env):
        calls.append((getattr(optimizer, "folds_grad_scale", False), max_norm))
        return clip_and_step(optimizer, params, max_norm, env)

    monkeypatch.setattr(train_throughput, "clip_and_step", spy)
    runs = []
    for flat in ("false", "true"):
        out = tmp_path / f"{flat}.json"
        args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "2", "--warmup", "1"]
        args += ["--seq", "32", "--mbs", "2", "--set", "train.grad_clip=0.01"]
        args += ["--set", f"train.flat_optimizer={flat}", "--json", str(out)]
        assert train_throughput.main(args) == 0
        runs.append(json.loads(out.read_text()))
    assert calls == [(False, 0.01)] * 3 + [(True, 0.01)] * 3
    plain, flat = runs
    assert flat["flat_optimizer"] and len(plain["grad_norms"]) == 3
    assert min(plain["grad_norms"]) > 0.01  # clipped at every step
    assert flat["grad_norms"] == plain["grad_norms"] and flat["losses"] == plain["losses"]


def test_accumulated_micro_batches_share_one_update(tmp_path, monkeypatch):
    """--accumulate 3: each step runs 3 micro-batches through the trainer's StepRunner (loss
    scaled by 1/3 each) before one clip and update, and counts 3 micro-batches' tokens."""
    updates, forwards = [], []
    monkeypatch.setattr(
        train_throughput, "clip_and_step", lambda *a: updates.append(1) or clip_and_step(*a)
    )
    real_forward = HybridLM.forward
    monkeypatch.setattr(
        HybridLM, "forward", lambda *a, **k: forwards.append(1) or real_forward(*a, **k)
    )
    out = tmp_path / "r.json"
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "2", "--warmup", "1"]
    # --mbs 3 does not divide the recipe's global batch of 16: the step's own global batch rules
    args += ["--seq", "32", "--mbs", "3", "--accumulate", "3", "--json", str(out)]
    assert train_throughput.main(args) == 0
    r = json.loads(out.read_text())
    assert len(updates) == 3 and len(forwards) == 9 and r["micro_batches_per_step"] == 3
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(3 * 3 * 32)
    with pytest.raises(SystemExit):
        train_throughput.main([*args[:-2], "--accumulate", "0"])


def test_cuda_graphs_keep_the_gradients_outside_the_graphs(tmp_path, monkeypatch, capsys):
    """--cuda-graphs: Inductor's cudagraph trees switched on for the compiled blocks, and the
    gradients allocated once and zeroed in place, so micro-batches accumulate into tensors of
    ours; the losses and norms are those of the run without it (the CPU replays no graph, so
    this checks the gradient handling). Without train.compile it is an error naming the key."""
    import torch

    monkeypatch.setattr(torch._inductor.config.triton, "cudagraphs", False)  # restored after
    base = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "2", "--warmup", "1", "--seq"]
    base += ["32", "--mbs", "1", "--accumulate", "2"]
    seen, real_zero = [], torch.optim.AdamW.zero_grad

    def zero_grad(self, set_to_none=True):
        seen.append((set_to_none, torch._inductor.config.triton.cudagraphs))
        return real_zero(self, set_to_none)

    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", zero_grad)
    first_forward, real_forward = [], HybridLM.forward

    def forward(self, *a, **k):  # are the gradients there before any backward?
        if not first_forward:
            first_forward.append(all(p.grad is not None for p in self.parameters()))
        return real_forward(self, *a, **k)

    monkeypatch.setattr(HybridLM, "forward", forward)
    runs = []
    for graphs in (False, True):
        out = tmp_path / f"{graphs}.json"
        args = base + ["--set", "train.compile=true", "--json", str(out)]
        first_forward.clear()
        assert train_throughput.main(args + ["--cuda-graphs"] * graphs) == 0
        runs.append(json.loads(out.read_text()))
        assert first_forward == [graphs]  # allocated up front only for the graphs
    assert runs[1]["cuda_graphs"] and not runs[0]["cuda_graphs"]
    assert seen == [(True, False)] * 3 + [(False, True)] * 3
    assert runs[1]["losses"] == runs[0]["losses"]
    assert runs[1]["grad_norms"] == runs[0]["grad_norms"]
    assert train_throughput.main(base + ["--cuda-graphs"]) == 2
    assert "train.compile" in capsys.readouterr().err


def test_fp8_on_cpu_is_an_error_in_the_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "1", "--seq", "32", "--mbs", "1"]
    args += ["--set", 'train.precision="fp8"', "--json", str(out)]
    assert train_throughput.main(args) == 1
    assert "train.precision='fp8'" in json.loads(out.read_text())["error"]
    assert "train.precision='fp8'" in capsys.readouterr().err


def test_bad_recipe_key_exits_2(capsys):
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--set", 'train.activation_checkpointing="x"']
    assert train_throughput.main(args) == 2
    assert "train.activation_checkpointing" in capsys.readouterr().err


def test_trace_summary_counts_kernels_and_dma_copies(tmp_path, capsys, monkeypatch):
    """benchmarks/trace_summary.py on a hand-made trace: kernels and memcpy/memset (DMA, not
    kernels, but GPU time) are summed by family and by the op that launched them."""
    spec = importlib.util.spec_from_file_location(
        "trace_summary", ROOT / "benchmarks/trace_summary.py"
    )
    trace_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace_summary)
    events = [
        {"cat": "cpu_op", "name": "aten::mm", "args": {"External id": 1}},
        {"cat": "cpu_op", "name": "aten::copy_", "args": {"External id": 2}},
        {"cat": "kernel", "name": "nvjet_sm90_tst_128x256", "ts": 0, "dur": 600,
         "args": {"External id": 1}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 600, "dur": 300,
         "args": {"External id": 2}},
        {"cat": "kernel", "name": "triton_red_fused__to_copy_exp_logsumexp_0", "ts": 900,
         "dur": 100},
        {"cat": "cpu_op", "name": "not a GPU event", "ts": 0, "dur": 5000},
    ]  # fmt: skip
    path = tmp_path / "rank0.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    monkeypatch.setattr("sys.argv", ["trace_summary", str(path)])
    trace_summary.main()
    out = capsys.readouterr().out
    assert "GPU busy 1.0 ms over 1.0 ms of wall (100%)" in out
    assert "0.3 ms   30.0%  copy / cast" in out
    assert "0.1 ms   10.0%  cross-entropy / softmax" in out
    assert "0.6 ms   60.0%  aten::mm" in out and "0.3 ms   30.0%  aten::copy_" in out


def test_fp8_recast_input_needs_the_weight_cache(capsys):
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "1", "--fp8-recast-input"]
    assert train_throughput.main(args) == 2
    assert "train.fp8_weight_cache=true" in capsys.readouterr().err


def test_step_graph_needs_the_triton_adamw_and_not_cuda_graphs(capsys):
    """--step-graph (toolkit.step_graph, tested in tests/test_step_graph.py) on a CPU, where the
    update is torch's AdamW: an error naming the flag and the key; beside --cuda-graphs, one
    naming both."""
    args = [str(ROOT / "recipes/tiny_hybrid.toml"), "--steps", "1", "--seq", "32", "--mbs", "1"]
    assert train_throughput.main(args + ["--step-graph"]) == 2
    err = capsys.readouterr().err
    assert "--step-graph" in err and "train.adamw_kernel" in err
    assert train_throughput.main(args + ["--step-graph", "--cuda-graphs"]) == 2
    assert "leave out --cuda-graphs" in capsys.readouterr().err
