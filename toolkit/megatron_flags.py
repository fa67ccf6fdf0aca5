"""The reference framework's flags (its Mamba example, `examples/mamba/train.sh`, and the others
the converter honours) and the recipe key each one sets: the one home of that mapping, read by
toolkit/megatron_args.py and printed as the README's table (`markdown_table`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    nargs: int | str  # 0 (a switch), 1, or "*" (one or more values)
    key: str  # the recipe key it sets ("" when it has no effect here)
    note: str = ""


# Every flag the converter knows, in the reference script's order, then the others it honours.
FLAGS = {
    "--tensor-model-parallel-size": Flag(1, "parallel.tp"),
    "--sequence-parallel": Flag(0, "parallel.sequence_parallel"),
    "--pipeline-model-parallel-size": Flag(1, "parallel.pp"),
    "--use-distributed-optimizer": Flag(0, "parallel.shard_optimizer", "absent: false"),
    "--overlap-param-gather": Flag(0, "", "communication overlap: no effect on the math"),
    "--overlap-grad-reduce": Flag(0, "", "communication overlap: no effect on the math"),
    "--untie-embeddings-and-output-weights": Flag(
        0, "", "required: the toolkit's embedding and output layer are always untied"
    ),
    "--init-method-std": Flag(1, "model.init_std"),
    "--position-embedding-type": Flag(
        1, "model.position_embedding", "none or rope; Megatron's default learned_absolute refused"
    ),
    "--num-layers": Flag(1, "model.num_layers", "absent with a layer pattern: its count"),
    "--hidden-size": Flag(1, "model.hidden_size"),
    "--ffn-hidden-size": Flag(1, "model.ffn_hidden_size", "absent: 4 x hidden (as Megatron)"),
    "--num-attention-heads": Flag(1, "model.num_attention_heads"),
    "--group-query-attention": Flag(0, "model.num_query_groups", "absent: groups = heads"),
    "--num-query-groups": Flag(1, "model.num_query_groups"),
    "--kv-channels": Flag(1, "", "must equal hidden / heads"),
    "--hybrid-attention-ratio": Flag(1, "model.att_ratio"),
    "--hybrid-mlp-ratio": Flag(1, "model.mlp_ratio"),
    "--hybrid-layer-pattern": Flag(
        1, "model.pattern", "M * - with '|' between PP stages; sets the layer count (as Megatron)"
    ),
    "--hybrid-override-pattern": Flag(1, "model.pattern", "the former name of the above"),
    "--decoder-first-pipeline-num-layers": Flag(
        1, "model.pattern", "the first PP stage's layers: '|' where Megatron cuts the stages"
    ),
    "--decoder-last-pipeline-num-layers": Flag(
        1, "model.pattern", "the last PP stage's layers (the rest evenly between)"
    ),
    "--mamba-state-dim": Flag(1, "model.mamba_state_dim"),
    "--mamba-head-dim": Flag(1, "model.mamba_head_dim"),
    "--mamba-num-groups": Flag(1, "model.mamba_num_groups"),
    "--mamba-num-heads": Flag(
        1, "model.mamba_expand", "heads x head dim / hidden; absent: 2 x hidden (expand 2)"
    ),
    "--seq-length": Flag(1, "model.seq_length"),
    "--max-position-embeddings": Flag(1, "", "no learned positions: no effect"),
    "--train-samples": Flag(1, "train.steps", "samples / global batch"),
    "--train-iters": Flag(1, "train.steps"),
    "--lr-warmup-samples": Flag(1, "train.warmup_steps", "samples / global batch"),
    "--lr-warmup-iters": Flag(1, "train.warmup_steps"),
    "--lr-decay-samples": Flag(1, "train.decay_steps", "samples / global batch"),
    "--lr-warmup-fraction": Flag(
        1, "train.warmup_steps", "x the decay steps (all steps where absent), to whole steps"
    ),
    "--lr-warmup-init": Flag(1, "", "must be 0 (Megatron's default): the warmup starts from 0"),
    "--lr-decay-iters": Flag(1, "train.decay_steps"),
    "--save": Flag(1, "checkpoint.dir", "absent: checkpoint.enabled = false"),
    "--load": Flag(
        1,
        "checkpoint.dir",
        "must equal --save (runs resume from checkpoint.dir), but with --finetune",
    ),
    "--pretrained-checkpoint": Flag(
        1, "checkpoint.init_from", "the weights a new run starts from (step 0, new optimizer)"
    ),
    "--finetune": Flag(
        0, "checkpoint.init_from", "--load's weights start a new run; --save another directory"
    ),
    "--no-load-optim": Flag(0, "", "with --finetune or --pretrained-checkpoint: no effect"),
    "--no-load-rng": Flag(0, "", "with --finetune or --pretrained-checkpoint: no effect"),
    "--data-path": Flag("*", "data.blend", "PREFIX or W1 PREFIX1 W2 PREFIX2 ..."),
    "--train-data-path": Flag("*", "data.blend", "as --data-path, used whole (data.split 100,0,0)"),
    "--valid-data-path": Flag("*", "data.valid_blend", "validation's own datasets, used whole"),
    "--test-data-path": Flag("*", "data.test_blend", "the test split's own datasets, used whole"),
    "--data-cache-path": Flag(1, "data.cache_dir"),
    "--split": Flag(1, "data.split"),
    "--eod-mask-loss": Flag(0, "data.eod_mask_loss", "true; absent: false (as Megatron)"),
    "--tokenizer-type": Flag(
        1,
        "data.tokenizer",
        "GPTSentencePieceTokenizer, SentencePieceTokenizer, HuggingFaceTokenizer (a tokenizer.json)",
    ),
    "--tokenizer-model": Flag(1, "data.tokenizer", "the file, with --tokenizer-type"),
    "--distributed-backend": Flag(1, "", "nccl on GPUs, gloo on CPUs, chosen by the toolkit"),
    "--micro-batch-size": Flag(1, "train.micro_batch_size"),
    "--global-batch-size": Flag(1, "train.global_batch_size"),
    "--lr": Flag(1, "train.lr"),
    "--min-lr": Flag(1, "train.min_lr", "absent: 0"),
    "--lr-decay-style": Flag(
        1, "train.lr_schedule", "cosine, constant, WSD; absent (Megatron: linear) refused"
    ),
    "--lr-wsd-decay-style": Flag(
        1, "train.wsd_decay_style", "with WSD; absent: exponential (as Megatron)"
    ),
    "--lr-wsd-decay-iters": Flag(1, "train.wsd_decay_steps", "with WSD (Megatron requires one)"),
    "--lr-wsd-decay-samples": Flag(1, "train.wsd_decay_steps", "samples / global batch"),
    "--weight-decay": Flag(1, "train.weight_decay", "absent: 0.01"),
    "--clip-grad": Flag(1, "train.grad_clip"),
    "--attention-dropout": Flag(1, "", "must be 0 (no dropout here; Megatron's default 0.1)"),
    "--hidden-dropout": Flag(1, "", "must be 0 (no dropout here; Megatron's default 0.1)"),
    "--disable-bias-linear": Flag(0, "", "required: the toolkit's linear layers have no bias"),
    "--normalization": Flag(1, "model.norm", "RMSNorm or LayerNorm (absent: LayerNorm)"),
    "--norm-epsilon": Flag(1, "model.norm_eps"),
    "--adam-beta1": Flag(1, "train.adam_beta1"),
    "--adam-beta2": Flag(1, "train.adam_beta2", "absent: 0.999"),
    "--adam-eps": Flag(1, "train.adam_eps"),
    "--log-interval": Flag(1, "logging.interval", "absent: 100"),
    "--save-interval": Flag(1, "checkpoint.interval"),
    "--eval-interval": Flag(1, "train.eval_interval", "with a validation share in --split"),
    "--eval-iters": Flag(1, "train.eval_batches", "x global / micro batch"),
    "--bf16": Flag(0, "train.precision", "absent: fp32"),
    "--fp32-residual-connection": Flag(
        0, "model.fp32_residual", "true; absent: false (with --bf16 a bf16 residual stream)"
    ),
    "--fp8-format": Flag(
        1,
        "train.precision",
        "hybrid -> fp8 (E4M3 forward, E5M2 gradients), with --bf16; e4m3 refused",
    ),
    "--fp8-recipe": Flag(1, "train.fp8_recipe", "delayed or tensorwise; absent: delayed"),
    "--fp8-amax-history-len": Flag(1, "train.fp8_amax_history", "delayed; absent: 1"),
    "--fp8-amax-compute-algo": Flag(1, "train.fp8_amax_algo", "delayed; absent: most_recent"),
    "--fp8-margin": Flag(1, "", "must be 0 (Megatron's default)"),
    "--fp8-interval": Flag(1, "", "no effect (Megatron ignores it)"),
    "--first-last-layers-bf16": Flag(
        0, "train.fp8_layers", "inner (first and last blocks bf16); absent with fp8: blocks"
    ),
    "--num-layers-at-start-in-bf16": Flag(1, "train.fp8_layers", "must be 1"),
    "--num-layers-at-end-in-bf16": Flag(1, "train.fp8_layers", "must be 1"),
    "--no-fp8-wgrad": Flag(
        0, "", "with --fp8-format refused: the weight gradients' products are float8 here"
    ),
    "--fp8-param-gather": Flag(
        0, "", "with --fp8-format refused: float8 parameters are not kept here"
    ),
    "--transformer-impl": Flag(
        1, "", "no effect: the toolkit's own layers; train.fp8_engine picks the float8 library"
    ),
    "--no-gradient-accumulation-fusion": Flag(
        0,
        "train.fused_grad_accumulation",
        "false; absent: true, as Megatron's default (the same math)",
    ),
    "--use-mcore-models": Flag(0, "", "no effect"),
    "--spec": Flag("*", "", "the layer spec: the toolkit's blocks are Megatron-core's"),
    "--no-create-attention-mask-in-dataloader": Flag(0, "", "no effect (causal attention)"),
    "--tensorboard-dir": Flag(1, "logging.dir"),
    "--swiglu": Flag(0, "model.mlp_activation", "swiglu"),
    "--squared-relu": Flag(0, "model.mlp_activation", "relu2"),
    "--rotary-percent": Flag(1, "model.rotary_percent"),
    "--rotary-base": Flag(1, "model.rotary_base"),
    "--vocab-size": Flag(1, "model.vocab_size"),
    "--make-vocab-size-divisible-by": Flag(1, "model.make_vocab_size_divisible_by"),
    "--seed": Flag(1, "train.seed"),
    "--recompute-granularity": Flag(
        1, "train.activation_checkpointing", "full (with --recompute-method uniform) -> 'full'"
    ),
    "--recompute-method": Flag(1, "train.activation_checkpointing", "uniform"),
    "--recompute-num-layers": Flag(1, "train.activation_checkpointing", "1"),
    "--use-flash-attn": Flag(0, "", "attention kernel: chosen by the toolkit"),
    "--attention-softmax-in-fp32": Flag(0, "", "the toolkit's softmax is fp32"),
    "--num-workers": Flag(1, "", "data loading: no effect"),
    # Flags of current Megatron scripts beyond the Mamba example (argument names from its
    # training config dataclasses): a timeout and an asynchronous save map to keys; the rest
    # pick kernels, overlap communication or choose what to log, none of which changes the math.
    "--distributed-timeout-minutes": Flag(
        1, "parallel.timeout_minutes", "absent: 10 (as Megatron)"
    ),
    "--async-save": Flag(0, "checkpoint.async_save", "absent: false"),
    "--ckpt-format": Flag(
        1,
        "",
        "no effect: checkpoints are Zarr stores (`reshard.py --format megatron` writes Megatron's)",
    ),
    "--attention-backend": Flag(1, "", "attention kernel: chosen by the toolkit"),
    "--cross-entropy-loss-fusion": Flag(0, "", "no effect: the toolkit's cross-entropy is fused"),
    "--cross-entropy-fusion-impl": Flag(1, "", "no effect: the toolkit's cross-entropy is fused"),
    "--no-masked-softmax-fusion": Flag(0, "", "kernel choice: no effect on the math"),
    "--no-bias-gelu-fusion": Flag(0, "", "kernel choice: no effect on the math"),
    "--no-bias-swiglu-fusion": Flag(0, "", "kernel choice: no effect on the math"),
    "--no-bias-dropout-fusion": Flag(0, "", "kernel choice: no effect on the math"),
    "--no-rope-fusion": Flag(0, "", "kernel choice: no effect on the math"),
    "--no-persist-layer-norm": Flag(0, "", "kernel choice: no effect on the math"),
    "--tp-comm-overlap": Flag(0, "", "communication overlap: no effect on the math"),
    "--ddp-bucket-size": Flag(1, "", "communication buckets: no effect on the math"),
    "--accumulate-allreduce-grads-in-fp32": Flag(
        0, "", "no effect: gradients are fp32 here, accumulated and reduced in fp32"
    ),
    "--manual-gc": Flag(0, "", "Python's garbage collector: no effect on the math"),
    "--manual-gc-interval": Flag(1, "", "Python's garbage collector: no effect on the math"),
    "--exit-signal-handler": Flag(0, "", "no effect: SIGTERM always checkpoints and stops here"),
    "--log-throughput": Flag(0, "", "logged always (tokens/s, TFLOP/s, MFU)"),
    "--log-timers-to-tensorboard": Flag(0, "", "the step time is logged always"),
    "--log-validation-ppl-to-tensorboard": Flag(0, "", "logged always (valid/perplexity)"),
    "--log-memory-to-tensorboard": Flag(0, "", "logged always"),
    "--no-mmap-bin-files": Flag(0, "", "data loading: no effect"),
    "--num-dataset-builder-threads": Flag(1, "", "data loading: no effect"),
    "--calculate-per-token-loss": Flag(
        0, "train.per_token_loss", "true; absent: false (as Megatron)"
    ),
    "--no-check-for-nan-in-loss-and-grad": Flag(
        0, "", "no effect: a non-finite loss stops the run or is skipped (train.nan_policy)"
    ),
    "--context-parallel-size": Flag(1, "", "must be 1: no context parallelism here"),
    "--expert-model-parallel-size": Flag(1, "", "must be 1: no experts here"),
    "--virtual-pipeline-model-parallel-size": Flag(
        1, "", "must be 1: no virtual pipeline stages here"
    ),
}
# Flags the converter knows and refuses at any value, each with what the toolkit does instead.
_NO_WANDB = "W&B logging is not built in: TensorBoard logs go to logging.dir"
REFUSED = {
    "--wandb-project": _NO_WANDB,
    "--wandb-exp-name": _NO_WANDB,
    "--wandb-save-dir": _NO_WANDB,
    "--wandb-entity": _NO_WANDB,
    "--exit-duration-in-mins": "under Slurm a run checkpoints and requeues on the USR2 sent "
    "before its time limit (slurm.signal_delay_s)",
    "--exit-interval": "stopping at a multiple of a step count is not a mode here: set train.steps",
}
# The flags whose only value the toolkit can honour is 1 (its FLAGS note says why).
MUST_BE_ONE = (
    "--context-parallel-size",
    "--expert-model-parallel-size",
    "--virtual-pipeline-model-parallel-size",
)
DEFAULTS = {"--attention-dropout": "0.1", "--hidden-dropout": "0.1"}
# The reference's MODEL_SCALE shell variable: the flags each scale sets.
SCALES = {
    "800M": {
        "--tensor-model-parallel-size": "1",
        "--num-layers": "48",
        "--hidden-size": "1024",
        "--num-attention-heads": "16",
        "--global-batch-size": "32",
    },
    "8B": {
        "--tensor-model-parallel-size": "4",
        "--num-layers": "56",
        "--hidden-size": "4096",
        "--num-attention-heads": "32",
        "--global-batch-size": "8",
    },
}


def markdown_table() -> str:
    """The README's table: each flag, its recipe key, and how it maps."""
    rows = ["| Megatron flag | recipe key | notes |", "|---|---|---|"]
    rows.append(
        "| `MODEL_SCALE=800M\\|8B` | the recipe file | `recipes/800m_hybrid.toml`, "
        "`recipes/8b_hybrid.toml`; accepted by the converter (sets the five flags below) |"
    )
    for name, flag in FLAGS.items():
        key = f"`{flag.key}`" if flag.key else "-"
        note = f" {flag.note} " if flag.note else " "
        rows.append(f"| `{name}` | {key} |{note}|")
    rows += [f"| `{name}` | - | refused: {why} |" for name, why in REFUSED.items()]
    return "\n".join(rows)
