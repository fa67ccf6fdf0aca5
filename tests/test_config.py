"""The recipe schema (toolkit/config/): shipped recipes load, validate and build; broken recipes
fail with a RecipeError that names the key and the reason."""

import dataclasses
import functools
import math
import re
import tomllib
import typing
from pathlib import Path

import pytest

from toolkit.build import build_model, describe_model
from toolkit.config import RANGES, Recipe, RecipeError, load_recipe, recipe_from_dict, validate
from toolkit.model.hybrid import count_parameters
from toolkit.tokenizer import ByteTokenizer

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.toml"))

# name -> (total parameters on the meta device, layer pattern). 8b_hybrid is the reference "8B":
# 8.65e9..8.67e9 parameters with the 256k vocabulary.
EXPECTED = {
    "8b_hybrid": (8_654_517_248, "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"),
    "8b_mamba2": (8_236_999_680, "M" * 56),
    "8b_gpt3": (8_540_135_424, "*-" * 32),
    "800m_hybrid": (907_127_680, "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"),
}


@functools.cache
def load_and_build(path: Path):
    recipe = load_recipe(path)
    return recipe, build_model(recipe, ByteTokenizer(), "meta")


def job_world_size(recipe) -> int:
    """The ranks a recipe runs on: its explicit layout, else its Slurm job."""
    p = recipe.parallel
    if p.dp != -1:
        return p.tp * p.pp * p.dp
    return recipe.slurm.nodes * recipe.slurm.gpus_per_node


# ---------------------------------------------------------------------------------------------
# 1. The shipped recipes.


def test_recipes_are_found():
    assert set(EXPECTED) | {"tiny_hybrid"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_validates_and_builds_on_meta(path):
    recipe, model = load_and_build(path)
    assert recipe.name == path.stem
    validate(recipe)
    validate(recipe, world_size=job_world_size(recipe))
    assert model.embedding.weight.is_meta
    assert [block.kind for block in model.layers] == list(model.layout.pattern)
    assert len(model.layers) == recipe.model.num_layers
    total = count_parameters(model)["total"]
    assert f"parameters: {total:,}" in describe_model(model)
    if path.stem in EXPECTED:
        expected_total, expected_pattern = EXPECTED[path.stem]
        assert model.layout.pattern == expected_pattern
        assert total == expected_total


def test_8b_hybrid_is_the_reference_8b():
    recipe, model = load_and_build(RECIPE_DIR / "8b_hybrid.toml")
    assert 8.65e9 <= count_parameters(model)["total"] <= 8.67e9
    pattern = model.layout.pattern
    assert (pattern.count("M"), pattern.count("*"), pattern.count("-")) == (24, 4, 28)


def test_8b_gpt3_is_a_rope_relu2_transformer():
    recipe, model = load_and_build(RECIPE_DIR / "8b_gpt3.toml")
    assert recipe.model.position_embedding == "rope"
    assert recipe.model.mlp_activation == "relu2"
    attention, mlp = model.layers[0].mixer, model.layers[1].mixer
    assert attention.rotary is not None and attention.rotary.rot_dim == 64  # 50% of head dim 128
    assert mlp.activation == "relu2"


def test_tiny_hybrid_has_every_block_type():
    _, model = load_and_build(RECIPE_DIR / "tiny_hybrid.toml")
    assert set(model.layout.pattern) == {"M", "*", "-"}


# ---------------------------------------------------------------------------------------------
# 2. Broken recipes: each a small valid base with one change.


def base_table() -> dict:
    """A valid recipe: 4 layers with every block type, 8 Mamba heads (d_inner 128 / 16)."""
    return {
        "name": "unit",
        "model": {
            "num_layers": 4,
            "hidden_size": 64,
            "seq_length": 32,
            "att_ratio": 0.25,
            "mlp_ratio": 0.25,
            "pattern": "M*-M",
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "ffn_hidden_size": 128,
            "mamba_state_dim": 16,
            "mamba_head_dim": 16,
            "mamba_num_groups": 2,
            "mamba_chunk_size": 16,
        },
        "train": {
            "steps": 10,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "lr": 1e-3,
            "min_lr": 1e-4,
        },
        "parallel": {"tp": 1, "pp": 1, "dp": 1},
        "slurm": {"extra_sbatch": ["--gres=gpu:8"]},
    }


def drop(section: str, key: str | None = None):
    def edit(table: dict) -> None:
        if key is None:
            del table[section]
        else:
            del table[section][key]

    return edit


def test_base_table_is_valid():
    recipe = recipe_from_dict(base_table())
    validate(recipe, world_size=1)
    model = build_model(recipe, ByteTokenizer(), "meta")
    assert model.layout.pattern == "M*-M"
    assert recipe.train.steps == 10 and recipe.slurm.extra_sbatch == ["--gres=gpu:8"]


def case(change, match, id):
    return pytest.param(change, match, id=id)


BROKEN = [
    # --- schema: unknown keys, types, required keys
    case(
        ["modle.hidden_size=64"], r"^modle: unknown key \(did you mean 'model'\?\)", "section-typo"
    ),
    case(
        ["wandb.project='x'"], r"^wandb: unknown key; valid keys: name, model,", "section-unknown"
    ),
    case(
        ["model.hiden_size=64"],
        r"^model\.hiden_size: unknown key \(did you mean 'hidden_size'\?\)",
        "key-typo",
    ),
    case(["parallel=4"], r"^parallel: expected a table \[parallel\], got int", "section-not-table"),
    case(
        ["model.hidden_size='big'"], r"^model\.hidden_size: expected int, got str 'big'", "str-int"
    ),
    case(
        ["model.hidden_size=big"], r"^model\.hidden_size: expected int, got str 'big'", "bare-int"
    ),
    case(["train.steps=10.0"], r"^train\.steps: expected int, got float 10\.0", "float-int"),
    case(["model.num_layers=true"], r"^model\.num_layers: expected int, got bool True", "bool-int"),
    case(
        ["parallel.sequence_parallel=1"],
        r"^parallel\.sequence_parallel: expected bool, got int 1",
        "int-bool",
    ),
    case(
        ["parallel.sequence_parallel=true", "parallel.tp=2", "model.seq_length=33"],
        r"^parallel\.sequence_parallel: model\.seq_length 33 does not split into TP=2 equal parts",
        "sequence-parallel-length",
    ),
    case(["train.lr=true"], r"^train\.lr: expected float, got bool True", "bool-float"),
    case(["train.lr='fast'"], r"^train\.lr: expected float, got str 'fast'", "str-float"),
    case(["slurm.partition=3"], r"^slurm\.partition: expected str, got int 3", "int-optional-str"),
    case(["model.vocab_size=1.5"], r"^model\.vocab_size: expected int, got float", "optional-int"),
    case(
        ["model.mlp_activation='tanh'"],
        r"^model\.mlp_activation: 'tanh' is not one of 'gelu', 'relu2', 'swiglu'",
        "literal",
    ),
    case(["train.precision=16"], r"^train\.precision: 16 is not one of 'fp32'", "literal-int"),
    case(
        drop("model", "hidden_size"), r"^model\.hidden_size: required key is missing", "no-hidden"
    ),
    case(drop("train", "steps"), r"^train\.steps: required key is missing", "no-steps"),
    case(drop("train"), r"^train: required key is missing", "no-train"),
    case(drop("model"), r"^model: required key is missing", "no-model"),
    # --- tensor parallelism
    case(
        ["parallel.tp=3"], r"^parallel\.tp: 4 attention heads are not divisible by TP=3", "tp-heads"
    ),
    case(
        ["parallel.tp=4"], r"^parallel\.tp: 2 query groups are not divisible by TP=4", "tp-groups"
    ),
    case(
        ["parallel.tp=4", "model.num_query_groups=4"],
        r"^parallel\.tp: 2 Mamba groups are not divisible by TP=4",
        "tp-mamba-groups",
    ),
    case(
        ["parallel.tp=2", "model.ffn_hidden_size=130", "model.ffn_hidden_size=129"],
        r"^parallel\.tp: ffn size 129 is not divisible by TP=2",
        "tp-ffn",
    ),
    # --- attention and Mamba shapes
    case(
        ["model.num_query_groups=3"],
        r"^model\.num_query_groups: 4 heads are not divisible by 3 groups",
        "heads-groups",
    ),
    case(
        ["model.num_attention_heads=3", "model.num_query_groups=1"],
        r"^model\.num_attention_heads: hidden_size 64 is not divisible by 3 heads",
        "hidden-heads",
    ),
    case(
        ["model.mamba_num_groups=3"],
        r"^model\.mamba_num_groups: 8 Mamba heads are not divisible by 3 groups",
        "mamba-heads-groups",
    ),
    case(
        ["model.mamba_head_dim=48"],
        r"^model\.mamba_head_dim: d_inner 128 is not divisible by head dim 48",
        "d-inner-head-dim",
    ),
    # --- pipeline parallelism and the pattern
    case(["parallel.pp=3"], r"^parallel\.pp: 4 layers do not split evenly into PP=3", "pp-layers"),
    case(
        ["model.pattern='M*|-M'", "parallel.pp=3"],
        r"^parallel\.pp: the pattern has 2 stages \('\|'\), pp is 3",
        "pp-stages",
    ),
    case(["model.pattern='M*|-M'"], r"^parallel\.pp: the pattern has 2 stages", "stages-no-pp"),
    case(
        ["model.pattern='M*xM'"],
        r"^model\.pattern: pattern may only contain 'M', '\*', '-' and '\|', got \['x'\]",
        "pattern-symbol",
    ),
    case(["model.pattern='M*-'"], r"^model\.pattern: pattern has 3 layers, expected 4", "short"),
    case(["model.pattern='M*-MM'"], r"^model\.pattern: pattern has 5 layers, expected 4", "long"),
    case(
        ["model.pattern='M**-'"],
        r"^model\.pattern: pattern has 2 attention layers '\*', expected 1",
        "pattern-attention-count",
    ),
    case(
        ["model.pattern='M*--'"],
        r"^model\.pattern: pattern has 2 MLP layers '-', expected 1",
        "pattern-mlp-count",
    ),
    case(["model.pattern='M*-M|'"], r"^model\.pattern: .* empty pipeline stage", "empty-stage"),
    case(
        ["model.mlp_ratio=0.9"],
        r"^model\.mlp_ratio: att_ratio \+ mlp_ratio must be <= 1",
        "ratios-sum",
    ),
    # --- batch sizes and learning rate
    case(
        ["train.global_batch_size=3"],
        r"^train\.global_batch_size: 3 is not divisible by micro_batch_size x DP = 2",
        "global-batch",
    ),
    case(
        ["parallel.dp=2", "train.global_batch_size=6"],
        r"^train\.global_batch_size: 6 is not divisible by micro_batch_size x DP = 4",
        "global-batch-dp",
    ),
    case(["train.min_lr=1e-2"], r"^train\.min_lr: need 0 <= min_lr <= lr, got 0\.01", "min-lr-big"),
    case(["train.min_lr=-1e-5"], r"^train\.min_lr: must be >= 0, got -1e-05", "min-lr-negative"),
]

# key=value -> the message after "key: "; every size must be positive (or >= 0 where noted).
NOT_POSITIVE = [
    ("model.num_layers=-4", "must be >= 1, got -4"),
    ("model.hidden_size=0", "must be >= 1, got 0"),
    ("model.seq_length=0", "must be >= 1, got 0"),
    ("model.num_attention_heads=0", "must be >= 1, got 0"),
    ("model.num_query_groups=-2", "must be >= 1, got -2"),
    ("model.mamba_state_dim=0", "must be >= 1, got 0"),
    ("model.mamba_head_dim=-16", "must be >= 1, got -16"),
    ("model.mamba_num_groups=0", "must be >= 1, got 0"),
    ("model.mamba_expand=0", "must be >= 1, got 0"),
    ("model.mamba_conv_kernel=0", "must be >= 1, got 0"),
    ("model.mamba_chunk_size=0", "must be >= 1, got 0"),
    ("model.make_vocab_size_divisible_by=0", "must be >= 1, got 0"),
    ("model.ffn_hidden_size=-1", "must be >= 0"),
    ("model.vocab_size=0", "must be >= 1"),
    ("model.vocab_size=-259", "must be >= 1"),
    ("model.rotary_percent=0", r"must be in \(0, 1\]"),
    ("model.att_ratio=-0.1", r"must be in \[0, 1\], got -0\.1"),
    ("train.steps=0", "must be >= 1, got 0"),
    ("train.micro_batch_size=0", "must be >= 1"),
    ("train.global_batch_size=0", "must be >= 1"),
    ("train.global_batch_size=-4", "must be >= 1"),
    ("train.warmup_steps=-1", "must be >= 0"),
    ("train.decay_steps=0", "must be >= 1"),
    ("train.lr=0", "must be > 0"),
    ("train.lr=-1e-3", "must be > 0"),
    ("parallel.tp=0", "must be >= 1, got 0"),
    ("parallel.pp=0", "must be >= 1, got 0"),
    ("parallel.dp=0", "must be -1 or >= 1, got 0"),
    ("parallel.dp=-2", "must be -1 or >= 1, got -2"),
    ("checkpoint.interval=-1", "must be >= 0"),
    ("checkpoint.keep_last=-1", "must be >= 0"),
    ("logging.interval=0", "must be >= 1"),
    ("slurm.nodes=0", "must be >= 1"),
    ("slurm.gpus_per_node=-1", "must be >= 0"),
    ("slurm.tasks_per_node=-1", "must be >= 0"),
    ("slurm.cpus_per_task=0", "must be >= 1, got 0"),
    ("slurm.max_num_timeout=-1", "must be >= 0"),
    ("slurm.signal_delay_s=-5", "must be >= 1, got -5"),
]
BROKEN += [
    case([override], rf"^{re.escape(override.partition('=')[0])}: {why}", override)
    for override, why in NOT_POSITIVE
]


BROKEN += [
    case(
        ["train.activation_checkpointing='some'"],
        r"^train\.activation_checkpointing: expected 'none' or 'full' or a list of block kinds "
        r"\('mamba', 'attention', 'mlp'\), got 'some'",
        "ac-value",
    ),
    case(
        ["train.activation_checkpointing=['mlp', 'moe']"],
        r"^train\.activation_checkpointing\[1\]: 'moe' is not a block kind; use 'mamba', "
        "'attention', 'mlp'",
        "ac-list-element",
    ),
    case(["train.activation_checkpointing=true"], r"^train\.activation_checkpointing: ", "ac-bool"),
    case(
        ["train.activation_checkpointing=[['mlp']]"],
        r"^train\.activation_checkpointing\[0\]: \['mlp'\] is not a block kind",
        "ac-nested-list",
    ),
    case(
        ["train.compile='yes'"], r"^train\.compile: expected False or True .*got 'yes'", "compile"
    ),
    case(["train.compile=1"], r"^train\.compile: expected False or True", "compile-int"),
    case(
        ["train.compile=['ssm']"],
        r"^train\.compile\[0\]: 'ssm' is not a block kind",
        "compile-kind",
    ),
    case(
        ["train.fp8_recipe='blockwise'"],
        r"^train\.fp8_recipe: 'blockwise' is not one of",
        "fp8-recipe",
    ),
]

# Values that types let through and ranges, names and Slurm's rules must stop.
BROKEN += [
    case(["train.lr=inf"], r"^train\.lr: must be a finite number, got inf", "lr-inf"),
    case(["train.grad_clip=nan"], r"^train\.grad_clip: must be a finite number", "clip-nan"),
    case(["train.weight_decay=-1.0"], r"^train\.weight_decay: must be >= 0, got -1\.0", "wd-neg"),
    case(["train.adam_beta2=1.0"], r"^train\.adam_beta2: must be in \[0, 1\), got 1\.0", "beta2"),
    case(["train.adam_eps=0"], r"^train\.adam_eps: must be > 0, got 0\.0", "adam-eps"),
    case(["train.seed=-1"], r"^train\.seed: must be >= 0, got -1", "seed-negative"),
    case(["train.seed=4294967296"], r"^train\.seed: must be <= 4294967295", "seed-numpy"),
    case(["logging.peak_tflops=-inf"], r"^logging\.peak_tflops: must be a finite", "tflops"),
    case(["model.norm_eps=nan"], r"^model\.norm_eps: must be a finite number", "eps-nan"),
    case(["model.rotary_base=-1e4"], r"^model\.rotary_base: must be > 0", "rope-base"),
    case(["train.profile.steps=0"], r"^train\.profile\.steps: must be >= 1", "profile-steps"),
    case(["model.num_layers=1000000000"], r"^model\.num_layers: must be <= 10000", "layers-1e9"),
    case(
        ["model.num_layers=100000000000000000000"],
        r"^model\.num_layers: 100000000000000000000 is too large \(over 64 bits\)",
        "layers-1e20",
    ),
    case(["model.hidden_size=33554432"], r"^model\.hidden_size: must be <= 16777216", "huge"),
    case(
        ["model.num_layers=1" + "0" * 400],
        r"^model\.num_layers: 1000.*\(401 characters\) is too large \(over 64 bits\)",
        "layers-1e400",
    ),
    case(["train.lr=" + "1" * 400], r"^train\.lr: 1111.*\(400 characters\) is too large", "lr-int"),
    case(["name='../../escaped'"], r"^name: '\.\./\.\./escaped' must be one path component", "up"),
    case(["name='a/b'"], r"^name: 'a/b' must be one path component", "name-slash"),
    case(["name='.hidden'"], r"^name: '\.hidden' must be one path component", "name-dot"),
    case(["name='-x'"], r"^name: '-x' must be one path component", "name-dash"),
    case(["name=''"], r"^name: '' must be one path component", "name-empty"),
    case(["name='a b'"], r"^name: 'a b' must be one path component", "name-space"),
    case(["name='" + "a" * 129 + "'"], r"^name: 'a{37}.*must be one path component", "long"),
    case(["checkpoint.dir=''"], r"^checkpoint\.dir: must be a directory path", "ckpt-dir"),
    case(["logging.dir=' '"], r"^logging\.dir: must be a directory path", "log-dir"),
    case(["slurm.time='2h'"], r"^slurm\.time: '2h' is not a Slurm time", "slurm-time"),
    case(
        ["slurm.time='00:01:00'"],
        r"^slurm\.signal_delay_s: 90 s before a limit of 00:01:00 leaves no time",
        "slurm-signal-delay",
    ),
    case(
        ['slurm.partition="gpu\\nrm -rf ~"'],
        r"^slurm\.partition: 'gpu\\nrm -rf ~' holds a control character",
        "slurm-newline",
    ),
    case(
        ["slurm.extra_sbatch=['--exclusive', \"--x\\r\"]"],
        r"^slurm\.extra_sbatch\[1\]: .* holds a control character",
        "slurm-list-newline",
    ),
    case(
        ["slurm.gpus_per_node=2", "slurm.tasks_per_node=4"],
        r"^slurm\.tasks_per_node: 4 ranks per node but 2 GPUs",
        "slurm-ranks-gpus",
    ),
    case(
        ["slurm.env=['NCCL_DEBUG=WARN', 'expandable_segments']"],
        r"^slurm\.env\[1\]: 'expandable_segments': expected NAME=value",
        "slurm-env-no-name",
    ),
    case(["slurm.env=['CUDA-X=1']"], r"^slurm\.env\[0\]: 'CUDA-X=1': expected", "slurm-env-name"),
    case(
        ["slurm.env=['MASTER_PORT=1234']"],
        r"^slurm\.env\[0\]: MASTER_PORT is set for each rank by Slurm or the launcher",
        "slurm-env-launcher",
    ),
    case(
        ["slurm.env=['SLURM_NTASKS=3']"],
        r"^slurm\.env\[0\]: SLURM_NTASKS is set",
        "slurm-env-slurm",
    ),
    case(["slurm.env=['A=1', 'A=2']"], r"^slurm\.env\[1\]: A is given twice", "slurm-env-twice"),
    case(
        ['slurm.env=["A=1\\nrm -rf ~"]'],
        r"^slurm\.env\[0\]: .* holds a control character",
        "slurm-env-newline",
    ),
]


@pytest.mark.parametrize(("change", "match"), BROKEN)
def test_broken_recipe_names_key_and_reason(change, match):
    table, overrides = base_table(), []
    if callable(change):
        change(table)
    else:
        overrides = change
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(table, overrides)


@pytest.mark.parametrize(
    ("parallel", "world_size", "match"),
    [
        ({"tp": 2, "dp": 2}, 8, r"^parallel: TP x PP x DP = 2x1x2 = 4 but the world size is 8"),
        ({"tp": 1, "dp": 1}, 2, r"^parallel: TP x PP x DP = 1x1x1 = 1 but the world size is 2"),
        ({"tp": 2, "dp": -1}, 3, r"^parallel: world size 3 is not divisible by TP x PP = 2"),
        # dp=-1 resolves to 4: 2 x 4 sequences per step do not divide the global batch of 4
        (
            {"tp": 1, "dp": -1},
            4,
            r"^train\.global_batch_size: 4 is not divisible by micro_batch_size x DP = 8",
        ),
    ],
)
def test_world_size_must_fit_the_layout(parallel, world_size, match):
    table = base_table()
    table["parallel"] = parallel
    recipe = recipe_from_dict(table)  # fine without a world size
    with pytest.raises(RecipeError, match=match):
        validate(recipe, world_size=world_size)


@pytest.mark.parametrize(
    ("parallel", "world_size"),
    [({"tp": 2, "dp": 2}, 4), ({"tp": 2, "dp": -1}, 4), ({"tp": 1, "dp": -1}, 2)],
)
def test_world_size_that_fits(parallel, world_size):
    table = base_table()
    table["parallel"] = parallel
    validate(recipe_from_dict(table), world_size=world_size)


# ---------------------------------------------------------------------------------------------
# 3. load_recipe errors and --set overrides.


def test_missing_file_error_starts_with_the_path(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: no such recipe file"):
        load_recipe(path)


def test_invalid_toml_error_starts_with_the_path(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\nnum_layers = 4\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: not valid TOML"):
        load_recipe(path)


def test_schema_and_override_errors_start_with_the_path(tmp_path):
    path = tmp_path / "wrong.toml"
    path.write_text('[model]\nnum_layers = "four"\n')
    prefix = re.escape(str(path))
    with pytest.raises(RecipeError, match=rf"^{prefix}: model\.num_layers: expected int"):
        load_recipe(path)
    tiny = RECIPE_DIR / "tiny_hybrid.toml"
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(tiny))}: parallel\.tp: "):
        load_recipe(tiny, ["parallel.tp=5"])


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(tmp_path))}: is a directory"):
        load_recipe(tmp_path)


def test_a_recipe_must_be_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 11\)"):
        load_recipe(path)


def test_an_integer_longer_than_python_reads_is_invalid_toml(tmp_path):
    path = tmp_path / "long.toml"
    path.write_text("[train]\nsteps = 1" + "0" * 5000 + "\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: not valid TOML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"^train\.steps: expected int, got str '1000"):
        recipe_from_dict(base_table(), ["train.steps=1" + "0" * 5000])


def test_huge_layer_counts_are_refused_before_the_layout_is_computed(monkeypatch):
    import toolkit.layout

    def allocate(*args):
        raise AssertionError("the layout was computed before the bound was checked")

    monkeypatch.setattr(toolkit.layout, "allocate_layers", allocate)
    for layers in ("1000000000", "100000000000000000000"):
        with pytest.raises(RecipeError, match=r"^model\.num_layers: "):
            recipe_from_dict(base_table(), [f"model.num_layers={layers}"])


def numeric_fields(cls=Recipe, prefix=""):
    """(key, type) of every int or float field of the recipe, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{key}.")
        elif {a for a in typing.get_args(tp) or (tp,) if a is not type(None)} in ({int}, {float}):
            yield key, tp


def test_every_numeric_field_has_a_range():
    keys = {key for key, _ in numeric_fields()}
    assert keys == set(RANGES), "each numeric recipe field needs its range in config.RANGES"
    assert len(keys) > 50


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_refuses_what_lies_outside_it(key):
    """A value just outside each range, and a non-finite one for floats, name the key."""
    spec = RANGES[key]
    low = float(re.search(r"[\[(](\S+),", spec)[1])
    section, _, leaf = key.rpartition(".")
    float_field = dict(numeric_fields())[key] is float
    outside = low - 1 if not float_field else low - 0.5
    if spec.startswith("-1 or"):
        outside = 0
    for value in [outside] + (["nan", "inf"] if float_field else []):
        with pytest.raises(RecipeError, match=rf"^{re.escape(key)}: "):
            recipe_from_dict(base_table(), [f"{key}={value}"])


def test_load_recipe_applies_overrides():
    recipe = load_recipe(RECIPE_DIR / "tiny_hybrid.toml", ["train.steps=3", "name=smoke"])
    assert recipe.train.steps == 3 and recipe.name == "smoke"


def test_override_values_are_toml_or_bare_strings():
    r = recipe_from_dict(
        base_table(),
        [
            "train.lr=1e-4",
            "train.sample_prompt=hello",
            "train.lr_schedule=wsd",
            "logging.progress_bar=false",
            "slurm.extra_sbatch=['--gres=gpu:8', '--exclusive']",
            " train.steps = 7 ",
        ],
    )
    assert type(r.train.lr) is float and r.train.lr == 1e-4
    assert r.train.sample_prompt == "hello"
    assert r.train.lr_schedule == "wsd"
    assert r.logging.progress_bar is False
    assert r.slurm.extra_sbatch == ["--gres=gpu:8", "--exclusive"]
    assert r.train.steps == 7


def test_override_quoted_string_keeps_toml_meaning():
    r = recipe_from_dict(base_table(), ["train.sample_prompt='1e-4'"])
    assert r.train.sample_prompt == "1e-4"
    r = recipe_from_dict(base_table(), ["train.sample_prompt=def f(x)"])
    assert r.train.sample_prompt == "def f(x)"


def test_override_creates_missing_section_and_key_without_touching_the_input():
    table = base_table()
    assert "checkpoint" not in table and "lr_schedule" not in table["train"]
    r = recipe_from_dict(table, ["checkpoint.dir='runs/x'", "train.lr_schedule='constant'"])
    assert r.checkpoint.dir == "runs/x" and r.train.lr_schedule == "constant"
    assert r.checkpoint.keep_last == 2  # the rest of the new section keeps its defaults
    assert table == base_table()


def test_later_override_wins():
    r = recipe_from_dict(base_table(), ["train.steps=7", "train.steps=8"])
    assert r.train.steps == 8


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("trainlr", r"^--set 'trainlr': expected section\.key=value"),
        ("=3", r"^--set '=3': expected section\.key=value"),
        ("name.x=1", r"^--set 'name\.x=1': name is not a section"),
        ("train.lr.x=1", r"^--set 'train\.lr\.x=1': lr is not a section"),
    ],
)
def test_malformed_override(override, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(base_table(), [override])


# ---------------------------------------------------------------------------------------------
# 4. Numeric widening and lists.


def test_int_for_a_float_field_becomes_float(tmp_path):
    r = recipe_from_dict(base_table(), ["train.lr=1", "train.min_lr=0", "model.norm_eps=0"])
    assert (r.train.lr, r.train.min_lr, r.model.norm_eps) == (1.0, 0.0, 0.0)
    assert all(type(v) is float for v in (r.train.lr, r.train.min_lr, r.model.norm_eps))
    path = tmp_path / "ints.toml"
    path.write_text(
        "[model]\nnum_layers = 2\nhidden_size = 512\nseq_length = 32\n"
        "[train]\nsteps = 1\nweight_decay = 0\ngrad_clip = 2\n"
    )
    r = load_recipe(path)
    assert type(r.train.weight_decay) is float and r.train.weight_decay == 0.0
    assert type(r.train.grad_clip) is float and r.train.grad_clip == 2.0


def test_max_grad_norm_is_the_clip_or_infinity_when_off():
    assert recipe_from_dict(base_table(), ["train.grad_clip=0.5"]).train.max_grad_norm == 0.5
    assert recipe_from_dict(base_table(), ["train.grad_clip=0"]).train.max_grad_norm == math.inf


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "slurm.extra_sbatch=['--exclusive', 3]",
            r"^slurm\.extra_sbatch\[1\]: expected str, got int 3",
        ),
        ("slurm.extra_sbatch=[true]", r"^slurm\.extra_sbatch\[0\]: expected str, got bool True"),
        ("slurm.extra_sbatch='--exclusive'", r"^slurm\.extra_sbatch: expected a list, got str"),
        (
            "slurm.container_mounts=[['/a:/b']]",
            r"^slurm\.container_mounts\[0\]: expected str, got list",
        ),
    ],
)
def test_lists_are_type_checked_elementwise(override, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(base_table(), [override])


def test_list_defaults_are_not_shared():
    a, b = recipe_from_dict(base_table()), recipe_from_dict(base_table())
    a.slurm.container_mounts.append("/x:/y")
    assert b.slurm.container_mounts == []
    assert recipe_from_dict(base_table(), ["slurm.extra_sbatch=[]"]).slurm.extra_sbatch == []


@pytest.mark.parametrize(
    "override",
    [
        "train.activation_checkpointing='full'",
        "train.activation_checkpointing=['mamba', 'mlp']",
        "train.activation_checkpointing=[]",
        "train.compile=true",
        "train.compile=['attention']",
        "train.fp8_recipe='rowwise'",
    ],
)
def test_performance_switches_accept_their_values(override):
    key, _, value = override.partition("=")
    recipe = recipe_from_dict(base_table(), [override])
    got = getattr(recipe.train, key.split(".")[1])
    assert got == tomllib.loads(f"v = {value}")["v"]


def test_build_model_in_a_dtype_leaves_the_default_alone():
    """build_model(dtype=...) creates every parameter in that dtype (no fp32 copy first) and
    puts the default dtype back."""
    import torch

    recipe = load_recipe(RECIPE_DIR / "tiny_hybrid.toml")
    model = build_model(recipe, ByteTokenizer(), "meta", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in build_model(recipe, ByteTokenizer(), "meta").parameters()} == {
        torch.float32
    }


def test_world_size_errors_start_with_the_path(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text((RECIPE_DIR / "tiny_hybrid.toml").read_text())
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: parallel: TP x PP x DP"):
        load_recipe(path, ["parallel.tp=2"], world_size=1)
    slurm = ["slurm.gpus_per_node=2", "slurm.tasks_per_node=4"]
    with pytest.raises(RecipeError, match=r"^slurm\.tasks_per_node: 4 ranks per node but 2 GPUs"):
        recipe_from_dict(base_table(), slurm, world_size=1)


# ---------------------------------------------------------------------------------------------
# 5. One launch, one validation.


def test_a_slurm_launch_validates_the_recipe_once(capsys):
    """launchers/submit.py --dry-run checks every section and the layout on the job's ranks once.
    (It used to load the recipe twice, without and with the world size: two full validations,
    each also checking the Slurm section's ranges twice.)"""
    import collections
    import importlib.util
    import sys

    path = RECIPE_DIR.parent / "launchers" / "submit.py"
    spec = importlib.util.spec_from_file_location("submit_once", path)
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    calls = collections.Counter()

    def count(frame, event, arg):
        if event == "call":
            calls[frame.f_code.co_qualname] += 1

    sys.setprofile(count)
    try:
        status = submit.main([str(RECIPE_DIR / "tiny_hybrid.toml"), "--dry-run"])
    finally:
        sys.setprofile(None)
    assert status == 0 and "#SBATCH --nodes=1" in capsys.readouterr().out
    sections = ["Model", "Data", "Train", "Parallel", "Checkpoint", "Logging", "Slurm"]
    checks = ["validate", "check_layout", *(f"{s}Config.validate" for s in sections)]
    assert {name: calls[name] for name in checks} == dict.fromkeys(checks, 1)
