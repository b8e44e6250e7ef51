"""Shared counters in Redis (or Valkey) for a farm of nodes: `[limits] shared = "redis://..."`.

Owns the keys under `authrelay:` in that Redis database and the connection to it (redis-py's
asyncio client, public API only; one client per process, made lazily in the running loop so
forked workers each get their own). What lives there (docs/SCALING.md):
- sliding-window counters: AUTH failures per client address, per user and per (user,
  network); per-user messages and recipients per hour; connections per client address per
  minute. Each is two fixed windows (`KEY:N` for window number N of the period), the one
  before weighted by how much of it still overlaps the sliding window, as the shared anvil
  does (policy/anvil.py). A window key expires two periods after its last update.
- known addresses: `authrelay:known:USER NUL NET` with the lifetime of
  `[auth] known_address_days`, so a user who logged in from a network through one node is
  known to all of them.

Contract: all updates are atomic server-side (one Lua script per call adds to and reads any
number of windows in one round trip, INCRBY + EXPIRE together). Every call is bounded by a
short timeout (`TIMEOUT`, loopback/LAN latency) and answers None when Redis cannot be asked:
the caller then counts locally. Keys derived from client input are bounded: user names
longer than 64 octets are replaced by a hash.

Failure policy: Redis down, slow or refusing is never an error for a client. On the first
failure this node says so in the maillog ("shared counters unreachable ... counting
locally") and stops asking; a probe PINGs every `PROBE_INTERVAL` seconds, and when Redis
answers again the maillog says so and counting is shared again. Counts made locally while
Redis was away are not copied into it (a restarted Redis without persistence likewise
starts empty), but they still count on the node that made them: RedisThrottle answers
AUTH and per-user counts with the larger of the farm's and the node's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from authrelay import maillog, replies
from authrelay.config import SENTINEL_SCHEMES, Config, parse_sentinel
from authrelay.policy.counters import MarkTable
from authrelay.policy.throttle import Admission, KnownStore, Pool, Throttle, source_net
from authrelay.policy.verdicts import messages_allowed, recipients_allowed

log = logging.getLogger(__name__)

PREFIX = "authrelay"
TIMEOUT = 0.5  # seconds for one call; beyond it this node counts locally
PROBE_INTERVAL = 1.0
MAX_KEY_OCTETS = 64
MAX_CONNECTIONS = 32  # per process
MAX_INFLIGHT = 1000  # background updates from the accept path before they are skipped
MAX_RATE_KEYS = 100_000
KNOWN_REWRITE = 3600.0  # refresh a known address in Redis at most this often per process
RCPT_COUNT_AGE = 5.0  # a transaction's RCPTs use the recipient count read at its MAIL
LEGACY_KNOWN = 1e9  # a known address's value below this (b"1") was written before its time

# KEYS: pairs (this window's key, the previous window's key), then the generation key.
# ARGV: per pair (amount to add, ttl in seconds), so pair i (odd) has ARGV[i], ARGV[i + 1];
# then a new generation, set if the key is missing (a Redis that lost its data: restarted
# without persistence, flushed).
# Returns per pair (count in this window, count in the previous one), then the generation.
_WINDOWS_LUA = """
local out = {}
local gen = redis.call('GET', KEYS[#KEYS])
if not gen then
  gen = ARGV[#ARGV]
  redis.call('SET', KEYS[#KEYS], gen)
end
for i = 1, #KEYS - 1, 2 do
  local n = tonumber(ARGV[i])
  local cur
  if n > 0 then
    cur = redis.call('INCRBY', KEYS[i], n)
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[i + 1]))
  else
    cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  out[#out + 1] = cur
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
end
out[#out + 1] = gen
return out
"""


# Containment (policy/suspensions.py): distinct values per user and kind in a sliding
# window, as sorted sets scored by time. KEYS: one set per kind. ARGV[1]: now, ARGV[2]:
# window (s), then per key: how many members follow, then the members.
# Returns per key the number of members within the window (after adding).
_DISTINCT_LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local pos = 3
local out = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[i], now, ARGV[pos])
    pos = pos + 1
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  out[#out + 1] = redis.call('ZCARD', KEYS[i])
  redis.call('EXPIRE', KEYS[i], math.ceil(window) + 1)
end
return out
"""
CONTAINMENT_KINDS = ("messages", "recipients", "refused", "networks")


def redact_url(url: str) -> str:
    """redis://host:port/db without credentials (for the maillog)."""
    if url.startswith(SENTINEL_SCHEMES):
        scheme, _, rest = url.partition("://")
        hosts = rest.partition("/")[0].rpartition("@")[2]
        return f"{scheme}://{hosts}/{rest.partition('/')[2].partition('?')[0]}"
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        port = f":{u.port}" if u.port else ""
        return f"{u.scheme}://{host}{port}{u.path}"
    except ValueError:
        return "redis://?"


def _key_part(value: str) -> str:
    b = value.encode("utf-8", "surrogateescape")
    # NUL is our own separator ("user NUL net"); other controls and spaces are hashed away.
    if len(b) <= MAX_KEY_OCTETS and all(c > 0x20 or c == 0 for c in b):
        return value
    return "h:" + hashlib.sha256(b).hexdigest()


def driver() -> Any:
    """redis-py's asyncio client module, or a start-up error naming the extra to install."""
    try:
        import redis.asyncio as aioredis
        import redis.asyncio.retry
        import redis.asyncio.sentinel
        import redis.backoff  # noqa: F401 - used through the package below
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError("[limits] shared needs redis-py: "
                           "pip install 'authrelay[redis]'") from None
    return aioredis


def client(url: str, *, timeout: float = TIMEOUT, max_connections: int = MAX_CONNECTIONS
           ) -> Any:
    """A redis.asyncio client for `[limits] shared`: redis:// rediss:// unix:// through a
    blocking pool, or redis+sentinel:// through redis-py's Sentinel support (the master is
    asked of the Sentinels at connect time, so after a fail-over new connections go to the
    new master). No client-side retries: a failed call falls back to local counting at
    once, and the probe decides when Redis is back. A blocking pool: a burst beyond
    MAX_CONNECTIONS waits its turn (within the call's timeout) instead of failing."""
    aioredis = driver()
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
    if url.startswith(SENTINEL_SCHEMES):
        from redis.asyncio.sentinel import Sentinel

        sentinels, service, db, opts = parse_sentinel(url)
        spw = opts.pop("sentinel_password", None)
        sentinel = Sentinel(sentinels, sentinel_kwargs={
            "socket_timeout": timeout, "socket_connect_timeout": timeout,
            **({"password": spw} if spw else {})})
        return sentinel.master_for(service, db=db, max_connections=max_connections,
                                   **common, **opts)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, **common)
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() ends it


class SharedCounters:
    """The Redis side of a RedisThrottle. `up` tells whether counting is shared now."""

    def __init__(self, url: str, *, prefix: str = PREFIX, timeout: float = TIMEOUT,
                 probe_interval: float = PROBE_INTERVAL) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.up = True
        # How many times Redis answered again after being found away, or answered with
        # its data lost (its generation key new: restarted between two calls, which the
        # pool's reconnect on checkout hides): what a process wrote there may be gone.
        self.returns = 0
        self._gen: bytes | None = None  # the generation key's value at the last answer
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._script: Any = None
        self._distinct: Any = None
        self._probe: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ connection
    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = client(self.url, timeout=self.timeout)
            self._script = self._client.register_script(_WINDOWS_LUA)
            self._distinct = self._client.register_script(_DISTINCT_LUA)
            self._loop = loop
        return self._client

    def _went_down(self, e: BaseException) -> None:
        if self.up:
            self.up = False
            maillog.warning("shared counters unreachable: counting locally on this node",
                            shared=redact_url(self.url), reason=maillog.exc_text(e))
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while not self.up:
            await asyncio.sleep(self.probe_interval)
            try:
                async with asyncio.timeout(self.timeout):
                    await self._redis().ping()
            except Exception:  # still down: keep probing
                continue
            self.up = True
            self.returns += 1
            maillog.warning("shared counters reachable again: counting in Redis",
                            shared=redact_url(self.url))

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        """`await fn(client)` within the timeout; None (and local counting) on failure."""
        if not self.up:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                return await fn(self._redis())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RedisError, OSError, TimeoutError, a bad reply
            log.debug("shared counters call failed", exc_info=True)
            self._went_down(e)
            return None

    async def ping(self) -> bool:
        return await self._call(lambda r: r.ping()) is not None

    async def close(self) -> None:
        for t in list(self._inflight):
            t.cancel()
        if self._probe is not None:
            self._probe.cancel()
        if self._client is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.aclose(), 2)
        self._client = None

    # ------------------------------------------------------------------ windows
    def _window_keys(self, table: str, key: str, period: float, now: float
                     ) -> tuple[str, str, float]:
        win = int(now // period)
        base = f"{self.prefix}:{table}:{_key_part(key)}"
        overlap = 1.0 - (now - win * period) / period
        return f"{base}:{win}", f"{base}:{win - 1}", overlap

    async def windows(self, items: Sequence[tuple[str, str, float, int]]
                      ) -> list[float] | None:
        """For each (table, key, period, add): add to its window and return the sliding
        count (after the addition). One atomic round trip. None: Redis unavailable."""
        if not items:
            return []
        now = time.time()  # wall clock: every node's windows start at the same instants
        keys: list[str] = []
        args: list[int | str] = []
        overlaps: list[float] = []
        for table, key, period, add in items:
            cur, prev, overlap = self._window_keys(table, key, period, now)
            keys += [cur, prev]
            args += [max(0, int(add)), math.ceil(2 * period) + 1]
            overlaps.append(overlap)
        keys.append(f"{self.prefix}:generation")
        args.append(f"{time.time():.6f}:{os.getpid()}")
        raw = await self._call(lambda r: self._script(keys=keys, args=args, client=r))
        if raw is None:
            return None
        gen = raw[-1]
        if gen != self._gen:  # (the first answer too: what was written before it, unseen)
            self.returns += 1
            self._gen = gen
        return [int(raw[2 * i]) + int(raw[2 * i + 1]) * overlaps[i] for i in range(len(items))]

    async def count(self, table: str, key: str, period: float) -> float | None:
        got = await self.windows([(table, key, period, 0)])
        return None if got is None else got[0]

    async def add(self, table: str, key: str, period: float, n: int = 1) -> float | None:
        got = await self.windows([(table, key, period, n)])
        return None if got is None else got[0]

    def add_soon(self, table: str, key: str, period: float, n: int,
                 done: Callable[[float | None], None]) -> bool:
        """From synchronous code in the loop (the accept path): add in the background and
        call `done(count)` with the result. False (nothing sent) when Redis is down or too
        many updates are in flight."""
        if not self.up or len(self._inflight) >= MAX_INFLIGHT:
            return False

        async def run() -> None:
            done(await self.add(table, key, period, n))

        t = asyncio.get_running_loop().create_task(run())
        self._inflight.add(t)
        t.add_done_callback(self._inflight.discard)
        return True

    # ------------------------------------------------------------------ containment
    def _distinct_key(self, user: str, kind: str) -> str:
        return f"{self.prefix}:contain:{kind}:{_key_part(user)}"

    async def distinct(self, user: str, items: Sequence[tuple[str, str]], window: float
                       ) -> dict[str, int] | None:
        """Add (kind, value) events for `user`; every kind's count of distinct values
        within `window` (seconds, wall clock). One atomic round trip; None: Redis
        unavailable (the caller counts locally)."""
        by_kind: dict[str, list[str]] = {k: [] for k in CONTAINMENT_KINDS}
        for kind, value in items:
            by_kind[kind].append(_key_part(value))
        keys = [self._distinct_key(user, k) for k in CONTAINMENT_KINDS]
        args: list[Any] = [f"{time.time():.3f}", f"{window:.3f}"]
        for k in CONTAINMENT_KINDS:
            args += [len(by_kind[k]), *by_kind[k]]
        raw = await self._call(lambda r: self._distinct(keys=keys, args=args, client=r))
        if raw is None:
            return None
        return {k: int(n) for k, n in zip(CONTAINMENT_KINDS, raw, strict=True)}

    async def clear_distinct(self, user: str) -> bool:
        keys = [self._distinct_key(user, k) for k in CONTAINMENT_KINDS]
        return await self._call(lambda r: r.delete(*keys)) is not None

    # ------------------------------------------------------------------ known addresses
    def _known_key(self, user: str, net: str) -> str:
        return f"{self.prefix}:known:{_key_part(user)}\0{net}"

    async def is_known(self, user: str, net: str, ttl: float) -> bool | None:
        """Whether `user` logged in from `net` within the last `ttl` seconds (`[auth]
        known_address_days` now: a reload that shortens it, or sets 0, applies to what
        was written before, as in known.py). None: Redis unavailable."""
        key = self._known_key(user, net)

        async def learnt(r: Any) -> tuple[Any]:  # (GET's answer,): None is a missing key
            return (await r.get(key),)

        got = await self._call(learnt)
        if got is None:
            return None
        if got[0] is None or ttl <= 0:
            return False
        try:
            when = float(got[0])
        except ValueError:
            return False
        # Before this release the value was b"1": known for as long as Redis keeps it.
        return when < LEGACY_KNOWN or time.time() - when < ttl

    async def remember(self, user: str, net: str, ttl: float) -> bool:
        """Record a login of `user` from `net` now (its wall time is the value), kept
        `ttl` seconds; nothing is written for a `ttl` of 0 (no address is known)."""
        if ttl <= 0:
            return True
        key, now = self._known_key(user, net), f"{time.time():.3f}"
        got = await self._call(lambda r: r.set(key, now, ex=math.ceil(ttl)))
        return got is not None


# --------------------------------------------------------------------------- the Throttle

class SharedKnown:
    """Known addresses for the whole farm: Redis first, this node's store (known.py) as
    mirror and fallback. A network counts as known if either says so: being lenient here
    only ever spares a real user a lockout, it never admits a wrong password."""

    def __init__(self, counters: SharedCounters, local: KnownStore | None,
                 days: float) -> None:
        self.counters = counters
        self.local = local
        self.ttl = days * 86400.0
        # (user, net) -> (when this process last wrote it to Redis, counters.returns
        # then): a user logging in all day costs one write per hour, not one per AUTH;
        # once Redis has been away and back the next login writes it again.
        self._written: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    async def is_known(self, user: str, net: str) -> bool:
        if await self.counters.is_known(user, net, self.ttl):
            return True
        return bool(self.local is not None and await self.local.is_known(user, net))

    async def remember(self, user: str, net: str) -> None:
        if self.local is not None:
            await self.local.remember(user, net)
        now, returns = time.monotonic(), self.counters.returns
        last = self._written.get((user, net))
        if last is not None and now - last[0] < KNOWN_REWRITE and last[1] == returns \
                and self.counters.up:
            return
        if await self.counters.remember(user, net, self.ttl):
            self._written[(user, net)] = (now, returns)
            self._written.move_to_end((user, net))
            while len(self._written) > MAX_RATE_KEYS:
                self._written.popitem(last=False)


class RedisThrottle(Throttle):
    """`[limits] shared`: the Throttle interface (policy/throttle.py) with the farm-wide
    counters in Redis and this node's throttle (`local`: in-process or shared memory)
    underneath. Connection gauges and pools are always the node's own; AUTH windows,
    known addresses, per-user rates and the per-address connection rate are the farm's
    while Redis answers, the node's own while it does not (every event is counted locally
    too, so a fall-back starts from this node's recent history, not from zero; and while
    Redis answers, a count is the larger of the farm's and the node's, so what the node
    counted while Redis was away, or before a restarted Redis, is never forgiven)."""

    def __init__(self, cfg: Config, counters: SharedCounters, local: Throttle) -> None:
        self.counters = counters
        self.local = local
        self.shared_known = SharedKnown(counters, local.known, cfg.auth.known_address_days)
        # the local fall-back asks the farm too while it can
        self.known = local.known = self.shared_known
        # ip -> [farm count at the last answer, updates in flight, wall time of the answer]
        self._rate_seen: OrderedDict[str, list[float]] = OrderedDict()
        self._rcpts_seen: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.reload(cfg)

    def reload(self, cfg: Config) -> None:
        self.local.reload(cfg)
        lim, auth = cfg.limits, cfg.auth
        # Per-address windows count an IPv6 client by its prefix, as the local ones do:
        # keyed by the whole address, a client rotating through its /64 was never locked.
        self.v6_prefix = lim.ipv6_prefix_length
        self.window = auth.failure_window
        self.max_fail_ip = auth.max_failures_per_ip
        self.max_fail_user = auth.max_failures_per_user
        self.rate_ip_limit = lim.connection_rate_per_ip
        self.user_msgs_limit = lim.user_messages_per_hour
        self.user_rcpts_limit = lim.user_recipients_per_hour
        self.shared_known.ttl = auth.known_address_days * 86400.0

    # ---------------------------------------------------------------- connections (sync)
    def connect(self, ip: str, pools: Sequence[Pool], *, exempt: bool = False,
                ip_over: bool = False) -> Admission:
        adm = self.local.connect(ip, pools, exempt=exempt, ip_over=ip_over)
        if exempt or not self.rate_ip_limit or not self.counters.up or \
                adm.reason.startswith("pool:") or adm.reason == "ip":
            # Refused before the rate check (Throttle.connect's order: pools, the
            # address's connections, then its rate): not an attempt the rate counts, as
            # on the node (an eviction's retries would count one connection up to four
            # times).
            return adm
        # Decided now, without waiting for Redis: the farm's count for this address as of
        # the last answer, plus the updates still in flight, plus this attempt. Attempts
        # refused count too (anvil), so a client hammering past the limit stays out.
        # Counted by `key()`: an IPv6 client by its prefix, as on the node (a client
        # rotating through its /64 across the nodes is one client).
        key = self.key(ip)
        now = time.time()
        seen = self._rate_seen.get(key)
        if seen is None or now - seen[2] > 60.0:
            seen = [0.0, 0.0, now]
        self._rate_seen[key] = seen
        self._rate_seen.move_to_end(key)
        while len(self._rate_seen) > MAX_RATE_KEYS:
            self._rate_seen.popitem(last=False)
        farm = seen[0] + seen[1] + 1
        if self.counters.add_soon("rate_ip", key, 60.0, 1, lambda c: self._rate_answer(key, c)):
            seen[1] += 1
        if adm.admitted and farm > self.rate_ip_limit:
            self.local.disconnect(ip, pools)
            return Admission(replies.RATE_LIMITED, 0.0, "rate_ip")
        return adm

    def _rate_answer(self, ip: str, count: float | None) -> None:
        seen = self._rate_seen.get(ip)
        if seen is None:
            return
        seen[1] = max(0.0, seen[1] - 1)
        if count is not None:
            seen[0] = max(0.0, count - seen[1])  # the in-flight ones are added separately
            seen[2] = time.time()

    def disconnect(self, ip: str, pools: Sequence[Pool]) -> None:
        self.local.disconnect(ip, pools)

    def level(self, key: str) -> int:
        return self.local.level(key)

    def connections(self, key: str) -> int:
        return self.local.connections(key)  # the node's own, as the gauge is

    def pending(self, key: str) -> int:
        return self.local.pending(key)

    def pending_add(self, key: str, delta: int) -> None:
        self.local.pending_add(key, delta)  # a handshake in progress is per node

    def eviction_marks(self) -> MarkTable | None:
        return self.local.eviction_marks()  # eviction is per node (its own pools)

    def full(self, pools: Sequence[Pool]) -> bool:
        return self.local.full(pools)

    # ---------------------------------------------------------------- AUTH
    def _auth_items(self, ip: str, user: str, add: int) -> list[tuple[str, str, float, int]]:
        items = [("auth_ip", self.key(ip), self.window, add)]
        if user:
            u = user.lower()
            items += [("auth_user", u, self.window, add),
                      ("auth_usernet", f"{u}\0{source_net(ip)}", self.window, add)]
        return items

    async def auth_counts(self, ip: str, user: str) -> tuple[float, float, float]:
        # The larger of the farm's count and this node's (which counts every event too):
        # failures this node saw while Redis was away (or before a restarted Redis) are
        # not in the farm's windows, and must not be forgiven when it answers again.
        mine = await self.local.auth_counts(ip, user)
        got = await self.counters.windows(self._auth_items(ip, user, 0))
        if got is None:
            return mine
        farm = (got + [0.0, 0.0])[:3]
        return max(farm[0], mine[0]), max(farm[1], mine[1]), max(farm[2], mine[2])

    async def auth_failed(self, ip: str, user: str, known_net: bool = False) -> None:
        await self.local.auth_failed(ip, user, known_net)
        items = self._auth_items(ip, user, 1)
        await self.counters.windows(items[2:] if known_net else items)  # (its usernet's)

    async def auth_succeeded(self, ip: str, user: str) -> None:
        await self.local.auth_succeeded(ip, user)  # remembers through SharedKnown

    # ---------------------------------------------------------------- per-user rates
    async def sent_counts(self, user: str) -> tuple[float, float]:
        msgs, rcpts = await self.local.sent_counts(user)
        got = await self.counters.windows([("user_msgs", user, 3600.0, 0),
                                           ("user_rcpts", user, 3600.0, 0)])
        if got is None:
            return msgs, rcpts
        return max(got[0], msgs), max(got[1], rcpts)  # as auth_counts: never forgiven

    async def user_may_send(self, user: str) -> bool:
        # One round trip reads both counts; the recipient count is kept for this
        # transaction's RCPTs (read at MAIL, plus the transaction's own `pending`). Each
        # is the larger of the farm's and this node's (auth_counts says why).
        items = []
        if self.user_msgs_limit:
            items.append(("user_msgs", user, 3600.0, 0))
        if self.user_rcpts_limit:
            items.append(("user_rcpts", user, 3600.0, 0))
        if not items:
            return True
        got = await self.counters.windows(items)
        if got is None:
            return await self.local.user_may_send(user)
        msgs, rcpts = await self.local.sent_counts(user)
        if self.user_rcpts_limit:
            rcpts = max(rcpts, got[-1])
            self._rcpts_seen[user] = (rcpts, time.monotonic())
            self._rcpts_seen.move_to_end(user)
            while len(self._rcpts_seen) > MAX_RATE_KEYS:
                self._rcpts_seen.popitem(last=False)
        return not self.user_msgs_limit or messages_allowed(max(msgs, got[0]),
                                                            self.user_msgs_limit)

    async def user_may_add_rcpt(self, user: str, pending: int) -> bool:
        if not self.user_rcpts_limit:
            return True
        seen = self._rcpts_seen.get(user)
        if seen is not None and time.monotonic() - seen[1] < RCPT_COUNT_AGE:
            n: float | None = seen[0]
        else:
            n = await self.counters.count("user_rcpts", user, 3600.0)
        if n is None:
            return await self.local.user_may_add_rcpt(user, pending)
        n = max(n, (await self.local.sent_counts(user))[1])
        return recipients_allowed(n, pending, self.user_rcpts_limit)

    async def user_sent(self, user: str, nrcpts: int) -> None:
        self._rcpts_seen.pop(user, None)  # the next transaction reads afresh
        await self.local.user_sent(user, nrcpts)
        items = []
        if self.user_msgs_limit:
            items.append(("user_msgs", user, 3600.0, 1))
        if self.user_rcpts_limit:
            items.append(("user_rcpts", user, 3600.0, nrcpts))
        await self.counters.windows(items)


def make_redis_throttle(cfg: Config, local: Throttle,
                        counters: SharedCounters | None = None) -> RedisThrottle:
    """`counters`: the process's Redis client (shared with containment), else a new one."""
    driver()  # fail at start-up, not at the first count, when redis-py is missing
    return RedisThrottle(cfg, counters or SharedCounters(cfg.limits.shared), local)
