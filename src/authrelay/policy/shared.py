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
Redis was away are not copied into it (the windows are short; a restarted Redis without
persistence likewise starts empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from authrelay import maillog

log = logging.getLogger(__name__)

PREFIX = "authrelay"
TIMEOUT = 0.5  # seconds for one call; beyond it this node counts locally
PROBE_INTERVAL = 1.0
MAX_KEY_OCTETS = 64
MAX_CONNECTIONS = 32  # per process
MAX_INFLIGHT = 1000  # background updates from the accept path before they are skipped

# KEYS: pairs (this window's key, the previous window's key).
# ARGV: per pair (amount to add, ttl in seconds), so pair i (odd) has ARGV[i], ARGV[i + 1].
# Returns per pair (count in this window, count in the previous one).
_WINDOWS_LUA = """
local out = {}
for i = 1, #KEYS, 2 do
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
return out
"""


def redact_url(url: str) -> str:
    """redis://host:port/db without credentials (for the maillog)."""
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


class SharedCounters:
    """The Redis side of a RedisThrottle. `up` tells whether counting is shared now."""

    def __init__(self, url: str, *, prefix: str = PREFIX, timeout: float = TIMEOUT,
                 probe_interval: float = PROBE_INTERVAL) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.up = True
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._script: Any = None
        self._probe: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ connection
    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No client-side retries: a failed call falls back to local counting at once,
            # and the probe decides when Redis is back. A blocking pool: a burst beyond
            # MAX_CONNECTIONS waits its turn (within the call's timeout) instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=self.timeout,
                socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
            self._client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() ends it
            self._script = self._client.register_script(_WINDOWS_LUA)
            self._loop = loop
        return self._client

    def _went_down(self, e: BaseException) -> None:
        if self.up:
            self.up = False
            maillog.warning("shared counters unreachable: counting locally on this node",
                            shared=redact_url(self.url), reason=f"{type(e).__name__}: {e}")
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
        args: list[int] = []
        overlaps: list[float] = []
        for table, key, period, add in items:
            cur, prev, overlap = self._window_keys(table, key, period, now)
            keys += [cur, prev]
            args += [max(0, int(add)), math.ceil(2 * period) + 1]
            overlaps.append(overlap)
        raw = await self._call(lambda r: self._script(keys=keys, args=args, client=r))
        if raw is None:
            return None
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

    # ------------------------------------------------------------------ known addresses
    def _known_key(self, user: str, net: str) -> str:
        return f"{self.prefix}:known:{_key_part(user)}\0{net}"

    async def is_known(self, user: str, net: str) -> bool | None:
        got = await self._call(lambda r: r.exists(self._known_key(user, net)))
        return None if got is None else bool(got)

    async def remember(self, user: str, net: str, ttl: float) -> bool:
        secs = max(1, int(ttl))
        got = await self._call(lambda r: r.set(self._known_key(user, net), b"1", ex=secs))
        return got is not None
