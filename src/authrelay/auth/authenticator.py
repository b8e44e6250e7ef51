"""The Authenticator: the one call the SMTP session makes to check a login.

Owns: choosing the backend (`cfg.auth.backend`: userdb | saslauthd:PATH | dovecot:PATH |
postgresql, the last in auth/pgusers.py), and the SQLite user DB as a LoginStore
(`UserDBLoginStore`) under the one login flow of auth/login.py (`StoreAuthenticator`:
dummy hash for unknown users, the bounded HashPool, app passwords, the credential cache).
Contract: `await verify(user, password)` -> AuthResult.OK / BAD / TEMPFAIL; it never
raises. A password is compared as its raw bytes (passwords.raw(): a str carrying
non-UTF-8 bytes as surrogate escapes, or bytes), so legacy Latin-1 passwords work.
`addresses(user)` -> the addresses the user may use as MAIL FROM (sender_policy
"own"). The session maps BAD to 535 5.7.8 and TEMPFAIL to 454 4.7.0 (RFC 4954 6).

Failure policy: a backend that is down, slow or garbled, or a user DB that cannot be read,
is TEMPFAIL (the client retries later), never BAD (which would count against the user)
and never OK.

userdb specifics: lookups run in the HashPool (sqlite3 blocks); "last used" and re-hash
writes in a thread of their own, so a locked user DB never holds a hashing thread. A
cached pair counts only under the user DB generation it was made in, so `authrelay user
passwd` / `user del` / `app-password revoke` take effect on the very next AUTH; an
unreadable user DB is TEMPFAIL even for a cached pair (a local file: a fault to fix).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from authrelay.auth.backends import BackendUnavailable, DovecotBackend, SaslauthdBackend
from authrelay.auth.base import Authenticator, AuthResult, HashPool, Login
from authrelay.auth.login import Found, StoreAuthenticator, StoreUnavailable
from authrelay.auth.pgusers import make_pg_authenticator
from authrelay.auth.realms import stored_name
from authrelay.auth.userdb import UserDB, UserDBError, UserStore, implicit_address
from authrelay.config import Config

__all__ = ["AuthResult", "Authenticator", "BackendAuthenticator", "Login",
           "StoreAuthenticator", "UserDBAuthenticator", "make_authenticator"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class UserDBLoginStore:
    """The SQLite user DB (auth/userdb.py) as a LoginStore: lookups in the hashing pool
    (sqlite3 blocks), writes ("last used", re-hash) in a thread of their own, so a locked
    user DB never holds a hashing thread; cached pairs are bound to the DB's generation
    (every CLI change bumps it, a revoked app password too)."""

    rides_outages = False  # a local file: unreadable is a fault to fix, not a hiccup

    def __init__(self, db: UserStore, hashing: HashPool) -> None:
        self.db = db
        self.hashing = hashing
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="authrelay-touch")

    async def generation(self) -> int | None:
        try:
            # One cheap indexed read: also the moment we learn of CLI changes.
            return self.db.generation()
        except (sqlite3.Error, UserDBError, OSError) as e:
            log.warning("user DB unreadable", exc_info=True)
            raise StoreUnavailable(str(e)) from e

    def _lookup(self, username: str, selector: str | None) -> Found:
        stored = self.db.get_hash(username)
        app = None
        if stored is not None and selector is not None:
            app = self.db.app_password(username, selector)
        return Found(stored, app)

    async def _read(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`, a read of the DB, in the hashing pool (sqlite3 blocks);
        StoreUnavailable when the DB cannot be read, the pool is closing or full."""
        try:
            found = await self.hashing.run(fn, *args)
        except (sqlite3.Error, UserDBError, OSError) as e:
            log.warning("user DB unreadable", exc_info=True)
            raise StoreUnavailable(str(e)) from e
        except RuntimeError as e:  # pool shut down: we are closing
            raise StoreUnavailable("closing") from e
        if found is None:
            raise StoreUnavailable("hashing backlog full")
        return found

    async def lookup(self, username: str, selector: str | None) -> Found:
        return await self._read(self._lookup, username, selector)

    async def _write(self, fn: Callable[..., object], *args: object) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writes, fn, *args)

    async def set_hash(self, username: str, new: str, old: str) -> None:
        await self._write(self.db.update_hash, username, old, new)

    async def touch_app(self, username: str, app: str, when: int, ip: str) -> None:
        await self._write(self.db.touch_app_password, username, app, when, ip)

    def logged_in(self, username: str, found: Found | None) -> None:
        pass  # (nothing kept in memory: addresses() reads the DB)

    def addresses(self, username: str) -> set[str]:
        try:
            return self.db.addresses(username)
        except (sqlite3.Error, UserDBError, OSError):
            log.warning("user DB unreadable", exc_info=True)
            return set()

    async def owns_address(self, spellings: tuple[str, ...]) -> bool:
        return await self._read(self.db.owns_address, spellings)

    def close(self) -> None:
        self._writes.shutdown(wait=False, cancel_futures=True)
        self.db.close()


class UserDBAuthenticator(StoreAuthenticator):
    """`[auth] backend = "userdb"`: the login flow (auth/login.py) over the SQLite DB."""

    def __init__(self, db: UserStore, *, hash_threads: int = 4, cache_ttl: float = 300.0,
                 rehash: bool = True, app_passwords: str = "allow") -> None:
        self.db = db
        hashing = HashPool(hash_threads)
        super().__init__(UserDBLoginStore(db, hashing), hashing, cache_ttl=cache_ttl,
                         rehash=rehash, app_passwords=app_passwords)


class BackendAuthenticator(Authenticator):
    """saslauthd or Dovecot: they own the passwords; we only ask.

    Their name matching is theirs (Dovecot lower-cases by default, PAM with sssd/Active
    Directory ignores case), and saslauthd never says which account a login was, so the
    account of a login name is its lower-case form: `ALICE` and `alice` share one AUTH
    lockout budget, one set of rates and one suspension (else a guesser gets a budget per
    spelling, and a suspended alice sends on as `Alice`). Two distinct users differing
    only in case (a case-sensitive passdb) then share them: stricter, never looser."""

    def __init__(self, backend: SaslauthdBackend | DovecotBackend) -> None:
        self.backend = backend

    def account(self, username: str) -> str:
        return backend_account(username)

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        if not username or not password:
            return Login(AuthResult.BAD)
        try:
            if isinstance(self.backend, DovecotBackend):
                ok, account = await self.backend.authenticate(username, password)
            else:  # saslauthd answers OK or NO, naming nobody
                ok, account = await self.backend.check(username, password), username
        except BackendUnavailable as e:
            log.warning("auth backend unavailable: %s", e)
            return Login(AuthResult.TEMPFAIL)
        except Exception:  # a bug here must not crash the session or read as OK
            log.exception("auth backend %r failed", self.backend)
            return Login(AuthResult.TEMPFAIL)
        named = backend_account(account)  # Dovecot's user= (its spelling), as account()
        return Login(AuthResult.OK if ok else AuthResult.BAD,
                     user=named if named != self.account(username) else "")

    def addresses(self, username: str) -> set[str]:
        # External backends know no addresses: a login that is an address owns it.
        return implicit_address(username)

    async def owns_address(self, spellings: tuple[str, ...]) -> bool | None:
        # saslauthd and Dovecot's auth socket check passwords; neither can be asked
        # whether a name exists: their users go into local_recipients_file.
        return False


def backend_account(username: str) -> str:
    """The account of a login name checked by saslauthd or Dovecot (BackendAuthenticator)."""
    return username.lower()


def external_backend(cfg: Config) -> bool:
    """Whether `cfg.auth.backend` is saslauthd or Dovecot (make_authenticator)."""
    return cfg.auth.backend.startswith(("saslauthd:", "dovecot:"))


def account_for(cfg: Config, username: str) -> str:
    """The account the serving authenticator (RealmLogins over make_authenticator, as
    wiring builds it) names for `username`, without opening any backend: for what an
    admin types (`user resume`, `[limits.containment] exempt`)."""
    name = stored_name({r.lower() for r in cfg.auth.realms}, username)
    return backend_account(name) if external_backend(cfg) else name


def make_authenticator(cfg: Config) -> Authenticator:
    """The Authenticator for `cfg.auth.backend`."""
    be = cfg.auth.backend
    timeout = cfg.auth.backend_timeout
    if be.startswith("saslauthd:"):  # (external_backend)
        return BackendAuthenticator(SaslauthdBackend(be.split(":", 1)[1], timeout))
    if be.startswith("dovecot:"):
        return BackendAuthenticator(DovecotBackend(be.split(":", 1)[1], timeout))
    if be == "postgresql":  # users shared by a farm (auth/pgusers.py)
        return make_pg_authenticator(cfg)
    return UserDBAuthenticator(UserDB(cfg.userdb_path), hash_threads=cfg.auth.hash_threads,
                               cache_ttl=cfg.auth.cache_ttl,
                               app_passwords=cfg.auth.app_passwords)
