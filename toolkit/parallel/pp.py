"""Pipeline parallelism with torch.distributed.pipelining: each PP rank keeps a contiguous range
of blocks (an even split, or the pattern's '|' markers) and runs a 1F1B (or GPipe) schedule.

Stages are given explicit input and output shapes: runtime shape inference is avoided on purpose
(it hung with gloo on the CPU machine, see DESIGN.md).
"""

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from toolkit.distributed import ParallelEnv
from toolkit.layout import split_stages
from toolkit.model import HybridLM
from toolkit.model.hybrid import residual_stream

if TYPE_CHECKING:  # imported where used: pipelining imports torch._dynamo, ~1.7 s a process
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe


class StageModule(nn.Module):
    """Blocks [start, stop) of a HybridLM, with the embedding on the first stage and the final
    norm and output layer on the last. Parameter names are the full model's."""

    def __init__(self, model: HybridLM, start: int, stop: int, num_stages: int, index: int):
        super().__init__()
        self.first, self.last = index == 0, index == num_stages - 1
        self.embedding = model.embedding if self.first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, stop)})
        self.final_norm = model.final_norm if self.last else None
        self.output_layer = model.output_layer if self.last else None
        self.fp32_residual = model.cfg.fp32_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        x = residual_stream(x, self.fp32_residual)
        for block in self.layers.values():
            x = block(x)
        if self.output_layer is not None:
            return self.output_layer(self.final_norm(x))
        # Between stages as fp32, the dtype of the schedule's buffers: exact for a bf16 stream.
        return x.float()


def stage_ranges(model: HybridLM, pp: int) -> list[range]:
    stages = split_stages("|".join(model.layout.stages), pp)
    bounds, start = [], 0
    for stage in stages:
        bounds.append(range(start, start + len(stage)))
        start += len(stage)
    return bounds


def build_pipeline(
    model: HybridLM,
    env: ParallelEnv,
    *,
    loss_fn,
    micro_batch_size: int,
    micro_batches: int,
    seq_length: int,
    logits_dtype: torch.dtype,
    sequence_shards: int = 1,
) -> "tuple[StageModule, Schedule1F1B | ScheduleGPipe]":
    """This rank's stage of `model` (already tensor-parallel if TP > 1) and its schedule. Between
    stages, activations hold 1/`sequence_shards` of the sequence (TP under sequence parallelism);
    the tokens in and the logits out hold all of it."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    index = env.pp_rank
    layers = stage_ranges(model, env.pp)[index]
    stage_module = StageModule(model, layers.start, layers.stop, env.pp, index)
    # The example tensors' requires_grad is part of the metadata: activations carry gradients.
    hidden = torch.empty(
        micro_batch_size,
        seq_length // sequence_shards,
        model.cfg.hidden_size,
        device=env.device,
        requires_grad=True,
    )
    tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long, device=env.device)
    local_vocab = model.output_layer.weight.shape[0]
    logits = torch.empty(
        micro_batch_size,
        seq_length,
        local_vocab,
        dtype=logits_dtype,
        device=env.device,
        requires_grad=True,
    )
    stage = PipelineStage(
        stage_module,
        index,
        env.pp,
        env.device,
        input_args=tokens if stage_module.first else hidden,
        output_args=logits if stage_module.last else hidden,
        group=env.group("pp"),
    )
    # 1F1B bounds activation memory to PP micro-batches in flight; it needs at least PP of them.
    schedule_cls = Schedule1F1B if micro_batches >= env.pp else ScheduleGPipe
    schedule = schedule_cls(stage, n_microbatches=micro_batches, loss_fn=loss_fn, scale_grads=True)
    return stage_module, schedule


@torch.no_grad()
def pipeline_forward(
    stage: StageModule,
    env: ParallelEnv,
    tokens: torch.Tensor,
    hidden_size: int,
    autocast,
    sequence_shards: int = 1,
) -> torch.Tensor | None:
    """Forward only, one micro-batch through every stage in turn (validation needs no schedule):
    each stage receives the previous one's activations (1/`sequence_shards` of the sequence), runs
    its blocks and sends them on. Returns the logits on the last stage, None on the others.
    Activations travel as fp32."""
    group = env.group("pp")
    index = env.pp_rank
    if stage.first:
        x = tokens
    else:
        batch, length = tokens.shape
        x = torch.empty(
            batch, length // sequence_shards, hidden_size, device=tokens.device, dtype=torch.float32
        )
        dist.recv(x, src=dist.get_global_rank(group, index - 1), group=group)
    with autocast():
        out = stage(x)
    if stage.last:
        return out
    dist.send(out.float().contiguous(), dst=dist.get_global_rank(group, index + 1), group=group)
    return None
