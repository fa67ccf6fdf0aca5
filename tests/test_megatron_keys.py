"""The Megatron export's state-dict keys and per-rank shapes, checked against a table written
from Megatron-core's own layer specs for each generation, at TP 1 and 2 and PP 1 and 2; each
layer's pre-norm value under its layer kind's key; and both generations importing back
bit-exactly."""

import types

import pytest
import torch

from tests.test_megatron import assert_same, imported, model_and_recipe, rank_file
from toolkit.checkpoint.megatron import load_rank_file, save_megatron
from toolkit.checkpoint.megatron_layout import megatron_key

# Expected keys of one decoder layer, by generation and layer kind, each with its shape on one
# TP rank. Written from Megatron-LM (read for the names and shapes only), at two commits:
#
# 2024-era, df61e60bf5 (2024-06-15, "Add mamba"; the released hybrid checkpoints' form):
#   megatron/core/models/mamba/mamba_layer_specs.py: Mamba layers are MambaLayer(norm=TENorm,
#     mixer=Mamba); attention layers TransformerLayer(self_attention=SelfAttention(linear_qkv=
#     TELayerNormColumnParallelLinear, linear_proj=TERowParallelLinear)); MLP layers
#     TransformerLayer(mlp=MLP(linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=
#     TERowParallelLinear)): no separate input_layernorm / pre_mlp_layernorm.
#   megatron/core/ssm/mamba_layer.py: self.mixer, self.norm (over hidden_size).
#   megatron/core/ssm/mamba_mixer.py: in_proj ColumnParallelLinear(d_model, 2*d_inner +
#     2*ngroups*d_state + nheads, bias False); conv1d nn.Conv1d over conv_dim = d_inner_local +
#     2*ngroups_local*d_state, kernel d_conv, groups conv_dim (weight [conv_dim, 1, d_conv],
#     bias); dt_bias, A_log, D [nheads_local]; norm RMSNormGated(d_inner_local); out_proj
#     RowParallelLinear(d_inner, d_model).
#   megatron/core/transformer/custom_layers/transformer_engine.py: TELayerNormColumnParallelLinear
#     is Transformer Engine's LayerNormLinear (parameters weight, layer_norm_weight, and
#     layer_norm_bias with LayerNorm).
#   megatron/core/ssm/mamba_block.py: decoder.final_norm (TENorm); models/mamba/mamba_model.py:
#     embedding (word_embeddings), output_layer (ColumnParallelLinear, untied).
# current, d98e8a64 (2026-08-22):
#   megatron/core/models/hybrid/hybrid_layer_specs.py: MambaLayer with no norm (IdentityOp) and
#     MambaMixer(in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear);
#     attention as in 2024; mlp_layer MLPLayer (megatron/core/ssm/mlp_layer.py, a
#     TransformerLayer) with linear_fc1=TELayerNormColumnParallelLinear.
#   megatron/core/ssm/mamba_mixer.py: MambaMixer holds conv1d_weight [conv_dim, 1, d_conv] and
#     conv1d_bias [conv_dim] as its own parameters (plain state dict; only distributed
#     checkpoints map them back to conv1d.weight|bias).
#   megatron/core/models/hybrid/hybrid_block.py (final_norm), hybrid_model.py (embedding,
#     output_layer).
# Shapes (of the dims d) use: h hidden, di = expand*h (d_inner), mh Mamba heads, g*n Mamba groups x state,
# k conv kernel, q/kv query heads and KV groups of kv_channels c, f ffn (2f when gated), T TP.
# Transformer Engine's `_extra_state` entries are not parameters: not written.
MAMBA_2024 = {
    "norm.weight": lambda d: (d.h,),
    "mixer.in_proj.weight": lambda d: ((2 * d.di + 2 * d.gn + d.mh) // d.T, d.h),
    "mixer.conv1d.weight": lambda d: ((d.di + 2 * d.gn) // d.T, 1, d.k),
    "mixer.conv1d.bias": lambda d: ((d.di + 2 * d.gn) // d.T,),
    "mixer.dt_bias": lambda d: (d.mh // d.T,),
    "mixer.A_log": lambda d: (d.mh // d.T,),
    "mixer.D": lambda d: (d.mh // d.T,),
    "mixer.norm.weight": lambda d: (d.di // d.T,),
    "mixer.out_proj.weight": lambda d: (d.h, d.di // d.T),
}
MAMBA_CURRENT = {
    "mixer.in_proj.layer_norm_weight": lambda d: (d.h,),
    "mixer.in_proj.weight": lambda d: ((2 * d.di + 2 * d.gn + d.mh) // d.T, d.h),
    "mixer.conv1d_weight": lambda d: ((d.di + 2 * d.gn) // d.T, 1, d.k),
    "mixer.conv1d_bias": lambda d: ((d.di + 2 * d.gn) // d.T,),
    "mixer.dt_bias": lambda d: (d.mh // d.T,),
    "mixer.A_log": lambda d: (d.mh // d.T,),
    "mixer.D": lambda d: (d.mh // d.T,),
    "mixer.norm.weight": lambda d: (d.di // d.T,),
    "mixer.out_proj.weight": lambda d: (d.h, d.di // d.T),
}
ATTENTION = {
    "self_attention.linear_qkv.layer_norm_weight": lambda d: (d.h,),
    "self_attention.linear_qkv.weight": lambda d: ((d.q + 2 * d.kv) * d.c // d.T, d.h),
    "self_attention.linear_proj.weight": lambda d: (d.h, d.q * d.c // d.T),
}
MLP = {
    "mlp.linear_fc1.layer_norm_weight": lambda d: (d.h,),
    "mlp.linear_fc1.weight": lambda d: (d.f1 // d.T, d.h),
    "mlp.linear_fc2.weight": lambda d: (d.h, d.f // d.T),
}
LAYER_KEYS = {
    ("2024", "M"): MAMBA_2024,
    ("current", "M"): MAMBA_CURRENT,
    ("2024", "*"): ATTENTION,
    ("current", "*"): ATTENTION,
    ("2024", "-"): MLP,
    ("current", "-"): MLP,
}
FIRST_STAGE = {"embedding.word_embeddings.weight": lambda d: (d.V // d.T, d.h)}
LAST_STAGE = {
    "decoder.final_norm.weight": lambda d: (d.h,),
    "output_layer.weight": lambda d: (d.V // d.T, d.h),
}
# The pre-norm key of each layer kind (where our layers.N.norm.weight goes).
PRE_NORM = {
    ("2024", "M"): "norm.weight",
    ("current", "M"): "mixer.in_proj.layer_norm_weight",
    ("2024", "*"): "self_attention.linear_qkv.layer_norm_weight",
    ("current", "*"): "self_attention.linear_qkv.layer_norm_weight",
    ("2024", "-"): "mlp.linear_fc1.layer_norm_weight",
    ("current", "-"): "mlp.linear_fc1.layer_norm_weight",
}


def expected_keys(
    model, generation: str, tp: int, stages: list[str], stage: int, padded: int
) -> dict[str, tuple[int, ...]]:
    """The keys and shapes one rank file of `stage` must hold, from the table."""
    cfg = model.cfg
    h, di = cfg.hidden_size, cfg.mamba_expand * cfg.hidden_size
    f = cfg.ffn_size
    sizes = {
        "h": h,
        "di": di,
        "mh": di // cfg.mamba_head_dim,
        "gn": cfg.mamba_num_groups * cfg.mamba_state_dim,
        "k": cfg.mamba_conv_kernel,
        "q": cfg.num_attention_heads,
        "kv": cfg.num_query_groups,
        "c": h // cfg.num_attention_heads,
        "f": f,
        "f1": 2 * f if cfg.mlp_activation == "swiglu" else f,
        "V": padded,
        "T": tp,
    }
    table = {}
    for local, kind in enumerate(stages[stage]):
        for suffix, shape in LAYER_KEYS[(generation, kind)].items():
            table[f"decoder.layers.{local}.{suffix}"] = shape
    if stage == 0:
        table |= FIRST_STAGE
    if stage == len(stages) - 1:
        table |= LAST_STAGE
    dims = types.SimpleNamespace(**sizes)
    return {key: shape(dims) for key, shape in table.items()}


@pytest.mark.parametrize("generation", ["2024", "current"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_exported_keys_and_shapes_match_megatron_specs(tmp_path, generation, tp, pp, activation):
    model, recipe = model_and_recipe(activation)  # M*-M: every block kind
    save_megatron(model, recipe, tmp_path, tp=tp, pp=pp, iteration=3, generation=generation)
    stages = ["M*-M"] if pp == 1 else ["M*", "-M"]  # an even split
    padded = 128 * tp * -(-model.vocab_size // (128 * tp))
    for stage in range(pp):
        for rank in range(tp):
            path = rank_file(tmp_path, 3, rank, stage if pp > 1 else None)
            state = load_rank_file(path)["model"]
            want = expected_keys(model, generation, tp, stages, stage, padded)
            assert sorted(state) == sorted(want), path
            for key, shape in want.items():
                assert tuple(state[key].shape) == shape, (path, key)
            # The pattern under the generation's argument name (current Megatron asserts that
            # hybrid_override_pattern, its deprecated name, is not given beside it).
            args = load_rank_file(path)["args"]
            named = (args.hybrid_override_pattern, args.hybrid_layer_pattern)
            assert named == (("M*-M", None) if generation == "2024" else (None, "M*-M"))
            # Each layer's pre-norm is its own layer's, under its kind's key.
            offset = sum(len(s) for s in stages[:stage])
            for local, kind in enumerate(stages[stage]):
                key = f"decoder.layers.{local}.{PRE_NORM[(generation, kind)]}"
                norm = model.layers[offset + local].norm.weight
                assert torch.equal(state[key], norm), (path, key)
    assert_same(model, imported(model, tmp_path))  # both generations import back exactly


def test_layer_norm_models_write_the_fused_norm_bias(tmp_path):
    """With LayerNorm, Transformer Engine's fused norm has a layer_norm_bias beside its
    weight, and the 2024 Mamba layer's own norm a bias."""
    model, recipe = model_and_recipe("relu2", norm="layernorm")
    for generation, mamba in (("2024", "norm.bias"), ("current", "mixer.in_proj.layer_norm_bias")):
        root = tmp_path / generation
        save_megatron(model, recipe, root, tp=2, pp=1, iteration=1, generation=generation)
        state = load_rank_file(rank_file(root, 1, 1))["model"]
        assert torch.equal(state[f"decoder.layers.0.{mamba}"], model.layers[0].norm.bias)
        assert torch.equal(
            state["decoder.layers.1.self_attention.linear_qkv.layer_norm_bias"],
            model.layers[1].norm.bias,
        )
        assert torch.equal(
            state["decoder.layers.2.mlp.linear_fc1.layer_norm_bias"], model.layers[2].norm.bias
        )
        assert_same(model, imported(model, root))


def test_unknown_generation_is_refused():
    with pytest.raises(ValueError, match="unknown Megatron generation '2023'"):
        megatron_key("layers.0.norm.weight", "M", 0, "2023")
