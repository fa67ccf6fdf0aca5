"""Every script a user runs (launchers, checkpoint tools, benchmarks) answers --help with its
usage and exit status 0, without a GPU and without doing any of its work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.relative_to(ROOT).as_posix()
    for folder in ("launchers", "checkpoints_tools", "benchmarks")
    for p in (ROOT / folder).glob("*.py")
)

# Runs every script as `python SCRIPT --help` would, all in one fresh interpreter (torch imported
# once; what a script's __main__ block changes, e.g. torch.set_grad_enabled(False) in reshard.py,
# stays out of the test process). Prints {script: [exit code, stdout]}.
RUN_ALL = """
import contextlib, io, json, runpy, sys
results = {}
for script in sys.argv[1:]:
    sys.argv, out, code = [script, "--help"], io.StringIO(), None
    sys.path.insert(0, script.rsplit("/", 1)[0])
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except Exception as e:
        code, out = repr(e), io.StringIO(repr(e))
    sys.path.pop(0)
    results[script] = [code, out.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def answers() -> dict[str, list]:
    proc = subprocess.run(
        [sys.executable, "-c", RUN_ALL, *SCRIPTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_scripts_are_found():
    assert {"launchers/submit.py", "checkpoints_tools/reshard.py"} <= set(SCRIPTS)
    assert len(SCRIPTS) > 20


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script, answers):
    code, out = answers[script]
    assert code in (0, None), out[-2000:]
    assert out.startswith("usage:"), out[:500]


@pytest.mark.parametrize(
    "script", ["launchers/submit.py", "launchers/status.py", "launchers/serve_slurm.py"]
)
def test_slurm_launchers_answer_help_without_importing_torch(script):
    """--help (and bad input, and --dry-run) answer at once: torch loads only to train."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        f"sys.path.insert(0, {str(ROOT / script.rsplit('/', 1)[0])!r})\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")
    assert proc.stdout.rstrip().endswith("torch imported: False")
