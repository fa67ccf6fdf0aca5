"""The text of a request's growing token list, decoded a few tokens at a time.

The engine looks for stop strings after every token and each stream's HTTP thread sends the text
so far; decoding the whole list each time costs O(length) a token, O(length^2) a request, in the
engine's thread or under the GIL beside it (a 4k-token answer: benchmarks/detokenize.py).

Here the text of tokens[:read], which ends on a whole character, is kept; a call decodes only
the tokens after `read` together with a few before it (from `start`), and the new text is what
those add to the few: a tokenizer that writes a token differently at the start of a text
(SentencePiece's leading space) sees every new token in context, as in the whole list. Where a
tokenizer's text of the longer window does not begin with that of the shorter (it rewrote
text already written), the whole list is decoded instead; the result is always the text of the
whole list as the tokenizer writes it. Calls may come from several threads (a lock).
"""

import threading
from collections.abc import Sequence

from toolkit.tokenizer import Tokenizer

CONTEXT = 4  # tokens decoded again before the new ones


class IncrementalText:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text = ""  # of tokens[:read]
        self._read = 0

    def text(self, tokens: Sequence[int], tokenizer: Tokenizer) -> str:
        """tokenizer.decode(tokens), where `tokens` is the list as it has grown since the last
        call (appended to, never changed)."""
        n = len(tokens)
        with self._lock:
            if n < self._read:  # a caller holding an older, shorter view
                return tokenizer.decode(tokens[:n])
            start = max(0, self._read - CONTEXT)
            known = tokenizer.decode(tokens[start : self._read])
            window = tokenizer.decode(tokens[start:n])
            if not window.startswith(known):  # the tokenizer rewrote its earlier text
                text = tokenizer.decode(tokens[:n])
                if not text.endswith("\ufffd"):
                    self._text, self._read = text, n
                return text
            new = window[len(known) :]
            if new.endswith("\ufffd"):  # a character still incomplete: keep it out of _text
                return self._text + new
            self._text += new
            self._read = n
            return self._text
