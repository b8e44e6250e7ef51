"""TLS: server SSLContext factory, certificate reload, self-signed bootstrap (`cert make`).

Owns how authrelay speaks TLS. Contract: `server_context(cfg, pem)` returns a context with
TLS 1.2 minimum (RFC 8314 4.1 / RFC 8996), server cipher preference, session tickets for
resumption (per process: the workers' ticket keys are their own), ALPN "smtp", and the
configured certificates (one, or `[tls] second_cert`'s pair of the other key type beside
it: OpenSSL picks per handshake by what the client can verify, ECDSA or RSA);
`hello_refusal` says whether a ClientHello is refused (ALPACA).
`CertStore.reload()` swaps in a renewed certificate: the next handshake uses it,
established sessions are untouched. A key file readable by group or others is refused
(like OpenSSH), so a mis-set key never goes live.
`make_self_signed()` writes an ECDSA P-256 certificate and a 0600 key (ECDSA: smaller,
and the handshake is cheaper than RSA, which matters at thousands of sessions/s); an RSA
one on request, for the second pair.

Privileges (docs/PRIVILEGES.md): the files are read by `read_pem()` while still root (at
start, and on SIGHUP by the privileged helper in process.py), so a key readable only by
root (mode 0600 root, as certbot makes) works. The processes that speak TLS have dropped
privileges: they get the PEM bytes, never the paths, and load them from memory (a memfd
opened through /proc/self/fd; no copy of the key ever lands on a disk).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import ssl
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from authrelay import maillog, tlsmatch
from authrelay.config import CertPair, Config, load
from authrelay.newfile import replace_with_new


class TLSConfigError(RuntimeError):
    pass


def check_key_mode(key: Path) -> None:
    st = key.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TLSConfigError(
            f"{key}: private key is accessible to group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {key}"
        )


def make_self_signed(hostname: str, out_dir: Path, *, days: int = 825,
                     rsa_key: bool = False) -> tuple[Path, Path]:
    """Write cert.pem and key.pem (0600) for `hostname` into out_dir (`rsa_key`: an RSA
    2048 pair, rsa-cert.pem and rsa-key.pem, for clients without ECDSA, served beside the
    ECDSA one as [tls] second_cert/second_key); return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if rsa_key:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        sans.append(x509.DNSName("localhost"))
    sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = (out_dir / name for name in self_signed_names(rsa_key))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The key 0600 from the start: never a window where it is world-readable.
    replace_with_new(key_path, key_bytes, 0o600)
    replace_with_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def ensure_certificate(cfg: Config) -> None:
    """First start on the embedded default: make a self-signed certificate."""
    if cfg.self_signed and not (cfg.cert_path.exists() and cfg.key_path.exists()):
        d = cfg.cert_path.parent
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        make_self_signed(cfg.hostname, d)


Pair = tuple[bytes, bytes]  # (certificate chain, private key), as read from the files
PEM = tuple[Pair, ...]  # every served pair, in Config.cert_pairs order


def read_pem(cfg: Config) -> PEM:
    """Read and check every configured certificate and key (call while privileged).

    Raises TLSConfigError naming the file and the fix. Each pair is proved to load (and
    its key to match its certificate) before it is returned, so whoever asks the
    privileged helper for it gets working certificates or an error, never the bytes of
    some other file the config might point at. Two pairs of one key type are refused:
    OpenSSL keeps one certificate per key type, the second would silently replace the
    first.
    """
    out: list[Pair] = []
    kinds: dict[str, CertPair] = {}
    for names in cfg.cert_pairs:
        pair = _read_pair(cfg, names)
        kind = key_type(pair[0])
        other = kinds.setdefault(kind, names)
        if other is not names:
            raise TLSConfigError(f"{names.cert_key}: {same_key_type(names, other, kind)}")
        out.append(pair)
    return tuple(out)


def _read_pair(cfg: Config, names: CertPair) -> Pair:
    cert, key = names.cert, names.key
    if not cert.exists():
        raise TLSConfigError(f"{cert}: certificate not found (authrelay cert make)")
    if not key.exists():
        raise TLSConfigError(f"{key}: key not found")
    check_key_mode(key)
    try:
        pair = (cert.read_bytes(), key.read_bytes())
    except OSError as e:
        raise TLSConfigError(f"{e.filename}: cannot read: {e.strerror}") from None
    _load_pem(_new_context(cfg), pair, _pair_name(names))
    return pair


def key_type(cert_pem: bytes) -> str:
    """The key type of the first certificate in `cert_pem` as OpenSSL files it (one
    certificate per type in a context): "RSA", "ECDSA", "Ed25519", ... ("unknown" for
    bytes that are no certificate: not reached for a pair that loaded)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        return "unknown"
    types = ((rsa.RSAPublicKey, "RSA"), (ec.EllipticCurvePublicKey, "ECDSA"),
             (ed25519.Ed25519PublicKey, "Ed25519"), (ed448.Ed448PublicKey, "Ed448"),
             (dsa.DSAPublicKey, "DSA"))
    return next((name for cls, name in types if isinstance(public, cls)),
                type(public).__name__)


def same_key_type(pair: CertPair, other: CertPair, kind: str) -> str:
    """Why `pair` is refused beside `other`, both of one key type (serve and
    check-config say it after the config key, pair.cert_key)."""
    want = "RSA" if kind != "RSA" else "ECDSA"
    return (f"{pair.cert} is {kind}, as {other.cert_key} "
            f"({other.cert}) is: only one certificate per key type can be served (the "
            f"second would replace the first); make this pair {want} (authrelay cert "
            f"make{' --rsa' if want == 'RSA' else ''}) or remove it")


def certificate_problem(pair: Pair) -> str | None:
    """Why clients that check certificates refuse `pair`'s certificate now (expired, or
    not yet valid), or None. serve warns and serves it anyway (as Postfix does): refusing
    to start would stop the mail, and on 25 it still encrypts."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(pair[0])
    except ValueError:  # read_pem has loaded it: not reached for a served certificate
        return None
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        return f"expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if leaf.not_valid_before_utc > now:
        return f"not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def warn_certificate(cfg: Config, pem: PEM) -> None:
    """One maillog warning per served certificate that is expired or not yet valid (call
    once per start and per reload, in the master or single process)."""
    for names, pair in zip(cfg.cert_pairs, pem, strict=True):
        problem = certificate_problem(pair)
        if problem is not None:
            maillog.warning(f"TLS certificate {problem}: clients that check certificates "
                            "refuse it; serving it anyway (renew it, then reload)",
                            cert=str(names.cert))


def _load_pem(ctx: ssl.SSLContext, pem: Pair, what: str = "certificate") -> None:
    """Load a certificate chain and key from memory into ctx. A second pair of another key
    type is added beside the first, with its own chain (OpenSSL keeps the intermediates
    per certificate), and OpenSSL picks per handshake by what the client can verify.

    OpenSSL (through the ssl module) loads only from paths: the bytes go into an anonymous
    memory file (memfd_create) that is opened through /proc/self/fd; that works in a
    process without privileges and without a writable directory, and the key is never
    written to a disk. Elsewhere (no memfd) a 0700 temporary directory is used and removed.
    """
    data = pem[0].rstrip(b"\n") + b"\n" + pem[1]
    try:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            fd = os.memfd_create("authrelay-tls", os.MFD_CLOEXEC)
            try:
                os.write(fd, data)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        with tempfile.TemporaryDirectory(prefix="authrelay-tls-") as d:
            path = os.path.join(d, "pem")
            wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(wfd, "wb") as fh:
                fh.write(data)
            ctx.load_cert_chain(path)
    except (ssl.SSLError, OSError) as e:
        why = str(e)
        if isinstance(e, ssl.SSLError) and "PEM lib" in str(e):  # says nothing on its own
            why = f"no certificate and key in PEM form found in them ({e})"
        raise TLSConfigError(f"{what}: cannot load: {why}") from None


def _pair_name(names: CertPair) -> str:
    """`tls.cert PATH and tls.key PATH` for messages (it read `PATH//PATH`)."""
    return f"{names.cert_key} {names.cert} and {names.key_key} {names.key}"


X25519, SECP256R1 = 0x001D, 0x0017  # TLS group ids (RFC 8446 4.2.7)


class ServerContext(ssl.SSLContext):
    """The server context, key exchange over P-256 (every client has it), and `x25519`:
    the same certificate and settings with X25519. Python's ssl gives a context one group
    (set_ecdh_curve) or OpenSSL's default list, which adds finite-field groups up to
    ffdhe8192: a client asking for it would make every handshake cost an 8192-bit
    exponentiation (D(HE)ater). P-256 alone cost every client whose key share is X25519
    (OpenSSL's, BoringSSL's, NSS's, Go's, rustls's first) a HelloRetryRequest, an extra
    round trip, and refused clients with X25519 only; so the listeners pick the context
    by the ClientHello (`for_hello`)."""

    x25519: ssl.SSLContext
    offer: tlsmatch.Offer  # what the two can agree on with a client (hello_refusal)


def for_hello(ctx: ssl.SSLContext, hello: Hello) -> ssl.SSLContext:
    """The context to answer `hello` with: X25519 when the client offers it, unless its
    one key share is P-256's (answering that in X25519 would cost it a retry)."""
    if not isinstance(ctx, ServerContext) or X25519 not in hello.groups:
        return ctx
    if SECP256R1 in hello.shares and X25519 not in hello.shares:
        return ctx
    return ctx.x25519


def _new_context(cfg: Config, group: str = "prime256v1",
                 ctx: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """`ctx` (a new one by default) set up as every server context is."""
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ecdh_curve(group)  # ECDHE only, one group (ServerContext)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if cfg.tls.min_version == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a DoS lever
    # Session tickets (on by default in OpenSSL) give resumption across reconnects.
    ctx.num_tickets = 2
    # A client that asks for "smtp" gets it (RFC 7301); one that asks only for others
    # never reaches this context: see hello_refusal.
    ctx.set_alpn_protocols([ALPN])
    return ctx


# --------------------------------------------------------------- ALPN (ALPACA)
# A TLS client that names an application protocol (ALPN, RFC 7301) we do not speak, such
# as a browser sent to 465 or relayed to 587 by a man in the middle, is refused before
# the handshake with RFC 7301 3.2's fatal no_application_protocol alert: the cross-protocol
# attacks of ALPACA (2021) need the server to take such a client's bytes as SMTP. Python's
# ssl cannot refuse it (its ALPN callback only declines to choose), so the listeners read
# the ClientHello without consuming it (listener.peek_client_hello) and ask hello_refusal.
# Clients that offer no ALPN (smtplib, swaks, msmtp, curl, Thunderbird) are unaffected.
# The SNI name is not checked (ALPACA's optional "strict SNI"): a client that reaches us by
# another name of ours is not refused.
ALPN = "smtp"
# A ClientHello is read from at most this many bytes and records (clients send one or two);
# past that OpenSSL judges it alone, so a client trickling tiny records costs a bounded
# number of wakeups and parses.
HELLO_PEEK_MAX = 64 * 1024
HELLO_RECORDS_MAX = 32


@dataclass(frozen=True)
class Hello:
    """What `read_hello` made of a client's first bytes. `need`: the bytes the records
    must amount to before the ClientHello is whole (0: it is); `alpn`: the protocol names
    it offers, None without an ALPN extension or when the bytes are no ClientHello we can
    read (OpenSSL then judges them as usual); `groups`, `shares`: for `for_hello`;
    `suites`, `groups`, `versions`, `sigalgs`: for `hello_refusal`."""

    need: int = 0
    alpn: tuple[bytes, ...] | None = None
    groups: tuple[int, ...] = ()  # supported_groups, in the client's order
    versions: tuple[int, ...] = ()  # supported_versions, else (legacy_version,)
    shares: tuple[int, ...] = ()  # the groups of its key shares (TLS 1.3)
    suites: tuple[int, ...] = ()  # cipher_suites, in the client's order
    sigalgs: tuple[int, ...] = ()  # signature_algorithms


def read_hello(data: bytes) -> Hello:
    """Reassemble the ClientHello from the handshake records at the start of `data`."""
    msg = bytearray()
    pos = 0
    for _ in range(HELLO_RECORDS_MAX):
        if len(data) < pos + 5:
            return Hello(need=pos + 5)
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if data[pos] != 22 or not 0 < length <= 16384:  # a handshake record, RFC 8446 5.1
            return Hello()
        end = pos + 5 + length
        if len(data) < end:
            return Hello(need=end)
        msg += data[pos + 5:end]
        pos = end
        if len(msg) >= 4:
            if msg[0] != 1:  # client_hello
                return Hello()
            size = int.from_bytes(msg[1:4], "big")
            if len(msg) >= 4 + size:
                return _parse_hello(bytes(msg[4:4 + size]))
    return Hello()


def _parse_hello(body: bytes) -> Hello:
    """The ALPN names (RFC 7301 3.1), supported groups and key-share groups (RFC 8446
    4.2.7, 4.2.8) of a ClientHello body (RFC 8446 4.1.2); a malformed one reads as none."""
    try:
        i = 2 + 32  # legacy_version, random
        i += 1 + body[i]  # legacy_session_id
        n = int.from_bytes(body[i:i + 2], "big")
        suites = _be16s(body[i + 2:i + 2 + n])  # cipher_suites
        i += 2 + n
        i += 1 + body[i]  # legacy_compression_methods
        end = i + 2 + int.from_bytes(body[i:i + 2], "big")
        i += 2
        if end > len(body):
            return Hello()
        exts: dict[int, bytes] = {}
        while i + 4 <= end:
            kind = int.from_bytes(body[i:i + 2], "big")
            n = int.from_bytes(body[i + 2:i + 4], "big")
            exts.setdefault(kind, body[i + 4:i + 4 + n])
            i += 4 + n
    except IndexError:
        return Hello()
    listed = exts.get(43)  # supported_versions: a one-octet length, then the versions
    versions = _be16s(listed[1:]) if listed else ()
    return Hello(alpn=_alpn(exts.get(16)), groups=_u16s(exts.get(10)),
                 shares=_shares(exts.get(51)), suites=suites, sigalgs=_u16s(exts.get(13)),
                 versions=versions or (int.from_bytes(body[:2], "big"),))


def _alpn(ext: bytes | None) -> tuple[bytes, ...] | None:
    if ext is None or len(ext) < 2 or int.from_bytes(ext[:2], "big") != len(ext) - 2:
        return None
    names, j = [], 2
    while j < len(ext):
        k = ext[j]
        name = ext[j + 1:j + 1 + k]
        if not k or len(name) != k:
            return None
        names.append(name)
        j += 1 + k
    return tuple(names) or None


def _u16s(ext: bytes | None) -> tuple[int, ...]:
    if ext is None or len(ext) < 2 or int.from_bytes(ext[:2], "big") != len(ext) - 2:
        return ()
    return _be16s(ext[2:])


def _be16s(b: bytes) -> tuple[int, ...]:
    """The whole big-endian 16-bit numbers of `b` (an odd last octet left out): one C
    call, not a Python step per number (a ClientHello lists ~30-60 suites and sigalgs)."""
    return struct.unpack(f">{len(b) // 2}H", b[:len(b) // 2 * 2])


def _shares(ext: bytes | None) -> tuple[int, ...]:
    if ext is None or len(ext) < 2:
        return ()
    out, j = [], 2
    while j + 4 <= len(ext):
        out.append(int.from_bytes(ext[j:j + 2], "big"))
        j += 4 + int.from_bytes(ext[j + 2:j + 4], "big")
    return tuple(out)


class Refusal(NamedTuple):
    """A ClientHello refused before the TLS layer: the maillog reason and the alert
    record the client is sent (plaintext: no keys yet; RFC 8446 6)."""

    reason: str
    alert: bytes


def _alert(description: int) -> bytes:
    return bytes((21, 3, 3, 0, 2, 2, description))  # fatal (2)


NO_APPLICATION_PROTOCOL_ALERT = _alert(120)
PROTOCOL_VERSION_ALERT = _alert(70)
HANDSHAKE_FAILURE_ALERT = _alert(40)


def hello_refusal(hello: Hello, ctx: ssl.SSLContext | None = None) -> Refusal | None:
    """Why a ClientHello is refused, or None:
    - it names ALPN protocols and "smtp" is not among them (ALPACA, above);
    - every TLS version it offers is older than `ctx`'s minimum: the protocol_version
      alert RFC 8446 4.1.3 / RFC 5246 E.1 want (asyncio drops the one OpenSSL makes when
      a handshake fails, so such a client saw a bare close: 'unexpected EOF');
    - it shares no cipher suite or group with `ctx` (a ServerContext) that OpenSSL could
      use (tlsmatch.no_common): the handshake_failure alert OpenSSL sends, for the same
      reason (an RSA-only client when only an ECDSA certificate is served, a client
      with only P-384 or finite-field groups)."""
    if hello.alpn is not None and ALPN.encode() not in hello.alpn:
        names = ", ".join(p[:32].decode("ascii", "backslashreplace")
                          for p in hello.alpn[:4])
        more = ", ..." if len(hello.alpn) > 4 else ""
        return Refusal("handshake failed: NO_APPLICATION_PROTOCOL (client offered ALPN "
                       f"{names}{more})", NO_APPLICATION_PROTOCOL_ALERT)
    # RFC 8701 GREASE values (0x?A?A) mean nothing; SSLv2-style hellos never get here.
    versions = [v for v in hello.versions if v & 0x0F0F != 0x0A0A]
    if ctx is not None and versions and max(versions) < ctx.minimum_version.value:
        # The reason OpenSSL gives (and the maillog said before) for the same client.
        return Refusal("handshake failed: UNSUPPORTED_PROTOCOL", PROTOCOL_VERSION_ALERT)
    if isinstance(ctx, ServerContext):
        reason = tlsmatch.no_common(ctx.offer, hello.suites, hello.groups, tuple(versions),
                                    hello.sigalgs)
        if reason is not None:
            return Refusal(f"handshake failed: {reason}", HANDSHAKE_FAILURE_ALERT)
    return None


def server_context(cfg: Config, pem: PEM | None = None) -> ServerContext:
    """A server context with `pem` (bytes already read) or the configured files: every
    pair, in both the context and its X25519 twin."""
    if pem is None:
        pem = read_pem(cfg)
    if len(pem) != len(cfg.cert_pairs):  # the helper read another version of the file
        raise TLSConfigError(f"{len(pem)} certificate(s) read for the "
                             f"{len(cfg.cert_pairs)} configured (the config file changed "
                             "while it was read?): reload again")
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    _new_context(cfg, ctx=ctx)
    try:
        ctx.x25519 = _new_context(cfg, "X25519")
    except ssl.SSLError:
        # A Python whose set_ecdh_curve takes EC curves only ("unknown group": 3.11.2,
        # Debian 12's): P-256 alone, as before the twin, rather than no server at all.
        ctx.x25519 = ctx
    for names, pair in zip(cfg.cert_pairs, pem, strict=True):
        what = _pair_name(names)
        _load_pem(ctx, pair, what)
        if ctx.x25519 is not ctx:
            _load_pem(ctx.x25519, pair, what)
    groups = {SECP256R1} if ctx.x25519 is ctx else {SECP256R1, X25519}
    ctx.offer = tlsmatch.Offer.of(ctx, frozenset(groups),
                                  frozenset(key_type(pair[0]) for pair in pem),
                                  tuple(pair[0] for pair in pem))
    return ctx


def handshake_cut(e: BaseException, peer: str) -> str:
    """What a TLS handshake cut by the other side (`peer`: "client", "server") means, in
    words, or "" for another failure. asyncio and uvloop raise ConnectionResetError
    without an errno when the peer closed the connection (an EOF) in the handshake, and
    with ECONNRESET when it reset it; OpenSSL's SSLEOFError and a broken pipe are the
    peer's close too. (Logged as `ConnectionResetError` before.)"""
    if isinstance(e, ssl.SSLEOFError | BrokenPipeError) or (
            isinstance(e, ConnectionResetError) and e.errno is None):
        return f"the {peer} closed the connection (eof)"
    if isinstance(e, ConnectionResetError):
        return f"connection reset by the {peer}"
    return ""


def handshake_failure(e: BaseException) -> str:
    """The maillog reason of an inbound handshake that failed (465 and STARTTLS alike):
    OpenSSL's reason (`handshake failed: UNSUPPORTED_PROTOCOL`), the client's close
    (`handshake failed: the client closed the connection (eof)`) or the error's type."""
    if cut := handshake_cut(e, "client"):
        return f"handshake failed: {cut}"
    if isinstance(e, ssl.SSLError):
        return f"handshake failed: {e.reason or type(e).__name__}"
    return f"handshake failed: {type(e).__name__}"


# How long one context (and so one session-ticket key) serves new handshakes. OpenSSL
# makes a random ticket key per context and never changes it; a TLS 1.2 ticket holds the
# session's master secret under that key, so whoever read the key from a worker's memory
# could decrypt every recorded session that got a ticket since the worker started
# (RFC 5077 5.5 wants keys changed regularly; Postfix rotates hourly).
TICKET_KEY_LIFETIME = 3600.0


class Prepared(NamedTuple):
    """What `CertStore.prepare` built and `CertStore.use` installs."""

    cfg: Config
    context: ssl.SSLContext
    pem: PEM


class CertStore:
    """Holds the live server context; `reload()` on SIGHUP replaces it.

    Every connection asks for `context` when it starts TLS (implicit TLS at accept,
    STARTTLS in the session), so a reload builds a whole new context and swaps it in: the
    next handshake gets exactly the new certificate (whatever its key type: loading an RSA
    pair into a context that holds an ECDSA one would *add* it, and OpenSSL would go on
    serving the old ECDSA certificate to every client that offers ECDSA) and the new
    `[tls] min_version`; established sessions keep theirs. On any error the old context
    stays. `pem` is the bytes read by a privileged process (see read_pem); without it the
    files are read here. The context is also rebuilt from the same bytes every
    TICKET_KEY_LIFETIME (a fresh ticket key; tickets of the old one no longer resume).
    """

    def __init__(self, cfg: Config, pem: PEM | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        ready = self.prepare(cfg, pem)
        self.cfg, self._context, self._pem = ready
        self._built: float = clock()

    @property
    def context(self) -> ssl.SSLContext:
        if self._clock() - self._built >= TICKET_KEY_LIFETIME:
            self._built = self._clock()
            try:
                self._context = server_context(self.cfg, self._pem)
            except TLSConfigError as e:  # the bytes loaded before: a bug, not the admin's
                maillog.error(f"TLS context not renewed, the old one kept: {e}")
        return self._context

    def reload(self, cfg: Config | None = None, pem: PEM | None = None) -> None:
        self.use(*self.prepare(cfg, pem))

    def prepare(self, cfg: Config | None = None, pem: PEM | None = None) -> Prepared:
        """The config and context a reload would install (nothing changes yet); raises
        on a bad/missing/world-readable file, a key that does not match."""
        new_cfg = cfg if cfg is not None else self.cfg
        if pem is None:
            pem = read_pem(new_cfg)
        return Prepared(new_cfg, server_context(new_cfg, pem), pem)

    def use(self, cfg: Config, context: ssl.SSLContext, pem: PEM) -> None:
        """Install what `prepare` built: the next handshake gets it."""
        self.cfg, self._context, self._pem = cfg, context, pem
        self._built = self._clock()


def self_signed_names(rsa_key: bool) -> tuple[str, str]:
    """The file names `make_self_signed` writes (certificate, key)."""
    return ("rsa-cert.pem", "rsa-key.pem") if rsa_key else ("cert.pem", "key.pem")


def _cmd_cert_make(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    hostname = args.hostname or cfg.hostname
    out = Path(args.out) if args.out else cfg.cert_path.parent
    names = self_signed_names(args.rsa)
    if not args.force and any((out / n).exists() for n in names):
        print(f"authrelay: {out}/{names[0]} or {names[1]} exists; use --force to replace",
              file=sys.stderr)
        return 1
    cert, key = make_self_signed(hostname, out, days=args.days, rsa_key=args.rsa)
    print(f"wrote {cert}\nwrote {key} (mode 0600)")
    made, first = ("RSA", "ECDSA") if args.rsa else ("ECDSA", "RSA")
    served = _key_type_of(cfg.cert_path) if cfg.tls.cert else "ECDSA"
    if served == made and args.rsa and Path(cfg.tls.second_cert) != cert:
        print(f"tls.cert ({cfg.cert_path}) is {made} already, and only one certificate "
              f"per key type is served: beside it, serve an ECDSA pair (authrelay cert "
              f"make) as second_cert/second_key, or make this one tls.cert/tls.key")
    elif served == first and not cfg.tls.second_cert and cert != cfg.cert_path:
        print(f"serve it beside the {first} certificate, in [tls]:\n"
              f"{_first_pair_lines(cfg)}"
              f"second_cert = \"{cert.absolute()}\"\nsecond_key = \"{key.absolute()}\"")
    return 0


def _key_type_of(cert: Path) -> str:
    """key_type of the certificate file `cert`; "" when it cannot be read."""
    try:
        return key_type(cert.read_bytes())
    except OSError:
        return ""


def _first_pair_lines(cfg: Config) -> str:
    """The `cert`/`key` lines a config without them needs beside a second pair: the
    self-signed default is not served beside one (config.validate), so name its files,
    and how to make them when serve has not yet."""
    if cfg.tls.cert:
        return ""
    cert, key = cfg.cert_path.absolute(), cfg.key_path.absolute()
    made = "" if cert.exists() else (
        f"# not made yet: authrelay cert make --out {cert.parent}\n")
    return f"{made}cert = \"{cert}\"\nkey = \"{key}\"\n"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cert", help="TLS certificates")
    s = p.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    m = s.add_parser("make", help="make a self-signed ECDSA P-256 (or RSA) certificate and key")
    m.add_argument("--hostname", help="certificate name (default: the config's hostname)")
    m.add_argument("--out", help="directory (default: that of [tls] cert, else "
                                  "state_dir/tls, where serve makes its own); the file "
                                  "names are always cert.pem/key.pem (rsa-* with --rsa)")
    m.add_argument("--days", type=int, default=825, help="valid this many days (default: 825)")
    m.add_argument("--force", action="store_true", help="replace existing files")
    m.add_argument("--rsa", action="store_true",
                   help="RSA 2048 instead (rsa-cert.pem, rsa-key.pem): the second pair, "
                        "for clients without ECDSA")
    m.set_defaults(func=_cmd_cert_make)
