"""train.precision: autocast contexts, and fp8's conversion of the blocks' linears (torchao's
module swap runs on CPUs; its float8 matmuls need a GPU with compute capability >= 8.9)."""

import importlib.util

import pytest
import torch
from torch import nn

from tests.conftest import TINY_MODEL
from toolkit.build import build_model, model_from_checkpoint, save_model_checkpoint
from toolkit.checkpoint import RankView, restore
from toolkit.config import recipe_from_dict
from toolkit.model import HybridLM
from toolkit.precision import (
    PrecisionError,
    apply_fp8,
    autocast_context,
    check_fp8_device,
    fp8_engine,
    fp8_filter,
)
from toolkit.tokenizer import ByteTokenizer

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed (pip install torchao, or the 'fp8' extra)",
)
CPU = torch.device("cpu")
# Block widths that float8 GEMMs accept (multiples of 16): 6 blocks, all three kinds in the middle.
FP8_MODEL = TINY_MODEL | dict(
    num_layers=6,
    pattern="M*-M-M",
    att_ratio=0.17,
    mlp_ratio=0.33,
    hidden_size=64,
    ffn_hidden_size=128,
    mamba_head_dim=16,
)


def recipe(tmp_path, **train):
    return recipe_from_dict(
        {
            "model": FP8_MODEL,
            "train": {"steps": 1, "device": "cpu", "precision": "fp32"} | train,
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
        }
    )


def test_fp8_refuses_cpus_naming_the_key():
    with pytest.raises(PrecisionError, match=r"train\.precision='fp8' needs a CUDA GPU .* cpu"):
        check_fp8_device(CPU)


def test_fp8_training_on_cpu_fails_with_the_key(tmp_path):
    from toolkit.train import train

    r = recipe(tmp_path, precision="fp8")
    with pytest.raises(PrecisionError, match=r"train\.precision='fp8'"):
        train(r)


def test_fp8_filter_keeps_first_and_last_blocks_embedding_and_output():
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)
    keep = fp8_filter(model)
    chosen = [n for n, m in model.named_modules() if keep(m, n)]
    assert chosen and all(n.split(".")[1] in {"1", "2", "3", "4"} for n in chosen)
    kinds = {model.layers[int(n.split(".")[1])].kind for n in chosen}
    assert kinds == {"M", "*", "-"}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "output_layer" in linears and "output_layer" not in chosen
    assert not any(n.startswith(("layers.0.", "layers.5.")) for n in chosen)
    # a width that is not a multiple of 16 stays bf16
    odd = nn.Linear(24, 32, bias=False)
    assert not keep(odd, "layers.2.mixer.linear_fc1")


def test_autocast_contexts():
    assert not isinstance(autocast_context("fp32", CPU), torch.autocast)
    for precision, engine in (("bf16", None), ("fp8", "torchao"), ("fp8", None)):
        with autocast_context(precision, CPU, engine):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_context("fp16", CPU)


def test_no_engine_is_a_clear_error(monkeypatch):
    import toolkit.precision as precision

    monkeypatch.setattr(precision, "fp8_engine", lambda: None)
    model = HybridLM(recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}}).model, 100)
    with pytest.raises(PrecisionError, match="needs Transformer Engine or torchao"):
        apply_fp8(model, device=CPU, check_device=False)


@needs_torchao
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_torchao_conversion_keeps_names_and_weights(scaling):
    from torchao.float8.float8_linear import Float8Linear

    r = recipe_from_dict({"model": FP8_MODEL, "train": {"steps": 1}})
    torch.manual_seed(0)
    plain = build_model(r, ByteTokenizer())
    torch.manual_seed(0)
    model = build_model(r, ByteTokenizer())
    engine, names = apply_fp8(
        model, device=CPU, engine="torchao", recipe=scaling, check_device=False
    )
    assert engine == "torchao"
    swapped = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert swapped == names and len(names) >= 6
    assert not isinstance(model.output_layer, Float8Linear)
    assert not any(isinstance(m, Float8Linear) for m in model.layers[0].modules())
    assert not any(isinstance(m, Float8Linear) for m in model.layers[-1].modules())
    want = plain.state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@needs_torchao
def test_torchao_converted_checkpoint_round_trip(tmp_path):
    """A float8-converted model saves the same checkpoint a bf16 one does, and loads one."""
    r = recipe(tmp_path)
    model = build_model(r, ByteTokenizer())
    apply_fp8(model, device=CPU, engine="torchao", check_device=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from a fresh init
    path = save_model_checkpoint(tmp_path / "ckpt", model, r, step=3)
    loaded, _, _ = model_from_checkpoint(str(path))  # a plain model
    want = model.state_dict()
    rows = model.vocab_size  # checkpoints keep the real vocabulary rows, not the padding

    def check(got: dict) -> None:
        assert list(got) == list(want)
        for name, t in got.items():
            keep = slice(rows) if name in ("embedding.weight", "output_layer.weight") else ...
            assert torch.equal(t[keep], want[name][keep]), name

    check(loaded.state_dict())
    # and back into a converted model
    other = build_model(r, ByteTokenizer())
    apply_fp8(other, device=CPU, engine="torchao", check_device=False)
    restore(path, other, None, RankView(other.cfg, other.vocab_size))
    check(other.state_dict())


def test_fp8_engine_prefers_transformer_engine(monkeypatch):
    import toolkit.precision as precision

    found = {"transformer_engine": None, "torchao": object()}
    monkeypatch.setattr(precision.importlib.util, "find_spec", lambda name: found.get(name))
    assert fp8_engine() == "torchao"
    found["torchao"] = None
    assert fp8_engine() is None
