"""Host checks for clients that did not authenticate: reverse DNS and DNSBLs.

Owns `[checks] require_reverse_dns` and `[checks] dnsbl`. The session calls
`client_refusal(ip)` at the first RCPT of a client that neither authenticated nor
comes from a trusted network (sendmail's delay_checks), so a roaming user on a dial-up
address without PTR, or on a listed address, can still AUTH and relay.

Contract: `HostChecks(cfg)`; `await client_refusal(ip) -> (Reply | None, rdns)` (None: the
client passes; `rdns`: the forward-confirmed PTR name when one was looked up and confirmed,
else ""). It writes nothing back into the caller's state and never raises.

- require_reverse_dns (Postfix reject_unknown_client_hostname): the IP must have a PTR
  whose name resolves back to the same IP (forward-confirmed rDNS, FCrDNS). No PTR, or a
  name that does not point back: `550 5.7.25` (RFC 8765 / RFC 7372 code). A temporary DNS
  failure: `450 4.7.25` so a legitimate client is only delayed.
- dnsbl (RFC 5782): the IPv4 octets reversed (IPv6: nibbles reversed) under each zone,
  an A record means listed: `554 5.7.1`. A DNSBL that fails or times out is treated as
  "not listed" (fail open, as Postfix does): a broken list must not stop mail.
Lookups go to `[delivery] nameservers` (tests run a DNS server on loopback), each bounded by
`[delivery] dns_timeout`.
"""

from __future__ import annotations

import ipaddress
import logging

from authrelay import replies
from authrelay.config import Config
from authrelay.dns import DnsError, DnsTemporary, Resolver
from authrelay.types import Reply

log = logging.getLogger(__name__)


def dnsbl_name(ip: str, zone: str) -> str | None:
    """RFC 5782 2.1 / 2.4 query name for `ip` under `zone`; None for an unusable IP."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        rev = ".".join(reversed(str(addr).split(".")))
    else:
        rev = ".".join(reversed(addr.exploded.replace(":", "")))
    return f"{rev}.{zone.strip('.')}"


class HostChecks:
    def __init__(self, cfg: Config, resolver: Resolver | None = None) -> None:
        self.require_rdns = cfg.checks.require_reverse_dns
        self.zones = tuple(z for z in cfg.checks.dnsbl if z.strip("."))
        self.resolver = resolver or Resolver(cfg.delivery.nameservers, cfg.delivery.dns_timeout)

    async def client_refusal(self, ip: str) -> tuple[Reply | None, str]:
        rdns = ""
        if self.require_rdns:
            r, rdns = await self._rdns(ip)
            if r is not None:
                return r, rdns
        for zone in self.zones:
            if await self._listed(ip, zone):
                return replies.dnsbl_listed(zone), rdns
        return None, rdns

    async def _rdns(self, ip: str) -> tuple[Reply | None, str]:
        try:
            name = await self.resolver.ptr(ip)
            if not name:
                return replies.NO_RDNS, ""
            try:
                addrs = await self.resolver.addresses(name)
            except DnsTemporary:
                raise
            except DnsError:  # NXDOMAIN / NODATA: the PTR name does not point back
                return replies.NO_RDNS, ""
        except DnsTemporary:
            return replies.DNS_TEMP, ""
        try:
            want = ipaddress.ip_address(ip)
        except ValueError:
            return replies.NO_RDNS, ""
        for a in addrs:
            try:
                if ipaddress.ip_address(a) == want:
                    return None, name
            except ValueError:
                continue
        return replies.NO_RDNS, ""  # PTR name resolves elsewhere: possibly forged

    async def _listed(self, ip: str, zone: str) -> bool:
        qname = dnsbl_name(ip, zone)
        if qname is None:
            return False
        try:
            return await self.resolver.a_exists(qname)
        except DnsError as e:  # fail open: a broken list never stops mail
            log.warning("DNSBL %s lookup failed: %s", zone, e)
            return False
