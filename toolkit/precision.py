"""Compute precision: autocast for bf16, float8 linears for fp8 (train.precision).

fp8 swaps the nn.Linear layers of the blocks for float8-training linears, from outside the model
(after tensor parallelism has cut them: toolkit/parallel/parallelize.py says why):
Transformer Engine's `te.Linear` when it imports (NVIDIA's containers), else torchao's
`Float8Linear` (a small wheel). As in the reference 8B FP8 recipe, the first and last blocks, the
embedding and the output layer stay in bf16. The swapped layers keep their module paths and a
parameter named `weight` (fp32 master, same shape), so checkpoints are the same whichever
precision wrote them. Measured on the H200 (../shared/device/README.md): torchao float8 is 1.6x
bf16 on the MLP and Mamba projections only under torch.compile (train.compile) and 0.6x eagerly.
"""

import contextlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Engine = Literal["transformer_engine", "torchao"]


class PrecisionError(RuntimeError):
    """The requested precision cannot run here (message names the recipe key)."""


def fp8_engine() -> Engine | None:
    """Transformer Engine if it imports, else torchao, else None."""
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            import transformer_engine.pytorch  # noqa: F401

            return "transformer_engine"
        except Exception as e:  # noqa: BLE001 - a broken install falls back to torchao
            log.warning("transformer_engine is installed but does not import (%s)", e)
    if importlib.util.find_spec("torchao") is not None:
        return "torchao"
    return None


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


def fp8_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """Which linears go float8: those inside blocks 1 .. N-2 whose dimensions are multiples of 16
    (the float8 GEMMs' requirement). Names are relative to `model` (`layers.3.mixer.in_proj`)."""
    last = len(model.layers) - 1

    def keep(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        parts = name.split(".")
        if parts[0] != "layers" or len(parts) < 2 or not parts[1].isdigit():
            return False  # embedding, output layer
        if int(parts[1]) in (0, last):
            return False
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    return keep


def apply_fp8(
    model: nn.Module,
    *,
    device: torch.device,
    engine: Engine | None = None,
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise",
    check_device: bool = True,
) -> tuple[Engine, list[str]]:
    """Swap the chosen linears for float8 training ones, in place. Returns the engine and the
    converted module names. `check_device=False` converts on any device (tests: the module tree
    converts on CPUs; the float8 matmuls do not run there)."""
    if check_device:
        check_fp8_device(device)
    engine = engine or fp8_engine()
    if engine is None:
        raise PrecisionError(
            "train.precision='fp8' needs Transformer Engine or torchao; neither imports here: "
            "pip install torchao (or use an NGC PyTorch container), or train.precision='bf16'"
        )
    keep = fp8_filter(model)
    names = [name for name, m in model.named_modules() if keep(m, name)]
    if engine == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(recipe)
        convert_to_float8_training(model, config=config, module_filter_fn=keep)
    else:
        _swap_te_linears(model, names)
    log.info(
        "fp8: %d linears through %s (%s); first and last blocks, embedding and output in bf16",
        len(names),
        engine,
        recipe if engine == "torchao" else "delayed scaling",
    )
    return engine, names


def _swap_te_linears(model: nn.Module, names: list[str]) -> None:
    import transformer_engine.pytorch as te

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = te.Linear(
            old.in_features,
            old.out_features,
            bias=False,
            params_dtype=old.weight.dtype,
            device=old.weight.device,
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
        new.weight.__dict__.update(old.weight.__dict__)  # TP shard placement, weight-decay marks
        setattr(parent, child, new)


def autocast_context(
    precision: str, device: torch.device, engine: Engine | None = None
) -> contextlib.AbstractContextManager:
    """What a forward pass runs under: nothing (fp32), bf16 autocast, or for fp8 bf16 autocast
    around the float8 linears (plus Transformer Engine's fp8_autocast when it is the engine). fp8
    without an engine is a model that was not converted (e.g. evaluation): bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" or (precision == "fp8" and engine != "transformer_engine"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp8":
        import transformer_engine.pytorch as te

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        stack.enter_context(te.fp8_autocast(enabled=True))
        return stack
    raise ValueError(f"unknown precision {precision!r}")
