"""Entry points in one style: every command is a console script of pyproject.toml, and the files
in launchers/ and checkpoints_tools/ are thin callers of the same main functions that edit no
import path and shadow no standard library module."""

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
FILES = sorted(
    p.relative_to(ROOT).as_posix()
    for folder in ("launchers", "checkpoints_tools")
    for p in (ROOT / folder).glob("*.py")
)

# What an installed console script does (pip's wrapper: argv[0] is the script's name, then
# sys.exit(main())), for every entry of [project.scripts], all in one fresh interpreter (torch
# imported once). Prints {name: [callable, exit code, stdout]}, and whether any of them
# imported torch._dynamo.
RUN_ALL = """
import contextlib, importlib, io, json, sys
results = {}
for name, target in json.loads(sys.argv[1]).items():
    module, _, attr = target.partition(":")
    main = getattr(importlib.import_module(module), attr)
    sys.argv, out, code = [name, "--help"], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            sys.exit(main())
    except SystemExit as e:
        code = e.code
    results[name] = [callable(main), code, out.getvalue()]
results["(torch._dynamo imported)"] = "torch._dynamo" in sys.modules
print(json.dumps(results))
"""
DYNAMO = "(torch._dynamo imported)"  # RUN_ALL's key


@pytest.fixture(scope="module")
def answers() -> dict[str, list]:
    proc = subprocess.run(
        [sys.executable, "-c", RUN_ALL, json.dumps(SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_resolves_and_answers_help(name, answers):
    is_callable, code, out = answers[name]
    assert is_callable, SCRIPTS[name]
    assert code in (0, None), out[-2000:]
    assert out.startswith("usage:"), out[:500]


def test_no_command_imports_torch_dynamo_to_start(answers):
    """torch.compile's tracer (torch._dynamo) costs ~1.7 s of imports a process, paid by every
    rank and every command line: no command's module imports it to start (they import it
    where they compile, or on the GPU path that needs it)."""
    assert answers[DYNAMO] is False


def main_import(path: str) -> str | None:
    """The module that a file takes `main` from (`from M import main`), or None."""
    for node in ast.parse((ROOT / path).read_text()).body:
        if isinstance(node, ast.ImportFrom) and any(a.name == "main" for a in node.names):
            return node.module
    return None


@pytest.mark.parametrize("path", FILES)
def test_script_file_is_a_thin_caller_of_a_console_scripts_main(path):
    """`python launchers/x.py` and its console script run the same code: the file imports main
    from the package and calls it, nothing else."""
    module = main_import(path)
    assert module is not None and module.startswith("toolkit."), path
    assert f"{module}:main" in SCRIPTS.values(), f"{path}: {module}:main has no console script"
    statements = ast.parse((ROOT / path).read_text()).body
    assert len(statements) <= 4, f"{path}: docstring, imports and the __main__ call only"


@pytest.mark.parametrize("path", FILES)
def test_script_file_edits_no_import_path(path):
    tree = ast.parse((ROOT / path).read_text())
    touches = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]
    assert not touches, f"{path} uses sys.path (line {touches[0]}): import the installed package"


def test_no_script_or_command_module_shadows_the_standard_library():
    """A script's folder is first on sys.path when it runs: a file named like a standard module
    (checkpoints_tools/inspect.py was one) replaces that module for everything imported after."""
    names = [*FILES, *(p.relative_to(ROOT).as_posix() for p in (ROOT / "toolkit/cli").glob("*.py"))]
    shadows = [n for n in names if Path(n).stem in sys.stdlib_module_names]
    assert not shadows


def test_every_module_with_a_main_block_is_a_console_script():
    """A command added as `python -m toolkit.X` gets its console script too (one style)."""
    targets = {t.partition(":")[0] for t in SCRIPTS.values()}
    commands = []
    for p in sorted((ROOT / "toolkit").rglob("*.py")):
        tree = ast.parse(p.read_text())
        has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        guarded = any(
            isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body
        )
        if has_main and guarded:
            commands.append(".".join(p.relative_to(ROOT).with_suffix("").parts))
    assert commands and sorted(set(commands) - targets) == []
    assert all(name.startswith("hybrid-") for name in SCRIPTS)


def test_the_readme_lists_every_console_script():
    readme = (ROOT / "README.md").read_text()
    assert [name for name in SCRIPTS if f"| `{name}` |" not in readme] == []
