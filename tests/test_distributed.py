"""Environment -> ranks and rendezvous (the real multi-node Slurm run is the launcher tests' job)."""

import os
import stat

import pytest

from toolkit.config import ParallelConfig, RecipeError
from toolkit.distributed import launch_environment, resolve_layout, slurm_rendezvous


def test_launch_environment_prefers_torchrun_then_slurm(monkeypatch):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
    ):
        monkeypatch.delenv(var, raising=False)
    assert launch_environment() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_environment() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert launch_environment() == (2, 4, 2)


def test_resolve_layout():
    assert resolve_layout(ParallelConfig(tp=4, pp=2, dp=-1), 16) == (4, 2, 2)
    with pytest.raises(RecipeError, match="world size 12 is not divisible by TP x PP = 8"):
        resolve_layout(ParallelConfig(tp=4, pp=2), 12)
    with pytest.raises(RecipeError, match="4x1x3 = 12 but the world size is 8"):
        resolve_layout(ParallelConfig(tp=4, dp=3), 8)


def test_slurm_rendezvous_uses_the_first_nodes_address(tmp_path, monkeypatch):
    """A stand-in `scontrol` answers as Slurm does; the real one runs in the Slurm tests."""
    script = tmp_path / "scontrol"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$2" = hostnames ]; then printf "n1\\nn2\\n"; exit 0; fi\n'
        'if [ "$2" = node ] && [ "$3" = n1 ]; then\n'
        '  echo "NodeName=n1 Arch=x86_64 CoresPerSocket=1"\n'
        '  echo "   NodeAddr=127.0.0.7 NodeHostName=host1 Version=23.02"\n'
        "  exit 0\nfi\nexit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "4242"}
    assert slurm_rendezvous(env) == ("127.0.0.7", str(15000 + 4242))
    with pytest.raises(RuntimeError, match="without SLURM_JOB_NODELIST"):
        slurm_rendezvous({})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="cannot resolve the first node of 'n\\[1-2\\]'"):
        slurm_rendezvous(env)
