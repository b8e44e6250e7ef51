"""One of our SQLite state files (users.db, containment.db, known_addresses.db), opened
the one way.

Owns: creating the file 0600 before SQLite does (its -wal and -shm files inherit the
mode: password hashes, user names and their networks are inside), WAL with
`synchronous = NORMAL` (durable enough in WAL mode: a crash loses at most the last
transactions, never the file), and bringing the schema to `version` (the format number
in `PRAGMA user_version`) in one IMMEDIATE transaction, so processes opening a new file at
the same moment create it once.

Contract: `open_db(path, schema, version, newer=..., busy_timeout=..., pragmas=())` -> a
connection in autocommit mode (`isolation_level=None`; callers BEGIN what they need),
usable from any thread (`check_same_thread=False`; callers keep one per thread or
serialise). `schema`: `;`-separated statements, run one at a time (executescript() would
COMMIT first), each idempotent (`CREATE ... IF NOT EXISTS`): a file of an older format runs
them all again. A file of a newer format raises `newer(found)`, the caller's error.
Failure policy: any error closes the connection and propagates to the caller.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path


def open_db(path: Path, schema: str, version: int, *,
            newer: Callable[[int], Exception], busy_timeout: float = 5.0,
            pragmas: Iterable[str] = ()) -> sqlite3.Connection:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] != version:
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = conn.execute("PRAGMA user_version").fetchone()[0]  # now locked
                if found > version:
                    raise newer(found)
                if found < version:
                    for stmt in schema.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version = {int(version)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    except BaseException:
        conn.close()
        raise
    return conn
