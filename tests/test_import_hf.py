"""NemotronH import (toolkit/checkpoint/hf_import.py): a tiny random NemotronH made by
transformers itself imports with its logits and greedy text, and export -> import -> export gives
the same files, byte for byte."""

import dataclasses
import json
import os
import runpy
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]')"
)

from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

from tests.conftest import tiny_model_config  # noqa: E402
from toolkit.build import model_from_checkpoint, save_model_checkpoint  # noqa: E402
from toolkit.checkpoint import hf_import  # noqa: E402
from toolkit.checkpoint.hf import export_hf  # noqa: E402
from toolkit.config import recipe_from_dict  # noqa: E402
from toolkit.data.train_tokenizer import train_tokenizer  # noqa: E402
from toolkit.model import HybridLM  # noqa: E402
from toolkit.tokenizer import ByteTokenizer, build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
TOLERANCE = 5e-6  # the bound; test_export_hf measured 3.6e-7 to 2.0e-6 the other way


def hf_config(**overrides) -> NemotronHConfig:
    """Every block kind (Mamba-2 twice, attention with GQA, MLP), hub-style field values."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern="M*-M", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, ssm_state_size=8,
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=8,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return NemotronHConfig(**(fields | overrides))


def random_hf_model(config: NemotronHConfig) -> NemotronHForCausalLM:
    """Random weights, and no dt clamp (time_step_min 0, what our export writes; its weight
    init needs a positive one, so it is set after)."""
    torch.manual_seed(0)
    model = NemotronHForCausalLM(config).eval()
    model.config.time_step_min = 0.0
    mixers = [m for m in model.modules() if hasattr(m, "time_step_limit")]
    assert len(mixers) == 2
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norms, D and the rest away from their init
        for mixer in mixers:
            mixer.time_step_limit = (0.0, float("inf"))
            mixer.dt_bias.sub_(torch.linspace(0, 12, mixer.dt_bias.numel()))  # some dt << 1e-3
    return model


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> tuple[Path, NemotronHForCausalLM]:
    """A NemotronH directory as the hub has them: config.json, sharded safetensors with an
    index, tokenizer.json (a byte-level BPE trained here)."""
    tmp = tmp_path_factory.mktemp("hub")
    corpus = tmp / "corpus.jsonl"
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:10]
    corpus.write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in files))
    model = random_hf_model(hf_config())
    model.save_pretrained(tmp / "nh", max_shard_size="20KB")
    train_tokenizer(corpus, tmp / "nh" / "tokenizer.json", vocab_size=VOCAB, progress=False)
    return tmp / "nh", model


def import_cli(src: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "toolkit.checkpoint.hf_import",
        "--in",
        str(src),
        "--out",
        str(out),
    ]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def test_logits_and_greedy_text_equal_transformers(hub_dir, tmp_path):
    src, hf = hub_dir
    assert len(list(src.glob("*.safetensors"))) > 2  # sharded, with an index
    proc = import_cli(src, tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert "M*-M (4 layers)" in proc.stdout and "WARNING" not in proc.stderr
    ours, recipe, tok = model_from_checkpoint(str(tmp_path / "ckpt"))
    # The tokenizer came along: copied into the checkpoint root, named by the recipe.
    assert recipe.data.tokenizer == str((tmp_path / "ckpt" / "tokenizer.json").resolve())
    assert (tmp_path / "ckpt/tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens)[..., :VOCAB]
    assert (got - want).abs().max().item() < TOLERANCE
    prompt = torch.tensor([tok.encode("def main():\n    ")])
    with torch.no_grad():  # transformers through its caches; ours recomputed in full
        theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
        mine = prompt
        for _ in range(16):
            mine = torch.cat([mine, ours(mine)[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
    assert tok.decode(mine[0].tolist()) == tok.decode(theirs[0].tolist())
    assert mine.tolist() == theirs.tolist()


def test_a_dt_clamp_is_warned_about(hub_dir, tmp_path):
    src, _ = hub_dir
    config = json.loads((src / "config.json").read_text())
    config["time_step_min"] = 0.001
    nh = tmp_path / "nh"
    nh.mkdir()
    for f in src.iterdir():
        (nh / f.name).write_bytes(f.read_bytes())
    (nh / "config.json").write_text(json.dumps(config))
    proc = import_cli(nh, tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert "time_step_min=0.001: transformers clamps the Mamba dt" in proc.stderr


def our_model() -> HybridLM:
    torch.manual_seed(3)
    model = HybridLM(tiny_model_config(mlp_activation="relu2"), vocab_size=259)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_export_import_export_is_bit_identical(tmp_path):
    model = our_model()
    recipe = recipe_from_dict({"model": dataclasses.asdict(model.cfg), "train": {"steps": 1}})
    save_model_checkpoint(tmp_path / "a", model, recipe)
    first, _, tok = model_from_checkpoint(str(tmp_path / "a"))
    export_hf(first, tmp_path / "hf1", max_shard_bytes=30_000, tokenizer=tok)
    proc = import_cli(tmp_path / "hf1", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    second, recipe2, tok2 = model_from_checkpoint(str(tmp_path / "b"))
    assert isinstance(tok2, ByteTokenizer) and recipe2.data.tokenizer == "byte"
    export_hf(second, tmp_path / "hf2", max_shard_bytes=30_000, tokenizer=tok2)
    names = sorted(p.name for p in (tmp_path / "hf1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "hf2").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 2
    for name in names:
        assert (tmp_path / "hf1" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), (
            name
        )


def import_main(src: Path, out: Path, capsys, *args: str) -> tuple[int, str]:
    """The command line in this process (faster than a subprocess): exit status, stderr."""
    code = hf_import.main(["--in", str(src), "--out", str(out), *args])
    return code, capsys.readouterr().err


def edited(src: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the hub directory with config.json fields changed (None: removed)."""
    out = tmp_path / "edited"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "changes, named",
    [
        (
            {"layers_block_type": ["linear_attention", "moe", "mlp", "linear_attention"]},
            "layer kinds this toolkit does not have: 'E' (MoE)",
        ),
        ({"hybrid_override_pattern": "M*EM"}, "'E' (MoE)"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
        ({"num_nextn_predict_layers": 1}, "multi-token prediction"),
        ({"model_type": "mamba2"}, "model_type 'mamba2', not 'nemotron_h'"),
        ({"head_dim": 16}, "head_dim=16"),
    ],
)
def test_features_we_lack_are_refused_by_name(hub_dir, tmp_path, capsys, changes, named):
    src = edited(hub_dir[0], tmp_path, **changes)
    code, err = import_main(src, tmp_path / "ckpt", capsys)
    assert code == 2 and named in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ckpt").exists()


def test_bad_directories_exit_2(hub_dir, tmp_path, capsys):
    code, err = import_main(tmp_path, tmp_path / "c", capsys)
    assert code == 2 and "no config.json" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    code, err = import_main(hub_dir[0], busy, capsys)
    assert code == 2 and "--out" in err and "not an empty" in err
    src = edited(hub_dir[0], tmp_path)
    (src / "tokenizer.json").unlink()
    code, err = import_main(src, tmp_path / "c", capsys)
    assert code == 2 and "no tokenizer.json; pass --tokenizer" in err
    # A tensor with no parameter to go to (the index gone: every .safetensors file is read).
    save_file({"backbone.layers.0.mixer.extra": torch.zeros(2)}, src / "extra.safetensors")
    (src / "model.safetensors.index.json").unlink()
    code, err = import_main(src, tmp_path / "c", capsys, "--tokenizer", "byte")
    assert code == 2 and "no place for (1): backbone.layers.0.mixer.extra" in err, err
    assert not (tmp_path / "c").exists()


def test_the_thin_script(hub_dir, tmp_path, capsys, monkeypatch):
    """checkpoints_tools/import_hf.py is toolkit.checkpoint.hf_import's main (run without its
    directory on sys.path, where inspect.py shadows the standard library until it is renamed)."""
    argv = ["import_hf.py", "--in", str(hub_dir[0]), "--out", str(tmp_path / "ckpt")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "checkpoints_tools" / "import_hf.py"), run_name="__main__")
    assert done.value.code == 0 and "imported" in capsys.readouterr().out
    assert build_tokenizer(str(tmp_path / "ckpt" / "tokenizer.json")).vocab_size == VOCAB


def test_an_instruct_models_chat_template_comes_along(hub_dir, tmp_path, capsys, caplog):
    """tokenizer_config.json's chat_template (here named templates: 'default' is taken), its eos
    token (an AddedToken's form) and generation_config.json's end ids (as token strings) go
    beside the copied tokenizer.json, where the server finds them; a chat_template.jinja file,
    as newer directories keep it, wins over the config. An unreadable tokenizer_config.json or
    a bad eos_token_id is refused before anything is written."""
    from toolkit.inference.chat_template import (
        SPECIALS_FILE,
        TEMPLATE_FILE,
        chat_template_beside,
        load_chat_template,
    )

    src = edited(hub_dir[0], tmp_path)
    default = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
    config = {
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": default}],
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "bos_token": None,
    }  # fmt: skip
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    # id 0 is <|endoftext|>; the last id is an ordinary piece, which would not stop a chat.
    last = build_tokenizer(str(src / "tokenizer.json")).vocab_size - 1
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, last]}))
    code, err = import_main(src, tmp_path / "ckpt", capsys)
    assert code == 0, err
    assert f"eos_token_id {last} (" in caplog.text and "will not stop at it" in caplog.text
    out = tmp_path / "ckpt"
    assert (out / TEMPLATE_FILE).read_text() == default
    specials = json.loads((out / SPECIALS_FILE).read_text())
    assert specials == {"eos_token": "<|endoftext|>", "end_tokens": ["<|endoftext|>"]}
    _, recipe, tok = model_from_checkpoint(str(out))
    path = chat_template_beside(recipe.data.tokenizer)
    assert path == out / TEMPLATE_FILE
    template = load_chat_template(path, tok)
    assert template.end_ids == {tok.eod}
    assert template.render([{"role": "user", "content": "hi"}]) == "<|endoftext|>hi"

    (src / TEMPLATE_FILE).write_text("{{ messages[0]['content'] }}")
    assert import_main(src, tmp_path / "ckpt2", capsys)[0] == 0
    assert (tmp_path / "ckpt2" / TEMPLATE_FILE).read_text() == "{{ messages[0]['content'] }}"

    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    code, err = import_main(src, tmp_path / "ckpt3", capsys)
    assert code == 2 and "eos_token_id must be an id or a list of ids" in err, err
    assert not (tmp_path / "ckpt3").exists()
    (src / "tokenizer_config.json").write_text("{not json")
    code, err = import_main(src, tmp_path / "ckpt4", capsys)
    assert code == 2 and "tokenizer_config.json: not a readable JSON file" in err, err
    assert not (tmp_path / "ckpt4").exists()
