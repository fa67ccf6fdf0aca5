"""Megatron-style tensor parallelism for HybridLM, applied in place from outside the model.

Every mixer becomes column-parallel in, row-parallel out: its input passes through `copy_to_tp`
(identity forward, all-reduce of the gradient backward) and its output through `reduce_from_tp`
(all-reduce forward, identity backward). The mixers keep their own code: they are simply given
their rank's slice of heads, groups and channels.

- Mamba-2: by sharding.py's MAMBA_LAYOUT: in_proj rows and conv1d channels per component,
  A_log, D, dt_bias and the gated norm by heads/groups, out_proj by columns. The group-wise norm
  needs no communication because every group lives on one rank.
- Attention: linear_qkv rows by whole KV groups (its rows are grouped), linear_proj by columns.
- MLP: linear_fc1 rows (SwiGLU: gate and up separately), linear_fc2 columns.
- Embedding and output layer: vocab-parallel; the loss is `vocab_parallel_cross_entropy`.
Norms stay replicated; their gradients are identical on every TP rank.

Sequence parallelism (Megatron's, `sequence_parallel=True`): between the mixers, the residual
stream and the norms hold only this rank's 1/TP of the sequence. The all-reduce around each mixer
becomes an all-gather along the sequence before it (so the Mamba conv and scan, and attention,
see the whole sequence of their heads) and a reduce-scatter after it; the embedding's all-reduce
becomes a reduce-scatter and the output layer gathers the sequence back. The same bytes travel,
and the activations outside the mixers shrink TP-fold. Each rank's norm gradients then cover only
its part of the sequence: they are marked `_sequence_parallel` and summed over TP after the
backward pass (`reduce_sequence_parallel_grads`).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from toolkit.grad_accumulation import embedding_into_grad
from toolkit.loss import blockwise_cross_entropy
from toolkit.model.attention import Attention
from toolkit.model.hybrid import HybridLM
from toolkit.model.mamba2 import Mamba2Mixer
from toolkit.model.mlp import MLP
from toolkit.parallel.sharding import mamba_components, shard_indices


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _staged(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """gloo runs these collectives on host memory: CUDA tensors go through the host (two ranks
    sharing one GPU, where NCCL refuses). NCCL takes them where they are."""
    return t.cpu() if t.is_cuda and dist.get_backend(group) == "gloo" else t


def _gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s/TP, ...] on each rank -> [b, s, ...], the ranks' pieces in rank order."""
    local = _staged(x.transpose(0, 1).contiguous(), group)  # the collectives work along dim 0
    out = local.new_empty((local.shape[0] * dist.get_world_size(group), *local.shape[1:]))
    dist.all_gather_into_tensor(out, local, group=group)
    return out.to(x.device).transpose(0, 1).contiguous()


def _reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, s, ...] partial sums on each rank -> this rank's [b, s/TP, ...] of their sum."""
    full = _staged(x.transpose(0, 1).contiguous(), group)
    out = full.new_empty((full.shape[0] // dist.get_world_size(group), *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.to(x.device).transpose(0, 1).contiguous()


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_sequence(grad, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_sequence(grad, ctx.group), None


def gather_from_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather along the sequence (dim 1); the backward pass reduce-scatters the gradient."""
    return _GatherFromSP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over TP and keep this rank's part of the sequence (dim 1); backward all-gathers."""
    return _ScatterToSP.apply(x, group)


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def _shard(param: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """This rank's slice of `param`, remembering where it came from (`_tp_dim`, `_tp_index`:
    global positions along dim) so state can be gathered to, and cut from, the global tensor."""
    shard = nn.Parameter(param.detach().index_select(dim, index.to(param.device)).clone())
    shard._tp_dim, shard._tp_index = dim, index
    if getattr(param, "_no_weight_decay", False):
        shard._no_weight_decay = True
    return shard


def _keep_rows(module: nn.Module, rows: torch.Tensor | slice, attr: str = "weight") -> None:
    param = getattr(module, attr)
    if isinstance(rows, slice):
        rows = torch.arange(param.shape[0])[rows]
    setattr(module, attr, _shard(param, 0, rows))
    if isinstance(module, nn.Linear):
        module.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor | slice, attr: str = "weight") -> None:
    if isinstance(columns, slice):
        columns = torch.arange(linear.weight.shape[1])[columns]
    setattr(linear, attr, _shard(getattr(linear, attr), 1, columns))
    linear.in_features = linear.weight.shape[1]


def _even(size: int, tp: int, rank: int) -> slice:
    part = size // tp
    return slice(rank * part, (rank + 1) * part)


def shard_mamba(m: Mamba2Mixer, tp: int, rank: int) -> None:
    for name, (dim, components) in mamba_components(m).items():
        path, _, attr = name.rpartition(".")
        keep = _keep_rows if dim == 0 else _keep_columns
        keep(m.get_submodule(path), shard_indices(components, tp, rank), attr)
    m.d_inner //= tp
    m.num_heads //= tp
    m.num_groups //= tp
    m.norm.groups //= tp
    m.conv_dim = m.d_inner + 2 * m.num_groups * m.d_state
    m.conv1d.in_channels = m.conv1d.out_channels = m.conv1d.groups = m.conv_dim
    m.split_sizes = [m.d_inner, m.conv_dim, m.num_heads]


def shard_attention(a: Attention, tp: int, rank: int) -> None:
    rows_per_group = (a.heads_per_group + 2) * a.head_dim
    groups = _even(a.num_groups, tp, rank)
    _keep_rows(
        a.linear_qkv, torch.arange(groups.start * rows_per_group, groups.stop * rows_per_group)
    )
    _keep_columns(a.linear_proj, _even(a.num_heads * a.head_dim, tp, rank))
    a.num_heads //= tp
    a.num_groups //= tp


def shard_mlp(m: MLP, tp: int, rank: int) -> None:
    ffn = m.linear_fc2.in_features
    if m.activation == "swiglu":
        rows = shard_indices([("gate", ffn), ("up", ffn)], tp, rank)
    else:
        rows = _even(ffn, tp, rank)
    _keep_rows(m.linear_fc1, rows)
    _keep_columns(m.linear_fc2, _even(ffn, tp, rank))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [vocab_start, vocab_start + rows) of the embedding; ids elsewhere give
    zeros here and are filled in by the all-reduce over TP (with sequence parallelism, a
    reduce-scatter that leaves this rank its part of the sequence). `weight_grad_into_grad`
    (train.fused_grad_accumulation): the weight gradient added into `.grad` once there is one
    (toolkit.grad_accumulation.embedding_into_grad)."""

    weight_grad_into_grad = False

    def __init__(
        self,
        weight: torch.Tensor,
        vocab_start: int,
        group: dist.ProcessGroup,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight)
        self.weight = weight  # keep the parameter itself: it carries the shard placement
        self.vocab_start, self.group = vocab_start, group
        self.combine = scatter_to_sp if sequence_parallel else reduce_from_tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        lookup = embedding_into_grad if self.weight_grad_into_grad else F.embedding
        out = lookup(local.masked_fill(outside, 0), self.weight)
        return self.combine(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    group: dist.ProcessGroup,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy from vocab-sharded logits [b, l, V/TP] without gathering them; ids at
    or past `vocab_size` (padding) take no probability (toolkit/loss.py)."""
    return blockwise_cross_entropy(logits, labels, vocab_size, vocab_start=vocab_start, group=group)


def apply_tp(
    model: HybridLM,
    *,
    group: dist.ProcessGroup,
    tp: int,
    rank: int,
    sequence_parallel: bool = False,
) -> int:
    """Shard `model` in place for TP rank `rank` of `tp`; returns this rank's first vocab id.
    With `sequence_parallel`, the model takes the whole sequence of tokens and returns the whole
    sequence of (vocab-parallel) logits, but runs its residual stream on 1/TP of it."""
    if tp == 1:
        return 0
    shard = {Mamba2Mixer: shard_mamba, Attention: shard_attention, MLP: shard_mlp}
    # Into a mixer: the full sequence of the (replicated) input, its gradient summed over TP.
    # Out of it: the sum of the ranks' partial outputs, whole or this rank's part of the sequence.
    into, out_of = (
        (gather_from_sp, scatter_to_sp) if sequence_parallel else (copy_to_tp, reduce_from_tp)
    )
    for block in model.layers:
        shard[type(block.mixer)](block.mixer, tp, rank)
        block.mixer.register_forward_pre_hook(lambda mod, args: (into(args[0], group), *args[1:]))
        block.mixer.register_forward_hook(lambda mod, args, out: out_of(out, group))
    vocab = _even(model.padded_vocab_size, tp, rank)
    weight = _shard(model.embedding.weight, 0, torch.arange(vocab.start, vocab.stop))
    model.embedding = VocabParallelEmbedding(weight, vocab.start, group, sequence_parallel)
    _keep_rows(model.output_layer, vocab)
    # Each rank's logits see only its vocab slice: sum their input gradients across TP.
    model.output_layer.register_forward_pre_hook(lambda mod, args: (into(args[0], group),))
    if sequence_parallel:
        norms = [block.norm for block in model.layers] + [model.final_norm]
        for p in (p for norm in norms for p in norm.parameters()):
            p._sequence_parallel = True
    return vocab.start


def reduce_sequence_parallel_grads(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Sum over TP the gradients of the parameters that saw only this rank's part of the sequence
    (the norms, under sequence parallelism), in one all-reduce."""
    grads = [
        p.grad for p in params if getattr(p, "_sequence_parallel", False) and p.grad is not None
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
