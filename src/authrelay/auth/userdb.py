"""The built-in user DB: users, their argon2id password hashes, the addresses they own.

Owns: the SQLite file at `cfg.userdb_path` (format number in `PRAGMA user_version`) and
its in-memory twin for unit tests. Contract (both classes):
- user names match exactly (case-sensitive, as Cyrus and Dovecot do); addresses are stored
  and compared lower-cased; a user whose name looks like an address owns that address.
- `generation()` changes whenever any process commits a change, so running servers pick up
  `authrelay user ...` edits on the next AUTH without a restart or a signal.
- Several processes read it while the CLI writes it: WAL mode, so readers never wait for
  the writer; writers wait for each other (busy timeout) rather than failing.

Failure policy: `UserExists` / `NoSuchUser` / `UserDBError` (bad name, newer format) are
the caller's to report; `sqlite3.Error` (disk, corruption) propagates and the
Authenticator answers it as a temporary failure (454), never as "bad password".
"""

from __future__ import annotations

import builtins
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from authrelay.auth import apppasswords
from authrelay.auth.apppasswords import AppPassword, AppPasswordError
from authrelay.auth.passwords import hash_password, is_argon2_hash, too_costly
from authrelay.auth.sasl import hidden_character
from authrelay.sqlitefile import immediate, open_db

# 1: users, addresses. 2: app_passwords (a version-1 file gains the table when first
# opened by this version; nothing else changes, so an older authrelay refuses it).
SCHEMA_VERSION = 2
MAX_NAME_OCTETS = 255  # RFC 4616 2: authcid is at most 255 octets

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
CREATE TABLE IF NOT EXISTS users (
    name    TEXT PRIMARY KEY,          -- BINARY collation: exact, case-sensitive match
    hash    TEXT NOT NULL,             -- argon2 PHC string
    created INTEGER NOT NULL,          -- unix time
    changed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    user    TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    address TEXT NOT NULL,             -- lower-cased
    PRIMARY KEY (user, address)
);
CREATE INDEX IF NOT EXISTS addresses_by_address ON addresses (address);
CREATE TABLE IF NOT EXISTS app_passwords (
    user      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name      TEXT NOT NULL,           -- "phone": what the maillog says (sasl_app=)
    selector  TEXT NOT NULL,           -- the first 4 letters, in clear (auth/apppasswords.py)
    hash      TEXT NOT NULL,           -- argon2 PHC string of all 16 letters
    created   INTEGER NOT NULL,
    last_used INTEGER NOT NULL DEFAULT 0,
    last_ip   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user, name),
    UNIQUE (user, selector)
);
"""


class UserDBError(Exception):
    """A user DB request that cannot be done; the message says why."""


class UserExists(UserDBError):
    pass


class NoSuchUser(UserDBError):
    pass


@dataclass(frozen=True)
class UserInfo:
    name: str
    addresses: tuple[str, ...]  # the stored ones, sorted (not the implicit name address)
    created: int = 0
    changed: int = 0


def check_name(name: str) -> str:
    """A user name: 1..255 octets of UTF-8, no whitespace, control or invisible
    (format) characters."""
    if not isinstance(name, str) or not name:
        raise UserDBError("user name must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_OCTETS:
        raise UserDBError("user name longer than 255 octets")
    # Controls, format characters (U+202E right-to-left override, U+200B zero width
    # space: a name that shows as another in `user list` and the maillog's readers)...
    if not name.isascii() and hidden_character(name):
        raise UserDBError("user name must not contain control or invisible characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UserDBError("user name must not contain spaces or control characters")
    return name


def check_new_name(name: str) -> str:
    """A name a new user may get: check_name, and in Unicode NFKC. The stores compare names
    as code points (AUTH does not normalise), so `café` typed precomposed (NFC) and
    decomposed (NFD: e + U+0301), or `alice` and fullwidth `ａｌｉｃｅ`, would be two users
    that print (nearly) the same; a name not in NFKC is refused, naming its NFKC form, so one
    spelling is ever stored (AUTH with the other finds no user). As PRECIS's
    IdentifierClass (RFC 8264 9.17, used by RFC 8265's UsernameCaseMapped) disallows
    compatibility characters; case stays significant (module contract)."""
    check_name(name)
    nfc = unicodedata.normalize("NFC", name)
    if nfc != name:
        raise UserDBError(f"user name {name!r} is not in Unicode NFC form (composed "
                          f"characters): use {nfc!r}")
    nfkc = unicodedata.normalize("NFKC", name)
    if nfkc != name:
        raise UserDBError(f"user name {name!r} is not in Unicode NFKC form (compatibility "
                          f"characters: fullwidth, ligatures, superscripts): use {nfkc!r}")
    return name


_LABEL_SEP = re.compile(r"([.@])")


def lookalike_key(name: str) -> str:
    """The spelling two names that read as one share: each `xn--` label (between dots and
    `@`) as its U-label (`xn--caf-dma` -> `café`), then NFKC. A label that is no valid
    punycode stays as it is."""
    parts = _LABEL_SEP.split(name)
    for i, label in enumerate(parts):
        if label[:4].lower() == "xn--":
            try:
                parts[i] = label[4:].encode("ascii").decode("punycode")
            except UnicodeError:
                pass
    return unicodedata.normalize("NFKC", "".join(parts))


def lookalike_candidate(name: str) -> bool:
    """Whether `name` can have a look-alike of another spelling (UserStore._no_lookalike):
    a non-ASCII name or one with an `xn--` label."""
    return not name.isascii() or "xn--" in name.lower()


def normalize_address(address: str) -> str:
    """'Alice@Example.ORG' -> 'alice@example.org'; raises UserDBError if not local@domain."""
    a = address.strip().lower() if isinstance(address, str) else ""
    local, at, domain = a.rpartition("@")
    if not at or not local or not domain:
        raise UserDBError(f"{address!r} is not an address (local@domain)")
    if any(c.isspace() or ord(c) < 0x20 or c in "<>" for c in a):
        raise UserDBError(f"{address!r} is not an address (local@domain)")
    return a.rstrip(".")


def implicit_address(name: str) -> set[str]:
    """A user named like an address owns that address."""
    try:
        return {normalize_address(name)}
    except UserDBError:
        return set()


class UserStore:
    """The interface shared by UserDB and MemoryUserDB (hashing and validation here)."""

    def add(self, name: str, password: str | bytes, addresses: Iterable[str] = ()) -> None:
        check_new_name(name)
        self._no_lookalike(name)
        if not password:
            raise UserDBError("password must not be empty")
        addrs = [normalize_address(a) for a in addresses]
        self._insert(name, hash_password(password), addrs)

    def add_hashed(self, name: str, argon2_hash: str, addresses: Iterable[str] = ()) -> None:
        check_new_name(name)
        self._no_lookalike(name)
        if not is_argon2_hash(argon2_hash):
            raise UserDBError("not an argon2 hash")
        costly = too_costly(argon2_hash)
        if costly:  # verify_password would never run it: a user who can never log in
            raise UserDBError(f"the password hash given for user {name!r} costs {costly} "
                              f"(docs/LIMITS.md): never run, {name} could never log in; "
                              "give a password instead (authrelay user add)")
        self._insert(name, argon2_hash, [normalize_address(a) for a in addresses])

    def _no_lookalike(self, name: str) -> None:
        """A new (NFKC) name must not read as an existing user's: the same lookalike_key
        ('café' beside 'xn--caf-dma', or beside a 'café' decomposed or an 'ａｌｉｃｅ' an
        earlier release stored before names had to be NFC / NFKC). Stored pairs are kept
        (`user list` warns). Reads: the key's own name, and the names that can twin."""
        key = lookalike_key(name)
        twins = [key] if key != name and self.get_hash(key) is not None else []
        twins += [n for n in self._lookalike_candidates()
                  if n != name and lookalike_key(n) == key]
        if twins:
            raise UserDBError(f"user name {name!r} looks the same as the existing user "
                              f"{twins[0]!r} (one name once NFKC-normalised and with "
                              "xn-- labels decoded): use that user, or delete it first")

    def _lookalike_candidates(self) -> builtins.list[str]:
        """The stored names for which lookalike_candidate holds."""
        return [u.name for u in self.list() if lookalike_candidate(u.name)]

    def set_password(self, name: str, password: str | bytes) -> None:
        if not password:
            raise UserDBError("password must not be empty")
        self._set_hash(name, hash_password(password), None)

    def update_hash(self, name: str, old_hash: str, new_hash: str) -> bool:
        """Replace the hash only if it is still `old_hash` (rehash on login)."""
        try:
            return self._set_hash(name, new_hash, old_hash)
        except NoSuchUser:
            return False

    def set_addresses(self, name: str, addresses: Iterable[str]) -> None:
        self._set_addresses(name, {normalize_address(a) for a in addresses})

    def add_address(self, name: str, address: str) -> None:
        self._set_addresses(name, self.stored_addresses(name) | {normalize_address(address)})

    def remove_address(self, name: str, address: str) -> None:
        a = normalize_address(address)
        have = self.stored_addresses(name)
        if a not in have:
            raise UserDBError(f"{name} does not have the address {a}")
        self._set_addresses(name, have - {a})

    def addresses(self, name: str) -> set[str]:
        """Every address `name` may send as (sender_policy="own"); empty if no such user."""
        if self.get_hash(name) is None:
            return set()
        return self.stored_addresses(name) | implicit_address(name)

    def owns_address(self, spellings: tuple[str, ...]) -> bool:
        """Whether one of `spellings` is a user's stored address (stored lower-cased) or
        a user's exact name: indexed lookups, at most a few per call."""
        raise NotImplementedError

    # ------------------------------------------------------------ app passwords
    def add_app_password(self, name: str, app: str) -> str:
        """A new app password `app` for user `name`: the password, to show once."""
        apppasswords.check_name(app)
        if self.get_hash(name) is None:
            raise NoSuchUser(f"no user {name}")
        have = self.app_passwords(name)
        if any(a.name == app for a in have):
            raise AppPasswordError(f"{name} already has an app password named {app}")
        sel, pw = apppasswords.generate({a.selector for a in have})
        self._insert_app(name, AppPassword(app, sel, hash_password(pw), int(time.time())))
        return pw

    def revoke_app_password(self, name: str, app: str) -> None:
        if not self._delete_app(name, app):
            raise AppPasswordError(f"{name} has no app password named {app}")

    # Implemented by the stores.
    def app_passwords(self, name: str) -> list[AppPassword]:
        """The user's app passwords by name (empty for no such user)."""
        raise NotImplementedError

    def app_password(self, name: str, selector: str) -> AppPassword | None:
        """The app password of `name` with this selector (one indexed read)."""
        raise NotImplementedError

    def touch_app_password(self, name: str, app: str, when: int, ip: str) -> None:
        """Record a use (no generation change: a login must not flush every cache)."""
        raise NotImplementedError

    def _insert_app(self, name: str, app: AppPassword) -> None:
        raise NotImplementedError

    def _delete_app(self, name: str, app: str) -> bool:
        raise NotImplementedError

    def _insert(self, name: str, h: str, addrs: list[str]) -> None:
        raise NotImplementedError

    def _set_hash(self, name: str, h: str, expect: str | None) -> bool:
        raise NotImplementedError

    def _set_addresses(self, name: str, addrs: set[str]) -> None:
        raise NotImplementedError

    def stored_addresses(self, name: str) -> set[str]:
        raise NotImplementedError

    def get_hash(self, name: str) -> str | None:
        raise NotImplementedError

    def generation(self) -> int:
        raise NotImplementedError

    def list(self) -> builtins.list[UserInfo]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryUserDB(UserStore):
    """In-memory user DB with the same interface, for unit tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, tuple[str, int, int]] = {}  # name -> (hash, created, changed)
        self._addrs: dict[str, set[str]] = {}
        self._apps: dict[str, dict[str, AppPassword]] = {}  # user -> name -> row
        self._gen = 0

    def _insert(self, name: str, h: str, addrs: list[str]) -> None:
        with self._lock:
            if name in self._users:
                raise UserExists(f"user {name} exists")
            now = int(time.time())
            self._users[name] = (h, now, now)
            self._addrs[name] = set(addrs)
            self._gen += 1

    def delete(self, name: str) -> None:
        with self._lock:
            if self._users.pop(name, None) is None:
                raise NoSuchUser(f"no user {name}")
            self._addrs.pop(name, None)
            self._apps.pop(name, None)
            self._gen += 1

    def app_passwords(self, name: str) -> list[AppPassword]:
        with self._lock:
            return sorted(self._apps.get(name, {}).values(), key=lambda a: a.name)

    def app_password(self, name: str, selector: str) -> AppPassword | None:
        with self._lock:
            return next((a for a in self._apps.get(name, {}).values()
                         if a.selector == selector), None)

    def touch_app_password(self, name: str, app: str, when: int, ip: str) -> None:
        with self._lock:
            a = self._apps.get(name, {}).get(app)
            if a is not None:
                self._apps[name][app] = AppPassword(a.name, a.selector, a.hash, a.created,
                                                    when, ip)

    def _insert_app(self, name: str, app: AppPassword) -> None:
        with self._lock:
            if name not in self._users:
                raise NoSuchUser(f"no user {name}")
            self._apps.setdefault(name, {})[app.name] = app
            self._gen += 1

    def _delete_app(self, name: str, app: str) -> bool:
        with self._lock:
            if self._apps.get(name, {}).pop(app, None) is None:
                return False
            self._gen += 1
            return True

    def _set_hash(self, name: str, h: str, expect: str | None) -> bool:
        with self._lock:
            if name not in self._users:
                raise NoSuchUser(f"no user {name}")
            old, created, _ = self._users[name]
            if expect is not None and old != expect:
                return False
            self._users[name] = (h, created, int(time.time()))
            self._gen += 1
            return True

    def _set_addresses(self, name: str, addrs: set[str]) -> None:
        with self._lock:
            if name not in self._users:
                raise NoSuchUser(f"no user {name}")
            self._addrs[name] = set(addrs)
            self._gen += 1

    def stored_addresses(self, name: str) -> set[str]:
        with self._lock:
            if name not in self._users:
                raise NoSuchUser(f"no user {name}")
            return set(self._addrs.get(name, ()))

    def get_hash(self, name: str) -> str | None:
        with self._lock:
            entry = self._users.get(name)
            return entry[0] if entry else None

    def list(self) -> list[UserInfo]:
        with self._lock:
            return [UserInfo(n, tuple(sorted(self._addrs.get(n, ()))), c, ch)
                    for n, (_, c, ch) in sorted(self._users.items())]

    def owns_address(self, spellings: tuple[str, ...]) -> bool:
        lower = {s.lower() for s in spellings}
        with self._lock:
            return any(n in self._users for n in spellings) or any(
                not lower.isdisjoint(a) for a in self._addrs.values())

    def generation(self) -> int:
        return self._gen


class UserDB(UserStore):
    """The SQLite user DB. Safe to share between threads: each thread gets its own
    connection, so a writer waiting for the file lock in one thread (the CLI elsewhere
    holds it) never blocks a reader on the event loop thread."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._all_lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []
        self._db()  # create / check the schema now, so errors surface at start-up

    # ------------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        # Hashes are secrets: the file is made 0600 before SQLite does (sqlitefile.py).
        return open_db(self.path, _SCHEMA, SCHEMA_VERSION, busy_timeout=self._busy_timeout,
                       pragmas=("foreign_keys = ON",), newer=lambda v: UserDBError(
                           f"{self.path}: user DB format {v} is newer than this "
                           f"authrelay understands ({SCHEMA_VERSION})"))

    def _db(self) -> sqlite3.Connection:
        """This thread's connection.

        A file replaced under running servers is not followed: SQLite would pair the new
        file with the old file's -wal and corrupt it. Restore a backup with the servers
        stopped (or with `sqlite3 users.db ".restore backup.db"`, which is safe live)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def _write(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        """Run fn(conn) in one write transaction that also bumps the generation."""
        db = self._db()
        with immediate(db):
            result = fn(db)
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        return result

    @staticmethod
    def _must_exist(db: sqlite3.Connection, name: str) -> None:
        if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
            raise NoSuchUser(f"no user {name}")

    # ------------------------------------------------------------------ writes
    def _insert(self, name: str, h: str, addrs: list[str]) -> None:
        now = int(time.time())

        def fn(db: sqlite3.Connection) -> None:
            try:
                db.execute("INSERT INTO users (name, hash, created, changed) "
                           "VALUES (?, ?, ?, ?)", (name, h, now, now))
            except sqlite3.IntegrityError:
                raise UserExists(f"user {name} exists") from None
            db.executemany("INSERT OR IGNORE INTO addresses (user, address) VALUES (?, ?)",
                           [(name, a) for a in addrs])

        self._write(fn)

    def delete(self, name: str) -> None:
        def fn(db: sqlite3.Connection) -> None:
            self._must_exist(db, name)
            db.execute("DELETE FROM addresses WHERE user = ?", (name,))
            db.execute("DELETE FROM app_passwords WHERE user = ?", (name,))
            db.execute("DELETE FROM users WHERE name = ?", (name,))

        self._write(fn)

    def _set_hash(self, name: str, h: str, expect: str | None) -> bool:
        now = int(time.time())

        def fn(db: sqlite3.Connection) -> bool:
            self._must_exist(db, name)
            if expect is None:
                cur = db.execute("UPDATE users SET hash = ?, changed = ? WHERE name = ?",
                                 (h, now, name))
            else:
                cur = db.execute("UPDATE users SET hash = ?, changed = ? "
                                 "WHERE name = ? AND hash = ?", (h, now, name, expect))
            return cur.rowcount == 1

        return bool(self._write(fn))

    def _set_addresses(self, name: str, addrs: set[str]) -> None:
        now = int(time.time())

        def fn(db: sqlite3.Connection) -> None:
            self._must_exist(db, name)
            db.execute("DELETE FROM addresses WHERE user = ?", (name,))
            db.executemany("INSERT INTO addresses (user, address) VALUES (?, ?)",
                           [(name, a) for a in sorted(addrs)])
            db.execute("UPDATE users SET changed = ? WHERE name = ?", (now, name))

        self._write(fn)

    def _insert_app(self, name: str, app: AppPassword) -> None:
        def fn(db: sqlite3.Connection) -> None:
            self._must_exist(db, name)
            try:
                db.execute("INSERT INTO app_passwords (user, name, selector, hash, created) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (name, app.name, app.selector, app.hash, app.created))
            except sqlite3.IntegrityError:
                raise AppPasswordError(f"{name} already has an app password named "
                                       f"{app.name}") from None

        self._write(fn)

    def _delete_app(self, name: str, app: str) -> bool:
        def fn(db: sqlite3.Connection) -> bool:
            self._must_exist(db, name)
            return db.execute("DELETE FROM app_passwords WHERE user = ? AND name = ?",
                              (name, app)).rowcount == 1

        return bool(self._write(fn))

    def touch_app_password(self, name: str, app: str, when: int, ip: str) -> None:
        # Outside _write: no generation bump (every server would drop its credential
        # cache on every app-password login). A short busy wait: best effort.
        db = self._db()
        db.execute("UPDATE app_passwords SET last_used = ?, last_ip = ? "
                   "WHERE user = ? AND name = ?", (when, ip, name, app))

    # ------------------------------------------------------------------ reads
    _APP_COLS = "name, selector, hash, created, last_used, last_ip"

    def app_passwords(self, name: str) -> list[AppPassword]:
        return [AppPassword(*r) for r in self._db().execute(
            f"SELECT {self._APP_COLS} FROM app_passwords WHERE user = ? ORDER BY name",
            (name,))]

    def app_password(self, name: str, selector: str) -> AppPassword | None:
        row = self._db().execute(
            f"SELECT {self._APP_COLS} FROM app_passwords WHERE user = ? AND selector = ?",
            (name, selector)).fetchone()
        return AppPassword(*row) if row else None

    def stored_addresses(self, name: str) -> set[str]:
        db = self._db()
        self._must_exist(db, name)
        return {r[0] for r in db.execute("SELECT address FROM addresses WHERE user = ?",
                                         (name,))}

    def addresses(self, name: str) -> set[str]:
        """(UserStore.addresses) In one read, not three (the hash, the user again, the
        addresses: 36 us on the event loop once per authenticated session): the user's
        row joined with its addresses; no row, no user."""
        rows = self._db().execute(
            "SELECT a.address FROM users u LEFT JOIN addresses a ON a.user = u.name "
            "WHERE u.name = ?", (name,)).fetchall()
        if not rows:
            return set()
        return {r[0] for r in rows if r[0] is not None} | implicit_address(name)

    def get_hash(self, name: str) -> str | None:
        row = self._db().execute("SELECT hash FROM users WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _lookalike_candidates(self) -> list[str]:
        # Non-ASCII (more octets than characters) or an xn-- label (LIKE: ASCII case-blind).
        return [n for (n,) in self._db().execute(
            "SELECT name FROM users WHERE length(CAST(name AS BLOB)) <> length(name) "
            "OR name LIKE '%xn--%'")]

    def owns_address(self, spellings: tuple[str, ...]) -> bool:
        marks = ",".join("?" * len(spellings))
        lower = tuple(s.lower() for s in spellings)
        row = self._db().execute(
            f"SELECT 1 FROM addresses WHERE address IN ({marks}) UNION ALL "
            f"SELECT 1 FROM users WHERE name IN ({marks}) LIMIT 1",
            lower + spellings).fetchone()
        return row is not None

    def list(self) -> list[UserInfo]:
        db = self._db()
        addrs: dict[str, list[str]] = {}
        for user, addr in db.execute("SELECT user, address FROM addresses "
                                     "ORDER BY user, address"):
            addrs.setdefault(user, []).append(addr)
        return [UserInfo(n, tuple(addrs.get(n, ())), c, ch) for n, c, ch in
                db.execute("SELECT name, created, changed FROM users ORDER BY name")]

    def generation(self) -> int:
        """A number that differs after any committed change, by any process: a counter
        bumped inside every write transaction (one indexed read, no lock wait in WAL)."""
        row = self._db().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return row[0] if row else 0
