"""Durable spool: the only hand-off between receiving and delivering.

Owns the on-disk queue under `cfg.spool_dir` (docs/INTERFACES.md):

    queue/ID        one immutable file per message, created here while being received
                    with mode 0600; commit sets mode 0700 (the "ready" mark, as Postfix
                    does) in the same fsync as the data. A crash leaves a 0600 file that
                    `recover()` removes. Readers ignore files without the mark.
                    `AUTHRELAY-SPOOL 1 <envlen>\\n` + envelope JSON (envlen bytes) + `\\n`
                    + the message exactly as to be sent (CRLF, not dot-stuffed)
    queue/ID.state  per-recipient state written by the scheduler (atomic replace + fsync)
    hold/           held messages (the same two files, moved)
    corrupt/        files `recover()` could not parse (kept for the operator, never deleted)

Contract: `Incoming.commit()` returns only after the file and its directory entry are on
stable storage (fchmod ready, fsync file; then fsync queue/ as a group commit shared by
concurrent commits, except on filesystems whose journal already commits the create with
the file -- ext4, xfs, btrfs -- see `_journal_orders_create`). RFC 5321 6.1: once we
answer 250 to the final dot we are responsible for the message. A kill at any point leaves
either a file without the ready mark (garbage, no 250 was sent) or a complete, ready one.
There is no cross-directory rename on the receive path (Linux serialises those per
filesystem). The fsyncs run in a shared thread pool, so concurrent sessions' fsyncs batch
in the filesystem journal and the event loop never waits on the disk.

Failure policy: I/O errors on receive propagate (the session answers 451 4.3.0, transient).
A truncated or unparsable queue file is moved to corrupt/ and logged; a file of an unknown
newer format version is left where it is and refused (`UnsupportedVersion`), never deleted.
Receiving processes call only `begin`; `recover()` runs in the scheduler process at start
and skips tmp/ files that a live process still holds (flock), so it is safe with workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import logging
import os
import queue
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from authrelay.spool.envelope import Envelope, Recipient, new_queue_id

log = logging.getLogger(__name__)

MAGIC = b"AUTHRELAY-SPOOL"
SPOOL_VERSION = 1
STATE_VERSION = 1
_MAX_HEADER_LINE = 64
_MAX_ENVELOPE = 16 * 1024 * 1024  # a sanity bound: larger is corruption, not a real envelope
NOTIFY_SOCK = "notify.sock"
CONTROL_SOCK = "control.sock"
SCHEDULER_LOCK = "scheduler.lock"
NOT_READY_MODE = 0o600  # queue/ID still being received
READY_MODE = 0o700  # owner-execute bit: committed (fsync'd before the 250)
SPILL = 128 * 1024
_NOTIFY_BATCH = 200  # queue ids per notify datagram (~18 bytes each)
_NOTIFY_RETRIES = 200  # x _NOTIFY_RETRY_DELAY: give up after ~2 s (the rescan remains)
_NOTIFY_RETRY_DELAY = 0.01  # message bytes kept in memory before the file is created


# Filesystems whose fsync(file) also commits the creation of that file's directory entry:
# the create and the data are in one journal (ext4 with a journal, xfs log, btrfs log tree),
# and committing the file's last transaction commits every earlier one. Postfix relies on
# the same. Elsewhere (ext2, vfat, network filesystems ...) we fsync the directory too.
_ORDERED_FS = {"ext4", "ext3", "xfs", "btrfs"}


def _journal_orders_create(path: Path) -> bool:
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


def _remove_if_dead(path: str) -> bool:
    """Unlink an unfinished spool file nobody holds (flock free, still not ready)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _ready(os.fstat(fd).st_mode):
            return False  # committed meanwhile
        os.unlink(path)
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


def _ready(mode: int) -> bool:
    return bool(mode & stat.S_IXUSR)


class SpoolError(Exception):
    """A spool file cannot be used."""


class CorruptError(SpoolError):
    """Truncated or unparsable: recover() moves such files to corrupt/."""


class UnsupportedVersion(SpoolError):
    """Written by a newer authrelay: left untouched, never deleted."""


_pool_lock = threading.Lock()


class CommitPool:
    """Threads that run commits (fsync and friends) for event loops, with less overhead
    than ThreadPoolExecutor + run_in_executor (no concurrent.futures.Future, no chaining):
    one queue put to start, one call_soon_threadsafe to finish. Threads start on demand up
    to `size`, so concurrent commits' fsyncs share journal commits."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._idle == 0 and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, name="spool-commit", daemon=True).start()
            else:
                self._idle -= 1  # that idle thread will take this job
        self._q.put((fn, fut, loop))
        return fut

    def _work(self) -> None:
        while True:
            fn, fut, loop = self._q.get()
            value: Any = None
            exc: BaseException | None = None
            try:
                value = fn()
            except BaseException as e:  # handed to the awaiting coroutine
                exc = e
            try:
                loop.call_soon_threadsafe(_settle, fut, value, exc)
            except RuntimeError:  # the loop is gone (shutdown)
                pass
            with self._lock:
                self._idle += 1


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)


_commit_pool: CommitPool | None = None


def commit_pool() -> CommitPool:
    global _commit_pool
    with _pool_lock:
        if _commit_pool is None or _commit_pool_pid != os.getpid():
            _set_commit_pool(CommitPool())
        assert _commit_pool is not None
        return _commit_pool


_commit_pool_pid = 0


def _set_commit_pool(pool: CommitPool) -> None:
    global _commit_pool, _commit_pool_pid
    _commit_pool, _commit_pool_pid = pool, os.getpid()  # threads don't survive fork()


def is_queue_id(name: str) -> bool:
    return name.isalnum() and name.isascii()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def encode_header(env: Envelope) -> bytes:
    ej = env.to_json()
    return b"%s %d %d\n%s\n" % (MAGIC, SPOOL_VERSION, len(ej), ej)


def parse_header(f) -> tuple[Envelope, int]:
    """Read the header from binary file `f`: (envelope, offset of the message bytes)."""
    line = f.readline(_MAX_HEADER_LINE)
    if not line:
        raise CorruptError("empty file")
    if not line.endswith(b"\n"):
        raise CorruptError("truncated header line")
    parts = line.split()
    if len(parts) != 3 or parts[0] != MAGIC:
        raise CorruptError("not a spool file")
    try:
        version, envlen = int(parts[1]), int(parts[2])
    except ValueError:
        raise CorruptError("bad header numbers") from None
    if version != SPOOL_VERSION:
        raise UnsupportedVersion(f"spool format version {version} (we read {SPOOL_VERSION})")
    if not 0 < envlen <= _MAX_ENVELOPE:
        raise CorruptError(f"bad envelope length {envlen}")
    raw = f.read(envlen + 1)
    if len(raw) != envlen + 1 or raw[-1:] != b"\n":
        raise CorruptError("truncated envelope")
    try:
        env = Envelope.from_json(raw[:-1])
    except ValueError as e:  # JSONDecodeError is a ValueError, as is a version refusal
        if "version" in str(e):
            raise UnsupportedVersion(str(e)) from None
        raise CorruptError(f"bad envelope: {e}") from None
    except TypeError as e:
        raise CorruptError(f"bad envelope: {e}") from None
    return env, len(line) + envlen + 1


class Incoming:
    """One message being received: written with write(), made durable by commit().

    The bytes stream to queue/ID (mode 0600 = "not ready"; commit sets the owner-execute
    bit, Postfix's trick, so there is no cross-directory rename). The first `SPILL` bytes
    are collected in memory and the file is created by the commit thread: creating a file
    on ext4 can wait behind a concurrent journal commit, and that wait must not stall the
    event loop. A message larger than `SPILL` is created at that point and streamed, so
    memory per session stays bounded by SPILL.
    """

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.size = 0
        self._path = spool.queue_dir / self.queue_id
        self._fd: int | None = None
        self._buf = bytearray(encode_header(envelope))
        self._done = False

    def _open(self) -> int:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     NOT_READY_MODE)
        try:
            # The lock tells recover() in another process that this file is alive.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return fd

    def write(self, data: bytes | memoryview) -> None:
        """Append message bytes; runs on the event loop (memory, then page cache)."""
        if self._done:
            raise SpoolError("write after commit/abort")
        self.size += len(data)
        if self._fd is None:
            self._buf += data
            if len(self._buf) < SPILL:
                return
            fd = self._open()
            _write_all(fd, self._buf)
            self._buf = bytearray()
            return
        _write_all(self._fd, data)

    def _commit_sync(self) -> None:
        fd = self._fd if self._fd is not None else self._open()
        if self._buf:
            _write_all(fd, self._buf)
            self._buf = bytearray()
        os.fchmod(fd, READY_MODE)  # the ready mark travels in the same fsync as the data
        if self.spool.fsync:
            os.fsync(fd)
            if not self.spool.journal_orders_create:
                self.spool._fsync_queue_dir()  # the directory entry too (group commit)
        self._fd = None
        os.close(fd)  # releases the flock only now: recover() never sees a half commit

    async def commit(self) -> None:
        """Durable when this returns: data + ready mark fsynced, queue/ fsynced; notify."""
        if self._done:
            raise SpoolError("commit after commit/abort")
        self._done = True
        try:
            await commit_pool().run(self._commit_sync)
        except BaseException:
            self._done = False
            self.abort()
            raise
        self.spool._notify(self.queue_id)

    def abort(self) -> None:
        """Drop the message (idempotent); never raises."""
        fd, self._fd = self._fd, None
        self._buf = bytearray()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self._done:
            self._done = True
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._path)


class Spool:
    """The queue on disk. Thread-safe for distinct queue ids; see module docstring."""

    on_commit: Callable[[str], None] | None

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.on_commit = None
        self.tmp_dir = self.root / "tmp"
        self.queue_dir = self.root / "queue"
        self.hold_dir = self.root / "hold"
        self.corrupt_dir = self.root / "corrupt"
        self.notify_path = self.root / NOTIFY_SOCK
        self.control_path = self.root / CONTROL_SOCK
        self._qdir_fd: int | None = None
        self._notify_sock: socket.socket | None = None
        self._pending_notify: list[str] = []
        self._notify_scheduled = False
        self.journal_orders_create = _journal_orders_create(self.root)
        self._dir_sync = threading.Condition()
        self._dsync_started = 0
        self._dsync_done = 0
        self._dsync_running = False

    # ------------------------------------------------------------------ setup
    def ensure_dirs(self) -> None:
        for d in (self.root, self.tmp_dir, self.queue_dir, self.hold_dir, self.corrupt_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def close(self) -> None:
        if self._qdir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._qdir_fd)
            self._qdir_fd = None
        if self._notify_sock is not None:
            self._notify_sock.close()
            self._notify_sock = None

    def _fsync_queue_dir(self) -> None:
        # Group commit: concurrent commits share one directory fsync. Each caller needs an
        # fsync that *started* after its rename; one running fsync serves every caller that
        # arrived before it began, so N sessions cost ~1 directory journal commit, not N.
        if self._qdir_fd is None:
            with self._dir_sync:
                if self._qdir_fd is None:
                    self._qdir_fd = os.open(self.queue_dir,
                                            os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        cond = self._dir_sync
        with cond:
            need = self._dsync_started + 1
            while self._dsync_done < need:
                if self._dsync_running:
                    cond.wait()
                    continue
                self._dsync_running = True
                self._dsync_started += 1
                seq = self._dsync_started
                cond.release()
                try:
                    os.fsync(self._qdir_fd)
                except BaseException:
                    cond.acquire()
                    self._dsync_running = False
                    cond.notify_all()
                    raise
                cond.acquire()
                self._dsync_running = False
                self._dsync_done = seq
                cond.notify_all()

    # ------------------------------------------------------------------ receive
    def begin(self, envelope: Envelope) -> Incoming:
        """Open tmp/ID and write the header; the envelope is final from here on."""
        if not envelope.queue_id:
            envelope.queue_id = new_queue_id()
        return Incoming(self, envelope)

    def _notify(self, queue_id: str) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit(queue_id)
            except Exception:  # a scheduler bug must not fail an accepted message
                log.exception("%s: on_commit hook failed", queue_id)
            return  # the scheduler is in this process (it holds the spool lock): no datagram
        # Another process delivers: tell it through notify.sock. Ids committed in the same
        # loop iteration share one datagram ("ID\nID\n..."), and a datagram the kernel
        # refuses (the scheduler's queue is full under load: unix datagram queues are
        # short) is sent again a moment later instead of waiting for the periodic rescan.
        self._pending_notify.append(queue_id)
        if self._notify_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send_notify()
            return
        self._notify_scheduled = True
        loop.call_soon(self._flush_notify, loop, 0)

    def _flush_notify(self, loop: asyncio.AbstractEventLoop, tries: int) -> None:
        self._notify_scheduled = False
        if not self._send_notify() and tries < _NOTIFY_RETRIES and self._pending_notify:
            self._notify_scheduled = True
            loop.call_later(_NOTIFY_RETRY_DELAY, self._flush_notify, loop, tries + 1)

    def _send_notify(self) -> bool:
        """Send pending ids; False if the scheduler's queue was full (retry later)."""
        try:
            if self._notify_sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                self._notify_sock = s
            while self._pending_notify:
                batch = self._pending_notify[:_NOTIFY_BATCH]
                self._notify_sock.sendto("\n".join(batch).encode("ascii"),
                                         str(self.notify_path))
                del self._pending_notify[:len(batch)]
            return True
        except (BlockingIOError, InterruptedError):
            return False  # queue full: try again shortly
        except OSError:
            # No scheduler listening (stopped, or not started yet): its start-up scan
            # and periodic rescans find these messages.
            self._pending_notify.clear()
            return True

    # ------------------------------------------------------------------ lookup
    def _locate(self, qid: str) -> Path:
        if not is_queue_id(qid):
            raise FileNotFoundError(f"bad queue id {qid!r}")
        p = self.queue_dir / qid
        try:
            if _ready(p.stat().st_mode):
                return p
        except FileNotFoundError:
            pass
        h = self.hold_dir / qid
        if h.exists():
            return h
        raise FileNotFoundError(f"{qid}: not in the queue")

    def scan(self) -> list[str]:
        """Queue ids in queue/ (not held), oldest first (ids sort by arrival)."""
        return self._ids(self.queue_dir)

    def held(self) -> list[str]:
        return self._ids(self.hold_dir)

    @staticmethod
    def _ids(d: Path) -> list[str]:
        try:
            with os.scandir(d) as it:
                ids = []
                for e in it:
                    if not is_queue_id(e.name):
                        continue
                    try:
                        if _ready(e.stat().st_mode):  # skip messages still being received
                            ids.append(e.name)
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        ids.sort(key=lambda s: (len(s), s))
        return ids

    def is_held(self, qid: str) -> bool:
        return (self.hold_dir / qid).exists()

    def exists(self, qid: str) -> bool:
        try:
            self._locate(qid)
            return True
        except FileNotFoundError:
            return False

    def load(self, qid: str) -> Envelope:
        """The header envelope merged with ID.state; `size` and `held` filled in."""
        path = self._locate(qid)
        with open(path, "rb") as f:
            env, offset = parse_header(f)
            total = os.fstat(f.fileno()).st_size
        if env.queue_id != qid:
            raise CorruptError(f"{qid}: envelope names {env.queue_id!r}")
        env.size = total - offset
        env.held = path.parent == self.hold_dir
        state = path.with_name(qid + ".state")
        try:
            raw = state.read_bytes()
        except FileNotFoundError:
            return env
        self._merge_state(env, raw)
        return env

    def load_for_delivery(self, qid: str, inline_max: int = 256 * 1024
                          ) -> tuple[Envelope, bytes | Path, int]:
        """(envelope with state, the message, offset) in as few system calls as we can.

        A message up to `inline_max` bytes comes back as bytes (offset 0) from a single
        read, so the courier need not open the file again; a larger one as (path, offset)
        to be streamed. The scheduler calls this for every attempt, on the event loop.
        """
        if not is_queue_id(qid):
            raise FileNotFoundError(f"bad queue id {qid!r}")
        path = self.queue_dir / qid
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            path = self.hold_dir / qid
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not _ready(st.st_mode):
                raise FileNotFoundError(f"{qid}: still being received")
            data = os.read(fd, min(st.st_size, inline_max) + _MAX_HEADER_LINE + 1)
        finally:
            os.close(fd)
        nl = data.find(b"\n")
        head = data[:nl + 1] if nl >= 0 else data
        parts = head.split()
        if len(parts) == 3 and parts[0] == MAGIC and parts[1].isdigit() and \
                parts[2].isdigit() and len(data) > len(head) + int(parts[2]):
            # Fast path: the whole header is in what we read.
            env, offset = parse_header(io.BytesIO(data))
        else:
            with open(path, "rb") as f:
                env, offset = parse_header(f)
        if env.queue_id != qid:
            raise CorruptError(f"{qid}: envelope names {env.queue_id!r}")
        env.size = st.st_size - offset
        env.held = path.parent == self.hold_dir
        try:
            with open(path.with_name(qid + ".state"), "rb") as sf:
                self._merge_state(env, sf.read())
        except FileNotFoundError:
            pass
        if st.st_size <= len(data):
            return env, data[offset:], 0
        return env, path, offset

    @staticmethod
    def _merge_state(env: Envelope, raw: bytes) -> None:
        try:
            d = json.loads(raw)
        except ValueError:
            # A state file is replaced atomically, so this is disk damage: keep the
            # header's state (re-delivery is safe, losing a recipient is not).
            log.error("%s: unreadable state file ignored", env.queue_id)
            return
        if d.get("v") != STATE_VERSION:
            raise UnsupportedVersion(f"{env.queue_id}: state version {d.get('v')!r}")
        by_addr = {r.address: r for r in env.recipients}
        known = set(Recipient.__dataclass_fields__)
        for rd in d.get("recipients", []):
            if rd.get("address") in by_addr:
                r = by_addr[rd["address"]]
                for k, v in rd.items():
                    if k in known:
                        setattr(r, k, v)

    def body_path(self, qid: str) -> tuple[Path, int]:
        """(file, offset of the first message byte) for the courier to stream from."""
        path = self._locate(qid)
        with open(path, "rb") as f:
            _, offset = parse_header(f)
        return path, offset

    def read_headers(self, qid: str, limit: int = 256 * 1024) -> bytes:
        """The message's header section (up to and including the blank line)."""
        path, offset = self.body_path(qid)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 4]
        if data.startswith(b"\r\n"):
            return b""
        return data

    # ------------------------------------------------------------------ scheduler state
    def save_state(self, env: Envelope) -> None:
        """Atomically replace ID.state (tmp + fsync + rename + dir fsync). Blocking."""
        path = self._locate(env.queue_id)
        state = path.with_name(env.queue_id + ".state")
        tmp = path.with_name(env.queue_id + ".state.tmp")
        data = json.dumps(
            {"v": STATE_VERSION, "recipients": [asdict(r) for r in env.recipients]},
            separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, state)
        if self.fsync:
            _fsync_dir(state.parent)

    def remove(self, qid: str) -> None:
        """Delete a message: the body first, so a crash leaves at worst an orphan state."""
        path = self._locate(qid)
        os.unlink(path)
        for suffix in (".state", ".state.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.with_name(qid + suffix))

    def hold(self, qid: str) -> None:
        self._move(qid, self.queue_dir, self.hold_dir)

    def release(self, qid: str) -> None:
        self._move(qid, self.hold_dir, self.queue_dir)

    def _move(self, qid: str, src: Path, dst: Path) -> None:
        if not is_queue_id(qid):
            raise FileNotFoundError(f"bad queue id {qid!r}")
        if not (src / qid).exists():
            if (dst / qid).exists():
                return  # already there
            raise FileNotFoundError(f"{qid}: not in {src.name}/")
        # Body first, then state: a crash in between leaves an orphan state file that
        # recover() moves after its body.
        os.rename(src / qid, dst / qid)
        with contextlib.suppress(FileNotFoundError):
            os.rename(src / (qid + ".state"), dst / (qid + ".state"))
        if self.fsync:
            _fsync_dir(dst)
            _fsync_dir(src)

    # ------------------------------------------------------------------ recovery
    def recover(self) -> dict[str, int]:
        """Clean up after a crash; never raises for a bad file. Returns counts."""
        self.ensure_dirs()
        counts = {"tmp_removed": 0, "corrupt": 0, "unsupported": 0, "orphans": 0, "ok": 0}
        # tmp/ (older layout) and unready queue/ files: a receive that died before its
        # 250 is garbage, unless a live receiving process still holds its lock.
        with os.scandir(self.tmp_dir) as it:
            dead = [e.path for e in it]
        with os.scandir(self.queue_dir) as it:
            for e in it:
                try:
                    if is_queue_id(e.name) and not _ready(e.stat().st_mode):
                        dead.append(e.path)
                except FileNotFoundError:
                    continue
        counts["tmp_removed"] = sum(_remove_if_dead(path) for path in dead)
        for d in (self.queue_dir, self.hold_dir):
            with os.scandir(d) as it:
                names = [e.name for e in it
                         if not is_queue_id(e.name) or _ready(e.stat().st_mode)]
            present = set(names)
            for name in names:
                if is_queue_id(name):
                    self._check_file(d, name, counts)
                elif name.endswith(".state.tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(d / name)
                elif name.endswith(".state"):
                    qid = name[: -len(".state")]
                    if qid in present:
                        continue
                    other = self.hold_dir if d == self.queue_dir else self.queue_dir
                    if (other / qid).exists():  # a hold/release interrupted mid-move
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(d / name, other / name)
                    else:  # a remove interrupted after the body went
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(d / name)
                    counts["orphans"] += 1
        if counts["tmp_removed"] or counts["corrupt"] or counts["orphans"]:
            log.warning("spool recovery: %s", counts)
        return counts

    def _check_file(self, d: Path, qid: str, counts: dict[str, int]) -> None:
        path = d / qid
        try:
            with open(path, "rb") as f:
                env, _ = parse_header(f)
            if env.queue_id != qid:
                raise CorruptError(f"envelope names {env.queue_id!r}")
            counts["ok"] += 1
        except FileNotFoundError:
            return
        except UnsupportedVersion as e:
            log.error("%s: left in place, %s", qid, e)
            counts["unsupported"] += 1
        except (CorruptError, OSError) as e:
            log.error("%s: corrupt spool file moved to corrupt/: %s", qid, e)
            counts["corrupt"] += 1
            with contextlib.suppress(OSError):
                os.rename(path, self.corrupt_dir / qid)
            with contextlib.suppress(OSError):
                os.rename(d / (qid + ".state"), self.corrupt_dir / (qid + ".state"))
