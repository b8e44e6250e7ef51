"""Outbound delivery against real servers: a dnslib DNS server and aiosmtpd MX / smart
hosts on 127.0.0.x, real TLS from trustme. No mocks: every test goes over sockets."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory, bare_line_ends
from support import ci
from support.certs import server_tls_context
from support.maillog import ListLog
from support.ports import free_port
from support.wait import until

from authrelay.config import Config, from_dict
from authrelay.delivery.client import Courier, ascii_address, normalize_crlf
from authrelay.dns import DnsNoData, DnsPermanent, DnsTemporary, Resolver
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id

MSG = (b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: test\r\n\r\n"
       b"Hello.\r\n.leading dot\r\n.\r\nend\r\n")

ZONES: dict[str, Any] = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "implicit.test": {"A": ["127.0.0.2"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
    "nohost.test": {"MX": [(10, "gone.nohost.test")]},
    "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test"]},
    "2.0.0.127.dnsbl.test": {"A": ["127.0.0.2"]},
}


def make_cfg(tmp_path: Path, dns: FakeDNSServer, port: int, *,
             relay: dict[str, Any] | None = None, **delivery: Any) -> Config:
    d: dict[str, Any] = {
        "port": port, "nameservers": [dns.nameserver], "dns_timeout": "1s",
        "connect_timeout": "5s", "command_timeout": "10s", "data_timeout": "10s",
    }
    d.update(delivery)
    data: dict[str, Any] = {"hostname": "relay.test", "state_dir": str(tmp_path), "delivery": d}
    if relay:
        data["relay"] = relay
    return from_dict(data)


def envelope(*rcpts: str, sender: str = "alice@sender.test", **kw: Any) -> Envelope:
    return Envelope(new_queue_id(), sender, [Recipient(r) for r in rcpts], **kw)


async def send(cfg: Config, env: Envelope, message: bytes | Path = MSG,
               offset: int = 0) -> dict:
    courier = Courier(cfg, maillog=ListLog())
    try:
        return await courier.deliver(env, env.recipients, message, offset)
    finally:
        await courier.close()


@pytest.fixture
def dns(dns_server: FakeDNSServer) -> FakeDNSServer:
    dns_server.set_zones(ZONES)
    return dns_server


# --------------------------------------------------------------------------- DNS facade

@pytest.mark.slow
async def test_resolver_maps_outcomes(dns: FakeDNSServer) -> None:
    r = Resolver([dns.nameserver], timeout=1)
    assert sorted(await r.mx("EXAMPLE.test.")) == [(10, "mx1.example.test"),
                                                    (20, "mx2.example.test")]
    assert await r.addresses("mx1.example.test") == ["127.0.0.2"]
    with pytest.raises(DnsPermanent):
        await r.mx("nonexistent.test")
    with pytest.raises(DnsNoData):
        await r.mx("mx1.example.test")
    with pytest.raises(DnsTemporary):
        await r.mx("broken.test")
    with pytest.raises(DnsTemporary):
        await r.mx("slow.test")
    assert await r.ptr("127.0.0.2") == "mx1.example.test"
    assert await r.ptr("127.0.0.3") is None
    assert await r.a_exists("2.0.0.127.dnsbl.test") is True
    assert await r.a_exists("3.0.0.127.dnsbl.test") is False


async def test_a_cname_loop_is_named_not_taken_for_a_server_failure(
        dns: FakeDNSServer) -> None:
    """An answer whose CNAME chain loops (or runs past dnspython's 16 links) is unusable:
    it was reported as 'DNS server failure (SERVFAIL)', which the server never said (it
    answered NOERROR); now the lookup says what was wrong with the answer."""
    dns.update({"loop1.test": {"CNAME": ["loop2.test"]},
                "loop2.test": {"CNAME": ["loop1.test"]}})
    r = Resolver([dns.nameserver], timeout=1)
    with pytest.raises(DnsTemporary, match=r"^loop1.test/MX: DNS answer refused: a CNAME "
                                           r"chain of more than 16 names, or a loop$"):
        await r.mx("loop1.test")
    with pytest.raises(DnsTemporary, match=r"^broken.test/MX: DNS server failure "
                                           r"\(SERVFAIL\)$"):
        await r.mx("broken.test")


# --------------------------------------------------------------------------- MX routing

async def test_delivery_by_preference(tmp_path: Path, dns: FakeDNSServer,
                                      fake_mx: MXFactory) -> None:
    mx1, mx2 = fake_mx("127.0.0.2"), fake_mx("127.0.0.3")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"))
    r = res["bob@example.test"]
    assert r.ok and r.code == 250 and r.enhanced == "2.0.0"
    assert r.remote == f"mx1.example.test [127.0.0.2]:{fake_mx.port}"
    assert len(mx1.messages) == 1 and mx2.connections == 0
    m = mx1.messages[0]
    assert m.helo == "relay.test"
    assert m.mail_from == "alice@sender.test" and m.rcpt_tos == ["bob@example.test"]
    assert m.content == MSG


@pytest.mark.parametrize("first", ["greeting421", "refused", "mail451"])
async def test_fallback_to_second_mx(tmp_path: Path, dns: FakeDNSServer,
                                     fake_mx: MXFactory, first: str) -> None:
    mx2 = fake_mx("127.0.0.3")
    if first == "greeting421":
        mx1 = fake_mx("127.0.0.2", greeting="421 4.3.2 too busy")
    elif first == "mail451":
        mx1 = fake_mx("127.0.0.2", mail_reply="451 4.3.0 local problem")
    else:  # nothing listens on mx1's address at that port
        mx1 = None
        dns.update({"mx1.example.test": {"A": ["127.0.0.9"]}})
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"))
    r = res["bob@example.test"]
    assert r.ok, r
    assert r.remote.startswith("mx2.example.test [127.0.0.3]")
    assert len(mx2.messages) == 1
    if mx1 is not None:
        assert mx1.connections == 1 and mx1.messages == []


async def test_all_mx_down_is_temporary(tmp_path: Path, dns: FakeDNSServer) -> None:
    port = free_port("127.0.0.2")
    res = await send(make_cfg(tmp_path, dns, port), envelope("bob@example.test"))
    r = res["bob@example.test"]
    assert not r.ok and not r.permanent
    assert r.enhanced == "4.4.1" and "connection refused" in r.text
    assert "mx2.example.test" in r.text  # the last host's reason


async def test_mail_5xx_is_permanent_and_no_other_mx(tmp_path: Path, dns: FakeDNSServer,
                                                     fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", mail_reply="553 5.7.1 sender rejected")
    mx2 = fake_mx("127.0.0.3")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"))
    r = res["bob@example.test"]
    assert r.permanent and r.code == 553 and r.enhanced == "5.7.1"
    assert r.text == "sender rejected"
    assert mx2.connections == 0


async def test_implicit_mx(tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@implicit.test"))
    r = res["bob@implicit.test"]
    assert r.ok and r.remote.startswith("implicit.test [127.0.0.2]")
    assert mx.messages[0].rcpt_tos == ["bob@implicit.test"]


async def test_ipv6_address_tried_before_ipv4(tmp_path: Path, dns: FakeDNSServer,
                                              fake_mx: MXFactory) -> None:
    mx4 = fake_mx("127.0.0.2")
    try:
        mx6 = fake_mx("::1")
    except OSError as e:
        ci.require(False, f"no IPv6 loopback ({e})")
        raise
    dns.update({"mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]}})
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"))
    assert res["bob@example.test"].remote == f"mx1.example.test [::1]:{fake_mx.port}"
    assert len(mx6.messages) == 1 and mx4.connections == 0


async def test_ipv6_refused_falls_back_to_ipv4(tmp_path: Path, dns: FakeDNSServer,
                                               fake_mx: MXFactory) -> None:
    mx4 = fake_mx("127.0.0.2")
    dns.update({"mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]}})
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"))
    assert res["bob@example.test"].remote.startswith("mx1.example.test [127.0.0.2]")
    assert len(mx4.messages) == 1
    assert ("mx1.example.test", "AAAA") in dns.queries


async def test_address_literal_skips_dns(tmp_path: Path, dns: FakeDNSServer,
                                         fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@[127.0.0.2]"))
    assert res["bob@[127.0.0.2]"].ok
    assert mx.messages[0].rcpt_tos == ["bob@[127.0.0.2]"]
    assert dns.queries == []


@pytest.mark.parametrize("domain,code,enhanced,permanent", [
    ("nullmx.test", 556, "5.1.10", True),
    ("nonexistent.test", 550, "5.1.2", True),
    ("broken.test", 451, "4.4.3", False),
    pytest.param("slow.test", 451, "4.4.3", False, marks=pytest.mark.slow),  # a DNS timeout
    ("nohost.test", 550, "5.4.4", True),
    # U-labels IDNA refuses (a symbol; digits of a right-to-left script): no DNS name
    # stands for them, bounced at once (they were deferred 4.4.3 for the queue's lifetime)
    ("\u2603.test", 550, "5.1.2", True),
    ("\u0660\u0661.test", 550, "5.1.2", True),
])
async def test_dns_outcomes(tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
                            domain: str, code: int, enhanced: str, permanent: bool) -> None:
    mx = fake_mx("127.0.0.2")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope(f"bob@{domain}"))
    r = res[f"bob@{domain}"]
    assert (r.code, r.enhanced, r.permanent) == (code, enhanced, permanent), r
    assert mx.connections == 0


async def test_servfail_deferred_then_delivered(tmp_path: Path, dns: FakeDNSServer,
                                                fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    cfg = make_cfg(tmp_path, dns, fake_mx.port)
    env = envelope("bob@broken.test")
    first = (await send(cfg, env))["bob@broken.test"]
    assert not first.ok and not first.permanent
    dns.update({"broken.test": {"MX": [(5, "mx1.example.test")]}})
    second = (await send(cfg, env))["bob@broken.test"]
    assert second.ok and len(mx.messages) == 1


# --------------------------------------------------------------------------- SMTP session

async def test_per_recipient_results(tmp_path: Path, dns: FakeDNSServer,
                                     fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", rcpt_replies={
        "nobody@example.test": "550 5.1.1 no such user",
        "full@example.test": "452 4.2.2 mailbox full",
    })
    env = envelope("a@example.test", "nobody@example.test", "full@example.test",
                   "b@example.test")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env)
    assert res["a@example.test"].ok and res["b@example.test"].ok
    bad, full = res["nobody@example.test"], res["full@example.test"]
    assert (bad.code, bad.enhanced, bad.permanent) == (550, "5.1.1", True)
    assert (full.code, full.enhanced, full.permanent) == (452, "4.2.2", False)
    assert mx.messages[0].rcpt_tos == ["a@example.test", "b@example.test"]


async def test_data_reply_applies_to_accepted(tmp_path: Path, dns: FakeDNSServer,
                                              fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", data_reply="554 5.7.1 spam detected",
            rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    env = envelope("a@example.test", "nobody@example.test")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env)
    assert (res["a@example.test"].code, res["a@example.test"].enhanced) == (554, "5.7.1")
    assert res["nobody@example.test"].enhanced == "5.1.1"


async def test_starttls_used_when_offered(tmp_path: Path, dns: FakeDNSServer,
                                          fake_mx: MXFactory, trustme_ca: Any) -> None:
    # The certificate names another host: opportunistic TLS does not verify (RFC 7435).
    mx = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "other.test"))
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"))
    assert res["bob@example.test"].ok
    assert mx.messages[0].tls is True
    assert b"STARTTLS\r\n" in mx.wire[0]


async def test_tls_encrypt_without_starttls_defers(tmp_path: Path, dns: FakeDNSServer,
                                                   fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    dns.update({"example.test": {"MX": [(10, "mx1.example.test")]}})
    cfg = make_cfg(tmp_path, dns, fake_mx.port, tls="encrypt")
    r = (await send(cfg, envelope("bob@example.test")))["bob@example.test"]
    assert (r.permanent, r.enhanced) == (False, "4.7.4")
    assert mx.messages == []


async def test_size_limit_is_permanent(tmp_path: Path, dns: FakeDNSServer,
                                       fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", size_limit=50)
    r = (await send(make_cfg(tmp_path, dns, fake_mx.port),
                    envelope("bob@example.test")))["bob@example.test"]
    assert (r.code, r.enhanced, r.permanent) == (552, "5.3.4", True)
    assert mx.messages == [] and b"MAIL" not in mx.wire[0]


async def test_size_and_8bitmime_and_smtputf8_parameters(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    env = envelope("bjørn@example.test", sender="ålice@sender.test", body_8bit=True,
                   smtputf8=True)
    msg = "Subject: grüße\r\n\r\nblåbær\r\n".encode()
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env, msg)
    assert res["bjørn@example.test"].ok
    m = mx.messages[0]
    assert {"BODY=8BITMIME", "SMTPUTF8", f"SIZE={len(msg)}"} <= set(m.mail_options)
    assert m.mail_from == "ålice@sender.test" and m.rcpt_tos == ["bjørn@example.test"]
    assert m.content == msg


async def test_utf8_address_to_peer_without_smtputf8(tmp_path: Path, dns: FakeDNSServer,
                                                     fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", smtputf8=False)
    env = envelope("bjørn@example.test", "bob@example.test")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env)
    r = res["bjørn@example.test"]
    assert (r.code, r.enhanced, r.permanent) == (553, "5.6.7", True)
    assert "SMTPUTF8" in r.text
    assert res["bob@example.test"].ok
    assert mx.messages[0].rcpt_tos == ["bob@example.test"]


async def test_idn_domain_goes_as_its_a_label_to_a_peer_without_smtputf8(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    """An ASCII local part at an internationalised domain is the same mailbox at the
    domain's A-label: a next hop without SMTPUTF8 gets it so (not a 553 5.6.7 bounce); a
    UTF-8 local part still cannot go there."""
    dns.update({"xn--bcher-kva.test": {"MX": [(10, "mx1.example.test")]}})
    mx = fake_mx("127.0.0.2", smtputf8=False)
    env = envelope("bob@Bücher.test", "bjørn@bücher.test",
                   sender="alice@bücher.test", smtputf8=True)
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env)
    assert res["bob@Bücher.test"].ok, res["bob@Bücher.test"].text
    r = res["bjørn@bücher.test"]
    assert (r.code, r.enhanced, r.permanent) == (553, "5.6.7", True)
    m = mx.messages[0]
    assert m.mail_from == "alice@xn--bcher-kva.test"
    assert m.rcpt_tos == ["bob@xn--bcher-kva.test"]
    assert "SMTPUTF8" not in m.mail_options
    # a UTF-8 local part in the sender: nothing can go there, as before
    res = await send(make_cfg(tmp_path, dns, fake_mx.port),
                     envelope("bob@bücher.test", sender="ålice@bücher.test"))
    assert (res["bob@bücher.test"].code, res["bob@bücher.test"].enhanced) == (553, "5.6.7")
    assert len(mx.messages) == 1


@pytest.mark.parametrize("as_file", [False, True])
async def test_utf8_header_to_peer_without_smtputf8_bounces(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, as_file: bool) -> None:
    """RFC 6531 3.4: an SMTPUTF8 message with UTF-8 in its header section is not sent to a
    host without SMTPUTF8 (it went as 8-bit mail): 553 5.6.7 for every recipient, before
    MAIL (and before any 7-bit conversion, which would say 5.6.3). Its ASCII-header
    sibling goes, and so does the UTF-8 header when SMTPUTF8 was not asked for (legacy
    8-bit headers, as Postfix passes them)."""
    mx = fake_mx("127.0.0.2", smtputf8=False)
    # as_file: a message over 1 MiB, streamed from its queue file (read up to its header)
    body = "blåbær\r\n".encode() * (200_000 if as_file else 1)
    utf8 = "From: José <jose@sender.test>\r\nSubject: x\r\n\r\n".encode() + body
    ascii_head = b"From: <jose@sender.test>\r\nSubject: x\r\n\r\n" + body

    async def go(msg: bytes, **kw: Any) -> Any:
        body: bytes | Path = msg
        if as_file:
            body = tmp_path / "queue-file"
            body.write_bytes(msg)
        env = envelope("bob@example.test", "carol@example.test", **kw)
        return await send(make_cfg(tmp_path, dns, fake_mx.port), env, body)

    for eightbitmime in (True, False):
        mx.eightbitmime = eightbitmime
        res = await go(utf8, smtputf8=True)
        for r in res.values():
            assert (r.code, r.enhanced, r.permanent) == (553, "5.6.7", True), r.text
            assert "SMTPUTF8 is required, but was not offered by host" in r.text
        assert mx.messages == []
    mx.eightbitmime = True
    assert all(r.ok for r in (await go(ascii_head, smtputf8=True)).values())
    assert all(r.ok for r in (await go(utf8)).values())
    assert [m.content for m in mx.messages] == [ascii_head, utf8]
    assert all("SMTPUTF8" not in m.mail_options for m in mx.messages)


def test_ascii_address_forms() -> None:
    assert ascii_address("bob@example.test") == "bob@example.test"
    assert ascii_address("") == ""  # the null sender
    assert ascii_address("Bob@BÜCHER.test") == "Bob@xn--bcher-kva.test"  # local part kept
    assert ascii_address("bjørn@example.test") == ""
    assert ascii_address("carol@boß.test") == ""  # never as boss.test
    assert ascii_address("nodomain") == "nodomain"


async def test_no_bare_cr_or_lf_leaves(tmp_path: Path, dns: FakeDNSServer,
                                       fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    # Smuggling attempts: bare LF, bare CR, "\n.\r\n" and "\r.\r" end-of-data lookalikes.
    nasty = (b"Subject: smuggle\nX: a\rb\r\n\r\nline1\n.\r\nMAIL FROM:<evil@x>\r\n"
             b"line2\r.\rline3\r\r\n.\nlast")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"),
                     nasty)
    assert res["bob@example.test"].ok
    assert len(mx.messages) == 1  # one message: nothing was smuggled as a second
    assert mx.messages[0].content == normalize_crlf(nasty)
    assert bare_line_ends(mx.wire[0]) == []
    assert b"\r\n..\r\n" in mx.wire[0]  # the lone dot line went out dot-stuffed


async def test_message_from_spool_file_with_offset(tmp_path: Path, dns: FakeDNSServer,
                                                   fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    env = envelope("bob@example.test")
    ej = env.to_json()
    header = f"AUTHRELAY-SPOOL 1 {len(ej)}\n".encode()
    path = tmp_path / "queue-file"
    path.write_bytes(header + ej + b"\n" + MSG)
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env, path,
                     offset=len(header) + len(ej) + 1)
    assert res["bob@example.test"].ok
    assert mx.messages[0].content == MSG
    assert json.loads(ej)["queue_id"] == env.queue_id


async def test_message_bytes_with_offset_and_without(tmp_path: Path, dns: FakeDNSServer,
                                                     fake_mx: MXFactory) -> None:
    """Bytes at offset 0 are sent as they are (no copy, issue 22), from an offset only
    what follows it."""
    mx = fake_mx("127.0.0.2")
    cfg = make_cfg(tmp_path, dns, fake_mx.port)
    lead = b"NOT-SENT: x\r\n"
    for message, offset in ((MSG, 0), (lead + MSG, len(lead))):
        res = await send(cfg, envelope("bob@example.test"), message, offset)
        assert res["bob@example.test"].ok
    assert [m.content for m in mx.messages] == [MSG, MSG]


async def test_unreadable_message_is_temporary(tmp_path: Path, dns: FakeDNSServer) -> None:
    res = await send(make_cfg(tmp_path, dns, 25), envelope("bob@example.test"),
                     tmp_path / "missing")
    r = res["bob@example.test"]
    assert not r.permanent and r.enhanced == "4.3.0"


async def test_connection_reused(tmp_path: Path, dns: FakeDNSServer,
                                 fake_mx: MXFactory,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from authrelay.delivery import client as client_mod

    # Reused "straight after": on a loaded machine the next check-out can come later than
    # _FRESH (2 s) and rightly take an RSET probe; this test is about the fresh case.
    monkeypatch.setattr(client_mod, "_FRESH", 3600.0)
    mx = fake_mx("127.0.0.2")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        for i in range(3):
            env = envelope(f"r{i}@example.test")
            res = await courier.deliver(env, env.recipients, MSG + f"n={i}\r\n".encode())
            assert res[f"r{i}@example.test"].ok
        assert mx.connections == 1
        assert [m.connection for m in mx.messages] == [1, 1, 1]
        # Reused straight after a transaction: no RSET round trip (RFC 5321 4.1.4).
        assert mx.wire[0].count(b"RSET\r\n") == 0
    finally:
        await courier.close()
    assert mx.wire[0].endswith(b"QUIT\r\n")


async def test_connection_reused_after_a_refused_message_is_reset(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message refused at its final dot leaves a connection that is reused only after
    an RSET (as Postfix): a server may refuse it without clearing its transaction (an
    aiosmtpd whose DATA hook fails answers 500 and keeps the MAIL). Before, the next
    message's MAIL on that connection got `503 nested MAIL command` and that message,
    refused for nothing of its own, bounced."""
    from authrelay.delivery import client as client_mod

    monkeypatch.setattr(client_mod, "_FRESH", 3600.0)  # the RSET for the refusal, no probe
    mx = fake_mx("127.0.0.2", data_fault={"bad@example.test"})
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        env = envelope("bad@example.test")
        res = await courier.deliver(env, env.recipients, MSG)
        assert res["bad@example.test"].code == 500
        env = envelope("good@example.test")
        res = await courier.deliver(env, env.recipients, MSG)
        assert res["good@example.test"].ok, res["good@example.test"]
        assert [m.rcpt_tos for m in mx.messages] == [["good@example.test"]]
        assert mx.connections == 1  # reused, once reset
        assert mx.wire[0].count(b"RSET\r\n") == 1
    finally:
        await courier.close()


async def test_idle_connection_probed_with_rset(tmp_path: Path, dns: FakeDNSServer,
                                                fake_mx: MXFactory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from authrelay.delivery import client as client_mod

    monkeypatch.setattr(client_mod, "_FRESH", 0.0)  # every cached connection counts as idle
    mx = fake_mx("127.0.0.2")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        for i in range(3):
            env = envelope(f"r{i}@example.test")
            res = await courier.deliver(env, env.recipients, MSG)
            assert res[f"r{i}@example.test"].ok
        assert mx.connections == 1
        assert mx.wire[0].count(b"RSET\r\n") == 2
    finally:
        await courier.close()


async def test_pool_disabled_opens_new_connections(tmp_path: Path, dns: FakeDNSServer,
                                                   fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port, max_idle_connections=0),
                      maillog=ListLog())
    try:
        for _ in range(2):
            env = envelope("bob@example.test")
            assert (await courier.deliver(env, env.recipients, MSG))["bob@example.test"].ok
    finally:
        await courier.close()
    assert mx.connections == 2


# --------------------------------------------------------------------------- smart host

def smart_cfg(tmp_path: Path, dns: FakeDNSServer, hosts: list[str], ca_file: Path,
              password: str = "s3cret pass", tls: str = "starttls") -> Config:
    pw = tmp_path / "smarthost.pw"
    pw.write_text(password + "\n")
    return make_cfg(tmp_path, dns, 25, relay={
        "smart_host": hosts, "smart_host_tls": tls, "smart_host_user": "relayuser",
        "smart_host_password_file": str(pw), "smart_host_ca_file": str(ca_file),
    })


async def test_smart_host_starttls_auth_byte_for_byte(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: Any,
        trustme_ca_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 require_starttls=True, users={"relayuser": "s3cret pass"})
    received = b"Received: from laptop by relay.test with ESMTPSA id Q1\r\n" + MSG
    env = envelope("someone@elsewhere.test", "other@far.test")
    res = await send(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file), env, received)
    assert all(r.ok for r in res.values()), res
    assert res["other@far.test"].remote == f"127.0.0.2 [127.0.0.2]:{sh.port}"
    m = sh.messages[0]
    assert m.content == received
    assert m.tls and m.auth_user == "relayuser"
    assert m.rcpt_tos == ["someone@elsewhere.test", "other@far.test"]
    assert bare_line_ends(sh.wire[0]) == []
    assert dns.queries == []  # no MX lookups through a smart host
    assert "s3cret" not in caplog.text


async def test_smart_host_failover(tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
                                   trustme_ca: Any, trustme_ca_file: Path) -> None:
    ctx = server_tls_context(trustme_ca, "127.0.0.2", "127.0.0.3")
    first = fake_mx("127.0.0.2", starttls_context=ctx, users={"relayuser": "other"})
    second = fake_mx("127.0.0.3", starttls_context=ctx, users={"relayuser": "s3cret pass"})
    down = f"127.0.0.4:{free_port('127.0.0.4')}"
    cfg = smart_cfg(tmp_path, dns, [down, first.address, second.address], trustme_ca_file)
    res = await send(cfg, envelope("x@far.test"))
    assert res["x@far.test"].ok and res["x@far.test"].remote.startswith("127.0.0.3")
    assert first.auth_attempts == [("relayuser", False)] and first.messages == []
    assert len(second.messages) == 1


async def test_smart_host_failover_without_nameservers(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: Any,
        trustme_ca_file: Path) -> None:
    """Without [delivery] nameservers the smart hosts are taken as configured, with no
    lookup step (nor its timer: issue 22): each entry is still tried in order, with its
    own TLS level and credentials, and every failure is named in the maillog."""
    ctx = server_tls_context(trustme_ca, "127.0.0.2", "127.0.0.3")
    first = fake_mx("127.0.0.2", starttls_context=ctx, users={"relayuser": "other"})
    second = fake_mx("127.0.0.3", starttls_context=ctx, users={"relayuser": "s3cret pass"})
    down = f"127.0.0.4:{free_port('127.0.0.4')}"
    pw = tmp_path / "smarthost.pw"
    pw.write_text("s3cret pass\n")
    cfg = make_cfg(tmp_path, dns, 25, nameservers=[], relay={
        "smart_host": [down, first.address, second.address], "smart_host_tls": "starttls",
        "smart_host_user": "relayuser", "smart_host_password_file": str(pw),
        "smart_host_ca_file": str(trustme_ca_file)})
    log = ListLog()
    courier = Courier(cfg, maillog=log)
    env = envelope("x@far.test")
    try:
        res = await courier.deliver(env, env.recipients, MSG)
    finally:
        await courier.close()
    assert res["x@far.test"].ok and res["x@far.test"].remote.startswith("127.0.0.3")
    assert res["x@far.test"].tls == "verified"
    assert first.auth_attempts == [("relayuser", False)] and first.messages == []
    assert len(second.messages) == 1 and second.messages[0].tls
    assert log.grep(env.queue_id, down) and log.grep(env.queue_id, "127.0.0.2")
    assert dns.queries == []


async def test_smart_host_auth_failure_is_temporary(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: Any,
        trustme_ca_file: Path) -> None:
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 users={"relayuser": "right"})
    res = await send(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file, "wrong"),
                     envelope("x@far.test"))
    r = res["x@far.test"]
    assert (r.permanent, r.enhanced) == (False, "4.7.0")
    assert "authentication failed" in r.text and "wrong" not in r.text


async def test_smart_host_without_starttls_is_refused(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    sh = fake_mx("127.0.0.2")
    res = await send(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file),
                     envelope("x@far.test"))
    assert res["x@far.test"].enhanced == "4.7.4" and sh.messages == []
    assert b"AUTH" not in sh.wire[0]  # credentials never sent in the clear


async def test_smart_host_untrusted_certificate(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    import trustme

    other_ca = trustme.CA()
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(other_ca, "127.0.0.2"),
                 users={"relayuser": "s3cret pass"})
    res = await send(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file),
                     envelope("x@far.test"))
    r = res["x@far.test"]
    assert (r.permanent, r.enhanced) == (False, "4.7.5"), r
    assert sh.auth_attempts == []


async def test_smart_host_implicit_tls(tmp_path: Path, dns: FakeDNSServer,
                                       fake_mx: MXFactory, trustme_ca: Any,
                                       trustme_ca_file: Path) -> None:
    sh = fake_mx("127.0.0.2", implicit_tls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 users={"relayuser": "s3cret pass"})
    res = await send(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file, tls="tls"),
                     envelope("x@far.test"))
    assert res["x@far.test"].ok, res
    assert sh.messages[0].auth_user == "relayuser"


# --------------------------------------------------------------------------- more session

async def test_null_sender(tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    res = await send(make_cfg(tmp_path, dns, fake_mx.port),
                     envelope("bob@example.test", sender=""))
    assert res["bob@example.test"].ok
    assert b"MAIL FROM:<> SIZE=" in mx.wire[0]


@pytest.mark.slow
async def test_data_timeout_is_temporary(tmp_path: Path, dns: FakeDNSServer,
                                         fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", data_delay=5)
    dns.update({"example.test": {"MX": [(10, "mx1.example.test")]}})
    cfg = make_cfg(tmp_path, dns, fake_mx.port, data_timeout="0.3s")
    r = (await send(cfg, envelope("bob@example.test")))["bob@example.test"]
    assert (r.permanent, r.enhanced) == (False, "4.4.2") and "DATA" in r.text


@pytest.mark.slow
async def test_concurrent_deliveries_then_shared_pool(tmp_path: Path, dns: FakeDNSServer,
                                                      fake_mx: MXFactory) -> None:
    import asyncio

    mx = fake_mx("127.0.0.2", data_delay=1)  # the first still busy when the second starts
    # Two domains whose MX is the same host share its cached connections.
    dns.update({"other.test": {"MX": [(10, "mx1.example.test")]}})
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port), maillog=ListLog())
    try:
        envs = [envelope("a@example.test"), envelope("b@other.test")]
        results = await asyncio.gather(*(courier.deliver(e, e.recipients, MSG) for e in envs))
        assert all(r.ok for res in results for r in res.values())
        assert mx.connections == 2  # in flight at once: one connection each
        mx.data_delay = 0
        for e in envs:
            assert (await courier.deliver(e, e.recipients, MSG))[e.recipients[0].address].ok
        assert mx.connections == 2 and len(mx.messages) == 4  # later ones reused them
    finally:
        await courier.close()


async def test_idle_connection_closed_after_idle_timeout(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:

    mx = fake_mx("127.0.0.2")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port, idle_timeout="0.1s"), maillog=ListLog())
    env = envelope("bob@example.test")
    assert (await courier.deliver(env, env.recipients, MSG))["bob@example.test"].ok
    await until(lambda: mx.wire[0].endswith(b"QUIT\r\n"), "QUIT after the idle timeout")
    assert (await courier.deliver(env, env.recipients, MSG))["bob@example.test"].ok
    assert mx.connections == 2
    await courier.close()


async def test_a_connection_used_again_stays_until_idle_timeout_after_its_last_use(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    """The idle timer is armed once and left armed while the connection is used again
    (issue 22: it was armed and cancelled per message): when it goes off, a connection
    checked in since is kept for `idle_timeout` after that last check-in, then QUIT."""
    import asyncio

    mx = fake_mx("127.0.0.2")
    courier = Courier(make_cfg(tmp_path, dns, fake_mx.port, idle_timeout="1.5s"),
                      maillog=ListLog())
    env = envelope("bob@example.test")
    try:
        for _ in range(3):  # checked in at 0 (its timer: 1.5), about 1.0 and 2.0
            assert (await courier.deliver(env, env.recipients, MSG))["bob@example.test"].ok
            await asyncio.sleep(1.0)
        assert mx.connections == 1 and not mx.wire[0].endswith(b"QUIT\r\n")
        await until(lambda: mx.wire[0].endswith(b"QUIT\r\n"), "QUIT after the idle timeout")
        assert mx.connections == 1 and len(mx.messages) == 3
    finally:
        await courier.close()


async def test_smart_host_auth_login_only(tmp_path: Path, dns: FakeDNSServer,
                                          fake_mx: MXFactory, trustme_ca: Any,
                                          trustme_ca_file: Path) -> None:
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 users={"relayuser": "s3cret pass"}, auth_exclude=["PLAIN"])
    res = await send(smart_cfg(tmp_path, dns, [sh.address], trustme_ca_file),
                     envelope("x@far.test"))
    assert res["x@far.test"].ok, res
    assert b"AUTH LOGIN" in sh.wire[0] and sh.messages[0].auth_user == "relayuser"


@pytest.mark.slow
async def test_large_message_with_bare_lf(tmp_path: Path, dns: FakeDNSServer,
                                          fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2")
    body = b"".join(b"%06d " % i + b"x" * 60 + (b"\n" if i % 2 else b"\r\n")
                    for i in range(40000))  # ~2.7 MB, half the lines with bare LF
    msg = b"Subject: big\r\n\r\n" + body + b".\n"
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), envelope("bob@example.test"), msg)
    assert res["bob@example.test"].ok
    assert mx.messages[0].content == normalize_crlf(msg)
    assert bare_line_ends(mx.wire[0]) == []


@pytest.mark.slow
async def test_large_spool_file_streams_identically(tmp_path: Path, dns: FakeDNSServer,
                                                    fake_mx: MXFactory,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A message over 1 MiB is streamed from the spool file in chunks; what arrives is the
    same as normalising and stuffing it whole, whatever falls on a chunk boundary."""
    from authrelay.delivery import client as client_mod

    monkeypatch.setattr(client_mod, "_STREAM_CHUNK", 4099)  # many odd boundaries
    mx = fake_mx("127.0.0.2")
    parts = [b"Subject: stream\r\n\r\n"]
    for i in range(100000):
        # dots at line starts, bare CR, bare LF, CRLF split anywhere by the chunking
        parts.append(b".%05d dotted\r\n" % i if i % 7 == 0 else b"line %05d\n" % i
                     if i % 5 == 0 else b"cr %05d\r" % i if i % 11 == 0 else b"ok %05d\r\n" % i)
    msg = b"".join(parts) + b"tail without end"
    env = envelope("bob@example.test")
    ej = env.to_json()
    header = f"AUTHRELAY-SPOOL 1 {len(ej)}\n".encode()
    path = tmp_path / "queue-file"
    path.write_bytes(header + ej + b"\n" + msg)
    assert len(msg) > client_mod._NORMALIZE_OFFLOAD
    res = await send(make_cfg(tmp_path, dns, fake_mx.port), env, path,
                     offset=len(header) + len(ej) + 1)
    assert res["bob@example.test"].ok
    assert mx.messages[0].content == normalize_crlf(msg)
    assert bare_line_ends(mx.wire[0]) == []
    assert len(mx.messages) == 1
