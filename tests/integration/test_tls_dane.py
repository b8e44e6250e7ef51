"""DANE (RFC 7672) end to end on the real rig: BIND 9 serves a zone signed at test time,
unbound validates it (trust anchor: that zone's key) and is the courier's resolver with
`[delivery] dnssec = true`; aiosmtpd MX hosts with STARTTLS present certificates that the
TLSA records match, or not.

Cases: DANE-EE(3) SPKI SHA-256, full certificate, an expired certificate (EE ignores
dates); DANE-TA(2) with SHA-256 of the intermediate and SHA-512 of its key; mismatch ->
4.7.5; a tampered (bogus) TLSA RRset -> unbound SERVFAIL -> the host is unusable, 4.7.5;
a tampered MX RRset -> SERVFAIL -> 4.4.3;
no TLSA -> opportunistic; an unsigned zone -> opportunistic; PKIX-only TLSA -> TLS
mandatory without authentication; dane-only without TLSA -> deferred."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fakes.dnssecrig import DnssecRig
from fakes.smtpserver import FakeSMTPServer
from support.maillog import ListLog
from support.ports import common_free_port
from test_delivery import MSG, envelope
from test_tls_mtasts import POLICY_HOST

from authrelay.config import from_dict
from authrelay.delivery.client import Courier
from authrelay.types import DeliveryResult

pytestmark = [pytest.mark.slow, pytest.mark.external]

HOSTS = {  # MX host -> its address (one fake MX each, all on one port)
    "mx-ee": "127.0.0.2", "mx-ta": "127.0.0.3", "mx-mismatch": "127.0.0.4",
    "mx-bogus": "127.0.0.5", "mx-notlsa": "127.0.0.6", "mx-full": "127.0.0.7",
    "mx-pkix": "127.0.0.8", "mx-expired": "127.0.0.9",
}


def _leaf(ca: trustme.CA, *names: str, **kw: Any) -> \
        tuple[trustme.LeafCert, x509.Certificate]:
    leaf = ca.issue_cert(*names, **kw)
    return leaf, x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class Rig:
    def __init__(self, rig: DnssecRig, port: int, servers: dict[str, FakeSMTPServer]) -> None:
        self.dns, self.port, self.mx = rig, port, servers

    async def deliver(self, tmp: Path, domain: str, **delivery: Any) -> \
            tuple[DeliveryResult, ListLog]:
        d = {"port": self.port, "nameservers": [self.dns.resolver], "dnssec": True,
             "dns_timeout": "3s", "connect_timeout": "5s", "command_timeout": "10s",
             "data_timeout": "10s", **delivery}
        cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp), "delivery": d})
        log = ListLog()
        courier = Courier(cfg, maillog=log)
        rcpt = f"bob@{domain}"
        env = envelope(rcpt)
        try:
            res = await courier.deliver(env, env.recipients, MSG)
        finally:
            await courier.close()
        return res[rcpt], log


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    port = common_free_port()
    foreign = trustme.CA()  # in no trust store: only DANE can vouch for these
    ctxs: dict[str, ssl.SSLContext] = {}
    tlsa: dict[str, str] = {}

    def ctx(host: str, leaf: trustme.LeafCert) -> None:
        c = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(c)
        ctxs[host] = c

    name = lambda h: f"{h}.dane.test"  # noqa: E731
    leaf, cert = _leaf(foreign, name("mx-ee"))
    ctx("mx-ee", leaf)
    tlsa["mx-ee"] = "3 1 1 " + hashlib.sha256(_spki(cert)).hexdigest()
    leaf, cert = _leaf(foreign, name("mx-full"))
    ctx("mx-full", leaf)
    tlsa["mx-full"] = "3 0 0 " + cert.public_bytes(Encoding.DER).hex()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    leaf, cert = _leaf(foreign, name("mx-expired"), not_before=past - datetime.timedelta(
        days=30), not_after=past)
    ctx("mx-expired", leaf)
    tlsa["mx-expired"] = "3 1 2 " + hashlib.sha512(_spki(cert)).hexdigest()
    inter = foreign.create_child_ca()
    inter_cert = x509.load_pem_x509_certificate(inter.cert_pem.bytes())
    leaf, _ = _leaf(inter, name("mx-ta"), name("mx-ta512"))
    ctx("mx-ta", leaf)
    tlsa["mx-ta"] = "2 0 1 " + hashlib.sha256(inter_cert.public_bytes(Encoding.DER)).hexdigest()
    leaf, cert = _leaf(foreign, name("mx-mismatch"))
    ctx("mx-mismatch", leaf)
    tlsa["mx-mismatch"] = "3 1 1 " + hashlib.sha256(b"some other key").hexdigest()
    leaf, cert = _leaf(foreign, name("mx-bogus"))
    ctx("mx-bogus", leaf)
    tlsa["mx-bogus"] = "3 1 1 " + hashlib.sha256(_spki(cert)).hexdigest()
    leaf, cert = _leaf(foreign, name("mx-pkix"))
    ctx("mx-pkix", leaf)
    tlsa["mx-pkix"] = "1 1 1 " + hashlib.sha256(_spki(cert)).hexdigest()  # PKIX-EE: unusable
    leaf, _ = _leaf(foreign, name("mx-notlsa"))
    ctx("mx-notlsa", leaf)

    records: list[str] = []
    for host, ip in HOSTS.items():
        dom = host.removeprefix("mx-")
        records += [f"{dom} IN MX 10 {host}", f"{host} IN A {ip}"]
        if host in tlsa:
            records.append(f"_{port}._tcp.{host} IN TLSA {tlsa[host]}")
    # The TA host under two more names: one its certificate carries (SHA-512 of the
    # anchor's key), one it does not (DANE-TA checks the name: RFC 7672 3.2.2).
    # Both DANE and MTA-STS for ee.dane.test: DANE wins (RFC 8461 2), the policy server
    # is never asked. sts.plain.test: unsigned, with MTA-STS: the fallback.
    records += ["_mta-sts.ee IN TXT \"v=STSv1; id=1\"", f"mta-sts.ee IN A {POLICY_HOST}"]
    records += ["bogusmx IN MX 10 mx-ee",  # signed, then its MX RRset forged
                "ta512 IN MX 10 mx-ta512", "mx-ta512 IN A 127.0.0.3",
                f"_{port}._tcp.mx-ta512 IN TLSA 2 1 2 "
                + hashlib.sha512(_spki(inter_cert)).hexdigest(),
                "taname IN MX 10 mx-taname", "mx-taname IN A 127.0.0.3",
                f"_{port}._tcp.mx-taname IN TLSA {tlsa['mx-ta']}"]
    dns_rig = DnssecRig(tmp_path_factory.mktemp("dnssec"), "dane.test", records,
                        insecure={"plain.test": [
                            "@ IN MX 10 mx", "mx IN A 127.0.0.6",
                            "sts IN MX 10 mx-notlsa.dane.test.",
                            "_mta-sts.sts IN TXT \"v=STSv1; id=1\"",
                            f"mta-sts.sts IN A {POLICY_HOST}"]},
                        tamper=[f"_{port}._tcp.mx-bogus.dane.test.", "bogusmx.dane.test."])
    servers: dict[str, FakeSMTPServer] = {}
    try:
        dns_rig.start()
        for host, ip in HOSTS.items():
            servers[host] = FakeSMTPServer(ip, port, starttls_context=ctxs[host]).start()
        yield Rig(dns_rig, port, servers)
    finally:
        for s in servers.values():
            s.stop()
        dns_rig.stop()


@pytest.mark.parametrize("domain, host", [
    ("ee.dane.test", "mx-ee"), ("full.dane.test", "mx-full"),
    ("expired.dane.test", "mx-expired"), ("ta.dane.test", "mx-ta"),
])
async def test_dane_match_is_verified(tmp_path: Path, rig: Rig, domain: str,
                                      host: str) -> None:
    before = len(rig.mx[host].messages)
    res, log = await rig.deliver(tmp_path, domain)
    assert res.ok, res
    assert (res.tls, res.tls_policy) == ("verified", "dane")
    assert len(rig.mx[host].messages) == before + 1 and rig.mx[host].messages[-1].tls
    assert log.grep(f"tls=Verified TLS connection established to {host}.dane.test",
                    "policy=dane")


async def test_dane_ta_sha512_spki(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "ta512.dane.test")
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "dane")


async def test_dane_ta_checks_the_name(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "taname.dane.test")
    assert not res.ok and res.enhanced == "4.7.5" and res.tls_policy == "dane"
    assert "do not match mx-taname.dane.test" in res.text, res


async def test_dane_mismatch_defers_475(tmp_path: Path, rig: Rig) -> None:
    before = len(rig.mx["mx-mismatch"].messages)
    res, log = await rig.deliver(tmp_path, "mismatch.dane.test")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert "TLS policy dane" in res.text and "matches no DANE-EE TLSA record" in res.text
    assert len(rig.mx["mx-mismatch"].messages) == before
    assert log.grep("tls=Untrusted TLS connection", "policy=dane")
    assert log.grep("status=TLS policy failed", "action=deferred")


async def test_dnssec_bogus_tlsa_defers(tmp_path: Path, rig: Rig) -> None:
    before = rig.mx["mx-bogus"].connections
    res, log = await rig.deliver(tmp_path, "bogus.dane.test")
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert "TLSA lookup" in res.text and "failed" in res.text
    assert rig.mx["mx-bogus"].connections == before  # never connected
    assert log.grep("mx-bogus.dane.test", "status=host failed")


async def test_dnssec_bogus_mx_defers(tmp_path: Path, rig: Rig) -> None:
    """A forged MX RRset: the validating resolver answers SERVFAIL, the mail waits."""
    before = rig.mx["mx-ee"].connections
    res, _ = await rig.deliver(tmp_path, "bogusmx.dane.test")
    assert not res.ok and not res.permanent and res.enhanced == "4.4.3", res
    assert rig.mx["mx-ee"].connections == before


async def test_no_tlsa_is_opportunistic(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "notlsa.dane.test")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "may")


async def test_insecure_zone_is_opportunistic(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "plain.test")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "may")


async def test_insecure_zone_dane_only_defers(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "plain.test", tls_policy="dane-only")
    assert not res.ok and res.enhanced == "4.7.5"
    assert "no DNSSEC-validated MX records" in res.text


async def test_no_tlsa_dane_only_defers(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "notlsa.dane.test", tls_policy="dane-only")
    assert not res.ok and res.enhanced == "4.7.5"
    assert "no DNSSEC-validated TLSA records" in res.text


async def test_pkix_only_tlsa_means_encrypt(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "pkix.dane.test")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "dane")


async def test_dnssec_off_ignores_tlsa(tmp_path: Path, rig: Rig) -> None:
    """Without `dnssec = true` the AD bit is not believed: the mismatching TLSA record is
    never used and the mail goes opportunistically."""
    res, _ = await rig.deliver(tmp_path, "mismatch.dane.test", dnssec=False)
    assert res.ok and res.tls_policy == "may"


async def test_dane_dane_only_match(tmp_path: Path, rig: Rig) -> None:
    res, _ = await rig.deliver(tmp_path, "ee.dane.test", tls_policy="dane-only")
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "dane")


def test_tls_policy_command(tmp_path: Path, rig: Rig) -> None:
    """`authrelay tls-policy`: what each MX would get, without connecting."""
    import subprocess
    import sys

    from relayproc import to_toml

    conf = tmp_path / "authrelay.toml"
    conf.write_text(to_toml({"hostname": "relay.test", "state_dir": str(tmp_path / "s"),
                             "delivery": {"port": rig.port, "dnssec": True,
                                          "nameservers": [rig.dns.resolver]}}))

    def run(*domains: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(conf),
                               "tls-policy", *domains], capture_output=True, text=True,
                              timeout=60)
    before = rig.mx["mx-ee"].connections
    r = run("ee.dane.test", "notlsa.dane.test")
    assert r.returncode == 0, r.stderr
    assert "ee.dane.test: level dane (default); DNSSEC: MX validated" in r.stdout
    assert "mx-ee.dane.test [127.0.0.2]  policy=dane level=dane (TLS required)  TLSA 3 1 1" \
        in r.stdout
    assert "mx-notlsa.dane.test [127.0.0.6]  policy=may level=may" in r.stdout
    assert rig.mx["mx-ee"].connections == before  # nothing connected
    r = run("bogus.dane.test")
    assert r.returncode == 1 and "mx-bogus.dane.test  skipped: 451 4.7.5 TLSA lookup" in r.stdout


async def test_dane_wins_over_mta_sts(tmp_path: Path, rig: Rig, trustme_ca: trustme.CA,
                                      trustme_ca_file: Path) -> None:
    """RFC 8461 2: a domain with usable DANE TLSA records gets DANE even when it also
    publishes MTA-STS (here an enforce policy naming no MX of it); an unsigned domain
    with MTA-STS gets MTA-STS (DANE's fallback)."""
    from fakes.policyserver import PolicyServer

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme_ca.issue_cert("mta-sts.ee.dane.test", "mta-sts.sts.plain.test").configure_cert(ctx)
    https = PolicyServer(ctx, POLICY_HOST).start()
    try:
        https.policies["mta-sts.ee.dane.test"] = \
            "version: STSv1\nmode: enforce\nmx: nothing.example\nmax_age: 600\n"
        https.policies["mta-sts.sts.plain.test"] = \
            "version: STSv1\nmode: testing\nmx: mx-notlsa.dane.test\nmax_age: 600\n"
        res, _ = await rig.deliver(tmp_path, "ee.dane.test", tls_ca_file=str(trustme_ca_file))
        assert res.ok and (res.tls, res.tls_policy) == ("verified", "dane")
        assert https.requests == []
        res, log = await rig.deliver(tmp_path, "sts.plain.test",
                                     tls_ca_file=str(trustme_ca_file))
        assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "mta-sts"), res
        assert https.requests == [("mta-sts.sts.plain.test", "/.well-known/mta-sts.txt")]
        assert log.grep("status=TLS policy failed", "delivered anyway (MTA-STS testing)")
    finally:
        https.stop()
