"""The tokenizers behind data.tokenizer: byte-level, Hugging Face `tokenizers` files and
SentencePiece models, each trained here from local text (no download) with the real library."""

import io
import sysconfig
from pathlib import Path

import pytest

from toolkit.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
)

TEXT = "def f(x):\n    return 'héllo ✓ 🐍'  # ünïcode\n"


def training_lines() -> list[str]:
    source = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    return [line for line in source.read_text().splitlines() if line.strip()]


def train_bpe(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json with <|endoftext|>, as GPT-style tokenizers have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_lines(), trainer)
    tok.save(str(path))
    return path


def train_sentencepiece(path: Path, vocab_size: int = 500) -> Path:
    """A SentencePiece BPE model with byte fallback (as the reference's 256k model has)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        # Lossless on code, as models for code are trained: no whitespace folding.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    return train_bpe(tmp / "tokenizer.json"), train_sentencepiece(tmp / "sp.model")


def test_hugging_face_tokenizer_file(files):
    bpe, _ = files
    tok = build_tokenizer(str(bpe))
    assert isinstance(tok, HFTokenizer) and isinstance(build_tokenizer(f"hf:{bpe}"), HFTokenizer)
    assert tok.vocab_size == 400
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())  # merges were learnt
    assert tok.token_string(tok.eod) == "<|endoftext|>" and tok.bos == tok.pad == tok.eod
    assert tok.decode([*ids[:3], tok.eod, 10_000]) == tok.decode(ids[:3])  # specials, padding
    assert tok.token_string(10_000) == "<unk>"


def test_sentencepiece_model(files):
    _, sp = files
    tok = build_tokenizer(str(sp))
    assert isinstance(tok, SentencePieceTokenizer)
    assert isinstance(build_tokenizer(f"sentencepiece:{sp}"), SentencePieceTokenizer)
    assert tok.vocab_size == 500 and tok.token_string(tok.eod) == "</s>"
    assert tok.token_string(tok.bos) == "<s>" and tok.pad == tok.eod  # no <pad> piece
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())
    assert tok.decode([*ids, tok.eod, 9999]) == tok.decode(ids)


def test_bad_specs_and_files_name_the_problem(tmp_path, files):
    bpe, sp = files
    with pytest.raises(TokenizerError, match="expected 'byte'"):
        build_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match=r"nope\.model: no such file"):
        build_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(TokenizerError, match=r"sp\.model: not a Hugging Face tokenizer file"):
        build_tokenizer(f"hf:{sp}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a SentencePiece model"):
        build_tokenizer(f"sentencepiece:{bpe}")
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "bare.json"))
    with pytest.raises(TokenizerError, match=r"bare\.json: no end-of-document token"):
        build_tokenizer(str(tmp_path / "bare.json"))
