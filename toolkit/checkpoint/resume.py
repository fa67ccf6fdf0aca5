"""Resuming a run: every rank restores its share of the same, newest intact checkpoint
(`resume_training`), passing over damaged ones.

A checkpoint is damaged when a chunk's CRC32C or size is wrong, a chunk file or an array is
missing, or its metadata does not parse. Restoring finds all of these for what it reads: it reads
every chunk through `store.read_region`, the check that
`checkpoints_tools/inspect_checkpoint.py --verify` runs over a whole checkpoint. So a resume
verifies by restoring, and nothing is read twice.

Which checkpoint, on many ranks: each rank restores only its own slices, so a damaged chunk is
seen by the ranks that read it and by no other. After each attempt the ranks exchange their
errors; if any rank failed, every rank moves on to the next older checkpoint together, so all
agree on one step (a rank-0 verification of the whole checkpoint would agree too, but would read
all of a large checkpoint once more, on one node, before every resume). The list of candidates is
taken by rank 0 and broadcast, so that ranks on other nodes cannot see different directories.

A damaged checkpoint that was passed over is renamed `corrupt-step_N` (never deleted: it may be
worth repairing or examining), out of the `step_*` names that resuming and retention look at, and
`latest` moves back to the checkpoint resumed from. The run then saves step N again as usual.
"""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from toolkit.checkpoint import store
from toolkit.checkpoint.sharded import Comm, RankView, restore, restore_rng
from toolkit.checkpoint.store import CheckpointError
from toolkit.config import Recipe, RecipeError
from toolkit.distributed import ParallelEnv

log = logging.getLogger(__name__)
# What a resume reports at INFO is the trainer's news: its logger, which only rank 0 logs at INFO.
train_log = logging.getLogger("toolkit.train")

VERIFY_HINT = "checkpoints_tools/inspect_checkpoint.py --verify lists all of a checkpoint's damage"


@dataclass
class Resumed:
    """The checkpoint restored, its metadata, and the damaged ones passed over (newest first,
    each with the first error found in it)."""

    path: Path
    meta: dict[str, Any]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def run_layout(env: ParallelEnv) -> dict[str, int]:
    """The parallel layout a checkpoint's metadata records (the writer's; readers may differ)."""
    return {"tp": env.tp, "pp": env.pp, "dp": env.dp, "world_size": env.world_size}


def resume_training(
    recipe: Recipe,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    view: RankView,
    comm: Comm,
    env: ParallelEnv,
) -> tuple[int, int]:
    """Restore the newest intact checkpoint in checkpoint.dir (this rank's share of it), passing
    over damaged ones as checkpoint.on_corrupt says. Returns (step, consumed samples): (0, 0)
    for a fresh run (from checkpoint.init_from's weights where set: start_fresh). Collective.
    RecipeError for a checkpoint of another [model], or for checkpoints found when
    checkpoint.resume is false in a run that writes checkpoints (it would overwrite theirs);
    CheckpointError when none can be resumed."""
    ckpt = recipe.checkpoint
    if not ckpt.resume:
        newest = store.list_checkpoints(ckpt.dir)
        if newest and ckpt.enabled:
            raise RecipeError(
                f"checkpoint.dir={ckpt.dir} already holds checkpoints (latest {newest[-1].name}) "
                "and checkpoint.resume is false: choose another checkpoint.dir, or resume"
            )
        return start_fresh(recipe, module, view, comm, env)
    seeded = torch.get_rng_state()
    layout = run_layout(env)

    def restore_from(path: Path) -> dict:
        meta = store.read_metadata(path)
        if meta["recipe"]["model"] != recipe.to_dict()["model"]:
            raise RecipeError(
                f"{path} was written for a different [model] section; point checkpoint.dir "
                "elsewhere or set checkpoint.resume=false"
            )
        # A damaged checkpoint tried before may have restored part of the state: start clean.
        optimizer.state.clear()
        torch.set_rng_state(seeded)
        started = time.perf_counter()
        restore(path, module, optimizer, view, whole=env.pp == 1)  # only this rank's slices
        if meta.get("layout") != layout:
            train_log.info("resharding %s from %s to %s", path.name, meta.get("layout"), layout)
        if not restore_rng(path, env.rank):
            train_log.info("no RNG state for rank %d in %s: keeping the seeded one", env.rank, path)
        meta["restore_s"] = time.perf_counter() - started
        return meta

    resumed = restore_newest_intact(ckpt.dir, restore_from, comm, ckpt.on_corrupt)
    if resumed is None:
        return start_fresh(recipe, module, view, comm, env)
    meta = resumed.meta
    train_log.info(
        "resumed from %s at step %d (%d samples consumed), restored in %.1f s",
        resumed.path,
        meta["step"],
        meta["consumed_samples"],
        meta["restore_s"],
    )
    return meta["step"], meta["consumed_samples"]


def start_fresh(
    recipe: Recipe, module: nn.Module, view: RankView, comm: Comm, env: ParallelEnv
) -> tuple[int, int]:
    """(0, 0): a new run, its weights checkpoint.init_from's where that is set (this rank's
    slices, read from any layout; no optimizer state, RNG or data position). Collective: a
    checkpoint that is missing or does not fit the model is a RecipeError on every rank."""
    source = recipe.checkpoint.init_from
    if source is None:
        return 0, 0
    meta, error = None, None
    try:
        path = store.resolve_checkpoint(source)
        meta = store.read_metadata(path)
        restore(path, module, None, view, whole=env.pp == 1)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        error = f"{type(e).__name__}: {e}"
    errors = [e for e in comm.all_gather(error) if e]
    if errors:
        raise RecipeError(f"checkpoint.init_from={source}: {errors[0]}")
    theirs, ours = meta["recipe"]["model"], recipe.to_dict()["model"]
    changed = sorted(k for k in ours if theirs.get(k) != ours[k])
    if changed:  # the same arrays and shapes, or restore would have refused them
        train_log.info("model keys that differ from %s's: %s", path.name, ", ".join(changed))
    train_log.info(
        "weights from %s (step %d of its run): a new run from step 0, with a new optimizer",
        path,
        meta["step"],
    )
    return 0, 0


def resume_candidates(root: str | Path) -> tuple[list[Path], str | None]:
    """The checkpoints to try, newest first: the one `latest` names, then the older published
    ones. If `latest` itself is damaged (it names no checkpoint), every published one, with the
    problem as the second value."""
    published = store.list_checkpoints(root)
    try:
        latest = store.latest_checkpoint(root)
    except CheckpointError as e:
        return published[::-1], str(e)
    if latest is None:
        return [], None
    return [latest] + [p for p in reversed(published) if p.name < latest.name], None


def step_of(path: Path) -> int | None:
    """The step a `step_NNNNNNNN` directory holds, from its name (its metadata may be damaged)."""
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def _one_line(error: BaseException) -> str:
    # restore() wraps the chunk error with "the model is incomplete": true, but beside the point
    # when another checkpoint is restored next.
    cause = error.__cause__ if isinstance(error.__cause__, CheckpointError) else error
    return " ".join(str(cause).split())


def restore_newest_intact(
    root: str | Path,
    restore_from: Callable[[Path], dict[str, Any]],
    comm: Comm,
    on_corrupt: Literal["fallback", "fail"] = "fallback",
) -> Resumed | None:
    """Collective. Call `restore_from(path)` (which restores this rank's share of the state and
    returns the metadata, raising CheckpointError for damage) on the newest checkpoint under
    `root`, then on older ones while any rank finds damage. Returns what was restored, or None if
    `root` holds no checkpoint. Raises CheckpointError (one line) when on_corrupt='fail' and the
    newest is damaged, or when none is intact. Rank 0 logs a warning for each damaged checkpoint
    and renames it out of the way (see the module's docstring)."""
    root = Path(root)
    candidates, pointer_problem = comm.broadcast(
        resume_candidates(root) if comm.rank == 0 else None
    )
    if pointer_problem is not None:
        if on_corrupt == "fail" or not candidates:
            raise CheckpointError(f"cannot resume: {pointer_problem}")
        if comm.rank == 0:
            log.warning("%s: trying the newest published checkpoint instead", pointer_problem)
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        error, meta = None, None
        try:
            meta = restore_from(path)
        except (CheckpointError, OSError) as e:  # OSError: an unreadable file (EIO) is damage too
            error = _one_line(e)
        errors = [e for e in comm.all_gather(error) if e is not None]
        if not errors:
            resumed = Resumed(path, meta, skipped)
            if skipped or pointer_problem is not None:
                _set_aside(resumed, comm)
            return resumed
        if on_corrupt == "fail":
            raise CheckpointError(
                f"checkpoint {path} is damaged: {errors[0]}; checkpoint.on_corrupt='fail', so "
                "the run stops: repair or move it away, or set checkpoint.on_corrupt='fallback' "
                f"to resume from the newest intact one ({VERIFY_HINT})"
            )
        skipped.append((path, errors[0]))
        if comm.rank == 0:
            log.warning("checkpoint %s is damaged: %s", path, errors[0])
    if not skipped:
        return None
    listed = "; ".join(f"{path.name}: {error}" for path, error in skipped)
    raise CheckpointError(
        f"no intact checkpoint to resume from in {root} ({listed}); move them away to start "
        f"afresh, or repair them ({VERIFY_HINT})"
    )


def _set_aside(resumed: Resumed, comm: Comm) -> None:
    """On rank 0: rename the damaged checkpoints, point `latest` at the one resumed from, and
    say what was lost. Every rank hears of a failure (or would wait for rank 0 forever)."""
    error = None
    if comm.rank == 0:
        try:
            kept = [_rename_damaged(path) for path, _ in resumed.skipped]
            # Renamed first: a crash before the pointer moves leaves `latest` naming nothing, which
            # the next resume treats as damage too, instead of a step_N it would collide with.
            store.point_latest(resumed.path)
            _warn_fallback(resumed, kept)
        except OSError as e:
            error = f"could not set the damaged checkpoints aside: {e}"
    error = comm.broadcast(error)
    if error is not None:
        raise CheckpointError(error)


def _rename_damaged(path: Path) -> Path:
    target, n = path.with_name(f"corrupt-{path.name}"), 1
    while target.exists():  # step N was damaged before, and again after it was saved anew
        n += 1
        target = path.with_name(f"corrupt-{path.name}.{n}")
    os.rename(path, target)
    return target


def _warn_fallback(resumed: Resumed, kept: list[Path]) -> None:
    step = resumed.meta["step"]
    if not kept:  # only `latest` was damaged
        log.warning("`latest` now names %s (step %d)", resumed.path.name, step)
        return
    newest = max((s for s in (step_of(p) for p, _ in resumed.skipped) if s is not None), default=0)
    lost = (
        f"steps {step + 1}-{newest} ({newest - step} steps) will be trained again"
        if newest > step
        else "no steps are lost"
    )
    log.warning(
        "RESUMING FROM AN OLDER CHECKPOINT: %s (step %d), the newest intact one: %s; the damaged "
        "%s kept as %s (%s)",
        resumed.path,
        step,
        lost,
        "one is" if len(kept) == 1 else "ones are",
        ", ".join(p.name for p in kept),
        VERIFY_HINT,
    )
