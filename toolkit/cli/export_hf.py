"""Export a checkpoint as a Hugging Face NemotronH model directory (transformers >= 5.6):

    python checkpoints_tools/export_hf.py --in runs/x/checkpoints --out hf/x
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/x')"

Writes config.json (ours, with the exact layer pattern), safetensors shards (with an index when
there are several, see --max-shard-size), generation_config.json with the special-token ids,
and tokenizer.json + tokenizer_config.json: for the byte-level tokenizer, AutoTokenizer then
gives our ids (byte value, then <bos> <eod> <pad>) and decodes them back; a Hugging Face
tokenizer.json is copied; a SentencePiece model gets none. NemotronH has no RoPE, RMSNorm only
and non-gated MLPs (relu2 or gelu); other models are refused with the reason.
The output directory must be new or empty. Exit status: 0 done, 2 bad input, 1 failure.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from toolkit.build import model_from_checkpoint
from toolkit.checkpoint import CheckpointError, resolve_checkpoint
from toolkit.checkpoint.hf import export_hf
from toolkit.config import RecipeError
from toolkit.tokenizer import ByteTokenizer, HFTokenizer

UNITS = {
    "": 10**9,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a bare number of GB -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(match[1]) * UNITS[match[2].lower()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/export_hf.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--in", dest="src", required=True, help="checkpoint root or step dir")
    parser.add_argument("--out", required=True, help="directory to write (new or empty)")
    parser.add_argument(
        "--max-shard-size", type=parse_size, default="5GB", help="per safetensors file (5GB)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="weights' dtype (default: the checkpoint's)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        print(f"error: --out {out}: exists and is not an empty directory", file=sys.stderr)
        return 2
    try:
        resolve_checkpoint(args.src)
    except CheckpointError as e:
        print(f"error: --in {e}", file=sys.stderr)
        return 2
    try:
        with torch.no_grad():
            model, recipe, tokenizer = model_from_checkpoint(args.src)
            files = export_hf(
                model, args.out, args.max_shard_size, tokenizer, DTYPES.get(args.dtype)
            )
    except (CheckpointError, RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    total = sum(f.stat().st_size for f in files)
    shards = sum(f.suffix == ".safetensors" for f in files)
    if isinstance(tokenizer, ByteTokenizer):
        tokens = "byte-level tokenizer files (AutoTokenizer gives our ids)"
    elif isinstance(tokenizer, HFTokenizer):
        tokens = f"tokenizer.json copied from {tokenizer.path}"
    else:  # SentencePiece: transformers wraps those per model family (Llama, T5, ...)
        tokens = f"no tokenizer files ({recipe.data.tokenizer}: convert it for transformers)"
    print(
        f"exported {recipe.name} ({model.layout.pattern}, vocabulary {model.vocab_size}, "
        f"{args.dtype or str(model.embedding.weight.dtype).removeprefix('torch.')}) to "
        f"{args.out}: {shards} safetensors file(s), {len(files)} files, {total / 1e9:.3f} GB; "
        f"{tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
