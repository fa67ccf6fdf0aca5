"""[train] and [data]: the optimizer, precision, switches and schedule; what the model reads."""

import math
from dataclasses import dataclass
from typing import Any, Literal

from toolkit.config.base import RecipeError, check, opt, req
from toolkit.config.ranges import check_ranges
from toolkit.layout import BLOCK_KINDS

Precision = Literal["fp32", "bf16", "fp8"]
Fp8Engine = Literal["transformer_engine", "torchao"]
Fp8Recipe = Literal["tensorwise", "rowwise", "delayed"]
Fp8Layers = Literal["inner", "blocks", "all"]
# The float8 scaling recipes each library runs (train.fp8_recipe with train.fp8_engine); read by
# toolkit.precision too.
FP8_RECIPES: dict[str, tuple[str, ...]] = {
    "transformer_engine": ("tensorwise", "delayed"),
    "torchao": ("tensorwise", "rowwise"),
}
# Transformer Engine's DelayedScaling defaults (amax_history_len, amax_compute_algo): the
# defaults of train.fp8_amax_history and train.fp8_amax_algo.
TE_AMAX_HISTORY: tuple[int, str] = (1024, "max")
# Why a recipe does not run with the library asked for, and what to do.
_OTHER_LIBRARY = {
    "delayed": "'delayed' is Transformer Engine's recipe (torchao has no delayed scaling): use "
    "'tensorwise' or 'rowwise', or train.fp8_engine='transformer_engine'",
    "rowwise": "'rowwise' is torchao's recipe: use 'tensorwise' or 'delayed' with Transformer "
    "Engine, or train.fp8_engine='torchao'",
}


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
    valid_blend: list[Any] = opt(
        [],
        "indexed datasets for validation alone, as data.blend, each used whole (Megatron's "
        "--valid-data-path); instead of data.split's valid share, which must then be 0",
    )
    test_blend: list[Any] = opt(
        [],
        "indexed datasets for the test split alone, each used whole (Megatron's "
        "--test-data-path); instead of data.split's test share, which must then be 0",
    )
    cache_dir: str | None = opt(
        None,
        "where sample/shuffle/blend index files go (default: index_cache/ beside each dataset)",
    )
    eod_mask_loss: bool = opt(
        False,
        "leave out of the loss the prediction made at each end-of-document token (the next "
        "document's first token), in training, validation and evaluation (Megatron's "
        "--eod-mask-loss)",
    )

    def weighted_prefixes(self, entries: list[Any] | None = None) -> list[tuple[float, str]]:
        """data.blend (or `entries`, another blend) as (weight, prefix) pairs; a bare prefix
        weighs 1."""
        entries = self.blend if entries is None else entries
        return [(1.0, e) if isinstance(e, str) else (float(e[0]), e[1]) for e in entries]

    def validation_share(self) -> float:
        """The share held out for validation: valid_fraction, or with a blend its data.split's
        (1 with a data.valid_blend of its own)."""
        from toolkit.data.packed import parse_split  # local: the data package is not always needed

        if self.valid_blend:
            return 1.0
        return parse_split(self.split)[1] if self.blend else self.valid_fraction

    def validate(self) -> None:
        """The ranges, data.blend's entries, and a blend against data.source and data.split."""
        check_ranges(self, "data")
        for key in ("blend", "valid_blend", "test_blend"):
            for i, e in enumerate(getattr(self, key)):
                _check_blend_entry(e, f"data.{key}[{i}]")
        if not self.blend:
            for key in ("valid_blend", "test_blend"):
                check(not getattr(self, key), f"data.{key}", "needs data.blend to train on")
            return
        weights = [w for w, _ in self.weighted_prefixes()]
        check(
            sum(weights) > 0, "data.blend", f"weights must sum to a positive number, got {weights}"
        )
        check(
            self.source == "stdlib", "data.source", "set either data.source or data.blend, not both"
        )
        check(
            self.valid_fraction == 0,
            "data.valid_fraction",
            "applies to data.source; a blend's validation share is in data.split",
        )
        from toolkit.data.packed import parse_split

        try:
            shares = parse_split(self.split)
        except ValueError as e:
            raise RecipeError(f"data.split: {e}") from None
        for key, share, what in (
            ("valid_blend", shares[1], "valid"),
            ("test_blend", shares[2], "test"),
        ):
            check(
                not getattr(self, key) or share == 0,
                f"data.{key}",
                f"and a {what} share in data.split ({self.split!r}) both say what the {what} "
                f"split is: give one (data.split='100,0,0' with {what} datasets of their own)",
            )


def _check_blend_entry(e: Any, key: str) -> None:
    """A blend entry is "prefix" or [weight, "prefix"] with a finite weight >= 0."""
    pair = (
        isinstance(e, list)
        and len(e) == 2
        and isinstance(e[0], int | float)
        and not isinstance(e[0], bool)
        and isinstance(e[1], str)
    )
    check(isinstance(e, str) or pair, key, f'expected [weight, "prefix"] or "prefix", got {e!r}')
    check(
        isinstance(e, str) or (math.isfinite(e[0]) and e[0] >= 0),
        key,
        f"weight must be a finite number >= 0, got {e[0] if pair else e!r}",
    )


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
    wsd_decay_steps: int | None = opt(
        None, "WSD: steps spent decaying, the last of decay_steps (default: wsd_decay_fraction)"
    )
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = opt(
        "linear",
        "WSD: the decay's shape from lr to min_lr (Megatron's --lr-wsd-decay-style; its default "
        "is exponential)",
    )
    weight_decay: float = opt(
        0.1, "AdamW decoupled weight decay (not on norms, biases, A_log, D, dt_bias)"
    )
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.95, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    adamw_kernel: Literal["auto", "torch", "triton"] = opt(
        "auto",
        "the GPU update: 'triton', one Triton kernel over every parameter with the clip "
        "coefficient applied as gradients are read (toolkit/triton_adamw.py; 1.10x torch's at "
        "the 800M), or 'torch', its fused AdamW after clipping in place; same arithmetic and "
        "checkpoints. 'auto': 'triton' unless train.flat_optimizer. CPUs take torch's (with "
        "Triton's interpreter on, 'triton' runs the kernel on them: the tests)",
    )
    step_graph: bool = opt(
        False,
        "replay each optimizer step, forward to update, as one CUDA graph (toolkit.step_graph): "
        "for steps the host cannot launch as fast as the GPU runs them (the 800M race's widths: "
        "1.38x on an H100). One GPU (TP=PP=DP=1), the Triton AdamW (train.adamw_kernel), no "
        "Transformer Engine; the batch's shape fixed",
    )
    flat_optimizer: bool = opt(
        False,
        "keep each AdamW group's parameters, gradients and moments in one flat fp32 buffer and "
        "update it in one pass (on CUDA one compiled kernel); same arithmetic and checkpoints",
    )
    precision: Precision = opt(
        "bf16",
        "compute precision (master weights fp32); fp8: the blocks' linears in float8 (Transformer "
        "Engine if importable, else torchao; CUDA with compute capability >= 8.9), the first and "
        "last blocks, embedding and output layer in bf16 (train.fp8_layers)",
    )
    fp8_engine: Literal["auto", Fp8Engine] = opt(
        "auto",
        "float8 library with precision='fp8': auto takes the one installed; with both, torchao "
        "when train.compile is on (it was faster here), Transformer Engine when it is off",
    )
    fp8_recipe: Fp8Recipe = opt(
        "tensorwise",
        "float8 scaling with precision='fp8': tensorwise (one scale per tensor from its current "
        "amax: torchao tensorwise, Transformer Engine Float8CurrentScaling), rowwise (torchao "
        "only), delayed (scales from an amax history: Transformer Engine DelayedScaling only)",
    )
    fp8_amax_history: int = opt(
        TE_AMAX_HISTORY[0],
        "with fp8_recipe='delayed': how many steps' amaxes each tensor's scale is taken from "
        "(Transformer Engine's amax_history_len; Megatron's --fp8-amax-history-len, 1 there "
        "when absent)",
    )
    fp8_amax_algo: Literal["max", "most_recent"] = opt(
        TE_AMAX_HISTORY[1],
        "with fp8_recipe='delayed': each scale from the largest amax of the history or from "
        "the most recent (Transformer Engine's amax_compute_algo; Megatron's default "
        "most_recent)",
    )
    fp8_layers: Fp8Layers = opt(
        "inner",
        "which linears go float8 with precision='fp8': inner (the blocks but the first and the "
        "last: the reference's), blocks (every block), all (every block and the output layer, "
        "compiled with train.compile: at the 8B's shapes on an H200 1.10x inner's tokens/s)",
    )
    fp8_weight_cache: bool = opt(
        False,
        "with precision='fp8' through torchao, tensorwise: cast each float8 weight once per "
        "optimizer step, not in every micro-batch's forward and backward; the same numbers. "
        "Pays where a step accumulates micro-batches (8B's shapes on an H200: 8 a step 1.068x, "
        "1 a step 0.955x; from 2 a step) for 2 bytes of memory a float8 weight (its two layouts)",
    )
    bf16_weight_cache: bool = opt(
        False,
        "cast each bf16 linear's fp32 weight once per optimizer step, not in every "
        "micro-batch's forward (autocast's cast: 6 bytes a parameter each time); the same "
        "numbers. With the Triton AdamW (adamw_kernel) the update writes the casts (2 bytes a "
        "parameter, the copies kept between steps). At one micro-batch a step (8B Mamba-2 "
        "widths) level alone, and with fp32_weight_grad_gemm the step casts nothing: 196.5 "
        "against 201.2 ms on an H200 in one CUDA graph (step_graph); for steps that accumulate "
        "micro-batches, not measured. Needs fused_grad_accumulation (its linears read the "
        "cast) and bf16 compute (precision 'bf16', or 'fp8' for the linears left bf16)",
    )
    fp32_weight_grad_gemm: bool = opt(
        False,
        "where a weight holds no gradient yet (a step's first or only micro-batch), its "
        "gradient GEMM writes fp32 (cuBLAS's fp32-output GEMM; on CPUs the same sums from fp32 "
        "copies) instead of a bf16 product cast in a pass of its own: the products summed in "
        "fp32 unrounded (Megatron's weight-gradient GEMM writes fp32 too); not bit for bit "
        "autograd's. Alone level in speed (8B Mamba-2 widths, H200); with bf16_weight_cache no "
        "cast is left in the step (above). Needs fused_grad_accumulation "
        "and bf16 compute",
    )
    fused_grad_accumulation: bool = opt(
        True,
        "add each linear's weight gradient into its fp32 .grad inside its backward once the "
        "weight holds one (Megatron's gradient-accumulation fusion, on by default there too: "
        "the product's cast and the add in one pass), instead of autograd's new fp32 tensor "
        "and separate add; the same numbers. Pays where a step accumulates micro-batches (8B's "
        "shapes on an H200, 8 a step: bf16 1.011x, FP8 1.042x): plain linears, "
        "fp8_weight_cache's float8 ones, and the input embedding (only the rows of the "
        "micro-batch's tokens added, not a whole-table gradient)",
    )
    row_sparse_embedding_grad: bool = opt(
        False,
        "at a step's only micro-batch (or its first), keep the input embedding's gradient as "
        "the rows of the micro-batch's tokens, not a whole-table fp32 tensor written, read by "
        "the clip and read by the update (~12 bytes a parameter: 1.05B at a 256k vocabulary); "
        "the Triton AdamW reads the rows, a row no token touched as 0 (toolkit/"
        "row_sparse_grad.py). The same update but for the clip's norm, summed in another "
        "order (fp32 rounding). Needs fused_grad_accumulation, the Triton AdamW "
        "(adamw_kernel, not flat_optimizer) and compile_scope 'block'; left off, with a "
        "warning, where the update is torch's (no Triton), at DP or PP > 1, or with a "
        "tensor-parallel embedding",
    )
    per_token_loss: bool = opt(
        False,
        "the training and validation loss as one mean over every counted token of the global "
        "batch (Megatron's --calculate-per-token-loss), not the mean of the micro-batches' "
        "means (Megatron's default); they differ only where data.eod_mask_loss leaves tokens "
        "out, so that micro-batches count different numbers of them",
    )
    te_fused_norm: bool = opt(
        False,
        "with Transformer Engine's fp8 at TP=1: each FP8 block's pre-norm runs inside its first "
        "linear (te.LayerNormLinear: one kernel normalises and casts to FP8); same parameters "
        "and checkpoints",
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
    compile_mode: Literal["default", "coordinate-descent-tuning", "max-autotune-no-cudagraphs"] = (
        opt(
            "default",
            "torch.compile mode of the compiled blocks; coordinate-descent-tuning tunes the "
            "block sizes of Inductor's own kernels (casts, norms, reductions); "
            "max-autotune-no-cudagraphs also tunes the matmuls (minutes of compilation on first "
            "use)",
        )
    )
    compile_scope: Literal["block", "model"] = opt(
        "block",
        "what train.compile compiles: each block on its own, or the whole model's forward as "
        "one region ('model': needs train.compile=true, TP=1 and PP=1)",
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

    @property
    def max_grad_norm(self) -> float:
        """The bound clip_and_step clips the global gradient norm to: train.grad_clip, or
        infinity where it is 0 (off: the norm is still computed, for the logs)."""
        return self.grad_clip if self.grad_clip > 0 else math.inf

    def validate(self) -> None:
        """The ranges, the per-block-kind switches, the float8 recipe and the learning rates."""
        check_ranges(self, "train")
        _check_block_kinds(
            self.activation_checkpointing, "train.activation_checkpointing", ("none", "full")
        )
        _check_block_kinds(self.compile, "train.compile", (False, True))
        check(
            self.compile_scope == "block" or self.compile is True,
            "train.compile_scope",
            f"'model' compiles every block: needs train.compile=true, got {self.compile!r}",
        )
        check(
            not self.step_graph or (self.adamw_kernel != "torch" and not self.flat_optimizer),
            "train.step_graph",
            "a captured step needs the Triton AdamW: leave train.adamw_kernel 'auto' or "
            "'triton' and train.flat_optimizer off",
        )
        check(
            self.adamw_kernel != "triton" or not self.flat_optimizer,
            "train.adamw_kernel",
            f"{self.adamw_kernel!r} and train.flat_optimizer are two updates: choose one",
        )
        check(
            self.compile_mode == "default" or self.compile not in (False, []),
            "train.compile_mode",
            f"{self.compile_mode!r} tunes compiled blocks: needs train.compile (true or block "
            "kinds), which is off",
        )
        for key in ("bf16_weight_cache", "fp32_weight_grad_gemm"):
            check(
                not getattr(self, key)
                or (self.fused_grad_accumulation and self.precision != "fp32"),
                f"train.{key}",
                "its linears are train.fused_grad_accumulation's, computing in bf16: needs "
                f"fused_grad_accumulation on and precision 'bf16' or 'fp8', got "
                f"{self.fused_grad_accumulation} and {self.precision!r}",
            )
        check(
            not self.row_sparse_embedding_grad
            or (
                self.fused_grad_accumulation
                and self.adamw_kernel != "torch"
                and not self.flat_optimizer
                and self.compile_scope == "block"
            ),
            "train.row_sparse_embedding_grad",
            "its embedding is train.fused_grad_accumulation's and its gradient the Triton "
            "AdamW's to read: needs fused_grad_accumulation on, adamw_kernel 'auto' or "
            "'triton', flat_optimizer off and compile_scope 'block', got "
            f"{self.fused_grad_accumulation}, {self.adamw_kernel!r}, {self.flat_optimizer} and "
            f"{self.compile_scope!r}",
        )
        self._validate_float8()
        self._validate_schedule()

    def _validate_float8(self) -> None:
        """The float8 keys: the weight cache's recipe, the amax history only where read, the
        recipe the chosen library runs."""
        if self.precision == "fp8" and self.fp8_weight_cache:
            check(
                self.fp8_recipe == "tensorwise" and self.fp8_engine != "transformer_engine",
                "train.fp8_weight_cache",
                "casts torchao's tensorwise weights: needs train.fp8_recipe='tensorwise' and "
                f"train.fp8_engine 'torchao' or 'auto', got {self.fp8_recipe!r} and "
                f"{self.fp8_engine!r}",
            )
        if self.fp8_recipe != "delayed":
            check(
                (self.fp8_amax_history, self.fp8_amax_algo) == TE_AMAX_HISTORY,
                "train.fp8_amax_history"
                if self.fp8_amax_history != TE_AMAX_HISTORY[0]
                else "train.fp8_amax_algo",
                "is read by train.fp8_recipe='delayed' only (scales from an amax history); "
                f"this recipe's is {self.fp8_recipe!r} (scales from the current amax): leave it "
                "unset",
            )
        if self.precision == "fp8" and self.fp8_engine != "auto":  # 'auto': where the job runs
            check(
                self.fp8_recipe in FP8_RECIPES[self.fp8_engine],
                "train.fp8_recipe",
                _OTHER_LIBRARY.get(self.fp8_recipe, f"does not run with {self.fp8_engine}"),
            )

    def _validate_schedule(self) -> None:
        """The learning rates and the WSD schedule's keys, only where read."""
        check(
            self.min_lr <= self.lr,
            "train.min_lr",
            f"need 0 <= min_lr <= lr, got {self.min_lr}, {self.lr}",
        )
        if self.lr_schedule != "wsd":
            for key, unset in (("wsd_decay_steps", None), ("wsd_decay_style", "linear")):
                check(
                    getattr(self, key) == unset,
                    f"train.{key}",
                    f"is read by train.lr_schedule='wsd' only; this recipe's is "
                    f"{self.lr_schedule!r}: leave it unset",
                )
        elif self.wsd_decay_steps is not None:
            decay_steps = self.decay_steps or self.steps
            check(
                self.wsd_decay_steps <= decay_steps,
                "train.wsd_decay_steps",
                f"{self.wsd_decay_steps} is more than the {decay_steps} decay steps "
                "(train.decay_steps, else train.steps)",
            )


def _check_block_kinds(value: Any, key: str, allowed: tuple[Any, Any]) -> None:
    """A per-block-kind switch: `allowed` (off, on) or a list of block kinds."""
    if isinstance(value, list):
        for i, kind in enumerate(value):
            check(
                isinstance(kind, str) and kind in BLOCK_KINDS,
                f"{key}[{i}]",
                f"{kind!r} is not a block kind; use {', '.join(map(repr, BLOCK_KINDS))}",
            )
        return
    check(
        value in allowed and type(value) is type(allowed[0]),
        key,
        f"expected {' or '.join(map(repr, allowed))} or a list of block kinds "
        f"({', '.join(map(repr, BLOCK_KINDS))}), got {value!r}",
    )
