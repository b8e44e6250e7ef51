"""RFC 6152 downgrade: an 8-bit message for a next hop that does not offer 8BITMIME.

Owns turning a message with 8-bit octets into a 7-bit one (as Postfix's and sendmail's
8-bit to 7-bit conversion does), or saying why it cannot be. Contract:
`downgrade(message) -> bytes` (CRLF text in, CRLF text out) or raises `Unconvertible`
(the reason; the courier bounces it with 554 5.6.3, RFC 3463 "conversion required but
not supported"). Pure, no I/O; the courier runs it in a thread, at most
`MAX_CONCURRENT` at once (a message is up to `[limits] max_message_size`: memory is
bounded to about four times that per conversion).

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
What cannot be converted (Unconvertible): 8-bit octets in a header field (RFC 5322 allows
none; RFC 6532 needs SMTPUTF8), in a multipart's preamble or epilogue, in a part that
already claims quoted-printable or base64 (malformed), in message/partial,
message/external-body or another message/* type (RFC 2046 5.2: 7bit only), a multipart
without a boundary that holds 8-bit octets, MIME nesting deeper than `MAX_DEPTH`.
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
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_DEPTH = 50  # MIME nesting (multipart / message/rfc822 levels) converted
MAX_CONCURRENT = 2  # conversions at once per courier (memory bound)
CRLF = b"\r\n"
_PARSER = BytesHeaderParser(policy=compat32)
_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*(?:\r\n[ \t].*)*\r\n")
_MIME_VERSION = re.compile(rb"(?im)^mime-version[ \t]*:")
_IDENTITY = ("7bit", "8bit", "binary")


class Unconvertible(Exception):
    """The message has 8-bit octets where no 7-bit encoding can hold them."""


def is_8bit(data: bytes) -> bool:
    """Any octet above 127 (C speed)."""
    return not data.isascii()


def downgrade(message: bytes) -> bytes:
    """The message as 7-bit text (see the module docstring); raises Unconvertible."""
    head, sep, body = _split(message)
    _ascii_header(head, "the message's header")
    return _entity(head, sep, body, "text/plain", 0, top=True)


def _split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header section with its last CRLF, the empty line or b"", body)."""
    if data.startswith(CRLF):
        return b"", CRLF, data[2:]
    i = data.find(b"\r\n\r\n")
    if i < 0:
        return data, b"", b""
    return data[:i + 2], CRLF, data[i + 4:]


def _ascii_header(head: bytes, where: str) -> None:
    if not head.isascii():
        raise Unconvertible(f"8-bit octets in {where} (header fields cannot be encoded "
                            "without SMTPUTF8)")


def _set_cte(head: bytes, value: bytes) -> bytes:
    field = b"Content-Transfer-Encoding: " + value + CRLF
    if _CTE_FIELD.search(head):
        return _CTE_FIELD.sub(lambda _m: field, head, count=1)
    return head + field


def _entity(head: bytes, sep: bytes, body: bytes, default: str, depth: int,
            top: bool = False) -> bytes:
    if body.isascii():
        return head + sep + body
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
        child = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        body = _multipart(body, boundary.encode("ascii", "replace"), child, depth)
        return (_set_cte(head, b"7bit") if cte != "7bit" else head) + sep + body
    if ctype == "message/rfc822":
        if cte not in _IDENTITY:
            raise Unconvertible(f"message/rfc822 with Content-Transfer-Encoding {cte}")
        ihead, isep, ibody = _split(body)
        _ascii_header(ihead, "an attached message's header")
        body = _entity(ihead, isep, ibody, "text/plain", depth + 1)
        return (_set_cte(head, b"7bit") if cte != "7bit" else head) + sep + body
    if main == "message" and not ctype.startswith("message/global"):
        raise Unconvertible(f"8-bit octets in a {ctype} part, which must be 7bit "
                            "(RFC 2046 5.2)")
    if cte not in _IDENTITY:
        raise Unconvertible(f"8-bit octets in a part encoded {cte}")
    encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
    head = _set_cte(head, b"quoted-printable")
    if top and not _MIME_VERSION.search(head):
        head += b"MIME-Version: 1.0\r\n"
    return head + (sep or CRLF) + encoded


def _multipart(body: bytes, boundary: bytes, child: str, depth: int) -> bytes:
    """The body with each part converted; delimiters, preamble and epilogue kept."""
    delim = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|$)")
    marks = list(delim.finditer(body))
    if not marks:
        raise Unconvertible("8-bit octets in a multipart whose boundary never occurs")
    out = [body[:marks[0].start()]]
    if not out[0].isascii():
        raise Unconvertible("8-bit octets in a multipart preamble")
    for i, m in enumerate(marks):
        out.append(body[m.start():m.end()])
        if m.group(1):  # the close delimiter: the rest is the epilogue
            rest = body[m.end():]
            if not rest.isascii():
                raise Unconvertible("8-bit octets in a multipart epilogue")
            out.append(rest)
            return b"".join(out)
        start = m.end()
        if body.startswith(CRLF, start):
            out.append(CRLF)
            start += 2
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        part = body[start:end]
        phead, psep, pbody = _split(part)
        _ascii_header(phead, "a body part's header")
        out.append(_entity(phead, psep, pbody, child, depth + 1))
    return b"".join(out)
