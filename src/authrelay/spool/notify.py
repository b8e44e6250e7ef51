"""Telling the scheduler about new mail: the notify IPC client.

Owns the sending side of `spool_dir/notify.sock` (the scheduler binds it). Contract:
after a commit, `Notifier.notify(qid, vouched)` calls the in-process `on_commit` hook if
one is set (the scheduler runs in this process: no datagram), else sends the queue id as
a datagram to the unix socket. Ids committed in the same loop iteration share one datagram
("ID\\nID INODE\\n..."); an id is followed by its file's inode when the producer vouches
for the file's line ends (`vouched`: the SMTP body reader refused every bare CR and LF;
the scheduler's courier then skips its own check of that file, issue 22). A notice sent
before the message's maillog `from=` line was written (a stalled log, spool/submit.py's
NOTICE_WAIT) adds the producer's pid ("ID INODE PID", INODE 0 when not vouched), and the
producer says "ID logged" once the line is written: a producer that dies in between
leaves the line to the scheduler (Scheduler.receiver_died). "ID abandoned": the
producer gave up waiting for ID's commit (Incoming.abandon returned True: its client was
told 451 4.3.0 and no 250 can follow for ID); the commit thread removes the file when it
returns, but a producer killed while that thread is in its fsync leaves a ready file:
the scheduler drops it (in-process: `on_abandoned`). The id is also kept in the
instance's book in /dev/shm first (`book`, spool/abandoned.py), for a kill of the whole
server, which takes the scheduler's memory of it, until its commit thread has returned
(`settled`). The socket is
0600 in the spool's 0700 directory: only the relay's user and root can send a notice,
as only they can write the spool. A datagram the kernel refuses because the
scheduler's queue is full (unix datagram queues are short) is sent again a moment later
instead of waiting for the periodic rescan.
Failure policy: best effort, never raises. With no scheduler listening the ids are
dropped: its start-up scan and periodic rescans find the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from authrelay.spool.abandoned import Slot

log = logging.getLogger(__name__)

NOTIFY_SOCK = "notify.sock"  # in spool_dir; bound by the scheduler
LOGGED_NOTICE = "logged"  # "ID logged": the from= line of an "ID INODE PID" notice written
ABANDONED_NOTICE = "abandoned"  # "ID abandoned": its commit given up, its client told 451
_NOTIFY_BATCH = 200  # queue ids per notify datagram (~18 bytes each)
_NOTIFY_RETRIES = 200  # x _NOTIFY_RETRY_DELAY: give up after ~2 s (the rescan remains)
_NOTIFY_RETRY_DELAY = 0.01


class Notifier:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.on_commit: Callable[[str, int], None] | None = None
        # In-process too: (queue id, producer pid) when a notice goes with its from= line
        # not written yet, (queue id, 0) once it is (thread-safe: the writer thread calls).
        self.on_owed: Callable[[str, int], None] | None = None
        # In-process too: a queue id whose commit its producer gave up (abandoned()).
        self.on_abandoned: Callable[[str], None] | None = None
        # This process's slot of the abandoned-commits book (spool/abandoned.py), set by
        # the daemon: None outside `serve` (sendmail, the CLI give up no commit).
        self.book: Slot | None = None
        self._sock: socket.socket | None = None
        self.pending: list[str] = []
        self._scheduled = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def notify(self, queue_id: str, vouched: int = 0, owed_by: int = 0) -> None:
        """`queue_id` committed; `owed_by`: the producer's pid while its from= line is not
        written yet (in-process: `on_owed`, so the scheduler does not write a line its own
        process's writer still holds)."""
        if self.on_commit is not None:
            try:
                if owed_by and self.on_owed is not None:
                    self.on_owed(queue_id, owed_by)
                self.on_commit(queue_id, vouched)
            except Exception:  # a scheduler bug must not fail an accepted message
                log.exception("%s: on_commit hook failed", queue_id,
                              extra={"queue_id": queue_id})  # daemon.MaillogHandler
            return
        if owed_by:  # sent now: before the "logged" notice logged() may send next
            self.pending.append(f"{queue_id} {vouched} {owed_by}")
            if not self._send():
                self._queue_retry()
        else:
            self._queue(f"{queue_id} {vouched}" if vouched else queue_id)

    def logged(self, queue_id: str) -> None:
        """The from= line of a message notified with `owed_by` is written now: said at
        once, from any thread (the maillog's writer; rare: a stalled log only), on a
        socket of its own, so a loop closed meanwhile (a stopping worker) does not keep
        it. Best effort, never raises."""
        if self.on_commit is not None:
            if self.on_owed is not None:
                with contextlib.suppress(Exception):  # (never raises, as the datagram)
                    self.on_owed(queue_id, 0)
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(1.0)  # (the scheduler's queue full: a moment, not for ever)
                s.sendto(f"{queue_id} {LOGGED_NOTICE}".encode("ascii"), str(self.path))
        except OSError:
            pass  # no scheduler: a restarted one knows nothing owed

    def abandoned(self, queue_id: str) -> int:
        """The producer gave up waiting for `queue_id`'s commit (only once
        Incoming.abandon returned True: no 250 can ever be sent for it), said at once:
        the scheduler drops the file should its producer die before its commit thread
        removes it. On the producer's loop; best effort (a notice lost: the file, if
        left, is delivered, a duplicate of what the client sends again), never raises.
        Kept in the book first (a kill of the whole server before the file is removed
        leaves it to the start's scheduler, which drops it): its entry, for `settled`
        once the commit's thread has returned; -1 when not kept."""
        entry = self.book.keep(queue_id) if self.book is not None else -1
        if self.on_commit is not None:
            if self.on_abandoned is not None:
                with contextlib.suppress(Exception):  # (never raises, as the datagram)
                    self.on_abandoned(queue_id)
            return entry
        self.pending.append(f"{queue_id} {ABANDONED_NOTICE}")
        if not self._send():
            self._queue_retry()
        return entry

    def settled(self, entry: int) -> None:
        """An abandoned commit's thread has returned (its file removed): its entry of
        the book (abandoned()'s, not -1) is free."""
        if self.book is not None:
            self.book.release(entry)

    def _queue(self, line: str) -> None:
        self.pending.append(line)
        self._queue_retry()

    def _queue_retry(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send()
            return
        self._scheduled = True
        loop.call_soon(self._flush, loop, 0)

    def _flush(self, loop: asyncio.AbstractEventLoop, tries: int) -> None:
        self._scheduled = False
        if not self._send() and tries < _NOTIFY_RETRIES and self.pending:
            self._scheduled = True
            loop.call_later(_NOTIFY_RETRY_DELAY, self._flush, loop, tries + 1)

    def _send(self) -> bool:
        """Send pending ids; False if the scheduler's queue was full (retry later)."""
        try:
            if self._sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                self._sock = s
            while self.pending:
                batch = self.pending[:_NOTIFY_BATCH]
                self._sock.sendto("\n".join(batch).encode("ascii"), str(self.path))
                del self.pending[:len(batch)]
            return True
        except (BlockingIOError, InterruptedError):
            return False  # queue full: try again shortly
        except OSError:
            # No scheduler listening (stopped, or not started yet).
            self.pending.clear()
            return True
