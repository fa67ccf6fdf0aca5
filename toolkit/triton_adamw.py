"""AdamW as one Triton kernel over every parameter (train.adamw_kernel = "triton").

torch's fused AdamW reads and writes the fp32 parameters and both moments at ~75% of the HBM
bandwidth, and the clip before it is a pass of its own that reads and writes every gradient:
46 of a 231 ms step at the 8B Mamba-2 widths on an H100 (8 layers and the 256k vocabulary:
2.97B parameters). Here one launch covers all parameters: each program takes a block of one
tensor, found through a table of blocks (made once for the parameters' sizes) and a table of
addresses (made each step, since backward leaves new gradient tensors), and the clip
coefficient is read from device memory and applied as the gradient is loaded (clip_and_step
passes it: no host sync, no pass of its own, and the gradient is not written back).

The arithmetic is torch's AdamW in torch's order (flat_adamw.adamw_update_, the reference the
tests compare with): decoupled weight decay, then the moments, then the step with the bias
corrections computed on the host from each parameter's step count. State and checkpoints are
torch's AdamW's ({"step": a CPU tensor, "exp_avg", "exp_avg_sq"}). A parameter the kernel cannot
address (not a plain contiguous fp32 tensor on the device, or a gradient that is not) takes the
reference's eager ops instead.

With train.bf16_weight_cache the kernel also writes each linear's new weight as a bf16 copy
(write_casts, toolkit.bf16_weight_cache.UpdatedCasts), which the next step reads instead of
casting: the value is in registers already, so it costs the 2 bytes written.
"""

import logging
from collections.abc import Iterable

import torch

from toolkit.bf16_weight_cache import UpdatedCasts
from toolkit.flat_adamw import adamw_scalars, adamw_update_, host_table
from toolkit.model.kernels import triton_imports, triton_runs_on
from toolkit.row_sparse_grad import clear_, dense, held_grad, held_rows

log = logging.getLogger(__name__)

# Elements of one tensor per block, 8 per thread per array at 4 warps: small programs, many
# resident on an SM, hide the table look-ups before each one's loads (4,096 at 8 warps, 16 a
# thread: 12.09 against 10.53 ms for the 800M's update on an H100, 2026-12-05).
BLOCK = 1024
NUM_WARPS = 4
# Consecutive blocks of one tensor a program updates, each block's loads issued before the last
# one's stores: the table look-ups that precede a program's first load are paid once per SPAN
# blocks, and loads stay in flight while a block computes. STREAM: loads and stores marked
# evict-first (nothing is read twice). Both for benchmarks/optimizer_step.py's variants
# (triton_bBLOCK_wWARPS_xSPAN_stream), which set these globals; the defaults are the measured
# kernel's.
SPAN = 1
STREAM = False
# EXACT: division and square root rounded as IEEE's (and torch's CUDA kernels') are; False:
# the GPU's approximate ones (within 2 ulp), a variant that measures what they cost.
EXACT = True
SCALARS = 8  # per tensor (7 used, a row of 32 bytes)

if triton_imports():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_row_grad(grad, slots, width, first, offs, numel, MASKED: tl.constexpr,
                       BLOCK: tl.constexpr, EVICTION: tl.constexpr):  # fmt: skip
        """A block's gradient from a row-sparse one (toolkit.row_sparse_grad): `grad` its sums
        [held rows, width], `slots` the int32 table of each row's place among them (-1: none);
        0 for a row with none. The block starts at element `first`: one 64-bit division for the
        block, 32-bit ones for its elements."""
        row0 = first // width
        col = (first - row0 * width).to(tl.int32) + tl.arange(0, BLOCK)
        width32 = width.to(tl.int32)
        rows_on = col // width32
        row, col = row0 + rows_on, col - rows_on * width32
        table = slots.to(tl.pointer_type(tl.int32))
        if MASKED:  # past the tensor's end: no row
            slot = tl.load(table + row, mask=offs < numel, other=-1)
        else:
            slot = tl.load(table + row)
        at = slot.to(tl.int64) * width + col
        return tl.load(grad + at, mask=slot >= 0, other=0.0, eviction_policy=EVICTION)

    @triton.jit
    def _load_block(param, grad, exp_avg, exp_avg_sq, slots, width, first, offs, numel,
                    MASKED: tl.constexpr, HAS_SPARSE: tl.constexpr, BLOCK: tl.constexpr,
                    EVICTION: tl.constexpr):  # fmt: skip
        """A block's gradient, parameter and moments. A mask only for a tensor's last, partial
        block: with one, the loads are 4 bytes wide. With HAS_SPARSE, a tensor whose `slots`
        is not 0 has a row-sparse gradient (_load_row_grad)."""
        mask = offs < numel if MASKED else None
        if HAS_SPARSE:
            if slots != 0:
                g = _load_row_grad(grad, slots, width, first, offs, numel, MASKED, BLOCK,
                                   EVICTION)  # fmt: skip
            else:
                g = tl.load(grad + offs, mask=mask, eviction_policy=EVICTION)
        else:
            g = tl.load(grad + offs, mask=mask, eviction_policy=EVICTION)
        p = tl.load(param + offs, mask=mask, eviction_policy=EVICTION)
        m = tl.load(exp_avg + offs, mask=mask, eviction_policy=EVICTION)
        v = tl.load(exp_avg_sq + offs, mask=mask, eviction_policy=EVICTION)
        return g, p, m, v

    @triton.jit
    def _bf16_bits(x):
        """`x` (fp32) rounded to bf16 as torch casts (to nearest, ties to even; NaN to 0x7FC0),
        as the bf16's 16 bits: in integer ops, since Triton's interpreter truncates its casts
        and the tests run the kernel there."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)

    @triton.jit
    def _update_block(g, p, m, v, param, exp_avg, exp_avg_sq, cast, offs, numel, row, grad_scale,
                      HAS_SCALE: tl.constexpr, MASKED: tl.constexpr, HAS_CASTS: tl.constexpr,
                      EVICTION: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
        """A loaded block's update, stored in place: row holds the tensor's scalars
        (TritonAdamW._scalars). With HAS_CASTS, `cast` is the address of the parameter's bf16
        copy (0: none), written from the new parameter (torch's rounding, to nearest even)."""
        mask = offs < numel if MASKED else None
        decay, step_size, bias_correction2_sqrt = tl.load(row), tl.load(row + 1), tl.load(row + 2)
        beta2, one_minus_beta1 = tl.load(row + 3), tl.load(row + 4)
        one_minus_beta2, eps = tl.load(row + 5), tl.load(row + 6)
        if HAS_SCALE:
            g = g * tl.load(grad_scale)
        p = p * decay
        m = m + one_minus_beta1 * (g - m)  # torch's lerp for a weight below 0.5
        v = v * beta2 + one_minus_beta2 * g * g
        if EXACT:
            denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
            p = p - tl.div_rn(step_size * m, denom)
        else:
            denom = tl.sqrt(v) / bias_correction2_sqrt + eps
            p = p - step_size * m / denom
        tl.store(param + offs, p, mask=mask, eviction_policy=EVICTION)
        tl.store(exp_avg + offs, m, mask=mask, eviction_policy=EVICTION)
        tl.store(exp_avg_sq + offs, v, mask=mask, eviction_policy=EVICTION)
        if HAS_CASTS:
            if cast != 0:
                # Aligned to 8 bytes as far as the compiler knows (16 in fact): it then stores
                # the 4 bf16 of each float4 from the registers that hold it. Told 16, it
                # regrouped them 8 a thread through shared memory in every program: 30.2 against
                # 19.7 ms for the update at the 8B Mamba-2 widths on an H200 (2026-12-06).
                copy = tl.multiple_of(cast.to(tl.pointer_type(tl.uint16)), 8)
                tl.store(copy + offs, _bf16_bits(p), mask=mask, eviction_policy=EVICTION)

    @triton.jit
    def _adamw_span(param, grad, exp_avg, exp_avg_sq, cast, slots, width, start, numel, row,
                    grad_scale, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr,
                    HAS_CASTS: tl.constexpr, HAS_SPARSE: tl.constexpr, BLOCK: tl.constexpr,
                    SPAN: tl.constexpr, EVICTION: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
        """SPAN consecutive blocks from `start`, each one's loads issued before the one before
        it is stored (the blocks are disjoint, so the order is free)."""
        offs = start + tl.arange(0, BLOCK)
        g, p, m, v = _load_block(param, grad, exp_avg, exp_avg_sq, slots, width, start, offs,
                                 numel, MASKED, HAS_SPARSE, BLOCK, EVICTION)  # fmt: skip
        for i in tl.static_range(SPAN - 1):
            ahead = offs + BLOCK
            g2, p2, m2, v2 = _load_block(param, grad, exp_avg, exp_avg_sq, slots, width,
                                         start + (i + 1) * BLOCK, ahead, numel, MASKED,
                                         HAS_SPARSE, BLOCK, EVICTION)  # fmt: skip
            _update_block(g, p, m, v, param, exp_avg, exp_avg_sq, cast, offs, numel, row,
                          grad_scale, HAS_SCALE, MASKED, HAS_CASTS, EVICTION, EXACT)  # fmt: skip
            g, p, m, v, offs = g2, p2, m2, v2, ahead
        _update_block(g, p, m, v, param, exp_avg, exp_avg_sq, cast, offs, numel, row, grad_scale,
                      HAS_SCALE, MASKED, HAS_CASTS, EVICTION, EXACT)  # fmt: skip

    @triton.jit
    def _adamw_kernel(
        # int64 [4, 5 or 7, n]: parameter, gradient, exp_avg, exp_avg_sq (, bf16 copy (, row
        # slots of a row-sparse gradient, its row width)): _addresses
        addresses,
        numels,  # int64 [n]
        scalars,  # fp32 [n, SCALARS]: see TritonAdamW._scalars
        block_tensor,  # int32 [programs]: the tensor of each program's block
        block_start,  # int64 [programs]: the block's first element in it
        grad_scale,  # fp32 [1]: the clip coefficient (read when HAS_SCALE)
        n,
        HAS_SCALE: tl.constexpr,
        HAS_CASTS: tl.constexpr,
        HAS_SPARSE: tl.constexpr,
        BLOCK: tl.constexpr,
        SCALARS: tl.constexpr,
        SPAN: tl.constexpr,
        EVICTION: tl.constexpr,
        EXACT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        # What the compiler cannot see in loaded values: spans start at multiples of BLOCK and
        # the tensors at 16-byte boundaries (kernel_addressable), so it loads 4 floats at once.
        start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
        numel = tl.load(numels + t)
        if HAS_SCALE:  # a NaN coefficient: no update at all (a captured step's skipped loss)
            scale = tl.load(grad_scale)
            numel = tl.where(scale == scale, numel, 0)
        param = tl.multiple_of(tl.load(addresses + t).to(tl.pointer_type(tl.float32)), 16)
        grad = tl.multiple_of(tl.load(addresses + n + t).to(tl.pointer_type(tl.float32)), 16)
        exp_avg = tl.multiple_of(tl.load(addresses + 2 * n + t).to(tl.pointer_type(tl.float32)), 16)
        exp_avg_sq = tl.multiple_of(
            tl.load(addresses + 3 * n + t).to(tl.pointer_type(tl.float32)), 16
        )
        cast = tl.load(addresses + 4 * n + t) if HAS_CASTS else 0
        slots = tl.load(addresses + 5 * n + t) if HAS_SPARSE else 0
        width = tl.load(addresses + 6 * n + t) if HAS_SPARSE else 1
        row = scalars + SCALARS * t
        if start + BLOCK * SPAN <= numel:
            _adamw_span(param, grad, exp_avg, exp_avg_sq, cast, slots, width, start, numel, row,
                        grad_scale, HAS_SCALE, False, HAS_CASTS, HAS_SPARSE, BLOCK, SPAN,
                        EVICTION, EXACT)  # fmt: skip
        else:
            _adamw_span(param, grad, exp_avg, exp_avg_sq, cast, slots, width, start, numel, row,
                        grad_scale, HAS_SCALE, True, HAS_CASTS, HAS_SPARSE, BLOCK, SPAN,
                        EVICTION, EXACT)  # fmt: skip


def kernel_addressable(t: torch.Tensor) -> bool:
    """Whether the kernel can read and write `t` through its address: a plain contiguous fp32
    tensor (not a float8 or distributed tensor subclass) on a device Triton runs on, starting at
    a 16-byte boundary (the kernel's loads are 16 bytes wide; a view into a buffer may not)."""
    return (
        type(t) is torch.Tensor
        and t.dtype == torch.float32
        and t.is_contiguous()
        and t.data_ptr() % 16 == 0
        and triton_runs_on(t.device)
    )


def _block_tables(numels: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_tensor, block_start): program i updates elements block_start[i] ... + BLOCK * SPAN
    of tensor block_tensor[i]."""
    span = BLOCK * SPAN
    blocks = torch.tensor([-(-n // span) for n in numels])
    first = torch.cumsum(blocks, 0) - blocks  # each tensor's first program
    tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks)
    start = (torch.arange(int(blocks.sum())) - first[tensor]) * span
    return tensor.to(device, torch.int32), start.to(device, torch.int64)


class TritonAdamW(torch.optim.AdamW):
    """torch's AdamW (same hyperparameters, state and checkpoints) updated by one Triton kernel
    over all parameters; the module docstring says how."""

    folds_grad_scale = True  # step(grad_scale=...): clip_and_step hands it the coefficient
    reads_row_sparse_grads = True  # toolkit.row_sparse_grad's, in the kernel or made whole

    def __init__(self, params: Iterable, **kwargs: object) -> None:
        super().__init__(params, **kwargs, foreach=False)
        if any(g["amsgrad"] or g["maximize"] for g in self.param_groups):
            raise NotImplementedError("TritonAdamW: amsgrad and maximize are not supported")
        self._tables: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self._told_eager = False  # the log line about the eager update, once
        self._graph: dict | None = None  # capture(): the fixed tables of a captured step
        self._last_params: list[tuple] = []  # (param, group) the last eager step updated
        self._casts: UpdatedCasts | None = None  # write_casts(): the bf16 copies to write

    def write_casts(self, casts: UpdatedCasts) -> None:
        """Have every update also write the bf16 copies `casts` holds (train.bf16_weight_cache)
        from the new parameters, in the same pass: 2 bytes a parameter, where casting when
        the next step begins reads 4 and writes 2. Copies the kernel cannot address (see
        _cast_of) are left to the step's cast."""
        self._casts = casts

    def _cast_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The bf16 copy the kernel writes for `p`: one of write_casts()'s, contiguous, of p's
        shape and device, at a 16-byte boundary (as the parameters: the kernel stores 8 bytes at
        a time)."""
        copy = self._casts.copy_of(p) if self._casts is not None else None
        fits = (
            copy is not None
            and type(copy) is torch.Tensor
            and copy.dtype == torch.bfloat16
            and copy.is_contiguous()
            and copy.data_ptr() % 16 == 0
            and copy.shape == p.shape
            and copy.device == p.device
        )
        return copy if fits else None

    def _written(self, entries: list, casts: list) -> None:
        """Tell write_casts()'s holder which copies the update wrote (after _moved: the
        parameters' version counters as the next step will find them)."""
        if self._casts is not None:
            self._casts.written([p for (p, _, _), c in zip(entries, casts) if c is not None])

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # as torch's AdamW starts one (its step on the host)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:  # restored: torch's fused AdamW keeps it on the GPU, other code as a number
            step = torch.as_tensor(state["step"])
            if step.device.type != "cpu" or step.dtype != torch.float32:
                step = step.to("cpu", torch.float32)
            state["step"] = step
        return state

    @staticmethod
    def _scalars(group: dict, step: float) -> list[float]:
        """A tensor's row of the kernel's scalars: adamw_update_'s three (1 - lr * weight_decay,
        lr / bias_correction1, sqrt(bias_correction2)), then beta2, 1 - beta1, 1 - beta2, eps and
        a pad, as Python floats (fp32 in the table)."""
        beta1, beta2 = group["betas"]
        return [*adamw_scalars(group, step), beta2, 1 - beta1, 1 - beta2, group["eps"], 0.0]

    def _entries(self) -> list[tuple]:
        """(param, state, group) of every parameter that holds a gradient (a row-sparse one
        too), its state started."""
        return [
            (p, self._state(p), group)
            for group in self.param_groups
            for p in group["params"]
            if held_grad(p) is not None
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's, and the row-sparse gradients (toolkit.row_sparse_grad) dropped too."""
        super().zero_grad(set_to_none=set_to_none)
        clear_([p for group in self.param_groups for p in group["params"]])

    def _count_step(self, entries: list) -> list[list[float]]:
        """Count a step for each entry (its step count, on the host) and return each one's row
        of the kernel's scalars, computed once per group and step count."""
        steps = [state["step"] for _, state, _ in entries]
        torch._foreach_add_(steps, 1.0)
        return self._rows(entries, torch.stack(steps).tolist())

    def _rows(self, entries: list, steps: list[float]) -> list[list[float]]:
        """Each entry's row of the kernel's scalars at its step count, computed once per group
        and step count."""
        rows, cached = [], {}
        for (_, _, group), step in zip(entries, steps):
            key = (id(group), step)
            if key not in cached:
                cached[key] = self._scalars(group, step)
            rows.append(cached[key])
        return rows

    @torch.no_grad()
    def step(self, closure: None = None, grad_scale: torch.Tensor | None = None) -> None:
        """One update; `grad_scale` (a 0-dim tensor on the parameters' device): the gradients
        are multiplied by it as they are read (the clip coefficient)."""
        if closure is not None:
            raise NotImplementedError("TritonAdamW.step takes no closure")
        if grad_scale is not None:
            grad_scale = grad_scale.to(torch.float32).reshape(1)  # as a scale of fp32 grads
        if self._graph is not None:
            return self._step_captured(grad_scale)
        entries = self._entries()
        if not entries:
            return
        self._last_params = [(p, group) for p, _, group in entries]
        rows = self._count_step(entries)
        device, kernel = entries[0][0].device, triton_imports()
        in_kernel, eager = [], []
        for i, entry in enumerate(entries):
            (in_kernel if kernel and _addressable(entry, device) else eager).append(i)
        if in_kernel:
            self._launch([entries[i] for i in in_kernel], [rows[i] for i in in_kernel], grad_scale)
        if eager and not self._told_eager:
            self._told_eager = True
            log.warning(
                "TritonAdamW: %d of %d parameters take the eager update, one kernel launch each "
                "(the kernel takes plain contiguous fp32 tensors at 16-byte boundaries on one "
                "GPU, with their gradients alike); first: %s %s",
                len(eager), len(entries), entries[eager[0]][0].dtype,
                tuple(entries[eager[0]][0].shape),
            )  # fmt: skip
        for i in eager:
            p, state, group = entries[i]
            beta1, beta2 = group["betas"]
            scalars = host_table(rows[i][:3], torch.float32, p.device)  # no wait for the GPU
            scale = None if grad_scale is None else grad_scale.to(p.device)[0]
            adamw_update_(
                p, dense(p).to(p.dtype), state["exp_avg"], state["exp_avg_sq"], scalars, beta1,
                beta2, group["eps"], scale,
            )  # fmt: skip

    def _launch(self, entries: list, rows: list, grad_scale: torch.Tensor | None) -> None:
        device = entries[0][0].device
        casts = [self._cast_of(p) for p, _, _ in entries]
        addresses = _addresses(entries, casts)
        tables = self._address_tables(entries, addresses)
        _run_kernel(tables, host_table(rows, torch.float32, device), grad_scale, len(entries),
                    *_flags(addresses))  # fmt: skip
        _moved(entries)
        self._written(entries, casts)

    def _address_tables(self, entries: list, addresses: list) -> tuple[torch.Tensor, ...]:
        """(addresses, numels, block_tensor, block_start) on the device for `entries`, their
        `addresses` (_addresses) copied there."""
        device = entries[0][0].device
        numels = [p.numel() for p, _, _ in entries]
        key = (str(device), BLOCK * SPAN, tuple(numels))
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, *_block_tables(numels, device))
        _, block_tensor, block_start = self._tables
        return (
            host_table(addresses, torch.int64, device),
            host_table(numels, torch.int64, device),
            block_tensor,
            block_start,
        )

    # A step captured in a CUDA graph (toolkit.step_graph): the replay runs only the kernel, so
    # what the host computes each step, the step counts and the scalars (lr, bias corrections),
    # moves to stage(), called before each replay. The gradients are autograd's own, as in eager
    # steps (set to None after each step, made anew by the backward): inside the capture they
    # come from the graph's memory pool, where every replay writes them again, so the address
    # table is written once, outside the graph, by the first stage() after the capture.

    def capture(self) -> None:
        """Make the steps from now on replayable. The parameters the last step updated (every
        tensor one the kernel addresses), their moments and the device tables are fixed here;
        each step from now on must update the same parameters, and the moments must stay where
        they are (a restored optimizer state needs a new capture); so must the bf16 copies the
        update writes (write_casts)."""
        params = self._last_params
        if not params:
            raise RuntimeError("TritonAdamW.capture: no step has run yet")
        entries = [(p, self._state(p), group) for p, group in params]
        device = entries[0][0].device
        unfit = [tuple(entry[0].shape) for entry in entries
                 if not all(kernel_addressable(t) and t.device == device
                            for t in _updated(entry))]  # fmt: skip
        if unfit or not triton_imports():
            raise RuntimeError(
                "TritonAdamW.capture: a captured step runs only the kernel, which cannot "
                f"address {len(unfit)} parameters (first: {unfit[:1]}) (plain contiguous fp32 "
                "tensors at 16-byte boundaries on one GPU)"
            )
        numels = [p.numel() for p, _, _ in entries]
        casts = [self._cast_of(p) for p, _, _ in entries]
        self._graph = {
            "entries": entries,
            "casts": casts,
            "moments": _state_pointers(entries, casts),
            # All 7 rows _addresses may write; which are used depends on the captured step's
            # gradients (row-sparse ones or not).
            "addresses": torch.zeros((7, len(entries)), dtype=torch.int64, device=device),
            "numels": host_table(numels, torch.int64, device),
            "blocks": _block_tables(numels, device),
            "scalars": torch.zeros((len(entries), SCALARS), dtype=torch.float32, device=device),
            "pending": None,  # the addresses of a captured step, for stage() to write
            # the casts' holder as capture() found it and the step counts on the host: stage()
            # reads these instead of the 267 (the 800M's) tensors each
            "casts_holder": (self._casts, 0 if self._casts is None else self._casts.generation),
            "steps": torch.stack([state["step"] for _, state, _ in entries]).tolist(),
        }

    def stage(self) -> None:
        """Before a captured step's replay: count the step and write its scalars (the groups'
        lr as they are now) to the device table the kernel reads, on the current stream; after
        the capture, its gradients' addresses too. What can wait for the replay to be queued
        is settle()'s: the host's time here is the GPU's idle time when a step starts (4.4 ms
        of a micro-batch-4 step of the 800M on an H100, RESULTS.md 2026-12-07 night)."""
        graph = self._graph
        # self.state[p], not _state(p): a state restored since capture() has new tensors,
        # which the check below refuses
        entries = graph["entries"] = [(p, self.state[p], g) for p, _, g in graph["entries"]]
        casts = graph["casts"]
        holder, generation = graph["casts_holder"]
        if self._casts is not holder or (holder is not None and holder.generation != generation):
            casts = [self._cast_of(p) for p, _, _ in entries]  # copies made since capture()
        if _state_pointers(entries, casts) != graph["moments"]:
            raise RuntimeError(
                "TritonAdamW: a parameter, moment or bf16 copy moved since capture() (a "
                "restored state?): the captured step would update the old ones; capture anew"
            )
        graph["steps"] = [step + 1 for step in graph["steps"]]  # the tensors in settle()
        rows = self._rows(entries, graph["steps"])
        scalars = graph["scalars"]
        scalars.copy_(host_table(rows, torch.float32, scalars.device), non_blocking=True)
        pending, graph["pending"] = graph["pending"], None
        if pending is not None:
            addresses = host_table(pending, torch.int64, scalars.device)
            graph["addresses"][: len(pending)].copy_(addresses, non_blocking=True)

    def settle(self) -> None:
        """After stage() and the step it staged was queued (a replay, or the body run eagerly):
        the step counted in the state's tensors (torch's AdamW's, for checkpoints), and what
        the update wrote through its addresses, which torch does not see, marked as written."""
        graph = self._graph
        entries = graph["entries"]
        torch._foreach_add_([state["step"] for _, state, _ in entries], 1.0)
        _moved(entries)
        self._written(entries, graph["casts"])

    def unstage(self) -> None:
        """Take back the last step's count (stage()'s, or an eager step's), for a step whose
        update the kernel skipped: its coefficient NaN, from clip_and_queue_step with a
        non-finite loss."""
        last = self._graph["entries"] if self._graph is not None else self._last_params
        torch._foreach_add_([self._state(p)["step"] for p, *_ in last], -1.0)
        if self._graph is not None:
            self._graph["steps"] = [step - 1 for step in self._graph["steps"]]

    def _step_captured(self, grad_scale: torch.Tensor | None) -> None:
        graph = self._graph
        entries = graph["entries"]
        now = self._entries()
        if [p for p, _, _ in now] != [p for p, _, _ in entries]:
            raise RuntimeError(
                f"TritonAdamW: a captured step must update the parameters of capture() "
                f"({len(entries)}); {len(now)} hold gradients now"
            )
        device = entries[0][0].device
        unfit = [tuple(e[0].shape) for e in now if not _addressable(e, device)]
        if unfit:
            raise RuntimeError(f"TritonAdamW: a captured step's gradients must be plain "
                               f"contiguous fp32 tensors on the GPU (first: {unfit[0]})")  # fmt: skip
        addresses = _addresses(now, graph["casts"])
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            graph["pending"] = addresses  # no host copies inside a capture: stage() writes them
        else:  # the body run eagerly (no CUDA): its gradients are new each call
            written = graph["addresses"][: len(addresses)]
            written.copy_(host_table(addresses, torch.int64, device))
        tables = (graph["addresses"], graph["numels"], *graph["blocks"])
        _run_kernel(tables, graph["scalars"], grad_scale, len(entries), *_flags(addresses))


def _updated(entry: tuple) -> tuple[torch.Tensor, ...]:
    """What the kernel writes of an entry (param, state, group): the parameter and both
    moments."""
    p, state, _ = entry
    return p.data, state["exp_avg"], state["exp_avg_sq"]


def _state_pointers(entries: list, casts: list) -> list[int]:
    """Where each entry's parameter, moments and bf16 copy (0: none) are: what a captured step
    writes. (The parameter's own data_ptr: _updated's p.data makes a tensor a call, and stage()
    asks this before every replay: 0.10 against 0.22 ms for 267 parameters on a CPU.)"""
    moments = [
        t.data_ptr() for p, state, _ in entries for t in (p, state["exp_avg"], state["exp_avg_sq"])
    ]
    return moments + [0 if c is None else c.data_ptr() for c in casts]


def _addresses(entries: list, casts: list) -> list[list[int]]:
    """The kernel's address table as rows: parameters, gradients (a row-sparse one's sums),
    exp_avg, exp_avg_sq; where any entry has a bf16 copy to write or a row-sparse gradient, the
    copies (0: none); where any has a row-sparse gradient, its slots (0: a dense gradient) and
    the width of its rows."""
    rows = [[t.data_ptr() for t in column] for column in zip(*map(_tensors, entries))]
    sparse = [held_rows(p) if p.grad is None else None for p, _, _ in entries]
    if any(c is not None for c in casts) or any(s is not None for s in sparse):
        rows.append([0 if c is None else c.data_ptr() for c in casts])
    if any(s is not None for s in sparse):
        rows.append([0 if s is None else s.slots.data_ptr() for s in sparse])
        # A row-sparse gradient's parameter is a 2-D table (_addressable): its rows' width.
        rows.append([0 if s is None else p.size(1) for s, (p, _, _) in zip(sparse, entries)])
    return rows


def _flags(addresses: list) -> tuple[bool, bool]:
    """The kernel's HAS_CASTS and HAS_SPARSE for an address table (_addresses): whether any
    entry has a bf16 copy (a fifth row not all 0) and whether any has a row-sparse gradient
    (a sixth row)."""
    return len(addresses) > 4 and any(addresses[4]), len(addresses) > 5


def _tensors(entry: tuple) -> tuple[torch.Tensor, ...]:
    """What the kernel reads and writes of an entry: the parameter, its gradient (a row-sparse
    one's sums) and both moments (the address table's rows, in this order)."""
    param, exp_avg, exp_avg_sq = _updated(entry)
    return param, held_grad(entry[0]), exp_avg, exp_avg_sq


def _addressable(entry: tuple, device: torch.device) -> bool:
    """Whether the kernel takes an entry: its tensors all kernel_addressable, on `device`; a
    row-sparse gradient's sums of the parameter's row width and slots on `device` too."""
    p = entry[0]
    if not (p.device == device and all(map(kernel_addressable, _tensors(entry)))):
        return False
    sparse = held_rows(p) if p.grad is None else None
    return sparse is None or (
        p.dim() == 2
        and sparse.sums.shape[1:] == p.shape[1:]
        and sparse.slots.shape == (p.size(0),)
        and sparse.slots.is_contiguous()
        and sparse.slots.device == device
        and sparse.slots.dtype == torch.int32
    )


def _run_kernel(tables: tuple, scalars: torch.Tensor, grad_scale: torch.Tensor | None, n: int,
                has_casts: bool, has_sparse: bool) -> None:  # fmt: skip
    addresses, numels, block_tensor, block_start = tables
    _adamw_kernel[(block_tensor.numel(),)](
        addresses,
        numels,
        scalars,
        block_tensor,
        block_start,
        grad_scale if grad_scale is not None else block_start,  # not read without a scale
        n,
        HAS_SCALE=grad_scale is not None,
        HAS_CASTS=has_casts,
        HAS_SPARSE=has_sparse,
        BLOCK=BLOCK,
        SCALARS=SCALARS,
        SPAN=SPAN,
        EVICTION="evict_first" if STREAM else "",
        EXACT=EXACT,
        num_warps=NUM_WARPS,
    )


def _moved(entries: list) -> None:
    """Written through their addresses, which torch does not see: bump the version counters
    as an in-place op would (caches keyed on them, e.g. Mamba2Mixer.decode_A, would otherwise
    keep values from before the update)."""
    torch.autograd.graph.increment_version(
        [t for p, s, _ in entries for t in (p, s["exp_avg"], s["exp_avg_sq"])]
    )
