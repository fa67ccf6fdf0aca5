"""Export a checkpoint as a Hugging Face NemotronH model directory (transformers >= 5.6):

    python checkpoints_tools/export_hf.py --in runs/x/checkpoints --out hf/x
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/x')"

Writes config.json (ours, with the exact layer pattern), safetensors shards (an index when there
are several) and no tokenizer files: the byte-level tokenizer has no transformers equivalent, so
feed it UTF-8 byte values as token ids (toolkit.tokenizer). NemotronH has no RoPE, RMSNorm only and
non-gated MLPs; other models are refused with the reason.
"""

import os
import sys

# checkpoints_tools/inspect.py would shadow the standard library's inspect, which torch imports.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402

import torch  # noqa: E402

from toolkit.build import model_from_checkpoint  # noqa: E402
from toolkit.checkpoint import CheckpointError  # noqa: E402
from toolkit.checkpoint.hf import export_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoints_tools/export_hf.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--in", dest="src", required=True, help="checkpoint root or step dir")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--max-shard-size", type=float, default=5.0, help="GB per safetensors file (default 5)"
    )
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():
            model, recipe, _ = model_from_checkpoint(args.src)
            files = export_hf(model, args.out, int(args.max_shard_size * 1e9))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(f.stat().st_size for f in files)
    print(
        f"exported {recipe.name} ({model.layout.pattern}, vocabulary {model.vocab_size}) to "
        f"{args.out}: {len(files)} files, {total / 1e9:.3f} GB; no tokenizer files (byte-level "
        "tokenizer: token id = UTF-8 byte value)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
