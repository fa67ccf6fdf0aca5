"""The reference's command line as a recipe (toolkit/megatron_args.py), through the real
`python -m toolkit.config --from-megatron-args` command."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from toolkit.config import load_recipe
from toolkit.megatron_flags import FLAGS, REFUSED

ROOT = Path(__file__).resolve().parents[1]

# examples/mamba/train.sh of the reference with MODEL_SCALE="8B" and its variables expanded, as a
# user pastes it into a file: backslash-newlines, the torchrun launcher in front.
REFERENCE_8B = r"""
torchrun --nproc_per_node 8 ../../examples/classes/pretrain_mamba.py \
       --tensor-model-parallel-size 4 \
       --sequence-parallel \
       --pipeline-model-parallel-size 1 \
       --use-distributed-optimizer \
       --overlap-param-gather \
       --overlap-grad-reduce \
       --untie-embeddings-and-output-weights \
       --init-method-std 0.02 \
       --position-embedding-type none \
       --num-layers 56 \
       --hidden-size 4096 \
       --num-attention-heads 32 \
       --group-query-attention \
       --num-query-groups 8 \
       --hybrid-attention-ratio 0.08 \
       --hybrid-mlp-ratio 0.5 \
       --seq-length 4096 \
       --max-position-embeddings 4096 \
       --train-samples 73242188 \
       --lr-warmup-samples 50000 \
       --lr-decay-samples 73192188 \
       --save ./checkpoints \
       --load ./checkpoints \
       --data-path /data/pile_text_document \
       --data-cache-path ./data-cache \
       --split 99,1,0 \
       --tokenizer-type GPTSentencePieceTokenizer \
       --tokenizer-model /data/tok.model \
       --distributed-backend nccl \
       --micro-batch-size 4 \
       --global-batch-size 8 \
       --lr 2.5e-4 \
       --min-lr 2.5e-5 \
       --lr-decay-style cosine \
       --weight-decay 0.1 \
       --clip-grad 1.0 \
       --attention-dropout 0.0 \
       --hidden-dropout 0.0 \
       --disable-bias-linear \
       --normalization RMSNorm \
       --adam-beta1 0.9 \
       --adam-beta2 0.95 \
       --log-interval 10 \
       --save-interval 2000 \
       --eval-interval 2000 \
       --eval-iters 32 \
       --bf16 \
       --use-mcore-models \
       --spec megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec \
       --no-create-attention-mask-in-dataloader \
       --tensorboard-dir ./tensorboard
"""
SCALE_FLAGS = (
    "--tensor-model-parallel-size 4",
    "--num-layers 56",
    "--hidden-size 4096",
    "--num-attention-heads 32",
    "--global-batch-size 8",
)


def convert(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "toolkit.config", "--from-megatron-args", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def overlap(converted: dict, recipe: dict, section: str) -> dict:
    """converted[section]'s keys that the shipped recipe also sets, with both values."""
    return {
        k: (v, recipe[section][k]) for k, v in converted[section].items() if k in recipe[section]
    }


def check_8b(text: str, tmp_path: Path) -> None:
    out = tmp_path / "recipe.toml"
    out.write_text(text)
    converted = tomllib.loads(text)
    shipped = tomllib.loads((ROOT / "recipes/8b_hybrid.toml").read_text())
    for section in ("model", "parallel", "train"):
        pairs = overlap(converted, shipped, section)
        assert pairs and all(a == b for a, b in pairs.values()), (section, pairs)
    # The architecture is all there, not only what happens to overlap.
    assert {"num_layers", "hidden_size", "att_ratio", "mlp_ratio", "ffn_hidden_size"} <= set(
        overlap(converted, shipped, "model")
    )
    assert {"tp", "sequence_parallel", "pp"} <= set(overlap(converted, shipped, "parallel"))
    # And as resolved by the recipe loader: the same layers and layout as the shipped recipe.
    mine, theirs = load_recipe(out), load_recipe(ROOT / "recipes/8b_hybrid.toml")
    same = ("num_layers", "hidden_size", "seq_length", "num_attention_heads", "num_query_groups")
    assert all(getattr(mine.model, k) == getattr(theirs.model, k) for k in same)
    assert mine.model.ffn_size == theirs.model.ffn_size
    assert (mine.parallel.tp, mine.parallel.sequence_parallel) == (4, True)
    assert mine.data.tokenizer == "sentencepiece:/data/tok.model"
    assert mine.data.blend == ["/data/pile_text_document"] and mine.data.split == "99,1,0"
    assert (mine.train.decay_steps, mine.train.eval_batches) == (73192188 // 8, 32 * 8 // 4)
    assert (mine.checkpoint.dir, mine.checkpoint.interval) == ("./checkpoints", 2000)
    assert mine.logging.dir == "./tensorboard"


def test_reference_8b_from_a_file(tmp_path):
    args = tmp_path / "args.sh"
    args.write_text(REFERENCE_8B)
    proc = convert(f"@{args}")
    assert proc.returncode == 0, proc.stderr
    check_8b(proc.stdout, tmp_path)


def test_the_recipe_names_the_flags_that_set_no_key():
    """A comment at the top of the converted recipe lists the given flags that set nothing
    (checked, or without effect), so a reader sees what was not carried over."""
    proc = convert(REFERENCE_8B.replace("\\\n", " "))
    assert proc.returncode == 0, proc.stderr
    head = "".join(line[2:] for line in proc.stdout.splitlines() if line.startswith("# ")).replace(
        " ", ""
    )
    named = head.partition("whichandwhy):")[2].split(",")
    assert {"--overlap-grad-reduce", "--use-mcore-models", "--spec", "--hidden-dropout"} <= set(
        named
    )
    assert not {n for n in named if FLAGS[n].key}  # only flags that set no key


def test_reference_8b_from_one_string_with_model_scale(tmp_path):
    # MODEL_SCALE=8B stands for the five flags the reference's script sets from it.
    text = REFERENCE_8B.split("pretrain_mamba.py", 1)[1]
    for flag in SCALE_FLAGS:
        text = text.replace(flag + " \\", "\\")
    proc = convert("MODEL_SCALE=8B " + text.replace("\\\n", " "))
    assert proc.returncode == 0, proc.stderr
    check_8b(proc.stdout, tmp_path)


# The reference's current train.sh (MODEL_SCALE="8B"): the layers as --hybrid-layer-pattern, no
# --num-layers or ratios, the hybrid entry point and layer spec.
PATTERN_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
CURRENT_8B = (
    REFERENCE_8B.replace("pretrain_mamba.py", "pretrain_hybrid.py")
    .replace("--num-layers 56 \\", f"--hybrid-layer-pattern {PATTERN_8B} \\")
    .replace("--hybrid-attention-ratio 0.08 \\\n", "")
    .replace("--hybrid-mlp-ratio 0.5 \\\n", "")
    .replace(
        "models.mamba.mamba_layer_specs mamba_stack_spec",
        "models.hybrid.hybrid_layer_specs hybrid_stack_spec",
    )
)


def test_current_reference_with_a_layer_pattern(tmp_path):
    """The current script names the layers by --hybrid-layer-pattern: the same 56 layers as the
    shipped 8B recipe (the layer count taken from the pattern, as Megatron does)."""
    assert "--num-layers" not in CURRENT_8B and "ratio" not in CURRENT_8B
    proc = convert(CURRENT_8B.replace("\\\n", " "))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "recipe.toml"
    out.write_text(proc.stdout)
    mine, shipped = load_recipe(out), load_recipe(ROOT / "recipes/8b_hybrid.toml")
    assert mine.model.num_layers == 56 and mine.model.pattern == PATTERN_8B
    assert mine.model.layer_layout().pattern == shipped.model.layer_layout().pattern
    # One '|' segment per pipeline stage becomes the stages; the old flag name still works.
    staged = PATTERN_8B[:28] + "|" + PATTERN_8B[28:]
    args = CURRENT_8B.replace(PATTERN_8B, staged).replace(
        "--pipeline-model-parallel-size 1", "--pipeline-model-parallel-size 2"
    )
    proc = convert(
        args.replace("--hybrid-layer-pattern", "--hybrid-override-pattern").replace("\\\n", " ")
    )
    assert proc.returncode == 0, proc.stderr
    out.write_text(proc.stdout)
    assert [len(s) for s in load_recipe(out).model.layer_layout().stages] == [28, 28]


@pytest.mark.parametrize(
    "change, named",
    [
        ((PATTERN_8B, PATTERN_8B.replace("-", "E", 1)), "'E' (mixture of experts)"),
        ((PATTERN_8B, PATTERN_8B.replace("*", "G", 1)), "'G' (Gated DeltaNet)"),
        ((PATTERN_8B, PATTERN_8B + "/*-"), "'/' (multi-token prediction)"),
        ((PATTERN_8B, PATTERN_8B[:28] + "|" + PATTERN_8B[28:]), "2 '|' segments for PP=1"),
        (("--bf16", f"--bf16 --hybrid-override-pattern {PATTERN_8B}"), "together"),
        (("--bf16", "--bf16 --num-layers 52"), "--num-layers: 52, but the layer pattern has 56"),
        (("--bf16", "--bf16 --mamba-num-heads 96"), "--mamba-num-heads: heads x --mamba-head-dim"),
    ],
    ids=["moe", "gdn", "mtp", "virtual-pipeline", "both-names", "num-layers", "mamba-heads"],
)
def test_layer_patterns_it_cannot_build_are_refused_by_name(change, named):
    proc = convert(CURRENT_8B.replace(*change).replace("\\\n", " "))
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mamba_heads_set_the_mamba_width(tmp_path):
    """--mamba-num-heads: Megatron's Mamba width is heads x head dim (else 2 x hidden)."""
    for heads, expand in ((128, 2), (192, 3)):
        proc = convert(CURRENT_8B.replace("\\\n", " ") + f" --mamba-num-heads {heads}")
        assert proc.returncode == 0, proc.stderr
        assert tomllib.loads(proc.stdout)["model"]["mamba_expand"] == expand


def test_current_megatron_flags_map_or_change_nothing(tmp_path):
    """Flags of current Megatron scripts beyond the Mamba example: the collective timeout, the
    asynchronous save and the per-token loss become keys; kernel, overlap, logging and
    garbage-collector flags change no number and are accepted, not refused as unknown."""
    extra = (
        "--distributed-timeout-minutes 60 --async-save --ckpt-format torch_dist "
        "--attention-backend flash --cross-entropy-loss-fusion --cross-entropy-fusion-impl te "
        "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-swiglu-fusion "
        "--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --tp-comm-overlap "
        "--ddp-bucket-size 40000000 --accumulate-allreduce-grads-in-fp32 --manual-gc "
        "--manual-gc-interval 100 --exit-signal-handler --log-throughput "
        "--log-timers-to-tensorboard --log-validation-ppl-to-tensorboard "
        "--log-memory-to-tensorboard --no-mmap-bin-files --num-dataset-builder-threads 8 "
        "--calculate-per-token-loss --no-check-for-nan-in-loss-and-grad --context-parallel-size 1 "
        "--expert-model-parallel-size 1 --virtual-pipeline-model-parallel-size 1"
    )
    plain = convert(REFERENCE_8B.replace("\\\n", " "))
    proc = convert(REFERENCE_8B.replace("\\\n", " ") + " " + extra)
    assert proc.returncode == 0 and plain.returncode == 0, proc.stderr + plain.stderr
    converted, before = tomllib.loads(proc.stdout), tomllib.loads(plain.stdout)
    assert before["parallel"].pop("timeout_minutes") == 10  # Megatron's default when absent
    assert converted["parallel"].pop("timeout_minutes") == 60
    assert converted["checkpoint"].pop("async_save") is True
    assert "async_save" not in before["checkpoint"]
    assert converted["train"].pop("per_token_loss") is True
    assert "per_token_loss" not in before["train"]
    assert converted == before  # nothing else moved
    out = tmp_path / "recipe.toml"
    out.write_text(proc.stdout)
    recipe = load_recipe(out)
    assert (recipe.parallel.timeout_minutes, recipe.checkpoint.async_save) == (60, True)


def test_finetuning_flags_start_from_the_base_weights(tmp_path):
    """--pretrained-checkpoint, or --finetune with --load: checkpoint.init_from (the base's
    weights, step 0, a new optimizer), --save the run's own checkpoints; --no-load-optim and
    --no-load-rng say nothing more then."""
    flat = REFERENCE_8B.replace("\\\n", " ")
    cases = {
        "--pretrained-checkpoint /base": flat.replace(
            "--bf16", "--bf16 --pretrained-checkpoint /base"
        ),
        "--finetune --load /base": flat.replace("--load ./checkpoints", "--load /base").replace(
            "--bf16", "--bf16 --finetune --no-load-optim --no-load-rng"
        ),
    }
    for what, args in cases.items():
        proc = convert(args)
        assert proc.returncode == 0, (what, proc.stderr)
        checkpoint = tomllib.loads(proc.stdout)["checkpoint"]
        assert (checkpoint["init_from"], checkpoint["dir"]) == ("/base", "./checkpoints"), what
        out = tmp_path / "recipe.toml"
        out.write_text(proc.stdout)
        assert load_recipe(out).checkpoint.init_from == "/base"


@pytest.mark.parametrize(
    "changes, named",
    [
        ([("--bf16", "--bf16 --finetune")], "--finetune: with --load equal to --save"),
        (
            [("--load ./checkpoints", ""), ("--bf16", "--bf16 --finetune")],
            "--finetune: needs --load",
        ),
        ([("--bf16", "--bf16 --no-load-optim")], "--no-load-optim: a resume without that state"),
        ([("--load ./checkpoints", "--load /base")], "--load: '/base' differs from --save"),
    ],
    ids=["finetune-resumes", "finetune-without-load", "no-load-optim", "load-elsewhere"],
)
def test_finetuning_flags_it_cannot_honour(changes, named):
    args = REFERENCE_8B.replace("\\\n", " ")
    for change in changes:
        args = args.replace(*change)
    proc = convert(args)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr


def test_wsd_takes_megatrons_decay_length_and_shape(tmp_path):
    """--lr-decay-style WSD: the decay's length from --lr-wsd-decay-iters (or -samples / the
    global batch) and its shape from --lr-wsd-decay-style, exponential where absent, as
    Megatron; without a length Megatron refuses to run, and so does the converter."""
    flat = REFERENCE_8B.replace("\\\n", " ").replace(
        "--lr-decay-style cosine", "--lr-decay-style WSD"
    )
    for extra, steps, style in (
        ("--lr-wsd-decay-iters 1000", 1000, "exponential"),
        ("--lr-wsd-decay-samples 8000 --lr-wsd-decay-style minus_sqrt", 1000, "minus_sqrt"),
    ):
        proc = convert(f"{flat} {extra}")
        assert proc.returncode == 0, proc.stderr
        train = tomllib.loads(proc.stdout)["train"]
        assert (train["lr_schedule"], train["wsd_decay_steps"], train["wsd_decay_style"]) == (
            "wsd",
            steps,
            style,
        )
    proc = convert(flat)
    assert proc.returncode == 2 and "WSD without --lr-wsd-decay-iters" in proc.stderr


def test_warmup_as_a_fraction_of_the_decay():
    """--lr-warmup-fraction: that fraction of the decay steps (Megatron's), to whole steps;
    --lr-warmup-init must be Megatron's 0; a fraction beside a warmup length is ambiguous."""
    flat = REFERENCE_8B.replace("\\\n", " ")
    by_fraction = flat.replace("--lr-warmup-samples 50000", "--lr-warmup-fraction 0.01")
    proc = convert(by_fraction + " --lr-warmup-init 0.0")
    assert proc.returncode == 0, proc.stderr
    train = tomllib.loads(proc.stdout)["train"]
    assert (train["decay_steps"], train["warmup_steps"]) == (73192188 // 8, 91490)
    proc = convert(by_fraction + " --lr-warmup-init 1e-6")
    assert (
        proc.returncode == 2 and "--lr-warmup-init: 1e-6: the warmup starts from 0" in proc.stderr
    )
    proc = convert(flat + " --lr-warmup-fraction 0.01")
    assert (
        proc.returncode == 2 and "--lr-warmup-fraction: given with --lr-warmup-iters" in proc.stderr
    )


def test_datasets_per_split_become_the_splits_own_blends():
    """--train/--valid/--test-data-path (each used whole, --split ignored, as Megatron): the
    training blend at split 100,0,0 and the other splits' own blends; validation runs."""
    flat = REFERENCE_8B.replace("\\\n", " ").replace(" --split 99,1,0", "")
    per_split = flat.replace(
        "--data-path /data/pile_text_document",
        "--train-data-path 0.7 /d/a 0.3 /d/b --valid-data-path /d/v --test-data-path /d/t",
    )
    proc = convert(per_split)
    assert proc.returncode == 0, proc.stderr
    converted = tomllib.loads(proc.stdout)
    data = converted["data"]
    assert data["blend"] == [[0.7, "/d/a"], [0.3, "/d/b"]] and data["split"] == "100,0,0"
    assert (data["valid_blend"], data["test_blend"]) == (["/d/v"], ["/d/t"])
    assert converted["train"]["eval_interval"] == 2000
    both = convert(flat + " --valid-data-path /d/v")
    assert both.returncode == 2 and "--valid-data-path: with --data-path" in both.stderr
    alone = convert(per_split.replace("--train-data-path 0.7 /d/a 0.3 /d/b ", ""))
    assert alone.returncode == 2 and "without --train-data-path" in alone.stderr


@pytest.mark.parametrize(
    "flag", ["--context-parallel-size", "--expert-model-parallel-size",
             "--virtual-pipeline-model-parallel-size"],
)  # fmt: skip
def test_parallelism_the_toolkit_has_not_is_refused_unless_1(flag):
    proc = convert(REFERENCE_8B.replace("\\\n", " ") + f" {flag} 2")
    assert proc.returncode == 2 and f"{flag}: 2: must be 1" in proc.stderr, proc.stderr


def test_uneven_pipeline_stages_become_the_patterns_stages(tmp_path):
    """--decoder-first/last-pipeline-num-layers: '|' where Megatron cuts the stages, the layers
    left evenly over the stages between; from the ratios or from a layer pattern."""
    flat = REFERENCE_8B.replace("\\\n", " ").replace(
        "--pipeline-model-parallel-size 1", "--pipeline-model-parallel-size 4"
    )
    for args, sizes in (
        (flat + " --decoder-first-pipeline-num-layers 12 --decoder-last-pipeline-num-layers 12", [12, 16, 16, 12]),
        (flat + " --decoder-last-pipeline-num-layers 2", [18, 18, 18, 2]),
        (CURRENT_8B.replace("\\\n", " ").replace("--pipeline-model-parallel-size 1",
            "--pipeline-model-parallel-size 2") + " --decoder-first-pipeline-num-layers 20", [20, 36]),
    ):  # fmt: skip
        proc = convert(args)
        assert proc.returncode == 0, proc.stderr
        out = tmp_path / "recipe.toml"
        out.write_text(proc.stdout)
        layout = load_recipe(out).model.layer_layout()
        assert [len(s) for s in layout.stages] == sizes and layout.pattern == PATTERN_8B
    proc = convert(flat + " --decoder-first-pipeline-num-layers 12")  # 44 over 3 stages
    assert proc.returncode == 2 and "56 layers do not make PP=4 stages" in proc.stderr


def test_unhonourable_flags_are_refused_by_name(tmp_path):
    text = REFERENCE_8B.replace("--hidden-dropout 0.0", "--hidden-dropout 0.1")
    text = text.replace("--bf16", "--bf16 --moe-router-topk 2 --num-experts 8")
    text = text.replace("--lr-decay-style cosine", "--lr-decay-style linear")
    proc = convert(text.replace("\\\n", " "), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    for name in ("--moe-router-topk", "--num-experts", "--hidden-dropout", "--lr-decay-style"):
        assert name in proc.stderr
    assert "--attention-dropout" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, named",
    [
        ("", "give the arguments"),
        ("--num-layers ${NUM_LAYERS}", "expand the shell variables"),
        ("'--num-layers 4", "quotation"),
        ("@/nonexistent/args.txt", "cannot read"),
        ("MODEL_SCALE=2B", "MODEL_SCALE=2B"),
        ("--num-layers four", "--num-layers: expected an integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, named):
    proc = convert(args)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_converted_recipe_is_validated():
    # Every flag honoured, but the layout is impossible: the recipe loader's error, exit 2.
    text = REFERENCE_8B.replace("--num-query-groups 8", "--num-query-groups 5")
    proc = convert(text.replace("\\\n", " "))
    assert proc.returncode == 2 and "model.num_query_groups" in proc.stderr


def test_readme_maps_every_flag():
    readme = (ROOT / "README.md").read_text()
    for name in [*FLAGS, *REFUSED]:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize(
    "extra, named",
    [
        ("--wandb-project p --wandb-exp-name e", "--wandb-project: W&B logging is not built in"),
        ("--exit-duration-in-mins 230", "--exit-duration-in-mins: under Slurm a run checkpoints"),
        ("--exit-interval 1000", "--exit-interval: stopping at a multiple"),
    ],
    ids=["wandb", "exit-duration", "exit-interval"],
)
def test_known_flags_refused_say_what_the_toolkit_does_instead(extra, named):
    proc = convert(REFERENCE_8B.replace("\\\n", " ") + " " + extra)
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert "unknown flag" not in proc.stderr


def test_fp8_flags_become_the_recipes_float8_keys(tmp_path):
    """--fp8-format hybrid: float8 with Megatron's defaults where its flags are absent (delayed
    scaling from the most recent of 1 amax, every block in float8); the other FP8 flags map to
    their keys, and the converted recipes load."""
    one_line = REFERENCE_8B.replace("\\\n", " ")
    runs = {
        "defaults": ("--fp8-format hybrid", {"precision": "fp8", "fp8_recipe": "delayed",
                     "fp8_amax_history": 1, "fp8_amax_algo": "most_recent",
                     "fp8_layers": "blocks"}),
        "set": ("--fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1024 "
                "--fp8-amax-compute-algo max --fp8-margin 0 --first-last-layers-bf16 "
                "--num-layers-at-start-in-bf16 1", {"fp8_amax_history": 1024,
                "fp8_amax_algo": "max", "fp8_layers": "inner"}),
        "tensorwise": ("--fp8-format hybrid --fp8-recipe tensorwise --fp8-interval 1 "
                       "--transformer-impl transformer_engine --no-gradient-accumulation-fusion",
                       {"fp8_recipe": "tensorwise", "fused_grad_accumulation": False}),
    }  # fmt: skip
    for name, (flags, want) in runs.items():
        proc = convert(one_line.replace("--bf16", "--bf16 " + flags))
        assert proc.returncode == 0, (name, proc.stderr)
        train = tomllib.loads(proc.stdout)["train"]
        assert {k: train.get(k) for k in want} == want, name
        if name == "tensorwise":  # delayed scaling's keys are left to their defaults
            assert "fp8_amax_history" not in train and "fp8_amax_algo" not in train
        out = tmp_path / f"{name}.toml"
        out.write_text(proc.stdout)
        assert load_recipe(out).train.precision == "fp8"
    # Without --fp8-format Megatron reads none of them: bf16.
    proc = convert(one_line.replace("--bf16", "--bf16 --fp8-recipe tensorwise --no-fp8-wgrad"))
    assert proc.returncode == 0 and tomllib.loads(proc.stdout)["train"]["precision"] == "bf16"


def test_fp8_flags_it_cannot_honour_are_refused_by_name():
    one_line = REFERENCE_8B.replace("\\\n", " ")
    flags = ("--fp8-format e4m3 --fp8-margin 1 --no-fp8-wgrad --fp8-param-gather "
             "--first-last-layers-bf16 --num-layers-at-end-in-bf16 2 "
             "--fp8-amax-compute-algo min")  # fmt: skip
    proc = convert(one_line.replace("--bf16", "--bf16 " + flags))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    for name in ("--fp8-format", "--fp8-margin", "--no-fp8-wgrad", "--fp8-param-gather",
                 "--num-layers-at-end-in-bf16", "--fp8-amax-compute-algo"):  # fmt: skip
        assert f"{name}:" in proc.stderr, name
    for flags, named in (("--fp8-format hybrid --fp8-recipe mxfp8", "--fp8-recipe: 'mxfp8'"),
                         ("--fp8-format hybrid", "--fp8-format: needs --bf16")):  # fmt: skip
        proc = convert(one_line.replace("--bf16", flags))
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr


def test_eod_mask_loss_becomes_the_data_key():
    flat = REFERENCE_8B.replace("\\\n", " ")
    masked, plain = convert(flat + " --eod-mask-loss"), convert(flat)
    assert masked.returncode == 0 and plain.returncode == 0, masked.stderr + plain.stderr
    assert tomllib.loads(masked.stdout)["data"]["eod_mask_loss"] is True
    assert "eod_mask_loss" not in tomllib.loads(plain.stdout)["data"]  # the default: false
    # Per-token normalisation differs from the micro-batches' means once masks vary them.
    both = convert(flat + " --eod-mask-loss --calculate-per-token-loss")
    assert both.returncode == 0, both.stderr
    converted = tomllib.loads(both.stdout)
    assert converted["data"]["eod_mask_loss"] is True and converted["train"]["per_token_loss"]


def test_the_residual_streams_dtype_is_megatrons():
    """Megatron keeps the residual stream in bf16 under --bf16 unless --fp32-residual-connection
    (the reference's train.sh has not got it); the toolkit's default is fp32, so the converted
    recipe says which."""
    flat = REFERENCE_8B.replace("\\\n", " ")
    fp32, plain = convert(flat + " --fp32-residual-connection"), convert(flat)
    assert fp32.returncode == 0 and plain.returncode == 0, fp32.stderr + plain.stderr
    assert tomllib.loads(fp32.stdout)["model"]["fp32_residual"] is True
    assert tomllib.loads(plain.stdout)["model"]["fp32_residual"] is False
