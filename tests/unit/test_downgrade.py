"""RFC 6152 downgrade (delivery/downgrade.py): 8-bit parts become quoted-printable, the
rest stays byte for byte, and what cannot be encoded is refused with the reason."""

from __future__ import annotations

import email
import email.policy
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authrelay.delivery.downgrade import (
    MAX_DEPTH,
    MAX_PARTS,
    Prohibited,
    Unconvertible,
    downgrade,
    header_8bit,
    headers_8bit,
)

UTF8 = "Grüße aus Köln, naïve café — 100 €".encode()
B64 = b"SGVsbG8gd29ybGQ=\r\n"


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_ascii_message_untouched() -> None:
    msg = b"From: a@x.test\r\nSubject: hi\r\n\r\nplain text\r\n"
    assert downgrade(msg) == msg


def test_single_part_text_becomes_quoted_printable() -> None:
    msg = (b"From: a@x.test\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n" + UTF8 + b"\r\n.a dot line\r\n"
           + b"x" * 200 + b"\r\n")
    out = downgrade(msg)
    assert out.isascii() and all(len(ln) <= 76 for ln in out.split(b"\r\n"))
    assert b"\nContent-Transfer-Encoding: quoted-printable\r\n" in out
    assert b"8bit" not in out
    head = out.split(b"\r\n\r\n")[0]
    assert head.startswith(b"From: a@x.test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain;")
    m = parse(out)
    assert m.get_payload(decode=True) == msg.split(b"\r\n\r\n", 1)[1]


def test_non_mime_message_gets_mime_version() -> None:
    msg = b"From: a@x.test\r\nSubject: s\r\n\r\n" + UTF8 + b"\r\n"
    out = downgrade(msg)
    assert out.startswith(b"From: a@x.test\r\nSubject: s\r\n"
                          b"Content-Transfer-Encoding: quoted-printable\r\n"
                          b"MIME-Version: 1.0\r\n\r\n")
    assert parse(out).get_payload(decode=True) == UTF8 + b"\r\n"


def _multipart(inner: bytes = b"") -> bytes:
    return (b"From: a@x.test\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="BOUND"\r\n'
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            b"preamble\r\n"
            b"--BOUND\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + UTF8 + b"\r\n"
            b"--BOUND\r\n"
            b"Content-Type: text/plain\r\n\r\nascii part, kept as is  \r\n"
            b"--BOUND\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + B64 + inner +
            b"--BOUND--  \r\nepilogue\r\n")


def test_multipart_converts_only_the_8bit_parts_and_keeps_the_rest() -> None:
    msg = _multipart()
    out = downgrade(msg)
    assert out.isascii()
    # The ASCII parts, delimiters (with their transport padding), preamble and epilogue.
    for kept in (b"\r\n\r\npreamble\r\n--BOUND\r\n",
                 b"\r\n--BOUND\r\nContent-Type: text/plain\r\n\r\nascii part, kept as is  "
                 b"\r\n--BOUND\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n" + B64 + b"--BOUND--  \r\n"
                 b"epilogue\r\n"):
        assert kept in out
    assert b"Content-Transfer-Encoding: 7bit\r\n\r\npreamble" in out  # outer label
    parts = list(parse(out).iter_parts())
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[0].get_payload(decode=True) == UTF8
    assert parts[1].get_payload(decode=True) == b"ascii part, kept as is  "
    assert parts[2].get_payload(decode=True) == b"Hello world"


def test_nested_message_rfc822_is_converted_inside() -> None:
    inner = (b"From: b@y.test\r\nSubject: inner\r\n"
             b"Content-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\n" + UTF8 + b"\r\n")
    msg = (b"From: a@x.test\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n'
           b"--o\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           + inner + b"--o--\r\n")
    out = downgrade(msg)
    assert out.isascii()
    att = list(parse(out).iter_parts())[0]
    assert att["Content-Transfer-Encoding"] == "7bit"
    enclosed = att.get_payload()[0]
    assert enclosed["Subject"] == "inner"
    assert enclosed["Content-Transfer-Encoding"] == "quoted-printable"
    assert enclosed.get_payload(decode=True) == UTF8  # the CRLF before --o-- is its own


@pytest.mark.parametrize("msg,reason", [
    (b"From: a@x.test\r\nSubject: " + UTF8 + b"\r\n\r\nbody\r\n", "header"),
    (b"From: a@x.test\r\nContent-Type: text/plain\r\n"
     b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + UTF8 + b"\r\n",
     "encoded quoted-printable"),
    (b"From: a@x.test\r\nContent-Type: message/partial; id=x; number=1\r\n\r\n"
     + UTF8 + b"\r\n", "message/partial"),
    (b"From: a@x.test\r\nContent-Type: multipart/mixed\r\n\r\n" + UTF8 + b"\r\n",
     "without a boundary"),
    (b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     + UTF8 + b"\r\n--b\r\n\r\nx\r\n--b--\r\n", "preamble"),
    (b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"--b\r\nSubject: " + UTF8 + b"\r\n\r\nx\r\n--b--\r\n", "body part's header"),
    (b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: " + UTF8 + b"\r\n\r\nx\r\n"
     b"--b--\r\n", "attached message's header"),
])
def test_unconvertible_says_why(msg: bytes, reason: str) -> None:
    with pytest.raises(Unconvertible, match=reason):
        downgrade(msg)


def test_nesting_is_bounded() -> None:
    depth = MAX_DEPTH + 5
    body = b"Content-Type: text/plain\r\n\r\n" + UTF8 + b"\r\n"
    for i in range(depth):
        body = (f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
                + body + f"--b{i}--\r\n".encode())
    with pytest.raises(Unconvertible, match="nesting"):
        downgrade(b"From: a@x.test\r\n" + body)


def test_a_flood_of_tiny_8bit_parts_is_refused_not_converted() -> None:
    """Attack (an authenticated sender, and a next hop of theirs without 8BITMIME): 20 MB
    of "--b CRLF CRLF 0xff CRLF" is 2 million parts; converting it cost a minute of CPU
    and 1.9 GB. Past MAX_PARTS body parts: 5.6.3, at once."""
    part = b"--b\r\n\r\n\xff\r\n"
    head = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    ok = head + part * MAX_PARTS + b"--b--\r\n"
    assert downgrade(ok).isascii()
    with pytest.raises(Unconvertible, match=f"more than {MAX_PARTS} MIME body parts"):
        downgrade(head + part * (MAX_PARTS + 1) + b"--b--\r\n")


def test_nested_messages_are_not_copied_per_level() -> None:
    """Attack: 49 message/rfc822 levels around a 2 MB 8-bit body. Each level sliced a copy
    of the rest (49 copies alive at once: 1.1 GB for a 20 MB message); now views into
    the message, one join at the end: peak memory a few times the message, not 49."""
    inner = b"Subject: x\r\n\r\n" + (UTF8 + b"\r\n") * (2_000_000 // (len(UTF8) + 2))
    msg = b"MIME-Version: 1.0\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 49 + inner
    tracemalloc.start()
    try:
        out = downgrade(msg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.isascii() and parse(out).get_content_type() == "message/rfc822"
    assert peak < 8 * len(msg), (peak, len(msg))  # was ~50x


def test_rfc2231_boundary_parameter() -> None:
    msg = (b"From: a@x.test\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary*0=\"ab\"; boundary*1=\"cd\"\r\n\r\n"
           b"--abcd\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + UTF8 +
           b"\r\n--abcd--\r\n")
    out = downgrade(msg)
    assert out.isascii()
    assert list(parse(out).iter_parts())[0].get_payload(decode=True) == UTF8


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=300).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), min_size=1, max_size=30))
def test_any_8bit_text_round_trips(lines: list[bytes]) -> None:
    """Whatever the octets (CR/LF only as line ends): the output is 7-bit with lines of
    at most 76 characters, and decoding it gives back exactly the original body."""
    body = b"\r\n".join(lines) + b"\r\n"
    msg = b"From: a@x.test\r\nContent-Type: application/octet-stream\r\n\r\n" + body
    out = downgrade(msg)
    assert out.isascii()
    encoded = out.split(b"\r\n\r\n", 1)[1]
    assert out == msg if body.isascii() else all(len(ln) <= 76
                                                 for ln in encoded.split(b"\r\n"))
    got = email.message_from_bytes(out, policy=email.policy.compat32)
    assert got.get_payload(decode=True) == body


@pytest.mark.parametrize("message, expected", [
    (b"From: a@x\r\nSubject: s\r\n\r\nbl\xc3\xa5\r\n", False),  # UTF-8 in the body only
    ("From: José <a@x>\r\n\r\nbody\r\n".encode(), True),
    (b"From: a@x\r\nX: y\r\n \xc3\xa5 folded\r\n\r\n", True),
    (b"\r\n\xc3\xa5 an empty header, the rest body\r\n", False),
    (b"From: a@x\n\nbare LF \xc3\xa5\n", False),
    (b"From: a@x\r\nSubject: no body \xc3\xa5", True),  # no empty line: all header
    (b"", False),
])
def test_header_8bit_at_every_cut(message: bytes, expected: bool) -> None:
    """The same answer whatever the chunks (a streamed queue file), the empty line split
    between them included."""
    assert header_8bit([message]) is expected
    for cut in range(len(message) + 1):
        for cut2 in range(cut, min(cut + 3, len(message)) + 1):
            chunks = [message[:cut], message[cut:cut2], message[cut2:]]
            assert header_8bit(chunks) is expected, (cut, cut2)


@settings(max_examples=200, deadline=None)
@given(text=st.binary(min_size=1, max_size=400).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"") + "ü".encode()))
def test_a_one_line_part_gets_crlf_soft_line_breaks(text: bytes) -> None:
    """A part of one line (its last CRLF is the delimiter's: an HTML part often is one
    line) had LF soft line breaks, bare LFs that a strict next hop refuses and a
    normalising one turns into CRLF under our DKIM signature: every line end is CRLF,
    each line at most 76 characters, and the part decodes to what was sent."""
    msg = (b'From: a@x.test\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n'
           b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + text +
           b"\r\n--b--\r\n")
    out = downgrade(msg)
    assert out.isascii()
    assert out.count(b"\n") == out.count(b"\r\n"), "a bare LF"
    encoded = out.split(b"\r\n\r\n", 2)[2].split(b"\r\n--b--")[0]
    assert all(len(ln) <= 76 for ln in encoded.split(b"\r\n"))
    part = list(parse(out).iter_parts())[0]
    assert part.get_payload(decode=True) == text


def _signed(part_body: bytes) -> bytes:
    return (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
            b'boundary="s"\r\n\r\n--s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n'
            + part_body + b"\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + B64 + b"--s--\r\n")


def test_an_8bit_signed_part_is_prohibited_at_any_depth() -> None:
    """RFC 1847 2.1, RFC 3156 3: quoted-printable would break the signature: 5.6.2, not
    a conversion (it was converted, as Postfix converts it)."""
    for msg in (b"From: a@x.test\r\n" + _signed(UTF8),
                b'From: a@x.test\r\nContent-Type: multipart/mixed; boundary="m"\r\n\r\n'
                b"--m\r\n" + _signed(UTF8) + b"\r\n--m--\r\n"):
        with pytest.raises(Prohibited, match="multipart/signed") as e:
            downgrade(msg)
        assert e.value.status == "5.6.2"


def test_a_7bit_signed_part_beside_an_8bit_one_is_kept_byte_for_byte() -> None:
    signed = _signed(b"Gr=C3=BC=C3=9Fe")
    msg = (b'From: a@x.test\r\nContent-Type: multipart/mixed; boundary="m"\r\n\r\n'
           b"--m\r\n" + signed + b"\r\n--m\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           + UTF8 + b"\r\n--m--\r\n")
    out = downgrade(msg)
    assert out.isascii() and b"--m\r\n" + signed + b"\r\n--m\r\n" in out


def _mixed(part: bytes, preamble: bytes = b"") -> bytes:
    return (b"From: a@x.test\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + preamble
            + b"--b1\r\nContent-Type: text/plain\r\n\r\n" + UTF8 + b"\r\n--b1\r\n"
            + part + b"\r\n--b1--\r\n")


@pytest.mark.parametrize("message, expected", [
    ("From: José <a@x>\r\n\r\nbody\r\n".encode(), True),  # the message's own
    (b"From: a@x\r\n\r\n" + UTF8, False),  # content only
    (_mixed("Content-Disposition: attachment; filename=\"résumé.pdf\"\r\n\r\n"
            "JVBERi0=".encode()), True),  # a body part's header (RFC 6532)
    (_mixed(b"Content-Type: message/rfc822\r\n\r\n"
            + "Subject: é\r\n\r\nhi".encode()), True),  # an attached message's
    (_mixed(b"Content-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\n"
            + "X-Name: ü\r\n\r\nx\r\n--b2--".encode()), True),  # nested deeper
    (_mixed(b"Content-Type: message/global\r\n\r\n"
            + "Subject: é\r\n\r\nhi".encode()), False),  # RFC 6532 3.5: content
    (_mixed(b"Content-Type: text/plain\r\n\r\n" + UTF8), False),
    (_mixed(b"X: y\r\n\r\nz", preamble=UTF8 + b"\r\n"), False),  # a preamble: no header
])
def test_headers_8bit_looks_into_every_header_section(message: bytes,
                                                      expected: bool) -> None:
    """RFC 6531 3.4 / 6532: UTF-8 in any header section of the message needs SMTPUTF8
    (Postfix's cleanup flags a MIME part's header line too), not UTF-8 content."""
    assert headers_8bit(message) is expected


@pytest.mark.parametrize("part", [
    "Grüße aus Köln\r\nbis bald".encode(),  # no header, no empty line (a lax mailer's)
    "Content-Type: text/plain; charset=utf-8\r\nGrüße: aus Köln\r\n".encode(),
    "Content-Type: text/plain; charset=utf-8\r\nTschüß\r\n\r\nmehr".encode(),
])
def test_headers_8bit_ends_a_parts_header_at_its_first_line_that_is_no_field(
        part: bytes) -> None:
    """A part's header section ends at its first line that is neither a header field
    (an ASCII name, a colon) nor a continuation, as Postfix's MIME parser ends it (the
    line starts the body): 8-bit text there is content, not a UTF-8 header that would
    bounce the message 5.6.7 at a host without SMTPUTF8. A field after a continuation
    still counts."""
    assert headers_8bit(_mixed(part)) is False
    assert headers_8bit(_mixed(b"Content-Type: text/plain;\r\n charset=utf-8\r\n"
                               + "X-Note: é\r\n".encode() + part)) is True
