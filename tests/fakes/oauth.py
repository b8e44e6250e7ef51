"""A fake OAuth 2.0 token endpoint (HTTPS on loopback) and a smart host that checks the
tokens it issued, for the smart-host OAuth tests.

`TokenEndpoint(ca)`: a real HTTPS server (http.server in a thread, certificate from the
trustme CA for 127.0.0.1) at `url` (https://127.0.0.1:PORT/token). It checks, as Entra
and Google do:
- client_credentials with `client_secret_post` (client_id + client_secret in the body),
- client_credentials with a `private_key_jwt` assertion (RFC 7523 2.2): signature by
  the registered public key, iss = sub = client_id, aud = the token URL, exp in the
  future, a jti, and (when a certificate is registered) its `x5t#S256` thumbprint,
- the JWT bearer grant (RFC 7523 2.1): signature by the service account's key, iss =
  its client_email, aud = the token URL, `scope` claim, and `sub` = the delegated user,
and answers `{"access_token", "token_type": "Bearer", "expires_in"}` or a 400/401 with
`{"error", "error_description"}`. Tokens expire after `expires_in` seconds (settable).
Records `issued` (token -> (user or None, expires at)) and `requests` (grant types).

`OAuthSmartHost`: the aiosmtpd fake smart host offering AUTH XOAUTH2 and OAUTHBEARER
(only), accepting a token the endpoint issued and has not expired (for a JWT-bearer token,
only for the user it was issued for). Refusals: XOAUTH2 answers `535 5.7.3` directly
(Microsoft's way); OAUTHBEARER first sends the RFC 7628 3.2.2 JSON error as a 334
challenge, then 535 after the client's ^A. Records `oauth_attempts` [(mech, user, ok)].
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import secrets
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from fakes.smtpserver import FakeSMTPServer, _Handler

CLIENT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenEndpoint:
    def __init__(self, ca: Any, *, client_id: str = "app-id", secret: str = "",
                 public_key_pem: bytes | None = None, cert_der: bytes | None = None,
                 service_account: str = "", scope: str = "https://outlook.office365.com/.default",
                 expires_in: int = 3600, host: str = "127.0.0.1") -> None:
        self.client_id, self.secret, self.scope = client_id, secret, scope
        self.public_key = RSAKey.import_key(public_key_pem) if public_key_pem else None
        self.cert_der = cert_der
        self.service_account = service_account
        self.expires_in = expires_in
        self.issued: dict[str, tuple[str | None, float]] = {}
        self.requests: list[str] = []
        self.refusals: list[str] = []
        self.status_override: int | None = None  # e.g. 503: the endpoint is "down"
        self.redirect: str = ""  # a URL: every POST is answered 307 to it (a hostile hop)
        # Hostile or broken endpoints: `drip` seconds between the answer's bytes (status
        # line and headers included), `oversize` bytes of answer (a JSON token padded out),
        # `gzip`: the answer compressed (Content-Encoding: gzip) though identity was asked.
        self.drip = 0.0
        self.oversize = 0
        self.gzip = False
        self.body: bytes | None = None  # the answer's body as is (malformed JSON, say), 200
        # set: every request waits, unanswered, until it is set again (a stalled endpoint);
        # `held` counts the requests that waited
        self.hold = threading.Event()
        self.hold.set()
        self.held = 0
        # a refusal's error_description quotes what the client sent (secret, assertion)
        self.echo = False
        self.forms: list[dict[str, str]] = []
        self.accept_encoding: list[str] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        cert = ca.issue_cert(host)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(n).decode()).items()}
                if not fake.hold.is_set():
                    fake.held += 1
                    while not fake.hold.wait(0.05) and not fake._stopping.is_set():
                        pass
                if fake.redirect:
                    self.send_response(307)
                    self.send_header("Location", fake.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fake.accept_encoding.append(self.headers.get("Accept-Encoding", ""))
                status, body = fake._answer(self.path, form)
                fake.forms.append(form)
                if fake.echo and "error" in body:
                    body = {**body, "error_description": body.get("error_description", "")
                            + " (request: " + " ".join(  # the secret-bearing fields first
                                f"{k}={v}" for k, v in sorted(
                                    form.items(), key=lambda kv: kv[0] != "client_secret"
                                    and kv[0] != "client_assertion"))
                            + ")"}
                if fake.oversize:
                    body = {**body, "padding": "x" * fake.oversize}
                raw = json.dumps(body).encode()
                if fake.body is not None:
                    status, raw = 200, fake.body
                if fake.gzip:
                    raw = gzip.compress(raw)
                if fake.drip:
                    fake._drip(self, status, raw)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if fake.gzip:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except OSError:  # the client stopped reading (an answer too large)
                    pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://{host}:{self.port}/token"
        # poll_interval: how long shutdown() may wait for the loop to notice (default 0.5 s)
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def _drip(self, handler: BaseHTTPRequestHandler, status: int, raw: bytes) -> None:
        """The whole answer a byte at a time, `drip` seconds apart, until the client goes
        away or the endpoint stops."""
        head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\n\r\n").encode()
        for i in range(len(head) + len(raw)):
            if self._stopping.wait(self.drip):
                return
            try:
                handler.wfile.write((head + raw)[i:i + 1])
                handler.wfile.flush()
            except OSError:
                return
        handler.close_connection = True

    def stop(self) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    # ------------------------------------------------------------------ checks
    def valid(self, token: str, user: str) -> bool:
        with self._lock:
            entry = self.issued.get(token)
        if entry is None or time.time() >= entry[1]:
            return False
        return entry[0] is None or entry[0] == user

    def _refuse(self, status: int, error: str, why: str) -> tuple[int, dict[str, str]]:
        with self._lock:
            self.refusals.append(why)
        return status, {"error": error, "error_description": why}

    def _decode(self, assertion: str, key: RSAKey) -> dict[str, Any] | None:
        try:
            tok = jwt.decode(assertion, key, algorithms=["RS256", "PS256"])
        except (JoseError, ValueError):
            return None
        claims = dict(tok.claims)
        if claims.get("aud") != self.url or not isinstance(claims.get("exp"), int) \
                or claims["exp"] <= time.time() or not claims.get("jti"):
            return None
        claims["_header"] = dict(tok.header)
        return claims

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if self.status_override:
            return self.status_override, {"error": "temporarily_unavailable"}
        if path != "/token":
            return 404, {"error": "not found"}
        grant = form.get("grant_type", "")
        with self._lock:
            self.requests.append(grant)
        user: str | None = None
        if grant == "client_credentials":
            if form.get("client_id") != self.client_id:
                return self._refuse(400, "unauthorized_client", "unknown client_id")
            if form.get("client_assertion_type") == CLIENT_ASSERTION:
                if self.public_key is None:
                    return self._refuse(401, "invalid_client", "no certificate registered")
                claims = self._decode(form.get("client_assertion", ""), self.public_key)
                if claims is None or claims.get("iss") != self.client_id \
                        or claims.get("sub") != self.client_id:
                    return self._refuse(401, "invalid_client", "bad client assertion")
                if self.cert_der is not None and claims["_header"].get("x5t#S256") != \
                        b64url(hashlib.sha256(self.cert_der).digest()):
                    return self._refuse(401, "invalid_client", "unknown certificate")
            elif not self.secret or not secrets.compare_digest(
                    form.get("client_secret", ""), self.secret):
                return self._refuse(401, "invalid_client",
                                    "AADSTS7000215: Invalid client secret provided.")
            if form.get("scope") != self.scope:
                return self._refuse(400, "invalid_scope", f"scope {form.get('scope')!r}")
        elif grant == JWT_BEARER:
            if self.public_key is None:
                return self._refuse(400, "invalid_grant", "no service account")
            claims = self._decode(form.get("assertion", ""), self.public_key)
            if claims is None or claims.get("iss") != self.service_account:
                return self._refuse(400, "invalid_grant", "Invalid JWT Signature.")
            if claims.get("scope") != self.scope:
                return self._refuse(400, "invalid_scope", "scope claim")
            user = claims.get("sub")
            if not user:
                return self._refuse(400, "invalid_grant", "no sub")
        else:
            return self._refuse(400, "unsupported_grant_type", grant)
        token = secrets.token_urlsafe(48)
        with self._lock:
            # (an expires_in past any float, 10**400, is a token that never expires here)
            self.issued[token] = (user, time.time() + min(self.expires_in, 10**12))
        return 200, {"access_token": token, "token_type": "Bearer",
                     "expires_in": self.expires_in}


# --------------------------------------------------------------------------- smart host

class _OAuthHandler(_Handler):
    def __init__(self, fake: FakeSMTPServer) -> None:
        super().__init__(fake)
        assert isinstance(fake, OAuthSmartHost)
        self.oauth = fake

    async def _initial(self, server: SMTP, args: list[str]) -> bytes | None:
        if len(args) > 1:
            try:
                return base64.b64decode(args[1], validate=True)
            except ValueError:
                await server.push("501 5.5.2 Can't decode base64")
                return None
        got = await server.challenge_auth("")
        return got if isinstance(got, bytes) else None

    def _record(self, mech: str, user: str, ok: bool) -> AuthResult:
        self.oauth.oauth_attempts.append((mech, user, ok))
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        return AuthResult(success=False, handled=False,
                          message="535 5.7.3 Authentication unsuccessful")

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult | None:  # noqa: N802
        raw = await self._initial(server, args)
        if raw is None:
            return None
        parts = dict(p.split("=", 1) for p in raw.decode().split("\x01") if "=" in p)
        user, auth = parts.get("user", ""), parts.get("auth", "")
        ok = auth.startswith("Bearer ") and self.oauth.endpoint.valid(auth[7:], user)
        return self._record("XOAUTH2", user, ok)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult | None:  # noqa: N802
        raw = await self._initial(server, args)
        if raw is None:
            return None
        gs2, _, rest = raw.decode().partition("\x01")
        fields = gs2.split(",")
        user = next((f[2:] for f in fields if f.startswith("a=")), "")
        user = user.replace("=2C", ",").replace("=3D", "=")
        kv = dict(p.split("=", 1) for p in rest.split("\x01") if "=" in p)
        self.oauth.oauthbearer_fields.append({k: v for k, v in kv.items() if k != "auth"})
        auth = kv.get("auth", "")
        ok = fields[0] == "n" and auth.startswith("Bearer ") and \
            self.oauth.endpoint.valid(auth[7:], user)
        if not ok:
            # RFC 7628 3.2.2: the error as a challenge; the client answers ^A.
            err = json.dumps({"status": "invalid_token", "schemes": "bearer",
                              "scope": self.oauth.endpoint.scope})
            await server.challenge_auth(err)
        return self._record("OAUTHBEARER", user, ok)


class OAuthSmartHost(FakeSMTPServer):
    def __init__(self, endpoint: TokenEndpoint, host: str = "127.0.0.2", **kw: Any) -> None:
        super().__init__(host, users={}, auth_exclude=["PLAIN", "LOGIN"], **kw)
        self.endpoint = endpoint
        self.oauth_attempts: list[tuple[str, str, bool]] = []
        self.oauthbearer_fields: list[dict[str, str]] = []

    handler_class = _OAuthHandler
