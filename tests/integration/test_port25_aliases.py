"""Mail strangers send on port 25 to this relay's own names: where [aliases] take it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import RelayProcess
from smtpclient import RawClient
from test_e2e_delivery import ZONES, mx_overrides

pytestmark = pytest.mark.slow


def _send(relay: RelayProcess, sender: str, rcpts: list[str]) -> None:
    with RawClient(relay.ports["smtp"]) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO stranger.example").code == 250
        assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
        for r in rcpts:
            assert c.cmd(f"RCPT TO:<{r}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"From: <x@sender.test>\r\nSubject: to the postmaster\r\n\r\nhi\r\n.\r\n")
        assert c.reply().code == 250


def test_postmaster_at_our_own_name_goes_through_aliases(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """With no local_domains, `RCPT TO:<Postmaster>` from a stranger on port 25 is
    postmaster@hostname (RFC 5321 4.5.1). It used to be delivered by MX to our own name
    (here NXDOMAIN; an MX that is this relay: 5.4.6) and bounced to the stranger's sender:
    the postmaster never got it. Now [aliases] rewrite it, as for the sendmail command;
    the forward keeps the stranger's envelope sender and no
    bounce goes anywhere."""
    dns.set_zones(ZONES)
    admin_mx = fake_mx("127.0.0.2")
    ov = mx_overrides(dns, fake_mx.port)
    ov["relay"]["local_domains"] = []
    ov["aliases"] = {"postmaster": ["root", "noc@example.test"], "root": "admin@example.test"}
    relay = relay_factory(ov)
    _send(relay, "x@sender.test", ["Postmaster"])
    relay.wait_for(lambda: len(admin_mx.messages) == 1 and relay.queued() == [],
                   what="the postmaster's mail delivered")
    [m] = admin_mx.messages
    assert sorted(m.rcpt_tos) == ["admin@example.test", "noc@example.test"]
    assert m.mail_from == "x@sender.test"
    assert sender_mx.messages == []  # no bounce to the stranger
    assert "relay.test" not in "".join(
        ln for ln in relay.maillog().splitlines() if " to=<" in ln)


def test_postmaster_at_our_hostname_is_accepted_and_delivered(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """postmaster@hostname (where our bounces come from: a receiver answering one writes
    there) from a stranger, with local_domains set: it was 550 5.7.1 Relaying denied (RFC
    5321 4.5.1: postmaster at every domain served MUST be supported). Now accepted and
    delivered through [aliases]; root@hostname stays refused."""
    dns.set_zones(ZONES)
    admin_mx = fake_mx("127.0.0.7")
    ov = mx_overrides(dns, fake_mx.port)
    ov["relay"]["local_domains"] = ["example.test"]
    ov["aliases"] = {"postmaster": "admin@c.test"}
    relay = relay_factory(ov)
    with RawClient(relay.ports["smtp"]) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO stranger.example").code == 250
        assert c.cmd("MAIL FROM:<x@sender.test>").code == 250
        assert c.cmd("RCPT TO:<root@relay.test>").code == 550
    _send(relay, "x@sender.test", ["Postmaster@relay.test"])
    relay.wait_for(lambda: len(admin_mx.messages) == 1 and relay.queued() == [],
                   what="the postmaster's mail delivered")
    assert admin_mx.messages[0].rcpt_tos == ["admin@c.test"]
    assert sender_mx.messages == []


def test_a_quoted_local_part_is_the_plain_mailbox(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """RFC 5321 4.1.2: `"root"@host` (a quoted string whose content is a plain dot-atom)
    is the mailbox root@host. It was compared as written: alice's cron mail to
    <"root"@relay.test> missed [aliases] and went by MX to our own name, and a stranger's
    <"postmaster"@relay.test> got 550 5.7.1 Relaying denied. Now the local part is
    unquoted when parsed, once, for every rule that compares it."""
    from relayproc import PASSWORD
    from smtpclient import client_ctx, plain

    dns.set_zones(ZONES)
    admin_mx = fake_mx("127.0.0.7")
    ov = mx_overrides(dns, fake_mx.port)
    ov["relay"]["local_domains"] = ["example.test"]
    ov["aliases"] = {"postmaster": "noc@c.test", "root": "admin@c.test"}
    relay = relay_factory(ov)
    _send(relay, "x@sender.test", ['"postmaster"@relay.test'])
    with RawClient(relay.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO laptop.test").code == 250
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        assert c.cmd("MAIL FROM:<alice@relay.test>").code == 250
        assert c.cmd('RCPT TO:<"r\\oot"@relay.test>').code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: cron\r\n\r\nhi\r\n.\r\n")
        assert c.reply().code == 250
    relay.wait_for(lambda: len(admin_mx.messages) == 2 and relay.queued() == [],
                   what="both delivered through [aliases]")
    assert sorted(r for m in admin_mx.messages for r in m.rcpt_tos) == \
        ["admin@c.test", "noc@c.test"]
    assert sender_mx.messages == []  # nothing bounced
