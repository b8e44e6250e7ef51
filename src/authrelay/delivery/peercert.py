"""The MX's certificate after the handshake: its chain, PKIX verification, the TLS result.

Owns how the courier judges a peer once TLS is up. The handshake itself never verifies
(CERT_NONE): a failed check must be *reported* (`tls=untrusted`), logged, and only then
turned into a deferral by the policy, and MTA-STS `testing` must deliver anyway. So the
check happens here, before EHLO is sent over TLS, with `cryptography`'s X.509 verifier
(RFC 5280 path validation, RFC 6125 name matching with wildcards, validity dates).

Contract:
- `peer_chain(ssl_object)`: the certificates the server sent, leaf first (DER).
- `CaStore(cafile, with_system)`: the CA set, loaded once: the system bundle plus
  `[delivery] tls_ca_file` (with_system=True: a private CA never takes the public ones
  away, or every MTA-STS domain of the Internet would fail), or only `cafile` (the smart
  host's `smart_host_ca_file`, as OpenSSL is told for that handshake).
  `verify(chain, names)` -> `Check(result, reason)`: "verified" (a chain to a CA and
  one of `names`), "trusted" (a chain to a CA, no name matched), "untrusted", "anonymous".
- `ta_verify(chain, anchors, names)`: the same path validation against DANE-TA anchors
  (RFC 7672 3.1.2: name checks and validity apply; the anchor need not be self-signed).
Failure policy: never raises for a bad certificate; a malformed one is "untrusted".

Why `ssl_object._sslobj.get_unverified_chain()` on Python < 3.13: DANE-TA (RFC 7672
3.1.2) and PKIX need the intermediates the server sent, and Python's ssl exposes the
peer's chain publicly only from 3.13 (`SSLObject.get_unverified_chain`). 3.10-3.12 have
the very same C method on the private `_sslobj` (3.13 only wrapped it), so that is used
there, behind a version check, with a test that fails if it ever goes away. The
alternatives were worse: pyOpenSSL cannot be plugged into asyncio's TLS transport (we
would own a TLS record layer), and ctypes into libssl is undefined behaviour on a mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import ssl
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    result: str  # verified | trusted | untrusted | anonymous
    reason: str = ""  # why not verified (for the maillog)
    name: str = ""  # the reference name that matched
    # why not verified, as an RFC 8460 4.3 result type (TLS-RPT): certificate-expired,
    # certificate-host-mismatch, certificate-not-trusted, validation-failure
    kind: str = ""

    @property
    def verified(self) -> bool:
        return self.result == "verified"


def peer_chain(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """DER certificates the peer sent, leaf first (empty: none, e.g. anonymous)."""
    if ssl_object is None:
        return []
    if sys.version_info >= (3, 13):
        certs = ssl_object.get_unverified_chain()  # type: ignore[attr-defined,unused-ignore]
        return [c if isinstance(c, bytes) else c.public_bytes(ssl.ENCODING_DER)
                for c in certs or ()]
    raw = ssl_object._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # see docstring
    if raw:
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in raw]  # type: ignore[attr-defined]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def load(chain: list[bytes]) -> list[x509.Certificate] | None:
    try:
        return [x509.load_der_x509_certificate(c) for c in chain]
    except ValueError:
        return None


def _subject(name: str) -> x509.DNSName | x509.IPAddress | None:
    """The reference identity for `name`: an address literal ("[192.0.2.1]",
    "[IPv6:2001:db8::1]", RFC 5321 4.1.3) or a bare address (a smart host written as
    "192.0.2.1:587") is an IP address (RFC 6125 1.7.2), anything else a DNS name; None
    when no certificate can carry it."""
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        try:
            return x509.IPAddress(ipaddress.ip_address(inner))
        except ValueError:
            return None
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return x509.DNSName(name.lstrip("."))
    except ValueError:
        return None


def _own_name(leaf: x509.Certificate) -> str:
    """A name the leaf itself covers (its first DNS name; "*.example.com" stands for a
    name it matches), to tell a chain that validates from a name that does not match."""
    names = dns_names(leaf)
    if not names:
        return ""
    return "wildcard" + names[0][1:] if names[0].startswith("*.") else names[0]


def _why(exc: Exception, leaf: x509.Certificate) -> Check:
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        return Check("untrusted", f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
                     kind="certificate-expired")
    if leaf.not_valid_before_utc > now:
        return Check("untrusted", "certificate not yet valid", kind="certificate-expired")
    if leaf.issuer == leaf.subject:
        return Check("untrusted", "self-signed certificate", kind="certificate-not-trusted")
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return Check("untrusted", f"certificate not trusted: {text}"[:200],
                 kind="certificate-not-trusted")


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]


def _match_dot(names: tuple[str, ...], cert: x509.Certificate) -> str:
    """Postfix's dot-nexthop: any DNS name of the certificate under the domain."""
    cert_names = dns_names(cert)
    for n in names:
        if n.startswith("."):
            for c in cert_names:
                if c.endswith(n) and "*" not in c:
                    return c
    return ""


def _eku(policy: xv.Policy, cert: x509.Certificate,
         ext: x509.ExtendedKeyUsage | None) -> None:
    if ext is not None and ExtendedKeyUsageOID.SERVER_AUTH not in ext \
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in ext:
        raise ValueError("the certificate is not for TLS servers (extended key usage)")


# The Web PKI profile, except the criticality of subjectAltName and extendedKeyUsage:
# private CAs (and trustme) mark them critical, which RFC 5280 4.2.1.6 discourages but
# OpenSSL, and so every other MTA, accepts. serverAuth is still required when EKU is set.
_EE_POLICY = (xv.ExtensionPolicy.webpki_defaults_ee()
              .require_present(x509.SubjectAlternativeName, xv.Criticality.AGNOSTIC, None)
              .may_be_present(x509.ExtendedKeyUsage, xv.Criticality.AGNOSTIC, _eku))
_CA_POLICY = xv.ExtensionPolicy.webpki_defaults_ca()


def _builder(store: xv.Store) -> xv.PolicyBuilder:
    return xv.PolicyBuilder().store(store).extension_policies(
        ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)


def _path(store: xv.Store, leaf: x509.Certificate, rest: list[x509.Certificate],
          names: tuple[str, ...]) -> Check:
    """Path validation to `store`, then the first of `names` the leaf carries."""
    first_err: Exception | None = None
    chain_ok = False
    for n in [*names, _own_name(leaf)]:
        subj = _subject(n)
        if subj is None:
            continue
        try:
            verifier = _builder(store).build_server_verifier(subj)
        except ValueError:
            # Not a name a certificate can match (an underscore in an MX name from DNS,
            # a malformed SAN): it matches nothing, it is not an error of ours.
            continue
        try:
            verifier.verify(leaf, rest)
        except xv.VerificationError as e:
            first_err = first_err or e
            continue
        if n in names:
            return Check("verified", name=n)
        chain_ok = True  # verified only against its own name: the chain is fine
    if chain_ok:
        dot = _match_dot(names, leaf)
        if dot:
            return Check("verified", name=dot)
        return Check("trusted", f"certificate names {', '.join(dns_names(leaf)[:4]) or '-'} "
                                f"do not match {', '.join(names) or '-'}",
                     kind="certificate-host-mismatch")
    return _why(first_err or ValueError("no usable name"), leaf)


def _checked_path(store: xv.Store, leaf: x509.Certificate, rest: list[x509.Certificate],
                  names: tuple[str, ...]) -> Check:
    """_path(), with a certificate that loads but whose parts cryptography cannot parse
    (a subjectAltName with a non-ASCII dNSName, a duplicated extension: OpenSSL serves
    such a leaf) judged "untrusted", never an exception out of the courier."""
    try:
        return _path(store, leaf, rest, names)
    except (ValueError, x509.DuplicateExtension) as e:
        why = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        return Check("untrusted", f"malformed certificate: {why}"[:200],
                     kind="validation-failure")


class CaStore:
    """The CA set, loaded on first use (PEM file, else the system bundle)."""

    def __init__(self, cafile: str = "", *, with_system: bool = False) -> None:
        self.cafile = cafile
        self.with_system = with_system or not cafile
        self._store: xv.Store | None = None

    def store(self) -> xv.Store:
        if self._store is None:
            certs: list[x509.Certificate] = []
            if self.with_system:
                paths = ssl.get_default_verify_paths()
                system = paths.cafile or paths.openssl_cafile
                try:
                    certs += _load_bundle(Path(system).read_bytes())
                except (OSError, ValueError):
                    if not self.cafile:
                        raise
            if self.cafile:
                certs += _load_bundle(Path(self.cafile).read_bytes())
            self._store = xv.Store(certs)
        return self._store

    async def warm(self) -> None:
        """Load the bundle in a thread (the system one takes 5-7 ms to parse: not on the
        event loop); a failure is left for verify() to report."""
        if self._store is None:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(self.store)

    def verify(self, chain: list[bytes], names: tuple[str, ...]) -> Check:
        if not chain:
            return Check("anonymous", "no certificate", kind="certificate-not-trusted")
        certs = load(chain)
        if certs is None:
            return Check("untrusted", "malformed certificate", kind="validation-failure")
        try:
            store = self.store()
        except (OSError, ValueError) as e:
            return Check("untrusted", f"cannot load the CA file {self.cafile or 'system'}: {e}",
                         kind="validation-failure")
        return _checked_path(store, certs[0], certs[1:], names)


def _load_bundle(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; one that cryptography refuses (the system
    bundle has old roots with negative serial numbers) is left out, not the whole file."""
    out = []
    end = b"-----END CERTIFICATE-----"
    for block in pem.split(end):
        if b"-----BEGIN CERTIFICATE-----" not in block:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out.append(x509.load_pem_x509_certificate(block + end + b"\n"))
            except ValueError:
                continue
    if not out:
        raise ValueError("no certificate in the file")
    return out


def ta_verify(chain: list[bytes], anchors: list[x509.Certificate],
              names: tuple[str, ...]) -> Check:
    """Path validation of the server's chain to DANE-TA anchors (RFC 7672 3.1.2)."""
    certs = load(chain)
    if not certs:
        return Check("untrusted", "no certificate", kind="certificate-not-trusted")
    try:
        store = xv.Store(anchors)
    except ValueError as e:
        return Check("untrusted", f"unusable trust anchor: {e}", kind="tlsa-invalid")
    return _checked_path(store, certs[0], [c for c in certs[1:] if c not in anchors], names)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


__all__ = ["CaStore", "Check", "load", "peer_chain", "ta_verify"]
