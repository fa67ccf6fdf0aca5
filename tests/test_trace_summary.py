"""benchmarks/trace_summary.py: kernel families (bf16 and FP8 GEMMs, torchao's float8 amax, scales
and casts), per-step times, the side-by-side table of two runs, kernel tables written and read
back; benchmarks/prefill_profile.py's plumbing on the CPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "benchmarks/trace_summary.py")
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)


@pytest.mark.parametrize(
    "name, op, one_block, family",
    [
        ("nvjet_tst_192x192_64x4_1x2_h_bz_coopA_NTN", "aten::mm", False, ts.MATMUL_LABEL),
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64",
            "?",
            False,
            ts.MATMUL_LABEL,
        ),
        ("nvjet_qqtst_128x256_128x6_2x1_v_bz_coopA_TNT", "aten::_scaled_mm", False, ts.FP8_LABEL),
        ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "?", False, ts.FP8_LABEL),
        ("triton_red_fused_abs_amax_0", "triton_red_fused_abs_amax_0", False, ts.AMAX_LABEL),
        ("triton_red_fused__to_copy_abs_add_amax_mean_mul_pow_rsqrt_3", "", False, ts.AMAX_LABEL),
        ("triton_poi_fused__to_copy_clamp_div_view_2", "", False, ts.CAST_LABEL),
        ("triton_poi_fused__to_copy_clamp_reciprocal_1", "", True, ts.SCALE_LABEL),
        (
            "triton_red_fused__to_copy_clamp_gather_logsumexp_0",
            "",
            False,
            "cross-entropy / softmax",
        ),
        ("triton_poi_fused__to_copy_clamp_max_exp_mul_sub_12", "", False, ts.OTHER_TRITON),
        (  # the chunked log-sum-exp and the loss's gradient, compiled (bf16 runs)
            "triton_per_fused__to_copy_abs_amax_eq_exp_mul_ne_scalar_tensor_sub_sum_unsqueeze_"
            "view_where_0",
            "",
            False,
            "cross-entropy / softmax",
        ),
        (
            "triton_poi_fused__to_copy_arange_copy_copy__eq_exp_mul_sub_unsqueeze_0",
            "",
            False,
            "cross-entropy / softmax",
        ),
        ("triton_poi_fused_exp_mul_neg_0", "", False, ts.OTHER_TRITON),
        ("_chunk_scan_fwd_kernel", "MambaSplitConv1dScanCombinedFn", False, "Mamba SSD (Triton)"),
        ("causal_conv1d_fwd_kernel", "MambaSplitConv1dScanCombinedFn", False, "conv1d"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "?", False, "attention"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "", False, "norm"),
        ("triton_poi_fused_add_gelu_5", "", False, ts.OTHER_TRITON),
    ],
)
def test_kernel_families(name, op, one_block, family):
    assert ts.family(name, op, one_block) == family


def trace(path: Path, kernels: list[tuple], steps: int, gap_us: float) -> Path:
    """A Chrome trace as torch.profiler writes it: ProfilerStep marks, CPU ops with External
    ids, and kernels (name, op, us, one block) back to back, `gap_us` apart."""
    events = [{"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{4 + i}", "ts": 0,
               "dur": 1, "args": {}} for i in range(steps)]  # fmt: skip
    t = 1000.0
    for i, (name, op, us, one) in enumerate(kernels):
        events.append({"ph": "X", "cat": "cpu_op", "name": op, "ts": t, "dur": 5,
                       "args": {"External id": i + 1}})  # fmt: skip
        grid = [1, 1, 1] if one else [132, 4, 1]
        events.append({"ph": "X", "cat": "kernel", "name": name, "ts": t, "dur": us,
                       "args": {"External id": i + 1, "grid": grid, "block": [128, 1, 1]}})  # fmt: skip
        t += us + gap_us
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": events}))
    return path


GEMM = "nvjet_tst_256x128_64x4_2x1_v_bz_coopB_NNT"
FP8_GEMM = "nvjet_qqtst_128x256_128x6_2x1_v_bz_coopA_TNT"
BF16 = [  # ms
    (GEMM, "aten::mm", 100_000, False),
    ("_chunk_scan_fwd_kernel", "MambaSplitConv1dScanCombinedFn", 20_000, False),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "x", 10_000, False),
]
FP8 = [  # two steps' worth, each kernel twice the time of one step
    (FP8_GEMM, "aten::_scaled_mm", 100_000, False),
    (GEMM, "aten::mm", 40_000, False),
    ("triton_red_fused_abs_amax_0", "triton_red_fused_abs_amax_0", 16_000, False),
    ("triton_poi_fused__to_copy_clamp_div_view_2", "x", 12_000, False),
    ("triton_poi_fused_reciprocal_1", "x", 2_000, True),
    ("_chunk_scan_fwd_kernel", "MambaSplitConv1dScanCombinedFn", 40_000, False),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "x", 20_000, False),
]


def test_side_by_side_fp8_against_bf16(tmp_path, capsys):
    a = trace(tmp_path / "bf16.pt.trace.json", BF16, steps=1, gap_us=5_000)
    b = trace(tmp_path / "fp8.pt.trace.json", FP8, steps=2, gap_us=2_000)
    tables = [tmp_path / "kernels_bf16.json", tmp_path / "kernels_fp8.json"]
    args = [str(a), "--vs", str(b), "--labels", "bf16,fp8", "--flops", "1e14", "--top", "3"]
    assert ts.main([*args, "--json-out", *map(str, tables)]) == 0
    out = capsys.readouterr().out
    lines = {line[:38].strip(): line[38:].split() for line in out.splitlines()}
    # per step: bf16 130 ms busy over 140 of wall; fp8 (230 ms / 2 steps) over (230 + 6*2) / 2
    assert lines["GPU busy"] == ["130.0", "115.0", "0.88", "-15.0", "ms"]
    assert lines["gaps (GPU idle)"] == ["10.0", "6.0", "0.60", "-4.0", "ms"]
    assert lines["gaps 100 us+"] == ["10.0", "6.0", "0.60", "-4.0", "ms"]  # all 2-5 ms apart
    assert "gaps under 5 us" not in lines
    assert lines[ts.MATMUL_LABEL] == ["100.0", "20.0", "0.20", "-80.0", "ms"]
    assert lines[ts.FP8_LABEL] == ["0.0", "50.0", "-", "+50.0", "ms"]
    assert lines["amax + one-block + casts"] == ["0.0", "15.0", "-", "+15.0", "ms"]
    assert lines["the rest"] == ["30.0", "30.0", "1.00", "+0.0", "ms"]
    assert lines["matmul TFLOP/s (all GEMMs)"] == ["1000.0", "1428.6", "1.43", "+428.6", "TFLOP/s"]
    assert "GEMMs that went to FP8: 80.0 ms in bf16" in out
    assert "50.0 ms as FP8 GEMMs (1.60x faster)" in out
    assert "left in bf16 in fp8 (first/last blocks, output layer...): 20.0 ms" in out
    # The kernel tables hold the same numbers: summed again from them, the same table.
    assert ts.main([str(tables[0]), "--vs", *args[2:]]) == 0
    again = capsys.readouterr().out
    assert again == out


def test_one_trace_per_step_with_flops(tmp_path, capsys):
    b = trace(tmp_path / "fp8.pt.trace.json", FP8, steps=2, gap_us=2_000)
    assert ts.main([str(b), "--flops", "1e14"]) == 0
    out = capsys.readouterr().out
    assert "GPU busy 115.0 ms over 121.0 ms of wall (95%) per step, 2 steps" in out
    assert "matmuls: 100.0 TFLOP in 70.0 ms = 1429 TFLOP/s" in out
    assert "      8.0 ms    7.0%  FP8 amax (abs-max reductions)" in out
    assert "      1.0 ms    0.9%  one-block kernels (FP8 scales...)" in out


def test_kernels_launched_before_the_trace_are_left_out(tmp_path, capsys):
    """The step before the traced one queues its optimizer update and returns; those kernels run
    (and are recorded) inside the traced step, but their launch calls are not in the trace. They
    are left out, or the update would count twice (the 8B's first FP8 profile did so)."""
    path = trace(tmp_path / "t.pt.trace.json", BF16, steps=1, gap_us=0)
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    for i, e in enumerate([e for e in events if e["cat"] == "kernel"]):
        e["args"]["correlation"] = 100 + i
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel",
                       "ts": e["ts"], "dur": 1, "args": {"correlation": 100 + i}})  # fmt: skip
    events.append({"ph": "X", "cat": "kernel", "name": "multi_tensor_apply_kernel", "ts": 0,
                   "dur": 40_000, "args": {"correlation": 7, "grid": [320, 1, 1]}})  # fmt: skip
    path.write_text(json.dumps(data))
    assert ts.main([str(path), "--json-out", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert "GPU busy 130.0 ms over 130.0 ms of wall" in out
    assert "left out: 40.0 ms of kernels launched before the traced steps" in out
    assert "optimizer" not in out
    assert ts.load([str(tmp_path / "k.json")]).before_us == 40_000


def test_gaps_between_gpu_work_by_size_and_the_largest(tmp_path, capsys):
    """The idle time between one kernel's end and the next one's start, by size (many small
    gaps: launching many kernels; a few large ones: the GPU waiting on the host), the largest
    with the kernels around them; work that overlaps (another stream) leaves no gap. The kernel
    table keeps them."""
    path = trace(tmp_path / "t.pt.trace.json", BF16, steps=1, gap_us=0)
    data = json.loads(path.read_text())
    kernel = {"ph": "X", "cat": "kernel", "args": {"grid": [132, 1, 1]}}
    # after BF16's three kernels (1,000 to 131,000 us): gaps of 3, 10, 50 and 500 us
    t = 131_000.0
    for name, gap in (("a", 3), ("b", 10), ("c", 50), ("d", 500)):
        t += gap
        data["traceEvents"].append(kernel | {"name": name, "ts": t, "dur": 100})
        t += 100
    # inside d's span, on another stream: no gap before it, none after
    data["traceEvents"].append(kernel | {"name": "e", "ts": t - 50, "dur": 20})
    path.write_text(json.dumps(data))
    assert ts.main([str(path), "--json-out", str(tmp_path / "k.json")]) == 0
    out = capsys.readouterr().out
    assert (
        "gaps between GPU work: 0.6 ms in 4 a step; under 5 us 0.0 ms (x1), 5-20 us 0.0 ms "
        "(x1), 20-100 us 0.1 ms (x1), 100 us+ 0.5 ms (x1)"
    ) in out
    largest = [line.split() for line in out.splitlines() if line.endswith("before d")]
    assert largest == [["500", "us", "after", "c", "before", "d"]]
    again = ts.load([str(tmp_path / "k.json")])
    assert dict(again.gaps) == {"under 5 us": [3.0, 1], "5-20 us": [10.0, 1],
                                "20-100 us": [50.0, 1], "100 us+": [500.0, 1]}  # fmt: skip
    assert again.largest_gaps[0] == (500.0, "c", "d") and len(again.largest_gaps) == 4


def test_bad_input_exits_2(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert ts.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: not a readable JSON trace") and err.count("\n") == 1
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert ts.main([str(tmp_path / "x.json")]) == 2
    assert "no traceEvents" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ts.main([str(missing), "--labels", "bf16"])
    assert e.value.code == 2


def test_a_real_cpu_trace_has_no_gpu_kernels(tmp_path, capsys):
    """A real torch.profiler trace of two training steps of a small model on the CPU: parsed,
    and refused for holding no GPU work (exit 2, one line)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    opt = torch.optim.AdamW(model.parameters())
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=2, repeat=1),
    ) as prof:
        for _ in range(3):
            model(torch.randn(16, 64)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
    path = tmp_path / "cpu.pt.trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    assert {e["name"] for e in events if e["name"].startswith("ProfilerStep#")} == {
        "ProfilerStep#1",
        "ProfilerStep#2",
    }
    assert ts.main([str(path)]) == 2
    assert "no GPU kernels in these traces (a CPU run" in capsys.readouterr().err


@pytest.mark.long
def test_prefill_profile_runs_on_the_cpu(tmp_path):
    """The prefill profile's plumbing at the tiny recipe: model, engine, the timed and profiled
    first tokens, and the matmul FLOPs (the blocks' linears over the prompt, the output layer
    once); no GPU, so no families."""
    out = tmp_path / "prefill.json"
    cmd = [sys.executable, "benchmarks/prefill_profile.py", "--recipe", "recipes/tiny_hybrid.toml"]
    cmd += ["--context", "48", "--device", "cpu", "--dtype", "float32", "--json", str(out)]
    proc = subprocess.run(
        cmd + ["--prefill-chunk", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_hybrid, 48-token prompt in pieces of 16: first token" in proc.stdout
    assert "no summary:" in proc.stdout and "no GPU kernels" in proc.stdout
    result = json.loads(out.read_text())
    from toolkit.build import build_model
    from toolkit.config import load_recipe
    from toolkit.tokenizer import build_tokenizer

    recipe = load_recipe(ROOT / "recipes/tiny_hybrid.toml")
    model = build_model(recipe, build_tokenizer(recipe.data.tokenizer), "meta")
    linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    expected = 2 * 48 * sum(m.in_features * m.out_features for m in linears)
    expected += 2 * model.output_layer.in_features * model.output_layer.out_features
    assert result["matmul_flops"] == expected
    assert result["first_token_s"] > 0 and "families_ms" not in result
    assert result["prefill_chunk"] == 16
    bad = subprocess.run(cmd + ["--prefill-chunk", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--prefill-chunk >= 1" in bad.stderr
    assert "Traceback" not in bad.stderr
