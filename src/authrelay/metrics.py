"""Prometheus metrics: counters and histograms from every process, one /metrics endpoint.

Owns the metric names (an interface: dashboards and alerts use them) and the loopback HTTP
endpoint `[metrics] address` (prometheus-client's exposition server). Contract:
- `prepare(cfg)` runs once in `serve` before any worker is forked: it points
  prometheus-client's multiprocess mode at `<state_dir>/metrics` (0700) and removes the
  files of earlier runs, so the counters of every receiving worker and of the delivering
  process are summed at scrape time (workers are separate processes).
- `Metrics(cfg)` in each process: the hooks below only bump per-process mmap'ed values
  (cheap, no I/O on the event loop beyond a memory write).
- `start(scheduler, spool)` in the delivering process serves /metrics and adds the queue
  gauges, from counts kept as the queue changes, never from the directories: a scrape
  costs O(1) whatever the queue's size (a stat of every file, 0.4-0.9 s at 20,000
  queued, held the GIL and stalled the master's deliveries). The scheduler's
  (`Scheduler.stats()`: queued, held, corrupt, active) and the messages being received,
  a live sum over the receiving processes (`receiving()`, from spool/submit.Submitter).
Labels are bounded sets (listener mode, result, reason): never a user, address or IP, so a
client cannot grow the series count and no personal data leaves through /metrics.
Failure policy: metrics never fail mail. A hook that raises is swallowed; an endpoint that
cannot bind is logged and metrics stay off.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import ipaddress
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from authrelay.config import Config, parse_hostport

log = logging.getLogger(__name__)


def exposed(address: str) -> bool:
    """Whether a `[metrics] address` is reachable beyond this machine: an IP that is not
    loopback, or no host at all (":PORT" binds every address). A host name: False (left
    to the operator). serve logs it and check-config warns, one rule for both."""
    try:
        host, _port = parse_hostport(address, "metrics.address")
        return not ipaddress.ip_address(host or "0.0.0.0").is_loopback
    except ValueError:  # ConfigError is one too
        return False

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "authrelay"
# Messages being received, per process (a live sum): never exposed under this name, it
# is authrelay_queue_messages{state="incoming"} (_QueueCollector).
RECEIVING = f"{PREFIX}_queue_receiving"
MODES = ("smtp", "submission", "submissions")
# Delivery latency: local smart hosts answer in milliseconds, slow MX in tens of seconds.
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time in queue until final: seconds when all is well, hours to days under retries.
QUEUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600,
                 86400, 5 * 86400)


def metrics_dir(cfg: Config) -> Path:
    return cfg.state_path / "metrics"


def _use_dir(path: Path) -> None:
    """Switch prometheus-client to multiprocess values kept under `path`."""
    os.environ[ENV] = str(path)
    from prometheus_client import values

    # The value class is chosen when prometheus_client is imported: choose again now that
    # the environment says multiprocess (covers an import before prepare()).
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def prepare(cfg: Config) -> None:
    """Before forking: an empty metrics directory for this run (earlier pids' files would
    otherwise be summed into the new counters)."""
    if not cfg.metrics.address:
        return
    d = metrics_dir(cfg)
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _use_dir(d)


class Metrics:
    """Per-process collectors; see the module docstring for the contract."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        d = metrics_dir(cfg)
        if os.environ.get(ENV) != str(d):  # prepare() not called (e.g. embedded use)
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            _use_dir(d)
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=None)

        self._connections = counter(
            "connections", "SMTP connections by listener mode and admission result "
            "(accepted, refused: over a connection limit or rate, evicted: pre-authentication "
            "connections closed to make room in a full pool, or for a newcomer of their "
            "address at max_connections_per_ip)", ("listener", "result"))
        self._auth = counter("auth", "AUTH attempts by result (ok, fail, tempfail, "
                             "malformed: a response that cannot be decoded, locked: refused "
                             "by the failure lockout)",
                             ("result",))
        self._accepted = counter("messages_accepted",
                                 "Messages accepted into the queue, by listener mode",
                                 ("listener",))
        self._rejected = counter("messages_rejected", "Messages or transactions rejected, "
                                 "by reason", ("reason",))
        self._suspended = counter("users_suspended", "Users suspended by containment "
                                  "(policy/containment.py), by the threshold that tripped "
                                  "(messages, recipients, refused, networks)", ("threshold",))
        self._attempts = counter("delivery_attempts", "Delivery attempts per recipient by "
                                 "result (sent, deferred, bounced)", ("result",))
        self._tls = counter("delivery_tls", "Delivery attempts per recipient by result "
                            "(sent, deferred, bounced), outbound TLS result (verified, "
                            "trusted, untrusted, anonymous, none) and the TLS policy that "
                            "applied (dane, mta-sts, verify, encrypt, may, none...)",
                            ("result", "tls", "policy"))
        self._attempt_seconds = Histogram(
            f"{PREFIX}_delivery_attempt_seconds", "Duration of one outbound delivery "
            "(one destination, its recipients), by route (smarthost, mx)", ("route",),
            buckets=ATTEMPT_BUCKETS, registry=None)
        self._queue_seconds = Histogram(
            f"{PREFIX}_queue_delay_seconds", "Time from acceptance to the final result of "
            "a recipient (sent or bounced)", ("result",), buckets=QUEUE_BUCKETS,
            registry=None)
        # Known label sets start at 0, so rates and alerts work before the first event.
        for mode in MODES:
            self._accepted.labels(mode)
            for result in ("accepted", "refused"):
                self._connections.labels(mode, result)
        for result in ("ok", "fail", "tempfail", "malformed", "locked"):
            self._auth.labels(result)
        for result in ("sent", "deferred", "bounced"):
            self._attempts.labels(result)
        for kind in ("messages", "recipients", "refused", "networks"):
            self._suspended.labels(kind)
        # Messages being received in this process (begun, not yet committed or aborted);
        # live processes' values summed (a dead worker's go with it: forget()).
        self._receiving = Gauge(RECEIVING, "Messages being received", registry=None,
                                multiprocess_mode="livesum")
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ hooks (smtpd)
    def connection(self, listener_mode: str, result: str) -> None:
        with contextlib.suppress(Exception):
            self._connections.labels(listener_mode, result).inc()

    def auth(self, result: str) -> None:
        with contextlib.suppress(Exception):
            self._auth.labels(result).inc()

    def accepted(self, mode: str) -> None:
        with contextlib.suppress(Exception):
            self._accepted.labels(mode).inc()

    def rejected(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            self._rejected.labels(reason).inc()

    def receiving(self, delta: int) -> None:
        """A message began (+1) or was committed or aborted (-1) in this process."""
        with contextlib.suppress(Exception):
            self._receiving.inc(delta)

    @staticmethod
    def forget(pid: int) -> None:
        """A receiving worker died: its live values (messages it was receiving) go."""
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError, KeyError):
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]

    def suspended(self, threshold: str) -> None:
        """A user was suspended (policy/suspender.py) for this threshold."""
        with contextlib.suppress(Exception):
            self._suspended.labels(threshold).inc()

    # ------------------------------------------------------------------ hooks (scheduler)
    def delivery_attempt(self, route: str, seconds: float) -> None:
        """One courier.deliver() call to `route` ("smarthost" or "mx") took `seconds`."""
        with contextlib.suppress(Exception):
            self._attempt_seconds.labels(route).observe(seconds)

    def delivery_result(self, result: str, queue_seconds: float) -> None:
        """One recipient's attempt: "sent" | "deferred" | "bounced"; time since accepted."""
        with contextlib.suppress(Exception):
            self._attempts.labels(result).inc()
            if result != "deferred":
                self._queue_seconds.labels(result).observe(max(0.0, queue_seconds))

    def delivery_tls(self, result: str, tls: str, policy: str) -> None:
        """One recipient's attempt over a connection: its TLS result and policy."""
        with contextlib.suppress(Exception):
            self._tls.labels(result, tls, policy).inc()

    # ------------------------------------------------------------------ endpoint
    def start(self, scheduler: Any = None, spool: Any = None, health: Any = None) -> None:
        """Serve /metrics (and /health, answered by `health`, a health.DependencyProbe)
        on cfg.metrics.address (the delivering process only)."""
        if scheduler is not None:
            scheduler.metrics = self  # delivery hooks (scheduler.py calls them if set)
        if not self.cfg.metrics.address:
            return
        from prometheus_client import CollectorRegistry, make_wsgi_app

        host, port = parse_hostport(self.cfg.metrics.address, "metrics.address")
        if exposed(self.cfg.metrics.address):
            log.warning("metrics.address %s is not loopback: /metrics is reachable from "
                        "the network", self.cfg.metrics.address)
        registry = CollectorRegistry()
        registry.register(_QueueCollector(scheduler, _Processes(os.environ[ENV])))
        if health is not None:
            registry.register(_DependencyCollector(health))
        app = _with_health(make_wsgi_app(registry), health)
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = make_server(host, port, app, server_class=server_class,
                                       handler_class=_QuietHandler)
        except OSError as e:
            log.error("metrics: cannot listen on %s: %s", self.cfg.metrics.address, e)
            return
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="metrics")
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# The listener runs in the delivering process (the master): its descriptors and threads
# are the ones delivery and local submission need. A client that connects and never
# finishes a request (slowloris) held a thread and a descriptor each, without end: 999 of
# them exhausted a 1024-descriptor master (local submission and delivery stalled). So at
# most MAX_CONNECTIONS are served at once, PER_ADDRESS from one client address (more are
# closed at accept: one hostile host cannot take the slots Prometheus and HAProxy's checks
# use), and each has REQUEST_DEADLINE seconds in all to send its request and read the answer.
MAX_CONNECTIONS = 32
PER_ADDRESS = 4
REQUEST_DEADLINE = 10.0


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def server_activate(self) -> None:
        self._lock = threading.Lock()
        self._busy: collections.Counter[str] = collections.Counter()
        super().server_activate()

    def _release(self, client_address: Any) -> None:
        with self._lock:
            self._busy[client_address[0]] -= 1
            if self._busy[client_address[0]] <= 0:
                del self._busy[client_address[0]]

    def process_request(self, request: Any, client_address: Any) -> None:
        ip = client_address[0]
        with self._lock:
            full = (sum(self._busy.values()) >= MAX_CONNECTIONS
                    or self._busy[ip] >= PER_ADDRESS)
            if not full:
                self._busy[ip] += 1
        if full:  # a scraper retries, HAProxy checks again
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The whole exchange within REQUEST_DEADLINE, however slowly the client drips:
        # the timer shuts the socket down, which ends any read or write blocked on it.
        timer = threading.Timer(REQUEST_DEADLINE, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._release(client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr (the maillog's stream): a client that
        # timed out or went away is not news; anything else is our bug, logged as one.
        import sys

        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            log.debug("metrics: client %s: %s", client_address, e)
        else:
            log.error("metrics: request from %s failed", client_address, exc_info=True)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_DEADLINE  # per read; the server's timer bounds the whole exchange

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a scrape every few seconds is not news


def _with_health(metrics_app: Any, health: Any) -> Any:
    """GET /health[?require=postgresql,redis]: 200 `ok`, or 503 naming each failing
    required dependency (health.py); any other path: prometheus-client's exposition."""
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "") in ("/health", "/health/"):
            query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
            require = None
            if "require" in query:
                require = {d for v in query["require"] for d in v.split(",") if d}
            status, body = health.health(require) if health is not None else (200, "ok\n")
            start_response(f"{status} {'OK' if status == 200 else 'Service Unavailable'}",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Cache-Control", "no-store")])
            return [body.encode()]
        return metrics_app(environ, start_response)
    return app


class _DependencyCollector:
    """authrelay_dependency_up{dependency}: 1 when its last probe answered (health.py)."""

    def __init__(self, health: Any) -> None:
        self.health = health

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily(f"{PREFIX}_dependency_up", "1 when the dependency (postgresql: "
                              "[auth] dsn, redis: [limits] shared) answered its last probe "
                              "(every 2 s), else 0", labels=("dependency",))
        for name, (up, _why) in self.health.state().items():
            g.add_metric([name], 1 if up else 0)
        yield g


class _Processes:
    """Every process's values in the multiprocess directory, merged as prometheus-client's
    MultiProcessCollector does, without the files not yet sized: a process creating its
    file (a worker forked again, its first count) has it empty for a moment, and one
    read then failed the whole scrape (500: struct.error, seen in test_queue_gauges)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for f in glob.glob(os.path.join(self.path, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # its process reaped meanwhile
                if os.stat(f).st_size >= 8:  # past the header MmapedDict writes first
                    files.append(f)
        return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


class _QueueCollector:
    """Every process's values (prometheus-client's multiprocess files), and the queue by
    state from counts kept as it changes: the scheduler's `stats()` and the live sum of
    messages being received (RECEIVING, folded into state="incoming"). O(1) in the
    queue's size: no directory is read at scrape time."""

    def __init__(self, scheduler: Any, processes: Any) -> None:
        self.scheduler = scheduler
        self.processes = processes

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        t0 = time.monotonic()
        incoming = 0.0
        for family in self.processes.collect():
            if family.name == RECEIVING:
                incoming = max(0.0, sum(s.value for s in family.samples))
                continue
            yield family
        g = GaugeMetricFamily(f"{PREFIX}_queue_messages",
                              "Messages in the queue by state (incoming: being received; "
                              "active: being delivered; deferred: waiting; held; corrupt)",
                              labels=("state",))
        stats: dict[str, int] = {}
        if self.scheduler is not None:
            with contextlib.suppress(Exception):
                stats = dict(self.scheduler.stats())
        g.add_metric(["incoming"], incoming)
        if self.scheduler is not None:
            queued = stats.get("queued", 0)
            active = min(stats.get("active", 0), queued)
            g.add_metric(["active"], active)
            g.add_metric(["deferred"], queued - active)
            g.add_metric(["held"], stats.get("held", 0))
            g.add_metric(["corrupt"], stats.get("corrupt", 0))
        yield g
        f = GaugeMetricFamily(f"{PREFIX}_deliveries_in_flight",
                              "Outbound deliveries in progress")
        f.add_metric([], stats.get("deliveries", 0))
        yield f
        s = GaugeMetricFamily(f"{PREFIX}_queue_scan_seconds",
                              "Time taken to count the queue for this scrape")
        s.add_metric([], time.monotonic() - t0)
        yield s
