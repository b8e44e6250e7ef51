"""Throttles (Postfix anvil): connection pools and rates, AUTH failures, per-user rates.

Owns the counters that decide "too much", behind one interface (`Throttle`) with two
implementations here and in `anvil.py`, and a third over Redis in `shared.py`:

- `LocalThrottle`: counts inside one process (exact with `workers = 1`).
- `anvil.SharedThrottle`: the same counts in shared memory, exact across the workers of
  one instance (the kernel spreads one client's connections over them).

The interface (docs/INTERFACES.md) has two halves:

- Connections, synchronous and O(1), called at TCP accept before anything else happens on
  the socket (no TLS, no transport): `connect(ip, pools, exempt=)` -> `Admission`,
  `disconnect(ip, pools)`, `level(pool_key)`, `full(pools)`. A connection is counted in
  every pool it belongs to (global, its listener's, the smtp class) and per IP from the
  moment it is admitted until `disconnect`. `connection_rate` (sendmail's
  CONNECTION_RATE_THROTTLE) delays, not refuses: the admission carries the delay before the
  greeting (a GCRA schedule, so a burst of `connection_rate` passes at once and the rest
  are spaced at the rate); 421 only when the delay would pass `connection_rate_max_delay`.
- AUTH and per-user rates, asynchronous (they may read the known-address store, or in the
  Redis variant a remote server): `auth_locked`, `auth_failed`, `auth_succeeded`,
  `user_may_send`, `user_may_add_rcpt`, `user_sent`.

AUTH lockout that an attacker cannot turn against a user (docs/LIMITS.md): failures are
counted per source address, per user, and per (user, source network: /24 or /64). Past the
per-address limit or the per-user limit, AUTH for a user is refused unchecked except from
a network the user has authenticated from within `[auth] known_address_days`
(`known.KnownAddresses`), and there too once that network has reached its own limit for
that user (`verdicts.usernet_limit`). So an attacker guessing alice's password from
elsewhere locks out only other unknown addresses, and one guessing anybody's from behind
alice's NAT locks out only that NAT's users new to it: alice at home, at the office or
behind the hotel's one address she used before still logs in (`Lockout.SPARED`).

Contract: every check is O(1) amortised and memory is bounded (old windows are pruned; at
most `MAX_KEYS` tracked keys per table, the oldest evicted first). Failure policy: all
refusals are transient (421 / 454 / 450 4.7.x); a failing known-address store degrades to
memory (never to refusing the right password from a known address in this process).
SIGHUP (`reload`) changes the limits but keeps the counts: a reload must not hand a
brute-forcer a fresh failure window.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Protocol

from authrelay import replies
from authrelay.config import Config
from authrelay.policy.counters import (
    ADMIT,
    PENDING,
    Admission,
    MarkTable,
    Pool,
    Share,
    gcra,
    pool_refusal,
)
from authrelay.policy.verdicts import (
    Lockout,
    lockout,
    messages_allowed,
    recipients_allowed,
    usernet_limit,
)

# The counting types are counters.py's; named here too for the throttle's users.
__all__ = ["ADMIT", "ALWAYS_EXEMPT", "PENDING", "Admission", "Exemptions", "KnownStore",
           "LocalThrottle", "Lockout", "Pool", "Share", "Throttle", "address_key", "gcra",
           "pool_refusal", "source_net"]

MAX_KEYS = 100_000
ALWAYS_EXEMPT = ("127.0.0.1/32", "::1/128")  # the host itself: cron jobs, scripts, sendmail


@functools.lru_cache(maxsize=4096)
def source_net(ip: str) -> str:
    """The network a client address belongs to for AUTH bookkeeping: /24 or /64.

    Home and mobile users move inside their provider's /24 or /64 between logins; an
    attacker elsewhere is in another one. Asked about twice per AUTH (the lockout
    counts, then the known network): the answers of the last 4,096 addresses are kept
    (ipaddress takes 26 us for an IPv4 address, 76 for an IPv6 one)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def address_key(ip: str, v6_prefix: int = 128) -> str:
    """The key per-address limits count a client under: the IPv4 address, or the IPv6
    address's /`v6_prefix` network (a host or site rotates through its /64 at will)."""
    if ":" not in ip or v6_prefix >= 128:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{addr}/{v6_prefix}", strict=False))


class Exemptions:
    """`[limits] limit_exceptions` (plus loopback): exempt from per-IP limits and rates."""

    def __init__(self, cfg: Config) -> None:
        nets: list[str] = list(ALWAYS_EXEMPT)
        for item in cfg.limits.limit_exceptions:
            nets += cfg.relay.trusted_networks if item == "trusted_networks" else [item]
        self.nets = [ipaddress.ip_network(n, strict=False) for n in nets]
        # every connection asks (parsing an address costs ~3 us); bounded, emptied when full
        self._seen: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        try:
            return self._seen[ip]
        except KeyError:
            pass
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        found = any(addr in n for n in self.nets if n.version == addr.version)
        if len(self._seen) >= 4096:
            self._seen.clear()
        self._seen[ip] = found
        return found


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


class KnownStore(Protocol):
    """The networks each user authenticated from lately (known.KnownAddresses, or the
    farm's shared.SharedKnown)."""

    async def is_known(self, user: str, net: str) -> bool: ...
    async def remember(self, user: str, net: str) -> None: ...


class Throttle(ABC):
    """The interface every throttle implements (in-process, shared memory, Redis).

    The limits come from the Config given to `reload` (the constructor calls it); the
    counters and windows stay across reloads. `known` is the known-address store
    (`KnownStore`); None: no user is ever known (past the per-user limit, refuse all)."""

    known: KnownStore | None = None
    v6_prefix: int = 128
    max_fail_ip: int = 0  # [auth] max_failures_per_ip (0: no limit)
    max_fail_user: int = 0  # [auth] max_failures_per_user

    def key(self, ip: str) -> str:
        """What per-address limits count `ip` under (`[limits] ipv6_prefix_length`);
        every implementation keys its per-address counters (connections, connection
        rate, AUTH failures per address) by this."""
        return address_key(ip, self.v6_prefix)

    # ------------------------------------------------------------ connections (sync)
    @abstractmethod
    def connect(self, ip: str, pools: Sequence[Pool], *, exempt: bool = False,
                ip_over: bool = False) -> Admission:
        """Admit a new connection into every pool in `pools` and for `ip`, or say why not.
        `exempt` (limit_exceptions, loopback) skips the per-IP limit and both rates.
        `ip_over`: the per-IP limit one over, for a newcomer counted into the slot of
        its own address's connection it evicts before that eviction frees it."""

    @abstractmethod
    def disconnect(self, ip: str, pools: Sequence[Pool]) -> None:
        """The connection admitted with the same `ip` and `pools` is gone."""

    @abstractmethod
    def level(self, key: str) -> int:
        """Connections in the pool `key` now."""

    def full(self, pools: Sequence[Pool]) -> bool:
        """Whether `connect` would refuse for a pool (checked before accepting at all)."""
        return any(p.cap and self.level(p.key) >= p.cap for p in pools)

    @abstractmethod
    def connections(self, key: str) -> int:
        """Connections from address `key` (as `key()` gives it) now: the gauge that
        `max_connections_per_ip` is checked against (exempt ones counted too)."""

    @abstractmethod
    def pending(self, key: str) -> int:
        """Connections from address `key` (as `key()` gives it) admitted but not yet past
        their TLS handshake or greeting delay (`[limits] max_pending_per_ip`): the gauge
        `pending_add` keeps, never a pool's counter. Asked for every connection, so it
        must not take room in any bounded table for an address it has not seen."""

    @abstractmethod
    def pending_add(self, key: str, delta: int) -> None:
        """Count one such connection in (+1) or out (-1)."""

    @abstractmethod
    def eviction_marks(self) -> MarkTable | None:
        """Where the node's processes keep the eviction marks (smtpd/eviction.py: which
        addresses pressed on a full pool, which authenticated), so that all of them see
        each one; None: one process, which keeps its own."""

    # ------------------------------------------------------------ AUTH (async)
    @abstractmethod
    async def auth_counts(self, ip: str, user: str) -> tuple[float, float, float]:
        """AUTH failures within `[auth] failure_window` from `ip` (its `key()`), for
        `user` (0 for ""), and for `user` from `ip`'s `source_net`, as this throttle's
        store counts them."""

    async def auth_lockout(self, ip: str, user: str) -> Lockout:
        """OPEN: check the password; LOCKED: refuse this AUTH without checking it (454
        4.7.0); SPARED: past a limit but from a network `user` is known from: check it,
        and answer anything but a right one as LOCKED (never UNLESS_KNOWN)."""
        return await self.lockout_given(ip, user, *await self.auth_counts(ip, user))

    async def auth_locked(self, ip: str, user: str) -> bool:
        """True: refuse this AUTH without checking the password (auth_lockout's LOCKED)."""
        return await self.auth_lockout(ip, user) is Lockout.LOCKED

    @abstractmethod
    async def auth_failed(self, ip: str, user: str, known_net: bool = False) -> None:
        """A failed AUTH from `ip` for `user` ("" when the exchange failed before a name).
        `known_net`: a wrong password checked only because `ip`'s network is known for
        `user` past a limit (Lockout.SPARED), a late check's once its answer is in: counted
        toward that (user, network) window alone. The unchecked (LOCKED) AUTHs of
        everybody else are counted nowhere, so a count by address or by user that moved
        would tell, to one watching it from another address, that `user` is known from
        `ip`'s network."""

    @abstractmethod
    async def auth_succeeded(self, ip: str, user: str) -> None:
        """`user` authenticated from `ip`: its network becomes known for the user."""

    async def lockout_given(self, ip: str, user: str, by_ip: float, by_user: float,
                            by_usernet: float) -> Lockout:
        """The lockout verdict (policy/verdicts.lockout) for these failure counts, with
        UNLESS_KNOWN settled: the known-address store is asked only then."""
        verdict = lockout(by_ip, by_user, by_usernet, user=user, max_ip=self.max_fail_ip,
                          max_user=self.max_fail_user)
        if verdict is not Lockout.UNLESS_KNOWN:
            return verdict
        if self.known is not None and await self.known.is_known(user.lower(),
                                                                source_net(ip)):
            return Lockout.SPARED
        return Lockout.LOCKED

    # ------------------------------------------------------------ per-user rates (async)
    @abstractmethod
    async def sent_counts(self, user: str) -> tuple[float, float]:
        """Messages and recipients `user` sent in the last hour, as this throttle's store
        counts them (what `user_sent` added)."""

    @abstractmethod
    async def user_may_send(self, user: str) -> bool: ...

    @abstractmethod
    async def user_may_add_rcpt(self, user: str, pending: int) -> bool: ...

    @abstractmethod
    async def user_sent(self, user: str, nrcpts: int) -> None: ...

    # ------------------------------------------------------------ config
    @abstractmethod
    def reload(self, cfg: Config) -> None:
        """New limits (SIGHUP); the counts so far are kept."""


class LocalThrottle(Throttle):
    """All counters in this process."""

    def __init__(self, cfg: Config, share: Share | None = None,
                 known: KnownStore | None = None) -> None:
        self.share = share or Share()
        self.known = known
        self.gauges: dict[str, int] = {}
        self.per_ip: dict[str, int] = {}
        self.tat = 0.0  # connection_rate schedule (GCRA)
        self.reload(cfg)

    def reload(self, cfg: Config) -> None:
        lim, auth = cfg.limits, cfg.auth
        # Per-IP counts stay whole: a client's connections are spread over workers by the
        # kernel, so a per-worker share would refuse well-behaved clients.
        self.max_per_ip = lim.max_connections_per_ip
        self.v6_prefix = lim.ipv6_prefix_length
        prev = dict(vars(self)).get  # the windows being replaced, if any (reload)
        self.rate_global_limit = self.share.part(lim.connection_rate)
        self.rate_max_delay = lim.connection_rate_max_delay
        self.rate_ip = _Window(60.0, max(lim.connection_rate_per_ip, 1) * 2
                               ).adopt(prev("rate_ip"))
        self.rate_ip_limit = lim.connection_rate_per_ip
        w = auth.failure_window
        self.auth_ip = _Window(w, max(auth.max_failures_per_ip, 1) * 2).adopt(prev("auth_ip"))
        self.auth_user = _Window(w, max(auth.max_failures_per_user, 1) * 2
                                 ).adopt(prev("auth_user"))
        self.auth_usernet = _Window(w, max(usernet_limit(auth.max_failures_per_ip,
                                                         auth.max_failures_per_user), 1) * 2
                                    ).adopt(prev("auth_usernet"))
        self.max_fail_ip = auth.max_failures_per_ip
        self.max_fail_user = auth.max_failures_per_user
        self.user_msgs = _Window(3600.0, max(lim.user_messages_per_hour, 1) * 2
                                 ).adopt(prev("user_msgs"))
        self.user_rcpts = _Window(3600.0, max(lim.user_recipients_per_hour, 1) * 2
                                  ).adopt(prev("user_rcpts"))
        self.user_msgs_limit = lim.user_messages_per_hour
        self.user_rcpts_limit = lim.user_recipients_per_hour

    # ---------------------------------------------------------------- connections
    def connect(self, ip: str, pools: Sequence[Pool], *, exempt: bool = False,
                ip_over: bool = False) -> Admission:
        now = time.monotonic()
        ip = self.key(ip)
        for p in pools:
            if p.cap and self.gauges.get(p.key, 0) >= p.cap:
                return pool_refusal(p.key)
        delay = 0.0
        if not exempt:
            if self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip + ip_over:
                return Admission(replies.TOO_MANY_FROM_IP, 0.0, "ip")
            # Refused attempts count too (anvil): a client hammering past the rate stays out.
            if self.rate_ip_limit and self.rate_ip.add(ip, now) > self.rate_ip_limit:
                return Admission(replies.RATE_LIMITED, 0.0, "rate_ip")
            if self.rate_global_limit:
                delay, tat = gcra(self.tat, now, self.rate_global_limit, self.rate_max_delay)
                if delay < 0:
                    return Admission(replies.RATE_LIMITED, 0.0, "rate")
                self.tat = tat
        for p in pools:
            self.gauges[p.key] = self.gauges.get(p.key, 0) + 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return Admission(None, delay) if delay else ADMIT

    def disconnect(self, ip: str, pools: Sequence[Pool]) -> None:
        ip = self.key(ip)
        for p in pools:
            n = self.gauges.get(p.key, 0) - 1
            if n > 0:
                self.gauges[p.key] = n
            else:
                self.gauges.pop(p.key, None)
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def level(self, key: str) -> int:
        return self.gauges.get(key, 0)

    def connections(self, key: str) -> int:
        return self.per_ip.get(key, 0)

    def pending(self, key: str) -> int:
        return self.gauges.get(PENDING + key, 0)

    def pending_add(self, key: str, delta: int) -> None:
        k = PENDING + key
        n = self.gauges.get(k, 0) + delta
        if n > 0:
            self.gauges[k] = n
        else:
            self.gauges.pop(k, None)

    def eviction_marks(self) -> MarkTable | None:
        return None  # one process: its eviction candidates keep their own

    # ---------------------------------------------------------------- AUTH
    async def auth_counts(self, ip: str, user: str) -> tuple[float, float, float]:
        u, now = user.lower(), time.monotonic()
        return (self.auth_ip.count(self.key(ip), now), self.auth_user.count(u, now),
                self.auth_usernet.count(f"{u}\0{source_net(ip)}", now))

    async def auth_failed(self, ip: str, user: str, known_net: bool = False) -> None:
        now = time.monotonic()
        if not known_net:
            self.auth_ip.add(self.key(ip), now)
        if user:
            u = user.lower()
            if not known_net:
                self.auth_user.add(u, now)
            self.auth_usernet.add(f"{u}\0{source_net(ip)}", now)

    async def auth_succeeded(self, ip: str, user: str) -> None:
        if self.known is not None and user:
            await self.known.remember(user.lower(), source_net(ip))

    # ---------------------------------------------------------------- per-user rates
    async def sent_counts(self, user: str) -> tuple[float, float]:
        now = time.monotonic()
        return self.user_msgs.count(user, now), self.user_rcpts.count(user, now)

    async def user_may_send(self, user: str) -> bool:
        if not self.user_msgs_limit:
            return True
        return messages_allowed((await self.sent_counts(user))[0], self.user_msgs_limit)

    async def user_may_add_rcpt(self, user: str, pending: int) -> bool:
        if not self.user_rcpts_limit:
            return True
        return recipients_allowed((await self.sent_counts(user))[1], pending,
                                  self.user_rcpts_limit)

    async def user_sent(self, user: str, nrcpts: int) -> None:
        now = time.monotonic()
        if self.user_msgs_limit:
            self.user_msgs.add(user, now)
        if self.user_rcpts_limit:
            self.user_rcpts.add(user, now, nrcpts)
