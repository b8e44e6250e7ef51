"""dotlines.find_mark: the first CRLF "." found by window, memchr and search must be
exactly `bytes.find(b"\\r\\n.", start)`, wherever the window's edge falls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authrelay import dotlines
from authrelay.delivery.client import dot_stuff
from authrelay.dotlines import find_mark

# Texts of CR, LF, dots and letters, so marks, near misses ("\r.", "\n.", "\r\r\n."),
# dots without a line start and long dot-free stretches all occur.
_texts = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"x", b"xxxxxxxx",
                                   b"\r\n.", b"\r\n..", b"\r\n.\r\n"]),
                  max_size=60).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(data=_texts, start=st.integers(min_value=-3, max_value=80),
       window=st.integers(min_value=1, max_value=24))
def test_find_mark_is_bytes_find(data: bytes, start: int, window: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dotlines, "WINDOW", window)  # the edge anywhere in short texts
        assert find_mark(data, start) == data.find(b"\r\n.", max(start, 0))


@pytest.mark.parametrize("at", [0, 1, 2, 3, 4093, 4094, 4095, 4096, 4097, 4098, 9000])
def test_a_single_mark_past_a_dot_free_stretch(at: int) -> None:
    """The default window: one line-starting dot anywhere in a long dot-free body (a
    header's dots before it, or none), and the same text without it."""
    for head in (b"", b"From: a@b.example\r\nTo: c@d.example\r\n\r\n"):
        plain = head + (b"X" * 78 + b"\r\n") * 200
        cut = len(head) + at
        data = plain[:cut] + b"\r\n." + plain[cut:]
        assert find_mark(data) == data.find(b"\r\n.")
        assert find_mark(plain) == plain.find(b"\r\n.")
        for start in (0, cut, cut + 1, cut + 3):
            assert find_mark(data, start) == data.find(b"\r\n.", start)


def test_dot_stuff_equals_the_plain_replace() -> None:
    """The courier skips the replace only where it would change nothing."""
    body = (b"Y" * 78 + b"\r\n") * 300
    for data in (body, b"." + body, body + b".x\r\n", body[:5000] + b".\r\n" + body,
                 b"Subject: a.b\r\n\r\n" + body, b"a\r\n.b\r\n" * 3000, b"\r\n.x" + body):
        want = data.replace(b"\r\n.", b"\r\n..")
        want = (b"." + want if want.startswith(b".") else want) + b".\r\n"
        assert dot_stuff(data) == want
