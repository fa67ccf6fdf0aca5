"""The small-scale study's plot and table, from what benchmarks/gpu_study.sh wrote:

    python benchmarks/study_report.py DIR [--png docs/study.png] [--json summary.json]

DIR holds one folder per model (mamba2, transformer, hybrid): NAME/tensorboard (the training
run's events) and NAME/decode.json (benchmarks/decode.py). The plot shows validation loss (and
training loss, faint) against tokens seen. The table (Markdown, on stdout) gives per model:
parameters, tokens, final validation loss and perplexity, training tokens/s and MFU (medians
over the second half of the run: compilation and warm-up left out), peak memory, and decode
tokens/s at each context and batch measured. Models are listed best validation loss first.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from toolkit.config import load_recipe  # noqa: E402
from toolkit.report import read_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"mamba2": "Mamba-2", "transformer": "Transformer", "hybrid": "Hybrid"}


def late_median(series: tuple[list[int], list[float]]) -> float:
    """The median over the second half of the run's logged steps."""
    steps, values = series
    return statistics.median(v for s, v in zip(steps, values) if s > steps[-1] / 2)


def summarize(run: Path, tokens_per_step: int) -> dict:
    """One model's numbers from its folder."""
    scalars = read_scalars(run / "tensorboard")
    for tag in ("valid/loss", "train/loss", "perf/tokens_per_s"):
        if tag not in scalars:
            raise ValueError(f"{run / 'tensorboard'}: no {tag} logged")
    steps, losses = scalars["valid/loss"]
    row = {
        "parameters": int(scalars["model/parameters"][1][-1]),
        "steps": scalars["train/loss"][0][-1],
        "tokens": scalars["train/loss"][0][-1] * tokens_per_step,
        "valid_loss": losses[-1],
        "valid_perplexity": math.exp(losses[-1]),
        "best_valid_loss": min(losses),
        "tokens_per_s": late_median(scalars["perf/tokens_per_s"]),
        "peak_memory_gb": max(scalars["perf/peak_memory_gb"][1]),
        "valid_curve": [[s * tokens_per_step, v] for s, v in zip(steps, losses)],
        "train_curve": [[s * tokens_per_step, v] for s, v in zip(*scalars["train/loss"])],
    }
    if "perf/mfu" in scalars:
        row["mfu"] = late_median(scalars["perf/mfu"])
    decode = run / "decode.json"
    if decode.exists():
        row["decode_tokens_per_s"] = {
            f"{r['context']}x{r['batch']}": r["tokens_per_s"]
            for r in json.loads(decode.read_text())["results"]
            if "tokens_per_s" in r and r.get("impl") is None
        }
    return row


def table(rows: dict[str, dict]) -> str:
    decode_keys = sorted(
        {k for r in rows.values() for k in r.get("decode_tokens_per_s", {})},
        key=lambda k: tuple(map(int, k.split("x"))),
    )
    head = ["model", "parameters", "tokens", "valid loss", "valid ppl", "train tokens/s", "MFU"]
    head += ["peak GB"] + [
        f"decode tok/s ctx {k.split('x')[0]} b{k.split('x')[1]}" for k in decode_keys
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["valid_loss"]):
        cells = [
            LABELS.get(name, name),
            f"{r['parameters'] / 1e6:.1f}M",
            f"{r['tokens'] / 1e6:.1f}M",
            f"{r['valid_loss']:.4f}",
            f"{r['valid_perplexity']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['mfu']:.1%}" if "mfu" in r else "-",
            f"{r['peak_memory_gb']:.1f}",
        ]
        decode = r.get("decode_tokens_per_s", {})
        cells += [f"{decode[k]:,.0f}" if k in decode else "-" for k in decode_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, (name, r) in enumerate(rows.items()):
        color = f"C{i}"
        tokens, loss = zip(*r["train_curve"])
        ax.plot([t / 1e6 for t in tokens], loss, color=color, alpha=0.25, linewidth=1)
        tokens, loss = zip(*r["valid_curve"])
        label = f"{LABELS.get(name, name)} ({r['parameters'] / 1e6:.0f}M): {loss[-1]:.3f}"
        ax.plot([t / 1e6 for t in tokens], loss, "o-", color=color, label=label, markersize=3)
    finals = [r["valid_loss"] for r in rows.values()]
    ax.set_ylim(min(finals) - 0.3, min(finals) + 2.0)  # the end of the curves, where they differ
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats/token): validation, training faint")
    ax.set_title("Mamba-2 vs Transformer vs hybrid at equal parameters and tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/study_report.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, help="gpu_study.sh's $OUT")
    parser.add_argument("--png", type=Path, help="write the plot here")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--recipes", type=Path, default=ROOT / "recipes" / "study")
    args = parser.parse_args(argv)
    rows = {}
    for name in LABELS:
        if not (args.dir / name / "tensorboard").is_dir():
            continue
        recipe = load_recipe(args.recipes / f"{name}.toml")
        tokens_per_step = recipe.train.global_batch_size * recipe.model.seq_length
        try:
            rows[name] = summarize(args.dir / name, tokens_per_step)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not rows:
        print(f"error: {args.dir}: no NAME/tensorboard for any of {list(LABELS)}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.png:
        plot(rows, args.png)
        print(f"plot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
