"""Shared anvil: the throttle of all receiving workers, counting in shared memory.

Owns cross-process throttling for `workers` > 1. The kernel spreads one client's
connections over the workers (SO_REUSEPORT hashes the 4-tuple), so per-IP and per-user
limits are only exact if every worker counts in the same place: `SharedThrottle` is the
in-process throttle (policy/throttle.py) with its counts in a `counters.SharedCounters`
table the master made before forking. A check costs a hash and a few memory accesses,
no round trip.
Contract: the Throttle interface (docs/INTERFACES.md). Failure policy: none (memory).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from authrelay.config import Config
from authrelay.policy.counters import PENDING, Admission, MarkTable, Pool, SharedCounters
from authrelay.policy.throttle import KnownStore, LocalThrottle, source_net


class SharedThrottle(LocalThrottle):
    """The Throttle whose counts live in a SharedCounters table (exact across workers)."""

    def __init__(self, cfg: Config, shared: SharedCounters,
                 known: KnownStore | None = None) -> None:
        self.shared = shared
        super().__init__(cfg, known=known)  # Share() whole: the limits are shared, not divided

    def connect(self, ip: str, pools: Sequence[Pool], *, exempt: bool = False,
                ip_over: bool = False) -> Admission:
        # One call, under one lock, in LocalThrottle's order: pools, the address's
        # connections, its rate, the global rate.
        max_ip = self.max_per_ip + ip_over if self.max_per_ip and not exempt else 0
        return self.shared.try_acquire(self.key(ip), pools, max_ip,
                                       0.0 if exempt else self.rate_global_limit,
                                       self.rate_max_delay, time.monotonic(),
                                       0 if exempt else self.rate_ip_limit)

    def disconnect(self, ip: str, pools: Sequence[Pool]) -> None:
        self.shared.release(self.key(ip), pools)

    def level(self, key: str) -> int:
        return self.shared.pool_level(key)

    def connections(self, key: str) -> int:
        return self.shared.gauge(key)  # the address's gauge try_acquire checks

    def pending(self, key: str) -> int:
        return self.shared.gauge(PENDING + key)

    def pending_add(self, key: str, delta: int) -> None:
        self.shared.gauge_add(PENDING + key, delta)

    def eviction_marks(self) -> MarkTable:
        # Kept per worker, an address evicted in one worker reconnected into another as
        # a fresh client and evicted there, and so on (measured: one login evicted 6 to 8
        # flood sessions with 2 workers, 1 with one); a flood's refusals, counted per
        # worker, marked its addresses only once each was refused twice at the same one
        # (3,000 addresses: 5 of 16 logins refused in the flood's first seconds).
        return self.shared

    async def auth_counts(self, ip: str, user: str) -> tuple[float, float, float]:
        s, now, w = self.shared, time.monotonic(), self.auth_ip.window
        u = user.lower()
        return (s.window_count("auth_ip", self.key(ip), w, now),
                s.window_count("auth_user", u, w, now) if user else 0.0,
                s.window_count("auth_usernet", f"{u}\0{source_net(ip)}", w, now)
                if user else 0.0)

    async def auth_failed(self, ip: str, user: str, known_net: bool = False) -> None:
        s, now, w = self.shared, time.monotonic(), self.auth_ip.window
        if not known_net:  # (Throttle.auth_failed)
            s.window_add("auth_ip", self.key(ip), w, now)
        if user:
            u = user.lower()
            if not known_net:
                s.window_add("auth_user", u, w, now)
            s.window_add("auth_usernet", f"{u}\0{source_net(ip)}", w, now)

    async def sent_counts(self, user: str) -> tuple[float, float]:
        s, now = self.shared, time.monotonic()
        return (s.window_count("user_msgs", user, 3600.0, now),
                s.window_count("user_rcpts", user, 3600.0, now))

    async def user_sent(self, user: str, nrcpts: int) -> None:
        now = time.monotonic()
        if self.user_msgs_limit:
            self.shared.window_add("user_msgs", user, 3600.0, now)
        if self.user_rcpts_limit:
            self.shared.window_add("user_rcpts", user, 3600.0, now, nrcpts)
