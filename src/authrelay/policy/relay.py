"""Relay policy: who may send to whom (sendmail's `A p y`, Postfix smtpd_relay_restrictions).

Contract: `may_relay(...)` says whether a recipient is acceptable for this client.
- Authenticated (RFC 4954): any recipient.
- Client address in `trusted_networks`: any recipient.
- Otherwise only recipients in `local_domains`; the rest is "550 5.7.1 Relaying denied".
  Such clients are also refused (550 5.7.1, whatever the domain) a local part holding `%`,
  `!` or a quoted `@`: authrelay never routes on them (only the parsed, normalised domain
  decides, see address.py), but a next hop that honours the percent hack or bang paths
  would turn `victim%example.net@local.domain` into an open relay (sendmail's
  loose_relay_check off, Postfix's allow_untrusted_routing=no).
- With a local recipients list (`local_recipients_file`, policy/recipients.py) such
  clients reach only its known recipients there: `unlisted(rcpt)` says which recipient
  must also be asked of the user store before policy/verdicts.py refuses it (550 5.1.1).
An address literal is never local. Domains are compared as A-labels (`ownership.a_label`),
so `bücher.example` in the config is the `xn--bcher-kva.example` of a 7-bit RCPT and the
other way round; a name IDNA2003 maps onto another (`boß`) is never local. The verdicts
built on this (RCPT, and MAIL's sender ownership) are policy/verdicts.py's.
"""

from __future__ import annotations

import ipaddress

from authrelay.address import Address
from authrelay.config import Config
from authrelay.policy.ownership import a_label
from authrelay.policy.recipients import LocalRecipients

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def has_routing_chars(addr: Address) -> bool:
    """`%`, `!` or (in a quoted local part) `@`: sender-routing syntax (RFC 5321 2.3.11,
    Appendix C; RFC 1123 5.2.16 allows the percent hack)."""
    local = addr.local
    if "%" in local or "!" in local:
        return True
    return local.startswith('"') and "@" in local


class RelayPolicy:
    def __init__(self, cfg: Config, recipients: LocalRecipients | None = None) -> None:
        # None: any local part of a local domain is accepted (no local_recipients_file).
        self.recipients = recipients
        self.local_domains = frozenset(
            a for a in (a_label(d.lower().rstrip(".")) for d in cfg.relay.local_domains) if a)
        self.trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in cfg.relay.trusted_networks
        )
        self._trusted_cache: dict[str, bool] = {}  # parsing an IP costs more than a lookup

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted or not ip:
            return False
        hit = self._trusted_cache.get(ip)
        if hit is None:
            hit = self._trusted_cache[ip] = self._check_trusted(ip)
            if len(self._trusted_cache) > 10_000:  # bounded: a scan of many IPs can't grow it
                self._trusted_cache.clear()
        return hit

    def _check_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # ::ffff:10.0.0.1 from a dual-stack socket
        return any(addr in net for net in self.trusted)

    def is_local(self, addr: Address) -> bool:
        return not addr.is_literal and a_label(addr.domain_key) in self.local_domains

    def may_relay(self, rcpt: Address, *, authenticated: bool, trusted: bool) -> bool:
        if authenticated or trusted:
            return True
        return self.is_local(rcpt) and not has_routing_chars(rcpt)

    def unlisted(self, rcpt: Address) -> bool:
        """A recipient at a local domain that the local recipients list does not name
        (False without a list): known only if a user owns it (the caller asks the user
        store, then policy/verdicts.rcpt_verdict decides)."""
        return (self.recipients is not None and self.is_local(rcpt)
                and not self.recipients.known(rcpt))
