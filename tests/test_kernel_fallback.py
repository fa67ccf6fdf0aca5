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
        assert not kernels.use_fused_mamba("auto")
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
