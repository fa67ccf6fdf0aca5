import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch

from toolkit.config import ModelConfig


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _compiled_afresh():
    """Each test file compiles from a clean dynamo: code another file compiled at other shapes
    would come back with dynamic shapes, which Inductor cannot always compile on the CPU ('cannot
    determine truth value of Relational'), so a test's outcome would depend on the files run
    before it."""
    torch._dynamo.reset()
    yield


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """benchmarks/NAME.py as a module, with benchmarks/ on sys.path for the test's length as
    running the script puts it there (its imports of its neighbours)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def descriptors_past_1024():
    """1,100 descriptors held open (the open-files limit raised for them), so that the next
    ones are numbered past select()'s 1024, as in a server with many clients."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    yield
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# A model small enough for exhaustive CPU tests, with every block type.
TINY_MODEL = dict(
    num_layers=4,
    hidden_size=32,
    seq_length=64,
    pattern="M*-M",
    att_ratio=0.25,
    mlp_ratio=0.25,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    mamba_state_dim=8,
    mamba_head_dim=8,
    mamba_num_groups=2,
    mamba_chunk_size=8,
)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**(TINY_MODEL | overrides))
