"""train.per_token_loss (Megatron's --calculate-per-token-loss): the loss as one mean over every
counted token of the global batch, where data.eod_mask_loss makes micro-batches count different
numbers of tokens. Checked against F.cross_entropy over the whole global batch at once: the
step's loss and gradients on one process (micro-batches accumulated) and over DP, PP and TP
ranks (gloo), the validation loss, and a run's first logged loss; and against the mean of the
micro-batches' means, the default, which these batches make differ from it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY_MODEL
from tests.test_parallel import setup, spawn
from tests.test_train import make_recipe
from toolkit.build import build_data, build_model, model_from_checkpoint
from toolkit.config import recipe_from_dict
from toolkit.data.indexed import IndexedDatasetWriter
from toolkit.distributed import ParallelEnv
from toolkit.evaluate import evaluation_samples
from toolkit.loss import IGNORE_INDEX
from toolkit.megatron_args import toml_value
from toolkit.parallel.parallelize import parallelize
from toolkit.parallel.runtime import average_over_dp
from toolkit.tokenizer import ByteTokenizer
from toolkit.train import train
from toolkit.validation import validation_loss

MICRO_BATCHES, SEQ = 4, 16
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; accumulation and reductions reorder the sums


def masked_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """MICRO_BATCHES sequences whose labels leave out 0, 3, 6, 9 positions: their counts differ."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (MICRO_BATCHES, SEQ + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    for k in range(MICRO_BATCHES):
        labels[k, : 3 * k] = IGNORE_INDEX
    return inputs, labels


def recipe(per_token: bool, **parallel):
    train_cfg = {"steps": 1, "micro_batch_size": 1, "global_batch_size": MICRO_BATCHES,
                 "precision": "fp32", "device": "cpu", "per_token_loss": per_token}  # fmt: skip
    table = {"model": TINY_MODEL | {"seq_length": SEQ}, "train": train_cfg, "parallel": parallel}
    return recipe_from_dict(table)


def reference(per_token: bool, **parallel) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and gradients of the whole batch in one forward on one process: over every
    counted token, or the mean of each sequence's mean over its own. `parallel`: the layout
    whose recipe builds the model (TP pads the vocabulary further: other initial weights)."""
    torch.manual_seed(0)
    model = build_model(recipe(per_token, **parallel), ByteTokenizer(), torch.device("cpu"))
    inputs, labels = masked_batch()
    logits = model(inputs)[..., : model.vocab_size].float()
    if per_token:
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    else:
        loss = torch.stack([F.cross_entropy(x, y) for x, y in zip(logits, labels)]).mean()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def test_the_references_differ():
    """These batches make the two normalisations differ: a test of one against the other's
    reference would fail."""
    assert reference(True)[0] != pytest.approx(reference(False)[0], rel=1e-3)


@pytest.mark.parametrize("per_token", [True, False], ids=["per_token", "mean_of_means"])
def test_accumulated_micro_batches_give_the_global_batch_loss(per_token):
    torch.manual_seed(0)
    r = recipe(per_token)
    model = build_model(r, ByteTokenizer(), torch.device("cpu"))
    parallel = parallelize(model, r, ParallelEnv(0, 1, 0, torch.device("cpu"), tp=1, pp=1, dp=1))
    loss = parallel.run_step(*masked_batch())
    want_loss, want_grads = reference(per_token)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], **TOL, msg=name)


def per_token_worker(rank: int, world: int, port: int, layout: dict) -> None:
    """This rank's share of the global batch through parallelize's step runner, the loss and
    gradients averaged over DP as the trainer does: the reference's loss on every rank, and
    its gradients for the parameters this rank holds whole (TP: the unsharded ones; the
    shards' gradients are tested at TP in test_parallel.py)."""
    env = setup(rank, world, port, **layout)
    try:
        torch.manual_seed(0)
        r = recipe(True, **layout)
        model = build_model(r, ByteTokenizer(), env.device)
        parallel = parallelize(model, r, env)
        inputs, labels = masked_batch()
        share = MICRO_BATCHES // env.dp
        rows = slice(env.dp_rank * share, (env.dp_rank + 1) * share)
        loss = parallel.run_step(inputs[rows], labels[rows])
        grads = [p.grad for p in parallel.module.parameters()]
        average_over_dp([loss, *grads], env)
        want_loss, want_grads = reference(True, **layout)
        assert loss.item() == pytest.approx(want_loss, rel=1e-6), (rank, loss.item(), want_loss)
        # A stage's parameters keep the whole model's names; TP: those it does not shard.
        whole = [(n, p) for n, p in parallel.module.named_parameters() if not hasattr(p, "_tp_dim")]
        assert len(whole) >= 4  # TP: the norms' weights at least
        for name, p in whole:
            torch.testing.assert_close(p.grad, want_grads[name], **TOL, msg=f"{rank} {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "layout",
    [{"dp": 2}, {"pp": 2}, pytest.param({"tp": 2}, marks=pytest.mark.long)],
    ids=["dp2", "pp2", "tp2"],
)
def test_the_global_batch_loss_over_ranks(layout):
    """DP: the count summed over ranks before the step; PP: the schedule's own scaling of the
    gradients and averaging of the losses undone; TP: the vocabulary-parallel loss weighted."""
    spawn(per_token_worker, 2, layout)


def test_validation_loss_per_token():
    torch.manual_seed(0)
    model = build_model(recipe(True), ByteTokenizer(), torch.device("cpu"))

    class Batches:  # the masked batch as validation's samples, a sequence at a time
        def batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, labels = masked_batch()
            return inputs[start : start + size], labels[start : start + size]

    def loss_fn(logits, labels):
        return F.cross_entropy(logits[..., : model.vocab_size].flatten(0, 1), labels.flatten())

    got = {
        per_token: validation_loss(
            model,
            Batches(),
            loss_fn,
            batches=MICRO_BATCHES,
            micro_batch_size=1,
            autocast=torch.no_grad,
            per_token=per_token,
        )  # fmt: skip
        for per_token in (True, False)
    }
    assert got[True] == pytest.approx(reference(True)[0], rel=1e-6)
    assert got[False] == pytest.approx(reference(False)[0], rel=1e-6)


def means_of(model, inputs: torch.Tensor, labels: torch.Tensor) -> dict[bool, float]:
    """{per_token: the loss}: one mean over the batch's counted tokens (True), the mean of its
    sequences' means (False)."""
    with torch.no_grad():
        logits = model(inputs)[..., : model.vocab_size].float()
    counted = (labels >= 0).sum(1)
    assert len(set(counted.tolist())) > 1  # the sequences count different numbers
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    means = torch.stack([F.cross_entropy(x, y) for x, y in zip(logits, labels)]).mean().item()
    assert per_token != pytest.approx(means, rel=1e-4), (per_token, means)  # 10x the checks
    return {True: per_token, False: means}


def test_a_run_logs_the_global_batch_loss(tmp_path):
    """data.eod_mask_loss with train.per_token_loss: the first logged loss is the mean over the
    first global batch's counted tokens, computed here from the same starting weights
    (checkpoint.init_from), and the validation loss, logged and from `toolkit.evaluate`, the
    mean over the validation batches' (from the weights after the step); without the key, the
    means of the micro-batches' means."""
    tokenizer = ByteTokenizer()
    with IndexedDatasetWriter(tmp_path / "docs", np.uint16) as w:
        for i in range(800):  # runs of 1-byte documents between long ones: the sequences
            text = "a" if i % 40 < 36 else f"document {i}"  # count different numbers
            w.add_document(tokenizer.encode(text) + [tokenizer.eod])
    data = {"blend": [str(tmp_path / "docs")], "split": "80,20,0", "eod_mask_loss": True}

    def run_recipe(name: str, **train_keys):
        table = make_recipe(tmp_path / name, "unused", micro_batch_size=1).to_dict()
        table["train"] |= {"steps": 1, "eval_interval": 1} | train_keys
        return recipe_from_dict(table | {"data": data})

    base_run = run_recipe("base", steps=30, eval_interval=0)  # its losses vary by sequence
    train(base_run)
    base = str(tmp_path / "base" / "ckpt")
    model, _, _ = model_from_checkpoint(base)
    batch = build_data(base_run, tokenizer)[0].batch(0, base_run.train.global_batch_size)
    want_train = means_of(model, *batch)
    model_toml = "\n".join(f"{k} = {toml_value(v)}" for k, v in base_run.to_dict()["model"].items()
                           if v is not None)  # fmt: skip
    toml = tmp_path / "eval.toml"
    toml.write_text(
        f"[model]\n{model_toml}\n[data]\n"
        + "".join(f"{k} = {toml_value(v)}\n" for k, v in data.items())
        + "[train]\nsteps = 1\nmicro_batch_size = 1\nglobal_batch_size = 4\neval_batches = 4\n"
        f'precision = "fp32"\nseed = {base_run.train.seed}\n'  # the data's order
    )
    for per_token in (True, False):
        run = run_recipe(f"per_token_{per_token}", per_token_loss=per_token)
        run.checkpoint.init_from = base
        result = train(run)
        assert result.losses[1] == pytest.approx(want_train[per_token], rel=1e-5)
        model, _, _ = model_from_checkpoint(result.checkpoint)
        valid = evaluation_samples(run, tokenizer, "valid").batch(0, run.train.eval_batches)
        want_valid = means_of(model, *valid)[per_token]
        acc = EventAccumulator(run.logging.dir)
        acc.Reload()
        assert acc.Scalars("valid/loss")[0].value == pytest.approx(want_valid, rel=1e-5)
        cli = [sys.executable, "-m", "toolkit.evaluate", "--recipe", str(toml), "--json",
               "--checkpoint", result.checkpoint, "--device", "cpu",
               "--set", f"train.per_token_loss={str(per_token).lower()}"]  # fmt: skip
        done = subprocess.run(cli, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["loss"] == pytest.approx(want_valid, rel=1e-5)
