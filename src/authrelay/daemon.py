"""Process structure and lifecycle: `authrelay serve` (the parts come from wiring.py).

Owns process structure and signals (the whole privilege split: docs/PRIVILEGES.md).
Start, in this order, nothing bound or forked before the lock:
1. the instance lock `state_dir/authrelay.lock` (process.py): a second `serve` on the same
   state dir exits 1 with one line naming the holder, before touching anything;
2. state dirs, the maillog (a file target is created and given to `user` first), the
   self-signed certificate on a first start, the certificate and key read as root;
3. every listen address checked free without SO_REUSEPORT (another process there: exit 1,
   one line naming the address), then bound, both under the machine's bind lock; the key
   helper forked (root) when privileges are dropped; privileges dropped (`user = "..."`);
4. workers == 1: receiving and delivering share one event loop; workers > 1: that many
   receiving workers are forked, each with its own SO_REUSEPORT socket per listener (only
   this instance's sockets are in the group: the free check above), and the master runs
   the scheduler and outbound delivery. Workers hand messages over only through the spool.
Workers die with the master, whatever killed it: parent-death signal and a socketpair
they watch (process.py). A worker that dies is replaced (and logged with its status).
Signals: SIGTERM/SIGINT close every listening socket at once (the master's copies too:
new connections are refused, none wait in a backlog), let sessions finish up to
`shutdown_timeout`, stop the scheduler with the queue consistent. SIGHUP re-reads the
config (every key applied or named: reloadkeys.py) and the certificate (read with
privileges: by the key helper when dropped, so a root-only renewed key loads), reopens
the maillog file, and passes the new certificate to the workers over their socketpairs;
any failure is logged and the old state kept.
Every warning and error of every process (Python `logging` included, a worker's crash
too) is one maillog line; tracebacks go to stderr only with `[log] level = "debug"`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import pwd
import signal
import socket
import ssl
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from authrelay import maillog as maillog_mod
from authrelay import metrics as metrics_mod
from authrelay import owedlines, process, reloadkeys, sdnotify, stopdeadline, wiring
from authrelay.config import (
    EMBEDDED,
    MAX_WORKERS,
    Config,
    ConfigError,
    attempt_cut,
    embedded_notice,
    error_line,
    find_config_path,
    load,
    load_file,
    read_config_bytes,
)
from authrelay.delivery.client import Courier
from authrelay.localsubmit import LocalSubmission
from authrelay.metrics import Metrics
from authrelay.owedlines import OwedLines
from authrelay.policy.counters import SharedCounters
from authrelay.policy.recipients import LocalRecipients, RecipientsError, open_domains
from authrelay.policy.throttle import Share
from authrelay.process import Channel, InstanceBusy, KeyHelper, StartError
from authrelay.smtpd.handoff import Handoff
from authrelay.smtpd.server import Listener, SMTPServer, bind
from authrelay.spool import abandoned
from authrelay.spool.abandoned import AbandonedBook, Slot
from authrelay.spool.store import Spool, is_queue_id
from authrelay.tls import (
    PEM,
    CertStore,
    TLSConfigError,
    ensure_certificate,
    read_pem,
    warn_certificate,
)

uvloop: types.ModuleType | None
try:  # a dependency everywhere but Windows (pyproject.toml); asyncio's loop without it
    import uvloop
except ImportError:  # pragma: no cover - depends on the platform
    uvloop = None

log = logging.getLogger(__name__)


def _use_uvloop() -> None:
    if os.environ.get("AUTHRELAY_NO_UVLOOP") == "1" or uvloop is None:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _prepare_state(cfg: Config) -> None:
    d = cfg.state_path
    d.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        # Searchable, not listable: local users reach public/submit.sock (localsubmit.py);
        # every other entry is 0700/0600, nobody else's business.
        os.chmod(d, 0o711)
    # The spool exists before any port listens: a client (or a test) that can connect
    # finds a server whose state is complete.
    Spool(cfg.spool_dir).ensure_dirs()


def _dropping(cfg: Config) -> bool:
    return bool(cfg.user) and os.geteuid() == 0


def _user(cfg: Config) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(cfg.user)
    except KeyError:
        raise StartError(f"user {cfg.user!r}: no such user") from None


def _log_file(cfg: Config) -> str | None:
    return cfg.log.target[5:] if cfg.log.target.startswith("file:") else None


def _prepare_log_file(cfg: Config) -> None:
    """A file target exists before the maillog opens it, and belongs to the user the
    processes run as after the drop (so a SIGHUP reopen after logrotate works)."""
    path = _log_file(cfg)
    if path is None or not _dropping(cfg):
        return
    pw = _user(cfg)
    try:
        fd = process.open_log_file(path, (pw.pw_uid, pw.pw_gid))
    except OSError as e:
        raise StartError(f"log.target {path}: {e.strerror or e}") from None
    os.close(fd)


def _drop_privileges(cfg: Config) -> None:
    if not _dropping(cfg):
        return
    # Everything of ours is imported (wiring.py imports every part at module level); the
    # optional drivers this config uses and prctl are loaded now, while readable.
    wiring.preload(cfg)
    process.preload()
    pw = pwd.getpwnam(cfg.user)
    # Everything under the state dir (spool, users.db, the instance lock, metrics, the
    # self-signed certificate) is written by the dropped processes: theirs.
    # Never through a link (lchown): the dropped user owns this tree, and a link it left
    # here to /etc/shadow must not be handed to it by root at the next start.
    for root, dirs, files in os.walk(cfg.state_path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid,
                         follow_symlinks=False)
    with contextlib.suppress(OSError):
        os.chown(cfg.state_path, pw.pw_uid, pw.pw_gid)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir


# --------------------------------------------------------------------------- logging

QUEUE_ID_FIELD = "queue_id"  # logging `extra` key naming the message a record is about
LOCAL_RETRY = 10.0  # seconds between tries of a local submission socket the start could not make

class MaillogHandler(logging.Handler):
    """Python `logging` records at WARNING and above as one maillog line each:
    `NOQUEUE: warning=LOGGER: MESSAGE` / `error=...`; an exception adds its type and text,
    never its traceback (that goes to stderr only at debug level). A record about one
    message carries `extra={"queue_id": QID}`: its line starts with that queue id, as
    every line about a message (`QID: warning=LOGGER: MESSAGE`, the text unchanged)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            qid = record.__dict__.get(QUEUE_ID_FIELD)
            if not isinstance(qid, str) or not qid:
                qid = None
            if record.exc_info and record.exc_info[1] is not None:
                e = record.exc_info[1]
                text = f"{text}: {maillog_mod.exc_text(e)}"
            text = f"{record.name}: {text}"
            ml = maillog_mod.get()
            if record.levelno >= logging.ERROR:
                ml.error(text, queue_id=qid)
            else:
                ml.warning(text, queue_id=qid)
        except Exception:  # logging must never break mail flow
            pass


def _setup_logging(cfg: Config) -> None:
    level = getattr(logging, cfg.log.level.upper(), logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    ml_handler = MaillogHandler(max(level, logging.WARNING))
    root.addHandler(ml_handler)
    if level <= logging.DEBUG:  # tracing, with tracebacks, only when asked for
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(h)
    root.setLevel(min(level, logging.WARNING))
    warnings.showwarning = _show_warning  # warnings.warn() too, one line each

    def excepthook(tp: Any, value: BaseException, tb: Any) -> None:
        logging.getLogger("authrelay").error("uncaught exception", exc_info=(tp, value, tb))
        # The one who ran `serve` sees why it stopped, in one line, whatever the target.
        with contextlib.suppress(Exception):
            maillog_mod.get().flush(1.0)
            if level > logging.DEBUG:
                print(f"authrelay: fatal: {_one_line(value)} (see the maillog)", file=sys.stderr)

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("authrelay").error(
            "uncaught exception in thread %s", name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable_hook(u: Any) -> None:
        # An exception Python cannot raise (in a __del__, a finalizer, a generator the
        # collector closes): by default a multi-line traceback on stderr, beside the
        # target. One line, as Python words it: `Exception ignored in: OBJECT: TYPE: TEXT`.
        text = u.err_msg or "Exception ignored in"
        if u.object is not None:
            try:
                text += f": {u.object!r}"
            except Exception:  # its __repr__ fails too: the type will do
                text += f": {type(u.object).__name__} object"
        exc = u.exc_value
        logging.getLogger("authrelay").error(
            "%s", text, exc_info=(u.exc_type, exc, u.exc_traceback) if exc is not None
            else None)

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A Python warning (a library's DeprecationWarning, ResourceWarning) as one maillog
    line, `warning=py.warnings: FILE:LINE: CATEGORY: MESSAGE`: logging.captureWarnings
    logs warnings.formatwarning()'s text, which ends with a newline and the source line
    (`\\x0a  warnings.warn(...)\\x0a` in the line)."""
    logging.getLogger("py.warnings").warning("%s:%d: %s: %s", filename, lineno,
                                             category.__name__, message)


def _loop_exception_handler(loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
    """An exception nobody awaited (a task, a callback): one maillog error line."""
    exc = ctx.get("exception")
    msg = ctx.get("message", "event loop error")
    logging.getLogger("authrelay.loop").error(
        msg, exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)


# --------------------------------------------------------------------------- components

async def _start_local_submission(cfg: Config, ml: maillog_mod.MailLog, say: bool = True
                                  ) -> LocalSubmission | None:
    """state_dir/public/submit.sock for every local user (localsubmit.py); a failure is
    one error line (`say`; local users then get 75), never a refused start."""
    try:
        local = wiring.local_submission(cfg, ml)
        await local.start()
    except Exception as e:
        if say:
            ml.error(f"local submission socket not available: {_one_line(e)} "
                     f"(tried again every {LOCAL_RETRY:g} s)")
        return None
    return local


class _Receiver:
    """The receiving half (one per worker process, or inside the single process)."""

    def __init__(self, cfg: Config, listeners: list[Listener], share: Share,
                 handoff: Handoff | None = None) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.share = share
        self.handoff = handoff
        self.server: SMTPServer | None = None

    async def start(self, spool: Spool, certs: CertStore, metrics: Metrics | None,
                    ml: maillog_mod.MailLog, recipients: LocalRecipients | None) -> None:
        self.server = wiring.server(self.cfg, spool, certs, share=self.share, metrics=metrics,
                                    maillog=ml, recipients=recipients,
                                    handoff=self.handoff)
        await self.server.start(self.listeners)

    def close_listeners(self) -> None:
        """Close the listening sockets now (synchronously): the kernel refuses new
        connections from here on and resets those still waiting in the backlog."""
        if self.server is not None:
            self.server.close_listeners()
        for ln in self.listeners:
            with contextlib.suppress(OSError):
                ln.sock.close()

    async def stop(self) -> None:
        self.close_listeners()
        if self.server is not None:
            await self.server.stop(self.cfg.shutdown_timeout)
            auth = self.server.authenticator
            if auth is not None:  # (its databases' close writes: off the loop, bounded)

                def close() -> None:
                    with contextlib.suppress(Exception):
                        auth.close()

                await stopdeadline.off_loop(close, "auth-close", stopdeadline.DISK_WAIT)


@dataclass
class _Run:
    """What one process of the instance runs, and the live state a reload replaces."""

    cfg: Config
    config_path: str | None
    pem: PEM
    role: str  # single | master | worker
    listeners: list[Listener] | None = None
    # The local recipients list (policy/recipients.py), read at start after the drop
    # (workers inherit it) and again at every reload.
    recipients: LocalRecipients | None = None
    share: Share = field(default_factory=Share)
    handoff: Handoff | None = None  # worker: newcomers passed between workers
    # How the certificate and key are read on SIGHUP (privileged: the key helper).
    read_keys: Callable[[Config], PEM] = read_pem
    # The smart host password as root (the key helper) when privileges were dropped.
    read_password: Callable[[], str] | None = None
    # A smart host's OAuth client secret or signing key, likewise (delivery/oauth.py);
    # given the `host` of its [[relay.smart_host_oauth]] table ("" for the [relay] keys).
    read_oauth_secret: Callable[[str], bytes] | None = None
    # The maillog file opened by the key helper (root) on SIGHUP: a descriptor.
    open_log: Callable[[], int] | None = None
    # The config file's bytes as root (the key helper), for a reload the dropped process
    # may not read itself.
    read_config: Callable[[], bytes] | None = None
    channel: socket.socket | None = None  # worker: its end of the master's socketpair
    helper_pid: int = 0  # the key helper (privileges dropped), watched by master or single
    exited: dict[int, int] = field(default_factory=dict)  # master: other children's status
    workers: dict[int, _Worker] = field(default_factory=dict)  # master: pid -> worker
    master_sockets: list[socket.socket] = field(default_factory=list)  # closed on stop
    stopping: bool = False  # SIGTERM seen: a worker that exits now is not replaced
    # master: told when a worker died (the scheduler sweeps the files it was receiving)
    receiver_died: Callable[[int], None] | None = None
    # This process's slot of the abandoned-commits book (spool/abandoned.py): the id of
    # each commit its sessions give up, kept past a kill of the whole server.
    abandoned_slot: Slot | None = None
    # master or single: the ids a killed instance gave up whose files are still there
    # (its scheduler drops them, never delivered); master: told those of a dead worker.
    abandoned: list[str] = field(default_factory=list)
    abandoned_by_dead: Callable[[str], None] | None = None


# Keys given on the serve command line (--workers, --log-format): the file's value is not
# what runs, so a difference is no news.
_cli_overrides: frozenset[str] = frozenset()


def _read_config(run: _Run) -> bytes | None:
    """The config file's bytes for a reload (blocking); None: no file (the embedded
    default). A file the dropped process may not read (0600 root: it holds a database
    password, docs/SCALING.md) comes through the root key helper, which checks it loads;
    otherwise every SIGHUP failed `cannot read: Permission denied` and nothing, not even
    a renewed certificate, was applied until a restart."""
    path = find_config_path(run.config_path)
    if path is None:
        return None
    try:
        return read_config_bytes(path)
    except PermissionError:
        if run.read_config is None:
            raise ConfigError("cannot read: Permission denied", path) from None
        try:
            return run.read_config()
        except OSError as e:  # the helper's reason names the file
            raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path) from None


def _reload_config(run: _Run, raw: bytes | None) -> Config:
    """The config from `raw` (the file's bytes, _read_config; None: the embedded default)
    with every restart-only key kept as it runs (reloadkeys.py); each such key changed in
    the file is one maillog line, said by the process that reads it first (master or
    single) at every reload until a restart."""
    path = find_config_path(run.config_path)
    new = load_file(path, raw) if path is not None and raw is not None else Config()
    try:
        kept = reloadkeys.reloaded(run.cfg, new)
    except ConfigError as e:
        raise ConfigError(e.detail, path) from None
    if run.role != "worker":
        for key in reloadkeys.restart_changes(run.cfg, new, ignore=_cli_overrides):
            maillog_mod.get().warning(f"reload: {key} needs a restart")
    return kept


async def _serve_loop(run: _Run) -> int:
    """Run until SIGTERM: receiving (if listeners), delivering (unless a worker)."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_exception_handler)
    stop = asyncio.Event()
    hup = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ml = maillog_mod.get()

    def arm_deadline() -> None:
        # Whatever it waits for from here (a frozen spool holds threads in the kernel),
        # the process ends by this deadline, with a line naming what it could not finish.
        stopdeadline.arm(stopdeadline.deadline(run.cfg.shutdown_timeout, run.role),
                         ml.error, ml.flush)

    def stop_held() -> None:
        """The stop of a SIGTERM the loop did not take (held in the kernel): the deadline
        from now, the workers told now (their own stops run), the loop's stop queued."""
        arm_deadline()
        for pid in list(run.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(stop.set)

    stopdeadline.watch(stop_held)
    deliver = run.role != "worker"
    if run.role == "worker":
        # A worker reloads when its master says so (with the certificate the master had
        # read with privileges); a stray SIGHUP (pkill -HUP) must not kill it.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        if _early_hup:  # a reload asked for during the start: done first thing
            hup.set()
    cfg = run.cfg

    spool = wiring.spool(cfg)
    spool.notifier.book = run.abandoned_slot
    metrics = wiring.metrics(cfg)  # every process counts; the delivering one serves /metrics
    receiver = certs = None
    if run.listeners is not None:
        certs = CertStore(cfg, run.pem)
        receiver = _Receiver(cfg, run.listeners, run.share, run.handoff)
    scheduler = None
    reporter = None
    local = None
    local_retry: asyncio.Task[None] | None = None
    probe = None

    async def retry_local() -> None:
        """A socket the start could not make (the state dir out of inodes, no file
        descriptor left) is tried again, so local users' 75 ends without a restart."""
        nonlocal local
        while local is None:
            await asyncio.sleep(LOCAL_RETRY)
            local = await _start_local_submission(run.cfg, ml, say=False)
        ml.warning("local submission socket available again")
    if deliver:
        # Scheduler.start() runs spool.recover() itself
        scheduler = wiring.scheduler(cfg, spool, wiring.courier(cfg, ml, run.read_password,
                                                                run.read_oauth_secret),
                                     ml, metrics=metrics)
        if receiver is not None:
            spool.on_commit = scheduler.notify
        if run.role == "master":
            # Before start(): a worker reaped while the scheduler starts (its recovery
            # done, the queue being scanned) is told too, or its unfinished files waited
            # for the rescan's sweep (Scheduler.receiver_died works from start()'s first
            # step; the watcher reaps only while start() awaits).
            run.receiver_died = scheduler.receiver_died
            run.abandoned_by_dead = scheduler.abandoned
        scheduler.abandoned_at_start(run.abandoned)
        await scheduler.start()
        reporter = wiring.tls_reporter(cfg, scheduler, ml)  # RFC 8460 (tls_reports)
        if reporter is not None:
            reporter.start()
        local = await _start_local_submission(cfg, ml)
        if local is None:
            local_retry = loop.create_task(retry_local())
        probe = wiring.dependency_probe(cfg)
        await probe.start()
        if metrics is not None:
            with contextlib.suppress(Exception):
                metrics.start(scheduler=scheduler, spool=spool, health=probe)
    if receiver is not None and certs is not None:
        await receiver.start(spool, certs, metrics, ml, run.recipients)

    def new_courier(new: Config) -> Courier | None:
        """The courier deliveries use after a reload to `new`, None to keep the running
        one; raises on a config it refuses. Built before the key helper is asked for the
        certificate (the helper takes that request as the reload's file becoming the
        running one, process.py), so a refusal here leaves the helper's secrets alone."""
        old = run.cfg
        if scheduler is None or (new.relay, new.delivery, new.hostname) == (
                old.relay, old.delivery, old.hostname):
            return None
        # A smart host added, changed or removed, new TLS or DNS settings: the next
        # delivery uses a courier built from the new config.
        return _new_courier(new, ml, run)

    async def read_recipients(new: Config) -> LocalRecipients | None:
        """The local recipients list of `new`, re-read at every reload (the file's
        contents may have changed, its name not), in every process; RecipientsError
        refuses the reload. Read and parsed in a thread: 200,000 entries take seconds,
        and on the event loop every session of the process waited for them."""
        return await loop.run_in_executor(None, wiring.local_recipients, new)

    def apply(new: Config, pem: PEM, courier: Courier | None,
              recipients: LocalRecipients | None) -> None:
        """Every reloadable key (reloadkeys.py) reaches the part that reads it; `courier`:
        new_courier(new); `recipients`: read_recipients(new). All or nothing: what can
        refuse the new config (the TLS context, the courier, the host checks, the
        recipients list) is built before anything is replaced, so a refusal (raised: one
        maillog line) leaves the running config whole, in this process and, as the master
        then sends nothing, in the workers."""
        old = run.cfg
        tls_ctx = certs.prepare(new, pem) if certs is not None else None
        srv = receiver.server if receiver is not None else None
        checks = srv.checks if srv is not None else None
        if srv is not None and _checks_keys(new) != _checks_keys(old):
            checks = wiring.host_checks(new)
        report_resolver = wiring.tls_report_resolver(new) if reporter is not None and (
            _dns_keys(new) != _dns_keys(old)) else None
        # Nothing below refuses a config that loaded.
        if certs is not None and tls_ctx is not None:
            certs.use(*tls_ctx)  # a new context: any key type, the new min_version
        if receiver is not None and srv is not None:
            receiver.cfg = new
            srv.reload(new, recipients)
            if srv.authenticator is not None:
                srv.authenticator.reload(new)
            srv.checks = checks
        if scheduler is not None:
            scheduler.reload(new)
            if courier is not None:
                scheduler.use_courier(courier)
        if reporter is not None:  # RFC 8460 reports: the new hostname and nameservers
            reporter.reload(new, report_resolver)
        if local is not None:
            local.reload(new)
        run.cfg, run.pem, run.recipients = new, pem, recipients

    if run.role == "worker" and run.channel is not None:
        def on_message(kind: bytes, payload: bytes, fds: list[int]) -> None:
            if kind == b"R" and fds:  # the reload in a memory file (any size)
                fd = fds.pop(0)
                try:
                    payload = process.read_fd(fd)
                except OSError as e:
                    payload = b""  # unpack_reload fails below: logged, old config kept
                    ml.error(f"cannot read the reload: {_one_line(e)}", pid=os.getpid())
                finally:
                    os.close(fd)
            if kind == b"L" and fds:
                try:
                    ml.reopen(fd=fds.pop(0))
                except Exception as e:
                    ml.error(f"cannot reopen the maillog: {_one_line(e)}", pid=os.getpid())
            for fd in fds:
                os.close(fd)
            if kind == b"O":
                _reopen_maillog(ml)
            if kind != b"R":
                return
            reload_task = loop.create_task(worker_reload(payload))
            reload_tasks.add(reload_task)
            reload_task.add_done_callback(reload_tasks.discard)

        reload_tasks: set[asyncio.Task[None]] = set()
        reloads = asyncio.Lock()  # FIFO: reloads apply in the order the master sent them

        async def worker_reload(payload: bytes) -> None:
            async with reloads:
                try:
                    raw, pem = process.unpack_reload(payload)
                    new = _reload_config(run, raw)
                    apply(new, pem, None, await read_recipients(new))  # a worker: no courier
                    ml.daemon("reloaded", pid=os.getpid())
                except Exception as e:
                    ml.daemon("reload failed, keeping the running config",
                              error=_one_line(e), pid=os.getpid())

        def master_gone() -> None:
            # The parent-death signal normally got here first; this is the second path.
            ml.warning("master process is gone; worker exiting", pid=os.getpid())
            if receiver is not None:
                receiver.close_listeners()
            ml.flush(0.5)
            os._exit(1)

        process.watch(loop, run.channel, on_message, master_gone)

    if run.helper_pid:
        _watch_helper(loop, run, ml)
    ml.daemon(f"started ({run.role})", pid=os.getpid(),
              listeners=",".join(ln.name for ln in run.listeners) if run.listeners else None,
              # Local domains where mail from anyone reaches any local part (no
              # local_recipients_file, or `@domain` in it): the backscatter risk, said.
              any_local_part=",".join(open_domains(cfg, run.recipients)) or None)
    if run.role != "worker":  # systemd Type=notify
        sdnotify.ready(f"serving ({run.role})")

    async def watch_hup() -> None:
        while True:
            await hup.wait()
            hup.clear()
            sdnotify.reloading()
            # Nothing in here may end this task: every failure is one maillog line and the
            # running state stays.
            await _reopen_all_maillogs(run, ml)
            try:
                raw = await loop.run_in_executor(None, _read_config, run)
                new = _reload_config(run, raw)
                courier = new_courier(new)
                try:
                    pem = await loop.run_in_executor(None, run.read_keys, new)
                    apply(new, pem, courier, await read_recipients(new))
                    warn_certificate(new, pem)
                    _warn_attempt_cut(new)
                except Exception:
                    if courier is not None:
                        await courier.close()
                    raise
                ml.daemon("reloaded", pid=os.getpid())
                sdnotify.ready("reloaded")
            except Exception as e:
                ml.daemon("reload failed, keeping the running config", error=_one_line(e),
                          pid=os.getpid())
                sdnotify.ready("reload failed, running the previous config")
                continue
            if run.workers:
                _send_reload(run, ml, process.pack_reload(raw, run.pem))

    hup_task = loop.create_task(watch_hup())
    await stop.wait()
    arm_deadline()
    # Refuse new connections at once, in every process holding a listening socket.
    for s in run.master_sockets:
        with contextlib.suppress(OSError):
            s.close()
    if receiver is not None:
        receiver.close_listeners()
    for pid in list(run.workers):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    run.stopping = True
    if probe is not None:
        probe.stopping = True  # /health: 503 "stopping", the load balancer drains us
    ml.daemon("stopping", pid=os.getpid())
    # systemd waits until this process's own forced end, and STOP_OVERRUN more, before
    # its SIGKILL: whatever the unit's TimeoutStopSec, shutdown_timeout decides the stop.
    sdnotify.stopping(stopdeadline.deadline(run.cfg.shutdown_timeout, run.role)
                      + stopdeadline.STOP_OVERRUN)
    hup_task.cancel()

    async def stop_delivering() -> None:
        if scheduler is not None:
            await scheduler.stop()
            if isinstance(scheduler.courier, Courier):
                # QUIT idle connections; the TLS-RPT tally since its last save goes to disk.
                await scheduler.courier.close()

    if local_retry is not None:
        local_retry.cancel()
    # Sessions, local submissions and deliveries drain together, each up to
    # shutdown_timeout: one after the other they took up to three times it (past
    # contrib's TimeoutStopSec), and the scheduler took new work while sessions drained.
    await asyncio.gather(*(part.stop() for part in (local, receiver, reporter)
                           if part is not None), stop_delivering())
    if run.workers:
        # `stopped` means stopped: the workers finish their sessions first (each up to
        # shutdown_timeout); one still there 10 s later (stopped, hung in the kernel) is
        # killed, with a line, and reaped (_serve_master's watch_children) before it.
        grace = stopdeadline.deadline(run.cfg.shutdown_timeout, "worker")
        deadline = time.monotonic() + grace
        while run.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for pid in list(run.workers):
            ml.error(f"worker {pid} had not stopped {grace:g} s after SIGTERM "
                     f"(shutdown_timeout = {run.cfg.shutdown_timeout:g} s + "
                     f"{stopdeadline.STOP_OVERRUN:g} s); killed (SIGKILL)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while run.workers and time.monotonic() < deadline + 2:  # (SIGKILL: at once)
            await asyncio.sleep(0.1)
        for pid in list(run.workers):
            ml.error(f"worker {pid} killed and not gone: a thread of it is held in the "
                     "kernel (a write to a frozen filesystem?) and ends at the thaw; it "
                     "runs nothing more")
    if probe is not None:
        await probe.stop()
    if metrics is not None:
        with contextlib.suppress(Exception):
            metrics.stop()
    ml.daemon("stopped", pid=os.getpid())
    ml.flush()
    return 0


def _watch_helper(loop: asyncio.AbstractEventLoop, run: _Run, ml: maillog_mod.MailLog
                  ) -> None:
    """One error line when the key helper dies (kill -9, the OOM killer), said when it
    happens: the dropped processes cannot start another, so until a restart every reload
    fails (the certificate, the config, the log file after logrotate) and a root-only smart
    host secret cannot be read (process.HelperGone names it then)."""
    pid = run.helper_pid
    fd = os.pidfd_open(pid)

    def died() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # the master's reap() was first
            done, status = pid, run.exited.pop(pid, 0)
        how = f" ({_status(status)})" if done else ""
        if not run.stopping:
            ml.error(f"key helper {pid} died{how}: until authrelay is restarted, reloads "
                     "fail and root-only files (certificate key, config, smart host "
                     "secrets, the log file after logrotate) cannot be read")

    loop.add_reader(fd, died)


def _checks_keys(cfg: Config) -> tuple[object, ...]:
    """What the host checks are built from: [checks], and the resolver they ask
    ([delivery] nameservers, dns_timeout)."""
    return cfg.checks, cfg.delivery.nameservers, cfg.delivery.dns_timeout


def _warn_attempt_cut(cfg: Config) -> None:
    """One maillog warning per start and per reload (master or single process) when a
    configured wait works only up to [delivery] attempt_timeout (config.attempt_cut): a
    release-before config's long data_timeout would otherwise be cut silently."""
    problem = attempt_cut(cfg)
    if problem is not None:
        maillog_mod.warning(f"delivery.attempt_timeout: {problem}")


def _dns_keys(cfg: Config) -> tuple[object, ...]:
    """What the TLS-RPT reporter's resolver is built from (wiring.tls_report_resolver)."""
    return cfg.delivery.nameservers, cfg.delivery.dns_timeout


def _new_courier(cfg: Config, ml: maillog_mod.MailLog, run: _Run) -> Courier:
    """The courier of a reloaded config. A smart_host_ca_file it cannot load is refused
    naming the key and the file (OpenSSL's error names neither)."""
    ca = cfg.relay.smart_host_ca_file
    if ca:
        try:
            ssl.create_default_context(cafile=ca)
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
            raise ConfigError(f"relay.smart_host_ca_file: {ca}: cannot load: {why}"
                              ) from None
    return wiring.courier(cfg, ml, run.read_password, run.read_oauth_secret)


def _send_reload(run: _Run, ml: maillog_mod.MailLog, message: bytes) -> None:
    """The reload to every worker, as a memory file: one datagram on the socketpair could
    not carry a config larger than its send buffer (the workers missed such reloads)."""
    try:
        fd = process.message_fd(message)
    except OSError as e:
        ml.warning(f"workers missed the reload: {_one_line(e)}")
        return
    try:
        _send_fd_to_workers(run, ml, b"R", fd, "missed the reload")
    finally:
        os.close(fd)


def _send_fd_to_workers(run: _Run, ml: maillog_mod.MailLog, kind: bytes, fd: int,
                        failed: str) -> None:
    """`fd` to every worker as a `kind` message; a worker it cannot reach is one warning
    line (`worker PID <failed>: reason`), the others still get it."""
    for w in list(run.workers.values()):
        try:
            process.send_fd(w.channel.master, kind, fd)
        except OSError as e:
            ml.warning(f"worker {w.pid} {failed}: {_one_line(e)}")


async def _reopen_all_maillogs(run: _Run, ml: maillog_mod.MailLog) -> None:
    """SIGHUP in the master (or single process): the log file after logrotate. Privileges
    dropped: the key helper opens (creates) it for the user, this process takes a copy of
    the descriptor and passes one to every worker; else each process reopens the path."""
    if run.open_log is None or _log_file(run.cfg) is None:
        _reopen_maillog(ml)
        for w in list(run.workers.values()):
            with contextlib.suppress(OSError):
                process.send(w.channel.master, b"O")  # reopen the path yourself
        return
    try:
        fd = await asyncio.get_running_loop().run_in_executor(None, run.open_log)
    except Exception as e:
        ml.error(f"cannot reopen the maillog, still writing the old file: {_one_line(e)}",
                 pid=os.getpid())
        return
    try:
        _send_fd_to_workers(run, ml, b"L", fd, "keeps its old log file")
        ml.reopen(fd=os.dup(fd))
    except Exception as e:
        ml.error(f"cannot reopen the maillog: {_one_line(e)}", pid=os.getpid())
    finally:
        os.close(fd)


def _reopen_maillog(ml: maillog_mod.MailLog) -> None:
    try:
        ml.reopen()
    except Exception as e:
        ml.error(f"cannot reopen the maillog, still writing the old file: {_one_line(e)}",
                 pid=os.getpid())


def _one_line(e: BaseException) -> str:
    text = str(e).replace("\n", " ").strip()
    if isinstance(e, ConfigError | TLSConfigError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _worker_main(run: _Run) -> None:
    _use_uvloop()
    code = 1
    try:
        code = asyncio.run(_serve_loop(run))
    except Exception:
        logging.getLogger("authrelay.worker").exception("worker %d failed", os.getpid())
    finally:
        maillog_mod.get().flush()
        os._exit(code)


@dataclass
class _Worker:
    index: int
    pid: int
    channel: Channel
    started: float = field(default_factory=time.monotonic)


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _bind_all(cfg: Config, nworkers: int) -> list[list[Listener]]:
    """Check every address is free (no other process, SO_REUSEPORT or not), then bind,
    all under the machine's bind lock (another instance checks only after we bound)."""
    with process.bind_lock():
        for ln in cfg.listen:
            fam = socket.AF_INET6 if ":" in ln.host else socket.AF_INET
            process.check_address_free(fam, ln.host, ln.port, ln.address)
        return _bind_listeners(cfg, nworkers)


def _bind_listeners(cfg: Config, nworkers: int) -> list[list[Listener]]:
    made: list[list[Listener]] = []
    try:
        for _ in range(nworkers):
            row = []
            for ln in cfg.listen:
                try:
                    row.append(Listener(ln, bind(ln, reuse_port=nworkers > 1)))
                except OSError as e:
                    raise InstanceBusy(f"cannot listen on {ln.address}: {e.strerror}") from None
            made.append(row)
    except BaseException:
        for row in made:
            for x in row:
                x.sock.close()
        raise
    return made


# A SIGHUP seen before the event loop handles them (serve() to _serve_loop).
_early_hup = False


def _remember_hup(_sig: int, _frame: object) -> None:
    global _early_hup
    _early_hup = True


def serve(cfg: Config, config_path: str | None = None) -> int:
    # A SIGHUP (logrotate, a cert renewal hook) between here and the event loop installing
    # its handler must not kill the daemon (the default action), nor be lost: the start
    # can take a while (a large queue recovered), and a config edited, a certificate
    # renewed or a maillog rotated meanwhile would go unseen until the next SIGHUP. It is
    # remembered, and the master (or single process) reloads once its loop is up.
    global _early_hup
    _early_hup = False
    signal.signal(signal.SIGHUP, _remember_hup)
    dropping = _dropping(cfg)
    if dropping:
        _user(cfg)  # an unknown user: one line before anything happens
    d = cfg.state_path
    d.mkdir(parents=True, exist_ok=True)
    lock_fd = process.acquire_instance_lock(d)  # before binding or forking anything
    process.set_name("authrelay")  # ps: authrelay, authrelay-keys, authrelay-w0 ...
    process.return_big_allocations()  # argon2's 19 MiB per hash is given back (bench f)
    try:
        return _serve_locked(cfg, config_path, dropping)
    finally:
        os.close(lock_fd)


def _serve_locked(cfg: Config, config_path: str | None, dropping: bool) -> int:
    _prepare_state(cfg)
    _prepare_log_file(cfg)
    try:
        ml = maillog_mod.configure(cfg.log.target, cfg.log.format)
    except OSError as e:  # the file's directory missing or not ours: one line naming the key
        raise StartError(f"log.target {_log_file(cfg)}: {e.strerror or e}") from None
    try:
        return _serve_logging(cfg, config_path, dropping)
    except (StartError, TLSConfigError, OSError) as e:
        # Said on stderr by _cmd_serve; a file or syslog target gets it too, else the admin
        # reading the maillog after a restart sees the last 'stopped' and nothing since.
        if ml.target not in ("stdout", "stderr"):
            ml.daemon("start failed", error=start_error_line(e), pid=os.getpid())
            ml.flush()
        raise


def start_error_line(e: BaseException) -> str:
    """The one line a refused start prints after `authrelay: `."""
    return f"TLS: {e}" if isinstance(e, TLSConfigError) else str(e)


def _serve_logging(cfg: Config, config_path: str | None, dropping: bool) -> int:
    """serve once the maillog is open."""
    _setup_logging(cfg)
    ensure_certificate(cfg)
    pem = read_pem(cfg)  # as root: fail fast on a bad key, before binding anything
    warn_certificate(cfg, pem)
    _warn_attempt_cut(cfg)
    if cfg.metrics.address:
        metrics_mod.prepare(cfg)  # before forking: all processes share one fresh directory
    nworkers = max(1, cfg.workers or (os.cpu_count() or 1))
    _local_recipients(cfg)  # a bad list stops the start before anything is bound
    per_worker = _bind_all(cfg, nworkers)
    helper = None
    read_keys: Callable[[Config], PEM] = read_pem
    if dropping:
        # The key helper holds no listening socket and nothing but its own channel.
        pw = _user(cfg)
        helper = KeyHelper(config_path, close=[x.sock for row in per_worker for x in row],
                           log_file=_log_file(cfg), owner=(pw.pw_uid, pw.pw_gid))
        read_keys = lambda _cfg: helper.read_pem()  # noqa: E731
    try:
        shared = handoff = None
        if nworkers > 1:
            # Throttle counters shared by all workers (per-IP limits stay exact): made
            # before forking, and before the drop (it maps shared memory).
            shared = wiring.shared_counters(nworkers)
            # ... and the newcomers passed between them (smtpd/handoff.py): its
            # socketpairs are the master's from its start, so every worker gets them.
            handoff = Handoff(nworkers)
        _drop_privileges(cfg)
        # Refusal lines a process dies owing are written by the master (owedlines.py);
        # those the previous instance's processes owed, now. Mapped before any fork.
        try:
            book = OwedLines(owedlines.book_path(cfg.spool_dir), nworkers + 1)
            unkept = book.unkept  # (no room in /dev/shm: its leftovers read all the same)
        except OSError as e:
            book, unkept = OwedLines(None, nworkers + 1), e
        if unkept is not None:
            maillog_mod.get().warning(
                "refusal lines a killed instance owes are not kept: a killed worker's "
                f"still are (owedlines): {unkept.strerror or unkept}: {unkept.filename}")
        maillog_mod.get().write_owed(book.leftovers)
        maillog_mod.get().keep_owed(book.slot(0))
        # The commits its sessions give up, kept past a kill of the whole server
        # (spool/abandoned.py); those a killed instance left, dropped by the scheduler.
        in_queue = _in_queue(cfg)
        try:
            abook = AbandonedBook(abandoned.book_path(cfg.spool_dir), nworkers + 1, in_queue)
            unkept = abook.unkept  # (no room in /dev/shm: its leftovers read all the same)
        except OSError as e:
            abook, unkept = AbandonedBook(None, nworkers + 1), e
        if unkept is not None:
            maillog_mod.get().warning(
                "commits given up are not kept past a kill of the whole server: a "
                f"killed worker's still are (spool/abandoned.py): {unkept.strerror or unkept}"
                f": {unkept.filename}")
        slot0 = abook.slot(0)
        # Read again as the user that reads it at every reload; before any fork.
        recipients = _local_recipients(cfg)
        if nworkers <= 1:
            _use_uvloop()
            run = _Run(cfg, config_path, pem, "single", listeners=per_worker[0],
                       recipients=recipients, read_keys=read_keys,
                       abandoned_slot=slot0, abandoned=abook.leftovers,
                       read_password=helper.read_password if helper else None,
                       read_oauth_secret=helper.read_oauth_secret if helper else None,
                       open_log=helper.open_log if helper else None,
                       read_config=helper.read_config if helper else None,
                       helper_pid=helper.pid if helper else 0)
            rc = asyncio.run(_serve_loop(run))
        else:
            rc = _serve_master(cfg, config_path, pem, per_worker, read_keys, helper, shared,
                               recipients, book, handoff, abook, slot0)
        maillog_mod.get().flush()
        book.close()  # a stop: the file goes unless a line is still owed
        abook.close(in_queue)  # ... or an abandoned commit's file is still there
        return rc
    finally:
        if helper is not None:
            helper.close()


def _in_queue(cfg: Config) -> Callable[[str], bool]:
    """Whether a queue id's file is in the queue (queue/ID, ready or not) or held
    (hold/ID: an abandoned commit's file a hold moved there, containment's or an
    admin's, is kept in the book too: a release must not deliver it either)."""
    spool = Spool(cfg.spool_dir)
    queued, held = f"{spool.queue_dir}/", f"{spool.hold_dir}/"
    return lambda qid: is_queue_id(qid) and (os.path.lexists(queued + qid)
                                             or os.path.lexists(held + qid))


def _local_recipients(cfg: Config) -> LocalRecipients | None:
    """The local recipients list at start; StartError (one line) when it cannot be used."""
    try:
        return wiring.local_recipients(cfg)
    except RecipientsError as e:
        raise StartError(f"relay.local_recipients_file: {e}") from None


def _serve_master(cfg: Config, config_path: str | None, pem: PEM,
                  per_worker: list[list[Listener]], read_keys: Callable[[Config], PEM],
                  helper: KeyHelper | None, shared: SharedCounters | None,
                  recipients: LocalRecipients | None, book: OwedLines,
                  handoff: Handoff | None, abook: AbandonedBook,
                  slot0: Slot) -> int:
    nworkers = len(per_worker)
    in_queue = _in_queue(cfg)
    run = _Run(cfg, config_path, pem, "master", recipients=recipients, read_keys=read_keys,
               abandoned_slot=slot0, abandoned=abook.leftovers,
               read_password=helper.read_password if helper else None,
               read_oauth_secret=helper.read_oauth_secret if helper else None,
               open_log=helper.open_log if helper else None,
               read_config=helper.read_config if helper else None,
               helper_pid=helper.pid if helper else 0,
               master_sockets=[x.sock for row in per_worker for x in row])
    workers: dict[int, _Worker] = run.workers
    master_pid = os.getpid()
    ml = maillog_mod.get()

    # What the master holds before its event loop runs: what every worker gets at the
    # start (its own listeners among them). What it opens from then on is its own.
    inherited = process.descriptors()

    def spawn(i: int) -> None:
        # Called from the main thread only (the parent-death signal is tied to the thread
        # that forked: a pool thread exiting would kill the worker).
        ch = Channel()
        # Listed on the thread that runs the event loop, so no socket of the loop's (a
        # cached outbound connection, a control client, DNS, Redis, PostgreSQL) is made
        # between the listing and the fork; the child lets go of them (process.shed).
        owned = {fd: what for fd, what in process.descriptors().items()
                 if inherited.get(fd) != what}
        # The worker's garbage collections must not write to the objects it inherits:
        # each collection of the oldest generation touches every tracked object's header,
        # copying the inherited heap page by page (scenario (f): +9 KiB PSS per idle
        # connection). Frozen objects are never examined; the master unfreezes at once.
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid:
            gc.unfreeze()
        if pid == 0:  # pragma: no cover - child
            try:
                others = [w.channel for w in workers.values()]
                if helper is not None:
                    others.append(helper.channel)
                sock = ch.in_child(others)
                process.shed(owned, keep={sock.fileno(), *maillog_mod.descriptors()})
                process.arm_child(master_pid)
                process.set_name(f"authrelay-w{i}")
                if run.cfg.worker_cpu_affinity:
                    process.pin_to_cpu(i)  # (before its first thread: they inherit it)
                ml.keep_owed(book.slot(i + 1))
                if shared is not None:
                    shared.adopt(i)  # what it counts is recorded, for forget() below
                if handoff is not None:
                    handoff.adopt(i)  # its row, cleared; its inbox
                for j, socks in enumerate(per_worker):
                    if j != i:
                        for s in socks:
                            s.sock.close()
                wrun = _Run(run.cfg, config_path, run.pem, "worker", listeners=per_worker[i],
                            recipients=run.recipients, share=Share(i, nworkers, shared),
                            channel=sock, handoff=handoff,
                            abandoned_slot=abook.slot(i + 1))
            except BaseException:
                os._exit(1)
            _worker_main(wrun)
        ch.in_master()
        ch.master.setblocking(False)
        workers[pid] = _Worker(i, pid, ch)

    for i in range(nworkers):
        spawn(i)
    stopping = False

    fast_deaths: dict[int, int] = {}

    def dead_abandoned(i: int) -> None:
        """The commits worker i gave up whose files are still there (it died in their
        fsync): kept in the master's slot, for a kill of the whole server before its
        scheduler drops them, and told to that scheduler (had the notice been lost)."""
        for qid in abook.take(i + 1):
            if in_queue(qid):
                slot0.keep(qid)
                if run.abandoned_by_dead is not None:
                    run.abandoned_by_dead(qid)

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = workers.pop(pid, None)
            if w is None:
                run.exited[pid] = status  # the key helper: _watch_helper says it
                continue
            w.channel.close()
            # The refusal lines it died owing (replies sent, its writer had not written
            # them), before another worker takes the slot.
            ml.write_owed(book.take(w.index + 1))
            dead_abandoned(w.index)
            if shared is not None:
                # The connections it held (kill -9, OOM, a crash) leave every gauge:
                # else they stayed counted, and a few deaths under load filled the pools.
                shared.forget(w.index)
            if handoff is not None:  # its candidates went with it: none passed to it
                handoff.forget(w.index)
            if run.cfg.metrics.address:  # so do the messages it was receiving
                Metrics.forget(pid)
            if stopping or run.stopping:
                continue
            if run.receiver_died is not None:  # its unfinished queue files: swept
                run.receiver_died(pid)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                # Stopped alone (an admin's SIGTERM to it: exit 0 only after its stop) is
                # no crash: replaced at once, the crash-loop throttle left as it was.
                ml.daemon(f"worker {pid} stopped; replaced at once", pid=os.getpid())
                asyncio.get_running_loop().call_soon(respawn, w.index)
                continue
            # As Postfix's master throttles a service whose children keep dying at once:
            # a worker that dies within 10 s of its start makes the next start wait, 1 s,
            # 2 s, 4 s ... up to 60 s, so a crash loop is not a flood of forks and lines.
            quick = time.monotonic() - w.started < 10
            fast_deaths[w.index] = fast_deaths.get(w.index, 0) + 1 if quick else 0
            n = fast_deaths[w.index]
            delay = 0.2 if n < 2 else min(60.0, 2.0 ** (n - 2))
            ml.error(f"worker {pid} died ({_status(status)}); restarting in {delay:g} s")
            asyncio.get_running_loop().call_later(delay, respawn, w.index)

    def respawn(i: int) -> None:
        if not (stopping or run.stopping):
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
            return await _serve_loop(run)
        finally:
            stopping = True
            watcher.cancel()

    try:
        code = asyncio.run(master())
    finally:
        stopping = True
        for s in run.master_sockets:
            with contextlib.suppress(OSError):
                s.close()
        if not run.stopping:
            # The master failed (its start or its loop raised): its workers stop now, as
            # at a SIGTERM. Else they took mail for their stop's time below (none of
            # this run delivers it), then were killed mid-session.
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        # A stop waited for them already (those left are held by the kernel: they end at
        # a thaw); a master that failed gives them their stop's time.
        wait = 2 if run.stopping else stopdeadline.deadline(run.cfg.shutdown_timeout, "worker")
        deadline = time.monotonic() + wait
        while workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                w = workers.pop(pid, None)
                if w is not None:
                    w.channel.close()
                    ml.write_owed(book.take(w.index + 1))
                    dead_abandoned(w.index)
            else:
                time.sleep(0.05)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return code


def _workers_arg(text: str) -> int:
    """--workers: the bounds of the file's `workers` (config.MAX_WORKERS), which the
    command line replaces after the file's checks."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{n}: from 0 (one per core) to {MAX_WORKERS}")
    return n


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"authrelay: {error_line(e)}", file=sys.stderr)
        return 1
    if cfg.source == EMBEDDED:  # say so: an admin who meant /etc/... must notice
        print(embedded_notice(), file=sys.stderr, flush=True)
    global _cli_overrides
    if args.log_format:
        cfg = replace(cfg, log=replace(cfg.log, format=args.log_format))
        _cli_overrides |= {"log.format"}
    if args.workers is not None:
        cfg = replace(cfg, workers=args.workers)
        _cli_overrides |= {"workers"}
    try:
        return serve(cfg, args.config)
    except (StartError, TLSConfigError, OSError) as e:
        print(f"authrelay: {start_error_line(e)}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the relay (listeners, queue, delivery)")
    p.add_argument("--log-format", choices=("text", "json"), help="maillog format")
    p.add_argument("--workers", type=_workers_arg,
                   help=f"receiving processes (0: one per core; at most {MAX_WORKERS})")
    p.set_defaults(func=_cmd_serve)
