"""SASL XOAUTH2 and OAUTHBEARER (RFC 7628) for smart-host AUTH: what the client sends.

Owns: the initial client responses that carry an OAuth 2.0 Bearer token, the server's
JSON error challenge read for the maillog, `TokenError`, and `Tokens`, what the courier
(client.py) needs of a token source. It imports no OAuth library: the token source itself
(delivery/oauth.py, Authlib) is loaded only when [relay] smart_host_auth asks for it.

Contract: `xoauth2()` / `oauthbearer()` -> base64 bytes for `AUTH MECH <resp>`;
`server_error(challenge)` -> "status=... schemes=... scope=..." or "".
`Tokens.get()` -> an access token or TokenError; `Tokens.drop(token)`: the server
refused it (True: the next get() gives another token; False: none to try now).
`redact(text, *secrets)`: a server's reply with what we sent cut out.
Failure policy: `server_error` never raises (a challenge that is not base64 JSON: "");
nothing here logs, and a token is never part of an error text.
"""

from __future__ import annotations

import base64
import json
from typing import Protocol

_MAX_TEXT = 200  # of a server's error challenge quoted in the maillog


class TokenError(Exception):
    """No token: the text names the cause, for the maillog (never a secret)."""


class Tokens(Protocol):
    """An access-token source (oauth.TokenSource)."""

    async def get(self) -> str: ...

    def drop(self, token: str) -> bool: ...


def _short(text: str) -> str:
    s = " ".join(text.split())
    return s if len(s) <= _MAX_TEXT else s[:_MAX_TEXT] + "..."


def xoauth2(user: str, token: str) -> bytes:
    """XOAUTH2 (Google's and Microsoft's documented format): base64 of
    "user=" USER ^A "auth=Bearer " TOKEN ^A ^A."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)


def _saslname(user: str) -> str:
    """RFC 5801 saslname: ',' and '=' escaped as =2C and =3D."""
    return user.replace("=", "=3D").replace(",", "=2C")


def oauthbearer(user: str, token: str, host: str, port: int) -> bytes:
    """RFC 7628 3.1 client response: a GS2 header naming the user, then host, port and
    the Bearer token as ^A-separated key/value pairs, ending ^A ^A."""
    raw = (f"n,a={_saslname(user)},\x01host={host}\x01port={port}\x01"
           f"auth=Bearer {token}\x01\x01").encode()
    return base64.b64encode(raw)


def redact(text: str, *secrets: str) -> str:
    """A server's reply with our secrets cut out (an echo of the token, the password or
    the SASL response we sent), for the maillog, bounces and doctor's report."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


def server_error(challenge: str) -> str:
    """The JSON error a server sends as a 334 challenge on failure (RFC 7628 3.2.2;
    Google's XOAUTH2 likewise), shortened for the maillog; '' if there is none."""
    try:
        data = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (ValueError, TypeError):
        return ""
    if not isinstance(data, dict):
        return ""
    return _short(" ".join(f"{k}={v}" for k, v in data.items()
                           if k in ("status", "schemes", "scope")))


__all__ = ["TokenError", "Tokens", "oauthbearer", "redact", "server_error", "xoauth2"]
