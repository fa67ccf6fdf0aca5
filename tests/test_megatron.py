"""Megatron per-rank checkpoints: export at several TP/PP, import back (2024-era and fused-norm
keys), the per-rank Mamba layout, errors, and the command-line round trip."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from toolkit.build import model_from_checkpoint, save_model_checkpoint
from toolkit.checkpoint.megatron import load_megatron, load_rank_file, save_megatron
from toolkit.config import recipe_from_dict
from toolkit.model import HybridLM

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 259
VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def model_and_recipe(activation: str):
    cfg = tiny_model_config(num_query_groups=4, mamba_num_groups=4, mlp_activation=activation)
    torch.manual_seed(0)
    model = HybridLM(cfg, vocab_size=VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    table = {"model": dataclasses.asdict(cfg), "train": {"steps": 1}, "name": "t"}
    return model, recipe_from_dict(table)


def assert_same(a: HybridLM, b: HybridLM) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        rows = VOCAB if name in VOCAB_PARAMS else None
        assert torch.equal(p[:rows], q[:rows]), name
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(tokens)[..., :VOCAB], b(tokens)[..., :VOCAB])


@pytest.mark.parametrize(
    "activation,tp,pp", [("swiglu", 1, 1), ("relu2", 2, 1), ("swiglu", 4, 2), ("gelu", 2, 4)]
)
def test_round_trip(tmp_path, activation, tp, pp):
    model, recipe = model_and_recipe(activation)
    save_megatron(model, recipe, tmp_path, tp=tp, pp=pp, iteration=20)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "20\n"
    suffix = "_000" if pp > 1 else ""
    first = load_rank_file(tmp_path / "iter_0000020" / f"mp_rank_00{suffix}" / "model_optim_rng.pt")
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 20
    assert first["args"].tensor_model_parallel_size == tp
    assert first["args"].padded_vocab_size == 128 * tp * -(-VOCAB // (128 * tp))
    back = HybridLM(model.cfg, vocab_size=VOCAB)
    load_megatron(back, tmp_path)
    assert_same(model, back)


def test_each_rank_holds_its_piece_of_every_mamba_component(tmp_path):
    model, recipe = model_and_recipe("swiglu")
    save_megatron(model, recipe, tmp_path, tp=2, pp=1, iteration=1)
    rank1 = load_rank_file(tmp_path / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt")
    in_proj = model.layers[0].mixer.in_proj.weight
    sizes = {"z": 64, "x": 64, "B": 32, "C": 32, "dt": 8}  # d_inner 64, 4 groups x 8, 8 heads
    pieces, offset = [], 0
    for size in sizes.values():
        pieces.append(in_proj[offset + size // 2 : offset + size])  # the second half of each
        offset += size
    got = rank1["model"]["decoder.layers.0.mixer.in_proj.weight"]
    assert torch.equal(got, torch.cat(pieces))
    fc1 = model.layers[2].mixer.linear_fc1.weight  # SwiGLU: [gate; up], 64 rows each
    want = torch.cat([fc1[32:64], fc1[96:128]])
    assert torch.equal(rank1["model"]["decoder.layers.2.mlp.linear_fc1.weight"], want)
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in rank1["model"]


def rewrite(path: Path, fn) -> None:
    ckpt = load_rank_file(path)
    ckpt["model"] = fn(ckpt["model"])
    torch.save(ckpt, path)


def test_fused_norm_keys_and_extra_state_import(tmp_path):
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path, tp=2, pp=1, iteration=5)
    fused = {"0": "mixer.in_proj", "1": "self_attention.linear_qkv", "2": "mlp.linear_fc1"}

    def to_fused(state):
        out = {}
        for key, value in state.items():
            parts = key.split(".")
            if key.startswith("decoder.layers.") and parts[3] == "norm":
                layer = parts[2]
                target = fused.get(layer, "mixer.in_proj")
                key = f"decoder.layers.{layer}.{target}.layer_norm_{parts[4]}"
            out[key] = value
        out["decoder.layers.1.self_attention.core_attention._extra_state"] = None
        return out

    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite(tmp_path / "iter_0000005" / rank / "model_optim_rng.pt", to_fused)
    back = HybridLM(model.cfg, vocab_size=VOCAB)
    load_megatron(back, tmp_path)
    assert_same(model, back)


def test_errors_name_the_problem(tmp_path):
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path, tp=2, pp=1, iteration=5)
    rank1 = tmp_path / "iter_0000005" / "mp_rank_01" / "model_optim_rng.pt"
    rewrite(rank1, lambda s: {k: v for k, v in s.items() if "out_proj" not in k})
    with pytest.raises(KeyError, match=r"rank \(1, 0\) has no 'decoder.layers.0.mixer.out_proj"):
        load_megatron(HybridLM(model.cfg, vocab_size=VOCAB), tmp_path)
    rank1.unlink()
    with pytest.raises(FileNotFoundError, match=r"TP=2 PP=1 but rank directories \['mp_rank_01'\]"):
        load_megatron(HybridLM(model.cfg, vocab_size=VOCAB), tmp_path)
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration"):
        load_megatron(HybridLM(model.cfg, vocab_size=VOCAB), tmp_path / "nothing")


def test_leftover_keys_are_an_error(tmp_path):
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path, tp=1, pp=1, iteration=5)
    path = tmp_path / "iter_0000005" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(path, lambda s: s | {"decoder.layers.0.mixer.surprise": torch.zeros(1)})
    with pytest.raises(KeyError, match="no place for.*surprise"):
        load_megatron(HybridLM(model.cfg, vocab_size=VOCAB), tmp_path)


def test_command_line_round_trip(tmp_path):
    model, recipe = model_and_recipe("swiglu")
    ours = save_model_checkpoint(tmp_path / "ours", model, recipe, step=9)

    def run(*args):
        proc = subprocess.run(
            [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    run("checkpoints_tools/reshard.py", "--in", ours, "--out", tmp_path / "mg", "--tp", 4,
        "--pp", 2, "--format", "megatron")  # fmt: skip
    proc = run("checkpoints_tools/import_megatron.py", "--in", tmp_path / "mg", "--out", tmp_path / "back")  # fmt: skip
    assert "TP=4, PP=2, iteration 9" in proc.stdout and "M*-M" in proc.stdout
    back, back_recipe, _ = model_from_checkpoint(tmp_path / "back")
    assert back_recipe.model.pattern == "M*-M" and back_recipe.model.mlp_activation == "swiglu"
    assert_same(model.eval(), back)
