"""The reference framework's checkpoint files on disk: where each rank's file lives, which
iteration is the latest, and reading a rank file safely (the restricted unpickler of
safe_pickle.py, never TorchScript) with its args checked to be data. megatron.py converts their
contents to and from a HybridLM.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
"""

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from toolkit.checkpoint import safe_pickle

log = logging.getLogger(__name__)

RANK_FILE = "model_optim_rng.pt"


def rank_dir(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return root / f"iter_{iteration:07d}" / name


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


def _is_torchscript(path: Path) -> bool:
    """Whether torch.load would hand the file to torch.jit.load (which runs the archive's
    code), decided by torch's own zip reader as torch.load decides it."""
    with open(path, "rb") as f:
        if not torch.serialization._is_zipfile(f):
            return False
        with torch.serialization._open_zipfile_reader(f) as archive:
            return torch.serialization._is_torchscript_zip(archive)


def load_rank_file(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """torch.load a rank file through the restricted unpickler (safe_pickle): tensors, the
    Namespace of args and the numpy RNG state load as written; any other object the file names
    (an enum in args, or a hostile os.system) becomes an inert Placeholder and nothing is run.
    `trust_pickle` unpickles in full instead, with a warning: only for files you trust.
    A file that is not a readable checkpoint is a ValueError naming it."""
    path = Path(path)
    try:
        if _is_torchscript(path):
            raise ValueError("a TorchScript archive, not a checkpoint")
        with open(path, "rb") as f:
            mmap = torch.serialization._is_zipfile(f)  # the legacy format cannot be mapped
        if trust_pickle:
            log.warning("%s: unpickling in full (--trust-pickle): it can run any code", path)
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        else:
            ckpt = torch.load(
                path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=safe_pickle
            )
    except (OSError, MemoryError):
        raise
    except Exception as e:  # whatever the bytes made the reader raise: bad input
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable checkpoint file ({why})") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        what = describe(ckpt.get("model") if isinstance(ckpt, Mapping) else ckpt)
        raise ValueError(f"{path}: holds {what}, not a checkpoint with a 'model' state dict")
    keys = [key for key in ckpt["model"] if not isinstance(key, str)]
    if keys:
        raise ValueError(f"{path}: its model state has a key {describe(keys[0])}, not a name")
    args = ckpt.get("args")
    if args is not None and not isinstance(args, (argparse.Namespace, Mapping)):
        raise ValueError(f"{path}: its args are {describe(args)}, not a Namespace")
    rest = {k: v for k, v in ckpt.items() if k != "model"}  # model values are checked later
    unloaded = sorted({p.qualname for p in safe_pickle.placeholders(rest)})
    if unloaded:
        log.info("%s: objects left as placeholders (not loaded): %s", path, ", ".join(unloaded))
    return ckpt


def describe(value: Any) -> str:
    if isinstance(value, safe_pickle.Placeholder):
        return repr(value)
    return "nothing" if value is None else f"a {type(value).__name__}"


def find_rank_files(it_dir: Path) -> dict[tuple[int, int], Path]:
    """{(tp_rank, pp_rank): file} of one iteration directory."""
    files = {}
    for path in sorted(it_dir.glob(f"mp_rank_*/{RANK_FILE}")):
        match = re.fullmatch(r"mp_rank_(\d+)(?:_(\d+))?", path.parent.name)
        if not match:
            raise ValueError(f"{path.parent}: not an mp_rank_TT[_PPP] directory")
        files[(int(match[1]), int(match[2] or 0))] = path
    if not files:
        raise FileNotFoundError(f"{it_dir}: no mp_rank_*/{RANK_FILE} files")
    return files


# Every field of a checkpoint's args that the toolkit reads (here and in import_megatron.py):
# load_megatron refuses a file where one of them is not data.
ARGS_READ = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "num_attention_heads",
    "num_query_groups",
    "group_query_attention",
    "seq_length",
    "max_position_embeddings",
    "normalization",
    "norm_epsilon",
    "position_embedding_type",
    "rotary_percent",
    "rotary_base",
    "make_vocab_size_divisible_by",
    "init_method_std",
    "fp32_residual_connection",
    "squared_relu",
    "mamba_state_dim",
    "mamba_chunk_size",
    "hybrid_layer_pattern",
    "hybrid_override_pattern",
    "hybrid_attention_ratio",
    "hybrid_mlp_ratio",
    "vocab_size",
)


def get_arg(args: Any, name: str, default: Any = None) -> Any:
    """One of a checkpoint's args, which is an argparse.Namespace or (rarely) a dict; a field
    that holds an object the restricted unpickler did not load is an error, never used."""
    value = args.get(name, default) if isinstance(args, Mapping) else getattr(args, name, default)
    if isinstance(value, safe_pickle.Placeholder):
        raise ValueError(f"args.{name} is {value!r}: not data (see --trust-pickle)")
    return value


def check_grid(files: Mapping[tuple[int, int], Path], args: Any, it_dir: Path) -> tuple[int, int]:
    """TP and PP from the args (else from the directory names); every rank must be there."""
    tp = get_arg(args, "tensor_model_parallel_size") or 1 + max(t for t, _ in files)
    pp = get_arg(args, "pipeline_model_parallel_size") or 1 + max(p for _, p in files)
    missing = [(t, p) for p in range(pp) for t in range(tp) if (t, p) not in files]
    if missing:
        names = [rank_dir(it_dir.parent, 0, t, p, pp).name for t, p in missing]
        raise FileNotFoundError(
            f"{it_dir}: TP={tp} PP={pp} but rank directories {names} are missing"
        )
    extra = sorted(set(files) - {(t, p) for p in range(pp) for t in range(tp)})
    if extra:
        raise ValueError(f"{it_dir}: rank files {extra} lie outside the TP={tp} x PP={pp} grid")
    return tp, pp
