"""The text of a growing token list, decoded a few tokens at a time (IncrementalText), equals
decoding the whole list after every token: the byte tokenizer (characters split over tokens,
invalid bytes, specials, ids past the vocabulary), a byte-level BPE and a SentencePiece model
trained here (test_tokenizers' files), and a tokenizer that rewrites its earlier text."""

import random
import threading

import pytest

from tests.test_tokenizers import TEXT, train_bpe, train_sentencepiece
from toolkit.inference import incremental_text
from toolkit.inference.incremental_text import IncrementalText
from toolkit.tokenizer import ByteTokenizer, build_tokenizer

SAMPLE = TEXT * 3 + "ascii, é, ✓, 🐍🐍, ünïcode  \n\ttabs and  spaces.\n"


def assert_grows_like_the_whole(ids: list[int], tokenizer) -> int:
    """Feed `ids` one at a time; after each, the text equals decoding all so far. Returns how
    many tokens the calls decoded in all."""
    decoded = []
    real = tokenizer.decode
    tokenizer.decode = lambda t: (decoded.append(len(t)), real(t))[1]
    try:
        text, tokens = IncrementalText(), []
        for i in ids:
            tokens.append(i)
            assert text.text(tokens, tokenizer) == real(tokens), len(tokens)
    finally:
        del tokenizer.decode
    return sum(decoded)


def test_byte_tokenizer_text_grows_like_the_whole():
    tok = ByteTokenizer()
    ids = list(SAMPLE.encode()) + [tok.eod, 0xE2, 0x9C, tok.pad, 0x93, 0xFF, 0x80, 300]
    ids += list("tail ✓".encode())
    decoded = assert_grows_like_the_whole(ids, tok)
    # A few tokens a call (the context, the new one, and characters still incomplete), not
    # the whole list: 2 windows of <= ~CONTEXT + 4 tokens each.
    assert decoded <= 2 * (incremental_text.CONTEXT + 4) * len(ids)


def test_random_bytes_grow_like_the_whole():
    tok, rng = ByteTokenizer(), random.Random(0)
    pieces = [b"a", b"\xc3\xa9", "✓".encode(), "🐍".encode(), b"\x80", b"\xf0\x9f", b"\n"]
    ids = [b for _ in range(400) for b in rng.choice(pieces)]
    assert_grows_like_the_whole(ids + [tok.eod], tok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return train_bpe(tmp / "tokenizer.json"), train_sentencepiece(tmp / "sp.model")


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_trained_tokenizers_text_grows_like_the_whole(trained, kind):
    path = trained[0] if kind == "bpe" else trained[1]
    tok = build_tokenizer(str(path))
    ids = tok.encode(SAMPLE)
    assert len(ids) > 40
    assert_grows_like_the_whole(ids + [tok.eod] + tok.encode(" end ✓"), tok)


class Rewriting(ByteTokenizer):
    """Writes " ." as "." (as a tokenizer's clean-up of spaces may): text already written
    changes when a token follows it."""

    def decode(self, ids):  # noqa: ANN001, ANN201
        return super().decode(ids).replace(" .", ".")


class DummyPrefix(ByteTokenizer):
    """Drops a text's leading space, as SentencePiece models with a dummy prefix (Llama's) do:
    a token decoded alone reads differently from the same token after others."""

    def decode(self, ids):  # noqa: ANN001, ANN201
        text = super().decode(ids)
        return text[1:] if text.startswith(" ") else text


def test_a_token_that_reads_differently_at_the_start_is_read_in_context():
    assert_grows_like_the_whole(list(b" a b  c d "), DummyPrefix())


def test_a_tokenizer_that_rewrites_its_text_still_gives_the_whole_text():
    tok = Rewriting()
    assert_grows_like_the_whole(list(b"a b . c . . d"), tok)


def test_a_shorter_view_and_threads_get_the_whole_text():
    """A caller holding an older, shorter list gets that list's text; threads reading while the
    list grows each get the text of some prefix of it."""
    tok, text = ByteTokenizer(), IncrementalText()
    ids = list(SAMPLE.encode())
    tokens = ids[:50]
    assert text.text(tokens, tok) == tok.decode(tokens)
    assert text.text(ids[:20], tok) == tok.decode(ids[:20])
    wholes = {tok.decode(ids[:n]) for n in range(len(ids) + 1)}
    seen, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(text.text(list(tokens), tok))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for i in ids[50:]:
        tokens.append(i)
        assert text.text(tokens, tok) == tok.decode(tokens)
    stop.set()
    for t in readers:
        t.join()
    assert seen and all(s in wholes for s in seen)
