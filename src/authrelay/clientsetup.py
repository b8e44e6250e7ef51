"""Client set-up: the settings a person types into a mail program, and the files that
configure one without typing (`authrelay user setup NAME`).

Owns: what a client is told about this relay (server name, ports and TLS of the
submission listeners, user name, "normal password"), the Thunderbird autoconfig file
(Mozilla ISPDB `config-v1.1.xml`, clientConfig version 1.1) and the Apple configuration
profile (`.mobileconfig`, one `com.apple.mail.managed` payload, unsigned).

Contract: `settings(cfg, user, email, incoming)` -> `Settings`; `text(s)` the lines a
person reads; `autoconfig_xml(s)` / `mobileconfig(s, password=None)` the file contents
(bytes). XML is built with ElementTree and the profile with plistlib, so no value can
break the markup.
- Ports: the `submissions` listener (implicit TLS, RFC 8314 3.3: preferred) and the
  `submission` listener (STARTTLS, RFC 6409); both are offered where both exist.
- Both Thunderbird (its readFromXML refuses a file without a usable <incomingServer>)
  and Apple's Mail payload (IncomingMailServerHostName is required) need an incoming
  server, which authrelay is not: the files are made only with `incoming` (the
  organisation's IMAP or POP server, e.g. outlook.office365.com); the printed settings
  need nothing more.
- User name in the autoconfig file: Thunderbird's placeholder `%EMAILADDRESS%` or
  `%EMAILLOCALPART%` when the relay user name is the address or its local part (one file
  then serves everyone at autoconfig.DOMAIN), else the literal name (a per-user file).
- The profile holds no password unless asked (`password`); each payload gets a fresh
  UUID. It is not signed: devices show it as "Unsigned".
Failure policy: `SetupError` with a one-line reason (nothing written).
"""

from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlsplit

from authrelay.config import Config

_INCOMING_SCHEMES = {  # scheme -> (type, default port, socketType / UseSSL)
    "imaps": ("imap", 993, "SSL"),
    "imap": ("imap", 143, "STARTTLS"),
    "pop3s": ("pop3", 995, "SSL"),
    "pop3": ("pop3", 110, "STARTTLS"),
}


class SetupError(ValueError):
    """Why the set-up cannot be made (one line)."""


@dataclass(frozen=True)
class Outgoing:
    port: int
    socket_type: str  # "SSL" (implicit TLS) | "STARTTLS": Thunderbird's names


@dataclass(frozen=True)
class Incoming:
    kind: str  # imap | pop3
    host: str
    port: int
    socket_type: str  # SSL | STARTTLS


@dataclass(frozen=True)
class Settings:
    host: str
    user: str
    email: str
    outgoing: tuple[Outgoing, ...]  # preferred first
    incoming: Incoming | None
    # [auth] app_passwords = "require" over the user DB or PostgreSQL: the account
    # password is refused (535) for SMTP AUTH, only an app password works
    app_passwords_only: bool = False

    @property
    def domain(self) -> str:
        return self.email.rpartition("@")[2].lower()


def parse_incoming(url: str) -> Incoming:
    """`imaps://host[:port]`, `imap://` (STARTTLS), `pop3s://`, `pop3://`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _INCOMING_SCHEMES or not parts.hostname or parts.path not in ("", "/"):
        raise SetupError(f"--incoming {url!r}: expected imaps://HOST[:PORT] (or imap://, "
                         "pop3s://, pop3://)")
    kind, port, sock = _INCOMING_SCHEMES[scheme]
    try:
        port = parts.port or port
    except ValueError:
        raise SetupError(f"--incoming {url!r}: bad port") from None
    return Incoming(kind, parts.hostname, port, sock)


def settings(cfg: Config, user: str, email: str, incoming: Incoming | None = None
             ) -> Settings:
    out: list[Outgoing] = []
    for mode, sock in (("submissions", "SSL"), ("submission", "STARTTLS")):
        for ln in cfg.listen:
            if ln.mode == mode and all(o.port != ln.port for o in out):
                out.append(Outgoing(ln.port, sock))
    if not out:
        raise SetupError("no submission or submissions listener in the config: clients "
                         "submit on 465 (implicit TLS) or 587 (STARTTLS)")
    if "@" not in email or email.startswith("@") or email.endswith("@"):
        raise SetupError(f"{email!r} is not an email address (use --email)")
    only = cfg.auth.app_passwords == "require" and cfg.auth.backend in ("userdb",
                                                                        "postgresql")
    return Settings(cfg.hostname.rstrip("."), user, email, tuple(out), incoming, only)


def _security(o: Outgoing) -> str:
    return "SSL/TLS (implicit TLS)" if o.socket_type == "SSL" else "STARTTLS"


def text(s: Settings) -> str:
    """What a person types in (any mail program)."""
    first, *others = s.outgoing
    lines = [
        f"Outgoing mail server (SMTP) for {s.email}:",
        f"  Server:          {s.host}",
        f"  Port:            {first.port}, connection security {_security(first)}",
    ]
    lines += [f"              or  {o.port}, connection security {_security(o)}"
              for o in others]
    lines += [
        f"  User name:       {s.user}",
        "  Authentication:  normal password (sent only inside TLS)",
        "  Password:        the account password, or an app password for this device"
        if not s.app_passwords_only else
        "  Password:        an app password for this device (authrelay user app-password "
        f"add {s.user} --name DEVICE); the account password is refused here",
    ]
    if s.incoming is not None:
        i = s.incoming
        lines += [f"Incoming mail server ({i.kind.upper()}): {i.host}, port {i.port}, "
                  f"{'SSL/TLS' if i.socket_type == 'SSL' else 'STARTTLS'} (not authrelay)"]
    return "\n".join(lines) + "\n"


def _username_placeholder(s: Settings) -> str:
    if s.user.lower() == s.email.lower():
        return "%EMAILADDRESS%"
    if s.user.lower() == s.email.rpartition("@")[0].lower():
        return "%EMAILLOCALPART%"
    return s.user


def autoconfig_xml(s: Settings) -> bytes:
    """Thunderbird autoconfig (clientConfig version 1.1, Mozilla ISPDB format)."""
    if s.incoming is None:
        raise SetupError("the Thunderbird file needs an incoming server (--incoming "
                         "imaps://HOST): Thunderbird refuses a configuration without one")
    root = ET.Element("clientConfig", version="1.1")
    prov = ET.SubElement(root, "emailProvider", id=s.domain)
    for tag, value in (("domain", s.domain), ("displayName", f"{s.domain} mail"),
                       ("displayShortName", s.domain)):
        ET.SubElement(prov, tag).text = value
    i = s.incoming
    inc = ET.SubElement(prov, "incomingServer", type=i.kind)
    for tag, value in (("hostname", i.host), ("port", str(i.port)),
                       ("socketType", i.socket_type), ("username", "%EMAILADDRESS%"),
                       ("authentication", "password-cleartext")):
        ET.SubElement(inc, tag).text = value
    user = _username_placeholder(s)
    for o in s.outgoing:  # the first is the preferred one; the others are alternatives
        out = ET.SubElement(prov, "outgoingServer", type="smtp")
        for tag, value in (("hostname", s.host), ("port", str(o.port)),
                           ("socketType", o.socket_type), ("username", user),
                           ("authentication", "password-cleartext")):
            ET.SubElement(out, tag).text = value
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + \
        ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def mobileconfig(s: Settings, password: str | None = None) -> bytes:
    """An unsigned Apple configuration profile with one Mail account payload."""
    if s.incoming is None:
        raise SetupError("the Apple profile needs an incoming server (--incoming "
                         "imaps://HOST): IncomingMailServerHostName is required")
    o = s.outgoing[0]  # Apple Mail takes one outgoing port; UseSSL covers both modes
    i = s.incoming
    ident = ".".join(reversed(s.host.split("."))) + ".authrelay"
    mail_uuid, profile_uuid = str(uuid.uuid4()).upper(), str(uuid.uuid4()).upper()
    account: dict[str, object] = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.mail.{mail_uuid}",
        "PayloadUUID": mail_uuid,
        "PayloadDisplayName": f"Mail ({s.email})",
        "EmailAccountDescription": s.email,
        "EmailAccountType": "EmailTypeIMAP" if i.kind == "imap" else "EmailTypePOP",
        "EmailAddress": s.email,
        "IncomingMailServerHostName": i.host,
        "IncomingMailServerPortNumber": i.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerUsername": s.email,
        "OutgoingMailServerHostName": s.host,
        "OutgoingMailServerPortNumber": o.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerUsername": s.user,
        "OutgoingPasswordSameAsIncomingPassword": False,
    }
    if password is not None:
        account["OutgoingPassword"] = password
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.{profile_uuid}",
        "PayloadUUID": profile_uuid,
        "PayloadDisplayName": f"{s.domain} mail: {s.email}",
        "PayloadDescription": f"Sends mail through {s.host} (authrelay) as {s.user}.",
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


__all__ = ["Incoming", "Outgoing", "SetupError", "Settings", "autoconfig_xml",
           "mobileconfig", "parse_incoming", "settings", "text"]
