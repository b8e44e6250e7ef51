"""The login flow, once, for every user store that holds password hashes.

Owns: `LoginStore`, what a user store gives the flow (the SQLite user DB in
auth/authenticator.py, PostgreSQL in auth/pgusers.py), and `StoreAuthenticator`, the
`Authenticator` that makes every security decision of a login over it:
- a name no store can hold, or an unknown user, costs one dummy argon2 verification (same
  cost as a real check: no user-enumeration oracle) and is BAD, never a store failure;
- argon2 runs in the bounded HashPool (auth/base.py): past its backlog, TEMPFAIL;
- app passwords (auth/apppasswords.py): the password's selector names at most one row,
  so at most two verifications; `[auth] app_passwords = "require"` refuses the account
  password (the maillog's hint), also from the cache;
- verified pairs are cached (auth/base.CredentialCache) under what they verified against:
  the store's generation when it has one (SQLite: any CLI change, a revoked app password
  included, misses at once, without a lookup), else the very hash after each lookup
  (PostgreSQL); a wrong password drops the pair; failures are never cached;
- "last used" of app passwords, and a quiet re-hash of an account password made with old
  argon2 parameters (in the background, after the reply; best effort).
Contract: user names reach the store as the client sent them (a name that is not valid
UTF-8 never does: `storable`); the cache keys them by their raw bytes.
Failure policy: `login` never raises. A store that is down, slow or garbled
(`StoreUnavailable`, or any other error, logged) is TEMPFAIL, never BAD nor OK, except
that a store with `rides_outages` (a shared database: a fail-over must not fail every
AUTH) answers a pair it verified within `[auth] cache_ttl` from the cache.
RFC 4954 6 (535 5.7.8 for BAD, 454 4.7.0 for TEMPFAIL, mapped by the session).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from authrelay.auth import apppasswords, passwords
from authrelay.auth.apppasswords import AppPassword
from authrelay.auth.base import (
    Authenticator,
    AuthResult,
    CredentialCache,
    HashPool,
    Login,
    Standing,
    storable,
)

if TYPE_CHECKING:
    from authrelay.config import Config

log = logging.getLogger(__name__)

# still_exists: how long a store without a generation (PostgreSQL) is taken at its word
# that a user exists, and how many users this process remembers so.
EXISTS_TTL = 2.0
EXISTS_MAX = 10000


class StoreUnavailable(Exception):
    """The user store could not be asked (down, slow, unreadable, busy, closing)."""


@dataclass(frozen=True)
class Found:
    """A user's row: the account password hash (None: no such user) and the app password
    the login's selector names (None: none, or the password is not app-shaped)."""

    hash: str | None
    app: AppPassword | None = None
    # The user's addresses as this lookup read them (PostgreSQL: one round trip), for
    # LoginStore.logged_in; None where the store reads them itself (SQLite).
    addresses: frozenset[str] | None = None


class LoginStore(Protocol):
    """What the login flow needs of a user store. Errors: StoreUnavailable."""

    rides_outages: bool  # an outage may answer a verified pair from the cache

    async def generation(self) -> int | None:
        """A number that changes with every change to the store (read before the lookup;
        a cached pair made under it needs no lookup), or None: entries are checked
        against the hash a lookup returns."""
        ...

    async def lookup(self, username: str, selector: str | None) -> Found:
        """The user's hash and, if `selector`, the app password it names."""
        ...

    async def set_hash(self, username: str, new: str, old: str) -> None:
        """Replace the hash if it is still `old` (a re-hash; may fail: best effort)."""
        ...

    async def touch_app(self, username: str, app: str, when: int, ip: str) -> None:
        """Record an app password's last use."""
        ...

    def addresses(self, username: str) -> set[str]:
        """The addresses `username` may send as (never raises: unknown is empty)."""
        ...

    def logged_in(self, username: str, found: Found | None) -> None:
        """A login of `username` succeeded (`found`: the lookup it verified against;
        None: without one, from the verified-credential cache): what the store keeps of
        the user in memory (its addresses) is kept the longest. Only this makes an entry
        young, so failed logins cannot push a real user's out."""
        ...

    async def owns_address(self, spellings: tuple[str, ...]) -> bool:
        """Whether one of `spellings` is a user's stored address or a user's name."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class Proof:
    """What an OK login verified against (`Login.proof`), for `still_valid`: the store's
    generation then (None: PostgreSQL), the hash that verified, and the app password's
    selector (None: the account password)."""

    gen: int | None
    hash: str
    selector: str | None


class StoreAuthenticator(Authenticator):
    """The login flow over a LoginStore (see the module comment)."""

    def __init__(self, users: LoginStore, hashing: HashPool, *, cache_ttl: float = 300.0,
                 rehash: bool = True, app_passwords: str = "allow") -> None:
        self.users = users
        self.hashing = hashing
        self.hash_threads = hashing.threads
        self.cache = CredentialCache(cache_ttl)
        self._cache_gen: int | None = None
        self._rehash = rehash
        self.app_mode = app_passwords
        self.last_used = apppasswords.LastUsed(users.touch_app)
        self._tasks: set[asyncio.Task[Any]] = set()
        # still_exists: user -> (the store's generation, monotonic time) of the last "yes"
        self._exists: OrderedDict[str, tuple[int | None, float]] = OrderedDict()
        # still_valid: (user, proof) -> (the store's generation, monotonic time) of the
        # last "yes" after a lookup
        self._valid: OrderedDict[tuple[str, Proof], tuple[int | None, float]] = \
            OrderedDict()

    def reload(self, cfg: Config) -> None:
        if cfg.auth.app_passwords != self.app_mode:
            self.app_mode = cfg.auth.app_passwords
            self.cache.clear()  # a cached account-password login must not outlive "require"

    def _allowed(self, app: str) -> bool:
        """Whether a cached pair (`app`: the app password it verified as, or "") may log
        in under the current mode."""
        return bool(app) or self.app_mode != "require"

    async def _dummy(self, password: str | bytes) -> Login:
        """A wrong login paid for like a real one (no user-enumeration oracle)."""
        try:
            done = await self.hashing.run(passwords.verify_dummy, password)
        except RuntimeError:  # pool shut down: we are closing
            return Login(AuthResult.TEMPFAIL)
        return Login(AuthResult.TEMPFAIL if done is None else AuthResult.BAD)

    def _outage(self, username: str, key: bytes, selector: str | None) -> Login:
        if self.users.rides_outages:
            cached = self.cache.get(key)
            if cached is not None and self._allowed(cached[1]):
                # Verified a moment ago: ride it out; checked again (still_valid) once the
                # store answers, like any session's login.
                self.users.logged_in(username, None)
                return Login(AuthResult.OK, cached[1], proof=Proof(
                    None, self.cache.verified(key), selector if cached[1] else None))
        return Login(AuthResult.TEMPFAIL)

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        if not username or not password:
            return Login(AuthResult.BAD)
        if not storable(username):
            # No such name can be in a store (the CLI refuses it; PostgreSQL would refuse
            # the query): a wrong login, not a store failure.
            return await self._dummy(password)
        key = self.cache.key(username, password)
        norm = apppasswords.parse(password)
        selector = apppasswords.selector(norm) if norm is not None else None
        try:
            gen = await self.users.generation()
            if gen is not None:
                if gen != self._cache_gen:
                    self.cache.clear()
                    self._cache_gen = gen
                if self.cache.hit(key, gen) and self._allowed(self.cache.app(key)):
                    app = self.cache.app(key)
                    self.users.logged_in(username, None)
                    self.last_used.record(username, app, client_ip)
                    return Login(AuthResult.OK, app, proof=Proof(
                        gen, self.cache.verified(key), selector if app else None))
            found = await self.users.lookup(username, selector)
        except StoreUnavailable:
            return self._outage(username, key, selector)
        except Exception:  # a bug: logged; never read as OK, nor as BAD
            log.exception("user store lookup failed")
            return self._outage(username, key, selector)
        if found.hash is None:
            self.cache.drop(key)
            return await self._dummy(password)
        if gen is None:
            cached = self.cache.get(key)
            # A cached pair counts only against the very hash it verified: a changed
            # password or a revoked app password (no row) misses.
            if cached is not None and self._allowed(cached[1]) \
                    and cached[0] == self._verified_against(found, cached[1]):
                self.users.logged_in(username, found)
                self.last_used.record(username, cached[1], client_ip)
                return Login(AuthResult.OK, cached[1], proof=Proof(
                    None, str(cached[0]), selector if cached[1] else None))
        try:
            out = await self.hashing.run(apppasswords.decide, self.app_mode, found.hash,
                                         found.app, password)
        except RuntimeError:  # pool shut down: we are closing
            return Login(AuthResult.TEMPFAIL)
        if out is None:  # backlog full
            return Login(AuthResult.TEMPFAIL)
        if not out.ok:
            self.cache.drop(key)
            return Login(AuthResult.BAD, hint=out.hint)
        # Under the generation read *before* the lookup: a change meanwhile misses next.
        self.cache.put(key, out.hash if gen is None else gen, out.app, out.hash)
        self.users.logged_in(username, found)
        self.last_used.record(username, out.app, client_ip)
        if not out.app and self._rehash and passwords.needs_rehash(found.hash):
            t = asyncio.get_running_loop().create_task(
                self._upgrade(username, found.hash, password))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return Login(AuthResult.OK, out.app,
                     proof=Proof(gen, out.hash, selector if out.app else None))

    async def standing(self, username: str, login: Login | None) -> Standing:
        """(Authenticator.standing) One generation read while the store has not changed
        since the login (SQLite): no change, no deletion nor revoke. Otherwise
        still_exists then still_valid."""
        proof = login.proof if login is not None else None
        if isinstance(proof, Proof) and proof.gen is not None \
                and not (proof.selector is None and self.app_mode == "require"):
            try:
                if await self.users.generation() == proof.gen:
                    return Standing.OK
            except StoreUnavailable:
                return Standing.OK  # as still_exists and still_valid: an outage stops none
            except Exception:  # a bug: logged; the session goes on
                log.exception("user store lookup failed")
                return Standing.OK
        return await super().standing(username, login)

    async def still_valid(self, username: str, login: Login) -> bool:
        """(Authenticator.still_valid) One generation read while nothing changed since the
        login or the last "yes" (SQLite); otherwise one lookup, whose "yes" stands until
        the next change (SQLite) or EXISTS_TTL seconds (PostgreSQL, as still_exists):
        the hash `login` verified against must still be the user's account hash (or its
        re-hash, by any process: passwords.is_rehash_of), or its app password's with that
        selector. A user deleted since is `still_exists`'s to refuse (True here)."""
        proof = login.proof
        if not isinstance(proof, Proof):
            return True
        if proof.selector is None and self.app_mode == "require":
            return False
        now = time.monotonic()
        try:
            gen = await self.users.generation()
            if gen is not None and gen == proof.gen:
                return True
            seen = self._valid.get((username, proof))
            if seen is not None and (seen[0] == gen if gen is not None
                                     else now - seen[1] < EXISTS_TTL):
                return True
            found = await self.users.lookup(username, proof.selector)
        except StoreUnavailable:
            return True
        except Exception:  # a bug: logged; the session goes on
            log.exception("user store lookup failed")
            return True
        if found.hash is None:
            return True  # deleted: still_exists answers that (530 5.7.0), not this
        if proof.selector is not None:
            ok = found.app is not None and found.app.hash == proof.hash
        else:
            # A quiet re-hash (here or in another worker or node) is no credential change.
            ok = found.hash == proof.hash or passwords.is_rehash_of(found.hash, proof.hash)
        if ok:
            self._valid[(username, proof)] = (gen, now)
            self._valid.move_to_end((username, proof))
            while len(self._valid) > EXISTS_MAX:
                self._valid.popitem(last=False)
        else:
            self._valid.pop((username, proof), None)
        return ok

    @staticmethod
    def _verified_against(found: Found, app: str) -> str | None:
        if not app:
            return found.hash
        if found.app is None or found.app.name != app:
            return None  # revoked (or replaced): never the account hash
        return found.app.hash

    async def _upgrade(self, username: str, stored: str, password: str | bytes) -> None:
        """Re-hash with our current parameters (best effort; a read-only store is fine)."""
        try:
            # Salted from `stored`: sessions logged in by it, in any process, still hold.
            new = await self.hashing.run(passwords.rehash_password, password, stored)
            if new is not None:
                await self.users.set_hash(username, new, stored)
        except Exception:
            log.debug("rehash of a user's password failed", exc_info=True)

    async def settled(self) -> None:
        """Wait for background work (re-hashes) started by past logins."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def addresses(self, username: str) -> set[str]:
        return self.users.addresses(username)

    async def owns_address(self, spellings: tuple[str, ...]) -> bool | None:
        if not spellings:
            return False
        try:
            return await self.users.owns_address(spellings)
        except StoreUnavailable:
            return None
        except Exception:  # a bug: logged; the recipient is deferred, never refused for it
            log.exception("user store address lookup failed")
            return None

    async def still_exists(self, username: str) -> bool:
        """A store with a generation answers from it while nothing changed since the last
        "yes" (no lookup); otherwise one lookup, whose "yes" stands EXISTS_TTL seconds (a
        user deleted through another node stops within that). A store that cannot be
        asked says True: an outage never stops mail AUTH already let in."""
        now = time.monotonic()
        try:
            gen = await self.users.generation()
            seen = self._exists.get(username)
            if seen is not None and (seen[0] == gen if gen is not None
                                     else now - seen[1] < EXISTS_TTL):
                return True
            found = await self.users.lookup(username, None)
        except StoreUnavailable:
            return True
        except Exception:  # a bug: logged; never stops mail
            log.exception("user store lookup failed")
            return True
        if found.hash is None:
            self._exists.pop(username, None)
            return False
        self._exists[username] = (gen, now)
        self._exists.move_to_end(username)
        while len(self._exists) > EXISTS_MAX:
            self._exists.popitem(last=False)
        return True

    def close(self) -> None:
        self.hashing.shutdown()
        self.last_used.close()
        for t in list(self._tasks):
            t.cancel()
        self.users.close()
