"""Print the train/loss curves of several runs side by side, with the largest relative gap to the
first run: `python benchmarks/compare_losses.py TB_DIR_A TB_DIR_B ...`."""

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def losses(tb_dir: str) -> dict[int, float]:
    if not Path(tb_dir).is_dir():
        raise SystemExit(f"error: {tb_dir} is not a directory")
    acc = EventAccumulator(tb_dir)
    acc.Reload()
    if "train/loss" not in acc.Tags()["scalars"]:
        raise SystemExit(f"error: {tb_dir} holds no train/loss scalars (a run's TensorBoard dir?)")
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def main(dirs: list[str]) -> None:
    runs = [losses(d) for d in dirs]
    print("step " + " ".join(f"{d[-28:]:>30}" for d in dirs))
    for step in sorted(runs[0]):
        print(f"{step:4d} " + " ".join(f"{r.get(step, float('nan')):30.7f}" for r in runs))
    for d, r in zip(dirs[1:], runs[1:]):
        gap = max(abs(r[s] - runs[0][s]) / abs(runs[0][s]) for s in runs[0] if s in r)
        print(f"max relative gap of {d} to {dirs[0]}: {gap:.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("dirs", nargs="+", metavar="TB_DIR", help="runs' TensorBoard directories")
    main(parser.parse_args().dirs)
