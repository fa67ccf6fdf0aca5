"""Tokenizers behind one spec string (`data.tokenizer`, `--tokenizer`):

    byte                               256 byte ids + <bos> <eod> <pad> (lossless, the default)
    hf:PATH or PATH.json               a Hugging Face `tokenizers` JSON file (tokenizer.json)
    sentencepiece:PATH or PATH.model   a SentencePiece model (the reference's 8B models use one)

All share one interface: encode, decode, vocab_size, bos, eod, pad, token_string.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos: int
    eod: int
    pad: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_string(self, i: int) -> str: ...


class TokenizerError(ValueError):
    """A tokenizer spec or file is unusable: the message names it and why."""


class ByteTokenizer:
    """256 byte ids followed by <bos>, <eod> (end of document) and <pad>."""

    specials = ("<bos>", "<eod>", "<pad>")

    def __init__(self) -> None:
        self.bos, self.eod, self.pad = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.specials)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes of ids < 256; specials are dropped, ids beyond the vocabulary become U+FFFD."""
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif i >= self.vocab_size:
                out.extend("\ufffd".encode())
        return out.decode("utf-8", errors="replace")

    def token_string(self, i: int) -> str:
        """One token as text, for per-token display (a lone byte of a multi-byte char shows as hex)."""
        if i >= 256:
            return self.specials[i - 256] if i < self.vocab_size else "<unk>"
        b = bytes([i])
        return b.decode("utf-8") if i < 128 else f"<0x{i:02X}>"


# End-of-document / begin / pad tokens by the names common tokenizer files give them.
EOD_NAMES = ("<|endoftext|>", "<eod>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file. The end-of-document token is the first of
    EOD_NAMES in its vocabulary; <bos> and <pad> fall back to it when the file has none."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer file: {e}") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = next((vocab[n] for n in EOD_NAMES if n in vocab), None)
        if eod is None:
            raise TokenizerError(
                f"{self.path}: no end-of-document token (looked for {', '.join(EOD_NAMES)})"
            )
        self.eod = eod
        self.bos = next((vocab[n] for n in BOS_NAMES if n in vocab), eod)
        self.pad = next((vocab[n] for n in PAD_NAMES if n in vocab), eod)
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        # No template tokens (<bos> etc.): documents are delimited by <eod> explicitly.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Specials are dropped; ids in the padded part of the vocabulary are ignored."""
        return self._tok.decode([i for i in ids if i < self._vocab_size], skip_special_tokens=True)

    def token_string(self, i: int) -> str:
        return self._tok.id_to_token(i) if 0 <= i < self._vocab_size else "<unk>"


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; <eod> is its </s> (eos), as in the reference."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model: {e}") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{self.path}: the model has no end-of-sentence (</s>) piece")
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eod
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Control pieces decode to nothing; ids in the padded part of the vocabulary are ignored."""
        return self._sp.DecodeIds([int(i) for i in ids if 0 <= i < self.vocab_size])

    def token_string(self, i: int) -> str:
        return self._sp.IdToPiece(i) if 0 <= i < self.vocab_size else "<unk>"


def build_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a spec names (see the module docstring); errors name the spec."""
    if spec == "byte":
        return ByteTokenizer()
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("hf", "sentencepiece"):
        path = Path(rest)
    else:
        path = Path(spec)
        kind = {".json": "hf", ".model": "sentencepiece"}.get(path.suffix, "")
        if not kind:
            raise TokenizerError(
                f"tokenizer {spec!r}: expected 'byte', a tokenizer .json file, a SentencePiece "
                ".model file, or hf:PATH / sentencepiece:PATH"
            )
    if not path.is_file():
        raise TokenizerError(f"tokenizer {spec!r}: {path}: no such file")
    return HFTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)
