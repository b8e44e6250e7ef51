"""abandoned: the queue ids of commits given up, kept past a kill of the whole server.

A producer that gave up waiting for a commit (Incoming.abandon returned True: its client
told 451 4.3.0, no 250 can follow for that id) says so to the scheduler (`ID abandoned`,
spool/notify.py), which drops a file then found under that id instead of delivering it:
the producer died while the commit thread was in its fsync, past the ready mark. That
memory is the master's: killed too (`workers = 1`, a kill of the whole server, the OOM
killer taking both), the start delivered the file, a duplicate of the client's retry.
So the producer also writes the id here first, in the instance's book (`book_path`: a
file in /dev/shm, named by the spool directory as owedlines.py's book), which every
process maps shared: memory keeps what is written whatever kills the processes. The
next start reads it (`leftovers`: the ids whose queue file is still there, in queue/ or
in hold/, where a hold, containment's or an admin's, may have moved it) and its
scheduler drops those files, one line each, never delivered (a held one at its
release). A machine crash (power
loss) loses the book with the rest of memory: a file the crash left ready and durable
(its fsync done before the power went) is delivered then.

Cost: no system call (a copy into the mapping); the book's memory, `ENTRY` x `ENTRIES`
(80 KiB) per process, is taken at the start. Bounded: `ENTRIES` ids per process slot
(0: the master or the one process, worker n: n + 1); an entry is freed once its commit's
thread has returned (the file removed: `release`), so the entries held are the commits
given up whose threads are still out (held in an fsync, or queued behind one). Past
`ENTRIES` of them a newer one is not kept (the oldest, the one most likely held in its
fsync past the ready mark, stay); the master's slot also keeps the ids a reaped worker
left with their files still there, and a start's leftovers, until the next start. A
book that cannot be opened in /dev/shm (none, full, the name another user's: a
`warning=` line at the start) is made in anonymous shared memory
(`AbandonedBook(None, ...)`): a reaped worker's ids still reach the master, this
instance's are lost to a kill of it; a previous instance's, read before the room for
this one's is taken, are dropped all the same.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from authrelay import shmbook

NAME = "authrelay-abandoned"
ID_MAX = 64  # bytes of a queue id (store.QUEUE_ID_MAX); ours have 14 to 17
_HEAD = struct.Struct("<QB")  # sequence (0: free), the id's length
ENTRY = 80  # bytes per entry: the header and the id
ENTRIES = 1024  # per slot (process): ids whose commit threads are still out
SLOT = ENTRY * ENTRIES
_MAGIC = b"authrelay abandoned 1\n".ljust(ENTRY, b"\0")  # the first entry: the layout


class Slot:
    """One process's entries: `keep` the id of each commit it gives up, `release` it once
    that commit's thread has returned (its file removed: nothing left to drop). Thread-safe."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._seq = max((seq for seq, _ in _entries(view)), default=0)
        self._next = 0  # the entry tried first (entries are mostly freed in order kept)
        self._lock = threading.Lock()

    def keep(self, queue_id: str) -> int:
        """`queue_id` given up: kept until released; its entry, or -1 when it is not
        kept (every entry held by a commit thread still out; no queue id of ours)."""
        data = queue_id.encode("ascii", "replace")
        if not 0 < len(data) <= ID_MAX:
            return -1
        with self._lock:
            for n in range(ENTRIES):
                i = (self._next + n) % ENTRIES
                at = i * ENTRY
                if not _HEAD.unpack_from(self._view, at)[0]:
                    break
            else:
                return -1
            self._next = (i + 1) % ENTRIES
            self._seq += 1
            self._view[at + _HEAD.size:at + _HEAD.size + len(data)] = data
            _HEAD.pack_into(self._view, at, self._seq, len(data))  # the length first: whole
        return i

    def release(self, entry: int) -> None:
        """The commit of `entry` (keep's) has settled: its file removed, entry free."""
        _HEAD.pack_into(self._view, entry * ENTRY, 0, 0)

    def ids(self) -> list[str]:
        """The ids the slot holds, oldest first."""
        return [qid for _, qid in sorted(_entries(self._view))]


def book_path(spool_dir: Path) -> Path:
    """The book of the instance whose spool is `spool_dir` (the same at its next start)."""
    return shmbook.book_path(NAME, spool_dir)


class AbandonedBook:
    """The book: `slots` slots in one shared file mapping, after a header entry."""

    def __init__(self, path: Path | None, slots: int,
                 exists: Callable[[str], bool] = lambda _: True) -> None:
        """Open (create) the book for `slots` processes; `path` None: in anonymous
        shared memory (no previous instance's). `leftovers`: the ids the previous
        instance's processes gave up whose file is still there (`exists`, given a
        queue id), slot by slot, oldest first; kept in slot 0 again (a kill before
        this instance's scheduler dropped their files leaves them to the next start).
        OSError when `path` is not this user's own regular file (/dev/shm is
        everyone's); no room for it there: `unkept`, the leftovers read all the same."""
        self.leftovers: list[str] = []
        self.unkept: OSError | None = None  # no room in /dev/shm: kept in anonymous memory
        self._slots = slots
        self._path = path
        size = ENTRY + SLOT * slots
        if path is None:
            self._map = mmap.mmap(-1, size)
            self._map[:ENTRY] = _MAGIC
            return
        fd, old_size = shmbook.open_own(path)
        try:
            found: list[tuple[int, int, str]] = []
            if old_size > ENTRY:
                with mmap.mmap(fd, old_size) as old:
                    if old[:ENTRY] == _MAGIC:
                        for s in range((old_size - ENTRY) // SLOT):
                            view = memoryview(old)[ENTRY + SLOT * s:ENTRY + SLOT * (s + 1)]
                            found += [(s, seq, qid) for seq, qid in _entries(view)]
                            view.release()
            seen: set[str] = set()
            for _, _, qid in sorted(found):
                if qid not in seen and exists(qid):
                    seen.add(qid)
                    self.leftovers.append(qid)
            # Every entry free, its pages taken now (never a SIGBUS at a write); no room
            # in /dev/shm for them: in anonymous memory (`unkept`), the leftovers read.
            self._map, self.unkept = shmbook.map_taken(fd, path, size)
            if self.unkept is not None:
                self._path = None  # (the book as it was, for the next start)
        finally:
            os.close(fd)
        self._map[:ENTRY] = _MAGIC
        keep = self.slot(0).keep
        for qid in self.leftovers[:ENTRIES]:
            keep(qid)

    def close(self, exists: Callable[[str], bool]) -> None:
        """At the end of the instance (a stop): the book's file is removed unless an id
        it holds still has its file (`exists`), which the next start then drops."""
        if self._path is None:
            return
        if not any(exists(qid) for i in range(self._slots) for qid in self.slot(i).ids()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def slot(self, i: int) -> Slot:
        """Process i's slot (0: the master or the one process; worker n: n + 1)."""
        return Slot(self._view(i))

    def take(self, i: int) -> list[str]:
        """The ids slot i's dead process gave up, oldest first; the slot cleared (its
        next process starts empty)."""
        view = self._view(i)
        ids = [qid for _, qid in sorted(_entries(view))]
        view[:] = bytes(SLOT)
        return ids

    def _view(self, i: int) -> memoryview:
        if not 0 <= i < self._slots:
            raise IndexError(f"abandoned-commits slot {i} of {self._slots}")
        return memoryview(self._map)[ENTRY + SLOT * i:ENTRY + SLOT * (i + 1)]


def _entries(view: memoryview) -> list[tuple[int, str]]:
    found = []
    for i in range(ENTRIES):
        seq, n = _HEAD.unpack_from(view, i * ENTRY)
        if seq and 0 < n <= ID_MAX:
            at = i * ENTRY + _HEAD.size
            found.append((seq, bytes(view[at:at + n]).decode("ascii", "replace")))
    return found
