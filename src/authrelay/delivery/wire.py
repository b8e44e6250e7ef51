"""The client side of SMTP on the wire, sans I/O: reply parsing and command encoding.

Owns: turning the bytes a server sends into replies (RFC 5321 4.2: `code-text` lines
continued until `code text`), the EHLO keyword table (RFC 5321 4.1.1.1), and the exact
bytes of every command the courier sends. No sockets, no clocks: `connection.py` feeds
bytes in and writes the commands out, so everything here is testable with plain bytes.

Contract: `ReplyParser.feed(data)` returns every reply completed by `data`, in order
(several at once when the server answers a pipelined group, RFC 2920). Failure policy:
anything that is not a reply (no three-digit code, a code outside 200-599, a
continuation line whose code differs, a line over `MAX_LINE` bytes, a reply over
`MAX_LINES` lines) raises `ProtocolError`: the courier drops the connection and treats
the host as failed (transient), it never guesses. A bare LF ends a line too (lenient in
what we accept); reply text is decoded as UTF-8 with replacement (SMTPUTF8 servers,
RFC 6531 3.7.4, may send it; nothing here interprets the text).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; real servers send longer EHLO and
# error lines, so allow 8x that, but no unbounded buffering.
MAX_LINE = 4096
MAX_LINES = 256


class ProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


class OutOfStep(ProtocolError):
    """A reply came that no command asked for yet (RFC 5321 4.1.1: one reply per command,
    in order): read next, it would be taken for another command's reply."""


@dataclass(frozen=True, slots=True)
class SMTPReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The text of all lines joined by LF (the codes and separators stripped)."""
        return "\n".join(self.lines)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}".rstrip()


class ReplyParser:
    """Incremental reply parser: `feed()` bytes as they arrive, get complete replies."""

    __slots__ = ("_buf", "_code", "_lines")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._code = 0
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """Bytes of an incomplete reply are buffered (a STARTTLS check: RFC 3207 5)."""
        return bool(self._buf or self._lines)

    def feed(self, data: bytes) -> list[SMTPReply]:
        if not self._buf and not self._lines and data.endswith(b"\r\n") \
                and data.count(b"\n") == data.count(b"\r\n"):
            return self._whole(data)
        buf = self._buf
        buf += data
        out: list[SMTPReply] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            rep = self._line(line)
            if rep is not None:
                out.append(rep)
        if start:
            del buf[:start]
        if len(buf) > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
        return out

    def _whole(self, data: bytes) -> list[SMTPReply]:
        """feed() of `data` that is whole CRLF lines, nothing buffered before: what a
        server's reply or pipelined group (RFC 2920) is on the wire nearly always. A
        one-line reply is taken here (the checks of _line, in one test); anything else
        goes through _line as in feed() (test_wire: equal to byte-by-byte feeding)."""
        out: list[SMTPReply] = []
        for line in data[:-2].split(b"\r\n"):
            if line[3:4] == b" " and not self._lines and len(line) <= MAX_LINE \
                    and line[:3].isdigit() and 200 <= (code := int(line[:3])) < 600:
                out.append(SMTPReply(code, (line[4:].decode("utf-8", "replace"),)))
                continue
            rep = self._line(line)
            if rep is not None:
                out.append(rep)
        return out

    def _line(self, line: bytes) -> SMTPReply | None:
        if len(line) > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
        head = line[:3]
        if len(head) != 3 or not head.isdigit():
            raise ProtocolError(f"not an SMTP reply: {line[:40]!r}")
        code = int(head)
        if not 200 <= code < 600:
            raise ProtocolError(f"reply code {code} out of range")
        sep = line[3:4]
        if sep not in (b"-", b" ", b""):
            raise ProtocolError(f"bad reply separator: {line[:40]!r}")
        if self._lines and code != self._code:
            raise ProtocolError(f"reply code changed within a reply: {self._code} -> {code}")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_LINES:
            raise ProtocolError(f"reply of more than {MAX_LINES} lines")
        if sep == b"-":
            return None
        rep = SMTPReply(code, tuple(self._lines))
        self._lines = []
        return rep


def parse_ehlo(reply: SMTPReply) -> dict[str, str]:
    """EHLO keywords (lower-cased) -> their parameters; the first line is the greeting.

    `AUTH=PLAIN LOGIN` (a pre-RFC 4954 form some servers still send) counts as AUTH."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip().partition(" ")
        if "=" in word and word.upper().startswith("AUTH="):
            word, _, first = word.partition("=")
            params = f"{first} {params}".strip()
        key = word.lower()
        if key == "auth" and key in ext:
            params = f"{ext[key]} {params}".strip()
        if key:
            ext[key] = params.strip()
    return ext


def auth_methods(ext: dict[str, str]) -> set[str]:
    return {m.upper() for m in ext.get("auth", "").split()}


def command(verb: bytes, *args: bytes) -> bytes:
    """One command line. Arguments come from the envelope, whose addresses and ESMTP
    parameters were checked when the mail was received: no CR/LF can be in them; they
    are checked again here because a line break would start a second command."""
    line = b" ".join((verb, *args))
    if b"\r" in line or b"\n" in line:
        raise ValueError("line break inside an SMTP command")
    return line + b"\r\n"


def mail_from(sender: bytes, params: list[bytes]) -> bytes:
    return command(b"MAIL", b"FROM:<" + sender + b">", *params)


def rcpt_to(address: bytes, params: list[bytes]) -> bytes:
    return command(b"RCPT", b"TO:<" + address + b">", *params)


def auth_plain(user: str, password: str) -> bytes:
    """RFC 4616: authzid empty, NUL, authcid, NUL, password; sent as the initial response
    (RFC 4954 4) so PLAIN costs one round trip."""
    token = b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
    return b"AUTH PLAIN " + base64.b64encode(token) + b"\r\n"


def b64_line(value: str) -> bytes:
    return base64.b64encode(value.encode("utf-8")) + b"\r\n"
