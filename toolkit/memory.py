"""How much memory one rank of a recipe needs, before anything is launched.

    python -m toolkit.config recipes/8b_hybrid.toml --world-size 8     # prints this plan

Per pipeline stage (the TP ranks of a stage are alike): parameters, then the bytes of weights
(fp32 master copies), gradients (fp32), AdamW's two moments (divided over DP with ZeRO-1),
the activations that micro-batches in flight keep for the backward pass, and the logits with
their gradient. The activations are not a formula: each block kind is built at its real
(TP-sharded) shapes under torch's FakeTensorMode, which allocates nothing, and run forward on
one micro-batch under bf16 autocast while saved-tensor hooks add up what autograd keeps. So the
numbers follow the code, sequence parallelism (norms on 1/TP of the sequence) and activation
checkpointing (a block keeps only its input) included. On GPUs the kernels differ from the CPU
reference: `target="cuda"` traces mamba-ssm's fused Mamba-2 op and flash attention by what
they keep (stand-ins below, from their save_for_backward lists), not the reference's chunked
scan and attention matrix.

The peak is taken as weights + optimizer state + the larger of (activations + logits and their
gradient, + gradients when micro-batches accumulate) and gradients alone (the optimizer step).
Gradients grow while activations are freed, so this errs high by at most the gradients.
"""

import contextlib
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from toolkit.activation_checkpoint import selected_kinds
from toolkit.config import ModelConfig, Recipe
from toolkit.model import HybridLM
from toolkit.model.hybrid import Block, build_mixer, residual_stream
from toolkit.model.norms import build_norm
from toolkit.parallel import pp as pipeline
from toolkit.parallel import tp as tensor_parallel
from toolkit.parallel.runtime import cross_entropy

GiB = 2**30


@dataclass
class StageMemory:
    stage: int
    layers: str  # this stage's pattern
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # all micro-batches this stage holds at once
    logits: int  # logits and their gradient (last stage)
    in_flight: int
    accumulating: bool

    @property
    def peak(self) -> int:
        during_backward = self.activations + self.logits
        if self.accumulating:
            during_backward += self.gradients
        return self.weights + self.optimizer + max(during_backward, self.gradients)

    def terms(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer state": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
        }


class _SavedBytes:
    """Bytes autograd keeps for backward while active, each storage counted once."""

    def __init__(self) -> None:
        self.total, self._seen = 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t.untyped_storage()) if not isinstance(t, nn.Parameter) else None
        if key is not None and key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "_SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Keeps(torch.autograd.Function):
    """Stand-in for a fused GPU kernel: returns `out` and keeps `kept` for backward."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, *kept: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*kept)
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never called: the trace only runs forward
        raise NotImplementedError


def _fused_mamba_forward(self: nn.Module, u: torch.Tensor, state: object = None) -> torch.Tensor:
    """What `mamba_split_conv1d_scan_combined` keeps: its input zxbcdt, the scan's output
    (out_x) and the norm's rstd per group; out_proj keeps its own input. Without
    model.mamba_recompute (fused_mamba.py) also the conv's output, the states passed into
    each chunk (in the activations' dtype; fp32 without its LOWP_STATES) and, in fp32, dt after
    its softplus, dA's sums within each chunk and C Bt."""
    from toolkit.model import fused_mamba

    zxbcdt = self.in_proj(u)
    b, length, _ = u.shape
    y = zxbcdt.new_empty(b, length, self.d_inner)
    rstd = torch.empty(b * length * self.num_groups, dtype=torch.float32, device=u.device)
    kept = [zxbcdt, y.new_empty(y.shape), rstd]
    if not self.recompute:
        chunks = -(-length // self.chunk_size)
        fp32 = dict(dtype=torch.float32, device=u.device)
        heads, p, n = self.num_heads, self.head_dim, self.d_state
        kept += [
            y.new_empty(b, length, self.conv_dim),
            y.new_empty(b, chunks, heads, p, n, dtype=fused_mamba.kept_states_dtype(y)),
            torch.empty(b, heads, chunks, self.chunk_size, **fp32),
            torch.empty(b, heads, chunks, self.chunk_size, **fp32),
            torch.empty(b, chunks, self.num_groups, self.chunk_size, self.chunk_size, **fp32),
        ]
    return self.out_proj(_Keeps.apply(y, *kept))


def _flash_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **_):
    """What flash / cuDNN attention keeps: q, k, v, the output and a fp32 log-sum-exp per row."""
    out = q.new_empty(q.shape)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return _Keeps.apply(out, q, k, v, out.new_empty(out.shape), lse)


@contextlib.contextmanager
def _gpu_kernels(block: Block, fused_mamba: bool):
    if block.kind == "M" and fused_mamba:
        block.mixer.forward = types.MethodType(_fused_mamba_forward, block.mixer)
    real, F.scaled_dot_product_attention = F.scaled_dot_product_attention, _flash_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _sharded_block(kind: str, cfg: ModelConfig, tp: int) -> Block:
    """A fresh block of `kind` cut to TP rank 0's widths (every rank's are the same)."""
    block = Block(kind, build_mixer(kind, cfg), build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps))
    shard = {
        "M": tensor_parallel.shard_mamba,
        "*": tensor_parallel.shard_attention,
        "-": tensor_parallel.shard_mlp,
    }
    if tp > 1:
        shard[kind](block.mixer, tp, 0)
    return block


def _block_activations(
    block: Block, batch: int, seq: int, local_seq: int, hidden: int, residual: torch.dtype
) -> int:
    """Saved bytes of one block's forward at TP-sharded widths: the norm on this rank's part of
    the sequence, the mixer on all of it (its input gathered under sequence parallelism)."""
    x = torch.empty(batch, local_seq, hidden, dtype=residual, requires_grad=True)
    with _SavedBytes() as saved:
        normed = block.norm(x)
        if local_seq != seq:
            normed = normed.new_empty(batch, seq, hidden).requires_grad_()
        block.mixer(normed)
    return saved.total


def plan_memory(recipe: Recipe, world_size: int, *, target: str = "cuda") -> list[StageMemory]:
    """One StageMemory per pipeline stage for `world_size` ranks; `target` is the device kind
    whose kernels run ('cuda': flash attention, and mamba-ssm's fused op unless
    model.kernels='reference'; 'cpu': the reference code)."""
    m, t, par = recipe.model, recipe.train, recipe.parallel
    tp, pp = par.tp, par.pp
    dp = world_size // (tp * pp)
    sp = par.sequence_parallel and tp > 1
    batch, seq = t.micro_batch_size, m.seq_length
    local_seq = seq // tp if sp else seq
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    checkpointed = selected_kinds(t.activation_checkpointing)
    from toolkit.build import tokenizer_from_recipe  # local: build imports the data stack

    vocab = m.vocab_size or tokenizer_from_recipe(recipe).vocab_size
    half = t.precision != "fp32"  # fp8 traced as bf16: float8 keeps less, so this errs high
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if half else contextlib.nullcontext()
    with FakeTensorMode(), autocast:
        # The stream's dtype by the model's own rule: bf16 under autocast without fp32_residual.
        residual = residual_stream(torch.empty(0), m.fp32_residual).dtype
        model = HybridLM(m, vocab, tp=tp)
        per_kind: dict[str, int] = {}
        for kind in sorted(set(model.layout.pattern)):
            block = _sharded_block(kind, m, tp)
            gpu = _gpu_kernels(block, fused_mamba=m.kernels != "reference")
            with gpu if target == "cuda" else contextlib.nullcontext():
                per_kind[kind] = _block_activations(
                    block, batch, seq, local_seq, m.hidden_size, residual
                )
        last = _last_stage_activations(model, batch, seq, local_seq, tp, vocab, residual)
    # What a checkpointed block keeps: its input.
    block_input = batch * local_seq * m.hidden_size * residual.itemsize

    stages = []
    ranges = pipeline.stage_ranges(model, pp)
    for index, layers in enumerate(ranges):
        kinds = [model.layers[i].kind for i in layers]
        kept = sum(block_input if k in checkpointed else per_kind[k] for k in kinds)
        # A checkpointed block recomputes its activations during backward: the largest once.
        recomputed = max((per_kind[k] for k in kinds if k in checkpointed), default=0)
        params = _stage_parameters(model, layers, index, pp, tp)
        is_last = index == pp - 1
        activations, logits = kept, 0
        if is_last:
            activations += last["saved"]
            logits = last["logits"]  # their gradient, written once by the loss's backward
        # 1F1B: stage i holds up to PP - i micro-batches; without PP, one.
        in_flight = min(pp - index, micro_batches) if pp > 1 else 1
        sharded_state = par.shard_optimizer and dp > 1
        stages.append(
            StageMemory(
                stage=index,
                layers="".join(kinds),
                parameters=params,
                weights=4 * params,
                gradients=4 * params,
                optimizer=8 * params // (dp if sharded_state else 1),
                activations=activations * in_flight + recomputed,
                logits=logits,
                in_flight=in_flight,
                accumulating=micro_batches > 1,
            )
        )
    return stages


def _last_stage_activations(
    model: HybridLM,
    batch: int,
    seq: int,
    local_seq: int,
    tp: int,
    vocab: int,
    residual: torch.dtype,
) -> dict[str, int]:
    """The final norm (on this rank's part of the sequence), the output layer's rows of this
    rank and the loss: what they keep, and the logits' gradient buffer."""
    hidden = model.cfg.hidden_size
    rows = model.padded_vocab_size // tp
    x = torch.empty(batch, local_seq, hidden, dtype=residual, requires_grad=True)
    weight = nn.Parameter(torch.empty(rows, hidden))
    labels = torch.zeros(batch, seq, dtype=torch.long)
    with _SavedBytes() as saved:
        normed = model.final_norm(x)
        if local_seq != seq:
            normed = normed.new_empty(batch, seq, hidden).requires_grad_()
        logits = F.linear(normed, weight)
        cross_entropy(logits, labels, vocab_size=min(vocab, rows))
    return {"saved": saved.total, "logits": logits.numel() * logits.element_size()}


def _stage_parameters(model: HybridLM, layers: range, index: int, pp: int, tp: int) -> int:
    """Parameters one TP rank of this stage holds: TP-split weights / TP, replicated norms."""

    def local(module: nn.Module) -> int:
        total = 0
        for name, p in module.named_parameters():
            replicated = name.endswith("norm.weight") and not name.startswith("mixer.norm")
            replicated = replicated or name.endswith("norm.bias")
            total += p.numel() if replicated else p.numel() // tp
        return total

    count = sum(local(model.layers[i]) for i in layers)
    if index == 0:
        count += model.embedding.weight.numel() // tp
    if index == pp - 1:
        count += model.output_layer.weight.numel() // tp
        count += sum(p.numel() for p in model.final_norm.parameters())
    return count


def gpu_memory_gb(configured: float = 0.0) -> float | None:
    """One GPU's memory: the configured value, else this machine's GPU, else None (unknown)."""
    if configured:
        return configured
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return None


def describe_plan(stages: list[StageMemory], capacity_gb: float | None) -> str:
    """The plan as a table, one row per pipeline stage, in GiB."""
    head = ["stage", "params", "weights", "grads", "optim", "activ", "logits", "peak"]
    lines = ["per rank (GiB):  " + "  ".join(f"{h:>8}" for h in head)]
    for s in stages:
        cells = [str(s.stage), f"{s.parameters / 1e9:.3f}B"] + [
            f"{v / GiB:.2f}" for v in (*s.terms().values(), s.peak)
        ]
        lines.append("                 " + "  ".join(f"{c:>8}" for c in cells))
    worst = max(stages, key=lambda s: s.peak)
    if capacity_gb:
        fits = worst.peak / 1e9 <= capacity_gb
        lines.append(
            f"largest peak {worst.peak / 1e9:.1f} GB of {capacity_gb:.0f} GB per GPU: "
            + ("fits" if fits else "does NOT fit")
        )
    return "\n".join(lines)


def check_fits(stages: list[StageMemory], capacity_gb: float) -> str | None:
    """None if every stage fits in `capacity_gb`, else a line naming the largest term."""
    worst = max(stages, key=lambda s: s.peak)
    if worst.peak / 1e9 <= capacity_gb:
        return None
    name, size = max(worst.terms().items(), key=lambda kv: kv[1])
    return (
        f"stage {worst.stage} needs about {worst.peak / 1e9:.1f} GB per GPU, more than "
        f"{capacity_gb:.0f} GB; the largest term is {name} ({size / 1e9:.1f} GB)"
    )
