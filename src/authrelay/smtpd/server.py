"""The receiving side of one process: listeners, sessions, and what they share.

Owns the set of listening sockets and live sessions of this process, admission (throttle),
and graceful stop (stop accepting; let sessions finish up to a deadline; then 421).
Contract: `SMTPServer(cfg, spool, authenticator, certs)`; `await start(sockets)` serves on
already-bound sockets (so a root parent can bind 25/587/465 and drop privileges, and
worker processes can share ports); `await stop(timeout)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

from authrelay import maillog as maillog_mod
from authrelay.config import Config, Listen
from authrelay.policy.relay import RelayPolicy
from authrelay.policy.throttle import Share, Throttle
from authrelay.smtpd.listener import Connection
from authrelay.smtpd.session import Session
from authrelay.types import Reply

log = logging.getLogger(__name__)


@dataclass
class Listener:
    cfg: Listen
    sock: socket.socket

    @property
    def mode(self) -> str:
        return self.cfg.mode

    @property
    def name(self) -> str:
        return f"{self.cfg.mode}:{self.cfg.address}"


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
    s.listen(1024)
    s.setblocking(False)
    return s


class SMTPServer:
    def __init__(self, cfg: Config, *, spool: Any, authenticator: Any, certs: Any,
                 checks: Any = None, metrics: Any = None, share: Share | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.authenticator = authenticator
        self.auth_available = authenticator is not None
        self.certs = certs
        self.checks = checks
        self.metrics = metrics
        self.policy = RelayPolicy(cfg)
        if share is not None and share.shared is not None:
            from authrelay.policy.anvil import SharedThrottle

            self.throttle: Throttle = SharedThrottle(cfg, share.shared)
        else:
            self.throttle = Throttle(cfg, share)
        self.maillog = maillog_mod.get()
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self.listeners: list[Listener] = []
        self.stopping = False

    def reload(self, cfg: Config) -> None:
        """SIGHUP: new limits and policy for new sessions; live ones keep theirs."""
        self.cfg = cfg
        self.policy = RelayPolicy(cfg)
        self.throttle.reload(cfg)

    async def start(self, listeners: list[Listener]) -> None:
        loop = asyncio.get_running_loop()
        for ln in listeners:
            srv = await loop.create_server(
                lambda ln=ln: Connection(lambda c, ln=ln: self._connected(ln, c)),
                sock=ln.sock, backlog=1024,
                # RFC 8314 implicit TLS: the transport does the handshake before the
                # session sees a byte; the context is the CertStore's live one (reloadable).
                ssl=self.certs.context if ln.mode == "submissions" else None,
                ssl_handshake_timeout=(self.cfg.limits.tls_handshake_timeout
                                       if ln.mode == "submissions" else None),
            )
            self._servers.append(srv)
            self.listeners.append(ln)

    def _connected(self, ln: Listener, conn: Connection) -> None:
        if self.stopping:
            conn.write(Reply(421, "4.3.2", "Service shutting down").lines())
            conn.close()
            return
        sess = Session(self, ln, conn)
        self.sessions.add(sess)
        task = asyncio.get_running_loop().create_task(sess.run())
        conn.task = task
        task.add_done_callback(lambda _t: self.sessions.discard(sess))
        # Whole-session cap (slowloris defence): the session is cancelled at the deadline.
        h = asyncio.get_running_loop().call_later(self.cfg.limits.session_timeout,
                                                  self._expire, sess, task)
        task.add_done_callback(lambda _t: h.cancel())

    def _expire(self, sess: Session, task: asyncio.Task[None]) -> None:
        if not task.done():
            sess.reply(Reply(421, "4.4.2", "Session time limit exceeded, closing connection"))
            sess.conn.close()
            self.maillog.event(None, reject="421 4.4.2 session time limit",
                               relay=sess.relay_desc())

    # admission -------------------------------------------------------------
    def admit(self, sess: Session) -> Reply | None:
        r = self.throttle.connect(sess.ip, exempt=False)
        sess._admitted = r is None  # type: ignore[attr-defined]
        if self.metrics is not None:
            self.metrics.connection(sess.listener.mode, "accepted" if r is None else "refused")
        return r

    def release(self, sess: Session) -> None:
        if getattr(sess, "_admitted", False):
            self.throttle.disconnect(sess.ip)
            sess._admitted = False  # type: ignore[attr-defined]

    # metrics hooks (no-ops without a metrics registry) ------------------------
    def metrics_auth(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.auth(result)

    def metrics_accepted(self, mode: str) -> None:
        if self.metrics is not None:
            self.metrics.accepted(mode)

    def metrics_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    # stop -----------------------------------------------------------------
    async def stop_accepting(self) -> None:
        self.stopping = True
        for srv in self._servers:
            srv.close()

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let sessions finish up to `timeout`, then cancel the rest."""
        await self.stop_accepting()
        tasks = [s.conn.task for s in list(self.sessions) if s.conn.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1)
