"""App passwords: one generated password per device, beside the account password.

Owns: the format of an app password, generating one, recognising one at AUTH, and the
login decision over (account password, app passwords) for `[auth] app_passwords`.
The stores (auth/userdb.py: SQLite and in-memory; auth/pgusers.py: PostgreSQL) keep the
rows; the authenticators call `AppPasswords.check` in their hashing thread.

Format: 16 lowercase letters shown in 4 groups of 4 (`abcd efgh ijkl mnop`, as Google
and Fastmail print them): 16 x log2(26) = 75 bits, typeable on a phone keyboard, no
ambiguous digits. At AUTH, spaces and hyphens are ignored and letters are compared
lower-cased, so `abcd-efgh-ijkl-mnop` and `ABCDEFGHIJKLMNOP` work too.

Cost (a DoS lever otherwise): the first group is the **selector**, stored in clear and
unique per user; the whole 16 letters are hashed with argon2id (passwords.py, the same
cost as account passwords). A login looks the selector up (one indexed read) and runs
argon2 against that one row, so a user with 10 app passwords costs what a user with one
costs. A login is at most two argon2 verifications (an app-password-shaped password whose
selector exists but that failed, then the account password), whatever N. What an attacker
who steals the database faces: 12 unknown letters (56 bits) behind argon2id.
What the selector gives away online: whether a 4-letter prefix exists for a user (a login
with it costs one more hash); the AUTH lockouts (docs/LIMITS.md) bound such probing, and
it leaves 56 bits to guess.

Contract: `decide()` never raises for a wrong or malformed password; store errors
propagate to the authenticator (TEMPFAIL). Failure policy: `last used` is best effort
(`LastUsed`, used by both stores' authenticators): never awaited by AUTH, at most once a
minute per app password per process; a read-only or slow database only makes it stale.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from authrelay.auth import passwords

log = logging.getLogger(__name__)

GROUPS = 4
GROUP_LEN = 4
LETTERS = string.ascii_lowercase
MAX_PER_USER = 50  # app passwords a user may hold (a list an admin can still read)
MAX_NAME_OCTETS = 64
TOUCH_INTERVAL = 60.0  # seconds between two "last used" writes for one app password
TOUCH_BACKLOG = 64  # "last used" writes in flight per process before more are skipped
_SHAPE = re.compile(rf"[a-z]{{{GROUPS * GROUP_LEN}}}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")

MODES = ("allow", "require")


class AppPasswordError(Exception):
    """A request about app passwords that cannot be done; the message says why."""


@dataclass(frozen=True)
class AppPassword:
    """One stored app password (never the password itself)."""

    name: str
    selector: str
    hash: str
    created: int
    last_used: int = 0  # unix time; 0: never
    last_ip: str = ""


@dataclass(frozen=True)
class Outcome:
    """What one login check found. `ok`: the credentials are accepted; `app`: the app
    password that matched ("" for the account password); `hint`: why a right account
    password was refused anyway (for the maillog, never the client)."""

    ok: bool
    app: str = ""
    hint: str = ""
    hash: str = ""  # the hash that verified (the PostgreSQL cache compares it)


def check_name(name: str) -> str:
    """An app password's name: 1..64 characters of letters, digits and ._@+- ."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AppPasswordError("an app password name is 1 to 64 letters, digits or ._@+- "
                               "(starting with a letter or digit)")
    return name


def generate(taken: set[str] = frozenset()) -> tuple[str, str]:  # type: ignore[assignment]
    """(selector, password): a fresh app password whose selector is not in `taken`."""
    if len(taken) >= MAX_PER_USER:
        raise AppPasswordError(f"at most {MAX_PER_USER} app passwords per user")
    while True:
        pw = "".join(secrets.choice(LETTERS) for _ in range(GROUPS * GROUP_LEN))
        if pw[:GROUP_LEN] not in taken:
            return pw[:GROUP_LEN], pw


def display(password: str) -> str:
    """'abcdefghijklmnop' -> 'abcd efgh ijkl mnop' (what the admin hands the user)."""
    return " ".join(password[i:i + GROUP_LEN] for i in range(0, len(password), GROUP_LEN))


def parse(password: str | bytes) -> str | None:
    """The normalised app password (16 lowercase letters) if `password` has the shape of
    one, else None. Cheap: decides whether a selector lookup is worth a database read."""
    raw = passwords.raw(password)
    if len(raw) > 40:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    norm = text.replace(" ", "").replace("-", "").lower()
    return norm if _SHAPE.fullmatch(norm) else None


def selector(normalised: str) -> str:
    return normalised[:GROUP_LEN]


class TouchSchedule:
    """When this process last wrote "last used" for an app password (bounded)."""

    def __init__(self, interval: float = TOUCH_INTERVAL, max_entries: int = 10000) -> None:
        self.interval = interval
        self.max_entries = max_entries
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    def due(self, user: str, name: str, now: float | None = None) -> bool:
        """True (and remembered) when a write is due for (user, name)."""
        now = time.monotonic() if now is None else now
        key = (user, name)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_entries:
            self._last.popitem(last=False)
        return True


class LastUsed:
    """Records when and from where an app password was used, for both stores: in the
    background (never awaited by AUTH), at most once per `TOUCH_INTERVAL` per app
    password and process, at most `TOUCH_BACKLOG` writes in flight (a stuck database: the
    rest are skipped, never queued without end). `write(user, app, unix_time, ip)` is the
    store's (a thread hop for SQLite, a query for PostgreSQL); a write that fails (a
    read-only role or file, a locked or slow database) only leaves "last used" stale:
    logged at debug, never an AUTH failure."""

    def __init__(self, write: Callable[[str, str, int, str], Awaitable[Any]], *,
                 interval: float = TOUCH_INTERVAL, backlog: int = TOUCH_BACKLOG) -> None:
        self.write = write
        self.backlog = backlog
        self.schedule = TouchSchedule(interval)
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, user: str, app: str, ip: str) -> None:
        """From the event loop, after a successful login with app password `app`."""
        if not app or len(self._tasks) >= self.backlog or not self.schedule.due(user, app):
            return
        t = asyncio.get_running_loop().create_task(self._run(user, app, ip))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _run(self, user: str, app: str, ip: str) -> None:
        try:
            await self.write(user, app, int(time.time()), ip)
        except Exception:  # best effort by contract (class docstring)
            log.debug("app password last-used update skipped", exc_info=True)

    def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()


def decide(mode: str, account_hash: str | None, app: AppPassword | None,
           password: str | bytes) -> Outcome:
    """The login decision, in a hashing thread (argon2 runs here).

    `account_hash`: the user's password hash (None: no such user). `app`: the stored app
    password whose selector matches `password` (None: none, or not app-shaped).
    At most two argon2 verifications; one when the password is not app-shaped or its
    selector is unknown; a dummy one for an unknown user (no enumeration oracle)."""
    if account_hash is None:
        passwords.verify_dummy(password)
        return Outcome(False)
    if app is not None:
        norm = parse(password)
        if norm is not None and passwords.verify_password(app.hash, norm):
            return Outcome(True, app=app.name, hash=app.hash)
    ok = passwords.verify_password(account_hash, password)
    if ok and mode == "require":
        return Outcome(False, hint="app password required")
    return Outcome(ok, hash=account_hash if ok else "")
