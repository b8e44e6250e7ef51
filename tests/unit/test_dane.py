"""DANE matching (delivery/dane.py) on certificate chains a hostile MX can send."""

from __future__ import annotations

import hashlib

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authrelay.delivery import dane


def test_chain_certificate_with_an_unknown_key_algorithm_matches_nothing() -> None:
    """After its leaf, the server sends a certificate whose key algorithm cryptography
    cannot read (an EC key's OID made 1.2.840.10045.2.9; TLS does not look at it).
    Matching it against a DANE-TA SPKI record raised UnsupportedAlgorithm out of the
    courier: the attempt crashed (deferred as an internal error, no TLS line, no TLS-RPT
    failure). Now it matches nothing and the check says why."""
    ca = trustme.CA()
    leaf = x509.load_pem_x509_certificate(
        ca.issue_cert("mx.dane.test").cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    odd = x509.load_pem_x509_certificate(ca.create_child_ca().cert_pem.bytes()) \
        .public_bytes(Encoding.DER)
    assert odd.count(bytes.fromhex("06072a8648ce3d0201")) == 1  # id-ecPublicKey
    odd = odd.replace(bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209"))
    ta = (dane.DANE_TA, 1, 1, hashlib.sha256(b"some anchor's key").digest())
    check = dane.match([leaf, odd], (ta,), ("mx.dane.test",))
    assert (check.result, check.kind) == ("untrusted", "validation-failure")
    assert "no certificate in the chain matches a DANE-TA TLSA record" in check.reason
