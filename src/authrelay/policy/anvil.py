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
Failure policy: none; a slot overflow cannot happen (64-bit counters).
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import time

from authrelay import replies
from authrelay.config import Config
from authrelay.policy.throttle import Throttle
from authrelay.types import Reply

SLOTS = 1 << 16
_WINDOW_TABLES = ("rate_global", "rate_ip", "auth_ip", "auth_user", "user_msgs", "user_rcpts")


class SharedCounters:
    """Gauges and sliding-window counters in shared memory; create before fork()."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._base: dict[str, int] = {"total": 0, "conns": 1}
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
    def total(self) -> int:
        return self._a[0]

    def gauge(self, key: str) -> int:
        return self._a[self._base["conns"] + self._slot(key)]

    def gauge_add(self, key: str, delta: int) -> None:
        i = self._base["conns"] + self._slot(key)
        with self._lock:
            self._a[0] = max(0, self._a[0] + delta)
            self._a[i] = max(0, self._a[i] + delta)

    def try_connect(self, key: str, max_total: int, max_key: int) -> Reply | None:
        """Check both gauges and count the connection, atomically across workers."""
        i = self._base["conns"] + self._slot(key)
        with self._lock:
            if max_total and self._a[0] >= max_total:
                return replies.TOO_MANY_CONNECTIONS
            if max_key and self._a[i] >= max_key:
                return replies.TOO_MANY_FROM_IP
            self._a[0] += 1
            self._a[i] += 1
        return None

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


class SharedThrottle(Throttle):
    """Throttle whose counts live in a SharedCounters table (exact across workers)."""

    def __init__(self, cfg: Config, shared: SharedCounters) -> None:
        self.shared = shared
        super().__init__(cfg)  # Share() whole: the limits are not divided, they are shared

    def connect(self, ip: str, exempt: bool = False) -> Reply | None:
        s, now = self.shared, time.monotonic()
        if not exempt:
            if self.rate_global_limit and \
                    s.window_add("rate_global", "*", 1.0, now) > self.rate_global_limit:
                return replies.RATE_LIMITED
            if self.rate_ip_limit and \
                    s.window_add("rate_ip", ip, 60.0, now) > self.rate_ip_limit:
                return replies.RATE_LIMITED
        return s.try_connect(ip, self.max_connections, 0 if exempt else self.max_per_ip)

    def disconnect(self, ip: str) -> None:
        self.shared.gauge_add(ip, -1)

    def auth_locked(self, ip: str, user: str) -> bool:
        s, now, w = self.shared, time.monotonic(), self.auth_ip.window
        if self.max_fail_ip and s.window_count("auth_ip", ip, w, now) >= self.max_fail_ip:
            return True
        return bool(self.max_fail_user and user and
                    s.window_count("auth_user", user.lower(), w, now) >= self.max_fail_user)

    def auth_failed(self, ip: str, user: str) -> None:
        s, now, w = self.shared, time.monotonic(), self.auth_ip.window
        s.window_add("auth_ip", ip, w, now)
        if user:
            s.window_add("auth_user", user.lower(), w, now)

    def user_may_send(self, user: str) -> bool:
        return not (self.user_msgs_limit and self.shared.window_count(
            "user_msgs", user, 3600.0, time.monotonic()) >= self.user_msgs_limit)

    def user_may_add_rcpt(self, user: str, pending: int) -> bool:
        return not (self.user_rcpts_limit and self.shared.window_count(
            "user_rcpts", user, 3600.0, time.monotonic()) + pending >= self.user_rcpts_limit)

    def user_sent(self, user: str, nrcpts: int) -> None:
        now = time.monotonic()
        if self.user_msgs_limit:
            self.shared.window_add("user_msgs", user, 3600.0, now)
        if self.user_rcpts_limit:
            self.shared.window_add("user_rcpts", user, 3600.0, now, nrcpts)
