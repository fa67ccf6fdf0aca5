"""What the engine does per step for a server: when it wakes the HTTP threads, and the decode
steps it counts (the server's decode rate, compared with the engine's own by serve_load)."""

import pytest

from tests.test_engine import TOKENIZER, build, one_thread, prompts  # noqa: F401 (autouse fixture)
from toolkit.inference.engine import Engine, Request


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_steps_are_counted_by_live_batch(overlap):
    """Steps that ran no prefill pass and gave tokens are decode steps, keyed by how many
    tokens they gave; the admission step's first tokens are not decode tokens."""
    engine = Engine(build(), TOKENIZER, slots=2, cuda_graphs=overlap, overlap=overlap)
    a, b = (Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts(3, 5), (3, 6)))
    a.stop_at_eod = b.stop_at_eod = False
    engine.run([a, b])
    stats = engine.stats
    assert stats["generated_tokens"] == 9 and stats["first_tokens"] == 2
    assert stats["decode_tokens"] == 7 and stats["decode_steps"] == 5
    by_batch = engine.decode_by_batch
    assert {b: (d["steps"], d["tokens"]) for b, d in by_batch.items()} == {2: (2, 4), 1: (3, 3)}
    assert all(d["seconds"] > 0 for d in by_batch.values())
    assert stats["decode_seconds"] == pytest.approx(sum(d["seconds"] for d in by_batch.values()))
