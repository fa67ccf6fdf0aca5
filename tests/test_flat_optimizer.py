"""train.flat_optimizer (toolkit/flat_adamw.py): the same training as torch's AdamW, bit for bit
on the CPU; checkpoints that either optimizer restores; the compiled update within fp32 rounding;
the clip coefficient folded into its update (clip_and_step) as clipping in place would, in one
process and over DP (ZeRO) and PP process groups. Its training runs under ZeRO and a pipeline are
in tests/test_parallel.py."""

import math

import pytest
import torch
import torch.distributed as dist

from tests.conftest import tiny_model_config
from tests.test_checkpoint_sharded import VOCAB, full_model, save_single, view
from toolkit.checkpoint import placement, restore
from toolkit.config import RecipeError, TrainConfig
from toolkit.distributed import ParallelEnv
from toolkit.flat_adamw import FlatAdamW, adamw_update_, check_flat_params
from toolkit.model import HybridLM
from toolkit.optim import build_optimizer
from toolkit.parallel.runtime import clip_and_step, clip_grad_norm

ENV = ParallelEnv(0, 1, 0, torch.device("cpu"), tp=1, pp=1, dp=1)
MAX_NORM = 0.25  # below these gradients' norms at every step (0.41 and up): clipping is active


def batches(n: int, micro_batches: int = 2) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randint(0, VOCAB, (2, 9), generator=g) for _ in range(micro_batches)]] * n


def train(
    model: HybridLM,
    optimizer,
    steps: list[list[torch.Tensor]],
    first: int = 0,
    to_none=True,
    fold: bool = False,
) -> list[float]:
    """The trainer's step: accumulated micro-batches, clipping by the global norm, a schedule.
    `fold`: the trainer's clip_and_step (a flat optimizer scales inside its update), else
    clipping in place, then the step. Returns the gradient norms (before clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i, micro in enumerate(steps, start=first):
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (i + 1)
        for tokens in micro:
            model(tokens[:, :-1])[..., :VOCAB].logsumexp(-1).mean().backward()  # real columns
        norms.append(clip_and_step(optimizer, params, MAX_NORM, ENV, fold=fold))
        optimizer.zero_grad(set_to_none=to_none)
    return norms


def build(flat: bool, seed: int = 0) -> tuple[HybridLM, object]:
    model = full_model(seed=seed, kernels="reference")
    cfg = TrainConfig(steps=4, flat_optimizer=flat, weight_decay=0.1)
    return model, build_optimizer(model, cfg)


def assert_same(model, optimizer, other, other_optimizer) -> None:
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        rows = VOCAB if name in placement.VOCAB_PARAMS else None  # padding rows are not stored
        assert torch.equal(p[:rows], q[:rows]), name
        mine, theirs = optimizer.state[p], other_optimizer.state[q]
        assert set(mine) == set(theirs) == {"step", "exp_avg", "exp_avg_sq"}, name
        assert float(mine["step"]) == float(theirs["step"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[key][:rows], theirs[key][:rows]), (name, key)


@pytest.mark.parametrize("to_none", [True, False])
def test_flat_adamw_trains_bit_for_bit_as_torch_adamw(to_none):
    model, optimizer = build(flat=False)
    flat_model, flat_optimizer = build(flat=True)
    assert isinstance(flat_optimizer, FlatAdamW)
    assert [g["weight_decay"] for g in flat_optimizer.param_groups] == [0.1, 0.0]
    steps = batches(4)
    train(model, optimizer, steps)
    train(flat_model, flat_optimizer, steps, to_none=to_none)
    assert_same(model, optimizer, flat_model, flat_optimizer)
    buffers = [g.grad for g in flat_optimizer._flat]
    for p in flat_model.parameters():
        if to_none:  # backward hands over new gradients, as without the buffers
            assert p.grad is None
        else:  # backward added into the buffer in place: the gradients are still views of it
            assert any(p.grad.untyped_storage().data_ptr() == b.data_ptr() for b in buffers)
            assert not p.grad.any()


@pytest.mark.parametrize("to_none", [True, False])
def test_the_clip_folded_into_the_flat_update_trains_as_clipping_in_place(to_none):
    # The trainer's path with the flat optimizer (the coefficient applied inside the update)
    # against clipping in place then stepping, flat and torch's: bit for bit, same norms.
    model, optimizer = build(flat=False)
    flat_model, flat_optimizer = build(flat=True)
    steps = batches(4)
    norms = train(model, optimizer, steps)
    folded = train(flat_model, flat_optimizer, steps, to_none=to_none, fold=True)
    assert min(norms) > MAX_NORM  # the clip is active at every step: the coefficient matters
    assert folded == norms  # the logged norm: before clipping, as in place
    assert_same(model, optimizer, flat_model, flat_optimizer)


def gradients_and_optimizers(scale: float) -> tuple[list[list[torch.Tensor]], list[object]]:
    """Three flat optimizers over copies of one model, each parameter's .grad set to the same
    gradient times `scale`."""
    g = torch.Generator().manual_seed(3)
    grads = None
    params, optimizers = [], []
    for _ in range(3):
        model, optimizer = build(flat=True)
        ps = list(model.parameters())
        grads = grads or [scale * torch.randn(p.shape, generator=g) for p in ps]
        for p, grad in zip(ps, grads):
            p.grad = grad.clone()
        params.append(ps)
        optimizers.append(optimizer)
    return params, optimizers


def test_a_large_gradient_is_clipped_inside_the_update_and_left_unscaled():
    # Norm ~1e3 against max_norm 1e-3: the coefficient ~1e-6 brings the gradients below Adam's
    # eps, so the update too (not only the moments) differs if it is not applied.
    (folded, in_place, unclipped), optimizers = gradients_and_optimizers(scale=10.0)
    raw = [p.grad.clone() for p in folded]
    norm = clip_and_step(optimizers[0], folded, 1e-3, ENV)
    assert norm == clip_grad_norm(in_place, 1e-3, ENV) > 1e2
    optimizers[1].step()
    optimizers[2].step()
    for p, q, r, grad in zip(folded, in_place, unclipped, raw):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizers[0].state[p][key], optimizers[1].state[q][key])
        # Read, not written: the flat buffer still holds the gradient as backward left it.
        assert torch.equal(p.grad, grad) and not torch.equal(q.grad, grad)


def test_no_clip_and_a_nan_norm_leave_the_gradients_unscaled_as_in_place():
    # max_norm inf (train.grad_clip = 0) and a NaN in one gradient: clipping in place does not
    # scale (its coefficient is not < 1); folded, the others must not turn NaN either.
    for max_norm, poison in ((math.inf, False), (0.5, True)):
        (folded, in_place, _), optimizers = gradients_and_optimizers(scale=1.0)
        if poison:
            for p in (folded[0], in_place[0]):
                p.grad[0] = float("nan")
        norm = clip_and_step(optimizers[0], folded, max_norm, ENV)
        want = clip_grad_norm(in_place, max_norm, ENV)
        assert norm == want or (math.isnan(norm) and math.isnan(want))
        optimizers[1].step()
        for i, (p, q) in enumerate(zip(folded, in_place)):
            torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
            assert p.isnan().any() == (poison and i == 0)


def test_a_gradient_set_from_outside_is_taken_into_the_buffer():
    model, optimizer = build(flat=False)
    flat_model, flat_optimizer = build(flat=True)
    for m, o in ((model, optimizer), (flat_model, flat_optimizer)):
        for i, p in enumerate(m.parameters()):
            p.grad = None if i == 0 else torch.full_like(p, 0.01 * i)  # not views of the buffer
        if o is optimizer:
            next(m.parameters()).grad = torch.zeros_like(next(m.parameters()))
        o.step()
    assert_same(model, optimizer, flat_model, flat_optimizer)


def test_checkpoints_restore_into_either_optimizer(tmp_path):
    steps = batches(4)
    reference, reference_optimizer = build(flat=False)
    train(reference, reference_optimizer, steps)

    for saved_flat, restored_flat in ((True, False), (False, True), (True, True)):
        root = tmp_path / f"{saved_flat}_{restored_flat}"
        model, optimizer = build(flat=saved_flat)
        train(model, optimizer, steps[:2], fold=True)
        save_single(root, model, optimizer, step=2)
        resumed, resumed_optimizer = build(flat=restored_flat, seed=5)
        resumed_optimizer.state.clear()  # as resume_training does before a restore
        restore(root, resumed, resumed_optimizer, view(resumed))
        train(resumed, resumed_optimizer, steps[2:], first=2, fold=True)
        assert_same(reference, reference_optimizer, resumed, resumed_optimizer)


def test_a_cleared_state_starts_over():
    model, optimizer = build(flat=True)
    train(model, optimizer, batches(1))
    assert len(optimizer.state) == len(list(model.parameters()))
    optimizer.state.clear()
    assert len(optimizer.state) == 0 and optimizer.state.get(next(model.parameters())) is None
    fresh, fresh_optimizer = build(flat=True)
    with torch.no_grad():
        for p, q in zip(model.parameters(), fresh.parameters()):
            q.copy_(p)
    train(model, optimizer, batches(1))
    train(fresh, fresh_optimizer, batches(1))
    assert_same(fresh, fresh_optimizer, model, optimizer)


@pytest.mark.parametrize("grad_scale", [None, 0.3], ids=["no clip", "clip folded in"])
def test_the_compiled_update_matches_the_eager_ops(grad_scale):
    # One graph (fullgraph: no break), the scalars as a tensor: the GPU path, compiled here for
    # the CPU. Inductor may contract multiply-adds: equal within fp32 rounding, not bit for bit.
    compiled = torch.compile(adamw_update_, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    n = 4099
    eager = [torch.randn(n, generator=g), torch.randn(n, generator=g)]
    eager += [0.01 * torch.randn(n, generator=g), 1e-4 * torch.rand(n, generator=g)]
    other = [t.clone() for t in eager]
    scale = None if grad_scale is None else torch.tensor(grad_scale)
    for step in (1, 2, 3):
        scalars = torch.tensor([1 - 1e-3 * 0.1, 1e-3 / (1 - 0.9**step), (1 - 0.95**step) ** 0.5])
        adamw_update_(*eager, scalars, 0.9, 0.95, 1e-8, scale)
        compiled(*other, scalars, 0.9, 0.95, 1e-8, scale)
    for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq"), eager, other):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_parameters_a_flat_fp32_buffer_cannot_hold_are_refused():
    model = HybridLM(tiny_model_config(), vocab_size=50).to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="train.flat_optimizer"):
        check_flat_params(list(model.parameters()))
    with pytest.raises(NotImplementedError, match="train.flat_optimizer"):
        build_optimizer(model, TrainConfig(steps=1, flat_optimizer=True))


def test_the_recipe_key_takes_booleans_only():
    from toolkit.config import load_recipe

    with pytest.raises(RecipeError, match="flat_optimizer"):
        load_recipe("recipes/tiny_hybrid.toml", ['train.flat_optimizer="yes"'])
    assert load_recipe(
        "recipes/tiny_hybrid.toml", ["train.flat_optimizer=true"]
    ).train.flat_optimizer


@pytest.mark.long
def test_the_optimizer_benchmark_runs_both_and_they_agree(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "opt.json"
    command = [sys.executable, "benchmarks/optimizer_step.py", "recipes/tiny_hybrid.toml"]
    command += ["--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]
    command += ["--set", "train.grad_clip=0.01"]  # below the random gradients' norm
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"torch", "triton", "flat", "flat_views", "flat_clip_in_place"}
    assert result["grad_norm"] > result["grad_clip"] == 0.01
    rates = result["gb_per_s_at_32_bytes"]  # 32 bytes a parameter over each variant's time
    assert rates["torch"] == pytest.approx(32 * result["parameters"] / result["ms"]["torch"] / 1e6)
    assert set(rates) == set(result["ms"]) and "GB/s at the 32 bytes" in proc.stdout
    # The CPU runs the same ops: bit for bit, whichever way the gradients come in and whether
    # the clip is folded into the update or not ('triton' is torch's on CPUs).
    want = {"triton": 0.0, "flat": 0.0, "flat_views": 0.0, "flat_clip_in_place": 0.0}
    assert result["params_rel_l2_after"] == want
    assert "gradients in + clip + AdamW" in proc.stdout
    # A subset, one variant on the device at a time, the first the others' reference.
    command = command[:-2] + ["--variants", "flat,torch", "--steps", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["ms"]) == ["flat", "torch"] and result["reference"] == "flat"
    assert result["params_rel_l2_after"] == {"torch": 0.0}
    bad = subprocess.run(command[:-4] + ["--variants", "flat,adam"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "--variants: 'flat,adam'" in bad.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_gpu_update_tracks_torchs_fused_adamw():
    # On CUDA the update is one compiled kernel against torch's fused one: fp32 rounding apart.
    # Clipped as the trainer does: in place for torch's, folded into the kernel for the flat one
    # (its norm fetched through pinned memory while the update runs).
    models, norms = [], []
    for flat in (False, True):
        model = full_model(kernels="reference").cuda()
        cfg = TrainConfig(steps=4, flat_optimizer=flat, weight_decay=0.1)
        optimizer = build_optimizer(model, cfg)
        assert isinstance(optimizer, FlatAdamW) == flat
        steps = [[t.cuda() for t in micro] for micro in batches(4)]
        norms.append(train(model, optimizer, steps, fold=True))
        models.append(model)
    assert norms[1] == pytest.approx(norms[0], rel=1e-4) and min(norms[0]) > MAX_NORM
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def clip_fold_worker(rank: int, world: int, port: int, layout: dict) -> None:
    """Two steps of torch's AdamW and of the flat one clipped in place, and of the flat one
    with the coefficient folded in (the trainer's clip_and_step), on this rank's batches: the
    gradients averaged over DP (ZeRO: each rank updates its share), the norm reduced over PP
    (each stage holds different parameters: here a whole model of its own)."""
    from tests.test_parallel import setup
    from toolkit.parallel.runtime import average_over_dp

    env = setup(rank, world, port, **layout)
    max_norm = 0.1  # below these norms (0.19 and up averaged over DP): clipping is active
    try:
        shard_over = env.group("dp") if env.dp > 1 else None
        runs = []
        for flat, fold in ((False, False), (True, False), (True, True)):
            model = full_model(seed=env.pp_rank, kernels="reference")
            cfg = TrainConfig(steps=2, flat_optimizer=flat, weight_decay=0.1)
            optimizer = build_optimizer(model, cfg, shard_over)
            assert getattr(optimizer, "folds_grad_scale", False) == flat
            params = list(model.parameters())
            norms = []
            for step in range(2):
                g = torch.Generator().manual_seed(10 * step + rank)  # each rank its own batch
                tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
                model(tokens[:, :-1])[..., :VOCAB].logsumexp(-1).mean().backward()
                average_over_dp([p.grad for p in params], env)
                norms.append(clip_and_step(optimizer, params, max_norm, env, fold=fold))
                optimizer.zero_grad(set_to_none=True)
            runs.append((params, optimizer, norms))
        (reference, reference_optimizer, norms), *others = runs
        assert min(norms) > max_norm, norms  # the coefficient matters
        every = [None] * world
        dist.all_gather_object(every, norms)
        assert all(n == norms for n in every)  # one global norm on every rank
        for params, optimizer, other_norms in others:
            assert other_norms == norms
            for i, (p, q) in enumerate(zip(reference, params)):
                assert torch.equal(p, q), (rank, i)
                if shard_over is None or optimizer.owns(q):
                    mine, theirs = reference_optimizer.state[p], optimizer.state[q]
                    for key in ("exp_avg", "exp_avg_sq"):
                        assert torch.equal(mine[key], theirs[key]), (rank, i, key)
    finally:
        dist.destroy_process_group()


@pytest.mark.long  # two processes, three optimizers each: 15-40 s on a busy 2-core machine
@pytest.mark.parametrize("layout", [{"dp": 2}, {"pp": 2}], ids=["zero_dp2", "pp2"])
def test_the_folded_clip_matches_clipping_in_place_over_process_groups(layout):
    from tests.test_parallel import spawn

    spawn(clip_fold_worker, 2, layout)
