"""Logins as USER@REALM for the realms whose users are stored by their bare name.

Owns `[auth] realms`. Cyrus SASL (sendmail + saslauthd/sasldb) accepts `alice@REALM` and
`alice` as the same login for its default realm (the host's name); `authrelay import
sasldb` stores the users of such a realm by their bare name. So that mail clients set up
with `alice@relay.example.org` keep working after the move, `RealmLogins` wraps the
configured authenticator: a login whose part after the last `@` is one of `realms`
(compared without case) is checked as the part before it, once (never a second password
check: no extra hashing for a wrong password). Every other name passes unchanged. The
AUTH maillog lines keep the name as the client sent it; everything counted or decided per
user (the AUTH lockout, rates, containment, the queue's auth_user) is by the stored name
(`account`, the wrapped authenticator's account of the stored name), so `alice@REALM`
in any case is alice, never an account of its own:
otherwise a suspended alice sends on as `alice@REALM`, and a guesser gets a lockout budget
per spelling. A user whose stored name
itself ends in `@REALM` for a listed realm cannot log in by that name: do not list a
realm that is also a mail domain of stored `user@domain` names.
Contract: the Authenticator interface (auth/base.py), delegating to the wrapped one;
`reload(cfg)` takes the new list (SIGHUP). Failure policy: that of the wrapped one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from authrelay.auth.base import Authenticator, Login, Standing

if TYPE_CHECKING:
    from authrelay.config import Config


def stored_name(realms: set[str] | frozenset[str], username: str) -> str:
    """`username` without its `@REALM` when REALM (lower case) is one of `realms`."""
    if realms and "@" in username:
        user, _, realm = username.rpartition("@")
        if user and realm.lower() in realms:
            return user
    return username


class RealmLogins(Authenticator):
    def __init__(self, inner: Authenticator, realms: tuple[str, ...]) -> None:
        self.inner = inner
        self.realms = {r.lower() for r in realms}

    def name(self, username: str) -> str:
        """The stored name a login names."""
        return stored_name(self.realms, username)

    def account(self, username: str) -> str:
        return self.inner.account(self.name(username))

    async def login(self, username: str, password: str | bytes,
                    client_ip: str = "") -> Login:
        return await self.inner.login(self.name(username), password, client_ip)

    async def still_valid(self, username: str, login: Login) -> bool:
        return await self.inner.still_valid(self.name(username), login)

    def addresses(self, username: str) -> set[str]:
        return self.inner.addresses(self.name(username))

    async def owns_address(self, spellings: tuple[str, ...]) -> bool | None:
        # A user stored by its bare name logs in, and so sends, as NAME@REALM.
        bare = tuple(n for n in (self.name(s) for s in spellings) if n not in spellings)
        return await self.inner.owns_address(spellings + bare)

    async def still_exists(self, username: str) -> bool:
        return await self.inner.still_exists(self.name(username))

    async def standing(self, username: str, login: Login | None) -> Standing:
        return await self.inner.standing(self.name(username), login)

    def reload(self, cfg: Config) -> None:
        self.realms = {r.lower() for r in cfg.auth.realms}
        self.inner.reload(cfg)

    def close(self) -> None:
        self.inner.close()
