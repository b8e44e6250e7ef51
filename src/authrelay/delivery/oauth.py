"""OAuth 2.0 access tokens for smart-host AUTH, and the SASL responses that carry them.

Owns: getting an access token from the configured token endpoint, caching it in memory,
refreshing it before it expires, and the XOAUTH2 / OAUTHBEARER (RFC 7628) initial client
responses (those are delivery/bearer.py's, re-exported). `client.py` asks for a token
when it authenticates to a smart host; it never imports this module (Authlib, httpx2
and joserfc cost ~0.3 s CPU to import): wiring.py makes the TokenSource only when
a smart host is authenticated with OAuth ([relay] smart_host_auth = xoauth2 or
oauthbearer, or a [[relay.smart_host_oauth]] table), and `serve`'s preload() imports this
module before a privilege drop whatever the config (a SIGHUP may turn OAuth on later).
Each smart host's settings are a config.SmartHostOAuth: its own table, else the [relay]
smart_host_auth / smart_host_user / smart_host_oauth_* keys.

Grants (`grant`, [relay] smart_host_oauth_grant):
- "client_credentials" (RFC 6749 4.4), the client authenticated either with a client
  secret in the request body (`client_secret_post`, RFC 6749 2.3.1; as Microsoft Entra
  documents it) or with a `private_key_jwt` assertion (RFC 7523 2.2, OpenID Connect Core
  9) signed by a certificate's private key; the JWT header carries the certificate's
  `x5t` and `x5t#S256` thumbprints, which Entra uses to find the certificate.
- "jwt_bearer" (RFC 7523 2.1): a JWT signed by a Google service account's key whose
  `sub` is the user to send as (domain-wide delegation) and whose `scope` claim names the
  scope (Google's form of the grant).
The OAuth side is Authlib's, over its httpx2 client (asynchronous, in the courier's event
loop): see README "Microsoft 365 / Google as smart host" for why Authlib. The endpoint's
certificate is checked against `ca_file` ([relay] smart_host_oauth_ca_file), else the
system's trust store.

Contract: `await TokenSource(settings).get()` -> an access token (str), or `TokenError`
whose text names the cause (endpoint unreachable, TLS failure, the endpoint's `error` and
`error_description`, an unreadable key file) and never a secret or a token.
`drop(token)`: the smart host refused it; the next `get()` fetches a new one (True),
except that a token fetched to replace a refused one and refused too within `fail_hold`
seconds is kept (False): the cause is not the token (a missing permission, a blocked
tenant), so a queue of mail asks the endpoint once per `fail_hold`, not once a message.
- One fetch at a time: concurrent deliveries wait for the same fetch (a task each caller
  awaits shielded: a caller cut short, its delivery attempt's time up, leaves it running
  for the others and its token cached for the next attempt; the fetch's own `timeout`
  ends it).
- A token is used until 80% of its `expires_in` or until 5 minutes before it expires,
  whichever is earlier (never less than half of it; `expires_in` at most 1 day, none:
  1 hour, 0 or less: 1 minute), then replaced; if the refresh
  fails while the old token has not expired yet, the old one is still used.
- One fetch is bounded whatever the endpoint does: all of it (connecting, TLS, the
  request, the whole answer) within `timeout` seconds (a total deadline: httpx2's own
  timeouts are per read, so an endpoint dripping a byte a second would hold the delivery
  for ever), an answer of at most MAX_ANSWER bytes (read as it streams in, never
  buffered past that), uncompressed, and no redirect followed. Only to https:// (the
  config checks token_url; a service-account file's token_uri is checked here).
- After a failed fetch, further `get()`s fail at once with the same cause for
  `fail_hold` seconds, so a queue of mail does not hammer a refusing endpoint.
- Tokens live only in this object's memory: never logged, never written to disk. The
  secret or key file is read at each fetch (as root through the key helper when the
  process dropped privileges: docs/PRIVILEGES.md) and not kept.
Failure policy: every failure is transient (the caller defers the mail `4.7.0`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote, quote_plus

import httpx2
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncAssertionClient, AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from authrelay.config import SmartHostOAuth
from authrelay.delivery.bearer import TokenError, oauthbearer, server_error, xoauth2

# RFC 6750 2.1 b64token: what a Bearer token may contain (no space, no ^A, no CR/LF), so
# it can never break the SASL framing or the SMTP line it travels in.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_TOKEN = 8192  # a Microsoft token is ~2-3 KB; RFC 4954 4 lines may be 12288 octets
_MAX_TEXT = 200  # of an endpoint's error_description quoted in the maillog
MAX_ANSWER = 64 * 1024  # bytes of a token endpoint's answer (Entra's is ~4 KB)
_DEFAULT_LIFETIME = 3600.0  # when the endpoint says no expires_in (RFC 6749 5.1: optional)
# The lifetime we act on, whatever the endpoint says: an "expires_in" of 0 or less must not
# cost one token request per message of a queue (taken as a minute: a dead token is refused
# by the smart host, dropped and replaced), nor one of 1e300 keep a token for ever.
_NONPOSITIVE_LIFETIME, _MAX_LIFETIME = 60.0, 86400.0
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float  # monotonic: fetch a new one from here on
    expires_at: float  # monotonic: unusable from here on


@dataclass(frozen=True)
class SigningKey:
    """A private key for a JWT assertion, with the header fields that name it."""

    key: RSAKey | ECKey
    alg: str
    header: dict[str, str]
    issuer: str = ""  # from a Google service-account JSON: client_email
    token_url: str = ""  # from a Google service-account JSON: token_uri


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_signing_key(data: bytes) -> SigningKey:
    """A PEM private key (RSA or EC P-256), optionally followed by its certificate (Entra:
    the thumbprints go in the JWT header), or a Google service-account JSON key file.
    ValueError with a reason otherwise (the key material is never in the message)."""
    text = data.decode("utf-8", "replace").strip()
    issuer = token_url = ""
    header: dict[str, str] = {}
    if text.startswith("{"):
        try:
            info = json.loads(text)
            pem = info["private_key"].encode("utf-8")
            issuer = str(info.get("client_email", ""))
            token_url = str(info.get("token_uri", ""))
            if info.get("private_key_id"):
                header["kid"] = str(info["private_key_id"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError("not a service-account JSON key (no private_key)") from None
    else:
        pem = data
    try:
        priv = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"no usable unencrypted PEM private key ({type(e).__name__})") \
            from None
    if b"-----BEGIN CERTIFICATE-----" in pem:
        try:
            cert = x509.load_pem_x509_certificates(pem)[0]
        except ValueError:
            raise ValueError("the certificate in the key file does not load") from None
        der = cert.public_bytes(serialization.Encoding.DER)
        if cert.public_key().public_numbers() != priv.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("the certificate does not belong to the private key")
        header["x5t"] = _b64url(hashlib.sha1(der).digest())  # a name for the cert, not a MAC
        header["x5t#S256"] = _b64url(hashlib.sha256(der).digest())
    key_pem = priv.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    if isinstance(priv, rsa.RSAPrivateKey):
        return SigningKey(RSAKey.import_key(key_pem), "RS256", header, issuer, token_url)
    if isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp256r1":
        return SigningKey(ECKey.import_key(key_pem), "ES256", header, issuer, token_url)
    raise ValueError("the key must be RSA or EC P-256")


def _valid_token(tok: Any) -> str:
    if not isinstance(tok, str) or not tok or len(tok) > _MAX_TOKEN \
            or not _B64TOKEN.fullmatch(tok):
        raise TokenError("the token endpoint returned no usable access_token")
    return tok


def _lifetime(expires_in: Any) -> tuple[float, float]:
    """(use for, valid for) seconds: replaced at 80% of the lifetime or 5 minutes before
    it ends, whichever is earlier (but not before half of it: short-lived test tokens).
    The lifetime is `expires_in` (none or not a number: an hour; 0 or less: a minute), at
    most a day."""
    try:
        life = float(expires_in)
    except OverflowError:  # an integer past any float (JSON's 1 and 400 zeros): a day,
        life = _MAX_LIFETIME if expires_in > 0 else _NONPOSITIVE_LIFETIME  # or a minute
    except (TypeError, ValueError):
        life = _DEFAULT_LIFETIME
    if not math.isfinite(life):
        life = _DEFAULT_LIFETIME
    life = min(life if life > 0 else _NONPOSITIVE_LIFETIME, _MAX_LIFETIME)
    return min(0.8 * life, max(life - 300.0, 0.5 * life)), life


def _short(text: Any) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= _MAX_TEXT else s[:_MAX_TEXT] + "..."


# A JWS compact serialization (RFC 7515 7.1): what a client assertion or a token looks like.
_JWS = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def _scrub(text: Any, secrets: tuple[str, ...]) -> str:
    """An endpoint's text for the maillog with what we sent cut out: an error_description
    may quote the request (the client secret, as sent or form-encoded; the signed
    assertion, usable until it expires), and the maillog is read by more people than
    the 0600 secret or key file."""
    s = str(text or "")
    for secret in secrets:
        for form in {secret, quote_plus(secret), quote(secret, safe="")}:
            if len(form) >= 4:
                s = s.replace(form, "[redacted]")
    return _JWS.sub("[redacted]", s)


class _Refused(Exception):
    """The answer was not read to its end: too large, compressed, a redirect, too slow."""


def _http_reason(e: Exception, s: SmartHostOAuth) -> str:
    if isinstance(e, httpx2.TimeoutException):
        return "the token endpoint timed out"
    if isinstance(e, httpx2.HTTPStatusError):
        return f"the token endpoint answered HTTP {e.response.status_code}"
    if isinstance(e, httpx2.ConnectError):
        cause: BaseException | None = e
        while cause is not None:  # httpx2 wraps the ssl error: look down the chain
            if isinstance(cause, ssl.SSLError):
                return "TLS handshake with the token endpoint failed (check " \
                    f"{s.key('ca_file')})"
            cause = cause.__cause__ or cause.__context__
        return "the token endpoint is unreachable (connection refused or no route)"
    return f"request to the token endpoint failed ({type(e).__name__})"


class _CappedStream(httpx2.AsyncByteStream):
    """The answer's body, read at most `cap` bytes far."""

    def __init__(self, inner: httpx2.AsyncByteStream, cap: int) -> None:
        self.inner, self.cap = inner, cap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        n = 0
        async for chunk in self.inner:
            n += len(chunk)
            if n > self.cap:
                raise _Refused(f"the token endpoint's answer is larger than "
                               f"{self.cap // 1024} KiB (not read further)")
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Bounded(httpx2.AsyncBaseTransport):
    """httpx2's transport, with the answer checked before its body is read: no redirect
    is followed (httpx2 would re-POST the secret or assertion to wherever a 307/308
    points, http:// included), nothing compressed is taken (we ask for identity: a
    64 KiB gzip body inflates to megabytes), and the body is capped."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, cap: int, url_key: str) -> None:
        self.inner, self.cap, self.url_key = inner, cap, url_key

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        resp = await self.inner.handle_async_request(request)
        why = ""
        if 300 <= resp.status_code < 400:
            why = "the token endpoint answered with a redirect (not followed: the secret " \
                f"goes only to {self.url_key})"
        elif resp.headers.get("content-encoding", "identity").lower() != "identity":
            why = "the token endpoint's answer is compressed (identity was asked for)"
        if why or not isinstance(resp.stream, httpx2.AsyncByteStream):
            await resp.aclose()
            raise _Refused(why or "the token endpoint's answer has no body stream")
        return httpx2.Response(resp.status_code, headers=resp.headers,
                               stream=_CappedStream(resp.stream, self.cap),
                               extensions=resp.extensions)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """The configured CA file, else the system's trust store (/etc/ssl/certs)."""
    return ssl.create_default_context(cafile=ca_file or None)


class TokenSource:
    """Access tokens for one smart host's OAuth settings (config.SmartHostOAuth: its
    [[relay.smart_host_oauth]] table or the [relay] keys); the courier keeps one per
    distinct settings."""

    def __init__(self, settings: SmartHostOAuth, *, read_secret: Callable[[], bytes] | None = None,
                 timeout: float = 30.0, fail_hold: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.read_secret = read_secret  # the key helper's, when privileges were dropped
        self.timeout = timeout
        self.fail_hold = fail_hold
        self.clock = clock
        self._token: _Token | None = None
        self._failed: tuple[float, str] | None = None  # (until, why)
        self._replacing = False  # the next fetch replaces a token the smart host refused
        self._refused_hold = 0.0  # until then, a refused replacement is kept (drop)
        self._getting: asyncio.Task[str] | None = None  # the fetch under way (get)
        self.fetches = 0  # tokens requested from the endpoint (tests, metrics)

    # ------------------------------------------------------------------ API
    async def get(self) -> str:
        tok = self._token
        if tok is not None and self.clock() < tok.refresh_at:
            return tok.value
        loop = asyncio.get_running_loop()
        task = self._getting
        if task is None or task.done() or task.get_loop() is not loop:
            # One fetch at a time: every caller meanwhile gets its result.
            task = loop.create_task(self._get())
            self._getting = task
            task.add_done_callback(self._landed)
        # shield: a caller cut short (its delivery attempt's time up: attempt_timeout)
        # leaves the fetch to the others, and its token to the next attempt.
        return await asyncio.shield(task)

    def _landed(self, task: asyncio.Task[str]) -> None:
        if self._getting is task:
            self._getting = None
        if not task.cancelled():
            task.exception()  # retrieved (asyncio warns of an error no caller awaited)

    async def _get(self) -> str:
        tok, now = self._token, self.clock()
        if tok is not None and now < tok.refresh_at:
            return tok.value
        if self._failed is not None and now < self._failed[0]:
            if tok is not None and now < tok.expires_at - 30:
                return tok.value
            raise TokenError(self._failed[1])
        try:
            value, expires_in = await self._fetch()
        except TokenError as e:
            self._failed = (self.clock() + self.fail_hold, str(e))
            if tok is not None and self.clock() < tok.expires_at - 30:
                return tok.value  # the old one is still good for a while
            self._token = None
            raise
        self._failed = None
        now = self.clock()
        if self._replacing:
            self._replacing = False
            self._refused_hold = now + self.fail_hold
        use, life = _lifetime(expires_in)
        self._token = _Token(value, now + use, now + life)
        return value

    def drop(self, token: str) -> bool:
        """The smart host refused `token`. True: the next get() gives another token (a
        fresh fetch, or one fetched meanwhile). False: `token` was itself fetched, less
        than `fail_hold` seconds ago, to replace a refused token, and is kept: a smart
        host that refuses every token (no SMTP.SendAsApp, no delegation) must not cost
        the token endpoint one request per message of the queue."""
        if self._token is None or self._token.value != token:
            self._failed = None
            return True  # gone already (another delivery's refusal, or expired)
        if self.clock() < self._refused_hold:
            return False
        self._token = None
        self._failed = None
        self._replacing = True
        return True

    # ------------------------------------------------------------------ fetching
    def _secret(self) -> bytes:
        s = self.settings
        path = s.secret_file or s.key_file
        what = s.key("secret_file" if s.secret_file else "key_file")
        try:
            if self.read_secret is not None:
                return self.read_secret()
            with open(path, "rb") as f:
                return f.read(64 * 1024)
        except OSError as e:
            raise TokenError(f"cannot read {what}: {e.strerror or e}") from None

    async def _fetch(self) -> tuple[str, Any]:
        """One token request, all of it (connecting, TLS, the request, the whole answer)
        within `self.timeout` seconds and its answer within MAX_ANSWER bytes.
        -> (access_token, expires_in)."""
        s = self.settings
        self.fetches += 1
        secret = await asyncio.to_thread(self._secret)  # the key helper's socket blocks
        try:
            ctx = _tls_context(s.ca_file)
        except OSError as e:
            raise TokenError(f"cannot read {s.key('ca_file')}: {e.strerror or e}") from None
        except ssl.SSLError:
            raise TokenError(f"{s.key('ca_file')} holds no usable certificate") from None
        http: dict[str, Any] = {
            "verify": ctx, "timeout": self.timeout, "follow_redirects": False,
            "headers": {"Accept-Encoding": "identity"},
            "transport": _Bounded(httpx2.AsyncHTTPTransport(verify=ctx), MAX_ANSWER,
                                  s.key("token_url"))}
        url = s.token_url
        client: httpx2.AsyncClient
        fetch: Callable[[], Awaitable[Any]]
        hide: tuple[str, ...] = ()  # what we send, never quoted back into the maillog
        if s.grant == "client_credentials" and s.secret_file:
            hide = (secret.decode("utf-8", "replace").strip("\r\n"),)
            cs = AsyncOAuth2Client(
                s.client_id, hide[0],
                token_endpoint_auth_method="client_secret_post",
                scope=s.scope, **http)
            client, fetch = cs, partial(cs.fetch_token, url, grant_type="client_credentials")
        else:
            try:
                key = load_signing_key(secret)
            except ValueError as e:
                raise TokenError(f"{s.key('key_file')}: {e}") from None
            url = url or key.token_url
            if not url.startswith("https://"):
                # token_url is checked at load (config); a service-account file's own
                # token_uri only here: the signed assertion must not travel in clear.
                raise TokenError(f"{s.key('key_file')}: its token_uri {_short(url)!r} is "
                                 f"not https:// (set {s.key('token_url')})")
            if s.grant == "client_credentials":
                ks = AsyncOAuth2Client(
                    s.client_id, key.key,
                    token_endpoint_auth_method=PrivateKeyJWT(
                        url, headers=dict(key.header), alg=key.alg),
                    scope=s.scope, **http)
                # client_id in the body too: Entra requires it beside the assertion.
                client, fetch = ks, partial(ks.fetch_token, url,
                                            grant_type="client_credentials",
                                            client_id=s.client_id)
            else:
                # Google's JWT bearer grant: the scope is a claim of the assertion.
                jb = AsyncAssertionClient(
                    token_endpoint=url, issuer=s.client_id or key.issuer,
                    subject=s.user, audience=url, claims={"scope": s.scope},
                    key=key.key, header={"alg": key.alg, "typ": "JWT", **key.header}, **http)
                client, fetch = jb, jb.refresh_token
        del secret
        try:
            # The whole exchange, whatever the endpoint does: httpx2's timeout is per
            # read, so an endpoint dripping a byte a second would hold it for ever.
            async with asyncio.timeout(self.timeout):
                token = await fetch()
        except TimeoutError:
            raise TokenError(f"the token endpoint did not answer within "
                             f"{self.timeout:g} s") from None
        except _Refused as e:
            raise TokenError(str(e)) from None
        except OAuthError as e:
            raise TokenError(f"the token endpoint refused: {_short(_scrub(e.error, hide))}"
                             + (f" ({_short(_scrub(e.description, hide))})"
                                if e.description else "")) from None
        except httpx2.HTTPError as e:
            raise TokenError(_http_reason(e, s)) from None
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            # A 200 answer the JSON decoder or Authlib's token parsing cannot take: not
            # JSON, nested past the decoder's depth (RecursionError, well under
            # MAX_ANSWER), an expires_in/expires_at of 1e400 (OverflowError) or a list
            # (TypeError).
            raise TokenError("the token endpoint's answer is not a token: "
                             f"{_short(_scrub(e, hide))}") from None
        finally:
            await client.aclose()
        if not isinstance(token, dict):
            raise TokenError("the token endpoint's answer is not a token")
        if str(token.get("token_type", "bearer")).lower() != "bearer":
            raise TokenError("the token endpoint issued a "
                             f"{_short(_scrub(token['token_type'], hide))} "
                             "token, not a Bearer token")
        return _valid_token(token.get("access_token")), token.get("expires_in")


__all__ = ["JWT_BEARER", "SigningKey", "TokenError", "TokenSource", "load_signing_key",
           "oauthbearer", "server_error", "xoauth2"]
