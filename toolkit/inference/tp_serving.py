"""Tensor-parallel serving: N processes each hold one TP shard and run the same engine steps.

Rank 0 (the leader) runs the HTTP server and the engine thread; the other ranks (followers) only
run the engine. Before every step the leader broadcasts the step's events (new requests with
their resolved seeds, cancellations, stop) over a gloo group, so every rank's engine holds the
same queue and the same slots and issues the same collectives. The model's all-reduces leave
identical hidden states on every rank and the vocab-parallel logits are all-gathered; to make
agreement exact by construction rather than by the collectives' arithmetic, the logits that are
sampled are also broadcast from the leader (one [batch, vocab] tensor per step, small beside the
gather). Per-request seeded generators then draw the same tokens everywhere.

Launch: `serve.py --tp N` in a plain process starts ranks 1..N-1 itself (the same command line
with torchrun's variables); under srun or torchrun every task is one rank already.
"""

import atexit
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from toolkit.config import ParallelConfig
from toolkit.distributed import ParallelEnv, free_port, init_distributed, launch_environment
from toolkit.inference.engine import Engine, Request
from toolkit.inference.server import EngineThread, GenerationServer
from toolkit.model import HybridLM
from toolkit.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle leader still steps this often: followers' collectives never time out
STOP_GRACE_S = 15.0  # a follower told to stop by a signal waits this long for the leader's stop
# The fields that define a request (its settings), sent to the followers; not the callback.
SPEC_FIELDS = [f.name for f in dataclasses.fields(Request) if f.init and f.name != "on_update"]


@dataclasses.dataclass
class Ranks:
    """This process's place in a TP serving job: tensors go over `group` (NCCL on GPUs), engine
    events over `events` (gloo, CPU objects)."""

    env: ParallelEnv
    group: dist.ProcessGroup
    events: dist.ProcessGroup
    children: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    stopped: bool = False  # the leader has told the followers to stop

    @property
    def leader(self) -> bool:
        return self.env.rank == 0

    @property
    def tp(self) -> int:
        return self.env.tp

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.events)
        return box[0]

    def close(self, timeout: float = 30.0) -> None:
        """Leader: stop the followers if nobody has, then wait for the ranks it started. Every
        rank then leaves the process groups: left to the interpreter's exit, gloo's threads
        could abort the process (SIGABRT, "terminate called without an active exception")."""
        if self.leader and not self.stopped:
            self.stopped = True
            try:
                self.broadcast({"stop": True})
            except Exception as e:  # followers already gone: nothing left to tell
                log.warning("could not tell the other ranks to stop: %s", e)
        for child in self.children:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "rank process %d did not stop in %.0f s: killing it", child.pid, timeout
                )
                child.kill()
                child.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def start(tp: int, device: torch.device, command: list[str]) -> Ranks:
    """Join (srun, torchrun) or create (a plain process: starts `command` as ranks 1..tp-1 with
    torchrun's variables) a world of `tp` processes on this node."""
    rank, world, _ = launch_environment()
    children: list[subprocess.Popen] = []
    if world == 1:
        shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        os.environ.update(shared, RANK="0", WORLD_SIZE=str(tp), LOCAL_RANK="0")
        for r in range(1, tp):
            env = os.environ | shared | {"RANK": str(r), "WORLD_SIZE": str(tp)}
            env["LOCAL_RANK"] = str(r)
            children.append(subprocess.Popen(command, env=env, preexec_fn=_die_with_parent))
        world = tp
    elif world != tp:
        raise RuntimeError(
            f"--tp {tp} but the launcher started {world} tasks: start one task per TP rank "
            "(serving replicates no data- or pipeline-parallel copies)"
        )
    if rank != 0:
        # Ctrl-C, `timeout`, scancel and container runtimes signal every process: only the
        # leader acts; the others wait for its stop (or for it to vanish) a while.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _exit_later)
        logging.getLogger().setLevel(logging.WARNING)
    env = init_distributed(ParallelConfig(tp=tp), device.type)
    ranks = Ranks(env, env.group("tp"), dist.new_group(backend="gloo"), children)
    atexit.register(ranks.close)
    return ranks


def _exit_later(*_: Any) -> None:
    timer = threading.Timer(STOP_GRACE_S, os._exit, (1,))
    timer.daemon = True
    timer.start()


def _die_with_parent() -> None:
    """A rank started by the leader gets SIGTERM if the leader dies without stopping it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TPEngine(Engine):
    """The engine on one TP rank; `step()` first agrees with the other ranks on what to do."""

    def __init__(self, model: HybridLM, tokenizer: Tokenizer, *, ranks: Ranks, **kw: Any) -> None:
        # Eager decode unless asked: graphs with TP collectives inside are not yet measured.
        kw.setdefault("cuda_graphs", False)
        # Overlap samples on each rank from its own logits; TP samples the leader's broadcast.
        kw["overlap"] = False
        super().__init__(model, tokenizer, **kw)
        self.ranks = ranks
        self.tracked: dict[int, Request] = {}  # id -> unfinished request, the same on every rank
        self.new: list[tuple[int, Request]] = []  # leader: added since the last step
        self.next_id = 0
        self.doomed: set[Request] = set()  # cancelled as of this step's events

    def add(self, request: Request) -> None:
        # Each rank would draw its own random seed: the leader draws it once for all.
        if request.seed is None:
            request.seed = int.from_bytes(os.urandom(8), "little")
        super().add(request)
        if self.ranks.leader:
            self.new.append((self.next_id, request))
            self.tracked[self.next_id] = request
            self.next_id += 1

    def exchange(self, stop: bool = False) -> bool:
        """The leader's events for this step, applied on every rank; False once told to stop."""
        events = None
        if self.ranks.leader:
            # Read `cancelled` (set by HTTP threads at any time) once, here, for every rank.
            cancelled = [i for i, r in self.tracked.items() if r.cancelled]
            new = [(i, {k: getattr(r, k) for k in SPEC_FIELDS}) for i, r in self.new]
            events = {"stop": stop, "new": new, "cancelled": cancelled}
            self.new = []
            self.ranks.stopped |= stop
        events = self.ranks.broadcast(events)
        if events["stop"]:
            return False
        if not self.ranks.leader:
            for i, spec in events["new"]:
                request = Request(**spec)
                super().add(request)
                self.tracked[i] = request
        self.doomed = {self.tracked[i] for i in events["cancelled"]}
        return True

    def step(self) -> list[Request]:
        try:
            return super().step()
        finally:
            self.tracked = {i: r for i, r in self.tracked.items() if not r.done}

    def _cancelled(self, r: Request) -> bool:
        """By this step's events, not the live flag (which an HTTP thread may set meanwhile)."""
        return r in self.doomed

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.model.output_layer(hidden).contiguous()  # this rank's vocabulary slice
        parts = [torch.empty_like(local) for _ in range(self.ranks.tp)]
        dist.all_gather(parts, local, group=self.ranks.group)
        return torch.cat(parts, -1)[..., : self.model.vocab_size].float()

    def _sample(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        logits = logits.contiguous()
        dist.broadcast(logits, src=0, group=self.ranks.group)
        super()._sample(logits, requests, rows)


class LeaderThread(EngineThread):
    """The server's engine thread on rank 0: steps on a heartbeat while idle (the followers wait
    in a collective), and tells the followers to stop when the server stops."""

    def __init__(
        self,
        engine: TPEngine,
        on_failure: Callable[[], None],
        warm_up: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(engine, warm_up, on_failure)
        self.engine: TPEngine = engine

    def run(self) -> None:
        try:
            if not self.warm():
                # The other ranks may wait inside the warm-up's collectives: a stop message
                # would not pair with them. Those this process started die with it.
                self.engine.ranks.stopped = True
                return
            while self.running:
                self._take(idle_timeout=HEARTBEAT_S)  # the followers wait in a collective
                if not self.running:
                    break
                try:
                    self.engine.exchange()
                    self.engine.step()
                except Exception as e:
                    # The ranks may now be out of step: fail everything and stop serving.
                    log.exception("engine step failed on the leader: stopping every rank")
                    self.engine.fail_all(f"generation failed: {type(e).__name__}: {e}")
                    threading.Thread(target=self.on_failure, daemon=True).start()
                    return
        finally:
            if not self.engine.ranks.stopped:
                try:
                    self.engine.exchange(stop=True)
                except Exception as e:  # a follower already gone: nothing left to tell
                    log.warning("could not tell the other ranks to stop: %s", e)


class TPGenerationServer(GenerationServer):
    """The HTTP server of rank 0, driving a TPEngine through a LeaderThread."""

    def __init__(self, address: tuple[str, int], engine: TPEngine, **kw: Any) -> None:
        super().__init__(address, engine, **kw)
        self.engine_thread = LeaderThread(engine, self.shutdown, self.warm_up)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            super().serve_forever(poll_interval)
        finally:  # the base class asked the thread to stop: let it tell the followers
            self.engine_thread.join(timeout=60)
            if self.engine_thread.is_alive():
                log.error("the engine is stuck in a collective: ending the other ranks")
                ranks = self.engine_thread.engine.ranks
                ranks.stopped = True  # a stop broadcast would wait behind the stuck collective
                for child in ranks.children:
                    child.kill()


def follow(engine: TPEngine) -> int:
    """A follower's life: the leader's steps, until it says stop. Returns the exit code."""
    log.info("TP rank %d of %d following rank 0", engine.ranks.env.rank, engine.ranks.tp)
    try:
        while engine.exchange():
            engine.step()
    except Exception:
        log.exception("TP rank %d failed", engine.ranks.env.rank)
        return 1
    return 0
