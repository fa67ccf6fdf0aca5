"""The Zarr checkpoint store: bit-exact round trips, checksums, the commit protocol, SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from toolkit.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_tensors,
    optimizer_tensors,
    resolve_checkpoint,
    restore_model,
    restore_optimizer,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def special_bf16() -> torch.Tensor:
    # +0, -0, +inf, -inf, NaN, smallest subnormals, 1.0, largest finite
    bits = np.array(
        [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x8001, 0x3F80, 0x7F7F], dtype=np.uint16
    )
    special = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    return torch.cat([special, torch.randn(7).bfloat16()])


def test_round_trip_is_bit_exact(tmp_path):
    tensors = {
        "bf16": special_bf16().reshape(4, 4),
        "fp32": torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-45, 3.4e38]),
        "fp16": torch.randn(3, 5).half(),
        "int64": torch.arange(-5, 5),
        "scalar": torch.tensor(2.5),
        "zeros": torch.zeros(3, 3),
    }
    meta = {"step": 3, "nested": {"a": [1, 2.5, "x"]}}
    save_checkpoint(tmp_path, 3, tensors, {"p/step": torch.tensor(3.0)}, meta)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.metadata == meta and ckpt.optim["p/step"].item() == 3.0
    for name, t in tensors.items():
        back = ckpt.model[name]
        assert back.dtype == t.dtype and back.shape == t.shape
        same_bits = back.view(torch.int16) if t.dtype == torch.bfloat16 else back
        want = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        assert torch.equal(same_bits, want) or torch.equal(same_bits.isnan(), want.isnan())
    assert torch.equal(ckpt.model["fp32"].view(torch.int32), tensors["fp32"].view(torch.int32))


def test_bf16_reads_with_plain_zarr_and_numpy(tmp_path):
    t = torch.randn(5, 3).bfloat16()
    path = save_checkpoint(tmp_path, 1, {"w": t}, {}, {})
    arr = zarr.open_array(path / "model" / "w", mode="r")
    assert arr.attrs["dtype"] == "bfloat16"
    as_fp32 = (arr[...].astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(as_fp32, t.float().numpy())


def chunk_files(step_dir: Path, array: str) -> list[Path]:
    return sorted(
        p for p in (step_dir / "model" / array).rglob("*") if p.is_file() and p.name != "zarr.json"
    )


def test_a_corrupted_chunk_is_an_error_naming_the_array(tmp_path):
    path = save_checkpoint(
        tmp_path, 1, {"a": torch.randn(64), "layers.0.w": torch.randn(8, 8)}, {}, {}
    )
    (chunk,) = chunk_files(path, "layers.0.w")
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="layers.0.w"):
        load_checkpoint(tmp_path)


def test_a_missing_chunk_is_an_error_not_zeros(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"z": torch.zeros(16)}, {}, {})
    (chunk,) = chunk_files(path, "z")  # all-zero chunks are written too
    chunk.unlink()
    with pytest.raises(CheckpointError, match="z"):
        load_checkpoint(tmp_path)


def test_commit_protocol_and_pointers(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {})
    crashed = tmp_path / ".tmp-step_00000002"  # a save that died half-way
    crashed.mkdir()
    (crashed / "zarr.json").write_text("{garbage")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    save_checkpoint(tmp_path, 2, {"w": torch.full((2,), 2.0)}, {}, {})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {}, {})
    assert not crashed.exists() and latest_checkpoint(tmp_path).name == "step_00000002"
    assert load_checkpoint(tmp_path).model["w"][0] == 2.0
    assert resolve_checkpoint(tmp_path / "step_00000001").name == "step_00000001"
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_checkpoint(tmp_path / "step_00000001" / "model" / "w" / "c")
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="step_00000009, which does not exist"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize(("keep_last", "kept"), [(2, [3, 4]), (0, [1, 2, 3, 4])])
def test_keep_last(tmp_path, keep_last, kept):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {}, {}, keep_last=keep_last)
    assert [int(p.name[5:]) for p in list_checkpoints(tmp_path)] == kept


SAVER = """
import sys, torch
from toolkit.checkpoint import save_checkpoint
from toolkit.checkpoint import latest_checkpoint
root = sys.argv[1]
latest = latest_checkpoint(root)  # continue like a resumed run
first = int(latest.name[5:]) + 1 if latest else 1
for step in range(first, first + 1000):
    tensors = {f"t{i}": torch.full((256, 256), float(step)) for i in range(8)}  # 2 MB a step
    save_checkpoint(root, step, tensors, {"t0/exp_avg": tensors["t0"]}, {"step": step}, keep_last=3)
"""


def test_sigkill_at_random_moments_never_loses_the_latest(tmp_path):
    rng = random.Random(1234)
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], env=env)
        time.sleep(rng.uniform(1.0, 2.5))  # import takes ~1 s; then saves run back to back
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_checkpoint(root)
        if latest is None:
            continue
        ckpt = load_checkpoint(root)
        step = ckpt.metadata["step"]
        assert latest.name == f"step_{step:08d}"
        assert all(torch.equal(t, torch.full((256, 256), float(step))) for t in ckpt.model.values())
        for published in list_checkpoints(root):  # nothing published is half-written
            load_checkpoint(published)
    assert latest_checkpoint(root) is not None


def test_model_and_optimizer_state_resume_bit_identically(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(model, opt, seed):
        g = torch.Generator().manual_seed(seed)
        model(torch.randn(16, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    model, opt = make()
    for s in range(3):
        step(model, opt, s)
    save_checkpoint(tmp_path, 3, model_tensors(model), optimizer_tensors(model, opt), {})
    fresh, fresh_opt = make()
    step(fresh, fresh_opt, 99)  # different state beforehand: restore must overwrite it
    ckpt = load_checkpoint(tmp_path)
    restore_model(fresh, ckpt)
    restore_optimizer(fresh, fresh_opt, ckpt)
    step(model, opt, 3)
    step(fresh, fresh_opt, 3)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)

    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Linear(9, 2))
    with pytest.raises(CheckpointError, match=r"0.weight has shape \(8, 4\), model has \(9, 4\)"):
        restore_model(other, ckpt)
