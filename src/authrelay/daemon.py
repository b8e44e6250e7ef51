"""Wiring and lifecycle: `authrelay serve`.

Owns process structure and signals. The parent binds every listening socket (so it may
start as root for ports 25/587/465), makes the self-signed certificate on a first start,
drops privileges (`user = "..."`), then:
- workers == 1: receiving and delivering share one event loop;
- workers  > 1: it forks that many receiving workers, each with its own SO_REUSEPORT
  socket per listener (the kernel spreads connections over them: all cores receive), and
  the parent itself runs the scheduler and outbound delivery. Workers hand messages over
  only through the spool (its notify socket wakes the scheduler at once).
Signals: SIGTERM/SIGINT stop accepting, let sessions finish up to `shutdown_timeout`, stop
the scheduler with the queue consistent. SIGHUP re-reads the config, the certificate
(next handshake uses it), reopens the maillog file; users are re-read on change anyway.
A worker that dies is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pwd
import signal
import sys
import time
from dataclasses import replace
from typing import Any

from authrelay import maillog as maillog_mod
from authrelay.config import EMBEDDED, Config, ConfigError, embedded_notice, load
from authrelay.policy.throttle import Share
from authrelay.smtpd.server import Listener, SMTPServer, bind
from authrelay.tls import CertStore, TLSConfigError, ensure_certificate

log = logging.getLogger(__name__)


def _use_uvloop() -> None:
    if os.environ.get("AUTHRELAY_NO_UVLOOP") == "1":
        return
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is optional
        pass


def _prepare_state(cfg: Config) -> None:
    d = cfg.state_path
    d.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(d, 0o700)  # queue and user DB: nobody else's business
    # The spool exists before any port listens: a client (or a test) that can connect
    # finds a server whose state is complete.
    from authrelay.spool.store import Spool

    Spool(cfg.spool_dir).ensure_dirs()


def _preload() -> None:
    """Import everything serving will need while we can still read any path (root)."""
    import importlib

    for mod in ("authrelay.auth.authenticator", "authrelay.auth.backends",
                "authrelay.spool.store", "authrelay.delivery.client",
                "authrelay.scheduler.scheduler", "authrelay.scheduler.control",
                "authrelay.policy.checks", "authrelay.policy.anvil", "authrelay.metrics",
                "uvloop", "aiosmtplib", "dns.asyncresolver", "argon2"):
        with contextlib.suppress(ImportError):
            importlib.import_module(mod)


def _drop_privileges(cfg: Config) -> None:
    if not cfg.user or os.geteuid() != 0:
        return
    _preload()
    pw = pwd.getpwnam(cfg.user)
    for root, dirs, files in os.walk(cfg.state_path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    with contextlib.suppress(OSError):
        os.chown(cfg.state_path, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir


def _make_spool(cfg: Config) -> Any:
    from authrelay.spool.store import Spool

    spool = Spool(cfg.spool_dir)
    spool.ensure_dirs()
    return spool


def _make_authenticator(cfg: Config) -> Any:
    from authrelay.auth.authenticator import make_authenticator

    return make_authenticator(cfg)


def _make_checks(cfg: Config) -> Any:
    if not cfg.checks.require_reverse_dns and not cfg.checks.dnsbl:
        return None
    from authrelay.policy.checks import HostChecks

    return HostChecks(cfg)


def _make_metrics(cfg: Config) -> Any:
    if not cfg.metrics.address:
        return None
    try:
        from authrelay.metrics import Metrics

        return Metrics(cfg)
    except Exception:  # metrics never stop mail
        log.exception("metrics disabled")
        return None


class _Receiver:
    """The receiving half (one per worker process, or inside the single process)."""

    def __init__(self, cfg: Config, listeners: list[Listener], share: Share) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.share = share
        self.server: SMTPServer | None = None

    async def start(self, spool: Any, certs: CertStore, metrics: Any) -> None:
        self.server = SMTPServer(
            self.cfg, spool=spool, authenticator=_make_authenticator(self.cfg),
            certs=certs, checks=_make_checks(self.cfg), metrics=metrics, share=self.share,
        )
        await self.server.start(self.listeners)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(self.cfg.shutdown_timeout)
            auth = self.server.authenticator
            if auth is not None:
                with contextlib.suppress(Exception):
                    auth.close()


async def _serve_loop(cfg: Config, config_path: str | None, listeners: list[Listener] | None,
                      share: Share, deliver: bool, workers: Any) -> int:
    """Run until SIGTERM: receiving (if listeners), delivering (if deliver)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    ml = maillog_mod.get()

    spool = _make_spool(cfg)
    certs = CertStore(cfg)
    metrics = _make_metrics(cfg)  # every process counts; the delivering one serves /metrics
    receiver = None
    if listeners is not None:
        receiver = _Receiver(cfg, listeners, share)
    scheduler = None
    if deliver:
        from authrelay.delivery.client import Courier
        from authrelay.scheduler.scheduler import Scheduler

        courier = Courier(cfg)  # Scheduler.start() runs spool.recover() itself
        scheduler = Scheduler(cfg, spool, courier, ml)
        if receiver is not None:
            spool.on_commit = scheduler.notify
        await scheduler.start()
        if metrics is not None:
            with contextlib.suppress(Exception):
                metrics.start(scheduler=scheduler, spool=spool)
    if receiver is not None:
        await receiver.start(spool, certs, metrics)
    role = "worker" if not deliver else ("master" if listeners is None else "single")
    ml.event(None, daemon=f"started ({role})", pid=os.getpid(),
             listeners=",".join(ln.name for ln in listeners) if listeners else None)

    async def watch_hup() -> None:
        nonlocal cfg
        while True:
            await hup.wait()
            hup.clear()
            ml.reopen()
            try:
                new = load(config_path)
                new = replace(new, listen=cfg.listen, state_dir=cfg.state_dir,
                              workers=cfg.workers, hostname=new.hostname)
                certs.reload(new)
                cfg = new
                if receiver is not None and receiver.server is not None:
                    receiver.server.reload(new)
                if scheduler is not None and hasattr(scheduler, "reload"):
                    scheduler.reload(new)
                ml.event(None, daemon="reloaded", pid=os.getpid())
            except (ConfigError, TLSConfigError, OSError) as e:
                ml.event(None, daemon="reload failed, keeping the running config",
                         error=str(e))
            for pid in list(workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    hup_task = loop.create_task(watch_hup())
    await stop.wait()
    ml.event(None, daemon="stopping", pid=os.getpid())
    for pid in list(workers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    hup_task.cancel()
    if receiver is not None:
        await receiver.stop()
    if scheduler is not None:
        await scheduler.stop()
    if metrics is not None:
        with contextlib.suppress(Exception):
            metrics.stop()
    ml.event(None, daemon="stopped", pid=os.getpid())
    ml.flush()
    return 0


def _worker_main(cfg: Config, config_path: str | None, listeners: list[Listener],
                 share: Share) -> None:
    _use_uvloop()
    code = 1
    try:
        code = asyncio.run(_serve_loop(cfg, config_path, listeners, share, False, []))
    except Exception:
        logging.getLogger(__name__).exception("worker failed")
    finally:
        maillog_mod.get().flush()
        os._exit(code)


def serve(cfg: Config, config_path: str | None = None) -> int:
    # A SIGHUP (logrotate, a cert renewal hook) between binding the ports and the event
    # loop installing its handler must not kill the daemon (the default action): ignore
    # it until then; the config was only just read anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _prepare_state(cfg)
    maillog_mod.configure(cfg.log.target, cfg.log.format)
    logging.basicConfig(level=getattr(logging, cfg.log.level.upper(), logging.INFO),
                        stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ensure_certificate(cfg)
    CertStore(cfg)  # fail fast on a bad or world-readable key, before binding anything
    if cfg.metrics.address:
        from authrelay import metrics

        metrics.prepare(cfg)  # before forking: all processes share one fresh directory
    nworkers = cfg.workers or (os.cpu_count() or 1)
    if nworkers <= 1:
        socks = [Listener(ln, bind(ln)) for ln in cfg.listen]
        _drop_privileges(cfg)
        _use_uvloop()
        return asyncio.run(_serve_loop(cfg, config_path, socks, Share(), True, []))
    # One SO_REUSEPORT socket per listener per worker, all bound before dropping root.
    per_worker = [[Listener(ln, bind(ln, reuse_port=True)) for ln in cfg.listen]
                  for _ in range(nworkers)]
    # Throttle counters shared by all workers (per-IP limits stay exact): made before fork.
    from authrelay.policy.anvil import SharedCounters

    shared = SharedCounters()
    _drop_privileges(cfg)
    pids: dict[int, int] = {}

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            for j, socks in enumerate(per_worker):
                if j != i:
                    for s in socks:
                        s.sock.close()
            _worker_main(cfg, config_path, per_worker[i], Share(i, nworkers, shared))
        pids[pid] = i

    for i in range(nworkers):
        spawn(i)
    stopping = False

    def reap() -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            i = pids.pop(pid, None)
            if i is not None and not stopping:
                maillog_mod.get().event(None, daemon=f"worker {pid} died; restarting")
                time.sleep(0.2)
                spawn(i)

    _use_uvloop()

    async def master() -> int:
        nonlocal stopping
        async def watch_children() -> None:
            # Polled, not a SIGCHLD handler: uvloop refuses handlers for SIGCHLD.
            while True:
                await asyncio.sleep(0.5)
                reap()

        watcher = asyncio.get_running_loop().create_task(watch_children())
        try:
            return await _serve_loop(cfg, config_path, None, Share(), True, pids)
        finally:
            stopping = True
            watcher.cancel()

    code = asyncio.run(master())
    deadline = time.monotonic() + cfg.shutdown_timeout + 10
    while pids and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            pids.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return code


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"authrelay: config error: {e}", file=sys.stderr)
        return 1
    if cfg.source == EMBEDDED:  # say so: an admin who meant /etc/... must notice (h12)
        print(embedded_notice(), file=sys.stderr, flush=True)
    if args.log_format:
        cfg = replace(cfg, log=replace(cfg.log, format=args.log_format))
    if args.workers is not None:
        cfg = replace(cfg, workers=args.workers)
    try:
        return serve(cfg, args.config)
    except TLSConfigError as e:
        print(f"authrelay: TLS: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"authrelay: {e}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the relay (listeners, queue, delivery)")
    p.add_argument("--log-format", choices=("text", "json"), help="maillog format")
    p.add_argument("--workers", type=int, help="receiving processes (0: one per core)")
    p.set_defaults(func=_cmd_serve)
