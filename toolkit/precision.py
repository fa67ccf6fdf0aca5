"""Compute precision: autocast for bf16, float8 linears for fp8 (train.precision).

fp8 swaps the nn.Linear layers of the blocks for float8-training linears, from outside the model
(after tensor parallelism has cut them: toolkit/parallel/parallelize.py says why):
Transformer Engine's `te.Linear` (NVIDIA's containers) or torchao's `Float8Linear` (a small
wheel); train.fp8_engine picks one ('auto': fp8_engine()). As in the
reference 8B FP8 recipe, the first and last blocks, the embedding and the output layer stay in
bf16 (train.fp8_layers='blocks' takes every block, 'all' the output layer too). The swapped
layers keep their module paths, forward hooks (tensor parallelism's) and one parameter named
`weight` (fp32 master, same shape); checkpoints hold parameters only (not Transformer Engine's
`_extra_state` scaling history), so they are the same whichever precision or engine wrote them.

train.fp8_recipe: 'tensorwise' is one scale per tensor from its current amax (torchao's
tensorwise, Transformer Engine's Float8CurrentScaling), 'rowwise' torchao's per-row scales,
'delayed' Transformer Engine's DelayedScaling (scales from an amax history). Measured on the H200
(../shared/device/README.md): torchao float8 is 1.6x bf16 on the MLP and Mamba projections only
under torch.compile (train.compile) and 0.6x eagerly.
"""

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from toolkit.config import FP8_RECIPES as RECIPES  # the recipes each engine runs
from toolkit.config import TE_AMAX_HISTORY, Fp8Layers, Fp8Recipe
from toolkit.config import Fp8Engine as Engine

log = logging.getLogger(__name__)


class PrecisionError(RuntimeError):
    """The requested precision cannot run here (message names the recipe key)."""


def _te_imports() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401

        return True
    except Exception as e:  # noqa: BLE001 - a broken install falls back to torchao
        log.warning("transformer_engine is installed but does not import (%s)", e)
        return False


def fp8_engine(compiled: bool = False) -> Engine | None:
    """The library train.fp8_engine='auto' takes: the one that is installed; with both, torchao
    when the blocks are compiled (train.compile; measured on the H200, 800M at micro-batch 8:
    torchao 92.4k tokens/s, Transformer Engine 88.8k, both current scaling) and Transformer
    Engine when they are not (torchao's float8 runs at 0.6x bf16 uncompiled). None: neither."""
    te = _te_imports()
    ao = importlib.util.find_spec("torchao") is not None
    if te and ao:
        return "torchao" if compiled else "transformer_engine"
    return "transformer_engine" if te else "torchao" if ao else None


def _resolve_engine(requested: str | None, compiled: bool) -> Engine:
    if requested in (None, "auto"):
        engine = fp8_engine(compiled)
        if engine is None:
            raise PrecisionError(
                "train.precision='fp8' needs Transformer Engine or torchao; neither imports "
                "here: pip install torchao (or use an NGC PyTorch container), or "
                "train.precision='bf16'"
            )
        return engine
    if requested == "transformer_engine" and not _te_imports():
        raise PrecisionError(
            "train.fp8_engine='transformer_engine' but transformer_engine.pytorch does not import "
            "here: use an NGC PyTorch container (or benchmarks/gpu_setup_te.sh), or "
            "train.fp8_engine='auto'"
        )
    if requested == "torchao" and importlib.util.find_spec("torchao") is None:
        raise PrecisionError(
            "train.fp8_engine='torchao' but torchao is not installed: pip install torchao, or "
            "train.fp8_engine='auto'"
        )
    if requested not in RECIPES:
        raise PrecisionError(f"train.fp8_engine={requested!r} is not one of auto, {list(RECIPES)}")
    return requested


def check_fp8_device(device: torch.device) -> None:
    """float8 matmuls need CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device.type != "cuda":
        raise PrecisionError(
            f"train.precision='fp8' needs a CUDA GPU with compute capability >= 8.9; this run is "
            f"on {device.type}: use train.precision='bf16' (or 'fp32' on CPUs)"
        )
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise PrecisionError(
            f"train.precision='fp8' needs compute capability >= 8.9; "
            f"{torch.cuda.get_device_name(device)} has {cc[0]}.{cc[1]}: use train.precision='bf16'"
        )


def fp8_filter(model: nn.Module, layers: Fp8Layers = "inner") -> Callable[[nn.Module, str], bool]:
    """Which linears go float8 (train.fp8_layers): those inside blocks 1 .. N-2 ('inner', the
    reference's), inside every block ('blocks'), or those and the output layer ('all'); each
    only when its dimensions are multiples of 16 (the float8 GEMMs' requirement). Names are
    relative to `model` (`layers.3.mixer.in_proj`, `output_layer`)."""
    last = len(model.layers) - 1

    def keep(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        parts = name.split(".")
        if name == "output_layer":
            if layers != "all":
                return False
        elif parts[0] != "layers" or len(parts) < 2 or not parts[1].isdigit():
            return False
        elif layers == "inner" and int(parts[1]) in (0, last):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return keep


def apply_fp8(
    model: nn.Module,
    *,
    device: torch.device,
    engine: Engine | Literal["auto"] | None = None,
    recipe: Fp8Recipe = "tensorwise",
    check_device: bool = True,
    compiled: bool = False,
    fuse_norms: bool = False,
    layers: Fp8Layers = "inner",
    cast_weights_once: bool = False,
) -> tuple[Engine, list[str]]:
    """Swap the linears that fp8_filter(model, `layers`) chooses for float8 training ones, in
    place. Returns the engine and the converted module names. `engine` None or 'auto':
    fp8_engine(compiled), `compiled` saying whether the blocks will be compiled.
    `check_device=False` converts on any device (tests: the module tree converts on CPUs; the
    float8 matmuls do not run there). `fuse_norms` (Transformer Engine only; callers pass it at
    TP=1, see fuse_te_norms): each converted block's pre-norm runs inside its first linear.
    `cast_weights_once` (torchao, tensorwise: train.fp8_weight_cache): the linears take their
    float8 weights from toolkit.fp8_weight_cache.cast_weights_once."""
    if check_device:
        check_fp8_device(device)
    engine = _resolve_engine(engine, compiled)
    if recipe not in RECIPES[engine]:
        raise PrecisionError(
            f"train.fp8_recipe={recipe!r} does not run with {engine} (it runs "
            f"{' or '.join(map(repr, RECIPES[engine]))}): change train.fp8_recipe, or choose the "
            f"other library with train.fp8_engine"
        )
    if cast_weights_once and (engine != "torchao" or recipe != "tensorwise"):
        raise PrecisionError(
            f"train.fp8_weight_cache casts torchao's tensorwise weights; this job runs {engine} "
            f"with train.fp8_recipe={recipe!r}: set train.fp8_engine='torchao' and "
            f"train.fp8_recipe='tensorwise', or train.fp8_weight_cache=false"
        )
    keep = fp8_filter(model, layers)
    names = [name for name, m in model.named_modules() if keep(m, name)]
    before = {name: model.get_submodule(name) for name in names}
    if engine == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(recipe)
        convert_to_float8_training(model, config=config, module_filter_fn=keep)
        if cast_weights_once:
            from toolkit.fp8_weight_cache import cast_once_linears

            cast_once_linears(model)
    else:
        fused = fuse_te_norms(model, names) if fuse_norms else []
        if fused:
            log.info("fp8: %d pre-norms fused into te.LayerNormLinear", len(fused))
        _swap_te_linears(model, [n for n in names if n not in fused])
    for name, old in before.items():
        carry_forward_hooks(old, model.get_submodule(name))
    bf16 = {"inner": "first and last blocks, embedding and output", "blocks":
            "embedding and output", "all": "embedding"}[layers]  # fmt: skip
    log.info("fp8: %d linears through %s (%s scaling); %s in bf16", len(names), engine, recipe,
             bf16)  # fmt: skip
    return engine, names


# nn.Module's forward-hook tables: a swapped linear keeps the ones put on it before (tensor
# parallelism's input hook on the vocabulary-parallel output layer, train.fp8_layers='all').
FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called")  # fmt: skip


def carry_forward_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the forward hooks registered on `old`, the module it replaced. The tables are
    shared, not copied, so the handles returned when they were registered still remove them."""
    if new is old:
        return
    for table in FORWARD_HOOKS:
        setattr(new, table, getattr(old, table))


def _replace_linear(parent: nn.Module, child: str, new: nn.Module) -> None:
    """Put `new` (a Transformer Engine linear) where nn.Linear `parent.child` was, with its
    weight's values and marks (TP shard placement, weight decay)."""
    old = getattr(parent, child)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    new.weight.__dict__.update(old.weight.__dict__)
    setattr(parent, child, new)


def _swap_te_linears(model: nn.Module, names: list[str]) -> None:
    import transformer_engine.pytorch as te

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        kwargs = dict(bias=False, params_dtype=old.weight.dtype, device=old.weight.device)
        _replace_linear(parent, child, te.Linear(old.in_features, old.out_features, **kwargs))


# The linear each kind of block feeds its pre-norm into (Block.forward: x + mixer(norm(x))).
FIRST_LINEAR = {"M": "in_proj", "*": "linear_qkv", "-": "linear_fc1"}


class NormInNextLinear(nn.Module):
    """A block's pre-norm whose work moved into the next linear (te.LayerNormLinear, which holds
    these same Parameter objects): it passes x through and keeps the parameters registered under
    their old names, so named_parameters(), the optimizer and checkpoints do not change."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        if getattr(norm, "bias", None) is not None:
            self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fuse_te_norms(model: nn.Module, names: list[str]) -> list[str]:
    """Replace each block's first nn.Linear (when in `names`, the FP8 ones) with a
    te.LayerNormLinear that applies the block's RMSNorm or LayerNorm before its FP8 GEMM: one
    kernel normalises and casts to FP8, where unfused the norm writes bf16 and te.Linear reads
    and casts it again (the fusion the reference's `layer_norm_weight` names reflect). Only for
    unsharded linears: under tensor parallelism the norm's weight gradient would come out
    partial per rank. Returns the fused linears' names."""
    import transformer_engine.pytorch as te

    from toolkit.model.norms import RMSNorm

    fused = []
    for i, block in enumerate(model.layers):
        name = f"layers.{i}.mixer.{FIRST_LINEAR[block.kind]}"
        norm = block.norm
        if name not in names or not isinstance(norm, RMSNorm | nn.LayerNorm):
            continue
        child = FIRST_LINEAR[block.kind]
        old = block.mixer.get_submodule(child)
        new = te.LayerNormLinear(
            old.in_features,
            old.out_features,
            eps=norm.eps,
            bias=False,
            normalization="RMSNorm" if isinstance(norm, RMSNorm) else "LayerNorm",
            params_dtype=old.weight.dtype,
            device=old.weight.device,
        )
        new.layer_norm_weight = norm.weight  # the same Parameter: one tensor, one gradient
        if isinstance(norm, nn.LayerNorm):
            new.layer_norm_bias = norm.bias
        _replace_linear(block.mixer, child, new)
        block.norm = NormInNextLinear(norm)
        fused.append(name)
    return fused


@functools.cache
def te_recipe(name: str, amax_history: tuple[int, str] = TE_AMAX_HISTORY) -> object:
    """Transformer Engine's recipe object for a train.fp8_recipe value, made once: autocast
    contexts of every step share it (a recipe is not made inside compiled code). 'delayed'
    takes its scales from `amax_history` (train.fp8_amax_history and train.fp8_amax_algo:
    how many steps' amaxes, and which of them)."""
    from transformer_engine.common import recipe

    if name == "delayed":  # E4M3 forward, E5M2 gradients (HYBRID, TE's default), margin 0
        length, algo = amax_history
        return recipe.DelayedScaling(amax_history_len=length, amax_compute_algo=algo)
    if name == "tensorwise":
        return recipe.Float8CurrentScaling()
    raise PrecisionError(f"train.fp8_recipe={name!r} does not run with transformer_engine")


def autocast_context(
    precision: str,
    device: torch.device,
    engine: Engine | None = None,
    fp8_recipe: str = "tensorwise",
    amax_history: tuple[int, str] = TE_AMAX_HISTORY,
) -> contextlib.AbstractContextManager:
    """What a forward pass runs under: nothing (fp32), bf16 autocast, or for fp8 bf16 autocast
    around the float8 linears (plus Transformer Engine's autocast with `fp8_recipe` when it is the
    engine; te_recipe says what `amax_history` is). fp8 without an engine is a model that was
    not converted (e.g. evaluation): bf16, and te.Linear layers outside Transformer Engine's
    autocast compute in bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" or (precision == "fp8" and engine != "transformer_engine"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp8":
        import transformer_engine.pytorch as te

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        if hasattr(te, "autocast"):  # TE >= 2.8; fp8_autocast warns there
            stack.enter_context(
                te.autocast(enabled=True, recipe=te_recipe(fp8_recipe, amax_history))
            )
        else:
            stack.enter_context(
                te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(fp8_recipe, amax_history))
            )
        return stack
    raise ValueError(f"unknown precision {precision!r}")
