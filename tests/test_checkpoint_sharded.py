"""Sharded checkpoints of a HybridLM: placement of TP shards in the global arrays, lazy reads at
other layouts, optimizer state, asynchronous saves. Multi-process saves and resumes at other
layouts run in tests/test_parallel.py."""

import json
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from tests.whole_checkpoints import load_checkpoint
from toolkit.checkpoint import (
    CheckpointError,
    CheckpointSaver,
    Comm,
    RankView,
    ReadCounter,
    placement,
    planned_writes,
    read_metadata,
    restore,
    snapshot,
    store,
    write_checkpoint,
)
from toolkit.checkpoint.sharded import merge_plans
from toolkit.model import HybridLM
from toolkit.parallel import apply_tp

CUDA = torch.cuda.is_available()
VOCAB = 259  # the byte tokenizer's: padded to 384 at TP=1, 512 at TP=2 and TP=4


def model_config(**overrides):
    # Groups and heads divisible by 4, SwiGLU for the gate/up components.
    return tiny_model_config(
        num_query_groups=4, mamba_num_groups=4, mlp_activation="swiglu", **overrides
    )


def full_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(model_config(**overrides), vocab_size=VOCAB)
    with torch.no_grad():  # no two seeds share a tensor (norms start as ones)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def sharded(model: HybridLM, tp: int, rank: int) -> HybridLM:
    """Rank `rank`'s shard of a TP=`tp` model, cut by the real TP code (no process group is
    needed to cut; only the forward pass would communicate)."""
    cfg = model.cfg
    shard = HybridLM(cfg, vocab_size=VOCAB, tp=tp)
    with torch.no_grad():
        for p, q in zip(shard.parameters(), model.parameters()):
            rows = min(p.shape[0], q.shape[0])
            p.zero_()
            p[:rows] = q[:rows]  # the same weights, padded for this TP degree
    apply_tp(shard, group=None, tp=tp, rank=rank)
    return shard


def view(model: HybridLM, tp: int = 1, rank: int = 0) -> RankView:
    return RankView(model.cfg, VOCAB, tp, rank)


def stored_arrays(model: HybridLM) -> dict[str, torch.Tensor]:
    """The global arrays a TP=1 writer stores, by array name."""
    v = view(model)
    return {
        piece.array: p.detach()[piece.local_index()]
        for name, p in model.named_parameters()
        for piece in v.pieces(name, p)
    }


@pytest.mark.parametrize("tp", [2, 4])
def test_placement_agrees_with_the_tensor_parallel_cut(tp):
    model = full_model()
    arrays = stored_arrays(model)
    assert {"layers.0.mixer.in_proj.weight.dt", "layers.2.mixer.linear_fc1.weight.up"} <= set(
        arrays
    )
    assert arrays["embedding.weight"].shape[0] == VOCAB  # padding is not stored
    for rank in range(tp):
        shard = sharded(model, tp, rank)
        for name, p in shard.named_parameters():
            assert placement.split_dim(name) == getattr(p, "_tp_dim", None), name
            # Assembling this rank's tensor from the global arrays gives exactly its TP shard.
            got = torch.zeros_like(p)
            for piece in view(model, tp, rank).pieces(name, p):
                got[piece.local_index()] = arrays[piece.array][piece.global_index()]
            want = p.detach().clone()
            if name in placement.VOCAB_PARAMS:  # padding rows are not stored: zero on reading
                start = rank * p.shape[0]
                want[max(0, min(p.shape[0], VOCAB - start)) :] = 0
            assert torch.equal(got, want), (name, rank)


def test_a_component_that_does_not_split_is_an_error():
    cfg = model_config()
    with pytest.raises(
        ValueError, match=r"in_proj.weight: component z of size 64 does not split into TP=3"
    ):
        placement.pieces("layers.0.mixer.in_proj.weight", (1, 32), cfg, VOCAB, 3, 0, 4)


def save_single(root, model, optimizer=None, step=1, meta=None):
    writes = snapshot(planned_writes(model, optimizer, view(model)))
    return write_checkpoint(root, step, writes, meta or {"step": step}, Comm())


@pytest.mark.parametrize("tp", [2, 4])
def test_lazy_restore_reads_only_the_slices_it_needs(tmp_path, monkeypatch, tp):
    monkeypatch.setattr(placement, "MIN_CHUNK_BYTES", 0)  # tiny arrays split like large ones
    model = full_model()
    path = save_single(tmp_path, model)
    for rank in range(tp):
        shard = sharded(full_model(seed=1), tp, rank)
        before = {n: p.detach().clone() for n, p in shard.named_parameters()}
        counter = ReadCounter()
        restore(path, shard, None, view(model, tp, rank), counter=counter)
        want = sharded(model, tp, rank)
        needed = 0
        for (name, p), q in zip(shard.named_parameters(), want.parameters()):
            assert torch.equal(p, q) or name in placement.VOCAB_PARAMS, name
            if name in placement.VOCAB_PARAMS:
                covered = sum(
                    x.local.stop - x.local.start for x in view(model, tp, rank).pieces(name, p)
                )
                assert torch.equal(p[:covered], q[:covered]) and not p[covered:].any()
            assert not torch.equal(p, before[name]) or not before[name].any(), name
            for piece in view(model, tp, rank).pieces(name, p):
                rows = torch.zeros(piece.shape)[piece.global_index()]
                needed += rows.numel() * p.element_size()
                if name in placement.VOCAB_PARAMS and piece.region.stop == VOCAB:
                    # zarr stores the array's last chunk whole: 259 rows end inside a chunk
                    padding = -VOCAB % piece.chunks[0]
                    needed += padding * piece.shape[1] * p.element_size()
        # No read amplification: every chunk read is wholly needed (its 4-byte checksum aside;
        # these chunks are tiny, real ones are >= 1 MiB, see benchmarks/checkpoint_io.py).
        assert counter.payload_bytes == needed


def adamw(model, fused=None):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)


def train_step(model, optimizer, tokens):
    optimizer.zero_grad()
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits[..., :VOCAB].flatten(0, 1), tokens[:, 1:].flatten()
    )
    loss.backward()
    optimizer.step()


# The fused AdamW (what training uses on GPUs) keeps its step counts on the parameters' device.
@pytest.mark.parametrize(
    "device, fused",
    [
        ("cpu", None),
        ("cpu", True),
        pytest.param("cuda", True, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    ],
)
def test_model_and_optimizer_restore_bit_identical(tmp_path, device, fused):
    batches = [
        torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(i)).to(device)
        for i in range(3)
    ]
    # The reference Mamba path everywhere: on a GPU the fused kernels' autotuning for these
    # shapes would take minutes, and this tests the optimizer state, not the kernels.
    model = full_model(kernels="reference").to(device)
    opt = adamw(model, fused)
    for tokens in batches[:2]:
        train_step(model, opt, tokens)
    save_single(tmp_path, model, opt)

    model2 = full_model(seed=5, kernels="reference").to(device)
    opt2 = adamw(model2, fused)
    restore(tmp_path, model2, opt2, view(model2))
    # Weights only: its optimizer starts from scratch.
    model3 = full_model(seed=5, kernels="reference").to(device)
    opt3 = adamw(model3, fused)
    restore(tmp_path, model3, None, view(model3))
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        train_step(m, o, batches[2])
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        rows = VOCAB if name in placement.VOCAB_PARAMS else None  # padding rows are not stored
        assert torch.equal(p[:rows], p2[:rows]), name
        for key, value in opt.state[p].items():
            other = opt2.state[p2][key]
            if value.dim():
                value, other = value[:rows], other[:rows]
            assert torch.equal(value, other), (name, key)
    assert not all(torch.equal(p, p3) for p, p3 in zip(model.parameters(), model3.parameters()))


def test_a_cpu_restore_reads_the_parameters_straight_into_place(tmp_path, monkeypatch):
    """Every parameter is read into its own memory, packed ones (in_proj: z, x, B, C, dt) a
    component's rows at a time: no buffer, no copy. The vocabulary padding rows, which no array
    covers, are zeroed. Each parameter's version counter moves, as an in-place op's would."""
    model = full_model()
    save_single(tmp_path, model)
    model2 = full_model(seed=5)
    versions = [p._version for p in model2.parameters()]
    in_place, real = [], store.read_region

    def spy(arr, index, where, counter=None, out=None):
        in_place.append(out is not None)
        return real(arr, index, where, counter, out=out)

    monkeypatch.setattr(store, "read_region", spy)
    restore(tmp_path, model2, None, view(model2))
    assert in_place and all(in_place)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        rows = VOCAB if name in placement.VOCAB_PARAMS else None
        assert torch.equal(p[:rows], p2[:rows]), name
        if rows is not None:
            assert p2[rows:].numel() and not p2[rows:].any(), name  # padding: zero
    assert all(p._version > v for p, v in zip(model2.parameters(), versions))


def test_a_corrupted_chunk_stops_the_restore_with_an_error_naming_it(tmp_path):
    """Tensors go into place as they are read (no second copy of the state in memory): a chunk
    found corrupted stops the restore, and the error names it and says the model is incomplete."""
    model = full_model()
    opt = adamw(model)
    train_step(model, opt, torch.randint(0, VOCAB, (2, 17)))
    path = save_single(tmp_path, model, opt)
    chunk = path / "optim" / "layers.2.norm.weight" / "exp_avg" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x5A
    chunk.write_bytes(bytes(data))
    other = full_model(seed=3)
    with pytest.raises(
        CheckpointError,
        match=r"'optim/layers.2.norm.weight/exp_avg': chunk c/0 is corrupted.*model is incomplete",
    ):
        restore(path, other, adamw(other), view(other))
    restore(path, other, None, view(other))  # the weights alone are intact
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        rows = VOCAB if name in placement.VOCAB_PARAMS else None  # padding rows are not stored
        assert torch.equal(p[:rows], q[:rows]), name


def test_damaged_array_metadata_is_a_checkpoint_error_naming_it(tmp_path):
    """A resume passes over a checkpoint that raises CheckpointError: a damaged zarr.json must be
    one (not a JSONDecodeError or KeyError from deep inside), naming the file or array."""
    model = full_model()
    path = save_single(tmp_path, model)
    meta = path / "model" / "layers.1.mixer.linear_proj.weight" / "zarr.json"
    text = meta.read_bytes()
    meta.write_bytes(text[: len(text) // 2])  # truncated
    with pytest.raises(CheckpointError, match=f"{meta}: unreadable array metadata"):
        restore(path, full_model(seed=3), None, view(model))
    meta.write_bytes(text.replace(b'"shape"', b'"shap\xc3\xa9"'))  # parses, a key is wrong
    with pytest.raises(
        CheckpointError, match="array 'model/layers.1.mixer.linear_proj.weight' has malformed"
    ):
        restore(path, full_model(seed=3), None, view(model))


def test_restore_rejects_another_model(tmp_path):
    path = save_single(tmp_path, full_model())
    wider = full_model(hidden_size=64)
    with pytest.raises(
        CheckpointError,
        match=r"model/embedding.weight has shape \(259, 32\), the model needs \(259, 64\)",
    ):
        restore(path, wider, None, view(wider))
    deeper = full_model(num_layers=5, pattern="M*-MM")
    with pytest.raises(CheckpointError, match=r"missing \['layers.4.mixer.A_log'"):
        restore(path, deeper, None, view(deeper))
    shallower = full_model(num_layers=3, pattern="M*-")
    with pytest.raises(CheckpointError, match=r"unexpected \['layers.3.mixer.A_log'"):
        restore(path, shallower, None, view(shallower))
    restore(path, shallower, None, view(shallower), whole=False)  # a pipeline stage: a subset


def test_the_store_is_json_and_chunks_only(tmp_path):
    model = full_model()
    opt = adamw(model)
    train_step(model, opt, torch.randint(0, VOCAB, (2, 9)))
    saver = CheckpointSaver(tmp_path, Comm())
    meta = {"step": 1, "layout": {"tp": 1}}
    path = saver.save(1, model, opt, view(model), meta)
    assert read_metadata(tmp_path) == meta
    for f in path.rglob("*"):
        if f.is_file():
            if f.name == "zarr.json":
                json.loads(f.read_text())
            else:  # a chunk: raw little-endian data and its CRC32C, never a pickle
                assert "/c" in str(f.relative_to(path)), f
                assert not f.read_bytes().startswith(b"\x80"), f
    ckpt = load_checkpoint(path)
    assert set(ckpt.optim) >= {"layers.0.mixer.in_proj.weight.z/exp_avg", "final_norm.weight/step"}
    assert store.array_keys(store.open_checkpoint(path), "rng") == ["rng/rank_00000/cpu"]


def test_async_save_returns_before_the_checkpoint_is_published(tmp_path, monkeypatch):
    release, publishing = threading.Event(), threading.Event()
    real_publish = store.publish

    def slow_publish(tmp, keep_last=0):
        publishing.set()
        assert release.wait(30)
        return real_publish(tmp, keep_last)

    monkeypatch.setattr(store, "publish", slow_publish)
    model = full_model()
    saver = CheckpointSaver(tmp_path, Comm(), asynchronous=True)
    assert saver.save(1, model, None, view(model), {"step": 1}) is None  # returned at once
    assert publishing.wait(30)
    with torch.no_grad():  # training goes on: the snapshot is unaffected
        for p in model.parameters():
            p.add_(1.0)
    assert not (tmp_path / "step_00000001").exists()
    release.set()
    assert saver.wait() == tmp_path / "step_00000001"
    restored = full_model(seed=3)
    restore(tmp_path, restored, None, view(restored))
    for (name, p), q in zip(restored.named_parameters(), full_model().parameters()):
        rows = VOCAB if name in placement.VOCAB_PARAMS else len(p)
        assert torch.equal(p[:rows], q[:rows]), name


def test_async_save_error_surfaces_in_the_training_thread(tmp_path):
    model = full_model()
    saver = CheckpointSaver(tmp_path, Comm(), asynchronous=True)
    saver.save(1, model, None, view(model), {"step": 1})
    assert saver.wait() is not None
    saver.save(1, model, None, view(model), {"step": 1})  # step 1 exists: never overwritten
    with pytest.raises(CheckpointError, match="background checkpoint failed.*already exists"):
        saver.wait()


def test_sharded_writers_must_cover_every_element():
    spec = store.ArraySpec("model/w", (4, 2), "float32", (2, 2))
    with pytest.raises(CheckpointError, match=r"model/w: the writers cover 4 of its 8 elements"):
        merge_plans([[(spec, (slice(0, 2),))]])
    with pytest.raises(CheckpointError, match=r"cover 12 of its 8"):
        merge_plans([[(spec, (slice(0, 2),))], [(spec, ())]])
    other = store.ArraySpec("model/w", (4, 2), "float32", (4, 2))
    with pytest.raises(CheckpointError, match="rank 1 describes model/w"):
        merge_plans([[(spec, (slice(0, 2),))], [(other, (slice(2, 4),))]])


def test_plain_zarr_reads_what_the_toolkit_writes(tmp_path, monkeypatch):
    """Chunks are written without zarr-python; zarr-python must read them as ordinary arrays
    (several chunks per array, a partial edge chunk on the 259-row vocabulary, 0-d steps)."""
    import numpy as np
    import zarr

    monkeypatch.setattr(placement, "MIN_CHUNK_BYTES", 0)
    model = full_model()
    opt = adamw(model)
    train_step(model, opt, torch.randint(0, VOCAB, (2, 9)))
    path = save_single(tmp_path, model, opt)
    ours = load_checkpoint(path)
    group = zarr.open_group(path, mode="r")
    assert group["model/embedding.weight"].chunks == (128, 32)  # 259 rows: 3 chunks, last partial
    for prefix, tensors in (("model", ours.model), ("optim", ours.optim)):
        for name, tensor in tensors.items():
            plain = np.asarray(group[f"{prefix}/{name}"][...])
            assert np.array_equal(plain, store.to_numpy(tensor)), name


SHARDED_CHILD = """
import os, sys, torch, torch.distributed as dist
from toolkit.checkpoint import Comm, store, write_checkpoint
root, step = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
comm = Comm(dist.new_group(backend="gloo"))
print("ready", flush=True)
while True:
    # Two writers, one array: each writes its half (1 MiB) of every step's tensor.
    spec = store.ArraySpec("model/w", (512, 1024), "float32", (256, 1024))
    half = torch.full((256, 1024), float(step))
    writes = [(spec, (slice(256 * rank, 256 * (rank + 1)),), half)]
    write_checkpoint(root, step, writes, {"step": step}, comm, keep_last=2)
    step += 1
"""


def test_sigkill_of_one_sharded_writer_never_corrupts(tmp_path):
    """Two ranks save together; one is killed at a random moment (the other is then stuck in a
    collective and killed too). The latest published checkpoint always loads and verifies."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from toolkit.distributed import free_port

    root = tmp_path / "ckpt"
    rng = random.Random(7)
    repo = str(Path(__file__).resolve().parents[1])
    published = []
    for it in range(3):
        port = str(free_port())
        procs = []
        for rank in range(2):
            env = dict(os.environ, PYTHONPATH=repo, RANK=str(rank), WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SHARDED_CHILD, str(root), str(1000 * (it + 1))],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        try:
            for proc in procs:
                assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.2, 1.5))
            procs[rng.randrange(2)].send_signal(signal.SIGKILL)
            time.sleep(0.2)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                proc.stdout.close()
        latest = store.latest_checkpoint(root)
        if latest is None:
            continue
        ckpt = load_checkpoint(root)  # every chunk read and its checksum checked
        step = int(latest.name.removeprefix("step_"))
        assert torch.equal(ckpt.model["w"], torch.full((512, 1024), float(step)))
        published.append(step)
    assert published and published == sorted(published)
