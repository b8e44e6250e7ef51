"""The known-address store: a real SQLite file, shared and persistent, bounded in time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

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
