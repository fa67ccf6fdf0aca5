"""The text a stream sends so far (api.generated_text): an unfinished request holds back an
incomplete UTF-8 character and a tail that a stop string could begin with, never more; a
finished one ends where its stop string began."""

import pytest

from toolkit.inference import api
from toolkit.inference.request import Request
from toolkit.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def text_of(generated: bytes, stop: list[str], final: bool = False) -> str:
    r = Request(prompt=[0], max_new_tokens=100, stop=stop)
    r.tokens.extend(generated)
    return api.generated_text(r, TOK, final=final)


@pytest.mark.parametrize(
    "generated, stop, sent",
    [
        (b"hello wor", ["world!"], "hello "),  # "wor" may become the stop string
        (b"hello wor", ["xyz"], "hello wor"),
        (b"hello w", ["world", "ww"], "hello "),
        (b"say ab", ["aba"], "say "),  # "ab" begins "aba"
        (b"say b", ["ab"], "say b"),  # a stop string's last character begins nothing
        (b"say ab", ["b"], "say ab"),  # a one-character stop string: found or not, never held
        (b"caf\xc3", ["zz"], "caf"),  # half of an "e" with an accent
        ("café ✓".encode(), [], "café ✓"),
    ],
)
def test_unfinished_text_holds_back_what_may_still_change(generated, stop, sent):
    assert text_of(generated, stop) == sent


def test_finished_text_ends_before_its_stop_string():
    r = Request(prompt=[0], max_new_tokens=100, stop=["END"])
    r.tokens.extend(b"done END more")
    r.stop_offset = 5
    assert api.generated_text(r, TOK, final=True) == "done "
