"""HybridLM: embedding -> blocks of 'M' (Mamba-2) | '*' (attention) | '-' (MLP) -> norm -> output.

Every block is x + mixer(norm(x)). No position embedding (RoPE only for the GPT baseline), no
biases in linear layers, untied input and output embeddings. Parameter names follow Megatron's
where they can (`embedding`, `layers.{i}.mixer.in_proj`, `final_norm`, `output_layer`).
"""

import math
from typing import Any

import torch
from torch import nn

from toolkit.config import ModelConfig, padded_vocab_size
from toolkit.layout import build_layout
from toolkit.model.attention import Attention, Rotary
from toolkit.model.kernels import fused_mamba_conv, select_ssd
from toolkit.model.mamba2 import Mamba2Mixer
from toolkit.model.mlp import MLP
from toolkit.model.norms import add_norm, build_norm, compute_dtype
from toolkit.model.states import DecodeStates


class Block(nn.Module):
    def __init__(self, kind: str, mixer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.kind = kind  # 'M', '*' or '-'
        self.norm = norm
        self.mixer = mixer

    def forward(self, x: torch.Tensor, state: Any = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state)


def residual_stream(x: torch.Tensor, fp32: bool) -> torch.Tensor:
    """The embedding's output as the residual stream. Under autocast the embedding writes fp32
    and each block's x + mixer(...) stays fp32 (model.fp32_residual); without that key it is
    rounded once to autocast's dtype here, and every block's sum is then in that dtype, as in
    Megatron's bf16 runs. The norms still compute in fp32."""
    return x if fp32 else x.to(compute_dtype(x))


def build_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "M":
        conv = fused_mamba_conv(cfg.kernels, cfg.mamba_conv_backend, cfg.mamba_conv_kernel)
        return Mamba2Mixer(
            cfg.hidden_size,
            d_state=cfg.mamba_state_dim,
            head_dim=cfg.mamba_head_dim,
            num_groups=cfg.mamba_num_groups,
            expand=cfg.mamba_expand,
            d_conv=cfg.mamba_conv_kernel,
            chunk_size=cfg.mamba_chunk_size,
            norm_eps=cfg.norm_eps,
            ssd=select_ssd(cfg.kernels),
            fused=conv is not None,
            conv_backend=conv or "causal_conv1d",
            recompute=cfg.mamba_recompute,
        )
    if kind == "*":
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        rotary = None
        if cfg.position_embedding == "rope":
            rotary = Rotary(head_dim, cfg.rotary_percent, cfg.rotary_base)
        return Attention(
            cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_groups=cfg.num_query_groups,
            rotary=rotary,
        )
    if kind == "-":
        return MLP(cfg.hidden_size, cfg.ffn_size, cfg.mlp_activation)
    raise ValueError(f"unknown layer symbol {kind!r}")


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, tp: int = 1) -> None:
        """`vocab_size` is the tokenizer's; the embedding is padded to a multiple of 128 x TP."""
        super().__init__()
        self.cfg = cfg
        self.layout = build_layout(cfg.num_layers, cfg.att_ratio, cfg.mlp_ratio, cfg.pattern)
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
        self.embedding = nn.Embedding(self.padded_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(kind, build_mixer(kind, cfg), build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps))
            for kind in self.layout.pattern
        )
        self.final_norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.output_layer = nn.Linear(cfg.hidden_size, self.padded_vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, std) for embedding and linears; residual-output projections get
        std / sqrt(2 * num_layers) (Megatron's scaled init); SSM parameters as in Mamba-2."""
        std = self.cfg.init_std
        scaled = std / math.sqrt(2 * self.cfg.num_layers)
        nn.init.normal_(self.embedding.weight, std=std)
        nn.init.normal_(self.output_layer.weight, std=std)
        for block in self.layers:
            for name, module in block.mixer.named_modules():
                if isinstance(module, nn.Linear):
                    is_output = name in ("out_proj", "linear_proj", "linear_fc2")
                    nn.init.normal_(module.weight, std=scaled if is_output else std)
                elif isinstance(module, nn.Conv1d):
                    module.reset_parameters()
            if isinstance(block.mixer, Mamba2Mixer):
                block.mixer.reset_ssm_parameters()
                block.mixer.norm.reset_parameters()
            block.norm.reset_parameters()
        self.final_norm.reset_parameters()

    def allocate_states(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        ssm_dtype: torch.dtype = torch.float32,
    ) -> DecodeStates:
        """Per-layer decode states: Mamba conv/SSM state (the SSM part in `ssm_dtype`), attention
        KV cache, None for MLPs."""
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        states = DecodeStates([], batch_size)
        for block in self.layers:
            if block.kind == "M":
                states.append(block.mixer.allocate_state(batch_size, device, dtype, ssm_dtype))
            elif block.kind == "*":
                states.append(block.mixer.allocate_state(batch_size, max_len, device, dtype))
            else:
                states.append(None)
        return states

    def forward(self, tokens: torch.Tensor, states: DecodeStates | None = None) -> torch.Tensor:
        """tokens [b, l] -> logits [b, l, padded_vocab]. With `states`, continue from them and
        update them in place (prefill, then one token at a time)."""
        return self.output_layer(self.hidden(tokens, states))

    def hidden(self, tokens: torch.Tensor, states: DecodeStates | None = None) -> torch.Tensor:
        """forward() before the output layer: [b, l, hidden] (callers that need logits at a few
        positions, or over a sharded vocabulary, apply it themselves)."""
        x = residual_stream(self.embedding(tokens), self.cfg.fp32_residual)
        if states is None:
            # Whole blocks: the training transforms (activation checkpointing, compile) wrap them.
            for block in self.layers:
                x = block(x)
            return self.final_norm(x)
        # Decoding: each block's x + mixer(norm(x)) with the residual sum carried beside x and
        # fused into the next norm (add_norm: one kernel on CUDA, the same numbers).
        residual = None
        for block, state in zip(self.layers, states, strict=True):
            normed, residual = add_norm(x, residual, block.norm)
            x = block.mixer(normed, state)
        return add_norm(x, residual, self.final_norm)[0]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters and those in matmuls (output layer included, embedding excluded)."""
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return {"total": total, "matmul": matmul}


def flops_per_token(model: HybridLM, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward, DESIGN.md section 5).

    6 x matmul parameters; attention core 12 x layers x seq x hidden, halved for causal masking;
    SSD scan per Mamba layer and token: 6 x (3 x heads x head_dim x d_state) for the state update
    and readout, forward + backward.
    """
    cfg = model.cfg
    flops = 6.0 * count_parameters(model)["matmul"]
    n_att = model.layout.pattern.count("*")
    flops += 12.0 * n_att * seq_length * cfg.hidden_size / 2
    n_mamba = model.layout.pattern.count("M")
    d_inner = cfg.mamba_expand * cfg.hidden_size
    flops += 6.0 * n_mamba * 3 * d_inner * cfg.mamba_state_dim
    return flops
