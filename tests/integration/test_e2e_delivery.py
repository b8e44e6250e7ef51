"""End to end delivery: a real `authrelay serve` process, a real DNS server on loopback,
fake MX / smart hosts (aiosmtpd, in threads) on 127.0.0.x, real TLS from trustme.

Mail is submitted over the network (swaks, smtplib with STARTTLS + AUTH on the
submission port) and followed to where it lands: the MX found by DNS, the smart host, or
(for a bounce) the envelope sender's MX. Covers issue "Deliver": MX preference and
fallback, implicit and null MX, NXDOMAIN / SERVFAIL, smart host STARTTLS + AUTH and
failover, temporary then permanent failures, DSNs parsed with `email`, per-recipient
retries. Every wait polls for a condition under a deadline (no timed assertions).

The helpers here (`mx_overrides`, `submit`, `log_lines`, ...) are shared with
test_e2e_crash.py and test_e2e_queue.py.
"""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory, bare_line_ends
from relayproc import PASSWORD, RelayProcess, to_toml
from support.certs import server_tls_context
from support.ports import free_port

pytestmark = pytest.mark.slow

SENDER = "alice@sender.test"
SENDER_MX = "127.0.0.9"  # where bounces to SENDER land

ZONES: dict[str, Any] = {
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": [SENDER_MX]},
    # Preferences listed out of order: the relay must sort them (RFC 5321 5.1).
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "implicit.test": {"A": ["127.0.0.4"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "a.test": {"MX": [(10, "mx.a.test")]}, "mx.a.test": {"A": ["127.0.0.5"]},
    "b.test": {"MX": [(10, "mx.b.test")]}, "mx.b.test": {"A": ["127.0.0.6"]},
    "c.test": {"MX": [(10, "mx.c.test")]}, "mx.c.test": {"A": ["127.0.0.7"]},
}

BODY = (b"From: Alice <alice@sender.test>\r\n"
        b"To: Bob <bob@example.test>\r\n"
        b"Subject: end to end\r\n"
        b"Date: Tue, 25 Nov 2025 10:00:00 +0000\r\n"
        b"Message-ID: <e2e.1@sender.test>\r\n"
        b"\r\n"
        b"Hello Bob.\r\n"
        b".a line that starts with a dot\r\n"
        b"..two dots\r\n"
        b".\r\n"
        b"\r\n"
        b"end\r\n")

DEADLINE = 20.0


# --------------------------------------------------------------------------- helpers

def mx_overrides(dns: FakeDNSServer, port: int, **delivery: Any) -> dict[str, Any]:
    """Config for delivery by MX through the fake DNS to fake MX on `port`."""
    d: dict[str, Any] = {
        "port": port, "nameservers": [dns.nameserver], "retry": ["300ms"],
        "dns_timeout": "2s", "connect_timeout": "5s", "command_timeout": "10s",
        "data_timeout": "10s", "delay_warning": 0,
    }
    d.update(delivery)
    return {"relay": {"smart_host": []}, "delivery": d}


def submit(relay: RelayProcess, rcpts: list[str], body: bytes = BODY,
           sender: str = SENDER) -> str:
    """Submit on the submission port (STARTTLS + AUTH PLAIN); return the queue id."""
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20) as s:
        s.ehlo("laptop.test")
        s.starttls(context=relay.client_context())
        s.ehlo("laptop.test")
        s.login("alice", PASSWORD)
        code, msg = s.mail(sender)
        assert code == 250, (code, msg)
        for r in rcpts:
            code, msg = s.rcpt(r)
            assert code == 250, (r, code, msg)
        code, msg = s.data(body)
        assert code == 250, (code, msg)
    m = re.search(rb"queued as (\S+)", msg)
    assert m, msg
    return m.group(1).decode()


def split_received(content: bytes) -> tuple[bytes, bytes]:
    """(our Received header with its folded lines, the rest) of a delivered message."""
    assert content.startswith(b"Received: from "), content[:200]
    lines = content.split(b"\r\n")
    n = 1
    while lines[n][:1] in (b" ", b"\t"):
        n += 1
    head = b"\r\n".join(lines[:n]) + b"\r\n"
    return head, content[len(head):]


def assert_clean_wire(server: FakeSMTPServer) -> None:
    for i, w in enumerate(server.wire):
        assert bare_line_ends(w) == [], f"bare CR/LF on connection {i + 1}"


def delivered_to(server: FakeSMTPServer, rcpt: str) -> list[Any]:
    return [m for m in server.messages if rcpt in m.rcpt_tos]


def log_lines(relay: RelayProcess, qid: str) -> list[str]:
    return [ln for ln in relay.maillog().splitlines() if f" {qid}: " in ln]


def gone(relay: RelayProcess, qid: str) -> bool:
    return not (relay.queue_dir / qid).exists()


def assert_null_sender(server: FakeSMTPServer, m: Any) -> None:
    """A bounce: MAIL FROM:<> (aiosmtpd records the null path as "<>"), to the sender."""
    assert m.mail_from in ("", "<>") and m.rcpt_tos == [SENDER]
    assert re.search(rb"MAIL FROM:<>[ \r]", server.wire[m.connection - 1])


def parse_dsn(content: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    """(the DSN message, the per-recipient field groups of its delivery-status part).

    message/delivery-status (RFC 3464) or, for internationalized reports,
    message/global-delivery-status (RFC 6533: UTF-8 fields, which the email package
    does not split into groups, so they are split here from the raw bytes)."""
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert parts[0].get_content_type() == "text/plain"
    if parts[1].get_content_type() == "message/delivery-status":
        groups = parts[1].get_payload()  # [per-message fields, per-recipient fields...]
        return msg, groups[1:]
    assert parts[1].get_content_type() == "message/global-delivery-status"
    boundary = msg.get_boundary()
    assert boundary
    raw = content.split(b"--" + boundary.encode())[2]
    body = raw.split(b"\r\n\r\n", 1)[1].decode("utf-8")  # strict: valid UTF-8
    blocks = [b for b in body.split("\r\n\r\n") if b.strip()]
    return msg, [email.message_from_string(b + "\r\n") for b in blocks[1:]]


# --------------------------------------------------------------------------- swaks

@pytest.mark.external
def test_swaks_submission_reaches_mx_byte_for_byte(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path) -> None:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed (the test command installs it)")
    mx1 = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    data = tmp_path / "message.eml"
    data.write_bytes(BODY[:-2])  # swaks ends DATA with CRLF . CRLF itself
    r = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(relay.ports["submission"]),
         "--tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
         "--from", SENDER, "--to", "bob@example.test", "--data", str(data)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0" in r.stdout
    qid = re.search(r"queued as (\S+)", r.stdout).group(1)  # type: ignore[union-attr]

    relay.wait_for(lambda: mx1.messages, what="delivery to the MX")
    m = mx1.messages[0]
    assert (m.mail_from, m.rcpt_tos) == (SENDER, ["bob@example.test"])
    received, rest = split_received(m.content)
    assert rest == BODY  # byte for byte, apart from our trace header
    assert f"id {qid}".encode() in received and b"with ESMTPSA" in received
    assert b"by relay.test" in received
    assert m.helo == "relay.test"
    assert_clean_wire(mx1)
    relay.wait_for(lambda: gone(relay, qid), what="removal from the queue")
    sent = [ln for ln in log_lines(relay, qid) if "stat=Sent" in ln]
    assert len(sent) == 1 and "to=<bob@example.test>" in sent[0]
    assert f"[127.0.0.2]:{fake_mx.port}" in sent[0]
    assert PASSWORD not in relay.maillog()


# --------------------------------------------------------------------------- MX choice

def test_mx_preference_order(relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
                             sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2")
    mx2 = fake_mx("127.0.0.3")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qids = [submit(relay, ["bob@example.test"]) for _ in range(3)]
    for qid in qids:
        relay.wait_for(lambda q=qid: gone(relay, q), what=f"{qid} delivered")
    assert len(mx1.messages) == 3
    assert mx2.connections == 0  # the less preferred MX is never touched


@pytest.mark.parametrize("first", ["refuses", "down"])
def test_fallback_to_second_mx(relay_factory: Callable[..., RelayProcess],
                               dns: FakeDNSServer, sender_mx: FakeSMTPServer,
                               fake_mx: MXFactory, first: str) -> None:
    if first == "refuses":
        mx1 = fake_mx("127.0.0.2", greeting="421 4.3.2 mx1 is busy, go away")
    mx2 = fake_mx("127.0.0.3")  # with "down", nothing listens on 127.0.0.2
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery via the second MX")
    assert len(mx2.messages) == 1
    assert split_received(mx2.messages[0].content)[1] == BODY
    if first == "refuses":
        assert mx1.connections >= 1 and mx1.messages == []
    sent = [ln for ln in log_lines(relay, qid) if "stat=Sent" in ln]
    assert len(sent) == 1 and "[127.0.0.3]" in sent[0]


def test_implicit_mx(relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
                     sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    host = fake_mx("127.0.0.4")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["carol@implicit.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery to the implicit MX")
    assert host.messages[0].rcpt_tos == ["carol@implicit.test"]
    assert ("implicit.test", "MX") in dns.queries and ("implicit.test", "A") in dns.queries


@pytest.mark.parametrize(("rcpt", "status"), [("dave@nullmx.test", "5.1.10"),
                                              ("erin@nxdomain.test", "5.1.2")])
def test_unroutable_domain_bounces_to_sender(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, rcpt: str, status: str) -> None:
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, [rcpt])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce at the sender's MX")
    b = sender_mx.messages[0]
    assert_null_sender(sender_mx, b)
    msg, groups = parse_dsn(b.content)
    assert msg["To"] and SENDER in msg["To"]
    assert len(groups) == 1
    g = groups[0]
    assert g["Action"] == "failed"
    assert g["Status"] == status
    assert rcpt in g["Final-Recipient"]
    assert g["Diagnostic-Code"]
    original = msg.get_payload()[2]
    assert "Subject: end to end" in original.as_string()
    assert_clean_wire(sender_mx)
    relay.wait_for(lambda: gone(relay, qid), what="the original leaves the queue")
    assert any("stat=Bounced" in ln and f"dsn={status}" in ln for ln in log_lines(relay, qid))
    relay.wait_for(lambda: relay.queued() == [], what="the bounce leaves the queue")


def test_an_mx_that_is_this_relay_is_a_mail_loop(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """loop.test's MX names this relay's own smtp listener (127.0.0.1, the delivery port
    being that listener's): the relay used to connect to itself, its own listener refused
    to relay ("550 5.7.1 Relaying denied") and the sender got that misleading reason. Now
    the host is not connected to: bounced 554 5.4.6 "mail for loop.test loops back to
    myself" (Postfix's words), one host-failed line; a host on another loopback address
    at the same port is not taken for us (connection refused: deferred). As a backup MX
    (backup.test: its better MX refuses connections), the relay waits for the better
    host, as Postfix does: deferred, never bounced 5.4.6."""
    dns.set_zones({**ZONES, "loop.test": {"MX": [(10, "mx.loop.test")]},
                   "mx.loop.test": {"A": ["127.0.0.1"]},
                   "other.test": {"MX": [(10, "mx.other.test")]},
                   "mx.other.test": {"A": ["127.0.0.3"]},
                   "backup.test": {"MX": [(10, "mx.other.test"), (20, "mx.loop.test")]}})
    relay = relay_factory(mx_overrides(dns, fake_mx.port), start=False)
    relay.config_data["delivery"]["port"] = relay.ports["smtp"]
    relay.config.write_text(to_toml(relay.config_data))
    relay.start()
    qid = submit(relay, ["bob@loop.test", "carol@other.test", "dan@backup.test"])
    relay.wait_for(lambda: all(any(f"to=<{a}>" in ln for ln in log_lines(relay, qid))
                               for a in ("bob@loop.test", "carol@other.test",
                                         "dan@backup.test")),
                   what="the three outcomes")
    lines = log_lines(relay, qid)
    [bob] = [ln for ln in lines if "to=<bob@loop.test>" in ln]
    assert "dsn=5.4.6" in bob and "stat=Bounced" in bob
    assert "mail for loop.test loops back to myself" in bob
    [carol] = [ln for ln in lines if "to=<carol@other.test>" in ln][:1]
    assert "stat=Deferred" in carol and "connection refused" in carol
    [dan] = [ln for ln in lines if "to=<dan@backup.test>" in ln][:1]
    assert "stat=Deferred" in dan and "dsn=4.4.1" in dan
    assert "Relaying denied" not in relay.maillog()


def test_an_mx_at_the_unspecified_address_is_a_mail_loop(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        fake_mx: MXFactory) -> None:
    """zero.test's MX has the address 0.0.0.0 (what sinkholes and blocking resolvers
    answer): no host elsewhere, a connect() to it reaches this machine's loopback, here
    the relay's own smtp listener on 127.0.0.1. The loop check compared 0.0.0.0 with
    127.0.0.1 only, so the relay connected to itself and the sender's bounce said
    "550 5.7.1 Relaying denied". Now it is the loop it is: 554 5.4.6, no connection."""
    dns.set_zones({**ZONES, "zero.test": {"MX": [(10, "mx.zero.test")]},
                   "mx.zero.test": {"A": ["0.0.0.0"]}})
    relay = relay_factory(mx_overrides(dns, fake_mx.port), start=False)
    relay.config_data["delivery"]["port"] = relay.ports["smtp"]
    relay.config.write_text(to_toml(relay.config_data))
    relay.start()
    qid = submit(relay, ["bob@zero.test"])
    relay.wait_for(lambda: any("to=<bob@zero.test>" in ln for ln in log_lines(relay, qid)),
                   what="an outcome for bob@zero.test")
    [bob] = [ln for ln in log_lines(relay, qid) if "to=<bob@zero.test>" in ln][:1]
    assert "dsn=5.4.6" in bob and "mail for zero.test loops back to myself" in bob, bob
    assert "Relaying denied" not in relay.maillog()


def test_an_mx_beside_a_localhost_listener_is_not_a_loop(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer) -> None:
    """The smtp listener is `localhost:P` (bound to 127.0.0.1) and neighbour.test's MX is
    another server on 127.0.0.3:P (a content filter, a second MTA): not this relay, so the
    mail is delivered there. The loop check took every loopback address for a `localhost`
    listener: bounced 554 5.4.6 "loops back to myself" though nothing looped."""
    dns.set_zones({**ZONES, "neighbour.test": {"MX": [(10, "mx.neighbour.test")]},
                   "mx.neighbour.test": {"A": ["127.0.0.3"]}})
    relay = relay_factory(mx_overrides(dns, sender_mx.port), start=False)
    port = relay.ports["smtp"]
    for ln in relay.config_data["listen"]:
        if ln["mode"] == "smtp":
            ln["address"] = f"localhost:{port}"
    relay.config_data["delivery"]["port"] = port
    relay.config.write_text(to_toml(relay.config_data))
    neighbour = FakeSMTPServer("127.0.0.3", port, auth_required=False).start()
    try:
        relay.start()
        qid = submit(relay, ["bob@neighbour.test"])
        relay.wait_for(lambda: any("to=<bob@neighbour.test>" in ln
                                   for ln in log_lines(relay, qid)), what="an outcome")
        [line] = [ln for ln in log_lines(relay, qid) if "to=<bob@neighbour.test>" in ln][:1]
        assert "stat=Sent" in line and "loops back" not in line
        assert [m.rcpt_tos for m in neighbour.messages] == [["bob@neighbour.test"]]
    finally:
        neighbour.stop()


def test_an_mx_named_localhost_is_a_mail_loop(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """"MX 0 localhost." (the pre-RFC 7505 way to say "no mail") names this machine's
    loopback (RFC 6761 6.3), never the domain's mail host: the relay used to deliver there
    (here a resolver answering localhost with a listening address), or retry for days.
    Now the host is left out, as Postfix ("mail for D loops back to myself"): alone, the
    recipient bounces 554 5.4.6 at once; beside another MX, that one takes the mail."""
    mx = fake_mx("127.0.0.2")
    dns.set_zones({**ZONES, "lh.test": {"MX": [(0, "localhost.")]},
                   "mixed.test": {"MX": [(0, "localhost."), (10, "mx1.example.test")]},
                   "localhost": {"A": ["127.0.0.2"]}})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["ann@lh.test", "ben@mixed.test"])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [m.rcpt_tos for m in mx.messages] == [["ben@mixed.test"]]
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert [(g["Final-Recipient"], g["Status"]) for g in groups] == [
        ("rfc822; ann@lh.test", "5.4.6")]
    assert "loops back to myself" in groups[0]["Diagnostic-Code"]
    assert any("to=<ann@lh.test>" in ln and "dsn=5.4.6" in ln for ln in log_lines(relay, qid))


def test_servfail_deferred_then_delivered(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2")
    dns.update({"example.test": "SERVFAIL"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: any("stat=Deferred" in ln for ln in log_lines(relay, qid)),
                   what="a deferral")
    assert mx1.connections == 0 and not gone(relay, qid)
    dns.update({"example.test": ZONES["example.test"]})
    relay.wait_for(lambda: gone(relay, qid), what="delivery after the zone is fixed")
    assert len(mx1.messages) == 1
    assert sender_mx.messages == []  # a deferral sends no bounce
    lines = log_lines(relay, qid)
    assert any("stat=Sent" in ln and "tries=" in ln and "tries=1," not in ln for ln in lines)


# --------------------------------------------------------------------------- smart host

def smart_overrides(tmp_path: Path, hosts: list[str], ca_file: Path) -> dict[str, Any]:
    pw = tmp_path / "smarthost.pw"
    pw.write_text("s3cret pass\n")
    pw.chmod(0o600)
    return {
        "relay": {"smart_host": hosts, "smart_host_tls": "starttls",
                  "smart_host_user": "relayuser", "smart_host_password_file": str(pw),
                  "smart_host_ca_file": str(ca_file)},
        "delivery": {"retry": ["1s"], "connect_timeout": "5s", "command_timeout": "10s",
                     "data_timeout": "10s", "delay_warning": 0},
    }


def test_smart_host_starttls_auth(relay_factory: Callable[..., RelayProcess],
                                  dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: Any,
                                  trustme_ca_file: Path, tmp_path: Path) -> None:
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 require_starttls=True, users={"relayuser": "s3cret pass"})
    relay = relay_factory(smart_overrides(tmp_path, [sh.address], trustme_ca_file))
    qid = submit(relay, ["bob@example.test", "zed@far-away.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery to the smart host")
    assert len(sh.messages) == 1  # one transaction for both recipients
    m = sh.messages[0]
    assert m.tls and m.auth_user == "relayuser"
    assert m.rcpt_tos == ["bob@example.test", "zed@far-away.test"]
    assert split_received(m.content)[1] == BODY
    assert_clean_wire(sh)
    assert dns.queries == []  # a smart host means no MX lookups
    assert "s3cret" not in relay.maillog()
    assert len([ln for ln in log_lines(relay, qid) if "stat=Sent" in ln]) == 2


def test_smart_host_failover(relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
                             fake_mx: MXFactory, trustme_ca: Any, trustme_ca_file: Path,
                             tmp_path: Path) -> None:
    sh2 = fake_mx("127.0.0.3", starttls_context=server_tls_context(trustme_ca, "127.0.0.3"),
                  require_starttls=True, users={"relayuser": "s3cret pass"})
    down = f"127.0.0.2:{free_port('127.0.0.2')}"  # nothing listens there
    relay = relay_factory(smart_overrides(tmp_path, [down, sh2.address], trustme_ca_file))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery via the second smart host")
    assert len(sh2.messages) == 1 and sh2.messages[0].auth_user == "relayuser"
    sent = [ln for ln in log_lines(relay, qid) if "stat=Sent" in ln]
    assert len(sent) == 1 and "127.0.0.3" in sent[0]


def test_smart_host_name_resolved_through_the_configured_nameservers(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca: Any, trustme_ca_file: Path, tmp_path: Path) -> None:
    """A smart host named by a name only the loopback DNS server knows is found through
    `[delivery] nameservers` (not the system resolver), and its certificate is verified
    for that name; a name that does not resolve fails that host (4.4.3), the next one
    takes the mail."""
    dns.update({"smart.relay.test": {"A": ["127.0.0.8"]}})
    sh = fake_mx("127.0.0.8",
                 starttls_context=server_tls_context(trustme_ca, "smart.relay.test"),
                 require_starttls=True, users={"relayuser": "s3cret pass"})
    cfg = smart_overrides(tmp_path, [f"nosuch.relay.test:{sh.port}",
                                     f"smart.relay.test:{sh.port}"], trustme_ca_file)
    cfg["delivery"]["nameservers"] = [dns.nameserver]
    relay = relay_factory(cfg)
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery to the smart host by name")
    assert len(sh.messages) == 1 and sh.messages[0].tls
    lines = log_lines(relay, qid)
    sent = [ln for ln in lines if "stat=Sent" in ln]
    assert len(sent) == 1 and "relay=smart.relay.test [127.0.0.8]" in sent[0]
    assert any("cannot resolve the smart host nosuch.relay.test" in ln and "4.4.3" in ln
               for ln in lines), lines
    asked = {str(q[0]).rstrip(".").lower() for q in dns.queries}
    assert {"smart.relay.test", "nosuch.relay.test"} <= asked, dns.queries


# --------------------------------------------------------------------------- results

def test_temporary_failure_then_success(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2",
                  rcpt_replies={"bob@example.test": "451 4.7.1 greylisted, come back later"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: any("stat=Deferred" in ln for ln in log_lines(relay, qid)),
                   what="a deferral")
    deferred = [ln for ln in log_lines(relay, qid) if "stat=Deferred" in ln][0]
    assert "451 4.7.1 greylisted" in deferred and "dsn=4.7.1" in deferred
    mx1.rcpt_replies.clear()  # the greylisting period is over
    relay.wait_for(lambda: gone(relay, qid), what="delivery on retry")
    assert len(mx1.messages) == 1
    assert split_received(mx1.messages[0].content)[1] == BODY
    assert sender_mx.messages == []


def test_permanent_failure_dsn_to_sender_mx(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2",
                  rcpt_replies={"nobody@example.test": "550 5.1.1 no such user here"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["nobody@example.test", "bob@example.test"])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    # The good recipient got the mail once; the bad one is reported once.
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    assert len(sender_mx.messages) == 1
    b = sender_mx.messages[0]
    assert_null_sender(sender_mx, b)
    msg, groups = parse_dsn(b.content)
    assert msg["Auto-Submitted"] == "auto-replied"  # RFC 3834: no auto-reply to this
    assert [g["Action"] for g in groups] == ["failed"]
    g = groups[0]
    assert "nobody@example.test" in g["Final-Recipient"]
    assert g["Status"] == "5.1.1"
    assert "550" in g["Diagnostic-Code"] and "no such user here" in g["Diagnostic-Code"]
    assert g["Remote-MTA"] == "dns; mx1.example.test"
    assert "bob@example.test" not in msg.get_payload()[1].as_string()
    headers = msg.get_payload()[2].as_string()
    assert "Message-ID: <e2e.1@sender.test>" in headers
    assert_clean_wire(sender_mx)
    assert any("sender_non-delivery_notification=" in ln for ln in log_lines(relay, qid))


def test_null_sender_failure_bounces_nothing(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2", rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["nobody@example.test"], sender="")
    relay.wait_for(lambda: any("stat=Bounced" in ln for ln in log_lines(relay, qid)),
                   what="the permanent failure")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert not any("notification" in ln for ln in log_lines(relay, qid))
    assert mx1.messages == []
    # A second message proves the relay is still delivering after the no-bounce case,
    # so an unwanted bounce would have had time to reach the sender's MX.
    qid2 = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: gone(relay, qid2), what="the next message")
    assert sender_mx.messages == [] and sender_mx.connections == 0


def test_only_the_deferred_recipient_is_retried(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    a = fake_mx("127.0.0.5")
    b = fake_mx("127.0.0.6")
    c = fake_mx("127.0.0.7", rcpt_replies={"cat@c.test": "452 4.2.2 mailbox full, try later"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["ann@a.test", "ben@b.test", "cat@c.test"])

    def c_tries() -> int:
        return sum("to=<cat@c.test>" in ln and "stat=Deferred" in ln
                   for ln in log_lines(relay, qid))

    relay.wait_for(lambda: c_tries() >= 2, what="two deferrals for c.test")
    assert not gone(relay, qid)
    assert [m.rcpt_tos for m in a.messages] == [["ann@a.test"]]
    assert [m.rcpt_tos for m in b.messages] == [["ben@b.test"]]
    c.rcpt_replies.clear()
    relay.wait_for(lambda: gone(relay, qid), what="the retried recipient delivered")
    assert [m.rcpt_tos for m in c.messages] == [["cat@c.test"]]
    # a.test and b.test were never contacted again.
    assert (len(a.messages), a.connections, len(b.messages), b.connections) == (1, 1, 1, 1)
    lines = log_lines(relay, qid)
    assert sum("stat=Sent" in ln for ln in lines) == 3
    assert sum("to=<ann@a.test>" in ln for ln in lines) == 1
    assert sender_mx.messages == []


def test_queue_lifetime_expiry_bounces(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2", rcpt_replies={"bob@example.test": "451 4.3.0 still busy"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["500ms"],
                                       max_queue_lifetime="2s"))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce after the queue lifetime")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert mx1.messages == []
    assert_null_sender(sender_mx, sender_mx.messages[0])
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert [(g["Action"], g["Status"]) for g in groups] == [("failed", "4.3.0")]
    assert "451 4.3.0 still busy" in groups[0]["Diagnostic-Code"]
    lines = log_lines(relay, qid)
    assert sum("stat=Deferred" in ln for ln in lines) >= 1
    assert any("stat=Bounced" in ln and "expired" in ln for ln in lines)


def test_delay_warning_then_delivery(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2", rcpt_replies={"bob@example.test": "451 4.3.0 still busy"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["500ms"],
                                       delay_warning="1s"))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: sender_mx.messages, what="the delay warning")
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert [(g["Action"], g["Status"]) for g in groups] == [("delayed", "4.3.0")]
    assert groups[0]["Will-Retry-Until"]
    # Still retried after the warning; the warning is sent once.
    n = sum("stat=Deferred" in ln for ln in log_lines(relay, qid))
    relay.wait_for(lambda: sum("stat=Deferred" in ln for ln in log_lines(relay, qid)) >= n + 2,
                   what="more retries after the warning")
    mx1.rcpt_replies.clear()
    relay.wait_for(lambda: gone(relay, qid), what="delivery after the warning")
    assert len(mx1.messages) == 1
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert len(sender_mx.messages) == 1


def test_one_delay_warning_per_message_and_one_retry_transaction_per_domain(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """3 recipients at 2 domains, all deferred: one delay DSN names all three; the retry
    after the MXs recover sends a.test's two recipients in one transaction."""
    busy = "451 4.3.0 still busy"
    a = fake_mx("127.0.0.5", rcpt_replies={"ann@a.test": busy, "amy@a.test": busy})
    b = fake_mx("127.0.0.6", rcpt_replies={"ben@b.test": busy})
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["700ms"],
                                       delay_warning="1s"))
    qid = submit(relay, ["ann@a.test", "amy@a.test", "ben@b.test"])
    relay.wait_for(lambda: sender_mx.messages, what="the delay warning")
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert sorted(g["Final-Recipient"] for g in groups) == [
        "rfc822; amy@a.test", "rfc822; ann@a.test", "rfc822; ben@b.test"]
    assert {g["Action"] for g in groups} == {"delayed"}
    n = sum("stat=Deferred" in ln for ln in log_lines(relay, qid))
    relay.wait_for(lambda: sum("stat=Deferred" in ln for ln in log_lines(relay, qid)) >= n + 3,
                   what="a retry pass after the warning")
    a.rcpt_replies.clear()
    b.rcpt_replies.clear()
    relay.wait_for(lambda: gone(relay, qid), what="delivery on retry")
    assert [sorted(m.rcpt_tos) for m in a.messages] == [["amy@a.test", "ann@a.test"]]
    assert [m.rcpt_tos for m in b.messages] == [["ben@b.test"]]
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert len(sender_mx.messages) == 1  # the one warning, nothing more
    assert sum("sender_delay_notification" in ln for ln in log_lines(relay, qid)) == 1


def test_receiving_workers_hand_over_through_the_spool(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """workers = 2: receiving processes and the delivering parent share only the spool
    (and its notify socket); mail is still picked up at once and delivered."""
    mx1 = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"]), workers=2)
    qids = [submit(relay, ["bob@example.test"]) for _ in range(4)]
    for qid in qids:
        relay.wait_for(lambda q=qid: gone(relay, q), what=f"{qid} delivered")
    assert len(mx1.messages) == 4
    assert all(split_received(m.content)[1] == BODY for m in mx1.messages)


def submit_raw(relay: RelayProcess, rcpts: list[str], body: bytes,
               mail_options: list[str], sender: str = SENDER) -> str:
    """Like `submit`, with ESMTP MAIL parameters (BODY=8BITMIME, SMTPUTF8)."""
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20) as s:
        s.ehlo("laptop.test")
        s.starttls(context=relay.client_context())
        s.ehlo("laptop.test")
        s.login("alice", PASSWORD)
        code, msg = s.mail(sender, mail_options)
        assert code == 250, (code, msg)
        for r in rcpts:
            code, msg = s.rcpt(r)
            assert code == 250, (r, code, msg)
        code, msg = s.data(body)
        assert code == 250, (code, msg)
    return re.search(rb"queued as (\S+)", msg).group(1).decode()  # type: ignore[union-attr]


UTF8_BODY = ("From: José <jose@sender.test>\r\nTo: Zoë <zoë@example.test>\r\n"
             "Subject: =?utf-8?q?caf=C3=A9?=\r\nDate: Tue, 25 Nov 2025 10:00:00 +0000\r\n"
             "Message-ID: <e2e.utf8@sender.test>\r\n"
             "\r\nÇa va? ünïcödé body\r\n").encode()


def test_8bitmime_and_smtputf8_pass_through(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    q1 = submit_raw(relay, ["bob@example.test"], UTF8_BODY, ["BODY=8BITMIME"])
    q2 = submit_raw(relay, ["zoë@example.test"], UTF8_BODY, ["BODY=8BITMIME", "SMTPUTF8"])
    for q in (q1, q2):
        relay.wait_for(lambda q=q: gone(relay, q), what=f"{q} delivered")
    by_rcpt = {m.rcpt_tos[0]: m for m in mx1.messages}
    assert "BODY=8BITMIME" in by_rcpt["bob@example.test"].mail_options
    assert "SMTPUTF8" not in by_rcpt["bob@example.test"].mail_options
    utf8 = by_rcpt["zoë@example.test"]
    assert "SMTPUTF8" in utf8.mail_options
    assert split_received(utf8.content)[1] == UTF8_BODY


def test_one_idn_domain_in_any_spelling_is_one_destination(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """The route key was the domain lower-cased as written, so bücher.test and its A-label
    xn--bcher-kva.test were two destinations: two deliveries (two transactions, the
    message sent twice) and twice concurrency_per_domain's slots and two dead marks for
    one domain. Now one key (the A-label): one transaction, each address sent as written."""
    dns.update({"xn--bcher-kva.test": {"MX": [(10, "mx1.example.test")]}})
    mx1 = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    rcpts = ["bob@bücher.test", "carol@xn--bcher-kva.test", "dave@BÜCHER.test",
             "erin@XN--BCHER-KVA.test"]
    qid = submit_raw(relay, rcpts, UTF8_BODY, ["BODY=8BITMIME", "SMTPUTF8"])
    relay.wait_for(lambda: gone(relay, qid), what=f"{qid} delivered")
    assert [sorted(m.rcpt_tos) for m in mx1.messages] == [sorted(rcpts)]
    assert mx1.connections == 1


def test_a_domain_no_dns_name_stands_for_bounces_at_once(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """An SMTPUTF8 recipient's domain whose U-label IDNA refuses ("☃.test": a symbol) is
    taken at RCPT, yet no DNS name stands for it: it was deferred `4.4.3 ... DNS error:
    IDNA processing exception` at every retry until the queue's lifetime; now the first
    attempt bounces it 5.1.2, saying why."""
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"]))
    qid = submit_raw(relay, ["frank@\u2603.test"], UTF8_BODY, ["BODY=8BITMIME", "SMTPUTF8"])
    line = relay.wait_for(lambda: next(
        (ln for ln in log_lines(relay, qid) if "stat=" in ln), None),
        what="the delivery line")
    assert "dsn=5.1.2" in line and "stat=Bounced (550 5.1.2 Bad destination domain: " \
        "\u2603.test: invalid domain name (IDNA" in line, line
    relay.wait_for(lambda: sender_mx.messages, what="the bounce at the sender's MX")
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert [g["Status"] for g in groups] == ["5.1.2"]
    relay.wait_for(lambda: gone(relay, qid), what="the original leaves the queue")


ASCII_HEADER_UTF8_BODY = UTF8_BODY.replace("José <jose@".encode(), b"<jose@").replace(
    "Zoë <zoë@".encode(), b"<zoe@")


def test_utf8_address_to_peer_without_smtputf8_bounces(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2", smtputf8=False)
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit_raw(relay, ["zoë@example.test", "bob@example.test"],
                     ASCII_HEADER_UTF8_BODY, ["BODY=8BITMIME", "SMTPUTF8"])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    assert "SMTPUTF8" not in mx1.messages[0].mail_options
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert [(g["Action"], g["Status"]) for g in groups] == [("failed", "5.6.7")]
    bounce = sender_mx.messages[0]
    # RFC 6533: the utf-8 address type in a message/global-delivery-status part, and the
    # returned header section of the SMTPUTF8 message as message/global-headers.
    assert groups[0]["Final-Recipient"] == "utf-8; zoë@example.test"
    assert b"Content-Type: message/global-delivery-status\r\n" in bounce.content
    assert b"Content-Type: message/global-headers\r\n" in bounce.content
    assert "BODY=8BITMIME" in bounce.mail_options  # UTF-8 text in the DSN: 8bit
    assert any("stat=Bounced" in ln for ln in log_lines(relay, qid))


def _bounced_for_smtputf8(relay: RelayProcess, sender_mx: FakeSMTPServer, qid: str) -> None:
    """`qid` bounced 553 5.6.7 for want of SMTPUTF8: its DSN, its one Bounced line."""
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: gone(relay, qid), what="the original leaves the queue")
    _, groups = parse_dsn(sender_mx.messages[0].content)
    assert [(g["Action"], g["Status"]) for g in groups] == [("failed", "5.6.7")]
    lines = [ln for ln in log_lines(relay, qid) if "stat=" in ln]
    assert len(lines) == 1 and "dsn=5.6.7" in lines[0] and \
        "stat=Bounced (553 5.6.7 SMTPUTF8 is required, but was not offered by host" \
        in lines[0], lines


def test_utf8_header_to_peer_without_smtputf8_bounces(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """An SMTPUTF8 message whose addresses are ASCII but whose header section holds UTF-8
    (a display name) went to a next hop without SMTPUTF8 as 8-bit mail, which RFC 6531
    3.4 forbids (Postfix bounces it): now it bounces 553 5.6.7, one Bounced line per
    recipient, nothing sent; an ASCII header with a UTF-8 body still goes there."""
    mx1 = fake_mx("127.0.0.2", smtputf8=False)
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit_raw(relay, ["bob@example.test"], UTF8_BODY, ["BODY=8BITMIME", "SMTPUTF8"])
    _bounced_for_smtputf8(relay, sender_mx, qid)
    assert mx1.messages == []
    q2 = submit_raw(relay, ["bob@example.test"], ASCII_HEADER_UTF8_BODY,
                    ["BODY=8BITMIME", "SMTPUTF8"])
    relay.wait_for(lambda: gone(relay, q2), what=f"{q2} delivered")
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    assert "SMTPUTF8" not in mx1.messages[0].mail_options
    assert split_received(mx1.messages[0].content)[1] == ASCII_HEADER_UTF8_BODY
    assert len(sender_mx.messages) == 1


_MIXED = (b"From: <jose@sender.test>\r\nTo: <zoe@example.test>\r\nSubject: files\r\n"
          b"Date: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <e2e.parts@sender.test>\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
          b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Ça va?\r\n".encode()
          + b"--b1\r\n%s\r\n--b1--\r\n")
# A UTF-8 file name in a part's own header field (RFC 6532), the top level all ASCII.
UTF8_PART_HEADER = _MIXED % ("Content-Type: application/pdf\r\nContent-Disposition: "
                             "attachment; filename=\"résumé.pdf\"\r\n\r\nJVBERi0=".encode())
# The same UTF-8 inside an attached message/global: its content, not a header of ours.
UTF8_IN_GLOBAL = _MIXED % ("Content-Type: message/global\r\n"
                           "Content-Transfer-Encoding: 8bit\r\n\r\n"
                           "From: Zoë <zoe@example.test>\r\nSubject: é\r\n\r\nhi".encode())


def test_a_utf8_mime_part_header_to_a_peer_without_smtputf8_bounces(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """An SMTPUTF8 message whose own header section is ASCII but one of whose MIME body
    parts has a UTF-8 header field (a raw UTF-8 file name, RFC 6532) went to a next hop
    without SMTPUTF8 as 8-bit mail: only the top level was looked at, and 8BITMIME allows
    8-bit content, never a header (Postfix flags any such header line and bounces). Now
    it bounces 553 5.6.7 as a UTF-8 top-level header does; UTF-8 inside an attached
    message/global (content, RFC 6532 3.5) still goes as 8-bit mail."""
    mx1 = fake_mx("127.0.0.2", smtputf8=False)
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit_raw(relay, ["bob@example.test"], UTF8_PART_HEADER,
                     ["BODY=8BITMIME", "SMTPUTF8"])
    _bounced_for_smtputf8(relay, sender_mx, qid)
    assert mx1.messages == []
    q2 = submit_raw(relay, ["bob@example.test"], UTF8_IN_GLOBAL, ["BODY=8BITMIME", "SMTPUTF8"])
    relay.wait_for(lambda: gone(relay, q2), what=f"{q2} delivered")
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    assert "SMTPUTF8" not in mx1.messages[0].mail_options
    assert split_received(mx1.messages[0].content)[1] == UTF8_IN_GLOBAL
    assert len(sender_mx.messages) == 1


def test_broken_starttls_mx_gets_plain_text_on_the_retry(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """tls = may: the STARTTLS handshake fails, the message is deferred (4.7.5), and the
    next attempt to that MX goes in plain text (logged), instead of bouncing in 5 days."""
    dns.update({"example.test": {"MX": [(10, "mx1.example.test")]}})
    mx1 = fake_mx("127.0.0.2", broken_starttls=True)
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery on the retry")
    assert len(mx1.messages) == 1 and mx1.messages[0].tls is False
    assert mx1.starttls_attempts == 1
    lines = log_lines(relay, qid)
    assert any("stat=Deferred" in ln and "4.7.5" in ln for ln in lines), lines
    assert any("status=TLS handshake failed" in ln for ln in lines), lines
    assert any("tls=not used" in ln for ln in lines), lines
    assert any("stat=Sent" in ln for ln in lines), lines
    assert sender_mx.messages == []


def test_remote_reply_cannot_forge_our_tls_field(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """The MX's final reply says `tls=verified, policy=dane` (the fake accepts nothing
    verifiable: level may): the Sent line's `tls=` field is ours, and the documented
    `grep 'tls=verified'` on the maillog finds nothing (the remote's `tls=` is written
    `tls\\x3d` inside stat=; the rest of its text as it was)."""
    dns.update({"example.test": {"MX": [(10, "mx1.example.test")]}})
    fake_mx("127.0.0.2", data_reply="250 2.0.0 Ok tls=verified, policy=dane TLS=verified")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: gone(relay, qid), what="delivery")
    sent = [ln for ln in log_lines(relay, qid) if "stat=Sent" in ln]
    assert len(sent) == 1, sent
    assert re.search(r", tls=(none|untrusted), policy=may, stat=Sent \(250 2\.0\.0 Ok "
                     r"tls\\x3dverified, policy\\x3ddane TLS\\x3dverified\)$", sent[0]), sent
    found = subprocess.run(["grep", "-c", "-i", "tls=verified", str(relay.log)],
                           capture_output=True, text=True, timeout=30)
    assert found.stdout.strip() == "0", found.stdout
