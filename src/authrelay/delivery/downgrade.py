"""RFC 6152 downgrade: an 8-bit message for a next hop that does not offer 8BITMIME.

Owns turning a message with 8-bit octets into a 7-bit one (as Postfix's and sendmail's
8-bit to 7-bit conversion does), or saying why it cannot be. Contract:
`downgrade(message) -> bytes` (CRLF text in, CRLF text out) or raises `Unconvertible`
(the reason and its `status`; the courier bounces it with 554 and that status: 5.6.3,
RFC 3463 "conversion required but not supported", or a `Prohibited`'s 5.6.2). Pure, no
I/O; the courier runs it in a thread, at most `MAX_CONCURRENT` at once (a message is up
to `[limits] max_message_size`: memory is bounded to about four times that per
conversion: the parts are views into the message, `MAX_PARTS` at most).
`headers_8bit(message) -> bool`: 8-bit octets in any header section of the message (the
courier's test for SMTPUTF8, RFC 6531 3.4).

What is converted (RFC 2045, RFC 2046, RFC 6152 3):
- a leaf part (any type but multipart/* and message/*; also message/global*, which RFC
  6532 3.5 lets be encoded) whose content has 8-bit octets and whose
  Content-Transfer-Encoding is 7bit/8bit/binary/absent: its content is encoded
  quoted-printable and its Content-Transfer-Encoding field says so (replaced in place, or
  added); the top level of a message without MIME-Version: gets `MIME-Version: 1.0`;
- multipart/*: each body part in turn, recursively (multipart/digest parts default to
  message/rfc822); the delimiters, preamble and epilogue are kept byte for byte;
- message/rfc822: the enclosed message is converted in turn (RFC 2046 5.2.1 allows no
  encoding of message/rfc822 itself), its own 8-bit header fields cannot be.
Everything without 8-bit octets is passed through byte for byte, header fields included
(only a converted part's Content-Transfer-Encoding field changes, and the 8bit/binary
label of a multipart or message/rfc822 around converted parts becomes 7bit).
What must not be converted (Prohibited, 5.6.2): 8-bit octets in a multipart/signed (at
any depth): its signature covers its parts' octets as sent (RFC 1847 2.1; RFC 3156 3 and
RFC 8551 3.1 have agents treat it as opaque and signers send it 7-bit), so a conversion
would deliver a signature that fails (Postfix's converter does, treating it as any
multipart); the sender is told instead, and can send it again encoded.
What cannot be converted (Unconvertible, 5.6.3): 8-bit octets in a header field (RFC
5322 allows none; RFC 6532 needs SMTPUTF8), in a multipart's preamble or epilogue, in a
part that already claims quoted-printable or base64 (malformed), in message/partial,
message/external-body or another message/* type (RFC 2046 5.2: 7bit only), a multipart
without a boundary that holds 8-bit octets, MIME nesting deeper than `MAX_DEPTH`, more
than `MAX_PARTS` body parts.
Headers are parsed with the stdlib email package (compat32: the parsed header is only
read, never re-generated); the body is split by its boundaries here, on the raw bytes.

DKIM (RFC 6376 5.3 asks signers to convert before signing; we know the next hop only at
delivery): the courier re-signs the converted form at delivery with the same signer,
replacing the signature made at submission (the queue file's prepend), so the signature
verifies at the receiver; signatures by others in the message break as they would at any
converting MTA.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_DEPTH = 50  # MIME nesting (multipart / message/rfc822 levels) converted
# Body parts (at every level) of a message that needs converting. Without a bound, 20 MB
# of 2 million tiny 8-bit parts cost a minute of CPU and 1.9 GB (measured) for a next
# hop that simply does not offer 8BITMIME; real mail has tens of parts.
MAX_PARTS = 10_000
MAX_CONCURRENT = 2  # conversions at once per courier (memory bound)
CRLF = b"\r\n"
_PARSER = BytesHeaderParser(policy=compat32)
_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*(?:\r\n[ \t].*)*\r\n")
_MIME_VERSION = re.compile(rb"(?im)^mime-version[ \t]*:")
_BLANK = re.compile(rb"\r\n\r\n")
_IDENTITY = ("7bit", "8bit", "binary")
_HEADER_END = re.compile(rb"\n\r?\n")  # the empty line (a bare LF tolerated)
_LF = re.compile(rb"\n")

Buf = bytes | memoryview


class Unconvertible(Exception):
    """The message has 8-bit octets where no 7-bit encoding can hold them."""

    status = "5.6.3"  # RFC 3463: conversion required but not supported


class Prohibited(Unconvertible):
    """The message has 8-bit octets where converting them is forbidden: a signed part."""

    status = "5.6.2"  # RFC 3463: conversion required and prohibited


def is_8bit(data: bytes) -> bool:
    """Any octet above 127 (C speed)."""
    return not data.isascii()


def header_8bit(chunks: Iterable[bytes]) -> bool:
    """Octets above 127 in the header section of the message `chunks` make up (read only
    until the empty line that ends it): an internationalised header (RFC 6532), which
    RFC 6531 3.4 lets go only to a host offering SMTPUTF8. Only the message's own header
    section, streamed (headers_8bit looks at the parts' too, on the message in memory)."""
    tail = b"\n"  # the message starts a line: an empty first line is an empty header
    for chunk in chunks:
        buf = tail + chunk
        m = _HEADER_END.search(buf)
        if not (buf if m is None else buf[:m.start()]).isascii():
            return True
        if m is not None:
            return False
        tail = buf[-2:]
    return False


def _ascii(data: Buf) -> bool:
    """bytes.isascii for a view too (a transient copy: C speed, freed at once)."""
    return data.isascii() if isinstance(data, bytes) else data.tobytes().isascii()


class _Walk:
    """One conversion: the output pieces (views into the message where nothing changes,
    joined once at the end: no copy of the message per nesting level) and the parts
    budget."""

    def __init__(self) -> None:
        self.out: list[Buf] = []
        self.parts = 0

    def part(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Unconvertible(f"more than {MAX_PARTS} MIME body parts")


def downgrade(message: bytes) -> bytes:
    """The message as 7-bit text (see the module docstring); raises Unconvertible."""
    head, sep, body = _split(memoryview(message))
    _ascii_header(head, "the message's header")
    w = _Walk()
    _entity(w, head, sep, body, "text/plain", 0, top=True)
    return b"".join(w.out)


def _split(data: memoryview) -> tuple[bytes, bytes, memoryview]:
    """(header section with its last CRLF, the empty line or b"", body)."""
    if data[:2] == CRLF:
        return b"", CRLF, data[2:]
    m = _BLANK.search(data)
    if m is None:
        return data.tobytes(), b"", data[len(data):]
    i = m.start()
    return data[:i + 2].tobytes(), CRLF, data[i + 4:]


def _ascii_header(head: bytes, where: str) -> None:
    if not head.isascii():
        raise Unconvertible(f"8-bit octets in {where} (header fields cannot be encoded "
                            "without SMTPUTF8)")


def _set_cte(head: bytes, value: bytes) -> bytes:
    field = b"Content-Transfer-Encoding: " + value + CRLF
    if _CTE_FIELD.search(head):
        return _CTE_FIELD.sub(lambda _m: field, head, count=1)
    return head + field


def _entity(w: _Walk, head: bytes, sep: bytes, body: memoryview, default: str, depth: int,
            top: bool = False) -> None:
    if _ascii(body):
        w.out += (head, sep, body)
        return
    if depth > MAX_DEPTH:
        raise Unconvertible(f"MIME nesting deeper than {MAX_DEPTH} levels")
    msg = _PARSER.parsebytes(head + CRLF)
    ctype = msg.get_content_type() if msg.get("content-type") is not None else default
    cte = str(msg.get("content-transfer-encoding") or "7bit").strip().lower()
    main = ctype.split("/", 1)[0]
    if main == "multipart":
        boundary = msg.get_boundary()  # RFC 2231 continuations collapsed
        if not boundary:
            raise Unconvertible(f"8-bit octets in a {ctype} without a boundary")
        if cte not in _IDENTITY:
            raise Unconvertible(f"{ctype} with Content-Transfer-Encoding {cte}")
        if ctype == "multipart/signed":
            raise Prohibited("8-bit octets in a multipart/signed, whose parts no agent may "
                             "change (RFC 1847 2.1, RFC 3156 3, RFC 8551 3.1): quoted-"
                             "printable would break its signature")
        child = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        w.out += ((_set_cte(head, b"7bit") if cte != "7bit" else head), sep)
        _multipart(w, body, boundary.encode("ascii", "replace"), child, depth)
        return
    if ctype == "message/rfc822":
        if cte not in _IDENTITY:
            raise Unconvertible(f"message/rfc822 with Content-Transfer-Encoding {cte}")
        ihead, isep, ibody = _split(body)
        _ascii_header(ihead, "an attached message's header")
        w.out += ((_set_cte(head, b"7bit") if cte != "7bit" else head), sep)
        _entity(w, ihead, isep, ibody, "text/plain", depth + 1)
        return
    if main == "message" and not ctype.startswith("message/global"):
        raise Unconvertible(f"8-bit octets in a {ctype} part, which must be 7bit "
                            "(RFC 2046 5.2)")
    if cte not in _IDENTITY:
        raise Unconvertible(f"8-bit octets in a part encoded {cte}")
    encoded = _qp(body)
    head = _set_cte(head, b"quoted-printable")
    if top and not _MIME_VERSION.search(head):
        head += b"MIME-Version: 1.0\r\n"
    w.out += (head, sep or CRLF, encoded)


def _qp(body: Buf) -> bytes:
    """`body` quoted-printable, every line end CRLF, the soft ones too. binascii.b2a_qp
    takes its line end from the data's first one: a body with none (a one-line MIME part,
    whose last CRLF is its delimiter's) got LF soft breaks, bare LFs on the wire. Such a
    body is encoded with a CRLF added, which the output's end then is, and taken off."""
    if _LF.search(body) is not None:  # CRLF line ends: bare CR and LF were refused
        return binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
    return binascii.b2a_qp(bytes(body) + CRLF, quotetabs=False, istext=True,
                           header=False)[:-2]


_PREAMBLE, _DELIMITER, _PART, _EPILOGUE = range(4)


def _pieces(body: memoryview, boundary: bytes) -> Iterator[tuple[int, memoryview]]:
    """A multipart body cut at its delimiters, in order, every byte once: the preamble,
    then each delimiter line (with the CRLF after it) and its body part, the close
    delimiter and the epilogue. Nothing when the boundary never occurs. Lazily: the
    caller's parts budget stops a flood of delimiters."""
    delim = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|$)")
    marks = delim.finditer(body)
    m = next(marks, None)
    if m is None:
        return
    yield _PREAMBLE, body[:m.start()]
    while m is not None:
        if m.group(1):  # the close delimiter: the rest is the epilogue
            yield _DELIMITER, body[m.start():m.end()]
            yield _EPILOGUE, body[m.end():]
            return
        start = m.end() + (2 if body[m.end():m.end() + 2] == CRLF else 0)
        yield _DELIMITER, body[m.start():start]
        nxt = next(marks, None)
        yield _PART, body[start:nxt.start() if nxt is not None else len(body)]
        m = nxt


def _multipart(w: _Walk, body: memoryview, boundary: bytes, child: str, depth: int) -> None:
    """The body with each part converted; delimiters, preamble and epilogue kept."""
    found = False
    for kind, piece in _pieces(body, boundary):
        found = True
        if kind == _PART:
            w.part()
            phead, psep, pbody = _split(piece)
            _ascii_header(phead, "a body part's header")
            _entity(w, phead, psep, pbody, child, depth + 1)
            continue
        if kind != _DELIMITER and not _ascii(piece):
            raise Unconvertible("8-bit octets in a multipart "
                                + ("preamble" if kind == _PREAMBLE else "epilogue"))
        w.out.append(piece)
    if not found:
        raise Unconvertible("8-bit octets in a multipart whose boundary never occurs")


def headers_8bit(message: bytes) -> bool:
    """Octets above 127 in any header section of the message: its own, a body part's of
    a multipart (at any depth) or an attached message's (message/rfc822): what RFC 6532
    lets hold UTF-8 and RFC 6531 3.4 then lets go only to a host offering SMTPUTF8 (RFC
    2045 and 6152 allow no 8-bit header, 8BITMIME is for content). As Postfix, whose
    cleanup flags any such header line, a MIME part's included (SMTPUTF8_FLAG_HEADER).
    Not what message/global holds (RFC 6532 3.5: content, which may be encoded) nor a
    part's content. Only parts with 8-bit octets are parsed; past MAX_DEPTH levels or
    MAX_PARTS parts it looks no further (False for what is left)."""
    head, _, body = _split(memoryview(message))
    return _any_header_8bit(head, body, "text/plain", 0, [0])


# A header section's leading lines that are header fields (an ASCII name, blanks allowed
# before its colon, RFC 5322 4.5.3) or their continuations; a part's section ends at the
# first other line, which begins its body (Postfix: is_header_buf, mime_state_update).
_FIELD_LINES = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:.*(?:\r\n|$)"
                          rb"(?:[ \t].*(?:\r\n|$))*)*")


def _any_header_8bit(head: bytes, body: memoryview, default: str, depth: int,
                     parts: list[int]) -> bool:
    m = _FIELD_LINES.match(head)
    if m is not None and not head[:m.end()].isascii():
        return True
    if _ascii(body) or depth > MAX_DEPTH:
        return False
    msg = _PARSER.parsebytes(head + CRLF)
    ctype = msg.get_content_type() if msg.get("content-type") is not None else default
    if ctype == "message/rfc822":
        ihead, _, ibody = _split(body)
        return _any_header_8bit(ihead, ibody, "text/plain", depth + 1, parts)
    if not ctype.startswith("multipart/") or not (boundary := msg.get_boundary()):
        return False
    child = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    for kind, piece in _pieces(body, boundary.encode("ascii", "replace")):
        if kind == _PART:
            parts[0] += 1
            if parts[0] > MAX_PARTS:
                return False
            phead, _, pbody = _split(piece)
            if _any_header_8bit(phead, pbody, child, depth + 1, parts):
                return True
    return False
