"""Known addresses: the networks each user authenticated from recently (AUTH lockout).

Owns `state_dir/known_addresses.db`, a small SQLite table (user, net, last_ok) where `net`
is the /24 or /64 of a successful AUTH (`throttle.source_net`). The throttle asks it only
when a user is past the per-user failure limit: from a known network the password is still
checked, so an attacker guessing from elsewhere cannot lock the user out
(docs/LIMITS.md "AUTH brute force").

Contract: `await is_known(user, net)`, `await remember(user, net)`. Entries older than
`[auth] known_address_days` do not count and are pruned at open and once a day. The file is
shared by all workers of an instance and survives restarts (WAL mode, a busy timeout for
concurrent writers). SQLite calls run in one dedicated thread, never on the event loop; a
successful AUTH writes at most once a day per (user, net) (an in-memory cache answers the
rest). Failure policy: if the database cannot be opened or written (permissions, full
disk, a read-only remount), the store keeps working from memory and says so in the
maillog, and tries the file again RETRY seconds later: what it learnt meanwhile (at most
CACHE_KEYS rows) is written then, so a disk that has room again needs no restart. It
never raises into a session. Format version in `PRAGMA user_version` (1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from authrelay import maillog
from authrelay.sqlitefile import immediate, open_db

log = logging.getLogger(__name__)

VERSION = 1
CACHE_KEYS = 50_000
REFRESH = 86400.0  # rewrite last_ok at most this often per (user, net)
RETRY = 60.0  # seconds between tries of a file that could not be opened or written


_SCHEMA = """
CREATE TABLE IF NOT EXISTS known (user TEXT NOT NULL, net TEXT NOT NULL,
                                  last_ok REAL NOT NULL, PRIMARY KEY (user, net))
    WITHOUT ROWID
"""


_UPSERT = ("INSERT INTO known (user, net, last_ok) VALUES (?, ?, ?) "
           "ON CONFLICT (user, net) DO UPDATE SET last_ok = excluded.last_ok")


class KnownAddresses:
    def __init__(self, path: Path | None, days: float) -> None:
        self.path = path
        self.ttl = days * 86400.0
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> last_ok (wall)
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="known-addresses")
        self._retry_at = 0.0  # time.monotonic() before which the file is not tried
        self._down = False  # the file failed and has not taken a write since
        # (user, net) -> last_ok learnt while the file failed: written once it works
        self._unwritten: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._pruned: float | None = None  # time.monotonic() of the last prune

    # ---------------------------------------------------------------- thread side
    def _open(self) -> sqlite3.Connection | None:
        if self._db is None and self.path is not None \
                and time.monotonic() >= self._retry_at:
            try:
                # User names and their networks inside: 0600 (the state dir is 0711;
                # sqlitefile.py makes a new file so). A file an earlier release made 0644
                # is narrowed, with its -wal and -shm.
                for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                    with contextlib.suppress(FileNotFoundError):
                        if f.stat().st_mode & 0o077:
                            os.chmod(f, 0o600)
                # synchronous = NORMAL: a lost row costs one re-learn.
                self._db = open_db(self.path, _SCHEMA, VERSION, busy_timeout=2.0,
                                   newer=lambda v: sqlite3.DatabaseError(
                                       f"format {v} is newer than this authrelay knows"))
            except (sqlite3.Error, OSError) as e:
                self._give_up(e)
        if self._db is not None and (self._pruned is None
                                     or time.monotonic() - self._pruned > REFRESH):
            self._pruned = time.monotonic()
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("DELETE FROM known WHERE last_ok < ?",
                                 (time.time() - self.ttl,))
        if self._db is not None and self._unwritten:
            try:
                with immediate(self._db):  # one transaction: a few pages of the WAL
                    self._db.executemany(_UPSERT, [(u, n, w) for (u, n), w
                                                   in self._unwritten.items()])
            except sqlite3.Error as e:
                self._give_up(e)
                return None
            self._unwritten.clear()
        if self._db is not None and self._down:
            self._down = False
            maillog.warning(f"known addresses written to {self.path} again")
        return self._db

    def _give_up(self, e: BaseException) -> None:
        if not self._down:
            self._down = True
            maillog.warning(f"known addresses kept in memory only: {self.path}: {e} "
                            f"(tried again every {RETRY:.0f} s)")
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        self._retry_at = time.monotonic() + RETRY

    def _lookup(self, user: str, net: str) -> float:
        db = self._open()
        if db is None:
            return 0.0
        try:
            row = db.execute("SELECT last_ok FROM known WHERE user=? AND net=?",
                             (user, net)).fetchone()
        except sqlite3.Error as e:
            self._give_up(e)
            return 0.0
        return float(row[0]) if row else 0.0

    def _store(self, user: str, net: str, when: float) -> None:
        db = self._open()
        try:
            if db is not None:
                db.execute(_UPSERT, (user, net, when))
                return
        except sqlite3.Error as e:
            self._give_up(e)
        if self.path is not None:
            self._unwritten[(user, net)] = when
            self._unwritten.move_to_end((user, net))
            if len(self._unwritten) > CACHE_KEYS:
                self._unwritten.popitem(last=False)

    # ---------------------------------------------------------------- async API
    def _cached(self, key: tuple[str, str], when: float) -> None:
        self._cache[key] = when
        self._cache.move_to_end(key)
        if len(self._cache) > CACHE_KEYS:
            self._cache.popitem(last=False)

    async def is_known(self, user: str, net: str) -> bool:
        if self.ttl <= 0:
            return False
        key, now = (user, net), time.time()
        last = self._cache.get(key, 0.0)
        if now - last >= self.ttl:
            # Another worker may have learnt it: ask the file (rare: only for a user who is
            # past the failure limit).
            loop = asyncio.get_running_loop()
            last = max(last, await loop.run_in_executor(self._pool, self._lookup, user, net))
            if last:
                self._cached(key, last)
        return now - last < self.ttl

    async def remember(self, user: str, net: str) -> None:
        if self.ttl <= 0:
            return
        key, now = (user, net), time.time()
        if now - self._cache.get(key, 0.0) < REFRESH:
            return
        self._cached(key, now)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._store, user, net, now)

    def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

        # RuntimeError: closed already; TimeoutError: a hung disk (a frozen spool holds the
        # database's close), which must not hold the stop: the thread ends at the thaw.
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._pool.submit(_close).result(timeout=5)
        self._pool.shutdown(wait=False)
