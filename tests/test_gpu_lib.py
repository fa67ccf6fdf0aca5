"""benchmarks/gpu_lib.sh, the budgeted parts of the gpu_*.sh scripts, run in bash on the CPU."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash(
    script: str, out: Path | None = None, fake_bin: Path | None = None, **env: str
) -> list[str]:
    """The script's output lines after sourcing gpu_lib.sh, with the stand-ins in `fake_bin`
    (if any) first on PATH and `env`; it must succeed and print nothing to stderr."""
    path = f"{fake_bin}:/usr/bin:/bin" if fake_bin else "/usr/bin:/bin"
    proc = subprocess.run(
        ["bash", "-c", f"set -u; source benchmarks/gpu_lib.sh\n{script}"],
        cwd=ROOT,
        env={"PATH": path, **({"OUT": str(out)} if out else {}), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return proc.stdout.splitlines()


def test_a_part_is_cut_at_the_budget_and_the_next_one_skipped(tmp_path):
    """The first part asks for 100 s but gets what is left of a 3 s budget (timeout's 124); it
    ends at the deadline, so the second finds nothing left and does not start."""
    lines = bash(
        """PART_MIN_S=1
part_budget 3
part slow 100 bash -c 'echo started; sleep 20'
echo "ran $PART_RAN"
part late 100 echo late
echo "ran $PART_RAN"
""",
        tmp_path,
    )
    assert len(lines) == 4, lines
    assert lines[0].startswith("slow exit 124 in ") and lines[0].endswith(" s: started"), lines
    assert lines[1:] == ["ran 1", "late skipped (budget spent)", "ran 0"]
    assert (tmp_path / "slow.log").read_text() == "started\n"
    assert not (tmp_path / "late.log").exists()


def test_parts_not_asked_for_are_silent_and_short_budgets_skip(tmp_path):
    """PART_ONLY picks parts by name; PART_DIR, PART_EXT and part_done shape a script's output;
    a budget under PART_MIN_S (default 30 s) runs nothing."""
    lines = bash(
        f"""part_budget 600
PART_ONLY="b c" PART_DIR={tmp_path}/w PART_EXT=.out
mkdir -p "$PART_DIR"
part_done() {{ echo "== $1 exit $2"; tail -1 "$4"; }}
part a 10 echo one
part b 10 bash -c 'echo two; echo three; exit 3'
part_budget 29
part c 10 echo four
""",
        tmp_path,
    )
    assert lines == ["== b exit 3", "three", "c skipped (budget spent)"]
    assert (tmp_path / "w" / "b.out").read_text() == "two\nthree\n"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["b.out"]


def test_the_tree_digest_names_the_code_and_changes_with_it(tmp_path):
    """tree_digest: 12 hex digits over toolkit/ and benchmarks/, the same for the same files, and
    another when one of them changes (a copy of the two folders, edited)."""
    import shutil

    (digest,) = bash("tree_digest", tmp_path)
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert bash("tree_digest", tmp_path) == [digest]
    copy = tmp_path / "copy"
    for folder in ("toolkit", "benchmarks"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run = ["bash", "-c", "source benchmarks/gpu_lib.sh; tree_digest"]
    same = subprocess.run(run, cwd=copy, capture_output=True, text=True, timeout=60)
    assert same.stdout.strip() == digest
    with open(copy / "toolkit" / "train.py", "a") as f:
        f.write("\n")
    other = subprocess.run(run, cwd=copy, capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() not in ("", digest)


def test_the_clock_log_samples_until_stopped_or_the_script_exits(tmp_path):
    """clock_log runs nvidia-smi (a stand-in here, on PATH first) into a file in the background;
    clock_log_stop ends it, and so does the script's exit if it stops first. Stopping none is
    no error under set -u."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/bash\necho "$@" > "$(dirname "$0")/args"\n'
        "while true; do echo '2026/12/06 03:15:04.085, 1980 MHz, 99.00 W, 0x4'; sleep 0.05; done\n"
    )
    fake.chmod(0o755)
    pids = tmp_path / "pids"
    for stop in ("clock_log_stop", "exit 0"):  # stopped by hand, then by the EXIT trap
        csv = tmp_path / "clocks.csv"
        proc = subprocess.run(
            ["bash", "-c", f"""set -u; source benchmarks/gpu_lib.sh
clock_log_stop
clock_log {csv}
echo $CLOCK_LOG_PID >> {pids}
sleep 0.3
{stop}"""],
            cwd=ROOT,
            env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
        assert "1980 MHz" in csv.read_text()
    args = (fake.parent / "args").read_text()
    assert "clocks.sm,power.draw,clocks_throttle_reasons.active" in args and "-lms 100" in args
    for pid in pids.read_text().split():
        assert not Path(f"/proc/{pid}").exists(), f"sampler {pid} still running"


def test_a_part_that_cannot_fit_the_cards_memory_is_skipped(tmp_path):
    """fits: the card's memory from nvidia-smi (a stand-in here) against what a part needs; a
    part that cannot fit is skipped with the reason, said only where it was asked for; no
    answer from nvidia-smi counts as no memory."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/args"\necho "${MIB:-81559}"\n')
    fake.chmod(0o755)

    def run(script: str, mib: str) -> list[str]:
        return bash(script, fake_bin=fake.parent, MIB=mib)

    script = """card_gib
fits 100 big && echo big runs
fits 60 small && echo small runs
PART_ONLY="other"
fits 100 big || echo big not run
"""
    assert run(script, "81559") == ["79", "big skipped (needs ~100 GiB of the card's memory, "
                                    "this one has 79)", "small runs", "big not run"]  # fmt: skip
    assert run(script, "143771") == ["140", "big runs", "small runs"]
    assert run(script, "[N/A]")[0] == "0"
    args = (fake.parent / "args").read_text()
    assert "--query-gpu=memory.total" in args and "nounits" in args


def test_by_card_picks_the_words_queued_for_the_card_that_came(tmp_path):
    """by_card (gpu_train.sh's GPU_TRAIN_RUNS=next): the first words on an H200, the second on
    any other card or where nvidia-smi does not answer; card_name is nvidia-smi's first line."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/args"\nprintf "$NAMES"\n')
    fake.chmod(0o755)

    def run(names: str) -> list[str]:
        return bash("card_name\nby_card 'a b' 'c d'", fake_bin=fake.parent, NAMES=names)

    assert run("NVIDIA H200\\n") == ["NVIDIA H200", "a b"]
    assert run("NVIDIA H100 80GB HBM3\\nNVIDIA H200\\n") == ["NVIDIA H100 80GB HBM3", "c d"]
    assert run("") == ["c d"]  # no name, no line
    assert "--query-gpu=name" in (fake.parent / "args").read_text()
