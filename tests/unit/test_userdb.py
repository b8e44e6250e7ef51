"""User DB (SQLite and in-memory), argon2id passwords, and the userdb Authenticator."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from authrelay.auth import passwords
from authrelay.auth.authenticator import (
    AuthResult,
    BackendAuthenticator,
    UserDBAuthenticator,
    make_authenticator,
)
from authrelay.auth.backends import DovecotBackend, SaslauthdBackend
from authrelay.auth.base import CredentialCache, Standing
from authrelay.auth.userdb import (
    SCHEMA_VERSION,
    MemoryUserDB,
    NoSuchUser,
    UserDB,
    UserDBError,
    UserExists,
)
from authrelay.config import from_dict


@pytest.fixture(params=["memory", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path):
    path = tmp_path / "state" / "users.db"
    store = MemoryUserDB() if request.param == "memory" else UserDB(path)
    yield store
    store.close()


# ----------------------------------------------------------------------------- passwords

def test_password_hash_parameters_and_verify() -> None:
    h = passwords.hash_password("correct horse")
    assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert passwords.verify_password(h, "correct horse")
    assert not passwords.verify_password(h, "correct horsE")
    assert not passwords.needs_rehash(h)
    assert passwords.hash_password("x") != passwords.hash_password("x")  # salted


def test_verify_never_raises_on_garbage_hash() -> None:
    for bad in ("", "plain", "$argon2id$v=19$m=1,t=1,p=1$xx$yy", "$2b$12$abc"):
        assert passwords.verify_password(bad, "pw") is False
    for bad in ("", "plain", "$2b$12$abc"):
        assert passwords.needs_rehash(bad) is False


def test_old_parameters_need_rehash() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    assert passwords.verify_password(weak, "pw")
    assert passwords.needs_rehash(weak)


def _with_params(params: str) -> str:
    """A real hash of "pw" with its parameter field replaced (salt and tag kept)."""
    f = passwords.hash_password("pw").split("$")
    return "$".join([*f[:3], params, *f[4:]])


@pytest.mark.parametrize("params", [
    "m=19456,t=4294967295,p=1",  # days of one hashing thread
    "m=4194304,t=1,p=1",  # 4 GiB
    "m=8,t=1048576,p=1",  # passes x memory past MAX_WORK
    "m=19456,t=2,p=255",  # 255 threads
])
def test_a_stored_hash_past_the_cost_bounds_is_refused_unrun(
        params: str, caplog: pytest.LogCaptureFixture) -> None:
    assert passwords.verify_password(_with_params(params), "pw") is False
    assert f"stored password hash refused unchecked (a failed login): its cost is {params}, " \
        f"more than m=2097152, t x m=4194304, p=16" in caplog.text
    caplog.clear()
    assert passwords.verify_password("$argon2id$" + "A" * 300, "pw") is False
    assert "its cost is 310 characters, more than 256" in caplog.text


def test_a_foreign_hash_within_the_bounds_verifies() -> None:
    # RFC 9106's second option, Bitwarden's default: m=64 MiB, t=3, p=4.
    h = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4).hash("pw")
    assert passwords.verify_password(h, "pw")
    assert not passwords.verify_password(h, "pW")


async def test_a_user_whose_hash_never_ends_does_not_hold_the_hashing_pool(
        tmp_path: Path) -> None:
    # One mistyped or hostile row (t=2**32-1): anyone naming that user held a hashing
    # thread for days with each AUTH; with hash_threads = 1 every other login waited.
    db = UserDB(tmp_path / "users.db")
    db.add("alice", "pw")
    db._insert("mallory", _with_params("m=19456,t=4294967295,p=1"), [])  # add_hashed refuses
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=0)
    try:
        assert await auth.verify("mallory", "pw") is AuthResult.BAD
        assert await auth.verify("alice", "pw") is AuthResult.OK
    finally:
        auth.close()
        db.close()


def test_dummy_hash_has_server_cost_and_never_matches() -> None:
    assert passwords.dummy_hash().startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert passwords.verify_dummy("") is False
    assert passwords.verify_dummy("anything") is False


# ----------------------------------------------------------------------------- user DB

def test_add_list_get(db) -> None:
    db.add("alice", "pw1", ["Alice@Example.ORG", "a2@example.org"])
    db.add("bob@example.net", "pw2")
    assert [u.name for u in db.list()] == ["alice", "bob@example.net"]
    alice = db.list()[0]
    assert alice.addresses == ("a2@example.org", "alice@example.org")
    assert alice.created > 0 and alice.changed >= alice.created
    assert passwords.verify_password(db.get_hash("alice"), "pw1")
    assert db.get_hash("carol") is None


def test_duplicate_user(db) -> None:
    db.add("alice", "pw")
    with pytest.raises(UserExists):
        db.add("alice", "other")
    assert passwords.verify_password(db.get_hash("alice"), "pw")


def test_names_are_case_sensitive_addresses_are_not(db) -> None:
    db.add("alice", "lower")
    db.add("Alice", "upper")
    assert passwords.verify_password(db.get_hash("Alice"), "upper")
    assert not passwords.verify_password(db.get_hash("alice"), "upper")
    db.add("Bob@Example.ORG", "pw", ["BOB.Smith@Example.org"])
    assert db.addresses("Bob@Example.ORG") == {"bob@example.org", "bob.smith@example.org"}
    assert db.addresses("bob@example.org") == set()  # no such user (exact match)


def test_user_named_like_an_address_owns_it(db) -> None:
    db.add("carol@example.org", "pw")
    db.add("dave", "pw")
    assert db.addresses("carol@example.org") == {"carol@example.org"}
    assert db.addresses("dave") == set()
    assert db.addresses("nobody") == set()


def test_sqlite_addresses_in_one_read_equal_the_generic_three(tmp_path: Path) -> None:
    """UserDB.addresses answers from one join (once per authenticated session): the same
    set as UserStore.addresses' reads (the user, then its stored addresses, then the
    address its name is), for users with and without addresses, named like an address or
    not, other spellings, and after edits and a delete."""
    from authrelay.auth.userdb import UserStore

    db = UserDB(tmp_path / "users.db")
    try:
        db.add("alice", "pw", ["a@example.org", "A2@example.org"])
        db.add("carol@example.org", "pw")
        db.add("Bob@Example.ORG", "pw", ["bob.smith@example.org"])
        db.add("dave", "pw")
        names = ["alice", "Alice", "carol@example.org", "CAROL@example.org",
                 "Bob@Example.ORG", "bob@example.org", "dave", "nobody", ""]

        def check() -> None:
            for n in names:
                assert db.addresses(n) == UserStore.addresses(db, n), n

        check()
        db.set_addresses("dave", ["d@example.org"])
        db.remove_address("alice", "a@example.org")
        check()
        db.delete("alice")
        check()
        assert db.addresses("carol@example.org") == {"carol@example.org"}
    finally:
        db.close()


def test_delete(db) -> None:
    db.add("alice", "pw", ["alice@example.org"])
    db.delete("alice")
    assert db.get_hash("alice") is None
    assert db.list() == []
    with pytest.raises(NoSuchUser):
        db.delete("alice")
    db.add("alice", "again")  # addresses went with the user
    assert db.addresses("alice") == set()


def test_set_password(db) -> None:
    db.add("alice", "old")
    db.set_password("alice", "new")
    assert passwords.verify_password(db.get_hash("alice"), "new")
    assert not passwords.verify_password(db.get_hash("alice"), "old")
    with pytest.raises(NoSuchUser):
        db.set_password("nobody", "x")
    with pytest.raises(UserDBError):
        db.set_password("alice", "")


def test_address_edits(db) -> None:
    db.add("alice", "pw")
    db.add_address("alice", "A@Example.org")
    db.add_address("alice", "a@example.org")  # same address, no duplicate
    assert db.list()[0].addresses == ("a@example.org",)
    db.set_addresses("alice", ["x@example.org", "Y@example.org"])
    assert db.addresses("alice") == {"x@example.org", "y@example.org"}
    db.remove_address("alice", "X@EXAMPLE.ORG")
    assert db.addresses("alice") == {"y@example.org"}
    with pytest.raises(UserDBError):
        db.remove_address("alice", "x@example.org")
    with pytest.raises(NoSuchUser):
        db.add_address("nobody", "n@example.org")
    with pytest.raises(NoSuchUser):
        db.set_addresses("nobody", [])


@pytest.mark.parametrize("name", ["", "al ice", "al\nice", "tab\there", "\x00", "a" * 256,
                                  "ali\u202ecod.exe", "ali\u200bce", "\u2028", "al\u0085ice",
                                  "al\udc80ice", "al\ue000ice"])
def test_bad_names(db, name: str) -> None:
    """Among them names that show as another name (a right-to-left override, a zero
    width space: format characters) were accepted."""
    with pytest.raises(UserDBError):
        db.add(name, "pw")


@pytest.mark.parametrize("name", ["jörg", "josé@example.org", "用户", "alice.smith+x"])
def test_names_beyond_ascii(db, name: str) -> None:
    db.add(name, "pw")
    assert name in [u.name for u in db.list()]


@pytest.mark.parametrize("addr", ["", "alice", "@example.org", "alice@", "a b@x.org",
                                  "<a@x.org>"])
def test_bad_addresses(db, addr: str) -> None:
    with pytest.raises(UserDBError):
        db.add("alice", "pw", [addr])
    assert db.get_hash("alice") is None  # nothing half-added


def test_empty_password_refused(db) -> None:
    with pytest.raises(UserDBError):
        db.add("alice", "")


def test_add_hashed(db) -> None:
    h = passwords.hash_password("imported")
    db.add_hashed("alice", h, ["alice@example.org"])
    assert db.get_hash("alice") == h
    with pytest.raises(UserDBError):
        db.add_hashed("bob", "{PLAIN}secret")


def test_add_hashed_refuses_a_hash_past_the_cost_bounds(db) -> None:
    # The old code stored it without a word: that user could never log in (verify_password
    # refuses to run it), and nothing said why until the first failed AUTH's warning.
    with pytest.raises(UserDBError, match=r"^the password hash given for user 'bob' costs "
                       r"m=19456,t=4294967295,p=1, more than m=2097152, t x m=4194304, "
                       r"p=16 \(docs/LIMITS.md\): never run, bob could never log in; give "
                       r"a password instead \(authrelay user add\)$"):
        db.add_hashed("bob", _with_params("m=19456,t=4294967295,p=1"))
    assert db.get_hash("bob") is None


def test_generation_changes_on_every_write_only(db) -> None:
    seen = {db.generation()}

    def changed() -> bool:
        g = db.generation()
        new = g not in seen
        seen.add(g)
        return new

    db.add("alice", "pw")
    assert changed()
    db.list(), db.get_hash("alice"), db.addresses("alice")
    assert not changed()
    db.set_password("alice", "pw2")
    assert changed()
    db.add_address("alice", "a@example.org")
    assert changed()
    db.remove_address("alice", "a@example.org")
    assert changed()
    db.delete("alice")
    assert changed()
    with pytest.raises(NoSuchUser):
        db.delete("alice")
    assert not changed()  # a failed write changes nothing


def test_update_hash_is_compare_and_set(db) -> None:
    db.add("alice", "pw")
    old = db.get_hash("alice")
    new = passwords.hash_password("pw")
    assert db.update_hash("alice", "not-the-old-one", new) is False
    assert db.get_hash("alice") == old
    assert db.update_hash("alice", old, new) is True
    assert db.get_hash("alice") == new
    assert db.update_hash("nobody", old, new) is False


# ----------------------------------------------------------------------------- SQLite only

def test_sqlite_file_format_and_modes(tmp_path: Path) -> None:
    path = tmp_path / "new" / "users.db"
    UserDB(path).add("alice", "pw")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT name FROM users").fetchall() == [("alice",)]
    con.close()


def test_sqlite_newer_format_refused(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    UserDB(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(UserDBError, match="newer"):
        UserDB(path)


def test_sqlite_second_instance_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    server, cli = UserDB(path), UserDB(path)
    g0 = server.generation()
    cli.add("alice", "pw", ["alice@example.org"])
    g1 = server.generation()
    assert g1 != g0
    assert server.addresses("alice") == {"alice@example.org"}
    cli.delete("alice")
    assert server.generation() not in (g0, g1)
    assert server.get_hash("alice") is None


def test_sqlite_live_restore_is_seen(tmp_path: Path) -> None:
    # The documented way to restore a backup while servers run: SQLite's backup API.
    path = tmp_path / "users.db"
    server = UserDB(path)
    backup = UserDB(tmp_path / "backup.db")
    backup.add("restored", "pw")
    backup.close()
    g0 = server.generation()
    src, dst = sqlite3.connect(tmp_path / "backup.db"), sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    assert server.generation() != g0
    assert server.get_hash("restored") is not None


def test_sqlite_shared_between_threads(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "users.db")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            db.add_hashed(f"user{i}", passwords.dummy_hash(), [f"u{i}@example.org"])
            assert db.addresses(f"user{i}") == {f"u{i}@example.org"}
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(db.list()) == 8


# ----------------------------------------------------------------------------- Authenticator

class CountingDB(MemoryUserDB):
    """A MemoryUserDB that records which threads looked up hashes."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups: list[str] = []
        self.generations = 0
        self.gate: threading.Event | None = None
        self.fail = False

    def generation(self) -> int:
        self.generations += 1
        return super().generation()

    def get_hash(self, name: str) -> str | None:
        self.lookups.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            raise sqlite3.OperationalError("disk I/O error")
        return super().get_hash(name)


@pytest.fixture
def cdb() -> CountingDB:
    return CountingDB()


async def test_verify_ok_bad_unknown(cdb: CountingDB) -> None:
    cdb.add("alice", "s3cret")
    auth = UserDBAuthenticator(cdb, hash_threads=2, cache_ttl=60)
    try:
        assert await auth.verify("alice", "s3cret") is AuthResult.OK
        assert await auth.verify("alice", "wrong") is AuthResult.BAD
        assert await auth.verify("Alice", "s3cret") is AuthResult.BAD
        assert await auth.verify("nobody", "s3cret") is AuthResult.BAD
        assert await auth.verify("alice", "") is AuthResult.BAD
        assert await auth.verify("", "x") is AuthResult.BAD
    finally:
        auth.close()


async def test_hashing_runs_in_the_pool_not_on_the_loop(cdb: CountingDB) -> None:
    cdb.add("alice", "pw")
    auth = UserDBAuthenticator(cdb, hash_threads=1, cache_ttl=0)
    try:
        await auth.verify("alice", "pw")
        await auth.verify("nobody", "pw")
    finally:
        auth.close()
    assert len(cdb.lookups) == 2
    assert all(name.startswith("authrelay-hash") for name in cdb.lookups)


async def test_cache_hit_skips_the_hash(cdb: CountingDB) -> None:
    cdb.add("alice", "pw")
    auth = UserDBAuthenticator(cdb, cache_ttl=60)
    try:
        assert await auth.verify("alice", "pw") is AuthResult.OK
        assert await auth.verify("alice", "pw") is AuthResult.OK
        assert len(cdb.lookups) == 1
        # Failures are never cached: each guess pays a full hash.
        assert await auth.verify("alice", "guess") is AuthResult.BAD
        assert await auth.verify("alice", "guess") is AuthResult.BAD
        assert len(cdb.lookups) == 3
    finally:
        auth.close()


async def test_cache_disabled_with_zero_ttl(cdb: CountingDB) -> None:
    cdb.add("alice", "pw")
    auth = UserDBAuthenticator(cdb, cache_ttl=0)
    try:
        await auth.verify("alice", "pw")
        await auth.verify("alice", "pw")
        assert len(cdb.lookups) == 2
    finally:
        auth.close()


async def test_cache_never_holds_the_password(cdb: CountingDB) -> None:
    cdb.add("alice", "Sup3rSecretPw")
    auth = UserDBAuthenticator(cdb, cache_ttl=60)
    try:
        await auth.verify("alice", "Sup3rSecretPw")
        entries = auth.cache._entries
        assert len(entries) == 1
        key, value = next(iter(entries.items()))
        assert len(key) == 32  # HMAC-SHA256 digest
        assert b"Sup3rSecretPw" not in key
        assert "Sup3rSecretPw" not in repr(value)
    finally:
        auth.close()


async def test_password_change_takes_effect_at_once(cdb: CountingDB) -> None:
    cdb.add("alice", "old")
    auth = UserDBAuthenticator(cdb, cache_ttl=3600)
    try:
        assert await auth.verify("alice", "old") is AuthResult.OK
        cdb.set_password("alice", "new")
        assert await auth.verify("alice", "old") is AuthResult.BAD
        assert await auth.verify("alice", "new") is AuthResult.OK
    finally:
        auth.close()


async def test_delete_takes_effect_at_once(cdb: CountingDB) -> None:
    cdb.add("alice", "pw")
    auth = UserDBAuthenticator(cdb, cache_ttl=3600)
    try:
        assert await auth.verify("alice", "pw") is AuthResult.OK
        cdb.delete("alice")
        assert await auth.verify("alice", "pw") is AuthResult.BAD
    finally:
        auth.close()


async def test_standing_at_mail_is_one_generation_read_while_nothing_changed(
        cdb: CountingDB) -> None:
    """An authenticated session's MAIL asks whether its login still stands: while the
    store has not changed since the login, that is one generation read and no lookup; a
    deletion is GONE, a password change REVOKED (each seen at the next MAIL)."""
    cdb.add("alice", "pw")
    cdb.add("bob", "pw")
    auth = UserDBAuthenticator(cdb, cache_ttl=3600)
    try:
        alice = await auth.login("alice", "pw")
        bob = await auth.login("bob", "pw")
        reads, lookups = cdb.generations, len(cdb.lookups)
        for _ in range(3):
            assert await auth.standing("alice", alice) is Standing.OK
        assert (cdb.generations - reads, len(cdb.lookups) - lookups) == (3, 0)
        cdb.set_password("alice", "new")
        assert await auth.standing("alice", alice) is Standing.REVOKED
        assert await auth.standing("bob", bob) is Standing.OK  # another user's change
        cdb.delete("bob")
        assert await auth.standing("bob", bob) is Standing.GONE
        assert await auth.standing("bob", None) is Standing.GONE
    finally:
        auth.close()


async def test_sqlite_change_by_another_process_invalidates(tmp_path: Path) -> None:
    path = tmp_path / "users.db"
    cli = UserDB(path)
    cli.add("alice", "old")
    auth = UserDBAuthenticator(UserDB(path), cache_ttl=3600)
    try:
        assert await auth.verify("alice", "old") is AuthResult.OK
        cli.set_password("alice", "new")  # as `authrelay user passwd` would
        assert await auth.verify("alice", "old") is AuthResult.BAD
        assert await auth.verify("alice", "new") is AuthResult.OK
        cli.delete("alice")
        assert await auth.verify("alice", "new") is AuthResult.BAD
    finally:
        auth.close()
        cli.close()


def test_cache_entry_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    import authrelay.auth.base as mod

    now = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    cache = CredentialCache(ttl=10)
    k = cache.key("alice", "pw")
    cache.put(k, 1)
    assert cache.hit(k, 1)
    assert not cache.hit(k, 2)  # other generation
    cache.put(k, 1)
    now[0] += 11
    assert not cache.hit(k, 1)
    assert len(cache) == 0


def test_cache_keys_do_not_collide_and_are_bounded() -> None:
    cache = CredentialCache(ttl=10, max_entries=3)
    assert cache.key("ab", "c") != cache.key("a", "bc")
    assert cache.key("a", "b") != CredentialCache(ttl=10).key("a", "b")  # per-process key
    for i in range(10):
        cache.put(cache.key(f"u{i}", "p"), 1)
    assert len(cache) <= 3


def test_cache_key_is_the_name_as_sent() -> None:
    # One encoding for every store: a name with bytes that are not UTF-8 (surrogate
    # escapes from the SASL decoder) neither raises nor shares a key with another name.
    cache = CredentialCache(ttl=10)
    latin1 = b"j\xf6rg".decode("utf-8", "surrogateescape")
    assert cache.key(latin1, "p") != cache.key("j\u00f6rg", "p")
    assert len(cache.key(latin1, "p")) == 32


async def test_unstorable_name_is_a_wrong_login(cdb: CountingDB) -> None:
    # The user DB cannot hold such a name: BAD after a dummy hash, never a store error.
    cdb.add("alice", "pw")
    auth = UserDBAuthenticator(cdb, cache_ttl=60)
    try:
        bad = b"al\xffice".decode("utf-8", "surrogateescape")
        assert await auth.verify(bad, "pw") is AuthResult.BAD
        assert await auth.verify("al\x00ice", "pw") is AuthResult.BAD
        assert cdb.lookups == []  # the store was not asked
    finally:
        auth.close()


async def test_rehash_on_login(cdb: CountingDB) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    cdb.add_hashed("alice", weak)
    auth = UserDBAuthenticator(cdb, cache_ttl=0)
    try:
        assert await auth.verify("alice", "pw") is AuthResult.OK
        await auth.settled()  # the re-hash runs after the reply
        new = cdb.get_hash("alice")
        assert new != weak and not passwords.needs_rehash(new)
        assert await auth.verify("alice", "pw") is AuthResult.OK
    finally:
        auth.close()


async def test_an_open_session_holds_while_its_credentials_do(cdb: CountingDB) -> None:
    """still_valid (asked at each MAIL): a quiet re-hash of the password the session used
    keeps it; a password change or "require" (SIGHUP) ends it; a store that cannot be
    read does not."""
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    cdb.add_hashed("alice", weak)
    auth = UserDBAuthenticator(cdb, cache_ttl=60)
    try:
        login = await auth.login("alice", "pw")
        await auth.settled()  # re-hashed with our parameters in the background
        assert cdb.get_hash("alice") != weak
        assert await auth.still_valid("alice", login)
        cached = await auth.login("alice", "pw")  # from the cache: the same proof
        assert await auth.still_valid("alice", cached)
        cdb.add("bob", "x")  # another change: one lookup, then its "yes" stands
        cdb.lookups.clear()
        assert await auth.still_valid("alice", cached)
        assert await auth.still_valid("alice", cached) and len(cdb.lookups) == 1
        cdb.add("carol", "x")
        cdb.fail = True  # unreadable: the session goes on
        assert await auth.still_valid("alice", cached)
        cdb.fail = False
        auth.app_mode = "require"
        assert not await auth.still_valid("alice", cached)
        auth.app_mode = "allow"
        cdb.set_password("alice", "new")
        assert not await auth.still_valid("alice", cached)
        login = await auth.login("alice", "new")
        assert await auth.still_valid("alice", login)
        cdb.delete("alice")  # still_exists's to refuse (530), not this
        assert not await auth.still_exists("alice")
    finally:
        auth.close()


async def test_unreadable_db_is_tempfail(cdb: CountingDB) -> None:
    cdb.add("alice", "pw")
    cdb.fail = True
    auth = UserDBAuthenticator(cdb)
    try:
        assert await auth.verify("alice", "pw") is AuthResult.TEMPFAIL
    finally:
        auth.close()


@pytest.mark.slow
async def test_backlog_is_bounded(cdb: CountingDB) -> None:
    cdb.add("alice", "pw")
    cdb.gate = threading.Event()
    auth = UserDBAuthenticator(cdb, hash_threads=1, cache_ttl=0)
    limit = auth.hashing.backlog
    try:
        tasks = [asyncio.ensure_future(auth.verify("alice", "pw")) for _ in range(limit)]
        await asyncio.sleep(0)
        assert auth.hashing.pending == limit
        assert await auth.verify("alice", "pw") is AuthResult.TEMPFAIL
        cdb.gate.set()
        results = await asyncio.gather(*tasks)
        assert set(results) == {AuthResult.OK}
        assert auth.hashing.pending == 0
        assert await auth.verify("alice", "pw") is AuthResult.OK
    finally:
        cdb.gate.set()
        auth.close()


def test_addresses_via_authenticator(cdb: CountingDB) -> None:
    cdb.add("alice", "pw", ["alice@example.org"])
    auth = UserDBAuthenticator(cdb)
    try:
        assert auth.addresses("alice") == {"alice@example.org"}
        assert auth.addresses("nobody") == set()
    finally:
        auth.close()


def test_make_authenticator_by_backend(tmp_path: Path) -> None:
    cfg = from_dict({"state_dir": str(tmp_path), "auth": {"hash_threads": 3}})
    a = make_authenticator(cfg)
    try:
        assert isinstance(a, UserDBAuthenticator) and a.hash_threads == 3
        assert (tmp_path / "users.db").exists()
    finally:
        a.close()
    a = make_authenticator(from_dict({"auth": {"backend": "saslauthd:/run/x/mux",
                                               "backend_timeout": "2s"}}))
    assert isinstance(a, BackendAuthenticator)
    assert isinstance(a.backend, SaslauthdBackend)
    assert (a.backend.path, a.backend.timeout) == ("/run/x/mux", 2.0)
    assert a.addresses("Bob@Example.org") == {"bob@example.org"}
    assert a.addresses("bob") == set()
    a = make_authenticator(from_dict({"auth": {"backend": "dovecot:/run/dovecot/auth"}}))
    assert isinstance(a, BackendAuthenticator) and isinstance(a.backend, DovecotBackend)


def test_a_rehash_is_recognised_without_the_password() -> None:
    """passwords.rehash_password salts from the old hash: is_rehash_of tells a re-hash
    (any process's) from a new password, which has a random salt."""
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    new = passwords.rehash_password("pw", weak)
    assert passwords.verify_password(new, "pw") and not passwords.needs_rehash(new)
    assert passwords.is_rehash_of(new, weak)
    assert not passwords.is_rehash_of(passwords.hash_password("pw"), weak)
    assert not passwords.is_rehash_of(passwords.rehash_password("other", weak + "x"), weak)
    assert not passwords.is_rehash_of("$argon2id$v=19$m=1,t=1,p=1$!!$x", weak)
    assert not passwords.is_rehash_of("plain", weak)
