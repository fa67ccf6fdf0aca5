"""Every script a user runs (launchers, checkpoint tools, benchmarks) answers --help with its
usage and exit status 0, without a GPU and without doing any of its work."""

import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.relative_to(ROOT).as_posix()
    for folder in ("launchers", "checkpoints_tools", "benchmarks")
    for p in (ROOT / folder).glob("*.py")
)


def test_the_scripts_are_found():
    assert {"launchers/submit.py", "checkpoints_tools/reshard.py"} <= set(SCRIPTS)
    assert len(SCRIPTS) > 20


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / Path(script).parent))  # as `python script.py` does
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_.value.code in (0, None), out.getvalue()
    assert out.getvalue().startswith("usage:"), out.getvalue()[:500]
