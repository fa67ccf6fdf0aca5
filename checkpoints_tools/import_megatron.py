"""Import a checkpoint of the reference framework (per-rank `iter_*/mp_rank_*/model_optim_rng.pt`
files, any TP and PP, 2024-era or fused-norm keys) as one of ours.

    python checkpoints_tools/import_megatron.py --in megatron_ckpt/ --out runs/imported/checkpoints

The model shape comes from the checkpoint's `args`; the layer pattern from its
`hybrid_override_pattern`, else --pattern, else --att/--mlp. Only the named files are unpickled
(they hold an argparse.Namespace, so a plain weights-only load is not always enough). The result
has no optimizer state: training from it starts a fresh optimizer (fine-tuning).
"""

import os
import sys

# checkpoints_tools/inspect.py would shadow the standard library's inspect, which torch imports.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from toolkit.build import save_model_checkpoint  # noqa: E402
from toolkit.checkpoint.megatron import load_megatron, read_args  # noqa: E402
from toolkit.config import RecipeError, recipe_from_dict, validate  # noqa: E402
from toolkit.model import HybridLM, count_parameters  # noqa: E402


def model_table(margs: argparse.Namespace, cli: argparse.Namespace) -> dict:
    """Our [model] section from the reference's arguments (and the command line)."""
    get = lambda name, default=None: getattr(margs, name, default)  # noqa: E731
    heads = get("num_attention_heads")
    activation = "swiglu" if get("swiglu") else "relu2" if get("squared_relu") else "gelu"
    table = {
        "num_layers": get("num_layers"),
        "hidden_size": get("hidden_size"),
        "seq_length": get("seq_length"),
        "num_attention_heads": heads,
        "num_query_groups": get("num_query_groups") if get("group_query_attention") else heads,
        "ffn_hidden_size": get("ffn_hidden_size") or 4 * get("hidden_size"),
        "mlp_activation": activation,
        "norm": "layernorm" if get("normalization") == "LayerNorm" else "rmsnorm",
        "norm_eps": float(get("norm_epsilon", 1e-5)),
        "position_embedding": "rope" if get("position_embedding_type") == "rope" else "none",
        "rotary_percent": float(get("rotary_percent", 1.0)),
        "rotary_base": float(get("rotary_base", 10000)),
        "vocab_size": cli.vocab_size or get("vocab_size") or get("padded_vocab_size"),
        "make_vocab_size_divisible_by": get("make_vocab_size_divisible_by", 128),
        "mamba_state_dim": get("mamba_state_dim", 128),
        "mamba_head_dim": get("mamba_head_dim", 64),
        "mamba_num_groups": get("mamba_num_groups", 8),
        "mamba_chunk_size": get("mamba_chunk_size", 128),
    }
    pattern = cli.pattern or get("hybrid_override_pattern")
    if pattern:
        table["pattern"] = pattern
    else:
        table["att_ratio"] = cli.att if cli.att is not None else get("hybrid_attention_ratio", 0.0)
        table["mlp_ratio"] = cli.mlp if cli.mlp is not None else get("hybrid_mlp_ratio", 0.0)
    missing = [k for k, v in table.items() if v is None]
    if missing:
        raise RecipeError(f"the checkpoint's args lack {missing}; pass them on the command line")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/import_megatron.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--in", dest="src", required=True, help="the Megatron checkpoint dir")
    parser.add_argument("--out", required=True, help="our checkpoint root to create")
    parser.add_argument("--iteration", type=int, help="default: latest_checkpointed_iteration")
    parser.add_argument("--pattern", help="layer pattern, if the args have none (e.g. M-M*M-)")
    parser.add_argument("--att", type=float, help="attention share, if no pattern is known")
    parser.add_argument("--mlp", type=float, help="MLP share, if no pattern is known")
    parser.add_argument("--vocab-size", type=int, help="real vocabulary (default: from args)")
    parser.add_argument("--name", default="imported", help="run name in the recipe")
    args = parser.parse_args(argv)
    try:
        margs = read_args(args.src, args.iteration)
        recipe = recipe_from_dict(
            {"name": args.name, "model": model_table(margs, args), "train": {"steps": 1}}
        )
        validate(recipe)
        torch.manual_seed(0)
        model = HybridLM(recipe.model, vocab_size=recipe.model.vocab_size)
        load_megatron(model, args.src, args.iteration)
        iteration = args.iteration
        if iteration is None:
            iteration = int((Path(args.src) / "latest_checkpointed_iteration.txt").read_text())
        path = save_model_checkpoint(
            args.out, model, recipe, step=iteration, metadata={"imported_from": args.src}
        )
    except (RecipeError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = count_parameters(model)
    print(
        f"imported {args.src} (TP={margs.tensor_model_parallel_size}, "
        f"PP={margs.pipeline_model_parallel_size}, iteration {iteration}): "
        f"{recipe.model.num_layers} layers {model.layout.pattern}, {counts['total']:,} parameters "
        f"-> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
