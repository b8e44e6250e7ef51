"""Throttles (Postfix anvil): connection counts and rates, AUTH failures, per-user rates.

Owns the counters that decide "too much": concurrent connections (total and per IP,
sendmail confMAX_DAEMON_CHILDREN), new connections per second (confCONNECTION_RATE_THROTTLE)
and per IP per minute (anvil), AUTH failures per IP and per username over a window, and
messages / recipients per user per hour. Contract: every check is O(1) amortised and memory
is bounded (old windows are pruned; at most `MAX_KEYS` tracked keys per table, the oldest
evicted first). Failure policy: all refusals are transient (421 / 454 / 450 4.7.x).

This class counts inside one process (exact with `workers = 1`). With several receiving
workers the daemon gives every worker an `anvil.SharedThrottle` instead: the same methods
over one table in shared memory, so per-IP, per-user and global limits hold across all
workers (the kernel spreads one client's connections over them).

SIGHUP (`reload`) changes the limits but keeps the counts: a reload must not hand a
brute-forcer a fresh failure window.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from authrelay import replies
from authrelay.config import Config
from authrelay.types import Reply

MAX_KEYS = 100_000


class _Window:
    """Event timestamps per key inside a sliding window, bounded in keys and events."""

    def __init__(self, window: float, cap: int) -> None:
        self.window = window
        self.cap = max(cap, 1)
        self._d: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, key: str, now: float) -> int:
        q = self._d.get(key)
        if q is None:
            return 0
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._d[key]
            return 0
        return len(q)

    def add(self, key: str, now: float, n: int = 1) -> int:
        q = self._d.get(key)
        if q is None:
            q = self._d[key] = deque(maxlen=self.cap + 1)
            if len(self._d) > MAX_KEYS:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(key)
        for _ in range(min(n, self.cap + 1)):
            q.append(now)
        return self.count(key, now)

    def clear(self, key: str) -> None:
        self._d.pop(key, None)

    def adopt(self, old: _Window | None) -> _Window:
        """Keep the events of the window this one replaces (config reload)."""
        if old is not None:
            for key, q in old._d.items():
                self._d[key] = deque(q, maxlen=self.cap + 1)
        return self


@dataclass
class Share:
    """This process's part of the global limits (1 of 1 unless several workers)."""

    index: int = 0
    count: int = 1
    shared: Any = None  # an anvil.SharedCounters when the workers count together

    def part(self, total: int) -> int:
        if total <= 0 or self.count <= 1 or self.shared is not None:
            return total
        return max(1, total // self.count)


class Throttle:
    def __init__(self, cfg: Config, share: Share | None = None) -> None:
        self.reload(cfg, share or Share())
        self.connections = 0
        self.per_ip: dict[str, int] = {}

    def reload(self, cfg: Config, share: Share | None = None) -> None:
        if share is not None:
            self.share = share
        lim, auth = cfg.limits, cfg.auth
        self.max_connections = self.share.part(lim.max_connections)
        # Per-IP counts stay whole: a client's connections are spread over workers by the
        # kernel, so a per-worker share would refuse well-behaved clients.
        self.max_per_ip = lim.max_connections_per_ip
        prev = dict(vars(self)).get  # the windows being replaced, if any (reload)
        self.rate_global = _Window(1.0, max(self.share.part(lim.connection_rate), 1) * 2
                                   ).adopt(prev("rate_global"))
        self.rate_global_limit = self.share.part(lim.connection_rate)
        self.rate_ip = _Window(60.0, max(lim.connection_rate_per_ip, 1) * 2
                               ).adopt(prev("rate_ip"))
        self.rate_ip_limit = lim.connection_rate_per_ip
        self.auth_ip = _Window(auth.failure_window, max(auth.max_failures_per_ip, 1) * 2
                               ).adopt(prev("auth_ip"))
        self.auth_user = _Window(auth.failure_window, max(auth.max_failures_per_user, 1) * 2
                                 ).adopt(prev("auth_user"))
        self.max_fail_ip = auth.max_failures_per_ip
        self.max_fail_user = auth.max_failures_per_user
        self.user_msgs = _Window(3600.0, max(lim.user_messages_per_hour, 1) * 2
                                 ).adopt(prev("user_msgs"))
        self.user_rcpts = _Window(3600.0, max(lim.user_recipients_per_hour, 1) * 2
                                  ).adopt(prev("user_rcpts"))
        self.user_msgs_limit = lim.user_messages_per_hour
        self.user_rcpts_limit = lim.user_recipients_per_hour

    # ---------------------------------------------------------------- connections
    def connect(self, ip: str, exempt: bool = False) -> Reply | None:
        """Admit a new connection (counted until `disconnect`) or say why not."""
        now = time.monotonic()
        if self.max_connections and self.connections >= self.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if not exempt:
            if self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
                return replies.TOO_MANY_FROM_IP
            if self.rate_global_limit and \
                    self.rate_global.add("*", now) > self.rate_global_limit:
                return replies.RATE_LIMITED
            if self.rate_ip_limit and self.rate_ip.add(ip, now) > self.rate_ip_limit:
                return replies.RATE_LIMITED
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def disconnect(self, ip: str) -> None:
        self.connections = max(0, self.connections - 1)
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    # ---------------------------------------------------------------- AUTH
    def auth_locked(self, ip: str, user: str) -> bool:
        """Past the failure limit for this IP or this username: refuse without checking."""
        now = time.monotonic()
        if self.max_fail_ip and self.auth_ip.count(ip, now) >= self.max_fail_ip:
            return True
        return bool(self.max_fail_user and user and
                    self.auth_user.count(user.lower(), now) >= self.max_fail_user)

    def auth_failed(self, ip: str, user: str) -> None:
        now = time.monotonic()
        self.auth_ip.add(ip, now)
        if user:
            self.auth_user.add(user.lower(), now)

    # ---------------------------------------------------------------- per-user rates
    def user_may_send(self, user: str) -> bool:
        now = time.monotonic()
        return not (self.user_msgs_limit and
                    self.user_msgs.count(user, now) >= self.user_msgs_limit)

    def user_may_add_rcpt(self, user: str, pending: int) -> bool:
        now = time.monotonic()
        return not (self.user_rcpts_limit and
                    self.user_rcpts.count(user, now) + pending >= self.user_rcpts_limit)

    def user_sent(self, user: str, nrcpts: int) -> None:
        now = time.monotonic()
        if self.user_msgs_limit:
            self.user_msgs.add(user, now)
        if self.user_rcpts_limit:
            self.user_rcpts.add(user, now, nrcpts)
