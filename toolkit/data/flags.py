"""The data shorthands of the launchers: `--data` and `--tokenizer` as recipe overrides.

    --data PREFIX                        data.blend = ["PREFIX"]
    --data PREFIX1,PREFIX2               equal weights
    --data W1,PREFIX1,W2,PREFIX2         data.blend = [[W1, "PREFIX1"], [W2, "PREFIX2"]]
    --tokenizer PATH                     data.tokenizer = "PATH" (tokenizer.json, .model, byte)

The weights-then-prefixes order is the reference's `--data-path`; so is `train.sh <data-path>
<tokenizer-path>`. A prefix names an indexed dataset, PREFIX.bin + PREFIX.idx (what
`toolkit.data.preprocess` writes: `<output-prefix>_text_document`).
"""

import json
from pathlib import Path


def parse_blend(text: str) -> list[str | list]:
    """data.blend for a --data value; ValueError naming what is wrong."""
    items = [s.strip() for s in text.replace(" ", ",").split(",") if s.strip()]
    if not items:
        raise ValueError("--data: give PREFIX, or W1,PREFIX1,W2,PREFIX2")

    def number(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    weights = [number(s) for s in items[0::2]]
    if all(w is not None for w in weights) and len(items) % 2 == 0:
        for w, p in zip(weights, items[1::2], strict=True):
            if number(p) is not None or not w >= 0:
                raise ValueError(f"--data {text}: expected W1,PREFIX1,W2,PREFIX2 with weights >= 0")
        return [[w, p] for w, p in zip(weights, items[1::2], strict=True)]
    if any(number(s) is not None for s in items):
        raise ValueError(
            f"--data {text}: mixes weights and prefixes; give PREFIX1,PREFIX2 or "
            "W1,PREFIX1,W2,PREFIX2"
        )
    return items


def data_overrides(data: str | None, tokenizer: str | None) -> list[str]:
    """`--set` assignments for --data and --tokenizer (none for flags not given); ValueError
    naming the flag for a dataset or tokenizer file that is not there."""
    overrides = []
    if data is not None:
        blend = parse_blend(data)
        for entry in blend:
            prefix = entry if isinstance(entry, str) else entry[1]
            missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
            if missing:
                raise ValueError(
                    f"--data: {prefix}{missing[0]}: no such file (a prefix names PREFIX.bin and "
                    "PREFIX.idx, e.g. data/corpus_text_document)"
                )
        overrides.append(f"data.blend={json.dumps(blend)}")  # JSON lists and strings are TOML
    if tokenizer is not None:
        if tokenizer != "byte" and not Path(tokenizer.split(":", 1)[-1]).is_file():
            raise ValueError(f"--tokenizer {tokenizer}: no such file")
        overrides.append(f"data.tokenizer={json.dumps(tokenizer)}")
    return overrides
