"""The training loop, run by every rank (one process per GPU or CPU rank, started by `srun`,
torchrun or launchers/submit.py --local); parallelism wraps the model, the loss and the data
slice from outside (toolkit.parallel.parallelize), without changing this loop.

    python -m toolkit.train RECIPE.toml [--set train.steps=100 ...]

Each optimizer step consumes `global_batch_size` samples as micro-batches of `micro_batch_size`,
with gradients accumulated. The run resumes from the latest checkpoint in `checkpoint.dir` (or,
if that one is damaged, from the newest intact one: `checkpoint.on_corrupt`); a resumed run
continues bit-for-bit where the uninterrupted one would have been. SIGTERM / SIGUSR2 (Slurm's
pre-timeout signal) save a checkpoint at the next step boundary and stop.
"""

import argparse
import logging
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
from toolkit.checkpoint import CheckpointError, CheckpointSaver, Comm, RankView
from toolkit.checkpoint.resume import resume_training, run_layout
from toolkit.config import (
    Recipe,
    RecipeError,
    TrainConfig,
    add_recipe_arguments,
    check_layout,
    load_recipe,
)
from toolkit.data.sampler import rank_samples
from toolkit.distributed import ParallelEnv, init_distributed
from toolkit.metrics import Metrics, StepStats
from toolkit.model import HybridLM, flops_per_token
from toolkit.optim import learning_rate
from toolkit.parallel.parallelize import parallelize
from toolkit.parallel.runtime import average_over_dp, clip_and_step
from toolkit.precision import PrecisionError
from toolkit.profiling import StepProfiler, add_nvtx_ranges
from toolkit.step_graph import StepGraph, training_body
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
    """What a run did on this rank."""

    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> loss
    skipped_steps: int = 0
    checkpoint: str | None = None
    stopped_by_signal: bool = False
    finished: bool = False  # every one of train.steps is done (a signal may stop it before)
    sample: str | None = None


def train(
    recipe: Recipe, stop: StopRequest | None = None, *, force_warm_up: bool = False
) -> TrainResult:
    """Train `recipe` on this rank, from its last checkpoint if there is one, until train.steps
    or a stop signal in `stop` (then checkpointed at that step boundary). Collective.
    `force_warm_up`: warm the closing sample's decode path on the CPU too (Trainer.warm_decode).

    The phases, in order: set-up (`Trainer.__init__`, the decode path warmed for the closing
    sample), resume (toolkit.checkpoint.resume), the
    steps (`Trainer.train_step`; a non-finite loss: toolkit.stopping.NanPolicy), each followed
    when due by metrics (toolkit.metrics), validation (toolkit.validation), a checkpoint and the
    stop vote (toolkit.stopping); then `Trainer.finish`: requeue after USR2, the closing sample.
    """
    cfg, stop = recipe.train, stop or StopRequest()
    trainer = Trainer(recipe, force_warm_up=force_warm_up)
    trainer.resume()
    result, metrics = trainer.result, trainer.start_metrics()
    profiler = trainer.start_profiler()
    trainer.module.train()
    while trainer.step < cfg.steps:
        stats = trainer.train_step()
        if stats is None:  # a non-finite loss, skipped (train.nan_policy)
            continue
        step = trainer.step
        profiler.after_step(step)
        result.losses[step] = stats.loss
        metrics.train_step(step, stats, trainer.consumed)
        if trainer.validation_due():
            metrics.validation(step, trainer.validation_loss())
            trainer.step_ended = None  # validation is not the next step's time
        stopping = stop_requested(stop, trainer.env)
        if recipe.checkpoint.enabled and (stopping or trainer.checkpoint_due()):
            trainer.save(blocking=stopping or step == cfg.steps)
            trainer.step_ended = None  # nor is a save
        if stopping:
            log.warning("stop signal received: stopping after step %d", step)
            result.stopped_by_signal = True
            break
    result.finished = trainer.step >= cfg.steps
    profiler.stop()  # if the run ended inside the traced steps
    metrics.close()
    trainer.finish(stop)
    return result


class Trainer:
    """One rank's training run, phase by phase (`train` calls them in order). Holds what the
    phases share: the recipe, the parallel environment, the data, the model and its parallel
    form, the optimizer, the step and the samples consumed so far."""

    def __init__(self, recipe: Recipe, *, force_warm_up: bool = False) -> None:
        """Set-up: join the job, then build the tokenizer, the data and the model, warm the
        closing sample's decode path (`warm_decode`), and apply the parallel transforms
        (toolkit.parallel.parallelize, in its order)."""
        self.recipe, cfg = recipe, recipe.train
        self.env = env = init_distributed(recipe.parallel, resolve_device(cfg.device).type)
        # The sections were checked as the recipe loaded; the layout against the ranks it got.
        check_layout(recipe, env.world_size)
        if env.rank != 0:
            log.setLevel(logging.WARNING)
        # The same seed everywhere: every rank builds the same full model, then keeps its shard.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.tokenizer = tokenizer_from_recipe(recipe)
        self.sampler, self.valid = build_data(recipe, self.tokenizer)
        self.model = model = build_model(recipe, self.tokenizer, env.device)
        log.info("%s", describe_model(model))
        self.decode_warm_s = self.warm_decode(force_warm_up)
        self.params = sum(p.numel() for p in model.parameters())  # the whole model's, unsharded
        tokens_per_step = cfg.global_batch_size * recipe.model.seq_length
        self.step_flops = flops_per_token(model, recipe.model.seq_length) * tokens_per_step
        self.parallel = parallelize(model, recipe, env)
        self.module = self.parallel.module  # the whole model, or this rank's pipeline stage
        self.optimizer = self.parallel.optimizer
        sp = "+SP" if self.parallel.run_step.sequence_shards > 1 else ""
        log.info("layout: TP=%d%s PP=%d DP=%d on %d ranks (%s)",
                 env.tp, sp, env.pp, env.dp, env.world_size, env.device)  # fmt: skip
        log.info("data: %s", self.sampler.describe())
        if self.valid is not None:
            log.info("validation data: %s", self.valid.describe())
        self.view = RankView(
            model.cfg, model.vocab_size, env.tp, env.tp_rank, env.dp_rank, env.rank
        )
        # Checkpoint coordination gets its own gloo group: an asynchronous save talks from a
        # background thread while training uses the other groups.
        self.comm = Comm(
            torch.distributed.new_group(backend="gloo", timeout=env.timeout)
            if env.world_size > 1
            else None
        )
        ckpt = recipe.checkpoint
        self.saver = CheckpointSaver(
            ckpt.dir, self.comm, ckpt.keep_last, asynchronous=ckpt.async_save
        )
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.step = self.consumed = 0
        self.step_ended: float | None = None  # perf_counter at the last step's end
        self.nan_policy = NanPolicy(cfg, recipe.checkpoint.dir)
        self.result = TrainResult()
        self.step_graph = self.build_step_graph() if cfg.step_graph else None

    def samples_at_end(self) -> bool:
        """Whether this rank prints the closing sample (unless a signal stops the run)."""
        env, cfg = self.env, self.recipe.train
        whole = (env.tp == 1 and env.pp == 1) or self.recipe.checkpoint.enabled  # closing_sample
        return bool(cfg.sample_prompt) and env.rank == 0 and whole

    def warm_decode(self, force: bool = False) -> float | None:
        """Run the closing sample's decode path once now (toolkit.inference.generate.warm_up;
        GPUs only unless `force`), on the rank that samples; the seconds it took, or None.

        Training warms the prefill's kernels, not the decode step's (Mamba state update, conv
        update, the sampler's top-k, CUDA graph capture): left cold, the sample's first call paid
        seconds (4.9 s for the tiny model's 200 tokens on an H200, 0.19 s warm). At start-up, not
        just before the sample: a decode path that fails stops the run before it trains, not
        after. On the model as built, before parallelize shards or converts it; under TP or PP
        the sample is generated from a whole model read back from the checkpoint, which has
        these shapes and runs these kernels."""
        if not self.samples_at_end():
            return None
        from toolkit.inference.generate import warm_up

        prompt = torch.tensor([self.tokenizer.encode(self.recipe.train.sample_prompt)])
        seconds = warm_up(self.model, prompt, SAMPLE_TOKENS, temperature=SAMPLE_TEMPERATURE,
                          top_k=SAMPLE_TOP_K, eod_id=self.tokenizer.eod, force=force)  # fmt: skip
        if seconds is not None:
            log.info("decode path warmed in %.1f s (for the closing sample)", seconds)
        return seconds

    def resume(self) -> None:
        """Continue from the newest intact checkpoint in checkpoint.dir, if there is one."""
        try:
            self.step, self.consumed = resume_training(
                self.recipe, self.module, self.optimizer, self.view, self.comm, self.env
            )
        except CheckpointError as e:
            raise TrainingError(str(e)) from None

    def start_metrics(self) -> Metrics:
        """TensorBoard and the progress bar, from the step resumed at."""
        env = self.env
        return Metrics(
            self.recipe,
            self.model,
            env.device,
            rank=env.rank,
            world_size=env.world_size,
            start_step=self.step,
            params=self.params,
            step_flops=self.step_flops,
        )

    def start_profiler(self) -> StepProfiler:
        """NVTX ranges and torch.profiler traces of the steps train.profile names."""
        cfg, device = self.recipe.train.profile, self.env.device
        if cfg.nvtx and device.type == "cuda":
            add_nvtx_ranges(self.module)
        elif cfg.nvtx:
            log.warning("train.profile.nvtx needs CUDA: no NVTX ranges on %s", device)
        out = Path(self.recipe.logging.dir) / "profile"
        return StepProfiler(cfg, out, self.env.rank, device, next_step=self.step + 1)

    def build_step_graph(self) -> StepGraph:
        """train.step_graph: the step's work on the device alone (forward and backward, the
        clip's norm, the update, skipped there for a non-finite loss, the gradients set to
        None) for toolkit.step_graph, reading the batch from buffers train_step refills."""
        env, cfg = self.env, self.recipe.train
        if env.dp > 1:
            raise RecipeError(f"train.step_graph captures one GPU's whole step; DP={env.dp}")
        if self.parallel.fp8_engine == "transformer_engine":
            raise RecipeError("train.step_graph: Transformer Engine's float8 linears keep host "
                              "state between steps; use train.fp8_engine='torchao'")  # fmt: skip
        shape = (cfg.global_batch_size, self.recipe.model.seq_length)
        self.graph_batch = [torch.zeros(shape, dtype=torch.long, device=env.device) for _ in "xy"]
        body = training_body(self.parallel, self.trainable, cfg.max_grad_norm, env,
                             *self.graph_batch)  # fmt: skip
        try:
            return StepGraph(body, self.optimizer, env.device)
        except ValueError as e:
            raise RecipeError(f"train.step_graph: {e}") from e

    def train_step(self) -> StepStats | None:
        """One optimizer step on this DP rank's slice of the next global batch: forward and
        backward (micro-batches or the pipeline schedule), the mean over DP, clipping and the
        update. None for a step skipped for its non-finite loss."""
        cfg, env, optimizer = self.recipe.train, self.env, self.optimizer
        # From the previous step's end: the update queued there runs on the GPU while the host
        # logs between steps, and the next loss fetch waits for it. Timing train_step alone
        # left that overlap out (the 8B's shapes logged 19k tokens/s for 15.8k real).
        started = self.step_ended or time.perf_counter()
        lr = learning_rate(self.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = rank_samples(self.consumed, cfg.global_batch_size, env.dp_rank, env.dp)
        batch = self.sampler.batch(mine.start, len(mine))
        if self.step_graph is not None:
            return self.graphed_step(batch, lr, started)
        loss_sum = self.parallel.run_step(*(t.to(env.device) for t in batch))
        grads = [p.grad for p in self.trainable if p.grad is not None]
        average_over_dp([loss_sum, *grads], env)
        loss = loss_sum.item()
        self.consumed += cfg.global_batch_size
        self.step += 1
        if not self.nan_policy.accept(self.step, loss):
            optimizer.zero_grad(set_to_none=True)
            self.step_ended = None
            return None
        grad_norm = clip_and_step(optimizer, self.trainable, cfg.max_grad_norm, env)
        optimizer.zero_grad(set_to_none=True)
        self.step_ended = time.perf_counter()
        return StepStats(loss, lr, grad_norm, self.step_ended - started)

    def graphed_step(self, batch: tuple, lr: float, started: float) -> StepStats | None:
        """train_step through the step graph: the batch into its buffers, one replay (or, for
        the first steps, the eager body), then the loss; the update already skipped on the
        device for a non-finite one, so a skipped step only takes its count back."""
        for buffer, part in zip(self.graph_batch, batch):
            buffer.copy_(part, non_blocking=True)
        loss_t, norm_t = self.step_graph()
        loss = loss_t.item()
        self.consumed += self.recipe.train.global_batch_size
        self.step += 1
        if not self.nan_policy.accept(self.step, loss):
            self.optimizer.unstage()
            self.step_ended = None
            return None
        self.step_ended = time.perf_counter()
        return StepStats(loss, lr, float(norm_t), self.step_ended - started)

    def validation_due(self) -> bool:
        """Every train.eval_interval steps and at the last, when there is validation data."""
        cfg = self.recipe.train
        if self.valid is None or not cfg.eval_interval:
            return False
        return self.step % cfg.eval_interval == 0 or self.step == cfg.steps

    def checkpoint_due(self) -> bool:
        """Every checkpoint.interval steps (0: none between) and at the last."""
        interval = self.recipe.checkpoint.interval
        return bool(interval and self.step % interval == 0) or self.step == self.recipe.train.steps

    def validation_loss(self) -> float:
        """The loss on the first train.eval_batches held-out micro-batches. Collective."""
        cfg = self.recipe.train
        return validation_loss(
            self.module,
            self.valid,
            self.parallel.loss_fn,
            batches=cfg.eval_batches,
            micro_batch_size=cfg.micro_batch_size,
            autocast=self.parallel.run_step.autocast,  # the training step's, float8 and all
            env=self.env,
            hidden_size=self.recipe.model.hidden_size,
            sequence_shards=self.parallel.run_step.sequence_shards,
            per_token=cfg.per_token_loss,
        )

    def save(self, blocking: bool) -> None:
        """Checkpoint this step (in the background with checkpoint.async_save, unless
        `blocking`). Collective."""
        meta = checkpoint_metadata(
            self.recipe, self.model, self.step, self.consumed, run_layout(self.env)
        )
        started = time.perf_counter()
        path = self.saver.save(
            self.step, self.module, self.optimizer, self.view, meta, blocking=blocking
        )
        seconds = time.perf_counter() - started
        if path is not None:
            self.result.checkpoint = str(path)
            log.info("saved checkpoint %s in %.1f s", path, seconds)
        else:
            log.info("checkpoint of step %d: training resumed after %.1f s", self.step, seconds)

    def finish(self, stop: StopRequest) -> None:
        """After the last step: wait for a background save, sum up, requeue the Slurm job after
        USR2 (rank 0), and sample train.sample_prompt from the trained model."""
        cfg, result, main_rank = self.recipe.train, self.result, self.env.rank == 0
        last = self.saver.wait()  # a background save still in flight
        if last is not None:
            result.checkpoint = str(last)
        result.skipped_steps = self.nan_policy.skipped
        if result.losses:
            first, end = min(result.losses), max(result.losses)
            log.info("loss: step %d %.4f -> step %d %.4f",
                     first, result.losses[first], end, result.losses[end])  # fmt: skip
        if result.stopped_by_signal and main_rank:
            requeue_after_usr2(stop, self.recipe.slurm)
        if cfg.sample_prompt and not result.stopped_by_signal and main_rank:
            ckpt = self.recipe.checkpoint
            final = (result.checkpoint or ckpt.dir) if ckpt.enabled else None
            result.sample = closing_sample(self.model, self.tokenizer, cfg, self.env, final)
            if result.sample is not None:
                log.info("sample (temperature %g, top-k %d) from %r:\n%s", SAMPLE_TEMPERATURE,
                         SAMPLE_TOP_K, cfg.sample_prompt, result.sample)  # fmt: skip


# The closing sample's settings (greedy decoding of a tiny model loops on whitespace).
SAMPLE_TEMPERATURE, SAMPLE_TOP_K, SAMPLE_TOKENS = 0.7, 20, 200


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
    model: HybridLM,
    tokenizer: Tokenizer,
    prompt: str,
    seed: int,
    max_new_tokens: int = SAMPLE_TOKENS,
) -> str:
    """A short sampled continuation (SAMPLE_TEMPERATURE, SAMPLE_TOP_K)."""
    from toolkit.inference.generate import generate

    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    # Compiled blocks (train.compile) would recompile for every decode shape: run them eagerly.
    with torch.compiler.set_stance("force_eager"):
        out = generate(
            model,
            ids,
            max_new_tokens,
            temperature=SAMPLE_TEMPERATURE,
            top_k=SAMPLE_TOP_K,
            seed=seed,
            eod_id=tokenizer.eod,
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
