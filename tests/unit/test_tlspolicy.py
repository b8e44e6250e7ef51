"""Outbound TLS policy as config says it (delivery/tlspolicy.py, config.py): levels, the
per-domain map and its errors, older spellings, smart-host levels, match names."""

from __future__ import annotations

from typing import Any

import pytest

from authrelay.config import ConfigError, from_dict
from authrelay.delivery import tlspolicy
from authrelay.delivery.mtasts import MemoryStsSource, StsPolicy
from authrelay.delivery.mx import Route
from authrelay.delivery.tlsplan import Planner
from authrelay.delivery.tlspolicy import HostPolicy
from authrelay.dns import Resolver


def cfg(**delivery: Any) -> Any:
    return from_dict({"delivery": delivery})


def test_default_is_dane() -> None:
    assert tlspolicy.for_domain(cfg(), "example.org").level == "dane"


@pytest.mark.parametrize("older, level", [
    ({"tls": "encrypt"}, "encrypt"), ({"tls_verify": True}, "verify"), ({"tls": "may"}, "dane"),
])
def test_older_keys(older: dict[str, Any], level: str) -> None:
    assert tlspolicy.for_domain(cfg(**older), "x.test").level == level


def test_explicit_level_wins_over_older_keys() -> None:
    assert tlspolicy.for_domain(cfg(tls="encrypt", tls_policy="may"), "x.test").level == "may"


def test_map_first_match_exact_and_subdomains() -> None:
    c = cfg(tls_policy="may", tls_policy_map=[
        {"domain": "Example.ORG.", "level": "verify", "match": ["nexthop", "dot-nexthop"]},
        {"domain": ".example.org", "level": "encrypt"},
        {"domain": "example.org", "level": "none"},  # never reached: the first one wins
    ])
    b = tlspolicy.for_domain(c, "example.org")
    assert (b.level, b.match, b.source) == ("verify", ("nexthop", "dot-nexthop"), "map")
    assert tlspolicy.for_domain(c, "mx.EXAMPLE.org.").level == "encrypt"
    assert tlspolicy.for_domain(c, "notexample.org").level == "may"
    assert tlspolicy.for_domain(c, "other.test").source == "default"


@pytest.mark.parametrize("entry, why", [
    ({"level": "verify"}, "domain"),
    ({"domain": "a.test", "level": "secure"}, "level"),
    ({"domain": "a b.test", "level": "may"}, "domain"),
    ({"domain": "a.test", "level": "may", "nexthop": 1}, "unknown key"),
    ({"domain": "a.test", "match": "hostname"}, "list of strings"),
])
def test_map_errors_name_the_key(entry: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(tls_policy_map=[entry])
    assert "delivery.tls_policy_map[0]" in str(e.value) and why in str(e.value)


def test_bad_level() -> None:
    with pytest.raises(ConfigError, match="delivery.tls_policy"):
        cfg(tls_policy="secure")


def test_reference_names() -> None:
    assert tlspolicy.reference_names(("hostname", "nexthop", "dot-nexthop", "Mail.X.test."),
                                     "mx.example.org", "example.org") == \
        ("mx.example.org", "example.org", ".example.org", "mail.x.test")


@pytest.mark.parametrize("relay, want", [
    ({}, ("verify", False)),
    ({"smart_host_tls": "starttls", "smart_host_tls_verify": False}, ("encrypt", False)),
    ({"smart_host_tls": "tls"}, ("verify", True)),
    ({"smart_host_tls": "tls", "smart_host_tls_verify": False}, ("encrypt", True)),
    ({"smart_host_tls": "none"}, ("none", False)),
    ({"smart_host_tls": "may"}, ("may", False)),
    ({"smart_host_tls": "verify"}, ("verify", False)),
])
def test_smart_host_levels(relay: dict[str, Any], want: tuple[str, bool]) -> None:
    assert tlspolicy.smart_host_level(from_dict({"relay": relay})) == want


def test_host_policy_requirements() -> None:
    assert not HostPolicy("may", "may").requires_tls
    assert not HostPolicy("none", "none").requires_tls
    assert HostPolicy("encrypt", "encrypt").requires_tls
    assert HostPolicy("mta-sts", "mta-sts", enforce=True).requires_tls
    assert not HostPolicy("mta-sts", "mta-sts", enforce=False).requires_tls  # testing
    assert HostPolicy("dane", "dane").authenticates
    assert not HostPolicy("encrypt", "dane").authenticates  # unusable TLSA: TLS only
    # connections are cached per policy: a may connection never serves a verify one
    assert HostPolicy("may", "may").key() != HostPolicy("verify", "verify", ("mx",)).key()


# --------------------------------------------------------------------------- the planner

def sts(mode: str, *mx: str) -> StsPolicy:
    return StsPolicy("d.test", "7", mode, mx, 86400, 0.0)


ROUTE = Route([("mx1.d.test", "192.0.2.1"), ("mx1.d.test", "2001:db8::1"),
               ("backup.other.test", "192.0.2.9")])


async def plan(c: Any, source: MemoryStsSource, route: Route = ROUTE) -> Any:
    return await Planner(c, Resolver(["127.0.0.1:9"], 1), source).plan("d.test", route)


async def test_planner_sts_enforce_keeps_listed_hosts() -> None:
    src = MemoryStsSource({"d.test": sts("enforce", "*.d.test")})
    p = await plan(cfg(), src)
    assert [(h, ip, hp.policy, hp.enforce) for h, ip, hp in p.hosts] == [
        ("mx1.d.test", "192.0.2.1", "mta-sts", True),
        ("mx1.d.test", "2001:db8::1", "mta-sts", True)]
    assert [(h, r.enhanced) for h, r, _, _ in p.failed] == [("backup.other.test", "4.7.5")]
    assert p.hosts[0][2].names == ("mx1.d.test",) and p.hosts[0][2].rpt.type == "sts"
    assert src.asked == ["d.test"]  # asked once per plan


async def test_planner_sts_testing_keeps_every_host_with_a_note() -> None:
    p = await plan(cfg(), MemoryStsSource({"d.test": sts("testing", "mx1.d.test")}))
    assert [hp.policy for _, _, hp in p.hosts] == ["mta-sts"] * 3
    assert not p.hosts[2][2].requires_tls and p.failed == []
    assert p.notes and "backup.other.test is not an MX host" in p.notes[0]


async def test_planner_sts_mode_none_and_no_policy_are_may() -> None:
    for src in (MemoryStsSource({"d.test": sts("none")}), MemoryStsSource()):
        p = await plan(cfg(), src)
        assert [hp.policy for _, _, hp in p.hosts] == ["may"] * 3


async def test_planner_explicit_levels_ignore_sts() -> None:
    src = MemoryStsSource({"d.test": sts("enforce", "mx1.d.test")})
    for level in ("may", "encrypt", "verify", "none"):
        p = await plan(cfg(tls_policy=level), src)
        assert {hp.policy for _, _, hp in p.hosts} == {level} and p.failed == []
    assert src.asked == []
    p = await plan(cfg(mta_sts=False), src)  # dane, but MTA-STS off
    assert {hp.policy for _, _, hp in p.hosts} == {"may"}


async def test_planner_dane_only_without_dnssec_skips_every_host() -> None:
    p = await plan(cfg(tls_policy="dane-only"), MemoryStsSource())
    assert p.hosts == [] and {h for h, *_ in p.failed} == {"mx1.d.test", "backup.other.test"}
    assert all("dnssec is off" in r.text for _, r, _, _ in p.failed)
    assert all(kind == "dane-required" for *_, kind in p.failed)


async def test_planner_address_literal() -> None:
    p = await Planner(cfg(), Resolver(["127.0.0.1:9"], 1), MemoryStsSource()).plan(
        "[192.0.2.1]", Route([("[192.0.2.1]", "192.0.2.1")]))
    assert [hp.policy for _, _, hp in p.hosts] == ["may"]


def test_connection_cache_key_tells_every_policy_apart() -> None:
    """A cached connection is reused only under the very policy it was judged by. DANE
    records were keyed by their first 8 bytes: "3 1 0" (full SPKI) records of two P-256
    keys share those (the SPKI header), so a connection matched against one key's record
    could carry mail whose TLSA record names the other."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def spki() -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    a, b = spki(), spki()
    assert a[:8] == b[:8] and a != b
    names = ("mx.d.test",)
    keys = {HostPolicy("dane", "dane", names, tlsa=((3, 1, 0, a),)).key(),
            HostPolicy("dane", "dane", names, tlsa=((3, 1, 0, b),)).key(),
            HostPolicy("dane", "dane", names, tlsa=((3, 1, 0, a), (3, 1, 0, b))).key(),
            HostPolicy("may", "may").key(), HostPolicy("encrypt", "encrypt").key(),
            HostPolicy("verify", "verify", names).key(),
            HostPolicy("mta-sts", "mta-sts", names).key(),
            HostPolicy("mta-sts", "mta-sts", names, False).key()}
    assert len(keys) == 8
