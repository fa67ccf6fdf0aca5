"""A sharded optimizer over data parallelism (ZeRO stage 1).

Gradients are averaged over DP as usual. Each DP rank then keeps optimizer state for, and updates,
only the parameters it owns; owners broadcast their updated parameters to the rest of the DP
group. The update is the same arithmetic on the same numbers as the replicated optimizer, so
training is bit-identical to it, with 1/DP of the Adam moments per rank.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist


def assign_owners(params: list[torch.Tensor], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first, to the least-loaded rank (deterministic)."""
    load = [0] * ranks
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owners[i] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[i]] += params[i].numel()
    return owners


class ShardedOptimizer:
    """Wraps an optimizer class: `build(param_groups)` receives only this rank's parameters."""

    def __init__(
        self,
        param_groups: list[dict],
        build: Callable[[list[dict]], torch.optim.Optimizer],
        group: dist.ProcessGroup,
    ) -> None:
        self.group = group
        self.params = [p for g in param_groups for p in g["params"]]
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        owners = assign_owners(self.params, size)
        self.owner_of = {p: dist.get_global_rank(group, o) for p, o in zip(self.params, owners)}
        self._mine = {p for p, o in zip(self.params, owners) if o == rank}
        mine = [{**g, "params": [p for p in g["params"] if p in self._mine]} for g in param_groups]
        self.inner = build([g for g in mine if g["params"]])

    def owns(self, p: torch.Tensor) -> bool:
        return p in self._mine

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The inner optimizer's own way for its parameters (a flat one keeps its gradient views).
        self.inner.zero_grad(set_to_none=set_to_none)
        for p in self.params:
            if p not in self._mine:
                p.grad = None

    @property
    def folds_grad_scale(self) -> bool:
        """Whether step takes the clip coefficient (the inner optimizer is a flat one)."""
        return getattr(self.inner, "folds_grad_scale", False)

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        # The coefficient only matters for the parameters this rank updates: the others'
        # gradients are not read, their new values come from their owners.
        if grad_scale is None:
            self.inner.step()
        else:
            self.inner.step(grad_scale=grad_scale)
        for p in self.params:
            dist.broadcast(p.data, src=self.owner_of[p], group=self.group)
