"""`python -m toolkit.config RECIPE`: validate a recipe, print it resolved and its memory plan;
`--keys` lists every recipe key."""

import argparse
import json
import sys

from toolkit.config.base import RecipeError
from toolkit.config.layout_check import default_world_size
from toolkit.config.load import load_recipe
from toolkit.config.recipe import describe_keys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("--from-megatron-args"):  # its values start with '--'
        from toolkit.megatron_args import main as from_megatron_args

        return from_megatron_args(argv)
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.config",
        description="Validate a recipe and print it resolved, or list every recipe key.",
        epilog="--from-megatron-args 'ARGS...' | @FILE: the reference's command line as a "
        "recipe (TOML on stdout); see toolkit/megatron_args.py",
    )
    parser.add_argument("recipe", nargs="?", help="recipe TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--world-size", type=int, help="also check the layout fits this many ranks")
    parser.add_argument("--keys", action="store_true", help="list all recipe keys and exit")
    args = parser.parse_args(argv)
    if args.keys:
        print(describe_keys())
        return 0
    if not args.recipe:
        parser.error("give a recipe file, or --keys")
    if args.world_size is not None and args.world_size < 1:
        parser.error("--world-size must be >= 1")
    try:
        recipe = load_recipe(args.recipe, args.set, args.world_size)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(recipe.to_dict(), indent=2))
    from toolkit.memory import describe_plan, gpu_memory_gb, plan_memory  # local: builds models

    world = args.world_size or default_world_size(recipe)
    print(f"memory plan at {world} ranks (bf16 activations, GPU kernels; toolkit/memory.py):")
    print(describe_plan(plan_memory(recipe, world), gpu_memory_gb(recipe.slurm.gpu_memory_gb)))
    return 0
