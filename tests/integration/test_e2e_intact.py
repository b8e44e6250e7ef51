"""What a user's client sends arrives as it was sent: a real `authrelay serve`, smtplib on
the submission port, aiosmtpd next hops with and without 8BITMIME, dkimpy's and
OpenDKIM's verifiers where the message arrives (the same rig as test_e2e_dkim).

The client's message is a byte-for-byte suffix of what arrives (only our Received: and
DKIM-Signature: fields go on top, Date: and Message-ID: are added at the end of its header
section when missing, RFC 6409 8.3 and 8.6); our signatures verify after every change the
relay makes on the way (quoted-printable for a host without 8BITMIME, dot stuffing):
Subjects in every encoding, folded References, trailing blanks, a header-only message, an
empty body, lone dot lines, base64 parts of every line length, a dot line inside a part
declared base64.
"""

from __future__ import annotations

import base64
import email
import email.policy
from typing import Any

import pytest
from fakes.smtpserver import FakeSMTPServer, bare_line_ends
from test_e2e_delivery import submit
from test_e2e_dkim import _sendmail_t, our_results, seven_bit
from test_e2e_dkim import setup as setup  # noqa: PLC0414 (the fixture)

pytestmark = pytest.mark.slow

HEAD = (b"From: Alice <alice@sender.test>\r\n"
        b"To: Bob <bob@example.test>\r\n"
        b"Subject: =?iso-8859-1?q?Gr=FC=DFe_aus_K=F6ln?= and\r\n"
        b"\t=?utf-8?b?w6Rsc28gZMO8c3NlbGRvcmY=?=   \r\n"
        b"References: <a.1@sender.test>\r\n"
        b"  <b.2@sender.test>\r\n"
        b"\t<c.3@sender.test>\r\n"
        b"X-Blanks:   value with blanks   \r\n")
DATED = b"Date: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <intact.1@sender.test>\r\n"


def _verified(mx: FakeSMTPServer, setup: dict[str, Any]) -> bytes:
    relay, dns = setup["relay"], setup["dns"]
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert bare_line_ends(b"".join(mx.wire)) == []
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res
    return m.content


def _ours_then(content: bytes) -> bytes:
    """What follows our DKIM-Signature and Received fields."""
    lines = content.split(b"\r\n")
    n = 0
    while lines[n].startswith((b"DKIM-Signature:", b"Received:", b" ", b"\t")):
        n += 1
    return b"\r\n".join(lines[n:])


@pytest.fixture(params=[True, False], ids=["8BITMIME", "7bit MX"])
def mx(setup: dict[str, Any], request: pytest.FixtureRequest) -> FakeSMTPServer:
    """The rig's MX, offering 8BITMIME or not."""
    if not request.param:
        seven_bit(setup["mx"])
    return setup["mx"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("body", [b"plain text\r\n", b""], ids=["text", "empty body"])
def test_header_fields_arrive_byte_for_byte(setup: dict[str, Any], mx: FakeSMTPServer,
                                            body: bytes) -> None:
    msg = HEAD + DATED + b"\r\n" + body
    submit(setup["relay"], ["bob@example.test"], msg)
    assert _ours_then(_verified(mx, setup)) == msg


def test_a_header_only_message_gets_date_and_message_id(setup: dict[str, Any]) -> None:
    """No empty line, no body, no Date:, no Message-ID: (RFC 6409 8.3, 8.6: added, as
    Postfix's always_add_missing_headers for submission)."""
    mx = setup["mx"]
    submit(setup["relay"], ["bob@example.test"], HEAD)
    got = _ours_then(_verified(mx, setup))
    assert got.startswith(HEAD)
    added = got[len(HEAD):]
    assert added.startswith(b"Date: ") and b"\r\nMessage-ID: <" in added
    assert b"\r\n\r\n" not in got


def test_dot_lines_and_base64_of_every_line_length(setup: dict[str, Any],
                                                   mx: FakeSMTPServer) -> None:
    """The 8-bit text part (a long Latin-1 line, lone dots) is what forces a conversion
    for the 7-bit MX; the base64 parts (every line length 1..76, one declared base64 with
    a lone dot line and CRLF.CRLF inside) go byte for byte, the text decodes back."""
    text = (b".\r\n..\r\n. \r\n" + b"gr\xfc\xdfe " * 140 + b"\r\n.\r\nend.\r\n.")
    parts = [b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text + b"\r\n"]
    for n in range(1, 77):
        enc = base64.b64encode(bytes(range(256)) * 2).replace(b"\n", b"")
        lines = b"\r\n".join(enc[i:i + n] for i in range(0, 400, n))
        parts.append(b"--b\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" + lines + b"\r\n")
    parts.append(b"--b\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\nQUJD\r\n.\r\nREVG\r\n\r\n.\r\n"
                 b"\r\n")
    msg = (HEAD + DATED + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; '
           b'boundary="b"\r\n\r\n' + b"".join(parts) + b"--b--\r\n")
    submit(setup["relay"], ["bob@example.test"], msg)
    got = _ours_then(_verified(mx, setup))
    if mx.eightbitmime:
        assert got == msg
        return
    assert got.isascii()
    for p in parts[1:]:
        assert p in got
    first = email.message_from_bytes(got, policy=email.policy.compat32).get_payload()[0]
    assert first["Content-Transfer-Encoding"] == "quoted-printable"
    assert first.get_payload(decode=True) == text
    qp = got.split(b"\r\n\r\n", 3)[2]
    assert all(len(ln) <= 76 for ln in qp.split(b"\r\n"))


def test_a_raw_latin1_subject_without_smtputf8_goes_as_it_is(setup: dict[str, Any]) -> None:
    """Legacy 8-bit header text (no SMTPUTF8; Postfix passes it): not touched, and both
    verifiers read the signature over it as the signer did."""
    mx = setup["mx"]
    msg = HEAD + b"Subject: Gr\xfc\xdfe, raw Latin-1\r\n" + DATED + b"\r\nbody\r\n"
    submit(setup["relay"], ["bob@example.test"], msg)
    assert _ours_then(_verified(mx, setup)) == msg


def test_sendmail_a_body_without_a_final_line_end(setup: dict[str, Any],
                                                  mx: FakeSMTPServer) -> None:
    """`sendmail -t` given a body whose last line has no newline, ending in a lone dot
    and in 8-bit text: the line is ended, the dot stuffed, and the signature verifies."""
    text = b"first\r\n.\r\nlast line gr\xc3\xbc\xc3\x9fe ."
    _sendmail_t(setup["relay"], HEAD + DATED + b"\r\n" + text)
    got = _ours_then(_verified(mx, setup))
    assert got.startswith(HEAD)
    body = email.message_from_bytes(got, policy=email.policy.compat32)
    assert body.get_payload(decode=True) == text + b"\r\n"
