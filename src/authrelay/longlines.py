"""Lines too long to send, broken as Postfix's smtp client breaks them.

Owns: `LineBreaker`, which passes CRLF message text on with every line over `limit`
octets (the CRLF excluded; RFC 5322 2.1.1 and RFC 5321 4.5.3.1.6: 998) broken where
Postfix's `smtp_line_length_limit` breaks it: after `limit` octets a CRLF and a SPACE,
the rest in lines of a SPACE and at most `limit - 1` octets (a header field's line so
becomes a folded one, RFC 5322 2.2.3; a body line gains a line break and a leading space,
as from Postfix). Local submission (localmail.py) runs what it stores through it, before
the spool's DKIM signer, so the signature covers what is sent; the SMTP listeners refuse
such a line instead (`550 5.6.0`, smtpd/protocol.py). A break may fall inside a multibyte
character, as Postfix's may.

Contract: `LineBreaker(limit).feed(piece)` returns the next output for `piece`, pieces of
one stream in order, each free to end inside a line (the column is carried over) but
never between the CR and the LF of a line end; `broken` says whether any line was
broken. Stdlib only; no I/O. Cost: linear in the octets (a piece whose lines all fit is
passed on as is, after one search for its last CRLF); memory: the piece and its output.
"""

from __future__ import annotations


class LineBreaker:
    """Breaks the lines of one CRLF stream at `limit` octets (see the module docstring)."""

    __slots__ = ("_col", "broken", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 2:
            raise ValueError("a line limit below 2 octets leaves no room after the SPACE")
        self.limit = limit
        self.broken = False
        self._col = 0  # octets of the output line under way (0: at a line start)

    def feed(self, piece: bytes) -> bytes:
        last = piece.rfind(b"\r\n")
        if last < 0:  # all of it continues the line under way
            if self._col + len(piece) <= self.limit:
                self._col += len(piece)
                return piece
        elif self._col + len(piece) - 2 <= self.limit:
            # Every line in it is no longer than the piece (its first with the column).
            self._col = len(piece) - last - 2
            return piece
        return self._break(piece)

    def _break(self, piece: bytes) -> bytes:
        limit = self.limit
        out: list[bytes] = []
        col = self._col
        for i, seg in enumerate(piece.split(b"\r\n")):
            if i:
                out.append(b"\r\n")
                col = 0
            pos, n = 0, len(seg)
            while col + n - pos > limit:  # more than fits: the line goes on after a break
                take = limit - col
                out.append(seg[pos:pos + take])
                out.append(b"\r\n ")
                pos += take
                col = 1
                self.broken = True
            out.append(seg[pos:])
            col += n - pos
        self._col = col
        return b"".join(out)
