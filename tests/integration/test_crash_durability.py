"""The durability contract end to end, kill -9 of a real `authrelay serve` (2 workers).

The reduced, deterministic form of the torture run (many clients, random kills, 20+
rounds: see docs/PERFORMANCE.md's session notes): messages of every size class (1 KiB,
100 KiB past the in-memory part, 2 MB), over 587 (STARTTLS + AUTH), 465 and 25 to a local
domain, one DKIM-signed, each acknowledged with 250; the next hop holds its reply to a
final dot, so a delivery is in flight when the master is killed. Then: every process
gone, a restart, and every acknowledged message delivered (twice only when the maillog
announced it), no unready file, `from=` before every delivery line of its message.
A worker killed while a client is in DATA: its unready queue file is never delivered
and is gone after the next start.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import threading
from collections.abc import Callable

import pytest
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import PASSWORD, RelayProcess, children, processes_running

pytestmark = pytest.mark.slow

SIGNED = "signed.test"


def message(n: int, size: int, from_domain: str = "plain.test") -> bytes:
    head = (f"From: alice@{from_domain}\r\nTo: bob@example.test\r\n"
            f"Subject: durability {n}\r\nX-Number: {n}\r\n\r\n").encode()
    line = f"{n:04d} {'x' * 70}\r\n".encode()
    return head + line * (size // len(line) + 1)


def send(relay: RelayProcess, listener: str, body: bytes, rcpt: str) -> str:
    """One message on `listener` (submission: STARTTLS + AUTH; submissions: implicit TLS
    + AUTH; smtp: plain, to a local domain); the queue id of its 250."""
    port = relay.ports[listener]
    ctx = relay.client_context()
    s: smtplib.SMTP = (smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30)
                       if listener == "submissions" else smtplib.SMTP("127.0.0.1", port,
                                                                     timeout=30))
    with s:
        s.ehlo("laptop.test")
        if listener == "submission":
            s.starttls(context=ctx)
            s.ehlo("laptop.test")
        if listener != "smtp":
            s.login("alice", PASSWORD)
        assert s.mail("sender@laptop.test")[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        code, reply = s.data(body)
        assert code == 250, (code, reply)
    m = re.search(rb"queued as (\w+)", reply)
    assert m is not None, reply
    return m.group(1).decode()


def relayed_ids(hop: FakeSMTPServer) -> list[str]:
    """The queue id of each message the next hop accepted (from our Received: field)."""
    out = []
    for m in hop.messages:
        found = re.search(rb"by relay\.test[^;]*?id (\w+)", m.content)
        assert found is not None, m.content[:300]
        out.append(found.group(1).decode())
    return out


def assert_log_order(log: str, qids: list[str]) -> None:
    """Each message's from= line before every delivery line of it; every line about a
    message starts with its queue id."""
    lines = log.splitlines()
    for qid in qids:
        about = [ln for ln in lines if qid in ln]
        assert about and all(f"]: {qid}: " in ln for ln in about), about
        keys = [ln.split(f"{qid}: ", 1)[1].split("=", 1)[0] for ln in about]
        assert "from" in keys, about
        assert "to" not in keys[:keys.index("from")], about


def make_relay(relay_factory: Callable[..., RelayProcess],
               hop: FakeSMTPServer) -> RelayProcess:
    relay = relay_factory({
        "relay": {"smart_host": [f"{hop.host}:{hop.port}"], "smart_host_tls": "none"},
        "delivery": {"retry": ["300ms"]}, "dkim": {"sign_unowned": True},
        "limits": {"queue_min_free": 0},
    }, workers=2, start=False)
    relay.cli("dkim", "keygen", SIGNED)
    return relay.start()


def test_kill9_of_the_master_with_a_delivery_in_flight_loses_nothing_acknowledged(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory) -> None:
    gate = threading.Event()
    hop = fake_mx("127.0.0.2", data_gate=gate)
    relay = make_relay(relay_factory, hop)
    assert relay.proc is not None
    sent = [
        send(relay, "submission", message(1, 1024, SIGNED), "r1@example.test"),
        send(relay, "submissions", message(2, 100 * 1024), "r2@example.test"),
        send(relay, "smtp", message(3, 1024), "bob@local.test"),
        send(relay, "submission", message(4, 2 * 1024 * 1024), "r4@example.test"),
    ]
    relay.wait_for(lambda: hop.gated >= 1, what="a final dot held at the next hop")
    workers = children(relay.proc.pid)
    assert len(workers) == 2
    relay.kill(signal.SIGKILL)
    relay.wait_for(lambda: processes_running(relay.config) == [],
                   what="the workers gone with their master")

    gate.set()
    relay.start()
    relay.wait_for(lambda: relay.queued() == [], what="every message delivered")
    relay.stop()
    assert processes_running(relay.config) == []
    assert relay.unready() == []

    got = relayed_ids(hop)
    log = relay.maillog()
    assert sorted(set(got)) == sorted(sent)  # every acknowledged one, nothing else
    for qid in set(got):
        if got.count(qid) > 1:  # delivered again after the crash: announced
            assert re.search(rf"{qid}: warning=delivery to <[^>]+> was in progress", log)
    assert got.count(sent[0]) and b"DKIM-Signature:" in next(
        m.content for m, q in zip(hop.messages, got, strict=True) if q == sent[0])
    assert_log_order(log, sent)


def test_kill9_of_a_worker_in_data_stores_nothing(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory) -> None:
    hop = fake_mx("127.0.0.2")
    relay = make_relay(relay_factory, hop)
    assert relay.proc is not None
    first = send(relay, "submission", message(1, 1024), "r1@example.test")
    relay.wait_for(lambda: relayed_ids(hop) == [first], what="the first message relayed")

    s = smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=30)
    s.ehlo("laptop.test")
    s.starttls(context=relay.client_context())
    s.ehlo("laptop.test")
    s.login("alice", PASSWORD)
    assert s.mail("sender@laptop.test")[0] == 250
    assert s.rcpt("r2@example.test")[0] == 250
    assert s.docmd("DATA")[0] == 354
    assert isinstance(s.sock, ssl.SSLSocket)
    s.sock.sendall(message(2, 300 * 1024)[:200 * 1024])  # no final dot
    # the authenticated client's queue file is made (unready) while the message arrives
    relay.wait_for(lambda: len(relay.unready()) == 1, what="the early queue file")
    # the worker serving it: the one that logged this session's auth= line last
    pid = int(re.findall(r"authrelay\[(\d+)\]: NOQUEUE: auth=ok", relay.maillog())[-1])
    assert pid in children(relay.proc.pid)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        s.sock.sendall(b"rest\r\n.\r\n")
        s.getreply()
    s.close()

    # a master restart (kill -9 too) removes it; nothing of it is ever delivered
    relay.kill(signal.SIGKILL)
    relay.wait_for(lambda: processes_running(relay.config) == [], what="all gone")
    relay.start()
    relay.wait_for(lambda: relay.unready() == [], what="the unready file removed")
    assert relay.queued() == []
    third = send(relay, "submissions", message(3, 1024), "r3@example.test")
    relay.wait_for(lambda: len(hop.messages) == 2, what="the third message relayed")
    relay.stop()
    assert relayed_ids(hop) == [first, third]
    assert processes_running(relay.config) == []

