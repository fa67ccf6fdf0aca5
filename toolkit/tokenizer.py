"""Byte-level tokenizer: ids 0-255 are bytes, then the special tokens. Lossless on any text."""

from collections.abc import Sequence


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


def build_tokenizer(name: str) -> ByteTokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer={name!r}: only 'byte' is available")
