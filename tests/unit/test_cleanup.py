"""Submission duties: Received prepended, Date / Message-ID added only when missing."""

from __future__ import annotations

from email.parser import BytesParser

import pytest

from authrelay.spool.cleanup import HeaderCleanup, received_for, received_header
from authrelay.spool.envelope import Envelope, Recipient

RCVD = received_header(helo="laptop", client_rdns="", client_ip="192.0.2.7",
                       hostname="relay.example", protocol="ESMTPSA", queue_id="Q1",
                       recipient="b@example.org", tls="TLSv1.3")


def clean(chunks: list[bytes]) -> tuple[bytes, HeaderCleanup]:
    c = HeaderCleanup(RCVD, "relay.example")
    out = b"".join(c.feed(x) for x in chunks) + c.finish()
    return out, c


def test_adds_missing_date_and_message_id() -> None:
    out, c = clean([b"Subject: s\r\n", b"\r\nbody\r\n"])
    msg = BytesParser().parsebytes(out)
    assert msg["Date"] and msg["Message-ID"].endswith("@relay.example>")
    assert "with ESMTPSA id Q1" in msg["Received"]
    assert out.endswith(b"\r\n\r\nbody\r\n")
    assert sorted(c.added) == ["Date", "Message-ID"]


def test_keeps_existing_headers_byte_for_byte() -> None:
    src = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n\r\nb\r\n"
    out, c = clean([src[:7], src[7:30], src[30:]])
    assert out == RCVD + src and c.added == []


def test_no_header_section() -> None:
    out, _ = clean([b"\r\njust body\r\n"])
    assert out.startswith(RCVD) and out.endswith(b"\r\n\r\njust body\r\n")


def test_headers_only_message() -> None:
    out, _ = clean([b"Subject: only\r\n"])
    assert b"Subject: only\r\n" in out and b"Message-ID:" in out


def test_leading_continuation_line_cannot_fold_into_our_received() -> None:
    """Attack: a message whose first line starts with white space (` From: ceo@probe.test`)
    was stored right after our Received:, so it folded into our trace field. It starts
    the body now (an empty line before it, as Postfix's cleanup does), in any chunking."""
    msg = b" by mx.google.com (authenticated as ceo@probe.test)\r\nFrom: b@o.test\r\n\r\nx\r\n"
    for cut in (1, 2, 10, len(msg)):
        h = HeaderCleanup(b"Received: from us\r\n", "relay.test")
        out = h.feed(msg[:cut]) + h.feed(msg[cut:]) + h.finish()
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"Received: from us\r\n")
        assert b"mx.google.com" not in head and b"From:" not in head
        assert body == msg
        assert h.header_section == b""


@pytest.mark.parametrize("protocol,smtputf8,written", [
    ("ESMTPSA", True, "UTF8SMTPSA"), ("ESMTPS", True, "UTF8SMTPS"),
    ("ESMTPA", True, "UTF8SMTPA"), ("ESMTP", True, "UTF8SMTP"),
    ("ESMTPSA", False, "ESMTPSA"), ("SMTP", False, "SMTP"),
])
def test_received_with_value_of_an_smtputf8_transaction(protocol: str, smtputf8: bool,
                                                        written: str) -> None:
    """RFC 6531 3.7.3: a message received with SMTPUTF8 is traced WITH UTF8SMTP[S][A]
    (the IANA WITH protocol types), not ESMTP[S][A]."""
    env = Envelope(queue_id="Q1", sender="a@example.org", helo="laptop",
                   recipients=[Recipient("j\u00f6rg@b\u00fccher.example")],
                   client_ip="192.0.2.7", protocol=protocol, smtputf8=smtputf8,
                   listener="submission:127.0.0.1:587")
    field = received_for(env, "relay.example").decode()
    assert f"\tby relay.example (authrelay) with {written} id Q1\r\n" in field


class _CountingBuffer(bytearray):
    """A bytearray that counts the bytes its find() calls look at (work, not time)."""

    searched = 0

    def find(self, sub, start=None, end=None):  # type: ignore[no-untyped-def,override]
        lo = 0 if start is None else start
        hi = len(self) if end is None else end
        self.searched += max(0, hi - lo)
        return super().find(sub, start, end)


def test_a_header_section_dribbled_in_tiny_pieces_costs_linear_work() -> None:
    """A client sending its header section a few bytes per packet: each piece is looked
    at once (plus the 3 bytes before it), not the whole buffer again per piece. Before,
    the search for the empty line rescanned everything buffered: 64 KiB in 8-byte pieces
    cost 8,192 scans averaging 32 KiB (~270 MB, on the event loop, per connection; a
    256 KiB section, ~4 GB)."""
    header = b"".join(b"X-F%05d: v\r\n" % i for i in range(5000))  # 65,000 bytes
    msg = b"From: a@example.org\r\n" + header + b"\r\nbody\r\n"
    c = HeaderCleanup(RCVD, "relay.example")
    c._buf = buf = _CountingBuffer()
    pieces = [msg[i:i + 8] for i in range(0, len(msg), 8)]
    out = b"".join(c.feed(p) for p in pieces) + c.finish()
    assert out.startswith(RCVD + b"From: a@example.org\r\n") and out.endswith(b"\r\n\r\nbody\r\n")
    assert c.header_section == b"From: a@example.org\r\n" + header
    assert buf.searched <= len(msg) + 3 * len(pieces)


@pytest.mark.parametrize("field, hops", [
    (b"Received: x\r\n", 1), (b"RECEIVED\t: x\r\n", 1), (b"rEcEiVeD  :x\r\n", 1),
    (b"X-Received: x\r\n", 0), (b"Subject: a\r\n received: x\r\n", 0),
    (b"Received: a\r\nReceived: b\r\n", 2), (b"Received x\r\n", 0),
])
def test_received_fields_are_counted_by_name_in_any_case(field: bytes, hops: int) -> None:
    _out, c = clean([b"Subject: s\r\n" + field + b"\r\nbody\r\n"])
    assert c.hops == hops
    _out, c = clean([field + b"\r\nbody\r\n"])  # as the first field too
    assert c.hops == hops


@pytest.mark.parametrize("fields, added", [
    (b"DATE: x\r\nmessage-ID\t: <a@b>\r\n", []), (b"date :x\r\n", ["Message-ID"]),
    (b"X-Date: x\r\nX-Message-ID: y\r\n", ["Date", "Message-ID"]),
    (b"Subject: a\r\n Date: x\r\n Message-ID: y\r\n", ["Date", "Message-ID"]),
])
def test_date_and_message_id_are_found_by_name_in_any_case(fields: bytes,
                                                            added: list[str]) -> None:
    _out, c = clean([fields + b"\r\nbody\r\n"])
    assert sorted(c.added) == added
