"""What SIGHUP applies: every config key is either reloadable or restart-only.

Owns the classification of every key of the config dataclasses (`config.py`), by its key
path (`relay.smart_host`, `listen[].address`). Contract: `RELOADABLE` and `RESTART_ONLY`
together name every key path `key_paths()` finds in `Config`, and no key is in both (a
test walks the dataclasses, so a new key must be classified here before it can land).
`restart_changes(running, new)` names the restart-only keys whose value in the re-read
file differs from what runs (an array as one key: `listen`); `keep_running(running, new)`
is the new config with the running values of those keys, so that what `run.cfg` says is
what actually runs, and the same warning comes again at the next reload until a restart;
`reloaded(running, new)` is keep_running, refusing a mix that breaks a rule across keys
(config.validate) as a whole.

Reloadable means the running processes apply the new value on SIGHUP: sessions started
after it, deliveries started after it (a new courier for changed [relay]/[delivery]
settings: a smart host added, changed or removed takes effect for the next delivery),
DKIM keys and settings, the TLS certificate (a new context, any key type), the host
checks, local submission, the local recipients list (`local_recipients_file`, re-read at
every SIGHUP whether or not its name changed: policy/recipients.py). Restart-only: what
was bound, forked, dropped or opened at start
(listeners, workers, user, state dir, log target and format, the metrics listener), the
authentication backend with its pool and credential cache, and the shared-counter store.
Failure policy: reloaded() raises ConfigError on such a mix (daemon.py: the reload
fails, one line, nothing changes); daemon.py logs one maillog line per changed
restart-only key: `warning=reload: KEY needs a restart`.
"""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass, replace
from typing import Any

from authrelay.config import Config, ConfigError, validate

RESTART_ONLY = frozenset({
    "state_dir", "user", "workers", "worker_cpu_affinity",
    "listen[].address", "listen[].mode", "listen[].max_connections",
    "listen[].proxy_protocol",
    "log.target", "log.format", "log.level",
    "metrics.address",
    # The authenticator (and its PostgreSQL pool, argon2 threads, credential cache) is
    # built once per process; a live swap would drop cached logins and pool connections
    # under sessions in flight.
    "auth.backend", "auth.dsn", "auth.pool_size", "auth.backend_timeout",
    "auth.cache_ttl", "auth.hash_threads",
    "limits.shared",
    # Containment is built (or not) once per process (policy/suspender.py).
    "limits.containment.enabled",
    "delivery.tls_reports",  # the daily reporter task starts with the daemon
})

RELOADABLE = frozenset({
    "hostname", "shutdown_timeout", "aliases", "aliases_file", "trusted_users",
    "public_addresses",
    "tls.cert", "tls.key", "tls.second_cert", "tls.second_key", "tls.min_version",
    "auth.mechanisms", "auth.sender_policy", "auth.failure_window",
    "auth.max_failures_per_ip", "auth.max_failures_per_user", "auth.failure_delay",
    "auth.known_address_days", "auth.app_passwords", "auth.realms",
    "checks.require_reverse_dns", "checks.dnsbl",
    "dkim.domains", "dkim.headers", "dkim.oversign", "dkim.sign_unowned",
    "auth.from_header_policy", "limits.pool_eviction", "limits.max_pending_per_ip",
    # [relay] and [delivery]: a new courier (daemon.apply); [limits]: read per session,
    # by the throttle"s and the acceptors" reload.
    "relay.local_domains", "relay.local_recipients_file", "relay.trusted_networks",
    "relay.smart_host",
    "relay.smart_host_tls", "relay.smart_host_user", "relay.smart_host_password_file",
    "relay.smart_host_tls_verify", "relay.smart_host_ca_file", "relay.smart_host_auth",
    "relay.smart_host_oauth_grant", "relay.smart_host_oauth_token_url",
    "relay.smart_host_oauth_client_id", "relay.smart_host_oauth_secret_file",
    "relay.smart_host_oauth_key_file", "relay.smart_host_oauth_scope",
    "relay.smart_host_oauth_ca_file", "relay.smart_host_oauth[].host",
    "relay.smart_host_oauth[].auth", "relay.smart_host_oauth[].user",
    "relay.smart_host_oauth[].grant", "relay.smart_host_oauth[].token_url",
    "relay.smart_host_oauth[].client_id", "relay.smart_host_oauth[].secret_file",
    "relay.smart_host_oauth[].key_file", "relay.smart_host_oauth[].scope",
    "relay.smart_host_oauth[].ca_file", "relay.proxy_trusted", "delivery.port",
    "delivery.tls", "delivery.tls_policy", "delivery.tls_policy_map[].domain",
    "delivery.tls_policy_map[].level", "delivery.tls_policy_map[].match",
    "delivery.tls_ca_file", "delivery.dnssec", "delivery.mta_sts",
    "delivery.nameservers", "delivery.retry", "delivery.max_queue_lifetime",
    "delivery.delay_warning", "delivery.concurrency", "delivery.concurrency_per_domain",
    "delivery.connect_timeout", "delivery.command_timeout", "delivery.data_timeout",
    "delivery.attempt_timeout",
    "delivery.dns_timeout", "delivery.tls_verify", "delivery.max_idle_connections",
    "delivery.mx_address_limit",
    "delivery.idle_timeout", "delivery.tls_fallback_time", "limits.max_message_size",
    "limits.max_recipients", "limits.max_connections", "limits.max_connections_per_ip",
    "limits.connection_rate", "limits.connection_rate_per_ip", "limits.bad_rcpt_throttle",
    "limits.bad_rcpt_limit", "limits.max_auth_failures", "limits.command_timeout",
    "limits.data_block_timeout", "limits.data_final_timeout",
    "limits.tls_handshake_timeout", "limits.session_timeout", "limits.max_line_length",
    "limits.max_auth_line_length", "limits.max_text_line_length", "limits.max_errors",
    "limits.max_junk_commands", "limits.user_messages_per_hour",
    "limits.user_recipients_per_hour", "limits.pool_reserve_percent",
    "limits.connection_rate_max_delay", "limits.backlog_wait", "limits.stress_threshold",
    "limits.stress_command_timeout", "limits.limit_exceptions", "limits.ipv6_prefix_length",
    "limits.proxy_timeout", "limits.max_hops", "limits.queue_min_free",
    "limits.oversize_read_rate",
    # Read per event by the suspender (its reload): thresholds, window, notice, exempt.
    "limits.containment.window", "limits.containment.messages",
    "limits.containment.recipients", "limits.containment.refused",
    "limits.containment.refused_per_message",
    "limits.containment.networks", "limits.containment.notify",
    "limits.containment.exempt",
})

def key_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """Every key path of the config dataclasses (`source` is not a key)."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in fields(cls):
        if f.name == "source":
            continue
        t = hints[f.name]
        args = typing.get_args(t)
        if is_dataclass(t):
            out += key_paths(t, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif args and is_dataclass(args[0]):  # an array of tables: tuple[Listen, ...]
            out += key_paths(args[0], f"{prefix}{f.name}[].")  # type: ignore[arg-type]
        else:
            out.append(prefix + f.name)
    return out


def is_reloadable(path: str) -> bool:
    return path in RELOADABLE


def _top(path: str) -> str:
    """The unit a change is seen in: `listen[].address` -> `listen`."""
    return path.split("[]", 1)[0]


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def restart_units() -> list[str]:
    """The restart-only keys as compared (arrays whole), in a stable order."""
    seen: list[str] = []
    for p in key_paths():
        if not is_reloadable(p) and _top(p) not in seen:
            seen.append(_top(p))
    return seen


def restart_changes(running: Config, new: Config, *, ignore: frozenset[str] = frozenset()
                    ) -> list[str]:
    """Restart-only keys whose value differs between `running` and `new` (`ignore`: keys
    set on the command line, e.g. `workers`, `log.format`)."""
    return [u for u in restart_units()
            if u not in ignore and _get(running, u) != _get(new, u)]


def keep_running(running: Config, new: Config) -> Config:
    """`new` with the running value of every restart-only key."""
    for u in restart_units():
        new = _set(new, u, _get(running, u))
    return new


def reloaded(running: Config, new: Config) -> Config:
    """keep_running, refused (ConfigError naming the rule and the kept keys) when that mix
    breaks a rule across keys which the file alone keeps: the running listeners take PROXY
    headers, the file drops them and `relay.proxy_trusted` with them, and every connection
    would be refused until the restart."""
    out = keep_running(running, new)
    try:
        validate(out)
    except ConfigError as e:
        kept = [u for u in restart_units() if _get(running, u) != _get(new, u)]
        raise ConfigError(f"{e.detail}; with the running {', '.join(kept)} (kept until a "
                          "restart)") from None
    return out
