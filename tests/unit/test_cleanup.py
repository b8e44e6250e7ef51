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
