"""One of our SQLite state files (users.db, containment.db, known_addresses.db), opened
the one way.

Owns: opening it with the directory owner's rights when root opens one in another user's
directory (a CLI command in the daemon's state_dir; a symlink there is refused), creating
the file 0600 before SQLite does (its -wal and -shm files inherit the
mode: password hashes, user names and their networks are inside), owned by its
directory's owner when root creates it (the daemon's `user` owns state_dir), WAL with
`synchronous = NORMAL` (durable enough in WAL mode: a crash loses at most the last
transactions, never the file), and bringing the schema to `version` (the format number
in `PRAGMA user_version`) in one IMMEDIATE transaction, so processes opening a new file at
the same moment create it once. The switch to WAL of a new file is retried while another
connection holds its write lock: SQLite answers that SQLITE_BUSY at once, without waiting
in its busy handler (it would deadlock if both waited), so two first opens would otherwise
fail one of them.

Contract: `open_db(path, schema, version, newer=..., busy_timeout=..., pragmas=())` -> a
connection in autocommit mode (`isolation_level=None`; callers BEGIN what they need, a
write through `immediate(conn)`),
usable from any thread (`check_same_thread=False`; callers keep one per thread or
serialise). `schema`: `;`-separated statements, run one at a time (executescript() would
COMMIT first), each idempotent (`CREATE ... IF NOT EXISTS`): a file of an older format runs
them all again. A file of a newer format raises `newer(found)`, the caller's error.
Failure policy: any error closes the connection and propagates to the caller.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from authrelay import process


def open_db(path: Path, schema: str, version: int, *,
            newer: Callable[[int], Exception], busy_timeout: float = 5.0,
            pragmas: Iterable[str] = ()) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _rights_for(path):
        return _open(path, schema, version, newer=newer, busy_timeout=busy_timeout,
                     pragmas=pragmas)


def _rights_for(path: Path) -> contextlib.AbstractContextManager[None]:
    """Root opening a file in a directory another user owns (a CLI command in the
    daemon's state_dir) opens it with that user's rights (process.as_owner_of): a link
    planted as users.db (or its -wal, -shm) must not make root create or write a file
    anywhere. A link there is refused outright; a file root made there under an earlier
    release (root-owned, the daemon could not open it either) is opened as root."""
    if os.geteuid() != 0:
        return contextlib.nullcontext()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return process.as_owner_of(path.parent)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "is a symbolic link: refusing to open it as root "
                      "(the directory's owner may have planted it)", str(path))
    if st.st_uid == 0:
        return contextlib.nullcontext()
    return process.as_owner_of(path.parent)


def _open(path: Path, schema: str, version: int, *,
          newer: Callable[[int], Exception], busy_timeout: float,
          pragmas: Iterable[str]) -> sqlite3.Connection:
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                if os.geteuid() == 0:
                    # Root (a CLI command: `user suspended`, `user resume`) making a file
                    # in a directory the daemon's user owns gives it to that user (SQLite
                    # gives its -wal and -shm the main file's owner): a root-owned 0600
                    # file there is one the dropped daemon cannot open, which turned
                    # containment off until a restart.
                    st = os.stat(path.parent)
                    os.fchown(fd, st.st_uid, st.st_gid)
            finally:
                os.close(fd)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        _to_wal(conn, busy_timeout)
        conn.execute("PRAGMA synchronous = NORMAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] != version:
            with immediate(conn):
                found = conn.execute("PRAGMA user_version").fetchone()[0]  # now locked
                if found > version:
                    raise newer(found)
                if found < version:
                    for stmt in schema.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {int(version)}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One BEGIN IMMEDIATE transaction: committed at the end, rolled back on an error.
    SQLite ends the transaction itself on some errors (SQLITE_FULL: the disk full,
    SQLITE_IOERR, SQLITE_NOMEM): then no ROLLBACK, whose own error ('cannot rollback - no
    transaction is active') would replace the cause in what the caller reports."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _to_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """`PRAGMA journal_mode = WAL`, retried for up to `busy_timeout` seconds while it meets
    SQLITE_BUSY. A file still in rollback mode (a new one) needs an exclusive lock for the
    switch; SQLite does not wait in its busy handler when another connection holds the
    RESERVED lock (https://sqlite.org/c3ref/busy_handler.html: it would deadlock), so the
    wait is done here. Once any connection has switched the file, it stays WAL and the
    pragma only reads. Any other error, or the time spent, propagates."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            busy = e.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # any extended BUSY code
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)
