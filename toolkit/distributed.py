"""Process groups from the environment: Slurm (srun, one task per GPU), torchrun, or one process.

Ranks are laid out TP innermost, then DP, then PP: rank = (pp * DP + dp) * TP + tp, so a TP group
sits on consecutive ranks (one node) and its all-reduces stay on NVLink.
"""

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from toolkit.config import ParallelConfig, parallel_degrees


@dataclass
class ParallelEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    mesh: DeviceMesh | None = None  # dims ("pp", "dp", "tp"); None for a single process
    timeout: datetime.timedelta = datetime.timedelta(minutes=10)  # parallel.timeout_minutes

    def group(self, dim: str) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh.get_group(dim)

    def coordinate(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(dim)

    @property
    def tp_rank(self) -> int:
        return self.coordinate("tp")

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def pp_rank(self) -> int:
        return self.coordinate("pp")


def free_port() -> int:
    """A TCP port free on this host right now (for single-host rendezvous and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or Slurm's variables; (0, 1, 0) if neither."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a launcher that sets them
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def slurm_rendezvous(env: dict[str, str] | None = None) -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT) for a Slurm job: the first node's NodeAddr from `scontrol`
    (node names need not resolve in DNS) and a port derived from the job id, so every task of
    the job computes the same pair without talking to the others."""
    env = dict(os.environ) if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("Slurm task without SLURM_JOB_NODELIST: cannot find the first node")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout.split()
        node = subprocess.run(
            ["scontrol", "show", "node", hosts[0]], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise RuntimeError(
            f"cannot resolve the first node of {nodelist!r} with scontrol: {e}"
        ) from e
    fields = dict(f.split("=", 1) for f in node.split() if "=" in f)
    addr = fields.get("NodeAddr") or hosts[0]
    port = 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    return addr, str(port)


def resolve_layout(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(tp, pp, dp) for this world size; dp=-1 takes what TP x PP leaves. RecipeError from the
    recipe's one layout check (toolkit.config.layout_check) if they do not make the world size."""
    return parallel_degrees(cfg, world_size)


def init_distributed(cfg: ParallelConfig, device_type: str = "cpu") -> ParallelEnv:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs) and build the TP x PP x DP mesh.

    With world size > 1: MASTER_ADDR / MASTER_PORT from the environment (torchrun, our local
    launcher), or, in a Slurm job that did not set them, from `slurm_rendezvous`.
    """
    rank, world_size, local_rank = launch_environment()
    tp, pp, dp = resolve_layout(cfg, world_size)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    if world_size == 1:
        return ParallelEnv(0, 1, 0, device, tp, pp, dp, timeout=timeout)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"], port = slurm_rendezvous()
            os.environ.setdefault("MASTER_PORT", port)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"rank {rank}: {var} is not set; launch through launchers/")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    dims = ("pp", "dp", "tp")
    mesh = init_device_mesh(
        device_type, (pp, dp, tp), mesh_dim_names=dims,
        backend_override=groups_with_timeout(backend, timeout, dims),
    )  # fmt: skip
    return ParallelEnv(rank, world_size, local_rank, device, tp, pp, dp, mesh, timeout)


def groups_with_timeout(
    backend: str, timeout: datetime.timedelta, dims: tuple[str, ...]
) -> dict[str, tuple[str, object]] | None:
    """init_device_mesh's backend_override that gives the mesh's groups `timeout`: torch gives
    each new group its own default, not the default group's (10 minutes for NCCL, 30 for gloo).
    None where that default is `timeout` already (NCCL at the key's default)."""
    if timeout == (default_pg_nccl_timeout if backend == "nccl" else default_pg_timeout):
        return None
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:
        options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return {dim: (backend, options) for dim in dims}
