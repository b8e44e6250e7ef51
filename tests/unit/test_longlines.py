"""longlines.LineBreaker: lines over the limit broken as Postfix's smtp client breaks them
(smtp_line_length_limit: the limit's octets, CRLF SPACE, then at most limit - 1 a line),
whatever pieces the text comes in, at a cost linear in its octets."""

from __future__ import annotations

import tracemalloc

import pytest

from authrelay.longlines import LineBreaker


def _postfix(text: bytes, limit: int) -> bytes:
    """The rule, one whole line at a time (smtp_proto.c smtp_text_out's loop)."""
    out = []
    for line in text.split(b"\r\n"):
        parts, room = [], limit
        while len(line) > room:
            parts.append(line[:room])
            line = line[room:]
            room = limit - 1
        parts.append(line)
        out.append(b"\r\n ".join(parts))
    return b"\r\n".join(out)


def _fed(pieces: list[bytes], limit: int) -> tuple[bytes, bool]:
    b = LineBreaker(limit)
    return b"".join(map(b.feed, pieces)), b.broken


def test_a_line_of_the_limit_passes_and_one_octet_more_is_broken_as_postfix_does() -> None:
    ok = b"x" * 998 + b"\r\n"
    assert _fed([ok, ok], 998) == (ok + ok, False)
    assert _fed([b"y" * 999 + b"\r\n"], 998) == (b"y" * 998 + b"\r\n y\r\n", True)
    out, _ = _fed([b"z" * 3000 + b"\r\n"], 998)
    assert [len(ln) for ln in out.split(b"\r\n")] == [998, 998, 998, 9, 0]
    assert out.replace(b"\r\n ", b"") == b"z" * 3000 + b"\r\n"


@pytest.mark.parametrize("text", [
    b"abcdefghijklmnopq\r\nshort\r\n\r\nabcdefg\r\nxy",
    b"0123456789abcdef",
    b"\r\n\r\nabcdefghij\r\nabcde\r\n",
])
def test_pieces_cut_anywhere_give_what_the_whole_gives(text: bytes) -> None:
    """Every way of cutting `text` in two or three (never inside a CRLF), at a limit of
    5: the column is carried across pieces, and the output is the rule's."""
    want = _postfix(text, 5)
    assert _fed([text], 5)[0] == want
    cuts = [i for i in range(len(text) + 1) if text[i - 1:i + 1] != b"\r\n"]
    for i in cuts:
        for j in (c for c in cuts if c >= i):
            assert _fed([text[:i], text[i:j], text[j:]], 5)[0] == want, (i, j)


def test_a_hundred_megabytes_of_one_line_cost_memory_of_a_piece() -> None:
    """100 MB of one line in 64 KiB pieces (what localmail reads): each piece's output
    is about its size, nothing kept between pieces but the column."""
    piece = b"q" * 65536
    n = 100_000_000 // len(piece) + 1
    b = LineBreaker(998)
    total = 0
    tracemalloc.start()
    try:
        for _ in range(n):
            out = b.feed(piece)
            total += len(out)
            del out
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    octets = n * len(piece)
    breaks = -(-(octets - 998) // 997)
    assert total == octets + 3 * breaks
    assert peak < 4 * len(piece), f"{peak} bytes for {octets} octets of one line"
