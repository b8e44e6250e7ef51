"""DANE for SMTP (RFC 7672, RFC 7671, RFC 6698): TLSA lookup and matching.

Owns: finding the TLSA records of an MX host (`_PORT._tcp.HOST`) and deciding whether the
certificate chain the host sent matches them.

Contract:
- `await lookup(resolver, host, port)` -> `Tlsa`: `state` is "secure" (records in a
  DNSSEC-validated answer: AD bit from the trusted resolver), "none" (no records, or an
  answer that is not validated: DANE does not apply, RFC 7672 2.2) or "failed" (SERVFAIL,
  which a validating resolver answers for bogus data, or a timeout). `usable` keeps the
  records RFC 7672 3.1 lets SMTP use: DANE-TA(2) and DANE-EE(3), selector Cert(0) or
  SPKI(1), matching Full(0), SHA2-256(1), SHA2-512(2). PKIX-TA(0)/PKIX-EE(1) are unusable
  for SMTP (3.1.3). A record dnspython cannot read (a digest whose length does not fit its
  matching type, RDATA under 3 bytes) is unusable too: counted in `malformed`, the others
  kept (RFC 6698 / RFC 7672 2.2: unusable records are ignored, not the RRset); secure
  records that are all malformed are "secure" with nothing usable.
- `match(chain, usable, names)` -> `peercert.Check`: "verified" when a DANE-EE record
  matches the leaf (no name or date checks: RFC 7672 3.1.1) or the chain validates to a
  certificate matched by a DANE-TA record (or published whole in one) with one of `names`
  in the leaf (RFC 7672 3.1.2 and 3.2.2: the MX host name, and the destination domain when
  the MX RRset is secure); else "untrusted" with the reason.
Failure policy (the caller's, per RFC 7672 2.2): "failed" makes the host unusable (defer
`4.7.5` when no host is left); secure records that are all unusable mean TLS is
mandatory but unauthenticated (`encrypt`); a mismatch defers the host with `4.7.5`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from authrelay.delivery import peercert
from authrelay.dns import DnsNoData, DnsPermanent, DnsTemporary, Resolver

Record = tuple[int, int, int, bytes]  # usage, selector, matching type, association data

DANE_TA, DANE_EE = 2, 3
_HASH = {1: hashlib.sha256, 2: hashlib.sha512}


@dataclass(frozen=True)
class Tlsa:
    state: str  # secure | none | failed
    records: tuple[Record, ...] = ()
    reason: str = ""
    malformed: int = 0  # records of the RRset that could not be read (unusable)
    base: str = ""  # the TLSA base domain asked (RFC 7672 8.1: the SNI to send)

    @property
    def usable(self) -> tuple[Record, ...]:
        return tuple(r for r in self.records if r[0] in (DANE_TA, DANE_EE)
                     and r[1] in (0, 1) and r[2] in (0, 1, 2))


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


async def lookup(resolver: Resolver, host: str, port: int) -> Tlsa:
    name = tlsa_name(host, port)
    try:
        a = await resolver.tlsa_answer(name)
    except (DnsPermanent, DnsNoData):
        return Tlsa("none", reason=f"no TLSA records at {name}")
    except DnsTemporary as e:
        return Tlsa("failed", reason=f"TLSA lookup for {name} failed "
                                     f"(DNSSEC validation failure or server failure): {e}")
    if not a.secure:
        return Tlsa("none", tuple(a.records),
                    f"TLSA records at {name} are not DNSSEC-validated", a.malformed, host)
    return Tlsa("secure", tuple(a.records), malformed=a.malformed, base=host)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(cert: x509.Certificate, rec: Record) -> bool:
    _, selector, mtype, data = rec
    try:
        blob = _selected(cert, selector)
    except (ValueError, UnsupportedAlgorithm):  # a key cryptography cannot read: the
        return False  # peer's chain is hostile input, it matches nothing
    if mtype == 0:
        return blob == data
    return _HASH[mtype](blob).digest() == data


def match(chain: list[bytes], usable: tuple[Record, ...], names: tuple[str, ...]) -> \
        peercert.Check:
    certs = peercert.load(chain)
    if not certs:
        return peercert.Check("anonymous" if not chain else "untrusted",
                              "no certificate to match the TLSA records against",
                              kind="validation-failure")
    leaf = certs[0]
    if any(_matches(leaf, r) for r in usable if r[0] == DANE_EE):
        return peercert.Check("verified", name="DANE-EE")
    tas = [r for r in usable if r[0] == DANE_TA]
    if not tas:
        return peercert.Check("untrusted", "the certificate matches no DANE-EE TLSA record",
                              kind="validation-failure")
    anchors = [c for c in certs[1:] if any(_matches(c, r) for r in tas)]
    for r in tas:  # RFC 7671 5.2.2: a full certificate in the record is an anchor too
        if r[1] == 0 and r[2] == 0:
            try:
                anchors.append(x509.load_der_x509_certificate(r[3]))
            except ValueError:
                pass
    if not anchors:
        return peercert.Check("untrusted", "no certificate in the chain matches a DANE-TA "
                                           "TLSA record", kind="validation-failure")
    check = peercert.ta_verify(chain, anchors, names)
    if check.result == "trusted":  # chained to the anchor, but not for this host
        return peercert.Check("untrusted", check.reason, kind=check.kind)
    return check


__all__ = ["Tlsa", "lookup", "match", "tlsa_name"]
