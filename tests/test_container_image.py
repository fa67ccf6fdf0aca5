"""The CPU image, built here from containers/Dockerfile with podman (`make container-cpu`), and the
toolkit run inside it: training writes a checkpoint to a mounted directory, generation reads it,
the server answers a request from outside the container, and a two-node Slurm job runs in it.

Marked `container`: `make test-container` runs these (CI: .ci/run, after make test-long), make
test does not. The build reuses what this host already has (the Debian base image, podman's layer
cache, pip's cache); on a fresh host it makes all of them, from Debian's and PyPI's registries.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, missing_binaries
from toolkit.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
BASE = "localhost/debian:bookworm"  # `make debian-base`: Debian's packages, no image registry
IMAGE = "localhost/hybrid-toolkit-test"
TAG = f"{IMAGE}:{VERSION}-cpu"
# This host's podman runs containers with runc and cgroupfs, within the ulimits it may set
# (DESIGN.md section 7): site settings, so a containers.conf rather than flags in every command.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""
TRAIN = [
    "train.steps=6",
    "checkpoint.interval=3",
    'checkpoint.dir="/out/checkpoints"',
    'logging.dir="/out/tensorboard"',
    "logging.interval=1",
    'train.sample_prompt=""',
    "data.max_corpus_bytes=300000",
]

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        shutil.which("podman") is None, reason="podman is not installed (.ci/run installs it)"
    ),
]


def say(request, line: str) -> None:
    """A line in pytest's output even under -q: the measured times."""
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        plugins.get_plugin("terminalreporter").write_line(f"container: {line}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="module")
def image(env, request, tmp_path_factory) -> str:
    """The CPU image, built from the Dockerfile now: the tag is taken off first, so a stale image
    cannot pass for a new one (untag, not rmi: that would delete the layer cache too)."""
    logs = tmp_path_factory.mktemp("build")

    def make(*args: str, log: str) -> None:
        start = time.monotonic()
        with open(logs / log, "w") as out:
            proc = subprocess.run(
                ["make", "--no-print-directory", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=3000,
            )
        tail = (logs / log).read_text()[-3000:]
        assert proc.returncode == 0, f"make {' '.join(args)} failed:\n{tail}"
        say(request, f"make {args[0]}: {time.monotonic() - start:.0f} s")

    if subprocess.run(["podman", "image", "exists", BASE], env=env).returncode != 0:
        make("debian-base", log="debian-base.log")
    subprocess.run(["podman", "untag", TAG], env=env, capture_output=True)
    make("container-cpu", "CONTAINER_ENGINE=podman", f"CPU_BASE={BASE}", f"IMAGE={IMAGE}", log="b")
    return TAG


def podman(env, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(image, env, tmp_path_factory) -> Path:
    """The tiny recipe trained for 6 steps inside the image (its own user, no network), writing
    its checkpoints to a directory mounted from this host."""
    out = tmp_path_factory.mktemp("mounted")
    out.chmod(0o777)  # the image's user (uid 1000) writes it
    sets = [a for s in TRAIN for a in ("--set", s)]
    proc = podman(
        env,
        *("run", "--rm", "--network=none", f"--volume={out}:/out", image),
        *("python", "launchers/submit.py", "recipes/tiny_hybrid.toml", "--local", *sets),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_training_in_the_image_writes_its_checkpoint_to_the_mount(trained):
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (trained / "checkpoints" / "step_00000003").is_dir()
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))


def test_the_image_is_the_cpu_flavour_with_the_pinned_torch(image, env):
    proc = podman(env, "run", "--rm", "--network=none", image, "pip", "freeze")
    assert proc.returncode == 0, proc.stderr
    pins = (ROOT / "containers" / "constraints-cpu.txt").read_text()
    torch = re.search(r"^torch==(\S+)$", pins, re.M).group(1)
    assert f"torch-{torch.replace('+', '%2B')}-" in proc.stdout or f"torch=={torch}" in proc.stdout
    labels = json.loads(podman(env, "image", "inspect", image).stdout)[0]["Labels"]
    assert labels["io.hybrid-toolkit.flavour"] == "cpu"
    assert labels["org.opencontainers.image.base.name"] == BASE


def test_generation_in_the_image_reads_the_mounted_checkpoint(trained, image, env):
    proc = podman(
        env,
        *("run", "--rm", "--network=none", f"--volume={trained}:/out:ro", image),
        *("python", "-m", "toolkit.inference.generate", "--checkpoint", "/out/checkpoints"),
        *("--prompt", "def ", "--max-new-tokens", "24", "--seed", "0"),
    )
    assert proc.returncode == 0, proc.stderr
    prompt, text = proc.stdout.splitlines()[:2]
    assert prompt == "--- prompt: 'def '" and text.startswith("def ") and len(text) > 4


def test_server_in_the_image_answers_on_this_hosts_loopback(trained, image, env):
    port = free_port()
    started = podman(
        env,
        *("run", "--detach", "--rm", "--network=host", f"--volume={trained}:/out:ro", image),
        *("python", "launchers/serve.py", "--checkpoint", "/out/checkpoints"),
        *("--host", "127.0.0.1", "--port", str(port), "--slots", "2"),
    )
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            running = podman(env, "ps", "--quiet", "--filter", f"id={container}").stdout
            assert running.strip(), "the server's container stopped before it answered"
            assert time.monotonic() < deadline, podman(env, "logs", container).stderr
            time.sleep(1)
        body = json.dumps({"prompt": "def ", "max_tokens": 16, "seed": 0}).encode()
        req = urllib.request.Request(
            f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        assert answer["choices"][0]["text"], answer
    finally:
        podman(env, "stop", "--time", "10", container)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, env):
    if missing_binaries():
        pytest.skip(f"Slurm binaries not installed ({', '.join(missing_binaries())})")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    c.env.update(CONTAINERS_CONF=env["CONTAINERS_CONF"])  # the jobs' podman runs use it too
    yield c
    c.stop()


def test_slurm_job_runs_the_training_in_the_image_on_two_nodes(cluster, image, tmp_path):
    """The standalone script's `srun` starts one `podman run` per rank; the ranks find each other
    through the address the script found on the host, and write to the working directory."""
    from tests.test_slurm import CPU_JOB, check_training

    recipe = tmp_path / "tiny_hybrid.toml"  # in the working directory: mounted into the image
    shutil.copy(ROOT / "recipes" / "tiny_hybrid.toml", recipe)
    sets = [
        'checkpoint.dir="runs/ck"',
        'logging.dir="runs/tb"',
        "train.steps=8",
        'slurm.container_engine="podman"',
        f'slurm.container_image="{image}"',
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "submit.py"), str(recipe), "--via", "sbatch"]
        + ["--nodes", "2", *CPU_JOB, *[a for s in sets for a in ("--set", s)]],
        cwd=tmp_path,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job (\d+) ", proc.stdout).group(1)
    script = next((tmp_path / "runs" / "slurm").glob("*.sbatch")).read_text()
    assert f"podman run --rm --network=host --ipc=host --user=0:0 --volume={tmp_path}:" in script
    state = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=900)
    log = (tmp_path / "runs" / "slurm" / f"tiny_hybrid-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    check_training(log, tmp_path, 8)
