"""The DNS records an admin publishes so mail from this relay is accepted (`authrelay dns`).

For each sending domain D (the arguments, else every domain with a DKIM key, plus
`[dkim] domains`):
- DKIM (RFC 6376 3.6.2.1): `SELECTOR._domainkey.D TXT "v=DKIM1; k=...; p=..."`, per key.
- SPF (RFC 7208): `D TXT "v=spf1 ip4:A ip6:B ~all"` authorising the relay's public
  address(es); with a smart host, `include:` of the smart host's domain instead (the
  provider documents the exact include; the relay's own address is then not the sender).
  `~all` (softfail) as a starter: a domain that also sends from elsewhere (a web shop, a
  hosted mailbox) must merge its senders into this one record first (RFC 7208 3.2: one
  SPF record per domain).
- DMARC (RFC 7489 6.1): `_dmarc.D TXT "v=DMARC1; p=none; rua=mailto:postmaster@D"`: a
  monitoring starter; raise p= once the aggregate reports show only aligned mail.
- SRV (RFC 6186 3.1, RFC 8314 5.1): `_submission._tcp.D` and `_submissions._tcp.D` naming
  this relay's submission ports, so mail clients configure themselves.
And once for the relay: `hostname A/AAAA address` and the PTR of each public address
naming `hostname` (forward-confirmed reverse DNS, RFC 8601 2.7.3 "iprev"; receivers such as
Gmail require it). The PTR lives in the address owner's reverse zone: the hosting
provider sets it. Delivering directly (no smart host), also `hostname TXT "v=spf1 ip4:A
-all"`: bounces go with a null MAIL FROM, so receivers check SPF for the HELO name
(RFC 7208 2.3, as postmaster@hostname).

Public addresses: `public_addresses` from the config, else the global addresses among the
listen addresses, else the addresses `hostname` resolves to. None known: a placeholder the
admin replaces, and `authrelay doctor` says so.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import dns.reversename

from authrelay.config import Config, parse_hostport
from authrelay.dkim.keys import KeyStore, key_domain, split_txt
from authrelay.dns import DnsError, Resolver


@dataclass(frozen=True)
class Record:
    name: str  # absolute, no trailing dot
    rtype: str  # TXT | A | AAAA | PTR | SRV
    value: str  # TXT: the whole text (split when rendered); others: the RDATA
    comment: str = ""

    def zone_line(self) -> str:
        if self.rtype == "TXT":
            rdata = " ".join(f'"{s}"' for s in split_txt(self.value))
        else:
            rdata = self.value
        return f"{self.name}. IN {self.rtype} {rdata}"


def sending_domains(cfg: Config, store: KeyStore | None = None) -> list[str]:
    """The domains with a key (those signed), plus those `[dkim] domains` names."""
    store = store or KeyStore(cfg.dkim_dir).load()
    named = {key_domain(d) or d for d in cfg.dkim.domains}
    doms = set(store.keys) | named
    if named:
        doms &= named
    return sorted(doms)


def _global_listen_addresses(cfg: Config) -> list[str]:
    out = []
    for ln in cfg.listen:
        try:
            ip = ipaddress.ip_address(ln.host)
        except ValueError:
            continue
        if ip.is_global and str(ip) not in out:
            out.append(str(ip))
    return out


async def public_addresses(cfg: Config, resolver: Resolver | None = None) -> list[str]:
    """The relay's address(es) as the Internet sees them (see the module docstring)."""
    if cfg.public_addresses:
        return list(cfg.public_addresses)
    found = _global_listen_addresses(cfg)
    if found:
        return found
    resolver = resolver or Resolver(cfg.delivery.nameservers, timeout=cfg.delivery.dns_timeout)
    try:
        addrs = await resolver.addresses(cfg.hostname)
    except DnsError:
        return []
    return [a for a in addrs if ipaddress.ip_address(a).is_global] or addrs


def smart_host_names(cfg: Config) -> list[str]:
    return [parse_hostport(hp, "relay.smart_host", default_port=25)[0]
            for hp in cfg.relay.smart_host]


def spf_include(host: str) -> str:
    """The SPF include a smart host's provider most likely documents: its parent domain
    (smtp.provider.example -> provider.example)."""
    labels = host.rstrip(".").split(".")
    return ".".join(labels[-2:]) if len(labels) > 2 else host


def spf_value(cfg: Config, addrs: list[str]) -> str:
    mechs: list[str] = []
    if cfg.relay.smart_host:
        for h in smart_host_names(cfg):
            inc = f"include:{spf_include(h)}"
            if inc not in mechs:
                mechs.append(inc)
    else:
        for a in addrs:
            ip = ipaddress.ip_address(a)
            mechs.append(f"ip{ip.version}:{ip}")
        if not mechs:
            mechs.append("ip4:YOUR.PUBLIC.IP.ADDRESS")
    return "v=spf1 " + " ".join(mechs) + " ~all"


def helo_spf_record(cfg: Config, addrs: list[str]) -> Record:
    """SPF for the HELO name (RFC 7208 2.3): our bounces have a null MAIL FROM, so
    receivers check `postmaster@HOSTNAME`; only the relay's own addresses send as it
    (`-all`: nothing else uses this name). Without known addresses: `a` (its A/AAAA)."""
    mechs = []
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        mechs.append(f"ip{ip.version}:{ip}")
    return Record(cfg.hostname.rstrip("."), "TXT",
                  "v=spf1 " + (" ".join(mechs) or "a") + " -all",
                  "SPF for the HELO name: bounces (null sender) are checked against it "
                  "(RFC 7208 2.3)")


def _submission_port(cfg: Config, mode: str) -> int | None:
    for ln in cfg.listen:
        if ln.mode == mode:
            return ln.port
    return None


def build(cfg: Config, domains: list[str] | None = None,
          addrs: list[str] | None = None) -> list[Record]:
    """Every record to publish, in the order `render` prints them."""
    store = KeyStore(cfg.dkim_dir).load()
    doms = ([key_domain(d) or d.lower().rstrip(".") for d in domains] if domains
            else sending_domains(cfg, store))
    if addrs is None:
        addrs = asyncio.run(public_addresses(cfg))
    host = cfg.hostname.rstrip(".")
    out: list[Record] = []
    for a in addrs or ["YOUR.PUBLIC.IP.ADDRESS"]:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            out.append(Record(host, "A", a, "the relay's address (public_addresses unknown)"))
            out.append(Record(f"REVERSE.OF.{a}", "PTR", f"{host}.",
                              "reverse DNS, set by your hosting provider"))
            continue
        out.append(Record(host, "A" if ip.version == 4 else "AAAA", str(ip),
                          "hostname -> address (forward half of FCrDNS)"))
        out.append(Record(dns.reversename.from_address(str(ip)).to_text(omit_final_dot=True),
                          "PTR", f"{host}.",
                          "address -> hostname: set by the owner of the address "
                          "(your hosting provider's panel), not in your zone"))
    if not cfg.relay.smart_host:  # with a smart host, its HELO is what receivers see
        out.append(helo_spf_record(cfg, addrs))
    for d in doms:
        for k in store.for_domain(d):
            out.append(Record(k.record_name, "TXT", k.txt_value,
                              f"DKIM {k.algorithm} key {k.selector} (RFC 6376"
                              f"{', RFC 8463' if k.algorithm == 'ed25519' else ''})"))
        if not store.for_domain(d):
            out.append(Record(f"SELECTOR._domainkey.{d}", "TXT", "v=DKIM1; p=...",
                              f"no DKIM key yet: authrelay dkim keygen {d}"))
        note = ("SPF: merge with any existing v=spf1 record (one per domain)"
                + ("; check your smart host provider's documented include"
                   if cfg.relay.smart_host else ""))
        out.append(Record(d, "TXT", spf_value(cfg, addrs), note))
        out.append(Record(f"_dmarc.{d}", "TXT",
                          f"v=DMARC1; p=none; rua=mailto:postmaster@{d}",
                          "DMARC starter: monitor, then p=quarantine / p=reject"))
        for mode, svc in (("submission", "_submission"), ("submissions", "_submissions")):
            port = _submission_port(cfg, mode)
            if port is None:
                # RFC 6186 3.4: target "." says the service is not offered.
                out.append(Record(f"{svc}._tcp.{d}", "SRV", "0 0 0 .",
                                  f"no {mode} listener: service not offered"))
            else:
                out.append(Record(f"{svc}._tcp.{d}", "SRV", f"0 1 {port} {host}.",
                                  f"mail clients find {mode} here (RFC 6186/8314)"))
    return out


def render(records: list[Record]) -> str:
    lines = []
    for r in records:
        if r.comment:
            lines.append(f"; {r.comment}")
        lines.append(r.zone_line())
    return "\n".join(lines)
