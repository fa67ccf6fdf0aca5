"""Export to a Hugging Face NemotronH directory (transformers >= 5.6), DESIGN.md section 3.

What transformers' NemotronH computes, and how ours maps onto it (read from its
modeling_nemotron_h.py / configuration_nemotron_h.py, 5.24):
- layers: `hybrid_override_pattern` characters M (Mamba-2), * (attention), - (MLP), E (MoE, not
  ours); 5.x stores them as `layers_block_type`, and we write both. Each block is
  x + mixer(RMSNorm(x)) with `layer_norm_epsilon`, as ours.
- Mamba-2: in_proj rows [z, xBC, dt], depthwise conv of `conv_kernel` with bias, SiLU;
  A = -exp(A_log); dt = softplus(dt + dt_bias) clamped below at `time_step_min` (0 here: no
  clamp, our numerics); y = SSD + D x; gated RMSNorm of y * SiLU(z) over groups of
  intermediate_size / n_groups channels (ours: d_inner / mamba_num_groups). Same parameters.
- attention: separate q/k/v/o projections, GQA, scale head_dim^-0.5, no position embedding:
  our grouped qkv rows are split into q, k and v.
- MLP: down(act(up(x))), not gated; act = `mlp_hidden_act` from transformers' ACT2FN: relu2 is
  our squared ReLU, gelu the exact (erf) GELU, ours too. SwiGLU has no NemotronH form.
So RoPE, LayerNorm and SwiGLU models are refused with the reason. Only the real vocabulary rows
are exported: transformers' logits then need no masking of padding ids.
config.json is written here: save_pretrained would rewrite the pattern. Tokenizer files: for the
byte-level tokenizer a byte-level BPE without merges whose ids are ours; a Hugging Face
tokenizer.json is copied; SentencePiece models get none.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from toolkit.model import HybridLM
from toolkit.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

HF_ACTIVATION = {"relu2": "relu2", "gelu": "gelu"}
HF_LAYER_TYPE = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}


def check_exportable(model: HybridLM) -> None:
    """Raise ValueError naming every property NemotronH cannot express."""
    cfg = model.cfg
    problems = []
    if cfg.position_embedding != "none":
        problems.append("model.position_embedding='rope' (NemotronH attention has no RoPE)")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (NemotronH uses RMSNorm)")
    if cfg.mlp_activation not in HF_ACTIVATION:
        problems.append(
            f"model.mlp_activation={cfg.mlp_activation!r} (NemotronH MLPs are not gated: "
            f"up, activation, down; it supports {sorted(HF_ACTIVATION)})"
        )
    if problems:
        raise ValueError("cannot export to NemotronH: " + "; ".join(problems))


def special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {
        "bos_token_id": tokenizer.bos,
        "eos_token_id": tokenizer.eod,
        "pad_token_id": tokenizer.pad,
    }


def hf_config(
    model: HybridLM, tokenizer: Tokenizer | None = None, dtype: torch.dtype | None = None
) -> dict:
    """NemotronH's config.json for `model` (every field its config class reads for our blocks;
    the special-token ids when the tokenizer is known)."""
    cfg = model.cfg
    dtype = dtype or model.embedding.weight.dtype
    d_inner = cfg.mamba_expand * cfg.hidden_size
    pattern = model.layout.pattern
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": pattern,
        "layers_block_type": [HF_LAYER_TYPE[kind] for kind in pattern],
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": model.vocab_size,
        "tie_word_embeddings": False,
        "intermediate_size": cfg.ffn_size,
        "mlp_hidden_act": HF_ACTIVATION[cfg.mlp_activation],
        "mlp_bias": False,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.seq_length,
        "mamba_num_heads": d_inner // cfg.mamba_head_dim,
        "mamba_head_dim": cfg.mamba_head_dim,
        "ssm_state_size": cfg.mamba_state_dim,
        "n_groups": cfg.mamba_num_groups,
        "expand": cfg.mamba_expand,
        "conv_kernel": cfg.mamba_conv_kernel,
        "chunk_size": cfg.mamba_chunk_size,
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "use_bias": False,
        "time_step_min": 0.0,  # NemotronH clamps dt at time_step_min; 0 keeps our numerics
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "layer_norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": False,
        "hidden_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "rescale_prenorm_residual": True,
        "use_cache": True,
        "num_logits_to_keep": 1,
        "dtype": str(dtype).removeprefix("torch."),
        **special_ids(tokenizer),
    }


def hf_state_dict(model: HybridLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our parameters under NemotronH's names (vocabulary padding dropped, qkv split), cast to
    `dtype` if given."""
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
        if block.kind == "*":  # rows per KV group: [q (heads/group heads), k, v]
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
        else:  # same names: in_proj, conv1d, A_log, D, dt_bias, norm, out_proj
            for name, p in mixer.named_parameters():
                out[f"{prefix}.mixer.{name}"] = p
    return {k: v.detach().to(dtype or v.dtype).contiguous().clone() for k, v in out.items()}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte: what the `tokenizers` ByteLevel
    pre-tokenizer turns bytes into and its decoder turns back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def byte_tokenizer_files(tokenizer: ByteTokenizer, max_length: int) -> dict[str, dict]:
    """tokenizer.json and tokenizer_config.json of a transformers tokenizer that gives our ids:
    byte b -> id b (a byte-level BPE with no merges), then the special tokens. Special-token
    text in the input stays bytes (split_special_tokens), as in ByteTokenizer.encode."""
    chars = byte_to_unicode()
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [
        {
            "id": 256 + i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, text in enumerate(tokenizer.specials)
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {chars[b]: b for b in range(256)},
            "merges": [],
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.specials[tokenizer.bos - 256],
        "eos_token": tokenizer.specials[tokenizer.eod - 256],
        "pad_token": tokenizer.specials[tokenizer.pad - 256],
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config}


def hf_tokenizer_config(tokenizer: HFTokenizer, max_length: int) -> dict:
    """tokenizer_config.json beside a copied tokenizer.json: which tokens are bos/eos/pad."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.token_string(tokenizer.bos),
        "eos_token": tokenizer.token_string(tokenizer.eod),
        "pad_token": tokenizer.token_string(tokenizer.pad),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }


def shard_names(state: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, list[str]]:
    """{file name: tensor names}, filling each file up to max_shard_bytes (a larger tensor gets
    a file of its own), with transformers' naming."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def export_hf(
    model: HybridLM,
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 10**9,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write a NemotronH directory: config.json, safetensors shards (an index when there are
    several), and with a tokenizer generation_config.json and, when transformers can reproduce
    it (byte-level, or a Hugging Face tokenizer.json), tokenizer files. `dtype` casts the
    weights (default: the model's). Returns the files written."""
    check_exportable(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new directory")
    state = hf_state_dict(model, dtype)
    tmp = out.with_name(out.name + ".partial")  # a failed export leaves no half directory
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = shard_names(state, max_shard_bytes)
    for file, names in files.items():
        save_file({n: state[n] for n in names}, tmp / file, metadata={"format": "pt"})
    documents = {"config.json": hf_config(model, tokenizer, dtype)}
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {n: file for file, names in files.items() for n in names}
        documents["model.safetensors.index.json"] = {
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        }
    if tokenizer is not None:
        documents["generation_config.json"] = special_ids(tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        documents |= byte_tokenizer_files(tokenizer, model.cfg.seq_length)
    copies = {}
    if isinstance(tokenizer, HFTokenizer):  # the very file it reads, and which are its specials
        copies["tokenizer.json"] = tokenizer.path
        documents["tokenizer_config.json"] = hf_tokenizer_config(tokenizer, model.cfg.seq_length)
    for file, document in documents.items():
        (tmp / file).write_text(json.dumps(document, indent=2) + "\n")
    for file, source in copies.items():
        shutil.copyfile(source, tmp / file)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return sorted(out / name for name in [*files, *documents, *copies])
