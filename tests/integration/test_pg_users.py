"""`[auth] backend = "postgresql"`: a real PostgreSQL cluster the test starts on loopback.

Covers the CLI against the database (add/list/passwd/address/del, migrate from a local
users.db), AUTH through a real authrelay process (a change by the CLI is seen on the next
AUTH, no restart), and the failure policy: the database down is 454 4.7.0, never 535;
credentials verified a moment ago still pass; the maillog says down and back up.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from relayproc import PASSWORD, RelayProcess
from scalerig import PostgresServer
from smtpclient import RawClient, client_ctx, plain
from support.wait import until, wait_until

from authrelay.auth import passwords, pgusers
from authrelay.auth.apppasswords import AppPassword
from authrelay.auth.authenticator import AuthResult
from authrelay.auth.pgusers import (
    PgAuthenticator,
    PgUserDB,
    PgUserStore,
    redact_dsn,
)
from authrelay.auth.userdb import UserDB

pytestmark = [pytest.mark.external, pytest.mark.slow]


def pg_relay(tmp_path: Path, pg: PostgresServer, users: dict[str, str] | None = None,
             **auth: object) -> RelayProcess:
    return RelayProcess(tmp_path, {"auth": {"backend": "postgresql", "dsn": pg.dsn,
                                            "failure_delay": 0.05, **auth}}, users)


def login(port: int, user: str, password: str) -> int:
    """AUTH PLAIN on the implicit-TLS port (465 mode): the reply code."""
    with RawClient(port, tls=client_ctx()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        return c.cmd(f"AUTH PLAIN {plain(user, password)}").code


def login_reply(port: int, user: str, password: str) -> str:
    with RawClient(port, tls=client_ctx()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        r = c.cmd(f"AUTH PLAIN {plain(user, password)}")
        return f"{r.code} {r.text}"


# --------------------------------------------------------------------------- CLI

def test_cli_against_postgresql(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg, users={})
    out = r.cli("user", "add", "alice", "--password-stdin", "--address", "Alice@Example.ORG",
                input="s3cret\n")
    assert out.returncode == 0, out.stderr
    assert r.cli("user", "add", "alice", "--password-stdin", input="x\n",
                 check=False).returncode == 1
    r.cli("user", "add", "bob@example.org", "--password-stdin", input="pw\n")
    assert r.cli("user", "list").stdout.splitlines() == ["alice\talice@example.org",
                                                         "bob@example.org"]
    listed = json.loads(r.cli("user", "list", "--json").stdout)
    assert [u["name"] for u in listed] == ["alice", "bob@example.org"]
    r.cli("user", "address", "add", "alice", "a2@example.org")
    r.cli("user", "passwd", "alice", "--password-stdin", input="n3w\n")
    db = PgUserDB(pg.dsn)
    try:
        h = db.get_hash("alice")
        assert h is not None and h.startswith("$argon2id$")
        assert passwords.verify_password(h, "n3w")
        assert db.stored_addresses("alice") == {"alice@example.org", "a2@example.org"}
        assert db.addresses("bob@example.org") == {"bob@example.org"}
    finally:
        db.close()
    r.cli("user", "address", "del", "alice", "alice@example.org")
    r.cli("user", "del", "bob@example.org")
    assert r.cli("user", "list").stdout.splitlines() == ["alice\ta2@example.org"]
    gone = r.cli("user", "del", "bob@example.org", check=False)
    assert gone.returncode == 1 and "no user" in gone.stderr


def test_cli_database_down_is_a_clear_error(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg, users={})
    pg.stop()
    out = r.cli("user", "list", check=False)
    assert out.returncode == 1
    assert "user database" in out.stderr and "Traceback" not in out.stderr
    assert pg.PASSWORD not in out.stderr  # the DSN's password is never printed


def test_migrate_copies_hashes_and_addresses(tmp_path: Path, pg: PostgresServer) -> None:
    local = UserDB(tmp_path / "old" / "users.db")
    local.add("carol", "carol-pw", ["carol@example.org"])
    local.add("dave@example.org", "dave-pw")
    local.close()
    r = pg_relay(tmp_path, pg, users={})
    r.cli("user", "add", "dave@example.org", "--password-stdin", input="other\n")
    out = r.cli("user", "migrate", "--from", str(tmp_path / "old" / "users.db"))
    assert "1 user(s) copied" in out.stdout and "1 kept" in out.stdout
    assert "dave@example.org: exists" in out.stderr
    r.start()
    try:
        port = r.ports["submissions"]
        assert login(port, "carol", "carol-pw") == 235  # the hash came over verbatim
        assert login(port, "dave@example.org", "other") == 235  # kept, not replaced
    finally:
        r.stop()
    out = r.cli("user", "migrate", "--from", str(tmp_path / "old" / "users.db"), "--replace")
    assert "2 user(s) copied" in out.stdout
    db = PgUserDB(pg.dsn)
    try:
        dave = db.get_hash("dave@example.org")
        assert dave is not None and passwords.verify_password(dave, "dave-pw")
        assert db.stored_addresses("carol") == {"carol@example.org"}
    finally:
        db.close()
    bad = r.cli("user", "migrate", "--from", str(tmp_path / "missing.db"), check=False)
    assert bad.returncode == 1 and "no such user database" in bad.stderr


def test_migrate_names_a_hash_past_the_cost_bounds(tmp_path: Path, pg: PostgresServer) -> None:
    # The old code copied such a hash without a word: erin could then never log in
    # (verify_password refuses to run it), and only her first failed AUTH said why.
    costly = passwords.hash_password("pw").replace("m=19456,t=2,p=1", "m=19456,t=4294967295,p=1")
    local = UserDB(tmp_path / "old" / "users.db")
    local.add("carol", "carol-pw")
    local._insert("erin", costly, [])  # as a provisioning script or an earlier release
    local._insert_app("erin", AppPassword("phone", "abcd", costly, 0))
    local.close()
    r = pg_relay(tmp_path, pg, users={})
    out = r.cli("user", "migrate", "--from", str(tmp_path / "old" / "users.db"))
    assert "2 user(s) copied" in out.stdout
    bound = "m=19456,t=4294967295,p=1, more than m=2097152, t x m=4194304, p=16 (docs/LIMITS.md)"
    assert f"erin: copied, but its password hash costs {bound}: never run, so erin cannot " \
        "log in until `authrelay user passwd erin`" in out.stderr, out.stderr
    assert f"erin: app password phone copied, but its hash costs {bound}: never run; " \
        "revoke it and add it anew" in out.stderr, out.stderr
    assert "carol" not in out.stderr
    r.cli("user", "passwd", "erin", "--password-stdin", input="new-pw\n")  # the remedy
    db = PgUserDB(pg.dsn)
    try:
        erin = db.get_hash("erin")
        assert erin is not None and passwords.verify_password(erin, "new-pw")
    finally:
        db.close()


def test_import_sasldb_goes_into_postgresql(tmp_path: Path, pg: PostgresServer) -> None:
    # With backend = "postgresql" the old code imported the sasldb into a local users.db
    # that no server reads ("1 imported", then every login 535).
    db = tmp_path / "sasldb2"
    host = "relay.test"
    subprocess.run(["saslpasswd2", "-f", str(db), "-c", "-p", "-u", host, "carol"],
                   input="carol-pw\n", text=True, check=True, timeout=30)
    r = pg_relay(tmp_path, pg, users={})
    out = r.cli("import", "sasldb", str(db), "--realm", host)
    assert "added carol" in out.stdout and out.stdout.splitlines()[-1] == \
        "1 imported, 0 skipped, 0 failed", out.stdout
    assert not (r.state / "users.db").exists()
    r.start()
    try:
        assert login(r.ports["submissions"], "carol", "carol-pw") == 235
    finally:
        r.stop()
    again = r.cli("import", "sasldb", str(db), "--realm", host)
    assert "skipped carol: already exists (--replace to overwrite)" in again.stdout


def test_migrate_needs_the_postgresql_backend(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path, users={})
    out = r.cli("user", "migrate", check=False)
    assert out.returncode == 1 and "PostgreSQL" in out.stderr


# --------------------------------------------------------------------------- AUTH

def test_auth_sees_cli_changes_at_once(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg).start()
    try:
        port = r.ports["submissions"]
        assert login(port, "alice", PASSWORD) == 235
        assert login(port, "alice", "wrong") == 535
        assert login(port, "nobody", "wrong") == 535
        r.cli("user", "add", "erin", "--password-stdin", input="erin-pw\n")
        assert login(port, "erin", "erin-pw") == 235  # added while running
        r.cli("user", "passwd", "alice", "--password-stdin", input="changed\n")
        assert login(port, "alice", PASSWORD) == 535  # the cached success is not reused
        assert login(port, "alice", "changed") == 235
        r.cli("user", "del", "erin")
        assert login(port, "erin", "erin-pw") == 535
    finally:
        r.stop()


def test_sender_policy_own_uses_database_addresses(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg, users={}, sender_policy="own")
    r.cli("user", "add", "frank", "--password-stdin", "--address", "frank@example.org",
          input="frank-pw\n")
    r.start()
    try:
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd(f"AUTH PLAIN {plain('frank', 'frank-pw')}").code == 235
            assert c.cmd("MAIL FROM:<someone@example.org>").code == 553
            assert c.cmd("MAIL FROM:<Frank@Example.org>").code == 250
    finally:
        r.stop()


def test_database_down_is_454_never_535(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg, users={"alice": PASSWORD, "bob": "bob-pw"}).start()
    try:
        port = r.ports["submissions"]
        assert login(port, "alice", PASSWORD) == 235  # now in the verified cache
        pg.stop()
        # A DB hiccup does not fail a user who logged in a moment ago ...
        assert login(port, "alice", PASSWORD) == 235
        # ... and nobody else gets 535 for it: 454 4.7.0, try later (RFC 4954 6).
        assert login_reply(port, "bob", "bob-pw").startswith("454 4.7.0")
        assert login_reply(port, "alice", "wrong").startswith("454 4.7.0")
        assert login_reply(port, "nobody", "x").startswith("454 4.7.0")
        log = r.maillog()
        assert "user database unreachable" in log
        assert pg.PASSWORD not in log
        pg.start()
        r.wait_for(lambda: login(port, "bob", "bob-pw") == 235, timeout=15)
        assert login(port, "alice", "wrong") == 535
        assert "user database reachable again" in r.maillog()
    finally:
        r.stop()


def test_server_starts_with_the_database_down(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg)
    r.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
    pg.stop()
    r.users = {}
    r.start()
    try:
        port = r.ports["submissions"]
        assert login_reply(port, "alice", PASSWORD).startswith("454 4.7.0")
        pg.start()
        r.wait_for(lambda: login(port, "alice", PASSWORD) == 235, timeout=15)
    finally:
        r.stop()


# --------------------------------------------------------------------------- in-process

async def test_authenticator_cache_and_rehash(pg: PostgresServer) -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    store = PgUserStore(pg.dsn, pool_size=2, timeout=5.0)
    await store.ensure_schema()
    assert await store.insert("gina", weak, ["gina@example.org"])
    auth = PgAuthenticator(store, hash_threads=1, cache_ttl=60)
    try:
        assert await auth.verify("gina", "pw") is AuthResult.OK
        assert auth.addresses("gina") == {"gina@example.org"}
        assert len(auth.cache) == 1
        async def upgraded() -> str | None:  # the old-parameter hash, rehashed in the background
            h, _ = await store.lookup("gina")
            return h if h != weak else None

        h = await until(upgraded, "the hash upgraded")
        assert not passwords.needs_rehash(h)
        assert await auth.verify("gina", "pw") is AuthResult.OK  # verifies the new hash
        assert await auth.verify("gina", "nope") is AuthResult.BAD
        assert await auth.verify("", "pw") is AuthResult.BAD
    finally:
        auth.close()


async def test_a_login_ridden_through_an_outage_is_checked_once_it_is_over(
        pg: PostgresServer) -> None:
    """A login answered from the cache while PostgreSQL is down (README: accepted within
    cache_ttl) carried nothing to check again: its session sent on after the database
    came back and the password was changed. Now it is checked like any other."""
    store = PgUserStore(pg.dsn, pool_size=1, timeout=2.0)
    await store.ensure_schema()
    assert await store.insert("hal", passwords.hash_password("pw"), [])
    auth = PgAuthenticator(store, hash_threads=1, cache_ttl=300)
    try:
        assert (await auth.login("hal", "pw")).result is AuthResult.OK
        await asyncio.to_thread(pg.stop)
        ridden = await auth.login("hal", "pw")
        assert ridden.result is AuthResult.OK  # from the cache, database down
        assert await auth.still_valid("hal", ridden)  # down: the session goes on
        await asyncio.to_thread(pg.start)

        def passwd() -> None:  # as `authrelay user passwd hal` does
            db = PgUserDB(pg.dsn)
            try:
                db.set_password("hal", "new")
            finally:
                db.close()

        await asyncio.to_thread(passwd)

        async def refused() -> bool:
            return not await auth.still_valid("hal", ridden)

        await until(refused, "the ridden login refused once the password changed")
    finally:
        auth.close()


async def test_failed_logins_do_not_push_a_users_addresses_out(
        pg: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The address cache (ADDRESS_CACHE_MAX users, here 2) was refreshed by every
    lookup, a failed login's too: a flood of wrong passwords over other users' names
    pushed out the addresses of a user who had logged in, who then, logging in from the
    verified-credential cache while PostgreSQL was down, had none (sender_policy "own":
    its MAIL refused). Only a successful login makes an entry young now."""
    monkeypatch.setattr(pgusers, "ADDRESS_CACHE_MAX", 2)
    store = PgUserStore(pg.dsn, pool_size=1, timeout=2.0)
    await store.ensure_schema()
    for name in ("ivy", "u1", "u2", "u3", "jay"):
        assert await store.insert(name, passwords.hash_password(f"{name}-pw"),
                                  [f"{name}@example.org"])
    auth = PgAuthenticator(store, hash_threads=1, cache_ttl=300)
    try:
        assert (await auth.login("ivy", "ivy-pw")).result is AuthResult.OK
        for name in ("u1", "u2", "u3"):  # the flood: wrong passwords, real names
            assert (await auth.login(name, "guess")).result is AuthResult.BAD
        assert auth.addresses("ivy") == {"ivy@example.org"}
        assert auth.addresses("u1") == set()  # a failed login keeps nothing
        await asyncio.to_thread(pg.stop)
        assert (await auth.login("ivy", "ivy-pw")).result is AuthResult.OK  # the cache
        assert auth.addresses("ivy") == {"ivy@example.org"}
        await asyncio.to_thread(pg.start)

        async def jay_in() -> bool:  # (reconnects RETRY_AFTER_FAILURE after a failure)
            return (await auth.login("jay", "jay-pw")).result is AuthResult.OK

        # Successful logins do fill it, oldest out first: ivy's made it young again.
        await until(jay_in, "a login once the database is back")
        assert (await auth.login("u1", "u1-pw")).result is AuthResult.OK
        assert auth.addresses("ivy") == set()
        assert auth.addresses("jay") == {"jay@example.org"}
        assert auth.addresses("u1") == {"u1@example.org"}
    finally:
        auth.close()


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:secret@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact_dsn("postgresql://u@h/d") == "postgresql://u@h/d"
    assert redact_dsn("postgresql:///d") == "postgresql:///d"


def test_check_config_asks_the_database(tmp_path: Path, pg: PostgresServer) -> None:
    r = pg_relay(tmp_path, pg, users={})
    r.config.chmod(0o600)  # it holds the DSN's password (else check-config says so)
    out = r.cli("check-config", check=False)
    assert out.returncode == 0 and "no authrelay schema" in out.stderr
    r.cli("user", "list")  # creates the schema
    out = r.cli("check-config", check=False)
    assert out.returncode == 0 and "auth.dsn" not in out.stderr, out.stderr
    pg.stop()
    out = r.cli("check-config", check=False)
    assert out.returncode == 0 and "warning: auth.dsn" in out.stderr
    assert pg.PASSWORD not in out.stderr + out.stdout


async def test_impossible_names_are_bad_not_tempfail(pg: PostgresServer) -> None:
    store = PgUserStore(pg.dsn, pool_size=1, timeout=5.0)
    await store.ensure_schema()
    auth = PgAuthenticator(store, hash_threads=1, cache_ttl=60)
    try:
        for name in ("a\x00b", "caf\udce9", "x" * 300, "two words"):
            assert await auth.verify(name, "pw") is AuthResult.BAD
        assert auth.db_up  # not mistaken for a database failure
    finally:
        auth.close()


def test_database_restart_between_logins_is_invisible(tmp_path: Path, pg: PostgresServer
                                                      ) -> None:
    # The pooled connection died with the old server process: the next AUTH is retried on
    # a fresh connection, not answered 454.
    r = pg_relay(tmp_path, pg, users={"alice": PASSWORD, "bob": "bob-pw"}).start()
    try:
        port = r.ports["submissions"]
        assert login(port, "alice", PASSWORD) == 235
        pg.stop()
        pg.start()
        assert login(port, "bob", "bob-pw") == 235  # not cached: it asked the database
        assert "user database unreachable" not in r.maillog()
    finally:
        r.stop()


class _BusyPool:
    """What asyncpg's pool hands out after a query was cancelled while PostgreSQL went
    away: a connection whose protocol is still in the middle of the old operation. The
    exception is the driver's own class with the text seen in the scale rig."""

    class _Conn:
        async def fetchrow(self, *a: object, **k: object) -> None:
            import asyncpg

            raise asyncpg.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress")

    def acquire(self, timeout: float | None = None) -> _BusyPool:
        return self

    async def __aenter__(self) -> _BusyPool._Conn:
        return self._Conn()

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def expire_connections(self) -> None:
        return None  # stays busy: the database is really gone


class _BusyUntilExpired:
    """A pool whose connections all went through the same event (PostgreSQL stopped and
    came back, or not yet): each hands out a connection left mid-operation until they
    are expired; then the real pool's, made afresh."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.expired = False

    def acquire(self, timeout: float | None = None) -> Any:
        return self.real.acquire(timeout=timeout) if self.expired else _BusyPool()

    async def expire_connections(self) -> None:
        self.expired = True
        await self.real.expire_connections()


async def test_cached_login_survives_a_pool_in_a_bad_state(pg: PostgresServer) -> None:
    """A credential verified a moment ago answers from the cache whatever state the pool
    is in; a login that is not cached is 454 (TEMPFAIL), never 535, never OK."""
    store = PgUserStore(pg.dsn, pool_size=2, timeout=5.0)
    await store.ensure_schema()
    await store.insert("alice", passwords.hash_password(PASSWORD), [])
    await store.insert("bob", passwords.hash_password("bob-pw"), [])
    auth = PgAuthenticator(store, hash_threads=1, cache_ttl=60)
    try:
        assert await auth.verify("alice", PASSWORD) is AuthResult.OK  # now cached
        real = await store._get_pool()
        store._pool = _BusyPool()  # the state the rig's PostgreSQL stop left it in
        store._pool_loop = asyncio.get_running_loop()
        assert await auth.verify("alice", PASSWORD) is AuthResult.OK
        store._down_until = 0.0
        assert await auth.verify("bob", "bob-pw") is AuthResult.TEMPFAIL
        store._down_until = 0.0
        assert await auth.verify("alice", "wrong") is AuthResult.TEMPFAIL
        assert not auth.db_up
        await real.close()
    finally:
        auth.close()


async def test_retry_is_on_a_fresh_connection(pg: PostgresServer) -> None:
    """A connection found broken is retried once on a connection made afresh, never on
    another pooled one that went through the same event: a login that is not cached
    succeeds (the old code retried on the next busy connection: 454 and 'database
    unreachable, reason=InternalClientError' while the database was there)."""
    store = PgUserStore(pg.dsn, pool_size=2, timeout=5.0)
    await store.ensure_schema()
    await store.insert("bob", passwords.hash_password("bob-pw"), [])
    auth = PgAuthenticator(store, hash_threads=1, cache_ttl=60)
    try:
        real = await store._get_pool()
        store._pool = _BusyUntilExpired(real)
        store._pool_loop = asyncio.get_running_loop()
        assert await auth.verify("bob", "bob-pw") is AuthResult.OK  # not cached: asked
        assert store._pool.expired and auth.db_up
        await real.close()
    finally:
        auth.close()


def test_read_only_role_lists_users(tmp_path: Path, pg: PostgresServer) -> None:
    """The read-only role of docs/SCALING.md: `authrelay user list` reads the schema's
    format and lists (it used to try to create the schema and fail)."""
    (tmp_path / "owner").mkdir()
    owner = pg_relay(tmp_path / "owner", pg, users={})
    owner.cli("user", "add", "alice", "--password-stdin", input=PASSWORD + "\n")

    async def role() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute("DROP ROLE IF EXISTS authrelay_server")
            await conn.execute("CREATE ROLE authrelay_server LOGIN PASSWORD 'ro-pw'")
            await conn.execute("GRANT USAGE ON SCHEMA authrelay TO authrelay_server")
            await conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA authrelay "
                               "TO authrelay_server")
        finally:
            await conn.close()

    asyncio.run(role())
    ro_dsn = pg.dsn.replace(f"{pg.USER}:{pg.PASSWORD}@", "authrelay_server:ro-pw@")
    (tmp_path / "ro").mkdir()
    ro = RelayProcess(tmp_path / "ro", {"auth": {"backend": "postgresql", "dsn": ro_dsn}},
                      users={})
    out = ro.cli("user", "list", check=False)
    assert out.returncode == 0, out.stderr
    assert "alice" in out.stdout
    # Writing is refused by the database, one line, no traceback.
    out = ro.cli("user", "add", "bob", "--password-stdin", input="pw-pw-pw-pw\n", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr


@pytest.mark.parametrize("backend", ["userdb", "postgresql"])
def test_a_deleted_user_sends_no_more_in_an_open_session(tmp_path: Path, pg: PostgresServer,
                                                         backend: str) -> None:
    """`user del` applies at once to sessions that authenticated before it (each MAIL asks
    whether the user still exists): 530 5.7.0, not up to session_timeout of more mail."""
    users = {"alice": PASSWORD, "erin": "erin-pw"}
    r = pg_relay(tmp_path, pg, users) if backend == "postgresql" else \
        RelayProcess(tmp_path, users=users)
    r.start()
    try:
        port = r.ports["submissions"]
        erin, other = (RawClient(port, tls=client_ctx()) for _ in range(2))
        for c, (user, pw) in ((erin, ("erin", "erin-pw")), (other, ("alice", PASSWORD))):
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd(f"AUTH PLAIN {plain(user, pw)}").code == 235
        assert erin.cmd("MAIL FROM:<erin@local.test>").code == 250  # asked: exists
        assert erin.cmd("RSET").code == 250
        r.cli("user", "del", "erin")
        last: list[str] = []

        def refused() -> bool:  # the last "exists" may stand a moment (EXISTS_TTL)
            got = erin.cmd("MAIL FROM:<erin@local.test>")
            last[:] = [f"{got.code} {got.text}"]
            if got.code != 250:
                return True
            assert erin.cmd("RSET").code == 250
            return False

        wait_until(refused, what="MAIL refused in the session authenticated before",
                   interval=0.2)
        assert last[0].startswith("530 5.7.0"), last
        assert other.cmd("MAIL FROM:<alice@local.test>").code == 250  # nobody else
        for c in (erin, other):
            c.close()
        line = [ln for ln in r.maillog().splitlines() if "no longer exists" in ln][0]
        assert "sasl_username=erin" in line and "530 5.7.0" in line
    finally:
        r.stop()


def test_local_recipients_are_asked_of_the_database(tmp_path: Path, pg: PostgresServer
                                                    ) -> None:
    """Port 25 with `local_recipients_file`: a recipient the file does not name counts
    when a user in PostgreSQL owns it (an address, or a user named so; asked at RCPT, so
    a user added meanwhile counts at once), else 550 5.1.1; the database down is 451
    4.3.0 (try later), never a 550 that would make the sender give up."""
    rcpts = tmp_path / "recipients"
    rcpts.write_text("listed@local.test\n")
    r = RelayProcess(tmp_path, {"auth": {"backend": "postgresql", "dsn": pg.dsn},
                                "relay": {"local_recipients_file": str(rcpts)}}, {})
    r.cli("user", "add", "frank", "--password-stdin", "--address", "Frank.B@local.test",
          input="frank-pw\n")
    r.start()
    try:
        r.cli("user", "add", "gina@local.test", "--password-stdin", input="gina-pw\n")

        def answers() -> list[str]:
            with RawClient(r.ports["smtp"], source="127.0.0.5") as c:
                c.reply()
                c.cmd("EHLO stranger.test")
                c.cmd("MAIL FROM:<x@sender.test>")
                return [f"{x.code} {x.text[:5]}" for x in (
                    c.cmd(f"RCPT TO:<{a}>") for a in ("listed@local.test",
                                                      "frank.b@LOCAL.test",
                                                      "gina@local.test", "nobody@local.test"))]

        assert answers() == ["250 2.1.5", "250 2.1.5", "250 2.1.5", "550 5.1.1"]
        pg.stop()
        assert answers() == ["250 2.1.5", "451 4.3.0", "451 4.3.0", "451 4.3.0"]
        pg.start()
        r.wait_for(lambda: answers() == ["250 2.1.5", "250 2.1.5", "250 2.1.5", "550 5.1.1"],
                   timeout=15, what="the database asked again")
    finally:
        r.stop()
