"""DANE (RFC 7672 2.2, RFC 6698 2.1) with TLSA RRsets that hold malformed records: a
`3 1 1` record whose digest is not 32 bytes, RDATA shorter than its three octet fields;
and MX hosts whose addresses come through a CNAME chain (RFC 7672 2.2.2: TLSA records
at the expanded name first, then at the MX host's own name).

dnspython refuses a whole DNS message for one such record; the courier must ignore the
bad records (unusable) and use the others, and when none is left still require TLS
(unauthenticated), never plain text. The loopback DNS server (dnslib) serves the raw
RDATA and sets the AD bit as a validating resolver would; the MX hosts are aiosmtpd with
STARTTLS (or without, for the "TLS is mandatory" case)."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer
from support.maillog import ListLog
from support.ports import common_free_port
from test_delivery import MSG, envelope

from authrelay.config import from_dict
from authrelay.delivery.client import Courier
from authrelay.types import DeliveryResult

HOSTS = {"mx-mixed": "127.0.0.2", "mx-allbad": "127.0.0.3", "mx-plain": "127.0.0.4",
         "mx-wrong": "127.0.0.5", "mx-alias": "127.0.0.6", "mx-own": "127.0.0.7",
         "mx-ta": "127.0.0.8"}
SHORT = bytes((3, 1))  # RDATA of two octets: not even usage, selector, matching type
SNI: dict[str, list[str | None]] = {}  # per MX host: the SNI each handshake carried


def _tlsa(usage: int, selector: int, mtype: int, data: bytes) -> bytes:
    return bytes((usage, selector, mtype)) + data


class Rig:
    def __init__(self, dns: FakeDNSServer, port: int, mx: dict[str, FakeSMTPServer]) -> None:
        self.dns, self.port, self.mx = dns, port, mx

    async def deliver(self, tmp: Path, domain: str) -> tuple[DeliveryResult, ListLog]:
        cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp), "delivery": {
            "port": self.port, "nameservers": [self.dns.nameserver], "dnssec": True,
            "dns_timeout": "3s", "connect_timeout": "5s", "command_timeout": "10s",
            "data_timeout": "10s"}})
        log = ListLog()
        courier = Courier(cfg, maillog=log)
        env = envelope(f"bob@{domain}")
        try:
            res = await courier.deliver(env, env.recipients, MSG)
        finally:
            await courier.close()
        return res[f"bob@{domain}"], log


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    port = common_free_port()
    ca = trustme.CA()  # in no trust store: only DANE can vouch for these
    inter = ca.create_child_ca()
    inter_der = x509.load_pem_x509_certificate(inter.cert_pem.bytes()).public_bytes(
        Encoding.DER)
    zones: dict[str, Any] = {}
    ctxs: dict[str, ssl.SSLContext | None] = {}
    for host, ip in HOSTS.items():
        issuer = inter if host == "mx-ta" else ca
        leaf = issuer.issue_cert(f"real.{host}.test" if host in ("mx-alias", "mx-ta")
                                 else f"{host}.test")
        cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        spki = cert.public_key().public_bytes(Encoding.DER,
                                              PublicFormat.SubjectPublicKeyInfo)
        good = _tlsa(3, 1, 1, hashlib.sha256(spki).digest())
        bad_len = _tlsa(3, 1, 1, hashlib.sha256(spki).digest()[:31])
        records = {"mx-mixed": [bad_len, good, SHORT],
                   "mx-wrong": [bad_len, _tlsa(3, 1, 1, hashlib.sha256(b"other").digest())],
                   }.get(host, [bad_len, SHORT, _tlsa(3, 1, 2, b"\x01" * 32)])
        dom = host.removeprefix("mx-") + ".test"
        zones[dom] = {"MX": [(10, f"{host}.test")]}
        zones[f"{host}.test"] = {"A": [ip]}
        zones[f"_{port}._tcp.{host}.test"] = {"TLSA": records}
        if host in ("mx-alias", "mx-own", "mx-ta"):
            # mx-alias.test -> mid.mx-alias.test -> real.mx-alias.test (the address).
            # mx-alias: the TLSA record only at the expanded name; mx-own: only at the
            # MX host's own name (nothing at the expanded one).
            zones[f"{host}.test"] = {"CNAME": [f"mid.{host}.test"]}
            zones[f"mid.{host}.test"] = {"CNAME": [f"real.{host}.test"]}
            zones[f"real.{host}.test"] = {"A": [ip]}
            zones.pop(f"_{port}._tcp.{host}.test")
            at = f"{host}.test" if host == "mx-own" else f"real.{host}.test"
            zones[f"_{port}._tcp.{at}"] = {"TLSA": [
                _tlsa(2, 0, 1, hashlib.sha256(inter_der).digest()) if host == "mx-ta"
                else good]}
        c = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(c)
        seen = SNI.setdefault(host, [])
        c.sni_callback = lambda _s, name, _c, seen=seen: seen.append(name)  # type: ignore
        ctxs[host] = None if host == "mx-plain" else c
    dns = FakeDNSServer(zones, ad=True).start()
    servers: dict[str, FakeSMTPServer] = {}
    try:
        for host, ip in HOSTS.items():
            servers[host] = FakeSMTPServer(ip, port, starttls_context=ctxs[host]).start()
        yield Rig(dns, port, servers)
    finally:
        for s in servers.values():
            s.stop()
        dns.stop()


async def test_malformed_records_are_ignored_the_good_one_used(tmp_path: Path,
                                                               rig: Rig) -> None:
    """A 31-byte SHA-256 digest and a 2-octet RDATA beside a good DANE-EE record: the
    good one verifies the server (the old code deferred the host for ever: dnspython
    refused the whole answer, read as a failed TLSA lookup)."""
    res, log = await rig.deliver(tmp_path, "mixed.test")
    assert res.ok, res
    assert (res.tls, res.tls_policy) == ("verified", "dane")
    assert rig.mx["mx-mixed"].messages[-1].tls
    assert log.grep("tls=Verified TLS connection established to mx-mixed.test",
                    "policy=dane")


async def test_only_malformed_records_mean_tls_without_authentication(
        tmp_path: Path, rig: Rig) -> None:
    """Secure TLSA records none of which is usable (RFC 7672 2.2): TLS is mandatory, the
    certificate is not authenticated; the maillog says so (tls=untrusted)."""
    res, log = await rig.deliver(tmp_path, "allbad.test")
    assert res.ok, res
    assert (res.tls, res.tls_policy) == ("untrusted", "dane")
    assert rig.mx["mx-allbad"].messages[-1].tls
    assert log.grep("tls=Untrusted TLS connection established to mx-allbad.test")


async def test_only_malformed_records_never_plain_text(tmp_path: Path, rig: Rig) -> None:
    """The same records on a host without STARTTLS: deferred, nothing sent in clear."""
    res, log = await rig.deliver(tmp_path, "plain.test")
    assert not res.ok and not res.permanent, res
    assert rig.mx["mx-plain"].messages == []
    assert res.enhanced == "4.7.4" and "TLS is required (policy dane)" in res.text
    assert log.grep("relay=mx-plain.test", "status=host failed", "TLS is required")


async def test_malformed_beside_a_mismatch_defers(tmp_path: Path, rig: Rig) -> None:
    """The well-formed record that is left does not match: 4.7.5, as any DANE mismatch."""
    res, _ = await rig.deliver(tmp_path, "wrong.test")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert "matches no DANE-EE TLSA record" in res.text
    assert rig.mx["mx-wrong"].messages == []


async def test_tlsa_at_the_cname_expanded_name(tmp_path: Path, rig: Rig) -> None:
    """The MX host's addresses come through two CNAMEs; its TLSA record is published at
    the expanded name only, and its certificate names only that name: DANE applies and
    verifies (the old code looked only at the MX host's own name: no DANE, tls=untrusted
    under policy may)."""
    res, log = await rig.deliver(tmp_path, "alias.test")
    assert res.ok, res
    assert (res.tls, res.tls_policy) == ("verified", "dane")
    assert log.grep("tls=Verified TLS connection established to mx-alias.test")
    # RFC 7672 8.1: the SNI is the TLSA base domain, here the expanded name
    assert SNI["mx-alias"][-1] == "real.mx-alias.test"


async def test_tlsa_at_the_mx_name_when_none_at_the_expanded(tmp_path: Path,
                                                             rig: Rig) -> None:
    """No TLSA record at the expanded name: the one at the MX host's own name is used."""
    res, _ = await rig.deliver(tmp_path, "own.test")
    assert res.ok, res
    assert (res.tls, res.tls_policy) == ("verified", "dane")
    assert SNI["mx-own"][-1] == "mx-own.test"


async def test_dane_ta_accepts_the_cname_expanded_name(tmp_path: Path, rig: Rig) -> None:
    """DANE-TA (RFC 7672 3.2.2): the certificate names only the CNAME-expanded name,
    which is a reference identifier beside the MX host name and the domain."""
    res, _ = await rig.deliver(tmp_path, "ta.test")
    assert res.ok, res
    assert (res.tls, res.tls_policy) == ("verified", "dane")


async def test_tlsa_asks_the_system_resolver(tmp_path: Path) -> None:
    """With no `[delivery] nameservers`, the TLSA query goes to resolv.conf's resolver
    (dnspython keeps those entries as address strings): here a loopback DNS server on
    port 53 of an address only it uses (the TLSA query code of 96a4d48 asked
    127.0.0.1:53 instead: refused, the TLSA lookup failed, the host unusable)."""
    import random

    from authrelay.dns import Resolver

    host = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(2, 255)}"
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver {host}\n")
    good = _tlsa(3, 1, 1, b"\x01" * 32)
    with FakeDNSServer({"_25._tcp.mx.test": {"TLSA": [good, SHORT]}}, host, ad=True,
                       port=53):
        r = Resolver((), 10, dnssec=True, resolv_conf=str(conf))  # (a loaded machine)
        a = await r.tlsa_answer("_25._tcp.mx.test")
    assert (a.records, a.secure, a.malformed) == ([(3, 1, 1, b"\x01" * 32)], True, 1)


# The TLSA query is sent by dns.Resolver.tlsa_answer itself (96a4d48): its own UDP,
# TCP and deadline handling, each tested here against the loopback server.

async def test_tlsa_truncated_over_udp_is_asked_again_over_tcp() -> None:
    """An RRset too big for the UDP answer (TC set) is read whole over TCP (RFC 7766)."""
    from authrelay.dns import Resolver

    many = [_tlsa(3, 0, 0, bytes([i]) * 300) for i in range(8)]  # ~2.4 KB of RDATA
    with FakeDNSServer({"_25._tcp.mx.test": {"TLSA": many}}, ad=True,
                       udp_limit=512) as dns_:
        a = await Resolver([dns_.nameserver], 5, dnssec=True).tlsa_answer("_25._tcp.mx.test")
    assert sorted(d for *_, d in a.records) == [bytes([i]) * 300 for i in range(8)]
    assert (a.secure, a.malformed) == (True, 0)


async def test_tlsa_lookup_past_its_deadline_is_temporary() -> None:
    """A server that never answers: DnsTemporary once the resolver's timeout has passed
    (the MX is then unusable for this attempt, never tried in plain text)."""
    from authrelay.dns import DnsTemporary, Resolver

    with FakeDNSServer({"_25._tcp.mx.test": "TIMEOUT"}, ad=True) as dns_, \
            pytest.raises(DnsTemporary, match="timed out"):
        await Resolver([dns_.nameserver], 1.0, dnssec=True).tlsa_answer("_25._tcp.mx.test")


async def test_tlsa_servfail_tries_the_next_server_then_is_temporary() -> None:
    """SERVFAIL (a validating resolver's answer to bogus data) from one server: the next
    is asked; from every server: DnsTemporary, never "no TLSA records"."""
    from authrelay.dns import DnsTemporary, Resolver

    good = _tlsa(3, 1, 1, b"\x01" * 32)
    with FakeDNSServer({"_25._tcp.mx.test": "SERVFAIL"}, ad=True) as bad, \
            FakeDNSServer({"_25._tcp.mx.test": {"TLSA": [good]}}, ad=True) as ok:
        a = await Resolver([bad.nameserver, ok.nameserver], 5,
                           dnssec=True).tlsa_answer("_25._tcp.mx.test")
        assert a.records == [(3, 1, 1, b"\x01" * 32)]
        assert ("_25._tcp.mx.test", "TLSA") in bad.queries
        with pytest.raises(DnsTemporary, match="SERVFAIL"):
            await Resolver([bad.nameserver], 5, dnssec=True).tlsa_answer(
                "_25._tcp.mx.test")
