"""[model]: the shape of the hybrid stack (layer mix, widths, heads, Mamba-2 sizes)."""

import typing
from dataclasses import dataclass
from typing import Literal

from toolkit.config.base import RecipeError, check, opt, req
from toolkit.config.ranges import check_ranges
from toolkit.layout import LayerLayout, build_layout

MlpActivation = Literal["gelu", "relu2", "swiglu"]
MLP_ACTIVATIONS: tuple[str, ...] = typing.get_args(MlpActivation)  # read by toolkit.model.mlp


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    num_layers: int = req("number of blocks (each block is one Mamba-2, attention or MLP layer)")
    hidden_size: int = req("model width")
    seq_length: int = req("training sequence length in tokens")
    att_ratio: float = opt(0.0, "share of attention blocks (reference ATT)")
    mlp_ratio: float = opt(0.0, "share of MLP blocks (reference MLP); Mamba share = 1-ATT-MLP")
    pattern: str | None = opt(None, "explicit layer pattern of M * - (and | stage markers)")
    num_attention_heads: int = opt(16, "query heads per attention block")
    num_query_groups: int = opt(8, "key/value heads (GQA groups)")
    ffn_hidden_size: int = opt(0, "MLP inner width (0: 4 x hidden_size)")
    mlp_activation: MlpActivation = opt("gelu", "MLP activation")
    norm: Literal["rmsnorm", "layernorm"] = opt("rmsnorm", "block norm type")
    norm_eps: float = opt(1e-5, "norm epsilon")
    position_embedding: Literal["none", "rope"] = opt("none", "hybrids use none")
    rotary_percent: float = opt(1.0, "fraction of each head's channels rotated by RoPE")
    rotary_base: float = opt(10000.0, "RoPE base")
    vocab_size: int | None = opt(None, "vocabulary before padding (default: the tokenizer's)")
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this x TP")
    mamba_state_dim: int = opt(128, "Mamba-2 state size N")
    mamba_head_dim: int = opt(64, "Mamba-2 head dim P")
    mamba_num_groups: int = opt(8, "Mamba-2 groups G for B and C")
    mamba_expand: int = opt(2, "d_inner = expand x hidden_size")
    mamba_conv_kernel: int = opt(4, "depthwise causal conv width")
    mamba_chunk_size: int = opt(128, "SSD chunk length")
    init_std: float = opt(0.02, "init std of linear and embedding weights")
    kernels: Literal["auto", "reference", "mamba_ssm"] = opt(
        "auto", "SSD implementation: mamba_ssm (Triton, CUDA) when available, else reference"
    )
    mamba_conv_backend: Literal["auto", "causal_conv1d", "triton"] = opt(
        "auto",
        "the fused Mamba training op's causal conv: causal_conv1d (mamba-ssm's op with "
        "causal-conv1d's CUDA kernels), triton (ours, toolkit/model/conv_kernel.py: needs no "
        "causal-conv1d, slower backward), auto: causal_conv1d where it imports, else triton",
    )
    mamba_recompute: bool = opt(
        True,
        "the fused Mamba training op's backward recomputes the conv's output and the SSD's "
        "chunk states (mamba-ssm's op); false keeps them from the forward (ours, "
        "toolkit/model/fused_mamba.py): 5 kernels a layer fewer, 2 x (conv channels + "
        "heads x head_dim x state / chunk) + 4 x groups x chunk bytes a token a layer more "
        "(16 KB at the 800M's)",
    )
    fp32_residual: bool = opt(
        True,
        "the residual stream between blocks in fp32 under bf16 and FP8 training (Megatron's "
        "--fp32-residual-connection); false keeps it in bf16, as Megatron's --bf16 runs do "
        "without that flag: half the bytes through the norms and the residual adds",
    )

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def mamba_heads(self) -> int:
        return self.mamba_expand * self.hidden_size // self.mamba_head_dim

    def layer_layout(self) -> LayerLayout:
        """The layer pattern and its pipeline stages; RecipeError naming the key that is off."""
        try:
            return build_layout(self.num_layers, self.att_ratio, self.mlp_ratio, self.pattern)
        except ValueError as e:
            key = (
                "model.pattern" if self.pattern is not None else "model.att_ratio / model.mlp_ratio"
            )
            raise RecipeError(f"{key}: {e}") from None

    def validate(self) -> None:
        """The ranges, the layer layout and the block shapes (heads against groups and width)."""
        check_ranges(self, "model")  # first: the layout is computed from these numbers
        check(
            self.att_ratio + self.mlp_ratio <= 1 + 1e-9,
            "model.mlp_ratio",
            "att_ratio + mlp_ratio must be <= 1",
        )
        pattern = self.layer_layout().pattern
        if "*" in pattern:
            h, g = self.num_attention_heads, self.num_query_groups
            check(
                h % g == 0, "model.num_query_groups", f"{h} heads are not divisible by {g} groups"
            )
            check(
                self.hidden_size % h == 0,
                "model.num_attention_heads",
                f"hidden_size {self.hidden_size} is not divisible by {h} heads",
            )
        if "M" in pattern:
            d_inner = self.mamba_expand * self.hidden_size
            check(
                d_inner % self.mamba_head_dim == 0,
                "model.mamba_head_dim",
                f"d_inner {d_inner} is not divisible by head dim {self.mamba_head_dim}",
            )
            check(
                self.mamba_heads % self.mamba_num_groups == 0,
                "model.mamba_num_groups",
                f"{self.mamba_heads} Mamba heads are not divisible by {self.mamba_num_groups} "
                "groups",
            )


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Round the vocabulary up to a multiple of divisible_by x TP (Megatron's rule)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
