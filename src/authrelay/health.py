"""Dependency health: is this node's PostgreSQL and Redis reachable, and is it serving?

Owns the probes of the farm's dependencies and what `/health` answers. Contract:
`DependencyProbe(cfg)` runs in the delivering process (the master, or the single process):
`start()` launches a task that every PROBE_INTERVAL seconds asks each configured
dependency one cheap question on one long-lived connection of its own (PostgreSQL for
`[auth] backend = "postgresql"`: `SELECT 1`; Redis for `[limits] shared`: `PING`), each
bounded by PROBE_TIMEOUT. `state()` is `{name: (up, reason)}`; `health()` is the HTTP
answer `/health` gives on the metrics listener (metrics.py): `200 ok` when every required
dependency (REQUIRED, or the query's `require=`) answered its last probe and the node is
not stopping, else `503` with one line per failing one (`postgresql down:
ConnectionRefusedError: ...`, `stopping`), what HAProxy's `option httpchk GET /health`
wants; a dependency that is down but not required is a `degraded: ...` line under `ok`.
The gauge `authrelay_dependency_up{dependency=...}` (1/0) is read from the same state at
scrape time.
Failure policy: a probe never raises; its errors are the reason it reports (the DSN and URL
never appear: their passwords would). It does not log: the parts that use the dependency
already log `user database unreachable` / `shared counters unreachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from authrelay.config import Config

PROBE_INTERVAL = 2.0
PROBE_TIMEOUT = 2.0
POSTGRESQL = "postgresql"
REDIS = "redis"
# What /health fails for unless the query says otherwise (`/health?require=redis,postgresql`,
# `?require=` for none): without PostgreSQL a node answers AUTH 454 to every user not in
# its credential cache, so another node should take its clients; without Redis it counts
# its limits locally and serves every client (docs/SCALING.md), so it stays in rotation.
REQUIRED = frozenset({POSTGRESQL})


def _reason(e: BaseException) -> str:
    text = str(e).replace("\n", " ").strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class DependencyProbe:
    """See the module docstring."""

    def __init__(self, cfg: Config, *, interval: float = PROBE_INTERVAL,
                 timeout: float = PROBE_TIMEOUT) -> None:
        self.cfg = cfg
        self.interval = interval
        self.timeout = timeout
        self.stopping = False
        self._state: dict[str, tuple[bool, str]] = {}
        if cfg.auth.backend == "postgresql":
            self._state[POSTGRESQL] = (False, "not probed yet")
        if cfg.limits.shared:
            self._state[REDIS] = (False, "not probed yet")
        self._pg: Any = None
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def dependencies(self) -> list[str]:
        return list(self._state)

    def state(self) -> dict[str, tuple[bool, str]]:
        return dict(self._state)

    def health(self, require: set[str] | None = None) -> tuple[int, str]:
        """(HTTP status, body) for /health: 503 when a dependency in `require` (default
        REQUIRED) is down, or the node is stopping; 200 otherwise, the body naming any
        other dependency that is down (`ok` / `degraded: redis down: ...`)."""
        need = REQUIRED if require is None else require
        bad = [f"{n} down: {why}" for n, (up, why) in self._state.items()
               if not up and n in need]
        other = [f"degraded: {n} down: {why}" for n, (up, why) in self._state.items()
                 if not up and n not in need]
        if self.stopping:
            bad.insert(0, "stopping")
        if bad:
            return 503, "\n".join(bad + other) + "\n"
        return 200, "\n".join(["ok", *other]) + "\n"

    # ------------------------------------------------------------------ probing
    async def start(self) -> None:
        if not self._state:
            return
        await self.probe_once()  # the first answer is there before anyone asks
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe_once()

    async def probe_once(self) -> None:
        checks = []
        if POSTGRESQL in self._state:
            checks.append(self._probe(POSTGRESQL, self._ask_postgresql, self._drop_pg))
        if REDIS in self._state:
            checks.append(self._probe(REDIS, self._ask_redis, self._drop_redis))
        await asyncio.gather(*checks)

    async def _probe(self, name: str, ask: Any, drop: Any) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await ask()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # down, whatever the cause: the reason says which
            self._state[name] = (False, _reason(e))
            await drop()
            return
        self._state[name] = (True, "")

    async def _ask_postgresql(self) -> None:
        from authrelay.auth import pgusers

        if self._pg is None:
            self._pg = await pgusers.driver().connect(self.cfg.auth.dsn, timeout=self.timeout)
        await self._pg.fetchval("SELECT 1", timeout=self.timeout)

    async def _drop_pg(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.terminate()
            self._pg = None

    async def _ask_redis(self) -> None:
        from authrelay.policy import shared

        if self._redis is None:
            self._redis = shared.client(self.cfg.limits.shared, timeout=self.timeout,
                                        max_connections=1)
        await self._redis.ping()

    async def _drop_redis(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop_pg()
        await self._drop_redis()
