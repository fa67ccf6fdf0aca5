"""Byte tokenizer, embedded corpus and the resumable sampler."""

import numpy as np
import pytest

from toolkit.data import SequenceSampler, load_corpus
from toolkit.tokenizer import ByteTokenizer, build_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓ 🐍'\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 259 and (tok.bos, tok.eod, tok.pad) == (256, 257, 258)
    assert tok.decode([104, 105, tok.eod, 33]) == "hi!"  # specials are not text
    assert tok.token_string(tok.eod) == "<eod>" and tok.token_string(0xC3) == "<0xC3>"
    with pytest.raises(ValueError, match="expected 'byte'"):
        build_tokenizer("gpt2")


def test_stdlib_corpus_is_deterministic_and_capped():
    tok = ByteTokenizer()
    a = load_corpus("stdlib", tok, 300_000)
    b = load_corpus("stdlib", tok, 300_000)
    assert len(a) == 300_000 and np.array_equal(a, b)
    assert (a == tok.eod).sum() >= 1  # documents are separated
    assert tok.decode(a.tolist()).count("def ") > 100  # it is Python source


def test_corpus_from_a_file_and_a_clear_error(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("abc")
    assert load_corpus(str(f), ByteTokenizer(), 100).tolist() == [97, 98, 99, 257]
    with pytest.raises(FileNotFoundError, match="data.source"):
        load_corpus(str(tmp_path / "missing.txt"), ByteTokenizer(), 100)


def test_sampler_is_a_pure_function_of_the_sample_index():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = SequenceSampler(tokens, seq_length=9, seed=5)
    x, y = sampler.batch(0, 4)
    assert x.shape == (4, 9) and (y[:, :-1] == x[:, 1:]).all()  # labels are inputs shifted
    # Every window once per epoch, in a seeded order that changes between epochs.
    epoch0 = [int(sampler.batch(k, 1)[0][0, 0]) // 9 for k in range(sampler.num_windows)]
    assert sorted(epoch0) == list(range(sampler.num_windows))
    epoch1 = [
        int(sampler.batch(k, 1)[0][0, 0]) // 9
        for k in range(sampler.num_windows, 2 * sampler.num_windows)
    ]
    assert epoch1 != epoch0
    # A fresh sampler (a resumed run) yields the same samples from any position.
    fresh = SequenceSampler(tokens, seq_length=9, seed=5)
    assert (fresh.batch(150, 3)[0] == sampler.batch(150, 3)[0]).all()
    assert not (SequenceSampler(tokens, 9, seed=6).batch(0, 4)[0] == x).all()


def test_sampler_rejects_a_too_short_corpus():
    with pytest.raises(ValueError, match="shorter than one sequence"):
        SequenceSampler(np.arange(5, dtype=np.uint16), seq_length=8, seed=0)
