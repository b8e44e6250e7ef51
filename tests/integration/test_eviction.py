"""Pool eviction (issue 17) against a real authrelay process, real sockets and TLS.

A listener's pool filled by connections that have done nothing (465: never handshaking;
25: greeted, then silent) makes room for a fresh client by evicting one of them, while an
authenticated session and a session inside a transaction, present all along, survive
and finish their work. Flood clients come from distinct loopback addresses (127.0.7.x);
the legitimate ones from others (127.0.8.x).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import selectors
import signal
import smtplib
import socket
import threading
import time

import pytest
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, client_ctx, plain
from support.procfs import sockets_of
from support.wait import wait_until

from authrelay.smtpd.eviction import TIE_AGE
from authrelay.smtpd.proxy import build_v1

pytestmark = pytest.mark.slow

LIMITS = {"connection_rate_per_ip": 0, "max_connections_per_ip": 50,
          "max_pending_per_ip": 2}


def _relay(relay_factory, modes: tuple[str, ...] = ("submissions", "smtp"),  # noqa: ANN001
           workers: int = 1, pool: int = 6, **limits: object) -> RelayProcess:
    """A relay whose listeners in `modes` have pools of `pool` (six)."""
    r: RelayProcess = relay_factory({"limits": {**LIMITS, **limits}}, workers=workers,
                                    start=False)
    for item in r.config_data["listen"]:
        if item["mode"] in modes:
            item["max_connections"] = pool
    r.config.write_text(to_toml(r.config_data))
    return r.start()


def _connect(port: int, src: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(src, 0))


def _into_starttls(s: socket.socket) -> None:
    """Greeting, EHLO and STARTTLS's 220 on `s`; then the client says nothing more."""
    f = s.makefile("rb")
    assert f.readline().startswith(b"220 ")
    s.sendall(b"EHLO stall.test\r\n")
    while f.readline()[3:4] != b" ":
        pass
    s.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220 ")


def _closed_by_server(s: socket.socket) -> bytes | None:
    """What the server sent before closing (b"" for nothing), or None if still open."""
    if not select.select([s], [], [], 0)[0]:
        return None
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got
            got += chunk
            if not select.select([s], [], [], 0.5)[0]:
                return None if b"421" not in got else got
    except OSError:  # reset: an evicted handshake is aborted
        return got


def _login465(r: RelayProcess, src: str) -> RawClient:
    c = RawClient(r.ports["submissions"], tls=client_ctx(), source=src, timeout=30)
    assert c.reply().code == 220
    assert c.cmd("EHLO legit.test").code == 250
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
    return c


def _send(c: RawClient, rcpt: str = "bob@example.net") -> None:
    assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
    assert c.cmd("DATA").code == 354
    r = c.cmd("Subject: t\r\n\r\nhello\r\n.")
    assert r.code == 250, r


def test_full_465_pool_evicts_handshakes_not_authenticated(relay_factory) -> None:  # noqa: ANN001
    r = _relay(relay_factory)
    port = r.ports["submissions"]
    authed = _login465(r, "127.0.8.1")  # authenticated, then idle: never evicted
    mid = _login465(r, "127.0.8.2")  # authenticated, inside a transaction
    assert mid.cmd("MAIL FROM:<alice@local.test>").code == 250
    # 2 addresses x 15 raw connections that never start TLS: at most 2 each are admitted
    # (max_pending_per_ip), and the pool (6, two of them ours) is full.
    flood = [_connect(port, f"127.0.7.{i % 2 + 1}") for i in range(30)]
    try:
        t0 = time.monotonic()
        fresh = _login465(r, "127.0.8.3")  # makes room by evicting a handshake
        _send(fresh)
        fresh.cmd("QUIT")
        fresh.close()
        took = time.monotonic() - t0
        assert took < 5, took
        # The two old sessions were not touched and still work.
        assert authed.cmd("NOOP").code == 250
        _send(authed)
        assert mid.cmd("RCPT TO:<bob@example.net>").code == 250
        assert mid.cmd("DATA").code == 354
        assert mid.cmd("Subject: t\r\n\r\nhello\r\n.").code == 250
        # Flood connections were closed without a byte (no 421 in clear on 465).
        ends = [_closed_by_server(s) for s in flood]
        closed = [e for e in ends if e is not None]
        assert closed and all(e == b"" for e in closed), ends
        log = r.maillog(settle=1.5)
        assert re.search(r"reject=421 4\.7\.0 Too many connections from your address in "
                         r"handshake, relay=unknown \[127\.0\.7\.\d+\], stage=connect, "
                         r"listener=submissions:.*reason=pending_ip", log), log[-3000:]
        assert re.search(r"warning=pool full: evicted \d+ pre-authentication connections "
                         r"\(\d+ in handshake, 0 idle before AUTH\), "
                         r"listener=submissions:.*busiest=127\.0\.7\.\d+, busiest_evicted=\d+",
                         log), \
            log[-3000:]
        # Evictions leave no tls_failed line each (the summary says it).
        assert "tls_failed=from unknown [127.0.7." not in log
        assert "Traceback" not in log
    finally:
        for s in flood:
            s.close()
        authed.close()
        mid.close()


def test_full_smtp_pool_evicts_idle_sessions_not_transactions(relay_factory
                                                              ) -> None:  # noqa: ANN001
    r = _relay(relay_factory)
    port = r.ports["smtp"]
    txn = RawClient(port, source="127.0.8.4", timeout=30)  # inside a transaction: kept
    assert txn.reply().code == 220
    assert txn.cmd("EHLO mx.test").code == 250
    assert txn.cmd("MAIL FROM:<a@remote.test>").code == 250
    assert txn.cmd("RCPT TO:<x@local.test>").code == 250
    flood, greetings = [], []
    for i in range(12):  # greeted and silent: idle before AUTH, outside a transaction
        s = _connect(port, f"127.0.7.{i % 3 + 1}")
        flood.append(s)
        s.settimeout(10)
        greetings.append(s.recv(200)[:3])
    try:
        # The pool (6, one is ours) takes 5; then the three addresses hold 2, 2, 1 and
        # none may evict another's (that would not even them out): refused at once.
        assert greetings.count(b"220") == 5 and b"421" in greetings, greetings
        with RawClient(port, source="127.0.8.5", timeout=30) as c:  # a fresh MTA
            assert c.reply().code == 220
            assert c.cmd("EHLO fresh.test").code == 250
            assert c.cmd("MAIL FROM:<b@remote.test>").code == 250
            assert c.cmd("RCPT TO:<y@local.test>").code == 250
            assert c.cmd("DATA").code == 354
            assert c.cmd("Subject: t\r\n\r\nhi\r\n.").code == 250
        assert txn.cmd("DATA").code == 354
        assert txn.cmd("Subject: t\r\n\r\nhi\r\n.").code == 250
        ends = [_closed_by_server(s) for s in flood]
        evicted = [e for e in ends if e and b"421 4.7.0 Too many connections, closing an " \
                   b"idle unauthenticated one" in e]
        assert evicted, ends
        log = r.maillog(settle=1.5)
        assert re.search(r"warning=pool full: evicted \d+ pre-authentication connections "
                         r"\(0 in handshake, \d+ idle before AUTH\), listener=smtp:", log), \
            log[-3000:]
        assert "Traceback" not in log
    finally:
        for s in flood:
            s.close()
        txn.close()


def test_a_session_evicted_in_its_starttls_handshake_ends_at_once(relay_factory
                                                                 ) -> None:  # noqa: ANN001
    """587 flooders that send STARTTLS and never a ClientHello are idle before AUTH
    (session.py: evictable in the handshake). A fresh client evicts one: its socket is
    closed and its slot freed at once; the session itself must end too. Under uvloop the
    handshake did not notice its transport aborted: the session lived on, slot already
    released, until tls_handshake_timeout (here 10 min), and its maillog line was a
    "421 4.4.2 Timeout exceeded" then, not its end now."""
    r = _relay(relay_factory, ("submission",), tls_handshake_timeout="10m")
    port = r.ports["submission"]
    flood = []
    try:
        for i in range(6):  # three addresses, two each: the pool is full
            flood.append(_connect(port, f"127.0.7.{i % 3 + 1}"))
            _into_starttls(flood[-1])
        with RawClient(port, source="127.0.8.7", timeout=30) as c:  # evicts one of them
            assert c.reply().code == 220
            assert c.cmd("EHLO legit.test").code == 250
            assert c.cmd("STARTTLS").code == 220
            c.starttls(client_ctx())
            assert c.cmd("EHLO legit.test").code == 250
            assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
            c.cmd("QUIT")
        evicted = [s for s in flood if _closed_by_server(s) is not None]
        assert evicted, "no flooder was evicted"
        # Every evicted session has ended (its disconnect line), long before the handshake
        # timeout, and none of them timed out.
        wait_until(lambda: r.maillog().count("disconnect=from unknown [127.0.7.") >= len(evicted),
                   lambda: f"{len(evicted)} evicted sessions to end: {r.maillog()[-2000:]}")
        log = r.maillog()
        assert "reject=421 4.4.2" not in log, log[-2000:]
        assert "Traceback" not in log
    finally:
        for s in flood:
            s.close()


def test_starttls_handshake_in_stress_mode_gets_the_short_deadline(relay_factory
                                                                   ) -> None:  # noqa: ANN001
    """Stress mode shortens the handshake deadline to stress_command_timeout (Postfix's
    smtpd_starttls_timeout; docs/LIMITS.md): it did so for 465 only, a STARTTLS that
    never sends its ClientHello kept its slot for the full tls_handshake_timeout (here
    10 min) while the listener was under stress and eviction off."""
    r = _relay(relay_factory, ("submission",), pool_eviction=False,
               tls_handshake_timeout="10m", stress_threshold=10, stress_command_timeout="1s")
    port = r.ports["submission"]
    s = _connect(port, "127.0.7.9")  # 1 of 6: the listener is in stress mode
    try:
        r.wait_for(lambda: "warning=stress mode on" in r.maillog(), what="stress mode")
        _into_starttls(s)
        r.wait_for(lambda: "disconnect=from unknown [127.0.7.9]" in r.maillog(),
                   what="the stalled STARTTLS handshake to end at the stress deadline")
        assert "tls_failed=from unknown [127.0.7.9], reason=handshake timed out" \
            in r.maillog()
    finally:
        s.close()


def test_eviction_off_leaves_clients_in_backlog(relay_factory) -> None:  # noqa: ANN001
    r = _relay(relay_factory, pool_eviction=False)
    port = r.ports["submissions"]
    flood = [_connect(port, f"127.0.7.{i % 3 + 1}") for i in range(30)]  # 3 x 2 = pool
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=30,
                                     source_address=("127.0.8.6", 0))
        ctx = client_ctx()
        c.settimeout(2)
        try:
            ctx.wrap_socket(c, server_hostname="localhost")
            got = "handshake"
        except (TimeoutError, OSError):
            got = "waited"
        assert got == "waited"  # the old behaviour: full, nothing makes room
        c.close()
    finally:
        for s in flood:
            s.close()


class _Reconnecting:
    """Flooders that never start TLS: one socket per address, reopened at once whenever
    the server closes or refuses it (as bench/poolflood.py does), in a thread."""

    def __init__(self, port: int, addrs: list[str], noop: float = 0.0) -> None:
        self.port, self.addrs = port, addrs
        self.noop = noop  # > 0: after the greeting EHLO, then a NOOP every `noop` seconds
        self.last: dict[socket.socket, float] = {}  # when each greeted one last sent
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.closed_by_server = 0
        self.first_close = 0.0
        self.th = threading.Thread(target=self._run, daemon=True)

    def _open(self, addr: str) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.bind((addr, 0))
        s.connect_ex(("127.0.0.1", self.port))
        self.sel.register(s, selectors.EVENT_READ, addr)

    def _run(self) -> None:
        for a in self.addrs:
            self._open(a)
        while not self.stop.is_set():
            for s, at in list(self.last.items()) if self.noop else ():
                if time.monotonic() - at >= self.noop:
                    self.last[s] = time.monotonic()
                    with contextlib.suppress(OSError):
                        s.send(b"NOOP\r\n")
            for key, _ in self.sel.select(0.02 if self.noop else 0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    got = s.recv(4096)
                    if got and self.noop and s not in self.last and got.startswith(b"220"):
                        self.last[s] = time.monotonic()
                        s.send(b"EHLO flood.test\r\n")
                    if got:
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.sel.unregister(s)
                self.last.pop(s, None)
                s.close()
                self.closed_by_server += 1
                self.first_close = self.first_close or time.monotonic()
                self._open(key.data)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]

    def __enter__(self) -> _Reconnecting:
        self.th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.th.join(10)


def test_more_flooding_addresses_than_slots_fresh_clients_still_served(relay_factory
                                                                       ) -> None:  # noqa: ANN001
    """Ten addresses against a 465 pool of six, each reconnecting at once when refused:
    most of them hold nothing at any moment, and without the pressure mark they took every
    slot that aged into a tie before a fresh client could (eviction.py). Every fresh client
    logs in and sends; the authenticated session present all along is never evicted."""
    r = _relay(relay_factory)
    port = r.ports["submissions"]
    authed = _login465(r, "127.0.8.20")
    with _Reconnecting(port, [f"127.0.7.{i}" for i in range(1, 11)]) as fl:
        # the pool is full and refusing flooders; its oldest handshakes have aged a tie
        wait_until(lambda: fl.first_close and time.monotonic() - fl.first_close > TIE_AGE,
                   "the flood to fill the pool and be refused")
        for i in range(5):
            fresh = _login465(r, f"127.0.8.{30 + i}")
            _send(fresh)
            fresh.cmd("QUIT")
            fresh.close()
        assert fl.closed_by_server > 10, fl.closed_by_server
        assert authed.cmd("NOOP").code == 250
        _send(authed)
    authed.close()
    log = r.maillog(settle=0.5)
    assert "Traceback" not in log


def test_handshake_evicted_before_its_task_ran_closes_its_socket(relay_factory
                                                                  ) -> None:  # noqa: ANN001
    """A connection admitted and evicted in the same accept batch (its handshake task not
    started yet: a loaded server) is closed by the eviction itself, not left to the
    garbage collector: the relay is stopped while 6 connections from one address and 6
    from six others wait in the backlog, then continued, so one batch admits the first
    six and evicts them for the others; once every client has closed, the server holds
    no more sockets than before."""
    r = _relay(relay_factory, modes=("submissions",), max_pending_per_ip=20)
    assert r.proc is not None
    pid = r.proc.pid
    base = sockets_of(pid)
    port = r.ports["submissions"]
    os.kill(pid, signal.SIGSTOP)
    try:
        flood = [_connect(port, "127.0.7.1") for _ in range(6)]
        flood += [_connect(port, f"127.0.7.{i}") for i in range(2, 8)]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "evicted" in r.maillog() or None, "an eviction", 30)
    for s in flood:
        s.close()
    wait_until(lambda: sockets_of(pid) <= base or None,
               lambda: f"sockets back to {base}: {sockets_of(pid)} open", 30)


def test_flood_from_one_ipv6_48_rotating_its_64s_is_one_address(relay_factory
                                                                ) -> None:  # noqa: ANN001
    """Eviction counts an IPv6 client by its /48, the per-address limits by its /64: a
    host given a /48 fills the 465 pool (behind PROXY, as behind a balancer) with one
    connection from each of six /64s, never handshaking; a fresh client from another
    /48, right after, evicts one of them at once and logs in over TLS. Before, each /64
    was an address of its own holding one: the fresh client could take only a slot
    aged TIE_AGE, and was closed before TLS until then (a flood rotating through
    thousands of /64s took most aged slots first: 15 of 45 fresh clients served in 20 s
    of such a flood, now 40 of 40). The relay is stopped while the seven connections
    and their PROXY headers wait in the backlog, so one accept batch admits them in
    order, within the same moment."""
    r: RelayProcess = relay_factory({"limits": LIMITS,
                                     "relay": {"proxy_trusted": ["127.0.0.1/32"]}},
                                    start=False)
    for item in r.config_data["listen"]:
        if item["mode"] == "submissions":
            item.update(max_connections=6, proxy_protocol=True)
    r.config.write_text(to_toml(r.config_data))
    r.start()
    assert r.proc is not None
    pid, port = r.proc.pid, r.ports["submissions"]
    dst = ("::1", port)
    os.kill(pid, signal.SIGSTOP)
    try:
        flood = []
        for i in range(1, 7):
            s = _connect(port, "127.0.0.1")
            s.sendall(build_v1((f"2001:db8:1:{i}::1", 40000 + i), dst))
            flood.append(s)
        fresh = _connect(port, "127.0.0.1")
        fresh.sendall(build_v1(("2001:db8:2::7", 40100), dst))
    finally:
        os.kill(pid, signal.SIGCONT)
    tls = client_ctx().wrap_socket(fresh)  # fails (closed before TLS) if not admitted
    c = RawClient.__new__(RawClient)
    c.sock, c.buf = tls, b""
    assert c.reply().code == 220
    assert c.cmd("EHLO fresh.test").code == 250
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
    c.close()
    log = r.wait_log(r"warning=pool full: evicted \d+ pre-authentication connections")
    assert "busiest=2001:db8:1::/48" in log, log
    for s in flood:
        s.close()
    assert "Traceback" not in r.maillog()


def _in_transactions(port: int, n: int) -> list[RawClient]:
    """`n` sessions on port 25 inside a transaction (after MAIL FROM): never evicted."""
    busy = []
    for i in range(n):
        c = RawClient(port, source=f"127.0.8.{i + 10}", timeout=30)
        assert c.reply().code == 220
        assert c.cmd("EHLO mx.test").code == 250
        assert c.cmd("MAIL FROM:<a@remote.test>").code == 250
        busy.append(c)
    return busy


def test_a_session_idle_again_counts_its_age_from_its_last_command(relay_factory
                                                                   ) -> None:  # noqa: ANN001
    """A session that went idle long ago, then sent a command, is as young as its last
    command (admission.py reuses its candidate): with it the only candidate, a fresh
    client may not take its slot before TIE_AGE, and may after."""
    r = _relay(relay_factory, modes=("smtp",))
    port = r.ports["smtp"]
    idle = RawClient(port, source="127.0.7.1", timeout=30)
    assert idle.reply().code == 220
    busy = _in_transactions(port, 5)  # the rest of the pool: never candidates
    try:
        time.sleep(TIE_AGE + 0.5)  # idle's first wait is old enough to be taken now
        assert idle.cmd("EHLO again.test").code == 250  # ... but it waits anew since
        with _connect(port, "127.0.8.30") as fresh:
            fresh.settimeout(10)
            assert fresh.recv(200).startswith(b"421 "), "evicted a session idle < TIE_AGE"
        assert _closed_by_server(idle.sock) is None
        time.sleep(TIE_AGE + 0.5)
        with _connect(port, "127.0.8.31") as fresh:
            fresh.settimeout(10)
            assert fresh.recv(200).startswith(b"220 ")
        wait_until(lambda: _closed_by_server(idle.sock) is not None, timeout=10)
    finally:
        idle.close()
        for c in busy:
            c.close()


def test_a_session_dripping_a_command_ages_as_an_idle_one(relay_factory
                                                          ) -> None:  # noqa: ANN001
    """Bytes of an unfinished command do not make a session younger (measured before: a
    flood of 600 addresses on 587, each dripping one byte of a command every 0.4 s after
    EHLO, kept every candidate younger than TIE_AGE: 0 of 16 fresh logins served). The
    only candidate drips `NOOP` one byte per 0.2 s for longer than TIE_AGE after its last
    complete command; a fresh client, connecting right after one of its bytes, takes its
    slot."""
    r = _relay(relay_factory, modes=("smtp",))
    port = r.ports["smtp"]
    drip = RawClient(port, source="127.0.7.1", timeout=30)
    assert drip.reply().code == 220
    assert drip.cmd("EHLO drip.test").code == 250
    busy = _in_transactions(port, 5)  # the rest of the pool: never candidates
    try:
        end = time.monotonic() + TIE_AGE + 0.6
        while time.monotonic() < end:
            drip.sock.sendall(b" ")  # (leading blanks: never a complete line)
            time.sleep(0.2)
        drip.sock.sendall(b"N")
        with _connect(port, "127.0.8.30") as fresh:
            fresh.settimeout(10)
            got = fresh.recv(200)
            assert got.startswith(b"220 "), got
        wait_until(lambda: _closed_by_server(drip.sock) is not None, timeout=10)
        for c in busy:
            assert c.cmd("NOOP").code == 250  # never evicted
    finally:
        drip.close()
        for c in busy:
            c.close()


def _login587(port: int, src: str) -> None:
    """smtplib, as a mail program: greeting, STARTTLS, AUTH, one message, QUIT."""
    with smtplib.SMTP("127.0.0.1", port, source_address=(src, 0), timeout=30) as s:
        s.starttls(context=client_ctx())
        s.login("alice", PASSWORD)
        s.sendmail("alice@local.test", ["bob@example.net"], "Subject: t\r\n\r\nhi\r\n")


def _logged_in(port: int, srcs: list[str], users: list[smtplib.SMTP]) -> None:
    """Mail-program logins (smtplib: greeting, STARTTLS, AUTH) from `srcs`, each kept
    open in `users` (the caller closes them)."""
    for src in srcs:
        s = smtplib.SMTP("127.0.0.1", port, source_address=(src, 0), timeout=30)
        users.append(s)
        s.starttls(context=client_ctx())
        s.login("alice", PASSWORD)


def test_a_users_address_is_served_again_after_it_logged_in(relay_factory
                                                            ) -> None:  # noqa: ANN001
    """An address that took a slot by the tie rule and then authenticated is a user's,
    not a flood's: its next connection is a fresh client again, not one under pressure
    for 30 s (measured before: 600 flooding addresses on a 587 pool of 48, 16 logins
    from one address 0.5 s apart: 1 served, 15 refused 421 at the greeting). Ten
    addresses reconnecting at once hold a 587 pool of six; four mail-program logins
    from one address, one after the other, are all served."""
    r = _relay(relay_factory, modes=("submission",))
    port = r.ports["submission"]
    with _Reconnecting(port, [f"127.0.7.{i}" for i in range(1, 11)]) as fl:
        wait_until(lambda: fl.first_close and time.monotonic() - fl.first_close > TIE_AGE,
                   "the flood to fill the pool and be refused")
        time.sleep(TIE_AGE + 0.5)  # the sessions holding the pool have aged a tie
        for _ in range(4):
            _login587(port, "127.0.8.30")
        assert fl.closed_by_server > 10, fl.closed_by_server
    assert "Traceback" not in r.maillog(settle=0.5)


def test_a_users_retries_refused_twice_are_not_a_flooders(relay_factory
                                                         ) -> None:  # noqa: ANN001
    """A mail program whose tries meet a flood is refused like a flooder, and refused
    twice within 30 s it was one to every try until one got in: under pressure, it could
    take no slot a fresh client could (measured before: 10 of 10 such retries refused
    during a 3,000-address flood). Its address logged in before: a user's, whose
    refusals do not mark it (a flooder cannot log in). Here its tries are refused for
    max_pending_per_ip (two stalled connections, two more refused), then ten flooding
    addresses hold a 465 pool of six: its next login is served."""
    r = _relay(relay_factory, modes=("submissions",))
    port = r.ports["submissions"]
    user = "127.0.8.30"
    c = _login465(r, user)
    _send(c)
    c.cmd("QUIT")
    c.close()
    stalled = [_connect(port, user) for _ in range(4)]
    try:
        wait_until(lambda: len(re.findall(r"relay=unknown \[127\.0\.8\.30\].*"
                                          r"reason=pending_ip", r.maillog())) >= 2,
                   "two of its tries refused")
    finally:
        for s in stalled:
            s.close()
    # the server has seen the admitted ones close (else, on a quiet machine, they still
    # held the user's address's slots when the flood came: the busiest, rule one)
    refused = len(re.findall(r"relay=unknown \[127\.0\.8\.30\].*reason=pending_ip",
                             r.maillog()))
    wait_until(lambda: r.maillog().count("tls_failed=from unknown [127.0.8.30]")
               >= len(stalled) - refused, "the stalled connections' ends seen")
    with _Reconnecting(port, [f"127.0.7.{i}" for i in range(1, 11)]) as fl:
        wait_until(lambda: fl.first_close and time.monotonic() - fl.first_close > TIE_AGE,
                   "the flood to fill the pool and be refused")
        c = _login465(r, user)
        _send(c)
        c.cmd("QUIT")
        c.close()
        assert fl.closed_by_server > 10, fl.closed_by_server
    assert "Traceback" not in r.maillog(settle=0.5)


def test_a_floods_sessions_timed_out_together_leave_logins_served(relay_factory
                                                                  ) -> None:  # noqa: ANN001
    """More flooding addresses than slots, whose sessions are all younger than TIE_AGE
    at once: ten addresses reconnecting at once hold a 587 pool of six, idle after the
    greeting, and the stress-mode command timeout (here 1 s, TIE_AGE) ends the sessions
    admitted together all together, so the pool is refilled at once. A fresh client met
    only candidates too young to take and was refused `421 4.7.0` (measured before:
    600 addresses on a pool of 48 with the 10 s default, 1-2 of 16 logins refused; 0
    of 16 with a NOOP every 0.5 s). The flood's addresses are the ones refused at the
    full pool meanwhile (knocking), and their sessions are taken however young: four
    mail-program logins from four addresses are all served."""
    r = _relay(relay_factory, modes=("submission",), stress_command_timeout="1s")
    port = r.ports["submission"]
    with _Reconnecting(port, [f"127.0.7.{i}" for i in range(1, 11)]) as fl:
        # several rounds of timeouts: every address has been refused meanwhile
        wait_until(lambda: r.maillog().count("reject=421 4.4.2") >= 30,
                   "the flood's sessions to time out together, round after round", 90)
        for i in range(4):
            _login587(port, f"127.0.8.{30 + i}")
        assert fl.closed_by_server > 30, fl.closed_by_server
    log = r.maillog(settle=0.5)
    assert "[127.0.8.3" not in "".join(ln for ln in log.splitlines()
                                        if "reject=421 4.7.0" in ln), log[-2000:]
    assert "Traceback" not in log


def test_a_floods_noops_do_not_keep_its_sessions_young(relay_factory) -> None:  # noqa: ANN001
    """A NOOP (or any junk command, or an error) does not make an idle session younger
    for eviction: six addresses hold a 587 pool of six, each after EHLO sending a NOOP
    every 0.3 s (reconnecting when closed). Each NOOP made its session the youngest
    again, so no candidate ever waited TIE_AGE and a fresh client was refused `421
    4.7.0` for as long as the NOOPs lasted (measured before: 48 or 600 addresses on a
    pool of 48, a NOOP every 0.5 s: 0 of 16 logins served). Now each flooder is aged
    from its EHLO: three mail-program logins, kept open, take three of their slots."""
    r = _relay(relay_factory, modes=("submission",))
    port = r.ports["submission"]
    users: list[smtplib.SMTP] = []
    with _Reconnecting(port, [f"127.0.7.{i}" for i in range(1, 7)], noop=0.3) as fl:
        wait_until(lambda: len(fl.last) == 6, "six flooders greeted")
        # load: their EHLO must be older than TIE_AGE, their NOOPs never are
        time.sleep(TIE_AGE + 0.5)
        try:
            _logged_in(port, [f"127.0.8.{30 + i}" for i in range(3)], users)
            for s in users:
                assert s.noop()[0] == 250
        finally:
            for s in users:
                s.close()
        assert fl.closed_by_server >= 3, fl.closed_by_server
    assert "Traceback" not in r.maillog(settle=0.5)


def test_an_address_evicted_by_one_worker_is_not_fresh_to_another(relay_factory
                                                                  ) -> None:  # noqa: ANN001
    """Each worker keeps its own eviction marks: a flooder evicted by one worker
    reconnected into another as a fresh client and took a slot there by the tie rule,
    whose victim did the same in turn (measured: each login during a 48-address flood of
    a 587 pool of 48 evicted 6 to 8 flood sessions with 2 workers, 1 with one). Twelve
    addresses hold a 587 pool of twelve over two workers, idle after EHLO but for a NOOP
    every 0.3 s, reconnecting when closed; four logins, kept open, evict about four of
    them, not a chain each (before: a chain, and a login could find the aged slots taken
    by the chain's fresh-looking flooders: refused 421 4.7.0)."""
    r = _relay(relay_factory, modes=("submission",), workers=2, pool=12)
    port = r.ports["submission"]
    users: list[smtplib.SMTP] = []
    with _Reconnecting(port, [f"127.0.7.{i}" for i in range(1, 13)], noop=0.3) as fl:
        wait_until(lambda: len(fl.last) == 12, "twelve flooders greeted")
        time.sleep(TIE_AGE + 0.5)  # load: their EHLO older than TIE_AGE
        try:
            _logged_in(port, [f"127.0.8.{30 + i}" for i in range(4)], users)
            # The evicted reconnect at once, again and again while refused: a chain runs
            # within their first tries; then the per-second summary lines are written.
            n = fl.closed_by_server
            wait_until(lambda: fl.closed_by_server >= n + 40, "the evicted to retry")
            time.sleep(1.5)  # the summary's cadence (1 s) is what is waited for
            log = r.maillog()
        finally:
            for s in users:
                s.close()
    evicted = sum(int(n) for n in re.findall(r"warning=pool full: evicted (\d+) ", log))
    # one each: a newcomer is counted into its victim's slot before the eviction frees it
    assert evicted == 4, (evicted, log[-3000:])
