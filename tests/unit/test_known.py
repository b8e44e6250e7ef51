"""The known-address store: a real SQLite file, shared and persistent, bounded in time."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from support import tmpfs

from authrelay.policy import known as known_mod
from authrelay.policy.known import KnownAddresses


async def test_remembered_across_instances(tmp_path: Path) -> None:
    db = tmp_path / "known_addresses.db"
    a = KnownAddresses(db, 30)
    assert not await a.is_known("alice", "192.0.2.0/24")
    await a.remember("alice", "192.0.2.0/24")
    assert await a.is_known("alice", "192.0.2.0/24")
    b = KnownAddresses(db, 30)  # another worker, or after a restart
    assert await b.is_known("alice", "192.0.2.0/24")
    assert not await b.is_known("alice", "198.51.100.0/24")
    assert not await b.is_known("bob", "192.0.2.0/24")
    a.close()
    b.close()
    # User names and the networks they log in from: nobody else may read them (the state
    # dir is 0711 so that every local user can reach public/submit.sock).
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))


async def test_old_entries_do_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    db = tmp_path / "k.db"
    a = KnownAddresses(db, 1)
    await a.remember("alice", "192.0.2.0/24")
    a.close()
    later = time.time() + 2 * 86400
    monkeypatch.setattr(known_mod.time, "time", lambda: later)
    b = KnownAddresses(db, 1)
    assert not await b.is_known("alice", "192.0.2.0/24")
    b.close()


async def test_zero_days_is_off(tmp_path: Path) -> None:
    a = KnownAddresses(tmp_path / "k.db", 0)
    await a.remember("alice", "192.0.2.0/24")
    assert not await a.is_known("alice", "192.0.2.0/24")
    a.close()


async def test_unwritable_store_falls_back_to_memory(tmp_path: Path) -> None:
    a = KnownAddresses(tmp_path / "missing" / "dir" / "k.db", 30)
    await a.remember("alice", "192.0.2.0/24")
    assert await a.is_known("alice", "192.0.2.0/24")
    assert not await a.is_known("alice", "198.51.100.0/24")
    a.close()


async def test_an_open_file_of_an_earlier_release_is_narrowed(tmp_path: Path) -> None:
    db = tmp_path / "known_addresses.db"
    a = KnownAddresses(db, 30)
    await a.remember("alice", "192.0.2.0/24")
    a.close()
    for f in tmp_path.iterdir():
        f.chmod(0o644)  # as releases before 0600 made it
    b = KnownAddresses(db, 30)
    assert await b.is_known("alice", "192.0.2.0/24")
    b.close()
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o077 == 0, (f, oct(f.stat().st_mode))


@pytest.mark.root
async def test_a_disk_that_has_room_again_gets_every_network_learnt_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store gave the file up for the life of the process at its first failed
    write (seen: the state dir's disk full): every network learnt afterwards stayed in
    that worker's memory, unknown to the other workers (a guesser's lockout then locked
    the user out there) and lost at the restart, however soon the disk had room. Now the
    file is tried again RETRY seconds later and what was learnt meanwhile written."""
    monkeypatch.setattr(known_mod, "RETRY", 0.0)  # every write tries the file again
    nets = [f"10.{i // 256}.{i % 256}.0/24" for i in range(400)]
    with tmpfs.mounted(tmp_path / "fs", "1m") as fs:
        db = fs / "known_addresses.db"
        a = KnownAddresses(db, 30)
        await a.remember("alice", "192.0.2.0/24")
        tmpfs.fill(fs)
        for net in nets:
            await a.remember("alice", net)
        with sqlite3.connect(db) as seen:  # (a reader: the WAL's pages are there)
            stored = seen.execute("SELECT count(*) FROM known").fetchone()[0]
        assert stored < 1 + len(nets)  # the disk refused some
        (fs / "filler").unlink()
        await a.remember("bob", "203.0.113.0/24")  # the next write finds room
        b = KnownAddresses(db, 30)  # another worker, or after a restart
        for net in [*nets, "192.0.2.0/24"]:
            assert await b.is_known("alice", net), net
        assert await b.is_known("bob", "203.0.113.0/24")
        a.close()
        b.close()
