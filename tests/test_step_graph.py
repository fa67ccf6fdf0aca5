"""toolkit.step_graph: a whole training step (forward, backward, clip, update) captured once and
replayed. On CPUs the body runs eagerly each call, but with the optimizer captured and staged as
a replay has it (the Triton AdamW under Triton's interpreter, in a subprocess: the variable must
be set before Triton compiles anything); on a GPU the real CUDA graph. Either way against the
trainer's own step: the tiny hybrid's losses, gradient norms and parameters the same."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# Both runs from the same weights and tokens: the trainer's step (clip_and_step) against
# StepGraph (the norm a device tensor, the update's scalars and addresses staged), gradients set
# to None after each step in both, the lr moving every step so that scalars left from the
# capture would show.
RACE = """
import copy

import torch
from toolkit.build import build_model, tokenizer_from_recipe
from toolkit.config import load_recipe
from toolkit.distributed import ParallelEnv
from toolkit.parallel.parallelize import parallelize
from toolkit.parallel.runtime import clip_and_queue_step, clip_and_step
from toolkit.step_graph import StepGraph
from tests.kernel_cases import refused
from toolkit.triton_adamw import TritonAdamW


def build(device, compile):
    # Narrower on CPUs, where Triton's interpreter runs the update element by element.
    narrow = ["model.hidden_size=64", "model.ffn_hidden_size=128"] if device == "cpu" else []
    recipe = load_recipe("recipes/tiny_hybrid.toml", [
        f'train.device="{device}"', "model.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", f"train.compile={str(compile).lower()}",
        "train.grad_clip=0.5", *narrow])
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    env = ParallelEnv(0, 1, 0, torch.device(device), tp=1, pp=1, dp=1)
    parallel = parallelize(model, recipe, env)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = TritonAdamW(parallel.optimizer.param_groups, lr=1e-3, betas=(0.9, 0.95))
    return model, parallel, params, optimizer, env, recipe


def run(device, graphed, steps=6, compile=False):
    model, parallel, params, optimizer, env, recipe = build(device, compile)
    vocab = model.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (4, 33), generator=gen).to(device) for _ in range(steps)]
    tokens = torch.zeros_like(batches[0])
    clip = recipe.train.max_grad_norm

    def body():
        loss = parallel.run_step(tokens[:, :-1], tokens[:, 1:])
        norm = clip_and_queue_step(optimizer, params, clip, env)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), norm

    graph = StepGraph(body, optimizer, torch.device(device)) if graphed else None
    losses, norms = [], []
    for i, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.8**i
        tokens.copy_(batch)
        if graph is None:
            losses.append(float(parallel.run_step(tokens[:, :-1], tokens[:, 1:])))
            norms.append(clip_and_step(optimizer, params, clip, env))
            optimizer.zero_grad(set_to_none=True)
        else:
            loss, norm = graph()
            losses.append(float(loss))
            norms.append(float(norm))
    return losses, norms, [p.detach().clone() for p in params], optimizer
"""


INTERPRETED = (
    RACE
    + """
want = run("cpu", graphed=False)
got = run("cpu", graphed=True)
assert got[0] == want[0], (got[0], want[0])  # the losses
assert got[1] == want[1], (got[1], want[1])  # the gradient norms, before clipping
assert min(want[1]) > 0.5  # the clip scaled every step
assert all(torch.equal(p, q) for p, q in zip(got[2], want[2])), "parameters"
assert all(float(s["step"]) == 6 for s in got[3].state.values())

# After capture() the moments must stay where they are: a state restored under a captured step
# (new tensors) is refused, and so is a step that updates other parameters.
model, parallel, params, optimizer, env, recipe = build("cpu", False)
tokens = torch.randint(0, model.vocab_size, (4, 33))
frozen = []
def body():
    parallel.run_step(tokens[:, :-1], tokens[:, 1:])
    for p in frozen:
        p.grad = None
    norm = clip_and_queue_step(optimizer, params, 1.0, env)
    optimizer.zero_grad(set_to_none=True)
    return norm
graph = StepGraph(body, optimizer, torch.device("cpu"), warmup=1)
graph(); graph()
optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as a checkpoint's
refused(graph, "moved since capture", "a restored state")
optimizer.capture()  # captured anew over the restored state: steps go on
graph()
frozen.append(params[0])
refused(graph, "parameters of capture()", "a step over other parameters")
print("step graph agrees")
"""
)


def test_staged_steps_are_the_trainers_steps_under_the_interpreter():
    """Six steps of the tiny hybrid through StepGraph (two eager, then the optimizer captured:
    its lr and bias corrections only from stage()) against the trainer's clip_and_step with
    gradients set to None: the same losses, norms and parameters, bit for bit; a gradient
    that moves after the capture is refused."""
    interpret(INTERPRETED, "step graph agrees")


def interpret(script: str, done: str, timeout: int = 600, **env: str) -> None:
    """Run `script` under Triton's interpreter in a fresh process (the variable must be set
    before Triton compiles anything), `env` added; it prints `done` at its end. Skipped on a
    GPU, where the tests run the compiled code."""
    pytest.importorskip("triton")
    if CUDA:
        pytest.skip("on a GPU the compiled code is tested")
    in_subprocess(script, done, timeout=timeout, TRITON_INTERPRET="1", **env)


def in_subprocess(script: str, done: str, *args: str, timeout: int = 600, **env: str) -> None:
    """Run `script` with `args` in a fresh process (its patches and Triton's mode its own),
    `env` added to the environment, for at most `timeout` s; it prints `done` at its end."""
    env = os.environ | {"PYTHONPATH": f"{ROOT}"} | env
    out = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0 and done in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]


def test_an_optimizer_with_host_work_is_refused():
    from toolkit.step_graph import StepGraph

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="train.adamw_kernel"):
        StepGraph(lambda: None, opt, torch.device("cpu"))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_replayed_steps_track_the_trainers_steps_on_gpu():
    """The real CUDA graph (mamba-ssm's kernels, eager blocks): replays against eager steps,
    the same kernels on the same data, within 1e-4 (GPU kernels need not be deterministic)."""
    namespace: dict = {}
    exec(RACE, namespace)
    want = namespace["run"]("cuda", graphed=False)
    got = namespace["run"]("cuda", graphed=True)
    assert got[0] == pytest.approx(want[0], rel=1e-4)
    assert got[1] == pytest.approx(want[1], rel=1e-3)
    worst = max(
        float((p - q).abs().max() / (q.abs().max() + 1e-6)) for p, q in zip(got[2], want[2])
    )
    assert worst < 1e-3, worst


TRAINER = """
import tempfile
from pathlib import Path

import pytest
from tests.test_train import RANDOM_TEXT, make_recipe, poison_loss
from toolkit.train import train

def run(tmp, poisoned=(), **keys):
    with pytest.MonkeyPatch.context() as mp:
        poison_loss(mp, set(poisoned))
        keys = {"steps": 6, "adamw_kernel": "triton", "nan_policy": "skip"} | keys
        return train(make_recipe(Path(tmp), RANDOM_TEXT, **keys))

with tempfile.TemporaryDirectory() as tmp:
    want = run(f"{tmp}/a")
    got = run(f"{tmp}/b", step_graph=True)
    assert got.losses == want.losses, (got.losses, want.losses)
    # Stopped after step 3 (the capture's) and resumed to 6: the optimizer's restored state is
    # captured anew, and the steps are the uninterrupted run's.
    first = run(f"{tmp}/c", step_graph=True, steps=3, decay_steps=6)
    resumed = run(f"{tmp}/c", step_graph=True)
    assert sorted(resumed.losses) == [4, 5, 6], resumed.losses
    assert all(resumed.losses[s] == want.losses[s] for s in (4, 5, 6)), resumed.losses
    # Step 2 (eager, before the capture) and step 5 (staged) poisoned: both skipped, and the
    # steps after them the same as the trainer's own skips give.
    want = run(f"{tmp}/d", poisoned={2, 8})
    got = run(f"{tmp}/e", poisoned={2, 8}, step_graph=True)
    assert sorted(got.losses) == [1, 3, 4, 6] and got.skipped_steps == 2, got.losses
    assert got.losses == want.losses, (got.losses, want.losses)
print("trainer agrees")
"""


def test_the_trainers_step_graph_is_its_step_under_the_interpreter():
    """train.step_graph in the trainer (the tiny hybrid, 6 steps, the Triton AdamW under the
    interpreter): the losses of the run without it, bit for bit, also stopped after 3 steps
    and resumed; with train.nan_policy='skip' a poisoned step before the capture and one after
    it are skipped as the trainer skips them (the update left out on the device, the step
    count taken back)."""
    interpret(TRAINER, "trainer agrees")


def test_step_graph_keys_are_checked():
    from toolkit.config import RecipeError, load_recipe

    assert load_recipe("recipes/tiny_hybrid.toml", ["train.step_graph=true"]).train.step_graph
    for bad in (['train.adamw_kernel="torch"'], ["train.flat_optimizer=true"], ["parallel.tp=2"]):
        with pytest.raises(RecipeError, match="train.step_graph"):
            load_recipe("recipes/tiny_hybrid.toml", ["train.step_graph=true", *bad])
