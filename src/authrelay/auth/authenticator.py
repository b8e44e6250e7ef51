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
- argon2id verification runs in a ThreadPoolExecutor of `cfg.auth.hash_threads`; work
  beyond a bounded backlog is refused with TEMPFAIL rather than queued without end, so a
  flood of AUTH attempts costs bounded memory and CPU.
- an unknown user is verified against a dummy hash: same cost, no user-enumeration oracle.
- successes are cached for `cfg.auth.cache_ttl` seconds, keyed by HMAC-SHA256 under a
  per-process random key of (user, password): the password is never stored, and the key
  dies with the process. The cache is dropped whenever the user DB generation changes, so
  `authrelay user passwd` / `user del` take effect on the very next AUTH. Failures are
  never cached: each guess pays the full hash.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import secrets
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from authrelay.auth import apppasswords, passwords
from authrelay.auth.backends import BackendUnavailable, DovecotBackend, SaslauthdBackend
from authrelay.auth.userdb import UserDB, UserDBError, implicit_address

if TYPE_CHECKING:
    from authrelay.auth.userdb import _UserStore
    from authrelay.config import Config

log = logging.getLogger(__name__)

CACHE_MAX_ENTRIES = 10000
BACKLOG_PER_THREAD = 64  # queued hash jobs per hashing thread before TEMPFAIL


class AuthResult(enum.Enum):
    OK = "ok"
    BAD = "bad"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class Login:
    """The answer to `Authenticator.login`: the result, the app password that matched
    ("" for the account password: the maillog's `sasl_app=`), and a hint for the maillog
    when right credentials were refused anyway ("app password required")."""

    result: AuthResult
    app: str = ""
    hint: str = ""


class Authenticator:
    """Base class: the interface the SMTP server calls."""

    async def verify(self, username: str, password: str | bytes) -> AuthResult:
        raise NotImplementedError

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        """`verify` plus what the maillog says about it (app passwords: auth/
        apppasswords.py). Backends without app passwords answer `verify`'s result."""
        return Login(await self.verify(username, password))

    def reload(self, cfg: Config) -> None:
        """SIGHUP: settings that may change without a restart (`[auth] app_passwords`)."""

    def addresses(self, username: str) -> set[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _CredentialCache:
    """Verified (user, password) pairs, by HMAC only, for a short time."""

    def __init__(self, ttl: float, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        # -> (expiry, user, gen, app password name or "")
        self._entries: dict[bytes, tuple[float, str, int, str]] = {}

    def key(self, username: str, password: str | bytes) -> bytes:
        u, p = username.encode("utf-8"), passwords.raw(password)
        # Length-prefix the user so ("ab", "c") and ("a", "bc") never collide.
        return hmac.new(self._key, struct.pack(">I", len(u)) + u + p, hashlib.sha256).digest()

    def hit(self, key: bytes, generation: int) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        expiry, _, gen, _ = entry
        if gen != generation or expiry <= time.monotonic():
            del self._entries[key]
            return False
        return True

    def app(self, key: bytes) -> str:
        """The app password a cached pair verified as ("" for the account password)."""
        entry = self._entries.get(key)
        return entry[3] if entry else ""

    def store(self, key: bytes, username: str, generation: int, app: str = "") -> None:
        if self.ttl <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items()
                             if v[0] > now and v[2] == generation}
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))  # oldest insertion
        self._entries[key] = (now + self.ttl, username, generation, app)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class UserDBAuthenticator(Authenticator):
    def __init__(self, db: _UserStore, *, hash_threads: int = 4, cache_ttl: float = 300.0,
                 rehash: bool = True, app_passwords: str = "allow") -> None:
        self.db = db
        self.hash_threads = max(1, hash_threads)
        self._pool = ThreadPoolExecutor(max_workers=self.hash_threads,
                                        thread_name_prefix="authrelay-hash")
        # "last used" writes: one thread of their own, never awaited by AUTH (a locked or
        # read-only DB only makes them late or skipped), bounded in what may queue.
        self._touch_pool = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix="authrelay-touch")
        self._touch_slots = threading.BoundedSemaphore(BACKLOG_PER_THREAD)
        self._touch_due = apppasswords.TouchSchedule()
        self._backlog = self.hash_threads * BACKLOG_PER_THREAD
        self._pending = 0
        self.cache = _CredentialCache(cache_ttl)
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

    def _touch(self, username: str, app: str, ip: str) -> None:
        """Record an app password's use, at most once a minute, off the AUTH path."""
        if not app or not self._touch_due.due(username, app):
            return
        if not self._touch_slots.acquire(blocking=False):
            return  # writes are stuck (a locked DB): skip rather than queue without end

        def run() -> None:
            try:
                self.db.touch_app_password(username, app, int(time.time()), ip)
            except (sqlite3.Error, UserDBError, OSError):
                log.debug("app password last-used update skipped", exc_info=True)
            finally:
                self._touch_slots.release()

        try:
            self._touch_pool.submit(run)
        except RuntimeError:  # closing
            self._touch_slots.release()

    async def verify(self, username: str, password: str | bytes) -> AuthResult:
        return (await self.login(username, password)).result

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        if not username or not password:
            return Login(AuthResult.BAD)
        loop = asyncio.get_running_loop()
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
            self._touch(username, app, client_ip)
            return Login(AuthResult.OK, app)
        if self._pending >= self._backlog:
            log.warning("AUTH hashing backlog full (%d): answering tempfail", self._pending)
            return Login(AuthResult.TEMPFAIL)
        self._pending += 1
        try:
            out = await loop.run_in_executor(self._pool, self._check, username, password)
        except (sqlite3.Error, UserDBError, OSError):
            log.warning("user DB unreadable", exc_info=True)
            return Login(AuthResult.TEMPFAIL)
        except RuntimeError:  # pool shut down: we are closing
            return Login(AuthResult.TEMPFAIL)
        finally:
            self._pending -= 1
        if not out.ok:
            return Login(AuthResult.BAD, hint=out.hint)
        # Stored under the generation read *before* hashing: if the password changed
        # meanwhile, the next lookup sees a newer generation and ignores this entry.
        self.cache.store(key, username, gen, out.app)
        self._touch(username, out.app, client_ip)
        return Login(AuthResult.OK, out.app)

    def addresses(self, username: str) -> set[str]:
        try:
            return self.db.addresses(username)
        except (sqlite3.Error, UserDBError, OSError):
            log.warning("user DB unreadable", exc_info=True)
            return set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._touch_pool.shutdown(wait=False, cancel_futures=True)
        self.db.close()


class BackendAuthenticator(Authenticator):
    """saslauthd or Dovecot: they own the passwords; we only ask."""

    def __init__(self, backend: SaslauthdBackend | DovecotBackend) -> None:
        self.backend = backend

    async def verify(self, username: str, password: str | bytes) -> AuthResult:
        if not username or not password:
            return AuthResult.BAD
        try:
            ok = await self.backend.check(username, password)
        except BackendUnavailable as e:
            log.warning("auth backend unavailable: %s", e)
            return AuthResult.TEMPFAIL
        except Exception:  # a bug here must not crash the session or read as OK
            log.exception("auth backend %r failed", self.backend)
            return AuthResult.TEMPFAIL
        return AuthResult.OK if ok else AuthResult.BAD

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
        from authrelay.auth.pgusers import make_pg_authenticator

        return make_pg_authenticator(cfg)  # type: ignore[return-value]
    return UserDBAuthenticator(UserDB(cfg.userdb_path), hash_threads=cfg.auth.hash_threads,
                               cache_ttl=cfg.auth.cache_ttl,
                               app_passwords=cfg.auth.app_passwords)
