"""Tests for toolkit.layout: reference vectors, properties, validation and CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.layout import LayerLayout, allocate_layers, build_layout, split_stages

REPO_ROOT = Path(__file__).resolve().parent.parent

VECTORS = [
    (56, 0.08, 0.5, "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"),
    (48, 0.08, 0.5, "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"),
    (48, 0.0, 0.0, "M" * 48),
    (10, 0.2, 0.0, "MMM*MM*MMM"),
    (10, 0.0, 0.3, "MM-MMM-MM-"),
    (10, 0.2, 0.2, "MMM*-M*MM-"),
    (10, 0.5, 0.5, "-*-*-**-*-"),
    (48, 0.2, 0.3, "MM-*M-MM*-MM*-MM-*M-M*M-MM*-M-*MM-M*M-M*M-M-*MM-"),
    (48, 0.1, 0.0, "MMMMMMM*MMMMMMM*MMMMMMMM*MMMMMMM*MMMMMMM*MMMMMMM"),
]


@pytest.mark.parametrize(("layers", "att", "mlp", "expected"), VECTORS)
def test_reference_vectors(layers: int, att: float, mlp: float, expected: str) -> None:
    assert allocate_layers(layers, att, mlp) == expected
    layout = build_layout(layers, att, mlp)
    assert layout.pattern == expected
    assert layout.stages == (expected,)


@pytest.mark.parametrize("layers", [1, 2, 7, 10, 24, 48, 56, 97])
@pytest.mark.parametrize("att", [0.0, 0.05, 0.08, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("mlp", [0.0, 0.1, 0.3, 0.5])
def test_counts_match_rounded_ratios(layers: int, att: float, mlp: float) -> None:
    n_att, n_mlp = round(layers * att), round(layers * mlp)
    if n_att + n_mlp > layers:
        with pytest.raises(ValueError, match="more than"):
            allocate_layers(layers, att, mlp)
        return
    pattern = allocate_layers(layers, att, mlp)
    assert len(pattern) == layers
    assert set(pattern) <= set("M*-")
    assert pattern.count("*") == n_att
    assert pattern.count("-") == n_mlp


def test_round_half_to_even() -> None:
    assert allocate_layers(10, 0.25, 0.0).count("*") == 2  # round(2.5) == 2
    assert allocate_layers(10, 0.35, 0.0).count("*") == 4  # round(3.5) == 4
    assert allocate_layers(10, 0.0, 0.25).count("-") == 2


def test_ratios_and_summary() -> None:
    layout = build_layout(56, 0.08, 0.5)
    assert layout.num_layers == 56
    assert layout.ratios() == pytest.approx({"mamba": 24 / 56, "attention": 4 / 56, "mlp": 0.5})
    assert layout.summary() == (
        f"pattern {layout.pattern} (56 layers: 24 Mamba-2 42.9%, 4 attention 7.1%, 28 MLP 50.0%)"
    )
    staged = build_layout(4, 0.25, 0.25, pattern="M*|M-")
    assert staged == LayerLayout("M*M-", ("M*", "M-"))
    assert staged.summary().splitlines()[1] == "2 pipeline stages of 2, 2 layers"


@pytest.mark.parametrize(
    ("layers", "att", "mlp", "message"),
    [
        (0, 0.0, 0.0, "num_layers must be >= 1, got 0"),
        (10**20, 0.0, 0.0, "num_layers must be <= 10000, got 100000000000000000000"),
        (10, -0.1, 0.0, r"att_ratio must be in \[0, 1\], got -0.1"),
        (10, 0.0, 1.5, r"mlp_ratio must be in \[0, 1\], got 1.5"),
        (10, 0.6, 0.5, r"att_ratio \+ mlp_ratio must be <= 1"),
        (3, 0.5, 0.5, "rounding gives 2 attention \\+ 2 MLP layers, more than 3 layers"),
    ],
)
def test_invalid_arguments(layers: int, att: float, mlp: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allocate_layers(layers, att, mlp)


def test_override_pattern_accepted() -> None:
    layout = build_layout(10, 0.2, 0.2, pattern="*M*M-|MMM-M")
    assert layout.pattern == "*M*M-MMM-M"
    assert layout.stages == ("*M*M-", "MMM-M")
    # a zero ratio leaves that symbol's count unconstrained
    assert build_layout(4, pattern="*-*-").pattern == "*-*-"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("MMM*-M*MM", "pattern has 9 layers, expected 10"),
        ("MMM*-M*MM--", "pattern has 11 layers, expected 10"),
        ("MMM*-M*MMx", "may only contain .* got \\['x'\\]"),
        ("MMM*-M*M-M M", "got \\[' '\\]"),
        ("MMM*-M-MM-", "pattern has 1 attention layers '\\*', expected 2"),
        ("MMM*-M*MMM", "pattern has 1 MLP layers '-', expected 2"),
        ("|MMM*-M*MM-", "empty pipeline stage"),
        ("MMM*-M*MM-|", "empty pipeline stage"),
        ("MMM*-||M*MM-", "empty pipeline stage"),
    ],
)
def test_override_pattern_errors(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_layout(10, 0.2, 0.2, pattern=pattern)


def test_split_stages() -> None:
    pattern = allocate_layers(56, 0.08, 0.5)
    stages = split_stages(pattern, 4)
    assert [len(s) for s in stages] == [14] * 4
    assert "".join(stages) == pattern
    assert split_stages(pattern, 1) == [pattern]
    assert split_stages("MM*|M-|--M", 3) == ["MM*", "M-", "--M"]


@pytest.mark.parametrize(
    ("pattern", "stages", "message"),
    [
        ("M" * 56, 3, "56 layers do not split evenly into 3 stages"),
        ("MM*|M-|--M", 2, "pattern has 3 stages, expected 2"),
        ("MM*||M-", 3, "empty pipeline stage"),
        ("MMMM", 0, "num_stages must be >= 1, got 0"),
    ],
)
def test_split_stages_errors(pattern: str, stages: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_stages(pattern, stages)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "toolkit.layout", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_success() -> None:
    result = run_cli("--layers", "56", "--att", "0.08", "--mlp", "0.5", "--pp", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"pattern {VECTORS[0][3]} (56 layers:")
    assert "4 attention 7.1%" in lines[0]
    assert lines[1:] == [
        f"stage {i}: {s} (14 layers)" for i, s in enumerate(split_stages(VECTORS[0][3], 4))
    ]


def test_cli_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--layers" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "-4"], "num_layers must be >= 1"),
        (["--layers", "100000000000000000000"], "num_layers must be <= 10000"),
        (["--layers", "10", "--att", "1.5"], "att_ratio must be in [0, 1]"),
        (["--layers", "4", "--pattern", "MMxM"], "may only contain"),
        (["--layers", "56", "--pp", "3"], "do not split evenly"),
        (["--layers", "56", "--pp", "0"], "num_stages must be >= 1"),
        (["--layers", "ten"], "invalid int value"),
    ],
)
def test_cli_errors(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "error: " in result.stderr
    assert message in result.stderr
    assert result.stdout == ""
