"""App passwords (auth/apppasswords.py): format, stores, the login decision and its cost."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from support.wait import until

from authrelay.auth import apppasswords, passwords
from authrelay.auth.apppasswords import AppPasswordError
from authrelay.auth.authenticator import AuthResult, UserDBAuthenticator
from authrelay.auth.userdb import SCHEMA_VERSION, MemoryUserDB, NoSuchUser, UserDB
from authrelay.config import from_dict


@pytest.fixture(params=["memory", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path):
    store = MemoryUserDB() if request.param == "memory" else UserDB(tmp_path / "users.db")
    yield store
    store.close()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every argon2 verification (real ones and dummies), by the hash it ran against."""
    calls: list[str] = []
    real = passwords.verify_password

    def counting(stored: str, password: str | bytes) -> bool:
        calls.append(stored)
        return real(stored, password)

    monkeypatch.setattr(passwords, "verify_password", counting)
    return calls


def test_format_entropy_and_parse() -> None:
    sel, pw = apppasswords.generate()
    assert len(pw) == 16 and pw.isalpha() and pw.islower() and pw[:4] == sel
    assert 16 * math.log2(26) > 75  # bits
    shown = apppasswords.display(pw)
    assert shown.count(" ") == 3 and shown.replace(" ", "") == pw
    # Typed with spaces, hyphens or capitals: the same password.
    for typed in (shown, shown.replace(" ", "-"), pw.upper()):
        assert apppasswords.parse(typed) == pw
    for other in ("correct horse battery", "abcdefghijklmno", "abcdefghijklmnopq",
                  "abcd efgh ijkl mnö1", "x" * 500, b"\xff" * 16):
        assert apppasswords.parse(other) is None
    with pytest.raises(AppPasswordError):
        apppasswords.generate({f"s{i}" for i in range(apppasswords.MAX_PER_USER)})


def test_names_checked() -> None:
    assert apppasswords.check_name("phone") == "phone"
    for bad in ("", " phone", "a b", "x" * 65, "-x", "ph\none"):
        with pytest.raises(AppPasswordError):
            apppasswords.check_name(bad)


def test_store_add_list_revoke(db) -> None:
    db.add("alice", "account pw")
    pw = db.add_app_password("alice", "phone")
    db.add_app_password("alice", "laptop")
    apps = db.app_passwords("alice")
    assert [a.name for a in apps] == ["laptop", "phone"]
    phone = next(a for a in apps if a.name == "phone")
    assert phone.selector == pw[:4] and phone.last_used == 0 and phone.created > 0
    assert pw not in phone.hash and passwords.verify_password(phone.hash, pw)
    assert db.app_password("alice", pw[:4]) == phone
    with pytest.raises(AppPasswordError):
        db.add_app_password("alice", "phone")  # names are unique per user
    with pytest.raises(NoSuchUser):
        db.add_app_password("nobody", "phone")
    gen = db.generation()
    db.touch_app_password("alice", "phone", 1234, "192.0.2.7")
    assert db.generation() == gen  # a login's bookkeeping flushes no cache
    got = db.app_password("alice", pw[:4])
    assert (got.last_used, got.last_ip) == (1234, "192.0.2.7")
    db.revoke_app_password("alice", "phone")
    assert db.generation() != gen  # revocation does: the next AUTH sees it
    assert db.app_password("alice", pw[:4]) is None
    with pytest.raises(AppPasswordError):
        db.revoke_app_password("alice", "phone")
    db.delete("alice")
    assert db.app_passwords("alice") == []


def test_sqlite_v1_file_is_migrated(tmp_path: Path) -> None:
    """A users.db written by the previous version (format 1) gains the table and keeps
    its users; its passwords still verify."""
    path = tmp_path / "users.db"
    h = passwords.hash_password("old pw")
    conn = sqlite3.connect(path)
    conn.executescript(f"""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('generation', 7);
        CREATE TABLE users (name TEXT PRIMARY KEY, hash TEXT NOT NULL,
                            created INTEGER NOT NULL, changed INTEGER NOT NULL);
        CREATE TABLE addresses (user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
                                address TEXT NOT NULL, PRIMARY KEY (user, address));
        CREATE INDEX addresses_by_address ON addresses (address);
        INSERT INTO users VALUES ('alice', '{h}', 1, 1);
        INSERT INTO addresses VALUES ('alice', 'alice@example.org');
        PRAGMA user_version = 1;
    """)
    conn.close()
    db = UserDB(path)
    try:
        assert db.get_hash("alice") == h
        assert db.stored_addresses("alice") == {"alice@example.org"}
        assert db.generation() == 7
        pw = db.add_app_password("alice", "phone")
        assert db.app_password("alice", pw[:4]) is not None
    finally:
        db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


async def test_login_names_the_app_and_costs_one_hash(counted: list[str]) -> None:
    db = MemoryUserDB()
    db.add("alice", "account pw")
    pws = {f"dev{i}": db.add_app_password("alice", f"dev{i}") for i in range(10)}
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=0)
    try:
        counted.clear()
        got = await auth.login("alice", apppasswords.display(pws["dev7"]), "192.0.2.1")
        assert (got.result, got.app) == (AuthResult.OK, "dev7")
        assert len(counted) == 1  # not 10: the selector picked the row
        counted.clear()
        got = await auth.login("alice", "account pw")
        assert (got.result, got.app) == (AuthResult.OK, "")
        assert len(counted) == 1
        # A wrong app-shaped password whose selector exists: two hashes at most.
        counted.clear()
        wrong = pws["dev3"][:4] + "a" * 12
        if wrong != pws["dev3"]:
            assert (await auth.login("alice", wrong)).result is AuthResult.BAD
            assert len(counted) == 2
        # ... whose selector does not: one (the account password).
        counted.clear()
        taken = {p[:4] for p in pws.values()}
        free = next(s for s in ("qqqq", "zzzz", "xxxx", "wwww") if s not in taken)
        assert (await auth.login("alice", free + "b" * 12)).result is AuthResult.BAD
        assert len(counted) == 1
        # Another user's app password is not alice's.
        db.add("bob", "bob pw")
        bobs = db.add_app_password("bob", "phone")
        assert (await auth.login("alice", bobs)).result is AuthResult.BAD
    finally:
        auth.close()


async def test_require_mode() -> None:
    db = MemoryUserDB()
    db.add("alice", "account pw")
    pw = db.add_app_password("alice", "phone")
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=60, app_passwords="require")
    try:
        got = await auth.login("alice", "account pw")
        assert (got.result, got.hint) == (AuthResult.BAD, "app password required")
        got = await auth.login("alice", "wrong pw")
        assert (got.result, got.hint) == (AuthResult.BAD, "")  # no hint for a wrong guess
        assert (await auth.login("alice", pw)).app == "phone"
        # allow -> require on reload: a cached account-password login no longer passes.
        auth.reload(from_dict({"auth": {"app_passwords": "allow"}}))
        assert (await auth.login("alice", "account pw")).result is AuthResult.OK
        auth.reload(from_dict({"auth": {"app_passwords": "require"}}))
        assert (await auth.login("alice", "account pw")).result is AuthResult.BAD
    finally:
        auth.close()


async def test_revoke_beats_the_cache(counted: list[str]) -> None:
    db = MemoryUserDB()
    db.add("alice", "account pw")
    pw = db.add_app_password("alice", "phone")
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=300)
    try:
        assert (await auth.login("alice", pw)).app == "phone"
        counted.clear()
        assert (await auth.login("alice", pw)).app == "phone"  # from the cache
        assert counted == []
        db.revoke_app_password("alice", "phone")
        assert (await auth.login("alice", pw)).result is AuthResult.BAD
    finally:
        auth.close()


async def test_last_used_is_recorded_off_the_auth_path(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "users.db")
    db.add("alice", "account pw")
    pw = db.add_app_password("alice", "phone")
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=60)
    try:
        assert (await auth.login("alice", pw, "198.51.100.9")).app == "phone"
        await until(lambda: db.app_password("alice", pw[:4]).last_used, "last used written")
        assert db.app_password("alice", pw[:4]).last_ip == "198.51.100.9"
    finally:
        auth.close()


async def test_last_used_failure_does_not_fail_auth() -> None:
    class ReadOnly(MemoryUserDB):
        def touch_app_password(self, name: str, app: str, when: int, ip: str) -> None:
            raise sqlite3.OperationalError("attempt to write a readonly database")

    db = ReadOnly()
    db.add("alice", "account pw")
    pw = db.add_app_password("alice", "phone")
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=0)
    try:
        for _ in range(3):
            assert (await auth.login("alice", pw, "192.0.2.1")).result is AuthResult.OK
    finally:
        auth.close()


def test_touch_schedule_bounds_writes() -> None:
    t = apppasswords.TouchSchedule(interval=60, max_entries=2)
    assert t.due("a", "p", now=0) and not t.due("a", "p", now=59) and t.due("a", "p", now=61)
    t.due("b", "p", now=0)
    t.due("c", "p", now=0)
    assert len(t._last) == 2
