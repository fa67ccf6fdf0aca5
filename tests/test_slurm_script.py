"""The rendered sbatch script against a golden file (no Slurm needed)."""

from pathlib import Path

from toolkit.config import load_recipe
from toolkit.slurm import render_sbatch

GOLDEN = Path(__file__).parent / "golden" / "8b_hybrid_pyxis.sbatch"
OVERRIDES = [
    'slurm.container_image="nvcr.io#nvidia/pytorch:25.01-py3"',
    'slurm.container_mounts=["/lustre/data:/data"]',
    'slurm.partition="batch"',
    'slurm.account="llm"',
]


def test_8b_hybrid_script_matches_the_golden_file():
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "8b_hybrid.toml", OVERRIDES)
    script = render_sbatch(
        recipe,
        "/work/recipes/8b_hybrid.toml",
        OVERRIDES,
        python="python3",
        workdir="/work",
        log_dir="/work/runs/8b_hybrid/slurm",
    )
    assert script == GOLDEN.read_text()
    # '#' in an #SBATCH line would start a comment; in the srun line it is just text.
    assert "#SBATCH --ntasks-per-node=8" in script and "--signal=USR2@90" in script
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in script
