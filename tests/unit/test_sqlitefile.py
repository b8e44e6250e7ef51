"""sqlitefile.open_db, the one way our SQLite state files are opened (users.db,
containment.db, known_addresses.db): 0600 from the start, WAL, the schema brought to its
format version, a newer format refused with the caller's error."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from support import tmpfs

from authrelay.auth.userdb import UserDB, UserDBError
from authrelay.policy.suspensions import LocalStore
from authrelay.sqlitefile import open_db

V1 = "CREATE TABLE IF NOT EXISTS a (x TEXT);"
V2 = V1 + "\nCREATE TABLE IF NOT EXISTS b (y TEXT)"


class Newer(Exception):
    pass


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_new_file_0600_wal_schema_and_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.db"
    db = open_db(path, V1, 1, newer=Newer)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert _tables(db) == {"a"}
        db.execute("INSERT INTO a VALUES ('kept')")
    finally:
        db.close()
    db = open_db(path, V2, 2, newer=Newer)  # an older file: brought to 2, data kept
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert _tables(db) == {"a", "b"}
        assert db.execute("SELECT x FROM a").fetchall() == [("kept",)]
    finally:
        db.close()
    with pytest.raises(Newer):
        open_db(path, V1, 1, newer=lambda v: Newer(v))


def test_concurrent_first_opens_create_it_once(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    errors: list[BaseException] = []
    conns: list[sqlite3.Connection] = []

    def one() -> None:
        try:
            conns.append(open_db(path, V2, 2, newer=Newer))
        except BaseException as e:  # collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(conns) == 8
        assert all(c.execute("PRAGMA user_version").fetchone()[0] == 2 for c in conns)
    finally:
        for c in conns:
            c.close()


def _new_file_write_locked(path: Path) -> sqlite3.Connection:
    """A new, empty file (rollback mode) whose RESERVED lock another connection holds: the
    moment a second first-opener meets when the first is switching it to WAL."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_the_switch_to_wal_waits_for_a_held_write_lock(tmp_path: Path) -> None:
    # SQLite answers this SQLITE_BUSY at once, without its busy handler: open_db waits
    path = tmp_path / "x.db"
    holder = _new_file_write_locked(path)
    got: list[sqlite3.Connection | BaseException] = []

    def opener() -> None:
        try:
            got.append(open_db(path, V2, 2, newer=Newer, busy_timeout=30.0))
        except BaseException as e:  # collected for the assertion
            got.append(e)

    t = threading.Thread(target=opener)
    t.start()
    t.join(0.3)
    waiting = t.is_alive()
    holder.execute("COMMIT")
    holder.close()
    t.join()
    assert waiting and len(got) == 1 and isinstance(got[0], sqlite3.Connection), got
    db = got[0]
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        db.close()


def test_the_wait_for_the_write_lock_ends_at_busy_timeout(tmp_path: Path) -> None:
    # past busy_timeout the caller gets SQLite's error; a wait without end fails here
    # (the thread still running after 60 s) rather than hanging the suite
    path = tmp_path / "x.db"
    holder = _new_file_write_locked(path)
    got: list[BaseException | sqlite3.Connection] = []

    def opener() -> None:
        try:
            got.append(open_db(path, V2, 2, newer=Newer, busy_timeout=0.2))
        except BaseException as e:  # collected for the assertion
            got.append(e)

    t = threading.Thread(target=opener, daemon=True)
    t.start()
    t.join(60)
    ended = not t.is_alive()
    holder.close()
    assert ended, "open_db still waiting for the write lock long past busy_timeout"
    assert len(got) == 1 and isinstance(got[0], sqlite3.OperationalError), got
    assert "locked" in str(got[0])


def test_the_stores_refuse_a_newer_format(tmp_path: Path) -> None:
    for name in ("users.db", "containment.db"):
        db = sqlite3.connect(tmp_path / name)
        db.execute("PRAGMA user_version = 99")
        db.close()
    with pytest.raises(UserDBError, match="user DB format 99 is newer"):
        UserDB(tmp_path / "users.db")
    store = LocalStore(tmp_path / "containment.db")
    with pytest.raises(sqlite3.DatabaseError, match="format 99 is newer"):
        store.suspensions()
    store.close()


@pytest.mark.root
def test_a_write_on_a_full_disk_names_the_full_disk(tmp_path: Path) -> None:
    """SQLite rolls a transaction back itself when the disk is full (SQLITE_FULL), and
    the stores' ROLLBACK then failed with 'cannot rollback - no transaction is active',
    the error the caller logged (seen: a real serve's spool disk full, the master's
    'containment: cannot count: OperationalError: cannot rollback ...'). Now the cause
    is what is raised, and the file takes writes again once there is room."""
    with tmpfs.mounted(tmp_path / "fs", "1m") as fs:
        store = LocalStore(fs / "containment.db")
        users = UserDB(fs / "users.db")
        store.record("alice", [("messages", "Q0")], 3600)
        users.add("alice", "correct horse battery")
        tmpfs.fill(fs)
        long = "x" * 200
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for i in range(2000):  # the WAL's free pages taken first
                store.record("alice", [("recipients", f"r{i}{long}@example.org")], 3600)
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for i in range(2000):
                users.add(f"u{i}{long}", "correct horse battery")
        (fs / "filler").unlink()
        assert store.record("alice", [("messages", "Q1")], 3600).messages == 2
        users.add("bob", "correct horse battery")
        store.close()
        users.close()
