"""External password checkers: Cyrus saslauthd and the Dovecot auth server, over unix sockets.

Owns: the two wire protocols, client side.
- saslauthd (cyrus-sasl saslauthd/ipc_unix.c): the client writes four counted strings
  (2-byte big-endian length, then the bytes): login, password, service, realm; the server
  answers one counted string starting "OK" or "NO" and closes.
- Dovecot auth client protocol v1.2 (doc.dovecot.org "Dovecot Authentication Protocol"):
  both sides send VERSION; the client sends CPID, the server MECH/SPID/CUID/COOKIE/DONE;
  then `AUTH <id> PLAIN service=smtp secured no-penalty resp=<base64>` answered by
  `OK <id> ...`, `FAIL <id> ...` (with `temp` for a temporary failure) or `CONT`.
  One connection per check: no shared state to corrupt, and Dovecot answers in microseconds.

Contract: `check()` returns True (accepted) or False (rejected). Failure policy: anything
else - socket missing or refused, no answer within the timeout, a garbled or oversized
answer, a Dovecot temporary failure - raises `BackendUnavailable`, which the server answers
with 454 4.7.0 (RFC 4954 6: temporary authentication failure). It never hangs past the
timeout and never lets a backend's reply crash a session.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

SERVICE = "smtp"
_MAX_LINE = 16384  # a Dovecot line we accept; longer is garbage


T = TypeVar("T")


class BackendUnavailable(Exception):
    """The backend could not give an answer (down, slow, garbled)."""


def _counted(s: str | bytes) -> bytes:
    # Raw octets: a password that is not UTF-8 reaches saslauthd byte for byte (it is
    # carried as a str with surrogate escapes, see passwords.raw()).
    raw = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    if len(raw) > 0xFFFF:
        raise ValueError("field too long for saslauthd")
    return struct.pack(">H", len(raw)) + raw


async def _exchange(name: str, path: str, timeout: float,
                    talk: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                   Awaitable[T]], *, limit: int = 1 << 16) -> T:
    """One request on a fresh connection to the unix socket `path`, within `timeout`:
    `talk(reader, writer)` says what; the connection is closed whatever happens. No
    answer in time, a refused or reset connection, a short read: BackendUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=limit)
            try:
                return await talk(reader, writer)
            finally:
                writer.close()
    except TimeoutError:
        raise BackendUnavailable(f"{name} {path}: no answer in {timeout:g}s") from None
    except (OSError, asyncio.IncompleteReadError, EOFError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise BackendUnavailable(f"{name} {path}: {type(e).__name__}: {why}") from None


class SaslauthdBackend:
    """Checks passwords with saslauthd at `path` (its mux socket)."""

    def __init__(self, path: str, timeout: float = 5.0, service: str = SERVICE) -> None:
        self.path = path
        self.timeout = timeout
        self.service = service

    def __repr__(self) -> str:
        return f"<SaslauthdBackend {self.path}>"

    async def check(self, username: str, password: str | bytes) -> bool:
        # Like the Cyrus library, "user@realm" is sent as login "user", realm "realm"
        # (sasldb keys users by realm; saslauthd -r joins them again for pam/shadow).
        # An empty realm is none: sasldb reads it as its default realm, so `alice@` was
        # alice, an account of its own here (a suspended alice sent on as `alice@`).
        login, at, realm = username.rpartition("@")
        if not at or not login or not realm:
            login, realm = username, ""
        try:
            request = (_counted(login) + _counted(password) + _counted(self.service)
                       + _counted(realm))
        except ValueError:
            return False  # a 64 KiB user name is not a user

        async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(request)
            await writer.drain()
            size = struct.unpack(">H", await reader.readexactly(2))[0]
            return await reader.readexactly(size)

        answer = await _exchange("saslauthd", self.path, self.timeout, talk)
        if answer.startswith(b"OK"):
            return True
        if answer.startswith(b"NO"):
            return False
        raise BackendUnavailable(f"saslauthd {self.path}: unexpected answer")


class DovecotBackend:
    """Checks passwords with the Dovecot auth server's auth-client socket at `path`."""

    def __init__(self, path: str, timeout: float = 5.0, service: str = SERVICE) -> None:
        self.path = path
        self.timeout = timeout
        self.service = service
        self._next_id = 0

    def __repr__(self) -> str:
        return f"<DovecotBackend {self.path}>"

    async def check(self, username: str, password: str | bytes) -> bool:
        return (await self.authenticate(username, password))[0]

    async def authenticate(self, username: str, password: str | bytes) -> tuple[bool, str]:
        """(accepted, the user Dovecot took the login for): its OK's or FAIL's `user=`,
        the name after its auth_username_format (`%Lu` by default, so `ALICE` is
        `alice`; `%Ln`: `alice@x` is `alice`), else the name as sent. Raises
        BackendUnavailable like check()."""
        self._next_id = self._next_id % 0xFFFFFFF + 1
        req_id = str(self._next_id)
        resp = base64.b64encode(b"\0" + username.encode("utf-8", "surrogateescape") + b"\0"
                                + (password if isinstance(password, bytes)
                                   else password.encode("utf-8", "surrogateescape")))

        async def talk(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> list[str]:
            writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
            await self._handshake(reader)
            # secured: the SMTP layer only offers AUTH over TLS (or it is the admin's
            # explicit choice), so Dovecot's disable_plaintext_auth must not refuse it.
            # no-penalty: our own throttle counts failures; one penalty for every user
            # behind this relay's single IP would be wrong.
            writer.write(f"AUTH\t{req_id}\tPLAIN\tservice={self.service}\tsecured"
                         f"\tno-penalty\tresp={resp.decode()}\n".encode())
            await writer.drain()
            while True:
                fields = await self._line(reader)
                if len(fields) >= 2 and fields[1] == req_id:
                    return fields

        fields = await _exchange("dovecot", self.path, self.timeout, talk, limit=_MAX_LINE)
        verb, params = fields[0], fields[2:]
        named = next((p[5:] for p in params if p.startswith("user=")), "")
        # A value with Dovecot's tab escapes (\t, \1...) or empty: the name as sent.
        named = named if named and "\\" not in named else username
        if verb == "OK":
            return True, named
        if verb == "FAIL":
            if "temp" in params or "code=temp_fail" in params:
                raise BackendUnavailable(f"dovecot {self.path}: temporary failure")
            return False, named
        # CONT would mean Dovecot wants another round for PLAIN: not a valid answer.
        raise BackendUnavailable(f"dovecot {self.path}: unexpected answer")

    async def _line(self, reader: asyncio.StreamReader) -> list[str]:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise BackendUnavailable(f"dovecot {self.path}: line too long") from None
        except asyncio.IncompleteReadError:
            raise BackendUnavailable(f"dovecot {self.path}: connection closed") from None
        try:
            return raw[:-1].decode("utf-8").split("\t")
        except UnicodeDecodeError:
            raise BackendUnavailable(f"dovecot {self.path}: garbled answer") from None

    async def _handshake(self, reader: asyncio.StreamReader) -> None:
        fields = await self._line(reader)
        # The major version must match; minor versions are compatible by design.
        if len(fields) < 3 or fields[0] != "VERSION" or fields[1] != "1":
            raise BackendUnavailable(f"dovecot {self.path}: not a Dovecot auth socket")
        mechs: set[str] = set()
        for _ in range(1000):
            fields = await self._line(reader)
            if fields[0] == "DONE":
                break
            if fields[0] == "MECH" and len(fields) >= 2:
                mechs.add(fields[1].upper())
        else:
            raise BackendUnavailable(f"dovecot {self.path}: handshake never ended")
        if "PLAIN" not in mechs:
            raise BackendUnavailable(f"dovecot {self.path}: PLAIN not enabled "
                                     "(auth_mechanisms)")
