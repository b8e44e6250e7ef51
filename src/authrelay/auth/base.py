"""What every authenticator shares: the interface, its answers, the credential cache and
the bounded hashing pool.

Owns the types below the authenticators (auth/login.py: the one login flow over a user
store; auth/authenticator.py: SQLite user DB, saslauthd, Dovecot; auth/pgusers.py:
PostgreSQL), so none imports another's:
- `AuthResult` / `Login`: what `Authenticator.login` answers (the session maps BAD to
  535 5.7.8 and TEMPFAIL to 454 4.7.0, RFC 4954 6);
- `Authenticator`: the interface the SMTP session calls;
- `CredentialCache`: verified (user, password) pairs for `[auth] cache_ttl`, keyed by
  HMAC-SHA256 under a per-process random key (the password is never stored), each entry
  bound to what it verified against (the user DB's generation, or the stored hash), so a
  password change, a deleted user or a revoked app password misses at once;
- `HashPool`: argon2 work in `[auth] hash_threads` threads, off the event loop, with a
  bounded backlog: past it the caller answers TEMPFAIL instead of queueing without end;
- `storable(name)`: whether a login name can be in a user store at all.
Contract: a user name is keyed by its bytes as the client sent them (surrogate escapes
for bytes that are not UTF-8, as the SASL decoder produces them), so two distinct names
never share a cache entry and no name raises. Failure policy: none here (pure memory).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import secrets
import struct
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from authrelay.auth import passwords
from authrelay.auth.userdb import UserDBError, check_name

if TYPE_CHECKING:
    from authrelay.config import Config

log = logging.getLogger(__name__)

CACHE_MAX_ENTRIES = 10000
BACKLOG_PER_THREAD = 64  # queued hash jobs per hashing thread before TEMPFAIL

T = TypeVar("T")


class AuthResult(enum.Enum):
    OK = "ok"
    BAD = "bad"
    TEMPFAIL = "tempfail"


class Standing(enum.Enum):
    """`Authenticator.standing`: an authenticated session's login at its next MAIL."""

    OK = "ok"
    GONE = "gone"  # the user was deleted (530 5.7.0)
    REVOKED = "revoked"  # the password or app password it used changed (421 4.7.0, close)


@dataclass(frozen=True)
class Login:
    """The answer to `Authenticator.login`: the result, the app password that matched
    ("" for the account password: the maillog's `sasl_app=`), a hint for the maillog
    when right credentials were refused anyway ("app password required"), and the
    account the backend named."""

    result: AuthResult
    app: str = ""
    hint: str = ""
    # The account the backend says the login was for, when it names one other than the
    # login name's `account()` (Dovecot's `user=`: `ALICE` -> `alice`, under `%Ln`
    # `alice@x` -> `alice`); "" otherwise. After an OK the session counts and decides per
    # user by it; after a BAD the failure counts against it, and its lockout holds.
    user: str = ""
    # What an OK login verified against, for `Authenticator.still_valid` (the login flow's
    # own record, auth/login.py); None: nothing to check again.
    proof: object = None


class Authenticator(ABC):
    """The interface the SMTP session calls. `login` never raises: a backend that is down,
    slow or garbled is TEMPFAIL, never BAD (which counts against the user) nor OK."""

    async def verify(self, username: str, password: str | bytes) -> AuthResult:
        return (await self.login(username, password)).result

    @abstractmethod
    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        """Check a login; the answer also says which app password matched, if any."""

    async def still_valid(self, username: str, login: Login) -> bool:
        """Whether an earlier OK `login` of `username` (the name as given to `login`) still
        holds, asked at each MAIL of an authenticated session after `still_exists`:
        False once the password it used changed, its app password revoked, or `[auth]
        app_passwords = "require"` refuses the account password it used. Never raises; a
        store that cannot say now answers True (AUTH answers such a store TEMPFAIL, but a
        session already in is not cut for it). Backends that keep no hashes
        (saslauthd, Dovecot) cannot tell: True."""
        return True

    def reload(self, cfg: Config) -> None:  # noqa: B027 - optional hook
        """SIGHUP: settings that may change without a restart (`[auth] app_passwords`)."""

    def account(self, username: str) -> str:
        """The account a login name names: the key of everything counted or decided per
        user (AUTH lockout, rates, containment, the queue's auth_user), so two spellings
        of one login never count apart. The name itself unless a wrapper maps names
        (auth/realms.py)."""
        return username

    @abstractmethod
    def addresses(self, username: str) -> set[str]:
        """The addresses `username` may send as (`sender_policy = "own"`)."""

    @abstractmethod
    async def owns_address(self, spellings: tuple[str, ...]) -> bool | None:
        """Whether some user owns the address spelt `spellings`
        (policy/recipients.candidates): one of them stored as a user's address, or a
        user named exactly one of them. None: the store cannot be asked now. Never
        raises. Asked at RCPT for a local domain's recipient the local recipients list
        does not name."""

    async def still_exists(self, username: str) -> bool:
        """Whether `username`, a login accepted earlier in this session, is still a user
        (asked at every MAIL: a user deleted mid-session sends no more). Never raises; a
        backend that cannot tell (saslauthd, Dovecot) or cannot be asked now says True."""
        return True

    async def standing(self, username: str, login: Login | None) -> Standing:
        """`still_exists`, then `still_valid` of `login` (None: nothing to check) in one
        call, asked at each MAIL of an authenticated session. Never raises. A backend
        may answer both from one read (auth/login.py)."""
        if not await self.still_exists(username):
            return Standing.GONE
        if login is not None and not await self.still_valid(username, login):
            return Standing.REVOKED
        return Standing.OK

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads, connections and files."""


def name_bytes(username: str) -> bytes:
    """A login name as the client sent it (surrogate escapes back to their bytes)."""
    return username.encode("utf-8", "surrogateescape")


def storable(username: str) -> bool:
    """Whether a user store can hold this name at all (the CLI's rules, and valid
    UTF-8): a name that cannot is a wrong login, never a store failure."""
    try:
        check_name(username)
        username.encode("utf-8")  # surrogate escapes (non-UTF-8 bytes) cannot be stored
    except (UserDBError, UnicodeEncodeError):
        return False
    return True


class CredentialCache:
    """Verified (user, password) pairs, by HMAC only, each bound to what it verified
    against, for `ttl` seconds; at most `max_entries` (the oldest go first)."""

    def __init__(self, ttl: float, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = secrets.token_bytes(32)
        # -> (expiry, binding, app password name or "", the hash that verified)
        self._entries: OrderedDict[bytes, tuple[float, object, str, str]] = OrderedDict()

    def key(self, username: str, password: str | bytes) -> bytes:
        u, p = name_bytes(username), passwords.raw(password)
        # Length-prefix the user so ("ab", "c") and ("a", "bc") never collide.
        return hmac.new(self._key, struct.pack(">I", len(u)) + u + p, hashlib.sha256).digest()

    def get(self, key: bytes) -> tuple[object, str] | None:
        """(what this pair verified against, the app password's name or "") if that was
        less than `ttl` ago."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[1], entry[2]

    def hit(self, key: bytes, binding: object) -> bool:
        """A live entry that verified against `binding`; any other entry is dropped."""
        got = self.get(key)
        if got is None:
            return False
        if got[0] != binding:
            del self._entries[key]
            return False
        return True

    def app(self, key: bytes) -> str:
        """The app password a cached pair verified as ("" for the account password)."""
        got = self.get(key)
        return got[1] if got else ""

    def verified(self, key: bytes) -> str:
        """The hash a cached pair verified against ("" if none is known)."""
        return self._entries[key][3] if self.get(key) is not None else ""

    def put(self, key: bytes, binding: object, app: str = "", verified: str = "") -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl, binding, app, verified)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class HashPool:
    """argon2 (and the lookups that go with it) in `threads` threads, off the event loop;
    at most `threads * BACKLOG_PER_THREAD` jobs queued or running."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads,
                                        thread_name_prefix="authrelay-hash")
        self.backlog = self.threads * BACKLOG_PER_THREAD
        self.pending = 0

    @property
    def full(self) -> bool:
        if self.pending >= self.backlog:
            log.warning("AUTH hashing backlog full (%d): answering tempfail", self.pending)
            return True
        return False

    async def run(self, fn: Callable[..., T], *args: object) -> T | None:
        """`fn(*args)` in a pool thread; None when the backlog is full. Raises what `fn`
        raises, and RuntimeError once the pool is shut down (closing)."""
        if self.full:
            return None
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
