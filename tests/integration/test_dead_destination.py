"""A dead destination is marked, as Postfix's queue manager does, against a real `serve`.

Mail for `dead.test`, whose only MX refuses connections, is queued while mail for
`example.test` (a fake MX) flows. The first delivery to dead.test that reaches no host
marks it: every other message for it is deferred at once with `delivery temporarily
suspended: <the connect failure>` instead of paying its own connection attempt (a
blackhole's connect timeout each, `concurrency_per_domain` at a time, while the
messages fill the active set). `queue flush` forgets the mark (postqueue -f): the
destination is tried again, found dead again by the first deliveries (not by each
message), and once an MX listens there every message is delivered.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import RelayProcess, to_toml
from test_e2e_delivery import ZONES, delivered_to, gone, log_lines, mx_overrides, submit

pytestmark = pytest.mark.slow

DEAD_MX = "127.0.0.12"  # nothing listens there: connection refused
BLACKHOLE = "127.0.0.13"


def test_dead_destination_is_marked_and_its_mail_deferred_without_connecting(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    dns.set_zones({**ZONES, "dead.test": {"MX": [(10, "mx.dead.test")]},
                   "mx.dead.test": {"A": [DEAD_MX]}})
    live = fake_mx("127.0.0.2")
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"],
                                       concurrency_per_domain=2))
    dead = [submit(relay, [f"user{i}@dead.test"]) for i in range(12)]
    fresh = submit(relay, ["bob@example.test"])
    for q in dead:
        relay.wait_for(lambda q=q: any("stat=Deferred" in ln for ln in log_lines(relay, q)),
                       what=f"{q} deferred")
    relay.wait_for(lambda: gone(relay, fresh), what="mail to a live destination delivered")
    assert delivered_to(live, "bob@example.test")

    log = relay.maillog()
    tried = [ln for ln in log.splitlines()
             if "status=host failed" in ln and f"{DEAD_MX}]" in ln]
    # Only the deliveries that started before the first failure came back connected.
    assert 1 <= len(tried) <= 2, tried
    suspended = [q for q in dead if any(
        "stat=Deferred (451 4.4.1 delivery temporarily suspended: connect to" in ln
        for ln in log_lines(relay, q))]
    assert len(suspended) >= len(dead) - 2, log

    # A flush of everything while it is still dead: the mark is forgotten, the first
    # deliveries find it dead again and the rest are suspended, not each tried.
    relay.cli("queue", "flush")
    for q in dead:
        relay.wait_for(lambda q=q: sum("stat=Deferred" in ln for ln in log_lines(relay, q))
                       >= 2, what=f"{q} deferred again after the flush")
    again = [ln for ln in relay.maillog().splitlines()
             if "status=host failed" in ln and f"{DEAD_MX}]" in ln]
    assert 1 <= len(again) - len(tried) <= 2, again[len(tried):]

    # A message flushed by id is tried at once, dead mark or not.
    relay.cli("queue", "flush", dead[0])
    relay.wait_for(lambda: sum("status=host failed" in ln for ln in log_lines(relay, dead[0]))
                   > sum("status=host failed" in ln for ln in again if f" {dead[0]}: " in ln),
                   what="the named message tried")

    # The destination comes back; a flush of everything tries it again at once.
    back = fake_mx(DEAD_MX)
    relay.cli("queue", "flush")
    for q in dead:
        relay.wait_for(lambda q=q: gone(relay, q), what=f"{q} delivered after the flush")
    assert sorted(r for m in back.messages for r in m.rcpt_tos) == \
        sorted(f"user{i}@dead.test" for i in range(12))
    assert sender_mx.messages == []  # deferred, never bounced


def _reload_with_smart_host(r: RelayProcess, address: str) -> None:
    """The relay's config now names `address` as its smart host: SIGHUP, reloaded."""
    data = dict(r.config_data)
    data["relay"] = {**data["relay"], "smart_host": [address]}
    r.config.write_text(to_toml(data))
    before = r.maillog().count("daemon=reloaded")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") > before, what="reloaded")


def test_a_reload_with_new_routes_forgets_the_dead_marks(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory) -> None:
    """The smart host was wrong (nothing listens there): the first delivery marks the
    destination dead. The admin fixes [relay] smart_host and reloads: the next message
    goes to the new smart host at once. The mark described the old routes; kept, it
    deferred every message for up to 5 minutes more with 'delivery temporarily
    suspended: connect to <the old host>', each for its first retry interval (1 h here),
    after the fix (Postfix's reload restarts its queue manager, forgetting them too)."""
    live = fake_mx("127.0.0.2")
    r = relay_factory({"relay": {"smart_host": [f"{DEAD_MX}:{fake_mx.port}"],
                                 "smart_host_tls": "none"},
                       "delivery": {"retry": ["1h"]}})
    first = submit(r, ["bob@remote.example"])
    r.wait_for(lambda: any("stat=Deferred" in ln for ln in log_lines(r, first)),
               what="the first message deferred")
    marked = submit(r, ["carol@remote.example"])
    r.wait_for(lambda: any("stat=Deferred" in ln for ln in log_lines(r, marked)),
               what="the second message deferred")
    assert any("delivery temporarily suspended" in ln for ln in log_lines(r, marked))

    _reload_with_smart_host(r, live.address)

    after = submit(r, ["dave@remote.example"])
    outcome = r.wait_for(lambda: [ln for ln in log_lines(r, after)
                                  if "stat=Sent" in ln or "stat=Deferred" in ln],
                         what="the message after the reload tried")
    assert "stat=Sent" in outcome[0], outcome
    assert delivered_to(live, "dave@remote.example")


def _syn_sent_to(addr: str, port: int) -> int:
    """Connections to addr:port still waiting for their handshake (ss(8))."""
    out = subprocess.run(["ss", "-Htn", "state", "syn-sent", "dst", f"{addr}:{port}"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.splitlines())


def test_a_delivery_on_the_old_routes_ending_after_the_reload_marks_nothing(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory) -> None:
    """As above, but the old smart host is a blackhole (connections time out): a delivery
    to it was under way when the admin reloaded. Its connect timeout, coming after the
    reload, judged the old routes: it marked the destination dead again, so the next
    message was 'delivery temporarily suspended' for an hour after the fix."""
    live = fake_mx("127.0.0.2")
    # A blackhole on loopback: a listener whose accept queue is full drops new SYNs.
    hole = socket.socket()
    hole.bind((BLACKHOLE, 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex((BLACKHOLE, port))
            fillers.append(f)
        r = relay_factory({"relay": {"smart_host": [f"{BLACKHOLE}:{port}"],
                                     "smart_host_tls": "none"},
                           "delivery": {"retry": ["1h"], "connect_timeout": "8s"}})
        waiting = _syn_sent_to(BLACKHOLE, port)
        first = submit(r, ["bob@remote.example"])
        r.wait_for(lambda: _syn_sent_to(BLACKHOLE, port) > waiting,
                   what="the delivery connecting to the blackhole")

        _reload_with_smart_host(r, live.address)
        r.wait_for(lambda: any("stat=Deferred" in ln and "timed out" in ln
                               for ln in log_lines(r, first)),
                   what="the old delivery timed out")

        after = submit(r, ["dave@remote.example"])
        outcome = r.wait_for(lambda: [ln for ln in log_lines(r, after)
                                      if "stat=Sent" in ln or "stat=Deferred" in ln],
                             what="the message after the reload tried")
        assert "stat=Sent" in outcome[0], outcome
    finally:
        for f in fillers:
            f.close()
        hole.close()


BUSY_MX = "127.0.0.14"


def _submit_deferred(relay: RelayProcess, domain: str, n: int = 3) -> list[str]:
    """n messages to user0..user{n-1}@domain, one at a time, each once deferred."""
    queued = []
    for i in range(n):
        q = submit(relay, [f"user{i}@{domain}"])
        relay.wait_for(lambda q=q: any("stat=Deferred" in ln for ln in log_lines(relay, q)),
                       what=f"{q} deferred")
        queued.append(q)
    return queued


@pytest.mark.parametrize("busy", [
    {"greeting": "421 4.3.2 busy, try later"},
    {"mail_reply": "451 4.3.0 try later"},
    {"rcpt_replies": {f"user{i}@busy.test": "451 4.2.0 mailbox busy" for i in range(3)}},
], ids=["421-greeting", "451-mail", "451-rcpt"])
def test_a_destination_whose_primary_answered_is_not_marked_dead(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        fake_mx: MXFactory, busy: dict[str, object]) -> None:
    """The primary MX answers (421 to the greeting, 4xx to MAIL or RCPT), the backup
    refuses connections. A host answered: the destination is not dead (Postfix marks
    it only when it could not talk to any of its hosts). The courier kept the backup's
    'connect to ...: Connection refused' (4.4.1) as every recipient's reason, so the
    scheduler marked it and held the other messages back unattempted."""
    dns.set_zones({**ZONES, "busy.test": {"MX": [(10, "mx1.busy.test"),
                                                  (20, "mx2.busy.test")]},
                   "mx1.busy.test": {"A": [BUSY_MX]}, "mx2.busy.test": {"A": [DEAD_MX]}})
    primary = fake_mx(BUSY_MX, **busy)
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"],
                                       concurrency_per_domain=1))
    queued = _submit_deferred(relay, "busy.test")
    log = relay.maillog()
    assert "delivery temporarily suspended" not in log, log
    # each message tried at the primary: a connection each (421), or a transaction each
    # (the connection is cached between messages)
    tries = primary.connections if "greeting" in busy else \
        sum(w.count(b"MAIL FROM:") for w in primary.wire)
    assert tries >= 3, log
    for q in queued:  # the answering host's reply is the reason, not the backup's
        deferred = [ln for ln in log_lines(relay, q) if "stat=Deferred" in ln]
        assert f"[{BUSY_MX}]" in deferred[0] and " 4.4.1 " not in deferred[0], deferred
        assert any("status=host failed" in ln and f"{DEAD_MX}]" in ln
                   for ln in log_lines(relay, q)), log_lines(relay, q)


@pytest.mark.parametrize("busy", [
    {"greeting": "421 4.4.1 no answer from the next hop, try later"},
    {"rcpt_replies": {f"user{i}@busy.test": "451 4.4.1 no answer from the next hop"
                      for i in range(3)}},
], ids=["421-greeting", "451-rcpt"])
def test_a_next_hop_replying_4_4_1_is_not_marked_dead(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        fake_mx: MXFactory, busy: dict[str, object]) -> None:
    """The only MX answers with RFC 3463 4.4.1 itself (a relay whose own next hop does
    not answer). It answered: not dead. The scheduler took any 4.4.1 for its courier's
    connect failure, so it marked the destination (a smart host: all mail) and held its
    other messages back unattempted."""
    dns.set_zones({**ZONES, "busy.test": {"MX": [(10, "mx1.busy.test")]},
                   "mx1.busy.test": {"A": [BUSY_MX]}})
    primary = fake_mx(BUSY_MX, **busy)
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"],
                                       concurrency_per_domain=1))
    for q in _submit_deferred(relay, "busy.test"):
        deferred = [ln for ln in log_lines(relay, q) if "stat=Deferred" in ln]
        assert "no answer from the next hop" in deferred[0], deferred
    log = relay.maillog()
    assert "delivery temporarily suspended" not in log, log
    tries = primary.connections if "greeting" in busy else \
        sum(w.count(b"MAIL FROM:") for w in primary.wire)
    assert tries >= 3, log


@pytest.mark.parametrize("other", ["refuses", "answers-421"])
@pytest.mark.parametrize("unresolved", ["primary", "backup"])
def test_an_mx_name_that_does_not_resolve_is_not_a_host_that_answered(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        fake_mx: MXFactory, unresolved: str, other: str) -> None:
    """One MX name's address lookup fails (SERVFAIL, 4.4.3); the other MX host refuses
    the connection, or answers 421. Postfix (smtp_addr.c smtp_addr_list: 'as long as we
    are able to look up any host address, we ignore problems with DNS lookups'; then
    smtp_connect.c's left-over recipients go through smtp_sess_fail, which sets the
    request's hop_status, and qmgr_deliver.c throttles the queue: 'delivery temporarily
    suspended') marks the destination dead when every host it could look up was tried
    and none answered: so does authrelay, naming the refusal; a host that answered keeps
    it alive, whatever the other name's lookup said. The name never tried is one
    'host failed' line per attempt (4.4.3), as every host that failed is: it was not."""
    names = {"primary": "mx1.half.test", "backup": "mx2.half.test"}
    live = "mx2.half.test" if unresolved == "primary" else "mx1.half.test"
    dns.set_zones({**ZONES, "half.test": {"MX": [(10, "mx1.half.test"),
                                                  (20, "mx2.half.test")]},
                   names[unresolved]: "SERVFAIL",
                   live: {"A": [BUSY_MX if other == "answers-421" else DEAD_MX]}})
    if other == "answers-421":
        fake_mx(BUSY_MX, greeting="421 4.3.2 busy, try later")
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"],
                                       concurrency_per_domain=1))
    queued = _submit_deferred(relay, "half.test")
    first = [ln for ln in log_lines(relay, queued[0]) if "stat=Deferred" in ln][0]
    skipped = [ln for ln in log_lines(relay, queued[0]) if "status=host failed" in ln
               and f"relay={names[unresolved]}," in ln]
    assert len(skipped) == 1 and "451 4.4.3 DNS lookup failed for mail host " \
        f"{names[unresolved]} of half.test" in skipped[0], log_lines(relay, queued[0])
    later = [[ln for ln in log_lines(relay, q) if "stat=Deferred" in ln][0]
             for q in queued[1:]]
    if other == "refuses":
        assert "451 4.4.1 connect to " in first and f"[{DEAD_MX}]" in first, first
        assert all("delivery temporarily suspended: connect to" in ln for ln in later), later
    else:
        assert "421 4.3.2 busy" in first, first
        assert not any("suspended" in ln for ln in later), later
        assert all("421 4.3.2 busy" in ln for ln in later), later
