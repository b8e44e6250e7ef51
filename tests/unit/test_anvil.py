"""Shared anvil counters: one table seen by forked processes; windows slide."""

from __future__ import annotations

import os

from authrelay.config import from_dict
from authrelay.policy.anvil import SharedThrottle
from authrelay.policy.counters import SharedCounters
from authrelay.policy.throttle import Pool

ALL = (Pool("*", 0),)


def test_counts_cross_fork() -> None:
    s = SharedCounters(slots=1024)
    # Keys share a counter when their slots collide (the per-start secret decides): the
    # address counted and the one compared with take slots of their own.
    star = s._slot("*")
    ip = next(k for k in (f"192.0.2.{i}" for i in range(1, 255)) if s._slot(k) != star)
    other = next(k for k in (f"198.51.100.{i}" for i in range(1, 255))
                 if s._slot(k) not in (star, s._slot(ip)))
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
    assert s.gauge(ip) == 1 and s.gauge("*") == 1
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
    assert s.gauge("*") == 3


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
    s = SharedCounters(slots=1024)
    a, b = SharedThrottle(cfg, s), SharedThrottle(cfg, s)  # two workers
    await a.auth_failed("198.51.100.7", "alice")
    assert not await b.auth_locked("198.51.100.7", "alice")
    await b.auth_failed("198.51.100.7", "alice")
    assert await a.auth_locked("198.51.100.7", "alice")
    assert await b.auth_locked("198.51.100.7", "bob")
    assert not await a.auth_locked("198.51.100.8", "alice")
