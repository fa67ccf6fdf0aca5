"""The reference framework's command line (its Mamba example, `examples/mamba/train.sh`) as a
recipe:

    python -m toolkit.config --from-megatron-args '--num-layers 56 --hidden-size 4096 ...' > r.toml
    python -m toolkit.config --from-megatron-args @args.txt > r.toml

Every flag is mapped to its recipe key (toolkit/megatron_flags.py, also the README's table). Where a flag is absent,
Megatron's own default is what the recipe gets (e.g. min lr 0, weight decay 0.01, Adam beta2
0.999, fp32), so the recipe trains what the command line would have. Flags it cannot honour (an
unknown flag, a learned position embedding, biases, dropout, a linear lr decay, ...) are refused,
all of them named in one line, exit status 2; nothing is written then.
"""

import json
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

from toolkit.config import RecipeError, recipe_from_dict
from toolkit.layout import allocate_layers
from toolkit.megatron_flags import DEFAULTS, FLAGS, MUST_BE_ONE, REFUSED, SCALES


class ArgsError(ValueError):
    """The command line cannot become a recipe: the message names every flag at fault."""


USAGE = "python -m toolkit.config --from-megatron-args 'ARGS...' | @FILE > recipe.toml"
SCHEDULES = {"cosine": "cosine", "constant": "constant", "WSD": "wsd"}
SENTENCEPIECE = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer")
FIRST_STAGE, LAST_STAGE = (
    "--decoder-first-pipeline-num-layers",
    "--decoder-last-pipeline-num-layers",
)
# Megatron's datasets per split, each used whole, and the data keys they become.
SPLIT_PATHS = {
    "--train-data-path": "blend",
    "--valid-data-path": "valid_blend",
    "--test-data-path": "test_blend",
}
# The layer pattern's flag, and its former name (Megatron refuses both together).
PATTERN, OLD_PATTERN = "--hybrid-layer-pattern", "--hybrid-override-pattern"
# Megatron's pattern symbols for what the toolkit has no layer of.
OTHER_SYMBOLS = {
    "G": "Gated DeltaNet",
    "D": "DeepSeek sparse attention",
    "E": "mixture of experts",
    "/": "multi-token prediction",
}


def split_args(tokens: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """{flag: its values} of a Megatron command line (a leading `torchrun ... script.py` and a
    MODEL_SCALE=... assignment allowed), and the unknown or malformed flags."""
    if any(t.endswith(".py") for t in tokens):  # drop the launcher: torchrun ... pretrain_x.py
        tokens = tokens[[t.endswith(".py") for t in tokens].index(True) + 1 :]
    args: dict[str, list[str]] = {}
    problems = []
    flag = None
    for token in tokens:
        if token.startswith("MODEL_SCALE="):
            scale = token.partition("=")[2]
            if scale not in SCALES:
                problems.append(f"{token} (the reference has {', '.join(SCALES)})")
            for name, value in SCALES.get(scale, {}).items():
                args.setdefault(name, [value])
            flag = None
        elif token.startswith("--"):
            flag, _, value = token.partition("=")
            if flag in REFUSED:
                problems.append(f"{flag}: {REFUSED[flag]}")
            elif flag not in FLAGS:
                problems.append(f"{flag} (unknown flag)")
            args[flag] = [value] if value else []
        elif "$" in token:
            problems.append(f"{token!r} (expand the shell variables first)")
        elif flag is None:
            problems.append(f"{token!r} (a value with no flag before it)")
        else:
            args[flag].append(token)
    for name, values in args.items():
        spec = FLAGS.get(name)
        if spec is None:
            continue
        if spec.nargs == 0 and values:
            problems.append(f"{name} {' '.join(values)} (a switch takes no value)")
        elif spec.nargs == 1 and len(values) != 1:
            problems.append(f"{name} (expected one value, got {len(values)})")
        elif spec.nargs == "*" and not values:
            problems.append(f"{name} (expected a value)")
    return args, problems


class _Reader:
    """Typed access to the parsed flags, collecting every problem instead of stopping at one."""

    def __init__(self, args: dict[str, list[str]], problems: list[str]) -> None:
        self.args = args
        self.problems = list(problems)

    def has(self, name: str) -> bool:
        return name in self.args

    def text(self, name: str, default: str | None = None) -> str | None:
        values = self.args.get(name)
        return values[0] if values else DEFAULTS.get(name, default)

    def num(self, name: str, kind: type, default: Any = None) -> Any:
        text = self.text(name)
        if text is None:
            return default
        try:
            return kind(text)
        except ValueError:
            self.refuse(
                name, f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            )
            return default

    def refuse(self, name: str, why: str) -> None:
        self.problems.append(f"{name}: {why}")


def to_table(args: dict[str, list[str]], problems: list[str] = ()) -> dict[str, Any]:
    """The recipe table for parsed flags; ArgsError naming every flag it cannot honour (and
    the `problems` split_args found)."""
    r = _Reader(args, problems)
    table = {
        "name": "converted",
        "model": _model(r),
        "data": _data(r),
        "train": _train(r),
        "parallel": {
            "tp": r.num("--tensor-model-parallel-size", int, 1),
            "pp": r.num("--pipeline-model-parallel-size", int, 1),
            "sequence_parallel": r.has("--sequence-parallel"),
            "shard_optimizer": r.has("--use-distributed-optimizer"),
            "timeout_minutes": r.num("--distributed-timeout-minutes", int, 10),
        },
        "checkpoint": _checkpoint(r),
        "logging": {"interval": r.num("--log-interval", int, 100)},
    }
    if r.has("--tensorboard-dir"):
        table["logging"]["dir"] = r.text("--tensorboard-dir")
    for name in MUST_BE_ONE:
        if r.num(name, int, 1) != 1:
            r.refuse(name, f"{r.text(name)}: {FLAGS[name].note}")
    data = table["data"]
    if data.get("valid_blend") or (
        data.get("blend") and _valid_share(data.get("split", "969,30,1"))
    ):
        table["train"]["eval_interval"] = r.num("--eval-interval", int, 1000)
    if r.problems:
        raise ArgsError("cannot honour: " + "; ".join(r.problems))
    return table


def _model(r: _Reader) -> dict[str, Any]:
    pattern = _pattern(r)
    required = ["--hidden-size", "--num-attention-heads", "--seq-length"]
    for name in required if pattern else ["--num-layers", *required]:
        if not r.has(name):
            r.refuse(name, "missing (Megatron requires it)")
    hidden = r.num("--hidden-size", int, 1)
    heads = r.num("--num-attention-heads", int, 1)
    m: dict[str, Any] = {
        "num_layers": r.num("--num-layers", int, 1),
        "hidden_size": hidden,
        "seq_length": r.num("--seq-length", int, 1),
        "att_ratio": r.num("--hybrid-attention-ratio", float, 0.0),
        "mlp_ratio": r.num("--hybrid-mlp-ratio", float, 0.0),
        "num_attention_heads": heads,
        "num_query_groups": (
            r.num("--num-query-groups", int, 1) if r.has("--group-query-attention") else heads
        ),
        "mamba_state_dim": r.num("--mamba-state-dim", int, 128),
        "mamba_head_dim": r.num("--mamba-head-dim", int, 64),
        "mamba_num_groups": r.num("--mamba-num-groups", int, 8),
        "init_std": r.num("--init-method-std", float, 0.02),
        "norm_eps": r.num("--norm-epsilon", float, 1e-5),
        "make_vocab_size_divisible_by": r.num("--make-vocab-size-divisible-by", int, 128),
        "fp32_residual": r.has("--fp32-residual-connection"),
    }
    _layers(r, m, pattern)
    if r.has("--swiglu") and r.has("--squared-relu"):
        r.refuse("--swiglu", "and --squared-relu together: give one")
    m["mlp_activation"] = (
        "swiglu" if r.has("--swiglu") else "relu2" if r.has("--squared-relu") else "gelu"
    )
    # Megatron's default FFN width: 4 x hidden, or 2/3 of it rounded down to 64 with SwiGLU.
    default_ffn = (4 * hidden * 2 // 3) // 64 * 64 if r.has("--swiglu") else 4 * hidden
    m["ffn_hidden_size"] = r.num("--ffn-hidden-size", int, default_ffn)
    if r.has("--kv-channels") and r.num("--kv-channels", int) * heads != hidden:
        r.refuse("--kv-channels", f"must be hidden / heads = {hidden // max(heads, 1)} here")
    norm = r.text("--normalization", "LayerNorm")
    if norm not in ("RMSNorm", "LayerNorm"):
        r.refuse("--normalization", f"{norm!r}: the toolkit has RMSNorm and LayerNorm")
    m["norm"] = norm.lower()
    position = r.text("--position-embedding-type", "learned_absolute")
    if position in ("none", "rope"):
        m["position_embedding"] = position
    else:
        r.refuse(
            "--position-embedding-type",
            f"{position!r} (Megatron's default when absent): the toolkit has none or rope",
        )
    if position == "rope":
        m["rotary_percent"] = r.num("--rotary-percent", float, 1.0)
        m["rotary_base"] = r.num("--rotary-base", float, 10000.0)
    if r.has("--vocab-size"):
        m["vocab_size"] = r.num("--vocab-size", int)
    if not r.has("--untie-embeddings-and-output-weights"):
        r.refuse(
            "--untie-embeddings-and-output-weights",
            "absent, so Megatron ties the embedding and output layer; the toolkit's are untied",
        )
    if not r.has("--disable-bias-linear"):
        r.refuse("--disable-bias-linear", "absent, so Megatron's linears have biases; ours none")
    for name in ("--attention-dropout", "--hidden-dropout"):
        if r.num(name, float, 0.0) != 0:
            r.refuse(name, f"{r.text(name)}: the toolkit has no dropout: pass {name} 0.0")
    return m


def _layers(r: _Reader, m: dict[str, Any], pattern: str | None) -> None:
    """Into `m`: the layer pattern and count (as Megatron derives them from
    --hybrid-layer-pattern), uneven pipeline stages, and the Mamba width."""
    hidden = m["hidden_size"]
    if pattern:
        m["pattern"], layers = pattern, len(pattern.replace("|", ""))
        if r.has("--num-layers") and m["num_layers"] != layers:
            r.refuse(
                "--num-layers",
                f"{m['num_layers']}, but the layer pattern has {layers} layers (Megatron would "
                "ignore --num-layers): drop it or make it agree",
            )
        m["num_layers"] = layers
    if r.has(FIRST_STAGE) or r.has(LAST_STAGE):
        _uneven_stages(r, m)
    if r.has("--mamba-num-heads"):  # Megatron's Mamba width: heads x head dim, else 2 x hidden
        inner = r.num("--mamba-num-heads", int, 1) * m["mamba_head_dim"]
        if inner % hidden:
            r.refuse(
                "--mamba-num-heads",
                f"heads x --mamba-head-dim = {inner} must be a multiple of the hidden size "
                f"{hidden} here (model.mamba_expand)",
            )
        m["mamba_expand"] = inner // hidden


def _uneven_stages(r: _Reader, m: dict[str, Any]) -> None:
    """--decoder-first/last-pipeline-num-layers: model.pattern with '|' where Megatron cuts the
    stages (the first and last stage given, the layers left evenly over the stages between)."""
    pp = r.num("--pipeline-model-parallel-size", int, 1)
    pattern = m.get("pattern") or allocate_layers(m["num_layers"], m["att_ratio"], m["mlp_ratio"])
    named = FIRST_STAGE if r.has(FIRST_STAGE) else LAST_STAGE  # the flag an error names
    if "|" in pattern:
        r.refuse(named, "with '|' in the pattern: give one")
        return
    first, last = r.num(FIRST_STAGE, int), r.num(LAST_STAGE, int)
    middle = pp - (first is not None) - (last is not None)
    left = len(pattern) - (first or 0) - (last or 0)
    if pp < 2 or middle < 0 or left < 0 or (middle and left % middle) or (not middle and left):
        r.refuse(
            named,
            f"{len(pattern)} layers do not make PP={pp} stages of {first or '-'} first, "
            f"{last or '-'} last and the rest evenly between",
        )
        return
    sizes = ([first] if first is not None else []) + [left // max(middle, 1)] * middle
    sizes += [last] if last is not None else []
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    m["pattern"] = "|".join(pattern[a:b] for a, b in zip(bounds, bounds[1:]))


def _pattern(r: _Reader) -> str | None:
    """The layer pattern of --hybrid-layer-pattern (or its former name), where the toolkit
    can build it: layers M, * and -, and '|' only between pipeline stages."""
    given = [name for name in (PATTERN, OLD_PATTERN) if r.has(name)]
    if len(given) == 2:
        r.refuse(OLD_PATTERN, f"and {PATTERN} together (Megatron refuses both): give {PATTERN}")
    if not given:
        return None
    pattern = r.text(given[0])
    others = [f"{s!r} ({what})" for s, what in OTHER_SYMBOLS.items() if s in pattern]
    if others:
        r.refuse(given[0], f"{', '.join(others)}: the toolkit's layers are M, * and -")
        return None
    segments, pp = pattern.count("|") + 1, r.num("--pipeline-model-parallel-size", int, 1)
    if segments > 1 and segments != pp:
        r.refuse(
            given[0],
            f"{segments} '|' segments for PP={pp}: more segments than stages are Megatron's "
            "virtual pipeline stages, which the toolkit has not; give one segment per stage",
        )
    return pattern


def _data(r: _Reader) -> dict[str, Any]:
    d: dict[str, Any] = {}
    kind, model = r.text("--tokenizer-type"), r.text("--tokenizer-model")
    if kind in SENTENCEPIECE and model:
        d["tokenizer"] = f"sentencepiece:{model}"
    elif kind == "HuggingFaceTokenizer" and model:
        is_json = model.endswith(".json")
        d["tokenizer"] = f"hf:{model if is_json else Path(model) / 'tokenizer.json'}"
    elif kind is not None:
        need = "with --tokenizer-model" if kind in (*SENTENCEPIECE, "HuggingFaceTokenizer") else ""
        r.refuse(
            "--tokenizer-type",
            f"{kind} {need}".strip() + ": the toolkit reads SentencePiece .model files and "
            "Hugging Face tokenizer.json files (train one: python -m toolkit.data.train_tokenizer)",
        )
    elif model:
        r.refuse("--tokenizer-model", "needs --tokenizer-type")
    if r.has("--data-path"):
        d["blend"] = _blend(r, "--data-path")
    if r.has("--split"):
        d["split"] = r.text("--split").replace("/", ",").replace(" ", "")
    per_split = [name for name in SPLIT_PATHS if r.has(name)]
    if per_split and r.has("--data-path"):
        r.refuse(per_split[0], "with --data-path: give the blend one way")
    elif per_split:  # each split's datasets used whole; Megatron ignores --split then
        if not r.has("--train-data-path"):
            r.refuse(per_split[0], "without --train-data-path: nothing to train on")
        for name, key in SPLIT_PATHS.items():
            if r.has(name):
                d[key] = _blend(r, name)
        d["split"] = "100,0,0"
    if r.has("--data-cache-path"):
        d["cache_dir"] = r.text("--data-cache-path")
    if r.has("--eod-mask-loss"):
        d["eod_mask_loss"] = True
    return d


def _blend(r: _Reader, name: str) -> list[Any]:
    """`name` PREFIX [PREFIX ...] or W1 PREFIX1 W2 PREFIX2 ... as a blend's entries."""
    values = r.args[name]
    try:
        weights = [float(v) for v in values[0::2]]
    except ValueError:
        return list(values)  # prefixes only: equal weights
    if len(values) % 2:
        r.refuse(name, "weights and prefixes must come in pairs: W1 PREFIX1 W2 PREFIX2")
        return []
    return [[w, p] for w, p in zip(weights, values[1::2], strict=True)]


def _valid_share(split: str) -> bool:
    parts = split.split(",")
    try:
        return len(parts) > 1 and float(parts[1]) > 0
    except ValueError:
        return False


def _train(r: _Reader) -> dict[str, Any]:
    gbs = r.num("--global-batch-size", int, None)
    mbs = r.num("--micro-batch-size", int, 1)
    gbs = gbs or mbs
    t: dict[str, Any] = {"micro_batch_size": mbs, "global_batch_size": gbs}
    t["steps"] = _steps(r, "train", gbs)
    if t["steps"] is None:
        r.refuse("--train-samples", "missing (or --train-iters): Megatron requires one")
    t |= _schedule(r, gbs, t["steps"])
    if not r.has("--lr"):
        r.refuse("--lr", "missing (Megatron requires it)")
    t["lr"] = r.num("--lr", float, 1.0)
    t["min_lr"] = r.num("--min-lr", float, 0.0)
    t["weight_decay"] = r.num("--weight-decay", float, 0.01)
    t["adam_beta1"] = r.num("--adam-beta1", float, 0.9)
    t["adam_beta2"] = r.num("--adam-beta2", float, 0.999)
    t["adam_eps"] = r.num("--adam-eps", float, 1e-8)
    t["grad_clip"] = r.num("--clip-grad", float, 1.0)
    t["seed"] = r.num("--seed", int, 1234)
    t["precision"] = "bf16" if r.has("--bf16") else "fp32"
    if r.has("--fp8-format"):
        t |= _fp8(r)
    if r.has("--no-gradient-accumulation-fusion"):
        t["fused_grad_accumulation"] = False
    if r.has("--calculate-per-token-loss"):
        t["per_token_loss"] = True
    t["eval_batches"] = max(r.num("--eval-iters", int, 100) * gbs // mbs, 1)
    if r.has("--recompute-granularity"):
        t |= _recompute(r)
    return t


def _steps(r: _Reader, name: str, gbs: int) -> int | None:
    """--X-iters, or --X-samples over the global batch (as Megatron counts them)."""
    if r.has(f"--{name}-iters"):
        return r.num(f"--{name}-iters", int)
    samples = r.num(f"--{name}-samples", int)
    return None if samples is None else samples // gbs


def _schedule(r: _Reader, gbs: int, train_steps: int | None) -> dict[str, Any]:
    """The learning-rate schedule: warmup, decay length and style, WSD's decay."""
    warmup, decay = _steps(r, "lr-warmup", gbs), _steps(r, "lr-decay", gbs)
    t: dict[str, Any] = {"warmup_steps": warmup or 0}
    if decay is not None:
        t["decay_steps"] = decay
    fraction = r.num("--lr-warmup-fraction", float)
    if fraction is not None:  # Megatron: the fraction of the decay steps, which default to all
        if warmup:
            r.refuse("--lr-warmup-fraction", "given with --lr-warmup-iters/-samples: give one")
        t["warmup_steps"] = round(fraction * (decay or train_steps or 0))
    if r.num("--lr-warmup-init", float, 0.0) != 0:
        r.refuse("--lr-warmup-init", f"{r.text('--lr-warmup-init')}: the warmup starts from 0 here")
    style = r.text("--lr-decay-style", "linear")
    if style not in SCHEDULES:
        r.refuse(
            "--lr-decay-style",
            f"{style!r} (Megatron's default when absent): the toolkit has cosine, constant, WSD",
        )
        return t
    t["lr_schedule"] = SCHEDULES[style]
    if style == "WSD":  # Megatron requires its decay's length; its shape defaults
        t["wsd_decay_steps"] = _steps(r, "lr-wsd-decay", gbs)
        t["wsd_decay_style"] = r.text("--lr-wsd-decay-style", "exponential")
        if t["wsd_decay_steps"] is None:
            r.refuse(
                "--lr-decay-style",
                "WSD without --lr-wsd-decay-iters or --lr-wsd-decay-samples (Megatron requires one)",
            )
            del t["wsd_decay_steps"]
    return t


def _recompute(r: _Reader) -> dict[str, Any]:
    """--recompute-*: only whole blocks, every one, are recomputed here."""
    granularity = r.text("--recompute-granularity")
    method = r.text("--recompute-method", "uniform")
    if (
        granularity == "full"
        and method == "uniform"
        and r.num("--recompute-num-layers", int, 1) == 1
    ):
        return {"activation_checkpointing": "full"}
    r.refuse(
        "--recompute-granularity",
        f"{granularity} (method {method}): the toolkit recomputes whole blocks: "
        "full with --recompute-method uniform --recompute-num-layers 1",
    )
    return {}


def _fp8(r: _Reader) -> dict[str, Any]:
    """--fp8-format and the flags that shape it (Megatron's Transformer Engine group); Megatron
    reads none of them without --fp8-format, and neither does this."""
    fmt = r.text("--fp8-format")
    if fmt != "hybrid":
        r.refuse("--fp8-format", f"{fmt!r}: float8 gradients are E5M2 here (Megatron's 'hybrid')")
    if not r.has("--bf16"):
        r.refuse("--fp8-format", "needs --bf16: the toolkit's float8 runs the rest in bf16")
    t: dict[str, Any] = {"precision": "fp8"}
    t["fp8_recipe"] = r.text("--fp8-recipe", "delayed")
    if t["fp8_recipe"] not in ("delayed", "tensorwise"):
        r.refuse("--fp8-recipe", f"{t['fp8_recipe']!r}: the toolkit has delayed and tensorwise")
    elif t["fp8_recipe"] == "delayed":
        t["fp8_amax_history"] = r.num("--fp8-amax-history-len", int, 1)
        t["fp8_amax_algo"] = r.text("--fp8-amax-compute-algo", "most_recent")
        if t["fp8_amax_algo"] not in ("most_recent", "max"):
            r.refuse("--fp8-amax-compute-algo", f"{t['fp8_amax_algo']!r}: most_recent or max")
        if r.num("--fp8-margin", int, 0) != 0:
            r.refuse("--fp8-margin", "must be 0: the toolkit's delayed scaling runs margin 0")
    # Megatron puts every layer in float8 unless --first-last-layers-bf16 keeps some in bf16.
    t["fp8_layers"] = "inner" if r.has("--first-last-layers-bf16") else "blocks"
    for name in ("--num-layers-at-start-in-bf16", "--num-layers-at-end-in-bf16"):
        if r.has("--first-last-layers-bf16") and r.num(name, int, 1) != 1:
            r.refuse(name, "must be 1: the toolkit keeps the first and the last block in bf16")
    for name in ("--no-fp8-wgrad", "--fp8-param-gather"):
        if r.has(name):
            r.refuse(name, FLAGS[name].note)
    return t


def _checkpoint(r: _Reader) -> dict[str, Any]:
    save, load = r.text("--save"), r.text("--load")
    base = _finetune_base(r, save, load)
    if load is not None and load != save and not r.has("--finetune"):
        r.refuse(
            "--load",
            f"{load!r} differs from --save {save!r}: a run resumes from checkpoint.dir; import a "
            "Megatron checkpoint with checkpoints_tools/import_megatron.py into it, or start "
            "from its weights with --finetune (or --pretrained-checkpoint)",
        )
    if save is None:
        return {"enabled": False} | ({"init_from": base} if base else {})
    table = {"dir": save, "interval": r.num("--save-interval", int, 0)}
    if r.has("--async-save"):
        table["async_save"] = True
    if base:
        table["init_from"] = base
    return table


def _finetune_base(r: _Reader, save: str | None, load: str | None) -> str | None:
    """The checkpoint whose weights start the run (checkpoint.init_from): Megatron's
    --pretrained-checkpoint, or --load with --finetune (weights only, iteration 0)."""
    pretrained = r.text("--pretrained-checkpoint")
    if r.has("--finetune"):
        if load is None and pretrained is None:
            r.refuse(
                "--finetune", "needs --load (or --pretrained-checkpoint): the weights to start from"
            )
        elif load is not None and pretrained is not None and load != save:
            r.refuse("--finetune", "with both --load and --pretrained-checkpoint: give one base")
        elif load is not None and load == save:
            r.refuse(
                "--finetune",
                f"with --load equal to --save ({save!r}) restarts from the base at every resume "
                "in Megatron; give the base as --pretrained-checkpoint (or --load) and --save "
                "another directory",
            )
        elif load is not None:
            pretrained = load
    for name in ("--no-load-optim", "--no-load-rng"):
        if r.has(name) and pretrained is None:
            r.refuse(
                name,
                "a resume without that state is not a mode the toolkit has; to start from a "
                "checkpoint's weights only, give --finetune or --pretrained-checkpoint",
            )
    return pretrained


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def to_toml(table: dict[str, Any], source: str = "", unmapped: list[str] = ()) -> str:
    """The recipe's TOML; `unmapped`: the flags given that set no key, named in a comment."""
    lines = [f"# Converted from Megatron arguments by python -m toolkit.config{source}."]
    if unmapped:
        lines += textwrap.wrap(
            "Given, but setting no key here (checked, or without effect: the README's flag "
            "table says which and why): " + ", ".join(unmapped),
            width=98,
            initial_indent="# ",
            subsequent_indent="# ",
            break_on_hyphens=False,
        )
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for section, values in table.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


def convert(tokens: list[str]) -> str:
    """The validated recipe (TOML text) for a Megatron command line; ArgsError or RecipeError."""
    args, problems = split_args(tokens)
    table = to_table(args, problems)
    recipe_from_dict(table)  # validated: the recipe loads as written
    unmapped = [name for name in args if not FLAGS[name].key]
    return to_toml(table, " --from-megatron-args", unmapped)


def read_tokens(argv: list[str]) -> list[str]:
    """One quoted string or @FILE (shell syntax: quotes, backslash-newlines, # comments), or the
    flags already split by the shell."""
    if len(argv) == 1 and argv[0].startswith("@"):
        path = Path(argv[0][1:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArgsError(f"--from-megatron-args {argv[0]}: cannot read {path}: {e}") from None
        return shlex.split(text.replace("\\\n", " "), comments=True)  # a line continuation
    if len(argv) == 1:
        return shlex.split(argv[0].replace("\\\n", " "))
    return list(argv)


def main(argv: list[str] | None = None) -> int:
    """`--from-megatron-args ARGS | @FILE` (what follows the flag; its `=VALUE` form too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--from-megatron-args"):
        first = argv.pop(0).partition("=")[2]
        argv = [first, *argv] if first else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0
    if not argv or not "".join(argv).strip():
        print(
            f"error: --from-megatron-args: give the arguments or @FILE; usage: {USAGE}",
            file=sys.stderr,
        )
        return 2
    try:
        text = convert(read_tokens(argv))
    except ValueError as e:  # ArgsError, RecipeError, an unbalanced quote (shlex)
        kind = "recipe" if isinstance(e, RecipeError) else "error"
        print(f"error: {'the converted recipe: ' if kind == 'recipe' else ''}{e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
