"""Configuration: one TOML file -> frozen dataclasses.

Owns: the names of every setting (the product's interface: keep them stable), their
defaults, and validation. Contract: `load(path)` returns a `Config` or raises
`ConfigError` whose message names the offending key path (e.g. `limits.max_recipients`)
and why. Unknown keys are errors, so a typo never silently falls back to a default.

Lookup order for every command: --config FILE, $AUTHRELAY_CONFIG, ./authrelay.toml,
/etc/authrelay/authrelay.toml. When none exists, `serve` (and only serve, with a notice at
start) runs on the embedded default (state under ./var, self-signed cert, loopback ports
2525/2587/2465); commands that use a running server's state (sendmail, queue, user,
import sasldb) get `NoConfig` instead: writing a spool or user DB that no daemon reads
would lose mail or users silently (their exit status is 75, EX_TEMPFAIL).

Paths: a relative path in a config file is taken from the directory of the file's real
path (symlinks resolved: `config_dir`, `absolute_paths`, at `load_file`), never from the
reading process's current directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

ENV_VAR = "AUTHRELAY_CONFIG"
LOCAL_FILE = "authrelay.toml"
SYSTEM_FILE = "/etc/authrelay/authrelay.toml"
EMBEDDED = "<embedded default>"  # Config.source when no file was read


class ConfigError(ValueError):
    """A bad config: the message names the key path and the reason (and the file, when
    read from one: `path`; `detail` is the message without it)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = str(path) if path else ""
        self.detail = message


def error_line(e: ConfigError) -> str:
    """The one way every command words a config error, as check-config words its
    findings: `FILE: error: KEY: WHAT` (or `error: KEY: WHAT` without a file)."""
    return f"{e.path}: error: {e.detail}" if e.path else f"error: {e.detail}"


class NoConfig(ConfigError):
    """No config file where the lookup looks (exit EX_TEMPFAIL: retry once installed)."""


# --------------------------------------------------------------------------- values

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.I)
_SIZE_UNITS = {
    None: 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
    "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}


def parse_duration(value: Any, key: str = "duration") -> float:
    """'10m' -> 600.0 seconds; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like '10m', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(f"{key}: expected a duration like '30s', '10m', '4h', '5d', got {value!r}")


def parse_size(value: Any, key: str = "size") -> int:
    """'20MB' -> 20000000 bytes; bare numbers are bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like '20MB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ConfigError(f"{key}: expected a size like '20MB' or a number of bytes, got {value!r}")


def parse_hostport(value: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[::1]:587', or 'host' when a default port is given."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected 'host:port', got {value!r}")
    m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", value)
    if m:
        host, port = m.group(1), m.group(2)
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") == 0:
        host, port = value, None
    else:  # bare IPv6 without brackets: no port
        host, port = value, None
    if port is None:
        if default_port is None:
            raise ConfigError(f"{key}: {value!r} has no port (write host:port)")
        return host, default_port
    if not port.isdigit():
        raise ConfigError(f"{key}: port {port!r} in {value!r} is not a number")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ConfigError(f"{key}: port {p} out of range")
    return host, p


SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


def parse_sentinel(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, Any]]:
    """`redis+sentinel://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]`
    (`?sentinel_password=...` when the Sentinels have their own; `rediss+` for TLS to the
    master): (sentinels, service name, db, connection options). ValueError if malformed."""
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    cred, at, hosts = netloc.rpartition("@")
    if not at:
        cred, hosts = "", netloc
    sentinels = []
    for h in hosts.split(","):
        m = urlsplit(f"//{h}")
        if not m.hostname:
            raise ValueError(f"no Sentinel host in {h!r}")
        sentinels.append((m.hostname, m.port or 26379))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("expected /SERVICE or /SERVICE/DB after the Sentinel hosts")
    db = int(parts[1]) if len(parts) == 2 else 0
    opts: dict[str, Any] = {}
    user, _, password = cred.partition(":")
    if password:
        opts["password"] = unquote(password)
    if user:
        opts["username"] = unquote(user)
    for k, v in parse_qsl(query):
        if k != "sentinel_password":
            raise ValueError(f"unknown option {k!r}")
        opts["sentinel_password"] = v
    if scheme.startswith("rediss"):
        opts["ssl"] = True
    return sentinels, parts[0], db, opts



# --------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class Listen:
    address: str = "127.0.0.1:2587"
    mode: str = "submission"  # smtp | submission | submissions
    # This listener's own pool (beside [limits] max_connections); 0: the default, which is
    # the global cap, minus the submission reserve for smtp listeners (docs/LIMITS.md).
    max_connections: int = 0
    # A PROXY protocol header (v1/v2) is required first from [relay] proxy_trusted peers
    # (docs/SCALING.md); everyone else is refused. Never read where this is false.
    proxy_protocol: bool = False

    @property
    def host(self) -> str:
        return parse_hostport(self.address, "listen.address")[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.address, "listen.address")[1]


class CertPair(NamedTuple):
    """One served certificate (chain) and its key, with the config keys naming them (for
    messages; "tls" for the embedded default's self-signed pair)."""

    cert: Path
    key: Path
    cert_key: str
    key_key: str


@dataclass(frozen=True)
class TLS:
    cert: str = ""  # empty: <state_dir>/tls/cert.pem, self-signed on first start
    key: str = ""
    # A second pair of the other key type (ECDSA beside RSA, or RSA beside ECDSA): both
    # are served, OpenSSL picks by what the client can verify (Config.cert_pairs).
    second_cert: str = ""
    second_key: str = ""
    min_version: str = "1.2"  # 1.2 | 1.3


@dataclass(frozen=True)
class Auth:
    backend: str = "userdb"  # userdb | saslauthd:PATH | dovecot:PATH | postgresql
    dsn: str = ""  # backend = "postgresql": "postgresql://user:pass@host:5432/db"
    pool_size: int = 10  # backend = "postgresql": connections per process
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    sender_policy: str = "any"  # any | own
    # any | own: the From:/Sender: header of an authenticated user's message must be one of
    # the user's addresses (550 5.7.1 at the end of DATA). Unset ("") follows sender_policy.
    from_header_policy: str = ""
    backend_timeout: float = 5.0
    cache_ttl: float = 300.0  # verified-credential cache lifetime; 0 disables
    hash_threads: int = 4  # bounded pool for argon2 so hashing never starves sessions
    failure_window: float = 900.0  # per-IP / per-user failure counting window
    max_failures_per_ip: int = 10
    max_failures_per_user: int = 10
    failure_delay: float = 1.0  # every failed AUTH answered after this delay
    # A user's failure limit never refuses the right password from an address (its /24 or
    # /64) the user authenticated from within this many days; 0: the limit refuses all.
    known_address_days: float = 30.0
    # Logins USER@REALM for these realms are checked as USER (Cyrus SASL's default realm:
    # users `import sasldb` stored by their bare name; auth/realms.py).
    realms: tuple[str, ...] = ()
    # App passwords (auth/apppasswords.py; userdb and postgresql backends): "allow" lets
    # the account password and app passwords log in; "require": app passwords only.
    app_passwords: str = "allow"  # allow | require

    @property
    def from_policy(self) -> str:
        """from_header_policy as in force: when unset, "own" if sender_policy is "own"."""
        return self.from_header_policy or ("own" if self.sender_policy == "own" else "any")


@dataclass(frozen=True)
class SmartHostOAuth:
    """How authrelay gets and sends an OAuth 2.0 token to one smart host: a
    `[[relay.smart_host_oauth]]` table (`host` names an entry of [relay] smart_host), or
    the [relay] smart_host_auth / smart_host_user / smart_host_oauth_* keys, which serve
    every smart host without a table of its own (`host` then ""). delivery/oauth.py
    fetches with it; one token cache per distinct settings."""

    host: str = ""  # an entry of [relay] smart_host, as written there
    auth: str = "xoauth2"  # xoauth2 | oauthbearer (RFC 7628)
    user: str = ""  # the SASL user: the mailbox sent as (jwt_bearer: the JWT "sub")
    grant: str = "client_credentials"  # | jwt_bearer (RFC 7523 2.1)
    token_url: str = ""
    client_id: str = ""
    secret_file: str = ""  # the client secret, one line, mode 0600
    key_file: str = ""  # PEM key (+ certificate) or service-account JSON
    scope: str = ""
    ca_file: str = ""  # private CA of the token endpoint; else system CAs

    def key(self, name: str) -> str:
        """The config key a field came from, for messages."""
        if self.host:
            return f"relay.smart_host_oauth[{self.host}].{name}"
        return {"auth": "relay.smart_host_auth", "user": "relay.smart_host_user"}.get(
            name, f"relay.smart_host_oauth_{name}")


@dataclass(frozen=True)
class Relay:
    local_domains: tuple[str, ...] = ()
    # The valid recipients of local_domains (policy/recipients.py; Postfix
    # relay_recipient_maps): one address or `@domain` a line. "" = any local part.
    local_recipients_file: str = ""
    trusted_networks: tuple[str, ...] = ()
    smart_host: tuple[str, ...] = ()
    smart_host_tls: str = "starttls"  # starttls | tls | none | may | encrypt | verify
    smart_host_user: str = ""
    smart_host_password_file: str = ""
    # The smart host gets our credentials, so its certificate is verified (system CAs, or
    # this PEM file for a private CA); false only for a smart host on a trusted network.
    smart_host_tls_verify: bool = True
    smart_host_ca_file: str = ""
    # How we authenticate to the smart host: "password" (AUTH PLAIN/LOGIN with
    # smart_host_password_file), or an OAuth 2.0 access token (delivery/oauth.py) sent as
    # "xoauth2" (Microsoft 365, Google) or "oauthbearer" (RFC 7628). smart_host_user is
    # the SASL user (the mailbox sent as; for jwt_bearer also the JWT "sub").
    smart_host_auth: str = "password"
    # client_credentials (RFC 6749 4.4: a client secret, or a private_key_jwt assertion
    # signed with smart_host_oauth_key_file, RFC 7523 2.2) | jwt_bearer (RFC 7523 2.1: a
    # Google service account with domain-wide delegation; key file = its JSON key).
    smart_host_oauth_grant: str = "client_credentials"
    smart_host_oauth_token_url: str = ""
    smart_host_oauth_client_id: str = ""
    smart_host_oauth_secret_file: str = ""  # the client secret, one line, mode 0600
    smart_host_oauth_key_file: str = ""  # PEM key (+ certificate) or service-account JSON
    smart_host_oauth_scope: str = ""
    smart_host_oauth_ca_file: str = ""  # private CA of the token endpoint; else system CAs
    # [[relay.smart_host_oauth]]: OAuth settings of their own for some entries of
    # smart_host (a fail-over from Microsoft 365 to Google Workspace); the others use the
    # smart_host_auth / smart_host_user / smart_host_oauth_* keys above (`oauth_for`).
    smart_host_oauth: tuple[SmartHostOAuth, ...] = ()
    # Load balancers whose PROXY header is believed (CIDRs; listeners with proxy_protocol).
    proxy_trusted: tuple[str, ...] = ()


    def oauth_for(self, entry: str) -> SmartHostOAuth | None:
        """The OAuth settings for the smart_host entry `entry` (its own table, else the
        [relay] keys when smart_host_auth asks for OAuth), or None: password AUTH."""
        key = _hostport_key(entry)
        for s in self.smart_host_oauth:
            if _hostport_key(s.host) == key:
                return s
        if self.smart_host_auth == "password":
            return None
        return SmartHostOAuth(
            host="", auth=self.smart_host_auth, user=self.smart_host_user,
            grant=self.smart_host_oauth_grant, token_url=self.smart_host_oauth_token_url,
            client_id=self.smart_host_oauth_client_id,
            secret_file=self.smart_host_oauth_secret_file,
            key_file=self.smart_host_oauth_key_file, scope=self.smart_host_oauth_scope,
            ca_file=self.smart_host_oauth_ca_file)

    def uses_oauth(self) -> bool:
        """Any smart host authenticated with OAuth (delivery/oauth.py is needed)."""
        return bool(self.smart_host) and any(self.oauth_for(h) for h in self.smart_host)


def _hostport_key(entry: str) -> str:
    """A smart_host entry compared case-blind, without blanks ("HOST:587" = "host:587")."""
    return "".join(entry.split()).lower()


@dataclass(frozen=True)
class TlsPolicyEntry:
    """One `[[delivery.tls_policy_map]]` row (Postfix's smtp_tls_policy_maps): the level
    for a destination domain ("example.com" exactly, ".example.com" its subdomains) and,
    for `verify`, the names the MX certificate may carry (hostname, nexthop, dot-nexthop,
    or literal names)."""

    domain: str = ""
    level: str = "may"
    match: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    port: int = 25
    tls: str = "may"  # may | encrypt (older spelling of tls_policy)
    # Outbound TLS level (delivery/tlspolicy.py): none | may | encrypt | verify | dane |
    # dane-only. Empty: "verify" when tls_verify, "encrypt" when tls = "encrypt", else
    # "dane" (DANE where DNSSEC says so, else MTA-STS where published, else may).
    tls_policy: str = ""
    tls_policy_map: tuple[TlsPolicyEntry, ...] = ()
    # CA certificates (PEM) trusted besides the system store, for verify and MTA-STS (the
    # MX and the policy's HTTPS server): a private CA.
    tls_ca_file: str = ""
    # Believe the AD bit from `nameservers` (or the system resolver): they validate DNSSEC
    # and sit on this host or a trusted path (RFC 7672 1.3). Needed for DANE.
    dnssec: bool = False
    mta_sts: bool = True  # RFC 8461: fetch and apply MTA-STS policies (level dane only)
    tls_reports: bool = False  # RFC 8460 daily TLS-RPT reports to domains that ask
    nameservers: tuple[str, ...] = ()
    retry: tuple[float, ...] = (300.0, 600.0, 1200.0, 2400.0, 3600.0)
    max_queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0  # 0 disables delay DSNs
    concurrency: int = 100  # deliveries in flight, all destinations
    concurrency_per_domain: int = 20
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2: 5 min for MAIL/RCPT
    data_timeout: float = 600.0  # RFC 5321 4.5.3.2: 10 min for the final dot
    # The whole of one delivery attempt (all hosts, all transactions), each wait above
    # cut short by it: a next hop answering each of 1,000 RCPTs just under command_timeout
    # must not hold a delivery slot for days. The recipients not done by then are
    # deferred 4.4.2. 0: no limit.
    attempt_timeout: float = 3600.0
    dns_timeout: float = 10.0
    tls_verify: bool = False  # older spelling: true is tls_policy = "verify"
    max_idle_connections: int = 50  # outbound connection cache
    # MX addresses one delivery attempt tries, and MX hosts it looks up (Postfix's
    # smtp_mx_address_limit): a hostile domain's thousands of unreachable addresses must
    # not hold a delivery slot for hours. 0: no limit.
    mx_address_limit: int = 5
    idle_timeout: float = 10.0
    # Level may only: after a failed STARTTLS handshake, a host is tried in plain text
    # for this long (as Postfix does; an attacker could strip the STARTTLS offer anyway).
    # 0 turns the fallback off.
    tls_fallback_time: float = 3600.0


@dataclass(frozen=True)
class Containment:
    """`[limits.containment]`: a compromised account is suspended, not just rate-limited
    (policy/containment.py; README "When an account is compromised"). On by default with
    thresholds far above what a person sends in an hour (a spam run passes them within
    minutes); 0 turns one threshold off."""

    enabled: bool = True
    window: float = 3600.0  # the sliding window every threshold counts over
    messages: int = 500  # messages accepted from the user
    recipients: int = 1000  # distinct recipient addresses
    refused: int = 100  # distinct recipients the next hops refused with 5xx (user unknown)
    # of which one message counts at most this many: one reply-all to a stale list of
    # 100 dead addresses is one mistake, not a spam run (policy/containment.py)
    refused_per_message: int = 10
    networks: int = 20  # distinct client networks (/24, /64) the user submitted from
    notify: str = ""  # who gets the one notice; "": postmaster (through [aliases])
    exempt: tuple[str, ...] = ()  # users never suspended (a newsletter account)


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 20480000
    max_recipients: int = 100
    max_connections: int = 100
    max_connections_per_ip: int = 20
    connection_rate: int = 0  # per second, all clients; 0 = off
    connection_rate_per_ip: int = 60  # per minute; 0 = off
    bad_rcpt_throttle: int = 5
    bad_rcpt_limit: int = 20  # hard limit: then 421 and close
    max_auth_failures: int = 3
    command_timeout: float = 300.0
    data_block_timeout: float = 600.0
    data_final_timeout: float = 600.0
    tls_handshake_timeout: float = 30.0
    session_timeout: float = 3600.0
    max_line_length: int = 512  # RFC 5321 4.5.3.1.4 command line incl. CRLF
    max_auth_line_length: int = 12288  # RFC 4954 4: AUTH lines may be longer
    max_text_line_length: int = 998  # RFC 5322 2.1.1 excluding CRLF
    max_errors: int = 20  # syntax / protocol errors per session before 421
    max_junk_commands: int = 100  # NOOP/RSET/HELP/VRFY/repeated EHLO per session; 0 = off
    user_messages_per_hour: int = 0  # 0 = off
    user_recipients_per_hour: int = 0  # 0 = off
    # Admission (docs/LIMITS.md "Connections"). Share of max_connections that no single
    # listener (nor the smtp listeners together) may take: whichever port is flooded, the
    # others keep this much (submission stays reachable while port 25 is flooded).
    pool_reserve_percent: int = 20
    # Past connection_rate a new connection waits for its greeting up to this; then 421.
    connection_rate_max_delay: float = 20.0
    # A full submission listener leaves new clients in the kernel backlog this long
    # before answering 421 to those waiting.
    backlog_wait: float = 15.0
    # Stress mode (Postfix): above stress_threshold percent of a listener's pool its
    # command timeout drops to stress_command_timeout until the load passes.
    stress_threshold: int = 80
    stress_command_timeout: float = 10.0
    # Issue 17: a full listener pool makes room by evicting a pre-authentication
    # connection (handshake not done, or idle before AUTH outside a transaction), and
    # one address may hold at most max_pending_per_ip connections still in their TLS
    # handshake or greeting delay (0 = no limit). docs/LIMITS.md "Eviction".
    pool_eviction: bool = True
    max_pending_per_ip: int = 5
    # Issue 17: once a message is past max_message_size (refused whatever comes next),
    # the rest of it -- at most protocol.OVERSHOOT more -- is read no faster than this
    # many bytes a second, so an endless oversized DATA costs its sender a blocked
    # send() instead of costing the server a core. Nothing under the limit is slowed;
    # 0 = no cap (read on at full speed up to the overshoot).
    oversize_read_rate: int = 65536
    # Exempt from per-IP connection limits and rates (127.0.0.1 and ::1 always are);
    # "trusted_networks" stands for [relay] trusted_networks.
    limit_exceptions: tuple[str, ...] = ("trusted_networks",)
    # Per-IP limits (connections, rates, AUTH failures per address) count an IPv6 client
    # by this prefix: one host or site has a whole /64 to rotate through.
    ipv6_prefix_length: int = 64
    # Scale-out (docs/SCALING.md): counters shared by every node of a farm in Redis/Valkey.
    proxy_timeout: float = 10.0  # the whole PROXY header must arrive within this
    shared: str = ""  # "redis://host:6379/0" | "rediss://..." | "unix:///path?db=0"; "": local
    max_hops: int = 50  # Received: fields a message may arrive with (Postfix hopcount_limit)
    queue_min_free: int = -1  # bytes free in the spool for MAIL; -1: max(2 x size, 100 MB)
    containment: Containment = field(default_factory=Containment)

    @property
    def min_free_bytes(self) -> int:
        """queue_min_free as bytes (the default resolved); 0 turns the check off."""
        if self.queue_min_free >= 0:
            return self.queue_min_free
        return max(2 * self.max_message_size, 100 * 1000 * 1000)


@dataclass(frozen=True)
class Checks:
    require_reverse_dns: bool = False  # only for clients that did not authenticate
    dnsbl: tuple[str, ...] = ()


@dataclass(frozen=True)
class Log:
    target: str = "stdout"  # stdout | stderr | file:PATH | syslog | syslog:SOCKET
    format: str = "text"  # text | json
    level: str = "info"  # debug tracing level for the `logging` module


@dataclass(frozen=True)
class Metrics:
    address: str = ""  # e.g. "127.0.0.1:9587"; empty: off


# DKIM (RFC 6376): the header fields signed by default (maddy's and OpenDKIM's usual set),
# and those over-signed (listed once more than they occur, so none can be added later).
DKIM_HEADERS = (
    "From", "Reply-To", "Sender", "To", "Cc", "Subject", "Date", "Message-ID",
    "In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-Disposition", "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post",
)
DKIM_OVERSIGN = ("From", "To", "Subject", "Date", "Message-ID")


@dataclass(frozen=True)
class Dkim:
    domains: tuple[str, ...] = ()  # From: domains to sign for; empty: every domain with a key
    headers: tuple[str, ...] = DKIM_HEADERS
    oversign: tuple[str, ...] = DKIM_OVERSIGN
    # Sign an authenticated user's message even when its From: is not the user's: lends
    # the domain's reputation to every user (off: such mail goes out unsigned).
    sign_unowned: bool = False


def _default_hostname() -> str:
    name = socket.getfqdn()
    return name if name and name != "localhost" else socket.gethostname() or "localhost"


def _default_listeners() -> tuple[Listen, ...]:
    # The embedded default is a first start or a trial: loopback only (never an open
    # service) and unprivileged dev ports, so it runs the same as root or not. Production
    # listeners (25/587/465 on public addresses) are set in the config file.
    return (
        Listen(address="127.0.0.1:2525", mode="smtp"),
        Listen(address="127.0.0.1:2587", mode="submission"),
        Listen(address="127.0.0.1:2465", mode="submissions"),
    )


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=_default_hostname)
    state_dir: str = "./var"
    user: str = ""  # run as this user after binding ports (when started as root)
    workers: int = 0  # receiving processes sharing the ports; 0 = one per core
    # Each receiving worker kept on a CPU of its own (the i-th of those the server may
    # use, round robin; the master is not pinned): process.pin_to_cpu.
    worker_cpu_affinity: bool = False
    shutdown_timeout: float = 30.0
    listen: tuple[Listen, ...] = field(default_factory=_default_listeners)
    tls: TLS = field(default_factory=TLS)
    auth: Auth = field(default_factory=Auth)
    relay: Relay = field(default_factory=Relay)
    delivery: Delivery = field(default_factory=Delivery)
    limits: Limits = field(default_factory=Limits)
    checks: Checks = field(default_factory=Checks)
    log: Log = field(default_factory=Log)
    metrics: Metrics = field(default_factory=Metrics)
    dkim: Dkim = field(default_factory=Dkim)
    # The relay's public address(es) as the Internet sees them (SPF, PTR, doctor); empty:
    # the global addresses among the listen addresses, else the addresses of hostname.
    public_addresses: tuple[str, ...] = ()
    # Local names (root, postmaster, www-data...) -> real addresses, for the sendmail
    # command (cron mail to "root"): the [aliases] table (name = "addr" or ["a", "b"]),
    # then aliases_file (/etc/aliases format); the table wins.
    aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    aliases_file: str = ""
    # Local users who may set the envelope sender of local mail (sendmail -f, -bs MAIL
    # FROM), as sendmail's trusted users; root and `user` always may.
    trusted_users: tuple[str, ...] = ()
    source: str = EMBEDDED  # where this config came from (not a TOML key)

    # Derived paths -------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def spool_dir(self) -> Path:
        return self.state_path / "spool"

    @property
    def userdb_path(self) -> Path:
        return self.state_path / "users.db"

    @property
    def cert_path(self) -> Path:
        return Path(self.tls.cert) if self.tls.cert else self.state_path / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return Path(self.tls.key) if self.tls.key else self.state_path / "tls" / "key.pem"

    @property
    def cert_pairs(self) -> tuple[CertPair, ...]:
        """Every certificate and key served: `[tls] cert`/`key`, then the second pair."""
        first = CertPair(self.cert_path, self.key_path,
                         "tls.cert" if self.tls.cert else "tls",
                         "tls.key" if self.tls.key else "tls")
        if not self.tls.second_cert:
            return (first,)
        return first, CertPair(Path(self.tls.second_cert), Path(self.tls.second_key),
                               "tls.second_cert", "tls.second_key")

    @property
    def dkim_dir(self) -> Path:
        """DKIM keys: dkim/DOMAIN/SELECTOR.key."""
        return self.state_path / "dkim"

    @property
    def self_signed(self) -> bool:
        """True when no certificate was configured: one is made on first start."""
        return not self.tls.cert and not self.tls.key


# --------------------------------------------------------------------------- parsing

_SECTIONS: dict[str, type] = {
    "tls": TLS, "auth": Auth, "relay": Relay, "delivery": Delivery, "limits": Limits,
    "checks": Checks, "log": Log, "metrics": Metrics,
    "dkim": Dkim,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "listen.mode": ("smtp", "submission", "submissions"),
    "tls.min_version": ("1.2", "1.3"),
    "auth.sender_policy": ("any", "own"),
    "auth.app_passwords": ("allow", "require"),
    "auth.from_header_policy": ("any", "own"),
    "relay.smart_host_tls": ("starttls", "tls", "none", "may", "encrypt", "verify"),
    "relay.smart_host_auth": ("password", "xoauth2", "oauthbearer"),
    "relay.smart_host_oauth_grant": ("client_credentials", "jwt_bearer"),
    "relay.smart_host_oauth.auth": ("xoauth2", "oauthbearer"),
    "relay.smart_host_oauth.grant": ("client_credentials", "jwt_bearer"),
    "delivery.tls": ("may", "encrypt"),
    "delivery.tls_policy": ("", "none", "may", "encrypt", "verify", "dane", "dane-only"),
    "log.format": ("text", "json"),
    "log.level": ("debug", "info", "warning", "error"),
}
_DURATIONS = {
    "shutdown_timeout", "auth.backend_timeout", "auth.cache_ttl", "auth.failure_window",
    "auth.failure_delay", "delivery.max_queue_lifetime", "delivery.delay_warning",
    "delivery.connect_timeout", "delivery.command_timeout", "delivery.data_timeout",
    "delivery.attempt_timeout",
    "delivery.dns_timeout", "delivery.idle_timeout", "limits.command_timeout",
    "delivery.tls_fallback_time",
    "limits.data_block_timeout", "limits.data_final_timeout", "limits.tls_handshake_timeout",
    "limits.session_timeout", "limits.connection_rate_max_delay", "limits.backlog_wait",
    "limits.stress_command_timeout", "limits.containment.window",
    "limits.proxy_timeout",
}
_SIZES = {"limits.max_message_size", "limits.queue_min_free",
          "limits.oversize_read_rate"}


def _convert(key: str, value: Any, default: Any) -> Any:
    if key in _DURATIONS:
        return parse_duration(value, key)
    if key in _SIZES:
        return parse_size(value, key)
    if key == "delivery.tls_policy_map":
        return _policy_map(value)
    if key == "relay.smart_host_oauth":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected [[relay.smart_host_oauth]] tables")
        return tuple(_build(SmartHostOAuth, item, f"{key}[{i}]") for i, item in enumerate(value))
    if key == "delivery.retry":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list of durations like ['5m', '1h']")
        return tuple(parse_duration(v, f"{key}[{i}]") for i, v in enumerate(value))
    if is_dataclass(default):  # a sub-table: [limits.containment]
        return _build(type(default), value, key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        choices = _CHOICES.get(re.sub(r"\[\d+\]", "", key))
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return value
    raise ConfigError(f"{key}: unsupported value {value!r}")  # pragma: no cover


_MAP_LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")


def _policy_map(value: Any) -> tuple[TlsPolicyEntry, ...]:
    key = "delivery.tls_policy_map"
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected [[delivery.tls_policy_map]] tables")
    out = []
    for i, item in enumerate(value):
        e = _build(TlsPolicyEntry, item, f"{key}[{i}]")
        if not e.domain or any(c.isspace() for c in e.domain):
            raise ConfigError(f"{key}[{i}].domain: a domain (\"example.com\" or "
                              "\".example.com\" for its subdomains) is required")
        if e.level not in _MAP_LEVELS:
            raise ConfigError(f"{key}[{i}].level: {e.level!r} is not one of "
                              f"{', '.join(_MAP_LEVELS)}")
        out.append(replace(e, domain=e.domain.lower().rstrip("."),
                           match=tuple(m.lower() for m in e.match)))
    return tuple(out)


def _unknown_key(path: str, key: str, known: Iterable[str]) -> ConfigError:
    """"PATH: unknown key", with the fix when there is a likely one: a key of this table
    spelt nearly so (`smart_hots`), or a top-level or section key put in another table."""
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
    if near:
        return ConfigError(f"{path}: unknown key (did you mean {near[0]}?)")
    homes = [f"in [{name}]" for name, cls in _SECTIONS.items()
             if key in {f.name for f in fields(cls)}]
    if key in {f.name for f in fields(Config)} - {"source"} - set(_SECTIONS):
        homes.insert(0, "at the top of the file, before any [section]")
    if homes:
        return ConfigError(f"{path}: unknown key (it goes {' or '.join(homes)})")
    return ConfigError(f"{path}: unknown key")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a table")
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else k
        if k not in known:
            raise _unknown_key(path, k, known)
        kwargs[k] = _convert(path, v, getattr(defaults, k))
    return cls(**kwargs)


# Characters no host name holds that would break the lines it is written into: the
# greeting, EHLO, Received:, Message-ID:, the DSN's Reporting-MTA, `authrelay dns`.
_NOT_IN_HOSTNAME = re.compile(r'[\s\x00-\x1f\x7f<>\[\]()@,;:"\\]')


_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?[0-9A-Fa-f:.]+\]")  # RFC 5321 4.1.3, as EHLO takes


def hostname_problem(name: str) -> str:
    """Why `name` cannot be the relay's host name ("" when it can). An address literal
    (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) is a name EHLO accepts: kept."""
    if _ADDRESS_LITERAL.fullmatch(name):
        return ""
    bad = _NOT_IN_HOSTNAME.search(name)
    return f"holds {bad.group()!r}" if bad else "" if name.strip(".") else "is empty"


def validate(cfg: Config) -> None:
    """The checks a loaded file passes, for a config put together otherwise (a reload:
    the file's values with the running restart-only ones, reloadkeys.reloaded); a
    ConfigError names the key."""
    _validate(cfg)


def attempt_cut(cfg: Config) -> str | None:
    """Why a configured wait works only up to [delivery] attempt_timeout (new in the
    release after 5955ba1, 1h by default, cutting every wait of an attempt): the first of
    data_timeout, command_timeout, connect_timeout longer than it, said in one sentence
    for check-config and serve's start/reload warning; None when none is (or no limit)."""
    d = cfg.delivery
    at = d.attempt_timeout
    for key, value in (("data_timeout", d.data_timeout),
                       ("command_timeout", d.command_timeout),
                       ("connect_timeout", d.connect_timeout)):
        if 0 < at < value:
            return (f"{at:g}s is shorter than delivery.{key} ({value:g}s): the attempt's "
                    f"end cuts that wait at {at:g}s (a next hop answering the end of data "
                    "later is given up and sent the message again at the next attempt: it "
                    f"may get it twice); raise attempt_timeout above {value:g}s (0: no "
                    f"limit) or lower {key}")
    return None


# The most `workers` a file may set: 10**22 was taken, and serve opened sockets for that
# many until 'cannot listen on ...: Too many open files' (before that: shared memory of
# (workers + 1) x 1.8 MiB, a fork each). Postfix's default_process_limit is 100.
MAX_WORKERS = 256

# Waits a session cannot pass at zero: 0 would end every session at its first read, or
# (data_block_timeout) give up every commit at the final dot. They have no "0 = off".
_NONZERO_TIMEOUTS = ("command_timeout", "data_block_timeout", "data_final_timeout",
                     "tls_handshake_timeout", "session_timeout", "stress_command_timeout")


def _validate(cfg: Config) -> None:
    for name in _NONZERO_TIMEOUTS:
        if getattr(cfg.limits, name) <= 0:  # (a field of Limits by name: the tuple above)
            raise ConfigError(f"limits.{name}: must be more than 0 (it has no \"off\")")
    why = hostname_problem(cfg.hostname)
    if why:
        raise ConfigError(f"hostname: {cfg.hostname!r} {why}: write this relay's host name "
                          "(e.g. \"relay.example.org\"; it is the name in every greeting, "
                          "EHLO and Received: line)")
    if cfg.workers > MAX_WORKERS:
        raise ConfigError(f"workers: {cfg.workers} is more than {MAX_WORKERS} (a process "
                          "each, with its sockets and shared memory; 0 = one per core)")
    if not cfg.listen:
        raise ConfigError("listen: at least one [[listen]] is required")
    for i, ln in enumerate(cfg.listen):
        parse_hostport(ln.address, f"listen[{i}].address")
    tc = cfg.tls
    if bool(tc.second_cert) != bool(tc.second_key):
        have, need = (("second_cert", "second_key") if tc.second_cert
                      else ("second_key", "second_cert"))
        raise ConfigError(f"tls.{have}: needs tls.{need} too (the second certificate and "
                          "its key)")
    if tc.second_cert and not (tc.cert and tc.key):
        raise ConfigError("tls.second_cert: needs tls.cert and tls.key (the first pair; "
                          "the self-signed default is not served beside a second one)")
    for i, net in enumerate(cfg.relay.trusted_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"relay.trusted_networks[{i}]: {net!r} is not a network (CIDR)"
            ) from None
    for i, hp in enumerate(cfg.relay.smart_host):
        parse_hostport(hp, f"relay.smart_host[{i}]", default_port=25)
    _validate_oauth(cfg.relay)
    for i, ns in enumerate(cfg.delivery.nameservers):
        parse_hostport(ns, f"delivery.nameservers[{i}]", default_port=53)
    be = cfg.auth.backend
    if not (be in ("userdb", "postgresql") or be.startswith("saslauthd:")
            or be.startswith("dovecot:")):
        raise ConfigError(
            f"auth.backend: {be!r} is not userdb, saslauthd:PATH, dovecot:PATH or postgresql"
        )
    if be == "postgresql" and not cfg.auth.dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError("auth.dsn: backend \"postgresql\" needs a DSN like "
                          "\"postgresql://user:password@host:5432/database\"")
    if be == "postgresql" and cfg.auth.pool_size < 1:
        raise ConfigError("auth.pool_size: must be at least 1")
    for i, mech in enumerate(cfg.auth.mechanisms):
        if mech.upper() not in ("PLAIN", "LOGIN"):
            raise ConfigError(f"auth.mechanisms[{i}]: {mech!r} unsupported (PLAIN, LOGIN)")
    if cfg.metrics.address:
        parse_hostport(cfg.metrics.address, "metrics.address")
    t = cfg.log.target
    if not (t in ("stdout", "stderr", "syslog") or t.startswith("file:")
            or t.startswith("syslog:") and len(t) > 7):
        raise ConfigError(f"log.target: {t!r} is not stdout, stderr, syslog, syslog:SOCKET "
                          "or file:PATH")
    for i, addr in enumerate(cfg.public_addresses):
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise ConfigError(f"public_addresses[{i}]: {addr!r} is not an IP address") from None
    for key in ("headers", "oversign"):
        for i, name in enumerate(getattr(cfg.dkim, key)):
            if not re.fullmatch(r"[!-9;-~]+", name):
                raise ConfigError(f"dkim.{key}[{i}]: {name!r} is not a header field name")
    if cfg.dkim.headers and "from" not in {h.lower() for h in cfg.dkim.headers}:
        raise ConfigError("dkim.headers: must include From (RFC 6376 5.4)")
    for i, net in enumerate(cfg.limits.limit_exceptions):
        if net == "trusted_networks":
            continue
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"limits.limit_exceptions[{i}]: {net!r} is not a network "
                              "(CIDR) or \"trusted_networks\"") from None
    for i, net in enumerate(cfg.relay.proxy_trusted):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"relay.proxy_trusted[{i}]: {net!r} is not a network (CIDR)") from None
    for i, ln in enumerate(cfg.listen):
        if ln.proxy_protocol and not cfg.relay.proxy_trusted:
            raise ConfigError(f"listen[{i}].proxy_protocol: needs relay.proxy_trusted "
                              "(the load balancers' addresses)")
    if cfg.limits.shared.startswith(SENTINEL_SCHEMES):
        try:
            parse_sentinel(cfg.limits.shared)
        except ValueError as e:
            raise ConfigError(f"limits.shared: {e} (redis+sentinel://[:PASSWORD@]HOST:PORT"
                              "[,HOST:PORT...]/SERVICE[/DB])") from None
    elif cfg.limits.shared and not cfg.limits.shared.startswith(("redis://", "rediss://",
                                                                  "unix://")):
        raise ConfigError("limits.shared: expected a Redis URL like "
                          "\"redis://host:6379/0\" (rediss:// for TLS, unix:///path, "
                          "redis+sentinel://HOST:26379/SERVICE for Sentinel)")
    if cfg.limits.pool_reserve_percent > 100:
        raise ConfigError("limits.pool_reserve_percent: at most 100")
    if not 16 <= cfg.limits.ipv6_prefix_length <= 128:
        raise ConfigError("limits.ipv6_prefix_length: from 16 to 128")
    if not 1 <= cfg.limits.stress_threshold <= 100:
        raise ConfigError("limits.stress_threshold: a percentage from 1 to 100")
    if cfg.limits.containment.refused_per_message < 1:
        raise ConfigError("limits.containment.refused_per_message: at least 1 (the refused "
                          "recipients one message counts; refused = 0 turns the threshold off)")
    if 0 < cfg.delivery.attempt_timeout < 1:
        raise ConfigError("delivery.attempt_timeout: 0 (no limit) or at least 1s")
    if cfg.limits.max_line_length < 512:
        raise ConfigError("limits.max_line_length: RFC 5321 4.5.3.1.4 requires at least 512")
    if cfg.limits.max_text_line_length < 998:
        raise ConfigError("limits.max_text_line_length: RFC 5322 2.1.1 requires at least 998")


def _validate_oauth(r: Relay) -> None:
    """[relay] smart_host_oauth_* and each [[relay.smart_host_oauth]]: what each grant
    needs (the files are checked by check-config and when read, not here: a config may
    be loaded where they are not)."""
    seen: dict[str, int] = {}
    entries = {_hostport_key(h) for h in r.smart_host}
    for i, t in enumerate(r.smart_host_oauth):
        k = _hostport_key(t.host)
        where = f"relay.smart_host_oauth[{i}]"
        if not k:
            raise ConfigError(f"{where}.host: required (an entry of relay.smart_host)")
        if k not in entries:
            raise ConfigError(f"{where}.host: {t.host!r} is not an entry of "
                              "relay.smart_host (write it as it is written there)")
        if k in seen:
            raise ConfigError(f"{where}.host: {t.host!r} has a table already "
                              f"(relay.smart_host_oauth[{seen[k]}])")
        seen[k] = i
        _check_oauth(t)
    if any(_hostport_key(h) not in seen for h in r.smart_host) or not r.smart_host:
        settings = r.oauth_for("")  # the [relay] keys: used by a host without a table
        if settings is not None:
            _check_oauth(settings)


def _check_oauth(s: SmartHostOAuth) -> None:
    def short(name: str) -> str:  # as the admin writes it in that table
        return s.key(name).rsplit(".", 1)[-1]

    if not s.user:
        raise ConfigError(f"{s.key('user')}: {short('auth')} = {s.auth!r} "
                          "needs the user to authenticate as (the mailbox sent as)")
    url = s.token_url
    google_json = s.key_file.endswith(".json")
    if url and not url.startswith("https://"):
        raise ConfigError(f"{s.key('token_url')}: {url!r}: the token endpoint must be "
                          "https://")
    if not url and not google_json:
        raise ConfigError(f"{s.key('token_url')}: required (e.g. https://login."
                          "microsoftonline.com/TENANT/oauth2/v2.0/token)")
    if s.grant == "client_credentials":
        if bool(s.secret_file) == bool(s.key_file):
            raise ConfigError(f"{s.key('secret_file')}: client_credentials needs exactly "
                              f"one of {short('secret_file')} (a client secret) and "
                              f"{short('key_file')} (a certificate's private key)")
        if not s.client_id:
            raise ConfigError(f"{s.key('client_id')}: required (the application (client) "
                              "id)")
    else:
        if not s.key_file:
            raise ConfigError(f"{s.key('key_file')}: jwt_bearer needs the signing key (a "
                              f"service account's JSON key, or a PEM key with "
                              f"{short('client_id')})")
        if s.secret_file:
            raise ConfigError(f"{s.key('secret_file')}: not used by jwt_bearer (key_file "
                              "signs)")
        if not google_json and not s.client_id:
            raise ConfigError(f"{s.key('client_id')}: required with a PEM key (the JWT "
                              "issuer)")
    if not s.scope:
        raise ConfigError(f"{s.key('scope')}: required (Microsoft 365: "
                          "https://outlook.office365.com/.default; Google: "
                          "https://mail.google.com/)")


def _aliases(v: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """[aliases]: name = "address" (commas allowed) or ["address", ...]."""
    if not isinstance(v, dict):
        raise ConfigError("aliases: expected a table (name = \"address\")")
    out = []
    for name, target in v.items():
        key = f"aliases.{name}"
        if not name or "@" in name or any(c.isspace() or ord(c) < 0x20 for c in name):
            raise ConfigError(f"{key}: an alias is a local name (no @, no spaces)")
        if isinstance(target, str):
            items = [t.strip() for t in target.split(",")]
        elif isinstance(target, list) and all(isinstance(t, str) for t in target):
            items = [t.strip() for t in target]
        else:
            raise ConfigError(f"{key}: expected an address or a list of addresses")
        items = [t for t in items if t]
        if not items:
            raise ConfigError(f"{key}: no address")
        for t in items:
            if t.startswith(("|", "/", ":include:")) or any(c.isspace() for c in t):
                raise ConfigError(f"{key}: {t!r} is not an address (programs, files and "
                                  ":include: are not supported)")
        out.append((name.lower(), tuple(items)))
    return tuple(out)


def _nul_key(value: Any, path: str) -> str | None:
    """The key path of the first string (value or key) under `value` holding a NUL."""
    if isinstance(value, str):
        return path if "\0" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            if "\0" in k:
                return sub
            if (found := _nul_key(v, sub)) is not None:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _nul_key(v, f"{path}[{i}]")) is not None:
                return found
    return None


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a Config from parsed TOML (also the test-override entry point). No string
    may hold a NUL ("\\u0000" is valid TOML): no path, address, name or URL of ours can
    (the system calls take C strings), and a path holding one stopped `serve` with a
    traceback (the log file's open) or check-config with `ValueError` (state_dir)."""
    if (bad := _nul_key(data, "")) is not None:
        shown = bad.replace("\0", "\\u0000")  # a key holding one: named as written
        raise ConfigError(f"{shown}: holds a NUL character (\\u0000): no value of the "
                          "config may (a path, an address, a name)")
    kwargs: dict[str, Any] = {"source": source}
    top = {f.name: f for f in fields(Config)}
    defaults = Config()
    for k, v in data.items():
        if k == "source" or k not in top:
            raise _unknown_key(k, k, set(top) - {"source"})
        if k == "listen":
            if not isinstance(v, list):
                raise ConfigError("listen: expected [[listen]] tables")
            items = []
            for i, item in enumerate(v):
                ln = _build(Listen, item, f"listen[{i}]")
                if ln.mode not in _CHOICES["listen.mode"]:
                    raise ConfigError(
                        f"listen[{i}].mode: {ln.mode!r} is not one of smtp, submission, "
                        "submissions"
                    )
                items.append(ln)
            kwargs["listen"] = tuple(items)
        elif k in _SECTIONS:
            kwargs[k] = _build(_SECTIONS[k], v, k)
        elif k == "aliases":
            kwargs[k] = _aliases(v)
        else:
            kwargs[k] = _convert(k, v, getattr(defaults, k))
    cfg = Config(**kwargs)
    if cfg.auth.mechanisms:
        cfg = replace(cfg, auth=replace(cfg.auth,
                                        mechanisms=tuple(m.upper() for m in cfg.auth.mechanisms)))
    cfg = replace(cfg, relay=replace(cfg.relay, local_domains=tuple(
        d.lower().rstrip(".") for d in cfg.relay.local_domains)))
    cfg = replace(cfg, dkim=replace(cfg.dkim, domains=tuple(
        d.lower().rstrip(".") for d in cfg.dkim.domains)))
    _validate(cfg)
    return cfg


MAX_CONFIG_BYTES = 16 << 20  # a config file larger than this is refused whole


def read_config_bytes(path: str | os.PathLike[str], limit: int = MAX_CONFIG_BYTES) -> bytes:
    """A config file's bytes: a regular file of at most `limit` bytes (a cut file may
    still parse, so a larger one is refused whole). Opened without blocking, so a FIFO or
    a device named as the config is refused at once instead of holding the reading
    thread (every later SIGHUP, and the shutdown, waited behind it). OSError on failure
    (without a strerror for those two refusals: its text says which)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        os.set_blocking(fd, True)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"larger than {limit} bytes")
    return data


def load_file(path: str | os.PathLike[str], raw: bytes | None = None) -> Config:
    """The config file at `path`; `raw`: its bytes already read (a reload through the
    root key helper, daemon.py), relative paths still taken from `path`'s directory."""
    p = Path(path)
    if raw is None:
        try:
            raw = read_config_bytes(p)
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", p) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid TOML: {e}", p) from None
    try:
        cfg = from_dict(data, source=str(p))
    except ConfigError as e:
        raise ConfigError(str(e), p) from None
    return absolute_paths(cfg, config_dir(p))


def config_dir(path: str | os.PathLike[str]) -> Path:
    """The directory relative paths in the config file `path` are taken from: that of
    the file's real path (symbolic links resolved), so every name of the file (a symlink
    /etc/authrelay.toml to /srv/relay/authrelay.toml, the target itself, a linked
    directory) means the same state and files."""
    return Path(os.path.realpath(path)).parent


# Every key that names a file or directory (besides state_dir and the `PREFIX:PATH`
# values of auth.backend and log.target): taken from the config file's directory when
# relative (absolute_paths).
_PATH_KEYS = {
    "tls": ("cert", "key", "second_cert", "second_key"),
    "relay": ("local_recipients_file", "smart_host_password_file", "smart_host_ca_file",
              "smart_host_oauth_secret_file", "smart_host_oauth_key_file",
              "smart_host_oauth_ca_file"),
    "delivery": ("tls_ca_file",),
}
_OAUTH_PATHS = ("secret_file", "key_file", "ca_file")
# File parameters in the query of `[auth] dsn` (libpq's names, as asyncpg reads them) and
# of `[limits] shared` (redis-py's): relative ones are taken from there too.
_DSN_PATH_PARAMS = frozenset({"sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile"})
_REDIS_PATH_PARAMS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path"})


def _url_paths(url: str, params: frozenset[str], fix: Callable[[str], str]) -> str:
    """`url` with the values of the query parameters `params` given to `fix` (decoded as
    the drivers decode them, `parse_qs`); every other byte of the URL is kept. libpq's
    `sslrootcert=system` (the system CAs) and `~/...` are not paths relative to anything."""
    head, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = rest.partition("#")
    out = []
    for piece in query.split("&"):
        name, eq, value = piece.partition("=")
        plain = unquote_plus(value)
        if eq and unquote_plus(name) in params and plain and plain != "system" \
                and not plain.startswith("~") and (fixed := fix(plain)) != plain:
            piece = f"{name}={quote(fixed, safe='/')}"
        out.append(piece)
    return f"{head}?{'&'.join(out)}{hash_}{fragment}"


def absolute_paths(cfg: Config, base: Path) -> Config:
    """`cfg` with every relative path made absolute from `base`, the directory of the
    config file, as chasquid (which changes to its config directory) and nginx (its
    prefix) do: the same file means the same files and state for `serve`, the key helper,
    `sendmail` from a crontab and every other command, whatever their current directory.
    state_dir's default "./var" is such a path too (a file without state_dir: `var/`
    beside it); so are the file parameters of `[auth] dsn` (`sslrootcert=`, `passfile=`
    ...) and of `[limits] shared` (`ssl_ca_certs=` ...), which the drivers would take from
    the current directory. Absolute paths, and empty values, are kept."""
    def fix(path: str) -> str:
        return path if not path or os.path.isabs(path) else os.path.normpath(base / path)

    def prefixed(value: str, prefixes: tuple[str, ...]) -> str:
        head, sep, rest = value.partition(":")
        return f"{head}:{fix(rest)}" if sep and head + ":" in prefixes else value

    sections: dict[str, Any] = {
        name: replace(getattr(cfg, name), **{k: fix(getattr(getattr(cfg, name), k))
                                             for k in keys})
        for name, keys in _PATH_KEYS.items()}
    sections["relay"] = replace(sections["relay"], smart_host_oauth=tuple(
        replace(t, **{k: fix(getattr(t, k)) for k in _OAUTH_PATHS})
        for t in cfg.relay.smart_host_oauth))
    sections["auth"] = replace(cfg.auth, backend=prefixed(cfg.auth.backend,
                                                          ("saslauthd:", "dovecot:")),
                               dsn=_url_paths(cfg.auth.dsn, _DSN_PATH_PARAMS, fix))
    sections["limits"] = replace(cfg.limits, shared=_url_paths(
        cfg.limits.shared, _REDIS_PATH_PARAMS, fix))
    sections["log"] = replace(cfg.log, target=prefixed(cfg.log.target, ("file:", "syslog:")))
    return replace(cfg, state_dir=fix(cfg.state_dir), aliases_file=fix(cfg.aliases_file),
                   **sections)


def find_config_path(explicit: str | None) -> str | None:
    """--config, else $AUTHRELAY_CONFIG, else ./authrelay.toml, else
    /etc/authrelay/authrelay.toml (when they exist), else None (no file)."""
    if explicit:
        return explicit
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    for candidate in (LOCAL_FILE, SYSTEM_FILE):
        if Path(candidate).is_file():
            return candidate
    return None


LOOKUP = f"-c FILE, ${ENV_VAR}, ./{LOCAL_FILE}, {SYSTEM_FILE}"


def load(explicit: str | None = None, *, embedded: bool = True) -> Config:
    """The config by the lookup order. No file found: the embedded default when
    `embedded` (serve, cert make, check-config), else NoConfig."""
    path = find_config_path(explicit)
    if path is None:
        if not embedded:
            raise NoConfig(f"no config file found (looked for {LOOKUP}); "
                           "nothing done, since a running server would not see it")
        return Config()
    return load_file(path)


def embedded_notice() -> str:
    """What `serve` says at start when it runs without a config file."""
    return (f"authrelay: no config file found (looked for {LOOKUP}); running on the "
            "embedded default: state in ./var, self-signed certificate, loopback ports "
            "2525 (smtp), 2587 (submission), 2465 (submissions)")
