"""The memory planner (toolkit/memory.py) against what real CPU ranks hold."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.test_parallel import setup, spawn
from toolkit.build import build_model
from toolkit.config import load_recipe, recipe_from_dict
from toolkit.memory import check_fits, plan_memory
from toolkit.parallel.parallelize import parallelize
from toolkit.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "num_layers": 4,
    "pattern": "M*-M",
    "att_ratio": 0.25,
    "mlp_ratio": 0.25,
    "hidden_size": 64,
    "seq_length": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 128,
    "mamba_state_dim": 16,
    "mamba_head_dim": 16,
    "mamba_num_groups": 2,
    "mamba_chunk_size": 16,
}


def small_recipe(**parallel):
    return recipe_from_dict(
        {
            "model": SMALL,
            "train": {"steps": 1, "micro_batch_size": 2, "global_batch_size": 2},
            "parallel": parallel,
        }
    )


def saved_in_forward(module: torch.nn.Module, loss_fn, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward and loss, each storage once."""
    seen, total = set(), [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if not isinstance(t, torch.nn.Parameter) and key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_fn(module(tokens[:, :-1]), tokens[:, 1:])
    return total[0]


def planner_worker(rank: int, world: int, port: int) -> None:
    recipe = small_recipe(tp=2, sequence_parallel=True)
    env = setup(rank, world, port, tp=2, sequence_parallel=True)
    try:
        torch.manual_seed(0)
        model = build_model(recipe, ByteTokenizer())
        parallel = parallelize(model, recipe, env)
        [plan] = plan_memory(recipe, world, target="cpu")
        params = list(parallel.module.parameters())
        assert sum(p.numel() for p in params) == plan.parameters
        tokens = torch.randint(0, 256, (2, 65))
        saved = saved_in_forward(parallel.module, parallel.loss_fn, tokens)
        # Measured on this model: 1,591,444 bytes saved, 1,590,292 planned (the embedding's saved ids
        # and masks are not in the plan); 10% is what the planner promises.
        assert abs(saved - plan.activations) <= 0.1 * saved, (saved, plan.activations)
        parallel.run_step(tokens[:, :-1], tokens[:, 1:])
        parallel.optimizer.step()
        state = sum(
            t.numel() * t.element_size()
            for s in parallel.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        assert state == plan.optimizer
        assert sum(p.grad.numel() * 4 for p in params) == plan.gradients
    finally:
        dist.destroy_process_group()


def test_plan_matches_what_tp2_sp_ranks_hold():
    spawn(planner_worker, 2)


def test_sequence_parallelism_and_checkpointing_shrink_the_plan():
    plain = plan_memory(small_recipe(tp=2), 2, target="cpu")[0]
    split = plan_memory(small_recipe(tp=2, sequence_parallel=True), 2, target="cpu")[0]
    assert split.activations < plain.activations
    assert split.weights == plain.weights
    r = small_recipe(tp=1)
    r.train.activation_checkpointing = "full"
    assert plan_memory(r, 1)[0].activations < plan_memory(small_recipe(tp=1), 1)[0].activations


def test_pipeline_stages_hold_their_micro_batches():
    r = small_recipe(pp=2)
    r.train.global_batch_size = 8
    first, last = plan_memory(r, 2)
    assert first.in_flight == 2 and last.in_flight == 1
    assert last.logits > 0 and first.logits == 0


def test_check_fits_names_the_largest_term():
    stages = plan_memory(load_recipe(ROOT / "recipes/8b_hybrid.toml"), 8)
    assert check_fits(stages, 80.0) is None
    line = check_fits(stages, 20.0)
    assert line.startswith("stage 0 needs about") and "the largest term is activations" in line


def test_config_cli_prints_the_plan():
    proc = subprocess.run(
        [sys.executable, "-m", "toolkit.config", "recipes/8b_hybrid.toml", "--world-size", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "memory plan at 8 ranks" in proc.stdout
    assert "of 80 GB per GPU: fits" in proc.stdout


def test_keeping_the_mamba_states_adds_them_to_the_plan():
    """model.mamba_recompute = false (fused_mamba.py) keeps, per Mamba layer, the conv's output
    and the states passed into each chunk (bf16) and, in fp32, dt after its softplus, dA's sums
    within each chunk and C Bt (each group's [chunk, chunk] a chunk)."""
    keep = small_recipe(tp=1)
    keep.model.mamba_recompute = False
    extra = plan_memory(keep, 1)[0].activations - plan_memory(small_recipe(tp=1), 1)[0].activations
    batch, seq, layers = 2, 64, 2  # "M*-M"
    heads, head_dim, state, chunk, groups = 128 // 16, 16, 16, 16, 2
    conv_channels, chunks = 128 + 2 * groups * state, seq // chunk
    per_layer = (
        batch * seq * conv_channels * 2
        + batch * chunks * heads * head_dim * state * 2
        + 2 * batch * heads * chunks * chunk * 4
        + batch * chunks * groups * chunk * chunk * 4
    )
    assert extra == layers * per_layer


def test_a_bf16_residual_stream_halves_what_checkpointed_blocks_keep():
    """model.fp32_residual = false under bf16: a checkpointed block keeps its input in bf16, 2
    bytes a channel fewer per block and token. (Without checkpointing eager autograd saves the
    same bytes either way: the norm keeps its input's fp32 copy.)"""
    plans = {}
    for fp32_residual in (True, False):
        r = small_recipe(tp=1)
        r.train.precision, r.train.activation_checkpointing = "bf16", "full"
        r.model.fp32_residual = fp32_residual
        plans[fp32_residual] = plan_memory(r, 1, target="cpu")[0].activations
    blocks, tokens, hidden = 4, 2 * 64, 64
    assert plans[True] - plans[False] == blocks * tokens * hidden * 2


def test_states_kept_in_the_activations_dtype_halve_in_the_plan(monkeypatch):
    """fused_mamba.LOWP_STATES (TOOLKIT_MAMBA_LOWP_STATES, on by default): the states passed
    into each chunk kept in bf16 under bf16 training, 2 bytes an entry fewer than in fp32."""
    from toolkit.model import fused_mamba

    plans = {}
    for lowp in (False, True):
        monkeypatch.setattr(fused_mamba, "LOWP_STATES", lowp)
        keep = small_recipe(tp=1)
        keep.model.mamba_recompute, keep.train.precision = False, "bf16"
        plans[lowp] = plan_memory(keep, 1)[0].activations
    batch, layers, heads, head_dim, state, chunks = 2, 2, 128 // 16, 16, 16, 64 // 16
    assert plans[False] - plans[True] == layers * batch * chunks * heads * head_dim * state * 2
