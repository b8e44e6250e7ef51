"""The engine's fast paths (smtpd/protocol.py, address.py) give the bytes of the slow ones.

Each cut of issue 22's per-command cost keeps a slower, obviously right form somewhere:
`Reply.lines()` for the wire form of a reply, the character-by-character rules the
parsers had. Each test here compares the engine's output with that form, over the
constants, edge cases and Hypothesis examples, so a fast path that differs fails.
"""

from __future__ import annotations

from engineharness import Harness

from authrelay import replies
from authrelay.types import Reply


def _wire(h: Harness, r: Reply) -> bytes:
    h.eng.data_to_send()
    h.eng._reply(r)
    return h.eng.data_to_send()


def test_every_constant_reply_and_an_equal_copy_go_out_as_reply_lines() -> None:
    h = Harness()
    constants = [r for r in vars(replies).values() if isinstance(r, Reply)]
    assert len(constants) > 50
    for r in constants:
        assert _wire(h, r) == r.lines(), r
        copy = Reply(r.code, r.enhanced, r.text)  # equal, not the same object
        assert _wire(h, copy) == r.lines(), r
    # a reply the table does not hold: rendered as it is, never a constant's bytes
    odd = Reply(250, "2.0.0", "Ok\nsecond line")
    assert _wire(h, odd) == b"250-2.0.0 Ok\r\n250 2.0.0 second line\r\n"
