"""The TLS plan of one MX route: the policy each host gets, from config, DANE and MTA-STS.

Owns the order of precedence for a destination domain (docs: README "Outbound TLS"):
1. `[[delivery.tls_policy_map]]`, else `[delivery] tls_policy`: none, may, encrypt and
   verify are final; dane and dane-only ask DNS.
2. dane / dane-only with `[delivery] dnssec` and a validated MX RRset: a host whose address
   records and TLSA records are validated gets DANE (RFC 7672 2.2); secure but unusable
   TLSA records: encrypt; a failed (bogus, SERVFAIL) TLSA lookup makes the host unusable.
3. Otherwise (dane only, not dane-only) the domain's MTA-STS policy (RFC 8461) when
   `[delivery] mta_sts`: `enforce` keeps only the listed MX hosts, each verified against the
   CA set; `testing` keeps every host, checks and logs, delivers anyway.
4. Otherwise `may`.
Contract: `await Planner(...).plan(domain, route)` -> `Plan(hosts, failed)`; `hosts` are
(host, ip, HostPolicy) in the route's order, `failed` the hosts dropped with the reason
(written to the maillog as `host failed`). When nothing is left, the caller defers with
the first reason (all transient: `4.7.5`, RFC 3463 "cryptographic failure").
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from authrelay.config import Config
from authrelay.delivery import dane, mx, tlspolicy
from authrelay.delivery.mtasts import StsPolicy, StsSource
from authrelay.delivery.tlspolicy import HostPolicy
from authrelay.delivery.tlsrpt import PolicyDesc
from authrelay.dns import Resolver, ascii_name
from authrelay.types import DeliveryResult

log = logging.getLogger(__name__)


@dataclass
class Plan:
    hosts: list[tuple[str, str, HostPolicy]]
    # hosts dropped: (host, result, TLS-RPT policy and result type)
    failed: list[tuple[str, DeliveryResult, PolicyDesc, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # maillog notes (STS testing mismatches)


class Planner:
    def __init__(self, cfg: Config, resolver: Resolver, sts: StsSource | None) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.sts = sts

    async def _tlsa(self, host: str, route: mx.Route) -> dane.Tlsa:
        """RFC 7672 2.2.2: a host whose secure address records came through a CNAME
        chain has its TLSA records looked for at the expanded name first, then (none
        there) at the name the MX record gave."""
        port = self.cfg.delivery.port
        alias = route.expanded.get(host)
        if alias is not None:
            t = await dane.lookup(self.resolver, alias, port)
            if t.state != "none":
                return t
        return await dane.lookup(self.resolver, host, port)

    async def plan(self, domain: str, route: mx.Route) -> Plan:
        if not domain.startswith("["):
            domain = ascii_name(domain)  # the name DNS was asked for (DANE, verify names)
        base = tlspolicy.for_domain(self.cfg, domain)
        d = self.cfg.delivery
        if base.level not in ("dane", "dane-only") or domain.startswith("["):
            if base.level in ("dane", "dane-only"):
                base = tlspolicy.Base("may")  # an address literal has no DNS to ask
            return Plan([(h, ip, tlspolicy.static_host_policy(base, h, domain))
                         for h, ip in route.hops])
        dane_on = d.dnssec and route.mx_secure
        # The TLSA records of every secure host at once (one round trip, not one per MX).
        secure = list(dict.fromkeys(h for h, _ in route.hops if h in route.secure_hosts)) \
            if dane_on else []
        tlsa = dict(zip(secure, await asyncio.gather(
            *(self._tlsa(h, route) for h in secure)), strict=True))
        per_host: dict[str, HostPolicy | tuple[DeliveryResult, PolicyDesc, str]] = {}
        sts: StsPolicy | None = None
        sts_asked = False
        notes: list[str] = []
        for host, _ip in route.hops:
            if host in per_host:
                continue
            if dane_on and host in route.secure_hosts:
                t = tlsa[host]
                if t.state == "failed":
                    per_host[host] = (DeliveryResult.temp(t.reason, "4.7.5", 451),
                                      PolicyDesc("tlsa"), "dnssec-invalid")
                    continue
                if t.state == "secure":
                    # RFC 7672 8.1: SNI is the TLSA base domain (the CNAME-expanded name
                    # when the records were found there)
                    sni = t.base if t.base != host else ""
                    rpt = PolicyDesc("tlsa", tuple(f"{u} {s} {m} {d_.hex()}"
                                                   for u, s, m, d_ in t.records))
                    if t.usable:
                        names = (host, domain) if route.mx_secure else (host,)
                        if host in route.expanded:  # RFC 7672 2.2.2, 3.2.2
                            names = (route.expanded[host], *names)
                        per_host[host] = HostPolicy("dane", "dane", names, tlsa=t.usable,
                                                    rpt=rpt, sni=sni)
                    else:  # RFC 7672 2.2: TLS mandatory, authentication impossible
                        per_host[host] = HostPolicy("encrypt", "dane",
                                                    note="no usable TLSA record", rpt=rpt,
                                                    sni=sni)
                    continue
            if base.level == "dane-only":
                why = "[delivery] dnssec is off" if not d.dnssec else \
                    "no DNSSEC-validated MX records" if not route.mx_secure else \
                    "no DNSSEC-validated TLSA records"
                per_host[host] = (DeliveryResult.temp(
                    f"TLS policy dane-only for {domain}: {why} for {host}", "4.7.5", 451),
                    PolicyDesc("tlsa"), "dane-required")
                continue
            if d.mta_sts and self.sts is not None and not sts_asked:
                sts_asked = True
                sts = await self.sts.policy(domain)
            if sts is not None and sts.mode in ("enforce", "testing"):
                enforce = sts.mode == "enforce"
                rpt = PolicyDesc("sts", sts.lines(), sts.mx)
                if sts.allows(host):
                    per_host[host] = HostPolicy("mta-sts", "mta-sts", (host,), enforce,
                                                rpt=rpt)
                elif enforce:
                    per_host[host] = (DeliveryResult.temp(
                        f"{host} is not an MX host of the MTA-STS policy of {domain} "
                        f"(mode enforce, id {sts.id})", "4.7.5", 451), rpt,
                        "validation-failure")
                else:
                    notes.append(f"{host} is not an MX host of the MTA-STS policy of "
                                 f"{domain} (mode testing: delivering anyway)")
                    per_host[host] = HostPolicy("may", "mta-sts", (host,), False,
                                                note="not a listed MX (testing)", rpt=rpt)
                continue
            per_host[host] = HostPolicy("may", "may")
        plan = Plan([], notes=notes)
        seen: set[str] = set()
        for host, ip in route.hops:
            p = per_host[host]
            if isinstance(p, HostPolicy):
                plan.hosts.append((host, ip, p))
            elif host not in seen:
                plan.failed.append((host, *p))
            seen.add(host)
        return plan


__all__ = ["Plan", "Planner"]
