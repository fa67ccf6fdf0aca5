"""Sharded checkpoints of a HybridLM: every rank writes its own shards of the global arrays, in
parallel; any other layout reads back only the slices it needs.

Who writes what: a tensor-parallel shard is written by its TP rank, a replicated tensor (norms) by
TP rank 0; parameters by DP rank 0 of each model replica, optimizer state by the rank that owns it
(the ZeRO owner, or DP rank 0). Pipeline stages write their own blocks. Rank 0 creates the arrays,
checks that the writers cover every element exactly once, and publishes the checkpoint after all
ranks report success.

Coordination uses `Comm`, normally a gloo group reserved for checkpoints, so that an asynchronous
save can talk from its background thread while training uses the other groups.
"""

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import Any

import torch
import torch.distributed as dist
import zarr
from torch import nn

from toolkit.checkpoint import store
from toolkit.checkpoint.placement import Piece, pieces
from toolkit.checkpoint.store import ArraySpec, CheckpointError, ReadCounter, dtype_name
from toolkit.config import ModelConfig

log = logging.getLogger(__name__)
IO_THREADS = 8


@dataclass(frozen=True)
class RankView:
    """What placement needs to know about this rank: the model's global shape and where the rank
    sits in the layout."""

    cfg: ModelConfig
    vocab_size: int
    tp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0

    def pieces(self, name: str, tensor: torch.Tensor) -> list[Piece]:
        return pieces(
            name,
            tuple(tensor.shape),
            self.cfg,
            self.vocab_size,
            self.tp,
            self.tp_rank,
            tensor.element_size(),
        )


class Comm:
    """The collectives a save needs, over `group` (all ranks), or no-ops in a single process."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def gather(self, obj: Any) -> list[Any] | None:
        if self.group is None:
            return [obj]
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


# A write: (array spec, region of the array, the tensor to put there).
Write = tuple[ArraySpec, tuple[slice, ...], torch.Tensor]


def _specs(piece: Piece, tensor: torch.Tensor, key: str) -> ArraySpec:
    return ArraySpec(key, piece.shape, dtype_name(tensor.dtype), piece.chunks)


def planned_writes(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, view: RankView
) -> Iterator[Write]:
    """This rank's share of the checkpoint (views of the live tensors: copy before training on)."""
    owns = getattr(optimizer, "owns", None)
    for name, param in module.named_parameters():
        layout = view.pieces(name, param)
        replicated = layout[0].dim is None
        if replicated and view.tp_rank != 0:
            continue
        if view.dp_rank == 0:
            for piece in layout:
                local = param.detach()[piece.local_index()]
                yield _specs(piece, local, f"model/{piece.array}"), piece.global_index(), local
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        if not (owns(param) if owns is not None else view.dp_rank == 0):
            continue
        for key, value in state.items():
            value = torch.as_tensor(value).detach()
            for piece in layout:
                array = f"optim/{piece.array}/{key}"
                if value.dim() == 0:  # Adam's step count: with every piece, from TP rank 0
                    if view.tp_rank == 0:
                        yield ArraySpec(array, (), dtype_name(value.dtype), ()), (), value
                elif value.shape == param.shape:
                    local = value[piece.local_index()]
                    yield _specs(piece, local, array), piece.global_index(), local
                else:
                    raise CheckpointError(
                        f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, "
                        f"neither a scalar nor the parameter's {tuple(param.shape)}"
                    )


def rng_writes(rank: int) -> list[Write]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return [
        (ArraySpec(f"rng/rank_{rank:05d}/{kind}", tuple(s.shape), "uint8", tuple(s.shape)), (), s)
        for kind, s in states.items()
    ]


def snapshot(writes: Iterator[Write]) -> list[Write]:
    """CPU copies of the tensors to write, so training can change the originals."""
    return [(spec, index, t.detach().to("cpu", copy=True)) for spec, index, t in writes]


def _numel(shape: tuple[int, ...], index: tuple[slice, ...]) -> int:
    n = 1
    for d, size in enumerate(shape):
        sl = index[d] if d < len(index) else slice(None)
        n *= len(range(*sl.indices(size)))
    return n


def merge_plans(plans: list[list[tuple[ArraySpec, tuple]]]) -> list[ArraySpec]:
    """The arrays of every rank's plan; each must be described alike by all its writers and
    covered exactly once (writers never share a chunk: chunks align with their regions)."""
    specs: dict[str, ArraySpec] = {}
    covered: dict[str, int] = {}
    for rank, plan in enumerate(plans):
        for spec, index in plan:
            if specs.setdefault(spec.key, spec) != spec:
                raise CheckpointError(
                    f"rank {rank} describes {spec.key} as {spec}, another rank as {specs[spec.key]}"
                )
            covered[spec.key] = covered.get(spec.key, 0) + _numel(spec.shape, index)
    for key, spec in specs.items():
        total = _numel(spec.shape, ())
        if covered[key] != total:
            raise CheckpointError(
                f"{key}: the writers cover {covered[key]} of its {total} elements (a layout bug)"
            )
    return list(specs.values())


def write_checkpoint(
    root: str | Path,
    step: int,
    writes: list[Write],
    meta: dict[str, Any],
    comm: Comm,
    keep_last: int = 0,
) -> Path:
    """Collective: every rank writes `writes` (its share); returns the published directory."""
    plans = comm.gather([(spec, index) for spec, index, _ in writes])
    tmp, error = None, None
    if comm.rank == 0:
        try:
            specs = merge_plans(plans)
            tmp = store.begin(root, step, meta)
            store.create_arrays(tmp, specs)
        except Exception as e:  # every rank must hear about it, or they would wait forever
            error = f"{type(e).__name__}: {e}"
    tmp, error = comm.broadcast((tmp, error))
    if error is None:
        error = _write_all(Path(tmp), writes)
    errors = [(r, e) for r, e in enumerate(comm.all_gather(error)) if e is not None]
    if errors:
        rank, first = errors[0]
        raise CheckpointError(f"checkpoint of step {step} failed on rank {rank}: {first}")
    final = store.publish(Path(tmp), keep_last) if comm.rank == 0 else None
    return Path(comm.broadcast(final))  # returning means published, on every rank


def _write_all(tmp: Path, writes: list[Write]) -> str | None:
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(IO_THREADS) as pool:
            futures = [
                pool.submit(store.write_region, tmp, spec.key, index, t)
                for spec, index, t in writes
            ]
            paths = [path for future in futures for path in future.result()]
        written = time.perf_counter()
        store.fsync_files(paths)
        # Where a save's time goes: writing (checksums, copies into the page cache) or the disk.
        log.info(
            "checkpoint shard: %.2f GB written in %.2f s, then fsync of %d files in %.2f s",
            sum(t.numel() * t.element_size() for _, _, t in writes) / 1e9,
            written - start,
            len(paths),
            time.perf_counter() - written,
        )
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


class CheckpointSaver:
    """Saves one checkpoint at a time, blocking or in a background thread. An asynchronous save
    first copies this rank's share to CPU memory (the bounded cost: one copy of the share), then
    training continues while a thread writes and publishes it. The next save, and `wait()`,
    wait for the one in flight."""

    def __init__(self, root: str | Path, comm: Comm, keep_last: int = 0, asynchronous=False):
        self.root, self.comm, self.keep_last = Path(root), comm, keep_last
        self.asynchronous = asynchronous
        self._thread: Thread | None = None
        self._result: Path | BaseException | None = None

    def save(
        self,
        step: int,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        view: RankView,
        meta: dict[str, Any],
        blocking: bool = False,
    ) -> Path | None:
        """Start (or, if blocking, finish) the checkpoint of `step`; returns its path when done."""
        self.wait()
        if blocking or not self.asynchronous:
            # Training waits, so nothing is snapshotted: the chunk threads copy each chunk to the
            # host as they write it (GPU tensors: a few chunks in flight, not a host copy of all).
            writes = [(s, i, t.detach()) for s, i, t in planned_writes(module, optimizer, view)]
            writes += rng_writes(view.rank)
            return write_checkpoint(self.root, step, writes, meta, self.comm, self.keep_last)
        writes = snapshot(planned_writes(module, optimizer, view)) + rng_writes(view.rank)
        self._thread = Thread(
            target=self._run, args=(step, writes, meta), name=f"checkpoint-{step}", daemon=True
        )
        self._thread.start()
        return None

    def _run(self, step: int, writes: list[Write], meta: dict[str, Any]) -> None:
        try:
            self._result = write_checkpoint(
                self.root, step, writes, meta, self.comm, self.keep_last
            )
            if self.comm.rank == 0:
                log.info("saved checkpoint %s (in the background)", self._result)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._result = e

    def wait(self) -> Path | None:
        """Wait for the save in flight; returns its path, or raises its error."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        result, self._result = self._result, None
        if isinstance(result, BaseException):
            raise CheckpointError(f"background checkpoint failed: {result}") from result
        return result


# ---- reading ----


def restore(
    path: str | Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    view: RankView,
    *,
    whole: bool = True,
    counter: ReadCounter | None = None,
) -> dict[str, Any]:
    """Load this rank's slices of the parameters (and, if `optimizer`, its share of the optimizer
    state) from checkpoint `path`, reading only the chunks they touch. With whole=False (a
    pipeline stage) the checkpoint may hold parameters the module lacks. Returns the metadata.
    A checkpoint that does not match the model is refused before anything is read; a chunk
    found corrupted part way leaves the module partly restored (the error says so)."""
    path = store.resolve_checkpoint(path)
    group = store.open_checkpoint(path)
    params = dict(module.named_parameters())
    layouts = {name: view.pieces(name, p) for name, p in params.items()}
    _check_arrays(group, path, layouts, whole)
    owns = getattr(optimizer, "owns", lambda p: True)

    # The fused AdamW wants its step counts on the parameters' device; the others on the CPU.
    fused = optimizer is not None and any(g.get("fused") for g in optimizer.param_groups)

    def load(name: str) -> None:
        # Each tensor goes into place as soon as it is read: the restore holds at most one
        # tensor per thread in memory, not a second copy of the whole state.
        param, layout = params[name], layouts[name]
        into = param.detach()
        value = _read_local(group, path, layout, param, lambda p: f"model/{p.array}", counter, into)
        if value is not into:  # not read straight into the parameter
            with torch.no_grad():
                param.copy_(value)
        else:  # written through its memory, unseen by torch: move its version counter as an
            # in-place op would (what caches keyed on it check: toolkit.bf16_weight_cache)
            torch.autograd.graph.increment_version(param)
        if optimizer is not None and owns(param):
            state = _read_state(group, path, layout, param, counter)
            if state:
                optimizer.state[param] = {
                    k: v.to(param.device) if v.dim() or fused else v for k, v in state.items()
                }

    try:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            # Largest first: the embedding and output layer (most of the bytes) start at once
            # instead of leaving a long tail of one big tensor read at the end.
            list(pool.map(load, sorted(params, key=lambda n: -params[n].numel())))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the restore stopped part way: the model is incomplete)") from e
    return store.metadata(group)


def _check_arrays(group: zarr.Group, path: Path, layouts: dict, whole: bool) -> None:
    have = {key.removeprefix("model/") for key in store.array_keys(group, "model")}
    want = {piece.array for layout in layouts.values() for piece in layout}
    missing = sorted(want - have)
    unexpected = sorted(have - want) if whole else []
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: arrays do not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was it written for another recipe?)"
        )


def _read_local(
    group: zarr.Group,
    path: Path,
    layout: list[Piece],
    like: torch.Tensor,
    key_of: Callable[[Piece], str],
    counter: ReadCounter | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's local tensor assembled from its pieces (array `key_of(piece)` each); rows no
    piece covers (vocabulary padding) are zero. When every piece can land in its rows of `into`
    (CPU memory, the stored dtype, contiguous rows), they are read straight into it and `into`
    is returned: no buffer, no copy."""
    arrays = []
    for piece in layout:
        key = key_of(piece)
        arr = store.open_array(group, key)
        if tuple(arr.shape) != piece.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(arr.shape)}, the model needs {piece.shape}"
            )
        arrays.append((piece, arr))
    if into is not None and all(
        store.can_read_into(arr, piece.global_index(), into[piece.local_index()])
        for piece, arr in arrays
    ):
        _zero_uncovered(into, layout)
        for piece, arr in arrays:
            store.read_region(
                arr, piece.global_index(), str(path), counter, out=into[piece.local_index()]
            )
        return into
    out = None
    for piece, arr in arrays:
        data = store.read_region(arr, piece.global_index(), str(path), counter).to(like.dtype)
        if len(layout) == 1 and data.shape == like.shape:
            return data  # the whole local tensor: no copy
        if out is None:
            out = torch.zeros(like.shape, dtype=like.dtype)
        out[piece.local_index()] = data
    return out


def _zero_uncovered(tensor: torch.Tensor, layout: list[Piece]) -> None:
    """Zero the rows (along the pieces' dim) that no piece covers: vocabulary padding."""
    dim = layout[0].dim
    if dim is None:
        return  # one piece: the whole tensor
    size, covered = tensor.shape[dim], 0
    for start, stop, _ in sorted(piece.local.indices(tensor.shape[dim]) for piece in layout):
        if start > covered:
            tensor.narrow(dim, covered, start - covered).zero_()
        covered = max(covered, stop)
    if covered < size:
        tensor.narrow(dim, covered, size - covered).zero_()


def _read_state(
    group: zarr.Group,
    path: Path,
    layout: list[Piece],
    param: torch.Tensor,
    counter: ReadCounter | None,
) -> dict[str, torch.Tensor]:
    first = f"optim/{layout[0].array}"
    if not store.has(group, first):
        return {}  # a checkpoint without optimizer state (converted or exported weights)
    state = {}
    for key in store.array_keys(group, first):
        moment = key.rsplit("/", 1)[1]
        arr = store.open_array(group, key)
        if arr.ndim == 0:
            state[moment] = store.read_region(arr, (), str(path), counter)
        else:
            like = torch.empty(param.shape, dtype=getattr(torch, arr.attrs["dtype"]))
            state[moment] = _read_local(
                group, path, layout, like, lambda p, m=moment: f"optim/{p.array}/{m}", counter
            )
    return state


def restore_rng(path: str | Path, rank: int) -> bool:
    """Put back this rank's RNG states if the checkpoint has them (same world size)."""
    group = store.open_checkpoint(store.resolve_checkpoint(path))
    key = f"rng/rank_{rank:05d}"
    if not store.has(group, key):
        return False
    for kind_key in store.array_keys(group, key):
        state = store.read_region(store.open_array(group, kind_key), (), str(path))
        if kind_key.endswith("/cpu"):
            torch.set_rng_state(state)
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(state)
    return True
