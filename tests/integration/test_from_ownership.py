"""Issue 17 part 1: DKIM signs an authenticated user's mail only for From: addresses the
user owns; `[auth] from_header_policy = "own"` refuses the rest at the end of DATA.

A real `authrelay serve`, real clients (smtplib and swaks over STARTTLS + AUTH), the fake
MX receiving, and dkimpy's verifier reading the public keys from the loopback DNS server.
bob owns bob@other.test; keys exist for other.test and probe.test (the domain an attacker
wants to borrow). The attacks of the issue: From: ceo@probe.test with bob's MAIL FROM, with
MAIL FROM:<>, with a display name holding bob's address, with a Sender: of bob's, as a
second From: field, as the second mailbox of one From: field; plus a From: field written
so the two standard-library parsers read it differently. Trusted networks keep today's
rule (signed whatever the From:), `[dkim] sign_unowned = true` signs anyway.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from dkimcheck import dkim_zones, verify_all
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory
from relayproc import RelayProcess
from support import ci
from test_e2e_delivery import ZONES, mx_overrides

from authrelay.dkim.keys import KeyStore

pytestmark = pytest.mark.slow

BOB_PW = "bob's long password"
SKIPPED = "dkim=skipped, reason=From: not owned by user"


def message(head: str, tag: str) -> bytes:
    return (f"{head}To: <rcpt@example.test>\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@other.test>\r\n\r\nbody of {tag}\r\n"
            ).encode("utf-8", "surrogateescape")  # lone surrogates: raw non-UTF-8 bytes


# (tag, MAIL FROM, header fields before To:) -- every one names probe.test somewhere
# DMARC or a reader would see it, and bob owns nothing there.
ATTACKS = [
    ("envelope-bob", "bob@other.test", "From: ceo@probe.test\r\n"),
    ("null-sender", "", "From: CEO <ceo@probe.test>\r\n"),
    ("display-name", "bob@other.test", 'From: "bob@other.test" <ceo@probe.test>\r\n'),
    ("sender-field", "bob@other.test", "From: ceo@probe.test\r\nSender: bob@other.test\r\n"),
    ("two-from", "bob@other.test", "From: bob@other.test\r\nFrom: ceo@probe.test\r\n"),
    ("two-mailboxes", "bob@other.test", "From: bob@other.test, ceo@probe.test\r\n"),
    ("parser-split", "bob@other.test", "From: bob@other.test <ceo@probe.test>\r\n"),
    ("encoded-word", "bob@other.test", "From: =?utf-8?q?ceo=40probe.test?=\r\n"),
    ("sender-only", "bob@other.test", "Sender: ceo@probe.test\r\n"),
    # hatk's attacks (obsolete syntax RFC 5322 4.5.3 / 4.4, folding, case, comments):
    ("space-colon", "bob@other.test", "From : ceo@probe.test\r\n"),
    ("tab-colon", "bob@other.test", "From\t: ceo@probe.test\r\n"),
    ("upper-name", "bob@other.test", "FROM: ceo@probe.test\r\n"),
    ("folded-list", "bob@other.test", "From: bob@other.test,\r\n ceo@probe.test\r\n"),
    ("quoted-local", "bob@other.test", 'From: "bob@other.test"@probe.test\r\n'),
    ("obs-route", "bob@other.test", "From: <@other.test:ceo@probe.test>\r\n"),
    ("group-of-ceo", "bob@other.test", "From: bob: ceo@probe.test;\r\n"),
    ("comment", "bob@other.test", "From: ceo(bob@other.test)@probe.test\r\n"),
    # bob's mailbox, but the field shows ceo's address (display name, comment):
    ("shown-in-name", "bob@other.test", 'From: "ceo@probe.test" <bob@other.test>\r\n'),
    ("shown-in-comment", "bob@other.test", "From: <bob@other.test>(<ceo@probe.test>)\r\n"),
    # encoded-words side by side: shown joined (RFC 2047 6.2), "ceo@probe.test"; and one
    # in a comment, which a reader shows decoded (RFC 2047 5)
    ("encoded-words-joined", "bob@other.test",
     "From: =?utf-8?q?ceo?= =?utf-8?b?QHByb2JlLnRlc3Q=?= <bob@other.test>\r\n"),
    ("encoded-in-comment", "bob@other.test",
     "From: bob@other.test (=?utf-8?q?ceo=40probe.test?=)\r\n"),
    # glued to a word: not RFC 2047, but lenient readers decode it ("ceo@probe.test")
    ("encoded-word-glued", "bob@other.test",
     "From: ceo=?utf-8?q?=40probe.test?= <bob@other.test>\r\n"),
    # hair spaces around the @ (UTF-8, RFC 6532): drawn all but invisible
    ("hair-spaces", "bob@other.test",
     'From: "ceo\u200a@\u200aprobe.test" <bob@other.test>\r\n'),
    # a folded quoted name: `ceo@ probe.test` once unfolded, `ceo@probe.test` to a reader
    # dropping the fold whole; blanks beside the @ likewise
    ("folded-name", "bob@other.test", 'From: "ceo@\r\n probe.test" <bob@other.test>\r\n'),
    ("blanks-at", "bob@other.test", 'From: "ceo @ probe.test" <bob@other.test>\r\n'),
    # a character drawn like a dot (U+2024 ONE DOT LEADER): `ceo @ probe.test` on screen
    ("dot-leader", "bob@other.test", 'From: "ceo @ probe\u2024test" <bob@other.test>\r\n'),
    # raw GBK bytes A3 C0 (not UTF-8): a fullwidth @ to a reader falling back to GBK
    ("gbk-at", "bob@other.test", 'From: "ceo\udca3\udcc0probe.test" <bob@other.test>\r\n'),
    # GBK under the WHATWG label x-gbk, which Python lacks: ceo＠probe.test
    ("x-gbk-label", "bob@other.test",
     "From: =?x-gbk?b?Y2Vvo8Bwcm9iZS50ZXN0?= <bob@other.test>\r\n"),
    # gb2312 label, GBK-only bytes A9 88 (U+FE6B SMALL COMMERCIAL AT to a GBK reader)
    ("gb2312-superset", "bob@other.test",
     "From: =?gb2312?b?Y2VvqYhwcm9iZS50ZXN0?= <bob@other.test>\r\n"),
    # an escaped quote in the quoted name: shown ceo"@probe.test
    ("escaped-quote", "bob@other.test", 'From: "ceo\\"@probe.test" <bob@other.test>\r\n'),
    # an obs-route (RFC 5322 4.4): the parsers drop it, some readers show probe.test
    ("route", "bob@other.test", "From: <@probe.test:bob@other.test>\r\n"),
    ("sender-route", "bob@other.test",
     "From: bob@other.test\r\nSender: Bob <@probe.test:bob@other.test>\r\n"),
    # UTF-16 without a byte order mark, big-endian (RFC 2781 4.3): ceo@probe.test
    ("utf16-be", "bob@other.test",
     "From: =?utf-16?b?AGMAZQBvAEAAcAByAG8AYgBlAC4AdABlAHMAdA==?= <bob@other.test>\r\n"),
    # a right-to-left override: drawn reversed, `ceo @ probe.test`
    ("rtl-override", "bob@other.test", 'From: "\u202etset.eborp @ oec" <bob@other.test>\r\n'),
    # bob's own address, 1000 folded comments after it (the stdlib parsers' time grows
    # with the square of that): longer than the 2048 characters vouched for
    ("long-from", "bob@other.test", "From: bob@other.test" + "\r\n (x)" * 1000 + "\r\n"),
    # bob's From:, 300 KiB of header fields, then ceo's: past what the accept path
    # buffers of a header section (256 KiB), so the header is not vouched for.
    ("huge-header", "bob@other.test", "From: bob@other.test\r\n" + "".join(
        f"X-Filler-{i}: {'f' * 90}\r\n" for i in range(3200)) + "From: ceo@probe.test\r\n"),
]
# Header sections dkimpy itself cannot parse (still sent, unsigned).
UNPARSABLE = {"tab-colon"}
# No From: at all: nothing to sign for, nothing claimed either: accepted, never signed.
NO_FROM = ("no-from", "bob@other.test", "")
# A first line that is a continuation: it folded into our own Received: (the client
# writing into our trace field) and bob's From: was signed after it; now it starts the
# body (spool/cleanup.py), so the message has no From: and goes as NO_FROM does.
CONT_FIRST = ("continuation-first", "bob@other.test",
              " by mx.google.com (auth ceo@probe.test)\r\nFrom: bob@other.test\r\n")
OWN = [
    ("own-plain", "bob@other.test", "From: bob@other.test\r\n"),
    ("own-folded", "", "From: =?utf-8?q?B=C3=B6b?=\r\n <Bob@Other.Test>\r\n"),
    ("own-group", "bob@other.test", "From: team: bob@other.test;\r\nSender: bob@other.test\r\n"),
    ("own-encoded-words", "bob@other.test",
     "From: =?utf-8?q?Bob?= =?iso-8859-1?q?_M=FCller?= <bob@other.test>\r\n"),
    # everyday display forms stay signed
    ("own-quoted-name", "bob@other.test", 'From: "Smith, Bob" <bob@other.test>\r\n'),
    ("own-comment", "bob@other.test", "From: bob@other.test (Bob)\r\n"),
    ("own-at-home", "bob@other.test", 'From: "Bob @ Home" <bob@other.test>\r\n'),
    ("own-escaped", "bob@other.test", 'From: "Bob \\"B\\" Smith" <bob@other.test>\r\n'),
    ("own-utf8-name", "bob@other.test", "From: J\u00fcrgen M\u00fcller <bob@other.test>\r\n"),
    ("own-quoted-utf8", "bob@other.test", 'From: "\u5f20\u4f1f, Bob" <bob@other.test>\r\n'),
]


@pytest.fixture
def env(relay_factory: Callable[..., RelayProcess], dns_server: FakeDNSServer,
        fake_mx: MXFactory) -> Callable[..., dict[str, Any]]:
    def make(**sections: dict[str, Any]) -> dict[str, Any]:
        mx = fake_mx("127.0.0.2")
        ov = mx_overrides(dns_server, fake_mx.port)
        ov["relay"]["trusted_networks"] = ["127.0.0.9/32"]
        for k, v in sections.items():
            ov[k] = {**ov.get(k, {}), **v}
        relay = relay_factory(ov, users={}, start=False)
        relay.cli("user", "add", "bob", "--password-stdin", "--address", "bob@other.test",
                  input=BOB_PW + "\n")
        for dom in ("other.test", "probe.test"):
            relay.cli("dkim", "keygen", dom, "--selector", "t", "--algorithm", "ed25519")
        keys = KeyStore(relay.state / "dkim").load().all()
        dns_server.set_zones({**ZONES, **dkim_zones(keys)})
        relay.start()
        return {"relay": relay, "mx": mx, "dns": dns_server}
    return make


def send(relay: RelayProcess, sender: str, msg: bytes, source: str = "127.0.0.1"
         ) -> tuple[int, bytes, str]:
    """(code, text, queue id or "") of DATA, as bob over STARTTLS + AUTH PLAIN."""
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20,
                      source_address=(source, 0)) as s:
        s.ehlo("laptop.test")
        s.starttls(context=relay.client_context())
        s.ehlo("laptop.test")
        s.login("bob", BOB_PW)
        assert s.mail(sender)[0] == 250
        assert s.rcpt("rcpt@example.test")[0] == 250
        code, text = s.data(msg)
    qid = text.rsplit(b" ", 1)[-1].decode() if code == 250 else ""
    return code, text, qid


def delivered(e: dict[str, Any], tag: str) -> bytes:
    mx = e["mx"]
    needle = f"Subject: {tag}\r\n".encode()
    return e["relay"].wait_for(
        lambda: next((m.content for m in mx.messages if needle in m.content), None),
        what=f"delivery of {tag}")


def test_unowned_from_goes_out_unsigned(env: Callable[..., dict[str, Any]]) -> None:
    e = env()  # sender_policy "any": from_header_policy "any", sign_unowned false
    relay = e["relay"]
    qids = {}
    for tag, sender, head in ATTACKS + OWN + [NO_FROM, CONT_FIRST]:
        code, text, qid = send(relay, sender, message(head, tag))
        assert code == 250, (tag, code, text)
        qids[tag] = qid
    for tag, _, _ in ATTACKS + [NO_FROM, CONT_FIRST]:
        content = delivered(e, tag)
        assert b"DKIM-Signature" not in content, tag
        if tag not in UNPARSABLE:  # dkimpy's verifier cannot read those at all
            assert verify_all(content, e["dns"].nameserver) == []
    for tag, _, _ in OWN:
        res = verify_all(delivered(e, tag), e["dns"].nameserver)
        assert res == [(b"other.test", b"t", b"ed25519-sha256", True)], (tag, res)
    log = relay.maillog()
    for tag, _, _ in ATTACKS:
        assert f"{qids[tag]}: {SKIPPED}" in log, (tag, log[-3000:])
    for tag, _, _ in [NO_FROM, CONT_FIRST]:  # said as it is (it said "not owned by user")
        assert f"{qids[tag]}: dkim=skipped, reason=no From: field\n" in log, (tag, log[-3000:])
    for tag, _, _ in OWN:
        assert f"{qids[tag]}: dkim=signed, d=other.test, s=t" in log
    head = delivered(e, CONT_FIRST[0]).split(b"\r\n\r\n", 1)[0]
    assert b"mx.google.com" not in head and b"From:" not in head, head


def test_from_header_policy_own_refuses_at_end_of_data(
        env: Callable[..., dict[str, Any]]) -> None:
    e = env(auth={"sender_policy": "own"})  # from_header_policy follows: "own"
    relay = e["relay"]
    big = "x" * 998 + "\r\n"
    for tag, sender, head in ATTACKS + [("streamed", "bob@other.test",
                                         "From: ceo@probe.test\r\n")]:
        msg = message(head, tag)
        if tag == "streamed":  # past the spool's in-memory part: streamed to disk
            msg += (big * 400).encode()
        code, text, _ = send(relay, sender, msg)
        assert (code, text) == (550, b"5.7.1 From: header address not owned by user"), tag
    assert relay.nothing_stored() and relay.unready() == []
    log = relay.maillog()
    refusals = [ln for ln in log.splitlines()
                if "reject=550 5.7.1 From: header address not owned by user" in ln]
    assert len(refusals) == len(ATTACKS) + 1, log[-3000:]
    assert any("reason=header section too large" in ln for ln in refusals)
    assert all("relay=localhost [127.0.0.1]" in ln or "relay=unknown [127.0.0.1]" in ln
               for ln in refusals), refusals
    assert any("reason=From: <ceo@probe.test> not owned by bob" in ln for ln in refusals)
    assert any("reason=Sender: <ceo@probe.test> not owned by bob" in ln for ln in refusals)
    # No From: at all is accepted (it claims nothing), unsigned.
    code, text, qid = send(relay, NO_FROM[1], message(NO_FROM[2], NO_FROM[0]))
    assert code == 250, text
    assert b"DKIM-Signature" not in delivered(e, NO_FROM[0])
    assert f"{qid}: dkim=skipped, reason=no From: field\n" in relay.maillog()
    # bob's own From: still goes through, signed.
    for tag, sender, head in OWN:
        code, text, _ = send(relay, sender, message(head, tag))
        assert code == 250, (tag, text)
        res = verify_all(delivered(e, tag), e["dns"].nameserver)
        assert res == [(b"other.test", b"t", b"ed25519-sha256", True)], (tag, res)


@pytest.mark.external
def test_swaks_refused_and_accepted(env: Callable[..., dict[str, Any]]) -> None:
    """The same through swaks (another real client), with from_header_policy set
    explicitly while sender_policy stays "any"."""
    ci.require_tool("swaks", "swaks")
    e = env(auth={"from_header_policy": "own"})
    relay = e["relay"]

    def swaks(header_from: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(relay.ports["submission"]),
             "--tls", "--tls-verify", "--tls-ca-path", str(relay.state / "tls" / "cert.pem"),
             "--auth", "PLAIN", "--auth-user", "bob", "--auth-password", BOB_PW,
             "--from", "bob@other.test", "--to", "rcpt@example.test",
             "--h-From", header_from, "--h-Subject", f"swaks {header_from}"],
            capture_output=True, text=True, timeout=60)

    r = swaks("ceo@probe.test")
    assert "<~* 550 5.7.1 From: header address not owned by user" in r.stdout, r.stdout
    assert relay.nothing_stored()
    r = swaks("Bob <bob@other.test>")
    assert r.returncode == 0, r.stdout
    res = verify_all(delivered(e, "swaks Bob <bob@other.test>"), e["dns"].nameserver)
    assert res == [(b"other.test", b"t", b"ed25519-sha256", True)]


def test_policy_any_with_sender_policy_own(env: Callable[..., dict[str, Any]]) -> None:
    """from_header_policy = "any" overrides the default that follows sender_policy: the
    message is accepted, and still not signed for a domain bob does not own."""
    e = env(auth={"sender_policy": "own", "from_header_policy": "any"})
    code, text, qid = send(e["relay"], "bob@other.test",
                           message("From: ceo@probe.test\r\n", "any"))
    assert code == 250, text
    assert b"DKIM-Signature" not in delivered(e, "any")
    assert f"{qid}: {SKIPPED}" in e["relay"].maillog()


def test_sign_unowned_lends_the_domain(env: Callable[..., dict[str, Any]]) -> None:
    e = env(dkim={"sign_unowned": True})
    code, text, qid = send(e["relay"], "bob@other.test",
                           message("From: ceo@probe.test\r\n", "lent"))
    assert code == 250, text
    res = verify_all(delivered(e, "lent"), e["dns"].nameserver)
    assert res == [(b"probe.test", b"t", b"ed25519-sha256", True)], res
    assert f"{qid}: dkim=signed, d=probe.test, s=t" in e["relay"].maillog()


def test_trusted_network_keeps_todays_rule(env: Callable[..., dict[str, Any]]) -> None:
    """A client on a trusted network that does not authenticate has no user to own
    anything: its mail is signed by the From: domain, as before (documented)."""
    e = env(auth={"sender_policy": "own"})
    relay = e["relay"]
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=20,
                      source_address=("127.0.0.9", 0)) as s:
        s.ehlo("app.test")
        s.sendmail("app@probe.test", ["rcpt@example.test"],
                   message("From: ceo@probe.test\r\n", "trusted"))
    res = verify_all(delivered(e, "trusted"), e["dns"].nameserver)
    assert res == [(b"probe.test", b"t", b"ed25519-sha256", True)], res
