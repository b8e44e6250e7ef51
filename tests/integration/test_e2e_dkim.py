"""DKIM end to end: a real `authrelay serve` signs; the fake MX receives; dkimpy's verifier
and OpenDKIM's (`opendkim -t`) check every signature with the public keys served by the
loopback DNS server.

Covers issue 13 item 5: both algorithms after a trip through the relay, a body with
dot-stuffed lines and 8-bit content, a message already signed by another domain (kept,
ours added), mail not ours (unauthenticated, to a local domain) never signed, no key ->
unsigned with a maillog note, the sendmail command and bounces signed, signed once
however many delivery attempts, new keys picked up on SIGHUP. RFC 6152 (issue 19 item 6):
8-bit mail received without BODY=8BITMIME relayed with it; converted to 7-bit for a host
without 8BITMIME and re-signed (dkimpy verifies), small and streamed, a one-line part
with CRLF soft line breaks; unconvertible (8-bit header) bounced 5.6.3, an 8-bit
multipart/signed 5.6.2; a real S/MIME signature verifies where the message arrives.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from dkimcheck import dkim_zones, opendkim_results, verify_all
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory, bare_line_ends
from relayproc import PASSWORD, RelayProcess
from test_e2e_delivery import SENDER, SENDER_MX, ZONES, mx_overrides, parse_dsn, submit

from authrelay.dkim.keys import KeyStore

pytestmark = pytest.mark.slow

BODY = ("From: Alice <alice@sender.test>\r\n"
        "To: Bob <bob@example.test>\r\n"
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        "Date: Tue, 25 Nov 2025 10:00:00 +0000\r\n"
        "Message-ID: <dkim.1@sender.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Hello Bob, gr\u00fc\u00dfe aus K\u00f6ln \u20ac\r\n"
        ".a line that starts with a dot\r\n"
        "..two dots\r\n"
        ".\r\n"
        "trailing blanks   \r\n"
        "\r\n"
        "end\r\n").encode("utf-8")


OWNED = ("--address", SENDER, "--address", "alice@nokey.test", "--address", "alice@new.test")


def keygen(relay: RelayProcess, domain: str, *extra: str) -> None:
    relay.cli("dkim", "keygen", domain, "--selector", "t", *extra)


def keys_of(relay: RelayProcess) -> list:  # noqa: ANN001
    return KeyStore(relay.state / "dkim").load().all()


@pytest.fixture
def setup(relay_factory: Callable[..., RelayProcess], dns_server: FakeDNSServer,
          fake_mx: MXFactory) -> dict[str, Any]:
    mx = fake_mx("127.0.0.2")
    sender_mx = fake_mx(SENDER_MX)
    ov = mx_overrides(dns_server, fake_mx.port)
    ov["relay"]["local_domains"] = ["example.test"]
    relay = relay_factory(ov, start=False)
    # alice's own addresses: an authenticated user's mail is signed only for them.
    relay.cli("user", "add", "alice", "--password-stdin", *OWNED, input=PASSWORD + "\n")
    keygen(relay, "sender.test")  # t-rsa and t-ed25519
    keygen(relay, "relay.test", "--algorithm", "ed25519")  # bounces: MAILER-DAEMON@relay.test
    dns_server.set_zones({**ZONES, **dkim_zones(keys_of(relay))})
    relay.start()
    return {"relay": relay, "mx": mx, "sender_mx": sender_mx, "dns": dns_server}


def our_results(content: bytes, dns: FakeDNSServer) -> list[tuple[bytes, bytes, bytes, bool]]:
    """dkimpy's verdict on each signature, which OpenDKIM's verifier must share."""
    res = verify_all(content, dns.nameserver)
    assert opendkim_results(content, dns.nameserver) == sorted(res), res
    return res


def test_both_algorithms_verify_after_the_relay(setup: dict[str, Any]) -> None:
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    qid = submit(relay, ["bob@example.test"], BODY)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    res = our_results(m.content, dns)
    assert sorted(res) == [(b"sender.test", b"t-ed25519", b"ed25519-sha256", True),
                           (b"sender.test", b"t-rsa", b"rsa-sha256", True)], res
    # The signatures sit on top; the message below them is what the client sent plus
    # our Received field (which is itself not signed: it is not in h=).
    assert m.content.startswith(b"DKIM-Signature: ")
    assert m.content.endswith(BODY[BODY.index(b"\r\n\r\n"):])
    for line in relay.maillog().splitlines():
        if f" {qid}: " in line and "dkim=" in line:
            assert "dkim=signed, d=sender.test, s=t-ed25519,t-rsa" in line
            break
    else:
        raise AssertionError(f"no dkim line for {qid}:\n{relay.maillog()[-3000:]}")


def test_a_field_name_with_blanks_before_its_colon_is_signed_as_opendkim_reads_it(
        setup: dict[str, Any]) -> None:
    """`Subject : x` (RFC 5322 4.5.3 obs-optional: a reader must take it) made dkimpy's
    split refuse the header section, "message not parsable", and the message went out
    unsigned. RFC 6376 3.4.2 (relaxed) reads it as the field and deletes the blanks, and so
    does OpenDKIM: signed so, the message kept as sent, OpenDKIM's verifier passes both
    signatures, and a Subject changed after signing fails them (the field is covered)."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    body = BODY.replace(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n",
                        b"Subject : obsolete syntax\r\nTo  :\r\n bob@example.test\r\n")
    assert b"Subject : obsolete" in body
    qid = submit(relay, ["bob@example.test"], body)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert b"\r\nSubject : obsolete syntax\r\nTo  :\r\n bob@example.test\r\n" in m.content
    assert opendkim_results(m.content, dns.nameserver) == [
        (b"sender.test", b"t-ed25519", b"ed25519-sha256", True),
        (b"sender.test", b"t-rsa", b"rsa-sha256", True)]
    changed = m.content.replace(b"Subject : obsolete syntax", b"Subject : changed  syntax")
    assert [ok for *_, ok in opendkim_results(changed, dns.nameserver)] == [False, False]
    relay.wait_log(rf"{qid}: dkim=signed, d=sender\.test, s=t-ed25519,t-rsa")


def test_large_streamed_message_signed(setup: dict[str, Any]) -> None:
    """Past the spool's in-memory part (128 KiB) the message streams to disk and the
    signer reads it back; the signature still covers every byte."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    head, _, rest = BODY.partition(b"\r\n\r\n")
    line = "8-bit line \u00e4\u00f6\u00fc with  two  spaces\t and a tab  \r\n".encode()
    body = head + b"\r\n\r\n" + rest + line * 6000 + b"..dot\r\n" * 10
    assert len(body) > 300_000
    submit(relay, ["bob@example.test"], body)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res


def test_foreign_signature_kept_ours_added(setup: dict[str, Any], tmp_path: Path) -> None:
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    other = KeyStore(tmp_path / "other").generate("list.example", "l1", "rsa")
    dns.update(dkim_zones([other]))
    signed = dkim.sign(BODY, b"l1", b"list.example", other.signing_key,
                       canonicalize=(b"relaxed", b"relaxed")) + BODY
    submit(relay, ["bob@example.test"], signed)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    res = our_results(m.content, dns)
    assert len(res) == 3 and all(ok for *_, ok in res), res
    assert {d for d, *_ in res} == {b"sender.test", b"list.example"}


def test_unauthenticated_mail_to_a_local_domain_is_not_signed(setup: dict[str, Any]) -> None:
    """An outsider may send to local_domains, but never gets our signature (a forged
    From: sender.test would otherwise pass DKIM)."""
    relay, mx = setup["relay"], setup["mx"]
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=20) as s:
        s.ehlo("outsider.test")
        s.sendmail(SENDER, ["bob@example.test"], BODY)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert b"DKIM-Signature" not in m.content


def test_no_key_for_the_from_domain(setup: dict[str, Any]) -> None:
    relay, mx = setup["relay"], setup["mx"]
    body = BODY.replace(b"alice@sender.test", b"alice@nokey.test")
    qid = submit(relay, ["bob@example.test"], body)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert b"DKIM-Signature" not in m.content
    note = f"{qid}: dkim=none, reason=no key for nokey.test"
    relay.wait_for(lambda: note in relay.maillog(), what="the maillog note")
    # noted once, by the accept path (the ownership check read the domain), before the
    # message's from= line, as the commit thread's signer noted it before
    log = relay.maillog()
    assert log.count(f"{qid}: dkim=") == 1 and log.index(note) < log.index(f"{qid}: from=")


def test_signed_once_across_retries(setup: dict[str, Any], fake_mx: MXFactory) -> None:
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    mx.data_reply = "451 4.3.0 try again"
    qid = submit(relay, ["bob@example.test"], BODY)
    relay.wait_for(lambda: "stat=Deferred" in relay.maillog(), what="a deferral")
    mx.data_reply = None  # the scheduler retries (retry = 300ms) and it goes through
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res)
    assert relay.maillog().count(f"{qid}: dkim=signed") == 1


def _sendmail_t(relay: RelayProcess, message: bytes) -> None:
    """`authrelay sendmail -t -i` as root, `message` given with LF line ends."""
    env = {**os.environ, "AUTHRELAY_CONFIG": str(relay.config)}
    r = subprocess.run([sys.executable, "-m", "authrelay", "sendmail", "-t", "-i"],
                       input=message.replace(b"\r\n", b"\n"), env=env, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_sendmail_command_is_signed(setup: dict[str, Any]) -> None:
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    _sendmail_t(relay, BODY)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res


def test_sendmail_breaks_long_lines_before_signing(setup: dict[str, Any]) -> None:
    """A local program's lines over 998 octets (RFC 5322 2.1.1; the SMTP listeners refuse
    them, 550 5.6.0) were stored and sent on as they came: a next hop may refuse or cut
    them, breaking the signature. Now they are broken at acceptance as Postfix's smtp
    client breaks them (998 octets, then CRLF SPACE and at most 997 more a line), before
    the signer: what the next hop gets has no line over 998 octets, both signatures
    verify, taking out each CRLF SPACE gives the lines back, a line of exactly 998 is
    left alone, and the maillog says so once."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    body = b"b" * 5000 + b"\r\n" + b"c" * 998 + b"\r\nend\r\n"
    head = BODY.split(b"\r\n\r\n", 1)[0]
    msg = head + b"\r\nX-Long: " + b"h" * 2500 + b"\r\n\r\n" + body
    _sendmail_t(relay, msg)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert max(map(len, m.content.split(b"\r\n"))) == 998
    got_head, got_body = m.content.split(b"\r\n\r\n", 1)
    assert got_body.replace(b"\r\n ", b"") == body
    assert b"\r\nX-Long: " + b"h" * 2500 + b"\r\n" in got_head.replace(b"\r\n ", b"") + b"\r\n"
    assert got_body.split(b"\r\n")[:6] == [
        b"b" * 998, b" " + b"b" * 997, b" " + b"b" * 997, b" " + b"b" * 997,
        b" " + b"b" * 997, b" " + b"b" * 14]
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res
    relay.wait_log(r"warning=lines over 998 octets broken with CRLF SPACE")
    assert relay.maillog().count("warning=lines over 998 octets broken") == 1


def test_bounce_is_signed(setup: dict[str, Any]) -> None:
    relay, mx, dns, sender_mx = setup["relay"], setup["mx"], setup["dns"], setup["sender_mx"]
    mx.rcpt_replies = {"nobody@example.test": "550 5.1.1 no such user"}
    submit(relay, ["nobody@example.test"], BODY)
    b = relay.wait_for(lambda: sender_mx.messages and sender_mx.messages[0], what="the bounce")
    assert b"From: MAILER-DAEMON@relay.test" in b.content
    res = our_results(b.content, dns)
    assert res == [(b"relay.test", b"t", b"ed25519-sha256", True)], res


def test_new_key_loaded_on_sighup(setup: dict[str, Any]) -> None:
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    keygen(relay, "new.test", "--algorithm", "ed25519")
    dns.update(dkim_zones(keys_of(relay)))
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGHUP)
    body = BODY.replace(b"alice@sender.test", b"alice@new.test")

    def signed() -> FakeSMTPServer | None:
        mx.messages.clear()
        submit(relay, ["bob@example.test"], body)
        m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
        return m if b"d=new.test" in m.content else None

    m = relay.wait_for(signed, what="a signature with the key made after start")
    assert our_results(m.content, dns) == [(b"new.test", b"t", b"ed25519-sha256", True)]


# --------------------------------------------------------------------------- RFC 6152

def seven_bit(mx: FakeSMTPServer) -> None:
    """Make the fixture's MX a 7-bit server: no 8BITMIME (nor SMTPUTF8, which needs it)."""
    mx.eightbitmime = False
    mx.smtputf8 = False


def test_8bit_body_relayed_with_body_8bitmime_though_undeclared(setup: dict[str, Any]) -> None:
    """smtplib sends no BODY parameter: the 8-bit octets are accepted (as Postfix does),
    recorded, and relayed with BODY=8BITMIME to a host that offers it, byte for byte."""
    relay, mx = setup["relay"], setup["mx"]
    submit(relay, ["bob@example.test"], BODY)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert "BODY=8BITMIME" in m.mail_options
    assert m.content.endswith(BODY[BODY.index(b"\r\n\r\n"):])


def test_8bit_to_7bit_mx_converted_and_resigned(setup: dict[str, Any]) -> None:
    """RFC 6152 3: to a host without 8BITMIME the 8-bit parts go as quoted-printable,
    the rest byte for byte, without BODY=; our signatures are made again on the converted
    form, so dkimpy verifies both at the receiver."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    seven_bit(mx)
    head, _, text = BODY.partition(b"\r\n\r\n")
    head = head.replace(b"Content-Type: text/plain; charset=utf-8",
                        b'Content-Type: multipart/mixed; boundary="b1"')
    att = b"UEsDBBQAAAAIAA==\r\n"
    inner = (b"From: x@y.test\r\nSubject: fwd\r\nContent-Type: text/plain; charset=utf-8"
             b"\r\n\r\n" + "\u00fcber\r\n".encode())
    body = (head + b"\r\n\r\npreamble\r\n--b1\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text +
            b"--b1\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64"
            b"\r\n\r\n" + att +
            b"--b1\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--b1--\r\n")
    qid = submit(relay, ["bob@example.test"], body)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert m.content.isascii(), "8-bit octets reached a 7-bit server"
    assert not any(o.upper().startswith("BODY=") for o in m.mail_options)
    res = our_results(m.content, dns)
    assert sorted(res) == [(b"sender.test", b"t-ed25519", b"ed25519-sha256", True),
                           (b"sender.test", b"t-rsa", b"rsa-sha256", True)], res
    msg = email.message_from_bytes(m.content, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[0].get_payload(decode=True) == text[:-2]  # the CRLF is the delimiter's
    assert b"--b1\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64" \
        b"\r\n\r\n" + att + b"--b1\r\n" in m.content  # untouched, byte for byte
    enclosed = parts[2].get_payload()[0]
    assert enclosed.get_payload(decode=True) == "\u00fcber".encode()
    assert any(f" {qid}: " in ln and "converted to 7-bit" in ln
               for ln in relay.maillog().splitlines())


def test_large_8bit_message_to_7bit_mx_streamed_converted(setup: dict[str, Any]) -> None:
    """Over 1 MiB (streamed from the spool file), its only 8-bit octets at the very end
    (after the envelope was written): found at delivery, converted and re-signed."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    seven_bit(mx)
    head = BODY.partition(b"\r\n\r\n")[0].replace(
        b"Content-Transfer-Encoding: 8bit\r\n", b"")
    tail = "sch\u00f6ne Gr\u00fc\u00dfe\r\n".encode()
    text = b"plain ascii line for the size of it\r\n" * 32000 + tail
    submit(relay, ["bob@example.test"], head + b"\r\n\r\n" + text)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery", timeout=60)
    assert len(m.content) > 1 << 20 and m.content.isascii()
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res
    msg = email.message_from_bytes(m.content, policy=email.policy.default)
    assert msg.get_payload(decode=True) == text


def test_8bit_header_to_7bit_mx_bounces_5_6_3(setup: dict[str, Any]) -> None:
    """A raw UTF-8 header field (no SMTPUTF8) cannot be encoded for a 7-bit host: 554
    5.6.3, and the sender gets a bounce saying so."""
    body = BODY.replace(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Subject: Gr\u00fc\u00dfe"
                        .encode())
    diagnostic = _bounced_by_a_7bit_mx(setup, body, "5.6.3")
    assert "does not support 8BITMIME" in diagnostic and "header" in diagnostic


def _bounced_by_a_7bit_mx(setup: dict[str, Any], body: bytes, status: str) -> str:
    """Submit `body` for a 7-bit MX: nothing reaches it, the sender's bounce says 554
    `status` (so does the maillog); returns the bounce's Diagnostic-Code."""
    relay, mx, sender_mx = setup["relay"], setup["mx"], setup["sender_mx"]
    seven_bit(mx)
    qid = submit(relay, ["bob@example.test"], body)
    b = relay.wait_for(lambda: sender_mx.messages and sender_mx.messages[0], what="the bounce")
    assert mx.messages == []
    _, groups = parse_dsn(b.content)
    assert [(g["Action"], g["Status"]) for g in groups] == [("failed", status)]
    assert any(f" {qid}: " in ln and "stat=Bounced" in ln and f"dsn={status}" in ln
               for ln in relay.maillog().splitlines())
    return str(groups[0]["Diagnostic-Code"])


def test_a_one_line_8bit_part_goes_to_a_7bit_mx_with_crlf_only(setup: dict[str, Any]) -> None:
    """An HTML part of one long 8-bit line (its CRLF is the delimiter's) got LF soft line
    breaks from binascii: bare LFs on the wire, which a strict next hop refuses and a
    normalising one turns into CRLF under our signature. Only CRLF reaches the MX, both
    verifiers pass, the part decodes to what was sent."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    seven_bit(mx)
    head = BODY.partition(b"\r\n\r\n")[0].replace(
        b"Content-Type: text/plain; charset=utf-8", b'Content-Type: multipart/alternative;'
        b' boundary="alt"').replace(b"Content-Transfer-Encoding: 8bit\r\n", b"")
    html = "<p>Gr\u00fc\u00dfe aus K\u00f6ln, sch\u00f6nen Tag</p>".encode() * 12
    body = (head + b"\r\n\r\n--alt\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + html + b"\r\n--alt--\r\n")
    submit(relay, ["bob@example.test"], body)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert m.content.isascii()
    assert bare_line_ends(b"".join(mx.wire)) == []
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res
    part = email.message_from_bytes(m.content, policy=email.policy.default).get_payload()[0]
    assert part.get_payload(decode=True) == html


def _multipart_signed(signed_part: bytes) -> bytes:
    head = BODY.partition(b"\r\n\r\n")[0].replace(
        b"Content-Type: text/plain; charset=utf-8", b'Content-Type: multipart/signed; '
        b'protocol="application/pgp-signature"; micalg=pgp-sha256; boundary="sig"'
    ).replace(b"Content-Transfer-Encoding: 8bit\r\n", b"")
    return (head + b"\r\n\r\n--sig\r\n" + signed_part + b"\r\n--sig\r\n"
            b"Content-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----"
            b"\r\n\r\niQ==\r\n-----END PGP SIGNATURE-----\r\n--sig--\r\n")


def test_8bit_multipart_signed_to_a_7bit_mx_bounces_5_6_2(setup: dict[str, Any]) -> None:
    """RFC 1847 2.1 / RFC 3156 3: a multipart/signed's parts are opaque, its signature
    covers their octets as sent. Converting its 8-bit part to quoted-printable (what it
    did, as Postfix does) delivered a signature that fails; the sender gets 554 5.6.2
    (conversion required and prohibited) instead, nothing reaches the MX."""
    body = _multipart_signed(b"Content-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Transfer-Encoding: 8bit\r\n\r\n"
                             + "sign\u00e9\r\n".encode())
    assert "multipart/signed" in _bounced_by_a_7bit_mx(setup, body, "5.6.2")


@pytest.mark.parametrize("eightbit", [True, False], ids=["8BITMIME", "7bit MX"])
def test_a_smime_signature_verifies_at_the_destination(setup: dict[str, Any], tmp_path: Path,
                                                       eightbit: bool) -> None:
    """A real S/MIME signature (openssl cms, detached, its content quoted-printable with a
    lone dot line, a long line and trailing blanks) still verifies with openssl where the
    message arrives, and so do our DKIM signatures: the signed part is not changed by one
    byte, whichever the next hop."""
    relay, mx, dns = setup["relay"], setup["mx"], setup["dns"]
    if not eightbit:
        seven_bit(mx)
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=alice@sender.test", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    content = (b"Content-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
               b"Gr=C3=BC=C3=9Fe   =20\r\n.\r\n..two\r\n" + b"x" * 75 + b"=\r\ny\r\n")
    (tmp_path / "in").write_bytes(content)
    signed = subprocess.run(
        ["openssl", "cms", "-sign", "-binary", "-signer", cert, "-inkey", key,
         "-in", tmp_path / "in", "-md", "sha256"], check=True, capture_output=True).stdout
    signed = signed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = BODY[:BODY.index(b"MIME-Version: ")]  # openssl writes the MIME fields
    submit(relay, ["bob@example.test"], head + signed)
    m = relay.wait_for(lambda: mx.messages and mx.messages[0], what="delivery")
    assert content in m.content
    (tmp_path / "got").write_bytes(m.content)
    v = subprocess.run(["openssl", "cms", "-verify", "-CAfile", cert,  # MIME canonical
                        "-in", tmp_path / "got", "-out", os.devnull],
                       capture_output=True, text=True)
    assert v.returncode == 0 and "Verification successful" in v.stderr, v.stderr
    res = our_results(m.content, dns)
    assert len(res) == 2 and all(ok for *_, ok in res), res
