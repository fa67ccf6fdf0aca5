"""The one place where a built model and a parallel layout become the model that trains.

The transforms, in the order they are applied (torchtitan's), each from outside the model code:

1. `apply_tensor_parallel`  TP shards (+ sequence parallelism); gives the loss for the logits
2. `apply_fp8`              float8 linears (train.precision='fp8') for this rank's shards;
                            then train.fused_grad_accumulation's linears
3. `apply_ac`               activation checkpointing, per block kind
4. `apply_compile`          per-block (or whole-model) torch.compile (after AC, so the
                            recomputation compiles too); a float8 output layer on its own
5. pipeline stage           this rank's blocks and its schedule (`StepRunner`; with
                            train.fp8_weight_cache the float8 weights cast once a step)
6. optimizer                AdamW, its state sharded over DP when asked (ZeRO-1); with
                            train.bf16_weight_cache and the Triton update, the update
                            writes the bf16 casts step 5 reads

Why this order: TP cuts plain `nn.Linear` weights and puts its collectives in hooks around each
mixer, outside the linears. So a TP rank's linears are ordinary local matmuls, and float8 (torchao
or Transformer Engine) converts them exactly as on one GPU: the float8 filter sees the shapes that
really run, and the shard placement each weight carries (for checkpoints) stays on it. (torchtitan
converts first because its TP styles must know the float8 types; ours need not.) TP must see the
whole block stack before the pipeline keeps only this rank's blocks; checkpointing and compile
wrap the blocks as TP and float8 left them (hooks included); the optimizer takes the parameters
this rank ends up owning. Evaluation and serving take step 1 only (`apply_tensor_parallel`).
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from toolkit.activation_checkpoint import apply_ac, apply_compile, compile_options, selected_kinds
from toolkit.bf16_weight_cache import UpdatedCasts
from toolkit.config import Recipe, TrainConfig
from toolkit.distributed import ParallelEnv
from toolkit.grad_accumulation import (
    PLAIN_LINEARS,
    EmbeddingIntoGrad,
    LinearIntoGrad,
    fuse_grad_accumulation,
)
from toolkit.model import HybridLM
from toolkit.optim import build_optimizer
from toolkit.parallel.runtime import LossFn, StepRunner, cross_entropy
from toolkit.parallel.tp import apply_tp, vocab_parallel_cross_entropy
from toolkit.precision import Engine, apply_fp8, autocast_context
from toolkit.triton_adamw import TritonAdamW

log = logging.getLogger(__name__)


@dataclass
class ParallelModel:
    """What training needs from the transformed model on this rank."""

    module: nn.Module  # the whole model, or this rank's pipeline stage
    loss_fn: LossFn
    run_step: StepRunner
    optimizer: torch.optim.Optimizer
    fp8_engine: Engine | None


def apply_tensor_parallel(
    model: HybridLM, env: ParallelEnv, *, sequence_parallel: bool = False
) -> LossFn:
    """Shard a freshly built model (identical on every rank) over the TP group; returns the loss
    for its logits (vocab-parallel when TP > 1). Sequence parallelism needs TP > 1: at TP=1 there
    is nothing to split the sequence over, and the switch changes nothing."""
    if env.tp == 1:
        return partial(cross_entropy, vocab_size=model.vocab_size)
    group = env.group("tp")
    vocab_start = apply_tp(
        model, group=group, tp=env.tp, rank=env.tp_rank, sequence_parallel=sequence_parallel
    )
    return partial(
        vocab_parallel_cross_entropy,
        vocab_start=vocab_start,
        vocab_size=model.vocab_size,
        group=group,
    )


def apply_float8(
    model: HybridLM, cfg: TrainConfig, device: torch.device, tp: int = 1
) -> Engine | None:
    """Step 2: float8 linears when train.precision='fp8' (engine and scaling from the recipe);
    returns the engine that runs them, None otherwise. train.te_fused_norm fuses the pre-norms
    into Transformer Engine's linears only at TP=1 (precision.fuse_te_norms says why)."""
    if cfg.precision != "fp8":
        return None
    engine, _ = apply_fp8(
        model,
        device=device,
        engine=cfg.fp8_engine,
        recipe=cfg.fp8_recipe,
        compiled=bool(selected_kinds(cfg.compile)),
        fuse_norms=cfg.te_fused_norm and tp == 1,
        layers=cfg.fp8_layers,
        cast_weights_once=cfg.fp8_weight_cache,
    )
    return engine


def compile_fp8_output_layer(model: HybridLM, cfg: TrainConfig) -> bool:
    """Step 4's addition: under per-block compile, the output layer made float8
    (train.fp8_layers='all') is compiled on its own too, since a float8 linear pays only compiled
    (its casts and scales fused; eagerly torchao's ran at 0.6x bf16 on the H200). Whether it
    compiled it."""
    if not (cfg.precision == "fp8" and cfg.fp8_layers == "all" and selected_kinds(cfg.compile)):
        return False
    if cfg.compile_scope == "model" or type(model.output_layer) in PLAIN_LINEARS:
        return False  # inside the whole model's region already; or left bf16 (odd widths)
    model.output_layer.compile(**compile_options(cfg.compile_mode))
    return True


def weight_casts(
    cfg: TrainConfig, updated: UpdatedCasts | None = None
) -> Callable[[nn.Module], AbstractContextManager] | None:
    """Step 5's addition (train.fp8_weight_cache, train.bf16_weight_cache): what StepRunner
    enters around a step's micro-batches so that each weight is cast once for all of them;
    `updated`: the bf16 casts the update writes (step 6)."""
    casts = []
    if cfg.precision == "fp8" and cfg.fp8_weight_cache:
        from toolkit.fp8_weight_cache import cast_weights_once  # torchao: only with float8

        casts.append(cast_weights_once)
    if cfg.bf16_weight_cache:
        from toolkit.bf16_weight_cache import cast_weights_once as cast_bf16

        casts.append(partial(cast_bf16, updated=updated))
    if not casts:
        return None

    @contextlib.contextmanager
    def cast_once(module: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for cast in casts:
                stack.enter_context(cast(module))
            yield

    return cast_once


def warn_where_nothing_accumulates(cfg: TrainConfig, micro_batches: int) -> list[str]:
    """The keys that pay only where a step accumulates micro-batches, set for a step of one:
    logged as warnings (a recipe can still run them); returns the keys it warned about.
    train.fused_grad_accumulation is not one: on by default, it changes nothing on a step of
    one (the first micro-batch runs as autograd does)."""
    if micro_batches > 1 or not (cfg.precision == "fp8" and cfg.fp8_weight_cache):
        return []
    log.warning(
        "train.fp8_weight_cache pays where a step accumulates micro-batches; this one runs 1 "
        "(train.global_batch_size = micro_batch_size x data-parallel ranks): it costs more than "
        "it saves: there are no other micro-batches to reuse the casts in (0.955x at the 8B's "
        "shapes on an H200)"
    )
    return ["fp8_weight_cache"]


def parallelize(model: HybridLM, recipe: Recipe, env: ParallelEnv) -> ParallelModel:
    """Apply every transform of the recipe to `model`, in the order of this module's docstring."""
    cfg, par = recipe.train, recipe.parallel
    device = env.device
    loss_fn = apply_tensor_parallel(model, env, sequence_parallel=par.sequence_parallel)
    engine = apply_float8(model, cfg, device, tp=env.tp)
    if cfg.fused_grad_accumulation:  # the linears as float8 left them, before compile wraps
        fused = fuse_grad_accumulation(model, cfg.fp32_weight_grad_gemm)
        log.info("train.fused_grad_accumulation: %d layers add into their .grad", len(fused))
    if cfg.bf16_weight_cache:
        cached = sum(isinstance(m, LinearIntoGrad) for m in model.modules())
        log.info("train.bf16_weight_cache: %d linears read their weights cast once a step", cached)
    apply_ac(model, cfg.activation_checkpointing, engine)
    apply_compile(model, cfg.compile, mode=cfg.compile_mode, scope=cfg.compile_scope)
    compile_fp8_output_layer(model, cfg)
    micro_batches = cfg.global_batch_size // (cfg.micro_batch_size * env.dp)
    warn_where_nothing_accumulates(cfg, micro_batches)
    run_step = StepRunner(
        model,
        env,
        loss_fn,
        micro_batch_size=cfg.micro_batch_size,
        micro_batches=micro_batches,
        seq_length=recipe.model.seq_length,
        sequence_shards=env.tp if par.sequence_parallel else 1,
        autocast=lambda: autocast_context(
            cfg.precision,
            device,
            engine,
            cfg.fp8_recipe,
            (cfg.fp8_amax_history, cfg.fp8_amax_algo),
        ),
        logits_dtype=torch.float32 if cfg.precision == "fp32" else torch.bfloat16,
        step_context=weight_casts(cfg),
        per_token_loss=cfg.per_token_loss,
    )
    shard_over = env.group("dp") if env.dp > 1 and par.shard_optimizer else None
    optimizer = build_optimizer(run_step.module, cfg, shard_over)
    if cfg.bf16_weight_cache and isinstance(optimizer, TritonAdamW):
        updated = UpdatedCasts()
        optimizer.write_casts(updated)
        run_step.step_context = weight_casts(cfg, updated)
        log.info("train.bf16_weight_cache: the update writes the bf16 casts (TritonAdamW)")
    if cfg.row_sparse_embedding_grad:
        keep_row_sparse_embedding_grads(model, optimizer, env)
    return ParallelModel(run_step.module, loss_fn, run_step, optimizer, engine)


def keep_row_sparse_embedding_grads(
    model: nn.Module, optimizer: torch.optim.Optimizer, env: ParallelEnv
) -> int:
    """train.row_sparse_embedding_grad: have the input embedding keep a step's first gradient as
    rows where `optimizer` reads them and nothing else needs the whole table (one rank of the
    model: the DP all-reduce and the pipeline read `.grad`); else a warning. Returns the
    embeddings that do."""
    why = None
    if not getattr(optimizer, "reads_row_sparse_grads", False):
        why = f"the update is {type(optimizer).__name__}, which reads whole gradients only"
    elif env.dp > 1 or env.pp > 1:
        why = f"DP={env.dp} PP={env.pp}: their gradient exchange reads whole gradients"
    embeddings = [m for m in model.modules() if isinstance(m, EmbeddingIntoGrad)]
    if why is None and not embeddings:
        why = "no plain embedding (a tensor-parallel one is not covered)"
    shared = {id(p) for m in model.modules() if not isinstance(m, EmbeddingIntoGrad)
              for p in m.parameters(recurse=False)}  # fmt: skip
    if why is None and any(id(m.weight) in shared for m in embeddings):
        why = "the embedding's weight is shared (tied): its other use's gradient is whole"
    if why is not None:
        log.warning("train.row_sparse_embedding_grad left off: %s", why)
        return 0
    for m in embeddings:
        m.keeps_row_sparse_grad = True
    log.info("train.row_sparse_embedding_grad: the input embedding's gradient kept as rows")
    return len(embeddings)
