"""Outbound TLS levels end to end (none, may, encrypt, verify, dane/dane-only without
DNSSEC, the per-domain map, smart-host levels): the courier against aiosmtpd MX hosts
with good, wrong-name, expired and foreign-CA certificates from trustme, a dnslib DNS
server, the maillog captured. DANE and MTA-STS with real BIND/unbound/HTTPS are in
test_tls_dane.py and test_tls_mtasts.py."""

from __future__ import annotations

import datetime
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory
from support.maillog import ListLog
from test_delivery import MSG, ZONES, envelope, make_cfg

from authrelay.delivery.client import Courier
from authrelay.types import DeliveryResult

pytestmark = pytest.mark.slow

MX1 = "mx1.example.test"


def ctx_for(ca: trustme.CA, *names: str, expired: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    kw: dict[str, Any] = {}
    if expired:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        kw = {"not_before": past - datetime.timedelta(days=60), "not_after": past}
    ca.issue_cert(*names, **kw).configure_cert(ctx)
    return ctx


def malformed_san_ctx(tmp_path: Path) -> ssl.SSLContext:
    """A leaf that OpenSSL loads and serves but whose subjectAltName cryptography cannot
    parse: one dNSName with a byte above 0x7f (what a hostile MX may send)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX1)])
    now = datetime.datetime.now(datetime.UTC)
    bad = b"mx1\xffexample.test"
    san = bytes([0x30, len(bad) + 2, 0x82, len(bad)]) + bad
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.UnrecognizedExtension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san), critical=False)
            .sign(key, hashes.SHA256()))
    pem = tmp_path / "malformed-san.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem)
    return ctx


@pytest.fixture
def dns(dns_server: FakeDNSServer) -> FakeDNSServer:
    dns_server.set_zones(ZONES)
    dns_server.update({"example.test": {"MX": [(10, MX1)]}})
    return dns_server


async def deliver(tmp_path: Path, dns: FakeDNSServer, port: int, ca_file: Path,
                  rcpt: str = "bob@example.test", *, relay: dict[str, Any] | None = None,
                  **delivery: Any) -> tuple[DeliveryResult, ListLog]:
    cfg = make_cfg(tmp_path, dns, port, relay=relay, tls_ca_file=str(ca_file), **delivery)
    log = ListLog()
    courier = Courier(cfg, maillog=log)
    env = envelope(rcpt)
    try:
        res = await courier.deliver(env, env.recipients, MSG)
    finally:
        await courier.close()
    return res[rcpt], log


async def test_none_never_starttls(tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
                                   trustme_ca: trustme.CA, trustme_ca_file: Path) -> None:
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, MX1))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="none")
    assert res.ok and (res.tls, res.tls_policy) == ("none", "none")
    assert mx.messages[0].tls is False
    assert not log.grep("TLS connection established")


async def test_may_untrusted_certificate_is_encrypted_and_says_so(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme.CA(), MX1))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "may")
    assert mx.messages[0].tls is True
    line = log.grep("tls=Untrusted TLS connection established to "
                    f"{MX1} [127.0.0.2]:{fake_mx.port}: TLSv1.3 with cipher ")
    assert line and "policy=may" in line[0] and "reason=certificate not trusted" in line[0]


async def test_may_valid_certificate_is_verified(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, MX1))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and res.tls == "verified"
    assert log.grep("tls=Verified TLS connection established", "policy=may")


async def test_may_wrong_name_is_trusted(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, "other.test"))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and res.tls == "trusted"
    assert log.grep("tls=Trusted TLS connection", "do not match mx1.example.test")


async def test_may_without_starttls_is_plain(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    fake_mx("127.0.0.2")
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("none", "may")


async def test_may_starttls_refused_goes_plain_and_says_so(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    """STARTTLS offered, then refused with 454 (a busy server, or a man in the middle
    rewriting the reply): `may` goes on in plain text (RFC 3207 4) and the maillog says
    why; it said nothing (only tls=none on the delivery line). `encrypt` defers 4.7.5."""
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, MX1),
                 starttls_reply="454 4.7.0 TLS not available")
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("none", "may"), res
    assert mx.messages[0].tls is False
    assert log.grep(f"relay={MX1} [127.0.0.2]:{fake_mx.port}",
                    "tls=not used: STARTTLS refused: 454 4.7.0 TLS not available")
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="encrypt")
    assert not res.ok and res.enhanced == "4.7.5" and "STARTTLS refused" in res.text


async def test_encrypt_requires_starttls(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    mx = fake_mx("127.0.0.2")
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                           tls_policy="encrypt")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.4"
    assert res.tls_policy == "encrypt" and not mx.messages


async def test_encrypt_accepts_any_certificate(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme.CA(), "whatever.test"))
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                           tls_policy="encrypt")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "encrypt")
    assert mx.messages[0].tls


async def test_verify_good_certificate(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, MX1))
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                           tls_policy="verify")
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "verify")
    assert mx.messages[0].tls


@pytest.mark.parametrize("kind, why", [
    ("wrong-name", "do not match mx1.example.test"),
    ("expired", "certificate expired on"),
    ("foreign-ca", "certificate not trusted"),
])
async def test_verify_refuses_bad_certificates(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path, kind: str, why: str) -> None:
    ctx = {"wrong-name": lambda: ctx_for(trustme_ca, "other.test"),
           "expired": lambda: ctx_for(trustme_ca, MX1, expired=True),
           "foreign-ca": lambda: ctx_for(trustme.CA(), MX1)}[kind]()
    mx = fake_mx("127.0.0.2", starttls_context=ctx)
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                             tls_policy="verify")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert why in res.text and res.tls_policy == "verify"
    assert not mx.messages  # nothing was sent over the unaccepted connection
    assert log.grep("status=TLS policy failed", "policy=verify", "action=deferred")


@pytest.mark.parametrize("case", ["wildcard-san", "underscore-mx"])
async def test_names_no_certificate_can_match_are_judged_not_raised(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path, case: str) -> None:
    """A hostile MX's certificate whose first name is a wildcard for another domain, or an
    MX name from DNS with an underscore (no certificate can match it): the name check
    fails like any mismatch (`may` delivers, tls=trusted; `verify` defers 4.7.5). It used
    to raise ValueError out of the courier: mail to that MX never went, no TLS line."""
    if case == "wildcard-san":
        ctx, host = ctx_for(trustme_ca, "*.other.test"), MX1
    else:
        host = "mx_1.example.test"
        dns.update({"example.test": {"MX": [(10, host)]}, host: {"A": ["127.0.0.2"]}})
        ctx = ctx_for(trustme_ca, MX1)
    mx = fake_mx("127.0.0.2", starttls_context=ctx)
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("trusted", "may"), res
    assert mx.messages[0].tls
    assert log.grep(f"tls=Trusted TLS connection established to {host} [127.0.0.2]:",
                    f"do not match {host}")
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                             tls_policy="verify")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert len(mx.messages) == 1  # nothing more went over the unaccepted connection
    assert log.grep("status=TLS policy failed", "policy=verify", "action=deferred")


async def test_certificate_cryptography_cannot_parse_is_untrusted_not_raised(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    """A hostile MX's leaf with a malformed subjectAltName: `may` delivers and the
    maillog says tls=untrusted with the reason; `verify` defers 4.7.5. It used to raise
    ValueError out of the courier (mail deferred as an internal error, no TLS line)."""
    mx = fake_mx("127.0.0.2", starttls_context=malformed_san_ctx(tmp_path))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "may"), res
    assert mx.messages[0].tls
    assert log.grep("tls=Untrusted TLS connection established", "malformed certificate")
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                             tls_policy="verify")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert "malformed certificate" in res.text and len(mx.messages) == 1


async def test_sni_is_the_mx_host_name(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    """The STARTTLS handshake names the MX host (RFC 6066 3; RFC 7672 8.1 for DANE), so an
    MX with one certificate per name can present the right one; an address literal
    sends none (RFC 6066 allows no IP literal there)."""
    seen: list[str | None] = []
    ctx = ctx_for(trustme_ca, MX1, "127.0.0.2")
    ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)
    fake_mx("127.0.0.2", starttls_context=ctx)
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="verify")
    assert res.ok and res.tls == "verified", res
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, "bob@[127.0.0.2]",
                           tls_policy="verify")
    assert res.ok and res.tls == "verified", res
    assert seen == [MX1, None]


async def test_mx_name_that_is_no_host_name_gets_no_sni(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    """A hostile DNS answer: the MX name's label holds backslashes, which dnspython writes
    escaped (one 63-byte label becomes 116 characters). Sent as SNI it made ssl raise
    UnicodeError out of the courier (mail deferred as an internal error, no TLS line);
    now the handshake goes without SNI and the name check fails like any mismatch."""
    host = "x" * 10 + "\\" * 53 + ".example.test"
    dns.update({"example.test": {"MX": [(10, host)]}, host: {"A": ["127.0.0.2"]}})
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, MX1))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("trusted", "may"), res
    assert mx.messages[0].tls and log.grep("tls=Trusted TLS connection established")
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="verify")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res


async def test_address_literal_is_checked_against_the_ip_address(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    """`bob@[127.0.0.2]` (RFC 5321 4.1.3): the reference identity is the address (an
    iPAddress SAN, RFC 6125 1.7.2), not the bracketed text (which raised ValueError)."""
    fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, "127.0.0.2"))
    fake_mx("127.0.0.3", starttls_context=ctx_for(trustme_ca, MX1))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                             "bob@[127.0.0.2]", tls_policy="verify")
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "verify"), res
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                             "bob@[127.0.0.3]", tls_policy="may")
    assert res.ok and (res.tls, res.tls_policy) == ("trusted", "may"), res
    assert log.grep("do not match [127.0.0.3]")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls_older_than_1_2_is_refused(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    """README "Outbound TLS": TLS 1.2 or newer (RFC 8996). An MX that speaks only TLS 1.1
    fails the handshake: `encrypt` defers 4.7.5; `may` defers this attempt and goes in
    plain text on the next (tls_fallback_time), never over TLS 1.1."""
    ctx = ctx_for(trustme_ca, MX1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.1 above level 0
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    mx = fake_mx("127.0.0.2", starttls_context=ctx)
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="encrypt")
    assert not res.ok and res.enhanced == "4.7.5" and "TLS handshake" in res.text, res
    cfg = make_cfg(tmp_path, dns, fake_mx.port, tls_ca_file=str(trustme_ca_file),
                   tls_policy="may")
    log = ListLog()
    courier = Courier(cfg, maillog=log)
    try:
        env = envelope("bob@example.test")
        first = (await courier.deliver(env, env.recipients, MSG))["bob@example.test"]
        env = envelope("bob@example.test")
        second = (await courier.deliver(env, env.recipients, MSG))["bob@example.test"]
    finally:
        await courier.close()
    assert not first.ok and first.enhanced == "4.7.5"
    assert log.grep("status=TLS handshake failed", "next=plain text for the next attempts")
    assert second.ok and (second.tls, second.tls_policy) == ("none", "may")
    assert [m.tls for m in mx.messages] == [False]


async def test_older_tls_verify_key_means_verify(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    fake_mx("127.0.0.2", starttls_context=ctx_for(trustme.CA(), MX1))
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_verify=True)
    assert not res.ok and res.enhanced == "4.7.5" and res.tls_policy == "verify"


async def test_policy_map_match_nexthop(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path) -> None:
    """Postfix's `match = nexthop:dot-nexthop`: a certificate for the domain (or a
    subdomain), not for the MX host name, verifies; the map wins over the default."""
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, "example.test"))
    res, _ = await deliver(
        tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may",
        tls_policy_map=[{"domain": "example.test", "level": "verify",
                         "match": ["nexthop", "dot-nexthop"]}])
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "verify")
    assert mx.messages
    res, _ = await deliver(
        tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may",
        tls_policy_map=[{"domain": "example.test", "level": "verify"}])  # match: hostname
    assert not res.ok and res.enhanced == "4.7.5"


async def test_policy_map_subdomains(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    dns.update({"sub.example.test": {"MX": [(10, MX1)]}})
    fake_mx("127.0.0.2")  # no STARTTLS
    policy_map = [{"domain": ".example.test", "level": "encrypt"}]
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, "a@sub.example.test",
                           tls_policy="may", tls_policy_map=policy_map)
    assert not res.ok and res.enhanced == "4.7.4"  # .example.test covers sub.example.test
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, tls_policy="may",
                           tls_policy_map=policy_map)
    assert res.ok  # but not example.test itself


@pytest.mark.parametrize("entry, rcpt", [
    ("xn--bcher-kva.test", "bob@bücher.test"),
    ("bücher.test", "bob@xn--bcher-kva.test"),
    (".bücher.test", "bob@sub.xn--bcher-kva.test"),
])
async def test_policy_map_covers_both_forms_of_an_internationalized_domain(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca_file: Path,
        entry: str, rcpt: str) -> None:
    """A map entry for xn--bcher-kva.test (the A-label DNS is asked for) also holds for a
    recipient written bücher.test, and the reverse. Before, the other spelling missed the
    entry and got the default level: mail the admin required TLS for went in plain text."""
    dns.update({"xn--bcher-kva.test": {"MX": [(10, MX1)]},
                "sub.xn--bcher-kva.test": {"MX": [(10, MX1)]}})
    mx = fake_mx("127.0.0.2")  # no STARTTLS
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file, rcpt,
                           tls_policy="may",
                           tls_policy_map=[{"domain": entry, "level": "encrypt"}])
    assert not res.ok and res.enhanced == "4.7.4" and res.tls_policy == "encrypt", res
    assert not mx.messages


async def test_dane_without_dnssec_is_opportunistic(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    """The default level (dane) with `[delivery] dnssec` off: no AD bit is believed, so
    no DANE; no MTA-STS record either: may."""
    fake_mx("127.0.0.2", starttls_context=ctx_for(trustme.CA(), MX1))
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file)
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "may")
    assert ("_mta-sts.example.test", "TXT") in dns.queries


async def test_dane_only_without_dnssec_defers(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    mx = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme.CA(), MX1))
    res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                             tls_policy="dane-only")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5"
    assert "dane-only" in res.text and not mx.messages
    assert log.grep("status=host failed", MX1)


async def test_smart_host_encrypt_level(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory,
        trustme_ca_file: Path) -> None:
    sh = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme.CA(), "127.0.0.2"))
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                           relay={"smart_host": [sh.address], "smart_host_tls": "encrypt"})
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "encrypt")
    res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                           relay={"smart_host": [sh.address], "smart_host_tls": "verify"})
    assert not res.ok and res.enhanced == "4.7.5" and res.tls_policy == "verify"


# --------------------------------------------------------------------------- the daemon

@pytest.mark.slow
def test_serve_logs_and_counts_tls(relay_factory: Any, dns: FakeDNSServer,  # noqa: F811
                                   fake_mx: MXFactory, trustme_ca: trustme.CA,
                                   trustme_ca_file: Path) -> None:
    """A real `authrelay serve`: the per-connection TLS line, tls=/policy= on the delivery
    lines (Sent and Deferred), and authrelay_delivery_tls_total on /metrics."""
    from support.ports import free_port
    from test_e2e_delivery import log_lines, mx_overrides, submit
    from test_metrics import scrape, up, val

    dns.update({"bad.test": {"MX": [(10, "mx.bad.test")]}, "mx.bad.test": {"A": ["127.0.0.3"]},
                "mx.sender.test": {"A": ["127.0.0.9"]},
                "sender.test": {"MX": [(10, "mx.sender.test")]}})
    good = fake_mx("127.0.0.2", starttls_context=ctx_for(trustme_ca, MX1))
    fake_mx("127.0.0.3", starttls_context=ctx_for(trustme.CA(), "mx.bad.test"))
    mport = free_port()
    overrides = mx_overrides(dns, fake_mx.port, tls_policy="verify",
                             tls_ca_file=str(trustme_ca_file), retry=["1h"],
                             tls_reports=True)
    overrides["metrics"] = {"address": f"127.0.0.1:{mport}"}
    relay = relay_factory(overrides)
    up(relay, mport)
    ok = submit(relay, ["bob@example.test"])
    bad = submit(relay, ["carol@bad.test"])
    relay.wait_for(lambda: good.messages, what="delivery")
    sent = relay.wait_for(lambda: [ln for ln in log_lines(relay, ok) if "stat=Sent" in ln],
                          what="the Sent line")
    assert "tls=verified, policy=verify, stat=Sent" in sent[0]
    assert any(f"tls=Verified TLS connection established to {MX1} [127.0.0.2]:"
               f"{fake_mx.port}: TLSv1.3 with cipher" in ln and "policy=verify" in ln
               for ln in log_lines(relay, ok))
    deferred = relay.wait_for(lambda: [ln for ln in log_lines(relay, bad) if "stat=Deferred" in ln],
                              what="the Deferred line")
    assert "dsn=4.7.5, tls=untrusted, policy=verify, stat=Deferred" in deferred[0]

    def counted() -> bool:
        m = scrape(mport)
        return val(m, "authrelay_delivery_tls_total", result="sent", tls="verified",
                   policy="verify") == 1 and \
            val(m, "authrelay_delivery_tls_total", result="deferred", tls="untrusted",
                policy="verify") == 1
    relay.wait_for(counted, what="the delivery_tls counters")
    # tls_reports: the tally of both sessions is on disk once the server has stopped
    relay.stop()
    [day] = list((relay.state / "tls-rpt").glob("????-??-??.json"))
    tally = json.loads(day.read_text())
    assert set(tally) == {"example.test", "bad.test"}
    [(ok, fails)] = tally["bad.test"].values()
    # result type | MX host | its address | our address (sending-mta-ip)
    assert ok == 0 and list(fails) == ["certificate-not-trusted|mx.bad.test|127.0.0.3|127.0.0.1"]
    [(ok, fails)] = tally["example.test"].values()
    assert ok == 1 and fails == {}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
@pytest.mark.parametrize("level", ["encrypt", "verify"])
@pytest.mark.parametrize("attack", ["tls1.1-only", "broken-handshake", "ca-cert-as-leaf"])
async def test_a_required_level_never_falls_back(
        tmp_path: Path, dns: FakeDNSServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        trustme_ca_file: Path, level: str, attack: str) -> None:
    """A hostile MX (or someone between) at a level that requires TLS: an MX that speaks
    only TLS 1.1 (our minimum is 1.2, Python's default context), one that breaks the
    handshake after 220 to STARTTLS, one that presents the CA's own certificate as its
    leaf. Deferred 4.7.5 every time, twice in a row (the second attempt does not fall
    back to plain text as `may` would), and nothing reaches the MX."""
    kw: dict[str, Any] = {}
    if attack == "tls1.1-only":
        ctx = ctx_for(trustme_ca, MX1)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        kw["starttls_context"] = ctx
    elif attack == "broken-handshake":
        kw["broken_starttls"] = True
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with trustme_ca.cert_pem.tempfile() as cert, \
                trustme_ca.private_key_pem.tempfile() as key:
            ctx.load_cert_chain(cert, key)
        kw["starttls_context"] = ctx
    mx = fake_mx("127.0.0.2", **kw)
    if attack == "ca-cert-as-leaf" and level == "encrypt":
        # encrypt takes any certificate (Postfix's meaning), and says it is not verified
        res, log = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                                 tls_policy=level)
        assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "encrypt")
        assert log.grep("tls=Untrusted TLS connection established", "policy=encrypt")
        return
    for _ in range(2):
        res, _ = await deliver(tmp_path, dns, fake_mx.port, trustme_ca_file,
                               tls_policy=level, tls_fallback_time="1h")
        assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
        assert res.tls_policy == level and res.tls != "verified"
        assert {"tls1.1-only": "TLS handshake", "broken-handshake": "TLS handshake",
                "ca-cert-as-leaf": "self-signed"}[attack] in res.text, res.text
    assert not mx.messages
