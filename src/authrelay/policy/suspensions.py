"""Where containment counts and suspensions live (policy/containment.py decides on them).

Owns:
- `LocalStore`: the SQLite file `state_dir/containment.db` (format in `PRAGMA
  user_version`), shared by every process of one node (the receiving workers count
  messages, recipients and networks; the master's scheduler counts refused recipients)
  and surviving restarts: per-user events within the window, and suspensions.
- `State`: the async face the suspender uses, choosing per call where things live:
  suspensions in PostgreSQL (`authrelay.suspensions`) when `[auth] backend =
  "postgresql"`, so every node of a farm refuses a suspended user; counters in Redis when
  `[limits] shared` is set (sorted sets per user and kind, policy/shared.py), so the
  whole farm's activity counts against one threshold; otherwise this node's SQLite file.

Contract: counts are of **distinct** values within a sliding window (a message counts
by its queue id, a recipient and a refusal by the lower-cased address, a network by its
/24 or /64); an event older than the window no longer counts
and is pruned. Times are the wall clock's (they survive restarts); in this node's file an
event more than CLOCK_SLACK ahead of the clock (counted before the clock was set back)
is dropped too, never counted for the jump's length. `suspend()` is True only for the
caller that created the suspension (an INSERT that did nothing otherwise), so one trip
makes one notice however many processes or nodes race to it. Memory and rows are
bounded: only watched kinds are recorded, and a suspended user is no longer counted (its
MAILs are refused).

Failure policy: Redis unreachable: this node counts in SQLite (policy/shared.py says so
in the maillog); once Redis answers again, within a window of that a user's counts are the
larger of Redis's and the file's, so what was counted meanwhile is not forgiven (by any
process of the node: each looks at the file's newest event when the file has changed).
PostgreSQL unreachable or refusing (a read-only role): the suspension is recorded in this
node's SQLite file instead and the maillog says so; `suspended()`
then answers from the local file only (fail open for the farm, never refusing a user
because a database is down). A local SQLite error propagates to the suspender, which logs
it and lets the mail through (containment is a safety net, not a gate for every message).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from authrelay import maillog, stopdeadline
from authrelay.auth.pgusers import PgUserStore
from authrelay.config import Config
from authrelay.policy.containment import KINDS, Counts, Suspension
from authrelay.policy.shared import SharedCounters
from authrelay.sqlitefile import immediate, open_db

__all__ = ["LocalStore", "State", "Suspension", "make_state"]

T = TypeVar("T")

SCHEMA_VERSION = 2  # 2: events_by_user_time (counting bounded by the thresholds)
PRUNE_EVERY = 1000  # records per process between prunes of everyone's expired events
CACHE_TTL = 2.0  # seconds a PostgreSQL answer to "is this user suspended?" is reused
CACHE_MAX = 10000
# An event this far ahead of the clock was counted before the clock was set back: its
# age is unknown, and it no longer counts (as the events a clock set forward leaps past).
# Within it: processes' clocks read a moment apart (a record waits for the write lock).
CLOCK_SLACK = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user  TEXT NOT NULL,
    kind  TEXT NOT NULL,              -- messages | recipients | refused | networks
    value TEXT NOT NULL,              -- queue id, address, network
    at    REAL NOT NULL,              -- unix time of the latest occurrence
    PRIMARY KEY (user, kind, value)
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE INDEX IF NOT EXISTS events_by_user_time ON events (user, kind, at);
CREATE TABLE IF NOT EXISTS suspensions (
    user   TEXT PRIMARY KEY,
    at     INTEGER NOT NULL,          -- unix time
    reason TEXT NOT NULL,             -- the figure that tripped: "recipients=1000 (limit 1000)"
    node   TEXT NOT NULL DEFAULT ''   -- the hostname that suspended
);
"""


class LocalStore:
    """The SQLite file of one node. Thread-safe: one connection per thread."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []  # the file is made at first use
        self._records = 0

    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        # User names inside: the file is made 0600 (sqlitefile.py).
        conn = open_db(self.path, _SCHEMA, SCHEMA_VERSION, busy_timeout=self._busy_timeout,
                       newer=lambda v: sqlite3.DatabaseError(
                           f"{self.path}: format {v} is newer than this authrelay knows"))
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()
        self._local = threading.local()

    # ------------------------------------------------------------------ counters
    def record(self, user: str, items: Iterable[tuple[str, str]], window: float,
               now: float | None = None, limits: dict[str, int] | None = None) -> Counts:
        """Add (kind, value) events for `user` and return its counts within `window`.
        `limits` (kind -> threshold; the kinds to count, default all): a count stops at
        its threshold (what is past it changes no decision), so the cost is bounded by
        the thresholds, not the traffic."""
        now = time.time() if now is None else now
        items = list(items)
        db = self._db()
        with immediate(db):
            db.executemany("INSERT INTO events (user, kind, value, at) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (user, kind, value) DO UPDATE SET at = excluded.at",
                           [(user, k, v, now) for k, v in items])
            got = {}
            kinds = set(KINDS) if limits is None else set(limits) | {k for k, _ in items}
            for kind in kinds:
                db.execute("DELETE FROM events WHERE user = ? AND kind = ? AND (at <= ?"
                           " OR at > ?)", (user, kind, now - window, now + CLOCK_SLACK))
                cap = (limits or {}).get(kind) or -1  # -1: no LIMIT
                got[kind] = db.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM events WHERE user = ? AND kind = ?"
                    " AND at > ? LIMIT ?)", (user, kind, now - window, cap)).fetchone()[0]
        self._records += 1
        if self._records % PRUNE_EVERY == 0:  # users who stopped sending: their old rows
            self.prune(window, now)
        return Counts(**{k: int(got.get(k, 0)) for k in KINDS})

    def counts(self, user: str, window: float, limits: dict[str, int] | None = None,
               now: float | None = None) -> Counts:
        """The user's counts within `window` as `record` gives them, adding nothing."""
        now = time.time() if now is None else now
        db = self._db()
        got = {}
        for kind in set(KINDS) if limits is None else set(limits):
            cap = (limits or {}).get(kind) or -1  # -1: no LIMIT
            got[kind] = db.execute(
                "SELECT count(*) FROM (SELECT 1 FROM events WHERE user = ? AND kind = ?"
                " AND at > ? AND at <= ? LIMIT ?)",
                (user, kind, now - window, now + CLOCK_SLACK, cap)).fetchone()[0]
        return Counts(**{k: int(got.get(k, 0)) for k in KINDS})

    def changed(self) -> int:
        """A stamp that changes when any process writes the file (the largest mtime of
        the file and its WAL, in ns; 0: neither exists): two stat calls, no SQLite."""
        stamp = 0
        for p in (str(self.path), f"{self.path}-wal"):
            try:
                stamp = max(stamp, os.stat(p).st_mtime_ns)
            except FileNotFoundError:
                continue
        return stamp

    def newest(self) -> float:
        """The unix time of the latest event counted here (0.0: none): one indexed read."""
        got = self._db().execute("SELECT max(at) FROM events").fetchone()[0]
        return float(got) if got is not None else 0.0

    def prune(self, window: float, now: float | None = None) -> int:
        """Drop every event older than the window (users who stopped sending), and
        those ahead of the clock (CLOCK_SLACK)."""
        now = time.time() if now is None else now
        return self._db().execute("DELETE FROM events WHERE at <= ? OR at > ?",
                                  (now - window, now + CLOCK_SLACK)).rowcount

    def clear(self, user: str) -> None:
        """Forget the user's counts (on resume: the old spree must not trip it again)."""
        self._db().execute("DELETE FROM events WHERE user = ?", (user,))

    # ------------------------------------------------------------------ suspensions
    def suspension(self, user: str) -> Suspension | None:
        row = self._db().execute("SELECT user, at, reason, node FROM suspensions "
                                 "WHERE user = ?", (user,)).fetchone()
        return Suspension(*row) if row else None

    def suspend(self, user: str, at: int, reason: str, node: str) -> bool:
        cur = self._db().execute("INSERT INTO suspensions (user, at, reason, node) "
                                 "VALUES (?, ?, ?, ?) ON CONFLICT (user) DO NOTHING",
                                 (user, at, reason, node))
        return cur.rowcount == 1

    def resume(self, user: str) -> Suspension | None:
        s = self.suspension(user)
        if s is not None:
            self._db().execute("DELETE FROM suspensions WHERE user = ?", (user,))
        return s

    def suspensions(self) -> list[Suspension]:
        return [Suspension(*r) for r in self._db().execute(
            "SELECT user, at, reason, node FROM suspensions ORDER BY at")]


class State:
    """The async face over the three places (see the module docstring). `pg`: a
    pgusers.PgUserStore or None; `redis`: a shared.SharedCounters or None."""

    def __init__(self, local: LocalStore, *, pg: Any = None, redis: Any = None,
                 window: float = 3600.0) -> None:
        self.local = local
        self.pg = pg
        self.redis = redis
        self.window = window
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="authrelay-contain")
        self._cache: dict[str, tuple[float, bool]] = {}
        self.pg_problem = ""  # why the last PostgreSQL call failed ("" when fine)
        # Until when (wall clock) events counted in the node's file while Redis was away
        # (by this process or another: every worker's file) are within the window:
        # Redis's counts do not hold them. Looked up in the file when it changed.
        self._local_until = 0.0
        self._file_seen = -1  # LocalStore.changed() when the file was last looked at

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def record(self, user: str, items: list[tuple[str, str]],
                     limits: dict[str, int] | None = None) -> Counts:
        if self.redis is not None:
            got = await self.redis.distinct(user, items, self.window)
            if got is not None:
                farm = Counts(**{k: int(got.get(k, 0)) for k in KINDS})
                if time.time() >= self._local_until:
                    changed = self.local.changed()
                    if changed != self._file_seen:
                        # Written since this process last looked: another may have
                        # counted there (a worker that found Redis away when this one
                        # did not, or one since replaced).
                        self._file_seen = changed
                        newest = await self._io(self.local.newest)
                        self._local_until = max(self._local_until, newest + self.window)
                if time.time() >= self._local_until:
                    return farm
                # Redis is back within a window of counting here: what this node counted
                # meanwhile is not in Redis and must not be forgiven (the larger count).
                mine = await self._io(self.local.counts, user, self.window, limits)
                return Counts(**{k: max(getattr(farm, k), getattr(mine, k)) for k in KINDS})
            self._local_until = time.time() + self.window
        return await self._io(self.local.record, user, items, self.window, None, limits)

    async def suspended(self, user: str) -> bool:
        if self.local.suspension(user) is not None:  # one indexed read (WAL: no wait)
            return True
        if self.pg is None:
            return False
        now = time.monotonic()
        hit = self._cache.get(user)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            got = await self.pg.suspension(user) is not None
            self.pg_problem = ""
        except Exception as e:  # UserStoreUnavailable: fail open (module docstring)
            self.pg_problem = maillog.exc_text(e)
            return False
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[user] = (now + CACHE_TTL, got)
        return got

    async def suspend(self, user: str, reason: str, node: str) -> bool:
        at = int(time.time())
        self._cache.pop(user, None)
        if self.pg is not None:
            try:
                created = bool(await self.pg.suspend(user, at, reason, node))
                self.pg_problem = ""
                return created
            except Exception as e:  # down or a read-only role: this node at least
                self.pg_problem = maillog.exc_text(e)
        return bool(await self._io(self.local.suspend, user, at, reason, node))

    async def resume(self, user: str) -> Suspension | None:
        self._cache.pop(user, None)
        found = await self._io(self.local.resume, user)
        await self._io(self.local.clear, user)
        if self.pg is not None:
            got: Suspension | None = await self.pg.resume(user)  # the CLI's: errors shown
            found = found or got
        if self.redis is not None:
            await self.redis.clear_distinct(user)
        return found

    async def suspensions(self) -> list[Suspension]:
        out = {s.user: s for s in await self._io(self.local.suspensions)}
        if self.pg is not None:
            out.update({s.user: s for s in await self.pg.suspensions()})
        return sorted(out.values(), key=lambda s: s.at)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        # the database's close writes (its WAL): off the loop, bounded (a frozen spool)
        await stopdeadline.off_loop(self.local.close, "containment-close",
                                    stopdeadline.DISK_WAIT)
        if self.pg is not None:
            await self.pg.close()
        if self.redis is not None:
            await self.redis.close()


def make_state(cfg: Config, redis: SharedCounters | None = None) -> State:
    """The stores for `cfg` (module docstring): always this node's SQLite file;
    PostgreSQL for suspensions with `[auth] backend = "postgresql"`; Redis for the
    counters with `[limits] shared` (`redis`: the process's client, shared with its
    throttle; else one of its own)."""
    pg = None
    if cfg.auth.backend == "postgresql":
        pg = PgUserStore(cfg.auth.dsn, pool_size=2, timeout=cfg.auth.backend_timeout)
    if not cfg.limits.shared:
        redis = None
    elif redis is None:
        redis = SharedCounters(cfg.limits.shared)
    return State(LocalStore(cfg.state_path / "containment.db"), pg=pg, redis=redis,
                 window=cfg.limits.containment.window)
