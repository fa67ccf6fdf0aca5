"""Import a Hugging Face NemotronH directory (as published on the hub: config.json, sharded
safetensors, tokenizer.json) as one of our checkpoints: the inverse of `toolkit.checkpoint.hf`.

    python checkpoints_tools/import_hf.py --in nemotron-h-dir --out runs/nh/checkpoints

The model's shape comes from config.json (the layer pattern from `hybrid_override_pattern`, or
transformers 5's `layers_block_type`); every tensor of the files must find its parameter and
every parameter its tensor. What our models cannot compute is refused by name: MoE (`E`) and other
layer kinds, biases, activations other than relu2 and gelu, attention heads of another width.
Weights are stored in float32 (bf16 ones exactly: an upcast; export with --dtype bfloat16 gives
the same bits back). One difference is only warned about: transformers clamps the Mamba dt below
at `time_step_min` (0.001 in released configs); we, like Megatron-core's mixer that trained those
models, do not (the export writes 0). The tokenizer.json is copied into the checkpoint root and
named in the recipe; our own byte-level tokenizer files become `byte` again. An instruct model's
chat template (`chat_template.jinja`, or tokenizer_config.json's `chat_template`) goes beside it
with the bos and eos tokens it names and the tokens generation_config.json ends generation at,
where the server's chat endpoint finds it (toolkit.inference.chat_template).
Exit status: 0 done, 2 bad input (not a NemotronH directory, a refused feature), 1 failure.
"""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from toolkit.checkpoint.hf import HF_ACTIVATION, HF_LAYER_TYPE, byte_tokenizer_files
from toolkit.config import RecipeError
from toolkit.inference.chat_template import SPECIALS_FILE, TEMPLATE_FILE
from toolkit.model import HybridLM
from toolkit.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

LAYER_KIND = {v: k for k, v in HF_LAYER_TYPE.items()} | {"mamba": "M", "attention": "*"}
KIND_NAMES = {"E": "MoE", "G": "gated delta net"}


class ImportRefused(ValueError):
    """The directory is not a NemotronH model we can compute: the message names what."""


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportRefused(
            f"--in {src}: no config.json (not a Hugging Face model directory)"
        ) from None
    except (OSError, ValueError) as e:
        raise ImportRefused(f"{path}: not a readable JSON file: {e}") from None
    if config.get("model_type") != "nemotron_h":
        raise ImportRefused(f"{path}: model_type {config.get('model_type')!r}, not 'nemotron_h'")
    return config


def layer_pattern(config: dict[str, Any]) -> str:
    """Our pattern string: hybrid_override_pattern, else layers_block_type; refused kinds named."""
    pattern = config.get("hybrid_override_pattern")
    if not pattern:
        types = config.get("layers_block_type") or []
        pattern = "".join(LAYER_KIND.get(t, "E" if t == "moe" else f"<{t}>") for t in types)
    bad = sorted({c for c in pattern.replace("<", "").replace(">", "") if c not in "M*-"})
    if "<" in pattern or bad:
        names = [f"{c!r} ({KIND_NAMES.get(c, 'unknown')})" for c in bad if c.isalpha()]
        names += [p.split(">")[0] for p in pattern.split("<")[1:]]
        raise ImportRefused(
            f"config.json: layer kinds this toolkit does not have: {', '.join(names)} in "
            f"{pattern!r} (it has Mamba-2 M, attention *, MLP -)"
        )
    if config.get("num_hidden_layers", len(pattern)) != len(pattern):
        raise ImportRefused(
            f"config.json: num_hidden_layers {config['num_hidden_layers']} but the pattern "
            f"{pattern!r} has {len(pattern)} layers"
        )
    return pattern


def model_table(config: dict[str, Any]) -> dict[str, Any]:
    """Our [model] section for a NemotronH config.json; ImportRefused naming every feature we
    lack."""
    c = config
    pattern = layer_pattern(c)
    hidden = c["hidden_size"]
    problems = [
        f"{key}=true (this toolkit's layers have no biases)"
        for key in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias")
        if c.get(key)
    ]
    if c.get("use_conv_bias") is False:
        problems.append("use_conv_bias=false (our Mamba conv has a bias)")
    activation = c.get("mlp_hidden_act", "relu2")
    if "-" in pattern and activation not in HF_ACTIVATION:
        problems.append(f"mlp_hidden_act={activation!r} (we have {sorted(HF_ACTIVATION)})")
    if "M" in pattern and c.get("mamba_hidden_act", "silu") != "silu":
        problems.append(f"mamba_hidden_act={c['mamba_hidden_act']!r} (ours is silu)")
    heads = c.get("num_attention_heads", 1)
    if "*" in pattern and c.get("head_dim", hidden // heads) * heads != hidden:
        problems.append(f"head_dim={c['head_dim']} (ours is hidden_size / num_attention_heads)")
    d_inner = c.get("mamba_num_heads", 0) * c.get("mamba_head_dim", 0)
    if "M" in pattern and (d_inner == 0 or d_inner % hidden):
        problems.append(
            f"mamba_num_heads x mamba_head_dim = {d_inner} (ours is a multiple of hidden_size)"
        )
    if c.get("sliding_window") and "*" in pattern:
        problems.append(f"sliding_window={c['sliding_window']} (our attention sees every token)")
    if c.get("num_nextn_predict_layers"):
        problems.append(
            f"num_nextn_predict_layers={c['num_nextn_predict_layers']} (multi-token prediction "
            "layers)"
        )
    if problems:
        raise ImportRefused("config.json: cannot import: " + "; ".join(problems))
    if c.get("time_step_min", 0.0) > 0 and "M" in pattern:
        log.warning(
            "config.json: time_step_min=%s: transformers clamps the Mamba dt below at it; this "
            "toolkit does not (as Megatron-core's mixer): outputs differ where dt < %s",
            c["time_step_min"],
            c["time_step_min"],
        )
    table = {
        "num_layers": len(pattern),
        "hidden_size": hidden,
        "seq_length": c.get("max_position_embeddings", 4096),
        "pattern": pattern,
        "num_attention_heads": heads,
        "num_query_groups": c.get("num_key_value_heads", heads),
        "ffn_hidden_size": c.get("intermediate_size", 4 * hidden),
        "mlp_activation": activation if activation in HF_ACTIVATION else "relu2",
        "norm_eps": float(c.get("layer_norm_epsilon", 1e-5)),
        "vocab_size": c["vocab_size"],
        "init_std": float(c.get("initializer_range", 0.02)),
    }
    if "M" in pattern:
        table |= {
            "mamba_state_dim": c["ssm_state_size"],
            "mamba_head_dim": c["mamba_head_dim"],
            "mamba_num_groups": c["n_groups"],
            "mamba_expand": d_inner // hidden,
            "mamba_conv_kernel": c.get("conv_kernel", 4),
            "mamba_chunk_size": c.get("chunk_size", 128),
        }
    return table


def read_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (through the index when there is one)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise ImportRefused(f"--in {src}: no .safetensors files")
    tensors = {}
    for name in files:
        if not (src / name).is_file():
            raise ImportRefused(f"{index}: names {name}, which is not in {src}")
        with safe_open(src / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                # transformers' own module name; its files (and the hub's) say backbone.
                ours = "backbone." + key[len("model.") :] if key.startswith("model.") else key
                tensors[ours] = f.get_tensor(key)
    return tensors


def load_hf_weights(model: HybridLM, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    """Copy NemotronH tensors into `model` (the inverse of hf.hf_state_dict): every parameter
    filled, every tensor used, shapes checked; vocabulary padding rows set to zero."""
    tensors = dict(tensors)
    vocab = model.vocab_size

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ImportRefused(f"the safetensors files have no {name}")
        return tensors.pop(name)

    def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise ImportRefused(
                f"{name}: shape {tuple(value.shape)}, but config.json makes it {tuple(param.shape)}"
            )
        param.copy_(value)

    def put_rows(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        param.zero_()  # the padding rows past the vocabulary: never read, kept deterministic
        put(param[:vocab], value, name)

    embedding = take("backbone.embeddings.weight")
    put_rows(model.embedding.weight, embedding, "backbone.embeddings.weight")
    head = embedding if tied and "lm_head.weight" not in tensors else take("lm_head.weight")
    put_rows(model.output_layer.weight, head, "lm_head.weight")
    put(model.final_norm.weight, take("backbone.norm_f.weight"), "backbone.norm_f.weight")
    for i, block in enumerate(model.layers):
        prefix = f"backbone.layers.{i}"
        put(block.norm.weight, take(f"{prefix}.norm.weight"), f"{prefix}.norm.weight")
        mixer = block.mixer
        if block.kind == "*":  # our rows per KV group: [q (heads per group), k, v]
            g, hpg, d = mixer.num_groups, mixer.heads_per_group, mixer.head_dim
            q = take(f"{prefix}.mixer.q_proj.weight").unflatten(0, (g, hpg, d))
            k = take(f"{prefix}.mixer.k_proj.weight").unflatten(0, (g, 1, d))
            v = take(f"{prefix}.mixer.v_proj.weight").unflatten(0, (g, 1, d))
            put(mixer.linear_qkv.weight, torch.cat([q, k, v], 1).flatten(0, 2), f"{prefix} qkv")
            put(mixer.linear_proj.weight, take(f"{prefix}.mixer.o_proj.weight"), f"{prefix} o")
        elif block.kind == "-":
            put(mixer.linear_fc1.weight, take(f"{prefix}.mixer.up_proj.weight"), f"{prefix} up")
            put(mixer.linear_fc2.weight, take(f"{prefix}.mixer.down_proj.weight"), f"{prefix} down")
        else:
            for name, p in mixer.named_parameters():
                key = f"{prefix}.mixer.{name}"
                put(p, take(key), key)
    if tensors:
        unused = sorted(tensors)
        raise ImportRefused(
            f"tensors this toolkit has no place for ({len(unused)}): {', '.join(unused[:5])}"
            + (", ..." if len(unused) > 5 else "")
        )


def tokenizer_source(src: Path, given: str | None) -> str:
    """The tokenizer to import: --tokenizer if given; `byte` for our own byte-level files; else
    the directory's tokenizer.json."""
    if given:
        return given
    path = src / "tokenizer.json"
    if not path.is_file():
        raise ImportRefused(
            f"--in {src}: no tokenizer.json; pass --tokenizer PATH (a tokenizer.json or .model)"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImportRefused(f"{path}: not a readable JSON file: {e}") from None
    if document == byte_tokenizer_files(ByteTokenizer(), 0)["tokenizer.json"]:
        return "byte"
    return str(path)


def import_hf(
    src: str | Path, out: str | Path, *, name: str = "imported", tokenizer: str | None = None
) -> tuple[Path, HybridLM, str]:
    """Read a NemotronH directory and publish it as a checkpoint under `out`; returns the
    checkpoint path, the model and the tokenizer spec."""
    from toolkit.build import build_model, save_model_checkpoint  # build imports this package
    from toolkit.config import recipe_from_dict
    from toolkit.tokenizer import TokenizerError, build_tokenizer

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ImportRefused(f"--in {src}: not a directory")
    config = read_config(src)
    table = model_table(config)
    tensors = read_tensors(src)
    source = tokenizer_source(src, tokenizer)
    # A directory's tokenizer.json is copied into the checkpoint root, which the recipe names,
    # and its chat template beside it.
    copy = tokenizer is None and source != "byte"
    chat = read_chat_template(src) if copy else None
    ends = generation_end_ids(src) if chat is not None else []
    spec = str(out.resolve() / "tokenizer.json") if copy else source
    try:
        recipe = recipe_from_dict(
            {"name": name, "model": table, "data": {"tokenizer": spec}, "train": {"steps": 1}}
        )
        tok = build_tokenizer(source)
    except (RecipeError, TokenizerError) as e:
        raise ImportRefused(f"the imported recipe: {e}") from None
    if tok.vocab_size > table["vocab_size"]:
        raise ImportRefused(
            f"the tokenizer has {tok.vocab_size} tokens, config.json's vocab_size is "
            f"{table['vocab_size']}"
        )
    with torch.no_grad():
        model = build_model(recipe, tok)
        load_hf_weights(model, tensors, bool(config.get("tie_word_embeddings")))
    path = save_model_checkpoint(out, model, recipe, metadata={"imported_from": str(src.resolve())})
    if copy:
        shutil.copyfile(source, spec)
    if chat is not None:
        template, specials = chat
        # As token strings, so that the file reads (and is checked) against the tokenizer.
        strings = []
        for i in ends:
            token = tok.token_string(i)
            if tok.encode(token) == [i]:
                strings.append(token)
            else:
                log.warning(
                    "generation_config.json's eos_token_id %d (%r) is not a token this tokenizer "
                    "encodes as itself: the chat endpoint will not stop at it",
                    i,
                    token,
                )
        if strings:
            specials["end_tokens"] = strings
        (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        (out / SPECIALS_FILE).write_text(json.dumps(specials, indent=1) + "\n", encoding="utf-8")
    return path, model, spec


def read_chat_template(src: Path) -> tuple[str, dict[str, str]] | None:
    """The directory's chat template (chat_template.jinja, else tokenizer_config.json's
    `chat_template`: a string, or named templates of which 'default' is taken) and the special
    tokens tokenizer_config.json names; None where it has none. Read as text only: it is
    rendered in a sandbox when served (toolkit.inference.chat_template)."""
    config_path = src / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ImportRefused(f"{config_path}: not a readable JSON file: {e}") from None
    template = config.get("chat_template")
    if (src / TEMPLATE_FILE).is_file():
        try:
            template = (src / TEMPLATE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ImportRefused(f"{src / TEMPLATE_FILE}: not a readable text file: {e}") from None
    elif isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        return None
    specials = {}
    for name in ("bos_token", "eos_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token  # an AddedToken
        if isinstance(token, str):
            specials[name] = token
    return template, specials


def generation_end_ids(src: Path) -> list[int]:
    """generation_config.json's eos_token_id (one id or a list): the ids transformers' generation
    stops at, which for an instruct model include its end of turn. [] where there is none."""
    path = src / "generation_config.json"
    if not path.is_file():
        return []
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ImportRefused(f"{path}: not a readable JSON object: {e}") from None
    ids = [ids] if isinstance(ids, int) else ids
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ImportRefused(f"{path}: eos_token_id must be an id or a list of ids, got {ids!r}")
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/import_hf.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--in", dest="src", required=True, help="the NemotronH directory")
    parser.add_argument("--out", required=True, help="our checkpoint root to create (new/empty)")
    parser.add_argument("--tokenizer", help="data.tokenizer (default: the directory's own)")
    parser.add_argument("--name", default="imported", help="run name in the recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        print(f"error: --out {out}: exists and is not an empty directory", file=sys.stderr)
        return 2
    try:
        path, model, spec = import_hf(args.src, out, name=args.name, tokenizer=args.tokenizer)
    except ImportRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # unreadable files, a full disk
        print(f"error: importing {args.src}: {e}", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in model.parameters())
    print(
        f"imported {args.src}: {model.layout.pattern} ({len(model.layout.pattern)} layers), "
        f"{params:,} parameters (padded vocabulary), vocabulary {model.vocab_size}, "
        f"tokenizer {spec} -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
