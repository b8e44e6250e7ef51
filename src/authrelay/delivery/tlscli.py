"""`authrelay tls-policy DOMAIN...`: the outbound TLS policy a destination would get now.

Owns the operator's view of tlsplan: for each domain, the configured level (and where it
came from), whether the MX answer was DNSSEC-validated, and per MX host the policy the
courier would apply (DANE with its TLSA records, MTA-STS with mode and id, verify, may...)
or why the host would be skipped. Nothing is connected to and nothing is written: the
MTA-STS policy is fetched (or read from the cache) but the cache is left as it is, so
running this as root never leaves root-owned files in the daemon's state_dir.
Exit status: 0 when every domain has a host to try, 1 otherwise (DNS failure, or every
host refused by policy).
"""

from __future__ import annotations

import argparse
import asyncio

from authrelay.config import load
from authrelay.delivery import mx, tlsplan, tlspolicy
from authrelay.delivery.mtasts import HttpsStsSource
from authrelay.dns import Resolver


async def _show(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    d = cfg.delivery
    resolver = Resolver(list(d.nameservers), d.dns_timeout, dnssec=d.dnssec)
    sts = HttpsStsSource(cfg, resolver, save=False) if d.mta_sts else None
    planner = tlsplan.Planner(cfg, resolver, sts)
    status = 0
    for domain in args.domains:
        domain = domain.lower().rstrip(".")
        base = tlspolicy.for_domain(cfg, domain)
        origin = "[[delivery.tls_policy_map]]" if base.source == "map" else \
            "[delivery] tls_policy" if d.tls_policy else "default"
        try:
            route = await mx.resolve_route(resolver, domain, limit=d.mx_address_limit)
        except mx.RouteError as e:
            print(f"{domain}: level {base.level} ({origin}); no route: {e.result}")
            status = 1
            continue
        dnssec = "off ([delivery] dnssec = false)" if not d.dnssec else \
            "MX validated" if route.mx_secure else "MX not validated (no DANE)"
        print(f"{domain}: level {base.level} ({origin}); DNSSEC: {dnssec}")
        plan = await planner.plan(domain, route)
        for host, ip, hp in plan.hosts:
            extra = ""
            if hp.tlsa:
                extra = "  TLSA " + ", ".join(f"{u} {s} {m} {data.hex()[:16]}..."
                                              for u, s, m, data in hp.tlsa)
            elif hp.policy == "mta-sts":
                mode = "enforce" if hp.enforce else "testing"
                extra = f"  ({mode}, {hp.rpt.strings[-1] if hp.rpt.strings else ''})"
            if hp.names and hp.level in ("verify", "mta-sts", "dane"):
                extra += f"  names {', '.join(hp.names)}"
            if hp.note:
                extra += f"  [{hp.note}]"
            print(f"  {host} [{ip}]  policy={hp.policy} level={hp.level}"
                  f"{' (TLS required)' if hp.requires_tls else ''}{extra}")
        for host, res, _rpt, _kind in plan.failed:
            print(f"  {host}  skipped: {res}")
        for note in plan.notes:
            print(f"  note: {note}")
        if not plan.hosts:
            status = 1
    return status


def _cmd(args: argparse.Namespace) -> int:
    return asyncio.run(_show(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tls-policy", help="the outbound TLS policy (DANE, MTA-STS, level) "
                       "each MX of a domain would get now; connects to nothing")
    p.add_argument("domains", nargs="+", metavar="DOMAIN")
    p.set_defaults(func=_cmd)
