"""Decoding with the Mamba recurrent state and the KV cache equals the full forward."""

import pytest
import torch

from tests.conftest import tiny_model_config
from toolkit.model import HybridLM
from toolkit.model.attention import KVCache

# Mixed: the full forward scans in chunks (fp32 inside), decoding steps the recurrence; on a
# float64 model the two agree to ~1e-6, well inside this tolerance.
TOL = dict(rtol=1e-4, atol=1e-4)

CASES = {
    "mamba": dict(num_layers=2, pattern="MM", att_ratio=0.0, mlp_ratio=0.0),
    "attention": dict(num_layers=2, pattern="**", att_ratio=0.0, mlp_ratio=0.0),
    "attention_rope": dict(
        num_layers=2,
        pattern="*-",
        att_ratio=0.0,
        mlp_ratio=0.0,
        position_embedding="rope",
        rotary_percent=0.5,
        norm="layernorm",
        mlp_activation="relu2",
    ),
    "mlp": dict(num_layers=2, pattern="--", att_ratio=0.0, mlp_ratio=0.0, mlp_activation="swiglu"),
    "hybrid": dict(),
}


def build(case: str) -> HybridLM:
    model = HybridLM(tiny_model_config(**CASES[case]), vocab_size=50).double().eval()
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_by_token_equals_full_forward(case):
    model = build(case)
    tokens = torch.randint(0, 50, (3, 19))
    with torch.no_grad():
        full = model(tokens)
        states = model.allocate_states(3, max_len=19)
        prefill = model(tokens[:, :7], states)
        steps = [model(tokens[:, t : t + 1], states) for t in range(7, 19)]
    torch.testing.assert_close(prefill, full[:, :7], **TOL)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 7:], **TOL)


@pytest.mark.parametrize("case", ["hybrid", "attention_rope"])
def test_multi_token_continuation_equals_full_forward(case):
    """Prefill in pieces of several tokens: the conv left context, the SSM initial state and the
    bottom-right causal mask over the cache must all line up."""
    model = build(case)
    tokens = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        states = model.allocate_states(2, max_len=24)
        pieces = [model(tokens[:, a:b], states) for a, b in [(0, 2), (2, 11), (11, 12), (12, 24)]]
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


@pytest.mark.parametrize("case", ["attention", "attention_rope"])
def test_rows_at_different_cache_lengths_continue_together(case):
    """Continuous batching: rows prefilled to different lengths continue in one batch (one and
    then several tokens each); every row equals its own full forward at its own positions."""
    model = build(case)
    lengths = torch.tensor([3, 9, 5])
    tokens = torch.randint(0, 50, (3, 16))
    rows = torch.arange(3)[:, None]
    with torch.no_grad():
        full = model(tokens)
        states = model.allocate_states(3, max_len=16)
        for r, n in enumerate(lengths.tolist()):
            model(
                tokens[r : r + 1, :n],
                [s and KVCache(s.k[r : r + 1], s.v[r : r + 1]) for s in states],
            )
        done = 0
        for width in (1, 1, 3):
            pos = lengths[:, None] + done + torch.arange(width)
            ragged = [s and KVCache(s.k, s.v, lengths=lengths + done) for s in states]
            torch.testing.assert_close(model(tokens[rows, pos], ragged), full[rows, pos], **TOL)
            done += width


def test_decode_uses_the_state():
    """Without the carried state the continuation differs: the check above is not vacuous."""
    model = build("hybrid")
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        fresh = model(tokens[:, 11:12], model.allocate_states(1, max_len=12))
    assert (fresh[:, 0] - full[:, 11]).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_row_copied_between_states_continues_the_sequence(case):
    """What the engine does on admission, through the states' own methods: prefill the first
    rows of a scratch batch (views), copy one row into another batch's slot, and that slot
    decodes on beside other rows as the sequence's full forward does."""
    model = build(case)
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        scratch = model.allocate_states(3, max_len=10)
        model(tokens[:, :4], scratch.rows(2))
        model(tokens[:, 4:7], scratch.rows(2, seen=4))  # continues where the rows stopped
        slots = model.allocate_states(4, max_len=10)
        slots.copy_row(2, scratch, 1, length=7)
        positions = torch.tensor([0, 5, 7, 0])  # rows 0, 1: other sequences, here zeros
        for t in range(7, 10):
            step = torch.zeros(3, 1, dtype=torch.long)
            step[2] = tokens[1, t]
            out = model(step, slots.decode_rows(3, positions))
            torch.testing.assert_close(out[2, 0], full[1, t], **TOL)
            positions += 1
    assert slots.batch_size == 4 and scratch.rows(2).batch_size == 2
    assert slots.nbytes == sum(
        t.nbytes for s in slots if s is not None for t in vars(s).values() if torch.is_tensor(t)
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_forward_with_states_is_the_forward_without(case):
    """One forward: the decode path (residual sum fused into the next norm, states updated)
    and the training path (whole blocks) give the same hidden states, and forward() is
    hidden() and the output layer."""
    model = build(case)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        hidden = model.hidden(tokens)
        decoded = model.hidden(tokens, model.allocate_states(2, max_len=9))
        assert torch.equal(model(tokens), model.output_layer(hidden))
    torch.testing.assert_close(decoded, hidden, rtol=0.0, atol=1e-12)
