"""The Authenticator: the one call the SMTP session makes to check a login.

Owns: choosing the backend (`cfg.auth.backend`: userdb | saslauthd:PATH | dovecot:PATH |
postgresql, the last in auth/pgusers.py),
keeping password hashing off the event loop, and the verified-credential cache.
Contract: `await verify(user, password)` -> AuthResult.OK / BAD / TEMPFAIL; it never
raises. A password is compared as its raw bytes (passwords.raw(): a str carrying
non-UTF-8 bytes as surrogate escapes, or bytes), so legacy Latin-1 passwords work.
`addresses(user)` -> the addresses the user may use as MAIL FROM (sender_policy
"own"). The session maps BAD to 535 5.7.8 and TEMPFAIL to 454 4.7.0 (RFC 4954 6).

Failure policy: a backend that is down, slow or garbled, or a user DB that cannot be read,
is TEMPFAIL (the client retries later), never BAD (which would count against the user)
and never OK.

userdb specifics (the "Hold under abuse" data side):
- argon2id verification runs in the HashPool (auth/base.py) of `cfg.auth.hash_threads`;
  work beyond a bounded backlog is refused with TEMPFAIL rather than queued without end, so
  a flood of AUTH attempts costs bounded memory and CPU.
- an unknown user is verified against a dummy hash: same cost, no user-enumeration oracle.
- successes are cached (auth/base.CredentialCache) for `cfg.auth.cache_ttl` seconds,
  keyed by HMAC-SHA256 under a per-process random key of (user, password): the password
  is never stored, and the key dies with the process. An entry counts only under the
  user DB generation it was made in, so `authrelay user passwd` / `user del` take effect
  on the very next AUTH. Failures are never cached: each guess pays the full hash.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from authrelay.auth import apppasswords, passwords
from authrelay.auth.backends import BackendUnavailable, DovecotBackend, SaslauthdBackend
from authrelay.auth.base import (
    Authenticator,
    AuthResult,
    CredentialCache,
    HashPool,
    Login,
    storable,
)
from authrelay.auth.pgusers import make_pg_authenticator
from authrelay.auth.userdb import UserDB, UserDBError, UserStore, implicit_address
from authrelay.config import Config

__all__ = ["AuthResult", "Authenticator", "BackendAuthenticator", "Login",
           "UserDBAuthenticator", "make_authenticator"]

log = logging.getLogger(__name__)


class UserDBAuthenticator(Authenticator):
    def __init__(self, db: UserStore, *, hash_threads: int = 4, cache_ttl: float = 300.0,
                 rehash: bool = True, app_passwords: str = "allow") -> None:
        self.db = db
        self.hashing = HashPool(hash_threads)
        self.hash_threads = self.hashing.threads
        # "last used" writes (auth/apppasswords.LastUsed): a thread of their own, so a
        # locked user DB never holds a hashing thread.
        self._touch_pool = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix="authrelay-touch")
        self.last_used = apppasswords.LastUsed(self._write_last_used)
        self.cache = CredentialCache(cache_ttl)
        self._cache_gen: int | None = None
        self._rehash = rehash
        self.app_mode = app_passwords

    def reload(self, cfg: Config) -> None:
        if cfg.auth.app_passwords != self.app_mode:
            self.app_mode = cfg.auth.app_passwords
            self.cache.clear()  # a cached account-password login must not outlive "require"

    def _check(self, username: str, password: str | bytes) -> apppasswords.Outcome:
        """In a pool thread: look the user (and the app password the password's selector
        names) up and run argon2: at most two verifications, whatever the number of app
        passwords (auth/apppasswords.py); a dummy one if the user is unknown."""
        stored = self.db.get_hash(username)
        app = None
        norm = apppasswords.parse(password)
        if stored is not None and norm is not None:
            app = self.db.app_password(username, apppasswords.selector(norm))
        out = apppasswords.decide(self.app_mode, stored, app, password)
        if (out.ok and not out.app and stored is not None and self._rehash
                and passwords.needs_rehash(stored)):
            # Old parameters: upgrade quietly. Best effort (a read-only DB is fine).
            try:
                self.db.update_hash(username, stored, passwords.hash_password(password))
            except (sqlite3.Error, UserDBError, OSError):
                log.debug("rehash of a user's password failed", exc_info=True)
        return out

    async def _write_last_used(self, user: str, app: str, when: int, ip: str) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._touch_pool, self.db.touch_app_password, user, app, when, ip)

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        if not username or not password:
            return Login(AuthResult.BAD)
        if not storable(username):
            # No such name can be in the user DB (the CLI refuses it): a wrong login, paid
            # for like any other (same cost: no oracle), not a database failure.
            done = await self.hashing.run(passwords.verify_dummy, password)
            return Login(AuthResult.TEMPFAIL if done is None else AuthResult.BAD)
        try:
            # One cheap indexed read; also the moment we learn of CLI changes (a revoked
            # app password bumps it too, so revocation is immediate).
            gen = self.db.generation()
        except (sqlite3.Error, UserDBError, OSError):
            log.warning("user DB unreadable", exc_info=True)
            return Login(AuthResult.TEMPFAIL)
        if gen != self._cache_gen:
            self.cache.clear()
            self._cache_gen = gen
        key = self.cache.key(username, password)
        if self.cache.hit(key, gen):
            app = self.cache.app(key)
            self.last_used.record(username, app, client_ip)
            return Login(AuthResult.OK, app)
        try:
            out = await self.hashing.run(self._check, username, password)
        except (sqlite3.Error, UserDBError, OSError):
            log.warning("user DB unreadable", exc_info=True)
            return Login(AuthResult.TEMPFAIL)
        except RuntimeError:  # pool shut down: we are closing
            return Login(AuthResult.TEMPFAIL)
        if out is None:  # backlog full
            return Login(AuthResult.TEMPFAIL)
        if not out.ok:
            return Login(AuthResult.BAD, hint=out.hint)
        # Stored under the generation read *before* hashing: if the password changed
        # meanwhile, the next lookup sees a newer generation and ignores this entry.
        self.cache.put(key, gen, out.app)
        self.last_used.record(username, out.app, client_ip)
        return Login(AuthResult.OK, out.app)

    def addresses(self, username: str) -> set[str]:
        try:
            return self.db.addresses(username)
        except (sqlite3.Error, UserDBError, OSError):
            log.warning("user DB unreadable", exc_info=True)
            return set()

    def close(self) -> None:
        self.hashing.shutdown()
        self.last_used.close()
        self._touch_pool.shutdown(wait=False, cancel_futures=True)
        self.db.close()


class BackendAuthenticator(Authenticator):
    """saslauthd or Dovecot: they own the passwords; we only ask."""

    def __init__(self, backend: SaslauthdBackend | DovecotBackend) -> None:
        self.backend = backend

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        if not username or not password:
            return Login(AuthResult.BAD)
        try:
            ok = await self.backend.check(username, password)
        except BackendUnavailable as e:
            log.warning("auth backend unavailable: %s", e)
            return Login(AuthResult.TEMPFAIL)
        except Exception:  # a bug here must not crash the session or read as OK
            log.exception("auth backend %r failed", self.backend)
            return Login(AuthResult.TEMPFAIL)
        return Login(AuthResult.OK if ok else AuthResult.BAD)

    def addresses(self, username: str) -> set[str]:
        # External backends know no addresses: a login that is an address owns it.
        return implicit_address(username)


def make_authenticator(cfg: Config) -> Authenticator:
    """The Authenticator for `cfg.auth.backend`."""
    be = cfg.auth.backend
    timeout = cfg.auth.backend_timeout
    if be.startswith("saslauthd:"):
        return BackendAuthenticator(SaslauthdBackend(be.split(":", 1)[1], timeout))
    if be.startswith("dovecot:"):
        return BackendAuthenticator(DovecotBackend(be.split(":", 1)[1], timeout))
    if be == "postgresql":  # users shared by a farm (auth/pgusers.py)
        return make_pg_authenticator(cfg)
    return UserDBAuthenticator(UserDB(cfg.userdb_path), hash_threads=cfg.auth.hash_threads,
                               cache_ttl=cfg.auth.cache_ttl,
                               app_passwords=cfg.auth.app_passwords)
