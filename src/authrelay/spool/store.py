"""The queue on disk: lookup, scheduler state, hold/release/remove and recovery.

Owns the directories under `cfg.spool_dir` (docs/INTERFACES.md):

    queue/ID        one immutable file per message (format: spool/format.py; written by
                    spool/writer.py): mode 0600 while being received, 0700 once committed
                    (the "ready" mark, as Postfix does). Readers ignore files without it.
    queue/ID.state  per-recipient state written by the scheduler (atomic replace + fsync),
                    and the arrival time its age is counted from (`received_at`: the
                    header's, or an earlier one the scheduler set when the header's lay
                    in the future, the clock set back since; only an earlier one applies)
    hold/           held messages (the same two files, moved)
    corrupt/        damaged files (kept for the operator, never deleted)
    tmp/            only read by recovery (the layout of the first builds)

The way in is spool/submit.py (`Submitter`), which uses `begin()` here; the notify IPC
is spool/notify.py. The scheduler's own socket and lock names live in scheduler/.

Contract: no path here deletes a committed message except `remove()` (delivery complete,
bounce, expiry, `queue delete`). A damaged file (truncated, checksum mismatch, missing or
unknown field, no recipients) raises `CorruptError` on load; `quarantine()` moves it to
corrupt/ and `recover()` does so at start. A file of an unknown newer format version is
left where it is and refused (`UnsupportedVersion`).
Failure policy: blocking calls; the scheduler runs the slow ones in `commit_pool()`
threads. `recover()` never raises for a bad file and skips files a live receiving process
still holds (flock), so it is safe with workers and beside a running scheduler (an orphan
state is looked at again before it goes; `save_state` writes again when its tmp file was
taken). `sweep_unfinished()` removes a dead receive's file while everything runs (a worker
killed in DATA): unready, unchanged for `UNFINISHED_AGE`, nobody's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from authrelay.spool import format as fmt
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.format import CorruptError, SpoolError, UnsupportedVersion
from authrelay.spool.notify import NOTIFY_SOCK, Notifier
from authrelay.spool.writer import (
    READY_MODE,
    SPILL,
    CommitPool,
    DirSync,
    Incoming,
    commit_pool,
    fsync_dir,
    journal_orders_create,
    mark_ready,
    write_all,
)

__all__ = [  # re-exported: the names other modules have always imported from here
    "READY_MODE", "SPILL", "CommitPool", "CorruptError", "Incoming", "Spool", "SpoolError",
    "UnsupportedVersion", "commit_pool", "is_queue_id",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
INLINE_MAX = 256 * 1024  # load_for_delivery returns messages up to this size as bytes


# An unready queue file left unchanged this long, and locked by nobody, is a dead receive's
# (a worker killed in DATA): `sweep_unfinished` removes it. Far past the microseconds
# between a live writer's create and its lock; a live receive holds its lock throughout.
UNFINISHED_AGE = 10.0

QUEUE_ID_MAX = 64  # ours have 14 characters; a longer name is no queue id of ours


def is_queue_id(name: str) -> bool:
    """A name that may be a queue id: ASCII letters and digits, at most QUEUE_ID_MAX (so
    an id from a user, a control request or a directory entry is a file name: never
    "File name too long", never a path)."""
    return 0 < len(name) <= QUEUE_ID_MAX and name.isalnum() and name.isascii()


def _ready(mode: int) -> bool:
    return bool(mode & stat.S_IXUSR)


def _open_regular(path: Path | str) -> int:
    """A read descriptor on a spool file that is a regular file, never followed through a
    symbolic link (O_NOFOLLOW) nor blocked on by a FIFO (O_NONBLOCK): anything else under a
    queue id's name is damage (CorruptError), quarantined like any other. Raises
    FileNotFoundError when nothing is there."""
    return _open_regular_stat(path)[0]


class InCommit(FileNotFoundError):
    """A ready file its writer still holds (_not_in_commit): in the queue, not movable or
    deliverable yet. A FileNotFoundError to those that skip it; an operator's named
    hold or release is told so (scheduler/control), not "not in the queue"."""


def _not_in_commit(fd: int, qid: str) -> None:
    """FileNotFoundError when the file open at `fd` is still held by its writer: ready
    but in its fsync, not durable yet, and its commit may still be abandoned
    (writer.Incoming.abandon: the client told 4xx, the thread then unlinks queue/ID).
    Such a file is neither delivered nor moved (a hold would carry it out of the
    thread's reach). The shared lock taken stays until `fd` is closed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InCommit(f"{qid}: still being committed") from None


def _live_receive(fd: int, st: os.stat_result) -> bool:
    """Whether the unready file open at `fd` (fstat `st`) is a live receive's: young
    (its writer may be between its create and its lock: never locked here, which would
    make that writer fail) or locked by its writer. False: a dead receive's (a worker
    killed in DATA), never acknowledged, `sweep_unfinished`'s to remove. The shared lock
    taken stays until `fd` is closed."""
    if not _unchanged_for(st, UNFINISHED_AGE):
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


def _unchanged_for(st: os.stat_result, age: float, now: float | None = None) -> bool:
    """Whether the file (stat `st`) was last changed at least `age` seconds ago by the
    wall clock; a change time ahead of the clock by more than `age` (the clock set back
    since: its age is unknown) counts as that old too, else such a file waited out the
    jump (a day's, a day)."""
    return abs((time.time() if now is None else now) - st.st_mtime) >= age


def _open_regular_stat(path: Path | str) -> tuple[int, os.stat_result]:
    """`_open_regular`, with the fstat it made (its mode and size: one fstat per load)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptError("a symbolic link, not a spool file") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):
            raise CorruptError("not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptError("not a regular file")
    return fd, st


def _regular_or_absent(entry: os.DirEntry[str]) -> bool:
    """False for a symlink, directory, FIFO... under a queue directory (damage to
    quarantine); True for a regular file or one that vanished meanwhile."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return True


def _remove_if_dead(path: str, min_age: float = 0.0) -> bool:
    """Unlink an unfinished spool file nobody holds (flock free, still not ready), left
    unchanged for at least `min_age` seconds.

    A writer creates its file (O_EXCL) and then locks it (writer.Incoming._open_locked);
    in between the file is free. The age is judged before the lock is tried, so a sweep
    never holds the lock of a young file only to leave it: its writer, finding the lock
    taken, waits for the name to be freed and would wait in vain. A file taken (with
    `min_age` 0 at start, or a writer stalled past it) is unlinked under our lock, so its
    writer sees it gone and creates it again; the ready bit is read under the lock (a
    committed file is never removed), and only the file we hold is unlinked."""
    try:
        fd = _open_regular(path)
    except (FileNotFoundError, CorruptError):
        return False
    try:
        if min_age > 0:
            st = os.fstat(fd)
            if _ready(st.st_mode) or not _unchanged_for(st, min_age):
                return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        if _ready(st.st_mode):
            return False  # committed meanwhile
        if os.stat(path).st_ino != st.st_ino:
            return False  # ours was unlinked already; this name is another's now
        os.unlink(path)
        return True
    except (BlockingIOError, FileNotFoundError):
        return False
    finally:
        os.close(fd)


def _file_reader(f: io.BufferedReader) -> Callable[[int, int], Iterator[bytes]]:
    return lambda off, n: fmt.iter_file(f, off, n)


def _bytes_reader(data: bytes) -> Callable[[int, int], Iterator[bytes | memoryview]]:
    view = memoryview(data)
    return lambda off, n: iter((view[off:off + n],))


class Spool:
    """The queue on disk. Thread-safe for distinct queue ids; see module docstring."""

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.tmp_dir = self.root / "tmp"
        self.queue_dir = self.root / "queue"
        self.hold_dir = self.root / "hold"
        self.corrupt_dir = self.root / "corrupt"
        self.notify_path = self.root / NOTIFY_SOCK
        # The per-message paths as plain strings: pathlib's joins, parses and str() were
        # ~10% of the delivering process's Python time (py-spy, issue 22).
        self._queue_prefix = f"{self.queue_dir}/"
        self._hold_prefix = f"{self.hold_dir}/"
        self.notifier = Notifier(self.notify_path)
        self.queue_dir_sync = DirSync(self.queue_dir)
        self.journal_orders_create = journal_orders_create(self.root)
        # (queue id, reason) of files moved to corrupt/, for the caller's audit log
        # (the scheduler writes maillog warnings for them and clears the list).
        self.quarantined: list[tuple[str, str]] = []
        # Queue ids of unfinished files removed (recover, sweep_unfinished), likewise.
        self.swept: list[str] = []

    @property
    def on_commit(self) -> Callable[[str, int], None] | None:
        """In-process notify hook (the scheduler's notify) instead of a datagram:
        `hook(queue_id, vouched)` (spool/notify.py)."""
        return self.notifier.on_commit

    @on_commit.setter
    def on_commit(self, hook: Callable[[str, int], None] | None) -> None:
        self.notifier.on_commit = hook

    # ------------------------------------------------------------------ setup
    def ensure_dirs(self) -> None:
        for d in (self.root, self.tmp_dir, self.queue_dir, self.hold_dir, self.corrupt_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def close(self) -> None:
        self.queue_dir_sync.close()
        self.notifier.close()

    # ------------------------------------------------------------------ receive
    def begin(self, envelope: Envelope) -> Incoming:
        """A new message (no I/O yet); the envelope is final from here on. Producers go
        through spool/submit.py, which adds cleanup, checks and the maillog line."""
        if not envelope.queue_id:
            envelope.queue_id = new_queue_id()
        return Incoming(self.queue_dir, envelope, fsync=self.fsync,
                        dir_sync=None if self.journal_orders_create else self.queue_dir_sync,
                        notify=self.notifier.notify, hold_dir=self.hold_dir)

    # ------------------------------------------------------------------ lookup
    def _locate(self, qid: str) -> Path:
        return Path(self._where(qid))

    def _where(self, qid: str) -> str:
        """queue/ID when it is there and ready, else hold/ID; FileNotFoundError if neither."""
        if not is_queue_id(qid):
            raise FileNotFoundError(f"bad queue id {qid!r}")
        p = self._queue_prefix + qid
        try:
            if _ready(os.lstat(p).st_mode):  # a symlink here is damage: open refuses it
                return p
        except FileNotFoundError:
            pass
        h = self._hold_prefix + qid
        if os.path.exists(h):
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
                        if _ready(e.stat(follow_symlinks=False).st_mode):  # skip unready
                            ids.append(e.name)
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            return []
        ids.sort(key=lambda s: (len(s), s))
        return ids

    def arriving(self, qid: str) -> bool:
        """Whether queue/ID is a message still being received: its file unready and its
        receive alive (`_live_receive`), or ready and still in its commit (its writer's
        lock held). Not in the queue yet: nothing is shown, moved or removed (README
        "Reading and managing the queue")."""
        if not is_queue_id(qid):
            return False
        try:
            fd, st = _open_regular_stat(self._queue_prefix + qid)
        except (FileNotFoundError, CorruptError):
            return False
        try:
            if not _ready(st.st_mode):
                return _live_receive(fd, st)
            try:
                _not_in_commit(fd, qid)
            except InCommit:
                return True
            return False
        finally:
            os.close(fd)

    def corrupt_count(self) -> int:
        """Files in corrupt/ (their .state files aside), as `queue corrupt` lists them."""
        try:
            with os.scandir(self.corrupt_dir) as it:
                return sum(1 for e in it if not e.name.endswith(".state"))
        except FileNotFoundError:
            return 0

    def exists(self, qid: str) -> bool:
        try:
            self._locate(qid)
            return True
        except FileNotFoundError:
            return False

    def _open_checked(self, path: Path, qid: str) -> tuple[io.BufferedReader, fmt.Layout, int]:
        f = os.fdopen(_open_regular(path), "rb")  # noqa: SIM115 - handed to the caller
        try:
            lay = fmt.read_layout(f)
            size = os.fstat(f.fileno()).st_size
            fmt.check_size(lay, size)
        except BaseException:
            f.close()
            raise
        return f, lay, size

    def _envelope(self, f: io.BufferedReader, lay: fmt.Layout, qid: str) -> Envelope:
        f.seek(lay.env_off)
        raw = f.read(lay.env_len + 1)
        if len(raw) != lay.env_len + 1 or raw[-1:] != b"\n":
            raise CorruptError("truncated envelope")
        env = fmt.decode_envelope(raw[:-1], lay.version)
        if env.queue_id != qid:
            raise CorruptError(f"envelope names {env.queue_id!r}")
        return env

    def load(self, qid: str) -> Envelope:
        """The envelope merged with ID.state; `size` and `held` filled in. Checks the
        header, the lengths and the envelope, not the message checksum (see verify())."""
        path = self._locate(qid)
        f, lay, size = self._open_checked(path, qid)
        with f:
            env = self._envelope(f, lay, qid)
        env.size = size - lay.prepend_off
        env.held = path.parent == self.hold_dir
        env.prepend_len = lay.prepend_len
        self._load_state(path, env)
        return env

    def check_corrupt(self, name: str) -> str:
        """Why the file `name` in corrupt/ cannot be delivered, or "" when this release
        reads it intact (e.g. set aside by an older release that could not read its
        format: a downgrade). Never raises."""
        path = self.corrupt_dir / name
        try:
            f, lay, _ = self._open_checked(path, name)
            with f:
                self._envelope(f, lay, name)
                fmt.verify(lay, _file_reader(f))
        except UnsupportedVersion as e:
            return f"{e}: written by a newer release"
        except SpoolError as e:
            return str(e)
        except OSError as e:
            return e.strerror or str(e)
        return ""

    def verify(self, qid: str) -> None:
        """Read the whole file and check its checksum (version 2). Raises CorruptError."""
        path = self._locate(qid)
        f, lay, _ = self._open_checked(path, qid)
        with f:
            fmt.verify(lay, _file_reader(f))

    def load_for_delivery(self, qid: str, inline_max: int = INLINE_MAX, vouched: int = 0
                          ) -> tuple[Envelope, bytes | Path, int]:
        """(envelope with state, the message, offset) in as few system calls as we can.

        A file up to `inline_max` bytes is read whole at once, checked (lengths and
        checksum) and its message (prepend included) comes back as bytes, offset 0. A
        larger one comes back as (path, offset of the prepend) to be streamed: its lengths
        and envelope are checked here, its checksum by `verify()` (the caller runs that
        off the event loop). `vouched`: the inode a receiving worker's notice named for
        this queue id (spool/notify.py); `env.lines_checked` is set only when the file
        opened is that one. Raises FileNotFoundError, CorruptError, UnsupportedVersion.
        """
        if not is_queue_id(qid):
            raise FileNotFoundError(f"bad queue id {qid!r}")
        path = self._queue_prefix + qid
        held = False
        try:
            fd, st = _open_regular_stat(path)
        except FileNotFoundError:
            path, held = self._hold_prefix + qid, True
            fd, st = _open_regular_stat(path)
        try:
            if not _ready(st.st_mode):
                raise FileNotFoundError(f"{qid}: still being received")
            # Its notice, or a later scan, brings it back once committed.
            _not_in_commit(fd, qid)
            data = os.read(fd, min(st.st_size, inline_max) + fmt.HEADER_LEN + 1)
        finally:
            os.close(fd)
        nl = data.find(b"\n")
        lay = fmt.header_layout(data[:nl + 1] if nl >= 0 else data)
        version = lay.version
        fmt.check_size(lay, st.st_size)
        whole = st.st_size <= len(data)
        if whole or len(data) > lay.prepend_off:
            raw = data[lay.env_off:lay.env_off + lay.env_len + 1]
            if len(raw) != lay.env_len + 1 or raw[-1:] != b"\n":
                raise CorruptError("truncated envelope")
            env = fmt.decode_envelope(raw[:-1], version)
            if env.queue_id != qid:
                raise CorruptError(f"envelope names {env.queue_id!r}")
        else:  # an envelope larger than what we read
            with open(path, "rb") as f:
                env = self._envelope(f, lay, qid)
        if whole:
            fmt.verify(lay, _bytes_reader(data))
        env.size = st.st_size - lay.prepend_off
        env.held = held
        env.prepend_len = lay.prepend_len
        env.lines_checked = vouched != 0 and st.st_ino == vouched
        env.log_owed = st.st_mtime if st.st_mode & stat.S_IXGRP else 0.0
        self._load_state(path, env)
        if whole:
            return env, data[lay.prepend_off:], 0
        return env, Path(path), lay.prepend_off

    def logged(self, env: Envelope) -> None:
        """`env`'s `from=` line written by the scheduler (`env.log_owed`): its file's
        mark cleared (writer.Incoming.logged). Raises OSError (a file gone meanwhile:
        FileNotFoundError)."""
        path = (self._hold_prefix if env.held else self._queue_prefix) + env.queue_id
        mark_ready(path)  # (never through a symlink planted in its place)
        env.log_owed = 0.0

    def _load_state(self, path: Path | str, env: Envelope) -> None:
        """Merge ID.state, beside `path` (the message's file, named by its queue id)."""
        try:
            with os.fdopen(_open_regular(f"{path}.state"), "rb") as sf:
                self._merge_state(env, sf.read())
        except FileNotFoundError:
            # No ID.state; nor an ID.state.tmp but while a save runs, or after one that
            # failed (save_state sets the mark first) or a crash (recover() removes it).
            env.state_file = False
        except CorruptError as e:  # as any damaged state file: the header's state is kept
            log.warning("%s: state file ignored: %s", env.queue_id, e,
                        extra={"queue_id": env.queue_id})  # daemon.MaillogHandler

    @staticmethod
    def _merge_state(env: Envelope, raw: bytes) -> None:
        """Apply ID.state to `env`. A state file is replaced atomically, so anything
        unreadable or ill-typed in it is disk damage: the whole file is ignored and the
        header's state kept (re-delivery is safe; a recipient wrongly marked done -- and
        the message removed with it -- would be a loss)."""
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            if d.get("v") != STATE_VERSION:
                if isinstance(d.get("v"), int) and d["v"] > STATE_VERSION:
                    raise UnsupportedVersion(
                        f"{env.queue_id}: state version {d.get('v')!r}")
                raise ValueError(f"bad state version {d.get('v')!r}")
            records = d.get("recipients", [])
            if not isinstance(records, list):
                raise ValueError("recipients is not a list")
            arrival = d.get("received_at", env.received_at)
            if isinstance(arrival, bool) or not isinstance(arrival, int | float) \
                    or not math.isfinite(arrival):
                raise ValueError(f"bad received_at {arrival!r}")
            # Records are saved in the envelope's order, one per recipient: an address
            # given twice (RCPT TO twice, an alias expanded twice) has two records, the
            # first for the first (a map by address once updated only the last, so the
            # first came back pending and was delivered again on every later pass).
            by_addr: dict[str, list[Recipient]] = {}
            for r in env.recipients:
                by_addr.setdefault(r.address, []).append(r)
            updates = []
            for rd in records:
                addr = rd.get("address") if isinstance(rd, dict) else None
                if not isinstance(addr, str) or not by_addr.get(addr):
                    continue
                fields = fmt.check_recipient_fields(rd)
                updates.append((by_addr[addr].pop(0), fields))
        except (ValueError, CorruptError) as e:  # JSONDecodeError is a ValueError
            log.error("%s: damaged state file ignored: %s", env.queue_id, e,
                      extra={"queue_id": env.queue_id})
            return
        for r, fields in updates:
            for k, v in fields.items():
                setattr(r, k, v)
        # The scheduler only ever moves it earlier (scheduler._clamp_arrival): a state
        # cannot make a message younger than its header says. That earlier time stands
        # while the header's is still in the future; once the clock has reached it, the
        # header is believed again: the clock that made the saved one may have been the
        # wrong one (set back to 1970 by a boot before NTP), and from it every message
        # queued then would count decades old and expire at its next attempt.
        if env.received_at > time.time():
            env.received_at = min(env.received_at, float(arrival))

    def body_path(self, qid: str) -> tuple[Path, int]:
        """(file, offset) of the message as to be sent (prepended header lines first),
        which runs to the end of the file."""
        path = self._locate(qid)
        f, lay, _ = self._open_checked(path, qid)
        f.close()
        return path, lay.prepend_off

    def read_headers(self, qid: str, limit: int = 256 * 1024) -> bytes:
        """The message's header section (up to and including the blank line), prepended
        lines included. One longer than `limit` is cut after its last whole line within
        it: never inside a line, so never between the CR and the LF (a DSN returning it
        got "\\r\\r\\n", a bare CR, and a header line cut short)."""
        path, offset = self.body_path(qid)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 4]
        if data.startswith(b"\r\n"):
            return b""
        if len(data) < limit:  # the whole message: a header section without a body
            return data
        cut = data.rfind(b"\r\n")
        return data[: cut + 2] if cut >= 0 else b""

    def quarantine(self, qid: str, reason: str) -> bool:
        """Move a damaged message (and its state) to corrupt/; never deletes. True if moved."""
        moved = False
        for d in (self.queue_dir, self.hold_dir):
            if os.path.lexists(d / qid):  # a dangling symlink is damage too
                try:
                    os.rename(d / qid, self.corrupt_dir / qid)
                    moved = True
                except OSError as e:
                    log.error("%s: cannot move to corrupt/: %s", qid, e,
                              extra={"queue_id": qid})
                    return False
                with contextlib.suppress(OSError):
                    os.rename(d / (qid + ".state"), self.corrupt_dir / (qid + ".state"))
                if self.fsync:
                    with contextlib.suppress(OSError):
                        fsync_dir(self.corrupt_dir)
                        fsync_dir(d)
                break
        if moved:
            log.warning("%s: damaged spool file moved to corrupt/: %s", qid, reason,
                        extra={"queue_id": qid})  # daemon.MaillogHandler
            self.quarantined.append((qid, reason))
        return moved

    # ------------------------------------------------------------------ scheduler state
    def save_state(self, env: Envelope) -> None:
        """Atomically replace ID.state (tmp + fsync + rename + dir fsync). Blocking.
        FileNotFoundError: the message is gone (removed, quarantined)."""
        data = json.dumps(
            {"v": STATE_VERSION, "recipients": [asdict(r) for r in env.recipients],
             "received_at": env.received_at},
            separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8")
        env.state_file = True  # before the tmp file exists: a removal then unlinks both
        for attempt in (1, 2):
            path = self._locate(env.queue_id)
            state = path.with_name(env.queue_id + ".state")
            tmp = path.with_name(env.queue_id + ".state.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(tmp, state)
                break
            except FileNotFoundError:
                # The tmp file taken by recover() (running beside the scheduler at start)
                # or the message moved (hold) meanwhile: written again where it is now.
                if attempt == 2:
                    raise
        if self.fsync:
            fsync_dir(state.parent)

    def remove(self, qid: str) -> None:
        """Delete a message: the body first, so a crash leaves at worst an orphan state."""
        path = self._where(qid)
        os.unlink(path)
        self._remove_state(path)

    @staticmethod
    def _remove_state(path: str) -> None:
        """The state files of the message at `path` (its body unlinked already)."""
        for suffix in (".state", ".state.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)

    def remove_delivered(self, envs: list[Envelope]) -> list[OSError | None]:
        """`remove` of each message, in order, in one call (one thread hand-off for many):
        None for each removed, else the OSError its removal raised (FileNotFoundError:
        gone already). For messages loaded ready (a delivering scheduler's): queue/ID is
        unlinked without the ready check of `_where` (an ID is never received twice), and
        ID.state and ID.state.tmp only when `env.state_file` says they may exist; each
        system call here is a GIL hand-off with the event loop (issue 22)."""
        out: list[OSError | None] = []
        for env in envs:
            qid = env.queue_id
            try:
                if not is_queue_id(qid):
                    raise FileNotFoundError(f"bad queue id {qid!r}")
                try:
                    os.unlink(self._queue_prefix + qid)
                except FileNotFoundError:  # held meanwhile, or gone: as remove() finds it
                    self.remove(qid)
                else:
                    if env.state_file:
                        self._remove_state(self._queue_prefix + qid)
            except OSError as e:
                out.append(e)
            else:
                out.append(None)
        return out

    def hold(self, qid: str) -> bool:
        """queue/ -> hold/; False when it was held already."""
        return self._move(qid, self.queue_dir, self.hold_dir)

    def release(self, qid: str) -> bool:
        """hold/ -> queue/; False when it was not held."""
        return self._move(qid, self.hold_dir, self.queue_dir)

    def _move(self, qid: str, src: Path, dst: Path) -> bool:
        if not is_queue_id(qid):
            raise FileNotFoundError(f"bad queue id {qid!r}")
        if not (src / qid).exists():
            if (dst / qid).exists():
                return False  # already there
            raise FileNotFoundError(f"{qid}: not in {src.name}/")
        try:
            fd: int | None = _open_regular(src / qid)
        except CorruptError:  # damage, no writer's: moved as it is, judged where it goes
            fd = None
        try:
            if fd is not None:
                st = os.fstat(fd)
                if not _ready(st.st_mode):  # a receive's, never acknowledged: not moved
                    if _live_receive(fd, st):
                        raise InCommit(f"{qid}: still being received")
                    raise FileNotFoundError(f"{qid}: a dead receive's file, not in the queue")
                _not_in_commit(fd, qid)
            # Body first, then state: a crash in between leaves an orphan state file
            # that recover() moves after its body.
            os.rename(src / qid, dst / qid)
        finally:
            if fd is not None:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.rename(src / (qid + ".state"), dst / (qid + ".state"))
        if self.fsync:
            fsync_dir(dst)
            fsync_dir(src)
        return True
    # ------------------------------------------------------------------ recovery
    def recover(self) -> dict[str, int]:
        """Clean up after a crash; never raises for a bad file. Returns counts."""
        self.ensure_dirs()
        counts = {"tmp_removed": 0, "corrupt": 0, "unsupported": 0, "orphans": 0, "ok": 0}
        # tmp/ (older layout) and unready queue/ files: a receive that died before its
        # 250 is garbage, unless a live receiving process still holds its lock.
        with os.scandir(self.tmp_dir) as it:
            dead = [e.path for e in it]
        counts["tmp_removed"] = (sum(_remove_if_dead(path) for path in dead)
                                 + self.sweep_unfinished(0.0))
        for d in (self.queue_dir, self.hold_dir):
            names = []
            with os.scandir(d) as it:
                for e in it:
                    try:  # not a regular file: checked, and so quarantined
                        if (not is_queue_id(e.name) or not _regular_or_absent(e)
                                or _ready(e.stat(follow_symlinks=False).st_mode)):
                            names.append(e.name)
                    except FileNotFoundError:
                        continue
            present = set(names)
            for name in names:
                if is_queue_id(name):
                    self._check_file(d, name, counts)
                elif name.endswith(".state.tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(d / name)
                elif name.endswith(".state"):
                    qid = name[: -len(".state")]
                    if qid in present or (d / qid).exists():
                        continue  # (committed since the listing: runs beside the scheduler)
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

    def sweep_unfinished(self, min_age: float = UNFINISHED_AGE) -> int:
        """Remove the queue/ files of receives that died (not ready, nobody's lock,
        unchanged for `min_age` seconds: a worker killed in DATA, a killed sendmail
        command), without a restart; their ids are added to `swept` (the scheduler logs
        each). Never a committed file, never one a live writer holds or is about to
        lock (`_remove_if_dead`). Returns how many went."""
        now = time.time()
        dead = []
        # hold/ too: an older release's named hold moved such files there (`_move` now
        # takes only ready ones).
        for prefix, d in ((self._queue_prefix, self.queue_dir),
                          (self._hold_prefix, self.hold_dir)):
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if not is_queue_id(e.name) or not _regular_or_absent(e):
                            continue
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not _ready(st.st_mode) and (min_age <= 0
                                                   or _unchanged_for(st, min_age, now)):
                        dead.append((prefix, e.name))
        n = 0
        for prefix, name in dead:
            if _remove_if_dead(prefix + name, min_age):
                self.swept.append(name)
                n += 1
        return n

    def _check_file(self, d: Path, qid: str, counts: dict[str, int]) -> None:
        """Start-up check: header, lengths, envelope (the checksum is checked before each
        delivery, so a big queue does not delay the start by reading every message)."""
        path = d / qid
        try:
            f, lay, _ = self._open_checked(path, qid)
            with f:
                self._envelope(f, lay, qid)
            counts["ok"] += 1
        except FileNotFoundError:
            return
        except UnsupportedVersion as e:
            log.error("%s: left in place, %s", qid, e, extra={"queue_id": qid})
            counts["unsupported"] += 1
        except (CorruptError, OSError) as e:
            counts["corrupt"] += 1
            self.quarantine(qid, str(e))
