"""Writing one queue file durably: `Incoming` and the commit thread pool.

Owns the receive-side I/O of the spool (the format is spool/format.py). Contract:
`Incoming.commit()` returns only after the file and its directory entry are on stable
storage (fchmod ready, fsync file; then fsync queue/ as a group commit shared by
concurrent commits, except on filesystems whose journal already commits the create with
the file -- ext4, xfs, btrfs -- see `journal_orders_create`). RFC 5321 6.1: once we
answer 250 to the final dot we are responsible for the message. A kill at any point
leaves either a file without the ready mark (garbage, no 250 was sent; `recover()` at
start or, while the master runs, `Spool.sweep_unfinished()` removes it once nobody holds
its lock) or a complete, ready one. The version 2 header (lengths, checksum) is
written last, in the same fsync as the data, so a ready file always has a true header.

The bytes stream to queue/ID (mode 0600 = "not ready"; commit sets the owner-execute
bit, Postfix's trick, so there is no cross-directory rename; with `log_owed`, also the
group-execute bit until the producer's maillog `from=` line is written: `logged()`). The
first `SPILL` bytes are kept in memory and the file is created by a commit thread
(creating a file on ext4 can wait behind a journal commit, which must not stall the
event loop): at commit, or while the message arrives after `create_early()` (an SMTP
session's, so the create is off the dot-to-250 path); a larger message creates its file
(or takes the early one) then and streams, so memory per session stays bounded by SPILL
(a producer on a loop has a commit thread write the pieces, WRITE_BATCH or more at a
time, one job at a time: `spill_wait()` hands it the job to await once SPILL more wait
behind it, so a frozen filesystem holds that thread, never the event loop);
a producer `on_loop` without an early create has a commit thread make it at SPILL (the
sendmail command, without a loop, makes it in write()).
The event loop never waits for a commit thread: a create still queued at SPILL
leaves the bytes in memory and `spill_wait()` hands the caller the create to await
before its next write (SPILL plus one write held); the order of the bytes and the
durability contract are unchanged. The checksum is computed incrementally as bytes
arrive (format.checksum).

`signer.sign_stream(chunks) -> header lines | None` (`MessageSigner`: DKIM) runs in the
commit thread on the message: held in memory, one piece; a streamed file, read back in
`CHUNK`-sized pieces (memory stays bounded whatever the size; the DKIM signer stops after
the header section when the From: domain has no key). Its lines become the file's
prepend. A signer that raises or returns too much for a streamed file's reserved
slot leaves the message unsigned and `sign_error` says why (mail is never lost for it).

Failure policy: OSError propagates (ENOSPC included; spool/submit.py maps it to a
reply); the file is removed on any failure before the ready mark.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from authrelay.spool import format as fmt
from authrelay.spool.envelope import Envelope

NOT_READY_MODE = 0o600  # queue/ID still being received
READY_MODE = 0o700  # owner-execute bit: committed (fsync'd before the 250)
# Committed, its maillog `from=` line not written yet (group-execute bit: `log_owed`):
# the producer's `logged()` clears it once the line is written; a file the scheduler
# finds with it and no notice (the producer died in between) gets its line from there.
LOG_OWED_MODE = READY_MODE | stat.S_IXGRP


def mark_ready(path: str) -> None:
    """Clear the LOG_OWED_MODE mark of the committed queue file at `path`: READY_MODE,
    set on that regular file itself, never through a symlink (O_NOFOLLOW) nor by waiting
    on a FIFO (O_NONBLOCK). A chmod by path followed a symlink planted in the queue
    directory in place of a file (a test's link to /etc/passwd made it 0700). Raises
    OSError: FileNotFoundError when the file is gone, ELOOP for a symlink, EINVAL for
    anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {path}")
        os.fchmod(fd, READY_MODE)
    finally:
        os.close(fd)
SPILL = 128 * 1024  # message bytes kept in memory before the file is created
# Incoming._fate: what became of a commit, settled once under Incoming._fate_lock by the
# commit thread (COMMITTED, once durable) or by the waiting producer (ABANDONED: it gave
# up waiting, its client told 4xx; the thread then removes the file).
PENDING, COMMITTED, ABANDONED = 0, 1, 2
CHUNK = 256 * 1024  # read-back piece of a streamed message for the signer
# Past SPILL, a producer on an event loop has a commit thread append the message bytes
# once this many wait (and when the job before is done): 4 thread hand-offs per MiB (at
# 64 KiB a 1 MiB message cost ~15% more server CPU; docs/PERFORMANCE.md, session 28).
WRITE_BATCH = 256 * 1024



class Abandoned(fmt.SpoolError):
    """The producer gave up waiting for this commit (Incoming.abandon): its file removed."""


class MessageSigner(Protocol):
    """Header lines (CRLF-terminated) to store before one message, or None: the message
    given in pieces of any size (dkim/signer.py's per-message signer)."""

    def sign_stream(self, chunks: Iterable[bytes]) -> bytes | None: ...

# Filesystems whose fsync(file) also commits the creation of that file's directory entry:
# the create and the data are in one journal (ext4 with a journal, xfs log, btrfs log tree),
# and committing the file's last transaction commits every earlier one. Postfix relies on
# the same. Elsewhere (ext2, vfat, tmpfs, network filesystems ...) we fsync the directory.
_ORDERED_FS = {"ext4", "ext3", "xfs", "btrfs"}


def journal_orders_create(path: Path) -> bool:
    if os.environ.get("AUTHRELAY_SPOOL_DIR_FSYNC") == "1":
        return False
    try:
        target = os.path.realpath(path)
        best, fstype, opts = "", "", ""
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and \
                        len(mnt) >= len(best):
                    best, fstype, opts = mnt, parts[2], parts[3]
    except OSError:
        return False
    if fstype == "ext4" and "data=writeback" in opts:
        return False  # no ordering guarantee between data and metadata
    return fstype in _ORDERED_FS


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- thread pool

# A pool job: the function, the future settled with its outcome, that future's loop, and
# the `then` callback run in the same loop callback (CommitPool.run).
_Job = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop,
             Callable[[BaseException | None], None] | None]


class CommitPool:
    """Threads that run commits (fsync and friends) for event loops, with less overhead
    than ThreadPoolExecutor + run_in_executor (no concurrent.futures.Future, no chaining):
    one hand-off to start, one call_soon_threadsafe to finish. Threads start on demand up
    to `size`, so concurrent commits' fsyncs share journal commits.

    A job wakes exactly one thread: the one that went idle last (LIFO: its stack and
    cache are the warmest) is handed the job and its own lock released. Idle threads
    blocked together in one `queue.SimpleQueue.get()` woke each other instead: the getter
    that took a job released the queue's lock on its way out, which woke a second idle
    thread, which took the GIL from the first (before its write and fsync) only to find
    the queue empty and sleep again (seen in every commit and early create of a
    one-session run; docs/PERFORMANCE.md (28)). A job no idle thread is there for waits in
    `_jobs` for the first running thread to finish (FIFO)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._threads = 0
        self._jobs: collections.deque[_Job] = collections.deque()
        self._idle: list[_Idle] = []  # the thread that went idle last is last
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any],
            then: Callable[[BaseException | None], None] | None = None
            ) -> asyncio.Future[Any]:
        """`fn` in a pool thread; the future settled with its outcome on the calling
        loop. `then(exc)`, when given, runs on the loop in the same callback, just
        before the future is settled: the loop turn the thread's result arrives in, not
        the one or two after it in which the awaiting coroutine resumes (a session's
        250 written there waits behind no other session's handshake or command)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        job: _Job = (fn, fut, loop, then)
        with self._lock:
            if self._idle:
                idle = self._idle.pop()
                idle.job = job
                idle.wake.release()  # that thread alone, and it takes this job
                return fut
            self._jobs.append(job)
            if self._threads < self.size:
                try:
                    threading.Thread(target=self._work, name="spool-commit",
                                     daemon=True).start()
                    self._threads += 1
                except RuntimeError:  # no thread to be had (a pids limit, memory)
                    if self._threads == 0:
                        self._jobs.pop()
                        raise  # nobody could run it: the commit fails (4xx), not hangs
                    # else the first running thread to finish takes it
        return fut

    def _work(self) -> None:
        me = _Idle()
        while True:
            with self._lock:
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    self._idle.append(me)
            if job is None:
                me.wake.acquire()  # released by run() once it gave `me` a job
                job, me.job = me.job, None
                assert job is not None
            fn, fut, loop, then = job
            value: Any = None
            exc: BaseException | None = None
            try:
                value = fn()
            except BaseException as e:  # handed to the awaiting coroutine
                exc = e
            try:
                if then is None:
                    loop.call_soon_threadsafe(settle, fut, value, exc)
                else:
                    loop.call_soon_threadsafe(_settle_then, fut, value, exc, then)
            except RuntimeError:  # the loop is gone (shutdown)
                pass


class _Idle:
    """An idle pool thread: blocked on `wake` (held) until run() gives it `job`."""

    __slots__ = ("wake", "job")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: _Job | None = None


def settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    """`fut` done with `value`, or with `exc` when it is not None (unless done already)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)


def _settle_then(fut: asyncio.Future[Any], value: Any, exc: BaseException | None,
                 then: Callable[[BaseException | None], None]) -> None:
    """`then(exc)`, then settle(): `fut` is settled even when `then` raises."""
    try:
        then(exc)
    finally:
        settle(fut, value, exc)


_pool_lock = threading.Lock()
_commit_pool: CommitPool | None = None


def commit_pool() -> CommitPool:
    """This process's pool (made on first use). Twice per message received: no lock and
    no getpid(2) once it exists; a fork drops the parent's (_forget_pool)."""
    global _commit_pool
    pool = _commit_pool
    if pool is not None:
        return pool
    with _pool_lock:
        if _commit_pool is None:
            _commit_pool = CommitPool()
        return _commit_pool


def _forget_pool() -> None:
    """In a forked child: the parent's threads do not exist here (nor may its lock be
    free), so the child makes a pool of its own on first use."""
    global _commit_pool, _pool_lock
    _commit_pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)

# The queue directories this process creates files in: as given -> as the kernel names them
# (realpath, what /proc/self/fd's links say). Filled before a file is opened there.
_queue_dirs: dict[str, str] = {}


def _close_inherited() -> None:
    """In a forked child (a receiving worker the master starts again while it writes a
    bounce or a local submission): close the child's copies of the queue files the parent
    has open. A writer's flock belongs to the open file description, which a copy shares:
    kept, it held the lock past the parent's commit for as long as the child lived, and
    the scheduler loads no ready file its writer still holds (store.load_for_delivery), so
    that message was accepted and never delivered. The child never writes them (the
    parent's threads do not exist here)."""
    if not _queue_dirs:
        return
    dirs = set(_queue_dirs.values())
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if os.path.dirname(target.removesuffix(" (deleted)")) in dirs:
            with contextlib.suppress(OSError):
                os.close(int(name))


os.register_at_fork(after_in_child=_close_inherited)


class DirSync:
    """Group commit of one directory's fsync: each caller needs an fsync that *started*
    after its create; one running fsync serves every caller that arrived before it began,
    so N concurrent sessions cost ~1 directory journal commit, not N."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self._cond = threading.Condition()
        self._started = 0
        self._done = 0
        self._running = False

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def sync(self) -> None:
        cond = self._cond
        with cond:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            need = self._started + 1
            while self._done < need:
                if self._running:
                    cond.wait()
                    continue
                self._running = True
                self._started += 1
                seq = self._started
                cond.release()
                try:
                    os.fsync(self.fd)
                except BaseException:
                    cond.acquire()
                    self._running = False
                    cond.notify_all()
                    raise
                cond.acquire()
                self._running = False
                self._done = seq
                cond.notify_all()


# --------------------------------------------------------------------------- one message

class Incoming:
    """One message being received: written with write(), made durable by commit().

    `queue_dir`: where the file goes; `fsync`: make it durable (tests may turn it off);
    `dir_sync`: the group commit of the directory entry, or None where the filesystem's
    journal already orders the create (`journal_orders_create`); `notify(queue_id,
    vouched)`: tells the scheduler once the message is committed (spool/notify.py);
    `vouched` is the file's inode when `lines_checked` (the producer refused every bare
    CR and LF: the SMTP session's body reader), else 0."""

    def __init__(self, queue_dir: Path, envelope: Envelope, *, fsync: bool,
                 dir_sync: DirSync | None, notify: Callable[[str, int], None],
                 hold_dir: Path | None = None) -> None:
        self._fsync = fsync
        self._dir_sync = dir_sync
        self._notify = notify
        self.lines_checked = False  # set by the producer (spool/submit.py's Draft)
        # The producer writes on an event loop and awaits spill_wait() between writes (an
        # SMTP session, the scheduler's bounces, TLS-RPT reports): past SPILL the file is
        # made by a commit thread, never by write() on the loop (_spill_or_create).
        self.on_loop = False
        # Committed as LOG_OWED_MODE: the producer logs the `from=` line after the
        # commit and calls logged() (spool/submit.py's Draft sets it).
        self.log_owed = False
        self._ino = 0  # the inode of the file made for it (its notice names it)
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.size = 0  # message bytes written so far
        self.prepend = b""  # header lines sent before the message (set before commit)
        self.signer: MessageSigner | None = None
        self.sign_error = ""
        # (a str: os calls take it as it is; a Path join per message cost ~4 us)
        self._path = f"{queue_dir}/{self.queue_id}"
        # Where `authrelay queue hold` moves the committed file (logged() follows it).
        self._hold_dir = hold_dir
        self._fd: int | None = None
        self._buf = bytearray()
        self._crc = 0
        self._env_json = b""
        self._msg_off = 0  # where the message starts in a streamed file
        self._done = False
        self.committed = False  # durable and announced (also when the commit was cancelled)
        self._job: asyncio.Future[Any] | None = None  # the commit thread's, while it runs
        # create_early(): the file made by a commit thread while the message arrives.
        self._early: asyncio.Future[Any] | None = None
        # Held from create_early() until that thread is done (a latch: released by the
        # thread, waited for by acquiring it; a threading.Event per message cost ~6 us).
        self._early_done = threading.Lock()
        self._early_fd: int | None = None  # its file, until write() or commit takes it
        # abort() before that thread is done: the thread removes the file it made (an
        # abort never waits for a commit thread, which may be queued behind fsyncs).
        self._early_lock = threading.Lock()
        self._early_dropped = False
        # abort() on an event loop: the file's removal, run by a commit thread (gone()).
        self._removal: asyncio.Future[Any] | None = None
        # Why the last create in a commit thread failed; write() past SPILL has one more
        # made, then raises this (_spill_or_create).
        self._early_error: BaseException | None = None
        self._recreated = False
        # A streamed file's bytes not yet written (on_loop: a commit thread writes them,
        # never the event loop, which a frozen filesystem would hold in the kernel).
        self._unwritten = bytearray()
        self._write_job: asyncio.Future[Any] | None = None  # the thread's, while it runs
        self._write_error: BaseException | None = None  # its failure, raised by write()
        # True while that thread holds the descriptor; abort() meanwhile sets
        # _write_dropped and the thread removes the file (both under _write_lock).
        self._writing = False
        self._write_dropped = False
        self._write_lock = threading.Lock()
        # PENDING until the commit thread made the file durable (COMMITTED) or the
        # producer gave up waiting (ABANDONED): see abandon().
        self._fate = PENDING
        self._fate_lock = threading.Lock()

    def create_early(self) -> None:
        """Have a commit thread create and lock the file now, while the message arrives
        (on the event loop; the create, which can wait behind a journal commit, is then
        off the path from the final dot to the 250). The file is not ready (0600) until
        commit() marks it, as a streamed one: a crash leaves garbage that recover()
        removes, never a message. One that fails is made again by a commit thread, once:
        past SPILL (write(), _spill_or_create) or by commit() (its error, ENOSPC say, is
        then the message's)."""
        if self._early is not None or self._fd is not None or self._done:
            return
        self._start_create()

    def _start_create(self) -> None:
        """The file made and locked by a commit thread (_create_early), the latch held
        until that thread is done."""
        self._early_done.acquire()
        try:
            self._early = commit_pool().run(self._create_early)
        except BaseException:
            self._early_done.release()
            raise

    def _create_early(self) -> None:
        fd: int | None = None
        try:
            fd = self._open_locked()
        except (OSError, fmt.SpoolError) as e:
            # made again (commit(), or write() past SPILL), whose error it is then
            self._early_error = e
        finally:
            with self._early_lock:
                if self._early_dropped and fd is not None:
                    self._remove_unready(fd)  # aborted meanwhile: nobody takes it
                    fd = None
                self._early_fd = fd
            self._early_done.release()

    async def gone(self) -> None:
        """After abort(): return once no file of this message can exist any more. A
        create_early() thread still queued or at work makes the file and removes it when
        done, and a file made already is removed by a commit thread (abort() waits for
        neither): a refusal's reply awaits this first, so the refused client never finds
        its file made meanwhile. On a frozen filesystem that is the thaw: the caller
        bounds the wait."""
        for job in (self._early, self._removal):
            if job is not None and not job.done():
                await asyncio.wait([job])

    def _remove_unready(self, fd: int) -> None:
        """Unlink and close the (not ready, locked) file of this message."""
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _take_early(self) -> int | None:
        """The early-created file, waiting for its thread if need be (only in a commit
        thread: write() spills once that thread is done, commit() awaits it first); None
        when it failed or none began."""
        if self._early is None:
            return None
        with self._early_done:  # (held until create_early()'s thread is done)
            pass
        fd, self._early_fd = self._early_fd, None
        return fd

    def _create(self) -> int:
        """The message's file, created and locked (or the one create_early() made)."""
        fd = self._take_early()
        self._fd = self._open_locked() if fd is None else fd
        return self._fd

    def _open_locked(self) -> int:
        """Create the file and lock it. The lock tells recover() (another process, or the
        scheduler's start-up recovery beside receiving) that this file is alive; between
        the open and the lock recover() may take it for a dead receive's and unlink it
        (the commit then went to a nameless file: a message lost after its 250), or hold
        its lock for a moment to do so. Either way the file is made again."""
        qdir = os.path.dirname(self._path)
        if qdir not in _queue_dirs:  # before the open: a fork from here on closes it
            _queue_dirs[qdir] = os.path.realpath(qdir)
        for attempt in range(1000):
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             NOT_READY_MODE)
            except FileExistsError:
                if attempt == 0:
                    raise
                time.sleep(0.001)  # ours, being unlinked by recover() right now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                ino = os.fstat(fd).st_ino
                if os.stat(self._path).st_ino == ino:
                    self._ino = ino
                    return fd
            except (BlockingIOError, FileNotFoundError):
                pass  # recover() has it (BlockingIOError) or unlinked it
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise fmt.SpoolError(f"{self.queue_id}: cannot create the queue file")

    def _spill(self) -> None:
        """Create the file and stream from here on: a placeholder header (filled in at
        commit), the envelope, a reserved slot for late header lines, the message."""
        self._env_json = fmt.encode_envelope(self.envelope)
        fd = self._create()
        head = (fmt.RECEIVING_HEADER + self._env_json + b"\n"
                + b" " * fmt.PREPEND_SLOT)
        self._msg_off = len(head)
        if self.on_loop:  # written by a commit thread (_start_write)
            self._unwritten = bytearray(head) + self._buf
            self._buf = bytearray()
            self._start_write()
            return
        try:
            write_all(fd, head)
            write_all(fd, self._buf)
        except BaseException:
            self.abort()
            raise
        self._buf = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        """Append message bytes; runs on the event loop (memory, then page cache: a
        producer `on_loop` has a commit thread write them, _start_write). Raises the
        failure of an earlier write (OSError: ENOSPC, EIO)."""
        if self._done:
            raise fmt.SpoolError("write after commit/abort")
        if self._write_error is not None:
            raise self._write_error
        self.size += len(data)
        self._crc = fmt.checksum(data, self._crc)
        if self._fd is None:
            self._buf += data
            # An early create still queued (every commit thread busy): the bytes stay in
            # memory rather than the loop waiting for it; the caller awaits spill_wait().
            if len(self._buf) >= SPILL and not self._early_done.locked():
                self._spill_or_create()
            return
        if not self.on_loop:  # (the sendmail command: no loop to hold)
            write_all(self._fd, data)
            return
        self._unwritten += data
        if len(self._unwritten) >= WRITE_BATCH and self._write_job is None:
            self._start_write()

    def _start_write(self) -> None:
        """A commit thread appends what is unwritten (one job at a time, so in order);
        when it is done, the next job starts if WRITE_BATCH bytes wait meanwhile."""
        fd = self._fd
        assert fd is not None and self._write_job is None
        data, self._unwritten = self._unwritten, bytearray()
        self._writing = True
        try:
            self._write_job = job = commit_pool().run(
                functools.partial(self._write_sync, fd, data))
        except BaseException:
            self._writing = False
            raise
        job.add_done_callback(self._written)

    def _write_sync(self, fd: int, data: bytearray) -> None:
        try:
            write_all(fd, data)
        finally:
            with self._write_lock:
                self._writing = False
                if self._write_dropped:  # aborted meanwhile: nobody else has the file
                    self._remove_unready(fd)

    def _written(self, job: asyncio.Future[Any]) -> None:
        """On the loop: a write job is done (its callback; commit() may run it first)."""
        if self._write_job is not job:
            return
        self._write_job = None
        if job.cancelled():
            return
        if (exc := job.exception()) is not None:
            self._write_error = exc
            return
        if not self._done and len(self._unwritten) >= WRITE_BATCH:
            self._start_write()

    def _spill_or_create(self) -> None:
        """Past SPILL, no create in flight: stream into the file create_early() made.
        When that create failed (ENOSPC, EMFILE), a commit thread makes it once more, as
        create_early() does (on the producer's loop), the bytes kept in memory meanwhile
        (spill_wait): the event loop never waits for a create (it used to make the file
        itself here). A second failure is raised (OSError or SpoolError: the producer
        refuses the message). Without an early create, a producer `on_loop` (a stranger's
        message, a bounce, a TLS-RPT report) has a commit thread make it now, as
        create_early() does, and streams once it is made (a create made here waited on
        the loop, behind a journal commit say, with every session of the process); only
        the sendmail command, which has no loop, makes it here."""
        if self._early is None and self.on_loop:
            self._start_create()
            return
        if self._early is not None and self._early_fd is None:
            if not self._recreated:
                self._recreated = True
                self._early_error = None
                self._start_create()
                return
            if self._early_error is not None:
                raise self._early_error
        self._spill()

    def spill_wait(self) -> asyncio.Future[Any] | None:
        """What to await before the next write(), or None (almost always). Past SPILL
        bytes while create_early()'s thread has not made the file yet, write() keeps the
        bytes in memory instead of waiting for it on the event loop (one large message
        stalled every session of the process as long as the commit threads were busy):
        that create. Once the file is made, a commit thread writes the bytes: the write
        job in flight when SPILL more wait behind it (a slow or frozen disk). A caller
        that awaits this (asyncio.wait: never cancel it) between writes, and reads no
        more of its input meanwhile, holds at most SPILL plus one write in memory (and
        the job's own: SPILL plus one write), and the next write() takes the file."""
        if self._fd is None:
            if (self._early is not None and len(self._buf) >= SPILL
                    and self._early_done.locked()):
                return self._early
            return None
        if self._write_job is not None and len(self._unwritten) >= SPILL:
            return self._write_job
        return None

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The message bytes written so far, in pieces of at most `size` bytes."""
        if self._fd is None:
            yield bytes(self._buf)
            return
        fd, off, left = self._fd, self._msg_off, self.size
        while left > 0:
            b = os.pread(fd, min(left, size), off)
            if not b:
                raise OSError("short read of the message being committed")
            yield b
            off += len(b)
            left -= len(b)

    def _sign(self, room: int | None) -> bytes:
        signer = self.signer
        if signer is None:
            return b""
        try:
            lines = signer.sign_stream(self.chunks() if self._fd is not None
                                       else (bytes(self._buf),))
        except Exception as e:  # a signer bug never costs the message
            self.sign_error = f"signer failed: {type(e).__name__}: {e}"
            return b""
        if not lines:
            return b""
        if not lines.endswith(b"\r\n"):
            lines += b"\r\n"
        if room is not None and len(self.prepend) + len(lines) > room:
            self.sign_error = (f"signature of {len(lines)} bytes does not fit the "
                               f"{room}-byte slot; sent unsigned")
            return b""
        return lines

    def abandon(self) -> bool:
        """The producer gives up waiting for commit() (a hung disk: its client gets 4xx,
        never a 250): True unless the file is durable already (then the caller gives its
        250, as if it had waited). Settled under one lock with the commit thread, which
        removes an abandoned commit's file when it runs or returns, before anything can
        deliver it: the ready mark it may have set is on a file it still holds locked, and
        the scheduler loads no file its writer holds (store.load_for_delivery). commit()
        raises Abandoned once the thread is done. Thread-safe; on the producer's loop."""
        with self._fate_lock:
            if self._fate == COMMITTED:
                return False
            self._fate = ABANDONED
            return True

    @property
    def abandoned(self) -> bool:
        return self._fate == ABANDONED

    def when_settled(self, fn: Callable[[], None]) -> None:
        """After abandon() returned True, on the producer's loop: `fn()` once no commit
        thread of this message can still leave its file (at once when none was started:
        none will be, commit() checks the fate before it starts one on this loop; else
        when that thread has returned, the file then removed)."""
        job = self._job
        if job is None or job.done():
            fn()
        else:
            job.add_done_callback(lambda _: fn())

    def _commit_sync(self) -> None:
        if self._fate == ABANDONED:  # (before a byte is written: nothing marked ready)
            raise Abandoned(f"{self.queue_id}: commit abandoned")
        self._write_ready()
        fd = self._fd
        assert fd is not None
        with self._fate_lock:
            abandoned = self._fate == ABANDONED
            if not abandoned:
                self._fate = COMMITTED
        if abandoned:  # given up while this was in its fsync: removed, still locked
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        self._fd = None
        os.close(fd)  # releases the flock only now: recover() never sees a half commit
        if abandoned:
            raise Abandoned(f"{self.queue_id}: commit abandoned")

    def _write_ready(self) -> None:
        """Write what is left, the header and the ready mark, and fsync (the file stays
        open, locked, in self._fd)."""
        if self._fd is None:
            pre = self._sign(None) + self.prepend
            env_json = fmt.encode_envelope(self.envelope)
            crc = fmt.checksum(env_json, fmt.checksum(pre, self._crc))
            header = fmt.encode_header(env_len=len(env_json), pad=0, pre=len(pre),
                                       msg=self.size, crc=crc)
            fd = self._create()
            write_all(fd, b"".join((header, env_json, b"\n", pre, self._buf)))
            self._buf = bytearray()
        else:
            fd = self._fd
            if self._unwritten:  # (no write job runs: commit() waited for it)
                write_all(fd, self._unwritten)
                self._unwritten = bytearray()
            pre = self._sign(fmt.PREPEND_SLOT) + self.prepend
            if len(pre) > fmt.PREPEND_SLOT:
                raise fmt.SpoolError("prepended header lines exceed the reserved slot")
            pad = fmt.PREPEND_SLOT - len(pre)
            crc = fmt.checksum(self._env_json, fmt.checksum(pre, self._crc))
            if pre:
                pwrite_all(fd, pre, self._msg_off - len(pre))
            pwrite_all(fd, fmt.encode_header(env_len=len(self._env_json), pad=pad,
                                             pre=len(pre), msg=self.size, crc=crc), 0)
        # The ready mark travels in the same fsync as the data.
        os.fchmod(fd, LOG_OWED_MODE if self.log_owed else READY_MODE)
        if self._fsync:
            os.fsync(fd)
            if self._dir_sync is not None:
                self._dir_sync.sync()  # the directory entry too (group commit)

    def logged(self) -> None:
        """The committed file's `from=` line is written: its LOG_OWED_MODE mark cleared
        (one chmod, in the maillog's writer thread; not fsynced: a crash of the machine
        may at worst log the line twice). Never raises: a file gone (delivered)
        meanwhile keeps nothing to mark. A file held meanwhile (hold/, marked: a rename
        keeps the mode) loses its mark there, else its release, with no notice remembered
        (a restart), would have the scheduler write a second line."""
        try:
            mark_ready(self._path)
            return
        except FileNotFoundError:
            if self._hold_dir is None:
                return
        except OSError:
            return
        held = f"{self._hold_dir}/{self.queue_id}"
        for path in (held, self._path):  # (released again between the two: once more)
            try:
                mark_ready(path)
                return
            except OSError:
                continue

    def announce(self) -> None:
        """Tell the scheduler the committed message is there (the notify hook or datagram).
        spool/submit.py calls it once the maillog `from=` line is written (MailLog.then),
        so no delivery line of a message is ever logged before the line that says it was
        queued, whichever process delivers. The notice vouches for the file's line ends
        (its inode) when the producer checked them."""
        self._notify(self.queue_id, self.vouched)

    @property
    def vouched(self) -> int:
        """What its notice vouches for: the file's inode when `lines_checked`, else 0."""
        return self._ino if self.lines_checked else 0

    async def commit(self, announce: bool = True,
                     on_durable: Callable[[], None] | None = None) -> None:
        """Durable when this returns: data + ready mark fsynced, queue/ fsynced; notify
        (unless not `announce`: then the caller calls announce()).

        `on_durable` (a session's 250) runs on the loop once the commit is durable, in
        the callback that brings the commit thread's result (CommitPool.run's `then`),
        not after the loop turns in which this coroutine resumes; not when the caller
        is being cancelled (as before: no 250 then). It must not raise.

        A cancelled caller does not abandon the commit thread: it may be writing through
        this file's descriptor, which abort() would close under it and the process then
        reuse for another file. The commit is waited for; if it succeeded the message is
        kept and announced like any committed one (`committed`; no 250 was sent, so the
        client may send it again, as after a lost connection: a duplicate, never a loss),
        otherwise it is removed; then CancelledError is raised. A coroutine closed while
        it waits (GeneratorExit: its task dropped with its loop) ends at once and leaves
        the file to the thread: abort() does nothing while the thread has it, a ready
        file is delivered after a rescan, an unready one removed by recover().
        A cancel after abandon() (the caller gave up waiting, by a timer of its own: no
        task beside its own) ends the wait at once: the thread removes the file, and
        what a failed write leaves is removed when it returns (_abandoned_done)."""
        if self._done:
            raise fmt.SpoolError("commit after commit/abort")
        # A create or a write slower than the message: the commit thread must not wait
        # for it (a write job done may start the next one: _written).
        while (pending := self._early if self._early is not None
               and not self._early.done() else self._write_job) is not None:
            if not pending.done():
                await asyncio.wait([pending])
            elif self._write_job is pending:
                self._written(pending)  # (its callback, not run yet)
            if self._done:  # aborted meanwhile: its file is gone, nothing to commit
                raise fmt.SpoolError("commit after commit/abort")
        if self._write_error is not None:  # (the file removed as a failed commit's)
            self.abort()
            await self.gone()
            raise self._write_error
        if self._fate == ABANDONED:  # given up meanwhile: the early file removed
            self.abort()
            raise Abandoned(f"{self.queue_id}: commit abandoned")
        self._done = True
        then = None
        if on_durable is not None:
            task = asyncio.current_task()

            def then(exc: BaseException | None) -> None:
                if exc is None and not (task is not None and task.cancelling()):
                    self.committed = True
                    on_durable()
        try:
            job = self._job = commit_pool().run(self._commit_sync, then)
        except BaseException:  # no thread (RuntimeError: can't start new thread)
            self._done = False
            self.abort()
            raise
        cancelled = False
        while not job.done():
            try:
                await asyncio.shield(job)  # a cancel ends this wait, never the job
            except asyncio.CancelledError:
                cancelled = True
                if self._fate == ABANDONED:  # given up: the client gets its 4xx now
                    job.add_done_callback(self._abandoned_done)
                    raise
            except BaseException:  # the job's own failure: read just below
                if not job.done():
                    raise  # thrown in (GeneratorExit): never swallowed, never awaited on
        exc = job.exception()
        if exc is not None:
            self._done = False
            self.abort()
            await self.gone()  # (its removal, a commit thread's)
            if cancelled:
                raise asyncio.CancelledError
            raise exc
        self.committed = True
        if announce:
            self.announce()
        if cancelled:
            raise asyncio.CancelledError

    def _abandoned_done(self, job: asyncio.Future[Any]) -> None:
        """An abandoned commit's thread is done (it always fails then: Abandoned, or the
        write's own error): the file removed as commit() removes a failed one's."""
        if job.exception() is not None:
            self._done = False
            self.abort()

    def commit_blocking(self, announce: bool = True) -> None:
        """commit() for callers without an event loop (the sendmail command)."""
        if self._done:
            raise fmt.SpoolError("commit after commit/abort")
        self._done = True
        try:
            self._commit_sync()
        except BaseException:
            self._done = False
            self.abort()
            raise
        self.committed = True
        if announce:
            self.announce()

    def abort(self) -> None:
        """Drop the message (idempotent); never raises. Nothing half-written stays.
        Not while the commit thread runs: it writes through the descriptor (commit()
        removes a failed commit itself once the thread is done)."""
        if self._job is not None and not self._job.done():
            return
        if self._fd is None and not self._done and self._early is not None:
            # create_early()'s file: taken if made; if its thread is still at it (queued
            # behind other commits' fsyncs, say), that thread removes it when done.
            with self._early_lock:
                self._early_dropped = True
                self._fd, self._early_fd = self._early_fd, None
        fd, self._fd = self._fd, None
        self._buf = self._unwritten = bytearray()
        if fd is None:
            self._done = True
            return
        if not self._done:
            with self._write_lock:
                if self._writing:  # a write job has the file: it removes it when done
                    self._write_dropped = True
                    self._done = True
                    self._removal = self._write_job
                    return
        if self._done:
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        self._done = True
        # On an event loop the unlink goes to a commit thread: on a frozen filesystem it
        # waits for the thaw, and the loop with it would stall every session of the
        # process (gone() awaits it). Without a loop (the sendmail command), here.
        try:
            self._removal = commit_pool().run(functools.partial(self._remove_unready, fd))
        except RuntimeError:  # no running loop (or no thread to be had: none queued)
            self._remove_unready(fd)
