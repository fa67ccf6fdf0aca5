"""The reference framework's per-rank checkpoints (DESIGN.md section 3): write them from a model,
read them back at any TP/PP into global tensors.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt

Each rank's tensors are exactly what our own tensor-parallel code cuts (toolkit/parallel/tp.py:
Mamba in_proj and conv1d per component, attention qkv by whole KV groups, SwiGLU fc1 as
[gate_r; up_r], vocabulary rows padded to a multiple of make_vocab_size_divisible_by x TP), so
writing is "cut with apply_tp, rename", and reading is "put each rank's rows back where apply_tp
took them from". Layer numbers restart on every pipeline stage.
"""

import argparse
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from toolkit.config import ModelConfig, Recipe, padded_vocab_size
from toolkit.model import HybridLM
from toolkit.parallel.pp import stage_ranges
from toolkit.parallel.tp import apply_tp

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
# Where a block's pre-norm goes in checkpoints with fused norms, by block kind.
FUSED_NORM = {"M": "mixer.in_proj", "*": "self_attention.linear_qkv", "-": "mlp.linear_fc1"}
MIXER_PREFIX = {"M": "mixer", "*": "self_attention", "-": "mlp"}


def megatron_key(name: str, kind_of: dict[int, str], offset: int) -> str:
    """Our parameter name -> the reference's key, with layer numbers local to a stage."""
    if name == "embedding.weight":
        return "embedding.word_embeddings.weight"
    if name == "output_layer.weight":
        return "output_layer.weight"
    if name.startswith("final_norm."):
        return "decoder." + name
    match = re.fullmatch(r"layers\.(\d+)\.(norm|mixer)\.(.+)", name)
    if not match:
        raise ValueError(f"no Megatron key for parameter {name!r}")
    layer, part, rest = int(match[1]), match[2], match[3]
    prefix = f"decoder.layers.{layer - offset}"
    if part == "norm":
        return f"{prefix}.norm.{rest}"
    return f"{prefix}.{MIXER_PREFIX[kind_of[layer]]}.{rest}"


def megatron_args(model: HybridLM, recipe: Recipe, tp: int, pp: int) -> argparse.Namespace:
    """The model arguments the reference framework checks when it loads a checkpoint."""
    cfg = model.cfg
    padded = padded_vocab_size(model.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    return argparse.Namespace(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        group_query_attention=cfg.num_query_groups != cfg.num_attention_heads,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_size,
        seq_length=cfg.seq_length,
        max_position_embeddings=cfg.seq_length,
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        hybrid_attention_ratio=cfg.att_ratio,
        hybrid_mlp_ratio=cfg.mlp_ratio,
        hybrid_override_pattern=model.layout.pattern,
        is_hybrid_model=True,
        mamba_state_dim=cfg.mamba_state_dim,
        mamba_head_dim=cfg.mamba_head_dim,
        mamba_num_groups=cfg.mamba_num_groups,
        mamba_chunk_size=cfg.mamba_chunk_size,  # ours; the reference's Mamba uses 128
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        norm_epsilon=cfg.norm_eps,
        swiglu=cfg.mlp_activation == "swiglu",
        squared_relu=cfg.mlp_activation == "relu2",
        position_embedding_type="rope" if cfg.position_embedding == "rope" else "none",
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        untie_embeddings_and_output_weights=True,
        add_bias_linear=False,
        params_dtype=torch.float32,
        init_method_std=cfg.init_std,
        vocab_size=model.vocab_size,
        recipe_name=getattr(recipe, "name", ""),
    )


def rank_dir(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return root / f"iter_{iteration:07d}" / name


def save_megatron(
    model: HybridLM, recipe: Recipe, out_dir: str | Path, tp: int, pp: int, iteration: int
) -> Path:
    """Write `model` (single-process, global tensors) as a Megatron checkpoint at TP x PP; returns
    the iteration directory. The files hold no optimizer state: load them with --no-load-optim."""
    out = Path(out_dir)
    cfg = model.cfg
    kind_of = dict(enumerate(model.layout.pattern))
    stages = stage_ranges(model, pp)
    args = megatron_args(model, recipe, tp, pp)
    for tp_rank in range(tp):
        with torch.device("meta"):
            shard = HybridLM(cfg, vocab_size=model.vocab_size, tp=tp)
        shard = _copy_weights(model, shard)
        if tp > 1:
            apply_tp(shard, group=None, tp=tp, rank=tp_rank)
        params = dict(shard.named_parameters())
        for pp_rank, layers in enumerate(stages):
            state = {}
            for name, p in params.items():
                layer = re.match(r"layers\.(\d+)\.", name)
                if layer and int(layer[1]) not in layers:
                    continue
                if name == "embedding.weight" and pp_rank != 0:
                    continue
                if (name.startswith("final_norm") or name == "output_layer.weight") and (
                    pp_rank != pp - 1
                ):
                    continue
                state[megatron_key(name, kind_of, layers.start)] = p.detach().clone()
            path = rank_dir(out, iteration, tp_rank, pp_rank, pp) / "model_optim_rng.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "args": args,
                    "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": iteration,
                    "model": state,
                    "rng_state": [_rng_state()],
                },
                path,
            )
    (out / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return out / f"iter_{iteration:07d}"


def _copy_weights(model: HybridLM, target: HybridLM) -> HybridLM:
    """`target` (built on meta, possibly padded differently) with `model`'s weights; padding rows
    (they take no probability and see no tokens) are zero."""
    target = target.to_empty(device="cpu")
    with torch.no_grad():
        for (name, p), q in zip(target.named_parameters(), model.parameters()):
            if name in ("embedding.weight", "output_layer.weight"):
                p.zero_()
                p[: model.vocab_size] = q[: model.vocab_size]
            else:
                p.copy_(q)
    return target


def _rng_state() -> dict[str, Any]:
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),  # no GPU here: a placeholder of the right type
        "rng_tracker_states": {},
    }


# ---- reading ----


def latest_iteration(root: Path) -> int:
    marker = root / "latest_checkpointed_iteration.txt"
    if not marker.is_file():
        raise FileNotFoundError(
            f"{root}: no latest_checkpointed_iteration.txt (not a Megatron dir)"
        )
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)


def load_rank_file(path: Path) -> dict[str, Any]:
    """torch.load with weights_only (argparse.Namespace allowed); the reference pickles other
    objects too, so fall back to a full unpickle, but only for this file the user named."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            why = f"it pickles {found[1]}" if found else type(e).__name__
            log.warning("%s needs a full unpickle (%s); loading it because you named it", path, why)
    return torch.load(path, map_location="cpu", weights_only=False)


def read_args(root: str | Path, iteration: int | None = None) -> argparse.Namespace:
    """The `args` of a checkpoint, from its first rank's file."""
    root = Path(root)
    iteration = latest_iteration(root) if iteration is None else iteration
    files = sorted((root / f"iter_{iteration:07d}").glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        raise FileNotFoundError(f"{root / f'iter_{iteration:07d}'}: no mp_rank_*/ files")
    return load_rank_file(files[0])["args"]


def read_ranks(root: str | Path, iteration: int | None = None) -> tuple[dict, argparse.Namespace]:
    """{(tp_rank, pp_rank): state dict} of one iteration, and its args. Checks that every rank
    of the TP x PP grid is there."""
    root = Path(root)
    iteration = latest_iteration(root) if iteration is None else iteration
    it_dir = root / f"iter_{iteration:07d}"
    files = sorted(it_dir.glob("mp_rank_*/model_optim_rng.pt"))
    if not files:
        raise FileNotFoundError(f"{it_dir}: no mp_rank_*/model_optim_rng.pt files")
    ranks, args = {}, None
    for path in tqdm(files, desc="read ranks", unit="file", disable=None):
        match = re.fullmatch(r"mp_rank_(\d+)(?:_(\d+))?", path.parent.name)
        if not match:
            raise ValueError(f"{path.parent}: not an mp_rank_TT[_PPP] directory")
        ckpt = load_rank_file(path)
        ranks[(int(match[1]), int(match[2] or 0))] = ckpt["model"]
        args = args or ckpt["args"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if missing:
        dirs = [rank_dir(root, iteration, t, p, pp).name for t, p in missing]
        raise FileNotFoundError(
            f"{it_dir}: TP={tp} PP={pp} but rank directories {dirs} are missing"
        )
    return ranks, args


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused-norm keys -> the 2024 `decoder.layers.N.norm.*` keys; drop Transformer Engine's
    `_extra_state` entries."""
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        match = re.fullmatch(
            r"(decoder\.layers\.\d+)\.(?:mixer\.in_proj|self_attention\.linear_qkv|mlp\.linear_fc1)"
            r"\.layer_norm_(weight|bias)",
            key,
        )
        out[f"{match[1]}.norm.{match[2]}" if match else key] = value
    return out


def load_megatron(
    model: HybridLM, root: str | Path, iteration: int | None = None
) -> argparse.Namespace:
    """Fill `model` (single-process, built for the checkpoint's shapes) from a Megatron checkpoint
    at any TP/PP; every parameter must be covered and no key left over. Returns the args."""
    ranks, args = read_ranks(root, iteration)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cfg, kind_of = model.cfg, dict(enumerate(model.layout.pattern))
    stages = stage_ranges(model, pp)
    states = {rank: _normalise_keys(state) for rank, state in ranks.items()}
    layer_counts = [len({k.split(".")[2] for k in states[(0, p)] if k.startswith("decoder.layers.")}) for p in range(pp)]  # fmt: skip
    if layer_counts != [len(r) for r in stages]:
        raise ValueError(
            f"{root}: stages hold {layer_counts} layers, but the pattern "
            f"{model.layout.pattern} splits into {[len(r) for r in stages]} for PP={pp}"
        )
    used: set[tuple[tuple[int, int], str]] = set()
    padded = args.padded_vocab_size
    with torch.no_grad():
        for tp_rank in range(tp):
            template = _template(cfg, padded, tp, tp_rank)
            for name, p in model.named_parameters():
                stage = _stage_of(name, stages, pp)
                key = megatron_key(name, kind_of, stages[stage].start)
                rank = (tp_rank, stage)
                if key not in states[rank]:
                    raise KeyError(f"{root}: rank {rank} has no {key!r} (for our {name})")
                used.add((rank, key))
                _place(p, template[name], states[rank][key], model.vocab_size, name)
    leftover = sorted(f"{r}:{k}" for r, s in states.items() for k in s if (r, k) not in used)
    if leftover:
        raise KeyError(f"{root}: keys the model has no place for: {leftover[:5]}")
    return args


def _template(cfg: ModelConfig, padded_vocab: int, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s parameters of a TP-cut model on the meta device: where its rows came from."""
    with torch.device("meta"):
        model = HybridLM(cfg, vocab_size=padded_vocab, tp=1)
    if tp > 1:
        apply_tp(model, group=None, tp=tp, rank=rank)
    return dict(model.named_parameters())


def _stage_of(name: str, stages: list[range], pp: int) -> int:
    if name == "embedding.weight":
        return 0
    if name.startswith("final_norm") or name == "output_layer.weight":
        return pp - 1
    layer = int(name.split(".")[1])
    return next(i for i, r in enumerate(stages) if layer in r)


def _place(
    param: torch.Tensor, template: torch.Tensor, value: torch.Tensor, vocab: int, name: str
) -> None:
    if tuple(value.shape) != tuple(template.shape):
        raise ValueError(f"{name}: the checkpoint's shard has shape {tuple(value.shape)}, "
                         f"expected {tuple(template.shape)}")  # fmt: skip
    dim = getattr(template, "_tp_dim", None)
    value = value.to(param.dtype)
    if dim is None:
        index = torch.arange(template.shape[0])
        dim = 0
    else:
        index = template._tp_index
    keep = index < param.shape[dim] if name in ("embedding.weight", "output_layer.weight") else None
    if keep is not None:  # rows past our padded vocabulary are the checkpoint's padding
        index, value = index[keep], value.index_select(dim, keep.nonzero().squeeze(1))
    param.index_copy_(dim, index, value)
    if name in ("embedding.weight", "output_layer.weight"):
        param[vocab:] = 0
