"""Import a checkpoint of the reference framework (per-rank `iter_*/mp_rank_*/model_optim_rng.pt`
files at any TP and PP, 2024-era or fused-norm keys) as one of ours.

    python checkpoints_tools/import_megatron.py --in megatron_ckpt/ --out runs/imported/checkpoints

Sizes come from the tensors and the checkpoint's `args`; the layer pattern from --pattern, else
--att/--mlp, else the args' `hybrid_layer_pattern` (current Megatron) or
`hybrid_override_pattern` (earlier), or its ratios; whichever is used must describe
the layers the files hold (with no information at all, the files' own layers are the pattern).
Every parameter of the model must be in the files and every tensor in the files must be used.
The files are read by a restricted unpickler: tensors, the args' Namespace and RNG states load,
any other object a file names (an enum in the args, or code) is left as an inert placeholder
and never run. --trust-pickle unpickles in full instead (the files can then run any code: only
for files you trust). The result holds no optimizer state: training from it starts a fresh
optimizer (fine-tuning).
Exit status: 0 done, 2 bad input (a wrong directory, pattern, missing rank or key), 1 failure.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from toolkit.build import build_model, save_model_checkpoint
from toolkit.checkpoint.megatron import (
    check_grid,
    find_rank_files,
    get_arg,
    latest_iteration,
    load_into,
    load_megatron,
)
from toolkit.checkpoint.megatron_layout import pattern_of
from toolkit.config import RecipeError, recipe_from_dict
from toolkit.layout import allocate_layers
from toolkit.model import count_parameters
from toolkit.tokenizer import build_tokenizer


def model_table(margs: Any, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Our [model] section (without pattern, ratios or vocabulary) for a checkpoint read by
    load_megatron: sizes measured from its tensors where they show them, the rest (heads, state
    size, norm, position embedding, sequence length) from its args."""
    pattern = pattern_of(state)
    hidden = state["embedding.weight"].shape[1]

    def first(kind: str, param: str) -> tuple[int, ...]:
        name = f"layers.{pattern.find(kind)}.mixer.{param}"
        if name not in state:
            raise KeyError(f"the checkpoint has no {name} (a {kind!r} layer)")
        return tuple(state[name].shape)

    get = lambda name, default=None: get_arg(margs, name, default)  # noqa: E731
    heads = get("num_attention_heads") or 1
    table = {
        "num_layers": len(pattern),
        "hidden_size": hidden,
        "seq_length": get("seq_length") or get("max_position_embeddings") or 4096,
        "num_attention_heads": heads,
        "num_query_groups": (get("group_query_attention") and get("num_query_groups")) or heads,
        "norm": "layernorm" if get("normalization") == "LayerNorm" else "rmsnorm",
        "norm_eps": float(get("norm_epsilon", 1e-5)),
        "position_embedding": "rope" if get("position_embedding_type") == "rope" else "none",
        "rotary_percent": float(get("rotary_percent", 1.0)),
        "rotary_base": float(get("rotary_base", 10000)),
        "make_vocab_size_divisible_by": get("make_vocab_size_divisible_by") or 128,
        "init_std": float(get("init_method_std", 0.02)),
        "fp32_residual": bool(get("fp32_residual_connection", False)),  # Megatron's default
    }
    if "-" in pattern:
        ffn = first("-", "linear_fc2.weight")[1]
        gated = first("-", "linear_fc1.weight")[0] == 2 * ffn
        activation = "swiglu" if gated else "relu2" if get("squared_relu") else "gelu"
        table |= {"ffn_hidden_size": ffn, "mlp_activation": activation}
    if "M" in pattern:
        d_inner, mamba_heads = first("M", "out_proj.weight")[1], first("M", "A_log")[0]
        state_dim = get("mamba_state_dim") or 128
        gn = (first("M", "in_proj.weight")[0] - 2 * d_inner - mamba_heads) // 2
        if d_inner % hidden or gn % state_dim:
            raise ValueError(
                f"Mamba layers: d_inner {d_inner} is not a multiple of hidden {hidden}, or "
                f"B/C rows {gn} not a multiple of mamba_state_dim {state_dim}"
            )
        table |= {
            "mamba_expand": d_inner // hidden,
            "mamba_head_dim": d_inner // mamba_heads,
            "mamba_state_dim": state_dim,
            "mamba_num_groups": gn // state_dim,
            "mamba_conv_kernel": first("M", "conv1d.weight")[-1],
            "mamba_chunk_size": get("mamba_chunk_size") or 128,
        }
    return table


def pattern_keys(found: str, margs: Any, cli: argparse.Namespace) -> dict[str, Any]:
    """pattern / att_ratio / mlp_ratio for the recipe, checked against `found` (the layers the
    checkpoint holds)."""
    if cli.pattern:
        source, pattern = "--pattern", cli.pattern
        att, mlp = cli.att or 0.0, cli.mlp or 0.0
    elif cli.att is not None or cli.mlp is not None:
        source, pattern = "--att/--mlp", None
        att, mlp = cli.att or 0.0, cli.mlp or 0.0
    elif margs is None:
        source, pattern, att, mlp = "the files' layers", found, 0.0, 0.0
    else:
        # Current Megatron's name for the pattern, then the one its earlier checkpoints hold.
        field = next(
            (f for f in ("hybrid_layer_pattern", "hybrid_override_pattern") if get_arg(margs, f)),
            None,
        )
        pattern = get_arg(margs, field) if field else None
        att = float(get_arg(margs, "hybrid_attention_ratio") or 0.0)
        mlp = float(get_arg(margs, "hybrid_mlp_ratio") or 0.0)
        source = "the args' " + (field or "hybrid ratios")
    layers = pattern.replace("|", "") if pattern else allocate_layers(len(found), att, mlp)
    if layers != found:
        raise RecipeError(
            f"{source} says {layers}, but the checkpoint holds the layers {found}; "
            f"pass --pattern {found}"
        )
    return {"pattern": pattern or found, "att_ratio": att, "mlp_ratio": mlp}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/import_megatron.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--in", dest="src", required=True, help="the Megatron checkpoint dir")
    parser.add_argument("--out", required=True, help="our checkpoint root to create")
    parser.add_argument("--iteration", type=int, help="default: latest_checkpointed_iteration")
    parser.add_argument("--pattern", help="layer pattern of M * - (| marks pipeline stages)")
    parser.add_argument("--att", type=float, help="attention share, if no pattern is given")
    parser.add_argument("--mlp", type=float, help="MLP share, if no pattern is given")
    parser.add_argument(
        "--tokenizer", help="data.tokenizer: byte (default), or a tokenizer.json / .model file"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="real vocabulary (default: the args', else --tokenizer's, else every row)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle the files in full (they can run code): only for files you trust",
    )
    parser.add_argument("--name", default="imported", help="run name in the recipe")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    cli = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    src = Path(cli.src)
    try:
        iteration = latest_iteration(src) if cli.iteration is None else cli.iteration
        state, margs = load_megatron(src, iteration, progress=True, trust_pickle=cli.trust_pickle)
        files = find_rank_files(src / f"iter_{iteration:07d}")
        tp, pp = check_grid(files, margs, src / f"iter_{iteration:07d}")
        found = pattern_of(state)
        tokenizer = build_tokenizer(cli.tokenizer or "byte")
        vocab = (
            cli.vocab_size
            or get_arg(margs, "vocab_size")
            or (cli.tokenizer and tokenizer.vocab_size)
            or state["embedding.weight"].shape[0]
        )
        sizes = model_table(margs, state) | pattern_keys(found, margs, cli)
        table = {
            "name": cli.name,
            "model": sizes | {"vocab_size": vocab},
            "data": {"tokenizer": cli.tokenizer or "byte"},
            "train": {"steps": 1},
        }
        recipe = recipe_from_dict(table, cli.set)
        with torch.no_grad():
            model = build_model(recipe, build_tokenizer(recipe.data.tokenizer))
            load_into(model, state, str(src))
    except (RecipeError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:  # unreadable files: torch's zip reader, I/O
        print(f"error: reading {src}: {e}", file=sys.stderr)
        return 1
    try:
        path = save_model_checkpoint(
            cli.out,
            model,
            recipe,
            step=iteration,
            metadata={"imported_from": str(src.resolve()), "megatron_tp": tp, "megatron_pp": pp},
        )
    except (OSError, RuntimeError) as e:
        print(f"error: writing {cli.out}: {e}", file=sys.stderr)
        return 1
    counts = count_parameters(model)
    dtype = str(state["embedding.weight"].dtype).removeprefix("torch.")
    print(
        f"imported {src} iteration {iteration}: TP={tp} PP={pp} ({len(files)} files, {dtype}), "
        f"{len(found)} layers {found}, {counts['total']:,} parameters, vocabulary {vocab} "
        f"-> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
