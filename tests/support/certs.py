"""Certificates for tests, from trustme (a throwaway CA per session, see conftest.py).

Owns: a server TLS context for given names, and a leaf installed the way certbot lands a
renewal (new files renamed over the old ones; the key 0600), for reload and privilege tests.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

import trustme


def server_tls_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server-side context with a certificate from `ca` for `names` (hosts / IPs)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost",))).configure_cert(ctx)
    return ctx


def install_cert(ca: trustme.CA, d: Path, *names: str, dir_mode: int | None = None,
                 key_type: trustme.KeyType | None = None,
                 **validity: datetime.datetime) -> tuple[Path, Path, bytes]:
    """Issue a leaf for `names` (default relay.test, 127.0.0.1) and install it in `d` as
    certbot does: fullchain.pem and privkey.pem (0600), each written beside and renamed
    over the old one. `dir_mode` (e.g. 0o700, root-only) for a directory made here;
    `key_type` (trustme.KeyType.RSA, ECDSA) else trustme's default; `validity`:
    not_before / not_after, else trustme's (valid now).
    Returns (cert path, key path, DER of the leaf)."""
    names = names or ("relay.test", "127.0.0.1")
    leaf = (ca.issue_cert(*names, **validity) if key_type is None
            else ca.issue_cert(*names, key_type=key_type, **validity))
    if dir_mode is None:
        d.mkdir(parents=True, exist_ok=True)
    else:
        d.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    cert, key = d / "fullchain.pem", d / "privkey.pem"
    tmpk = d / "privkey.pem.new"
    fd = os.open(tmpk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(leaf.private_key_pem.bytes())
    os.replace(tmpk, key)
    tmpc = d / "fullchain.pem.new"
    tmpc.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    os.replace(tmpc, cert)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return cert, key, der
