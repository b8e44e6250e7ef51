"""`authrelay check-config`: everything `serve` would trip on, named before it starts.

Owns the pre-flight checks of a config. Contract: `check(cfg)` returns a list of
`Finding(level, key, message)` (level "error", "warning" or "note"), never raises: a bad
config is reported, never a traceback. `main()` prints one line per finding and exits 1
when there is an error, 0 otherwise (warnings do not stop a start: e.g. a saslauthd that
is started after us). What is checked, beyond the TOML itself (config.py names bad keys
and values, every host:port included):
- TLS, each pair served (`[tls] cert`/`key`, `second_cert`/`second_key`): certificate
  and key present, readable, a pair that loads (the key matches the certificate), the
  key not readable by group/others (tls.check_key_mode, as serve refuses it), the
  certificate not expired; no two pairs of one key type; who reads the files: with `user` set, serve
  started as root reads them before dropping privileges (the privileged loader), so a
  root-only key is fine; without `user`, the user running serve must read them.
- listeners: every address bindable now (in use, privileged port as non-root, not an
  address of this machine), with the address and the fix in the message.
- `user` exists; auth backend sockets (saslauthd:PATH, dovecot:PATH) exist (warning:
  the backend may start after us); PostgreSQL (`auth.dsn`) and Redis (`limits.shared`)
  answer (warnings, docs/SCALING.md); the smart-host password file is readable and private;
  state_dir and a file: log target can be created; every smart host name resolves; a
  config holding a password (auth.dsn, limits.shared) is not readable by group/others; a
  root start sets `user` (warnings).
Every message has one style, shared with config errors (config.error_line): `FILE: LEVEL:
KEY: WHAT`.
`bind_error()` words an OSError from binding a listener the same way for `serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import ipaddress
import os
import pwd
import socket
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from authrelay.config import (
    EMBEDDED,
    LOOKUP,
    CertPair,
    Config,
    ConfigError,
    Listen,
    attempt_cut,
    error_line,
    load,
    parse_hostport,
    read_config_bytes,
)
from authrelay.metrics import exposed


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning | note
    key: str  # config key path ("tls.key", "listen[0].address"), or "" for the file
    message: str
    # an error serve itself would refuse to start with (False: it starts, and warns)
    stops_serve: bool = True

    def __str__(self) -> str:
        return f"{self.level}: {self.key + ': ' if self.key else ''}{self.message}"


# --------------------------------------------------------------------------- listeners

def bind_error(address: str, mode: str, err: OSError) -> str:
    """One line naming the address, what went wrong and the fix (serve and check-config)."""
    port = ""
    with contextlib.suppress(Exception):
        port = address.rsplit(":", 1)[1]
    if err.errno == errno.EADDRINUSE:
        why = (f"address already in use (another mail server? see: ss -ltnp "
               f"'sport = :{port}')")
    elif err.errno == errno.EACCES:
        why = ("permission denied: ports below 1024 need root; start serve as root with "
               "user = \"...\" (it binds, then drops privileges) or use a port above 1023"
               if port.isdigit() and int(port) < 1024 else "permission denied")
    elif err.errno == errno.EADDRNOTAVAIL:
        why = "not an address of this machine"
    elif isinstance(err, socket.gaierror):
        why = f"cannot resolve the host: {err.strerror or err}"
    else:
        why = err.strerror or str(err)
    return f"cannot listen on {address} ({mode}): {why}"


def _try_bind(ln: Listen) -> OSError | None:
    host, port = ln.host, ln.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
    except OSError as e:
        return e
    return None


def _server_running(cfg: Config) -> bool:
    """Is an authrelay serving this state dir (its control socket answers)?"""
    try:
        from authrelay.scheduler import control
        from authrelay.spool.store import Spool

        control.request(control.control_path(Spool(cfg.spool_dir)), {"op": "status"},
                        timeout=3.0)
        return True
    except Exception:
        return False


def _check_listeners(cfg: Config, out: list[Finding]) -> None:
    root = os.geteuid() == 0
    running: bool | None = None
    seen: set[tuple[str, int]] = set()
    for i, ln in enumerate(cfg.listen):
        key = f"listen[{i}].address"
        if (ln.host, ln.port) in seen:
            out.append(Finding("error", key, f"{ln.address} is listed twice"))
            continue
        seen.add((ln.host, ln.port))
        err = _try_bind(ln)
        if err is None:
            continue
        if err.errno == errno.EADDRINUSE:
            if running is None:
                running = _server_running(cfg)
            if running:
                out.append(Finding("note", key, f"{ln.address} is in use, by the authrelay "
                                   "already serving this state_dir (fine for a reload)"))
                continue
        if err.errno == errno.EACCES and not root and cfg.user:
            out.append(Finding("warning", key, f"{ln.address}: cannot bind as uid "
                               f"{os.geteuid()}; serve must start as root (user = "
                               f"{cfg.user!r} is then taken after binding)"))
            continue
        out.append(Finding("error", key, bind_error(ln.address, ln.mode, err)))


# --------------------------------------------------------------------------- user, files

def _user(cfg: Config, out: list[Finding]) -> pwd.struct_passwd | None:
    if not cfg.user:
        return None
    try:
        pw = pwd.getpwnam(cfg.user)
    except KeyError:
        out.append(Finding("error", "user", f"no such user {cfg.user!r} (create it, e.g. "
                           f"useradd --system --home-dir {cfg.state_dir} --shell "
                           f"/usr/sbin/nologin {cfg.user})"))
        return None
    if pw.pw_uid == 0:
        out.append(Finding("warning", "user", f"{cfg.user!r} is root: nothing is dropped"))
    return pw


def _readable_by(path: Path, pw: pwd.struct_passwd) -> bool:
    """Could user `pw` read `path` (mode bits and groups; ACLs are not looked at)?"""
    try:
        st = path.stat()
    except OSError:
        return False
    if pw.pw_uid == 0:
        return True
    try:
        groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = {pw.pw_gid}
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _check_privileged_split(cfg: Config, pw: pwd.struct_passwd | None,
                            out: list[Finding]) -> None:
    """With `user`, what the dropped processes read themselves (docs/PRIVILEGES.md): the
    config file (re-read on SIGHUP) and the smart host's CA file."""
    if pw is None or cfg.source == EMBEDDED:
        return
    src = Path(cfg.source)
    if not _readable_by(src, pw):
        out.append(Finding("warning", "", f"{src}: not readable by user {pw.pw_name}: "
                           "a reload (SIGHUP) would fail"))
    for key, ca in (("relay.smart_host_ca_file", cfg.relay.smart_host_ca_file),
                    ("delivery.tls_ca_file", cfg.delivery.tls_ca_file)):
        if ca and not _readable_by(Path(ca), pw):
            out.append(Finding("error", key, f"{ca}: not readable by "
                               f"user {pw.pw_name}, who delivers the mail"))
    # Root-only key / smart host password: _check_tls / _check_files (_config_untrusted).


def _check_tls(cfg: Config, pw: pwd.struct_passwd | None, out: list[Finding]) -> None:
    """Each served pair (Config.cert_pairs) as serve loads it; two of one key type."""
    from authrelay import tls

    if cfg.self_signed and not (cfg.cert_path.exists() or cfg.key_path.exists()):
        out.append(Finding("note", "tls", f"no certificate configured: serve makes a "
                           f"self-signed one in {cfg.cert_path.parent} on first start"))
        return
    kinds: dict[str, CertPair] = {}
    for names in cfg.cert_pairs:
        cert_pem = _check_pair(cfg, names, out)
        if cert_pem is None:
            continue
        kind = tls.key_type(cert_pem)
        other = kinds.setdefault(kind, names)
        if other is not names:
            out.append(Finding("error", names.cert_key,
                               tls.same_key_type(names, other, kind)))


def _check_pair(cfg: Config, names: CertPair, out: list[Finding]) -> bytes | None:
    """One certificate and key: found, key mode, readable by serve, loads, key matches,
    expiry. The certificate's bytes when it loads, else None."""
    import ssl

    from authrelay import tls

    cert, key, ckey, kkey = names
    missing = False
    for k, p, what in ((ckey, cert, "certificate"), (kkey, key, "key")):
        if not p.exists():
            out.append(Finding("error", k, f"{p}: {what} not found"))
            missing = True
    if missing:
        return None
    try:
        tls.check_key_mode(key)
    except tls.TLSConfigError as e:
        out.append(Finding("error", kkey, str(e)))
    except OSError as e:
        out.append(Finding("error", kkey, f"{key}: {e.strerror}"))
    # Who reads the files. With `user`, serve (started as root) reads them before it
    # drops privileges: a root-only key is right. Without, whoever runs serve reads them.
    privileged_loader = bool(cfg.user)
    if privileged_loader and _user_cannot_read(cfg, key):
        why = _config_untrusted(cfg)
        if why:  # read at start, but a SIGHUP after a renewal would fail
            out.append(Finding("warning", kkey, f"{key}: readable only by root; the root "
                               f"helper reloads it on SIGHUP only if {why}"))
    for k, p in ((ckey, cert), (kkey, key)):
        if privileged_loader:
            continue
        if not os.access(p, os.R_OK):
            out.append(Finding("error", k, f"{p}: not readable by uid {os.geteuid()}, "
                               "which serve would run as (set user = \"...\" and start as "
                               "root, or make it readable by this user)"))
            return None
    try:
        pem = (cert.read_bytes(), key.read_bytes())
    except PermissionError as e:
        level = "warning" if privileged_loader and os.geteuid() != 0 else "error"
        out.append(Finding(level, kkey if e.filename == str(key) else ckey,
                           f"{e.filename}: cannot read as uid {os.geteuid()}"
                           + ("; run check-config as root to check it the way serve "
                              "reads it" if level == "warning" else "")))
        return None
    except OSError as e:
        out.append(Finding("error", ckey, f"{e.filename}: cannot read: {e.strerror}"))
        return None
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="authrelay-check-") as d:
        joined = Path(d) / "pem"
        fd = os.open(joined, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem[0].rstrip(b"\n") + b"\n" + pem[1])
        try:
            ctx.load_cert_chain(str(joined))
        except ssl.SSLError as e:
            text = str(e)
            if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
                out.append(Finding("error", kkey, f"{key} does not match the certificate "
                                   f"{cert}"))
            elif "PEM" in text or "NO_START_LINE" in text:
                out.append(Finding("error", ckey, f"{cert} / {key}: not a PEM certificate "
                                   f"and key ({e.reason or text})"))
            else:
                out.append(Finding("error", ckey, f"{cert} / {key}: cannot load: {text}"))
            return None
    try:
        from cryptography import x509

        c = x509.load_pem_x509_certificate(pem[0])
        now = datetime.datetime.now(datetime.UTC)
        end = c.not_valid_after_utc
        if end <= now:
            out.append(Finding("error", ckey, f"{cert}: expired on {end:%Y-%m-%d} (serve "
                               "starts with it and warns; clients that verify refuse it)",
                               stops_serve=False))
        elif end - now < datetime.timedelta(days=14):
            out.append(Finding("warning", ckey, f"{cert}: expires on {end:%Y-%m-%d}"))
    except Exception:  # the load above is what matters; expiry is advice
        pass
    return pem[0]


def _check_scale(cfg: Config, out: list[Finding]) -> None:
    """PostgreSQL users and Redis counters (docs/SCALING.md): the library is installed
    (error), the server answers and has our schema (warnings: it may come up after us;
    until then AUTH gets 454 / limits are counted per node)."""
    import asyncio

    if cfg.auth.backend == "postgresql":
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            out.append(Finding("error", "auth.backend", "postgresql needs asyncpg: "
                               "pip install 'authrelay[postgresql]'"))
        else:
            from authrelay.auth.pgusers import PgUserStore, UserStoreUnavailable, redact_dsn

            async def ask() -> None:
                store = PgUserStore(cfg.auth.dsn, pool_size=1, timeout=5.0)
                try:
                    await store.lookup("")
                finally:
                    await store.close()

            try:
                asyncio.run(ask())
            except UserStoreUnavailable as e:
                out.append(Finding("warning", "auth.dsn", f"{redact_dsn(cfg.auth.dsn)}: {e} "
                                   "(until it answers, AUTH gets 454 4.7.0)"))
    if cfg.limits.shared:
        from authrelay.policy import shared

        try:
            shared.driver()
        except RuntimeError as e:
            out.append(Finding("error", "limits.shared", str(e)))
            return
        redact_url = shared.redact_url

        async def ping() -> None:
            r = shared.client(cfg.limits.shared, timeout=2, max_connections=1)
            try:
                await r.ping()
            finally:
                await r.aclose()

        try:
            asyncio.run(ping())
        except Exception as e:
            out.append(Finding("warning", "limits.shared",
                               f"{redact_url(cfg.limits.shared)}: {type(e).__name__}: {e} "
                               "(until it answers, each node counts its own limits)"))


def _check_backend(cfg: Config, out: list[Finding]) -> None:
    be = cfg.auth.backend
    if ":" in be and cfg.auth.app_passwords == "require":
        # saslauthd and Dovecot own their passwords: authrelay has no app passwords there.
        out.append(Finding("warning", "auth.app_passwords", f'"require" does nothing with '
                           f"backend {be.split(':', 1)[0]} (app passwords live in the "
                           "userdb or PostgreSQL user store): account passwords still "
                           "log in"))
    if ":" not in be:
        return
    kind, path = be.split(":", 1)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        out.append(Finding("warning", "auth.backend", f"{path}: no such socket (is {kind} "
                           "running? until it is, every AUTH gets 454 4.7.0)"))
        return
    except OSError as e:
        out.append(Finding("warning", "auth.backend", f"{path}: {e.strerror}"))
        return
    if not stat.S_ISSOCK(st.st_mode):
        out.append(Finding("error", "auth.backend", f"{path}: not a socket"))


def _user_cannot_read(cfg: Config, p: Path) -> bool:
    try:
        return not _readable_by(p, pwd.getpwnam(cfg.user))
    except (KeyError, OSError):
        return False


def _config_untrusted(cfg: Config) -> str:
    """Why serve's root key helper would refuse files named by this config ('' if not)."""
    src = Path(cfg.source)
    try:
        st = src.stat()
    except OSError:
        return ""  # the embedded default names files under the state dir only
    if st.st_uid != 0 or st.st_mode & 0o022:
        return (f"{src} must be owned by root and not writable by group/others (owner uid "
                f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    return ""


def _check_secret(cfg: Config, pw: pwd.struct_passwd | None, key: str, path: str,
                  out: list[Finding]) -> None:
    """A file only the relay may read (smart host password, OAuth client secret or key):
    it must exist, be 0600-ish, and be readable by whoever will read it (`user`, or the
    root key helper for a config it trusts: docs/PRIVILEGES.md)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        out.append(Finding("error", key, f"{path}: {e.strerror}"))
        return
    if not stat.S_ISREG(st.st_mode):
        out.append(Finding("error", key, f"{path}: not a regular file"))
        return
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        out.append(Finding("warning", key, f"{path}: readable by group/others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"))
    reader = pw
    if reader is not None and not _readable_by(p, reader):
        # Dropping privileges: the key helper reads it as root (docs/PRIVILEGES.md),
        # but only for a config that the unprivileged user cannot rewrite.
        why = _config_untrusted(cfg)
        if why:
            out.append(Finding("error", key, f"{path}: not readable by user "
                               f"{reader.pw_name}, and the root helper will not read it: "
                               f"{why}"))
    elif reader is None and not os.access(p, os.R_OK):
        out.append(Finding("error", key, f"{path}: not readable by uid {os.geteuid()}"))


def _check_oauth_key(key: str, path: str, out: list[Finding]) -> None:
    """The OAuth signing key loads (when this process can read it)."""
    from authrelay.delivery.oauth import load_signing_key

    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024)
    except OSError:
        return  # _check_secret said why, or the root helper will read it
    try:
        load_signing_key(data)
    except ValueError as e:
        out.append(Finding("error", key, f"{path}: {e}"))


def _check_files(cfg: Config, pw: pwd.struct_passwd | None, out: list[Finding]) -> None:
    r = cfg.relay
    pf = r.smart_host_password_file
    if pf:
        _check_secret(cfg, pw, "relay.smart_host_password_file", pf, out)
    if r.smart_host_user and not pf and r.smart_host_auth == "password":
        out.append(Finding("error", "relay.smart_host_password_file",
                           "smart_host_user is set but no password file"))
    # Each smart host's OAuth settings (its own table, or the [relay] keys), once each.
    settings = {s for s in (r.oauth_for(h) for h in r.smart_host) if s is not None}
    relay_keys = r.oauth_for("")  # the [relay] keys: checked even with no smart host
    if relay_keys is not None:
        settings.add(relay_keys)
    oauth_hosts = [h for h in r.smart_host if r.oauth_for(h) is not None]
    if oauth_hosts:
        from authrelay.delivery.tlspolicy import smart_host_level

        level = smart_host_level(cfg)[0]
        if level != "verify":
            # A bearer token works for whoever holds it, for its lifetime (RFC 6750 5.3
            # wants the chain validated); delivery sends it as the level says (client.py).
            out.append(Finding(
                "warning", "relay.smart_host_tls",
                f"level {level}: the OAuth token for {', '.join(oauth_hosts)} goes "
                + ("in clear text (only over a tunnel or a private network)"
                   if level == "none" else
                   "to whoever answers, its certificate not verified")
                + "; starttls or tls verify the smart host (a private CA: "
                "relay.smart_host_ca_file)"))
    for s in sorted(settings, key=lambda s: s.host):
        if s.secret_file:
            _check_secret(cfg, pw, s.key("secret_file"), s.secret_file, out)
        if s.key_file:
            _check_secret(cfg, pw, s.key("key_file"), s.key_file, out)
            _check_oauth_key(s.key("key_file"), s.key_file, out)
        if s.ca_file and not os.access(s.ca_file, os.R_OK):
            out.append(Finding("error", s.key("ca_file"), f"{s.ca_file}: not readable"))
    sd = cfg.state_path
    if cfg.source != EMBEDDED and not _sets(cfg.source, "state_dir"):
        # Relative paths are taken from the config file's directory (config.py).
        out.append(Finding("warning", "state_dir", f"not set: the spool, users and keys "
                           f"are in {sd}, beside the config file; set state_dir (e.g. "
                           "\"/var/lib/authrelay\")"))
    if sd.exists():
        if not sd.is_dir():
            out.append(Finding("error", "state_dir", f"{sd}: not a directory"))
        elif pw is None and not os.access(sd, os.W_OK | os.X_OK):
            out.append(Finding("error", "state_dir", f"{sd}: not writable by uid "
                               f"{os.geteuid()}"))
    else:
        parent = next((p for p in sd.absolute().parents if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK):
            out.append(Finding("error", "state_dir", f"{sd} does not exist and cannot be "
                               f"created (no write access to {parent})"))
        else:
            out.append(Finding("note", "state_dir", f"{sd} is created on first start"))
    from authrelay import aliases

    for problem in aliases.problems(cfg):
        out.append(Finding("warning", "aliases_file", problem))
    t = cfg.log.target
    if t.startswith("file:"):
        d = Path(t[5:]).parent
        if not d.is_dir():
            out.append(Finding("error", "log.target", f"{d}: no such directory"))
    elif t.startswith("syslog"):
        from authrelay import maillog

        sock = maillog.syslog_path(t) or maillog.SYSLOG_SOCKET
        why = maillog._syslog_unreachable(sock)
        if why:
            out.append(Finding("warning", "log.target", f"{sock} {why} "
                               "(no syslog daemon): the maillog goes to stderr"))


def _check_dkim(cfg: Config, pw: pwd.struct_passwd | None, out: list[Finding]) -> None:
    """DKIM keys: unreadable / open / broken keys, domains without a key."""
    from authrelay.dkim.keys import KeyStore

    store = KeyStore(cfg.dkim_dir).load()
    for problem in store.problems:
        out.append(Finding("warning", "dkim", problem))
    for k in store.all():
        if pw is not None and not _readable_by(k.path, pw):
            out.append(Finding("error", "dkim", f"{k.path}: not readable by user "
                               f"{pw.pw_name} (chown {pw.pw_name} {k.path}): its mail "
                               "would go out unsigned"))
    for d in cfg.dkim.domains:
        if not store.for_domain(d):
            out.append(Finding("warning", "dkim.domains", f"{d} has no key in "
                               f"{cfg.dkim_dir}: authrelay dkim keygen {d}"))
    if store.all() and ":" in cfg.auth.backend and not cfg.dkim.sign_unowned:
        # saslauthd / Dovecot know no addresses: a user owns only a login that is one.
        out.append(Finding("note", "dkim.sign_unowned", f"with backend "
                           f"{cfg.auth.backend.split(':', 1)[0]} a user owns only its login "
                           "when that is an address: mail from other logins goes out "
                           "unsigned (dkim=skipped); sign_unowned = true signs it anyway"))
    if cfg.dkim.sign_unowned:
        out.append(Finding("warning", "dkim.sign_unowned", "every authenticated user's mail "
                           "is signed whatever its From: says: any user can send as anyone "
                           "at a domain with a key, with its DKIM and DMARC pass"))


def _check_outbound_tls(cfg: Config, out: list[Finding]) -> None:
    """[delivery] dnssec believes the resolver's AD bit (RFC 7672 1.3): say so when the
    resolver is not on this host; a tls_ca_file that is not a CA bundle."""
    d = cfg.delivery
    if d.dnssec:
        servers = [parse_hostport(ns, "delivery.nameservers", default_port=53)[0]
                   for ns in d.nameservers]
        if not servers:
            try:
                text = Path("/etc/resolv.conf").read_text()
            except OSError:
                text = ""
            servers = [ln.split()[1] for ln in text.splitlines()
                       if ln.startswith("nameserver") and len(ln.split()) > 1]
        far = [ns for ns in servers if not _loopback(ns)]
        if far or not servers:
            out.append(Finding("warning", "delivery.dnssec", "the AD bit is believed from "
                               f"{', '.join(far) or 'the system resolver'}, not a resolver "
                               "on this host: anyone on the path can forge it (DANE); run "
                               "unbound or BIND on 127.0.0.1, or make sure the path is "
                               "trusted"))
    if d.tls_ca_file:
        try:
            from cryptography import x509
            x509.load_pem_x509_certificates(Path(d.tls_ca_file).read_bytes())
        except (OSError, ValueError) as e:
            out.append(Finding("error", "delivery.tls_ca_file",
                               f"{d.tls_ca_file}: not a PEM certificate bundle ({e})"))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_smart_hosts(cfg: Config, out: list[Finding]) -> None:
    """Every smart host name resolves (else all mail would stay deferred)."""
    for i, hp in enumerate(cfg.relay.smart_host):
        try:
            host, port = parse_hostport(hp, "relay.smart_host", 25)
        except ConfigError:
            continue  # config.py reported it
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            why = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
            out.append(Finding("warning", f"relay.smart_host[{i}]",
                               f"{host} does not resolve ({why}): mail to it stays "
                               "deferred until it does"))


def _secrets_in_file(cfg: Config) -> list[str]:
    """The keys of `cfg` that hold a password in the file itself."""
    keys = []
    if cfg.auth.backend == "postgresql" and urlsplit(cfg.auth.dsn).password:
        keys.append("auth.dsn")
    if cfg.limits.shared and "@" in cfg.limits.shared.split("/")[2] \
            and ":" in cfg.limits.shared.split("/")[2].rpartition("@")[0]:
        keys.append("limits.shared")
    return keys


def _check_operation(cfg: Config, out: list[Finding]) -> None:
    """What runs, but not as the admin would want: passwords in a file others may read;
    a root start without `user` (the whole daemon runs as root)."""
    secret = _secrets_in_file(cfg)
    if secret and cfg.source != EMBEDDED:
        try:
            mode = stat.S_IMODE(os.stat(cfg.source).st_mode)
        except OSError:
            mode = 0
        if mode & 0o044:
            who = "group and others" if mode & 0o004 and mode & 0o040 else (
                "others" if mode & 0o004 else "its group")
            out.append(Finding("warning", secret[0], f"{cfg.source} holds a password "
                               f"({', '.join(secret)}) and is readable by {who} (mode "
                               f"{mode:04o}): chmod 600 {cfg.source} (or 640 with group "
                               "authrelay); local users send through the server's socket "
                               "without reading it"))
    if os.geteuid() == 0 and not cfg.user:
        out.append(Finding("warning", "user", "not set, and started as root: the whole "
                           "daemon would run as root (set user = \"authrelay\": serve "
                           "binds as root, then drops to it)"))


def _sets(path: str, key: str) -> bool:
    """Whether the config file at `path` sets top-level `key` itself (run.sh writes the
    default state_dir out in full: that is set, not a default taken). Unreadable: True
    (the load already said why)."""
    try:
        return key in tomllib.loads(read_config_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True


def _check_delivery_timeouts(cfg: Config, out: list[Finding]) -> None:
    """A wait longer than [delivery] attempt_timeout (config.attempt_cut): serve says so
    in the maillog too."""
    problem = attempt_cut(cfg)
    if problem is not None:
        out.append(Finding("warning", "delivery.attempt_timeout", problem))


def _check_metrics(cfg: Config, out: list[Finding]) -> None:
    """/metrics and /health answer anyone who reaches them (no authentication): an
    address that is not loopback publishes the relay's traffic and queue to the network
    (serve says so in the maillog too; a host name is left to the operator)."""
    if not cfg.metrics.address or not exposed(cfg.metrics.address):
        return
    _host, port = parse_hostport(cfg.metrics.address, "metrics.address")
    out.append(Finding("warning", "metrics.address",
                       f"{cfg.metrics.address} is not loopback: /metrics and /health "
                       "answer anyone who reaches them, with no authentication; use "
                       f"\"127.0.0.1:{port}\" (a scraper elsewhere: a firewall rule or a "
                       "reverse proxy with authentication in front)"))


def _check_local_recipients(cfg: Config, pw: pwd.struct_passwd | None,
                            out: list[Finding]) -> None:
    """The local recipients list (policy/recipients.py): loadable, readable by `user`
    (serve reads it after dropping privileges, and again at every reload), and where mail
    from anyone reaches any local part of a local domain (backscatter)."""
    from authrelay.policy import recipients

    key = "relay.local_recipients_file"
    try:
        table = recipients.load(cfg)
    except recipients.RecipientsError as e:
        out.append(Finding("error", key, str(e)))
        return
    path = cfg.relay.local_recipients_file
    if table is not None and pw is not None and pw.pw_uid != 0 \
            and not _readable_by(Path(path), pw):
        out.append(Finding("error", key, f"{path}: not readable by {cfg.user} (serve reads "
                           "it after dropping privileges)"))
    for problem in recipients.problems(cfg, table) if table is not None else ():
        out.append(Finding("warning", key, problem))
    open_domains = recipients.open_domains(cfg, table)
    if open_domains:
        out.append(Finding(
            "note" if table is not None else "warning",
            "relay.local_domains" if table is None else key,
            f"{', '.join(open_domains)}: any local part is accepted from anyone and relayed "
            "on; an unknown one is bounced later to the (maybe forged) sender "
            "(backscatter)" + ("" if table is not None else
                               ": list the valid recipients in local_recipients_file")))


def check(cfg: Config) -> list[Finding]:
    """Every finding for `cfg`; never raises."""
    out: list[Finding] = []
    pw = None
    try:
        pw = _user(cfg, out)
    except Exception as e:  # a check must never turn into a traceback
        out.append(Finding("error", "user", f"cannot check: {e}"))
    steps: list[Callable[[], None]] = [
        lambda: _check_listeners(cfg, out), lambda: _check_tls(cfg, pw, out),
        lambda: _check_backend(cfg, out), lambda: _check_scale(cfg, out),
        lambda: _check_files(cfg, pw, out), lambda: _check_privileged_split(cfg, pw, out),
        lambda: _check_dkim(cfg, pw, out), lambda: _check_outbound_tls(cfg, out),
        lambda: _check_smart_hosts(cfg, out), lambda: _check_operation(cfg, out),
        lambda: _check_metrics(cfg, out), lambda: _check_delivery_timeouts(cfg, out),
        lambda: _check_local_recipients(cfg, pw, out)]
    for step in steps:
        try:
            step()
        except Exception as e:
            out.append(Finding("error", "", f"check failed: {type(e).__name__}: {e}"))
    return out


def main(args: argparse.Namespace) -> int:
    path = args.file or args.config
    try:
        cfg = load(path)
    except ConfigError as e:
        print(f"authrelay: {error_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # pragma: no cover - never a traceback on a bad config
        print(f"authrelay: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    src = cfg.source
    if src == EMBEDDED:
        print(f"{src}: no config file found (looked for {LOOKUP}); `serve` would run on "
              "the embedded default")
    if args.syntax:
        print(f"{src}: ok")
        return 0
    findings = check(cfg)
    errors = [f for f in findings if f.level == "error"]
    for f in findings:
        print(f"{src}: {f}", file=sys.stderr if f.level != "note" else sys.stdout)
    if errors:
        n = len(errors)
        what = ("serve would not start" if any(f.stops_serve for f in errors)
                else "serve would start, but fix before serving")
        print(f"{src}: {n} error{'s' if n != 1 else ''}: {what}", file=sys.stderr)
        return 1
    print(f"{src}: ok")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cc = sub.add_parser("check-config", help="check a config file and everything serve "
                        "would trip on (certificates, ports, user, sockets, "
                        "files it reads, log target)")
    cc.add_argument("file", nargs="?", help="config file (default: the usual lookup)")
    cc.add_argument("--syntax", action="store_true",
                    help="only the file itself (keys, values), not this machine")
    cc.set_defaults(func=main)
