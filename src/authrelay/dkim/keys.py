"""DKIM key store: `state_dir/dkim/DOMAIN/SELECTOR.key`, one key per selector.

Contract: a key file is a PEM PKCS#8 private key, RSA (at least 1024 bits; 2048 made by
`generate`) or Ed25519 (RFC 8463); its algorithm is read from the key, never from the
file name. The selector is the file name without `.key`, the signing domain the directory
name (lower case, no trailing dot). Every key of a domain signs (RFC 6376 allows any
number of signatures; RSA and Ed25519 side by side as RFC 8463 section 6 recommends).

Failure policy: `load()` never raises for one bad file: it is skipped and reported in
`KeyStore.problems` (the daemon logs them; `dkim list` shows them) so one corrupt key does
not stop the others from signing. A key readable by group or others is loaded but reported
(it is a secret: 0600, owned by the run user, as `generate` writes it).

The public half is published as the TXT record `SELECTOR._domainkey.DOMAIN` (RFC 6376
3.6.1: `v=DKIM1; k=rsa|ed25519; p=BASE64`). `txt_strings()` splits the value into
character-strings of at most 255 octets (RFC 1035 3.3.14; RFC 6376 3.6.2.2: a verifier
concatenates them).
"""

from __future__ import annotations

import base64
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from authrelay.policy.ownership import a_label

# RFC 6376 3.1: selector and domain are dot-atom-text; we keep to what DNS labels allow.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
SELECTOR_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
DOMAIN_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")

RSA_BITS = 2048
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers MUST NOT accept less than 1024


def key_domain(name: str) -> str:
    """A domain as keys are filed and signed under: lower case, no final dot, A-label
    (`bücher.example` -> `xn--bcher-kva.example`, as the signer compares the From: domain
    and `[dkim] domains`); "" when IDNA2003 would map it onto another name (never signed)."""
    return a_label(name.strip().lower().rstrip("."))


class DkimKeyError(Exception):
    """A key that cannot be made, read or used; the message says which and why."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str  # "rsa" | "ed25519"
    path: Path
    bits: int  # RSA modulus size; 256 for Ed25519
    public_b64: str  # the p= value
    signing_key: bytes = field(repr=False)  # what dkimpy's sign() takes as privkey

    @property
    def dkim_algorithm(self) -> bytes:
        """The a= tag value (RFC 6376 3.3, RFC 8463 3)."""
        return b"ed25519-sha256" if self.algorithm == "ed25519" else b"rsa-sha256"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt_value(self) -> str:
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64}"

    def txt_strings(self) -> list[str]:
        return split_txt(self.txt_value)

    def zone_line(self) -> str:
        """`NAME. IN TXT ( "..." "..." )` ready to paste into a zone file."""
        return zone_txt(self.record_name, self.txt_value)


def split_txt(value: str, size: int = 255) -> list[str]:
    """RFC 1035 3.3.14: one character-string holds at most 255 octets."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def zone_txt(name: str, value: str) -> str:
    parts = " ".join(f'"{s}"' for s in split_txt(value))
    return f"{name.rstrip('.')}. IN TXT {parts}"


def default_selector() -> str:
    """The YYYYMM date, as Gmail and many hosters do: a new key gets a new month."""
    return time.strftime("%Y%m")


def _public_b64(priv: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    pub = priv.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        # RFC 8463 4.2: p= is the base64 of the raw 32-byte public key.
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        # RFC 6376 3.6.1: p= is the base64 DER SubjectPublicKeyInfo (as OpenDKIM publishes).
        raw = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def parse_key(pem: bytes, domain: str, selector: str, path: Path) -> DkimKey:
    """A DkimKey from PEM bytes; raises DkimKeyError saying what is wrong."""
    try:
        priv = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise DkimKeyError(f"{path}: not a PEM private key without passphrase ({e})") from None
    except Exception as e:  # unsupported algorithm etc.
        raise DkimKeyError(f"{path}: cannot read key ({e})") from None
    if isinstance(priv, ed25519.Ed25519PrivateKey):
        raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return DkimKey(domain, selector, "ed25519", path, 256, _public_b64(priv),
                       base64.b64encode(raw))
    if isinstance(priv, rsa.RSAPrivateKey):
        if priv.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{path}: RSA key of {priv.key_size} bits; RFC 8301 requires "
                            f"at least {MIN_RSA_BITS} (2048 recommended)")
        # dkimpy reads PKCS#1 or PKCS#8 PEM; hand it PKCS#1, its fastest path.
        pkcs1 = priv.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption())
        return DkimKey(domain, selector, "rsa", path, priv.key_size, _public_b64(priv), pkcs1)
    raise DkimKeyError(f"{path}: {type(priv).__name__} keys cannot sign DKIM (RSA or Ed25519)")


def _check_names(domain: str, selector: str) -> tuple[str, str]:
    d = key_domain(domain)
    if not DOMAIN_RE.match(d):
        raise DkimKeyError(f"{domain!r} is not a domain name")
    if not SELECTOR_RE.match(selector):
        raise DkimKeyError(f"{selector!r} is not a valid selector (letters, digits, '-', '.')")
    return d, selector


class KeyStore:
    """Keys by domain, loaded from `root` (state_dir/dkim)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.keys: dict[str, tuple[DkimKey, ...]] = {}
        self.problems: list[str] = []

    def load(self) -> KeyStore:
        keys: dict[str, list[DkimKey]] = {}
        problems: list[str] = []
        try:
            domains = sorted(p for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            domains = []
        except OSError as e:
            domains = []
            problems.append(f"{self.root}: cannot list: {e.strerror}")
        for ddir in domains:
            domain = key_domain(ddir.name)
            if not DOMAIN_RE.match(domain):
                problems.append(f"{ddir}: not a domain name, ignored")
                continue
            for f in sorted(ddir.glob("*.key")):
                selector = f.name[:-4]
                if not SELECTOR_RE.match(selector):
                    problems.append(f"{f}: {selector!r} is not a valid selector, ignored")
                    continue
                try:
                    st = f.stat()
                    pem = f.read_bytes()
                    key = parse_key(pem, domain, selector, f)
                except OSError as e:
                    problems.append(f"{f}: cannot read: {e.strerror}")
                    continue
                except DkimKeyError as e:
                    problems.append(str(e))
                    continue
                if st.st_mode & 0o077:
                    problems.append(f"{f}: mode {stat.S_IMODE(st.st_mode):04o}: the key is "
                                    "readable by others; chmod 600")
                keys.setdefault(domain, []).append(key)
        self.keys = {d: tuple(v) for d, v in keys.items()}
        self.problems = problems
        return self

    def for_domain(self, domain: str) -> tuple[DkimKey, ...]:
        return self.keys.get(key_domain(domain), ())

    def all(self) -> list[DkimKey]:
        return [k for d in sorted(self.keys) for k in self.keys[d]]

    def generate(self, domain: str, selector: str, algorithm: str, *,
                 owner: tuple[int, int] | None = None) -> DkimKey:
        """Make a key and write it 0600 (never over an existing one). `owner` (uid, gid):
        chown the key and its directories to the run user (when run as root)."""
        domain, selector = _check_names(domain, selector)
        if algorithm == "rsa":
            priv: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
                public_exponent=65537, key_size=RSA_BITS)
        elif algorithm == "ed25519":
            priv = ed25519.Ed25519PrivateKey.generate()
        else:
            raise DkimKeyError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")
        pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        ddir = self.root / domain
        self.root.parent.mkdir(parents=True, exist_ok=True)  # state_dir on a first run
        for d in (self.root, ddir):
            d.mkdir(mode=0o700, exist_ok=True)
            # The state dir is the run user's: a link put in a directory's place (by that
            # user, or whoever took it over) must not make root chown, or write a key
            # into, what it points to (/etc).
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                raise DkimKeyError(f"{d} is not a directory (a symbolic link?): remove it")
            if owner is not None:
                os.chown(d, *owner, follow_symlinks=False)
        path = ddir / f"{selector}.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise DkimKeyError(f"{path} exists: choose another selector (--selector)") from None
        try:
            os.write(fd, pem)
            os.fsync(fd)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
        return parse_key(pem, domain, selector, path)
