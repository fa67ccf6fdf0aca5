"""Megatron per-rank checkpoints: save at several TP/PP and load back (tensors and logits
identical), the per-rank layout against hand-computed pieces and against our TP code, 2024-era
and fused-norm keys, errors, and the import command end to end."""

import copy
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_config
from toolkit.build import model_from_checkpoint
from toolkit.checkpoint.hf import byte_tokenizer_files
from toolkit.checkpoint.megatron import (
    load_into,
    load_megatron,
    load_rank_file,
    save_megatron,
)
from toolkit.checkpoint.megatron_layout import NORM_KEY, megatron_key
from toolkit.config import recipe_from_dict
from toolkit.model import HybridLM
from toolkit.parallel.tp import apply_tp
from toolkit.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 259
TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def model_and_recipe(activation: str = "swiglu", pp: int = 1, **overrides):
    """Pattern M*-M: Mamba (4 groups), attention with GQA (8 heads, 4 KV groups), an MLP."""
    cfg = tiny_model_config(
        num_attention_heads=8,
        num_query_groups=4,
        mamba_num_groups=4,
        mlp_activation=activation,
        **overrides,
    )
    torch.manual_seed(0)
    model = HybridLM(cfg, vocab_size=VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms, D and biases away from their initial values
            p.add_(0.05 * torch.randn_like(p))
    table = {"model": dataclasses.asdict(cfg), "train": {"steps": 1}, "parallel": {"pp": pp}}
    return model, recipe_from_dict(table)


def imported(model: HybridLM, root: Path) -> HybridLM:
    state, _ = load_megatron(root)
    back = HybridLM(model.cfg, vocab_size=VOCAB).eval()
    load_into(back, state, str(root))
    return back


def assert_same(a: HybridLM, b: HybridLM) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p[:VOCAB], q[:VOCAB]), name  # [:VOCAB] only shortens vocab rows
    with torch.no_grad():
        assert torch.equal(a(TOKENS)[..., :VOCAB], b(TOKENS)[..., :VOCAB])


def rank_file(root: Path, iteration: int, tp_rank: int, pp_rank: int | None = None) -> Path:
    name = f"mp_rank_{tp_rank:02d}" + ("" if pp_rank is None else f"_{pp_rank:03d}")
    return root / f"iter_{iteration:07d}" / name / "model_optim_rng.pt"


@pytest.mark.parametrize(
    "activation,tp,pp", [("swiglu", 4, 2), ("relu2", 1, 1), ("gelu", 2, 1), ("relu2", 2, 4)]
)
def test_round_trip_is_exact(tmp_path, activation, tp, pp):
    model, recipe = model_and_recipe(activation)
    out = save_megatron(model, recipe, tmp_path, tp=tp, pp=pp, iteration=20)
    assert out == tmp_path / "iter_0000020"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "20"
    files = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*"))
    assert len(files) == tp * pp
    last = rank_file(tmp_path, 20, tp - 1, pp - 1 if pp > 1 else None)
    ckpt = load_rank_file(last)
    assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 20
    args = ckpt["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
    assert args.padded_vocab_size == 128 * tp * -(-VOCAB // (128 * tp))
    assert args.hybrid_override_pattern == "M*-M" and args.num_query_groups == 4
    assert args.group_query_attention and args.swiglu == (activation == "swiglu")
    assert ckpt["opt_param_scheduler"]["max_lr"] == recipe.train.lr
    assert set(ckpt["rng_state"][0]) >= {"torch_rng_state", "cuda_rng_state", "np_rng_state"}
    # The last stage holds the final norm and output layer; layer numbers restart per stage.
    assert "output_layer.weight" in ckpt["model"] and "decoder.final_norm.weight" in ckpt["model"]
    assert all(int(k.split(".")[2]) < 4 // pp for k in ckpt["model"] if k.startswith("decoder.l"))
    assert_same(model, imported(model, tmp_path))


def test_uneven_pipeline_stages(tmp_path):
    """Stages from the pattern's '|' markers: 1 and 3 layers. The reader finds each stage's
    first layer from how many layers the earlier stages' files hold."""
    model, recipe = model_and_recipe("relu2", pp=2, pattern="M|*-M")
    save_megatron(model, recipe, tmp_path, tp=2, pp=2, iteration=4)
    first = load_rank_file(rank_file(tmp_path, 4, 1, 0))["model"]
    second = load_rank_file(rank_file(tmp_path, 4, 1, 1))["model"]
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0"}
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in second
    assert "decoder.layers.2.mixer.A_log" in second
    assert_same(model, imported(model, tmp_path))
    save_megatron(model, recipe, tmp_path / "pp1", tp=1, pp=1, iteration=4)  # markers ignored
    assert_same(model, imported(model, tmp_path / "pp1"))


def test_bf16_model_writes_bf16_and_imports_exactly(tmp_path):
    model, recipe = model_and_recipe("relu2")
    model = model.to(torch.bfloat16)
    save_megatron(model, recipe, tmp_path, tp=2, pp=1, iteration=3)
    ckpt = load_rank_file(rank_file(tmp_path, 3, 1))
    assert ckpt["args"].params_dtype == torch.bfloat16 and ckpt["args"].bf16
    assert {t.dtype for t in ckpt["model"].values()} == {torch.bfloat16}
    state, _ = load_megatron(tmp_path)
    for name, p in model.named_parameters():
        assert torch.equal(state[name][:VOCAB], p[:VOCAB]), name


def test_rank_files_hold_what_our_tp_code_holds(tmp_path):
    """Each rank's tensors equal that rank's shards of apply_tp (toolkit/parallel/tp.py)."""
    model, recipe = model_and_recipe("swiglu")
    save_megatron(model, recipe, tmp_path, tp=4, pp=1, iteration=1)
    padded = HybridLM(model.cfg, vocab_size=VOCAB, tp=4)  # vocabulary padded to 128 x 4
    with torch.no_grad():
        for (name, p), q in zip(padded.named_parameters(), model.parameters()):
            if name in ("embedding.weight", "output_layer.weight"):
                p.zero_()[:VOCAB] = q[:VOCAB]
            else:
                p.copy_(q)
    for rank in range(4):
        shard = copy.deepcopy(padded)
        apply_tp(shard, group=None, tp=4, rank=rank)
        state = load_rank_file(rank_file(tmp_path, 1, rank))["model"]
        assert len(state) == len(list(shard.parameters()))
        for name, p in shard.named_parameters():
            assert torch.equal(state[megatron_key(name, "M*-M", 0)], p), (rank, name)


def test_each_rank_holds_its_piece_of_every_component(tmp_path):
    """Rank 1 of 2 holds the second half of z, x, B, C and dt, not rows [R/2, R) of in_proj."""
    model, recipe = model_and_recipe("swiglu")
    save_megatron(model, recipe, tmp_path, tp=2, pp=1, iteration=1)
    state = load_rank_file(rank_file(tmp_path, 1, 1))["model"]
    mamba, attention, mlp = (model.layers[i].mixer for i in (0, 1, 2))

    def second_halves(weight, sizes):
        pieces, offset = [], 0
        for size in sizes:
            pieces.append(weight[offset + size // 2 : offset + size])
            offset += size
        return torch.cat(pieces)

    # d_inner 64, B and C: 4 groups x 8 states, 8 heads.
    in_proj = second_halves(mamba.in_proj.weight, [64, 64, 32, 32, 8])
    assert torch.equal(state["decoder.layers.0.mixer.in_proj.weight"], in_proj)
    assert not torch.equal(in_proj, mamba.in_proj.weight[100:])  # not one contiguous block
    conv = second_halves(mamba.conv1d.weight, [64, 32, 32])
    assert torch.equal(state["decoder.layers.0.mixer.conv1d.weight"], conv)
    assert torch.equal(
        state["decoder.layers.0.mixer.conv1d.bias"], second_halves(mamba.conv1d.bias, [64, 32, 32])
    )
    assert torch.equal(state["decoder.layers.0.mixer.A_log"], mamba.A_log[4:])
    assert torch.equal(state["decoder.layers.0.mixer.norm.weight"], mamba.norm.weight[32:])
    assert torch.equal(
        state["decoder.layers.0.mixer.out_proj.weight"], mamba.out_proj.weight[:, 32:]
    )
    # Attention: rows are [q (2 heads), k, v] x 4 KV groups of head_dim 4; rank 1 has groups 2, 3.
    qkv = attention.linear_qkv.weight
    assert torch.equal(state["decoder.layers.1.self_attention.linear_qkv.weight"], qkv[32:])
    # SwiGLU fc1 is [gate; up] of 64 rows each: rank 1 has [gate 32:64; up 32:64].
    fc1 = mlp.linear_fc1.weight
    want = torch.cat([fc1[32:64], fc1[96:128]])
    assert torch.equal(state["decoder.layers.2.mlp.linear_fc1.weight"], want)
    assert torch.equal(
        state["decoder.layers.2.mlp.linear_fc2.weight"], mlp.linear_fc2.weight[:, 32:]
    )
    assert torch.equal(state["decoder.layers.3.norm.weight"], model.layers[3].norm.weight)
    # Attention's and the MLP's pre-norms are fused into their first linear (replicated).
    norm = "decoder.layers.{}.{}.layer_norm_weight"
    assert torch.equal(
        state[norm.format(1, "self_attention.linear_qkv")], model.layers[1].norm.weight
    )
    assert torch.equal(state[norm.format(2, "mlp.linear_fc1")], model.layers[2].norm.weight)


def rewrite(path: Path, fn, args_fn=None) -> None:
    ckpt = torch.load(path, weights_only=False)  # not memory-mapped: the file is rewritten
    ckpt["model"] = fn(ckpt["model"])
    if args_fn:
        args_fn(ckpt["args"])
    torch.save(ckpt, path)


def renamed_norms(state: dict, names: dict[str, str]) -> dict:
    """Each layer's pre-norm, in whichever form the export wrote it (NORM_KEY), renamed by its
    layer's block part."""
    layers = [k.split(".") for k in state if k.startswith("decoder.layers.")]
    parts = {k[2]: k[3] for k in layers if k[3] != "norm"}
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
        norm = match and NORM_KEY.fullmatch(match[2])
        if norm:
            key = f"decoder.layers.{match[1]}.{names[parts[match[1]]]}{norm[1]}"
        out[key] = value
    return out


def fused_norms(state: dict) -> dict:
    """The later style: each pre-norm fused into its block's first linear, and the
    `_extra_state` entries Transformer Engine writes (None or empty tensors: not weights)."""
    out = renamed_norms(
        state,
        {
            "mixer": "mixer.in_proj.layer_norm_",
            "self_attention": "self_attention.linear_qkv.layer_norm_",
            "mlp": "mlp.linear_fc1.layer_norm_",
        },
    )
    for key in list(out):
        if key.endswith(("linear_qkv.weight", "linear_fc1.weight", "in_proj.weight")):
            out[key.replace(".weight", "._extra_state")] = None
        if key.endswith("linear_qkv.weight"):
            out[key.replace("linear_qkv.weight", "core_attention._extra_state")] = torch.empty(0)
    return out


def local_spec_norms(state: dict) -> dict:
    """Megatron's local (non-Transformer-Engine) specs: input_layernorm, pre_mlp_layernorm."""
    names = {"mixer": "norm.", "self_attention": "input_layernorm.", "mlp": "pre_mlp_layernorm."}
    return renamed_norms(state, names)


@pytest.mark.parametrize(
    "variant,key",
    [
        (fused_norms, "decoder.layers.0.mixer.in_proj.layer_norm_weight"),
        (local_spec_norms, "decoder.layers.1.input_layernorm.weight"),
    ],
)
def test_other_key_styles_import(tmp_path, variant, key):
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path, tp=2, pp=2, iteration=5)
    for path in tmp_path.glob("iter_*/*/model_optim_rng.pt"):
        rewrite(path, variant)
    keys = load_rank_file(rank_file(tmp_path, 5, 0, 0))["model"]
    assert key in keys and len(keys) > 10
    assert_same(model, imported(model, tmp_path))


def test_errors_name_the_file_and_key(tmp_path):
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path, tp=4, pp=1, iteration=5)
    rank1 = rank_file(tmp_path, 5, 1)
    rewrite(rank1, lambda s: {k: v for k, v in s.items() if "out_proj" not in k})
    with pytest.raises(
        KeyError,
        match=r"mp_rank_01.*no 'decoder.layers.0.mixer.out_proj.weight' \(mp_rank_00 has it\)",
    ):
        load_megatron(tmp_path)
    rank_file(tmp_path, 5, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"TP=4 PP=1 but rank directories \['mp_rank_02'\]"):
        load_megatron(tmp_path)
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration"):
        load_megatron(tmp_path / "nothing")
    rank_file(tmp_path, 5, 0).write_bytes(b"not a checkpoint")  # never unpickled in full
    with pytest.raises(ValueError, match=r"mp_rank_00/model_optim_rng.pt: not a readable"):
        load_megatron(tmp_path)


def test_missing_and_leftover_tensors_are_errors(tmp_path):
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path, tp=1, pp=1, iteration=5)
    state, _ = load_megatron(tmp_path)
    target = HybridLM(model.cfg, vocab_size=VOCAB)
    partial = {k: v for k, v in state.items() if k != "layers.3.mixer.D"}
    with pytest.raises(KeyError, match=r"missing \['layers.3.mixer.D'\]"):
        load_into(target, partial, "ckpt")
    with pytest.raises(KeyError, match=r"no place for \['layers.7.norm.weight'\]"):
        load_into(target, state | {"layers.7.norm.weight": torch.ones(32)}, "ckpt")
    path = rank_file(tmp_path, 5, 0)
    rewrite(path, lambda s: s | {"decoder.layers.0.mixer.surprise": torch.zeros(1)})
    with pytest.raises(KeyError, match="layers.0.mixer.surprise"):
        load_megatron(tmp_path)
    rewrite(path, lambda s: s | {"decoder.layers.0.router.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="decoder.layers.0.router.weight"):
        load_megatron(tmp_path)


def import_cli():
    spec = importlib.util.spec_from_file_location(
        "import_megatron", ROOT / "checkpoints_tools/import_megatron.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_end_to_end(tmp_path):
    model, recipe = model_and_recipe("swiglu")
    save_megatron(model, recipe, tmp_path / "mg", tp=2, pp=2, iteration=9)
    proc = subprocess.run(
        [
            sys.executable,
            "checkpoints_tools/import_megatron.py",
            "--in",
            str(tmp_path / "mg"),
            "--out",
            str(tmp_path / "ours"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "iteration 9: TP=2 PP=2 (4 files, float32), 4 layers M*-M" in proc.stdout
    back, back_recipe, _ = model_from_checkpoint(tmp_path / "ours")
    assert back_recipe.model.pattern == "M*-M" and back_recipe.model.mlp_activation == "swiglu"
    assert back_recipe.model.num_query_groups == 4 and back.vocab_size == VOCAB
    assert_same(model, back)


def test_command_line_takes_the_vocabulary_from_the_tokenizer(tmp_path):
    """With no vocab_size in the args, --tokenizer's vocabulary says which rows are real."""
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path / "mg", tp=2, pp=1, iteration=2)
    for rank in (0, 1):
        rewrite(
            rank_file(tmp_path / "mg", 2, rank), lambda s: s, lambda a: delattr(a, "vocab_size")
        )
    document = byte_tokenizer_files(ByteTokenizer(), 64)["tokenizer.json"]
    (tmp_path / "tok.json").write_text(json.dumps(document))
    argv = ["--in", str(tmp_path / "mg"), "--out", str(tmp_path / "ours")]
    assert import_cli().main([*argv, "--tokenizer", str(tmp_path / "tok.json")]) == 0
    back, back_recipe, tokenizer = model_from_checkpoint(tmp_path / "ours")
    assert back.vocab_size == VOCAB and back_recipe.data.tokenizer == str(tmp_path / "tok.json")
    assert tokenizer.eod == 257
    assert_same(model, back)


def test_command_line_reads_current_megatrons_layer_pattern(tmp_path):
    """Current Megatron saves the pattern as args.hybrid_layer_pattern (hybrid_override_pattern
    unset, no ratios): the import takes the layers from it, where the ratios alone would say
    four Mamba layers."""
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path / "mg", tp=2, pp=1, iteration=2)

    def as_current(args):
        args.hybrid_layer_pattern, args.hybrid_override_pattern = args.hybrid_override_pattern, None
        args.hybrid_attention_ratio = args.hybrid_mlp_ratio = 0.0

    for rank in (0, 1):
        rewrite(rank_file(tmp_path / "mg", 2, rank), lambda s: s, as_current)
    argv = ["--in", str(tmp_path / "mg"), "--out", str(tmp_path / "ours")]
    assert import_cli().main(argv) == 0
    back, back_recipe, _ = model_from_checkpoint(tmp_path / "ours")
    assert back_recipe.model.pattern == "M*-M"
    assert_same(model, back)


def test_command_line_refuses_bad_input(tmp_path, capsys):
    cli = import_cli()
    model, recipe = model_and_recipe("relu2")
    save_megatron(model, recipe, tmp_path / "mg", tp=2, pp=1, iteration=2)
    out = ["--out", str(tmp_path / "ours")]
    assert cli.main(["--in", str(tmp_path / "mg"), "--pattern", "MM*-", *out]) == 2
    assert "says MM*-, but the checkpoint holds the layers M*-M" in capsys.readouterr().err
    assert cli.main(["--in", str(tmp_path / "mg"), "--att", "0.5", *out]) == 2
    assert cli.main(["--in", str(tmp_path / "nothing"), *out]) == 2
    assert "no latest_checkpointed_iteration.txt" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0 and "--pattern" in capsys.readouterr().out
