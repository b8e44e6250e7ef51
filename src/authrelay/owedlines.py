"""owedlines: the refusal lines a process owes its log target, kept past its death.

A `reject=` line (a refused command, a failed login, a commit given up with 451) is written
by its process's maillog writer thread up to 5 ms (the writer's gather) after the reply
went out, indefinitely later on a stalled target: a process killed then (kill -9, the OOM
killer) took the line with it, though the client had its reply. maillog.py also puts such a
line here, in the instance's book (`book_path`: a file in /dev/shm), which every process
maps shared (memory keeps what is written whatever kills a process; a machine crash
loses it, as it loses the writer's queue), one slot per process; the writer thread
clears the entry once the line is written. The master, reaping a dead worker, writes
what its slot still holds before another worker takes the slot (`take`); a start writes
what any slot still holds (the previous instance killed, a `workers = 1` process with
it). Such a line ends `logged_by=master`.

Not in the spool: a page of a shared file mapping on a frozen filesystem (fsfreeze, a
VM snapshot's freeze) blocks the process that writes to it until the thaw, and that is
the event loop (seen: with the spool frozen, a worker's first refusal stopped it, every
client of it unanswered, until the thaw). A memory filesystem is never frozen so, and
has no writeback. A book that cannot be opened there (no /dev/shm; the name another
user's; no room: its memory, `ENTRY` x `ENTRIES` (256 KiB) per process, is taken at the
start) is made in anonymous shared memory (`OwedLines(None, ...)`): a killed worker's
lines still reach the master, a killed instance's are lost.

Cost: no system call (a copy into the mapping); only refusal lines are kept. Bounded:
`ENTRIES` lines of at most `LINE_MAX` bytes per slot. A line longer, or one more while
`ENTRIES` wait for a stalled target (a refusal flood), is not kept: it is queued for the
writer as every other line. Left: a process killed between its writer's write and the
clear gets the line written twice (the master's with `logged_by=master`), never lost.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from pathlib import Path

from authrelay import shmbook

NAME = "authrelay-owed-lines"
ENTRY = 4096  # bytes per kept line: a header and the line's UTF-8
ENTRIES = 64  # per slot (process)
_HEAD = struct.Struct("<QI")  # sequence (0: free), the line's length
LINE_MAX = ENTRY - _HEAD.size
SLOT = ENTRY * ENTRIES
_MAGIC = b"authrelay owed-lines 1\n".ljust(ENTRY, b"\0")  # the first entry: the layout


class Slot:
    """One process's part of the book: `keep` before the line is queued for the writer,
    `written` once the writer wrote it (its thread)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._next = 0  # the entry tried next (entries are freed in the order kept)
        self._seq = 0
        self._lock = threading.Lock()

    def keep(self, line: str) -> int:
        """The entry now holding `line`, or -1 when it is not kept (too long; every
        entry still waiting for the writer)."""
        data = line.encode("utf-8", "replace")
        if len(data) > LINE_MAX:
            return -1
        with self._lock:
            i = self._next
            at = i * ENTRY
            if _HEAD.unpack_from(self._view, at)[0]:
                return -1  # the oldest kept line is not written yet: the slot is full
            self._next = (i + 1) % ENTRIES
            self._seq += 1
            self._view[at + _HEAD.size:at + _HEAD.size + len(data)] = data
            # the sequence last: an entry is owed only once its line is whole
            _HEAD.pack_into(self._view, at, self._seq, len(data))
        return i

    def written(self, entry: int) -> None:
        """The writer wrote the entry's line: no longer owed."""
        _HEAD.pack_into(self._view, entry * ENTRY, 0, 0)


def book_path(spool_dir: Path) -> Path:
    """The book of the instance whose spool is `spool_dir` (the same at its next start:
    named by the spool directory's device and inode)."""
    return shmbook.book_path(NAME, spool_dir)


class OwedLines:
    """The book: `slots` slots of `ENTRIES` entries in one shared file mapping."""

    def __init__(self, path: Path | None, slots: int) -> None:
        """Open (create) the book for `slots` processes; `path` None: in anonymous
        shared memory (no previous instance's). `leftovers` are the lines a previous
        instance's processes still owed, oldest first per slot, taken. OSError when
        `path` is not this user's own regular file (/dev/shm is everyone's); no room for
        it there: `unkept`, the leftovers read all the same."""
        self.leftovers: list[str] = []
        self.unkept: OSError | None = None  # no room in /dev/shm: kept in anonymous memory
        self._slots = slots
        self._path = path
        if path is None:
            self._map = mmap.mmap(-1, ENTRY + slots * SLOT)
            self._map[:ENTRY] = _MAGIC
            return
        fd, size = shmbook.open_own(path)
        try:
            if size > ENTRY:
                with mmap.mmap(fd, size) as old:
                    if old[:ENTRY] == _MAGIC:
                        for s in range((size - ENTRY) // SLOT):
                            self.leftovers += _owed(memoryview(old)[ENTRY + s * SLOT:
                                                                   ENTRY + (s + 1) * SLOT])
            # Every entry free, its pages taken now: a page first touched by a refusal's
            # line in a full /dev/shm was a SIGBUS, the process dead. No room: `unkept`.
            self._map, self.unkept = shmbook.map_taken(fd, path, ENTRY + slots * SLOT)
            if self.unkept is not None:
                self._path = None  # (the book as it was, for the next start)
        finally:
            os.close(fd)
        self._map[:ENTRY] = _MAGIC

    def close(self) -> None:
        """At the end of the instance: the book's file (/dev/shm is memory) is removed
        unless a slot still owes a line, which the next start then writes."""
        if self._path is not None and not any(_owed(self._view(i))
                                              for i in range(self._slots)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    def slot(self, i: int) -> Slot:
        """Process i's part (0: the master or the one process; worker n: n + 1)."""
        return Slot(self._view(i))

    def take(self, i: int) -> list[str]:
        """The lines slot i's dead process still owed, oldest first; the slot cleared."""
        view = self._view(i)
        lines = _owed(view)
        view[:] = bytes(SLOT)
        return lines

    def _view(self, i: int) -> memoryview:
        if not 0 <= i < self._slots:
            raise IndexError(f"owed-lines slot {i} of {self._slots}")
        return memoryview(self._map)[ENTRY + i * SLOT:ENTRY + (i + 1) * SLOT]


def _owed(view: memoryview) -> list[str]:
    found = []
    for i in range(ENTRIES):
        seq, n = _HEAD.unpack_from(view, i * ENTRY)
        if seq and n <= LINE_MAX:
            at = i * ENTRY + _HEAD.size
            found.append((seq, bytes(view[at:at + n]).decode("utf-8", "replace")))
    return [line for _, line in sorted(found)]


def marked(line: str, json_line: bool) -> str:
    """`line` (as it was queued for the target, without its newline) as the master writes
    it for a dead process: `logged_by=master` added (a JSON line: the key)."""
    if json_line:
        return line[:-1] + ', "logged_by": "master"}'
    return line + ", logged_by=master"
