"""Connection counting types shared by every throttle, and the workers' shared memory.

Owns the values a throttle answers with (`Pool`, `Admission`), the GCRA schedule of
`connection_rate`, a process's part of the global limits (`Share`), and `SharedCounters`:
gauges and sliding windows in one anonymous shared mapping that the master makes before
forking, so every receiving worker counts in the same place (policy/anvil.py's
SharedThrottle uses it; Postfix's anvil(8) is a server process, this is a memory table).

Contract (SharedCounters): keys (IPs, user names) are hashed with a per-start secret into
`SLOTS` slots per table. Two keys that share a slot share a counter: that can only make a
limit stricter for them, never looser, and with 65,536 slots it is rare. Gauges
(concurrent connections) are exact; rates use two fixed windows weighted into a sliding
estimate (the previous window counts for the part of it that still overlaps the sliding
window). Pools ("*", "class:smtp", "listener:NAME") have counters of their own, never a
slot of the address table: each pool key's 64-bit keyed hash is recorded, the first time
any process counts in it, in a small open-addressed table (`POOL_SLOTS`), so a pool never
shares a counter with another pool or with an address (an address sharing the slot of "*"
would be refused `max_connections_per_ip` whenever the server held that many
connections, until the next start). A connection is checked against all its pools and its
IP and counted in all of them under the one lock, so no two workers can both take the last
slot. `connection_rate` is one shared GCRA
schedule (nanoseconds of CLOCK_MONOTONIC, system-wide, so all workers read one clock).
Gauges held by a worker that dies (kill -9, OOM killer, a crash) are given back: each
worker (`adopt`) also records what it holds in a ledger row of its own in the mapping, and
the master, reaping it, subtracts that row from the gauges (`forget`); else every
connection it held stayed counted until the next start, and a few crashes under load
left the pools full (every client refused `421 4.7.0 Too many connections`). The lock is
a robust process-shared mutex (`RobustLock`): a worker killed while holding it (a few
microseconds per count) leaves it to the next taker instead of wedging every worker, and
the count it was making at most under-counted (the ledger is written before a count is
taken, after one is given back; a gauge never goes below 0, so its next zero heals it).
Failure policy: none; a slot overflow cannot happen (64-bit counters).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from authrelay import replies
from authrelay.types import Reply

SLOTS = 1 << 16
SLOT_CACHE = 4096  # remembered key -> slot mappings per process
# Pool keys the shared table tells apart exactly: a few per listener; one past it shares
# a counter with another pool (stricter, never looser), as addresses do.
POOL_SLOTS = 256
RATE_IP_PERIOD = 60.0  # connection_rate_per_ip is per minute
_WINDOW_TABLES = ("rate_ip", "auth_ip", "auth_user", "auth_usernet", "user_msgs",
                  "user_rcpts")
MARK_WAYS = 4  # entries per bucket of the eviction marks (a set-associative table)
# An entry: the key's keyed hash (0: free), then the Mark's fields, times in ns of
# CLOCK_MONOTONIC (system-wide, as the GCRA schedule).
_MARK_FIELDS = 5

# An address's eviction marks (smtpd/eviction.py): (marks, last pressed, refusals,
# authenticated at); times in time.monotonic() seconds, 0.0 for never.
Mark = tuple[int, float, int, float]


class MarkTable(Protocol):
    """Where eviction marks are kept: one process's dict or the workers' shared table."""

    def mark_get(self, key: str) -> Mark | None: ...
    def mark_put(self, key: str, mark: Mark) -> None: ...


@dataclass(frozen=True)
class Pool:
    """A connection pool: `key` names it ("*" global, "smtp" the smtp class, "listener:..."),
    `cap` is its size (0: no cap)."""

    key: str
    cap: int


@dataclass(frozen=True)
class Admission:
    """The answer to `connect`. Admitted (`refusal is None`): counted until `disconnect`, and
    the greeting waits `delay` seconds first. Refused: nothing counted; `reason` is
    "pool:<key>", "ip", "rate" or "rate_ip" (for logs and metrics)."""

    refusal: Reply | None = None
    delay: float = 0.0
    reason: str = ""

    @property
    def admitted(self) -> bool:
        return self.refusal is None


ADMIT = Admission()
PENDING = "pending:"  # gauge key prefix: an address's connections still in handshake


def pool_refusal(key: str) -> Admission:
    return Admission(replies.TOO_MANY_CONNECTIONS, 0.0, f"pool:{key}")


def gcra(tat: float, now: float, rate: float, max_delay: float) -> tuple[float, float]:
    """Generic cell rate algorithm with a burst of `rate` (one second's worth).

    `tat` is the theoretical arrival time of the next connection. Returns (delay, new tat);
    delay < 0 means refuse (the wait would pass `max_delay`; tat unchanged)."""
    interval = 1.0 / rate
    tolerance = (max(rate, 1.0) - 1.0) * interval  # a burst of `rate` goes through at once
    tat = max(tat, now)
    delay = tat - tolerance - now
    delay = delay if delay > 1e-6 else 0.0  # float noise is no wait
    if delay > max_delay:
        return -1.0, tat
    return delay, tat + interval


@dataclass
class Share:
    """This process's part of the global limits (1 of 1 unless several workers)."""

    index: int = 0
    count: int = 1
    shared: SharedCounters | None = None  # when the workers count together

    def part(self, total: int) -> int:
        if total <= 0 or self.count <= 1 or self.shared is not None:
            return total
        return max(1, total // self.count)


_libc: ctypes.CDLL | None = None
PTHREAD_PROCESS_SHARED = 1
PTHREAD_MUTEX_ROBUST = 1
_MUTEX_BYTES = 64  # sizeof(pthread_mutex_t) is 40 on 64-bit glibc and musl: room to spare


def _pthread() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc (and libpthread) are loaded
    return _libc


class RobustLock:
    """A process-shared robust pthread mutex in its own shared mapping (create before
    fork). A holder that dies (kill -9, the OOM killer) gives it to the next taker
    (EOWNERDEAD, made consistent at once) instead of leaving every process blocked for
    good, as a POSIX semaphore (multiprocessing.Lock) does. Not re-entrant."""

    def __init__(self) -> None:
        self._mm = mmap.mmap(-1, _MUTEX_BYTES)
        self._mutex = ctypes.c_char.from_buffer(self._mm)  # pinned: the mapping stays
        lib = _pthread()
        self._lock_fn, self._unlock_fn = lib.pthread_mutex_lock, lib.pthread_mutex_unlock
        self._consistent = lib.pthread_mutex_consistent
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t: 4 bytes
        for rc in (lib.pthread_mutexattr_init(attr),
                   lib.pthread_mutexattr_setpshared(attr, PTHREAD_PROCESS_SHARED),
                   lib.pthread_mutexattr_setrobust(attr, PTHREAD_MUTEX_ROBUST),
                   lib.pthread_mutex_init(ctypes.byref(self._mutex), attr),
                   lib.pthread_mutexattr_destroy(attr)):
            if rc != 0:
                raise OSError(rc, f"robust mutex: {os.strerror(rc)}")
        self._ref = ctypes.byref(self._mutex)

    def __enter__(self) -> None:
        rc = self._lock_fn(self._ref)
        if rc == errno.EOWNERDEAD:  # its holder died mid-update: take it over
            rc = self._consistent(self._ref)
        if rc != 0:
            raise OSError(rc, f"robust mutex: {os.strerror(rc)}")

    def __exit__(self, tp: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._unlock_fn(self._ref)


class SharedCounters:
    """Gauges and sliding-window counters in shared memory; create before fork()."""

    def __init__(self, slots: int = SLOTS, workers: int = 0) -> None:
        """`workers`: how many ledger rows (one per worker index, see `adopt`)."""
        self.slots = slots
        self._base: dict[str, int] = {"tat": 0, "conns": 1, "pool_keys": 1 + slots,
                                      "pools": 1 + slots + POOL_SLOTS}
        # A ledger row mirrors [0, _held_size): the gauges (address and pool counters);
        # only their entries are ever non-zero in it.
        self._held_size = size = 1 + slots + 2 * POOL_SLOTS
        for name in _WINDOW_TABLES:
            self._base[name] = size
            size += 3 * slots  # (window number, count in it, count in the one before)
        self._base["marks"] = size
        size += slots * _MARK_FIELDS
        self.workers = workers
        self._base["held"] = size
        size += workers * self._held_size
        self._row: int | None = None  # this process's ledger row (adopt), if any
        self._mm = mmap.mmap(-1, size * 8)  # anonymous + MAP_SHARED: children see it
        self._a = memoryview(self._mm).cast("q")
        self._lock = RobustLock()
        self._key = os.urandom(16)
        # key -> slot: a connection asks for the same key's slot 4-5 times (pending,
        # rate, connections, release) and a keyed hash costs ~1 us each; bounded, emptied
        # when full (a flood of addresses costs the hash again, never memory)
        self._slots: dict[str, int] = {}
        self._pools: dict[str, int] = {}  # pool key -> its counter's index (never moves)
        # id(pools) -> (pools, their indices): the object is kept, so its id is not reused
        self._pool_sets: dict[int, tuple[Sequence[Pool], tuple[tuple[int, Pool], ...]]] = {}

    def _pool(self, key: str) -> int:
        """The index of pool `key`'s own counter (see the module's contract)."""
        try:
            return self._pools[key]
        except KeyError:
            pass
        h = int.from_bytes(hashlib.blake2b(b"pool\0" + key.encode("utf-8", "surrogateescape"),
                                           digest_size=8, key=self._key).digest(),
                           "little", signed=True) or 1  # 0 marks a free entry
        a, keys = self._a, self._base["pool_keys"]
        found = h % POOL_SLOTS  # the table is full: share this one (stricter, never looser)
        with self._lock:
            for n in range(POOL_SLOTS):
                i = (h + n) % POOL_SLOTS
                if a[keys + i] == 0:
                    a[keys + i] = h
                if a[keys + i] == h:
                    found = i
                    break
        index = self._pools[key] = self._base["pools"] + found
        return index

    def adopt(self, worker: int) -> None:
        """In worker `worker` (0 <= worker < workers) right after fork: from now on what
        this process counts in the gauges is also recorded in its ledger row."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"no ledger row for worker {worker}")
        self._row = self._base["held"] + worker * self._held_size

    def forget(self, worker: int) -> int:
        """In the master, once worker `worker` is gone: give back every gauge it still
        held and clear its row (for the worker that replaces it). Returns how many
        counts were given back."""
        if not 0 <= worker < self.workers:
            return 0
        a, row = self._a, self._base["held"] + worker * self._held_size
        given = 0
        with self._lock:
            raw = self._mm[row * 8:(row + self._held_size) * 8]
            start = 0
            while True:  # only the non-zero entries (a few among 65,000)
                start = _next_nonzero(raw, start)
                if start < 0:
                    break
                i = start // 8
                n = a[row + i]
                if n > 0:
                    a[i] = max(0, a[i] - n)
                    given += n
                a[row + i] = 0
                start = (i + 1) * 8
        return given

    def _held(self, i: int, delta: int) -> None:
        """Under the lock: the ledger's side of a gauge change at index `i`. Written
        before a count is taken and after one is given back: a worker killed between
        the two writes (the lock is robust, the update is not atomic) must leave the
        gauge at most under-counted, which its next zero heals (counts never go
        below 0), never over-counted, which nothing would heal."""
        if self._row is not None:
            self._a[self._row + i] += delta

    def pool_level(self, key: str) -> int:
        """Connections in pool `key` now."""
        return self._a[self._pool(key)]

    def _slot(self, key: str) -> int:
        try:
            return self._slots[key]
        except KeyError:
            pass
        h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                            key=self._key).digest()
        if len(self._slots) >= SLOT_CACHE:
            self._slots.clear()
        slot = self._slots[key] = int.from_bytes(h, "little") % self.slots
        return slot

    # gauges --------------------------------------------------------------------
    def gauge(self, key: str) -> int:
        return self._a[self._base["conns"] + self._slot(key)]

    def gauge_add(self, key: str, delta: int) -> None:
        i = self._base["conns"] + self._slot(key)
        with self._lock:  # a count is taken ledger first, given back ledger last
            if delta > 0:
                self._held(i, delta)
            self._a[i] = max(0, self._a[i] + delta)
            if delta <= 0:
                self._held(i, delta)

    def try_acquire(self, ip: str, pools: Sequence[Pool], max_ip: int,
                    rate: float = 0.0, max_delay: float = 0.0,
                    now: float | None = None, rate_ip: int = 0) -> Admission:
        """Check every pool, the IP gauge, the address's rate (`rate_ip` a minute, in the
        "rate_ip" window: an attempt that reaches this check counts, refused or not) and
        the connection rate, in the order of Throttle.connect's contract; count the
        connection in all of them, atomically across workers (`max_ip` 0: no per-IP
        limit; `rate`, `rate_ip` 0: no rate). An attempt refused for a pool or the IP
        gauge is not counted in the address's rate (as in process)."""
        a, row = self._a, self._row
        idx = self._pool_indices(pools)
        ip_i = self._base["conns"] + self._slot(ip)
        t = time.monotonic() if now is None else now
        win_i = self._base["rate_ip"] + 3 * self._slot(ip)
        with self._lock:
            for i, p in idx:
                if p.cap and a[i] >= p.cap:
                    return pool_refusal(p.key)
            if max_ip and a[ip_i] >= max_ip:
                return Admission(replies.TOO_MANY_FROM_IP, 0.0, "ip")
            if rate_ip and self._roll(win_i, RATE_IP_PERIOD, t, 1) > rate_ip:
                return Admission(replies.RATE_LIMITED, 0.0, "rate_ip")
            delay = 0.0
            if rate:
                delay, tat = gcra(a[0] / 1e9, t, rate, max_delay)
                if delay < 0:
                    return Admission(replies.RATE_LIMITED, 0.0, "rate")
                a[0] = int(tat * 1e9)
            # The ledger first (see _held): a worker killed between the two leaves a
            # count given back that was never taken (healed at the gauge's next zero),
            # never one taken that forget() cannot give back (held for good).
            if row is not None:
                for i, _p in idx:
                    a[row + i] += 1
                a[row + ip_i] += 1
            for i, _p in idx:
                a[i] += 1
            a[ip_i] += 1
        return Admission(None, delay) if delay else ADMIT

    def release(self, ip: str, pools: Sequence[Pool]) -> None:
        a, row = self._a, self._row
        idx = self._pool_indices(pools)
        ip_i = self._base["conns"] + self._slot(ip)  # (before the lock)
        with self._lock:
            for i, _p in idx:
                a[i] = max(0, a[i] - 1)
            a[ip_i] = max(0, a[ip_i] - 1)
            if row is not None:  # the ledger's side (see _held)
                for i, _p in idx:
                    a[row + i] -= 1
                a[row + ip_i] -= 1

    def _pool_indices(self, pools: Sequence[Pool]) -> tuple[tuple[int, Pool], ...]:
        """(counter index, pool) of each pool, remembered per `pools` tuple: an Acceptor
        passes the same one for every connection (a new one after a reload)."""
        hit = self._pool_sets.get(id(pools))
        if hit is not None and hit[0] is pools:
            return hit[1]
        idx = tuple((self._pool(p.key), p) for p in pools)
        if type(pools) is not tuple:  # a list may change: not remembered
            return idx
        if len(self._pool_sets) >= POOL_SLOTS:  # reloads: start over rather than grow
            self._pool_sets.clear()
        self._pool_sets[id(pools)] = (pools, idx)
        return idx

    # windows -------------------------------------------------------------------
    def _window(self, table: str, key: str, period: float, now: float, add: int) -> float:
        i = self._base[table] + 3 * self._slot(key)
        with self._lock:
            return self._roll(i, period, now, add)

    def _roll(self, i: int, period: float, now: float, add: int) -> float:
        """Under the lock: add `add` to the window entry at `i` and return its sliding
        count (the window before weighted by how much of it still overlaps)."""
        a = self._a
        win = int(now // period)
        if a[i] != win:
            # Roll forward: the window before is kept only if it is the adjacent one.
            a[i + 2] = a[i + 1] if a[i] == win - 1 else 0
            a[i + 1] = 0
            a[i] = win
        a[i + 1] += add
        overlap = 1.0 - (now - win * period) / period
        return a[i + 1] + a[i + 2] * overlap

    def window_add(self, table: str, key: str, period: float, now: float, n: int = 1
                   ) -> float:
        return self._window(table, key, period, now, n)

    def window_count(self, table: str, key: str, period: float, now: float) -> float:
        return self._window(table, key, period, now, 0)

    # eviction marks ------------------------------------------------------------
    def _mark_bucket(self, key: str) -> tuple[int, int]:
        """(index of `key`'s bucket, its keyed hash): a bucket holds MARK_WAYS entries
        told apart by the hash, so two addresses never share a mark (a user's address
        never inherits a flooder's)."""
        h = int.from_bytes(hashlib.blake2b(b"mark\0" + key.encode("utf-8", "surrogateescape"),
                                           digest_size=8, key=self._key).digest(),
                           "little", signed=True) or 1  # 0 marks a free entry
        bucket = (h % (self.slots // MARK_WAYS)) * MARK_WAYS
        return self._base["marks"] + bucket * _MARK_FIELDS, h

    def mark_get(self, key: str) -> Mark | None:
        """`key`'s eviction marks as the last `mark_put` left them, or None."""
        a, (b, h) = self._a, self._mark_bucket(key)
        with self._lock:
            for i in range(b, b + MARK_WAYS * _MARK_FIELDS, _MARK_FIELDS):
                if a[i] == h:
                    return (a[i + 1], a[i + 2] / 1e9, a[i + 3], a[i + 4] / 1e9)
        return None

    def mark_put(self, key: str, mark: Mark) -> None:
        """Store `key`'s marks: in its entry, else a free one, else the bucket's least
        recently used one of an address that never authenticated, else its least
        recently used (bounded: MARK_WAYS addresses per bucket; a flood's addresses
        push out one another's marks before a user's)."""
        a, (b, h) = self._a, self._mark_bucket(key)
        n, last, refusals, authed = mark
        with self._lock:
            ways = range(b, b + MARK_WAYS * _MARK_FIELDS, _MARK_FIELDS)
            at = next((i for i in ways if a[i] == h), None)
            if at is None:
                at = min(ways, key=lambda i: (a[i] != 0, a[i + 4] != 0,
                                              max(a[i + 2], a[i + 4])))
            a[at], a[at + 1], a[at + 2] = h, n, int(last * 1e9)
            a[at + 3], a[at + 4] = refusals, int(authed * 1e9)


_NONZERO = re.compile(rb"[^\x00]")


def _next_nonzero(raw: bytes, start: int) -> int:
    """The offset of the first 8-byte entry of `raw` at or after `start` (aligned) with a
    non-zero byte, or -1 (the scan runs at C speed, without copies)."""
    m = _NONZERO.search(raw, start)
    if m is None:
        return -1
    return m.start() - m.start() % 8
