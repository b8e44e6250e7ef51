"""The PostgreSQL user backend: users shared by every node of a relay farm.

Owns: the `authrelay` schema in the database named by `[auth] dsn` (format number in
`authrelay.meta`), an asyncpg connection pool per process, `PgLoginStore` (the database
as a LoginStore) and `PgAuthenticator`, the login flow of auth/login.py over it, which
`[auth] backend = "postgresql"` selects.

Contract:
- The same data model as the local SQLite user DB (auth/userdb.py): user names match
  exactly (case-sensitive, "C" collation), addresses lower-cased, argon2id PHC strings made
  by auth/passwords.py, so `authrelay user migrate` copies hashes verbatim and users keep
  their passwords.
- The servers only read (SELECT; an UPDATE of the hash when it was made with old argon2
  parameters, best effort). The schema is created by the CLI (`authrelay user ...`) or by a
  DBA from docs/SCALING.md; a server role may be granted SELECT (+ UPDATE on users) only.
- A change made through any node or the CLI is seen by every node on the next AUTH: each
  AUTH reads the user's row (one indexed query returning the hash and the addresses).

Failure policy (RFC 4954 6): a database that is down, slow (`[auth] backend_timeout`) or
refusing us is a temporary failure: `454 4.7.0`, never `535` (which would count against the
user and make a mail client ask for a new password). A connection that died under us (the
server restarted) is retried once on a fresh connection. Credentials that verified within
`[auth] cache_ttl` are accepted from memory while the database is unreachable, so a DB
hiccup or fail-over does not fail every AUTH; they are keyed by HMAC under a per-process
key (the password is never stored) and bound to the hash they verified against, so a
password change or a deleted user takes effect on the next AUTH that reaches the database.
Failures are never cached. The maillog says when the database becomes unreachable and when
it is back.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from authrelay import maillog as maillog_mod
from authrelay.auth.apppasswords import AppPassword, AppPasswordError
from authrelay.auth.base import HashPool
from authrelay.auth.login import Found, StoreAuthenticator, StoreUnavailable
from authrelay.auth.userdb import (
    NoSuchUser,
    UserDBError,
    UserExists,
    UserInfo,
    UserStore,
    implicit_address,
)
from authrelay.policy.containment import Suspension

if TYPE_CHECKING:
    from authrelay.config import Config

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: app_passwords
ADDRESS_CACHE_MAX = 10000
RETRY_AFTER_FAILURE = 1.0  # seconds without a new connection attempt after one failed
_LOCK_KEY = 0x61757468  # pg_advisory_xact_lock key serialising schema creation ("auth")

# The schema (also printed in docs/SCALING.md). "C" collation: byte-wise, case-sensitive
# names, as in the SQLite user DB; created/changed are unix seconds like there.
SCHEMA_SQL = (
    "CREATE SCHEMA IF NOT EXISTS authrelay",
    "CREATE TABLE IF NOT EXISTS authrelay.meta ("
    " key text PRIMARY KEY,"
    " value bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authrelay.users ("
    " name text COLLATE \"C\" PRIMARY KEY,"
    " hash text NOT NULL,"
    " created bigint NOT NULL,"
    " changed bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS authrelay.addresses ("
    " username text COLLATE \"C\" NOT NULL"
    "  REFERENCES authrelay.users(name) ON DELETE CASCADE,"
    " address text NOT NULL,"
    " PRIMARY KEY (username, address))",
    "CREATE INDEX IF NOT EXISTS addresses_by_address ON authrelay.addresses (address)",
    # Version 2 (auth/apppasswords.py): one row per device password.
    "CREATE TABLE IF NOT EXISTS authrelay.app_passwords ("
    " username text COLLATE \"C\" NOT NULL"
    "  REFERENCES authrelay.users(name) ON DELETE CASCADE,"
    " name text NOT NULL,"
    " selector text NOT NULL,"
    " hash text NOT NULL,"
    " created bigint NOT NULL,"
    " last_used bigint NOT NULL DEFAULT 0,"
    " last_ip text NOT NULL DEFAULT '',"
    " PRIMARY KEY (username, name),"
    " UNIQUE (username, selector))",
    # Version 2 too (policy/suspensions.py): users suspended by containment, for every
    # node. Not tied to users(name): a suspension outlives a user deleted and re-added.
    "CREATE TABLE IF NOT EXISTS authrelay.suspensions ("
    " username text COLLATE \"C\" PRIMARY KEY,"
    " at bigint NOT NULL,"
    " reason text NOT NULL,"
    " node text NOT NULL DEFAULT '')",
    f"INSERT INTO authrelay.meta (key, value) VALUES ('schema_version', {SCHEMA_VERSION})"
    " ON CONFLICT (key) DO NOTHING",
    f"UPDATE authrelay.meta SET value = {SCHEMA_VERSION}"
    f" WHERE key = 'schema_version' AND value < {SCHEMA_VERSION}",
)

_LOOKUP = (
    "SELECT u.hash, COALESCE(array_agg(a.address ORDER BY a.address)"
    " FILTER (WHERE a.address IS NOT NULL), '{}'::text[])"
    " FROM authrelay.users u LEFT JOIN authrelay.addresses a ON a.username = u.name"
    " WHERE u.name = $1 GROUP BY u.name, u.hash"
)
# The same, plus the app password with selector $2 (one round trip per AUTH).
_LOOKUP_APP = (
    "SELECT u.hash, COALESCE(array_agg(a.address ORDER BY a.address)"
    " FILTER (WHERE a.address IS NOT NULL), '{}'::text[]),"
    " (SELECT ARRAY[p.name, p.hash] FROM authrelay.app_passwords p"
    "  WHERE p.username = u.name AND p.selector = $2)"
    " FROM authrelay.users u LEFT JOIN authrelay.addresses a ON a.username = u.name"
    " WHERE u.name = $1 GROUP BY u.name, u.hash"
)
_APP_COLS = "name, selector, hash, created, last_used, last_ip"

T = TypeVar("T")


class UserStoreUnavailable(StoreUnavailable):
    """The database could not be asked (down, slow, refused us, no schema)."""


def driver() -> Any:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - depends on the installation
        raise UserDBError("auth.backend = \"postgresql\" needs asyncpg: "
                          "pip install 'authrelay[postgresql]'") from None
    return asyncpg


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in cred else dsn


class PgUserStore:
    """Async access to the user tables through one asyncpg pool (per process, lazily made
    in the running loop: forked workers each get their own)."""

    def __init__(self, dsn: str, *, pool_size: int = 10, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.pool_size = max(1, pool_size)
        self.timeout = timeout
        self._pool: Any = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0

    # ------------------------------------------------------------------ plumbing
    async def _get_pool(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool_loop is not loop:
            apg = driver()
            # min_size=0: no connection at creation, so a server starts while the database
            # is down; connections are made on demand and dropped after a minute idle.
            self._pool = await apg.create_pool(
                self.dsn, min_size=0, max_size=self.pool_size, timeout=self.timeout,
                command_timeout=self.timeout, max_inactive_connection_lifetime=60.0)
            self._pool_loop = loop
        return self._pool

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(connection)`; a dead pooled connection is retried once on a new one.
        Anything but a query-level error becomes UserStoreUnavailable."""
        apg = driver()
        if time.monotonic() < self._down_until:
            raise UserStoreUnavailable("database unreachable (retrying shortly)")
        for attempt in (1, 2):
            try:
                pool = await self._get_pool()
                async with asyncio.timeout(self.timeout * 2):
                    async with pool.acquire(timeout=self.timeout) as conn:
                        return await fn(conn)
            except (UserDBError, apg.UniqueViolationError):
                raise  # the caller's (user exists, no such user, ...)
            except (apg.InterfaceError, apg.InternalClientError, apg.PostgresConnectionError,
                    apg.exceptions.AdminShutdownError, apg.exceptions.CannotConnectNowError,
                    ConnectionError) as e:
                # InternalClientError ("cannot switch to state 15; another operation (2)
                # is in progress"): a pooled connection left mid-operation by a query
                # cancelled while the server was going away. Not an InterfaceError, so it
                # used to escape as a bug and a cached user got 454.
                # The server went away under a pooled connection (restart, fail-over): one
                # more try on a fresh connection before calling it down.
                if attempt == 2:
                    self._down_until = time.monotonic() + RETRY_AFTER_FAILURE
                    raise UserStoreUnavailable(maillog_mod.exc_text(e)) from e
                # A fresh one indeed: the pool's other connections went through the same
                # event and may be in the same state, and the pool would hand one out
                # again (the rig: both tries got InternalClientError while PostgreSQL
                # stopped, the maillog named that instead of the connection refused).
                # Expired connections are replaced at their next acquire (busy ones
                # when released).
                if self._pool is not None:
                    await self._pool.expire_connections()
            except (OSError, TimeoutError) as e:
                self._down_until = time.monotonic() + RETRY_AFTER_FAILURE
                raise UserStoreUnavailable(maillog_mod.exc_text(e)) from e
            except apg.UndefinedTableError as e:
                raise UserStoreUnavailable(
                    "no authrelay schema in the database (run `authrelay user list` once, "
                    "or create it as docs/SCALING.md shows)") from e
            except apg.PostgresError as e:
                raise UserStoreUnavailable(maillog_mod.exc_text(e)) from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5)
            self._pool = None

    def terminate(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.terminate()
            self._pool = None

    # ------------------------------------------------------------------ schema
    async def ensure_schema(self) -> None:
        """Create (or upgrade) the schema unless it is already the current format: a
        read-only role (docs/SCALING.md) reads the format and changes nothing."""
        apg = driver()

        async def current(conn: Any) -> int | None:
            try:
                return await conn.fetchval(
                    "SELECT value FROM authrelay.meta WHERE key = 'schema_version'")
            except (apg.UndefinedTableError, apg.InvalidSchemaNameError):
                return None

        version = await self._run(current)
        if version == SCHEMA_VERSION:
            return
        if version is not None and version > SCHEMA_VERSION:
            raise UserDBError(f"user database format {version} is newer than this "
                              f"authrelay understands ({SCHEMA_VERSION})")

        async def fn(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
                for stmt in SCHEMA_SQL:
                    await conn.execute(stmt)
                version = await conn.fetchval(
                    "SELECT value FROM authrelay.meta WHERE key = 'schema_version'")
            if version is not None and version > SCHEMA_VERSION:
                raise UserDBError(f"user database format {version} is newer than this "
                                  f"authrelay understands ({SCHEMA_VERSION})")
        await self._run(fn)

    # ------------------------------------------------------------------ reads
    async def lookup(self, name: str) -> tuple[str | None, set[str]]:
        """(hash, stored addresses) of `name`, or (None, set()) for no such user."""
        async def fn(conn: Any) -> tuple[str | None, set[str]]:
            row = await conn.fetchrow(_LOOKUP, name, timeout=self.timeout)
            if row is None:
                return None, set()
            return row[0], set(row[1])
        return await self._run(fn)

    async def lookup_app(self, name: str, selector: str
                         ) -> tuple[str | None, set[str], AppPassword | None]:
        """(hash, stored addresses, the app password with `selector` or None)."""
        async def fn(conn: Any) -> tuple[str | None, set[str], AppPassword | None]:
            row = await conn.fetchrow(_LOOKUP_APP, name, selector, timeout=self.timeout)
            if row is None:
                return None, set(), None
            app = AppPassword(row[2][0], selector, row[2][1], 0) if row[2] else None
            return row[0], set(row[1]), app
        return await self._run(fn)

    async def owns_address(self, spellings: tuple[str, ...]) -> bool:
        """Whether one of `spellings` is a stored address (lower-cased) or a user's name."""
        async def fn(conn: Any) -> bool:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM authrelay.addresses WHERE address = ANY($1))"
                " OR EXISTS (SELECT 1 FROM authrelay.users WHERE name = ANY($2))",
                [s.lower() for s in spellings], list(spellings), timeout=self.timeout))
        return await self._run(fn)

    async def app_passwords(self, name: str) -> list[AppPassword]:
        async def fn(conn: Any) -> list[AppPassword]:
            return [AppPassword(*r) for r in await conn.fetch(
                f"SELECT {_APP_COLS} FROM authrelay.app_passwords WHERE username = $1"
                " ORDER BY name", name)]
        return await self._run(fn)

    async def app_password(self, name: str, selector: str) -> AppPassword | None:
        async def fn(conn: Any) -> AppPassword | None:
            r = await conn.fetchrow(
                f"SELECT {_APP_COLS} FROM authrelay.app_passwords"
                " WHERE username = $1 AND selector = $2", name, selector)
            return AppPassword(*r) if r else None
        return await self._run(fn)

    async def insert_app(self, name: str, app: AppPassword, *, replace: bool = False) -> bool:
        """Store an app password (False: that name exists, unless `replace`)."""
        async def fn(conn: Any) -> bool:
            async with conn.transaction():
                if not await conn.fetchval(
                        "SELECT true FROM authrelay.users WHERE name = $1", name):
                    raise NoSuchUser(f"no user {name}")
                if replace:
                    await conn.execute("DELETE FROM authrelay.app_passwords"
                                       " WHERE username = $1 AND name = $2", name, app.name)
                done = await conn.fetchval(
                    "INSERT INTO authrelay.app_passwords"
                    " (username, name, selector, hash, created, last_used, last_ip)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
                    " RETURNING true", name, app.name, app.selector, app.hash, app.created,
                    app.last_used, app.last_ip)
                return bool(done)
        return await self._run(fn)

    async def delete_app(self, name: str, app: str) -> bool:
        async def fn(conn: Any) -> str:
            return await conn.execute("DELETE FROM authrelay.app_passwords"
                                      " WHERE username = $1 AND name = $2", name, app)
        return await self._run(fn) != "DELETE 0"

    async def touch_app(self, name: str, app: str, when: int, ip: str) -> None:
        async def fn(conn: Any) -> None:
            await conn.execute("UPDATE authrelay.app_passwords SET last_used = $3,"
                               " last_ip = $4 WHERE username = $1 AND name = $2",
                               name, app, when, ip, timeout=self.timeout)
        await self._run(fn)

    # ------------------------------------------------------------ suspensions (containment)
    async def suspension(self, name: str) -> Suspension | None:
        """The user's suspension (policy/suspensions.Suspension) or None."""
        async def fn(conn: Any) -> Suspension | None:
            r = await conn.fetchrow("SELECT username, at, reason, node FROM "
                                    "authrelay.suspensions WHERE username = $1", name,
                                    timeout=self.timeout)
            return Suspension(*r) if r else None
        return await self._run(fn)

    async def suspend(self, name: str, at: int, reason: str, node: str) -> bool:
        """True when this call created the suspension (one notice per trip, farm-wide)."""
        async def fn(conn: Any) -> bool:
            return bool(await conn.fetchval(
                "INSERT INTO authrelay.suspensions (username, at, reason, node)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (username) DO NOTHING RETURNING true",
                name, at, reason, node, timeout=self.timeout))
        return await self._run(fn)

    async def resume(self, name: str) -> Suspension | None:
        async def fn(conn: Any) -> Suspension | None:
            r = await conn.fetchrow("DELETE FROM authrelay.suspensions WHERE username = $1"
                                    " RETURNING username, at, reason, node", name)
            return Suspension(*r) if r else None
        return await self._run(fn)

    async def suspensions(self) -> list[Suspension]:
        async def fn(conn: Any) -> list[Suspension]:
            return [Suspension(*r) for r in await conn.fetch(
                "SELECT username, at, reason, node FROM authrelay.suspensions ORDER BY at")]
        return await self._run(fn)

    async def list(self) -> list[UserInfo]:
        async def fn(conn: Any) -> list[UserInfo]:
            addrs: dict[str, list[str]] = {}
            for r in await conn.fetch("SELECT username, address FROM authrelay.addresses "
                                      "ORDER BY username, address"):
                addrs.setdefault(r[0], []).append(r[1])
            rows = await conn.fetch("SELECT name, created, changed FROM authrelay.users "
                                    "ORDER BY name")
            return [UserInfo(r[0], tuple(addrs.get(r[0], ())), r[1], r[2]) for r in rows]
        return await self._run(fn)

    async def stored_addresses(self, name: str) -> set[str]:
        h, addrs = await self.lookup(name)
        if h is None:
            raise NoSuchUser(f"no user {name}")
        return addrs

    # ------------------------------------------------------------------ writes
    async def insert(self, name: str, h: str, addrs: Iterable[str], *,
                     replace: bool = False) -> bool:
        """Add a user (False if it exists and not `replace`; then nothing changes)."""
        now = int(time.time())
        addrs = sorted(set(addrs))

        async def fn(conn: Any) -> bool:
            async with conn.transaction():
                if replace:
                    await conn.execute(
                        "INSERT INTO authrelay.users (name, hash, created, changed)"
                        " VALUES ($1, $2, $3, $3) ON CONFLICT (name) DO UPDATE"
                        " SET hash = EXCLUDED.hash, changed = EXCLUDED.changed",
                        name, h, now)
                    await conn.execute("DELETE FROM authrelay.addresses WHERE username = $1",
                                       name)
                else:
                    done = await conn.fetchval(
                        "INSERT INTO authrelay.users (name, hash, created, changed)"
                        " VALUES ($1, $2, $3, $3) ON CONFLICT (name) DO NOTHING"
                        " RETURNING true", name, h, now)
                    if not done:
                        return False
                if addrs:
                    await conn.executemany(
                        "INSERT INTO authrelay.addresses (username, address) VALUES ($1, $2)",
                        [(name, a) for a in addrs])
                return True
        return await self._run(fn)

    async def delete(self, name: str) -> None:
        async def fn(conn: Any) -> str:
            return await conn.execute("DELETE FROM authrelay.users WHERE name = $1", name)
        if await self._run(fn) == "DELETE 0":
            raise NoSuchUser(f"no user {name}")

    async def set_hash(self, name: str, h: str, expect: str | None) -> bool:
        now = int(time.time())

        async def fn(conn: Any) -> str:
            if expect is None:
                return await conn.execute(
                    "UPDATE authrelay.users SET hash = $2, changed = $3 WHERE name = $1",
                    name, h, now)
            return await conn.execute(
                "UPDATE authrelay.users SET hash = $2, changed = $3 "
                "WHERE name = $1 AND hash = $4", name, h, now, expect)
        status = await self._run(fn)
        if status == "UPDATE 0":
            if expect is None:
                raise NoSuchUser(f"no user {name}")
            return False
        return True

    async def set_addresses(self, name: str, addrs: set[str]) -> None:
        now = int(time.time())

        async def fn(conn: Any) -> None:
            async with conn.transaction():
                found = await conn.fetchval(
                    "UPDATE authrelay.users SET changed = $2 WHERE name = $1 RETURNING true",
                    name, now)
                if not found:
                    raise NoSuchUser(f"no user {name}")
                await conn.execute("DELETE FROM authrelay.addresses WHERE username = $1", name)
                if addrs:
                    await conn.executemany(
                        "INSERT INTO authrelay.addresses (username, address) VALUES ($1, $2)",
                        [(name, a) for a in sorted(addrs)])
        await self._run(fn)


class PgUserDB(UserStore):
    """The blocking face of PgUserStore for the CLI (`authrelay user ...`): the same
    methods as the SQLite UserDB (validation and hashing shared), each a round trip on a
    private event loop. Creates the schema on first use."""

    def __init__(self, dsn: str, *, timeout: float = 10.0) -> None:
        self.store = PgUserStore(dsn, pool_size=1, timeout=timeout)
        self._loop = asyncio.new_event_loop()
        try:
            self._call(self.store.ensure_schema())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Awaitable[T]) -> T:
        try:
            return self._loop.run_until_complete(coro)
        except UserStoreUnavailable as e:
            raise UserDBError(f"user database {redact_dsn(self.store.dsn)}: {e}") from None

    def _insert(self, name: str, h: str, addrs: list[str]) -> None:
        if not self._call(self.store.insert(name, h, addrs)):
            raise UserExists(f"user {name} exists")

    def insert_hashed(self, name: str, h: str, addrs: Iterable[str], *,
                      replace: bool = False) -> bool:
        """For `user migrate`: a hash copied verbatim; False if the user exists."""
        return self._call(self.store.insert(name, h, addrs, replace=replace))

    def delete(self, name: str) -> None:
        self._call(self.store.delete(name))

    def _set_hash(self, name: str, h: str, expect: str | None) -> bool:
        return self._call(self.store.set_hash(name, h, expect))

    def _set_addresses(self, name: str, addrs: set[str]) -> None:
        self._call(self.store.set_addresses(name, addrs))

    def stored_addresses(self, name: str) -> set[str]:
        return self._call(self.store.stored_addresses(name))

    def get_hash(self, name: str) -> str | None:
        return self._call(self.store.lookup(name))[0]

    def list(self) -> builtins.list[UserInfo]:
        return self._call(self.store.list())

    def app_passwords(self, name: str) -> builtins.list[AppPassword]:
        return self._call(self.store.app_passwords(name))

    def app_password(self, name: str, selector: str) -> AppPassword | None:
        return self._call(self.store.app_password(name, selector))

    def touch_app_password(self, name: str, app: str, when: int, ip: str) -> None:
        self._call(self.store.touch_app(name, app, when, ip))

    def _insert_app(self, name: str, app: AppPassword) -> None:
        if not self._call(self.store.insert_app(name, app)):
            raise AppPasswordError(f"{name} already has an app password named {app.name}")

    def insert_app_hashed(self, name: str, app: AppPassword, *, replace: bool = False) -> bool:
        """For `user migrate`: an app password row copied verbatim."""
        return self._call(self.store.insert_app(name, app, replace=replace))

    def _delete_app(self, name: str, app: str) -> bool:
        return self._call(self.store.delete_app(name, app))

    def generation(self) -> int:
        return 0  # servers compare hashes, not generations (see PgAuthenticator)

    def close(self) -> None:
        if not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self.store.close())
            self._loop.close()


class PgLoginStore:
    """PgUserStore as a LoginStore: one round trip per AUTH (the hash, the addresses and
    the selected app password), no generation (cached pairs are checked against the hash
    each lookup returns), and an outage answers verified pairs from the cache. Says in the
    maillog when the database becomes unreachable and when it is back."""

    rides_outages = True  # a shared database: a hiccup or fail-over must not fail AUTH

    def __init__(self, store: PgUserStore) -> None:
        self.store = store
        self.up = True
        self._addresses: OrderedDict[str, set[str]] = OrderedDict()

    def _state(self, up: bool, why: str = "") -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            maillog_mod.warning("user database reachable again",
                                database=redact_dsn(self.store.dsn))
        else:
            maillog_mod.warning("user database unreachable: AUTH answered from the "
                                "verified-credential cache, else 454 4.7.0",
                                database=redact_dsn(self.store.dsn), reason=why)

    async def generation(self) -> int | None:
        return None

    async def lookup(self, username: str, selector: str | None) -> Found:
        try:
            if selector is None:
                stored, addrs = await self.store.lookup(username)
                app = None
            else:  # the app password its selector names, in the same round trip
                stored, addrs, app = await self.store.lookup_app(username, selector)
        except UserStoreUnavailable as e:
            self._state(False, str(e))
            raise
        self._state(True)
        if stored is None:
            self._addresses.pop(username, None)
        elif username in self._addresses:  # the fresh answer, where the entry stands:
            self._addresses[username] = addrs  # no younger for a lookup (a failed login)
        return Found(stored, app, frozenset(addrs))

    async def set_hash(self, username: str, new: str, old: str) -> None:
        await self.store.set_hash(username, new, old)

    async def owns_address(self, spellings: tuple[str, ...]) -> bool:
        try:
            found = await self.store.owns_address(spellings)
        except UserStoreUnavailable as e:
            self._state(False, str(e))
            raise
        self._state(True)
        return found

    async def touch_app(self, username: str, app: str, when: int, ip: str) -> None:
        await self.store.touch_app(username, app, when, ip)

    def logged_in(self, username: str, found: Found | None) -> None:
        """(LoginStore.logged_in) The user's addresses as its login's lookup read them
        kept as the youngest of ADDRESS_CACHE_MAX; a login from the verified-credential
        cache (an outage: no lookup) makes the kept ones young. Before, every lookup did,
        a failed login's too: a flood of them over many names pushed real users'
        addresses out, and a user logging in from the cache during an outage then had
        none (sender_policy = "own" refused its MAIL)."""
        if found is not None and found.addresses is not None:
            self._addresses[username] = set(found.addresses)
        elif username not in self._addresses:
            return
        self._addresses.move_to_end(username)
        while len(self._addresses) > ADDRESS_CACHE_MAX:
            self._addresses.popitem(last=False)

    def addresses(self, username: str) -> set[str]:
        """The addresses `username` may send as: read with its last AUTH (the session asks
        right after authenticating), plus the implicit one of an address-like name."""
        return set(self._addresses.get(username, ())) | implicit_address(username)

    def close(self) -> None:
        self.store.terminate()


class PgAuthenticator(StoreAuthenticator):
    """`[auth] backend = "postgresql"`: the login flow (auth/login.py) over PgUserStore."""

    def __init__(self, store: PgUserStore, *, hash_threads: int = 4,
                 cache_ttl: float = 300.0, rehash: bool = True,
                 app_passwords: str = "allow") -> None:
        self.store = store
        self.pg = PgLoginStore(store)
        super().__init__(self.pg, HashPool(hash_threads), cache_ttl=cache_ttl,
                         rehash=rehash, app_passwords=app_passwords)

    @property
    def db_up(self) -> bool:
        """Whether the last lookup reached the database."""
        return self.pg.up


def make_pg_authenticator(cfg: Config) -> PgAuthenticator:
    driver()  # fail at start-up, not at the first AUTH, when asyncpg is missing
    store = PgUserStore(cfg.auth.dsn, pool_size=cfg.auth.pool_size,
                        timeout=cfg.auth.backend_timeout)
    return PgAuthenticator(store, hash_threads=cfg.auth.hash_threads,
                           cache_ttl=cfg.auth.cache_ttl, app_passwords=cfg.auth.app_passwords)
