"""The receiving side of one process: listeners, sessions, and what they share.

Owns the set of listening sockets and live sessions of this process, the throttle, and
graceful stop (stop accepting; let sessions finish up to a deadline; then 421). Admission
at TCP accept (pools, rates, fd budget, stress mode, implicit TLS after admission) is in
`admission.py`; a session starts with the `Ticket` it was admitted with.
Contract: `SMTPServer(cfg, submitter=, authenticator=, certs=, known=, throttle=, ...)`
takes its parts built (wiring.py builds them from the config; this module builds none);
`await start(listeners)` serves on already-bound sockets (so a root parent can bind
25/587/465 and drop privileges, and worker processes can share ports); `await stop(timeout)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from authrelay.auth.authenticator import Authenticator
from authrelay.config import Config, Listen
from authrelay.maillog import MailLog
from authrelay.metrics import Metrics
from authrelay.policy.checks import HostChecks
from authrelay.policy.known import KnownAddresses
from authrelay.policy.recipients import LocalRecipients
from authrelay.policy.relay import RelayPolicy
from authrelay.policy.suspender import Suspender
from authrelay.policy.throttle import Exemptions, Share, Throttle
from authrelay.smtpd import proxy
from authrelay.smtpd.admission import Acceptor, Listener, Ticket, fd_budget
from authrelay.smtpd.eviction import Oldest
from authrelay.smtpd.handoff import Handoff
from authrelay.smtpd.listener import Connection
from authrelay.smtpd.session import CANCEL_GRACE, Session, SessionDeps
from authrelay.spool.submit import Submitter
from authrelay.tls import CertStore
from authrelay.types import Reply

__all__ = ["Listener", "SMTPServer", "bind"]

log = logging.getLogger(__name__)

BACKLOG = 1024  # a listening socket's accept queue (capped by net.core.somaxconn)


def bind(listen: Listen, *, reuse_port: bool = False) -> socket.socket:
    host, port = listen.host, listen.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # "[::]" means IPv6 only here; list "0.0.0.0:587" too for IPv4 (predictable).
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(BACKLOG)
    s.setblocking(False)
    return s


class SMTPServer:
    def __init__(self, cfg: Config, *, submitter: Submitter,
                 authenticator: Authenticator | None, certs: CertStore | None,
                 known: KnownAddresses, throttle: Throttle, share: Share,
                 checks: HostChecks | None = None, metrics: Metrics | None = None,
                 maillog: MailLog,
                 containment: Suspender | None = None,
                 recipients: LocalRecipients | None = None,
                 handoff: Handoff | None = None) -> None:
        self.cfg = cfg
        self.authenticator = authenticator
        self.certs = certs
        # Each listener's SessionDeps, made at its first session: every field is fixed
        # until a reload or a new `checks` (both empty this).
        self._deps: dict[str, SessionDeps] = {}
        self._checks = checks
        self.metrics = metrics
        self.policy = RelayPolicy(cfg, recipients)
        self.share = share
        self.known = known
        self.throttle = throttle
        self.exemptions = Exemptions(cfg)
        self.proxy_trusted = proxy.Networks(cfg.relay.proxy_trusted)
        self.maillog = maillog
        self.submitter = submitter  # the one accept path (spool/submit.py)
        # Containment of compromised accounts (policy/suspender.py): None when off.
        self.containment = containment
        self.sessions: set[Session] = set()
        self.acceptors: list[Acceptor] = []
        # With several workers (adopted by this one): newcomers at their address's
        # max_connections_per_ip passed to the worker holding its oldest idle connection.
        self.handoff = handoff
        self.oldest = Oldest(handoff) if handoff is not None else None
        self.listeners: list[Listener] = []
        self.stopping = False
        self.open_sockets = 0  # client sockets held by this process (accepted, not closed)
        self.fd_budget = fd_budget()
        self._fd_warned = False

    @property
    def checks(self) -> HostChecks | None:
        return self._checks

    @checks.setter
    def checks(self, checks: HostChecks | None) -> None:  # (a reload's new DNS checks)
        self._checks = checks
        self._deps.clear()

    def reload(self, cfg: Config, recipients: LocalRecipients | None = None) -> None:
        """SIGHUP: new limits and policy for new sessions; live ones keep theirs.
        `recipients`: the local recipients list of `cfg` (loaded by the caller, which
        refuses the reload when it cannot be read)."""
        self._deps.clear()
        self.cfg = cfg
        self.policy = RelayPolicy(cfg, recipients)
        self.throttle.reload(cfg)
        self.exemptions = Exemptions(cfg)
        self.proxy_trusted = proxy.Networks(cfg.relay.proxy_trusted)
        self.known.ttl = cfg.auth.known_address_days * 86400.0
        for a in self.acceptors:
            a.reload()
        self.submitter.reload(cfg)
        if self.containment is not None:
            self.containment.reload(cfg)

    async def start(self, listeners: list[Listener]) -> None:
        for ln in listeners:
            ln.sock.setblocking(False)
            # Listening again: the worker this one replaces took the socket out of its
            # SO_REUSEPORT group as it stopped (Acceptor.leave); else no change.
            ln.sock.listen(BACKLOG)
            a = Acceptor(self, ln)
            a.start()
            self.acceptors.append(a)
            self.listeners.append(ln)
        if self.handoff is not None:
            asyncio.get_running_loop().add_reader(self.handoff.inbox().fileno(),
                                                  self._passed_in)

    def _passed_in(self) -> None:
        """Newcomers another worker passed on (smtpd/handoff.py): admitted by this
        worker's acceptor of their listener; once it stops, refused there (421 4.3.2)."""
        assert self.handoff is not None
        by_name = {a.ln.name: a for a in self.acceptors}
        for p in self.handoff.receive():
            acc = by_name.get(p.listener)
            if acc is None:  # (every worker has every listener)
                with contextlib.suppress(OSError):
                    p.sock.close()
            elif self.stopping:
                acc.refuse_passed(p)
            else:
                acc.admit_passed(p)

    def protocol_factory(self, ln: Listener, ticket: Ticket) -> Callable[[], Connection]:
        loop = asyncio.get_running_loop()
        return lambda: Connection(lambda c: self._connected(ln, c, ticket), loop,
                                  ticket.addr)

    def _connected(self, ln: Listener, conn: Connection, ticket: Ticket) -> None:
        ticket.settle()  # handshake and greeting delay done: no longer evictable as such
        if ticket.released:  # evicted in the very moment its handshake completed
            conn.abort()
            return
        if self.stopping:
            conn.write(Reply(421, "4.3.2", "Service shutting down").lines())
            conn.close()
            ticket.release()
            return
        if ticket.peer is not None:  # the client behind a load balancer (PROXY header)
            conn.peer = ticket.peer
        sess = Session(self.session_deps(ln), conn, ticket)
        self.sessions.add(sess)
        task = conn.loop.create_task(sess.run())
        conn.task = task
        # Whole-session cap (slowloris defence): the session is ended at the deadline.
        h = conn.loop.call_later(self.cfg.limits.session_timeout, sess.expire)

        def done(_t: object) -> None:
            h.cancel()
            self.sessions.discard(sess)
            conn.close()
            ticket.release()

        task.add_done_callback(done)

    def tls_context(self) -> ssl.SSLContext | None:
        return self.certs.context if self.certs is not None else None

    def session_deps(self, ln: Listener) -> SessionDeps:
        """The narrow interfaces a session gets (never the server itself): one per
        listener until a reload."""
        deps = self._deps.get(ln.name)
        if deps is None:
            deps = self._deps[ln.name] = SessionDeps(
                cfg=self.cfg, listener=ln.name, mode=ln.mode, policy=self.policy,
                authenticator=self.authenticator, submitter=self.submitter,
                tls_context=self.tls_context,
                checks=self.checks, maillog=self.maillog, metrics=self.metrics,
                containment=self.containment)
        return deps

    # admission hooks (admission.py) ------------------------------------------
    def refused(self, ln: Listener, ip: str, r: Reply, reason: str, tls: bool) -> None:
        """A connection refused at accept: one maillog line (never for every client of a
        flood at full detail: the line is short and has no DNS lookup)."""
        self.maillog.reject(r, relay=f"unknown [{ip}]", stage="connect",
                            listener=ln.name, reason=reason,
                            action="closed before TLS" if tls else None)

    def tls_failed(self, ln: Listener, ip: str, why: str, seconds: float) -> None:
        """An implicit-TLS handshake failed or timed out (Postfix: "SSL_accept error from")."""
        self.maillog.tls_failed(f"unknown [{ip}]", why, ln.name, seconds)

    def fd_tight(self, acceptor: Acceptor) -> bool:
        """Near the fd limit. Every listener is guaranteed budget/(2n) sockets: one may
        hold at most the budget minus the others' guarantees, and all stop at the budget."""
        budget, n = self.fd_budget, max(1, len(self.acceptors))
        if self.open_sockets >= budget:
            return True
        return acceptor.open >= budget - (n - 1) * (budget // (2 * n))

    def fd_warning(self) -> None:
        if not self._fd_warned:
            self._fd_warned = True
            self.maillog.warning("near the file descriptor limit: listeners at their "
                                 "share stop accepting", sockets=self.open_sockets,
                                 budget=self.fd_budget)

    def fd_released(self) -> None:
        if self._fd_warned and self.open_sockets < self.fd_budget * 9 // 10:
            self._fd_warned = False

    # metrics hooks (no-ops without a metrics registry) ------------------------
    def metrics_connection(self, mode: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.connection(mode, result)

    # stop -----------------------------------------------------------------
    def close_listeners(self) -> None:
        """Stop accepting and close the listening sockets now (synchronous: SIGTERM, the
        master's death): the kernel refuses new connections from here on."""
        self.stopping = True
        if self.handoff is not None:
            # No newcomer passed here from now on; one already in flight is still read
            # (the inbox's reader stays until the process ends) and refused 421 4.3.2.
            self.handoff.withdraw()
        for a in self.acceptors:
            a.stop()
            a.leave()
            with contextlib.suppress(OSError):
                a.sock.close()

    async def stop_accepting(self) -> None:
        self.close_listeners()

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let sessions finish up to `timeout`, then cancel the rest."""
        await self.stop_accepting()
        # A message already past max_message_size is refused whatever comes next, and
        # its rest is read at oversize_read_rate: nothing worth waiting for. 421 now.
        for s in list(self.sessions):
            if s.refusing_data and s.conn.task is not None:
                s.conn.task.cancel()
        tasks = [s.conn.task for s in list(self.sessions) if s.conn.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CANCEL_GRACE)
        await asyncio.get_running_loop().run_in_executor(None, self.known.close)
        if self.containment is not None:
            await self.containment.close()
