"""toolkit.checkpoint.store: bit-exact round trips, plain-zarr reads, CRC32C, the commit protocol,
SIGKILL crash safety, retention, and the model/optimizer seam in toolkit.checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from tests.whole_checkpoints import load_checkpoint, save_checkpoint
from toolkit.checkpoint import (
    CheckpointError,
    arrays,
    chunks,
    latest_checkpoint,
    list_checkpoints,
    placement,
    resolve_checkpoint,
    store,
)
from toolkit.checkpoint.store import FORMAT_VERSION, step_dirname

REPO = Path(__file__).resolve().parents[1]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of `t` as an integer tensor (so NaN payloads and -0.0 compare exactly)."""
    t = t.detach().contiguous()
    if t.dtype.is_floating_point:
        return t.view(_INT_VIEW[t.element_size()])
    return t


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, what
    assert got.shape == want.shape, what
    assert torch.equal(bits(got), bits(want)), what


def bf16_from_bits(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


# +0, -0, +inf, -inf, quiet NaN, NaN with payload, negative NaN, smallest/largest subnormals of
# both signs, a mid subnormal, 1.0, -2.0, largest finite, smallest normal.
SPECIAL_BF16 = [
    0x0000,
    0x8000,
    0x7F80,
    0xFF80,
    0x7FC0,
    0x7FC1,
    0xFFC0,
    0x0001,
    0x8001,
    0x007F,
    0x807F,
    0x0040,
    0x3F80,
    0xC000,
    0x7F7F,
    0x0080,
]


def special_bf16() -> torch.Tensor:
    return bf16_from_bits(SPECIAL_BF16)


def special_fp32() -> torch.Tensor:
    raw = np.array(
        [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FC00123, 0x00000001,
         0x807FFFFF, 0x3F800000, 0x7F7FFFFF],
        dtype=np.uint32,
    )  # fmt: skip
    return torch.from_numpy(raw.view(np.int32)).view(torch.float32)


def special_fp16() -> torch.Tensor:
    raw = np.array(
        [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7E01, 0x0001, 0x83FF, 0x3C00, 0x7BFF],
        dtype=np.uint16,
    )
    return torch.from_numpy(raw.view(np.int16)).view(torch.float16)


def sample_tensors() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = {
        "layers.0.bf16": torch.cat([special_bf16(), torch.randn(16).bfloat16()]).reshape(4, 8),
        "layers.0.fp32": torch.cat([special_fp32(), torch.randn(14)]).reshape(2, 3, 4),
        "layers.0.fp16": torch.cat([special_fp16(), torch.randn(5).half()]).reshape(3, 5),
        "layers.0.int64": torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1, 12345678901234]),
        "scalar.fp32": torch.tensor(-0.0),
        "scalar.bf16": torch.tensor(float("nan")).bfloat16(),
        "scalar.int64": torch.tensor(7, dtype=torch.int64),
        "transposed": torch.randn(5, 3).t(),  # not contiguous
        "zeros": torch.zeros(3, 3),
    }
    optim = {
        "layers.0.fp32/exp_avg": torch.randn(2, 3, 4),
        "layers.0.fp32/exp_avg_sq": torch.rand(2, 3, 4),
        "layers.0.fp32/step": torch.tensor(3.0),
        "layers.0.bf16/exp_avg": torch.randn(4, 8),
    }
    return model, optim


METADATA = {
    "step": 3,
    "tokens": 123456789012,
    "lr": 3e-4,
    "flag": True,
    "none": None,
    "name": "hybrid \u00e9\u4e2d",
    "nested": {"a": [1, 2.5, "x", [False, None]], "b": {}},
}


def test_round_trip_is_bit_exact(tmp_path):
    model, optim = sample_tensors()
    path = save_checkpoint(tmp_path, 3, model, optim, METADATA)
    assert path == tmp_path / "step_00000003"
    for where in (tmp_path, path):  # root (via latest) and step directory
        ckpt = load_checkpoint(where)
        assert ckpt.path == path
        assert set(ckpt.model) == set(model)
        assert set(ckpt.optim) == set(optim)
        for name, t in model.items():
            assert_bit_equal(ckpt.model[name], t, name)
        for name, t in optim.items():
            assert_bit_equal(ckpt.optim[name], t, name)
        assert ckpt.metadata == METADATA
        assert json.dumps(ckpt.metadata, sort_keys=True) == json.dumps(METADATA, sort_keys=True)
    ckpt = load_checkpoint(path)
    assert ckpt.model["scalar.fp32"].dim() == 0
    assert ckpt.model["scalar.bf16"].dtype == torch.bfloat16
    assert ckpt.model["layers.0.int64"].dtype == torch.int64
    # Loaded tensors are usable (writable, right values as numbers too).
    ckpt.model["zeros"].add_(1)
    assert torch.equal(ckpt.model["zeros"], torch.ones(3, 3))


def test_round_trip_multi_chunk_array(tmp_path, monkeypatch):
    # Force small chunks so arrays are split along dim 0 into several chunk files.
    monkeypatch.setattr(placement, "MAX_CHUNK_BYTES", 64)
    t = torch.randn(10, 4)  # 16 bytes/row -> 4 rows/chunk -> 3 chunks
    b = torch.cat([special_bf16(), special_bf16()]).reshape(8, 4)
    path = save_checkpoint(tmp_path, 1, {"w": t, "b": b}, {}, {})
    chunk_files = sorted(p for p in (path / "model" / "w" / "c").rglob("*") if p.is_file())
    assert len(chunk_files) == 3
    ckpt = load_checkpoint(path)
    assert_bit_equal(ckpt.model["w"], t)
    assert_bit_equal(ckpt.model["b"], b)
    chunk_files[1].unlink()  # a middle chunk
    with pytest.raises(CheckpointError, match=r"model/w.*chunk file c/1/0 is missing"):
        load_checkpoint(path)


def test_bf16_plain_zarr_read(tmp_path):
    t = torch.cat([special_bf16(), torch.randn(32).bfloat16()]).reshape(6, 8)
    path = save_checkpoint(tmp_path, 1, {"emb.weight": t}, {}, {})
    group = zarr.open_group(path, mode="r")
    arr = group["model/emb.weight"]
    assert arr.attrs["dtype"] == "bfloat16"
    assert arr.dtype == np.uint16
    assert arr.shape == (6, 8)
    as_f32 = (arr[...].astype(np.uint32) << 16).view(np.float32)
    want = t.float().numpy()
    assert as_f32.dtype == np.float32
    np.testing.assert_array_equal(as_f32, want)  # NaN == NaN here
    assert np.array_equal(as_f32.view(np.uint32), want.view(np.uint32))  # and bitwise
    assert np.signbit(as_f32.ravel()[1]) and as_f32.ravel()[1] == 0.0  # -0.0 survives
    # The documented torch route.
    back = torch.from_numpy(arr[...].view(np.int16)).view(torch.bfloat16)
    assert_bit_equal(back, t)
    # Other dtypes are stored natively, with their torch name as the attribute.
    path = save_checkpoint(tmp_path, 2, {"w": torch.randn(3), "i": torch.arange(3)}, {}, {})
    group = zarr.open_group(path, mode="r")
    assert group["model/w"].attrs["dtype"] == "float32" and group["model/w"].dtype == np.float32
    assert group["model/i"].attrs["dtype"] == "int64" and group["model/i"].dtype == np.int64


@pytest.mark.parametrize(
    "shape, dtype, chunks",
    [((6, 4), "float32", (3, 4)), ((), "float32", ()), ((7,), "bfloat16", (7,)),
     ((5,), "uint8", (5,)), ((2, 3), "int64", (1, 3))],
)  # fmt: skip
def test_array_metadata_is_what_zarr_writes(tmp_path, shape, dtype, chunks):
    """The store writes each zarr.json itself (zarr's API costs ~2 ms per array, serialised):
    the same document zarr-python writes, and zarr's reading of it the same array."""
    spec = store.ArraySpec("optim/w/exp_avg", shape, dtype, chunks)
    theirs = zarr.open_group(tmp_path / "theirs", mode="w").create_array(
        spec.key,
        shape=shape,
        dtype=arrays._numpy_dtype(dtype),
        chunks=chunks,
        fill_value=0,
        compressors=[Crc32cCodec()],
        attributes={"dtype": dtype},
    )
    ours = tmp_path / "ours"
    zarr.open_group(ours, mode="w")
    store.create_arrays(ours, [spec])
    for key in ("optim", "optim/w", spec.key):
        mine = json.loads((ours / key / "zarr.json").read_text())
        assert mine == json.loads((tmp_path / "theirs" / key / "zarr.json").read_text()), key
    arr = zarr.open_group(ours, mode="r")[spec.key]
    assert (arr.shape, arr.chunks, arr.dtype) == (theirs.shape, theirs.chunks, theirs.dtype)
    assert store.array_keys(ours, "optim") == [spec.key]
    stored = store.open_array(ours, spec.key)
    assert (stored.shape, stored.chunks, stored.dtype) == (shape, chunks, theirs.dtype)


def test_an_array_zarr_compressed_is_refused_by_name(tmp_path):
    """The toolkit reads chunks itself; an array with other codecs (here zarr's default
    compression) is an error naming it, not garbage."""
    group = zarr.open_group(tmp_path, mode="w")
    group.create_array("model/w", shape=(4,), dtype="float32")
    group.create_array(
        "model/big",
        shape=(4,),
        dtype="float32",
        serializer=BytesCodec(endian="big"),
        compressors=[Crc32cCodec()],
    )
    for key in ("model/w", "model/big"):
        with pytest.raises(CheckpointError, match=rf"'{key}' is stored with codecs"):
            store.open_array(tmp_path, key)
    with pytest.raises(CheckpointError, match=r"'model/x' is missing"):
        store.open_array(tmp_path, "model/x")


def _chunk_files(array_dir: Path) -> list[Path]:
    c = array_dir / "c"
    if c.is_file():  # a 0-d array's single chunk
        return [c]
    return sorted(p for p in c.rglob("*") if p.is_file())


def _flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("index", [0, 7, -1], ids=["first", "data", "checksum"])
@pytest.mark.parametrize(
    "array", ["model/b.weight", "model/scalar", "optim/b.weight/exp_avg", "model/zeros"]
)
def test_flipped_byte_is_detected_and_named(tmp_path, array, index):
    model = {
        "a.weight": torch.randn(4, 4),
        "b.weight": torch.randn(4, 4),
        "scalar": torch.tensor(1.5),
        "zeros": torch.zeros(8),
    }
    optim = {"b.weight/exp_avg": torch.randn(4, 4), "b.weight/step": torch.tensor(1.0)}
    path = save_checkpoint(tmp_path, 5, model, optim, {})
    files = _chunk_files(path / array)
    assert len(files) == 1
    _flip_byte(files[0], index)
    for where in (tmp_path, path):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(where)
        assert repr(array) in str(err.value)  # e.g. 'model/b.weight'
        assert str(path) in str(err.value)


@pytest.mark.parametrize("array", ["model/w", "model/zeros", "model/zero_scalar"])
def test_missing_chunk_file_is_an_error(tmp_path, array):
    model = {"w": torch.randn(3, 5), "zeros": torch.zeros(4, 6), "zero_scalar": torch.tensor(0.0)}
    path = save_checkpoint(tmp_path, 1, model, {}, {})
    # All-zero tensors are written as chunk files too (otherwise zarr reads fill values silently).
    assert len(_chunk_files(path / "model" / "zeros")) == 1
    assert (path / "model" / "zero_scalar" / "c").is_file()
    files = _chunk_files(path / array)
    assert len(files) == 1
    files[0].unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert repr(array) in str(err.value)
    assert "missing" in str(err.value)


def test_leftover_tmp_dir_is_ignored_and_cleaned(tmp_path):
    w1 = {"w": torch.full((3,), 1.0)}
    save_checkpoint(tmp_path, 1, w1, {}, {"step": 1})
    # A save of step 2 that crashed midway: garbage, a partial zarr group, a stray array.
    tmp = tmp_path / ".tmp-step_00000002"
    (tmp / "model" / "stale" / "c").mkdir(parents=True)
    (tmp / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')  # truncated
    (tmp / "model" / "stale" / "c" / "0").write_bytes(os.urandom(100))
    (tmp / "garbage.bin").write_bytes(os.urandom(1000))
    trash = tmp_path / ".trash-step_00000000"
    (trash / "model").mkdir(parents=True)

    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert list_checkpoints(tmp_path) == [tmp_path / "step_00000001"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.metadata == {"step": 1}
    assert_bit_equal(ckpt.model["w"], w1["w"])

    w2 = {"w": torch.full((3,), 2.0)}
    path = save_checkpoint(tmp_path, 2, w2, {}, {"step": 2})
    assert not tmp.exists()
    assert not trash.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000001",
        "step_00000002",
    ]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path
    assert set(ckpt.model) == {"w"} and ckpt.optim == {}
    assert_bit_equal(ckpt.model["w"], w2["w"])


def test_latest_points_to_newest_and_published_steps_are_never_overwritten(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert list_checkpoints(tmp_path) == []
    assert list_checkpoints(tmp_path / "nope") == []
    for step in (1, 10, 2, 100):
        path = save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, {})
        assert (tmp_path / "latest").read_text().strip() == step_dirname(step)
        assert latest_checkpoint(tmp_path) == path
        assert load_checkpoint(tmp_path).model["w"][0].item() == step
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000001",
        "step_00000002",
        "step_00000010",
        "step_00000100",
    ]
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path, 10, {"w": torch.zeros(2)}, {}, {})
    assert load_checkpoint(tmp_path / "step_00000010").model["w"][0].item() == 10
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000100"


def test_latest_naming_missing_dir_is_an_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {}, {})
    (tmp_path / "latest").write_text("step_00000007\n")
    for fn in (latest_checkpoint, resolve_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="step_00000007"):
            fn(tmp_path)


def test_resolve_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, {"w": torch.zeros(2)}, {}, {})
    step2 = save_checkpoint(root, 2, {"w": torch.ones(2)}, {}, {})
    assert resolve_checkpoint(root) == step2
    assert resolve_checkpoint(str(root)) == step2
    assert resolve_checkpoint(root / "step_00000001") == root / "step_00000001"
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pt").write_bytes(b"\0" * 10)
    for bad in (empty, other, tmp_path / "does-not-exist", tmp_path):
        with pytest.raises(CheckpointError, match="neither"):
            resolve_checkpoint(bad)
        with pytest.raises(CheckpointError):
            load_checkpoint(bad)
    # A zarr group that is not a checkpoint (here: a sub-group of one) is rejected on load.
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(step2 / "model")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w").attrs["format"] = "something-else"
    with pytest.raises(CheckpointError, match="something-else"):
        load_checkpoint(plain)


def test_newer_format_version_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {}, {})
    zarr.open_group(path, mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep_last,kept", [(2, [4, 5]), (1, [5]), (0, [1, 2, 3, 4, 5])])
def test_keep_last(tmp_path, keep_last, kept):
    for step in range(1, 6):
        save_checkpoint(
            tmp_path, step, {"w": torch.full((2,), float(step))}, {}, {}, keep_last=keep_last
        )
        assert latest_checkpoint(tmp_path) == tmp_path / step_dirname(step)
        n = len(list_checkpoints(tmp_path))
        assert n == (min(step, keep_last) if keep_last else step)
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_dirname(s) for s in kept]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["latest", *(step_dirname(s) for s in kept)]
    )  # no .trash-/.tmp- leftovers
    for s in kept:
        assert load_checkpoint(tmp_path / step_dirname(s)).model["w"][0].item() == s


# ---- crash safety with a real SIGKILL ----

SHAPES = {"model": {"w": (512, 1024), "b": (256, 1024)}, "optim": {"w/exp_avg": (512, 1024)}}


def expected_tensors(step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What the child process below saves for `step` (about 4.5 MB)."""
    model = {
        "w": torch.full(SHAPES["model"]["w"], float(step)),
        "b": torch.full(SHAPES["model"]["b"], float(step)).bfloat16(),
    }
    optim = {"w/exp_avg": torch.full(SHAPES["optim"]["w/exp_avg"], -float(step))}
    return model, optim


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from tests.whole_checkpoints import save_checkpoint

    root, step = sys.argv[1], int(sys.argv[2])
    print("ready", flush=True)
    while True:
        model = {
            "w": torch.full((512, 1024), float(step)),
            "b": torch.full((256, 1024), float(step)).bfloat16(),
        }
        optim = {"w/exp_avg": torch.full((512, 1024), -float(step))}
        save_checkpoint(root, step, model, optim, {"step": step}, keep_last=KEEP_LAST)
        step += 1
    """
)
KEEP_LAST = 3


def check_published(root: Path) -> Path | None:
    """Every published step loads and holds its step's values; `latest` is one of them."""
    published = list_checkpoints(root)
    assert len(published) <= KEEP_LAST + 1  # a kill between publish and retention: one extra
    for path in published:
        step = int(path.name.removeprefix("step_"))
        ckpt = load_checkpoint(path)
        assert ckpt.metadata == {"step": step}
        model, optim = expected_tensors(step)
        assert set(ckpt.model) == set(model) and set(ckpt.optim) == set(optim)
        for name, t in model.items():
            assert_bit_equal(ckpt.model[name], t, f"{path}: {name}")
        for name, t in optim.items():
            assert_bit_equal(ckpt.optim[name], t, f"{path}: {name}")
    latest = latest_checkpoint(root)
    if latest is None:
        # Killed before the first pointer write: at most the one just-renamed step exists.
        assert len(published) <= 1
        return None
    assert latest in published
    # A kill between rename and pointer update leaves at most one step newer than `latest`.
    assert len([p for p in published if p.name > latest.name]) <= 1
    assert load_checkpoint(root).path == latest
    return latest


@pytest.mark.long  # make test-long (CI runs it); the sharded writer's kill stays here
def test_sigkill_mid_save_never_corrupts(tmp_path):
    root = tmp_path / "ckpt"
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = CHILD.replace("KEEP_LAST", str(KEEP_LAST))
    latest_steps = []
    interrupted = 0
    start = time.monotonic()
    for it in range(8):
        errlog = tmp_path / f"child{it}.err"
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", script, str(root), str(1000 * (it + 1))],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
            )
            try:
                line = proc.stdout.readline()
                assert line.strip() == b"ready", errlog.read_text()
                time.sleep(rng.uniform(0.0, 0.6))
                assert proc.poll() is None, f"child died on its own: {errlog.read_text()}"
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, errlog.read_text()
        interrupted += any(root.glob(".tmp-step_*")) or any(root.glob(".trash-step_*"))
        latest = check_published(root)
        if latest is not None:
            latest_steps.append(int(latest.name.removeprefix("step_")))
    assert time.monotonic() - start < 60
    # Progress was made and `latest` only moves forward.
    assert latest_steps, "no checkpoint was ever published"
    assert latest_steps == sorted(latest_steps)
    # The next save in a healthy process cleans up whatever the kills left behind.
    model, optim = expected_tensors(99_999)
    final = save_checkpoint(root, 99_999, model, optim, {"step": 99_999}, keep_last=KEEP_LAST)
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".trash-*"))
    assert latest_checkpoint(root) == final
    assert len(list_checkpoints(root)) == KEEP_LAST
    check_published(root)
    print(f"{interrupted} of 8 kills left a partial write behind")


@pytest.mark.parametrize("change", ["truncated", "extended"])
@pytest.mark.parametrize("part", ["whole", "slice"], ids=["read into place", "read and copy"])
def test_chunk_file_of_the_wrong_size_is_detected(tmp_path, change, part):
    """A whole chunk is read straight into the result, a partial one through a buffer: both
    check the file's size, as well as its checksum."""
    w = torch.randn(6, 4)
    path = save_checkpoint(tmp_path, 1, {"w": w}, {}, {})
    arr = store.open_array(store.open_checkpoint(path), "model/w")
    index = (slice(None),) if part == "whole" else (slice(1, 3),)
    assert torch.equal(store.read_region(arr, index, "here"), w[index])
    (chunk,) = _chunk_files(path / "model" / "w")
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1] if change == "truncated" else data + b"\0")
    with pytest.raises(CheckpointError, match=r"'model/w'.*corrupted"):
        store.read_region(arr, index, "here")


@pytest.mark.long  # make test-long (CI runs it): a benchmark's CPU smoke run
def test_checkpoint_io_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/checkpoint_io.py end to end at the tiny recipe: dd of zeros and of random
    bytes, save, two restores each paired with a dd read, and the ratios between them."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "io.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks/checkpoint_io.py"), "--quick"]
        + ["--recipe", str(root / "recipes/tiny_hybrid.toml"), "--dir", str(tmp_path / "scratch")]
        + ["--json", str(out), "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    for key in ("save_gbps", "load_gbps", "dd_write_gbps", "save_vs_dd_write"):
        assert got[key] > 0, key
    if "dd_random_write_gbps" in got:  # when /dev/shm has room
        assert got["save_vs_dd_random_write"] > 0 and got["load_vs_dd_random_read"] > 0
    rounds = json.loads(got["rounds"])
    assert len(rounds) == 2 and all(dd_read > 0 and load > 0 for dd_read, load in rounds)
    assert got["load_vs_dd_read_rounds_median"] > 0
    assert not (tmp_path / "scratch").exists()  # the scratch directory is removed


def test_early_writeback_saves_the_same_checkpoint(tmp_path, monkeypatch):
    """TOOLKIT_CHECKPOINT_EARLY_WRITEBACK's path: every chunk file is handed to
    sync_file_range as soon as it is written, and the checkpoint reads back bit-exactly."""
    start = chunks._load_sync_file_range()
    started = []
    monkeypatch.setattr(chunks, "_start_writeback", lambda fd: started.append(start(fd)))
    model = {"w": torch.randn(6, 4), "b": special_bf16()}
    path = save_checkpoint(tmp_path, 1, model, {"w/exp_avg": torch.randn(6, 4)}, {})
    assert len(started) == 3 and set(started) == {0}  # one call per chunk file, each succeeded
    ckpt = load_checkpoint(path)
    for key, value in model.items():
        assert_bit_equal(ckpt.model[key], value)


def test_read_region_straight_into_a_tensor(tmp_path, monkeypatch):
    """`out=`: the chunks land in the given tensor's memory (a restored parameter needs no fresh
    buffer and no copy), whole chunks and a padded edge chunk alike; a tensor of another dtype
    or shape is refused."""
    monkeypatch.setattr(placement, "MAX_CHUNK_BYTES", 64)
    w, b = torch.randn(10, 4), torch.randn(3, 8).bfloat16()  # 3 chunks (the last one padded)
    path = save_checkpoint(tmp_path, 1, {"w": w, "b": b}, {}, {})
    group = store.open_checkpoint(path)
    for key, want in (("model/w", w), ("model/b", b)):
        arr = store.open_array(group, key)
        into = torch.full_like(want, 7)
        assert store.can_read_into(arr, (), into)
        got = store.read_region(arr, (), "here", out=into)
        assert got is into and into.data_ptr() == got.data_ptr()
        assert_bit_equal(into, want)
    arr = store.open_array(group, "model/w")
    for wrong in (
        torch.zeros(10, 4, dtype=torch.float64),
        torch.zeros(9, 4),
        torch.zeros(4, 10).t(),
    ):
        assert not store.can_read_into(arr, (), wrong)
        with pytest.raises(ValueError, match="cannot read"):
            store.read_region(arr, (), "here", out=wrong)
    into = torch.zeros(2, 4)  # a region of the array
    assert_bit_equal(store.read_region(arr, (slice(4, 6),), "here", out=into), w[4:6])
