"""model.kernels='auto' on a GPU whose mamba-ssm does not import: the reference kernels run, and
the log says so loudly, naming the package and the import error (CPU-tested: CUDA is faked, and
a stand-in mamba_ssm fails the way the old image's did, on a module it imports)."""

import logging
import sys

import pytest
import torch

from toolkit.model import kernels


@pytest.fixture
def gpu_with_broken_mamba_ssm(tmp_path, monkeypatch):
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import einops_not_installed_here\n")
    for init in (pkg / "ops" / "__init__.py", pkg / "ops" / "triton" / "__init__.py"):
        init.write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_WARNED", set(), raising=False)


def test_auto_falls_back_to_the_reference_kernels_with_a_warning(gpu_with_broken_mamba_ssm, caplog):
    with caplog.at_level(logging.WARNING, logger="toolkit.model.kernels"):
        assert kernels.select_ssd("auto") is kernels.ssd_chunked
        assert kernels.fused_mamba_conv("auto") is None
        kernels.select_ssd("auto")  # every layer asks: one warning, not one per layer
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "model.kernels='auto' on a GPU" in warnings[0] and "(mamba_ssm)" in warnings[0]
    assert "No module named 'einops_not_installed_here'" in warnings[0]


def test_explicit_kernels_and_cpus_do_not_warn(gpu_with_broken_mamba_ssm, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="toolkit.model.kernels"):
        assert kernels.select_ssd("reference") is kernels.ssd_chunked
        with pytest.raises(ValueError, match="needs CUDA and the mamba-ssm package"):
            kernels.select_ssd("mamba_ssm")  # an error of its own, already loud
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert kernels.select_ssd("auto") is kernels.ssd_chunked  # CPUs: the reference is the path
    assert not caplog.records


def _package(root, name: str, init: str, modules: tuple[str, ...] = ()) -> None:
    """A stand-in package `name` under `root` whose __init__ runs `init`, with empty `modules`
    ('ops/triton/ssd_combined.py')."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(init)
    for module in modules:
        path = root / name / module
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root / name).parents:
            (root / name / parent / "__init__.py").touch()
        path.write_text("")


def _tiny(**keys):
    from toolkit.config import ModelConfig

    return ModelConfig(num_layers=1, seq_length=16, hidden_size=32, mamba_head_dim=8,
                       mamba_num_groups=2, mamba_state_dim=8, **keys)  # fmt: skip


@pytest.fixture
def gpu_with_mamba_ssm(tmp_path, monkeypatch):
    """A GPU (faked) whose mamba-ssm imports; causal-conv1d is set up by each test."""
    _package(tmp_path, "mamba_ssm", "", ("ops/triton/ssd_combined.py",))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_WARNED", set(), raising=False)
    return tmp_path


def test_without_causal_conv1d_auto_takes_our_conv_with_a_warning(gpu_with_mamba_ssm, caplog):
    """model.mamba_conv_backend 'auto' where causal-conv1d is broken: the fused op with our
    Triton conv, and one warning that names the error; 'causal_conv1d' asked for: no fused op
    (the warning of old); 'triton': ours, quietly. The model's mixers are built so."""
    from toolkit.model.hybrid import build_mixer

    _package(gpu_with_mamba_ssm, "causal_conv1d", "raise ImportError('libcudart.so.11.0')\n")
    with caplog.at_level(logging.WARNING, logger="toolkit.model.kernels"):
        assert kernels.fused_mamba_conv("auto", "triton") == "triton"
        assert not caplog.records
        assert kernels.fused_mamba_conv("auto", "auto") == "triton"
        assert kernels.fused_mamba_conv("mamba_ssm", "auto") == "triton"  # once, not per layer
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "causal-conv1d does not import" in warnings[0]
        assert "libcudart.so.11.0" in warnings[0] and "'triton'" in warnings[0]
        assert kernels.fused_mamba_conv("auto", "causal_conv1d") is None
        assert "fused Mamba training op is off" in caplog.records[-1].getMessage()
        assert kernels.fused_mamba_conv("reference", "triton") is None
    mixer = build_mixer("M", _tiny())
    assert mixer.fused and mixer.conv_backend == "triton"
    assert not build_mixer("M", _tiny(mamba_conv_backend="causal_conv1d")).fused


def test_with_causal_conv1d_auto_takes_mamba_ssms_op(gpu_with_mamba_ssm, caplog):
    from toolkit.model.hybrid import build_mixer

    _package(gpu_with_mamba_ssm, "causal_conv1d", "")
    with caplog.at_level(logging.WARNING, logger="toolkit.model.kernels"):
        assert kernels.fused_mamba_conv("auto", "auto") == "causal_conv1d"
        assert kernels.fused_mamba_conv("auto", "triton") == "triton"
    assert not caplog.records
    mixer = build_mixer("M", _tiny())
    assert mixer.fused and mixer.conv_backend == "causal_conv1d"


def test_conv_widths_the_kernels_do_not_take_run_the_torch_path(gpu_with_mamba_ssm, caplog):
    """Both convs take widths 2 to 4: a recipe's width of 5 builds mixers on the torch path,
    with one warning naming the key, not a fused op whose backward fails."""
    from toolkit.model.hybrid import build_mixer

    _package(gpu_with_mamba_ssm, "causal_conv1d", "")
    with caplog.at_level(logging.WARNING, logger="toolkit.model.kernels"):
        for conv in ("auto", "causal_conv1d", "triton"):
            assert kernels.fused_mamba_conv("auto", conv, width=5) is None
            assert not build_mixer("M", _tiny(mamba_conv_kernel=5, mamba_conv_backend=conv)).fused
        assert kernels.fused_mamba_conv("auto", "triton", width=2) == "triton"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "model.mamba_conv_kernel=5" in warnings[0], warnings
