"""The GPU's clock and power while each side of a benchmark ran its timed steps.

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active \\
        --format=csv,noheader -lms 100 > clocks.csv &      # gpu_lib.sh's clock_log does this
    ... benchmarks/race_mamba_ssm.py --json r.json (or train_throughput.py --json t.json)
    python3 benchmarks/clock_summary.py clocks.csv r.json [t.json ...]

A card at its power limit lowers its SM clock (throttle reason 0x4, the software power cap), and
the steps run slower for it whatever the code: on an H100 at the 8B Mamba-2 race widths both
sides ran capped, ours at a median 1,635-1,770 MHz of 1,980 (RESULTS.md 2026-12-06). For each
result's side (ours, theirs, or a train_throughput run) this takes the samples inside its timed
steps (`timed_span_s` in the JSON, epoch seconds) and prints how many were power-capped, the SM
clock's median and minimum and the power draw's median. Timestamps are read as UTC, as the
device machines keep them.
"""

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

POWER_CAP = 0x4  # clocks_throttle_reasons.active: SW power cap


@dataclass(frozen=True)
class Sample:
    time_s: float  # epoch seconds
    sm_mhz: int
    power_w: float
    reasons: int  # the active throttle reasons, a bit mask


def read_samples(path: Path) -> list[Sample]:
    """The CSV rows nvidia-smi wrote (timestamp, clocks.sm, power.draw, throttle reasons; other
    columns between are ignored), skipping lines it wrote as errors or cut short."""
    samples = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4:
            continue
        try:
            stamp = datetime.datetime.strptime(cells[0], "%Y/%m/%d %H:%M:%S.%f")
            sm = int(cells[1].split()[0])
            power = float(cells[2].split()[0])
            reasons = int(cells[-1], 16)
        except ValueError:
            continue  # "[N/A]", a header, a line cut by the kill
        stamp = stamp.replace(tzinfo=datetime.UTC)
        samples.append(Sample(stamp.timestamp(), sm, power, reasons))
    return samples


def summarise(samples: list[Sample], start: float, end: float) -> dict | None:
    """The samples in [start, end]: their count, how many power-capped, the SM clock's median
    and minimum, the power's median; None if there are none."""
    inside = [s for s in samples if start <= s.time_s <= end]
    if not inside:
        return None
    return {
        "samples": len(inside),
        "power_capped": sum(bool(s.reasons & POWER_CAP) for s in inside),
        "sm_mhz_median": statistics.median(s.sm_mhz for s in inside),
        "sm_mhz_min": min(s.sm_mhz for s in inside),
        "power_w_median": statistics.median(s.power_w for s in inside),
    }


def sides(result: dict) -> dict[str, dict]:
    """The timed runs in a benchmark's JSON: a race's "ours" and "theirs", or the run itself."""
    found = {k: result[k] for k in ("ours", "theirs") if isinstance(result.get(k), dict)}
    return found or {"run": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/clock_summary.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("clocks", type=Path, help="nvidia-smi's CSV (gpu_lib.sh clock_log)")
    parser.add_argument("results", type=Path, nargs="+", help="benchmark JSON files")
    args = parser.parse_args(argv)
    if not args.clocks.is_file():
        parser.error(f"no such file: {args.clocks}")
    samples = read_samples(args.clocks)
    print(f"{'result':52s} {'side':6s} {'samples':>7s} {'capped':>6s} {'SM MHz':>7s} "
          f"{'min':>5s} {'W':>6s}")  # fmt: skip
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path.name}: unreadable ({e})", file=sys.stderr)
            continue
        for side, run in sides(result).items():
            span = run.get("timed_span_s")
            summary = summarise(samples, *span) if span else None
            if summary is None:
                why = "no timed span in the JSON" if not span else "no samples in its span"
                print(f"{path.stem[:52]:52s} {side:6s} ({why})")
                continue
            print(f"{path.stem[:52]:52s} {side:6s} {summary['samples']:7d} "
                  f"{summary['power_capped']:6d} {summary['sm_mhz_median']:7.0f} "
                  f"{summary['sm_mhz_min']:5d} {summary['power_w_median']:6.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
