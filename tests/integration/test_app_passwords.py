"""App passwords end to end: the CLI, a real authrelay, AUTH over TLS sockets, the maillog.

SQLite userdb (a real `serve` process) and PostgreSQL (a real cluster on loopback, the
server logging in through a read-only role, `user migrate` carrying app passwords).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from relayproc import PASSWORD, RelayProcess
from scalerig import PostgresServer
from smtpclient import RawClient, client_ctx, plain
from support.wait import until

from authrelay.auth.authenticator import AuthResult
from authrelay.auth.pgusers import PgAuthenticator, PgUserDB, PgUserStore
from authrelay.auth.userdb import UserDB

pytestmark = pytest.mark.slow  # real authrelay processes (and a PostgreSQL cluster)

SHOWN = re.compile(r"app password (\S+) for (\S+): ([a-z]{4} [a-z]{4} [a-z]{4} [a-z]{4})$")


def auth(port: int, user: str, password: str) -> str:
    with RawClient(port, tls=client_ctx()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        r = c.cmd(f"AUTH PLAIN {plain(user, password)}")
        return f"{r.code} {r.text}"


def add_app(r: RelayProcess, user: str, name: str) -> str:
    out = r.cli("user", "app-password", "add", user, "--name", name)
    m = SHOWN.match(out.stdout.strip())
    assert m, out.stdout
    return m.group(3)


def test_app_password_lifecycle_userdb(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path).start()
    try:
        port = r.ports["submissions"]
        pw = add_app(r, "alice", "phone")
        add_app(r, "alice", "laptop")
        assert auth(port, "alice", pw).startswith("235 2.7.0")
        assert auth(port, "alice", pw.replace(" ", "")).startswith("235")
        assert auth(port, "alice", PASSWORD).startswith("235")  # "allow": both work
        log = r.maillog()
        assert "auth=ok, sasl_method=PLAIN, sasl_username=alice, sasl_app=phone" in log
        assert pw.replace(" ", "") not in log and pw not in log
        listed = {a["name"]: a for a in json.loads(
            r.cli("user", "app-password", "list", "alice", "--json").stdout)}
        assert set(listed) == {"phone", "laptop"}
        r.wait_for(lambda: json.loads(r.cli("user", "app-password", "list", "alice",
                                            "--json").stdout)[1]["last_used"] is not None)
        phone = json.loads(r.cli("user", "app-password", "list", "alice", "--json").stdout)[1]
        assert phone["name"] == "phone" and phone["last_client"] == "127.0.0.1"
        assert listed["laptop"]["last_used"] is None
        text = r.cli("user", "app-password", "list", "alice").stdout
        assert "laptop\tcreated " in text and "last used never" in text
        # Revoked: the very next AUTH fails, although the cache held it a moment ago.
        r.cli("user", "app-password", "revoke", "alice", "--name", "phone")
        assert auth(port, "alice", pw).startswith("535 5.7.8")
        assert r.cli("user", "app-password", "revoke", "alice", "--name", "phone",
                     check=False).returncode == 1
    finally:
        r.stop()


def test_require_refuses_the_account_password(tmp_path: Path) -> None:
    r = RelayProcess(tmp_path, {"auth": {"app_passwords": "require"}}).start()
    try:
        port = r.ports["submissions"]
        pw = add_app(r, "alice", "phone")
        assert auth(port, "alice", PASSWORD).startswith("535 5.7.8")
        assert "sasl_username=alice, reason=app password required" in r.maillog()
        assert auth(port, "alice", pw).startswith("235")
        assert "sasl_app=phone" in r.maillog()
    finally:
        r.stop()


def test_a_device_still_on_the_account_password_locks_no_app_password_out(
        tmp_path: Path) -> None:
    """Under "require" a right account password gets 535 (reason=app password required),
    and it counted as a failed guess: a forgotten laptop retrying with it reached
    max_failures_per_ip and max_failures_per_user within ten tries, and alice's phone,
    behind the same address or in the same network, got 454 with its valid app password
    for as long as the laptop kept retrying. Right credentials refused by policy are not
    counted; wrong ones still are."""
    r = RelayProcess(tmp_path, {"auth": {"app_passwords": "require", "failure_delay": 0},
                                "limits": {"connection_rate_per_ip": 0}}).start()
    port = r.ports["submissions"]

    def login(password: str, source: str) -> str:
        with RawClient(port, tls=client_ctx(), source=source) as c:
            c.reply()
            c.cmd("EHLO client.test")
            rep = c.cmd(f"AUTH PLAIN {plain('alice', password)}")
            return f"{rep.code} {rep.text}"

    try:
        pw = add_app(r, "alice", "phone")
        assert login(pw, "127.0.1.2").startswith("235")
        assert [login(PASSWORD, "127.0.1.1")[:3] for _ in range(12)] == ["535"] * 12
        assert login(pw, "127.0.1.1").startswith("235")  # behind the laptop's NAT address
        assert login(pw, "127.0.1.3").startswith("235")  # in its network
        # A guesser is still stopped: wrong passwords count as before.
        assert {login("wrong", "127.0.2.1")[:3] for _ in range(10)} == {"535"}
        assert login(pw, "127.0.2.1").startswith("454 4.7.0")
        assert r.maillog().count("reason=app password required") == 12
    finally:
        r.stop()


def _send(c: RawClient) -> str:
    """One message on an authenticated session: the MAIL reply if refused, else the
    reply to the end of data."""
    r = c.cmd("MAIL FROM:<alice@example.org>")
    if r.code != 250:
        return f"{r.code} {r.text}"
    assert c.cmd("RCPT TO:<bob@example.net>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    r = c.reply()
    return f"{r.code} {r.text}"


def _session(port: int, user: str, password: str) -> RawClient:
    c = RawClient(port, tls=client_ctx()).__enter__()
    c.reply()
    c.cmd("EHLO client.test")
    assert c.cmd(f"AUTH PLAIN {plain(user, password)}").code == 235
    return c


def test_an_open_session_ends_when_its_credentials_are_revoked(tmp_path: Path) -> None:
    """A session logged in before a revoke or a password change sent on for up to
    session_timeout (1h): a stolen password kept working on the connection it opened.
    Now its next MAIL gets 421 4.7.0 and the connection closes; sessions whose own
    credentials still hold go on."""
    r = RelayProcess(tmp_path).start()
    clients: list[RawClient] = []
    try:
        port = r.ports["submissions"]
        phone, laptop = add_app(r, "alice", "phone"), add_app(r, "alice", "laptop")
        a, b, c = (_session(port, "alice", pw) for pw in (phone, PASSWORD, laptop))
        clients += [a, b, c]
        assert [_send(x)[:3] for x in clients] == ["250", "250", "250"]
        r.cli("user", "app-password", "revoke", "alice", "--name", "phone")
        assert _send(a).startswith("421 4.7.0 Authentication no longer valid")
        with pytest.raises(ConnectionError):
            a.cmd("NOOP")
        assert _send(b).startswith("250") and _send(c).startswith("250")
        # A new password: the account-password session ends, the app password's does not
        # (app passwords are not tied to the account password: README).
        r.cli("user", "passwd", "alice", "--password-stdin", input="new pw\n")
        assert _send(b).startswith("421 4.7.0")
        assert _send(c).startswith("250")
        lines = [ln for ln in r.maillog().splitlines()
                 if "reject=421 4.7.0 Authentication no longer valid" in ln]
        assert len(lines) == 2 and all("sasl_username=alice" in ln for ln in lines)
        assert "Traceback" not in r.log.read_text()
        r.cli("user", "del", "alice")  # (d8f4f80: a deleted user's session gets 530)
        assert _send(c).startswith("530 5.7.0")
    finally:
        for x in clients:
            x.__exit__(None, None, None)
        r.stop()


def _suspend(r: RelayProcess, user: str) -> None:
    """Containment's suspension of `user`, as the suspender stores it (containment.db)."""
    from authrelay.config import load
    from authrelay.policy.suspensions import make_state

    async def run() -> None:
        state = make_state(load(str(r.config)))
        try:
            await state.suspend(user, "test", "node")
        finally:
            await state.close()

    asyncio.run(run())


@pytest.mark.parametrize("change,reply", [
    ("del", "550 5.7.1 Message refused: the account no longer exists"),
    ("suspend", "450 4.7.1 Sending suspended for this account"),
    ("passwd", "421 4.7.0 Authentication no longer valid, closing connection"),
])
def test_a_change_to_the_user_while_its_message_arrives_refuses_it(
        tmp_path: Path, change: str, reply: str) -> None:
    """A user deleted (`authrelay user del`), suspended, or whose password changed while
    its message arrived was checked only at MAIL: that message was queued. Now the end of
    data checks again before the commit: a precise refusal, one maillog line with the
    queue id, nothing queued; a new password ends the connection, as at MAIL."""
    r = RelayProcess(tmp_path).start()
    try:
        with _session(r.ports["submissions"], "alice", PASSWORD) as c:
            assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
            assert c.cmd("RCPT TO:<bob@example.net>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(b"Subject: hi\r\n\r\n" + b"hello\r\n" * 1000)
            if change == "suspend":
                _suspend(r, "alice")
            else:
                r.cli("user", change, "alice", *(("--password-stdin",) if change == "passwd"
                                                 else ()), input="new pw\n")
            c.send(b"bye\r\n.\r\n")
            got = c.reply()
            assert f"{got.code} {got.text}".startswith(reply)
            if change == "passwd":
                with pytest.raises(ConnectionError):
                    c.cmd("NOOP")
        lines = [ln for ln in r.maillog().splitlines() if f"reject={reply[:9]}" in ln]
        assert len(lines) == 1, lines
        qid = re.search(r" ([0-9A-Z]{17}): reject=", lines[0])
        assert qid and "sasl_username=alice" in lines[0], lines
        assert f"{qid.group(1)}: from=" not in r.maillog()
        r.wait_for(lambda: not r.queued() and not r.unready(), what="nothing queued")
        assert "Traceback" not in r.log.read_text()
    finally:
        r.stop()


def test_a_rehash_by_another_worker_ends_no_session(tmp_path: Path) -> None:
    """alice's hash made with older argon2 parameters; she logs in on both workers at
    once (a phone and a laptop). Each worker re-hashes it after her login, one write wins
    (the other finds the hash changed: best effort). The loser's session got a needless
    `421 4.7.0 Authentication no longer valid` at its next MAIL: it knew only its own
    re-hash, and the stored one, the winner's, looked like a new password. Now a re-hash
    is recognised by any process (its salt comes from the old hash): both sessions go
    on; a real password change still ends them."""
    import sqlite3

    from argon2 import PasswordHasher

    r = RelayProcess(tmp_path, workers=2).start()
    clients: list[RawClient] = []
    lock = None
    try:
        r.wait_for(lambda: r.maillog().count("daemon=started") >= 3, what="started")
        db = UserDB(r.state / "users.db")
        weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
        assert db.update_hash("alice", db.get_hash("alice") or "", weak)
        port = r.ports["submissions"]

        def on_another_worker(taken: set[str]) -> RawClient:
            """A session served by a worker not in `taken` (its pid added), greeted."""
            for _ in range(200):  # SO_REUSEPORT spreads connections by their source port
                before = r.maillog().count("connect=from")
                c = RawClient(port, tls=client_ctx()).__enter__()
                c.reply()
                line = r.wait_for(lambda n=before: [
                    ln for ln in r.maillog().splitlines() if "connect=from" in ln][n:],
                    what="its connect line")[0]
                pid = line.split("authrelay[", 1)[1].split("]", 1)[0]
                if pid not in taken:
                    taken.add(pid)
                    return c
                c.__exit__(None, None, None)
            raise AssertionError("every connection landed on one worker")

        taken: set[str] = set()
        phone, laptop = on_another_worker(taken), on_another_worker(taken)
        clients += [phone, laptop]
        # Both logins verify the old hash before either re-hash is written: the test holds
        # the user DB's write lock meanwhile (the workers' writes wait for it).
        lock = sqlite3.connect(r.state / "users.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        for c in (phone, laptop):
            c.cmd("EHLO client.test")
            assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        lock.execute("COMMIT")
        lock.close()
        lock = None
        r.wait_for(lambda: db.get_hash("alice") != weak, what="the re-hash written")
        assert [_send(c)[:3] for c in clients] == ["250", "250"]
        assert "Authentication no longer valid" not in r.maillog()
        r.cli("user", "passwd", "alice", "--password-stdin", input="new pw\n")
        assert [_send(c)[:9] for c in clients] == ["421 4.7.0"] * 2
    finally:
        if lock is not None:
            lock.close()
        for x in clients:
            x.__exit__(None, None, None)
        r.stop()


# --------------------------------------------------------------------------- PostgreSQL

def _ro_dsn(pg: PostgresServer) -> str:
    """A role that may only read (docs/SCALING.md's server role without the UPDATEs)."""
    async def make() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute("CREATE ROLE authrelay_ro LOGIN PASSWORD 'ro'")
            await conn.execute("GRANT USAGE ON SCHEMA authrelay TO authrelay_ro")
            await conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA authrelay "
                               "TO authrelay_ro")
        finally:
            await conn.close()

    asyncio.run(make())
    rest = pg.dsn.split("://", 1)[1].split("@", 1)[1]
    return f"postgresql://authrelay_ro:ro@{rest}"


@pytest.mark.external
def test_postgresql_migrate_then_read_only_server(tmp_path: Path, pg: PostgresServer) -> None:
    # A local users.db with an app password, migrated: the device keeps working.
    local = UserDB(tmp_path / "old" / "users.db")
    local.add("alice", PASSWORD)
    phone = local.add_app_password("alice", "phone")
    local.close()
    (tmp_path / "admin").mkdir()
    admin = RelayProcess(tmp_path / "admin", {"auth": {"backend": "postgresql",
                                                       "dsn": pg.dsn}}, users={})
    out = admin.cli("user", "migrate", "--from", str(tmp_path / "old" / "users.db"))
    assert "1 user(s) copied" in out.stdout and "1 app password(s)" in out.stdout
    tablet = add_app(admin, "alice", "tablet")
    # The server logs in through a role that can only SELECT: AUTH works, last-used
    # writes are refused by PostgreSQL and skipped.
    (tmp_path / "srv").mkdir()
    r = RelayProcess(tmp_path / "srv", {"auth": {"backend": "postgresql",
                                                 "dsn": _ro_dsn(pg), "cache_ttl": "5m"}},
                     users={}).start()
    try:
        port = r.ports["submissions"]
        assert auth(port, "alice", phone).startswith("235")
        assert auth(port, "alice", tablet).startswith("235")
        assert auth(port, "alice", tablet).startswith("235")  # cached
        assert auth(port, "alice", PASSWORD).startswith("235")
        log = r.maillog()
        assert "sasl_app=phone" in log and "sasl_app=tablet" in log
        # Revoked through the CLI: the next AUTH through the server fails (cache bound to
        # the row's hash), with no restart.
        admin.cli("user", "app-password", "revoke", "alice", "--name", "tablet")
        assert auth(port, "alice", tablet).startswith("535 5.7.8")
        assert auth(port, "alice", phone).startswith("235")
        assert "Traceback" not in r.maillog()
    finally:
        r.stop()
    listed = json.loads(admin.cli("user", "app-password", "list", "alice", "--json").stdout)
    assert [a["name"] for a in listed] == ["phone"]
    assert listed[0]["last_used"] is None  # the read-only role could not record it


@pytest.mark.external
def test_migrate_replace_never_revives_a_revoked_app_password(tmp_path: Path,
                                                              pg: PostgresServer) -> None:
    # Migrated once; the phone is lost and revoked in the database, the tablet revoked and
    # added anew. A second `migrate --replace` from the same old users.db (still holding
    # both) must bring neither old credential back: the old code re-inserted them.
    local = UserDB(tmp_path / "old" / "users.db")
    local.add("alice", PASSWORD)
    phone = local.add_app_password("alice", "phone")
    old_tablet = local.add_app_password("alice", "tablet")
    local.close()
    admin = RelayProcess(tmp_path, {"auth": {"backend": "postgresql", "dsn": pg.dsn}},
                         users={})
    old = str(tmp_path / "old" / "users.db")
    assert "2 app password(s)" in admin.cli("user", "migrate", "--from", old).stdout
    admin.cli("user", "app-password", "revoke", "alice", "--name", "phone")
    admin.cli("user", "app-password", "revoke", "alice", "--name", "tablet")
    new_tablet = add_app(admin, "alice", "tablet")
    out = admin.cli("user", "migrate", "--from", old, "--replace")
    assert out.returncode == 0 and "1 user(s) copied" in out.stdout
    assert "alice: app password phone not copied" in out.stderr
    assert "alice: app password tablet not copied" in out.stderr
    listed = json.loads(admin.cli("user", "app-password", "list", "alice", "--json").stdout)
    assert [a["name"] for a in listed] == ["tablet"]
    r = admin.start()
    try:
        port = r.ports["submissions"]
        assert auth(port, "alice", phone).startswith("535 5.7.8")
        assert auth(port, "alice", old_tablet).startswith("535 5.7.8")
        assert auth(port, "alice", new_tablet).startswith("235")
        assert auth(port, "alice", PASSWORD).startswith("235")  # --replace: the hash
    finally:
        r.stop()


@pytest.mark.external
async def test_postgresql_authenticator_cost_and_last_used(pg: PostgresServer,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from authrelay.auth import passwords

    def setup() -> list[str]:
        db = PgUserDB(pg.dsn)  # blocking: its own loop, in a thread
        try:
            db.add("alice", "account pw")
            return [db.add_app_password("alice", f"dev{i}") for i in range(10)]
        finally:
            db.close()

    pws = await asyncio.to_thread(setup)

    def revoke(name: str) -> None:
        db = PgUserDB(pg.dsn)
        try:
            db.revoke_app_password("alice", name)
        finally:
            db.close()
    calls: list[str] = []
    real = passwords.verify_password
    monkeypatch.setattr(passwords, "verify_password",
                        lambda h, p: calls.append(h) or real(h, p))
    a = PgAuthenticator(PgUserStore(pg.dsn, pool_size=2), hash_threads=1, cache_ttl=0,
                        app_passwords="require")
    try:
        got = await a.login("alice", pws[9], "203.0.113.5")
        assert (got.result, got.app, len(calls)) == (AuthResult.OK, "dev9", 1)
        got = await a.login("alice", "account pw")
        assert (got.result, got.hint) == (AuthResult.BAD, "app password required")
        # An open session is checked again at each MAIL (PostgreSQL: one lookup each).
        dev8 = await a.login("alice", pws[8])
        assert dev8.result is AuthResult.OK and await a.still_valid("alice", dev8)
        await asyncio.to_thread(revoke, "dev8")

        async def refused() -> bool:  # a "yes" stands EXISTS_TTL (2 s), as still_exists
            return not await a.still_valid("alice", dev8)

        await until(refused, "the revoked app password's session refused")
        assert await a.still_valid("alice", await a.login("alice", pws[7]))

        async def used() -> Any:
            row = await a.store.app_password("alice", pws[9][:4])
            return row if row.last_used else None

        row = await until(used, "last_used recorded")
        assert row.last_ip == "203.0.113.5"
    finally:
        await a.store.close()
        a.close()
