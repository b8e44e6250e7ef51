"""What a server context can agree on with a client, and which ClientHellos it cannot.

Owns the prediction behind the handshake_failure alert: asyncio drops the alert OpenSSL
makes when a handshake fails (tls.hello_refusal), so a client that shares no cipher suite
or key-exchange group with the server saw a bare close ('unexpected EOF') and its user no
hint why. The listeners read the ClientHello before the TLS layer; `no_common` says from
it, and from `Offer` (read off the server context with its public API), when OpenSSL
would certainly refuse it, and why in OpenSSL's words, so the client is sent the alert
OpenSSL would have sent (handshake_failure, RFC 8446 6.2 / RFC 5246 7.4.1.3).

Contract: conservative. None (OpenSSL judges, as before) unless the handshake cannot
succeed: every version both sides allow lacks a suite the server can use with a
certificate it holds, or (TLS 1.3, which OpenSSL picks whenever both allow it) a group
or a signature scheme one of its certificates can make. TLS 1.2 signature algorithms and
certificate curves are not judged: those failures keep the bare close. Pure functions,
no I/O.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

TLS12, TLS13 = 0x0303, 0x0304

# ssl.SSLContext.get_ciphers()'s "auth" for suites that need a certificate of a key type.
_AUTH = {"auth-ecdsa": "ECDSA", "auth-rsa": "RSA"}
# The TLS 1.2 suites' "auth" a certificate of each key type (tls.key_type) serves: EdDSA
# ones sign for the ECDSA suites (RFC 8422 5.1.1). Another type makes every suite count.
_SERVES = {"RSA": ("RSA",), "ECDSA": ("ECDSA",), "Ed25519": ("ECDSA",), "Ed448": ("ECDSA",)}

GROUP_NAMES = {0x17: "P-256", 0x18: "P-384", 0x19: "P-521", 0x1D: "X25519", 0x1E: "X448",
               0x100: "ffdhe2048", 0x101: "ffdhe3072", 0x102: "ffdhe4096",
               0x103: "ffdhe6144", 0x104: "ffdhe8192"}


@dataclass(frozen=True)
class Offer:
    """What a server context can use: its TLS 1.3 suites; its TLS 1.2 suites, each with
    the certificate key type it needs ("" for any) and whether it needs an EC group
    (ECDHE); its key-exchange groups; the key types of its certificates; its minimum
    version; its maximum (TLS 1.3 unless the system's OpenSSL config caps it:
    MaxProtocol)."""

    suites13: frozenset[int]
    suites12: tuple[tuple[int, str, bool], ...]
    groups: frozenset[int]
    key_types: frozenset[str]
    min_version: int
    schemes13: frozenset[int] | None = None  # cert_schemes of all; None: not judged
    max_version: int = TLS13

    @property
    def auths(self) -> frozenset[str]:
        """The TLS 1.2 suites' "auth" ("RSA", "ECDSA") the certificates serve."""
        out: set[str] = set()
        for t in self.key_types:
            out.update(_SERVES.get(t, _AUTH.values()))
        return frozenset(out)

    @classmethod
    def of(cls, ctx: ssl.SSLContext, groups: frozenset[int], key_types: frozenset[str],
           certs: tuple[bytes, ...] = ()) -> Offer:
        """The offer of `ctx` (suites as it lists them), its `groups`, the `key_types`
        of the certificates loaded into it and `certs` themselves (PEM: cert_schemes).
        A TLS 1.2 suite with finite-field DHE is left out: no DH parameters are ever
        loaded (tls._new_context), so OpenSSL cannot use one (test_tls_match pins that)."""
        s13, s12 = set(), []
        for c in ctx.get_ciphers():
            code = c["id"] & 0xFFFF
            if c["protocol"] == "TLSv1.3":
                s13.add(code)
            elif c["kea"] != "kx-dhe":
                s12.append((code, _AUTH.get(c["auth"], ""), c["kea"] == "kx-ecdhe"))
        schemes: set[int] | None = set()
        for pem in certs:
            one = cert_schemes(pem)
            schemes = None if one is None or schemes is None else schemes | one
        top = ctx.maximum_version  # MAXIMUM_SUPPORTED (-1) unless capped
        return cls(frozenset(s13), tuple(s12), groups, key_types,
                   ctx.minimum_version.value,
                   frozenset(schemes) if schemes and certs else None,
                   TLS13 if top == ssl.TLSVersion.MAXIMUM_SUPPORTED else top.value)


# TLS 1.3 SignatureSchemes (RFC 8446 4.2.3) by the key they sign with.
SCHEME_NAMES = {
    0x0403: "ecdsa_secp256r1_sha256", 0x0503: "ecdsa_secp384r1_sha384",
    0x0603: "ecdsa_secp521r1_sha512", 0x0804: "rsa_pss_rsae_sha256",
    0x0805: "rsa_pss_rsae_sha384", 0x0806: "rsa_pss_rsae_sha512", 0x0807: "ed25519",
    0x0808: "ed448", 0x0809: "rsa_pss_pss_sha256", 0x080A: "rsa_pss_pss_sha384",
    0x080B: "rsa_pss_pss_sha512", 0x0401: "rsa_pkcs1_sha256", 0x0501: "rsa_pkcs1_sha384",
    0x0601: "rsa_pkcs1_sha512", 0x0201: "rsa_pkcs1_sha1", 0x0203: "ecdsa_sha1",
}
_EC_SCHEME = {"secp256r1": 0x0403, "secp384r1": 0x0503, "secp521r1": 0x0603}
# An RSA key signs every RSA-PSS scheme here (rsae and pss: which one depends on the
# key's encoding; both counted, so a client is never refused for the difference).
_RSA_SCHEMES = frozenset({0x0804, 0x0805, 0x0806, 0x0809, 0x080A, 0x080B})


def cert_schemes(cert_pem: bytes) -> frozenset[int] | None:
    """The TLS 1.3 signature schemes the key of `cert_pem`'s first certificate can make
    (RFC 8446 4.4.3: PKCS#1 v1.5 is not among them; ECDSA only on the key's curve), or
    None for a key this does not know (then signatures are not judged)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        return None
    if isinstance(public, rsa.RSAPublicKey):
        return _RSA_SCHEMES
    if isinstance(public, ec.EllipticCurvePublicKey):
        scheme = _EC_SCHEME.get(public.curve.name)
        return frozenset({scheme}) if scheme else None
    if isinstance(public, ed25519.Ed25519PublicKey):
        return frozenset({0x0807})
    if isinstance(public, ed448.Ed448PublicKey):
        return frozenset({0x0808})
    return None


def _names(groups: tuple[int, ...] | frozenset[int]) -> str:
    shown = [GROUP_NAMES.get(g, f"0x{g:04x}") for g in sorted(groups) if g & 0x0F0F != 0x0A0A]
    return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")


def _schemes(schemes: Iterable[int]) -> str:
    shown = [SCHEME_NAMES.get(x, f"0x{x:04x}") for x in schemes if x & 0x0F0F != 0x0A0A]
    return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")


def no_common(offer: Offer, suites: tuple[int, ...], groups: tuple[int, ...],
              versions: tuple[int, ...], sigalgs: tuple[int, ...] = ()) -> str | None:
    """The maillog reason OpenSSL's refusal of this ClientHello would give (its reason
    code, then what is missing), or None when the handshake may succeed. `suites`,
    `groups`, `versions`, `sigalgs`: the ClientHello's cipher_suites, supported_groups
    (empty: no extension), supported_versions (else its legacy_version) and
    signature_algorithms (empty: none; judged for TLS 1.3 only)."""
    if not suites:  # no ClientHello we could read: OpenSSL judges
        return None
    offered = set(suites)
    shared_group = bool(offer.groups & set(groups))
    if TLS13 in versions and offer.max_version >= TLS13:
        if not groups or not sigalgs:
            # RFC 8446 9.2: a TLS 1.3 ClientHello must have both; OpenSSL refuses one
            # without them with its own reason (MISSING_SIGALGS_EXTENSION, ...) and alert
            # (missing_extension), before looking at what the others would agree on.
            return None
        # OpenSSL picks TLS 1.3 whenever both sides allow it (the server's maximum: the
        # system's openssl.cnf may cap it at 1.2), then needs a TLS 1.3 suite and a group
        # in common: it does not fall back to 1.2.
        if not offered & offer.suites13:
            return "NO_SHARED_CIPHER (no TLS 1.3 cipher suite in common)"
        if groups and not shared_group:
            return (f"NO_SUITABLE_KEY_SHARE (client offered groups {_names(groups)}; "
                    f"this server has {_names(offer.groups)})")
        if sigalgs and offer.schemes13 is not None and not offer.schemes13 & set(sigalgs):
            return (f"NO_SUITABLE_SIGNATURE_ALGORITHM (client accepts signatures "
                    f"{_schemes(sigalgs)}; this server's {'/'.join(sorted(offer.key_types))} "
                    f"certificate signs {_schemes(sorted(offer.schemes13))})")
        return None
    if TLS12 not in versions or offer.min_version > TLS12:
        return None  # versions: hello_refusal's protocol_version alert, or OpenSSL's
    # TLS 1.2: a suite for a certificate the server has, and for ECDHE a shared group
    # (a client without supported_groups takes any curve, RFC 8422 5.1).
    common = [(needs, ecdhe) for code, needs, ecdhe in offer.suites12 if code in offered]
    auths = offer.auths
    certified = [ecdhe for needs, ecdhe in common if not needs or needs in auths]
    if any(not ecdhe or not groups or shared_group for ecdhe in certified):
        return None
    if certified:
        return (f"NO_SHARED_CIPHER (client offered groups {_names(groups)}; this server "
                f"has {_names(offer.groups)})")
    if common:
        needs = " or ".join(sorted({n for n, _ in common}))
        return (f"NO_SHARED_CIPHER (the client's TLS 1.2 suites need an {needs} "
                f"certificate; this server has {', '.join(sorted(offer.key_types))})")
    return "NO_SHARED_CIPHER (no cipher suite in common)"
