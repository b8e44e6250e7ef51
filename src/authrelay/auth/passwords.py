"""Password hashing: argon2id with the server's own parameters (argon2-cffi).

Owns: how passwords are stored in the user DB and checked. Contract: `hash_password()`
returns a PHC string ($argon2id$...); `verify_password()` returns True/False and never
raises for a wrong password or a corrupt/foreign hash (a corrupt hash is a failed login,
not a crash). `verify_dummy()` costs the same as a real verification, so the time an AUTH
takes does not tell whether the user exists.

Passwords are octets (RFC 4616 2: passwd is UTF-8 "SHOULD", and legacy sasldb/saslauthd
setups hold Latin-1 ones): every function here takes `str | bytes`, and a str is turned
into its raw bytes with `raw()` (UTF-8 with surrogateescape, PEP 383), so a password that
arrived as non-UTF-8 bytes and was carried as a str with surrogate escapes hashes and
verifies as exactly those bytes. A UTF-8 password hashes as its UTF-8 bytes, as before.

These calls are CPU-bound (tens of ms, 19 MiB each): callers on the event loop run them
in a bounded thread pool (see authenticator.py), never inline.

Parameters: OWASP's argon2id minimum (m=19 MiB, t=2, p=1), which RFC 9106 4 lists as a
reasonable choice where memory is constrained; old hashes made with other parameters still
verify, and `needs_rehash()` tells when to upgrade them, as long as their cost is within
the bounds below: a stored hash asking for more (a mistyped or hostile row: `t=4294967295`
held a hashing thread for days, `m=` in the tens of GiB the process's memory, and one
such user's name let anyone fill `hash_threads` with any password) is never run: a failed
login with a warning naming its parameters (`verify_password`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from functools import lru_cache

from argon2 import Parameters, PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TIME_COST = 2
MEMORY_COST = 19456  # KiB
PARALLELISM = 1

# The most a stored hash may cost one verification (any other is refused unrun): memory as
# RFC 9106 4's first option (2 GiB, t=1), passes x memory as libsodium's SENSITIVE preset
# (1 GiB x 4), lanes (argon2-cffi runs a thread per lane) as both of them at most need.
MAX_MEMORY_COST = 2 * 1024 * 1024  # KiB
MAX_WORK = 4 * 1024 * 1024  # time_cost x memory_cost, KiB-passes (ours: 38,912)
MAX_PARALLELISM = 16
MAX_HASH_CHARS = 256  # a PHC string of a 64-octet salt and tag fits in 200

log = logging.getLogger(__name__)

_hasher = PasswordHasher(
    time_cost=TIME_COST, memory_cost=MEMORY_COST, parallelism=PARALLELISM,
    hash_len=32, salt_len=16, type=Type.ID,
)


def raw(password: str | bytes) -> bytes:
    """The octets of a password: bytes as they are; a str as UTF-8, with surrogate
    escapes (non-UTF-8 bytes decoded with "surrogateescape") turned back into its bytes."""
    if isinstance(password, bytes):
        return password
    return password.encode("utf-8", "surrogateescape")


def hash_password(password: str | bytes) -> str:
    """A fresh argon2id hash (random salt) of the password's raw bytes."""
    return _hasher.hash(raw(password))


def rehash_password(password: str | bytes, old_hash: str) -> str:
    """`password`, just verified against `old_hash` (made with other parameters), hashed
    with ours and a salt derived from `old_hash` (_rehash_salt): any process, on any
    node, that saw a login by `old_hash` can then tell the stored hash is its re-hash
    (is_rehash_of) without the password, so an open session survives another process's
    upgrade of the hash. As unique as `old_hash`'s own random salt; a password set by
    `user passwd` has a random one, so it is never taken for a re-hash."""
    return _hasher.hash(raw(password), salt=_rehash_salt(old_hash))


def _rehash_salt(old_hash: str) -> bytes:
    return hashlib.sha256(b"authrelay re-hash\0" + old_hash.encode("utf-8")).digest()[:16]


def is_rehash_of(new_hash: str, old_hash: str) -> bool:
    """True when `new_hash` is rehash_password's hash made from `old_hash` (its PHC salt
    is the one derived from `old_hash`). False for anything else, a malformed hash too."""
    fields = new_hash.split("$")  # "", "argon2id", "v=19", "m=..,t=..,p=..", salt, hash
    if len(fields) != 6 or not is_argon2_hash(new_hash):
        return False
    try:
        salt = base64.b64decode(fields[4] + "=" * (-len(fields[4]) % 4), validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(salt, _rehash_salt(old_hash))


def is_argon2_hash(value: str) -> bool:
    """True when `value` looks like a PHC argon2 string argon2-cffi can verify."""
    return isinstance(value, str) and value.startswith(("$argon2id$", "$argon2i$", "$argon2d$"))


def too_costly(stored_hash: str) -> str:
    """Why `stored_hash` costs more than the bounds above ("" when it does not, or is no
    argon2 hash at all: argon2-cffi refuses those at once)."""
    if len(stored_hash) > MAX_HASH_CHARS:
        return f"{len(stored_hash)} characters, more than {MAX_HASH_CHARS}"
    try:
        p: Parameters = extract_parameters(stored_hash)
    except (InvalidHashError, ValueError):
        return ""
    if (p.memory_cost > MAX_MEMORY_COST or p.time_cost * p.memory_cost > MAX_WORK
            or p.parallelism > MAX_PARALLELISM):
        return (f"m={p.memory_cost},t={p.time_cost},p={p.parallelism}, more than "
                f"m={MAX_MEMORY_COST}, t x m={MAX_WORK}, p={MAX_PARALLELISM}")
    return ""


def verify_password(stored_hash: str, password: str | bytes) -> bool:
    """Constant-time check of `password` against `stored_hash` (the argon2 library
    compares digests in constant time). False for a mismatch or an unusable hash; a hash
    past the cost bounds is not run (False, and a warning)."""
    costly = too_costly(stored_hash) if isinstance(stored_hash, str) else ""
    if costly:
        log.warning("stored password hash refused unchecked (a failed login): its cost "
                    "is %s: set the password again (authrelay user passwd)", costly)
        return False
    try:
        return _hasher.verify(stored_hash, raw(password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    except ValueError:  # e.g. a hash string with impossible parameters
        return False


def needs_rehash(stored_hash: str) -> bool:
    """True when `stored_hash` was made with other parameters than ours."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return False


@lru_cache(maxsize=1)
def dummy_hash() -> str:
    """A hash of a random secret nobody knows, made once per process with our params."""
    return _hasher.hash(secrets.token_urlsafe(32))


def verify_dummy(password: str | bytes) -> bool:
    """Spend the same work as a real verification for a user that does not exist.

    Always False. Without it an unknown user would be answered in microseconds and a
    known one in ~30 ms: a user-enumeration oracle.
    """
    verify_password(dummy_hash(), password)
    return False
