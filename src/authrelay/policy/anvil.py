"""Shared anvil: the throttle counters of all receiving workers in one shared memory table.

Owns cross-process counting for `workers` > 1. The kernel spreads one client's connections
over the workers (SO_REUSEPORT hashes the 4-tuple), so per-IP and per-user limits are only
exact if every worker counts in the same place. Postfix's anvil(8) is a server process; here
the table lives in an anonymous shared mapping made by the parent before it forks, guarded by
one process-shared lock, so a check costs a hash and a few memory accesses, no round trip.

Contract: keys (IPs, user names) are hashed with a per-start secret into `SLOTS` slots per
table. Two keys that share a slot share a counter: that can only make a limit stricter for
them, never looser, and with 65,536 slots it is rare. Gauges (concurrent connections) are
exact; rates use two fixed windows weighted into a sliding estimate (the previous window
counts for the part of it that still overlaps the sliding window).
Pools (global, per listener, the smtp class) are gauges in the same slot table under
their pool keys; a connection is checked against all its pools and its IP and counted in
all of them under the one lock, so no two workers can both take the last slot.
`connection_rate` is one shared GCRA schedule (nanoseconds of CLOCK_MONOTONIC, which
is system-wide, so all workers read the same clock).
Failure policy: none; a slot overflow cannot happen (64-bit counters).
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import Any

from authrelay import replies
from authrelay.config import Config
from authrelay.policy.throttle import (
    ADMIT,
    PENDING,
    Admission,
    LocalThrottle,
    Pool,
    _locked,
    gcra,
    pool_refusal,
    source_net,
)

SLOTS = 1 << 16
_WINDOW_TABLES = ("rate_ip", "auth_ip", "auth_user", "auth_usernet", "user_msgs",
                  "user_rcpts")


class SharedCounters:
    """Gauges and sliding-window counters in shared memory; create before fork()."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._base: dict[str, int] = {"tat": 0, "conns": 1}
        size = 1 + slots
        for name in _WINDOW_TABLES:
            self._base[name] = size
            size += 3 * slots  # (window number, count in it, count in the one before)
        self._mm = mmap.mmap(-1, size * 8)  # anonymous + MAP_SHARED: children see it
        self._a = memoryview(self._mm).cast("q")
        self._lock = multiprocessing.get_context("fork").Lock()
        self._key = os.urandom(16)

    def _slot(self, key: str) -> int:
        h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                            key=self._key).digest()
        return int.from_bytes(h, "little") % self.slots

    # gauges --------------------------------------------------------------------
    def gauge(self, key: str) -> int:
        return self._a[self._base["conns"] + self._slot(key)]

    def gauge_add(self, key: str, delta: int) -> None:
        i = self._base["conns"] + self._slot(key)
        with self._lock:
            self._a[i] = max(0, self._a[i] + delta)

    def try_acquire(self, ip: str, pools: Sequence[Pool], max_ip: int,
                    rate: float = 0.0, max_delay: float = 0.0,
                    now: float | None = None) -> Admission:
        """Check every pool, the IP gauge and the connection rate; count the connection in
        all of them, atomically across workers (`max_ip` 0: no per-IP limit; `rate` 0:
        no rate)."""
        a, base = self._a, self._base["conns"]
        idx = [(base + self._slot(p.key), p) for p in pools]
        ip_i = base + self._slot(ip)
        with self._lock:
            for i, p in idx:
                if p.cap and a[i] >= p.cap:
                    return pool_refusal(p.key)
            if max_ip and a[ip_i] >= max_ip:
                return Admission(replies.TOO_MANY_FROM_IP, 0.0, "ip")
            delay = 0.0
            if rate:
                t = time.monotonic() if now is None else now
                delay, tat = gcra(a[0] / 1e9, t, rate, max_delay)
                if delay < 0:
                    return Admission(replies.RATE_LIMITED, 0.0, "rate")
                a[0] = int(tat * 1e9)
            for i, _p in idx:
                a[i] += 1
            a[ip_i] += 1
        return Admission(None, delay) if delay else ADMIT

    def release(self, ip: str, pools: Sequence[Pool]) -> None:
        a, base = self._a, self._base["conns"]
        with self._lock:
            for i in [base + self._slot(p.key) for p in pools] + [base + self._slot(ip)]:
                a[i] = max(0, a[i] - 1)

    # windows -------------------------------------------------------------------
    def _window(self, table: str, key: str, period: float, now: float, add: int) -> float:
        a = self._a
        i = self._base[table] + 3 * self._slot(key)
        win = int(now // period)
        with self._lock:
            if a[i] != win:
                # Roll forward: the window before is kept only if it is the adjacent one.
                a[i + 2] = a[i + 1] if a[i] == win - 1 else 0
                a[i + 1] = 0
                a[i] = win
            a[i + 1] += add
            cur, prev = a[i + 1], a[i + 2]
        overlap = 1.0 - (now - win * period) / period
        return cur + prev * overlap

    def window_add(self, table: str, key: str, period: float, now: float, n: int = 1
                   ) -> float:
        return self._window(table, key, period, now, n)

    def window_count(self, table: str, key: str, period: float, now: float) -> float:
        return self._window(table, key, period, now, 0)


class SharedThrottle(LocalThrottle):
    """The Throttle whose counts live in a SharedCounters table (exact across workers)."""

    def __init__(self, cfg: Config, shared: SharedCounters, known: Any = None) -> None:
        self.shared = shared
        super().__init__(cfg, known=known)  # Share() whole: the limits are shared, not divided

    def connect(self, ip: str, pools: Sequence[Pool], *, exempt: bool = False) -> Admission:
        s, now, ip = self.shared, time.monotonic(), self.key(ip)
        if not exempt and self.rate_ip_limit and \
                s.window_add("rate_ip", ip, 60.0, now) > self.rate_ip_limit:
            return Admission(replies.RATE_LIMITED, 0.0, "rate_ip")
        return s.try_acquire(ip, pools, 0 if exempt else self.max_per_ip,
                             0.0 if exempt else self.rate_global_limit,
                             self.rate_max_delay, now)

    def disconnect(self, ip: str, pools: Sequence[Pool]) -> None:
        self.shared.release(self.key(ip), pools)

    def level(self, key: str) -> int:
        return self.shared.gauge(key)

    def pending_add(self, key: str, delta: int) -> None:
        self.shared.gauge_add(PENDING + key, delta)

    async def auth_locked(self, ip: str, user: str) -> bool:
        s, now, w = self.shared, time.monotonic(), self.auth_ip.window
        u = user.lower()
        return await _locked(
            self, ip, user, s.window_count("auth_ip", self.key(ip), w, now),
            s.window_count("auth_user", u, w, now) if user else 0.0,
            s.window_count("auth_usernet", f"{u}\0{source_net(ip)}", w, now) if user else 0.0)

    async def auth_failed(self, ip: str, user: str) -> None:
        s, now, w = self.shared, time.monotonic(), self.auth_ip.window
        s.window_add("auth_ip", self.key(ip), w, now)
        if user:
            u = user.lower()
            s.window_add("auth_user", u, w, now)
            s.window_add("auth_usernet", f"{u}\0{source_net(ip)}", w, now)

    async def user_may_send(self, user: str) -> bool:
        return not (self.user_msgs_limit and self.shared.window_count(
            "user_msgs", user, 3600.0, time.monotonic()) >= self.user_msgs_limit)

    async def user_may_add_rcpt(self, user: str, pending: int) -> bool:
        return not (self.user_rcpts_limit and self.shared.window_count(
            "user_rcpts", user, 3600.0, time.monotonic()) + pending >= self.user_rcpts_limit)

    async def user_sent(self, user: str, nrcpts: int) -> None:
        now = time.monotonic()
        if self.user_msgs_limit:
            self.shared.window_add("user_msgs", user, 3600.0, now)
        if self.user_rcpts_limit:
            self.shared.window_add("user_rcpts", user, 3600.0, now, nrcpts)
