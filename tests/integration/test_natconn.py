"""The per-address connection limit turned against a NAT's users (docs/LIMITS.md "Other
limits against a stranger who shares a user's address"), against a real authrelay.

A guesser behind a user's address holds `max_connections_per_ip` (20) connections idle
after EHLO; a new connection from that address takes the slot of the address's own
oldest idle unauthenticated session (aged at least eviction's TIE_AGE since its last
command, or connected OWN_AGE), never one that
authenticated, is in an AUTH exchange or in a transaction. Every client here comes from
127.0.9.1 (127.0.0.1 is exempt from the per-address limits).
"""

from __future__ import annotations

import os
import re
import select
import signal
import smtplib
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from relayproc import PASSWORD, RelayProcess, children, to_toml
from smtpclient import RawClient, client_ctx, plain, proxied
from support.ports import free_port
from support.procfs import holder, sockets_of
from support.wait import wait_until

from authrelay.smtpd.eviction import OWN_AGE, TIE_AGE
from authrelay.smtpd.proxy import build_v1

pytestmark = pytest.mark.slow

NAT = "127.0.9.1"
EVICTED = b"421 4.7.0 Too many connections, closing an idle unauthenticated one"
LINE = (r"warning=per-address limit: evicted 1 pre-authentication connection "
        r"\(idle before AUTH\), relay=unknown \[127\.0\.9\.1\], "
        r"listener=submission:127\.0\.0\.1:\d+, reason=max_connections_per_ip, "
        r"connections=20/20")


def _idle(port: int, n: int) -> list[RawClient]:
    """`n` sessions from NAT on `port`, greeted and after EHLO, then silent."""
    out = []
    for _ in range(n):
        c = RawClient(port, source=NAT, timeout=30)
        out.append(c)
        assert c.reply().code == 220
        assert c.cmd("EHLO guesser.test").code == 250
    return out


def _in_transaction(port: int) -> RawClient:
    """A session from NAT on `port` (25) inside a transaction: MAIL and RCPT accepted."""
    c = RawClient(port, source=NAT, timeout=30)
    assert c.reply().code == 220
    assert c.cmd("EHLO mx.test").code == 250
    assert c.cmd("MAIL FROM:<a@remote.test>").code == 250
    assert c.cmd("RCPT TO:<alice@local.test>").code == 250
    return c


def _finish(c: RawClient) -> None:
    """The transaction's message, accepted (the session is outside one again)."""
    assert c.cmd("DATA").code == 354
    assert c.cmd("Subject: t\r\n\r\nhi\r\n.").code == 250


def _alice(port: int) -> smtplib.SMTP:
    """alice's mail program from NAT: STARTTLS, AUTH, one message; left open."""
    s = smtplib.SMTP("127.0.0.1", port, source_address=(NAT, 0), timeout=30)
    s.starttls(context=client_ctx())
    s.login("alice", PASSWORD)
    s.sendmail("alice@local.test", ["bob@example.net"], "Subject: t\r\n\r\nhi\r\n")
    return s


def _ended(c: RawClient) -> bytes | None:
    """What the server sent before closing `c`, or None if it is still open (a NOOP
    answered proves that)."""
    try:
        c.send(b"NOOP\r\n")
        got = c.sock.recv(4096)
    except OSError:
        return b""
    return None if got.startswith(b"250") else got


def _start(relay_factory, workers: int = 1) -> RelayProcess:  # noqa: ANN001
    # connection_rate_per_ip off: the test's own 20-odd connections are not what it is about
    r: RelayProcess = relay_factory({"limits": {"connection_rate_per_ip": 0},
                                     "metrics": {"address": f"127.0.0.1:{free_port()}"}},
                                    workers=workers)
    return r


def _evicted_metric(r: RelayProcess) -> float:
    """authrelay_connections_total{result="evicted"}, all listeners."""
    addr = r.config_data["metrics"]["address"]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as f:
        text = f.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "authrelay_connections_total" and s.labels["result"] == "evicted")


def _alice_past_idle(r: RelayProcess) -> None:
    port = r.ports["submission"]
    idle = _idle(port, 20)
    try:
        time.sleep(TIE_AGE + 0.5)  # time under test: candidates younger than this are kept
        with _alice(port) as s:
            assert s.noop()[0] == 250
        ends = [_ended(c) for c in idle]
        gone = [e for e in ends if e is not None]
        assert len(gone) == 1 and EVICTED in gone[0], ends
        log = r.maillog(settle=0.5)
        assert len(re.findall(LINE, log)) == 1, log[-3000:]
        assert "Traceback" not in log
        if "metrics" in r.config_data:
            assert _evicted_metric(r) == 1
    finally:
        for c in idle:
            c.close()


def test_a_user_gets_in_past_20_idle_connections_of_her_address(relay_factory
                                                                ) -> None:  # noqa: ANN001
    """Before: alice got `421 4.7.0 Too many connections from your address` until the
    guesser stopped."""
    _alice_past_idle(_start(relay_factory))


def test_two_workers_a_user_gets_in_past_idle_connections(relay_factory
                                                          ) -> None:  # noqa: ANN001
    """With two workers the 20 are spread over both (the per-address count is shared);
    the accepting worker takes one of its own."""
    _alice_past_idle(_start(relay_factory, workers=2))


@pytest.mark.external
def test_farm_node_with_shared_redis_counters_a_user_gets_in(relay_factory
                                                             ) -> None:  # noqa: ANN001
    """`[limits] shared` (Redis): the per-address count is the node's (the throttle over
    Redis keeps the connection gauges local), and so is the rule; two workers, the
    per-address connection rate (default, 60 a minute) counted in Redis."""
    from scalerig import RedisServer

    rs = RedisServer().start()
    try:
        r = relay_factory({"limits": {"shared": rs.url}}, workers=2)
        try:
            _alice_past_idle(r)
            import redis

            with redis.Redis.from_url(rs.url) as db:  # the node counted in the farm's
                assert db.dbsize() > 0
        finally:
            r.stop()  # before Redis goes
    finally:
        rs.cleanup()


def test_sessions_that_keep_moving_are_taken_once_connected_own_age(relay_factory
                                                                    ) -> None:  # noqa: ANN001
    """A guesser's 20 sessions (465) each send AUTH LOGIN and cancel it (`*`) over and
    over, no password checked: each AUTH LOGIN moves its session on, so none was ever
    TIE_AGE old since its last command and alice got `421 4.7.0 Too many connections
    from your address` for as long as that went on (max_errors ends a session after 20
    cancels; its replacement reconnects within the connection rate). Connected OWN_AGE
    without authenticating, they are taken all the same, the one connected first."""
    r = _start(relay_factory)
    moving: list[RawClient] = []
    try:
        for _ in range(20):
            c = RawClient(r.ports["submissions"], tls=client_ctx(), source=NAT, timeout=30)
            moving.append(c)
            assert c.reply().code == 220
            assert c.cmd("EHLO guesser.test").code == 250
        time.sleep(OWN_AGE + 0.5)  # time under test: every one connected OWN_AGE ago
        for c in moving:  # each moved on just now, waiting for its AUTH exchange's line
            c.send(b"AUTH LOGIN\r\n")
        for c in moving:
            assert c.reply().code == 334
        with _alice(r.ports["submission"]) as s:
            assert s.noop()[0] == 250
        assert EVICTED in moving[0].sock.recv(4096)
        for c in moving[1:]:
            assert c.cmd("*").code == 501  # still there, each
        log = r.maillog(settle=0.5)
        assert len(re.findall(LINE.replace("submission:", "submissions:"), log)) == 1, \
            log[-3000:]
    finally:
        for c in moving:
            c.close()


def test_busy_sessions_of_the_address_are_never_taken(relay_factory
                                                      ) -> None:  # noqa: ANN001
    """19 sessions of the address are busy (10 authenticated on 587, 9 in a transaction
    on 25) and one idle: alice takes the idle one's slot, every busy one goes on. Then
    all 20 are busy: the next login from the address gets the 421. (A session waiting
    for the client's next line of an AUTH exchange waits like an idle one: a candidate,
    as for the pool eviction; a guesser parked there would be kept for ever otherwise.)"""
    r = _start(relay_factory)
    sub, mx = r.ports["submission"], r.ports["smtp"]
    authed: list[smtplib.SMTP] = []
    txn: list[RawClient] = []
    idle: list[RawClient] = []
    try:
        for _ in range(10):
            s = smtplib.SMTP("127.0.0.1", sub, source_address=(NAT, 0), timeout=30)
            authed.append(s)
            s.starttls(context=client_ctx())
            s.login("alice", PASSWORD)
        for _ in range(9):
            txn.append(_in_transaction(mx))
        idle = _idle(sub, 1)
        time.sleep(TIE_AGE + 0.5)  # time under test: every session older than TIE_AGE
        with _alice(sub) as s:
            assert s.noop()[0] == 250
            assert EVICTED in (_ended(idle[0]) or b"")
            # 20 busy now (alice's among them): nothing may be taken
            with pytest.raises(smtplib.SMTPConnectError) as e:
                smtplib.SMTP("127.0.0.1", sub, source_address=(NAT, 0), timeout=30)
            assert e.value.smtp_code == 421
            assert b"Too many connections from your address" in e.value.smtp_error
            for s in authed:
                s.sendmail("alice@local.test", ["bob@example.net"], "Subject: a\r\n\r\nx\r\n")
            for c in txn:
                _finish(c)
        log = r.maillog(settle=0.5)
        assert len(re.findall(LINE, log)) == 1, log[-3000:]
    finally:
        for s in authed:
            s.close()
        for c in txn + idle:
            c.close()


def test_all_20_in_a_transaction_alice_refused_until_one_ends_it(relay_factory
                                                                 ) -> None:  # noqa: ANN001
    """20 sessions of the address in a transaction on 25, however old, are never taken:
    alice on 587 gets the 421. One ends its transaction (its message accepted) and
    waits: once it has waited TIE_AGE, alice's next login takes its slot (another
    listener's session: the per-address count covers every listener)."""
    r = _start(relay_factory)
    txn: list[RawClient] = []
    try:
        for _ in range(20):
            txn.append(_in_transaction(r.ports["smtp"]))
        time.sleep(TIE_AGE + 0.5)  # time under test: all older than TIE_AGE
        with pytest.raises(smtplib.SMTPConnectError) as e:
            _alice(r.ports["submission"])
        assert e.value.smtp_code == 421
        assert b"Too many connections from your address" in e.value.smtp_error
        done = txn[7]
        _finish(done)  # idle from here
        time.sleep(TIE_AGE + 0.5)  # time under test: it has waited TIE_AGE
        with _alice(r.ports["submission"]) as s:
            assert s.noop()[0] == 250
        assert EVICTED in (_ended(done) or b"")
        for c in txn:
            if c is not done:
                _finish(c)  # none other was taken
        log = r.maillog(settle=0.5)
        assert len(re.findall(LINE.replace("submission:", "smtp:"), log)) == 1, log[-3000:]
    finally:
        for c in txn:
            c.close()


def test_a_full_pool_and_the_address_at_its_limit_takes_its_own(relay_factory
                                                                ) -> None:  # noqa: ANN001
    """The smtp listener's pool (20) is full of the address's own 20 idle sessions: the
    pool is checked first, and the pool eviction finds no other address to take from
    (before: `421 4.7.0 Too many connections`). The address is at its limit as well, so
    the newcomer takes its own oldest, in that listener."""
    r = relay_factory({"limits": {"connection_rate_per_ip": 0}}, start=False)
    for item in r.config_data["listen"]:
        if item["mode"] == "smtp":
            item["max_connections"] = 20
    r.config.write_text(to_toml(r.config_data))
    r.start()
    idle = _idle(r.ports["smtp"], 20)
    try:
        time.sleep(TIE_AGE + 0.5)  # time under test: candidates younger than this are kept
        with _in_transaction(r.ports["smtp"]) as c:  # a NAT's MTA
            _finish(c)
        ends = [_ended(c) for c in idle]
        gone = [e for e in ends if e is not None]
        assert len(gone) == 1 and EVICTED in gone[0], ends
        log = r.maillog(settle=0.5)
        assert len(re.findall(LINE.replace("submission:", "smtp:"), log)) == 1, log[-3000:]
    finally:
        for c in idle:
            c.close()


def _where(r: RelayProcess, port: int) -> int:
    """The worker holding the server's end of the connection from NAT:`port`."""
    pids = children(r.proc.pid) if r.proc is not None else []
    pid = holder(pids, NAT, port)
    assert pid is not None, (pids, port)
    return pid


def _released(r: RelayProcess, port: int, host: str = NAT) -> None:
    """Wait until no worker holds the server's end of the connection from host:`port`
    (closed by the client): its slot given back (the release comes before the socket's
    close). Else the next connection from NAT met the limit and took the oldest's slot."""
    workers = children(r.proc.pid) if r.proc is not None else []
    wait_until(lambda: holder(workers, host, port, established=False) is None,
               f"the server's end of {host}:{port} closed")


def _in_one_worker(r: RelayProcess, open_one: Callable[[], RawClient],
                   host: str = NAT) -> tuple[list[RawClient], int]:
    """20 of the guesser's connections (`open_one()`, from host), all in the worker that
    got the first (the kernel's choice: one landing in another is closed, and its
    release waited for), and that worker."""
    workers = children(r.proc.pid) if r.proc is not None else []
    idle: list[RawClient] = []
    first = 0
    while len(idle) < 20:
        c = open_one()
        cport = c.sock.getsockname()[1]
        w = holder(workers, host, cport)
        assert w is not None, (workers, cport)
        first = first or w
        if w == first:
            idle.append(c)
        else:
            c.close()
            _released(r, cport, host)
    return idle, first


def _logins_past_idle_elsewhere(r: RelayProcess, idle: list[RawClient],
                                done: Callable[[set[int]], bool]) -> set[int]:
    """alice logs in and sends past the guesser's `idle` connections (20, aged TIE_AGE),
    one login after another, until `done(the workers that accepted a login and passed it
    on)`: every login gets in, and each time the guesser's oldest connection is the one
    closed (with the eviction's 421), by the worker holding it, whichever accepted the
    login (its line names that one, `accepted_by=PID`, when it is another); the guesser
    then opens one more (young: never taken). Returns those accepting workers."""
    port = r.ports["submission"]
    workers = children(r.proc.pid) if r.proc is not None else []
    crossed: set[int] = set()
    for n in range(1, 61):
        oldest = _where(r, idle[0].sock.getsockname()[1])
        with _alice(port) as s:
            assert s.noop()[0] == 250
            ends = [_ended(c) for c in idle]
            assert ends[0] is not None and EVICTED in ends[0], (n, ends)
            assert all(e is None for e in ends[1:]), (n, ends)
            aport = s.sock.getsockname()[1]
        _released(r, aport)  # before the guesser opens another
        lines = r.wait_for(lambda k=n: (got := re.findall(
            r"authrelay\[(\d+)\]: NOQUEUE: " + LINE + r"(?:, accepted_by=(\d+))?\n",
            r.maillog(0))) and len(got) >= k and got, what=f"eviction line {n}")
        assert len(lines) == n, lines
        evictor, by = int(lines[-1][0]), lines[-1][1]
        assert evictor == oldest, (n, lines[-1], oldest)
        if by:
            assert int(by) != evictor and int(by) in workers, lines[-1]
            crossed.add(int(by))
        idle[0].close()
        del idle[0]
        idle.extend(_idle(port, 1))
        if done(crossed):
            break
    assert "Traceback" not in r.maillog(0)
    return crossed


def test_two_workers_the_oldest_idle_connection_is_taken_in_whichever_worker(
        relay_factory) -> None:  # noqa: ANN001
    """The guesser's 20 spread over both workers: alice's logins land in either (SO_
    REUSEPORT), and each takes the guesser's oldest, also when the other worker holds
    it (before: the accepting worker's own oldest, or, holding none, 421)."""
    r = _start(relay_factory, workers=2)
    workers = set(children(r.proc.pid) if r.proc is not None else [])
    idle = _idle(r.ports["submission"], 20)
    try:
        assert {_where(r, c.sock.getsockname()[1]) for c in idle} == workers  # 1 - 2**-19
        time.sleep(TIE_AGE + 0.5)  # time under test: candidates younger than this are kept
        crossed = _logins_past_idle_elsewhere(r, idle, lambda got: got == workers)
        assert crossed == workers
    finally:
        for c in idle:
            c.close()


def test_two_workers_a_login_in_the_worker_holding_none_gets_in(relay_factory
                                                                 ) -> None:  # noqa: ANN001
    """All 20 of the guesser's connections in one worker: alice's login accepted by the
    other (which holds none of them) gets in too (before: 421 4.7.0 Too many
    connections from your address, with probability 1/2 per login)."""
    r = _start(relay_factory, workers=2)
    port = r.ports["submission"]
    idle, first = _in_one_worker(r, lambda: _idle(port, 1)[0])
    try:
        time.sleep(TIE_AGE + 0.5)  # time under test: candidates younger than this are kept
        crossed = _logins_past_idle_elsewhere(r, idle, lambda got: bool(got))
        assert first not in crossed
    finally:
        for c in idle:
            c.close()


def test_a_replaced_worker_takes_part_in_the_hand_off(relay_factory
                                                      ) -> None:  # noqa: ANN001
    """A worker killed (-9) while it held the guesser's 20 connections; once it is
    replaced, the guesser's 20 in one worker again, a login accepted by the other gets
    in, passed on (the replacement is one of the two: it publishes its own entries in
    the dead one's row and reads the dead one's inbox)."""
    r = _start(relay_factory, workers=2)
    port = r.ports["submission"]
    idle, first = _in_one_worker(r, lambda: _idle(port, 1)[0])
    time.sleep(TIE_AGE + 0.5)  # time under test: its entry names takeable candidates
    os.kill(first, signal.SIGKILL)
    for c in idle:
        c.close()
    after = r.wait_for(lambda: (w := children(r.proc.pid) if r.proc is not None else [])
                       and len(w) == 2 and first not in w and w, what="the replacement")
    idle, again = _in_one_worker(r, lambda: _idle(port, 1)[0])
    try:
        time.sleep(TIE_AGE + 0.5)  # time under test: candidates younger than this are kept
        crossed = _logins_past_idle_elsewhere(r, idle, lambda got: bool(got))
        assert crossed == set(after) - {again}
    finally:
        for c in idle:
            c.close()


def _answers(socks: list[socket.socket], wait: float) -> dict[socket.socket, bytes]:
    """What each of `socks` that has something to read got (b"": closed), waiting at
    most `wait` seconds for the first."""
    ready, _, _ = select.select(socks, [], [], wait)
    out = {}
    for s in ready:
        try:
            out[s] = s.recv(4096)
        except OSError:
            out[s] = b""
    return out


def test_a_full_hand_off_inbox_fails_the_pass_and_the_accepting_worker_decides(
        relay_factory) -> None:  # noqa: ANN001
    """The guesser's 20 in one worker, takeable, and that worker stopped (SIGSTOP: it
    reads neither its listener nor its inbox). Newcomers from the address accepted by
    the other worker are passed to it until its inbox is full (~270: the socketpair's
    send buffer); from then on each pass fails at once (MSG_DONTWAIT) and the accepting
    worker decides as if it were alone: 421 (at the address's limit, no victim of its
    own), never a 220, never a wait. Its TCP sockets are back to its baseline once those
    are answered (a failed pass leaks no descriptor; those in flight are the inbox's).
    Once the worker is continued, every newcomer is answered (passed or in its
    backlog: admitted in a victim's slot, or 421), and with every client gone both
    workers are back to their baselines."""
    r = _start(relay_factory, workers=2)
    port = r.ports["submission"]
    assert r.proc is not None
    workers = children(r.proc.pid)
    base = {w: sockets_of(w) for w in workers}
    idle, first = _in_one_worker(r, lambda: _idle(port, 1)[0])
    [other] = [w for w in workers if w != first]
    time.sleep(TIE_AGE + 0.5)  # time under test: the other passes only to a takeable one
    newcomers: list[socket.socket] = []
    answered: dict[socket.socket, bytes] = {}
    os.kill(first, signal.SIGSTOP)
    try:
        while sum(a.startswith(b"421") for a in answered.values()) < 20:
            assert len(newcomers) < 3000, "no pass failed: the inbox never filled"
            for _ in range(50):
                newcomers.append(socket.create_connection(
                    ("127.0.0.1", port), timeout=10, source_address=(NAT, 0)))
            answered.update(_answers([c for c in newcomers if c not in answered], 0.5))
        assert {a[:3] for a in answered.values()} == {b"421"}, answered
        wait_until(lambda: sockets_of(other) == base[other],
                   "the accepting worker's sockets back to its baseline")
    finally:
        os.kill(first, signal.SIGCONT)
    try:
        # Every newcomer answered now: a 220 in a victim's slot, or 421.
        wait_until(lambda: answered.update(_answers(
            [c for c in newcomers if c not in answered], 0.5)) or len(answered) == len(
            newcomers), "every newcomer answered", timeout=60)
        assert {a[:3] for a in answered.values()} <= {b"220", b"421"}, answered
    finally:
        for c in [*newcomers, *(i.sock for i in idle)]:
            c.close()
    for w in workers:
        wait_until(lambda w=w: sockets_of(w) == base[w], f"worker {w}'s sockets released")
    assert "Traceback" not in r.maillog()


def _via_balancer(port: int, n: int) -> list[RawClient]:
    """`n` sessions on the implicit-TLS `port` behind the balancer (PROXY v1 from
    127.0.0.1 naming NAT), greeted and after EHLO, then silent."""
    out = []
    for i in range(n):
        c = proxied(port, build_v1((NAT, 40000 + i), ("127.0.0.1", port)), tls=client_ctx())
        out.append(c)
        assert c.reply().code == 220
        assert c.cmd("EHLO guesser.test").code == 250
    return out


def test_two_workers_behind_a_balancer_the_passed_login_keeps_its_proxy_source(
        relay_factory) -> None:  # noqa: ANN001
    """465 behind a load balancer (PROXY headers from 127.0.0.1, every client NAT): the
    guesser's 20 in one worker; alice's logins go on until one accepted by the other
    worker was passed on, after its header was read and before its TLS handshake: it
    gets in there, as NAT (her login's line), and the guesser's first is the one
    closed (before: 421, the connection closed before TLS)."""
    r = relay_factory({"relay": {"proxy_trusted": ["127.0.0.1/32"]},
                       "limits": {"connection_rate_per_ip": 0}}, workers=2, start=False)
    port = r.ports["submissions"]
    for item in r.config_data["listen"]:
        item["proxy_protocol"] = item["mode"] == "submissions"
    r.config.write_text(to_toml(r.config_data))
    r.start()
    idle, first = _in_one_worker(r, lambda: _via_balancer(port, 1)[0], "127.0.0.1")
    try:
        time.sleep(TIE_AGE + 0.5)  # time under test: candidates younger than this are kept
        line = (r"authrelay\[(\d+)\]: NOQUEUE: " +
                LINE.replace("submission:", "submissions:") + r"(?:, accepted_by=(\d+))?\n")
        for n in range(1, 41):
            with proxied(port, build_v1((NAT, 50000 + n), ("127.0.0.1", port)),
                         tls=client_ctx()) as a:
                assert a.reply().code == 220
                assert a.cmd("EHLO alice.test").code == 250
                assert a.cmd("AUTH PLAIN " + plain("alice", PASSWORD)).code == 235
                assert a.cmd("MAIL FROM:<alice@local.test>").code == 250
                assert a.cmd("RCPT TO:<bob@example.net>").code == 250
                assert a.cmd("DATA").code == 354
                assert a.cmd("Subject: t\r\n\r\nhi\r\n.").code == 250
                ends = [_ended(c) for c in idle]
                assert ends[0] is not None and EVICTED in ends[0], (n, ends)
                assert all(e is None for e in ends[1:]), (n, ends)
                aport = a.sock.getsockname()[1]
                assert a.cmd("QUIT").code == 221
            _released(r, aport, "127.0.0.1")
            lines = r.wait_for(lambda k=n: (got := re.findall(line, r.maillog(0))) and
                               len(got) >= k and got, what=f"eviction line {n}")
            assert len(lines) == n and int(lines[-1][0]) == first, lines
            idle[0].close()
            del idle[0]
            idle.extend(_via_balancer(port, 1))
            if lines[-1][1]:
                break
        assert lines[-1][1] and int(lines[-1][1]) != first, lines
        log = r.maillog(0)
        assert re.search(rf"authrelay\[{first}\]: NOQUEUE: auth=ok, sasl_method=PLAIN, "
                         r"sasl_username=alice, relay=unknown \[127\.0\.9\.1\]", log), log
        assert "Traceback" not in log
    finally:
        for c in idle:
            c.close()
