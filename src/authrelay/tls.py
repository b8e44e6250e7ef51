"""TLS: server SSLContext factory, certificate reload, self-signed bootstrap (`cert make`).

Owns how authrelay speaks TLS. Contract: `server_context(cfg, pem)` returns a context with
TLS 1.2 minimum (RFC 8314 4.1 / RFC 8996), server cipher preference, session tickets for
resumption, and the configured certificate. `CertStore.reload()` swaps in a renewed
certificate: the next handshake uses it, established sessions are untouched. A key file
readable by group or others is refused (like OpenSSH), so a mis-set key never goes live.
`make_self_signed()` writes an ECDSA P-256 certificate and a 0600 key (ECDSA: smaller,
and the handshake is cheaper than RSA, which matters at thousands of sessions/s).

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
import sys
import tempfile
from pathlib import Path

from authrelay.config import Config, load
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


def make_self_signed(hostname: str, out_dir: Path, *, days: int = 825) -> tuple[Path, Path]:
    """Write cert.pem and key.pem (0600) for `hostname` into out_dir; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
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
    cert_path, key_path = out_dir / "cert.pem", out_dir / "key.pem"
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


PEM = tuple[bytes, bytes]  # (certificate chain, private key), as read from the files


def read_pem(cfg: Config) -> PEM:
    """Read and check the configured certificate and key (call while privileged).

    Raises TLSConfigError naming the file and the fix. The pair is proved to load (and the
    key to match the certificate) before it is returned, so whoever asks the privileged
    helper for it gets a working certificate or an error, never the bytes of some other
    file the config might point at.
    """
    cert, key = cfg.cert_path, cfg.key_path
    if not cert.exists():
        raise TLSConfigError(f"{cert}: certificate not found (authrelay cert make)")
    if not key.exists():
        raise TLSConfigError(f"{key}: key not found")
    check_key_mode(key)
    try:
        pem = (cert.read_bytes(), key.read_bytes())
    except OSError as e:
        raise TLSConfigError(f"{e.filename}: cannot read: {e.strerror}") from None
    _load_pem(_new_context(cfg), pem, f"{cert}/{key}")
    return pem


def _load_pem(ctx: ssl.SSLContext, pem: PEM, what: str = "certificate") -> None:
    """Load a certificate chain and key from memory into ctx.

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
        raise TLSConfigError(f"{what}: cannot load: {e}") from None


def _new_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if cfg.tls.min_version == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a DoS lever
    try:
        ctx.set_ecdh_curve("prime256v1")
    except (ValueError, ssl.SSLError):
        pass
    # Session tickets (on by default in OpenSSL) give resumption across reconnects.
    ctx.num_tickets = 2
    return ctx


def server_context(cfg: Config, pem: PEM | None = None) -> ssl.SSLContext:
    """A server context with `pem` (bytes already read) or the configured files."""
    if pem is None:
        pem = read_pem(cfg)
    ctx = _new_context(cfg)
    _load_pem(ctx, pem, f"{cfg.cert_path}/{cfg.key_path}")
    return ctx


def handshake_failure(e: BaseException) -> str:
    """The maillog reason of an inbound handshake that failed (465 and STARTTLS alike):
    OpenSSL's reason (`handshake failed: UNSUPPORTED_PROTOCOL`) or the error's type."""
    if isinstance(e, ssl.SSLError):
        return f"handshake failed: {e.reason or type(e).__name__}"
    return f"handshake failed: {type(e).__name__}"


class CertStore:
    """Holds the live server context; `reload()` on SIGHUP replaces it.

    Every connection asks for `context` when it starts TLS (implicit TLS at accept,
    STARTTLS in the session), so a reload builds a whole new context and swaps it in: the
    next handshake gets exactly the new certificate (whatever its key type: loading an RSA
    pair into a context that holds an ECDSA one would *add* it, and OpenSSL would go on
    serving the old ECDSA certificate to every client that offers ECDSA) and the new
    `[tls] min_version`; established sessions keep theirs. On any error the old context
    stays. `pem` is the bytes read by a privileged process (see read_pem); without it the
    files are read here.
    """

    def __init__(self, cfg: Config, pem: PEM | None = None) -> None:
        self.cfg = cfg
        self.context = server_context(cfg, pem)

    def reload(self, cfg: Config | None = None, pem: PEM | None = None) -> None:
        self.use(*self.prepare(cfg, pem))

    def prepare(self, cfg: Config | None = None, pem: PEM | None = None
                ) -> tuple[Config, ssl.SSLContext]:
        """The config and context a reload would install (nothing changes yet); raises
        on a bad/missing/world-readable file, a key that does not match."""
        new_cfg = cfg if cfg is not None else self.cfg
        if pem is None:
            pem = read_pem(new_cfg)
        return new_cfg, server_context(new_cfg, pem)

    def use(self, cfg: Config, context: ssl.SSLContext) -> None:
        """Install what `prepare` built: the next handshake gets it."""
        self.cfg, self.context = cfg, context


def _cmd_cert_make(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    hostname = args.hostname or cfg.hostname
    out = Path(args.out) if args.out else cfg.cert_path.parent
    if not args.force and ((out / "cert.pem").exists() or (out / "key.pem").exists()):
        print(f"authrelay: {out}/cert.pem or key.pem exists; use --force to replace",
              file=sys.stderr)
        return 1
    cert, key = make_self_signed(hostname, out, days=args.days)
    print(f"wrote {cert}\nwrote {key} (mode 0600)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cert", help="TLS certificates")
    s = p.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    m = s.add_parser("make", help="make a self-signed ECDSA P-256 certificate and key")
    m.add_argument("--hostname", help="certificate name (default: the config's hostname)")
    m.add_argument("--out", help="directory (default: where the config expects them)")
    m.add_argument("--days", type=int, default=825)
    m.add_argument("--force", action="store_true", help="replace existing files")
    m.set_defaults(func=_cmd_cert_make)
