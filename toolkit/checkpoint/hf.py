"""Export to a Hugging Face NemotronH directory (transformers >= 5.6), DESIGN.md section 3:
config.json written here (save_pretrained would rewrite the pattern), safetensors shards with an
index, weights renamed and the attention's grouped qkv rows split into q, k and v.

NemotronH has no rotary embedding, RMSNorm only and a non-gated MLP: models with RoPE, LayerNorm
or SwiGLU are refused with the reason.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from toolkit.model import HybridLM

HF_ACTIVATION = {"relu2": "relu2", "gelu": "gelu"}


def check_exportable(model: HybridLM) -> None:
    cfg = model.cfg
    problems = []
    if cfg.position_embedding != "none":
        problems.append("model.position_embedding='rope' (NemotronH attention has no RoPE)")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (NemotronH uses RMSNorm)")
    if cfg.mlp_activation not in HF_ACTIVATION:
        problems.append(
            f"model.mlp_activation={cfg.mlp_activation!r} (NemotronH MLPs are not gated)"
        )
    if problems:
        raise ValueError("cannot export to NemotronH: " + "; ".join(problems))


def hf_config(model: HybridLM) -> dict:
    cfg = model.cfg
    d_inner = cfg.mamba_expand * cfg.hidden_size
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": model.layout.pattern,
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "mlp_hidden_act": HF_ACTIVATION[cfg.mlp_activation],
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "mamba_num_heads": d_inner // cfg.mamba_head_dim,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.mamba_state_dim,
        "n_groups": cfg.mamba_num_groups,
        "expand": cfg.mamba_expand,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "use_bias": False,
        "use_conv_bias": True,
        "mlp_bias": False,
        "attention_bias": False,
        "layer_norm_epsilon": cfg.norm_eps,
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": False,
        "time_step_min": 0.0,  # NemotronH clamps dt at time_step_min; 0 keeps our numerics
        "max_position_embeddings": cfg.seq_length,
        "residual_in_fp32": False,
        "torch_dtype": "float32",
    }


def hf_state_dict(model: HybridLM) -> dict[str, torch.Tensor]:
    """Our parameters under NemotronH's names (vocabulary padding dropped)."""
    vocab = model.vocab_size
    out = {
        "backbone.embeddings.weight": model.embedding.weight[:vocab],
        "backbone.norm_f.weight": model.final_norm.weight,
        "lm_head.weight": model.output_layer.weight[:vocab],
    }
    for i, block in enumerate(model.layers):
        prefix = f"backbone.layers.{i}"
        out[f"{prefix}.norm.weight"] = block.norm.weight
        mixer = block.mixer
        if block.kind == "*":  # grouped rows [q_g (heads/group), k_g, v_g] per KV group
            rows = mixer.linear_qkv.weight.unflatten(
                0, (mixer.num_groups, mixer.heads_per_group + 2, mixer.head_dim)
            )
            out[f"{prefix}.mixer.q_proj.weight"] = rows[:, :-2].flatten(0, 2)
            out[f"{prefix}.mixer.k_proj.weight"] = rows[:, -2].flatten(0, 1)
            out[f"{prefix}.mixer.v_proj.weight"] = rows[:, -1].flatten(0, 1)
            out[f"{prefix}.mixer.o_proj.weight"] = mixer.linear_proj.weight
        elif block.kind == "-":
            out[f"{prefix}.mixer.up_proj.weight"] = mixer.linear_fc1.weight
            out[f"{prefix}.mixer.down_proj.weight"] = mixer.linear_fc2.weight
        else:
            for name, p in mixer.named_parameters():
                out[f"{prefix}.mixer.{name}"] = p
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_hf(model: HybridLM, out_dir: str | Path, max_shard_bytes: int = 5 << 30) -> list[Path]:
    """Write config.json, generation_config.json and safetensors shards (with an index when
    there is more than one); returns the files written."""
    check_exportable(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, out / name, metadata={"format": "pt"})
        files.append(out / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        files.append(out / "model.safetensors.index.json")
    (out / "config.json").write_text(json.dumps(hf_config(model), indent=2))
    files.append(out / "config.json")
    return files
