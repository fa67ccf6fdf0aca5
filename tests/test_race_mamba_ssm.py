"""benchmarks/race_mamba_ssm.py without a GPU: our side alone on the CPU (its JSON), the
parameter counts it predicts for both models against our built model, and the exit status 2
naming what is missing for the race itself."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.build import build_model, tokenizer_from_recipe
from toolkit.config import load_recipe
from toolkit.model import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/race_mamba_ssm.py"
spec = importlib.util.spec_from_file_location("race_mamba_ssm", SCRIPT)
race = importlib.util.module_from_spec(spec)
spec.loader.exec_module(race)


def test_ours_only_tiny_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--ours-only", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--seq", "64"]
    args += ["--set", 'train.adamw_kernel="triton"']  # our side's keys
    assert race.main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["steps"] == 2 and r["warmup_steps"] == 1
    assert r["set"] == ['train.adamw_kernel="triton"'] and "'triton'" in r["optimizer"]["ours"]
    assert r["shape"]["name"] == "tiny" and r["shape"]["seq"] == 64
    assert r["shape"]["micro_batch"] == 2 and r["pattern"] == "MMMMMM"
    assert "theirs" not in r and "ratio" not in r and r["their_config"] is None
    ours = r["ours"]
    assert ours["kernels"] == "reference" and ours["mamba_fused"] is False
    assert ours["optimizer_class"] == "AdamW"  # torch's on CPUs, whatever the key says
    assert len(ours["step_times_s"]) == 2 and len(ours["warmup_times_s"]) == 1
    assert len(ours["losses"]) == 3 and all(math.isfinite(x) for x in ours["losses"])
    assert ours["tokens_per_s"] == pytest.approx(2 * 64 / ours["step_time_s"])
    assert ours["peak_memory_gb"] > 0
    assert ours["parameters"] == r["predicted"]["ours"]["parameters"]
    assert ours["flops_per_token"] == r["predicted"]["ours"]["flops_per_token"]
    assert r["notes"]["matched"] and r["notes"]["kernels"]
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "ours: MMMMMM --set train.adamw_kernel=" in printed
    assert "optimizer, theirs: torch's fused AdamW" in printed


SHAPES = [(name, hybrid) for name in race.PRESETS for hybrid in (False, True)]


@pytest.mark.parametrize(
    "name,hybrid", SHAPES, ids=[f"{n}-{'hybrid' if h else 'mamba2'}" for n, h in SHAPES]
)
def test_predicted_parameters_match_our_built_model(name, hybrid):
    """Both predictions from the shape alone, ours against our model built (on the meta device:
    the 8B widths need no memory), and theirs equal to ours: the shapes match."""
    shape, _ = race.build_shape(name, hybrid=hybrid)
    overrides = race.our_overrides(shape, device="cpu", kernels="reference", compile=False)
    recipe = load_recipe(ROOT / shape.recipe, overrides)
    model = build_model(recipe, tokenizer_from_recipe(recipe), torch.device("meta"))
    assert model.layout.pattern == shape.pattern
    ours = race.our_parameters(recipe.model, shape.vocab_size)
    theirs = race.their_parameters(race.their_config(shape), shape.seq)
    assert ours["parameters"] == sum(p.numel() for p in model.parameters())
    assert ours["flops_per_token"] == flops_per_token(model, shape.seq)
    assert theirs == ours


def test_hybrid_shape_and_their_config():
    """The 800M hybrid in their form: its 24 mixers (attention where the recipe puts it among
    them), an MLP after each, SwiGLU at the width nearest 2/3 of the recipe's GeLU 4096."""
    shape, _ = race.build_shape("800m", hybrid=True)
    assert shape.n_layer == 24 and shape.attn_layer_idx == (4, 9, 14, 19)
    assert shape.d_intermediate == 2688 and shape.pattern.count("-") == 24
    cfg = race.their_config(shape)
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["tie_embeddings"] is False
    assert cfg["attn_cfg"]["causal"] is True and cfg["attn_cfg"]["qkv_proj_bias"] is False
    assert cfg["pad_vocab_size_multiple"] == 128
    notes = race.differences(shape, load_recipe(ROOT / shape.recipe))
    assert any(line.startswith("MLP: theirs can only be SwiGLU") for line in notes["differences"])
    assert any(line.startswith("attention head layout") for line in notes["differences"])
    pure, _ = race.build_shape("8b-mamba2")
    assert (pure.n_layer, pure.micro_batch, pure.seq, pure.vocab_size) == (8, 2, 4096, 256000)
    assert (pure.d_model, pure.d_state, pure.headdim, pure.ngroups) == (4096, 128, 64, 8)


def test_missing_requirements():
    no_module = "ModuleNotFoundError: No module named 'mamba_ssm'"
    line = race.missing_requirements(ours_only=False, cuda=True, mamba_ssm_error=no_module)
    assert "mamba_ssm (ModuleNotFoundError" in line and "CUDA" not in line
    line = race.missing_requirements(ours_only=False, cuda=False, mamba_ssm_error=None)
    assert "a CUDA GPU" in line and "mamba_ssm (" not in line and "--ours-only" in line
    assert race.missing_requirements(ours_only=False, cuda=True, mamba_ssm_error=None) is None
    assert race.missing_requirements(ours_only=True, cuda=False, mamba_ssm_error=no_module) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_race_without_cuda_or_mamba_ssm_exits_2(tmp_path):
    """This machine has neither: one line naming both, nothing written."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "a CUDA GPU" in errors[0] and "mamba_ssm (" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_profile_on_cpu_runs_the_step_and_says_there_is_nothing_to_sum(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--ours-only", "--shape", "tiny", "--steps", "1", "--warmup", "1", "--seq", "32"]
    assert race.main([*args, "--profile", str(tmp_path / "prof"), "--json", str(out)]) == 0
    ours = json.loads(out.read_text())["ours"]
    assert ours["profile"] == "no GPU kernels in the profiled step (a cpu run)"
    assert len(ours["losses"]) == 2  # the profiled step is not one of the timed ones
    assert not list((tmp_path / "prof").iterdir())
    assert "ours: profile: no GPU kernels" in capsys.readouterr().out


def test_profiled_sides_are_summed_by_family_side_by_side(tmp_path, monkeypatch, capsys):
    """profiled_step writes each side's kernel table (what trace_summary.load made of its
    trace: stood in for here, a CPU has no GPU kernels) and its families; print_profiles puts
    the two tables side by side."""
    ts = race.trace_summary

    def fake_trace(ssd_us: float, adam_us: float) -> "ts.Profile":
        prof = ts.Profile(wall_us=ssd_us + adam_us + 1000.0, steps=1)
        prof.kernels[("_chunk_scan_fwd_kernel", "?", False)] = [ssd_us, 8]
        prof.kernels[("multi_tensor_apply_kernel_FusedAdamW", "aten::_fused_adamw_", False)] = [
            adam_us,
            4,
        ]
        return prof

    steps = []
    results = {}
    for side, ssd, adam in (("ours", 4000.0, 9000.0), ("theirs", 6000.0, 9000.0)):
        traced = fake_trace(ssd, adam)
        monkeypatch.setattr(ts, "load", lambda paths, p=traced: p)
        results[side] = race.profiled_step(
            lambda: steps.append(1) or torch.zeros(()), torch.device("cpu"), tmp_path, side
        )
    assert len(steps) == 2
    assert results["ours"]["profile"] == str(tmp_path / "ours.kernels.json")
    assert results["ours"]["profile_busy_ms"] == pytest.approx(13.0)
    assert results["theirs"]["profile_families_ms"]["Mamba SSD (Triton)"] == pytest.approx(6.0)
    assert "aten::zeros" in results["ours"]["profile_host_ms"]  # the host's ops, by CPU time
    monkeypatch.undo()  # the real loader reads the tables back
    race.print_profiles(results)
    out = capsys.readouterr().out
    assert "ours against mamba-ssm's" in out
    ssd = next(line for line in out.splitlines() if line.startswith("Mamba SSD (Triton)"))
    assert ssd.split()[-5:] == ["4.0", "6.0", "1.50", "+2.0", "ms"]
    busy = next(line for line in out.splitlines() if line.startswith("GPU busy"))
    assert busy.split()[-5:] == ["13.0", "15.0", "1.15", "+2.0", "ms"]
    assert "ours: host ms (CPU time, children included) by op:" in out
