"""Smart-host AUTH with OAuth 2.0 tokens (XOAUTH2, OAUTHBEARER RFC 7628), end to end over
real sockets: a real HTTPS token endpoint on loopback (trustme CA) that issues, expires and
checks (client secret, private_key_jwt, JWT bearer) and an aiosmtpd smart host that only
accepts the tokens it issued. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.server
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fakes.dnsserver import FakeDNSServer
from fakes.oauth import OAuthSmartHost, TokenEndpoint
from support.certs import server_tls_context
from support.ports import free_port
from support.wait import until
from test_delivery import MSG, envelope, make_cfg
from test_doctor import (
    cfg_for,
    doctor,
    generated_keys,  # noqa: F401  (a fixture doctor_setup uses)
)
from test_doctor import setup as doctor_setup  # noqa: F401  (a fixture)

from authrelay import maillog as maillog_mod
from authrelay import wiring
from authrelay.config import Config, ConfigError, from_dict
from authrelay.delivery import oauth
from authrelay.delivery.client import Courier

pytestmark = pytest.mark.slow

MS_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"
USER = "relay@example.org"


# --------------------------------------------------------------------------- keys

def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@contextlib.contextmanager
def plain_http_recorder() -> Iterator[tuple[str, list[bytes]]]:
    """A plain-http endpoint on loopback: (its /token URL, the bodies POSTed to it)."""
    seen: list[bytes] = []

    class Plain(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    plain = http.server.HTTPServer(("127.0.0.1", 0), Plain)
    t = threading.Thread(target=plain.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{plain.server_address[1]}/token", seen
    finally:
        plain.shutdown()
        plain.server_close()
        t.join(5)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    """The certificate an admin uploads to the Entra app registration."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authrelay smart host")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256()))


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa_key()


def write_secret(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- set-up

@pytest.fixture
def endpoint(trustme_ca: Any) -> Any:
    eps: list[TokenEndpoint] = []

    def make(**kw: Any) -> TokenEndpoint:
        ep = TokenEndpoint(trustme_ca, **kw).start()
        eps.append(ep)
        return ep

    yield make
    for ep in eps:
        ep.stop()


@pytest.fixture
def smart_host(trustme_ca: Any) -> Any:
    hosts: list[OAuthSmartHost] = []

    def make(ep: TokenEndpoint, host: str = "127.0.0.2", **kw: Any) -> OAuthSmartHost:
        sh = OAuthSmartHost(ep, host, starttls_context=server_tls_context(trustme_ca, host),
                            require_starttls=True, **kw).start()
        hosts.append(sh)
        return sh

    yield make
    for sh in hosts:
        sh.stop()


def oauth_cfg(tmp_path: Path, dns: FakeDNSServer, sh: OAuthSmartHost, ep: TokenEndpoint,
              ca_file: Path, delivery: dict[str, Any] | None = None, **relay: Any) -> Config:
    r: dict[str, Any] = {
        "smart_host": [sh.address], "smart_host_user": USER,
        "smart_host_ca_file": str(ca_file), "smart_host_auth": "xoauth2",
        "smart_host_oauth_token_url": ep.url, "smart_host_oauth_client_id": "app-id",
        "smart_host_oauth_scope": ep.scope, "smart_host_oauth_ca_file": str(ca_file),
    }
    r.update(relay)
    return make_cfg(tmp_path, dns, 25, relay=r, **(delivery or {}))


@pytest.fixture
def mlog(tmp_path: Path) -> Any:
    path = tmp_path / "mail.log"
    ml = maillog_mod.MailLog(f"file:{path}")
    ml.path = path  # type: ignore[attr-defined]
    return ml


def logtext(ml: Any) -> str:
    ml.flush()
    return ml.path.read_text()


async def deliver(courier: Courier, rcpt: str = "x@far.test") -> Any:
    env = envelope(rcpt)
    return (await courier.deliver(env, env.recipients, MSG))[rcpt]


def secret_cfg(tmp_path: Path, dns: FakeDNSServer, sh: OAuthSmartHost, ep: TokenEndpoint,
               ca_file: Path, secret: str = "s3cret-value", **kw: Any) -> Config:
    sf = write_secret(tmp_path / "client.secret", secret + "\n")
    return oauth_cfg(tmp_path, dns, sh, ep, ca_file, smart_host_oauth_secret_file=str(sf),
                     **kw)


def assert_no_token(tmp_path: Path, ep: TokenEndpoint, *texts: str) -> None:
    """No token ever written: not in the maillog, not in any file under tmp_path."""
    assert ep.issued
    blobs = [t.encode() for t in texts]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    for token in ep.issued:
        for blob in blobs:
            assert token.encode() not in blob


# --------------------------------------------------------------------------- success

async def test_client_secret_xoauth2_and_the_token_is_cached(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    ep = endpoint(secret="s3cret-value", scope=MS_SCOPE)
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                 delivery={"idle_timeout": "0s"}), maillog=mlog)
    try:
        for i in range(3):
            r = await deliver(courier, f"r{i}@far.test")
            assert r.ok, r
    finally:
        await courier.close()
    assert ep.requests == ["client_credentials"]  # one token for the three connections
    assert [a[0] for a in sh.oauth_attempts] == ["XOAUTH2"] * 3
    assert all(ok for _, _, ok in sh.oauth_attempts)
    assert sh.messages[0].auth_user == USER and sh.messages[0].tls
    assert b"AUTH PLAIN" not in b"".join(sh.wire) and b"s3cret" not in b"".join(sh.wire)
    assert_no_token(tmp_path, ep, caplog.text)


async def test_private_key_jwt_oauthbearer(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, app_key: rsa.RSAPrivateKey, mlog: Any) -> None:
    """Entra with a certificate: a private_key_jwt client assertion (RFC 7523 2.2) whose
    header names the certificate (x5t#S256); the token goes out as OAUTHBEARER."""
    cert = self_signed(app_key)
    ep = endpoint(public_key_pem=public_pem(app_key),
                  cert_der=cert.public_bytes(serialization.Encoding.DER))
    sh = smart_host(ep)
    kf = write_secret(tmp_path / "app.pem",
                      pem(app_key) + cert.public_bytes(serialization.Encoding.PEM))
    cfg = oauth_cfg(tmp_path, dns, sh, ep, trustme_ca_file, smart_host_auth="oauthbearer",
                    smart_host_oauth_key_file=str(kf))
    courier = wiring.courier(cfg, maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert r.ok, r
    assert ep.refusals == [] and ep.requests == ["client_credentials"]
    assert sh.oauth_attempts == [("OAUTHBEARER", USER, True)]
    assert sh.oauthbearer_fields == [{"host": "127.0.0.2", "port": str(sh.port)}]


async def test_private_key_jwt_with_another_certificate_is_refused(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, app_key: rsa.RSAPrivateKey, mlog: Any) -> None:
    other = rsa_key()
    ep = endpoint(public_key_pem=public_pem(app_key))
    sh = smart_host(ep)
    kf = write_secret(tmp_path / "app.pem", pem(other))
    courier = wiring.courier(oauth_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                smart_host_oauth_key_file=str(kf)), maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
    assert "invalid_client" in r.text and "bad client assertion" in r.text
    assert sh.oauth_attempts == [] and sh.messages == []


SERVICE_ACCOUNT = "relay@project.iam.gserviceaccount.com"


def service_account_setup(tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
                          ca_file: Path, app_key: rsa.RSAPrivateKey,
                          token_uri: str | None = None) -> tuple[Any, Any, Any]:
    """(endpoint, smart host, config) for Google's grant: a service account's JSON key
    (token URL from its token_uri: the endpoint's unless `token_uri` is given), no
    token_url or client_id of our own."""
    ep = endpoint(public_key_pem=public_pem(app_key), service_account=SERVICE_ACCOUNT,
                  scope=GOOGLE_SCOPE)
    sh = smart_host(ep)
    kf = write_secret(tmp_path / "sa.json", json.dumps({
        "type": "service_account", "client_email": SERVICE_ACCOUNT, "private_key_id": "k1",
        "private_key": pem(app_key).decode(), "token_uri": token_uri or ep.url}))
    cfg = oauth_cfg(tmp_path, dns, sh, ep, ca_file, smart_host_oauth_grant="jwt_bearer",
                    smart_host_oauth_token_url="", smart_host_oauth_client_id="",
                    smart_host_oauth_key_file=str(kf))
    return ep, sh, cfg


async def test_google_service_account_jwt_bearer(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, app_key: rsa.RSAPrivateKey, mlog: Any) -> None:
    """Google Workspace: the service account's JSON key signs a JWT bearer assertion
    (RFC 7523 2.1) with sub = the user (domain-wide delegation), scope as a claim; the
    token URL comes from the key file's token_uri."""
    ep, sh, cfg = service_account_setup(tmp_path, dns, endpoint, smart_host,
                                        trustme_ca_file, app_key)
    courier = wiring.courier(cfg, maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert r.ok, r
    assert ep.requests == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert [u for u, _ in ep.issued.values()] == [USER]  # sub = the delegated user
    assert sh.oauth_attempts == [("XOAUTH2", USER, True)]
    token = next(iter(ep.issued))
    assert not ep.valid(token, "someone-else@example.org")


async def test_a_service_account_token_uri_in_clear_gets_no_assertion(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, app_key: rsa.RSAPrivateKey, mlog: Any) -> None:
    """The token URL of a service-account JSON key (no token_url set) is the file's
    token_uri: an http:// one (an edited or forged key file) received the signed
    assertion in clear, which anyone on the path could trade for tokens until it
    expires; token_url itself must be https:// (config). Now nothing is sent and the
    mail waits naming the cause."""
    with plain_http_recorder() as (url, seen):
        _ep, sh, cfg = service_account_setup(tmp_path, dns, endpoint, smart_host,
                                             trustme_ca_file, app_key, token_uri=url)
        courier = wiring.courier(cfg, maillog=mlog)
        try:
            r = await deliver(courier)
        finally:
            await courier.close()
    assert seen == []
    assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
    assert "token_uri" in r.text and "https://" in r.text, r.text
    assert sh.messages == []


async def test_each_smart_host_its_own_oauth_settings_and_token(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, app_key: rsa.RSAPrivateKey, mlog: Any) -> None:
    """Fail-over from a Microsoft-365-like smart host (the [relay] keys: client secret,
    XOAUTH2) to a Google-like one with its own [[relay.smart_host_oauth]] table (service
    account JWT bearer, another user, OAUTHBEARER). The first takes the token but answers
    MAIL 451, so every message goes on to the second: each host gets a token from its own
    endpoint for its own user, and each token is cached for its host (two deliveries,
    one request per endpoint)."""
    ms = endpoint(secret="s3cret-value")
    sa = SERVICE_ACCOUNT
    google = endpoint(public_key_pem=public_pem(app_key), service_account=sa,
                      scope=GOOGLE_SCOPE)
    first = smart_host(ms, "127.0.0.2", mail_reply="451 4.3.0 try the backup")
    second = smart_host(google, "127.0.0.3")
    kf = write_secret(tmp_path / "sa.json", json.dumps({
        "type": "service_account", "client_email": sa, "private_key_id": "k1",
        "private_key": pem(app_key).decode(), "token_uri": google.url}))
    other = "backup@example.org"
    table = {"host": second.address, "auth": "oauthbearer", "user": other,
             "grant": "jwt_bearer", "key_file": str(kf), "scope": GOOGLE_SCOPE,
             "ca_file": str(trustme_ca_file)}
    cfg = secret_cfg(tmp_path, dns, first, ms, trustme_ca_file,
                     smart_host=[first.address, second.address],
                     smart_host_oauth=[table], delivery={"idle_timeout": "0s"})
    assert cfg.relay.oauth_for(second.address).user == other
    assert cfg.relay.oauth_for(first.address).user == USER
    courier = wiring.courier(cfg, maillog=mlog)
    assert courier.tokens_for(first.address) is not courier.tokens_for(second.address)
    try:
        for i in range(2):
            r = await deliver(courier, f"r{i}@far.test")
            assert r.ok, r
    finally:
        await courier.close()
    assert ms.requests == ["client_credentials"]
    assert google.requests == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert first.oauth_attempts == [("XOAUTH2", USER, True)] * 2
    assert second.oauth_attempts == [("OAUTHBEARER", other, True)] * 2
    assert [m.auth_user for m in second.messages] == [other, other]
    assert first.messages == []
    assert [u for u, _ in google.issued.values()] == [other]  # sub = the table's user


def test_per_host_oauth_config_validation() -> None:
    base = {"smart_host": ["smtp.office365.com:587", "smtp-relay.gmail.com:587"]}
    table = {"host": "SMTP-relay.gmail.com:587", "user": USER, "grant": "jwt_bearer",
             "key_file": "/etc/authrelay/google-sa.json", "scope": GOOGLE_SCOPE}
    cfg = from_dict({"relay": {**base, "smart_host_oauth": [table]}})
    assert cfg.relay.oauth_for("smtp-relay.gmail.com:587") == \
        replace_settings(table, auth="xoauth2")
    assert cfg.relay.oauth_for("smtp.office365.com:587") is None  # password AUTH
    assert cfg.relay.uses_oauth()
    for change, words in [
        ({"host": "smtp.gmail.com:587"}, r"smart_host_oauth\[0\]\.host: .* is not an entry"),
        ({"host": ""}, r"smart_host_oauth\[0\]\.host: required"),
        ({"scope": ""}, r"smart_host_oauth\[SMTP-relay.gmail.com:587\]\.scope: required"),
        ({"user": ""}, r"\.user: auth = 'xoauth2' needs the user"),
        ({"auth": "plain"}, r"smart_host_oauth\[0\]\.auth: 'plain' is not one of"),
        ({"grant": "client_credentials", "client_id": "id", "secret_file": "/s",
          "token_url": "https://t/token"}, "exactly one of secret_file .* and key_file"),
        ({"token_url": "http://x/token"}, "must be https"),
        ({"colour": "red"}, r"smart_host_oauth\[0\]\.colour: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=words):
            from_dict({"relay": {**base, "smart_host_oauth": [{**table, **change}]}})
    with pytest.raises(ConfigError, match=r"\[1\]\.host: .* has a table already"):
        from_dict({"relay": {**base, "smart_host_oauth": [table, table]}})


def replace_settings(table: dict[str, Any], **kw: Any) -> Any:
    from authrelay.config import SmartHostOAuth

    return SmartHostOAuth(**{**table, **kw})


# --------------------------------------------------------------------------- expiry

def _courier_on_a_clock(tmp_path: Path, dns: FakeDNSServer, sh: Any, ep: Any, ca: Path,
                        mlog: Any) -> tuple[Any, oauth.TokenSource, list[float]]:
    """A courier for smart host `sh` (no idle connections kept) whose token source reads
    the time from the returned one-element list (set now[0] to move it)."""
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, ca,
                                        delivery={"idle_timeout": "0s"}), maillog=mlog)
    source = courier.tokens_for(sh.address)
    assert isinstance(source, oauth.TokenSource)
    now = [1000.0]
    source.clock = lambda: now[0]
    return courier, source, now


@pytest.mark.parametrize(("expires_in", "life"), [(3600, 3600), (10**9, 86400),
                                                  (10**400, 86400)],
                         ids=["an_hour", "decades_held_to_a_day",
                              "past_any_float_held_to_a_day"])
async def test_token_refreshed_before_expiry_mid_queue(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any, expires_in: int, life: int) -> None:
    """A token is replaced at 80% of its lifetime (an injected clock), before the smart
    host would refuse it: no delivery ever meets an expired token. The lifetime acted on
    is at most a day: an endpoint's expires_in of a billion seconds kept its token in
    memory (and in use) for ever."""
    ep = endpoint(secret="s3cret-value", expires_in=expires_in)
    sh = smart_host(ep)
    courier, source, now = _courier_on_a_clock(tmp_path, dns, sh, ep, trustme_ca_file, mlog)
    try:
        assert (await deliver(courier)).ok
        now[0] += 0.79 * life
        assert (await deliver(courier)).ok
        assert len(ep.requests) == 1
        now[0] += 0.02 * life  # past 80%: a new token before the next AUTH
        assert (await deliver(courier)).ok
    finally:
        await courier.close()
    assert len(ep.requests) == 2 and len(ep.issued) == 2
    assert all(ok for _, _, ok in sh.oauth_attempts) and len(sh.messages) == 3


@pytest.mark.parametrize(("expires_in", "use", "life"), [
    (0, 30.0, 60.0), (-3600, 30.0, 60.0), (2, 1.0, 2.0),  # "expired": a minute
    (None, 2880.0, 3600.0), ("soon", 2880.0, 3600.0), (float("nan"), 2880.0, 3600.0),
    (3600, 2880.0, 3600.0), (1e300, 69120.0, 86400.0),  # at most a day
    # an integer too big for a float (JSON's 1 and 400 zeros): past any bound, or short
    pytest.param(10**400, 69120.0, 86400.0, id="1e400-int"),
    pytest.param(-10**400, 30.0, 60.0, id="-1e400-int"),
])
def test_the_lifetime_acted_on_is_held_to_a_minute_to_a_day(
        expires_in: Any, use: float, life: float) -> None:
    """0 or less (the endpoint says "expired") was read as an hour; NaN (JSON's NaN parses)
    gave a token never replaced nor expired; 1e300 one kept for ever."""
    assert oauth._lifetime(expires_in) == (use, life)


@pytest.mark.slow
async def test_short_lived_token_expires_and_is_replaced_in_real_time(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    """Real clocks: the endpoint issues 2-second tokens; once the first one has expired
    at the endpoint (polled, not slept), the next delivery brings a new token without
    ever presenting the dead one."""
    ep = endpoint(secret="s3cret-value", expires_in=2)
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                 delivery={"idle_timeout": "0s"}), maillog=mlog)
    try:
        assert (await deliver(courier)).ok
        (first,) = ep.issued
        await until(lambda: not ep.valid(first, USER), "the token expired", timeout=10)
        assert (await deliver(courier)).ok
    finally:
        await courier.close()
    assert len(ep.issued) == 2
    assert [ok for _, _, ok in sh.oauth_attempts] == [True, True]  # never refused


async def test_token_expired_at_the_smart_host_is_replaced_once(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    """The smart host refuses a token we still thought good (revoked, clock skew): it is
    dropped and a fresh one tried on the same connection; the mail goes through."""
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                 delivery={"idle_timeout": "0s"}), maillog=mlog)
    try:
        assert (await deliver(courier)).ok
        for tok, (user, _) in list(ep.issued.items()):
            ep.issued[tok] = (user, 0.0)  # expired mid-queue, server side
        r = await deliver(courier)
    finally:
        await courier.close()
    assert r.ok, r
    assert [ok for _, _, ok in sh.oauth_attempts] == [True, False, True]
    assert sh.connections == 2 and len(ep.requests) == 2


async def test_token_refused_twice_defers(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    """OAUTHBEARER refused (RFC 7628 error challenge, then 535) with a fresh token too:
    deferred 4.7.0 with the server's reason in the maillog, never bounced."""
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                 smart_host_auth="oauthbearer"), maillog=mlog)
    ep.valid = lambda token, user: False  # type: ignore[method-assign]  # e.g. no SMTP.SendAsApp
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
    assert "refused the OAuth token" in r.text and "535 5.7.3" in r.text
    assert "status=invalid_token" in r.text  # the RFC 7628 error challenge, decoded
    assert len(sh.oauth_attempts) == 2 and len(ep.requests) == 2
    wire = sh.wire[0]
    assert wire.split(b"\r\n").count(b"AQ==") == 2  # ^A: the answer to each challenge
    log = logtext(mlog)
    assert "status=host failed" in log and "refused the OAuth token" in log
    assert_no_token(tmp_path, ep, log)


async def test_a_smart_host_refusing_every_token_costs_no_request_per_message(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    """A smart host that refuses every token (no SMTP.SendAsApp): the first refusal gets
    one fresh token; refused too, that one is kept fail_hold seconds, so a queue of mail
    does not ask the token endpoint once a message (it did: one request per delivery).
    After fail_hold a refusal replaces it again, once."""
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    courier, source, now = _courier_on_a_clock(tmp_path, dns, sh, ep, trustme_ca_file, mlog)
    ep.valid = lambda token, user: False  # type: ignore[method-assign]
    try:
        rs = [await deliver(courier, f"c{i}@far.test") for i in range(5)]
        assert len(ep.requests) == 2  # the first token and one replacement
        assert len(sh.oauth_attempts) == 2 + 4  # the kept one is not tried twice
        now[0] += source.fail_hold + 1
        rs.append(await deliver(courier))
    finally:
        await courier.close()
    for r in rs:
        assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
        assert "refused the OAuth token" in r.text
    assert len(ep.requests) == 3
    assert_no_token(tmp_path, ep, logtext(mlog))


# --------------------------------------------------------------------------- failures

async def test_wrong_client_secret_defers_with_the_cause(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    ep = endpoint(secret="right-secret")
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file, "wrong-secret"),
                      maillog=mlog)
    try:
        r = await deliver(courier)
        r2 = await deliver(courier)  # within fail_hold: no second request
    finally:
        await courier.close()
    assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
    assert "no OAuth token" in r.text and "invalid_client" in r.text
    assert "AADSTS7000215" in r.text and "wrong-secret" not in r.text
    assert r2.enhanced == "4.7.0" and ep.requests == ["client_credentials"]
    assert sh.oauth_attempts == [] and sh.messages == []
    log = logtext(mlog)
    assert "invalid_client" in log and "wrong-secret" not in log


@pytest.mark.parametrize("grant", ["client_secret", "private_key_jwt"])
async def test_a_refusal_echoing_our_secret_does_not_get_it_logged(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, app_key: rsa.RSAPrivateKey, mlog: Any, grant: str) -> None:
    """A token endpoint whose refusal quotes the request (its error_description naming
    the client_secret we sent, or the signed client assertion, usable by whoever reads it
    until it expires): the cause is in the deferral and the maillog, the secret is not.
    The maillog is readable by more people than the 0600 secret or key file."""
    if grant == "client_secret":
        ep = endpoint(secret="right-secret")
        sh = smart_host(ep)
        cfg = secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file, "wrong-s3cret-value")
    else:
        ep = endpoint(public_key_pem=public_pem(app_key))
        sh = smart_host(ep)
        kf = write_secret(tmp_path / "app.pem", pem(rsa_key()))  # not the registered key
        cfg = oauth_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                        smart_host_oauth_key_file=str(kf))
    ep.echo = True
    courier = wiring.courier(cfg, maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
    assert "invalid_client" in r.text and "[redacted]" in r.text, r.text
    sent = ep.forms[0]
    secret = sent.get("client_secret") or sent["client_assertion"]
    assert len(secret) > 10
    log = logtext(mlog)
    for text in (r.text, log):
        assert secret not in text and secret[:16] not in text, text
    assert "invalid_client" in log


@pytest.mark.parametrize("how", ["closed port", "HTTP 503", "untrusted certificate"])
async def test_token_endpoint_down_defers(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any, how: str) -> None:
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    extra: dict[str, Any] = {}
    if how == "closed port":
        extra["smart_host_oauth_token_url"] = \
            f"https://127.0.0.1:{free_port()}/token"
    elif how == "HTTP 503":
        ep.status_override = 503
    else:  # the endpoint's certificate is not from the configured CA
        import trustme

        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        extra["smart_host_oauth_ca_file"] = str(other)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file, **extra),
                      maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert (r.permanent, r.enhanced) == (False, "4.7.0"), r
    want = {"closed port": "unreachable", "HTTP 503": "HTTP 503",
            "untrusted certificate": "TLS handshake with the token endpoint failed"}[how]
    assert want in r.text, r.text
    assert want in logtext(mlog)
    assert sh.messages == [] and sh.connections == 0  # no token: never connected


@pytest.mark.parametrize("how", ["drip", "oversize", "gzip"])
async def test_a_hostile_token_endpoint_is_bounded(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any, how: str) -> None:
    """A token endpoint that drips its answer a byte every 0.2 s (each read well within
    the per-read timeout: ~40 s in all), sends 20 MB, or compresses though identity was
    asked: the delivery is deferred 4.7.0 within the total deadline (min(30 s,
    connect_timeout) = 2 s here), the maillog names the cause."""
    import time

    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    if how == "drip":
        ep.drip = 0.2
    elif how == "oversize":
        ep.oversize = 20 * 1024 * 1024
    else:
        ep.gzip = True
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                        delivery={"connect_timeout": "2s"}), maillog=mlog)
    t0 = time.monotonic()
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    took = time.monotonic() - t0
    assert (r.permanent, r.enhanced, r.code) == (False, "4.7.0", 454), r
    want = {"drip": "the token endpoint did not answer within 2 s",
            "oversize": "the token endpoint's answer is larger than 64 KiB",
            "gzip": "the token endpoint's answer is compressed"}[how]
    assert r.text.startswith(f"no OAuth token for smart host 127.0.0.2:{sh.port}: {want}"), \
        r.text
    assert want in logtext(mlog) and "s3cret" not in logtext(mlog)
    assert took < 6, took  # the deadline, not the drip's ~40 s
    if how == "drip":
        assert took >= 1.9, took
    assert ep.accept_encoding == ["identity"]
    assert sh.messages == [] and sh.oauth_attempts == []
    # The token is asked for before connecting: while the endpoint dripped (and after it
    # failed) the smart host saw no connection at all.
    assert sh.connections == 0


@pytest.mark.parametrize("body", [
    b"[" * 30000 + b"]" * 30000,  # nested past the JSON decoder's depth, under 64 KiB
    b'{"access_token": "abc", "expires_in": 1e400}',  # JSON's 1e400 is an infinite float
    b'{"access_token": "abc", "expires_at": -1e400}',
    b'{"access_token": "abc", "expires_in": [3600]}',
    b'{"access_token": "abc", "expires_at": {"at": 1}}',
], ids=["deep", "expires_in_inf", "expires_at_inf", "expires_in_list", "expires_at_dict"])
async def test_a_malformed_token_answer_defers_with_the_cause(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any, body: bytes) -> None:
    """Attack (or a broken endpoint): a 200 answer the JSON decoder or Authlib's token
    parsing cannot take (RecursionError, OverflowError, TypeError, not ValueError). It
    escaped the token source: the scheduler logged a traceback ("courier failed"), the
    next smart host of the list was not tried and every delivery fetched again. Now the
    mail waits 4.7.0 naming the cause, and the failure is held (one request for two
    deliveries)."""
    ep = endpoint(secret="s3cret-value")
    ep.body = body
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file), maillog=mlog)
    try:
        r = await deliver(courier)
        again = await deliver(courier)
    finally:
        await courier.close()
    for got in (r, again):
        assert (got.permanent, got.enhanced, got.code) == (False, "4.7.0", 454), got
        assert "the token endpoint's answer is not a token" in got.text, got.text
    assert len(ep.requests) == 1, ep.requests
    assert "Traceback" not in logtext(mlog) and "s3cret" not in logtext(mlog)
    assert sh.messages == [] and sh.oauth_attempts == []


async def test_a_redirecting_token_endpoint_gets_no_second_post(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    """Attack: the token endpoint answers 307 to a plain-http URL. requests follows a 307
    by POSTing the same body (client_secret included) there; now no redirect is followed
    and the mail waits with the cause."""
    with plain_http_recorder() as (url, seen):
        ep = endpoint(secret="s3cret-value")
        ep.redirect = url
        sh = smart_host(ep)
        courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file), maillog=mlog)
        try:
            r = await deliver(courier)
        finally:
            await courier.close()
    assert seen == []  # the secret never went to the plain-text URL
    assert (r.permanent, r.enhanced) == (False, "4.7.0"), r
    assert "redirect" in r.text and "s3cret" not in r.text
    assert sh.messages == []


async def _echo_server(tls: Any = None) -> Any:
    """A hostile smart host (plain text, or implicit TLS with `tls`) whose 535 quotes what
    the client sent: the SASL response, and the password or token decoded from it."""
    import base64

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 echo\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-echo\r\n250 AUTH XOAUTH2 PLAIN\r\n")
            elif verb == b"AUTH":
                arg = line.split()[-1]
                raw = base64.b64decode(arg)
                inner = raw.split(b"Bearer ")[1].split(b"\x01")[0] if b"Bearer " in raw \
                    else raw.split(b"\0")[-1]
                writer.write(b"535 5.7.8 refused " + arg + b" i.e. " + inner + b"\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.2", 0, ssl=tls)


@pytest.mark.parametrize("mech", ["xoauth2", "plain"])
async def test_a_smart_host_echoing_our_secret_does_not_get_it_logged(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, trustme_ca: Any,
        trustme_ca_file: Path, mlog: Any, mech: str) -> None:
    """Attack: the smart host's refusal quotes the token (or password) and the SASL
    response we sent; the reply went whole into the maillog and the deferral text. Now
    our secrets are cut out of it. (A token goes only over verified TLS: that echo
    server speaks implicit TLS with a certificate the relay trusts.)"""
    from types import SimpleNamespace

    server = await _echo_server(server_tls_context(trustme_ca, "127.0.0.2")
                                if mech == "xoauth2" else None)
    addr = f"127.0.0.2:{server.sockets[0].getsockname()[1]}"
    ep = endpoint(secret="s3cret-value")
    if mech == "xoauth2":
        cfg = secret_cfg(tmp_path, dns, SimpleNamespace(address=addr), ep, trustme_ca_file,
                         smart_host_tls="tls")
    else:
        pw = write_secret(tmp_path / "smart.pw", "pa55word-echoed\n")
        cfg = make_cfg(tmp_path, dns, 25, relay={
            "smart_host": [addr], "smart_host_user": USER, "smart_host_tls": "none",
            "smart_host_password_file": str(pw)})
    courier = wiring.courier(cfg, maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
        server.close()
        await server.wait_closed()
    assert (r.permanent, r.enhanced) == (False, "4.7.0"), r
    assert "535 5.7.8 refused [redacted] i.e. [redacted]" in r.text, r.text
    log = logtext(mlog)
    assert "[redacted]" in log
    if mech == "xoauth2":
        assert_no_token(tmp_path, ep, r.text, log)
    else:
        import base64

        plain = base64.b64encode(f"\0{USER}\0pa55word-echoed".encode()).decode()
        for text in (r.text, log):
            assert "pa55word" not in text and plain not in text


async def test_one_fetch_for_concurrent_deliveries(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file), maillog=mlog)
    try:
        rs = await asyncio.gather(*(deliver(courier, f"c{i}@far.test") for i in range(5)))
    finally:
        await courier.close()
    assert all(r.ok for r in rs)
    assert ep.requests == ["client_credentials"]
    assert len(sh.messages) == 5


async def test_smart_host_without_the_mechanism(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, fake_mx: Any, trustme_ca: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    ep = endpoint(secret="s3cret-value")
    sh = fake_mx("127.0.0.2", starttls_context=server_tls_context(trustme_ca, "127.0.0.2"),
                 users={USER: "pw"})
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file), maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    assert r.enhanced == "4.7.0" and "does not offer AUTH XOAUTH2" in r.text
    # The token is obtained before connecting (so a slow endpoint holds no connection),
    # and kept for the next attempt; it never went to a host that cannot take it.
    assert ep.requests == ["client_credentials"] and len(ep.issued) == 1
    token = next(iter(ep.issued))
    sent = b"".join(sh.wire)
    assert b"AUTH" not in sent and token.encode() not in sent


# --------------------------------------------------------------------------- units

def test_sasl_responses() -> None:
    import base64

    assert base64.b64decode(oauth.xoauth2("user@example.com", "ya29.tok")) == \
        b"user=user@example.com\x01auth=Bearer ya29.tok\x01\x01"
    assert base64.b64decode(oauth.oauthbearer("a,b=c@x", "tok", "smtp.test", 587)) == \
        b"n,a=a=2Cb=3Dc@x,\x01host=smtp.test\x01port=587\x01auth=Bearer tok\x01\x01"
    err = base64.b64encode(b'{"status":"invalid_token","schemes":"bearer"}').decode()
    assert oauth.server_error(err) == "status=invalid_token schemes=bearer"
    assert oauth.server_error("not base64!") == ""


def test_lifetimes() -> None:
    assert oauth._lifetime(3600) == (2880.0, 3600.0)
    assert oauth._lifetime(600) == (300.0, 600.0)  # 5 minutes before the end
    assert oauth._lifetime(10) == (5.0, 10.0)
    assert oauth._lifetime(None) == (2880.0, 3600.0)


def test_config_validation(tmp_path: Path) -> None:
    base = {"smart_host": ["smtp.office365.com:587"], "smart_host_user": USER,
            "smart_host_auth": "xoauth2",
            "smart_host_oauth_token_url": "https://login.microsoftonline.com/t/oauth2/v2.0/token",
            "smart_host_oauth_client_id": "id", "smart_host_oauth_scope": MS_SCOPE,
            "smart_host_oauth_secret_file": "/etc/authrelay/m365.secret"}
    from_dict({"relay": base})
    for change, words in [
        ({"smart_host_oauth_token_url": "http://x/token"}, "must be https"),
        ({"smart_host_oauth_key_file": "/k.pem"}, "exactly one"),
        ({"smart_host_oauth_scope": ""}, "scope"),
        ({"smart_host_user": ""}, "smart_host_user"),
        ({"smart_host_auth": "cram-md5"}, "not one of"),
        ({"smart_host_oauth_grant": "jwt_bearer"}, "key_file"),
    ]:
        with pytest.raises(ConfigError, match=words):
            from_dict({"relay": {**base, **change}})


# --------------------------------------------------------------------------- end to end

def root_only_site(request: pytest.FixtureRequest, trustme_ca: Any, name: str,
                   secret: str) -> tuple[Path, Path, Path]:
    """For `serve` dropping to the unprivileged test user: a directory it can reach, a
    client secret only root can read (0600 in a 0700 directory), the CA world-readable.
    -> (directory, secret file, CA file)."""
    from support.privileges import unprivileged_user

    unprivileged_user()
    base: Path = request.getfixturevalue("reachable_dir")
    secret_dir = base / "secret"
    secret_dir.mkdir(mode=0o700)
    sf = write_secret(secret_dir / name, secret)
    ca = base / "ca.pem"
    trustme_ca.cert_pem.write_to_path(str(ca))
    ca.chmod(0o644)
    return base, sf, ca


@pytest.mark.slow
@pytest.mark.root
def test_serve_with_a_root_only_client_secret(
        request: pytest.FixtureRequest, endpoint: Any, smart_host: Any, trustme_ca: Any) -> None:
    """`authrelay serve` dropping to a user, the 0600 root client secret read by the key
    helper at each token request. A wrong secret defers the mail (maillog names
    invalid_client, nothing bounced); once the file is fixed it goes out with a token;
    the 2-second token expires mid-queue and the next message gets a new one. No token
    and no secret in the maillog or anywhere under the state dir."""
    from relayproc import RelayProcess, to_toml
    from support.privileges import TEST_USER
    from support.wait import wait_until
    from test_e2e_delivery import submit
    from test_process_model import _started

    base, sf, ca = root_only_site(request, trustme_ca, "m365.secret", "wrong-value\n")
    ep = endpoint(secret="s3cret-value", expires_in=2)
    sh = smart_host(ep)
    r = RelayProcess(base, {
        "user": TEST_USER,
        "relay": {"smart_host": [sh.address], "smart_host_tls": "starttls",
                  "smart_host_user": USER, "smart_host_ca_file": str(ca),
                  "smart_host_auth": "xoauth2",
                  "smart_host_oauth_token_url": ep.url, "smart_host_oauth_client_id": "app-id",
                  "smart_host_oauth_scope": ep.scope, "smart_host_oauth_ca_file": str(ca),
                  "smart_host_oauth_secret_file": str(sf)},
        # no idle connection kept: each message authenticates anew (an open, authenticated
        # connection would carry on whatever happens to the token)
        "delivery": {"retry": ["1s"], "idle_timeout": "0s"}}, workers=2)
    r.config.chmod(0o644)
    r.start()

    def delivered(n: int) -> None:
        try:
            wait_until(lambda: len(sh.messages) == n, timeout=30, what="delivered")
        except AssertionError:
            raise AssertionError(r.maillog()[-3000:]) from None

    try:
        _started(r, 3)
        submit(r, ["bob@example.test"])
        wait_until(lambda: "stat=Deferred" in r.maillog(), timeout=30, what="deferred")
        line = next(ln for ln in r.maillog().splitlines() if "stat=Deferred" in ln)
        assert "dsn=4.7.0" in line and "no OAuth token" in line and "invalid_client" in line
        assert sh.messages == [] and sh.oauth_attempts == []
        write_secret(sf, "s3cret-value\n")  # fixed: used at the next token request
        delivered(1)
        (first,) = ep.issued
        wait_until(lambda: not ep.valid(first, USER), what="the token expired")
        submit(r, ["carol@example.test"])
        delivered(2)
        assert len(ep.issued) == 2
        assert sh.oauth_attempts == [("XOAUTH2", USER, True)] * 2  # no dead token sent
        assert all(m.auth_user == USER for m in sh.messages)
        # SIGHUP with a changed [delivery] key: the master builds a new courier, which
        # must still read the root-only secret through the key helper.
        data = dict(r.config_data)
        data["delivery"] = {**data["delivery"], "retry": ["2s"]}
        r.config.write_text(to_toml(data))
        reloaded = r.maillog().count("daemon=reloaded")
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGHUP)
        r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= reloaded + 3)
        (_, second) = ep.issued
        wait_until(lambda: not ep.valid(second, USER), what="the second token expired")
        submit(r, ["dave@example.test"])
        delivered(3)
        assert len(ep.issued) == 3
        assert sh.oauth_attempts == [("XOAUTH2", USER, True)] * 3
        log = r.maillog()
        assert log.count("stat=Sent") == 3 and "bounced" not in log.lower()
        assert "s3cret" not in log and "wrong-value" not in log
    finally:
        r.stop()
    assert_no_token(base, ep, r.maillog())


@pytest.mark.slow
@pytest.mark.root
def test_serve_reads_a_per_host_root_only_secret(
        request: pytest.FixtureRequest, endpoint: Any, smart_host: Any, trustme_ca: Any) -> None:
    """`authrelay serve` dropping to a user; the first smart host is down, the second has
    its own [[relay.smart_host_oauth]] table whose 0600 root client secret the key helper
    reads for that host (the unprivileged master names the host, the helper reads what
    its own copy of the config says for it)."""
    from relayproc import RelayProcess
    from support.privileges import TEST_USER
    from support.wait import wait_until
    from test_e2e_delivery import submit

    base, sf, ca = root_only_site(request, trustme_ca, "backup.secret", "backup-s3cret\n")
    ep = endpoint(secret="backup-s3cret", client_id="backup-app")
    sh = smart_host(ep, "127.0.0.3")
    down = f"127.0.0.2:{free_port()}"
    r = RelayProcess(base, {
        "user": TEST_USER,
        "relay": {"smart_host": [down, sh.address], "smart_host_tls": "starttls",
                  "smart_host_ca_file": str(ca),
                  "smart_host_oauth": [{
                      "host": sh.address, "auth": "xoauth2", "user": USER,
                      "token_url": ep.url, "client_id": "backup-app", "scope": ep.scope,
                      "secret_file": str(sf), "ca_file": str(ca)}]},
        "delivery": {"retry": ["1s"]}})
    r.config.chmod(0o644)
    r.start()
    try:
        submit(r, ["bob@example.test"])
        try:
            wait_until(lambda: len(sh.messages) == 1, timeout=30, what="delivered")
        except AssertionError:
            raise AssertionError(r.maillog()[-3000:]) from None
        assert sh.oauth_attempts == [("XOAUTH2", USER, True)]
        assert ep.requests == ["client_credentials"]
        log = r.maillog()
        assert "status=host failed" in log and down.split(":")[1] in log  # tried first
        assert "backup-s3cret" not in log
    finally:
        r.stop()
    assert_no_token(base, ep, r.maillog())


def test_check_config_checks_the_oauth_files(tmp_path: Path, app_key: rsa.RSAPrivateKey
                                             ) -> None:
    from authrelay.checkconfig import check

    sf = tmp_path / "m365.secret"
    sf.write_text("s3cret\n")
    sf.chmod(0o644)
    relay = {"smart_host": ["127.0.0.1:2"], "smart_host_user": USER,
             "smart_host_auth": "xoauth2", "smart_host_oauth_token_url": "https://t.test/token",
             "smart_host_oauth_client_id": "id", "smart_host_oauth_scope": MS_SCOPE,
             "smart_host_oauth_secret_file": str(sf)}

    def findings(**change: Any) -> dict[str, str]:
        cfg = from_dict({"state_dir": str(tmp_path / "state"), "relay": {**relay, **change}})
        return {f.key: f"{f.level}: {f.message}" for f in check(cfg)
                if f.key.startswith("relay.")}

    got = findings()
    assert "warning" in got["relay.smart_host_oauth_secret_file"]
    assert "chmod 600" in got["relay.smart_host_oauth_secret_file"]
    assert "relay.smart_host_password_file" not in got  # no password with OAuth
    sf.chmod(0o600)
    assert findings() == {}
    got = findings(smart_host_oauth_secret_file=str(tmp_path / "missing"))
    assert got["relay.smart_host_oauth_secret_file"].startswith("error")
    bad = write_secret(tmp_path / "bad.pem", b"-----BEGIN PRIVATE KEY-----\nxx\n")
    got = findings(smart_host_oauth_secret_file="", smart_host_oauth_key_file=str(bad))
    assert "no usable unencrypted PEM private key" in got["relay.smart_host_oauth_key_file"]
    good = write_secret(tmp_path / "good.pem", pem(app_key))
    assert findings(smart_host_oauth_secret_file="", smart_host_oauth_key_file=str(good)) == {}


async def test_doctor_obtains_a_token_and_checks_auth(
        request: pytest.FixtureRequest, dns_server: FakeDNSServer, endpoint: Any,
        smart_host: Any, trustme_ca_file: Path) -> None:
    tmp = request.getfixturevalue("doctor_setup")["tmp"]
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    sf = write_secret(tmp / "m365.secret", "s3cret-value\n")
    relay = {"smart_host": [sh.address], "smart_host_user": USER,
             "smart_host_ca_file": str(trustme_ca_file), "smart_host_auth": "oauthbearer",
             "smart_host_oauth_token_url": ep.url, "smart_host_oauth_client_id": "app-id",
             "smart_host_oauth_scope": ep.scope, "smart_host_oauth_secret_file": str(sf),
             "smart_host_oauth_ca_file": str(trustme_ca_file)}
    name = f"smarthost 127.0.0.2:{sh.port}"
    res = await doctor(cfg_for(tmp, dns_server, relay=relay))
    assert res[name].ok, res[name].line()
    assert res[name].detail == f"token obtained; AUTH OAUTHBEARER accepted as {USER}"
    assert sh.oauth_attempts == [("OAUTHBEARER", USER, True)]

    ep.valid = lambda token, user: False  # type: ignore[method-assign]
    res = await doctor(cfg_for(tmp, dns_server, relay=relay))
    assert not res[name].ok and "AUTH OAUTHBEARER refused: 535" in res[name].detail
    assert "SMTP.SendAsApp" in res[name].fix

    sf.write_text("wrong\n")
    res = await doctor(cfg_for(tmp, dns_server, relay=relay))
    assert not res[name].ok and "invalid_client" in res[name].detail
    for token in ep.issued:
        assert token not in res[name].line()


async def test_doctor_uses_each_smart_hosts_own_settings(
        request: pytest.FixtureRequest, dns_server: FakeDNSServer, endpoint: Any,
        smart_host: Any, trustme_ca_file: Path) -> None:
    """A smart host with its own [[relay.smart_host_oauth]] table (no [relay]
    smart_host_user, password AUTH for the others): doctor obtains its token from its
    endpoint and AUTHs as its user."""
    tmp = request.getfixturevalue("doctor_setup")["tmp"]
    ep = endpoint(secret="table-secret", client_id="table-app")
    sh = smart_host(ep)
    sf = write_secret(tmp / "table.secret", "table-secret\n")
    relay = {"smart_host": [sh.address], "smart_host_ca_file": str(trustme_ca_file),
             "smart_host_oauth": [{
                 "host": sh.address, "user": USER, "token_url": ep.url,
                 "client_id": "table-app", "scope": ep.scope, "secret_file": str(sf),
                 "ca_file": str(trustme_ca_file)}]}
    name = f"smarthost 127.0.0.2:{sh.port}"
    res = await doctor(cfg_for(tmp, dns_server, relay=relay))
    assert res[name].ok, res[name].line()
    assert res[name].detail == f"token obtained; AUTH XOAUTH2 accepted as {USER}"
    assert ep.requests == ["client_credentials"]
    sf.write_text("wrong\n")
    res = await doctor(cfg_for(tmp, dns_server, relay=relay))
    assert not res[name].ok and "invalid_client" in res[name].detail
    assert f"relay.smart_host_oauth[{sh.address}].token_url" in res[name].fix


async def test_a_failed_refresh_keeps_the_still_valid_token(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path) -> None:
    """Refresh at 80% fails (endpoint down): the old token serves until it expires; the
    failure is remembered fail_hold seconds (no request per delivery); after expiry: no
    token, the cause named."""
    ep = endpoint(secret="s3cret-value", expires_in=3600)
    sh = smart_host(ep)
    cfg = secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file)
    now = [0.0]
    src = oauth.TokenSource(cfg.relay.oauth_for(sh.address), clock=lambda: now[0], fail_hold=60)
    first = await src.get()
    ep.status_override = 503
    now[0] = 3000.0  # past 80%: a refresh is due, and fails
    assert await src.get() == first
    assert await src.get() == first and len(ep.requests) == 1  # held: not asked again
    now[0] = 3590.0  # within 30 s of expiry: not used any more
    with pytest.raises(oauth.TokenError, match="HTTP 503"):
        await src.get()
    ep.status_override = None
    src.drop(first)  # also clears the remembered failure
    assert await src.get() != first


def test_signing_keys(app_key: rsa.RSAPrivateKey) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = self_signed(app_key)
    k = oauth.load_signing_key(pem(app_key) + cert.public_bytes(serialization.Encoding.PEM))
    assert k.alg == "RS256" and set(k.header) == {"x5t", "x5t#S256"}
    other = self_signed(rsa_key()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ValueError, match="does not belong"):
        oauth.load_signing_key(pem(app_key) + other)
    eck = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    assert oauth.load_signing_key(eck).alg == "ES256"
    with pytest.raises(ValueError, match="no private_key"):
        oauth.load_signing_key(b'{"client_email": "x@y"}')
    sa = oauth.load_signing_key(json.dumps({"private_key": pem(app_key).decode(),
                                            "client_email": "sa@p.iam", "private_key_id": "k9",
                                            "token_uri": "https://t/token"}).encode())
    assert (sa.issuer, sa.token_url, sa.header) == ("sa@p.iam", "https://t/token", {"kid": "k9"})


@pytest.mark.parametrize("tls", ["starttls", "encrypt", "may", "starttls-noverify"])
async def test_a_token_goes_as_the_smart_host_tls_level_says(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any, tls: str) -> None:
    """A smart host whose certificate does not verify (a CA the relay was not given, as
    an interceptor's would be): at the default level (starttls, verified) it never gets
    the bearer token and the mail waits; at a level that does not verify (the operator's
    choice, warned about by check-config) the token goes as a password would."""
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    level = {"smart_host_tls": "starttls", "smart_host_tls_verify": False} \
        if tls == "starttls-noverify" else {"smart_host_tls": tls}
    # The smart host's CA unknown (the token endpoint's is known).
    cfg = secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file, smart_host_ca_file="", **level)
    courier = wiring.courier(cfg, maillog=mlog)
    try:
        r = await deliver(courier)
    finally:
        await courier.close()
    if tls == "starttls":
        assert not r.ok and r.enhanced.startswith("4."), r
        sent = b"".join(sh.wire)
        assert b"AUTH" not in sent and sh.oauth_attempts == []
        assert all(token.encode() not in sent for token in ep.issued)
    else:
        assert r.ok, logtext(mlog)
        assert [ok for _, _, ok in sh.oauth_attempts] == [True]
    # Given the CA, every level verifies and the token goes.
    cfg = secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file, **level)
    courier = wiring.courier(cfg, maillog=mlog)
    try:
        rr = await deliver(courier)
        assert rr.ok, logtext(mlog)
    finally:
        await courier.close()
    assert sh.oauth_attempts[-1][2] is True


async def test_doctor_keeps_an_echoed_token_out_of_its_report(
        request: pytest.FixtureRequest, dns_server: FakeDNSServer, endpoint: Any,
        trustme_ca: Any, trustme_ca_file: Path) -> None:
    """`authrelay doctor` (its report is pasted into tickets): a refusal that echoes the
    token or the SASL response we sent is reported with them cut out."""
    tmp = request.getfixturevalue("doctor_setup")["tmp"]
    ep = endpoint(secret="s3cret-value")
    sf = write_secret(tmp / "m365.secret", "s3cret-value\n")
    relay = {"smart_host_user": USER, "smart_host_auth": "xoauth2",
             "smart_host_oauth_token_url": ep.url, "smart_host_oauth_client_id": "app-id",
             "smart_host_oauth_scope": ep.scope, "smart_host_oauth_secret_file": str(sf),
             "smart_host_oauth_ca_file": str(trustme_ca_file)}
    server = await _echo_server(server_tls_context(trustme_ca, "127.0.0.2"))
    addr = f"127.0.0.2:{server.sockets[0].getsockname()[1]}"
    try:
        res = await doctor(cfg_for(tmp, dns_server, relay={
            **relay, "smart_host": [addr], "smart_host_tls": "tls",
            "smart_host_ca_file": str(trustme_ca_file)}))
    finally:
        server.close()
        await server.wait_closed()
    line = res[f"smarthost {addr}"].line()
    assert "refused: 535 5.7.8 refused [redacted] i.e. [redacted]" in line, line
    assert ep.issued and all(token not in line for token in ep.issued)


async def test_doctor_keeps_an_echoed_password_out_of_its_report(
        request: pytest.FixtureRequest, dns_server: FakeDNSServer) -> None:
    """Password AUTH at a smart host whose 535 quotes what we sent (the PLAIN response
    and the password in it): doctor's report has them cut out."""
    import base64

    tmp = request.getfixturevalue("doctor_setup")["tmp"]
    pw = write_secret(tmp / "smart.pw", "pa55word-echoed\n")
    server = await _echo_server()
    addr = f"127.0.0.2:{server.sockets[0].getsockname()[1]}"
    try:
        res = await doctor(cfg_for(tmp, dns_server, relay={
            "smart_host": [addr], "smart_host_user": USER, "smart_host_tls": "none",
            "smart_host_password_file": str(pw)}))
    finally:
        server.close()
        await server.wait_closed()
    line = res[f"smarthost {addr}"].line()
    assert "AUTH refused: 535" in line and "[redacted]" in line, line
    blob = base64.b64encode(f"\0{USER}\0pa55word-echoed".encode()).decode()
    assert "pa55word" not in line and blob not in line


async def test_a_stalled_token_endpoint_is_cut_at_attempt_timeout(
        tmp_path: Path, dns: FakeDNSServer, endpoint: Any, smart_host: Any,
        trustme_ca_file: Path, mlog: Any) -> None:
    """The token fetch is part of the delivery attempt: an endpoint that takes the request
    and never answers holds the delivery no longer than [delivery] attempt_timeout (not
    the fetch's own min(30 s, connect_timeout)); deferred 4.4.2 naming the limit, the
    smart host never connected to. The fetch goes on: once the endpoint answers, the
    next attempt uses its token (one request in all)."""
    ep = endpoint(secret="s3cret-value")
    sh = smart_host(ep)
    ep.hold.clear()
    courier = wiring.courier(secret_cfg(tmp_path, dns, sh, ep, trustme_ca_file,
                                        delivery={"attempt_timeout": "1s"}), maillog=mlog)
    try:
        r = await deliver(courier)
        assert ep.held == 1 and not ep.hold.is_set()  # still unanswered
        assert (r.permanent, r.enhanced, r.code) == (False, "4.4.2", 451), r
        assert r.text.startswith(f"no OAuth token for smart host 127.0.0.2:{sh.port}: the "
                                 "token endpoint had not answered when the delivery "
                                 "attempt's time limit ([delivery] attempt_timeout = 1s) "
                                 "was reached"), r.text
        assert sh.connections == 0
        ep.hold.set()
        await until(lambda: ep.issued != {}, "the fetch answered after its caller left")
        r = await deliver(courier)
    finally:
        await courier.close()
    assert r.ok, r
    assert ep.requests == ["client_credentials"]
    assert len(sh.messages) == 1
