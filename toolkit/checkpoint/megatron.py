"""The reference framework's per-rank checkpoints (DESIGN.md section 3), written from and read
into a single-process HybridLM of global tensors.

A rank's tensors are cut exactly as our tensor-parallel code cuts them (Mamba in_proj and conv1d
per component, attention qkv by whole KV groups, SwiGLU fc1 as [gate_r; up_r], the vocabulary
padded to make_vocab_size_divisible_by x TP): megatron_layout.py holds the names and the layout,
megatron_files.py the files on disk and their safe reading.
Reading needs no model: every split is recovered from the tensors' own shapes, layer numbers are
made global from how many layers each pipeline stage's files hold, and the layer kinds come from
the key names.
"""

import argparse
import dataclasses
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from toolkit.checkpoint.megatron_files import (
    ARGS_READ,
    RANK_FILE,
    check_grid,
    describe,
    find_rank_files,
    get_arg,
    latest_iteration,
    load_rank_file,
    rank_dir,
)
from toolkit.checkpoint.megatron_layout import (
    GENERATIONS,
    VOCAB_PARAMS,
    megatron_key,
    merge_pieces,
    our_name,
    rank_piece,
    tp_dim,
)
from toolkit.config import Recipe, padded_vocab_size, validate
from toolkit.layout import split_stages
from toolkit.model import HybridLM

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0

# The converters, and the file helpers that import_megatron.py and the tests take from here.
__all__ = [
    "check_grid",
    "find_rank_files",
    "get_arg",
    "latest_iteration",
    "load_into",
    "load_megatron",
    "load_rank_file",
    "save_megatron",
]


# ---- writing ----


def megatron_args(
    model: HybridLM, recipe: Recipe, tp: int, pp: int, iteration: int, generation: str = "2024"
) -> argparse.Namespace:
    """The arguments the reference's loader and converters read or compare, and ours. The
    layer pattern under its `generation`'s name: hybrid_override_pattern (2024), or
    hybrid_layer_pattern (current Megatron, which refuses the two together)."""
    cfg, train = model.cfg, recipe.train
    dtype = model.embedding.weight.dtype
    heads = cfg.num_attention_heads
    d_inner = cfg.mamba_expand * cfg.hidden_size
    return argparse.Namespace(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != heads,
        kv_channels=cfg.hidden_size // heads,
        ffn_hidden_size=cfg.ffn_size,
        seq_length=cfg.seq_length,
        max_position_embeddings=cfg.seq_length,
        vocab_size=model.vocab_size,  # ours; the reference takes it from its tokenizer
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        padded_vocab_size=padded_vocab_size(model.vocab_size, cfg.make_vocab_size_divisible_by, tp),
        tokenizer_type=None,  # byte-level: no reference tokenizer; say yours on the command line
        is_hybrid_model=True,
        hybrid_attention_ratio=cfg.att_ratio,
        hybrid_mlp_ratio=cfg.mlp_ratio,
        hybrid_override_pattern=model.layout.pattern if generation == "2024" else None,
        hybrid_layer_pattern=model.layout.pattern if generation == "current" else None,
        mamba_state_dim=cfg.mamba_state_dim,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_num_heads=d_inner // cfg.mamba_head_dim,
        mamba_expand=cfg.mamba_expand,  # ours: the reference's Mamba layer fixes expand at 2
        mamba_conv_kernel=cfg.mamba_conv_kernel,  # ours (the reference: d_conv 4)
        mamba_chunk_size=cfg.mamba_chunk_size,  # ours (the reference: 128)
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        norm_epsilon=cfg.norm_eps,
        swiglu=cfg.mlp_activation == "swiglu",
        squared_relu=cfg.mlp_activation == "relu2",
        position_embedding_type="rope" if cfg.position_embedding == "rope" else "none",
        add_position_embedding=False,
        rotary_percent=cfg.rotary_percent,
        rotary_base=int(cfg.rotary_base),
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=cfg.init_std,
        fp32_residual_connection=cfg.fp32_residual,
        seed=train.seed,
        micro_batch_size=train.micro_batch_size,
        global_batch_size=train.global_batch_size,
        train_iters=train.steps,
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.grad_clip,
        iteration=iteration,
        consumed_train_samples=iteration * train.global_batch_size,  # as the scheduler counts
        consumed_valid_samples=0,
    )


def scheduler_state(recipe: Recipe, iteration: int) -> dict[str, Any]:
    """The reference's OptimizerParamScheduler.state_dict() for this recipe; it counts samples."""
    t = recipe.train
    batch = t.global_batch_size
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[t.lr_schedule]
    return {
        "max_lr": t.lr,
        "min_lr": t.min_lr,
        "lr_warmup_steps": t.warmup_steps * batch,
        "lr_decay_steps": (t.decay_steps or t.steps) * batch,
        "lr_decay_style": style,
        "num_steps": iteration * batch,
        "start_wd": t.weight_decay,
        "end_wd": t.weight_decay,
        "wd_incr_style": "constant",
        "wd_incr_steps": t.steps * batch,
    }


def rng_state(seed: int) -> list[dict[str, Any]]:
    """RNG states in the reference's shape. With no GPU here, the CUDA state is the Philox state
    a generator seeded with `seed` starts from (seed, offset 0: the 16 bytes torch stores)."""
    cuda = torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint8)
    return [
        {
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": cuda,
            "rng_tracker_states": {},
        }
    ]


def stage_bounds(stages: Sequence[str]) -> list[range]:
    """The layer ranges of pipeline stages given as pattern pieces."""
    ends = [sum(len(s) for s in stages[: i + 1]) for i in range(len(stages))]
    return [range(end - len(stage), end) for stage, end in zip(stages, ends)]


def stage_of(name: str, stages: Sequence[range]) -> int:
    """The pipeline stage that holds our parameter `name`."""
    if name == "embedding.weight":
        return 0
    if name.startswith("final_norm.") or name == "output_layer.weight":
        return len(stages) - 1
    layer = int(name.split(".")[1])
    return next(i for i, r in enumerate(stages) if layer in r)


def save_megatron(
    model: HybridLM,
    recipe: Recipe,
    out_dir: str | Path,
    tp: int,
    pp: int,
    iteration: int,
    progress: bool = False,
    generation: str = "2024",
) -> Path:
    """Write `model` (single-process, global tensors) as the reference's checkpoint at TP x PP
    and return the iteration directory, its keys those of Megatron-core `generation` ("2024":
    the released checkpoints' Mamba `norm`; "current": fused into in_proj, megatron_layout).
    Tensors keep the model's dtype (cast the model to bf16 first for a bf16 checkpoint). There
    is no optimizer state: load with --no-load-optim."""
    if generation not in GENERATIONS:
        raise ValueError(f"unknown Megatron generation {generation!r} (one of {GENERATIONS})")
    cfg = model.cfg
    stages = model.layout.stages if len(model.layout.stages) == pp else [model.layout.pattern]
    cfg = dataclasses.replace(cfg, pattern="|".join(stages))  # else an even split, as the reference
    parallel = dataclasses.replace(recipe.parallel, tp=tp, pp=pp, dp=1)
    validate(dataclasses.replace(recipe, model=cfg, parallel=parallel))  # heads, groups, stages
    padded = padded_vocab_size(model.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    params = {}
    for name, p in model.named_parameters():
        p = p.detach()
        if name in VOCAB_PARAMS:  # the reference pads to a multiple of 128 x TP, with zeros
            p = torch.cat(
                [p[: model.vocab_size], p.new_zeros(padded - model.vocab_size, p.shape[1])]
            )
        params[name] = p
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    stages, pattern = stage_bounds(split_stages(cfg.pattern, pp)), model.layout.pattern
    out = Path(out_dir)
    common = {
        "args": megatron_args(model, recipe, tp, pp, iteration, generation),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "opt_param_scheduler": scheduler_state(recipe, iteration),
        "rng_state": rng_state(recipe.train.seed),
        "num_floating_point_operations_so_far": 0,
    }
    grid = [(t, s) for s in range(pp) for t in range(tp)]
    for tp_rank, pp_rank in _bar(grid, "write ranks", progress):
        offset = stages[pp_rank].start
        state = {
            megatron_key(name, pattern, offset, generation): _own(
                rank_piece(p, name, shapes, tp, tp_rank)
            )
            for name, p in params.items()
            if stage_of(name, stages) == pp_rank
        }
        path = rank_dir(out, iteration, tp_rank, pp_rank, pp) / RANK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(common | {"model": state}, path)
    # The reference writes the bare number; its reader strips whitespace.
    (out / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return out / f"iter_{iteration:07d}"


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or a copy when it is a view into a larger storage (torch.save would write
    the whole storage)."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


# ---- reading ----


def _bar(items: Iterable, desc: str, progress: bool) -> Iterable:
    # disable=None: a bar only on a terminal, none in logs
    return tqdm(items, desc=desc, unit="file", disable=None if progress else True)


def _stage_names(states: Sequence[Mapping[str, Any]], files: Sequence[Path], offset: int) -> dict:
    """{our name: [piece of TP rank 0, 1, ...]} of one pipeline stage (its TP ranks' states and
    files); every TP rank must hold the same keys. Transformer Engine's `_extra_state` entries
    are not weights: skipped."""
    per_rank = []
    for state, path in zip(states, files):
        names = {}
        for key, value in state.items():
            if key.endswith("_extra_state"):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: {key!r} holds {describe(value)}, not a tensor")
            name = our_name(key, offset)
            if name in names:  # e.g. a layer holding attention and MLP: not a hybrid's layer
                raise ValueError(f"{path}: {names[name][0]!r} and {key!r} are both our {name}")
            names[name] = (key, value)
        per_rank.append(names)
    first = per_rank[0]
    for rank, names in enumerate(per_rank):
        for name in sorted(set(first) ^ set(names)):
            has, lacks = (0, rank) if name in first else (rank, 0)
            key = per_rank[has][name][0]
            raise KeyError(f"{files[lacks]}: no {key!r} ({files[has].parent.name} has it)")
    return {name: [names[name][1] for names in per_rank] for name in first}


def load_megatron(
    in_dir: str | Path,
    iteration: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read the reference's checkpoint at any TP/PP into global tensors under our parameter names
    (`model.load_state_dict`-ready but for the vocabulary rows: embedding and output layer keep
    the checkpoint's padded rows; load_into fits them) and return them with the checkpoint's
    args (an argparse.Namespace, or whatever the files hold). Accepts 2024-era
    `decoder.layers.N.norm.*`, fused `*.layer_norm_weight` and local-spec `input_layernorm` /
    `pre_mlp_layernorm` pre-norms, and current Megatron's `mixer.conv1d_weight|bias`. Files are
    read by the restricted unpickler unless `trust_pickle` (load_rank_file)."""
    root = Path(in_dir)
    iteration = latest_iteration(root) if iteration is None else iteration
    it_dir = root / f"iter_{iteration:07d}"
    files = find_rank_files(it_dir)
    ckpts = {min(files): load_rank_file(files[min(files)], trust_pickle)}
    args = ckpts[min(files)].get("args")
    for name in ARGS_READ:
        try:
            get_arg(args, name)
        except ValueError as e:
            raise ValueError(f"{files[min(files)]}: {e}") from None
    tp, pp = check_grid(files, args, it_dir)  # before reading the rest: a missing rank fails fast
    for rank, path in _bar(files.items(), "read ranks", progress):
        ckpts[rank] = ckpts.get(rank) or load_rank_file(path, trust_pickle)
    pieces: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for stage in range(pp):
        states = [ckpts[(t, stage)]["model"] for t in range(tp)]
        paths = [files[(t, stage)] for t in range(tp)]
        local = sorted({int(k.split(".")[2]) for k in states[0] if k.startswith("decoder.layers.")})
        if local != list(range(len(local))):
            raise ValueError(f"{paths[0]}: layer numbers {local} are not 0..{len(local) - 1}")
        for name, stage_pieces in _stage_names(states, paths, offset).items():
            if name in pieces:
                raise ValueError(f"{paths[0]}: holds {name}, which an earlier stage holds too")
            pieces[name] = stage_pieces
        offset += len(local)
    # Global shapes first: the Mamba layout of one tensor is measured from its neighbours.
    shapes = {}
    for name, ranks in pieces.items():
        shape, dim = list(ranks[0].shape), tp_dim(name)
        if dim is not None:
            shape[dim] *= tp
        shapes[name] = shape
    state = {}
    for name, ranks in pieces.items():
        if tp_dim(name) is None and any(not torch.equal(ranks[0], r) for r in ranks[1:]):
            log.warning(
                "%s: %s differs between TP ranks (replicated); using rank 0's", it_dir, name
            )
        state[name] = merge_pieces(ranks, name, shapes)
    log.info("read %s: TP=%d PP=%d, %d layers, %d tensors", it_dir, tp, pp, offset, len(state))
    return state, args


def load_into(model: HybridLM, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy global tensors (our names) into `model`. Every parameter must be covered and every
    tensor used; the first model.vocab_size vocabulary rows are taken and the model's own
    padding rows zeroed (they take no probability and see no tokens)."""
    params = dict(model.named_parameters())
    missing, unused = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unused:
        raise KeyError(
            f"{source} does not fit the model ({model.layout.pattern}): "
            + "; ".join(
                f"{what} {names[:6]}{' ...' if len(names) > 6 else ''}"
                for what, names in (("missing", missing), ("no place for", unused))
                if names
            )
        )
    vocab = model.vocab_size
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if name in VOCAB_PARAMS:
                if value.shape[0] < vocab or value.shape[1:] != p.shape[1:]:
                    raise ValueError(
                        f"{source}: {name} has shape {tuple(value.shape)}, the model "
                        f"needs at least {vocab} rows of {p.shape[1]}"
                    )
                p.zero_()
                p[:vocab] = value[:vocab]
            elif value.shape != p.shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(p.shape)}"
                )
            else:
                p.copy_(value)
