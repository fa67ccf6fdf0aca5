"""The training loop (single process today; parallelism wraps the model, the loss and the data slice
from outside, without changing this loop).

    python -m toolkit.train RECIPE.toml [--set train.steps=100 ...]

Each optimizer step consumes `global_batch_size` samples as micro-batches of `micro_batch_size`,
with gradients accumulated. The run resumes from the latest checkpoint in `checkpoint.dir` (or,
if that one is damaged, from the newest intact one: `checkpoint.on_corrupt`); a resumed run
continues bit-for-bit where the uninterrupted one would have been. SIGTERM / SIGUSR2 (Slurm's
pre-timeout signal) save a checkpoint at the next step boundary and stop.
"""

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from toolkit.build import (
    build_data,
    build_model,
    checkpoint_metadata,
    describe_model,
    resolve_device,
    tokenizer_from_recipe,
)
from toolkit.checkpoint import (
    CheckpointError,
    CheckpointSaver,
    Comm,
    RankView,
)
from toolkit.checkpoint.resume import resume_training, run_layout
from toolkit.config import (
    Recipe,
    RecipeError,
    TrainConfig,
    add_recipe_arguments,
    load_recipe,
    validate,
)
from toolkit.data.sampler import rank_samples
from toolkit.distributed import ParallelEnv, init_distributed
from toolkit.metrics import Metrics, StepStats
from toolkit.model import HybridLM, flops_per_token
from toolkit.optim import learning_rate
from toolkit.parallel.parallelize import parallelize
from toolkit.parallel.runtime import average_over_dp, clip_grad_norm
from toolkit.precision import PrecisionError, autocast_context
from toolkit.profiling import StepProfiler, add_nvtx_ranges
from toolkit.stopping import (
    NanPolicy,
    StopRequest,
    TrainingError,
    requeue_after_usr2,
    stop_requested,
)
from toolkit.tokenizer import Tokenizer
from toolkit.validation import validation_loss

log = logging.getLogger("toolkit.train")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> loss
    skipped_steps: int = 0
    checkpoint: str | None = None
    stopped_by_signal: bool = False
    finished: bool = False  # every one of train.steps is done (a signal may stop it before)
    sample: str | None = None


def train(recipe: Recipe, stop: StopRequest | None = None) -> TrainResult:
    cfg, result = recipe.train, TrainResult()
    stop = stop or StopRequest()
    env = init_distributed(recipe.parallel, resolve_device(cfg.device).type)
    validate(recipe, env.world_size)  # batch sizes against the DP degree this job really has
    device, main_rank = env.device, env.rank == 0
    if not main_rank:
        log.setLevel(logging.WARNING)
    # The same seed everywhere: every rank builds the same full model, then keeps its shard.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    tokenizer = tokenizer_from_recipe(recipe)
    sampler, valid = build_data(recipe, tokenizer)
    model = build_model(recipe, tokenizer, device)
    log.info("%s", describe_model(model))
    params = sum(p.numel() for p in model.parameters())
    tokens_per_step = cfg.global_batch_size * recipe.model.seq_length
    step_flops = flops_per_token(model, recipe.model.seq_length) * tokens_per_step  # whole model
    parallel = parallelize(model, recipe, env)  # fp8, TP/SP, AC, compile, PP, ZeRO: in order
    module = parallel.module  # the whole model, or this rank's pipeline stage
    run_step, loss_fn, optimizer = parallel.run_step, parallel.loss_fn, parallel.optimizer
    engine = parallel.fp8_engine
    # Each DP rank takes its own slice of every global batch.
    dp_rank, dp_size = env.dp_rank, env.dp
    sp = "+SP" if run_step.sequence_shards > 1 else ""
    log.info(
        "layout: TP=%d%s PP=%d DP=%d on %d ranks (%s)",
        env.tp,
        sp,
        env.pp,
        env.dp,
        env.world_size,
        device,
    )
    log.info("data: %s", sampler.describe())
    if valid is not None:
        log.info("validation data: %s", valid.describe())

    ckpt_dir = recipe.checkpoint.dir
    view = RankView(model.cfg, model.vocab_size, env.tp, env.tp_rank, env.dp_rank, env.rank)
    layout = run_layout(env)
    # Checkpoint coordination gets its own gloo group: an asynchronous save talks from a
    # background thread while training uses the other groups.
    comm = Comm(torch.distributed.new_group(backend="gloo") if env.world_size > 1 else None)
    try:
        start_step, consumed = resume_training(recipe, module, optimizer, view, comm, env)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    saver = CheckpointSaver(
        ckpt_dir, comm, recipe.checkpoint.keep_last, asynchronous=recipe.checkpoint.async_save
    )

    def save(step: int, blocking: bool) -> None:
        meta = checkpoint_metadata(recipe, model, step, consumed, layout)
        start = time.perf_counter()
        path = saver.save(step, module, optimizer, view, meta, blocking=blocking)
        seconds = time.perf_counter() - start
        if path is not None:
            result.checkpoint = str(path)
            log.info("saved checkpoint %s in %.1f s", path, seconds)
        else:
            log.info("checkpoint of step %d: training resumed after %.1f s", step, seconds)

    metrics = Metrics(recipe, model, device, rank=env.rank, world_size=env.world_size,
                      start_step=start_step, params=params, step_flops=step_flops)  # fmt: skip
    trainable = [p for p in module.parameters() if p.requires_grad]
    nan_policy = NanPolicy(cfg, ckpt_dir)
    step = start_step
    if cfg.profile.nvtx and device.type == "cuda":
        add_nvtx_ranges(module)
    elif cfg.profile.nvtx:
        log.warning("train.profile.nvtx needs CUDA: no NVTX ranges on %s", device)
    profile_dir = Path(recipe.logging.dir) / "profile"
    profiler = StepProfiler(cfg.profile, profile_dir, env.rank, device, next_step=step + 1)
    module.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = rank_samples(consumed, cfg.global_batch_size, dp_rank, dp_size)
        batch = sampler.batch(mine.start, len(mine))
        loss_sum = run_step(*(t.to(device) for t in batch))
        average_over_dp([loss_sum, *(p.grad for p in trainable if p.grad is not None)], env)
        loss_value = loss_sum.item()
        consumed += cfg.global_batch_size
        step += 1

        if not nan_policy.accept(step, loss_value):  # or TrainingError (train.nan_policy)
            optimizer.zero_grad(set_to_none=True)
            continue
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(trainable, clip, env)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = StepStats(loss_value, lr, grad_norm, time.perf_counter() - t0)
        profiler.after_step(step)
        result.losses[step] = loss_value
        metrics.train_step(step, stats, consumed)

        if (
            valid is not None
            and cfg.eval_interval
            and (step % cfg.eval_interval == 0 or step == cfg.steps)
        ):
            valid_loss = validation_loss(
                module,
                valid,
                loss_fn,
                batches=cfg.eval_batches,
                micro_batch_size=cfg.micro_batch_size,
                autocast=lambda: autocast_context(cfg.precision, device, engine, cfg.fp8_recipe),
                env=env,
                hidden_size=recipe.model.hidden_size,
                sequence_shards=run_step.sequence_shards,
            )
            metrics.validation(step, valid_loss)
        interval = recipe.checkpoint.interval
        stopping = stop_requested(stop, env)
        due = (interval and step % interval == 0) or step == cfg.steps or stopping
        if due and recipe.checkpoint.enabled:
            save(step, blocking=stopping or step == cfg.steps)
        if stopping:
            log.warning("stop signal received: stopping after step %d", step)
            result.stopped_by_signal = True
            break
    result.finished = step >= cfg.steps
    result.skipped_steps = nan_policy.skipped
    profiler.stop()  # if the run ended inside the traced steps
    metrics.close()
    last = saver.wait()  # a background save still in flight
    if last is not None:
        result.checkpoint = str(last)
    if result.losses:
        steps = sorted(result.losses)
        log.info(
            "loss: step %d %.4f -> step %d %.4f",
            steps[0],
            result.losses[steps[0]],
            steps[-1],
            result.losses[steps[-1]],
        )
    if result.stopped_by_signal and main_rank:
        requeue_after_usr2(stop, recipe.slurm)
    if cfg.sample_prompt and not result.stopped_by_signal and main_rank:
        final = (result.checkpoint or ckpt_dir) if recipe.checkpoint.enabled else None
        result.sample = closing_sample(model, tokenizer, cfg, env, final)
        if result.sample is not None:
            log.info(
                "sample (temperature 0.7, top-k 20) from %r:\n%s", cfg.sample_prompt, result.sample
            )
    return result


def closing_sample(
    model: HybridLM,
    tokenizer: Tokenizer,
    cfg: TrainConfig,
    env: ParallelEnv,
    checkpoint: str | None,
) -> str | None:
    """The continuation of train.sample_prompt shown after training. Under TP or PP this rank
    trained only its part of `model` (the rest is as initialised), so the whole model is read back
    from the final checkpoint, as toolkit.inference.generate does; without one, no sample."""
    if env.tp == 1 and env.pp == 1:
        return sample_text(model, tokenizer, cfg.sample_prompt, seed=cfg.seed)
    if checkpoint is None:
        log.info(
            "no sample of train.sample_prompt: at TP=%d PP=%d it is generated from the final "
            "checkpoint, and checkpoint.enabled is false",
            env.tp,
            env.pp,
        )
        return None
    from toolkit.build import model_from_checkpoint

    full, _, _ = model_from_checkpoint(checkpoint, env.device)
    return sample_text(full, tokenizer, cfg.sample_prompt, seed=cfg.seed)


def sample_text(
    model: HybridLM, tokenizer: Tokenizer, prompt: str, seed: int, max_new_tokens: int = 200
) -> str:
    """A short sampled continuation (greedy decoding of a tiny model loops on whitespace)."""
    from toolkit.inference.generate import generate

    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    # Compiled blocks (train.compile) would recompile for every decode shape: run them eagerly.
    with torch.compiler.set_stance("force_eager"):
        out = generate(
            model, ids, max_new_tokens, temperature=0.7, top_k=20, seed=seed, eod_id=tokenizer.eod
        )
    return tokenizer.decode(out[0].tolist())


def check_output_dirs(recipe: Recipe, recipe_path: str) -> None:
    """RecipeError if checkpoint.dir or logging.dir lies under a file: found now, not when the
    first checkpoint is saved."""
    for key, value in (
        ("checkpoint.dir", recipe.checkpoint.dir),
        ("logging.dir", recipe.logging.dir),
    ):
        path = Path(value).absolute()
        while not path.exists():
            path = path.parent
        if not path.is_dir():
            raise RecipeError(f"{recipe_path}: {key}: {value!r} is under the file {path}")


# The exit status of `launchers/submit.py --local` when a signal stopped the run before its last
# step (its checkpoint saved): a finished run and a cut-short one must not look alike there. Not
# the default of `python -m toolkit.train`: under Slurm a stop is a preemption or a timeout that
# the requeued job resumes, and the job should not end as failed.
STOPPED = 3


def run(recipe_path: str, overrides: list[str], stopped_status: int = 0) -> int:
    """Load, validate and train; exit status 2 for a bad recipe, 1 for a failed run,
    `stopped_status` for a run that a signal stopped before train.steps."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        recipe = load_recipe(recipe_path, overrides)
        check_output_dirs(recipe, recipe_path)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = StopRequest()
    stop.install()
    try:
        result = train(recipe, stop)
    except RecipeError as e:  # found as the run starts: the data, the tokenizer, the world size
        log.error("%s: %s", recipe_path, e)
        return 2
    except (TrainingError, NotImplementedError, PrecisionError) as e:
        log.error("%s", e)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0 if result.finished else stopped_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolkit.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--stopped-status",
        type=int,
        default=0,
        metavar="N",
        help="exit status when a signal (SIGTERM, SIGUSR2) stopped the run before train.steps, "
        f"its checkpoint saved (default 0, as Slurm's requeues expect; submit.py --local: {STOPPED})",
    )
    args = parser.parse_args(argv)
    return run(args.recipe, args.set, args.stopped_status)


if __name__ == "__main__":
    sys.exit(main())
