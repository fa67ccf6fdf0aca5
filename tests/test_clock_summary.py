"""benchmarks/clock_summary.py: nvidia-smi's samples matched to each side's timed steps."""

import datetime
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("clock_summary", ROOT / "benchmarks/clock_summary.py")
clock_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(clock_summary)

T0 = datetime.datetime(2026, 12, 6, 3, 15, 4, tzinfo=datetime.UTC)


def _line(seconds: float, mhz: int, watts: float, reasons: int) -> str:
    stamp = (T0 + datetime.timedelta(seconds=seconds)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    return f"{stamp}, {mhz} MHz, {watts:.2f} W, 0x{reasons:016x}"


def _clocks(tmp_path: Path) -> Path:
    rows = [_line(0.1 * i, 1980, 300.0, 0x1) for i in range(10)]  # idle before
    rows += [_line(1 + 0.1 * i, 1600 + i, 690.0, 0x4) for i in range(10)]  # ours: capped
    rows += [_line(2 + 0.1 * i, 1900, 600.0 + i, 0x0) for i in range(10)]  # theirs: not
    rows.insert(5, "[N/A], [N/A], [N/A], [N/A]")  # as nvidia-smi writes an unreadable sample
    path = tmp_path / "clocks.csv"
    path.write_text("\n".join(rows) + "\n2026/12/06 03:15")  # the last line cut by the kill
    return path


def test_samples_inside_each_sides_timed_steps(tmp_path, capsys):
    t0 = T0.timestamp()
    result = {"ours": {"timed_span_s": [t0 + 0.95, t0 + 1.95]},
              "theirs": {"timed_span_s": [t0 + 1.95, t0 + 2.95]}}  # fmt: skip
    (tmp_path / "race.json").write_text(json.dumps(result))
    (tmp_path / "old.json").write_text(json.dumps({"ours": {"step_time_s": 0.2}}))
    args = [str(_clocks(tmp_path)), str(tmp_path / "race.json"), str(tmp_path / "old.json")]
    assert clock_summary.main(args) == 0
    lines = {
        tuple(line.split()[:2]): line.split()[2:] for line in capsys.readouterr().out.splitlines()
    }
    assert lines[("race", "ours")] == ["10", "10", "1604", "1600", "690.0"]  # median of 1600..1609
    assert lines[("race", "theirs")] == ["10", "0", "1900", "1900", "604.5"]
    assert lines[("old", "ours")] == ["(no", "timed", "span", "in", "the", "JSON)"]


def test_a_train_throughput_result_is_one_side(tmp_path):
    samples = clock_summary.read_samples(_clocks(tmp_path))
    assert len(samples) == 30  # the N/A row and the cut line skipped
    run = {"timed_span_s": [T0.timestamp() + 1.0, T0.timestamp() + 1.45]}
    ((side, found),) = clock_summary.sides(run).items()
    assert side == "run" and clock_summary.summarise(samples, *found["timed_span_s"]) == {
        "samples": 5, "power_capped": 5, "sm_mhz_median": 1602,
        "sm_mhz_min": 1600, "power_w_median": 690.0,
    }  # fmt: skip
    assert clock_summary.summarise(samples, 100.0, 200.0) is None


def test_missing_clock_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        clock_summary.main([str(tmp_path / "none.csv"), str(tmp_path / "r.json")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
