"""Routing: which destination a recipient's mail goes to.

Owns the route key the scheduler groups recipients by (one delivery attempt, one
connection, one concurrency slot, one dead-destination mark per key). Contract:
`route_key(cfg, address)` is "smarthost" when `[relay] smart_host` is set (everything goes
there), else the recipient's domain as the MX lookup asks for it (`dns.ascii_name`): lower
case, no trailing dot, an internationalised name as its A-label (IDNA 2008, RFC 5891), so
`bob@Bücher.example`, `bob@bücher.example` and `bob@XN--BCHER-KVA.example` are one
destination, not two with twice the per-domain slots. The key is only a key: the
addresses go to the next hop as written. An address literal (`user@[192.0.2.1]`, RFC 5321
4.1.3) is kept as written: it is an address, not a name. Pure function: no I/O, never
fails (an address without "@" routes by its whole text, which MX resolution then rejects
permanently; a name no IDNA codec takes is keyed lower-cased, and fails its lookup).
"""

from __future__ import annotations

from authrelay.config import Config
from authrelay.dns import ascii_name

SMARTHOST = "smarthost"


def domain_of(address: str) -> str:
    """The part after the last '@' (a quoted local part may itself contain '@')."""
    return address.rpartition("@")[2]


def route_key(cfg: Config, address: str) -> str:
    if cfg.relay.smart_host:
        return SMARTHOST
    domain = domain_of(address).strip()
    if domain.startswith("["):
        return domain  # address literal: kept as is
    return ascii_name(domain)
