"""Redis shared counters (policy/shared.py) against a real redis-server the test starts.

Two SharedCounters play two nodes: counts are shared and exact under concurrency, window
keys expire, known addresses are seen by both, client-chosen keys are bounded; Redis
stopped: every call answers None at once (the caller counts locally) and the maillog says
so; Redis back: shared again, and the maillog says that too.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scalerig import RedisServer
from support.wait import until

from authrelay import maillog
from authrelay.policy.shared import SharedCounters, redact_url

pytestmark = [pytest.mark.external, pytest.mark.slow]


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    r = RedisServer().start()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture
def rs(redis_srv: RedisServer) -> Iterator[RedisServer]:
    if redis_srv.proc is None:
        redis_srv.start()
    import redis

    c = redis.Redis.from_url(redis_srv.url)
    c.flushdb()
    c.close()
    yield redis_srv
    if redis_srv.proc is None:
        redis_srv.start()


@pytest.fixture
def mlog(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "maillog"
    old = maillog._current
    maillog.configure(f"file:{path}")
    try:
        yield path
    finally:
        maillog.get().flush()
        maillog._current = old


async def test_two_nodes_share_exact_counts(rs: RedisServer) -> None:
    a, b = SharedCounters(rs.url), SharedCounters(rs.url)
    try:
        assert await a.add("auth_ip", "192.0.2.7", 900.0) == 1
        assert await b.add("auth_ip", "192.0.2.7", 900.0) == 2
        assert await a.count("auth_ip", "192.0.2.7", 900.0) == 2
        assert await b.count("auth_ip", "192.0.2.8", 900.0) == 0
        # Concurrent increments from both nodes: atomic, none lost.
        await asyncio.gather(*(n.add("user_rcpts", "alice", 3600.0, 3)
                               for _ in range(100) for n in (a, b)))
        assert await a.count("user_rcpts", "alice", 3600.0) == 600
        # Several windows in one round trip.
        got = await a.windows([("auth_ip", "192.0.2.7", 900.0, 1),
                               ("auth_user", "bob", 900.0, 1),
                               ("auth_user", "carol", 900.0, 0)])
        assert got == [3, 1, 0]
    finally:
        await a.close()
        await b.close()


async def test_keys_expire_and_are_bounded(rs: RedisServer) -> None:
    import redis.asyncio as aioredis

    a = SharedCounters(rs.url)
    r = aioredis.Redis.from_url(rs.url)
    try:
        await a.add("rate_ip", "192.0.2.9", 60.0)
        long_user = "x" * 5000 + "@example.org"
        await a.add("auth_user", long_user, 900.0)
        await a.add("auth_user", "evil\r\nname", 900.0)
        keys = [k.decode() for k in await r.keys("authrelay:*")]
        keys.remove("authrelay:generation")  # one per Redis lifetime (SharedCounters.returns)
        assert len(keys) == 3
        assert all(len(k) < 120 for k in keys)
        assert not any("\r" in k or "xxxx" in k for k in keys)
        for k in keys:
            ttl = await r.ttl(k)
            assert 0 < ttl <= 2 * (900 if ":auth_user:" in k else 60) + 1
        assert await a.count("auth_user", long_user, 900.0) == 1
    finally:
        await a.close()
        await r.aclose()


async def test_known_addresses_are_shared(rs: RedisServer) -> None:
    a, b = SharedCounters(rs.url), SharedCounters(rs.url)
    try:
        month = 86400 * 30
        assert await b.is_known("alice", "198.51.100.0/24", month) is False
        assert await a.remember("alice", "198.51.100.0/24", month)
        assert await b.is_known("alice", "198.51.100.0/24", month) is True
        assert await b.is_known("alice", "203.0.113.0/24", month) is False
        assert await b.is_known("mallory", "198.51.100.0/24", month) is False
    finally:
        await a.close()
        await b.close()


async def test_add_soon_reports_back(rs: RedisServer) -> None:
    a = SharedCounters(rs.url)
    got: list[float | None] = []
    try:
        assert a.add_soon("rate_ip", "192.0.2.10", 60.0, 1, got.append)
        assert a.add_soon("rate_ip", "192.0.2.10", 60.0, 1, got.append)
        await until(lambda: len(got) == 2, "both answers")
        assert sorted(got) == [1, 2]  # type: ignore[type-var]
    finally:
        await a.close()


async def test_redis_down_then_back(rs: RedisServer, mlog: Path) -> None:
    a = SharedCounters(rs.url, probe_interval=0.1)
    try:
        assert await a.add("auth_ip", "192.0.2.11", 900.0) == 1
        rs.stop()
        assert await a.add("auth_ip", "192.0.2.11", 900.0) is None
        assert not a.up
        # Down: answered at once, without asking Redis again.
        assert await a.count("auth_ip", "192.0.2.11", 900.0) is None
        assert await a.is_known("alice", "198.51.100.0/24", 86400) is None
        assert not a.add_soon("rate_ip", "192.0.2.11", 60.0, 1, lambda _c: None)
        rs.start()
        await until(lambda: a.up, "the probe finding Redis back")
        # A restarted Redis without persistence starts empty: counting resumes from 0.
        assert await a.add("auth_ip", "192.0.2.11", 900.0) == 1
    finally:
        await a.close()
    maillog.get().flush()
    text = mlog.read_text()
    assert "shared counters unreachable: counting locally on this node" in text
    assert "shared counters reachable again: counting in Redis" in text
    assert text.count("unreachable") == 1  # said once, not per call


async def test_a_hung_redis_is_named_without_an_empty_reason(rs: RedisServer,
                                                            mlog: Path) -> None:
    """Redis hung (SIGSTOP: no answer, no close): the client's TimeoutError has no message,
    and the line read `reason=TimeoutError: ` with nothing after it (att saw it on the
    farm, as PostgreSQL's `user database unreachable` would). Now `reason=TimeoutError`."""
    import os
    import signal

    a = SharedCounters(rs.url, timeout=0.5, probe_interval=0.1)
    assert rs.proc is not None
    try:
        assert await a.add("auth_ip", "192.0.2.12", 900.0) == 1
        os.kill(rs.proc.pid, signal.SIGSTOP)
        try:
            assert await a.add("auth_ip", "192.0.2.12", 900.0) is None
        finally:
            os.kill(rs.proc.pid, signal.SIGCONT)
        await until(lambda: a.up, "the probe finding Redis back")
    finally:
        await a.close()
    maillog.get().flush()
    line = next(ln for ln in mlog.read_text().splitlines() if "unreachable" in ln)
    assert line.endswith(", reason=TimeoutError"), line


def test_redact_url() -> None:
    assert redact_url("redis://:pw@10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    assert redact_url("rediss://user:pw@h/2") == "rediss://h/2"


# --------------------------------------------------------------------------- RedisThrottle

def _cfg(rs: RedisServer, **limits: object):  # noqa: ANN202
    from authrelay.config import from_dict

    return from_dict({"limits": {"shared": rs.url, **limits},
                      "auth": {"max_failures_per_ip": 3, "max_failures_per_user": 5}})


def _node(cfg, probe: float = 1.0):  # noqa: ANN001, ANN202
    from authrelay.policy.shared import RedisThrottle
    from authrelay.policy.throttle import LocalThrottle

    return RedisThrottle(cfg, SharedCounters(cfg.limits.shared, probe_interval=probe),
                         LocalThrottle(cfg))


async def test_throttle_auth_lockout_across_nodes(rs: RedisServer) -> None:
    cfg = _cfg(rs)
    a, b = _node(cfg), _node(cfg)
    try:
        for _ in range(3):
            await a.auth_failed("192.0.2.20", "nobody")
        assert await b.auth_locked("192.0.2.20", "alice")  # the address, whatever user
        assert not await b.auth_locked("192.0.2.21", "alice")  # nobody else
        # Per user: alice attacked from many addresses through both nodes ...
        for i in range(5):
            await (a if i % 2 else b).auth_failed(f"203.0.113.{i}", "Alice")
        assert await a.auth_locked("198.51.100.9", "alice")  # unknown network: locked
        # ... but a network alice logged in from (through the other node) is spared.
        await b.auth_succeeded("198.51.100.7", "alice")
        assert not await a.auth_locked("198.51.100.9", "alice")  # same /24: known
    finally:
        await a.counters.close()
        await b.counters.close()


async def test_throttle_user_rates_across_nodes(rs: RedisServer) -> None:
    cfg = _cfg(rs, user_messages_per_hour=3, user_recipients_per_hour=10)
    a, b = _node(cfg), _node(cfg)
    try:
        await a.user_sent("alice", 4)
        await b.user_sent("alice", 4)
        assert await a.user_may_send("alice")
        assert not await b.user_may_add_rcpt("alice", 2)  # 8 + 2 reaches 10
        assert await b.user_may_add_rcpt("alice", 1)
        await a.user_sent("alice", 1)
        assert not await b.user_may_send("alice")  # 3 messages: the farm's limit
        assert await b.user_may_send("bob")
    finally:
        await a.counters.close()
        await b.counters.close()


def _answers(node: Any) -> list[float | None]:
    """Redis's answers to `node`'s background updates (SharedCounters.add_soon), listed
    once the node has applied each: the event a test awaits instead of a sleep."""
    got: list[float | None] = []
    add_soon = node.counters.add_soon

    def spy(table: str, key: str, period: float, n: int,
            done: Callable[[float | None], None]) -> bool:
        def answered(count: float | None) -> None:
            done(count)
            got.append(count)
        return add_soon(table, key, period, n, answered)

    node.counters.add_soon = spy
    return got


async def test_throttle_connection_rate_across_nodes(rs: RedisServer) -> None:
    from authrelay.policy.throttle import Pool

    cfg = _cfg(rs, connection_rate_per_ip=4, max_connections_per_ip=100)
    a, b = _node(cfg), _node(cfg)
    pools = [Pool("*", 0)]
    a_answers, b_answers = _answers(a), _answers(b)
    try:
        for _ in range(3):
            assert a.connect("192.0.2.30", pools).admitted
            a.disconnect("192.0.2.30", pools)
        await until(lambda: len(a_answers) == 3, "A's three updates answered by Redis")
        # Node B has not seen this address: its first connection learns the farm's count.
        assert b.connect("192.0.2.30", pools).admitted
        await until(lambda: b_answers, "B's update answered with the farm's count")
        assert b_answers == [4]
        adm = b.connect("192.0.2.30", pools)
        assert not adm.admitted and adm.reason == "rate_ip"
        assert b.level("*") == 1  # the refused one was not left counted
        assert b.connect("192.0.2.31", pools).admitted  # other addresses unaffected
    finally:
        await a.counters.close()
        await b.counters.close()


async def test_throttle_farm_rate_counts_an_ipv6_client_by_its_prefix(rs: RedisServer
                                                                       ) -> None:
    """connection_rate_per_ip counts an IPv6 client by its /64 (ipv6_prefix_length,
    docs/LIMITS.md) in the farm too: node A's connections from one address of a /64 and
    node B's from another are one client's. Before the fix the farm's count was kept per
    whole address, so a client rotating through its /64 across the nodes was never
    refused by the farm (each node's own count stopping it only at the node's rate)."""
    from authrelay.policy.throttle import Pool

    cfg = _cfg(rs, connection_rate_per_ip=2, max_connections_per_ip=100)
    a, b = _node(cfg), _node(cfg)
    pools = [Pool("*", 0)]
    a_answers, b_answers = _answers(a), _answers(b)
    try:
        for host in ("2001:db8:5:6::1", "2001:db8:5:6::2"):
            assert a.connect(host, pools).admitted
            a.disconnect(host, pools)
        await until(lambda: len(a_answers) == 2, "A's two updates answered by Redis")
        # B has seen nothing from this /64: its first connection, from a third address
        # in it, learns the farm's count (three attempts: past the rate of 2).
        b.connect("2001:db8:5:6::3", pools)
        await until(lambda: b_answers, "B's update answered with the farm's count")
        assert b_answers == [3]
        adm = b.connect("2001:db8:5:6::4", pools)
        assert not adm.admitted and adm.reason == "rate_ip"
        assert b.connect("2001:db8:5:7::1", pools).admitted  # another /64: unaffected
    finally:
        await a.counters.close()
        await b.counters.close()


async def test_throttle_falls_back_to_local_counters(rs: RedisServer, mlog: Path) -> None:
    cfg = _cfg(rs)
    a = _node(cfg, probe=0.1)
    try:
        await a.auth_failed("192.0.2.40", "x")
        rs.stop()
        # Redis gone: the node's own counts decide (this failure and the one before).
        await a.auth_failed("192.0.2.40", "x")
        assert not await a.auth_locked("192.0.2.40", "x")
        await a.auth_failed("192.0.2.40", "x")
        assert await a.auth_locked("192.0.2.40", "x")
        assert not await a.auth_locked("192.0.2.41", "x")
        rs.start()
        await until(lambda: a.counters.up, "the probe finding Redis back")
        # Shared again (Redis restarted empty), but this node's own failures still count.
        assert await a.auth_locked("192.0.2.40", "x")
        assert not await a.auth_locked("192.0.2.41", "x")
    finally:
        await a.counters.close()
    maillog.get().flush()
    assert "counting locally on this node" in mlog.read_text()


async def test_round_trips_per_transaction(rs: RedisServer) -> None:
    """MAIL reads both per-user counts at once; its RCPTs use that reading; a known
    address is written once per hour per process, not per AUTH."""
    import redis.asyncio as aioredis

    cfg = _cfg(rs, user_messages_per_hour=100, user_recipients_per_hour=5)
    a = _node(cfg)
    r = aioredis.Redis.from_url(rs.url)

    async def calls() -> int:
        stats = await r.info("commandstats")
        return sum(v["calls"] for k, v in stats.items()
                   if k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_set"))

    try:
        await a.counters.count("warm", "up", 60.0)  # (its generation key: once per Redis)
        await r.config_resetstat()
        assert await a.user_may_send("carol")
        assert await a.user_may_add_rcpt("carol", 0)
        assert await a.user_may_add_rcpt("carol", 4)
        assert not await a.user_may_add_rcpt("carol", 5)  # 0 + 5 reaches the limit
        assert await calls() == 1
        await a.user_sent("carol", 3)
        assert await calls() == 2
        assert await a.user_may_send("carol")
        assert not await a.user_may_add_rcpt("carol", 2)  # 3 sent + 2 pending
        await a.auth_succeeded("198.51.100.5", "carol")
        await a.auth_succeeded("198.51.100.6", "carol")  # same /24: written once
        assert await calls() == 4
        assert await a.known.is_known("carol", "198.51.100.0/24")
    finally:
        await a.counters.close()
        await r.aclose()


def test_check_config_pings_redis(tmp_path: Path, rs: RedisServer) -> None:
    import subprocess

    conf = tmp_path / "authrelay.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n[limits]\nshared = "{rs.url}"\n')

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(conf)],
                              capture_output=True, text=True, timeout=60)

    out = check()
    assert out.returncode == 0 and "limits.shared" not in out.stderr, out.stderr
    rs.stop()
    out = check()
    assert out.returncode == 0 and "warning: limits.shared" in out.stderr


async def test_a_process_counts_through_one_redis_client(rs: RedisServer, mlog: Path,
                                                         tmp_path: Path) -> None:
    """The receiving side's throttle and containment count through the process's one
    Redis client: Redis going away is one maillog line per process (SCALING.md), one
    connection pool, and once the throttle has found it gone, containment does not wait
    on it again."""
    from authrelay import wiring
    from authrelay.config import from_dict
    from authrelay.maillog import MailLog
    from authrelay.spool.store import Spool

    cfg = from_dict({"state_dir": str(tmp_path / "state"), "limits": {"shared": rs.url}})
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.ensure_dirs()
    server = wiring.server(cfg, spool, None, auth=None, checks=None,
                           maillog=MailLog(f"file:{tmp_path}/server.log"))
    assert server.containment is not None
    try:
        await server.throttle.auth_failed("192.0.2.50", "alice")
        await server.containment.message_accepted("alice", "Q1", ["bob@example.org"],
                                                  "192.0.2.50")
        rs.stop()
        await server.throttle.auth_failed("192.0.2.50", "alice")
        await server.containment.message_accepted("alice", "Q2", ["carol@example.org"],
                                                  "192.0.2.50")
    finally:
        await server.containment.close()  # closes the Redis client (the throttle's too)
    maillog.get().flush()
    assert mlog.read_text().count("shared counters unreachable") == 1


@pytest.mark.parametrize("under", ["local", "shared"])
async def test_throttle_rate_counts_only_attempts_that_reach_it(rs: RedisServer,
                                                                under: str) -> None:
    """A farm node (the Redis throttle over the node's own, in process or the workers'
    shared memory) counts in the farm's per-address rate only the attempts its own
    throttle let reach the rate check (Throttle.connect's order: pools, the address's
    connections, then its rate): before the fix every attempt refused for a full pool or
    the per-address limit was sent to Redis too, and an eviction's retries counted one
    connection up to four times."""
    from authrelay import wiring
    from authrelay.policy import counters
    from authrelay.policy.throttle import Pool

    cfg = _cfg(rs, connection_rate_per_ip=2, max_connections_per_ip=1)
    shm = counters.SharedCounters(slots=4096) if under == "shared" else None
    node = wiring.throttle(cfg, counters.Share(shared=shm), None,
                           SharedCounters(rs.url))
    answers = _answers(node)
    free, full = (Pool("*", 0),), (Pool("*", 0), Pool("listener:x", 1))
    try:
        assert node.connect("192.0.2.50", full).admitted
        for _ in range(3):
            assert node.connect("192.0.2.50", full).reason == "pool:listener:x"
            assert node.connect("192.0.2.50", free).reason == "ip"
        node.disconnect("192.0.2.50", full)
        assert node.connect("192.0.2.50", free).admitted  # the farm's second attempt
        await until(lambda: len(answers) == 2, "both counted attempts answered")
        assert round(await node.counters.count("rate_ip", "192.0.2.50", 60.0)) == 2
        node.disconnect("192.0.2.50", free)
        assert node.connect("192.0.2.50", free).reason == "rate_ip"  # the third: past it
    finally:
        await node.counters.close()


@pytest.mark.parametrize("under", ["local", "shared"])
async def test_what_a_node_counted_while_redis_was_away_still_counts(
        rs: RedisServer, mlog: Path, under: str) -> None:
    """Redis comes back (here restarted empty; a node cut off from it is the same): the
    AUTH failures and the messages this node counted meanwhile still count on it, in
    both builds of a farm node. Before the fix the farm's answer replaced the node's
    own: an address locked out during the outage was let guess again, and a user past
    user_messages_per_hour could send as soon as Redis answered."""
    from authrelay import wiring
    from authrelay.policy import counters
    from authrelay.policy.shared import RedisThrottle

    cfg = _cfg(rs, user_messages_per_hour=2, user_recipients_per_hour=5)
    shm = counters.SharedCounters(slots=4096) if under == "shared" else None
    node = wiring.throttle(cfg, counters.Share(shared=shm), None,
                           SharedCounters(rs.url, probe_interval=0.1))
    assert isinstance(node, RedisThrottle)
    try:
        rs.stop()
        for _ in range(3):
            await node.auth_failed("192.0.2.60", "x")
        await node.user_sent("alice", 3)
        await node.user_sent("alice", 2)
        assert not node.counters.up
        assert await node.auth_locked("192.0.2.60", "y")
        assert not await node.user_may_send("alice")
        rs.start()
        await until(lambda: node.counters.up, "the probe finding Redis back")
        assert await node.auth_locked("192.0.2.60", "y")  # 3 failures: max_failures_per_ip
        assert not await node.auth_locked("192.0.2.61", "y")
        assert not await node.user_may_send("alice")  # 2 messages: the hour's limit
        assert not await node.user_may_add_rcpt("alice", 0)  # 5 recipients: the limit
        assert await node.user_may_send("bob")
        assert await node.sent_counts("alice") == (2, 5)
    finally:
        await node.counters.close()


async def test_known_address_days_applies_to_what_redis_holds(rs: RedisServer) -> None:
    """`[auth] known_address_days` means the same on a farm node as on a single one
    (known.py), SIGHUP included: 0 is "no address is known", and a shorter period
    applies to the logins recorded before it. Before the fix Redis kept a network known
    for the period it was written with (30 days), so after a reload to 0 every network
    a user had used stayed known to the whole farm, and with 0 from the start a login's
    network was known for a second."""
    from authrelay.config import from_dict

    def cfg(days: float):  # noqa: ANN202
        return from_dict({"limits": {"shared": rs.url},
                          "auth": {"max_failures_per_ip": 0, "max_failures_per_user": 2,
                                   "known_address_days": days}})

    a = _node(cfg(30))
    try:
        for _ in range(2):
            await a.auth_failed("203.0.113.9", "alice")
        await a.auth_succeeded("198.51.100.7", "alice")
        assert not await a.auth_locked("198.51.100.8", "alice")  # known: spared
        assert await a.auth_locked("192.0.2.8", "alice")  # elsewhere: locked
        a.reload(cfg(0))
        assert await a.auth_locked("198.51.100.8", "alice")  # no address is known now
        a.reload(cfg(30))
        assert not await a.auth_locked("198.51.100.8", "alice")  # the login still counts
        b = _node(cfg(0))
        try:
            await b.auth_succeeded("192.0.2.77", "alice")
            assert await b.auth_locked("192.0.2.78", "alice")
        finally:
            await b.counters.close()
    finally:
        await a.counters.close()


async def test_containment_counted_while_redis_was_away_still_counts(
        rs: RedisServer, mlog: Path, tmp_path: Path) -> None:
    """Containment's counters (policy/suspensions.State) fall back to the node's file
    while Redis is away; once Redis answers again the recipients counted meanwhile still
    count. Before the fix Redis's count alone decided: an account sending through one
    node during an outage was counted from what Redis held, and its outage spree was
    forgiven (here 6 distinct recipients read as 2)."""
    from authrelay.policy.suspensions import LocalStore, State

    state = State(LocalStore(tmp_path / "containment.db"),
                  redis=SharedCounters(rs.url, probe_interval=0.1), window=3600.0)
    try:
        await _outage_spree(rs, state, state)
    finally:
        await state.close()


async def _outage_spree(rs: RedisServer, counting: Any, asking: Any) -> None:
    """Containment States on one node's file: a spree of 6 recipients counted by
    `counting` while Redis is away still counts in `asking` once Redis is back."""
    limits = {"recipients": 100}
    assert (await asking.record("mallory", [("recipients", "a@example.net")], limits)
            ).recipients == 1
    rs.stop()
    got = await counting.record("mallory", [("recipients", f"r{i}@example.net")
                                            for i in range(6)], limits)
    assert got.recipients == 6  # the node's file: the outage's recipients
    rs.start()
    await until(lambda: counting.redis.up, "the probe finding Redis back")
    got = await asking.record("mallory", [("recipients", "b@example.net")], limits)
    assert got.recipients >= 6
    assert (await asking.record("bob", [("recipients", "c@example.net")], limits)
            ).recipients == 1


async def test_a_known_address_is_written_again_after_redis_was_away(
        rs: RedisServer, mlog: Path) -> None:
    """A node writes a user's known network to Redis at most once an hour; once Redis
    has been away and back (here restarted empty) the next login writes it again, so the
    other nodes know it. Before the fix the write was skipped for the rest of the hour:
    a user attacked past max_failures_per_user was locked out on the other nodes from
    the network they had just logged in from."""
    cfg = _cfg(rs)
    a, b = _node(cfg, probe=0.1), _node(cfg)
    try:
        await a.auth_succeeded("198.51.100.7", "alice")
        assert await b.known.is_known("alice", "198.51.100.0/24")
        rs.stop()
        await a.auth_failed("203.0.113.1", "alice")  # A finds Redis away
        rs.start()
        await until(lambda: a.counters.up, "the probe finding Redis back")
        assert not await b.known.is_known("alice", "198.51.100.0/24")  # restarted empty
        await a.auth_succeeded("198.51.100.7", "alice")
        assert await b.known.is_known("alice", "198.51.100.0/24")
    finally:
        await a.counters.close()
        await b.counters.close()


async def test_a_known_address_is_written_again_after_a_redis_restart_between_calls(
        rs: RedisServer, mlog: Path) -> None:
    """Redis restarted empty while the node made no call (systemctl restart between two
    logins): redis-py's pool reconnects on checkout, so no call fails and the node never
    found Redis away (64122a8 keyed the re-write on that): the next login did not write
    the network again for up to an hour, so the other nodes did not know it."""
    cfg = _cfg(rs)
    a, b = _node(cfg, probe=0.1), _node(cfg)
    c = None
    try:
        await a.auth_succeeded("198.51.100.7", "alice")
        assert await b.known.is_known("alice", "198.51.100.0/24")
        rs.stop()
        rs.start()
        c = _node(cfg)  # (another node, its first call after the restart)
        assert not await c.known.is_known("alice", "198.51.100.0/24")  # restarted empty
        assert not await a.auth_locked("198.51.100.7", "alice")  # (a session's AUTH)
        assert a.counters.up  # A's calls go on as ever: it never found Redis away
        await a.auth_succeeded("198.51.100.7", "alice")
        assert await c.known.is_known("alice", "198.51.100.0/24")
    finally:
        for n in (a, b, c):
            if n is not None:
                await n.counters.close()


async def test_containment_counted_by_another_process_while_redis_was_away_still_counts(
        rs: RedisServer, mlog: Path, tmp_path: Path) -> None:
    """The node's file is every worker's: an account's outage spree counted there by one
    worker still counts when Redis answers again in another worker (or one started
    since), which never counted in the file itself. Before the fix only the process that
    had counted there read the file back (bf2510d): the other read Redis alone (1)."""
    from authrelay.policy.suspensions import LocalStore, State

    path = tmp_path / "containment.db"
    a = State(LocalStore(path), redis=SharedCounters(rs.url, probe_interval=0.1),
              window=3600.0)
    b = State(LocalStore(path), redis=SharedCounters(rs.url, probe_interval=0.1),
              window=3600.0)
    try:
        await _outage_spree(rs, a, b)
    finally:
        await a.close()
        await b.close()
