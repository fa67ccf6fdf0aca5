"""Layer allocation for a hybrid Mamba-2 / attention / MLP language model.

Symbols: ``M`` Mamba-2 mixer, ``*`` self-attention, ``-`` MLP; ``|`` marks a
pipeline-stage boundary in a pattern.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

MAMBA, ATTENTION, MLP, STAGE_SEP = "M", "*", "-", "|"
LAYER_SYMBOLS = MAMBA + ATTENTION + MLP
# Far beyond any real model; the allocation below is linear in the layer count, so a bound keeps
# a typo such as 1e9 from running out of memory.
MAX_LAYERS = 10_000
_KINDS = ((MAMBA, "mamba", "Mamba-2"), (ATTENTION, "attention", "attention"), (MLP, "mlp", "MLP"))
BLOCK_KINDS = {key: sym for sym, key, _ in _KINDS}  # recipe name ('mamba') -> pattern symbol


def _check_args(num_layers: int, att_ratio: float, mlp_ratio: float) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers > MAX_LAYERS:
        raise ValueError(f"num_layers must be <= {MAX_LAYERS}, got {num_layers}")
    for name, ratio in (("att_ratio", att_ratio), ("mlp_ratio", mlp_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    if att_ratio + mlp_ratio > 1.0 + 1e-9:  # tolerate float noise such as 0.3 + 0.7
        raise ValueError(f"att_ratio + mlp_ratio must be <= 1, got {att_ratio} + {mlp_ratio}")


def allocate_layers(num_layers: int, att_ratio: float, mlp_ratio: float) -> str:
    """Spread attention, then MLP layers evenly over the Mamba-2 layers (reference algorithm)."""
    _check_args(num_layers, att_ratio, mlp_ratio)
    n_att, n_mlp = round(num_layers * att_ratio), round(num_layers * mlp_ratio)
    if n_att + n_mlp > num_layers:
        raise ValueError(
            f"rounding gives {n_att} attention + {n_mlp} MLP layers, more than {num_layers} layers"
        )
    types = [MAMBA] * num_layers
    n_mamba = num_layers - n_att
    section = n_mamba / (n_att + 1)
    x = section
    for i in range(num_layers):
        if x < 0.5:
            types[i] = ATTENTION
            x += section
        else:
            x -= 1
    if n_mlp > 0:
        step = (n_mamba - n_mlp) / n_mlp
        x = step
        for i in [i for i, kind in enumerate(types) if kind == MAMBA]:  # post-attention Mamba
            if x < 0.5:
                types[i] = MLP
                x += step
            else:
                x -= 1
    return "".join(types)


def _parse_stages(pattern: str) -> list[str]:
    """Split a pattern at '|' after checking its symbols; reject empty stages."""
    bad = sorted(set(pattern) - set(LAYER_SYMBOLS + STAGE_SEP))
    if bad:
        raise ValueError(f"pattern may only contain 'M', '*', '-' and '|', got {bad}")
    stages = pattern.split(STAGE_SEP)
    if any(not stage for stage in stages):
        raise ValueError(f"pattern {pattern!r} has an empty pipeline stage")
    return stages


@dataclass(frozen=True)
class LayerLayout:
    """A layer pattern (layer symbols only) and its pipeline stages."""

    pattern: str
    stages: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    def ratios(self) -> dict[str, float]:
        """Achieved fraction of Mamba-2, attention and MLP layers."""
        return {key: self.pattern.count(sym) / self.num_layers for sym, key, _ in _KINDS}

    def summary(self) -> str:
        """Pattern with achieved counts and ratios, plus stage sizes if pipelined."""
        ratios = self.ratios()
        counts = ", ".join(
            f"{self.pattern.count(sym)} {label} {100 * ratios[key]:.1f}%"
            for sym, key, label in _KINDS
        )
        text = f"pattern {self.pattern} ({self.num_layers} layers: {counts})"
        if len(self.stages) > 1:
            sizes = ", ".join(str(len(s)) for s in self.stages)
            text += f"\n{len(self.stages)} pipeline stages of {sizes} layers"
        return text


def build_layout(
    num_layers: int, att_ratio: float = 0.0, mlp_ratio: float = 0.0, pattern: str | None = None
) -> LayerLayout:
    """Compute the allocation, or validate an override ``pattern`` against it."""
    computed = allocate_layers(num_layers, att_ratio, mlp_ratio)
    if pattern is None:
        return LayerLayout(computed, (computed,))
    stages = _parse_stages(pattern)
    layers = "".join(stages)
    if len(layers) != num_layers:
        raise ValueError(f"pattern has {len(layers)} layers, expected {num_layers}")
    for sym, label, ratio in ((ATTENTION, "attention", att_ratio), (MLP, "MLP", mlp_ratio)):
        expected, got = computed.count(sym), layers.count(sym)
        if ratio > 0 and got != expected:
            raise ValueError(f"pattern has {got} {label} layers '{sym}', expected {expected}")
    return LayerLayout(layers, tuple(stages))


def split_stages(pattern: str, num_stages: int) -> list[str]:
    """Split a pattern into pipeline stages: at its '|' markers, else evenly."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    stages = _parse_stages(pattern)
    if STAGE_SEP in pattern:
        if len(stages) != num_stages:
            raise ValueError(f"pattern has {len(stages)} stages, expected {num_stages}")
        return stages
    if len(pattern) % num_stages:
        raise ValueError(f"{len(pattern)} layers do not split evenly into {num_stages} stages")
    size = len(pattern) // num_stages
    return [pattern[i : i + size] for i in range(0, len(pattern), size)]


def main(argv: list[str] | None = None) -> None:
    """CLI: print the layout summary (and per-stage split with --pp); bad input exits 2."""
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.layout", description="Hybrid Mamba-2/attention/MLP layer layout."
    )
    parser.add_argument("--layers", type=int, required=True, help="number of layers")
    parser.add_argument("--att", type=float, default=0.0, help="attention ratio in [0, 1]")
    parser.add_argument("--mlp", type=float, default=0.0, help="MLP ratio in [0, 1]")
    parser.add_argument("--pattern", help="override pattern of 'M*-', '|' marks stage boundaries")
    parser.add_argument("--pp", type=int, help="number of pipeline stages to split into")
    args = parser.parse_args(argv)
    try:
        layout = build_layout(args.layers, args.att, args.mlp, args.pattern)
        stages = (
            split_stages(STAGE_SEP.join(layout.stages), args.pp) if args.pp is not None else None
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(layout.summary())
    for i, stage in enumerate(stages or []):
        print(f"stage {i}: {stage} ({len(stage)} layers)")


if __name__ == "__main__":
    main()
