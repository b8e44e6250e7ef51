"""localsubmit._Frames: the local socket's framed message read as lines (what
localmail.submit reads from every local user's `sendmail`, in the master's threads), and
localmail's reading of its header section."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest

from authrelay.localmail import _unfold
from authrelay.localsubmit import MAX_FRAME, Truncated, _Frames


def _framed(*frames: bytes, end: bool = True) -> io.BytesIO:
    out = b"".join(struct.pack(">I", len(f)) + f for f in frames)
    return io.BytesIO(out + (struct.pack(">I", 0) if end else b""))


def _lines(fr: _Frames, limit: int = 65536) -> list[bytes]:
    out = []
    while line := fr.readline(limit):
        out.append(line)
    return out


def test_lines_cross_frames_and_long_ones_come_in_pieces() -> None:
    fr = _Frames(_framed(b"Subject: a\nb", b"c\n\n", b"x" * 10 + b"\ntail"))
    assert _lines(fr, 4) == [b"Subj", b"ect:", b" a\n", b"bc\n", b"\n", b"xxxx",
                             b"xxxx", b"xx\n", b"tail"]
    fr = _Frames(_framed(b"one\ntwo\n", b"three"))
    assert _lines(fr, -1) == [b"one\n", b"two\n", b"three"]


def test_a_client_gone_before_the_zero_frame_is_truncated() -> None:
    fr = _Frames(_framed(b"a\nb", end=False))
    assert fr.readline() == b"a\n"
    with pytest.raises(Truncated):
        fr.readline()


def test_a_frame_of_short_lines_is_read_without_copying_its_rest() -> None:
    """A local user's frame of 1 MiB of empty lines: each line taken out used to copy the
    rest of the frame (a million copies of half a MiB: 36 s of the master's CPU with the
    GIL, per MiB sent, from `nobody`). Reading a line now allocates only the line."""
    fr = _Frames(_framed(b"\n" * MAX_FRAME))
    assert fr.readline() == b"\n"  # the frame is in
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for _ in range(1000):
            assert fr.readline(65536) == b"\n"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated to read 1,000 one-byte lines"


def test_header_fields_unfold_as_one_value_each() -> None:
    """localmail._unfold (what -t and the From: check read): a field's folds joined by one
    space each, stripped, with the lines it spans; a value of 200,000 folds in one piece
    (it was grown a fold at a time, copied per fold: 2.7 s of the master's CPU for a
    local user's 1 MiB header section of folds, 0.18 s now)."""
    assert _unfold([b"To: a", b" b ", b"\tc", b"Subject:x", b"X-Y:", b"  "]) == [
        ("to", "a b c", 0, 3), ("subject", "x", 3, 4), ("x-y", "", 4, 6)]
    [(name, value, start, end)] = _unfold([b"X-Long: v", *[b" w"] * 200_000])
    assert (name, start, end) == ("x-long", 0, 200_001)
    assert value == "v" + " w" * 200_000


def test_a_crlf_cut_between_two_pieces_is_one_line_end() -> None:
    """A line of LINE_PIECE - 1 octets and CR LF comes in two pieces, the CR ending the
    first: one line end, not two (a blank line there ended the header section)."""
    from authrelay.localmail import LINE_PIECE
    from authrelay.localmail import _lines as message_lines
    long = b"X-Long: " + b"y" * (LINE_PIECE - 1 - 8)
    data = b"Subject: a\r\n" + long + b"\r\nX-After: 1\r\n\r\n" + b"z" * LINE_PIECE + b"\r\n"
    for frames in ((data,), tuple(data[i:i + 7] for i in range(0, len(data), 7))):
        got = b"".join(message_lines(_Frames(_framed(*frames)), True))
        assert [len(ln) for ln in got.split(b"\r\n")] == [10, LINE_PIECE - 1, 10, 0,
                                                         LINE_PIECE, 0]
        assert got == data


def test_a_long_lines_last_piece_of_a_dot_does_not_end_the_message() -> None:
    """Without -i a line of a lone '.' ends the message; the last piece of a longer line
    that is a '.' is the end of that line, not a line of its own (it ended the message
    there: the rest of the message dropped, a 0, queued)."""
    from authrelay.localmail import LINE_PIECE
    from authrelay.localmail import _lines as message_lines
    data = b"Subject: a\r\n\r\n" + b"x" * LINE_PIECE + b".\r\nrest\r\n.\r\nafter the end\r\n"
    got = b"".join(message_lines(_Frames(_framed(data)), False))
    assert got == b"Subject: a\r\n\r\n" + b"x" * LINE_PIECE + b".\r\nrest\r\n"
