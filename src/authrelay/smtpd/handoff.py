"""Hand-off between receiving workers: a newcomer passed to the worker holding its address's
oldest idle connection.

Owns, for a node of several workers, what lets a new connection from an address at its
`max_connections_per_ip` take the slot of that address's oldest eviction candidate
whichever worker holds it (docs/LIMITS.md; admission.py `_take_own`): the kernel's
SO_REUSEPORT spreads an address's connections over the workers, and a worker knows only
its own candidates.

- `publish(key, born, since)`: each worker writes, in a row of its own of a shared
  mapping made before the fork, when its candidate of each address connected longest ago
  was accepted (`born`) and has waited since (`since`; both time.monotonic():
  CLOCK_MONOTONIC, one clock for every process), tagged with the address's hash
  (eviction.Oldest keeps it current as candidates come and go). One writer per row, read
  without a lock: a stale or torn entry can only send a newcomer to a worker that no
  longer holds a takeable candidate of its address, which then refuses it as before.
- `entries(key)`: the other workers' entries of `key`: W reads of shared memory, made
  only for a newcomer already refused for its address's limit (the accept path of every
  other connection reads nothing here); admission.py chooses among them.
- `pass_on(worker, ...)`: the accepted socket itself goes to that worker (SCM_RIGHTS
  over a unix datagram socketpair per worker, made before the fork, kept by the master
  for a replacement), with its listener, address and PROXY source; the receiving worker
  admits it as if it had accepted it (`receive`), with its own candidates only, so the
  eviction keeps every rule of one worker: counted into the victim's slot before the
  victim is closed, takeable (TIE_AGE or OWN_AGE), never an authenticated session nor one
  in a transaction or running a command. A newcomer is passed at most once.

Bounds: a send never waits (MSG_DONTWAIT): a full inbox (a worker stalled or dead) is a
failed pass, and the newcomer is handled where it was accepted, as before. A worker reads
at most `RECEIVE_BATCH` newcomers per readable event. A dead worker's row is cleared by
the master (`forget`) before its replacement is forked (which admits, as its own, what
was left in the dead one's inbox). A stopping worker withdraws its row (`withdraw`) and
answers what still reaches its inbox 421 4.3.2 (else a newcomer waited there unanswered
until the worker was gone). Memory: a row is 1.5 MiB of the
shared mapping, of which only the pages where addresses hashed are ever touched.
Failure policy: a socket error on a pass is a failed pass (the caller goes on without
it); a malformed datagram (not ours: only this instance's processes hold the pair) is
dropped, its descriptors closed.
"""

from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Any

SLOTS = 1 << 16  # entries per worker's row; an address's hash picks one
RECEIVE_BATCH = 64  # newcomers taken from the inbox per readable event
_FIELDS = 3  # an entry: the address's hash (0: free), then its first candidate's born
# and since (ns)
_MAX_MESSAGE = 4096
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


@dataclass
class Passed:
    """A newcomer another worker passed on: its socket, its listener's name, the address
    it is admitted as (accept()'s, or the PROXY header's source), that source, and the
    pid of the worker that accepted it."""

    sock: socket.socket
    listener: str
    addr: Any
    peer: tuple[str, int] | None
    by: int


def _tag(key: str) -> int:
    # Python's str hash: keyed per interpreter start, and every worker is forked from
    # the one master, so every process of the instance computes the same one.
    return hash(key) or 1  # 0 marks a free entry


class Handoff:
    """The shared rows and the inboxes of `workers` workers; create before fork()."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.index = -1  # this process's worker index (adopt); -1: publishes nothing
        self._withdrawn = False  # this worker stops: publishes nothing more (withdraw)
        self._row_size = SLOTS * _FIELDS
        self._mm = mmap.mmap(-1, workers * self._row_size * 8)
        self._a = memoryview(self._mm).cast("q")
        # inbox i: (what worker i reads, what the others send on)
        self._inbox = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                       for _ in range(workers)]

    def adopt(self, worker: int) -> None:
        """In worker `worker` right after fork: its row (cleared by the master when the
        worker it replaces died: `forget`) and its inbox."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"no hand-off row for worker {worker}")
        self.index = worker

    def forget(self, worker: int) -> None:
        """Clear worker `worker`'s row (the master, once it is gone): its pages given
        back, read as zeros again (a row holds memory only where addresses hashed)."""
        if 0 <= worker < self.workers:
            size = self._row_size * 8  # 1.5 MiB: whole pages
            self._mm.madvise(mmap.MADV_REMOVE, worker * size, size)

    def withdraw(self) -> None:
        """This worker stops (its listeners closed): its row cleared and nothing
        published from here on, so the other workers pass it no more newcomers (one
        already in flight is still received: the caller refuses it)."""
        self._withdrawn = True
        self.forget(self.index)

    def inbox(self) -> socket.socket:
        """What this worker reads (after adopt)."""
        if self.index < 0:
            raise RuntimeError("Handoff.inbox before adopt")
        return self._inbox[self.index][0]

    def publish(self, key: str, born: float | None, since: float = 0.0) -> None:
        """This worker's candidate of address `key` connected longest ago was accepted
        at `born` and has waited since `since` (born None: it holds none). An entry
        another address holds already is taken over: that one's newcomers are then not
        passed to this worker (handled where they are accepted, as before)."""
        if self.index < 0 or self._withdrawn:
            return
        tag = _tag(key)
        i = (self.index * SLOTS + tag % SLOTS) * _FIELDS
        a = self._a
        if born is None:
            if a[i] == tag:
                a[i + 1] = 0
                a[i] = 0
            return
        a[i + 1] = 0  # never this address's tag beside another's times
        a[i] = tag
        a[i + 2] = int(since * 1e9)
        a[i + 1] = int(born * 1e9) or 1

    def entries(self, key: str) -> list[tuple[int, float, float]]:
        """(worker, born, since) of each other worker's entry of `key`."""
        tag = _tag(key)
        slot, a, out = tag % SLOTS, self._a, []
        for w in range(self.workers):
            if w == self.index:
                continue
            i = (w * SLOTS + slot) * _FIELDS
            born, since = a[i + 1], a[i + 2]
            if born and a[i] == tag:
                out.append((w, born / 1e9, since / 1e9))
        return out

    def pass_on(self, worker: int, sock: socket.socket, listener: str, addr: Any,
                peer: tuple[str, int] | None) -> bool:
        """Send the accepted `sock` to `worker`'s inbox; whether it went (then the
        caller closes its own descriptor of it: the one in flight keeps it open)."""
        msg = json.dumps([listener, list(addr) if isinstance(addr, tuple) else addr,
                          list(peer) if peer is not None else None, os.getpid()]).encode()
        try:
            self._inbox[worker][1].sendmsg(
                [msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                         array.array("i", [sock.fileno()]))], socket.MSG_DONTWAIT)
        except OSError:
            return False
        return True

    def receive(self) -> list[Passed]:
        """The newcomers waiting in this worker's inbox (at most RECEIVE_BATCH)."""
        out: list[Passed] = []
        inbox = self.inbox()
        for _ in range(RECEIVE_BATCH):
            try:
                msg, anc, _flags, _addr = inbox.recvmsg(_MAX_MESSAGE, _FD_SPACE,
                                                        socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            try:
                listener, addr, peer, by = json.loads(msg)
                peer = (str(peer[0]), int(peer[1])) if peer else None
                sock = socket.socket(fileno=fds[0])
                del fds[0]  # the socket's now
            except (ValueError, TypeError, IndexError, KeyError, OSError):
                continue
            finally:
                for fd in fds:  # any but the one we send (none unless not ours)
                    with contextlib.suppress(OSError):
                        socket.close(fd)
            out.append(Passed(sock, str(listener),
                              tuple(addr) if isinstance(addr, list) else addr, peer, int(by)))
        return out
