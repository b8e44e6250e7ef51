"""Shared anvil counters: one table seen by forked processes; windows slide."""

from __future__ import annotations

import os

from support.slots import ApartCounters

from authrelay.config import from_dict
from authrelay.policy.anvil import SharedThrottle
from authrelay.policy.counters import ADMIT, POOL_SLOTS, SharedCounters
from authrelay.policy.throttle import Pool

ALL = (Pool("*", 0),)


def test_counts_cross_fork() -> None:
    s = SharedCounters(slots=1024)
    # Addresses share a counter when their slots collide (the per-start secret decides):
    # the address counted and the one compared with take slots of their own.
    ip = "192.0.2.1"
    other = next(k for k in (f"198.51.100.{i}" for i in range(1, 255))
                 if s._slot(k) != s._slot(ip))
    pid = os.fork()
    if pid == 0:  # child: what a worker does
        code = 2  # an exception: the child must still exit here, never run pytest on
        try:
            code = 0 if s.try_acquire(ip, ALL, 5).admitted else 1
            s.window_add("auth_ip", ip, 60.0, 1000.0, 3)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.gauge(ip) == 1 and s.pool_level("*") == 1  # the pool the child first counted in
    assert s.window_count("auth_ip", ip, 60.0, 1000.0) == 3
    assert s.gauge(other) == 0  # another key (in another slot): its own counter


def test_limits_refuse() -> None:
    s = SharedCounters(slots=1024)
    assert s.try_acquire("a", ALL, 2).admitted
    assert s.try_acquire("a", ALL, 2).admitted
    r = s.try_acquire("a", ALL, 2).refusal
    assert r is not None and (r.code, r.enhanced) == (421, "4.7.0")
    s.release("a", ALL)
    assert s.try_acquire("a", ALL, 2).admitted
    assert s.try_acquire("b", (Pool("*", 4),), 0).admitted  # 3 in total now
    assert s.try_acquire("c", (Pool("*", 3),), 0).reason == "pool:*"  # the global limit
    assert s.pool_level("*") == 3


def test_pools_never_share_a_counter_with_an_address_or_each_other() -> None:
    """With one slot for every address, the pools are still exact and apart: an address
    never counts a pool's connections toward max_connections_per_ip (before, an address
    whose slot was the one of "*" was refused whenever the server held that many)."""
    s = SharedCounters(slots=1)
    pools = [(Pool("*", 0), Pool("class:smtp", 0), Pool(f"listener:smtp{i}", 0))
             for i in range(40)]
    for i, p in enumerate(pools):
        assert s.try_acquire(f"192.0.2.{i}", p, 0).admitted
    assert s.pool_level("*") == 40 and s.pool_level("class:smtp") == 40
    assert all(s.pool_level(f"listener:smtp{i}") == 1 for i in range(40))
    assert s.gauge("198.51.100.1") == 40  # the addresses' one slot: all 40 addresses
    assert s.try_acquire("198.51.100.1", (Pool("listener:other", 1),), 41).admitted
    assert s.try_acquire("198.51.100.2", (Pool("listener:other", 1),), 0).reason == \
        "pool:listener:other"
    for i, p in enumerate(pools):
        s.release(f"192.0.2.{i}", p)
    assert s.pool_level("*") == 0 and s.pool_level("listener:other") == 1


def test_pool_counters_are_found_by_every_process() -> None:
    """A pool first counted in by a worker has the same counter in the master and in the
    other workers (the key table is in the shared mapping, not the per-process cache)."""
    s = SharedCounters(slots=64)
    keys = [f"listener:l{i}" for i in range(30)]
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = 0 if all(s.try_acquire("192.0.2.1", (Pool(k, 0),), 0).admitted
                            for k in keys) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [s.pool_level(k) for k in reversed(keys)] == [1] * 30
    assert s.pool_level("listener:never") == 0


def test_pools_past_the_table_share_a_counter_stricter_never_lost() -> None:
    """More pool keys than POOL_SLOTS (listeners renamed by many reloads): the first ones
    keep their own counters; a key past the table shares one, so its level can only read
    higher (stricter), and every connection still comes back out on release."""
    s = SharedCounters(slots=64)
    keys = [f"listener:l{i}" for i in range(POOL_SLOTS + 40)]
    for k in keys:
        assert s.try_acquire("192.0.2.1", (Pool(k, 0),), 0).admitted
    levels = [s.pool_level(k) for k in keys]
    assert all(n >= 1 for n in levels)  # never lower than its own count
    # every counter of the table in use, holding each connection once: the last 40
    # keys each share one of them
    counters = {s._pool(k): s.pool_level(k) for k in keys}
    assert len(counters) == POOL_SLOTS and sum(counters.values()) == len(keys)
    for k in keys:
        s.release("192.0.2.1", (Pool(k, 0),))
    assert [s.pool_level(k) for k in keys] == [0] * len(keys)


def test_window_slides() -> None:
    s = SharedCounters(slots=64)
    for _ in range(10):
        s.window_add("rate_ip", "x", 60.0, 600.0)  # window 10, at its start
    assert s.window_count("rate_ip", "x", 60.0, 630.0) == 10
    # half-way into the next window, half of the previous one still counts
    assert s.window_count("rate_ip", "x", 60.0, 690.0) == 5.0
    assert s.window_count("rate_ip", "x", 60.0, 800.0) == 0  # two windows later: gone


async def test_shared_throttle_auth_lock() -> None:
    cfg = from_dict({"auth": {"max_failures_per_ip": 2, "max_failures_per_user": 0}})
    s = ApartCounters(slots=1024)  # .7 and .8 apart (the real table: once in 1024 runs)
    a, b = SharedThrottle(cfg, s), SharedThrottle(cfg, s)  # two workers
    await a.auth_failed("198.51.100.7", "alice")
    assert not await b.auth_locked("198.51.100.7", "alice")
    await b.auth_failed("198.51.100.7", "alice")
    assert await a.auth_locked("198.51.100.7", "alice")
    assert await b.auth_locked("198.51.100.7", "bob")
    assert not await a.auth_locked("198.51.100.8", "alice")


def test_what_a_dead_worker_held_is_given_back() -> None:
    """forget(i) subtracts worker i's ledger row (adopt) from every gauge, and only it."""
    s = SharedCounters(workers=2)  # 65,536 slots: these few keys never share one
    pools = [Pool("*", 0), Pool("listener:a", 0)]
    s.try_acquire("192.0.2.9", pools, 0)  # the master's own (no ledger): stays
    pid = os.fork()
    if pid == 0:  # worker 0: three connections, one released, one pending handshake
        try:
            s.adopt(0)
            for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
                s.try_acquire(ip, pools, 0)
            s.release("192.0.2.2", pools)
            s.gauge_add("pending:192.0.2.1", 1)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert (s.pool_level("*"), s.gauge("192.0.2.1"), s.gauge("pending:192.0.2.1")) == (3, 2, 1)
    assert s.forget(0) == 2 * 3 + 1  # two pools and the address, twice; the pending one
    assert (s.pool_level("*"), s.pool_level("listener:a")) == (1, 1)
    assert (s.gauge("192.0.2.1"), s.gauge("pending:192.0.2.1"), s.gauge("192.0.2.9")) \
        == (0, 0, 1)
    assert s.forget(0) == 0 and s.forget(1) == 0 and s.forget(7) == 0


def test_a_worker_killed_in_the_middle_of_a_count_leaves_no_count_held() -> None:
    """kill -9 between a connection's counter writes (under the lock: its pools counted,
    its address not yet): forget() must not leave a count that nobody holds. Before the
    fix the counters were written before the ledger, so the pools' counts taken by the
    dead worker were never given back: each such death held a pool slot until the next
    start. The kill lands at that very line (a trace hook in the worker)."""
    import linecache
    import signal
    import sys
    from types import FrameType
    from typing import Any

    s = SharedCounters(workers=1)
    pools = (Pool("*", 0), Pool("listener:a", 0))
    pid = os.fork()
    if pid == 0:
        try:
            s.adopt(0)

            def line(frame: FrameType, event: str, _arg: Any) -> Any:
                if event == "line" and linecache.getline(
                        frame.f_code.co_filename, frame.f_lineno).strip() == "a[ip_i] += 1":
                    os.kill(os.getpid(), signal.SIGKILL)
                return line

            sys.settrace(lambda f, _e, _a: line if f.f_code.co_name == "try_acquire"
                         else None)
            s.try_acquire("192.0.2.1", pools, 0)
        finally:
            os._exit(3)  # not reached: killed in try_acquire
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    s.forget(0)
    assert (s.pool_level("*"), s.pool_level("listener:a"), s.gauge("192.0.2.1")) == (0, 0, 0)
    assert s.try_acquire("192.0.2.1", (Pool("*", 1),), 1).admitted  # the lock is free too


def test_a_worker_killed_holding_the_lock_wedges_nobody() -> None:
    """kill -9 (or the OOM killer) may land while a worker holds the table's lock (a few
    microseconds per count): the next taker gets it (a robust mutex), where a semaphore
    stayed taken for good and every worker blocked at its next accept."""
    import signal
    import threading

    s = SharedCounters(workers=1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            s._lock.__enter__()
            os.write(w, b"x")  # holding it
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.waitpid(pid, 0)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(s.try_acquire("192.0.2.1", ALL, 5)),
                         daemon=True)
    t.start()
    t.join(30)  # a liveness guard, not a measure: blocked for good on the old lock
    assert got and got[0] == ADMIT
    assert s.gauge("192.0.2.1") == 1


def test_each_pools_tuple_counts_in_its_own_pools_whatever_came_before() -> None:
    """The counter indices are remembered per pools tuple (an Acceptor's, the same for
    every connection): a new tuple (a reload), even one made where the last one was freed
    (the same id), and a list changed in place count in the pools they name now."""
    s = SharedCounters(workers=1)
    s.adopt(0)
    for n in range(50):
        pools = (Pool("*", 0), Pool(f"listener:n{n}", 1))
        assert s.try_acquire("192.0.2.1", pools, 0).admitted
        assert s.try_acquire("192.0.2.1", pools, 0).reason == f"pool:listener:n{n}"
        s.release("192.0.2.1", pools)
        assert s.pool_level(f"listener:n{n}") == 0 and s.pool_level("*") == 0
        del pools
    changing = [Pool("*", 0), Pool("listener:x", 0)]
    s.try_acquire("192.0.2.2", changing, 0)
    changing[1] = Pool("listener:y", 0)
    s.try_acquire("192.0.2.2", changing, 0)
    assert (s.pool_level("listener:x"), s.pool_level("listener:y"), s.pool_level("*")) \
        == (1, 1, 2)
    assert s.forget(0) == 2 + 2 + 2  # the ledger holds what the gauges hold


def test_connections_and_one_over_the_per_address_limit() -> None:
    """`connections(key)` is the gauge max_connections_per_ip is checked against, in
    process and across workers; `ip_over` admits one more (a newcomer counted into the
    slot of its own address's connection it evicts), never two."""
    from authrelay.policy.throttle import LocalThrottle

    cfg = from_dict({"limits": {"max_connections_per_ip": 2, "connection_rate_per_ip": 0}})
    for t in (LocalThrottle(cfg), SharedThrottle(cfg, SharedCounters(slots=1024))):
        assert t.connect("192.0.2.7", ALL).admitted
        assert t.connect("192.0.2.7", ALL).admitted
        assert t.connections("192.0.2.7") == 2
        assert t.connect("192.0.2.7", ALL).reason == "ip"
        assert t.connect("192.0.2.7", ALL, ip_over=True).admitted
        assert t.connections("192.0.2.7") == 3
        assert t.connect("192.0.2.7", ALL, ip_over=True).reason == "ip"
        t.disconnect("192.0.2.7", ALL)
        assert t.connections("192.0.2.7") == 2
        assert t.connections("192.0.2.8") == 0
