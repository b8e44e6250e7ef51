"""Outbound TLS policy: which security level applies to a destination, and to each host.

Owns the vocabulary (Postfix's `smtp_tls_security_level`): `none` (never STARTTLS), `may`
(STARTTLS when offered, unauthenticated: RFC 7435 opportunistic), `encrypt` (TLS required,
unauthenticated), `verify` (TLS required, certificate chain to the CA set and a name from
`match`), `dane` (RFC 7672 DANE where DNSSEC-validated TLSA records exist, else MTA-STS
where the domain publishes a policy, else `may`), `dane-only` (DANE required).

Contract:
- `for_domain(cfg, domain) -> Base`: the level for a destination domain, from
  `[[delivery.tls_policy_map]]` (first entry that matches: "example.com" exactly, ".example.com"
  any subdomain) else `[delivery] tls_policy` (unset: derived from the older `tls` and
  `tls_verify` keys, else "dane").
- `HostPolicy`: what one MX host gets once DNS has been asked (DANE TLSA, MTA-STS policy):
  the level that applies, the policy name written to the maillog (`policy=dane`,
  `mta-sts`, `verify`, `may`...), whether a failed check defers (`enforce`) or is only
  logged (MTA-STS `testing`), and the names the certificate must carry.
- `smart_host_level(cfg)`: `[relay] smart_host_tls` in the same levels ("starttls" is
  `verify` or `encrypt` per `smart_host_tls_verify`; "tls" is implicit TLS, verified likewise).
Pure functions and frozen values: no I/O here (DNS and HTTPS are in dane.py, mtasts.py).

TLS results (maillog `tls=`, metrics), as Postfix names them: `verified` (chain and name,
or a DANE match), `trusted` (chain to a trusted CA, name not matched), `untrusted` (chain
not verified), `anonymous` (no certificate), `none` (plain text).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from authrelay.config import Config, TlsPolicyEntry
from authrelay.delivery.tlsrpt import PolicyDesc
from authrelay.dns import ascii_name

LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")
RESULTS = ("verified", "trusted", "untrusted", "anonymous", "none")
# What the maillog says applied: a level, or the source that set it.
POLICIES = ("none", "may", "encrypt", "verify", "dane", "dane-only", "mta-sts")
# Postfix's default `match` for verify: the MX host name the client connected to.
DEFAULT_MATCH = ("hostname",)


@dataclass(frozen=True)
class Base:
    """A destination's configured level, before DNS says anything."""

    level: str
    match: tuple[str, ...] = DEFAULT_MATCH
    source: str = "default"  # "default" | "map" (for the debug trace)


@dataclass(frozen=True)
class HostPolicy:
    """The policy for one host of a route (see the module docstring)."""

    level: str  # none | may | encrypt | verify | dane (TLSA in hand) | mta-sts
    policy: str  # what the maillog's policy= says
    names: tuple[str, ...] = ()  # reference identities for the certificate (verify, STS, DANE-TA)
    enforce: bool = True  # False: MTA-STS testing mode (log, deliver anyway)
    tlsa: tuple[tuple[int, int, int, bytes], ...] = ()  # DANE: (usage, selector, mtype, data)
    note: str = ""  # why this level (e.g. "no MTA-STS policy"), for the trace
    rpt: PolicyDesc = PolicyDesc()  # what a TLS-RPT report says was applied
    sni: str = ""  # the name sent as SNI when not the host's (DANE: the TLSA base domain)

    @property
    def requires_tls(self) -> bool:
        return self.level not in ("none", "may") and (self.enforce or self.level != "mta-sts")

    @property
    def sts_unlisted(self) -> bool:
        """A host an MTA-STS `testing` policy does not list (the planner gives it level
        may under policy mta-sts): delivered to, but a failure for TLS-RPT (RFC 8460)."""
        return self.policy == "mta-sts" and self.level == "may"

    @property
    def authenticates(self) -> bool:
        return self.level in ("verify", "dane", "mta-sts")

    def key(self) -> str:
        """Connections are cached per policy: one made under `may` never carries a
        message whose policy asks for `verify`."""
        # The whole of each record, hashed: a prefix is not enough ("3 1 0" records of two
        # P-256 keys share their first 26 bytes, the SPKI header).
        tl = hashlib.sha256(b"".join(bytes((u, s, m)) + len(d).to_bytes(4, "big") + d
                                     for u, s, m, d in self.tlsa)).hexdigest()[:32] \
            if self.tlsa else ""
        return f"{self.level}/{int(self.enforce)}/{'|'.join(self.names)}/{tl}"


def effective_default(cfg: Config) -> str:
    d = cfg.delivery
    if d.tls_policy:
        return d.tls_policy
    if d.tls_verify:
        return "verify"  # the older spelling
    if d.tls == "encrypt":
        return "encrypt"
    return "dane"


def entry_matches(entry: TlsPolicyEntry, domain: str) -> bool:
    """`domain` as `ascii_name` gives it; the entry is compared in the same form."""
    pat = ascii_name(entry.domain)
    if pat.startswith("."):
        return domain.endswith(pat)
    return domain == pat


def for_domain(cfg: Config, domain: str) -> Base:
    # A-labels on both sides: a recipient written "bücher.example" gets the policy set
    # for "xn--bcher-kva.example" (and the reverse), never the default.
    domain = ascii_name(domain)
    for e in cfg.delivery.tls_policy_map:
        if entry_matches(e, domain):
            return Base(e.level, e.match or DEFAULT_MATCH, "map")
    return Base(effective_default(cfg))


def reference_names(match: tuple[str, ...], host: str, domain: str) -> tuple[str, ...]:
    """Postfix's match keywords: "hostname" (the MX host), "nexthop" (the destination
    domain), "dot-nexthop" (any subdomain of it, as a wildcard-like suffix); anything else
    is a literal name ("*.example.com" style wildcards are the certificate's business)."""
    out: list[str] = []
    for m in match:
        if m == "hostname":
            out.append(host)
        elif m == "nexthop":
            out.append(domain)
        elif m == "dot-nexthop":
            out.append("." + domain)
        else:
            out.append(m.lower().rstrip("."))
    return tuple(dict.fromkeys(n for n in out if n))


def static_host_policy(base: Base, host: str, domain: str) -> HostPolicy:
    """The host policy for levels DNS cannot change (none, may, encrypt, verify)."""
    if base.level == "verify":
        return HostPolicy("verify", "verify", reference_names(base.match, host, domain))
    return HostPolicy(base.level, base.level)


def smart_host_level(cfg: Config) -> tuple[str, bool]:
    """(level, implicit_tls) for the smart host."""
    r = cfg.relay
    mode = r.smart_host_tls
    if mode in ("starttls", "tls"):
        return ("verify" if r.smart_host_tls_verify else "encrypt"), mode == "tls"
    return mode, False


@dataclass
class TlsState:
    """What one host's session established (kept on the attempt for the maillog)."""

    result: str = "none"
    policy: str = ""
    detail: list[str] = field(default_factory=list)


__all__ = ["LEVELS", "POLICIES", "RESULTS", "Base", "HostPolicy", "TlsState", "for_domain",
           "reference_names", "smart_host_level", "static_host_policy"]
