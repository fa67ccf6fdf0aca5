"""Hugging Face export: transformers' own NemotronH (pure-PyTorch path: no mamba-ssm here) loads
the exported directory and gives our logits."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_model_config
from toolkit.build import save_model_checkpoint
from toolkit.checkpoint.hf import export_hf
from toolkit.config import recipe_from_dict
from toolkit.model import HybridLM

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 259
TOLERANCE = 1e-5  # measured: max |difference| 3e-7 on logits of size ~1 (fp32)


def model(**overrides) -> HybridLM:
    torch.manual_seed(0)
    m = HybridLM(tiny_model_config(**overrides), vocab_size=VOCAB).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms and D away from their initial values
    return m


@pytest.mark.parametrize("activation", ["relu2", "gelu"])
def test_transformers_reproduces_our_logits(tmp_path, activation):
    ours = model(mlp_activation=activation)  # pattern M*-M: all three block types
    files = export_hf(ours, tmp_path, max_shard_bytes=100_000)  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json") in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hybrid_override_pattern"] == "M*-M" and config["time_step_min"] == 0.0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(tokens)[..., :VOCAB], hf(tokens).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOLERANCE


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"mlp_activation": "swiglu"}, "not gated"),
        ({"position_embedding": "rope"}, "no RoPE"),
        ({"norm": "layernorm"}, "uses RMSNorm"),
    ],
)
def test_unsupported_models_are_refused(tmp_path, overrides, reason):
    with pytest.raises(ValueError, match=reason):
        export_hf(model(**overrides), tmp_path)
    assert not any(tmp_path.iterdir())


def test_command_line(tmp_path):
    m = model(mlp_activation="relu2")
    recipe = recipe_from_dict(
        {"model": dataclasses.asdict(m.cfg), "train": {"steps": 1}, "name": "tiny"}
    )
    ckpt = save_model_checkpoint(tmp_path / "ckpt", m, recipe)
    proc = subprocess.run(
        [sys.executable, "checkpoints_tools/export_hf.py", "--in", str(ckpt), "--out",
         str(tmp_path / "hf")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "exported tiny (M*-M, vocabulary 259)" in proc.stdout
    assert (tmp_path / "hf" / "model.safetensors").is_file()
