"""The composition root: every long-lived part of a process, built from the config.

Owns which implementation of each seam a config selects and how the parts are connected:
the spool, the DKIM signer and the submitter (the one way into the spool), the
authenticator, the known-address store and the throttle, the host checks, the metrics,
the receiving server, and the delivering side (courier, scheduler). Nothing else in the
package builds one of these from a `Config`: `daemon.py` (serve), `sendmail.py` and the
tests ask here, so a part is made one way wherever it runs.

Contract: each factory is a plain function `(cfg, ...parts) -> Part` with a precise
return type; every part's MailLog is a required argument (the entry point of a process
or command decides which log it writes: no part falls back to the process-wide one); a
factory does no I/O beyond what the part's constructor does (creating the spool's
directories, opening SQLite files lazily). Receiving and delivering are built apart
(`receiver()` / `delivery()`): a receiving worker never builds a courier or a scheduler,
and the scheduler gets its own submitter for bounces.
`preload(cfg)` imports, before a privilege drop, the optional drivers this config needs
(asyncpg, redis, delivery/oauth.py with Authlib): after the drop the Python installation
may no longer be readable. Authlib is imported only when [relay] smart_host_auth is
xoauth2 or oauthbearer (`oauth_tokens()`): it doubles a command's start-up CPU.
Failure policy: a factory raises what the part raises (a missing optional driver is a
start-up error with one line); only metrics, which never stop mail, degrade to None.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Literal

from authrelay.auth import pgusers
from authrelay.auth.authenticator import Authenticator, make_authenticator
from authrelay.auth.realms import RealmLogins
from authrelay.config import Config, SmartHostOAuth
from authrelay.delivery.bearer import Tokens
from authrelay.delivery.client import Courier
from authrelay.delivery.tlsrpt import Reporter as TlsReporter
from authrelay.dkim.signer import Signer
from authrelay.dns import Resolver
from authrelay.health import DependencyProbe
from authrelay.localsubmit import LocalSubmission
from authrelay.maillog import MailLog
from authrelay.metrics import Metrics
from authrelay.policy import recipients as recipients_mod
from authrelay.policy import shared as shared_mod
from authrelay.policy.anvil import SharedThrottle
from authrelay.policy.checks import HostChecks
from authrelay.policy.counters import SharedCounters
from authrelay.policy.known import KnownAddresses
from authrelay.policy.recipients import LocalRecipients
from authrelay.policy.suspender import HoldUser, Suspender, make_suspender
from authrelay.policy.throttle import KnownStore, LocalThrottle, Share, Throttle
from authrelay.scheduler import control
from authrelay.scheduler.scheduler import CourierLike, Scheduler
from authrelay.smtpd.handoff import Handoff
from authrelay.smtpd.server import Listener, SMTPServer
from authrelay.spool.store import Spool
from authrelay.spool.submit import Submitter
from authrelay.tls import CertStore

log = logging.getLogger(__name__)

__all__ = ["Listener", "authenticator", "containment", "courier", "dependency_probe",
           "host_checks", "known_addresses", "local_submission", "metrics", "oauth_tokens",
           "preload", "scheduler", "server", "shared_counters", "signer", "spool", "submitter",
           "throttle", "tls_report_resolver", "tls_reporter"]


# Modules the standard library imports on first use (the IDNA codec, multiprocessing's
# shared-memory locks), not at an import of ours: loaded by preload() too.
_FIRST_USE = ("encodings.idna", "multiprocessing.synchronize", "multiprocessing.heap")


def preload(cfg: Config) -> None:
    """Import the optional drivers `cfg` uses while the interpreter can read everything
    (before dropping privileges); a missing one is the start-up error it would be later.
    Every module of ours is already imported: this one imports them all."""
    for name in _FIRST_USE:
        importlib.import_module(name)
    if cfg.auth.backend == "postgresql":
        pgusers.driver()
    if cfg.limits.shared:
        shared_mod.driver()
    # Whether or not this config uses OAuth: a SIGHUP may switch a smart host to
    # xoauth2/oauthbearer after the drop, when the install may no longer be readable.
    # Only `serve` preloads, so the commands' start-up stays without Authlib.
    importlib.import_module("authrelay.delivery.oauth")  # see oauth_tokens()


# --------------------------------------------------------------------------- the spool

def spool(cfg: Config) -> Spool:
    """The queue under `cfg.spool_dir`, its directories made."""
    s = Spool(cfg.spool_dir)
    s.ensure_dirs()
    return s


def signer(cfg: Config, maillog: MailLog, *, report: bool = True) -> Signer:
    """The DKIM signer: the keys under `cfg.dkim_dir`, `[dkim]` (signs nothing without).
    `report`: it writes the keys' problems to the maillog at load and reload; in `serve`
    only the scheduler's does (the master, or the single process): one line a problem."""
    return Signer.from_config(cfg, maillog=maillog, report=report)


def submitter(cfg: Config, queue: Spool, maillog: MailLog, *,
              report_dkim: bool = True) -> Submitter:
    """The one way into the spool (SMTP sessions, sendmail, bounces), DKIM signing on;
    `report_dkim`: see signer()."""
    return Submitter(queue, cfg, maillog=maillog,
                     signer=signer(cfg, maillog, report=report_dkim))


# --------------------------------------------------------------------------- receiving

def authenticator(cfg: Config) -> Authenticator:
    """The authenticator `[auth] backend` names (userdb, saslauthd, dovecot, postgresql),
    taking `USER@REALM` logins for `[auth] realms` as USER (auth/realms.py)."""
    return RealmLogins(make_authenticator(cfg), cfg.auth.realms)


def known_addresses(cfg: Config) -> KnownAddresses:
    """The networks each user authenticated from lately (AUTH lockout exemption)."""
    return KnownAddresses(cfg.state_path / "known_addresses.db", cfg.auth.known_address_days)


def redis_counters(cfg: Config) -> shared_mod.SharedCounters | None:
    """The process's one Redis client for `[limits] shared` (its throttle and containment
    count through it, so Redis going away is one maillog line, one connection pool), or
    None without a farm."""
    return shared_mod.SharedCounters(cfg.limits.shared) if cfg.limits.shared else None


def throttle(cfg: Config, share: Share, known: KnownStore | None,
             redis: shared_mod.SharedCounters | None = None) -> Throttle:
    """The throttle for this process: its own counters, or the workers' shared memory
    (`share.shared`); with `[limits] shared` (a farm) that one under the Redis-backed
    variant (policy/shared.py), counting through `redis` when given."""
    local: Throttle
    if share.shared is not None:
        local = SharedThrottle(cfg, share.shared, known=known)
    else:
        local = LocalThrottle(cfg, share, known=known)
    if cfg.limits.shared:
        return shared_mod.make_redis_throttle(cfg, local, redis)
    return local


def shared_counters(workers: int) -> SharedCounters:
    """The workers' shared-memory counters: made in the master before forking, with a
    ledger row per worker (what a dead one held is given back)."""
    return SharedCounters(workers=workers)


def host_checks(cfg: Config) -> HostChecks | None:
    """Reverse DNS and DNSBL checks, or None when `[checks]` asks for neither."""
    if not cfg.checks.require_reverse_dns and not cfg.checks.dnsbl:
        return None
    return HostChecks(cfg)


def local_recipients(cfg: Config) -> LocalRecipients | None:
    """The valid recipients of the local domains (`[relay] local_recipients_file`), None
    when unset; RecipientsError (the file and why) when it cannot be used."""
    return recipients_mod.load(cfg)


def metrics(cfg: Config) -> Metrics | None:
    """The Prometheus counters, or None (no `[metrics] address`, or they cannot start:
    metrics never stop mail)."""
    if not cfg.metrics.address:
        return None
    try:
        return Metrics(cfg)
    except Exception:
        log.exception("metrics disabled")
        return None


def containment(cfg: Config, sub: Submitter, maillog: MailLog,
                metrics: Metrics | None, hold_user: HoldUser,
                redis: shared_mod.SharedCounters | None = None) -> Suspender | None:
    """Containment of compromised accounts (policy/suspender.py): counters and
    suspensions in state_dir/containment.db, PostgreSQL, Redis (through `redis`, the
    process's client, when given) as the config says; the admin's notice through `sub`;
    None when `[limits.containment] enabled = false`."""
    return make_suspender(cfg, submitter=sub, maillog=maillog, metrics=metrics,
                          hold_user=hold_user, redis=redis)


def server(cfg: Config, queue: Spool, certs: CertStore | None, *,
           share: Share | None = None, metrics: Metrics | None = None,
           auth: Authenticator | None | Literal["config"] = "config",
           checks: HostChecks | None | Literal["config"] = "config",
           recipients: LocalRecipients | None | Literal["config"] = "config",
           maillog: MailLog, handoff: Handoff | None = None) -> SMTPServer:
    """The receiving side of one process: its submitter, throttle and known-address store
    built here; `auth`, `checks` and `recipients` (the local recipients list: raises
    RecipientsError when it cannot be read) are what the config names unless given
    (None: none); `maillog` the one the caller's process writes; `handoff` the workers'
    (smtpd/handoff.py), adopted by this one, with several."""
    share = share or Share()
    known = known_addresses(cfg)
    sub = submitter(cfg, queue, maillog, report_dkim=False)  # the scheduler's reports
    if metrics is not None:  # the queue's "incoming" gauge
        sub.receiving = metrics.receiving
    redis = redis_counters(cfg)
    return SMTPServer(
        cfg, submitter=sub,
        authenticator=authenticator(cfg) if auth == "config" else auth,
        certs=certs, checks=host_checks(cfg) if checks == "config" else checks,
        metrics=metrics, known=known, throttle=throttle(cfg, share, known, redis),
        share=share, maillog=maillog,
        recipients=local_recipients(cfg) if recipients == "config" else recipients,
        handoff=handoff,
        # A trip asks this node's scheduler to hold the user's mail (control socket).
        containment=containment(cfg, sub, maillog, metrics,
                                lambda user: control.hold_user(queue, user), redis))


# --------------------------------------------------------------------------- delivering

def courier(cfg: Config, maillog: MailLog, read_password: Callable[[], str] | None = None,
            read_oauth_secret: Callable[[str], bytes] | None = None) -> Courier:
    """The outbound client; `read_password` and `read_oauth_secret` (given a smart_host
    entry: its OAuth client secret / key) read the smart host's credentials with
    privileges (the key helper) when they were dropped. A message converted for a host
    without 8BITMIME is re-signed by the DKIM signer (delivery/downgrade.py)."""
    c = Courier(cfg, maillog=maillog, signer=signer(cfg, maillog, report=False),
                tokens=oauth_tokens(cfg, read_oauth_secret))
    if read_password is not None:
        c.read_password = read_password
    return c


def oauth_tokens(cfg: Config, read_secret: Callable[[str], bytes] | None = None
                 ) -> dict[str, Tokens] | None:
    """Each smart_host entry authenticated with OAuth -> its token source (config.Relay.
    oauth_for: its [[relay.smart_host_oauth]] table, else the [relay] keys); entries with
    the same settings share one source, so one token serves them. None when no smart
    host uses OAuth. delivery/oauth.py (Authlib, httpx2, joserfc: ~0.3 s of CPU) is
    imported only here, so every command and a relay without OAuth never load it;
    preload() imports it first when it is needed, while everything is readable."""
    if not cfg.relay.uses_oauth():
        return None
    from authrelay.delivery import oauth

    timeout = min(30.0, cfg.delivery.connect_timeout)
    by_settings: dict[SmartHostOAuth, Tokens] = {}
    out: dict[str, Tokens] = {}
    for entry in cfg.relay.smart_host:
        settings = cfg.relay.oauth_for(entry)
        if settings is None:
            continue
        if settings not in by_settings:
            # The key helper finds the file from the settings' own table (`host`), or
            # the [relay] keys ("").
            read = None if read_secret is None else partial(read_secret, settings.host)
            by_settings[settings] = oauth.TokenSource(settings, read_secret=read,
                                                      timeout=timeout)
        out[entry] = by_settings[settings]
    return out


def scheduler(cfg: Config, queue: Spool, carrier: CourierLike,
              maillog: MailLog, *,
              metrics: Metrics | None = None) -> Scheduler:
    """The queue manager, with its own submitter for bounces (DKIM-signed when
    MAILER-DAEMON's domain has a key) and containment: a suspended user's mail is held
    instead of sent, and 5xx answers from the next hops count against its sender."""
    sched = Scheduler(cfg, queue, carrier, maillog, submitter=submitter(cfg, queue, maillog))
    sched.containment = containment(cfg, sched.submitter, maillog, metrics, sched.hold_user)
    return sched


def tls_reporter(cfg: Config, sched: Scheduler,
                 maillog: MailLog) -> TlsReporter | None:
    """RFC 8460 daily reports ([delivery] tls_reports), queued through the scheduler's
    submitter; None when off."""
    if not cfg.delivery.tls_reports:
        return None
    return TlsReporter(cfg, tls_report_resolver(cfg), sched.submitter, maillog)


def tls_report_resolver(cfg: Config) -> Resolver:
    """What the TLS-RPT reporter asks for `_smtp._tls` records: [delivery] nameservers
    and dns_timeout (a reload that changes them gives the reporter a new one)."""
    d = cfg.delivery
    return Resolver(list(d.nameservers), d.dns_timeout)


def local_submission(cfg: Config, maillog: MailLog) -> LocalSubmission:
    """`state_dir/public/submit.sock` (the master, or the single process): local users'
    `authrelay sendmail`, with its own spool handle and submitter (localsubmit.py)."""
    return LocalSubmission(cfg, submitter(cfg, spool(cfg), maillog, report_dkim=False),
                           maillog)


def dependency_probe(cfg: Config) -> DependencyProbe:
    """PostgreSQL and Redis as this node sees them: /health and the dependency_up gauges
    on the metrics listener (health.py); probes nothing when neither is configured."""
    return DependencyProbe(cfg)
