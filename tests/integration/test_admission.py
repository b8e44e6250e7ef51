"""Admission under the floods of issue 10, against a real authrelay process.

Clients appear as distinct addresses by binding loopback sources (127.0.0.2 ...; the
host itself, 127.0.0.1, is exempt from per-IP limits). Each test floods one listener and
checks that another listener's client is served, that the server's sockets stay bounded
(counted in /proc/PID/fd), and what the maillog says. The figures (server sockets, RSS,
the served client's latency) are printed for the record (`pytest -s`); no assertion is
about speed: deadlines are generous.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, client_ctx, plain
from support.procfs import sockets_of

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ helpers
def family(pid: int) -> list[int]:
    """The process and its children (the receiving workers)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return [pid, *kids]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def login(relay: RelayProcess, src: str, user: str = "alice", password: str = PASSWORD,
          mode: str = "submission") -> tuple[RawClient, Any]:
    """Greeting, EHLO, TLS, AUTH on submission (STARTTLS) or submissions (implicit)."""
    if mode == "submissions":
        c = RawClient(relay.ports["submissions"], tls=client_ctx(), source=src, timeout=60)
        assert c.reply().code == 220
    else:
        c = RawClient(relay.ports["submission"], source=src, timeout=60)
        assert c.reply().code == 220
        assert c.cmd("EHLO client.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx())
    assert c.cmd("EHLO client.test").code == 250
    return c, c.cmd(f"AUTH PLAIN {plain(user, password)}")


def submit(relay: RelayProcess, src: str, mode: str = "submission") -> float:
    """One whole submission (TLS, AUTH, a message queued); returns its duration."""
    t0 = time.monotonic()
    c, r = login(relay, src, mode=mode)
    assert r.code == 235, r
    assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
    assert c.cmd("RCPT TO:<bob@example.net>").code == 250
    assert c.cmd("DATA").code == 354
    r = c.cmd("Subject: during a flood\r\n\r\nhello\r\n.")
    assert r.code == 250, r
    c.cmd("QUIT")
    c.close()
    return time.monotonic() - t0


def raw_connect(port: int, src: str) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=30,
                                        source_address=(src, 0))
    except OSError:
        return None


def greeting(s: socket.socket, timeout: float = 30.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except OSError:
        pass
    return buf


def report(name: str, **figures: object) -> None:
    print(f"\n[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def with_listen(r: RelayProcess, mode: str, **extra: object) -> None:
    for item in r.config_data["listen"]:
        if item["mode"] == mode:
            item.update(extra)
    r.config.write_text(to_toml(r.config_data))


# ------------------------------------------------------------------ floods
def test_pre_tls_flood_on_465_from_one_address(relay_factory) -> None:  # noqa: ANN001
    """Thousands of raw connects to 465 that never handshake, from one address: the
    per-IP limit holds at accept (before TLS), and a client on 587 is served."""
    r: RelayProcess = relay_factory({"limits": {"max_connections_per_ip": 20,
                                                "connection_rate_per_ip": 0}})
    assert r.proc is not None
    pid = r.proc.pid
    quiet = submit(r, "127.0.0.3")
    base_socks, base_rss = sockets_of(pid), rss_kib(pid)
    flood: list[socket.socket] = []
    n_flood = 3000
    done = threading.Event()

    def run() -> None:
        for _ in range(n_flood):
            s = raw_connect(r.ports["submissions"], "127.0.0.2")
            if s is not None:
                flood.append(s)
        done.set()

    th = threading.Thread(target=run)
    th.start()
    latencies, peak_socks, peak_rss = [], 0, 0
    try:
        while not done.is_set() or not latencies:
            latencies.append(submit(r, "127.0.0.3"))
            peak_socks = max(peak_socks, sockets_of(pid))
            peak_rss = max(peak_rss, rss_kib(pid))
        th.join()
        # Every flood socket got through the kernel; the server holds at most 20 of them
        # (the per-IP limit, counted from accept, handshake or not).
        held = sockets_of(pid) - base_socks
        peak_socks = max(peak_socks, sockets_of(pid))
        assert len(flood) == n_flood
        assert held <= 20 + 2, held
        assert peak_socks - base_socks <= 20 + 2 + 8, peak_socks  # + our own submissions
        # (Issue 17: at most max_pending_per_ip = 5 of them still in handshake: that
        # limit, lower, refuses first.)
        r.wait_log(r"reject=421 4\.7\.0 Too many connections from your address.*"
                   r"relay=unknown \[127\.0\.0\.2\], stage=connect.*reason=pending_ip, "
                   r"action=closed before TLS")
        report("465 pre-TLS flood, 1 address", connects=n_flood,
               server_sockets_before=base_socks, server_sockets_peak=peak_socks,
               rss_kib_before=base_rss, rss_kib_peak=peak_rss,
               submission_s_quiet=f"{quiet:.3f}",
               submission_s_during_max=f"{max(latencies):.3f}",
               submissions_during=len(latencies))
    finally:
        for s in flood:
            s.close()
    # The held handshakes end with the flood: logged, slots freed.
    r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.2\], reason=handshake failed")
    r.wait_for(lambda: sockets_of(pid) <= base_socks + 2, 30)
    submit(r, "127.0.0.2", mode="submissions")  # that address is served again
    assert "Traceback" not in r.maillog()


def test_465_flood_from_many_addresses_leaves_other_ports_served(relay_factory
                                                                  ) -> None:  # noqa: ANN001
    """40 addresses flood 465 (never handshaking), two workers sharing the counts: 465
    takes at most its pool (100 - 20 % reserve), the rest waits in the backlog; clients
    on 587 and 25 are served throughout."""
    r: RelayProcess = relay_factory({"limits": {"connection_rate_per_ip": 0}}, workers=2)
    assert r.proc is not None
    pid = r.proc.pid
    r.wait_for(lambda: len(family(pid)) == 3, 30)  # master + 2 workers (forked after bind)
    procs = family(pid)

    def socks() -> int:
        return sum(sockets_of(p) for p in procs)

    def rss() -> int:
        return sum(rss_kib(p) for p in procs)

    quiet = submit(r, "127.0.0.3")
    base_socks, base_rss = socks(), rss()
    flood = [s for s in (raw_connect(r.ports["submissions"], f"127.0.5.{i % 40 + 1}")
                         for i in range(1000)) if s is not None]
    try:
        assert len(flood) == 1000
        latencies = [submit(r, "127.0.0.3") for _ in range(3)]
        with RawClient(r.ports["smtp"], source="127.0.0.4") as c:
            assert c.reply().code == 220
        # (Handshakes evicted a moment ago, issue 17, may still be closing: on a loaded
        # runner that took longer than 5 s. Polled to the common deadline, a hang guard:
        # the bound on what the pool holds is the assertion, not how fast it settles.)
        r.wait_for(lambda: socks() - base_socks <= 80 + 4,
                   what="465 holds at most its pool (80) + 4 sockets")
        report("465 pre-TLS flood, 40 addresses, 2 workers", connects=len(flood),
               server_sockets_before=base_socks, server_sockets_flood=socks(),
               rss_kib_before=base_rss, rss_kib_flood=rss(),
               submission_s_quiet=f"{quiet:.3f}",
               submission_s_during_max=f"{max(latencies):.3f}")
    finally:
        for s in flood:
            s.close()
    r.wait_for(lambda: socks() <= base_socks + 4, 60)
    submit(r, "127.0.5.1", mode="submissions")
    assert "Traceback" not in r.maillog()


def test_handshake_timeout_logged(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({"limits": {"tls_handshake_timeout": "1s"}})
    s = raw_connect(r.ports["submissions"], "127.0.0.4")
    assert s is not None
    try:
        r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.4\], reason=handshake timed out, "
                 r"listener=submissions:")
        assert greeting(s) == b""  # closed, nothing in clear
    finally:
        s.close()


def test_port25_idle_flood_leaves_submission_reachable(relay_factory) -> None:  # noqa: ANN001
    """100 idle connections to port 25 from 5 addresses (within the per-IP limit) fill the
    smtp pool; submission keeps its reserved slots; stress mode starts and ends."""
    r: RelayProcess = relay_factory({"limits": {
        "max_connections": 50, "max_connections_per_ip": 20, "connection_rate_per_ip": 0,
        "stress_command_timeout": "2s"}})
    assert r.proc is not None
    pid = r.proc.pid
    quiet = submit(r, "127.0.0.3")
    base_socks, base_rss = sockets_of(pid), rss_kib(pid)
    flood: list[socket.socket] = []
    codes: list[bytes] = []
    for i in range(100):
        s = raw_connect(r.ports["smtp"], f"127.0.1.{i % 5 + 1}")
        assert s is not None
        flood.append(s)
        codes.append(greeting(s)[:9])
    try:
        # 50 slots, 20 % reserved for submission: the smtp class holds 40.
        assert codes.count(b"220 relay") >= 40, codes
        assert codes.count(b"421 4.7.0") >= 1, codes
        r.wait_log(r"reject=421 4\.7\.0 Too many connections, try again later, "
                 r"relay=unknown "
                 r"\[127\.0\.1\.\d\], stage=connect, listener=smtp:.*reason=pool:class:smtp")
        r.wait_log(r"warning=stress mode on: command timeout 2s, listener=smtp:.*"
                 r"connections=\d+/40")
        latencies = [submit(r, "127.0.0.3") for _ in range(3)]
        latencies += [submit(r, "127.0.0.3", mode="submissions")]
        peak_socks, peak_rss = sockets_of(pid), rss_kib(pid)
        # Sessions that started in stress mode wait 2 s for a command, not 5 minutes.
        r.wait_log(r"reject=421 4\.4\.2 Timeout exceeded.*\[127\.0\.1\.\d\]")
        report("port 25 idle flood, 5 addresses", connects=100,
               greeted=codes.count(b"220 relay"), refused=codes.count(b"421 4.7.0"),
               server_sockets_before=base_socks, server_sockets_flood=peak_socks,
               rss_kib_before=base_rss, rss_kib_flood=peak_rss,
               submission_s_quiet=f"{quiet:.3f}",
               submission_s_during_max=f"{max(latencies):.3f}")
    finally:
        for s in flood:
            s.close()
    r.wait_log(r"warning=stress mode off, listener=smtp:")
    assert "Traceback" not in r.maillog()


def test_full_submission_listener_backlog_then_421(relay_factory) -> None:  # noqa: ANN001
    # pool_eviction off: the two held sessions are idle before AUTH and would otherwise
    # make room (issue 17, tests/integration/test_eviction.py).
    r: RelayProcess = relay_factory({"limits": {"backlog_wait": "1s", "pool_eviction": False,
                                                "connection_rate_per_ip": 0}}, start=False)
    with_listen(r, "submission", max_connections=2)
    r.start()
    port = r.ports["submission"]
    held = [raw_connect(port, "127.0.3.1"), raw_connect(port, "127.0.3.1")]
    assert all(s is not None and greeting(s).startswith(b"220") for s in held)
    # Full: the next client is left in the kernel backlog, not refused ...
    waiting = raw_connect(port, "127.0.3.2")
    assert waiting is not None
    assert select.select([waiting], [], [], 0.3)[0] == []
    held.pop().close()  # type: ignore[union-attr]
    # ... and is greeted when a slot frees.
    assert greeting(waiting).startswith(b"220")
    held.append(waiting)
    # Still full past backlog_wait: the client waiting gets 421 (after the wait).
    late = raw_connect(port, "127.0.3.3")
    assert late is not None
    assert greeting(late).startswith(b"421 4.7.0")
    r.wait_log(r"reject=421 4\.7\.0 Too many connections.*\[127\.0\.3\.3\], "
             r"stage=connect, listener=submission:.*reason=pool:listener:submission:")
    with RawClient(r.ports["smtp"], source="127.0.3.4") as c:  # another listener: served
        assert c.reply().code == 220
    for s in held:
        s.close()  # type: ignore[union-attr]
    late.close()


def test_fd_limit_one_listener_flood_does_not_starve_others(relay_factory
                                                            ) -> None:  # noqa: ANN001
    """With a low fd limit and pools larger than it, a flood of never-handshaking
    connections on 465 stops at its share of descriptors (the rest wait in the backlog);
    587 and 25 are still served; nothing fails with EMFILE."""
    r: RelayProcess = relay_factory({"limits": {
        "max_connections": 1000, "max_connections_per_ip": 0, "connection_rate_per_ip": 0,
        "tls_handshake_timeout": "2m"}}, start=False)
    r.start(nofile=200)  # budget 200 - 64 = 136; each of 3 listeners is guaranteed 22
    assert r.proc is not None
    pid = r.proc.pid
    base = sockets_of(pid)
    flood = [s for s in (raw_connect(r.ports["submissions"], f"127.0.4.{i % 200 + 1}")
                         for i in range(400)) if s is not None]
    try:
        r.wait_log(r"warning=near the file descriptor limit")
        socks = sockets_of(pid)
        # 465 holds at most its share (136 - 2 x 22 = 92) of client sockets; the rest are
        # the server's own (3 listening, notify/control sockets: at most a dozen).
        assert socks <= 136 - 2 * 22 + 12, socks
        t = submit(r, "127.0.0.3")
        with RawClient(r.ports["smtp"], source="127.0.0.3") as c:
            assert c.reply().code == 220
        report("465 flood at the fd limit (nofile=200)", connects=len(flood),
               server_sockets_before=base, server_sockets_flood=socks,
               rss_kib=rss_kib(pid), submission_s=f"{t:.3f}")
    finally:
        for s in flood:
            s.close()
    # The flood's backlog drains (dead connections fail their handshake) and 465 serves.
    deadline = time.monotonic() + 60
    while True:
        try:
            submit(r, "127.0.0.5", mode="submissions")
            break
        except (OSError, AssertionError):
            assert time.monotonic() < deadline
            time.sleep(0.5)
    log = r.maillog()
    assert "Traceback" not in log and "Too many open files" not in log


# ------------------------------------------------------------------ exemptions
def test_loopback_and_trusted_exempt_from_per_ip_limits(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({
        "relay": {"trusted_networks": ["127.0.7.0/24"]},
        "limits": {"max_connections_per_ip": 2, "connection_rate_per_ip": 4}})
    port = r.ports["smtp"]
    for src in ("127.0.0.1", "127.0.7.9"):  # the host itself; a trusted network
        held = [RawClient(port, source=src) for _ in range(6)]
        assert [c.reply().code for c in held] == [220] * 6
        for c in held:
            c.close()
    held = [RawClient(port, source="127.0.8.9") for _ in range(3)]
    codes = [c.reply().code for c in held]
    assert codes == [220, 220, 421], codes
    for c in held:
        c.close()
    r.wait_log(r"reject=421 4\.7\.0 Too many connections from your address.*"
             r"\[127\.0\.8\.9\].*reason=ip")


# ------------------------------------------------------------------ AUTH lockout
def attack(r: RelayProcess, src: str, user: str, tries: int) -> None:
    c, rep = login(r, src, user, "wrong0")
    assert rep.code == 535
    for i in range(1, tries):
        assert c.cmd(f"AUTH PLAIN {plain(user, f'wrong{i}')}").code == 535
    c.close()


def test_lockout_by_attacker_spares_known_address(relay_factory) -> None:  # noqa: ANN001
    overrides = {"auth": {"max_failures_per_user": 3, "max_failures_per_ip": 10,
                          "failure_delay": 0},
                 "limits": {"max_auth_failures": 10, "connection_rate_per_ip": 0}}
    r: RelayProcess = relay_factory(overrides)
    c, rep = login(r, "127.0.0.5")  # alice at home (127.0.0.0/24) once
    assert rep.code == 235
    c.close()
    attack(r, "127.0.1.7", "alice", 3)  # someone else guesses her password
    # Unknown addresses are refused unchecked, even with the right password ...
    for src in ("127.0.1.7", "127.0.2.8"):
        c, rep = login(r, src)
        assert (rep.code, rep.text[:5]) == (454, "4.7.0"), (src, rep)
        c.close()
    r.wait_log(r"reject=454 4\.7\.0 .*\[127\.0\.2\.8\].*sasl_username=alice")
    # ... alice from her network still logs in and sends.
    submit(r, "127.0.0.5")
    submit(r, "127.0.0.6")
    # Per-IP limits stay: the attacker's address is locked for every user after 10.
    attack(r, "127.0.1.7", "bob", 3)
    attack(r, "127.0.1.7", "dave", 3)
    attack(r, "127.0.1.7", "erin", 1)
    c, rep = login(r, "127.0.1.7", "carol")
    assert rep.code == 454
    c.close()
    # Known addresses survive a restart (state_dir/known_addresses.db).
    r.stop()
    r.start()
    attack(r, "127.0.3.7", "alice", 3)
    c, rep = login(r, "127.0.3.7")
    assert rep.code == 454
    c.close()
    submit(r, "127.0.0.5")
    assert (r.state / "known_addresses.db").exists()
