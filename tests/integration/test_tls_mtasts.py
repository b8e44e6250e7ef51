"""MTA-STS (RFC 8461) end to end: a dnslib DNS server publishes `_mta-sts` TXT records and
points `mta-sts.DOMAIN` at a real HTTPS server on 127.19.X.Y:443 (certificate from the
trustme test CA, `[delivery] tls_ca_file`); aiosmtpd MX hosts present good or bad
certificates. Cases: enforce + good certificate (verified), enforce + bad certificate
(deferred 4.7.5), enforce + MX not listed (deferred), testing + bad certificate and
testing + MX not listed (delivered, logged), no policy (opportunistic), a policy server
with a certificate from the wrong CA (no policy), the cache surviving a restart, the
background refresh on a changed id. Plus the parser's strictness (unit level)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from dnslib import DNSLabel
from fakes.dnsserver import FakeDNSServer
from fakes.policyserver import PolicyServer
from fakes.smtpserver import MXFactory
from support import ci
from support.maillog import ListLog
from support.wait import until
from test_delivery import MSG, envelope, make_cfg
from test_tls_levels import ctx_for

from authrelay.delivery import mtasts
from authrelay.delivery.client import Courier
from authrelay.delivery.mtasts import (
    HttpsStsSource,
    StsParseError,
    StsPolicy,
    parse_policy,
    parse_txt,
)
from authrelay.dns import Resolver
from authrelay.types import DeliveryResult

pytestmark = [pytest.mark.slow, pytest.mark.root]

MX1 = "mx1.sts.test"
# RFC 8461's port is fixed (443): each test process takes its own loopback address, so
# two runs on one machine do not collide.
POLICY_HOST = f"127.19.{os.getpid() % 250 + 1}.{random.randint(1, 254)}"
HANG_HOST = f"127.20.{os.getpid() % 250 + 1}.{random.randint(1, 254)}"  # never answers


def policy(mode: str = "enforce", *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in (mx or (MX1,))),
             f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture
def https(trustme_ca: trustme.CA) -> Iterator[PolicyServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme_ca.issue_cert("mta-sts.sts.test", "mta-sts.other.test",
                          "mta-sts.xn--bcher-kva.test").configure_cert(ctx)
    srv = PolicyServer(ctx, POLICY_HOST).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def dns(dns_server: FakeDNSServer) -> FakeDNSServer:
    dns_server.set_zones({
        "sts.test": {"MX": [(10, MX1)]},
        MX1: {"A": ["127.0.0.2"]},
        "_mta-sts.sts.test": {"TXT": ["v=STSv1; id=20261204"]},
        "mta-sts.sts.test": {"A": [POLICY_HOST]},
        "nosts.test": {"MX": [(10, MX1)]},
        "xn--bcher-kva.test": {"MX": [(10, MX1)]},  # bücher.test
        "_mta-sts.xn--bcher-kva.test": {"TXT": ["v=STSv1; id=1"]},
        "mta-sts.xn--bcher-kva.test": {"A": [POLICY_HOST]},
    })
    return dns_server


class Env:
    def __init__(self, tmp: Path, dns: FakeDNSServer, port: int, ca_file: Path) -> None:
        self.tmp, self.dns, self.port, self.ca_file = tmp, dns, port, ca_file

    def courier(self, log: ListLog, **delivery: Any) -> Courier:
        cfg = make_cfg(self.tmp, self.dns, self.port, tls_ca_file=str(self.ca_file), **delivery)
        return Courier(cfg, maillog=log)

    async def deliver(self, domain: str = "sts.test", courier: Courier | None = None,
                      **delivery: Any) -> tuple[DeliveryResult, ListLog]:
        log = ListLog()
        own = courier is None
        c = courier or self.courier(log, **delivery)
        if not own:
            c.maillog = log
        env = envelope(f"bob@{domain}")
        try:
            res = await c.deliver(env, env.recipients, MSG)
        finally:
            if own:
                await c.close()
        return res[f"bob@{domain}"], log


@pytest.fixture
def env(tmp_path: Path, dns: FakeDNSServer, trustme_ca_file: Path) -> Env:
    return Env(tmp_path, dns, 0, trustme_ca_file)  # port: set by start_mx


def start_mx(fake_mx: MXFactory, env: Env, ctx: ssl.SSLContext) -> Any:
    mx = fake_mx("127.0.0.2", starttls_context=ctx)
    env.port = fake_mx.port
    return mx


async def test_enforce_good_certificate_verified(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    res, log = await env.deliver()
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "mta-sts")
    assert mx.messages and https.requests == [("mta-sts.sts.test",
                                               "/.well-known/mta-sts.txt")]
    assert log.grep("tls=Verified TLS connection established to mx1.sts.test",
                    "policy=mta-sts")


async def test_enforce_bad_certificate_defers(
        env: Env, https: PolicyServer, fake_mx: MXFactory) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce")
    mx = start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    res, log = await env.deliver()
    assert not res.ok and not res.permanent and res.enhanced == "4.7.5", res
    assert res.tls_policy == "mta-sts" and "TLS policy mta-sts" in res.text
    assert not mx.messages
    assert log.grep("status=TLS policy failed", "policy=mta-sts", "action=deferred")


async def test_enforce_unlisted_mx_defers(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce", "*.elsewhere.test")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    res, log = await env.deliver()
    assert not res.ok and res.enhanced == "4.7.5"
    assert "not an MX host of the MTA-STS policy of sts.test" in res.text
    assert mx.connections == 0
    assert log.grep(MX1, "status=host failed")


async def test_enforce_policy_of_an_internationalized_domain_holds_for_its_u_label(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    """bob@bücher.test is mail to xn--bcher-kva.test (that is what DNS is asked), so that
    domain's enforce policy applies: its MX is not listed -> deferred. Before, the U-label
    failed the domain syntax check, "no policy", and the mail went opportunistically."""
    https.policies["mta-sts.xn--bcher-kva.test"] = policy("enforce", "other.sts.test")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    res, log = await env.deliver("bücher.test")
    assert not res.ok and res.enhanced == "4.7.5" and not mx.messages, res
    assert https.requests == [("mta-sts.xn--bcher-kva.test", "/.well-known/mta-sts.txt")]
    assert log.grep(f"{MX1} is not an MX host of the MTA-STS policy of xn--bcher-kva.test")


async def test_implicit_mx_of_an_internationalized_domain_verifies(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        dns: FakeDNSServer) -> None:
    """bücher.test without MX records: the domain itself is the MX (RFC 5321 5.1), and its
    host name is the A-label, which the policy lists and the certificate carries. It was
    the U-label, which no pattern matches and no certificate can carry: deferred."""
    dns.update({"xn--bcher-kva.test": {"A": ["127.0.0.2"]}})  # no MX record
    https.policies["mta-sts.xn--bcher-kva.test"] = policy("enforce", "xn--bcher-kva.test")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, "xn--bcher-kva.test"))
    res, _ = await env.deliver("bücher.test")
    assert res.ok and (res.tls, res.tls_policy) == ("verified", "mta-sts"), res
    assert mx.messages


async def test_enforce_wildcard_mx(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce", "*.sts.test")
    start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    res, _ = await env.deliver()
    assert res.ok and res.tls == "verified"


async def test_testing_bad_certificate_delivers_and_logs(
        env: Env, https: PolicyServer, fake_mx: MXFactory) -> None:
    https.policies["mta-sts.sts.test"] = policy("testing")
    mx = start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    res, log = await env.deliver()
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "mta-sts")
    assert mx.messages
    assert log.grep("status=TLS policy failed", "policy=mta-sts",
                    "action=delivered anyway (MTA-STS testing)")


async def test_testing_unlisted_mx_delivers_and_logs(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    https.policies["mta-sts.sts.test"] = policy("testing", "mx.elsewhere.test")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    res, log = await env.deliver()
    assert res.ok and res.tls_policy == "mta-sts" and mx.messages
    assert log.grep("warning=mx1.sts.test is not an MX host of the MTA-STS policy",
                    "testing")


async def test_no_policy_is_opportunistic(
        env: Env, https: PolicyServer, fake_mx: MXFactory) -> None:
    start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    res, _ = await env.deliver("nosts.test")
    assert res.ok and (res.tls, res.tls_policy) == ("untrusted", "may")
    assert https.requests == []


async def test_policy_server_with_untrusted_certificate_is_no_policy(
        env: Env, fake_mx: MXFactory, tmp_path: Path) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mta-sts.sts.test").configure_cert(ctx)
    srv = PolicyServer(ctx, POLICY_HOST).start()
    try:
        srv.policies["mta-sts.sts.test"] = policy("enforce")
        start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
        res, _ = await env.deliver()
    finally:
        srv.stop()
    assert res.ok and res.tls_policy == "may"  # RFC 8461 5: no valid policy, no refusal
    assert not (tmp_path / "mta-sts" / "sts.test.json").exists()


@pytest.mark.parametrize("served", [
    (404, "text/plain", b""),
    (200, "text/html", policy().encode()),
    (200, "text/plain", b"version: STSv1\nmode: enforce\nmx: " + b"a" * 70000 + b"\n"
     b"max_age: 100\n"),
    (200, "text/plain", b"version: STSv2\nmode: enforce\nmx: mx1.sts.test\nmax_age: 1\n"),
])
async def test_broken_policy_is_no_policy(
        env: Env, https: PolicyServer, fake_mx: MXFactory, served: tuple) -> None:
    https.policies["mta-sts.sts.test"] = served
    start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    res, _ = await env.deliver()
    assert res.ok and res.tls_policy == "may"


async def test_policy_cache_survives_restart(
        env: Env, https: PolicyServer, fake_mx: MXFactory, tmp_path: Path) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce")
    mx = start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    res, _ = await env.deliver()
    assert res.enhanced == "4.7.5"
    cached = json.loads((tmp_path / "mta-sts" / "sts.test.json").read_text())
    assert cached["mode"] == "enforce" and cached["id"] == "20261204"
    # "Restart": a new courier, the policy gone from DNS and HTTPS: the cache enforces.
    del https.policies["mta-sts.sts.test"]
    env.dns.update({"_mta-sts.sts.test": {}})
    https.requests.clear()
    log = ListLog()
    courier = env.courier(log)
    try:
        res, _ = await env.deliver(courier=courier)
        assert isinstance(courier.sts, HttpsStsSource) and courier.sts.fetches == 0
    finally:
        await courier.close()
    assert not res.ok and res.enhanced == "4.7.5" and res.tls_policy == "mta-sts"
    assert not mx.messages and https.requests == []


async def test_cached_policy_outlives_the_memory_bound(
        env: Env, https: PolicyServer, dns: FakeDNSServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: once the in-memory cache reached its bound (100,000 domains with a policy;
    2 here) it was cleared, but the domains whose file had been read stayed marked as
    read, so their files were never read again: the next delivery fetched inline, and a
    DNS attack that removes the `_mta-sts` TXT record made it "no policy" (RFC 8461 10.3
    says the cached enforce policy must hold). Now the files are read again."""
    monkeypatch.setattr(mtasts, "_MAX_DOMAINS", 2)
    for name in ("mta-sts.sts.test", "mta-sts.other.test", "mta-sts.xn--bcher-kva.test"):
        https.policies[name] = policy("enforce")
    dns.update({"other.test": {"MX": [(10, MX1)]},
                "_mta-sts.other.test": {"TXT": ["v=STSv1; id=1"]},
                "mta-sts.other.test": {"A": [POLICY_HOST]}})
    cfg = make_cfg(env.tmp, dns, 25, tls_ca_file=str(env.ca_file))
    src = HttpsStsSource(cfg, Resolver([dns.nameserver], 1.0))
    assert await src.policy("nosts.test") is None  # a domain without: the marks fill
    for d in ("sts.test", "other.test", "xn--bcher-kva.test"):  # the third clears memory
        got = await src.policy(d)
        assert got is not None and got.mode == "enforce", d
    dns.update({"_mta-sts.other.test": {"TXT": []}})  # the attack: the TXT record is gone
    https.policies.clear()
    got = await src.policy("other.test")
    assert got is not None and got.mode == "enforce" and got.mx == (MX1,)


async def test_changed_id_refreshes_in_background(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce")
    mx = start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    log = ListLog()
    courier = env.courier(log)
    try:
        res, _ = await env.deliver(courier=courier)
        assert res.enhanced == "4.7.5"
        sts = courier.sts
        assert isinstance(sts, HttpsStsSource)
        sts.recheck = 0  # look at the TXT id on every use
        https.policies["mta-sts.sts.test"] = policy("testing")
        env.dns.update({"_mta-sts.sts.test": {"TXT": ["v=STSv1; id=20261205"]}})
        res, _ = await env.deliver(courier=courier)
        assert res.enhanced == "4.7.5"  # the cached policy answers at once...
        await sts.settle()  # ...while the new one is fetched in the background
        assert sts.fetches == 2
        res, _ = await env.deliver(courier=courier)
        assert res.ok and res.tls_policy == "mta-sts" and mx.messages
    finally:
        await courier.close()


# --------------------------------------------------------------------------- parsing

async def test_slow_drip_policy_is_cut_at_the_total_deadline(
        env: Env, https: PolicyServer, fake_mx: MXFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: the policy host sends its headers, then one byte of the body every 0.3 s
    (a valid policy, ~25 s in all). The socket timeout is per read, so before the fix the
    delivery went on after the fetch's 1 s but the worker thread kept reading to the end
    (a few such domains hold every thread of the loop's executor). Now the fetch is cut
    at its deadline in all, the connection closed, and there is no policy."""
    monkeypatch.setattr(mtasts, "_FETCH_TIMEOUT", 1.0)
    https.policies["mta-sts.sts.test"] = (200, "text/plain", policy("enforce").encode(), 0.3)
    start_mx(fake_mx, env, ctx_for(trustme.CA(), MX1))
    res, _ = await env.deliver()
    assert res.ok and res.tls_policy == "may"  # no policy (RFC 8461 5), not a wait
    # The fetching thread let go of the connection within the deadline (+ slack), not
    # after the whole drip.
    assert await asyncio.to_thread(https.dropped.wait, 5.0)


async def test_endless_interim_responses_are_cut(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    """Attack: the policy host answers with "100 Continue" interim responses, as many as it
    likes (http.client skips them in a loop without end), then the policy. The fetching
    thread parsed them at full speed for the whole 30 s deadline, holding the GIL against
    the event loop. Now the whole answer is at most 256 KiB: past that, no policy."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 12000  # 300 KB
    body = policy("enforce", "other.sts.test").encode()
    https.policies["mta-sts.sts.test"] = interim + (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body)
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    res, _ = await env.deliver()
    assert res.ok and res.tls_policy == "may" and mx.messages, res  # no policy


async def test_hanging_policy_hosts_never_hold_the_default_executor(
        env: Env, dns: FakeDNSServer) -> None:
    """Attack: more domains than the event loop's default executor has threads publish
    `_mta-sts`, and their policy host accepts the connection and never answers (one
    wildcard zone gives an attacker any number of domains). Each fetch held a default
    executor thread for up to 30 s, so every spool read, cache file and other thread hop
    of the courier waited behind them. Now the fetches run on threads of their own: a
    hop on the default executor is served while every fetch still hangs."""
    ci.require_root("binding port 443 (RFC 8461's fixed port) needs root")
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # no TLS handshake, no answer: the fetch hangs

    server = await asyncio.start_server(hold, HANG_HOST, 443)
    default_threads = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
    domains = [f"hang{i}.test" for i in range(default_threads + 2)]
    for d in domains:
        dns.update({f"_mta-sts.{d}": {"TXT": ["v=STSv1; id=1"]},
                    f"mta-sts.{d}": {"A": [HANG_HOST]}})
    cfg = make_cfg(env.tmp, dns, 25, tls_ca_file=str(env.ca_file))
    src = HttpsStsSource(cfg, Resolver([dns.nameserver], 1.0))
    fetches = [asyncio.create_task(src.policy(d)) for d in domains]
    try:
        await until(lambda: len(held) >= default_threads, "the policy fetches hang")
        hop = asyncio.create_task(asyncio.to_thread(lambda: None))
        done, _ = await asyncio.wait([hop, *fetches], return_when=asyncio.FIRST_COMPLETED)
        assert done == {hop}  # before: only once the fetches' 30 s ran out
    finally:
        server.close()
        for w in held:
            w.close()
        # Each fetch ends once its connection is closed: no policy.
        assert await asyncio.gather(*fetches) == [None] * len(domains)
        await server.wait_closed()


@pytest.mark.parametrize("tamper", [
    {"max_age": "x"}, {"fetched": None}, {"mx": "abc"}, {"mode": "weird"},
    {"mx": ["a..test"]}, {"fetched": 9e9}, {"domain": "other.test"}, {"id": "a b"},
    {"max_age": 99999999999}, {"fetched": -10**400},
])
def test_a_tampered_cache_file_is_no_policy(tmp_path: Path, tamper: dict[str, Any]) -> None:
    """Attack on state_dir/mta-sts: a damaged or hand-edited cache file. A string
    max_age or a null fetched raised TypeError inside the delivery (policy() "never
    raises"); a bad mode or MX pattern was used as is; a policy fetched "in the future"
    never expired. Now the file goes through the same parser as a fetched policy. A
    fetched of -10**400 (no float holds it) raised OverflowError there too."""
    from authrelay.config import from_dict
    from authrelay.dns import Resolver

    cfg = from_dict({"state_dir": str(tmp_path)})
    src = HttpsStsSource(cfg, Resolver(["127.0.0.1"], 1.0))
    good = parse_policy("sts.test", "id1", policy("enforce", MX1, "*.sts.test"), 1000.0)
    src._save(good)
    assert src._load("sts.test") == good  # the round trip holds
    path = tmp_path / "mta-sts" / "sts.test.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **tamper}))
    assert src._load("sts.test") is None


def test_parse_txt() -> None:
    assert parse_txt(["v=STSv1; id=abc123"]) == "abc123"
    assert parse_txt(["v=STSv1;id=abc123;"]) == "abc123"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=x1"]) == "x1"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # 3.1: exactly one
    assert parse_txt(["v=STSv1; id=not-alnum"]) is None
    assert parse_txt(["v=STSv10; id=a"]) is None


def test_parse_policy_strict() -> None:
    p = parse_policy("d.test", "1", policy("enforce", "mx.d.test", "*.d.test"), 0.0)
    assert p.mode == "enforce" and p.mx == ("mx.d.test", "*.d.test") and p.max_age == 86400
    assert parse_policy("d.test", "1", "version: STSv1\nmode: none\nmax_age: 5\n", 0).mx == ()
    big = parse_policy("d.test", "1", policy(max_age=99999999999 // 10), 0)
    assert big.max_age == 31557600  # capped at a year (3.2)
    for bad in ["mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
                "version: STSv1\nmode: maybe\nmx: a.test\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
                # "²".isdigit() is True and int("²") a ValueError that escaped the
                # fetch (not an StsParseError): the delivery task failed
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: \u00b2\n",
                "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
                "version: STSv1\ngarbage\n"]:
        with pytest.raises(StsParseError):
            parse_policy("d.test", "1", bad, 0.0)


def test_mx_patterns() -> None:
    p = StsPolicy("d.test", "1", "enforce", ("mx.d.test", "*.mail.d.test"), 60)
    assert p.allows("MX.d.test.") and p.allows("a.mail.d.test")
    assert not p.allows("b.a.mail.d.test") and not p.allows("mail.d.test")
    assert not p.allows("xmx.d.test")
    # An MX name is a hostname, matched label by label: `x\.victim.test` is the two
    # labels `x.victim` and `test`, never one label in front of victim.test.
    w = StsPolicy("d.test", "1", "enforce", ("*.victim.test", "mx.d.test"), 60)
    assert w.allows("x.victim.test") and w.allows("X.Victim.test.")
    assert not w.allows(r"x\.victim.test") and not w.allows(r"mx\.d.test")
    assert not w.allows(r"a\032b.victim.test") and not w.allows(".victim.test")
    assert not w.allows("victim.test") and not w.allows("a..victim.test")


async def test_enforce_an_mx_name_with_an_escaped_dot_is_not_listed(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA,
        dns: FakeDNSServer) -> None:
    """sts.test's MX is `x\\.victim.test` (a label holding a dot: DNS allows it), its
    policy lists `*.victim.test`. Compared as text the name matched (the certificate check
    then refused it, after a connection); label by label it is no listed MX: deferred
    without a connection, as an unlisted MX."""
    dns.update({"sts.test": {"MX": [(10, DNSLabel((b"x.victim", b"test")))]},
                "x.victim.test": {"A": ["127.0.0.2"]}})
    https.policies["mta-sts.sts.test"] = policy("enforce", "*.victim.test")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, "x.victim.test"))
    res, _ = await env.deliver()
    assert not res.ok and res.enhanced == "4.7.5", res
    assert "not an MX host of the MTA-STS policy of sts.test" in res.text, res.text
    assert mx.connections == 0


async def test_concurrent_first_deliveries_fetch_once(
        env: Env, https: PolicyServer, fake_mx: MXFactory, trustme_ca: trustme.CA) -> None:
    import asyncio

    https.policies["mta-sts.sts.test"] = policy("enforce")
    mx = start_mx(fake_mx, env, ctx_for(trustme_ca, MX1))
    courier = env.courier(ListLog())
    try:
        results = await asyncio.gather(*(env.deliver(courier=courier) for _ in range(5)))
        assert all(r.ok and r.tls_policy == "mta-sts" for r, _ in results)
        assert isinstance(courier.sts, HttpsStsSource) and courier.sts.fetches == 1
    finally:
        await courier.close()
    assert len(https.requests) == 1 and len(mx.messages) == 5


async def test_testing_mode_falls_back_to_plain_text_after_a_broken_handshake(
        env: Env, https: PolicyServer, fake_mx: MXFactory) -> None:
    """RFC 8461 5: testing must not stop delivery: as at level may, a host whose STARTTLS
    handshake failed gets plain text on the next attempt (tls_fallback_time)."""
    https.policies["mta-sts.sts.test"] = policy("testing")
    mx = fake_mx("127.0.0.2", broken_starttls=True)
    env.port = fake_mx.port
    courier = env.courier(ListLog())
    try:
        res, log = await env.deliver(courier=courier)
        assert not res.ok and res.enhanced == "4.7.5"
        assert log.grep("status=TLS handshake failed", "plain text")
        res, _ = await env.deliver(courier=courier)
        assert res.ok and (res.tls, res.tls_policy) == ("none", "mta-sts")
        assert mx.messages and not mx.messages[0].tls
    finally:
        await courier.close()


async def test_enforce_never_falls_back_to_plain_text(
        env: Env, https: PolicyServer, fake_mx: MXFactory) -> None:
    https.policies["mta-sts.sts.test"] = policy("enforce")
    mx = fake_mx("127.0.0.2", broken_starttls=True)
    env.port = fake_mx.port
    courier = env.courier(ListLog())
    try:
        for _ in range(2):
            res, _ = await env.deliver(courier=courier)
            assert not res.ok and res.enhanced == "4.7.5"
    finally:
        await courier.close()
    assert not mx.messages


def test_tls_policy_command_shows_sts_and_writes_nothing(
        env: Env, https: PolicyServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    from relayproc import to_toml

    https.policies["mta-sts.sts.test"] = policy("testing")
    conf = tmp_path / "authrelay.toml"
    conf.write_text(to_toml({"hostname": "relay.test", "state_dir": str(tmp_path / "s"),
                             "delivery": {"nameservers": [env.dns.nameserver],
                                          "tls_ca_file": str(env.ca_file)}}))
    r = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(conf), "tls-policy",
                        "sts.test"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "sts.test: level dane (default); DNSSEC: off ([delivery] dnssec = false)" in r.stdout
    assert "mx1.sts.test [127.0.0.2]  policy=mta-sts level=mta-sts  (testing, max_age: 86400)" \
        in r.stdout
    assert not (tmp_path / "s" / "mta-sts").exists()


async def test_a_cached_policy_read_cut_short_is_read_by_the_next_delivery(
        tmp_path: Path, dns: FakeDNSServer) -> None:
    """A delivery cut (attempt_timeout, shutdown) while the policy's cache file was being
    read marked the file looked for without the policy ever reaching memory: every later
    delivery skipped the file and fetched inline, so a DNS attack (no TXT record) made
    the cached enforce policy 'no policy' (RFC 8461 10.3). The next delivery reads it."""
    from authrelay.config import from_dict

    src = HttpsStsSource(from_dict({"state_dir": str(tmp_path)}),
                         Resolver([dns.nameserver], 1.0))
    src._save(parse_policy("sts.test", "id1", policy("enforce", MX1), time.time()))
    dns.update({"_mta-sts.sts.test": {"TXT": []}})  # the attack: the TXT record is gone
    cut = asyncio.ensure_future(src.policy("sts.test"))
    await asyncio.sleep(0)  # it is reading the file (in a thread)
    cut.cancel()
    await asyncio.gather(cut, return_exceptions=True)
    assert cut.cancelled()
    got = await src.policy("sts.test")
    assert got is not None and got.mode == "enforce" and got.mx == (MX1,), got
