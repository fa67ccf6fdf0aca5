"""[train] and [data]: the optimizer, precision, switches and schedule; what the model reads."""

from dataclasses import dataclass
from typing import Any, Literal

from toolkit.config.base import opt, req


@dataclass(kw_only=True, slots=True)
class DataConfig:
    tokenizer: str = opt(
        "byte",
        "'byte' (256 bytes + specials), a Hugging Face tokenizer .json file or a SentencePiece "
        ".model file (or hf:PATH, sentencepiece:PATH)",
    )
    source: str = opt("stdlib", "'stdlib' (embedded corpus from Python's sources) or a text file")
    max_corpus_bytes: int = opt(4_000_000, "cap on the corpus size read from the source")
    valid_fraction: float = opt(
        0.0, "share of the source (its end) held out for validation; never trained on"
    )
    blend: list[Any] = opt(
        [],
        "indexed datasets (.bin/.idx path prefixes) and weights, [[0.7, 'a'], [0.3, 'b']] "
        "(or ['a']); used instead of source",
    )
    split: str = opt("969,30,1", "train,valid,test shares of each blended dataset's documents")
    cache_dir: str | None = opt(
        None,
        "where sample/shuffle/blend index files go (default: index_cache/ beside each dataset)",
    )

    def weighted_prefixes(self) -> list[tuple[float, str]]:
        """data.blend as (weight, prefix) pairs; a bare prefix weighs 1."""
        return [(1.0, e) if isinstance(e, str) else (float(e[0]), e[1]) for e in self.blend]


@dataclass(kw_only=True, slots=True)
class ProfileConfig:
    start: int = opt(0, "first step traced by torch.profiler (0: no trace)")
    steps: int = opt(3, "how many steps to trace")
    nvtx: bool = opt(False, "NVTX ranges around every block, for Nsight Systems (CUDA only)")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = req("optimizer steps to run")
    micro_batch_size: int = opt(1, "sequences per forward/backward")
    global_batch_size: int = opt(1, "sequences per optimizer step (all ranks, all micro-batches)")
    lr: float = opt(2.5e-4, "peak learning rate")
    min_lr: float = opt(2.5e-5, "final learning rate")
    lr_schedule: Literal["cosine", "wsd", "constant"] = opt("cosine", "decay after warmup")
    warmup_steps: int = opt(0, "linear warmup steps")
    decay_steps: int | None = opt(None, "steps over which lr decays (default: steps)")
    wsd_decay_fraction: float = opt(0.1, "WSD: final fraction of decay_steps spent decaying")
    weight_decay: float = opt(
        0.1, "AdamW decoupled weight decay (not on norms, biases, A_log, D, dt_bias)"
    )
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.95, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    precision: Literal["fp32", "bf16", "fp8"] = opt(
        "bf16",
        "compute precision (master weights fp32); fp8: the blocks' linears in float8 (Transformer "
        "Engine if importable, else torchao; CUDA with compute capability >= 8.9), the first and "
        "last blocks, embedding and output layer in bf16",
    )
    fp8_engine: Literal["auto", "transformer_engine", "torchao"] = opt(
        "auto",
        "float8 library with precision='fp8': auto takes the one installed; with both, torchao "
        "when train.compile is on (it was faster here), Transformer Engine when it is off",
    )
    fp8_recipe: Literal["tensorwise", "rowwise", "delayed"] = opt(
        "tensorwise",
        "float8 scaling with precision='fp8': tensorwise (one scale per tensor from its current "
        "amax: torchao tensorwise, Transformer Engine Float8CurrentScaling), rowwise (torchao "
        "only), delayed (scales from an amax history: Transformer Engine DelayedScaling only)",
    )
    activation_checkpointing: Any = opt(
        "none",
        "recompute block activations in backward: 'none', 'full' (every block), or a list of "
        "block kinds out of 'mamba', 'attention', 'mlp'",
    )
    compile: Any = opt(
        False,
        "torch.compile each block separately: true, false, or a list of block kinds out of "
        "'mamba', 'attention', 'mlp'",
    )
    seed: int = opt(1234, "seed for init and data order")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available")
    nan_policy: Literal["stop", "skip"] = opt("stop", "on a NaN/inf loss: stop, or skip the step")
    max_skipped_steps: int = opt(10, "with nan_policy=skip, stop after this many skips in a row")
    sample_prompt: str = opt(
        "", "if set, print a sampled continuation of it after training (temperature 0.7, top-k 20)"
    )
    profile: ProfileConfig = opt(None, "profiling: train.profile = {start = 10, steps = 3}")
    eval_interval: int = opt(0, "validation loss every N steps and at the end (0: never)")
    eval_batches: int = opt(4, "micro-batches per validation (the same ones every time)")
