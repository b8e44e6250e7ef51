"""`authrelay import`: move a sendmail + saslauthd set-up over to authrelay.

Owns two one-shot converters:
- `import sendmail-mc FILE` reads a sendmail.mc (the m4 source, not sendmail.cf; its own
  define()d macros expanded where used, access_db's Connect: RELAY entries read) and prints
  the equivalent authrelay.toml on stdout. Every directive it cannot express is kept as a
  `# not mapped: <line>` comment, and sendmail behaviour authrelay has built in is named
  in a comment, so the admin reviews one file and loses nothing silently. The output always
  passes `authrelay check-config --syntax` (it is validated before it is printed).
  When the .mc offered SMTP AUTH (Cyrus SASL), the output says so at the top and sets
  [auth] backend from Cyrus's Sendmail.conf: saslauthd (the same socket), or "userdb"
  with the `import sasldb` command to run. FEATURE(`authinfo') becomes smart_host_user
  plus a password file written 0600 (from the authinfo text file). A generated .cf is
  refused (exit 1): it is not the source and cannot be mapped line by line.
- `import sasldb FILE` reads a Cyrus sasldb2 (Berkeley DB hash, keys
  "user\\0realm\\0userPassword", cleartext password as value) through `db_dump -p`
  (Debian's db-util, which sasl2-bin depends on) and adds each user to the user DB with an
  argon2id hash. Users already present are skipped with a message unless `--replace`.
  Users of the default realm (this machine's name, the config's hostname, or `--realm`)
  keep their bare name, others become `user@realm` -- the names saslauthd accepted.

Failure policy: an unreadable input or a missing db_dump exits 1 with one line on stderr;
a user that cannot be imported (bad name) is reported and the others still are. Passwords
are never printed or logged.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authrelay.config import (
    ConfigError,
    NoConfig,
    from_dict,
    hostname_problem,
    load,
    read_config_bytes,
)
from authrelay.newfile import replace_with_new

# --------------------------------------------------------------------------- m4 parsing

_BOILERPLATE = {
    # m4 and sendmail.mc scaffolding with no meaning for a relay's behaviour.
    "divert", "include", "VERSIONID", "OSTYPE", "DOMAIN", "MAILER", "MAILER_DEFINITIONS",
    "undefine", "LOCAL_CONFIG", "LOCAL_RULESETS",
}
_PORTS = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465}
_SUPPORTED_MECHS = ("PLAIN", "LOGIN")


@dataclass
class Directive:
    name: str
    args: list[str]
    line: str  # the source text, for "not mapped" comments
    lineno: int


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Join a directive spread over several lines (open parenthesis) into one."""
    buf, start, depth = "", 0, 0
    for n, raw in enumerate(text.splitlines(), 1):
        raw = _strip_dnl(raw)
        if not buf:
            start = n
        buf += ("\n" if buf else "") + raw
        depth = _paren_depth(buf)
        if depth <= 0:
            yield start, buf
            buf = ""
    if buf:
        yield start, buf


def _strip_dnl(line: str) -> str:
    """m4's `dnl` outside quotes discards the rest of the line (and its newline)."""
    quote = 0
    for m in re.finditer(r"`|'|\bdnl\b", line):
        tok = m.group(0)
        if tok == "`":
            quote += 1
        elif tok == "'":
            quote = max(0, quote - 1)
        elif not quote:
            return line[:m.start()].rstrip()
    return line


def _paren_depth(s: str) -> int:
    depth, quote = 0, 0
    for c in s:
        if c == "`":
            quote += 1
        elif c == "'" and quote:
            quote -= 1
        elif not quote:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
    return depth


def _split_args(inner: str) -> list[str]:
    """m4 arguments: commas at quote depth 0 separate; `...' quotes are removed."""
    args, cur, quote = [], [], 0
    for c in inner:
        if c == "`":
            if quote:
                cur.append(c)
            quote += 1
        elif c == "'" and quote:
            quote -= 1
            if quote:
                cur.append(c)
        elif c == "," and not quote:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    args.append("".join(cur).strip())
    return args


_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*(?:dnl\b.*)?$", re.S)


def parse_mc(text: str) -> Iterator[Directive | str]:
    """Directives in order; comment lines are skipped, unparsable lines yielded as str."""
    for lineno, line in _logical_lines(text):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _CALL.match(s)
        if not m:
            yield s
            continue
        inner = m.group(2)
        args = _split_args(inner) if inner is not None else []
        yield Directive(m.group(1), args, s, lineno)


_MACRO = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expander(directives: list[Directive]) -> tuple[Any, set[str]]:
    """The .mc's own macros, as m4 would expand them where they are used: every
    `define(`NAME', `value')` replaces NAME (a whole word) in the arguments of the other
    directives, recursively (`define(`CERT_DIR', `/etc/mail/tls')` then
    `define(`confSERVER_CERT', `CERT_DIR/sendmail.pem')`). m4 itself is not run: with
    sendmail-cf's macros it would produce the .cf, not values per directive. Returns
    (expand(text), the names used as macros by some other directive)."""
    defs = {d.args[0]: (d.args[1] if len(d.args) > 1 else "")
            for d in directives if d.name == "define" and d.args}
    used: set[str] = set()

    def expand(text: str, depth: int = 0) -> str:
        if depth > 10 or not defs:
            return text

        def sub(m: re.Match[str]) -> str:
            name = m.group(0)
            if name not in defs:
                return name
            used.add(name)
            return expand(defs[name], depth + 1)
        return _MACRO.sub(sub, text)
    return expand, used


# --------------------------------------------------------------------------- mapping

def _sendmail_duration(value: str, bare_unit: str = "m") -> float:
    """sendmail time: '1h30m', '10m', '90s', '2d'; a bare number is in `bare_unit`:
    minutes for most timeouts (settimeout(): convtime(val, 'm')), hours for queuewarn
    and days for queuereturn (convtime(val, 'h') / convtime(val, 'd'))."""
    v = value.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if re.fullmatch(r"\d+", v):
        return float(v) * units[bare_unit]
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+)([smhdw])", v):
        if m.start() != pos:
            raise ValueError(value)
        total += int(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(v) or not v:
        raise ValueError(value)
    return total


def _duration_text(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{int(seconds)}s"


def _parse_smart_host(value: str) -> tuple[str, int | None, str]:
    """'relay:[mail.example.net]:587' -> (host, port or None, mailer)."""
    v = value.strip()
    mailer = ""
    m = re.match(r"^([a-z0-9]+):(.*)$", v, re.I)
    if m and not m.group(2).isdigit():  # "mailer:host", not "host:port"
        mailer, v = m.group(1).lower(), m.group(2)
    port: int | None = None
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", v)
    if m:
        host = m.group(1)
        port = int(m.group(2)) if m.group(2) else None
    elif v.count(":") == 1:
        host, p = v.split(":")
        port = int(p)
    else:
        host = v
    if not host:
        raise ValueError(value)
    return host, port, mailer


@dataclass
class _Out:
    top: dict[str, Any] = field(default_factory=dict)
    listen: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # section -> comments
    unmapped: list[str] = field(default_factory=list)

    def set(self, section: str, key: str, value: Any, note: str) -> None:
        self.sections.setdefault(section, {})[key] = value
        self.notes.setdefault(section, []).append(note)


@dataclass
class SaslSetup:
    """How the old sendmail checked passwords (Cyrus SASL's Sendmail.conf)."""

    method: str = ""  # saslauthd | auxprop | "" (unknown)
    saslauthd_path: str = ""
    sasldb_path: str = ""
    source: str = ""


SASL_CONF_PATHS = ("/etc/sasl2/Sendmail.conf", "/usr/lib/sasl2/Sendmail.conf",
                   "/usr/lib/x86_64-linux-gnu/sasl2/Sendmail.conf",
                   "/etc/mail/sasl/Sendmail.conf")
SASLAUTHD_MUX = "/var/run/saslauthd/mux"  # Debian's (and Cyrus's default) socket


def _read_text(path: str | Path, errors: str = "replace") -> str:
    """A file the import reads (the .mc, Sendmail.conf, authinfo, access): a regular file
    of at most 16 MiB (config.read_config_bytes), so a device or FIFO named by mistake
    (/dev/zero) is refused at once instead of read until memory runs out. OSError
    otherwise (`_why` says it)."""
    return read_config_bytes(path).decode("utf-8", errors)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def read_sasl_conf(path: str | None) -> SaslSetup:
    """Cyrus SASL's Sendmail.conf (`pwcheck_method: saslauthd`, `saslauthd_path: ...`,
    `auxprop_plugin: sasldb`, `sasldb_path: ...`). Missing file: unknown method."""
    candidates = [path] if path else list(SASL_CONF_PATHS)
    for c in candidates:
        try:
            text = _read_text(c)
        except OSError:
            continue
        opts: dict[str, str] = {}
        for ln in text.splitlines():
            k, sep, v = ln.partition(":")
            if sep and not ln.lstrip().startswith("#"):
                opts[k.strip().lower()] = v.strip()
        method = opts.get("pwcheck_method", "").split()[0:1]
        m = method[0].lower() if method else ""
        if m == "saslauthd" or opts.get("saslauthd_path"):
            sock = opts.get("saslauthd_path", "") or SASLAUTHD_MUX
            if Path(sock).is_dir():
                sock = str(Path(sock) / "mux")
            return SaslSetup("saslauthd", sock, "", c)
        if m in ("auxprop", "sasldb") or opts.get("auxprop_plugin") == "sasldb":
            return SaslSetup("auxprop", "", opts.get("sasldb_path", "/etc/sasldb2"), c)
        return SaslSetup("", "", "", c)
    return SaslSetup()


@dataclass
class AuthInfo:
    host: str
    user: str
    password: str


def read_authinfo(path: Path) -> list[AuthInfo]:
    """sendmail's authinfo text file (the source of authinfo.db): lines like
    `AuthInfo:host "U:user" "I:authid" "P:password" "M:PLAIN"` (P=base64 also)."""
    import base64

    out = []
    for ln in _read_text(path, "surrogateescape").splitlines():
        ln = ln.strip()
        if not ln.startswith("AuthInfo:"):
            continue
        head, _, rest = ln.partition(" ")
        host = head[len("AuthInfo:"):].strip().strip("[]")
        fields = {f"{k}{s}": v for k, s, v in re.findall(r'"([A-Za-z])([:=])([^"]*)"', rest)}
        user = fields.get("I:") or fields.get("U:") or ""
        pw = fields.get("P:")
        if pw is None and "P=" in fields:
            try:
                pw = base64.b64decode(fields["P="]).decode("utf-8", "surrogateescape")
            except ValueError:
                pw = None
        if user and pw is not None:
            out.append(AuthInfo(host, user, pw))
    return out


def write_password_file(path: Path, password: str) -> None:
    """The smart host's password, alone on one line, mode 0600 from creation on, in a
    file this process created: the temporary name is random and opened O_EXCL (mkstemp),
    so in a directory others may write to (a `--password-file /tmp/...` run as root) a
    link or file planted under a guessable name is never written through nor handed the
    password; the rename replaces `path` itself, never what a link there points to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_with_new(path, password.encode("utf-8", "surrogateescape") + b"\n", 0o600)


def looks_like_cf(text: str) -> bool:
    """A generated sendmail.cf (not the .mc source): its rule and option lines."""
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    if not lines:
        return False
    if re.search(r"^V\d+/\w+", text, re.M):  # "V10/Berkeley": the version line of a .cf
        return True
    cf = sum(1 for ln in lines if re.match(r"^(O [A-Z]\w+=|S\d|R\$|C\w|F\w|M\w+,|K\w+ |H\?)",
                                           ln))
    return cf >= 5 and cf * 2 >= len(lines)


def convert_mc(text: str, source: str = "sendmail.mc", *, sasl: SaslSetup | None = None,
               authinfo: Path | None = None, password_file: Path | None = None,
               access_file: Path | None = None) -> str:
    """sendmail.mc text -> authrelay.toml text (validated by config.from_dict).
    `sasl`: the Cyrus SASL setup (Sendmail.conf) for the [auth] backend when the .mc used
    SMTP AUTH. `authinfo`: sendmail's authinfo text file; its entry for the smart host
    becomes smart_host_user and `password_file` (written 0600). `access_file`: the text
    source of FEATURE(`access_db') (default: its map path without .db): its `Connect:`
    (or untagged) address entries with RELAY become relay.trusted_networks."""
    out = _Out()
    mechs: list[str] | None = None
    trust: list[str] | None = None
    smart: tuple[str, int | None, str] | None = None
    smart_line = ""
    relay_port: int | None = None
    mech_lines: list[str] = []
    authinfo_line: str | None = None
    authinfo_arg = ""
    parsed = list(parse_mc(text))
    expand, macros = _expander([d for d in parsed if isinstance(d, Directive)])
    for d in parsed:
        if isinstance(d, Directive) and d.name != "define":
            d.args = [expand(a) for a in d.args]
        elif isinstance(d, Directive) and len(d.args) > 1:
            d.args = [d.args[0], expand(d.args[1]), *d.args[2:]]
    access: tuple[str, str] | None = None
    for d in parsed:
        if isinstance(d, str):
            out.unmapped.append(d)
            continue
        name, args = d.name, d.args
        try:
            if name == "include" and args and not args[0].strip().endswith("/m4/cf.m4"):
                # Not sendmail's own cf.m4: an admin's file (Debian's sendmail.mc includes
                # /etc/mail/m4/provider.m4, where a SMART_HOST may live). m4 is not run, so
                # its directives are not read: said, never dropped without a word.
                out.unmapped.append(f"{d.line} (its directives were not read: append them "
                                    "to the .mc and convert again)")
                continue
            if name in _BOILERPLATE:
                continue
            if name == "define" and args:
                key, value = args[0], (args[1] if len(args) > 1 else "")
                if not _define(out, key, value, d):
                    if key == "SMART_HOST":
                        if smart_line:  # m4: the last define wins; the earlier one said
                            out.notes.setdefault("relay", []).append(
                                f"{smart_line}: overridden by a later define (as in m4)")
                        smart, smart_line = _parse_smart_host(value), d.line
                    elif key == "confAUTH_MECHANISMS":
                        mechs = value.upper().split()
                        mech_lines.append(d.line)
                    elif key in ("RELAY_MAILER_ARGS", "ESMTP_MAILER_ARGS", "SMTP_MAILER_ARGS"):
                        m = re.fullmatch(r"TCP\s+\$h\s+(\d+)", value.strip())
                        if not m:
                            out.unmapped.append(d.line)
                        else:
                            relay_port = int(m.group(1))
                            out.notes.setdefault("relay", []).append(d.line)
                    elif key in macros:
                        out.notes.setdefault("", []).append(
                            f"{d.line}: a macro of the .mc, expanded where it is used")
                    else:
                        out.unmapped.append(d.line)
            elif name == "DAEMON_OPTIONS" and args:
                _daemon(out, ",".join(args), d)
            elif name == "TRUST_AUTH_MECH" and args:
                trust = args[0].upper().split()
                mech_lines.append(d.line)
            elif name == "FEATURE" and args:
                feat = args[0]
                if feat == "delay_checks":
                    out.notes.setdefault("checks", []).append(
                        f"{d.line}: built in -- host checks (rDNS, DNSBL) apply only to "
                        "clients that did not authenticate, and only at RCPT")
                elif feat in ("dnsbl", "enhdnsbl"):
                    # FEATURE(`dnsbl', `zone', `message'): sendmail's default zone.
                    zone = args[1].strip() if len(args) > 1 and args[1].strip() else \
                        "blackholes.mail-abuse.org"
                    zones = out.sections.setdefault("checks", {}).setdefault("dnsbl", [])
                    if zone not in zones:
                        zones.append(zone)
                    out.notes.setdefault("checks", []).append(
                        f"{d.line}: dnsbl (checked only for clients that did not "
                        "authenticate)")
                    if len(args) > 2 and args[2].strip():
                        out.unmapped.append(f"{d.line} (the custom reject message)")
                elif feat == "authinfo":
                    authinfo_line, authinfo_arg = d.line, (args[1] if len(args) > 1 else "")
                elif feat == "access_db":
                    access = (d.line, args[1] if len(args) > 1 else "")
                elif feat == "no_default_msa":
                    out.notes.setdefault("", []).append(
                        f"{d.line}: nothing to do -- listeners are listed explicitly")
                else:
                    out.unmapped.append(d.line)
            else:
                out.unmapped.append(d.line)
        except (ValueError, IndexError):
            out.unmapped.append(d.line)

    # Mechanisms: offered = configured AND trusted for relaying AND supported here.
    if mechs is not None or trust is not None:
        offered = mechs if mechs is not None else list(_SUPPORTED_MECHS)
        if trust is not None:
            offered = [m for m in offered if m in trust]
        keep = [m for m in offered if m in _SUPPORTED_MECHS]
        dropped = sorted({*(mechs or []), *(trust or [])} - set(_SUPPORTED_MECHS))
        if not keep:
            keep = list(_SUPPORTED_MECHS)
        note = "\n".join(mech_lines) + (
            "\nmechanisms offered and trusted for relaying that authrelay supports")
        if dropped:
            note += f" (dropped, unsupported: {' '.join(dropped)})"
        out.set("auth", "mechanisms", keep, note)
    if smart is not None:
        host, port, mailer = smart
        if port is None:
            port = relay_port or 25
        hp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.set("relay", "smart_host", [hp], f"{smart_line}")
        tls = "tls" if port == 465 else "starttls"
        out.set("relay", "smart_host_tls", tls,
                "sendmail uses STARTTLS when offered; authrelay requires it "
                "(smart_host_tls = \"none\" to turn off)" if tls == "starttls" else
                "port 465: implicit TLS (RFC 8314)")
        if mailer and mailer not in ("relay", "smtp", "esmtp", "smtp8", "dsmtp"):
            out.unmapped.append(f"{smart_line} (mailer {mailer!r})")

    if access is not None:
        _access_db(out, access[0], access[1], access_file)
    if mech_lines:
        _sasl_backend(out, sasl or SaslSetup())
    if authinfo_line is not None:
        _authinfo(out, authinfo_line, authinfo_arg, smart, authinfo, password_file)

    toml = _render(out, source)
    # Prove the output is a valid config before printing it (check-config passes).
    import tomllib

    from_dict(tomllib.loads(toml), source="<import>")
    return toml


def _sasl_backend(out: _Out, sasl: SaslSetup) -> None:
    """The .mc offered SMTP AUTH: sendmail checked passwords through Cyrus SASL. Keep the
    same users working from the first start: saslauthd as backend, or the sasldb
    imported into the user DB. Said loudly, at the top and in [auth]."""
    where = f" ({sasl.source})" if sasl.source else ""
    if sasl.method == "auxprop":
        out.set("auth", "backend", "userdb",
                f"Cyrus SASL checked passwords against a sasldb{where}: import its users "
                f"into authrelay's user DB (argon2id), or every login fails with 535:\n"
                f"    authrelay import sasldb {sasl.sasldb_path}")
        top = (f"IMPORTANT: sendmail authenticated users through Cyrus SASL (sasldb "
               f"{sasl.sasldb_path}). Run `authrelay import sasldb {sasl.sasldb_path}` "
               "before starting authrelay, or nobody can log in.")
    else:
        sock = sasl.saslauthd_path or SASLAUTHD_MUX
        known = "" if sasl.method == "saslauthd" else (
            " (no Sendmail.conf found: saslauthd assumed, as in the usual howto)")
        out.set("auth", "backend", f"saslauthd:{sock}",
                f"Cyrus SASL checked passwords through saslauthd{where}{known}: authrelay "
                "asks the same saslauthd, so every user keeps logging in. To move the "
                "users into authrelay instead: `authrelay import sasldb /etc/sasldb2` and "
                'backend = "userdb".')
        top = ("IMPORTANT: sendmail authenticated users through Cyrus SASL; authrelay "
               f"asks the same saslauthd ({sock}): keep saslauthd running, or import the "
               'users (authrelay import sasldb FILE) and set [auth] backend = "userdb".')
    out.notes.setdefault("", []).insert(0, top)


def _authinfo(out: _Out, line: str, arg: str, smart: tuple[str, int | None, str] | None,
              authinfo: Path | None, password_file: Path | None) -> None:
    """FEATURE(`authinfo'): the smart host's credentials -> smart_host_user and a 0600
    password file. Unreadable or no entry for the smart host: not mapped, with why."""
    if authinfo is None:
        # `hash -o /etc/mail/authinfo.db` -> the text source /etc/mail/authinfo.
        m = re.search(r"(/\S+)", arg)
        src = m.group(1) if m else "/etc/mail/authinfo"
        authinfo = Path(src[:-3] if src.endswith(".db") else src)
    if smart is None:
        out.unmapped.append(f"{line} (no SMART_HOST: authinfo is used only for one)")
        return
    try:
        entries = read_authinfo(authinfo)
    except OSError as e:
        out.unmapped.append(f"{line} ({authinfo}: {_why(e)}; give --authinfo FILE)")
        return
    host = smart[0]
    entry = next((e for e in entries if e.host.lower() == host.lower()), None)
    if entry is None:
        out.unmapped.append(f"{line} ({authinfo}: no AuthInfo:{host} entry)")
        return
    pf = password_file or Path("/etc/authrelay/smart_host_password")
    try:
        write_password_file(pf, entry.password)
    except OSError as e:
        out.unmapped.append(f"{line} (cannot write {pf}: {e.strerror}; give "
                            "--password-file FILE)")
        return
    out.set("relay", "smart_host_user", entry.user, f"{line}: AuthInfo:{host} in {authinfo}")
    out.set("relay", "smart_host_password_file", str(pf),
            f"the password from {authinfo}, written to {pf} (mode 0600)")


def _define(out: _Out, key: str, value: str, d: Directive) -> bool:
    """One `define(`key', `value')`; False when not handled here."""
    line = d.line
    if key == "confMAX_MESSAGE_SIZE":
        out.set("limits", "max_message_size", int(value), line)
    elif key == "confTO_DATABLOCK":
        out.set("limits", "data_block_timeout", _duration_text(_sendmail_duration(value)), line)
    elif key == "confTO_DATAFINAL":
        out.set("limits", "data_final_timeout", _duration_text(_sendmail_duration(value)), line)
    elif key == "confTO_COMMAND":
        out.set("limits", "command_timeout", _duration_text(_sendmail_duration(value)), line)
    elif key in ("confTO_QUEUEWARN", "confTO_QUEUEWARN_NORMAL"):
        secs = _sendmail_duration(value, "h")
        out.set("delivery", "delay_warning", _duration_text(secs) if secs else 0,
                line + " (a delay DSN after this long in the queue; 0: none)")
    elif key in ("confTO_QUEUERETURN", "confTO_QUEUERETURN_NORMAL"):
        out.set("delivery", "max_queue_lifetime",
                _duration_text(_sendmail_duration(value, "d")),
                line + " (bounced after this long in the queue)")
    elif key == "confMAX_DAEMON_CHILDREN":
        out.set("limits", "max_connections", int(value), line)
    elif key == "confCONNECTION_RATE_THROTTLE":
        out.set("limits", "connection_rate", int(value), line + " (per second, all clients)")
    elif key == "confBAD_RCPT_THROTTLE":
        out.set("limits", "bad_rcpt_throttle", int(value), line)
    elif key == "confMAX_RCPTS_PER_MESSAGE":
        out.set("limits", "max_recipients", int(value), line)
    elif key == "confSERVER_CERT":
        out.set("tls", "cert", value, line)
    elif key == "confSERVER_KEY":
        out.set("tls", "key", value, line)
    elif key == "ALIAS_FILE":
        files = [f.strip() for f in value.split(",") if f.strip()]
        if files:
            out.top["aliases_file"] = files[0]
            out.notes.setdefault("", []).append(line)
            if len(files) > 1:
                out.unmapped.append(f"{line} (only the first file is read: "
                                    f"{', '.join(files[1:])})")
    elif key == "confMIN_FREE_BLOCKS":
        # sendmail counts blocks of the queue's file system: 4 KiB on ext4/xfs.
        out.set("limits", "queue_min_free", int(value) * 4096,
                line + " (blocks of 4 KiB, the block size of ext4 and xfs)")
    elif key == "confDOMAIN_NAME":
        if hostname_problem(value):  # not a host name (a space...): listed as not mapped
            raise ValueError(value)
        out.top["hostname"] = value
        out.notes.setdefault("", []).append(line)
    elif key == "confAUTH_OPTIONS":
        flags = value.replace(",", " ").split()
        builtin = {
            "A": "AUTH= on MAIL FROM only after AUTH",
            "p": "no plaintext AUTH without TLS (authrelay offers AUTH only under TLS)",
            "y": "no anonymous mechanisms (authrelay has none)",
        }
        known = [f for f in flags if f in builtin]
        out.notes.setdefault("auth", []).append(line)
        for f in known:
            out.notes.setdefault("auth", []).append(f"confAUTH_OPTIONS {f}: built in -- "
                                                    f"{builtin[f]}")
        rest = [f for f in flags if f not in builtin]
        if rest:
            out.unmapped.append(f"{line} (flags {' '.join(rest)})")
    else:
        return False
    return True


def access_relay_networks(text: str) -> tuple[list[str], list[str]]:
    """(CIDRs, lines not mapped) of an access file: `Connect:ADDR RELAY` and untagged
    `ADDR RELAY` entries, ADDR an address or a sendmail prefix (`10.1.2` = 10.1.2.0/24,
    `IPv6:2001:db8` = 2001:db8::/32). Host names, From:/To: entries and other actions
    are not mapped (authrelay trusts addresses only; authenticated users relay anyway)."""
    import ipaddress

    nets: list[str] = []
    skipped: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            skipped.append(raw.strip())
            continue
        key, action = parts[0], parts[1].strip().split()[0].upper()
        if ":" in key and key.split(":", 1)[0].lower() in ("connect", "from", "to", "spam",
                                                           "srv_features", "clt_features"):
            tag, key = key.split(":", 1)
            if tag.lower() != "connect":
                skipped.append(raw.strip())
                continue
        if action != "RELAY":
            skipped.append(raw.strip())
            continue
        net = None
        if key.lower().startswith("ipv6:"):
            v6 = key[5:]
            try:
                net = str(ipaddress.ip_network(v6, strict=False)) if "/" in v6 else \
                    str(ipaddress.ip_network(v6))
            except ValueError:
                groups = [g for g in v6.split(":") if g]
                try:
                    net = str(ipaddress.ip_network(
                        ":".join(groups) + "::/" + str(16 * len(groups)), strict=False))
                except ValueError:
                    net = None
        elif re.fullmatch(r"\d{1,3}(\.\d{1,3}){0,3}", key):
            octets = key.split(".")
            try:
                net = str(ipaddress.ip_network(
                    ".".join(octets + ["0"] * (4 - len(octets))) + f"/{8 * len(octets)}"))
            except ValueError:
                net = None
        if net is None:
            skipped.append(raw.strip())  # a host or domain name: not trusted by name
        elif net not in nets:
            nets.append(net)
    return nets, skipped


def _access_db(out: _Out, line: str, spec: str, access_file: Path | None) -> None:
    """FEATURE(`access_db'): the RELAY entries for addresses become trusted_networks."""
    if access_file is None:
        words = spec.split()
        db = next((w for w in reversed(words) if w.startswith("/")), "/etc/mail/access.db")
        access_file = Path(db[:-3] if db.endswith(".db") else db)
    try:
        text = _read_text(access_file)
    except OSError as e:
        out.unmapped.append(f"{line} ({access_file}: {_why(e)}; give --access FILE)")
        return
    nets, skipped = access_relay_networks(text)
    if nets:
        out.set("relay", "trusted_networks", nets,
                f"{line}: the Connect: RELAY entries of {access_file} (these addresses "
                "relay without AUTH)")
    else:
        out.notes.setdefault("relay", []).append(f"{line}: no address RELAY entries in "
                                                 f"{access_file}")
    for sk in skipped:
        out.unmapped.append(f"{access_file}: {sk}")


def _daemon(out: _Out, spec: str, d: Directive) -> None:
    opts: dict[str, str] = {}
    for part in spec.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            opts[k.strip()] = v.strip()
    port_s = opts.get("Port", "smtp")
    port = _PORTS.get(port_s.lower()) if not port_s.isdigit() else int(port_s)
    if port is None:
        raise ValueError(port_s)
    family = opts.get("Family", "inet")
    if family not in ("inet", "inet6"):
        raise ValueError(family)  # e.g. local: no unix-socket listeners here
    addr = opts.get("Addr") or ("::" if family == "inet6" else "0.0.0.0")
    flags = opts.get("M", "")
    if port == 465 or "s" in flags:
        mode = "submissions"
    elif "a" in flags or port == 587:
        # M=a: AUTH required -- exactly what a submission listener enforces (RFC 6409).
        mode = "submission"
    else:
        mode = "smtp"
    address = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    notes = [d.line]
    handled = set("Eas")  # E: no ETRN (authrelay has none); a, s above
    other = [f for f in flags if f not in handled]
    if other:
        out.unmapped.append(f"{d.line} (M= flags {''.join(other)})")
    ignored = set(opts) - {"Port", "Addr", "Family", "M", "Name"}
    if ignored:
        out.unmapped.append(f"{d.line} (options {', '.join(sorted(ignored))})")
    out.listen.append({"address": address, "mode": mode, "_notes": notes})


_HINTS = {
    "authinfo": "relay.smart_host_user and relay.smart_host_password_file",
    "confCACERT": "relay.smart_host_ca_file (private CA of the smart host)",
    "LOCAL_DOMAIN": "relay.local_domains (accepted from anyone)",
    "confLOG_LEVEL": "[log] level",
}


def _hint(line: str) -> str:
    for k, v in _HINTS.items():
        if k in line:
            return f"  -- {v}"
    return ""


def _shown(text: str) -> str:
    """Text from an input file (a sasldb name, a .mc line) as printed or written into a
    TOML comment: every non-printable character but the tab (ESC, CR, LF, DEL, U+202E...)
    written as its code, so a crafted entry cannot drive the admin's terminal, forge an
    output line, or make the converted file invalid TOML (comments allow no controls)."""
    def code(c: str) -> str:
        o = ord(c)
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return "".join(c if c.isprintable() or c == "\t" else code(c) for c in text)


def toml_value(v: Any) -> str:
    """A TOML literal for a config value (also used by the tests to write configs)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):  # a TOML basic string: controls as \uXXXX (TOML 1.0)
        v = v.replace("\\", "\\\\").replace('"', '\\"')
        v = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", v)
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: [limits] containment = {messages = 3}
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)  # pragma: no cover


def _comment(text: str) -> str:
    return "\n".join("# " + _shown(ln) for ln in text.splitlines())


def _render(out: _Out, source: str) -> str:
    lines = [f"# authrelay.toml converted from {_shown(source)} by `authrelay import "
             "sendmail-mc`.",
             "# Review it, then: authrelay check-config FILE", ""]
    lines += [_comment(n) for n in out.notes.get("", [])]
    if "hostname" in out.top:
        lines.append(f"hostname = {toml_value(out.top['hostname'])}")
    if "aliases_file" in out.top:
        lines.append(f"aliases_file = {toml_value(out.top['aliases_file'])}")
    lines += ['state_dir = "/var/lib/authrelay"',
              'user = "authrelay"  # serve binds its ports as root, then runs as this user']
    if not out.listen:
        # sendmail's default with no DAEMON_OPTIONS: port 25 on every address.
        out.listen.append({"address": "0.0.0.0:25", "mode": "smtp",
                           "_notes": ["no DAEMON_OPTIONS: sendmail's default listener"]})
    for ln in out.listen:
        lines.append("")
        lines += [_comment(n) for n in ln["_notes"]]
        lines.append("[[listen]]")
        lines.append(f"address = {toml_value(ln['address'])}")
        lines.append(f"mode = {toml_value(ln['mode'])}")
    for section in ("tls", "auth", "relay", "delivery", "limits", "checks"):
        vals = out.sections.get(section, {})
        notes = out.notes.get(section, [])
        if not vals and not notes:
            continue
        lines.append("")
        lines += [_comment(n) for n in notes]
        if vals:  # notes alone stay comments: no empty [section] table
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in vals.items()]
    if out.unmapped:
        lines.append("")
        lines.append("# Directives with no authrelay equivalent (review by hand):")
        for u in out.unmapped:
            lines.append("# not mapped: " + _shown(" ".join(u.split()) + _hint(u)))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- sasldb

class ImportError_(Exception):  # noqa: N801 - not the builtin ImportError
    pass


def _unescape_dump(line: str) -> bytes:
    """One `db_dump -p` data line (leading space, \\xx hex escapes, \\\\) -> bytes."""
    s = line[1:] if line.startswith(" ") else line
    out = bytearray()
    i = 0
    raw = s.encode("latin-1", "replace")
    while i < len(raw):
        c = raw[i]
        if c == 0x5C:  # backslash
            if raw[i + 1:i + 2] == b"\\":
                out.append(0x5C)
                i += 2
                continue
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
            continue
        out.append(c)
        i += 1
    return bytes(out)


@dataclass
class SaslEntry:
    """One user of a sasldb2: names as stored (bytes), and its properties."""

    user: bytes
    realm: bytes
    props: dict[str, bytes] = field(default_factory=dict)


def read_sasldb(path: Path, others: list[str] | None = None) -> list[SaslEntry]:
    """Every (user, realm) of a sasldb2 file with its properties (userPassword, ...), in
    file order. Values are the raw bytes stored: a legacy Latin-1 password stays exactly
    what it was. Raises ImportError_ (file missing, not a Berkeley DB, no db_dump).
    `others` gets the key (as db_dump prints it) of each record that is no
    `user\\0realm\\0property`: never dropped without a word by the caller."""
    tool = shutil.which("db_dump") or shutil.which("db5.3_dump")
    if tool is None:
        raise ImportError_("db_dump not found (apt install db-util)")
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    try:
        proc = subprocess.run([tool, "-p", str(path)], capture_output=True, timeout=60,
                              env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError) as e:
        raise ImportError_(f"{path}: cannot run {tool}: {e}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ImportError_(f"{path}: cannot read: {err[-1] if err else 'db_dump failed'}")
    lines = proc.stdout.decode("latin-1").splitlines()
    try:
        start = lines.index("HEADER=END") + 1
    except ValueError:
        raise ImportError_(f"{path}: not a Berkeley DB dump") from None
    data = [ln for ln in lines[start:] if ln.startswith(" ")]
    users: dict[tuple[bytes, bytes], SaslEntry] = {}
    for k, v in zip(data[0::2], data[1::2], strict=False):
        try:
            key = _unescape_dump(k).split(b"\0")
            value = _unescape_dump(v)
        except (ValueError, IndexError):
            key = []  # a damaged record: nothing we could import from it
        if len(key) != 3:
            if others is not None:
                others.append(k.strip())
            continue
        entry = users.setdefault((key[0], key[1]), SaslEntry(key[0], key[1]))
        entry.props[key[2].decode("latin-1")] = value
    return list(users.values())


def _import_sasldb(args: argparse.Namespace) -> int:
    """Add each sasldb user; one line per user (added, replaced, skipped: why, failed:
    why), then the totals. Never a traceback: a user that cannot be imported is reported
    and the next one is tried. Two sasldb users that get one name (alice of two default
    realms: two Cyrus users, maybe two passwords) are never merged: the first is
    imported, the other skipped with the reason (never `replaced` by the same run)."""
    from authrelay.auth.pgusers import PgUserDB, redact_dsn
    from authrelay.auth.userdb import UserDB, UserDBError, UserExists, check_new_name

    try:
        cfg = load(args.config, embedded=False)
        others: list[str] = []
        entries = read_sasldb(Path(args.file), others)
    except NoConfig as e:
        print(f"authrelay: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: no users.db that no server reads
    except (ConfigError, ImportError_) as e:
        print(f"authrelay: {e}", file=sys.stderr)
        return 1
    # Realms are domain names: compared without case (a sasldb of realm RELAY.TEST is
    # this host's when it is relay.test; logins map realms without case too, realms.py).
    default_realms = {r.lower() for r in (set(args.realm or []) or {
        socket.gethostname(), socket.getfqdn(), cfg.hostname})}
    # Into the store the servers read: with backend = "postgresql" the shared database
    # (users written to a users.db there were read by no server: every login failed).
    db: UserDB | PgUserDB
    try:
        if cfg.auth.backend == "postgresql":
            db = PgUserDB(cfg.auth.dsn, timeout=max(cfg.auth.backend_timeout, 10.0))
        else:
            db = UserDB(cfg.userdb_path)
    except (UserDBError, OSError, sqlite3.Error) as e:
        where = redact_dsn(cfg.auth.dsn) if cfg.auth.backend == "postgresql" \
            else cfg.userdb_path
        print(f"authrelay: {where}: {e}", file=sys.stderr)
        return 1
    added = skipped = failed = 0
    for key in others:
        print(f"skipped record {_shown(key)}: not a user\\0realm\\0property key (no Cyrus "
              "user to import from it)")
        skipped += 1
    bare_realms: set[str] = set()
    seen: dict[str, str] = {}  # name -> the sasldb entry (user@realm) stored under it
    try:
        for entry in entries:
            shown = _shown((entry.user + (b"@" + entry.realm if entry.realm else b"")
                            ).decode("utf-8", "backslashreplace"))
            try:
                user, realm = entry.user.decode("utf-8"), entry.realm.decode("utf-8")
            except UnicodeDecodeError:
                print(f"skipped {shown}: user name or realm is not UTF-8")
                skipped += 1
                continue
            name = user if (realm.lower() in default_realms or not realm) \
                else f"{user}@{realm}"
            if name in seen:
                print(f"skipped {shown}: it would be user {_shown(name)}, already taken by "
                      f"{seen[name]} in this sasldb (two Cyrus users; add this one by hand "
                      "under another name)")
                skipped += 1
                continue
            if realm and name == user:
                bare_realms.add(realm)
            name_shown = _shown(name)
            password = entry.props.get("userPassword")
            if password is None:
                props = _shown(", ".join(sorted(entry.props))) or "nothing"
                print(f"skipped {name_shown}: no userPassword (has {props})")
                skipped += 1
                continue
            if not password:
                print(f"skipped {name_shown}: empty password")
                skipped += 1
                continue
            try:
                check_new_name(name)
            except UserDBError as e:
                print(f"skipped {name_shown}: {e}")
                skipped += 1
                continue
            try:
                try:
                    db.add(name, password)  # hashed as the raw bytes (passwords.raw)
                    seen[name] = shown
                    print(f"added {name_shown}")
                    added += 1
                except UserExists:
                    if not args.replace:
                        print(f"skipped {name_shown}: already exists (--replace to overwrite)")
                        skipped += 1
                        continue
                    db.set_password(name, password)
                    seen[name] = shown
                    print(f"replaced {name_shown}")
                    added += 1
            except (UserDBError, sqlite3.Error, OSError, ValueError) as e:
                print(f"failed {name_shown}: {e}")
                failed += 1
    finally:
        db.close()
    missing = sorted(r for r in bare_realms if r.lower() not in
                     {x.lower() for x in cfg.auth.realms})
    if missing:
        # Cyrus took alice@REALM as alice for its default realm: so can we.
        listed = ", ".join(f'"{r}"' for r in sorted({*cfg.auth.realms, *missing}))
        print(f"users of {', '.join(missing)} were stored by their bare name; so that "
              f"logins as user@{missing[0]} keep working, set in [auth]: realms = [{listed}]")
    if cfg.auth.backend.startswith(("saslauthd:", "dovecot:")):
        print(f"note: [auth] backend is {cfg.auth.backend}: the users imported into "
              f"{cfg.userdb_path} are used once you set backend = \"userdb\"")
    print(f"{added} imported, {skipped} skipped, {failed} failed")
    return 1 if failed else 0


def _import_mc(args: argparse.Namespace) -> int:
    try:
        text = _read_text(args.file)
    except OSError as e:
        print(f"authrelay: {args.file}: {_why(e)}", file=sys.stderr)
        return 1
    if args.file.endswith(".cf") or looks_like_cf(text):
        print(f"authrelay: {args.file} is a generated sendmail.cf, not the m4 source: give "
              "the .mc it was made from (usually /etc/mail/sendmail.mc)", file=sys.stderr)
        return 1
    try:
        sys.stdout.write(convert_mc(
            text, source=args.file, sasl=read_sasl_conf(args.sasl_conf),
            authinfo=Path(args.authinfo) if args.authinfo else None,
            password_file=Path(args.password_file).absolute() if args.password_file else None,
            access_file=Path(args.access) if args.access else None))
    except ConfigError as e:  # pragma: no cover - a converter bug, not user error
        print(f"authrelay: converted config is invalid: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("import", help="import a sendmail.mc or a Cyrus sasldb2")
    s = p.add_subparsers(dest="import_command", metavar="WHAT", required=True)
    m = s.add_parser("sendmail-mc", help="print the authrelay.toml equivalent of a sendmail.mc")
    m.add_argument("file")
    m.add_argument("--sasl-conf", metavar="FILE",
                   help="Cyrus SASL's Sendmail.conf (default: /etc/sasl2/Sendmail.conf, "
                   "/usr/lib/sasl2/Sendmail.conf)")
    m.add_argument("--authinfo", metavar="FILE",
                   help="sendmail's authinfo text file (default: from FEATURE(authinfo))")
    m.add_argument("--password-file", metavar="FILE",
                   help="where the smart host password is written, mode 0600 (default: "
                   "/etc/authrelay/smart_host_password)")
    m.add_argument("--access", metavar="FILE",
                   help="the access file's text source (default: from FEATURE(access_db), "
                   "e.g. /etc/mail/access)")
    m.set_defaults(func=_import_mc)
    d = s.add_parser("sasldb", help="add the users of a Cyrus sasldb2 to the user DB")
    d.add_argument("file")
    d.add_argument("--replace", action="store_true", help="overwrite existing users' passwords")
    d.add_argument("--realm", action="append",
                   help="realm whose users keep their bare name (default: this host's names)")
    d.set_defaults(func=_import_sasldb)
