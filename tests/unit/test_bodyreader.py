"""The DATA reader, fed with bytes: framing, dot-unstuffing, bare CR/LF, size, line length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authrelay.smtpd.bodyreader import BARE, LONG_LINE, OK, TOO_BIG, BodyReader


def run(chunks: list[bytes], max_size: int = 10**9, max_line: int = 998
        ) -> tuple[bytes, bool, bytes, str]:
    r = BodyReader(max_size, max_line)
    out, left, done, err = [], b"", False, OK
    for i, c in enumerate(chunks):
        f = r.feed(c)
        out += f.segments
        if f.error == BARE:
            return b"", False, b"", BARE  # the message is refused: its bytes don't matter
        if f.done:
            done, left, err = True, f.leftover + b"".join(chunks[i + 1:]), f.error
            break
    return b"".join(out), done, left, err


def test_simple_message() -> None:
    body, done, left, err = run([b"Subject: x\r\n\r\nhello\r\n.\r\n"])
    assert (body, done, left, err) == (b"Subject: x\r\n\r\nhello\r\n", True, b"", OK)


def test_empty_message() -> None:
    assert run([b".\r\n"])[:2] == (b"", True)


def test_leftover_is_pipelined_commands() -> None:
    _, done, left, _ = run([b"a\r\n.\r\nQUIT\r\n"])
    assert done and left == b"QUIT\r\n"


def test_dot_unstuffing() -> None:
    body, done, *_ = run([b"..leading\r\n.\r\n"])
    assert done and body == b".leading\r\n"
    body, *_ = run([b"a\r\n...\r\n..x\r\n.\r\n"])
    assert body == b"a\r\n..\r\n.x\r\n"


def test_dot_inside_line_untouched() -> None:
    body, *_ = run([b"a.b\r\n x.\r\n.\r\n"])
    assert body == b"a.b\r\n x.\r\n"


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r",
                                    b"\n.\r", b"\r.\r\n"])
def test_bare_end_of_data_variants_refused(ending: bytes) -> None:
    # SMTP smuggling (CVE-2023-51764 family): no alternative end marker is honoured; the
    # bare CR/LF itself refuses the message.
    data = b"Subject: a\r\n\r\nbody" + ending + b"MAIL FROM:<x@y>\r\nRCPT TO:<v@w>\r\nDATA\r\n"
    data += b"smuggled\r\n.\r\n"
    _, done, _, err = run([data])
    assert err == BARE and not done


@pytest.mark.parametrize("bad", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\n", b"x\r"])
def test_bare_cr_or_lf_anywhere(bad: bytes) -> None:
    _, done, _, err = run([bad + b"\r\n.\r\n"])
    assert err == BARE


def test_size_cap_emits_nothing_past_limit() -> None:
    r = BodyReader(max_size=100)
    total = 0
    for _ in range(50):
        f = r.feed(b"x" * 50 + b"\r\n")
        total += sum(len(s) for s in f.segments)
    f = r.feed(b".\r\n")
    assert f.done and f.error == TOO_BIG and total <= 100


def test_long_line() -> None:
    _, done, _, err = run([b"x" * 999 + b"\r\n.\r\n"])
    assert done and err == LONG_LINE
    _, done, _, err = run([b"x" * 998 + b"\r\n.\r\n"])
    assert done and err == OK
    # measured after un-stuffing: a stuffed 998-octet line is fine
    _, done, _, err = run([b"." + b"." * 998 + b"\r\n.\r\n"])
    assert done and err == OK


def test_long_line_across_chunks() -> None:
    chunks = [b"x" * 500, b"x" * 500, b"\r\n.\r\n"]
    assert run(chunks)[3] == LONG_LINE


_bodies = st.lists(
    st.one_of(
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b".", b"..", b". ", b".\t", b"", b"x."]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(lines=_bodies, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
       tail=st.binary(max_size=20))
def test_any_split_gives_the_same_result(lines: list[bytes], cuts: list[int],
                                         tail: bytes) -> None:
    """However the input is split into chunks, the reader gives the same message."""
    msg = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    wire = stuffed + b".\r\n" + tail
    whole = run([wire])
    points = sorted({c % (len(wire) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in points:
        chunks.append(wire[prev:p])
        prev = p
    chunks.append(wire[prev:])
    split = run([c for c in chunks if c])
    assert whole == split
    assert whole[0] == msg and whole[1] and whole[2] == tail


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=300))
def test_random_bytes_split_invariance(data: bytes, cut: int) -> None:
    cut = min(cut, len(data))
    whole = run([data])
    split = run([c for c in (data[:cut], data[cut:]) if c])
    assert whole == split
    body, done, _, err = whole
    if err != BARE:
        # Whatever was emitted holds no bare CR/LF: nothing can be smuggled downstream.
        assert body.count(b"\n") == body.count(b"\r\n") == body.count(b"\r")


def _bare_by_counts(region: bytes) -> bool:
    """The reference: every CR and every LF is part of a CRLF (the three counts)."""
    crlf = region.count(b"\r\n")
    return region.count(b"\n") != crlf or region.count(b"\r") != crlf


@settings(max_examples=2000, deadline=None)
@given(data=st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"x", b".", b"\r\r\n",
                                      b"\r\n\n"]), max_size=40).map(b"".join))
def test_the_bare_line_end_check_equals_the_three_counts(data: bytes) -> None:
    """BodyReader._bare (CR marks shifted against LF marks) decides as counting CRLF, CR
    and LF did, for any mix of line ends, at either edge of a region included."""
    assert BodyReader._bare(data) == _bare_by_counts(data)


@pytest.mark.parametrize("width", [2, 4, 80, 998])
def test_one_bare_end_anywhere_in_a_chunk_is_found(width: int) -> None:
    """A chunk of CRLF lines with one CR or LF alone at each place near its edges and in
    its middle, and one CRLF split by the chunk's edges: found as the counts find it."""
    chunk = (b"x" * (width - 2) + b"\r\n") * (16384 // width)
    assert not BodyReader._bare(chunk)
    places = [*range(6), *range(len(chunk) // 2 - 3, len(chunk) // 2 + 3),
              *range(len(chunk) - 6, len(chunk))]
    for i in places:
        for lone in (b"\r", b"\n"):
            region = chunk[:i] + lone + chunk[i:]
            assert BodyReader._bare(region) and _bare_by_counts(region), (i, lone)
    assert BodyReader._bare(b"\n" + chunk) and BodyReader._bare(chunk + b"\r")


_line_runs = st.lists(st.tuples(st.integers(min_value=0, max_value=40),
                                st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])),
                      max_size=25)


@settings(max_examples=400, deadline=None)
@given(runs=_line_runs, max_line=st.integers(min_value=1, max_value=30),
       cuts=st.lists(st.integers(min_value=0, max_value=1200), max_size=6))
def test_line_length_and_bare_ends_match_a_per_line_reference(
        runs: list[tuple[int, bytes]], max_line: int, cuts: list[int]) -> None:
    """The chunk scans (the CR/LF order check, the jump over line windows) decide as a
    line-by-line reading of the same message would, however it is cut."""
    msg = b"".join(b"x" * n + end for n, end in runs)
    wire = msg + (b"" if msg.endswith(b"\r\n") or not msg else b"\r\n") + b".\r\n"
    points = sorted({c % (len(wire) + 1) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    _, done, _, err = run([c for c in chunks if c], max_line=max_line)
    body = wire[:-3]
    ends = body.replace(b"\r\n", b"")
    if b"\r" in ends or b"\n" in ends:
        assert err == BARE
    elif max(len(line) for line in body.split(b"\r\n")) > max_line:
        assert done and err == LONG_LINE
    else:
        assert done and err == OK


def test_a_chunk_of_stuffed_dots_is_one_segment() -> None:
    """However many stuffed dots a chunk holds, a feed emits at most one segment: every
    segment is a write(2) into the spool and a turn of per-segment work downstream. A
    16 KiB chunk of "..\\r\\n" lines was 4,096 segments (a 5 MB message of them: ~50 times
    the server CPU of a plain one, 9.5 s of the event loop), with the same bytes."""
    lines = b"..\r\n" * 4096  # on the wire: each line one stuffed dot
    r = BodyReader(10**9)
    first = r.feed(b"Subject: x\r\n\r\n" + lines)
    last = r.feed(lines + b".\r\n")
    assert len(first.segments) <= 1 and len(last.segments) <= 1
    assert last.done and last.error == OK
    body = b"".join(first.segments + last.segments)
    assert body == b"Subject: x\r\n\r\n" + b".\r\n" * 8192


def test_long_line_found_in_a_chunk_of_stuffed_dots() -> None:
    """The line-length check sees the joined segment as it saw the pieces: a long line
    between stuffed dots, or split across two feeds, is still found."""
    long = b"." + b"x" * 999 + b"\r\n"  # 999 octets of text after un-stuffing: too long
    _b, done, _l, err = run([b"..a\r\n" * 10 + long + b"..b\r\n" * 10 + b".\r\n"])
    assert (done, err) == (True, LONG_LINE)
    ok = b"." + b"x" * 998 + b"\r\n"  # 998: the limit
    _b, done, _l, err = run([b"..a\r\n" * 10 + ok[:500], ok[500:] + b".\r\n"])
    assert (done, err) == (True, OK)


def test_stuffed_dots_cost_no_python_step_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Un-stuffing is C-speed scans: a feed emits once, however many stuffed dots its
    chunk holds (counted at the reader's one emitting step). It was one Python step per
    stuffed dot: 4,096 for a 16 KiB chunk of ".." lines, and a 5 MB message of them cost
    the server ~15 times the CPU of a plain one; now the same."""
    calls = []
    emit = BodyReader._emit

    def counting(self: BodyReader, out: object, piece: bytes) -> None:
        calls.append(len(piece))
        emit(self, out, piece)  # type: ignore[arg-type]

    monkeypatch.setattr(BodyReader, "_emit", counting)
    wire = b"Subject: x\r\n\r\n" + b"..\r\n" * 8192 + b".\r\n"
    chunks = [wire[i:i + 16384] for i in range(0, len(wire), 16384)]
    body, done, _left, err = run(chunks)
    assert (done, err) == (True, OK) and body == b"Subject: x\r\n\r\n" + b".\r\n" * 8192
    assert len(calls) <= len(chunks)
