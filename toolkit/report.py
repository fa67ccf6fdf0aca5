"""A run's TensorBoard events as one PNG, for people who would rather look than read:

    python -m toolkit.report runs/tiny_hybrid/tensorboard [--out report.png]

Panels: loss (and validation loss when logged), learning rate, tokens/s, TFLOP/s per rank (MFU
when logged), peak memory, gradient norm.
"""

import argparse
import sys
from pathlib import Path

PANELS = [
    ("loss", ["train/loss", "valid/loss"]),
    ("learning rate", ["train/lr"]),
    ("tokens/s", ["perf/tokens_per_s"]),
    # perf/tflops_per_gpu: the same number, as runs before 2026-12 named it
    ("TFLOP/s per rank", ["perf/tflops_per_rank", "perf/tflops_per_gpu"]),
    ("peak memory (GB)", ["perf/peak_memory_gb"]),
    ("gradient norm", ["train/grad_norm"]),
]


def read_scalars(tb_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """tag -> (steps, values) from the event files under `tb_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {
        tag: ([e.step for e in events], [e.value for e in events])
        for tag in acc.Tags()["scalars"]
        for events in [acc.Scalars(tag)]
    }


def render(scalars: dict[str, tuple[list[int], list[float]]], out: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (name, tags) in zip(axes.flat, PANELS):
        for tag in tags:
            if tag in scalars:
                ax.plot(*scalars[tag], label=tag)
        if name == "TFLOP/s per rank" and "perf/mfu" in scalars:
            mfu = ax.twinx()
            mfu.plot(*scalars["perf/mfu"], color="tab:red", alpha=0.4, label="perf/mfu")
            mfu.set_ylabel("MFU")
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("tb_dir", help="the run's TensorBoard directory (logging.dir)")
    parser.add_argument("--out", default=None, help="PNG to write (default: TB_DIR/report.png)")
    args = parser.parse_args(argv)
    tb_dir = Path(args.tb_dir)
    if not tb_dir.is_dir() or not any(tb_dir.rglob("events.out.tfevents.*")):
        print(f"error: {tb_dir} holds no TensorBoard event files", file=sys.stderr)
        return 2
    scalars = read_scalars(tb_dir)
    if "train/loss" not in scalars:
        print(f"error: {tb_dir} has no train/loss scalars (is it a toolkit run?)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else tb_dir / "report.png"
    steps = scalars["train/loss"][0]
    render(scalars, out, f"{tb_dir}  (steps {steps[0]}-{steps[-1]})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
