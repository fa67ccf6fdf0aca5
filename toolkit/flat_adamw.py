"""AdamW over flat buffers (train.flat_optimizer): each parameter group's parameters, gradients
and Adam moments are views into one contiguous fp32 buffer each, and the update is one pass over
each buffer: on CUDA one torch.compile'd kernel that reads and writes every byte once (torch's
fused AdamW launches its multi-tensor kernel in slices of 320 blocks, which leaves an H200 part
idle: ~60% of the HBM bandwidth on the 800M).

The arithmetic is torch's AdamW (decoupled weight decay, bias corrections from the step count);
on the CPU the same in-place ops as torch's foreach path, element for element (tests compare bit
for bit), on CUDA the compiled kernel (within fp32 rounding of torch's fused kernel).

Seen from outside it is an AdamW over the original parameters: `param_groups[i]["params"]` are
the parameters and `state[param]` is {"step", "exp_avg", "exp_avg_sq"} with moments of the
parameter's shape (views into the buffers), so checkpoints save and restore it per parameter
exactly as torch's; assigning `state[param]` (a restore) copies into the views.

Gradients: `zero_grad(set_to_none=True)` (the trainer's) hands the next backward no gradient,
so autograd writes new tensors as usual and `step` copies them into the buffer (2 passes over
the gradients); with set_to_none=False they stay views of the zeroed buffer and backward adds
into it (zeroing and an in-place add: 4 passes). A parameter without a gradient at `step` gets a
zero one (torch's AdamW would skip it; every parameter of these models has one every step).

Clipping: `step(grad_scale=coef)` multiplies the gradients by the clip coefficient (a 0-dim
device tensor, toolkit.parallel.runtime.clip_and_step) inside the update, as it reads them: the
same numbers as scaling them in place first, without a pass of its own over the gradients (11.8
of the 8B's 255 ms step on an H200) or a host sync to decide whether to scale. The gradient
buffer is left unscaled.
"""

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    scalars: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One AdamW step in place; `scalars` = [1 - lr * weight_decay, lr / bias_correction1,
    sqrt(bias_correction2)] (fp32, on param's device: a tensor, so the compiled kernel is not
    recompiled as the learning rate moves). The ops and their order are torch's foreach AdamW.
    `grad_scale` (0-dim fp32): the gradient is multiplied by it first (clipping), in fp32 as an
    in-place scale by it would; `grad` itself is not written."""
    if grad_scale is not None:
        grad = grad * grad_scale  # fused into the update's one kernel when compiled
    decay, step_size, bias_correction2_sqrt = scalars[0], scalars[1], scalars[2]
    param.mul_(decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    param.sub_(step_size * exp_avg / denom)


def adamw_scalars(group: dict, step: float) -> list[float]:
    """adamw_update_'s `scalars` for `group` at its `step`-th update (counted from 1): Python
    floats, as torch's AdamW computes them on the host (non-capturable)."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    return [1 - lr * group["weight_decay"], lr / (1 - beta1**step), (1 - beta2**step) ** 0.5]


def host_table(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host table (a step's scalars, addresses) on `device` without waiting for the GPU:
    copied from pinned memory (from pageable memory the host would wait for the stream to
    drain); torch's pinned-memory cache keeps the buffer until the copy is done."""
    host = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


_compiled_update = None


def _update_fn(device: torch.device) -> Any:
    """The compiled update on CUDA (one kernel per buffer), the eager ops elsewhere."""
    global _compiled_update
    if device.type != "cuda":
        return adamw_update_
    if _compiled_update is None:
        _compiled_update = torch.compile(adamw_update_, fullgraph=True, dynamic=False)
    return _compiled_update


class _FlatGroup:
    """One parameter group's buffers: the parameters, their gradients, both moments."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        device = params[0].device
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        self.param = torch.empty(total, dtype=torch.float32, device=device)
        self.grad = torch.zeros_like(self.param)
        self.exp_avg = torch.zeros_like(self.param)
        self.exp_avg_sq = torch.zeros_like(self.param)
        self.step = torch.tensor(0.0)  # as torch's non-fused AdamW: a CPU fp32 scalar
        self.started = False  # stepped or restored: state[p] exists from then on
        self.params = params
        self.offsets: dict[torch.Tensor, tuple[int, int]] = {}
        offset = 0
        for p, n in zip(params, sizes):
            self.offsets[p] = (offset, n)
            with torch.no_grad():
                self.param[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.view(self.param, p)  # same Parameter object, attributes and all
            offset += n
        self.grad_views = [self.view(self.grad, p) for p in params]  # made once: host time
        self.attach_grads()

    def view(self, flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        offset, n = self.offsets[p]
        return flat[offset : offset + n].view(p.shape)

    def attach_grads(self) -> None:
        """Point every .grad into the gradient buffer (backward then adds in place)."""
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

    def gather_grads(self) -> None:
        """Copy every gradient that is not a view of the buffer into it (None: a zero gradient)
        and point .grad at the view: one multi-tensor copy and one zeroing for all of them, not
        a launch per parameter (hundreds of parameters: milliseconds of host time a step)."""
        copy_to, copy_from, zero = [], [], []
        for p, view in zip(self.params, self.grad_views):
            if p.grad is None:
                zero.append(view)
            elif p.grad.data_ptr() != view.data_ptr():
                copy_to.append(view)
                copy_from.append(p.grad)
            else:
                continue
            p.grad = view
        if copy_to:
            torch._foreach_copy_(copy_to, copy_from)
        if zero:
            torch._foreach_zero_(zero)

    def state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "step": self.step,
            "exp_avg": self.view(self.exp_avg, p),
            "exp_avg_sq": self.view(self.exp_avg_sq, p),
        }


class _FlatState(MutableMapping):
    """`optimizer.state` of a FlatAdamW: per parameter, views into the buffers."""

    def __init__(self, groups: list[_FlatGroup]) -> None:
        self._group_of = {p: g for g in groups for p in g.params}
        self._groups = groups

    def __getitem__(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        group = self._group_of.get(p)
        if group is None or not group.started:
            raise KeyError(p)
        return group.state_of(p)

    @torch.no_grad()
    def __setitem__(self, p: torch.Tensor, value: dict[str, Any]) -> None:
        group = self._group_of.get(p)
        if group is None:
            raise KeyError("flat AdamW: state for a parameter it does not hold")
        if set(value) != set(_STATE_KEYS):
            raise ValueError(f"flat AdamW: state keys {sorted(value)}, expected {_STATE_KEYS}")
        group.view(group.exp_avg, p).copy_(value["exp_avg"])
        group.view(group.exp_avg_sq, p).copy_(value["exp_avg_sq"])
        group.step.fill_(float(value["step"]))  # one count per group (every parameter steps)
        group.started = True

    def __delitem__(self, p: torch.Tensor) -> None:
        raise NotImplementedError("flat AdamW: state is cleared for all parameters at once")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for g in self._groups if g.started for p in g.params)

    def __len__(self) -> int:
        return sum(len(g.params) for g in self._groups if g.started)

    @torch.no_grad()
    def clear(self) -> None:
        """A fresh optimizer's state: zero moments and step counts."""
        for g in self._groups:
            g.exp_avg.zero_()
            g.exp_avg_sq.zero_()
            g.step.zero_()
            g.started = False


class FlatAdamW:
    """AdamW whose parameter groups live in flat fp32 buffers (the module docstring says how)."""

    folds_grad_scale = True  # step(grad_scale=...): clip_and_step hands it the coefficient

    def __init__(
        self,
        param_groups: list[dict],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
    ) -> None:
        self.param_groups: list[dict] = []
        self._flat: list[_FlatGroup] = []
        check_flat_params([p for group in param_groups for p in group["params"]])
        for group in param_groups:
            params = list(group["params"])
            if not params:
                continue
            self._flat.append(_FlatGroup(params))
            self.param_groups.append(
                {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, **group}
            )
        self.state = _FlatState(self._flat)
        self._device = self._flat[0].param.device if self._flat else torch.device("cpu")
        self._update = _update_fn(self._device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradients (`set_to_none`), or zeroed views of the buffers."""
        for g in self._flat:
            if set_to_none:
                for p in g.params:
                    p.grad = None
            else:
                g.grad.zero_()
                g.attach_grads()

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One AdamW step; `grad_scale` (a 0-dim tensor on the parameters' device): the
        gradients are multiplied by it inside the update (the clip coefficient)."""
        if grad_scale is not None:
            grad_scale = grad_scale.to(torch.float32)  # as a scale of fp32 gradients computes
        host = []
        for g, group in zip(self._flat, self.param_groups):
            g.gather_grads()
            g.step += 1
            g.started = True
            host.append(adamw_scalars(group, float(g.step)))
        scalars = host_table(host, torch.float32, self._device)  # one copy for all groups
        for i, (g, group) in enumerate(zip(self._flat, self.param_groups)):
            beta1, beta2 = group["betas"]
            self._update(
                g.param, g.grad, g.exp_avg, g.exp_avg_sq, scalars[i], beta1, beta2,
                group["eps"], grad_scale,
            )  # fmt: skip


def check_flat_params(params: list[torch.Tensor]) -> None:
    """NotImplementedError (naming the key) for parameters a flat buffer cannot hold: not plain
    fp32 tensors (float8 or distributed tensor subclasses, bf16 weights), or on several devices."""
    for p in params:
        if type(p.data) is not torch.Tensor or p.dtype != torch.float32:
            raise NotImplementedError(
                f"train.flat_optimizer: a parameter of type {type(p.data).__name__} and dtype "
                f"{p.dtype} cannot live in a flat fp32 buffer; set train.flat_optimizer=false"
            )
    if len({p.device for p in params}) > 1:
        raise NotImplementedError(
            "train.flat_optimizer: parameters on several devices; set train.flat_optimizer=false"
        )
