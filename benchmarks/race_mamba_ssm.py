"""A race against the peer: our HybridLM against mamba-ssm's own language model (MambaLMHeadModel,
Mamba-2 layers), training at the same shapes, in one run on one GPU.

    source benchmarks/gpu_setup.sh
    python3 benchmarks/race_mamba_ssm.py --shape 8b-mamba2 [--hybrid] [--compile] \\
        [--steps 10] [--warmup 3] [--layers N] [--mbs B] [--seq L] [--json OUT.json] \\
        [--profile DIR]
    python3 benchmarks/race_mamba_ssm.py --shape 800m [--hybrid] [--compile] [--json OUT.json]
    python3 benchmarks/race_mamba_ssm.py --ours-only --shape tiny --steps 2   # CPU smoke test

Both sides: fp32 weights under bf16 autocast (train.precision='bf16', as our trainer runs; fp32
for --ours-only on a CPU, a smoke test only), fused AdamW with the recipe's hyper-parameters and
weight-decay groups (toolkit.optim), gradient clipping at the recipe's norm, random tokens, one
micro-batch per optimizer step; `--compile` compiles each block of both models on its own (as
train.compile does ours). Ours runs the trainer's step (parallelize's StepRunner: our blockwise
cross-entropy; then toolkit.parallel.runtime.clip_and_step) with model.kernels='mamba_ssm'
(mamba-ssm's fused SSD op, the one their Mamba2 runs). Theirs runs the step as it is commonly
written: `F.cross_entropy(model(x).logits.float(), y)`, torch's clip_grad_norm_. Ours runs
first, then theirs, each built, warmed up (compilation, Triton autotuning) and timed alone, its
peak memory counted from its own start (torch.cuda.max_memory_allocated, GiB); tokens/s from
the median step. The coordinator records results in benchmarks/RESULTS.md.

Shapes (--shape; --layers, --mbs and --seq override the preset):
- 8b-mamba2: the 8B Mamba-2 widths (recipes/8b_mamba2.toml: d_model 4096, state 128, head 64,
  8 groups, expand 2, conv 4, chunk 128, vocab 256000, seq 4096) at 8 layers and micro-batch 2;
  with --hybrid the 8B hybrid's (recipes/8b_hybrid.toml) first 8 mixers.
- 800m: recipes/800m_hybrid.toml's widths: 48 Mamba-2 layers, its micro-batch; with --hybrid its
  24 mixers (20 Mamba-2, 4 attention), each followed by an MLP.
- tiny: recipes/tiny_hybrid.toml's widths at micro-batch 2 (for --ours-only on a CPU).

--hybrid races their hybrid form (attn_layer_idx, attn_cfg, an MLP via d_intermediate) against
ours at the nearest shape both can build; the script prints each difference that prevents an
exact match, and both parameter counts (predicted from the shape and counted on the built
models). Needs CUDA and mamba_ssm (exit 2 naming what is missing) unless --ours-only.
"""

import argparse
import datetime
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trace_summary  # noqa: E402 (benchmarks/, this script's folder)
from train_throughput import (  # noqa: E402
    add_step_arguments,
    check_step_arguments,
    graphed_step,
    time_steps,
    versions,
    write_json,
)

from toolkit.build import build_model, describe_model, tokenizer_from_recipe  # noqa: E402
from toolkit.config import ModelConfig, Recipe, RecipeError, load_recipe  # noqa: E402
from toolkit.config.model import padded_vocab_size  # noqa: E402
from toolkit.distributed import ParallelEnv  # noqa: E402
from toolkit.metrics import peak_memory_gb  # noqa: E402
from toolkit.model import flops_per_token  # noqa: E402
from toolkit.optim import build_optimizer  # noqa: E402
from toolkit.parallel.parallelize import parallelize  # noqa: E402
from toolkit.parallel.runtime import clip_and_step  # noqa: E402

log = logging.getLogger("race_mamba_ssm")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Preset:
    recipe: str  # widths of the pure Mamba-2 race
    hybrid_recipe: str  # widths and layer mix of the --hybrid race
    layers: int | None  # Mamba-2 layers (None: the recipe's num_layers)
    mixers: int | None  # --hybrid: the recipe's first mixers, each with an MLP (None: all)
    micro_batch: int | None  # None: the recipe's


PRESETS = {
    "8b-mamba2": Preset("recipes/8b_mamba2.toml", "recipes/8b_hybrid.toml", 8, 8, 2),
    "800m": Preset("recipes/800m_hybrid.toml", "recipes/800m_hybrid.toml", None, None, None),
    "tiny": Preset("recipes/tiny_hybrid.toml", "recipes/tiny_hybrid.toml", None, None, 2),
}


@dataclass(frozen=True, kw_only=True)
class RaceShape:
    """One shape both models are built at: their n_layer blocks are mixers (Mamba-2, or attention
    at attn_layer_idx), each followed by an MLP of width d_intermediate when it is > 0."""

    name: str
    recipe: str
    d_model: int
    n_layer: int
    vocab_size: int
    micro_batch: int
    seq: int
    d_state: int
    headdim: int
    ngroups: int
    expand: int
    d_conv: int
    chunk_size: int
    vocab_multiple: int = 128
    norm_eps: float = 1e-5
    attn_layer_idx: tuple[int, ...] = ()
    num_heads: int = 0
    num_heads_kv: int = 0
    d_intermediate: int = 0  # SwiGLU width; 0: no MLP

    @property
    def pattern(self) -> str:
        """Ours in our block symbols: each of their blocks is a mixer block then an MLP block."""
        mlp = "-" if self.d_intermediate else ""
        return "".join(
            ("*" if i in self.attn_layer_idx else "M") + mlp for i in range(self.n_layer)
        )


def swiglu_width(m: ModelConfig) -> int:
    """Their only MLP is SwiGLU (GatedMLP, width rounded up to a multiple of 128): a recipe's
    SwiGLU width as is, a GeLU/ReLU^2 width w as the multiple of 128 nearest 2w/3 (the same
    parameters and FLOPs within 128 columns)."""
    if m.mlp_activation == "swiglu":
        return -(-m.ffn_size // 128) * 128
    return max(128, round(2 * m.ffn_size / 3 / 128) * 128)


def build_shape(
    name: str,
    *,
    hybrid: bool = False,
    layers: int | None = None,
    micro_batch: int | None = None,
    seq: int | None = None,
) -> tuple[RaceShape, Recipe]:
    """The preset's shape (with the overrides) and the recipe its widths come from."""
    preset = PRESETS[name]
    path = preset.hybrid_recipe if hybrid else preset.recipe
    recipe = load_recipe(ROOT / path)
    m = recipe.model
    shape = RaceShape(
        name=name,
        recipe=path,
        d_model=m.hidden_size,
        n_layer=layers or preset.layers or m.num_layers,
        vocab_size=m.vocab_size or tokenizer_from_recipe(recipe).vocab_size,
        micro_batch=micro_batch or preset.micro_batch or recipe.train.micro_batch_size,
        seq=seq or m.seq_length,
        d_state=m.mamba_state_dim,
        headdim=m.mamba_head_dim,
        ngroups=m.mamba_num_groups,
        expand=m.mamba_expand,
        d_conv=m.mamba_conv_kernel,
        chunk_size=m.mamba_chunk_size,
        vocab_multiple=m.make_vocab_size_divisible_by,
        norm_eps=m.norm_eps,
    )
    if not hybrid:
        return shape, recipe
    mixers = [s for s in m.layer_layout().pattern if s in "M*"]
    n = layers or preset.mixers or len(mixers)
    mixers = (mixers * -(-n // len(mixers)))[:n]  # more than the recipe has: repeat its order
    shape = replace(
        shape,
        n_layer=n,
        attn_layer_idx=tuple(i for i, s in enumerate(mixers) if s == "*"),
        num_heads=m.num_attention_heads,
        num_heads_kv=m.num_query_groups,
        d_intermediate=swiglu_width(m) if "-" in m.layer_layout().pattern else 0,
    )
    return shape, recipe


def their_config(s: RaceShape) -> dict:
    """MambaConfig's keyword arguments (mamba-ssm 2.3.2) for the shape."""
    return dict(
        d_model=s.d_model,
        d_intermediate=s.d_intermediate,
        n_layer=s.n_layer,
        vocab_size=s.vocab_size,
        ssm_cfg=dict(
            layer="Mamba2",
            d_state=s.d_state,
            d_conv=s.d_conv,
            expand=s.expand,
            headdim=s.headdim,
            ngroups=s.ngroups,
            chunk_size=s.chunk_size,
        ),
        attn_layer_idx=list(s.attn_layer_idx),
        # MHA defaults to bidirectional attention with biases; ours is causal, without biases.
        attn_cfg=dict(
            num_heads=s.num_heads,
            num_heads_kv=s.num_heads_kv,
            causal=True,
            qkv_proj_bias=False,
            out_proj_bias=False,
        )
        if s.attn_layer_idx
        else {},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=s.vocab_multiple,
        tie_embeddings=False,  # ours are untied
    )


def our_overrides(s: RaceShape, *, device: str, kernels: str, compile: bool) -> list[str]:
    """Recipe keys that build our model at the shape, for one process on `device`."""
    keys = {
        "model.num_layers": len(s.pattern),
        "model.pattern": json.dumps(s.pattern),
        "model.att_ratio": 0,
        "model.mlp_ratio": 0,
        "model.hidden_size": s.d_model,
        "model.seq_length": s.seq,
        "model.vocab_size": s.vocab_size,
        "model.make_vocab_size_divisible_by": s.vocab_multiple,
        "model.mamba_state_dim": s.d_state,
        "model.mamba_head_dim": s.headdim,
        "model.mamba_num_groups": s.ngroups,
        "model.mamba_expand": s.expand,
        "model.mamba_conv_kernel": s.d_conv,
        "model.mamba_chunk_size": s.chunk_size,
        "model.position_embedding": '"none"',  # theirs has none without flash_attn's rotary
        "model.kernels": json.dumps(kernels),
        "model.fp32_residual": "true",  # theirs: residual_in_fp32=True
        "train.device": json.dumps(device),
        # bf16 autocast over fp32 weights, as our trainer runs; fp32 on CPUs, where autocast to
        # bf16 is many times slower (the CPU run is a smoke test, not a measurement).
        "train.precision": '"fp32"' if device == "cpu" else '"bf16"',
        "train.micro_batch_size": s.micro_batch,
        "train.global_batch_size": s.micro_batch,
        "train.compile": "true" if compile else "false",
        "train.activation_checkpointing": '"none"',  # theirs recomputes nothing
        "parallel.tp": 1,
        "parallel.pp": 1,
        "parallel.dp": 1,
        "parallel.sequence_parallel": "false",
    }
    if s.attn_layer_idx:
        keys |= {"model.num_attention_heads": s.num_heads, "model.num_query_groups": s.num_heads_kv}
    if s.d_intermediate:
        keys |= {"model.mlp_activation": '"swiglu"', "model.ffn_hidden_size": s.d_intermediate}
    return [f"{k}={v}" for k, v in keys.items()]


def _mamba2_parameters(d: int, ssm: dict) -> tuple[int, int]:
    """(parameters, of which in matmuls) of one Mamba2 mixer, by mamba-ssm's constructor rules."""
    d_state, d_conv = ssm.get("d_state", 128), ssm.get("d_conv", 4)
    d_inner, ngroups = ssm.get("expand", 2) * d, ssm.get("ngroups", 1)
    heads = d_inner // ssm.get("headdim", 64)
    conv_dim = d_inner + 2 * ngroups * d_state
    matmul = d * (2 * d_inner + 2 * ngroups * d_state + heads) + d_inner * d
    return matmul + conv_dim * (d_conv + 1) + 3 * heads + d_inner, matmul


def their_parameters(cfg: dict, seq: int) -> dict[str, float]:
    """MambaLMHeadModel's parameter count and FLOPs per token (our formula: 6 x matmul
    parameters + causal attention + SSD scan) from a their_config() dict, without mamba_ssm."""
    d, ssm, attn = cfg["d_model"], cfg["ssm_cfg"], cfg["attn_cfg"]
    vocab = -(-cfg["vocab_size"] // cfg["pad_vocab_size_multiple"]) * cfg["pad_vocab_size_multiple"]
    total = vocab * d * (1 if cfg["tie_embeddings"] else 2) + d  # embedding, lm_head, norm_f
    matmul = vocab * d
    flops = 0.0
    for i in range(cfg["n_layer"]):
        total += d  # norm
        if i in cfg["attn_layer_idx"]:
            hd = attn.get("head_dim") or d // attn["num_heads"]
            h, hkv = attn["num_heads"], attn.get("num_heads_kv") or attn["num_heads"]
            qkv, out = hd * (h + 2 * hkv), hd * h
            mm = d * qkv + out * d
            total += (
                mm + qkv * attn.get("qkv_proj_bias", True) + d * attn.get("out_proj_bias", True)
            )
            flops += 12.0 * seq * d / 2
        else:
            params, mm = _mamba2_parameters(d, ssm)
            total += params
            flops += 6.0 * 3 * ssm.get("expand", 2) * d * ssm.get("d_state", 128)
        matmul += mm
        if cfg["d_intermediate"]:
            width = -(-cfg["d_intermediate"] // 128) * 128  # GatedMLP's multiple_of
            total += d + 3 * d * width  # norm2, fc1 (2 x width rows), fc2
            matmul += 3 * d * width
    return {"parameters": total, "flops_per_token": 6.0 * matmul + flops}


def our_parameters(m: ModelConfig, vocab_size: int) -> dict[str, float]:
    """HybridLM's parameter count and FLOPs per token (toolkit.model.flops_per_token's formula)
    from a model config, without building the model."""
    d, pattern = m.hidden_size, m.layer_layout().pattern
    vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by)
    norm = 2 * d if m.norm == "layernorm" else d
    total, matmul, flops = 2 * vocab * d + norm, vocab * d, 0.0
    for kind in pattern:
        total += norm
        if kind == "M":
            ssm = dict(
                d_state=m.mamba_state_dim,
                d_conv=m.mamba_conv_kernel,
                expand=m.mamba_expand,
                headdim=m.mamba_head_dim,
                ngroups=m.mamba_num_groups,
            )
            params, mm = _mamba2_parameters(d, ssm)  # the same layout, parameter for parameter
            flops += 6.0 * 3 * m.mamba_expand * d * m.mamba_state_dim
        elif kind == "*":
            hd, h = d // m.num_attention_heads, m.num_attention_heads
            mm = params = d * hd * (h + 2 * m.num_query_groups) + hd * h * d
            flops += 12.0 * m.seq_length * d / 2
        else:
            rows = 2 * m.ffn_size if m.mlp_activation == "swiglu" else m.ffn_size
            mm = params = d * rows + m.ffn_size * d
        total += params
        matmul += mm
    return {"parameters": total, "flops_per_token": 6.0 * matmul + flops}


def differences(s: RaceShape, recipe: Recipe) -> dict[str, list[str]]:
    """What was set to make the two models match ('matched'), what still differs between them
    ('differences': model structure; 'kernels': the same math run differently)."""
    m, d = recipe.model, s.d_model
    matched = [
        "embeddings: untied on both sides (theirs: tie_embeddings=False)",
        f"vocabulary: {s.vocab_size} padded to a multiple of {s.vocab_multiple} on both sides "
        "(theirs: pad_vocab_size_multiple)",
        "Mamba-2 mixers: the same parameters (in_proj rows [z, x, B, C, dt], conv with bias, "
        "A_log, D and dt_bias per head, group-wise gated RMSNorm after the gate, no biases)",
    ]
    diffs: list[str] = []
    kernels = [
        "blocks: theirs add the residual and RMS-normalise in one Triton kernel (fused_add_norm, "
        "fp32 residual stream); ours compute x + mixer(norm(x)) per block, add and norm apart "
        "(the same math; our residual stream is fp32 under autocast too)",
        "Mamba-2: both through mamba_split_conv1d_scan_combined (ours where causal-conv1d "
        "imports: ours.mamba_fused, and ours.mamba_conv 'causal_conv1d'; with 'triton' ours "
        "runs toolkit/model/fused_mamba.py, the same SSD and norm kernels with our conv); "
        "theirs runs out_proj inside it, ours as a module after it",
        "loss: theirs F.cross_entropy on an fp32 copy of the logits (as commonly written); ours "
        "toolkit/loss.py's blockwise fp32 cross-entropy, with no fp32 copy of the logits",
    ]
    padded = padded_vocab_size(s.vocab_size, s.vocab_multiple)
    if padded != s.vocab_size:
        diffs.append(
            f"loss: theirs normalise over all {padded} columns (padding included), ours over the "
            f"{s.vocab_size} real ones"
        )
    if s.norm_eps != 1e-5:
        diffs.append(f"norm eps: ours {s.norm_eps}; their Mamba2's gated norm is fixed at 1e-5")
    if not (s.attn_layer_idx or s.d_intermediate):
        return {"matched": matched, "differences": diffs, "kernels": kernels}

    recipe_pattern = m.layer_layout().pattern
    matched.append(
        f"layer order: ours follow theirs, {s.pattern} ({s.n_layer} of their blocks, "
        f"{len(s.pattern)} of ours)"
    )
    if s.attn_layer_idx:
        matched.append(
            "attention: causal and without biases on both sides (theirs: attn_cfg causal=True, "
            f"qkv_proj_bias=False, out_proj_bias=False), {s.num_heads} query heads in "
            f"{s.num_heads_kv} KV groups, head dim {d // s.num_heads}"
        )
        matched.append(
            "rotary: on neither side (hybrids have no position embedding; theirs would need "
            "flash_attn's rotary kernel)"
            if m.position_embedding == "none"
            else "rotary: the recipe rotates; neither side does here (theirs needs flash_attn)"
        )
        diffs.append(
            "attention head layout: theirs in_proj rows are [q of all heads; k; v], ours are "
            "grouped per KV group (Megatron's): a permutation of rows, the same parameters and "
            "FLOPs"
        )
        kernels.append(
            "attention: theirs repeat keys and values to every query head (repeat_interleave) "
            "before SDPA; ours give SDPA the groups (enable_gqa)"
        )
    diffs.append(
        "blocks: theirs pair a mixer and an MLP in one block with two norms (norm, norm2) and an "
        f"MLP after every mixer; ours are separate blocks, so ours run {s.pattern}; the "
        f"recipe's own pattern is {recipe_pattern} ({sum(c in 'M*' for c in recipe_pattern)} "
        f"mixers, {recipe_pattern.count('-')} MLPs)"
    )
    if s.d_intermediate:
        width, act = m.ffn_size, m.mlp_activation
        if act != "swiglu":
            diffs.append(
                f"MLP: theirs can only be SwiGLU (GatedMLP); the recipe's is {act} of width "
                f"{width} ({2 * d * width:,} parameters): both run SwiGLU of width "
                f"{s.d_intermediate} ({3 * d * s.d_intermediate:,})"
            )
        elif width != s.d_intermediate:
            diffs.append(f"MLP: width {width} rounded up to {s.d_intermediate} (GatedMLP's 128)")
        diffs.append(
            "MLP layout: their fc1 rows are [value; gate], ours [gate; value]: a permutation"
        )
    return {"matched": matched, "differences": diffs, "kernels": kernels}


def fresh_device(device: torch.device) -> float:
    """Free what the previous side left and restart the peak-memory count; memory still
    allocated (GiB), which should be ~0."""
    torch._dynamo.reset()  # first: compiled code holds its model's tensors
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def timed_steps(
    step: Callable[[], torch.Tensor],
    s: RaceShape,
    args: argparse.Namespace,
    device: torch.device,
    side: str,
) -> dict:
    """Warm-up steps (compilation, autotuning), then timed optimizer steps, each synchronised;
    with --profile one more step under torch.profiler (profiled_step)."""
    losses, warmup_times, times, gc_times, span = time_steps(
        step, args.warmup, args.steps, device, args.manual_gc
    )
    step_time = statistics.median(times)
    result = {
        "step_time_s": step_time,
        "step_times_s": times,
        "warmup_times_s": warmup_times,
        "gc_times_s": gc_times,
        "timed_span_s": span,
        "manual_gc": args.manual_gc,
        "tokens_per_s": s.micro_batch * s.seq / step_time,
        "peak_memory_gb": peak_memory_gb(device),
        "losses": losses,
    }
    if not all(math.isfinite(x) for x in losses):
        result["error"] = "non-finite loss"
    if args.profile:
        result |= profiled_step(step, device, Path(args.profile), side)
    return result


HOST_OPS = 15  # the host ops (by CPU time, children included) a profile lists


def profiled_step(
    step: Callable[[], torch.Tensor], device: torch.device, out: Path, side: str
) -> dict:
    """One more optimizer step under torch.profiler: its GPU kernels summed by family
    (benchmarks/trace_summary.py), the table written to OUT/SIDE.kernels.json for
    `trace_summary.py OUT/ours.kernels.json --vs OUT/theirs.kernels.json`. On a CPU there are
    no GPU kernels to sum: the step runs and the result says so."""
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / f"{side}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        try:
            kernels = trace_summary.load([str(trace)])
        except trace_summary.TraceError:
            return {"profile": f"no GPU kernels in the profiled step (a {device.type} run)"}
    table = out / f"{side}.kernels.json"
    table.write_text(json.dumps(kernels.table()))
    fams = sorted(kernels.families().items(), key=lambda kv: -kv[1])
    # The host's side: where a step that the GPU waits on spends the CPU's time.
    host = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:HOST_OPS]
    return {
        "profile": str(table),
        "profile_busy_ms": kernels.busy_us / 1e3,
        "profile_families_ms": {k: v / 1e3 for k, v in fams},
        "profile_host_ms": {e.key: e.cpu_time_total / 1e3 for e in host},
    }


def random_tokens(s: RaceShape, device: torch.device) -> torch.Tensor:
    return torch.randint(0, s.vocab_size, (s.micro_batch, s.seq + 1), device=device)


def run_ours(s: RaceShape, recipe: Recipe, args: argparse.Namespace, device: torch.device) -> dict:
    """Our model through the trainer's code path: parallelize (compile, fused AdamW), the
    StepRunner (autocast, loss, backward), clip_and_step (the clip and the update)."""
    baseline = fresh_device(device)
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer_from_recipe(recipe), device)
    log.info("ours: %s", describe_model(model))
    env = ParallelEnv(0, 1, 0, device, tp=1, pp=1, dp=1)
    parallel = parallelize(model, recipe, env)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = recipe.train.max_grad_norm

    def step() -> torch.Tensor:
        tokens = random_tokens(s, device)
        loss = parallel.run_step(tokens[:, :-1], tokens[:, 1:])
        clip_and_step(parallel.optimizer, params, clip, env)
        parallel.optimizer.zero_grad(set_to_none=True)
        return loss

    if args.step_graph:  # the whole step as one CUDA graph (toolkit.step_graph)
        step = graphed_step(parallel, params, clip, env, [], s.seq, s.vocab_size)

    model.train()
    mamba = [b.mixer for b in model.layers if b.kind == "M"]
    return timed_steps(step, s, args, device, "ours") | {
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model, s.seq),
        "kernels": recipe.model.kernels,
        "optimizer_class": type(parallel.optimizer).__name__,
        "step_graph": args.step_graph,
        "mamba_fused": bool(mamba and mamba[0].fused and device.type == "cuda"),
        "mamba_conv": mamba[0].conv_backend if mamba and mamba[0].fused else None,
        "memory_before_gb": baseline,
    }


def run_theirs(s: RaceShape, recipe: Recipe, args: argparse.Namespace, device: torch.device):
    """mamba-ssm's MambaLMHeadModel, trained as it is commonly written: torch's fused AdamW
    (through toolkit.optim.build_optimizer: the same groups and hyperparameters) and torch's
    clip_grad_norm_ at the same norm."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from toolkit.activation_checkpoint import apply_compile

    baseline = fresh_device(device)
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**their_config(s)), device=device)
    if args.compile:
        for block in model.backbone.layers:  # our block kinds, so apply_compile takes them
            block.kind = "*" if block.layer_idx in s.attn_layer_idx else "M"
        apply_compile(model.backbone, True)  # each block on its own, as ours
    # torch's fused AdamW, as commonly written, whatever ours uses (train.adamw_kernel).
    optimizer = build_optimizer(
        model, replace(recipe.train, adamw_kernel="torch", flat_optimizer=False)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    clip = recipe.train.max_grad_norm

    def step() -> torch.Tensor:
        tokens = random_tokens(s, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    return timed_steps(step, s, args, device, "theirs") | {
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer_fused": bool(optimizer.defaults.get("fused")),
        "memory_before_gb": baseline,
    }


def run_side(name: str, run: Callable[[], dict]) -> dict:
    """One side's result, or its error (the other side still runs)."""
    try:
        return run()
    except torch.OutOfMemoryError as e:
        print(f"error: {name}: out of memory: {str(e)[:300]}", file=sys.stderr)
        return {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - a failing side is reported, the race goes on
        log.exception("%s failed", name)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {name}: {type(e).__name__}: {first}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {first}"}


def missing_requirements(*, ours_only: bool, cuda: bool, mamba_ssm_error: str | None) -> str | None:
    """One line naming what this machine lacks for the race, or None."""
    if ours_only:
        return None
    missing = [] if cuda else ["a CUDA GPU (none found)"]
    if mamba_ssm_error:
        missing.append(f"mamba_ssm ({mamba_ssm_error})")
    if not missing:
        return None
    return (
        f"benchmarks/race_mamba_ssm.py needs {' and '.join(missing)}: on the GPU host "
        "`source benchmarks/gpu_setup.sh` first, or pass --ours-only to run our side alone"
    )


def mamba_ssm_import_error() -> str | None:
    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, a missing extension, no GPU for Triton
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def race(args: argparse.Namespace) -> dict:
    shape, source = build_shape(
        args.shape, hybrid=args.hybrid, layers=args.layers, micro_batch=args.mbs, seq=args.seq
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # mamba-ssm's kernels, as theirs; the reference where they cannot run (--ours-only).
    usable = device.type == "cuda" and mamba_ssm_import_error() is None
    kernels = "mamba_ssm" if usable else "reference"
    overrides = our_overrides(shape, device=str(device), kernels=kernels, compile=args.compile)
    overrides += args.set  # ours only: theirs is built from the shape
    recipe = load_recipe(ROOT / shape.recipe, overrides)
    predicted = {"ours": our_parameters(recipe.model, shape.vocab_size)}
    if not args.ours_only:
        predicted["theirs"] = their_parameters(their_config(shape), shape.seq)
    result = {
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "shape": asdict(shape),
        "hybrid": args.hybrid,
        "compile": args.compile,
        "precision": {"bf16": "bf16 autocast, fp32 weights", "fp32": "fp32"}[
            recipe.train.precision
        ],
        "optimizer": {
            "ours": f"AdamW, train.adamw_kernel={recipe.train.adamw_kernel!r} ('auto': the "
            "Triton kernel on CUDA), clip through toolkit.parallel.runtime.clip_and_step",
            "theirs": "torch's fused AdamW on CUDA, torch's clip_grad_norm_",
        },
        "set": args.set,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "pattern": shape.pattern,
        "recipe_layers": source.model.num_layers,
        "their_config": None if args.ours_only else their_config(shape),
        "predicted": predicted,
        "notes": differences(shape, source),
    }
    print_header(result)
    result["ours"] = run_side("ours", lambda: run_ours(shape, recipe, args, device))
    if not args.ours_only:
        result["theirs"] = run_side("theirs", lambda: run_theirs(shape, recipe, args, device))
        ours, theirs = result["ours"], result["theirs"]
        if "error" not in ours and "error" not in theirs:
            result["ratio"] = {
                "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                "peak_memory": ours["peak_memory_gb"] / theirs["peak_memory_gb"],
            }
    return result


def print_header(r: dict) -> None:
    s, p = r["shape"], r["predicted"]
    form = "hybrid" if r["hybrid"] else "Mamba-2 only"
    print(
        f"race {s['name']} ({form}, widths of {s['recipe']}): {s['n_layer']} of their blocks, "
        f"d_model {s['d_model']}, vocab {s['vocab_size']}, micro-batch {s['micro_batch']} x seq "
        f"{s['seq']}, {r['precision']}, {'compiled' if r['compile'] else 'eager'} (the recipe "
        f"has {r['recipe_layers']} layers)"
    )
    print(f"ours: {r['pattern']}" + "".join(f" --set {kv}" for kv in r["set"]))
    for side, how in r["optimizer"].items():
        print(f"optimizer, {side}: {how}")
    counts = ", ".join(f"{k} {v['parameters']:,}" for k, v in p.items())
    flops = ", ".join(f"{k} {v['flops_per_token'] / 1e9:.3f}" for k, v in p.items())
    print(f"parameters (predicted from the shape): {counts}; GFLOPs per token: {flops}")
    for key, label in (("matched", "set to match"), ("differences", "difference"),
                       ("kernels", "kernel")):  # fmt: skip
        for line in r["notes"][key]:
            print(f"{label}: {line}")


def print_table(r: dict) -> None:
    sides = [k for k in ("ours", "theirs") if k in r]
    for side in sides:
        if "error" in r[side]:
            print(f"{side}: error: {r[side]['error']}")
    if not all("error" not in r[k] for k in sides):
        return
    predicted = r["predicted"]
    for side in sides:  # the shape match rests on these predictions
        if r[side]["parameters"] != predicted[side]["parameters"]:
            built, want = r[side]["parameters"], predicted[side]["parameters"]
            print(f"warning: {side}: {built:,} parameters built, {want:,} predicted")
    rows = [
        ("parameters (built)", "{:,}", lambda x: x["parameters"]),
        ("tokens/s", "{:,.0f}", lambda x: x["tokens_per_s"]),
        ("step ms", "{:.1f}", lambda x: x["step_time_s"] * 1e3),
        ("model TFLOP/s", "{:.1f}", lambda x: x["tokens_per_s"] * x["fpt"] / 1e12),
        ("peak memory GiB", "{:.2f}", lambda x: x["peak_memory_gb"]),
    ]
    names = {"ours": "ours", "theirs": "mamba-ssm"}
    print(
        f"{'':20}"
        + "".join(f"{names[k]:>16}" for k in sides)
        + ("  ours/theirs" * (len(sides) > 1))
    )
    for label, fmt, get in rows:
        values = [get(r[k] | {"fpt": predicted[k]["flops_per_token"]}) for k in sides]
        line = f"{label:20}" + "".join(f"{fmt.format(v):>16}" for v in values)
        if len(values) == 2 and label != "parameters (built)":
            line += f"  {values[0] / values[1]:11.3f}"
        print(line)


def print_profiles(r: dict) -> None:
    """Where each side's profiled step went, side by side (trace_summary.compare), or why not."""
    sides = [k for k in ("ours", "theirs") if k in r and "profile" in r[k]]
    tables = [r[k]["profile"] for k in sides if r[k]["profile"].endswith(".kernels.json")]
    if len(tables) == 2:
        ours, theirs = trace_summary.load(tables[:1]), trace_summary.load(tables[1:])
        print(f"\nthe profiled step, ours against mamba-ssm's ({', '.join(tables)}):")
        trace_summary.compare(ours, theirs, ("ours", "mamba-ssm"), 15, None)
    elif len(tables) == 1:
        print(f"\nthe profiled step, {sides[0]}:")
        trace_summary.summarise(trace_summary.load(tables), 15, None)
    for k in sides:
        if not r[k]["profile"].endswith(".kernels.json"):
            print(f"{k}: profile: {r[k]['profile']}")
        if r[k].get("profile_host_ms"):
            print(f"{k}: host ms (CPU time, children included) by op:")
            for op, ms in r[k]["profile_host_ms"].items():
                print(f"  {ms:10.2f}  {op[:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/race_mamba_ssm.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", choices=sorted(PRESETS), default="8b-mamba2", help="preset")
    parser.add_argument("--hybrid", action="store_true", help="their hybrid form against ours")
    parser.add_argument("--compile", action="store_true", help="torch.compile both, per block")
    add_step_arguments(parser)
    parser.add_argument("--step-graph", action="store_true",
                        help="our side's whole step (forward to update) as one CUDA graph "
                        "(toolkit.step_graph; theirs as commonly written, eager)")  # fmt: skip
    parser.add_argument("--layers", type=int, help="their blocks (Mamba-2 layers, or mixers)")
    parser.add_argument("--mbs", type=int, help="micro-batch size (sequences per step)")
    parser.add_argument("--seq", type=int, help="sequence length")
    parser.add_argument("--ours-only", action="store_true", help="our side alone (CPU too)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='a recipe key for our side (repeatable), e.g. train.adamw_kernel="triton"',
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed steps, one more step of each side under torch.profiler: its GPU "
        "kernels by family side by side, the kernel tables in DIR (trace_summary.py reads them)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_step_arguments(parser, args)
    for flag in ("layers", "mbs", "seq"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    missing = missing_requirements(
        ours_only=args.ours_only,
        cuda=torch.cuda.is_available(),
        mamba_ssm_error=None if args.ours_only else mamba_ssm_import_error(),
    )
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        result = race(args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.json, result)
    print_table(result)
    print_profiles(result)
    return 1 if any("error" in result[k] for k in ("ours", "theirs") if k in result) else 0


if __name__ == "__main__":
    sys.exit(main())
