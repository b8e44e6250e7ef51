"""MX resolution: a destination domain -> the ordered list of (hostname, ip) to try.

Implements RFC 5321 5.1:
- MX records sorted by preference, shuffled among equal preferences (load spreading);
- no MX record (NODATA): the domain itself is the single, implicit MX (its A/AAAA);
- every address of every host is tried, IPv6 first then IPv4 per host (5.1: "both"), up
  to `[delivery] mx_address_limit` addresses from as many hosts (Postfix's
  smtp_mx_address_limit: a hostile MX RRset must not hold a delivery slot for hours);
- an address literal recipient (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, 4.1.3) skips DNS.
A host that is this relay's own listener (`is_own_listener`: an MX naming the address
one of our sockets is bound to) is a mail loop: the courier tries neither it nor the hosts
after it (as Postfix truncates its MX list at itself), 554 5.4.6 when it is the first. An
MX host named `localhost` or `*.localhost` (RFC 6761 6.3) is left out (554 5.4.6 when no
other host remains).
And RFC 7505: a null MX (a single MX with exchange "." at preference 0) means the domain
accepts no mail: permanent `556 5.1.10`.

Failure policy (raised as `RouteError` carrying a ready `DeliveryResult`):
- NXDOMAIN for the domain, or a name no lookup can find (an internationalized label IDNA
  refuses, accepted in an SMTPUTF8 address): permanent 550 5.1.2 (bad destination system
  address, RFC 3463);
- SERVFAIL / timeout anywhere that leaves nothing to try: temporary 451 4.4.3 (directory
  server failure);
- the hosts exist but none has an address: permanent 550 5.4.4 (unable to route), unless
  one of the lookups failed temporarily, then 4.4.3 (it might have an address after all).
An MX host whose lookup fails is skipped while others remain: partial answers are used
(as Postfix's smtp_addr_list), and named in `Route.unresolved` (the courier logs it as a
failed host: it was not tried, so it never counts as a host that answered).

`resolve_route()` also says which answers were DNSSEC-validated (RFC 7672 2.2: DANE applies
to an MX host only when the MX RRset, or the implicit MX's address, and the host's address
records are secure); `resolve()` is the same without that.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from authrelay.dns import DnsBadName, DnsNoData, DnsPermanent, DnsTemporary, Resolver, ascii_name
from authrelay.types import DeliveryResult


class RouteError(Exception):
    """No host to try; `result` says whether that is permanent or temporary."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(str(result))
        self.result = result


def parse_literal(domain: str) -> str | None:
    """The IP of an address literal '[192.0.2.1]' / '[IPv6:2001:db8::1]', else None.
    Raises RouteError for a bracketed text that is not a valid address."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else domain[1:]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        want = 6
    else:
        want = 4
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        ip = None
    if ip is None or ip.version != want:
        raise RouteError(DeliveryResult.perm(
            f"invalid address literal {domain}", "5.1.2", 550))
    return str(ip)


def order_mx(records: list[tuple[int, str]], rng: random.Random | None = None) -> list[str]:
    """Hosts by ascending preference, shuffled among equals (RFC 5321 5.1), each once (at
    its best preference). Linear: a hostile answer's MX RRset has thousands of records."""
    shuffle = rng.shuffle if rng is not None else random.shuffle
    by_pref: dict[int, dict[str, None]] = defaultdict(dict)
    for pref, host in records:
        by_pref[pref][host] = None
    out: dict[str, None] = {}
    for pref in sorted(by_pref):
        hosts = list(by_pref[pref])
        shuffle(hosts)
        out.update((h, None) for h in hosts if h not in out)
    return list(out)


# Wildcard hosts as smtpd/server.bind() binds them: "", "*" and "0.0.0.0" are IPv4 only,
# "::" is IPv6 only (IPV6_V6ONLY): neither takes a connection of the other family.
_WILDCARDS = {"": 4, "*": 4, "0.0.0.0": 4, "::": 6}


def _is_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `addr` is one of this machine's own addresses (it can be bound to)."""
    if addr.is_loopback:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError:
            return False
    return True


def listener_addresses(listeners: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """`[[listen]]` (host, port) pairs with a `localhost` name resolved as
    smtpd/server.bind() binds it (IPv4, the first address: 127.0.0.1), so
    `is_own_listener` compares what the socket is bound to. Other names are left out
    (never taken for us): resolving them could wait on the DNS, and the courier is built
    on the master's event loop at each reload. Call once per courier, not per delivery."""
    out: list[tuple[str, int]] = []
    for host, port in listeners:
        if host in _WILDCARDS:
            out.append((host, port))
            continue
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
            continue
        except ValueError:
            pass
        if not _is_localhost(host):
            continue
        try:  # RFC 6761 6.3: answered locally (hosts file), never from the DNS
            found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        if found:
            out.append((str(found[0][4][0]), port))
    return out


def is_own_listener(listeners: Iterable[tuple[str, int]], ip: str, port: int) -> bool:
    """Whether a next hop at `ip`:`port` is one of this relay's own `[[listen]]` sockets
    (`listeners`: their (host, port), names resolved by `listener_addresses`): the
    address one is bound to, or any address of this machine of the family a wildcard one
    takes. Delivering there is a mail loop (an MX record naming us): Postfix's "mail for
    D loops back to myself". The unspecified address (0.0.0.0, ::) is taken for the loopback
    address a connection to it reaches. Another address, even on loopback (127.0.0.2 beside our
    127.0.0.1), or of the family our wildcard socket does not take, is another server."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        # 0.0.0.0 / :: is never a destination (RFC 1122 3.2.1.3, RFC 4291 2.5.2), yet a
        # connect() to it reaches this host's loopback (Linux, the BSDs): an MX there (a
        # sinkhole or blocking resolver's answer) is 127.0.0.1 / ::1 for this check.
        addr = ipaddress.ip_address("127.0.0.1" if addr.version == 4 else "::1")
    for host, lport in listeners:
        if lport != port:
            continue
        if host in _WILDCARDS:
            if _WILDCARDS[host] == addr.version and _is_local(addr):
                return True
            continue
        try:
            if ipaddress.ip_address(host) == addr:
                return True
        except ValueError:
            continue
    return False


def _is_localhost(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def v6_first(addrs: list[str]) -> list[str]:
    """Addresses without duplicates, IPv6 first (order otherwise kept)."""
    return sorted(dict.fromkeys(addrs), key=lambda a: 0 if ":" in a else 1)


@dataclass
class Route:
    hops: list[tuple[str, str]]  # (hostname, ip) in the order to try
    mx_secure: bool = False  # the MX RRset (or, implicit MX, the domain's address) validated
    secure_hosts: set[str] = field(default_factory=set)  # hosts whose addresses validated
    implicit: bool = False  # no MX: the domain itself
    # secure hosts whose address records came through a CNAME chain: host -> the expanded
    # name (RFC 7672 2.2.2: its TLSA records are asked first, and it is a reference name)
    expanded: dict[str, str] = field(default_factory=dict)
    # MX hosts looked up and skipped, no address found (a failed lookup: 4.4.3; none:
    # 5.4.4): never tried, so never an answer (the courier logs each as a failed host)
    unresolved: list[tuple[str, DeliveryResult]] = field(default_factory=list)


async def resolve(resolver: Resolver, domain: str,
                  rng: random.Random | None = None) -> list[tuple[str, str]]:
    """Ordered (hostname, ip) pairs to try for `domain`; raises RouteError if none."""
    return (await resolve_route(resolver, domain, rng)).hops


async def resolve_route(resolver: Resolver, domain: str,
                        rng: random.Random | None = None, limit: int = 0) -> Route:
    """resolve() with what DNSSEC said about each answer. `limit` (`[delivery]
    mx_address_limit`, 0: none): at most that many addresses, from at most that many MX
    hosts looked up, in preference order (a domain's MX RRset may name thousands of hosts,
    each with thousands of addresses that never answer)."""
    literal = parse_literal(domain)
    if literal is not None:
        return Route([(domain, literal)])
    # The A-label DNS is asked for: the implicit MX's host name is then the one a
    # certificate, an MTA-STS pattern or SNI can carry ("bücher.example" can't).
    domain = ascii_name(domain)
    if not domain:
        raise RouteError(DeliveryResult.perm("empty destination domain", "5.1.2", 550))

    implicit = False
    mx_secure = False
    try:
        records, mx_secure = await resolver.mx_ad(domain)
    except DnsBadName as e:  # "☃.test": no lookup can ever find it
        raise RouteError(DeliveryResult.perm(f"Bad destination domain: {e}", "5.1.2",
                                             550)) from None
    except DnsPermanent:
        raise RouteError(DeliveryResult.perm(
            f"Host or domain name not found: {domain} (NXDOMAIN)", "5.1.2", 550)) from None
    except DnsNoData:
        records = [(0, domain)]  # RFC 5321 5.1: implicit MX
        implicit = True
    except DnsTemporary as e:
        raise RouteError(DeliveryResult.temp(
            f"DNS lookup failed for {domain}: {e}", "4.4.3", 451)) from None

    # RFC 7505 3: a null MX is the only MX record, pref 0, exchange ".". Any MX with "."
    # among others is a misconfiguration; the "." entry is simply unusable then.
    if len(records) == 1 and records[0][1] == "" and records[0][0] == 0:
        raise RouteError(DeliveryResult.perm(
            f"Domain {domain} does not accept mail (null MX)", "5.1.10", 556))
    records = [(p, h) for p, h in records if h]
    if not records:
        raise RouteError(DeliveryResult.perm(
            f"Domain {domain} does not accept mail (null MX)", "5.1.10", 556))

    # RFC 6761 6.3: a "localhost" name is this machine's loopback, never the domain's mail
    # host ("MX 0 localhost.", the pre-RFC 7505 way to say "no mail"): delivering there is
    # a loop, as Postfix says ("mail for D loops back to myself"). Other hosts are tried.
    local = [h for _, h in records if _is_localhost(h)]
    records = [(p, h) for p, h in records if not _is_localhost(h)]
    if not records:
        raise RouteError(DeliveryResult.perm(
            f"mail for {domain} loops back to myself (its mail host {local[0]} is this "
            "machine's loopback, RFC 6761)", "5.4.6", 554))
    hosts = order_mx(records, rng)
    out: list[tuple[str, str]] = []
    secure_hosts: set[str] = set()
    expanded: dict[str, str] = {}
    temp: DnsTemporary | None = None
    asked: list[str] = []  # the hosts looked up (a reason names these, not every MX)
    unresolved: list[tuple[str, DeliveryResult]] = []
    for looked_up, host in enumerate(hosts):
        if limit and (len(out) >= limit or looked_up >= limit):
            break
        asked.append(host)
        try:
            addrs, secure, canonical = await resolver.addresses_cname(host)
        except DnsTemporary as e:
            temp = e
            unresolved.append((host, DeliveryResult.temp(
                f"DNS lookup failed for mail host {host} of {domain}: {e}", "4.4.3", 451)))
            continue
        except DnsPermanent:
            if implicit:  # the domain had MX NODATA, so it exists; A/AAAA vanished
                raise RouteError(DeliveryResult.perm(
                    f"Host or domain name not found: {domain}", "5.1.2", 550)) from None
            unresolved.append((host, DeliveryResult.perm(
                f"mail host {host} of {domain} not found (NXDOMAIN)", "5.4.4", 550)))
            continue
        except DnsNoData:
            unresolved.append((host, DeliveryResult.perm(
                f"mail host {host} of {domain} has no address", "5.4.4", 550)))
            continue
        out.extend((host, ip) for ip in v6_first(addrs))
        if secure:
            secure_hosts.add(host)
            if canonical != host.rstrip(".").lower():
                expanded[host] = canonical
    if out:
        if implicit:  # RFC 7672 2.2.2: the domain's own address records stand for the MX
            mx_secure = domain in secure_hosts
        return Route(out[:limit] if limit else out, mx_secure, secure_hosts, implicit,
                     expanded, unresolved)
    if temp is not None:
        raise RouteError(DeliveryResult.temp(
            f"DNS lookup failed for the mail hosts of {domain}: {temp}", "4.4.3", 451))
    what = f"{domain} has no MX and no address" if implicit else \
        f"no address found for the MX hosts of {domain} ({', '.join(asked)})"
    raise RouteError(DeliveryResult.perm(what, "5.4.4", 550))
