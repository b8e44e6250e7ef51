"""The outbound client's sans-I/O reply parser and command encoder, driven with bytes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authrelay.delivery import wire
from authrelay.delivery.wire import MAX_LINE, ProtocolError, ReplyParser, SMTPReply

EHLO = (b"250-mx.example.test Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
        b"250-AUTH=LOGIN\r\n250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")


def test_single_and_multiline() -> None:
    p = ReplyParser()
    assert p.feed(b"220 mx ready\r\n") == [SMTPReply(220, ("mx ready",))]
    (rep,) = p.feed(EHLO)
    assert rep.code == 250 and len(rep.lines) == 7
    ext = wire.parse_ehlo(rep)
    assert ext["pipelining"] == "" and ext["size"] == "10240000"
    assert wire.auth_methods(ext) == {"PLAIN", "LOGIN"}
    assert "smtputf8" in ext and "8bitmime" in ext


def test_pipelined_replies_in_one_read() -> None:
    p = ReplyParser()
    reps = p.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 later\r\n354 go ahead\r\n")
    assert [r.code for r in reps] == [250, 250, 450, 354]
    assert str(reps[2]) == "450 4.2.1 later"


@given(st.integers(min_value=1, max_value=40))
def test_any_split_gives_the_same_replies(step: int) -> None:
    data = EHLO + b"250 2.1.0 ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n"
    p = ReplyParser()
    out = []
    for i in range(0, len(data), step):
        out += p.feed(data[i:i + step])
    assert [r.code for r in out] == [250, 250, 550]
    assert out[2].text == "5.1.1 no\n5.1.1 such user"
    assert not p.pending


def test_bare_lf_and_bare_code_accepted() -> None:
    p = ReplyParser()
    assert [r.code for r in p.feed(b"250 ok\n354\r\n")] == [250, 354]


@pytest.mark.parametrize("data", [
    b"hello\r\n", b"25 short\r\n", b"999 out of range\r\n", b"099 low\r\n",
    b"250-a\r\n251 b\r\n", b"250xno separator\r\n",
])
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(data)


def test_bounded_line_and_reply() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250 " + b"x" * MAX_LINE)  # no line end: not buffered forever
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250-x\r\n" * (wire.MAX_LINES + 1))


def test_utf8_text_decoded_with_replacement() -> None:
    (rep,) = ReplyParser().feed("550 5.1.1 <bjørn@example.test> unknown\r\n".encode()
                                + b"")
    assert "bjørn" in rep.text
    (rep,) = ReplyParser().feed(b"550 bad \xff byte\r\n")
    assert "\ufffd" in rep.text


def test_commands() -> None:
    assert wire.mail_from(b"a@b", [b"SIZE=10", b"BODY=8BITMIME"]) == \
        b"MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME\r\n"
    assert wire.rcpt_to(b"c@d", []) == b"RCPT TO:<c@d>\r\n"
    with pytest.raises(ValueError):
        wire.rcpt_to(b"c@d>\r\nRSET", [])  # no second command smuggled into one
    token = wire.auth_plain("user", "pä ss").split()[2]
    assert base64.b64decode(token) == b"\0user\0p\xc3\xa4 ss"


def _fed(chunks: list[bytes]) -> tuple[list[SMTPReply], bool] | str:
    """The replies of feeding `chunks` in turn, or the ProtocolError's text (replies
    before it are the chunking's, not the parse's: the connection drops them all), and
    whether a reply is left unfinished."""
    p, out = ReplyParser(), []
    try:
        for c in chunks:
            out += p.feed(c)
    except ProtocolError as e:
        return str(e)
    return out, p.pending


WHOLE_EDGES = [
    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
    b"250 2.0.0 Ok: queued as 4XyZ\r\n", b"250 \r\n", b"250\r\n", b"354\r\n",
    b"250 x\r\r\n", b"250 a\rb\r\n", b"250 ok\n354 go\r\n", b"250 ok\r\n\n",
    b"250-a\r\n250 b\r\n", b"250-a\r\n251 b\r\n", b"250 a\r\n250-b\r\n250 c\r\n",
    b"250-a\r\n250-b\r\n", b"\r\n", b"250 ok\r\n\r\n", b"hello\r\n", b"25 short\r\n",
    b"999 out of range\r\n", b"199 low\r\n", b"600 high\r\n", b"2a0 x\r\n",
    b"\xd9\xa0\xd9\xa1\xd9\xa2 arabic digits\r\n", b"+25 sign\r\n", b" 250 lead\r\n",
    b"250xno separator\r\n", b"250\tx\r\n", b"550 bad \xff byte\r\n",
    "550 5.1.1 <bjørn@example.test> unknown\r\n".encode(),
    b"250 " + b"x" * (MAX_LINE - 4) + b"\r\n", b"250 " + b"x" * (MAX_LINE - 3) + b"\r\n",
    b"250 ok\r\n" + b"250 " + b"x" * MAX_LINE + b"\r\n",
    b"250-x\r\n" * wire.MAX_LINES + b"250 y\r\n", b"250-x\r\n" * (wire.MAX_LINES - 1)
    + b"250 y\r\n", b"250 ok\r\n550 no\r\n452 4.5.3 too many\r\n421 bye\r\n",
]


@pytest.mark.parametrize("data", WHOLE_EDGES)
def test_whole_lines_read_at_once_equal_the_line_by_line_parse(data: bytes) -> None:
    """feed() takes a read of whole CRLF lines in one step (issue 22): the same replies,
    the same ProtocolError and the same unfinished reply as the line-by-line parse of
    the same bytes (which a read that starts with a buffered byte takes), alone, after
    a whole reply and inside a multi-line one."""
    for before in ([], [b"250 a\r\n"], [b"250-first\r\n"]):
        assert _fed([*before, data]) == _fed([*before, data[:1], data[1:]])
