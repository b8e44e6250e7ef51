"""Admission at TCP accept: pools, rates, file-descriptor budget, stress mode, tickets.

Owns the accept loop of every listening socket (our own `accept()` on a readable listening
socket instead of `loop.create_server`, so that a listener can stop accepting and leave
clients in the kernel backlog) and what is decided at that moment, before any byte is read
and before any TLS:

- Pools: a connection counts in the global pool (`[limits] max_connections`), its
  listener's pool (`[[listen]] max_connections`; by default the global cap minus
  `pool_reserve_percent`, so a flood on one port leaves the others that much), and on
  smtp listeners the smtp class pool (the same size: all smtp listeners together leave
  the reserve to submission), plus per IP, from accept until its socket is closed: a
  TLS handshake in progress on 465 counts.
- Refusals: a full pool, the per-IP limit, or a rate past its bounded delay. On a
  plaintext listener the client gets the 421 (written straight to the new socket), on an
  implicit-TLS listener (465) it is closed without a handshake (a 421 in clear would mean
  nothing to a TLS client, and the handshake is the expensive part a flood wants).
- A full submission/submissions listener stops accepting (the kernel backlog holds the
  clients) for up to `backlog_wait`; then the clients that waited get 421 and the wait
  starts again. An smtp listener answers 421 at once (an MTA retries).
- `connection_rate` delays the greeting (and the 465 handshake) instead of refusing.
- File descriptors: under a budget (RLIMIT_NOFILE minus a reserve for the spool, logs and
  DNS) of which every listener is guaranteed a share: a listener at its limit stops
  accepting until some close; one listener's flood cannot take the descriptors another
  needs.
- Stress mode (Postfix): at `stress_threshold` percent of a listener's pool its sessions'
  command timeout drops to `stress_command_timeout`; logged when it starts and ends.
- PROXY protocol (issue 14, smtpd/proxy.py): on a `proxy_protocol` listener a peer outside
  `[relay] proxy_trusted` is closed at once; from a trusted one the header is read first
  (exactly its bytes, within `[limits] proxy_timeout`), and its source address is the one
  admitted, counted, exempted and handed to the session (`Ticket.peer`). A missing,
  malformed or late header closes the connection with a maillog warning; a peer that
  closes without sending a byte (a TCP health check) is not logged.
- Implicit TLS (RFC 8314): the handshake starts only after admission, on the accepted
  socket (`loop.connect_accepted_socket(ssl=...)`, so no byte can be read in clear first),
  under `tls_handshake_timeout`; a failed or timed-out handshake is one maillog line. The
  ClientHello is read first without consuming it: one naming only ALPN protocols we do
  not speak is refused with the no_application_protocol alert (ALPACA, tls.py).
- Eviction (issue 17, smtpd/eviction.py): a full pool makes room for a new connection by
  evicting a pre-authentication one of this listener: still in its TLS handshake or
  greeting delay (closed quietly: aborted, no 421), or a session idle before AUTH and
  outside a transaction (`Ticket.idle()`; it gets `421 4.7.0` and is closed). Which one is
  chosen so that a flood cannot evict in a loop (eviction.py). An address may hold at most
  `max_pending_per_ip` connections still in handshake; past it a new one is refused at
  accept. Evictions and refusals beyond REFUSAL_LINES a second are not logged one by one:
  one summary line a second says how many, why, and the busiest address.

The session receives a `Ticket`: its current command timeout, the throttle narrowed to its
address (AUTH and per-user rates), and `idle()`/`busy()` for eviction. An Acceptor sees
the server it accepts for only through `Host` (the counters and hooks below), never the
server itself.
Failure policy: an accept error (EMFILE, ENFILE, ENOBUFS) pauses that listener briefly
with a maillog warning, never kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import resource
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from authrelay import maillog, replies, tls
from authrelay.config import Config, Listen
from authrelay.policy.throttle import Admission, Exemptions, Lockout, Pool, Share, Throttle
from authrelay.smtpd import proxy
from authrelay.smtpd.eviction import Candidate, Candidates, Oldest, takeable
from authrelay.smtpd.handoff import Handoff, Passed
from authrelay.smtpd.listener import limit_send_buffer, peek_client_hello
from authrelay.tls import handshake_failure
from authrelay.types import Reply

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64  # accepts per readable event: a flood on one port cannot starve the loop
POLL = 0.25  # how often a paused listener looks again
FD_RESERVE_MIN = 64
STRESS_OFF_MARGIN = 10  # percentage points below the threshold where stress mode ends
STRESS_CALM = 10.0  # ... once the load has stayed there this many seconds
PROXY_READS_MIN = 256  # PROXY headers read at once per listener, at least (issue 14)
REFUSAL_LINES = 10  # refusals logged one by one per listener and second; then a summary
EVICT_V6_PREFIX = 48  # eviction counts an IPv6 client by this prefix (a site's allocation)


@dataclass
class Listener:
    """One bound listening socket and the `[[listen]]` entry it serves."""

    cfg: Listen
    sock: socket.socket

    @property
    def mode(self) -> str:
        return self.cfg.mode

    @property
    def name(self) -> str:
        return f"{self.cfg.mode}:{self.cfg.address}"


class Host(Protocol):
    """What an Acceptor needs of the receiving side it accepts for (smtpd/server.py)."""

    cfg: Config
    share: Share
    throttle: Throttle
    exemptions: Exemptions
    acceptors: list[Acceptor]  # this process's, one per listener (per-address eviction)
    handoff: Handoff | None  # with several workers: newcomers passed between them
    oldest: Oldest | None  # ... and this process's oldest candidates, published there
    proxy_trusted: proxy.Networks
    stopping: bool
    open_sockets: int  # client sockets held by this process (accepted, not closed)

    def tls_context(self) -> ssl.SSLContext | None: ...
    def protocol_factory(self, ln: Listener,
                         ticket: Ticket) -> Callable[[], asyncio.Protocol]: ...
    def fd_tight(self, acceptor: Acceptor) -> bool: ...
    def fd_warning(self) -> None: ...
    def fd_released(self) -> None: ...
    def refused(self, ln: Listener, ip: str, r: Reply, reason: str, tls: bool) -> None: ...
    def tls_failed(self, ln: Listener, ip: str, why: str, seconds: float) -> None: ...
    def metrics_connection(self, mode: str, result: str) -> None: ...


def fd_budget() -> int:
    """Sockets this process may hold for clients: the soft fd limit minus a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(16, soft - max(FD_RESERVE_MIN, soft // 10))


class Ticket:
    """A session's admission: held from TCP accept until the connection is closed.

    What the session (or h9's protocol adapter) needs and nothing more: `command_timeout`
    (read it before every wait: it drops while the listener is in stress mode), the AUTH
    and per-user throttle bound to this client's address, and `release()` (idempotent;
    the server calls it when the connection ends)."""

    def __init__(self, admission: Acceptor, ip: str, pools: Sequence[Pool],
                 exempt: bool, peer: tuple[str, int] | None = None,
                 key: str | None = None, addr: object = None) -> None:
        self._adm = admission
        self.ip = ip
        self.addr = addr  # the socket's peer as accept() gave it (None: not known)
        self.key = key or ip  # what the per-address limits counted this client under
        self.ekey = eviction_key(self.key)  # ... and eviction (an IPv6 client by its /48)
        self.pools = pools
        self.exempt = exempt
        self.released = False
        self.born = time.monotonic()  # accepted (eviction.py `own`: OWN_AGE)
        # The client's (address, port) from a PROXY header (smtpd/proxy.py), which the
        # session uses instead of the socket's peer (the load balancer); None: no header.
        self.peer = peer
        # Eviction (issue 17): counted as pending (handshake or greeting delay) until
        # settle(); a candidate while pending and while idle before AUTH.
        self.pending = False
        self.evicted = False
        self.sock: socket.socket | None = None
        # Whether _serve has given `sock` to the loop (connect_accepted_socket): until
        # then the socket is ours to close; after, the loop's transport closes it.
        self.handed = False
        self.task: asyncio.Task[None] | None = None
        self.handshake: Candidate | None = None
        self.idling: Candidate | None = None  # `idle_candidate` while a candidate
        self.idle_candidate: Candidate | None = None  # made at the first idle(), reused after

    @property
    def command_timeout(self) -> float:
        return self._adm.command_timeout(self)

    @property
    def stressed(self) -> bool:
        return self._adm.stressed

    @property
    def _throttle(self) -> Throttle:
        return self._adm.server.throttle

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._adm.release(self)

    def settle(self) -> None:
        """The session starts: its handshake and greeting delay are done."""
        self.task = None  # _serve is done with it: let its finished task go (~0.8 KB)
        self._adm.settle(self)

    def idle(self, evict: Callable[[], None], moved: bool = True) -> None:
        """The session waits for the client (a command, a STARTTLS handshake) without
        having authenticated and outside a transaction: until `busy()`, a full pool may
        evict it by calling `evict` (which must close the connection). `moved`: a command
        moved it on since its last wait (not junk, not an error), so it is aged anew;
        else it keeps its age (eviction.py: a NOOP does not make a session younger)."""
        self._adm.idle(self, evict, moved)

    def busy(self) -> None:
        self._adm.busy(self)

    async def auth_lockout(self, user: str) -> Lockout:
        return await self._throttle.auth_lockout(self.ip, user)

    async def auth_failed(self, user: str, known_net: bool = False) -> None:
        await self._throttle.auth_failed(self.ip, user, known_net)

    async def auth_succeeded(self, user: str) -> None:
        self._adm.authenticated(self)
        await self._throttle.auth_succeeded(self.ip, user)

    async def user_may_send(self, user: str) -> bool:
        return await self._throttle.user_may_send(user)

    async def user_may_add_rcpt(self, user: str, pending: int) -> bool:
        return await self._throttle.user_may_add_rcpt(user, pending)

    async def user_sent(self, user: str, nrcpts: int) -> None:
        await self._throttle.user_sent(user, nrcpts)


def client_ip(addr: Any) -> str:
    ip = str(addr[0]) if isinstance(addr, tuple) and addr else ""
    return ip[7:] if ip.startswith("::ffff:") else ip


@functools.lru_cache(maxsize=4096)
def eviction_key(key: str) -> str:
    """What eviction (smtpd/eviction.py) counts a client under: its per-address key
    (`Throttle.key`), an IPv6 one widened to its /48. A host given a /48 (or a /56)
    rotates through its /64s at will: counted per /64, a flood from one /48 was tens of
    thousands of fresh addresses, each refused too rarely to be marked under pressure,
    and took every slot that aged before a fresh client elsewhere could (measured: 0 of
    62 fresh clients on 465 served). Counted per /48 it is the heaviest address, whose
    candidates a newcomer from anywhere else evicts at once."""
    if ":" not in key:
        return key
    try:
        net = ipaddress.IPv6Network(key, strict=False)
    except ValueError:
        return key
    if net.prefixlen <= EVICT_V6_PREFIX:
        return key
    return str(net.supernet(new_prefix=EVICT_V6_PREFIX))


class Acceptor:
    """The accept loop and admission of one listener."""

    def __init__(self, server: Host, ln: Listener) -> None:
        self.server = server
        self.ln = ln
        self.sock = ln.sock
        self.open = 0  # sockets of this listener held by this process
        self.stressed = False
        self.calm_since = 0.0
        self.paused: str = ""  # why accepting is paused: "", "full", "fd", "error", "stop"
        self.full_since = 0.0
        self._poll: asyncio.TimerHandle | None = None
        self._stress_poll: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.proxy_reads: set[asyncio.Task[None]] = set()  # PROXY headers being read
        # eviction candidates (issue 17), their marks in the node's table
        self.candidates = Candidates(server.throttle.eviction_marks(), server.oldest)
        self._lines = 0  # refusal lines logged in this second
        self._refused: Counter[str] = Counter()  # refusals not logged one by one, by reason
        self._evicted: Counter[str] = Counter()  # evictions this second, by kind
        self._evicted_from: Counter[str] = Counter()  # ... by address
        self._own_evicted = 0  # per-address evictions this second not logged one by one
        self._summary: asyncio.TimerHandle | None = None
        self.reload()

    # ------------------------------------------------------------ configuration
    def reload(self) -> None:
        cfg = self.server.cfg
        lim = cfg.limits
        share = self.server.share
        total = share.part(lim.max_connections)
        several = len(cfg.listen) > 1
        reserve = total * lim.pool_reserve_percent // 100 if several else 0
        limit = max(1, total - reserve) if total else 0  # what one listener may take
        pools = [Pool("*", total)] if total else []
        if self.ln.mode == "smtp" and any(ln.mode != "smtp" for ln in cfg.listen):
            pools.append(Pool("class:smtp", limit))
        own = share.part(self.ln.cfg.max_connections) or limit
        self.pool_key = f"listener:{self.ln.name}"
        pools.append(Pool(self.pool_key, own))
        self.pools: tuple[Pool, ...] = tuple(pools)
        # The same pools one over: a newcomer that evicts is counted into its victim's
        # slot before the eviction frees it (_admit_client).
        self.over_pools = tuple(Pool(p.key, p.cap + 1) if p.cap else p for p in pools)
        self.cap = min(c for c in (own, limit) if c) if (own or limit) else 0  # stress mode

    @property
    def submission(self) -> bool:
        return self.ln.mode != "smtp"

    # ------------------------------------------------------------ accept loop
    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _pause(self, why: str) -> None:
        if not self.paused:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.paused = why
        if why != "stop" and self._poll is None:
            self._poll = asyncio.get_running_loop().call_later(POLL, self._look_again)

    def _resume(self) -> None:
        if self.paused and self.paused != "stop":
            self.paused = ""
            if self._poll is not None:
                self._poll.cancel()
                self._poll = None
            self.start()

    def stop(self) -> None:
        if self.paused != "stop":
            if not self.paused:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.paused = "stop"
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self._stress_poll is not None:
            self._stress_poll.cancel()
            self._stress_poll = None
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
            self._log_summary()
        for t in list(self.tasks) + list(self.proxy_reads):
            t.cancel()

    def leave(self) -> None:
        """Once stopped: the clients already in this listener's backlog answered 421 4.3.2
        (reason=stopping), then the socket taken out of its SO_REUSEPORT group
        (shutdown(), as HAProxy pauses a listener): the master keeps a copy of a worker's
        listening sockets for the worker it forks in its place, and while it was in the
        group the kernel went on queueing there a share of the new connections, unanswered
        until that replacement ran (a worker stopped alone: up to its shutdown_timeout).
        The other workers take them now; the replacement listens on it again. One that
        comes in the instant between the last accept and the shutdown() is reset."""
        for _ in range(ACCEPT_BATCH * 16):
            try:
                sock, addr = self.sock.accept()
            except OSError:  # (BlockingIOError: none left)
                break
            self.server.metrics_connection(self.ln.mode, "refused")
            self._refuse(sock, client_ip(addr),
                         Admission(replies.SHUTTING_DOWN, 0.0, "stopping"))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _look_again(self) -> None:
        self._poll = None
        why = self.paused
        if why == "full":
            if not self.server.throttle.full(self.pools) or self._may_evict():
                self.full_since = 0.0
                self._resume()
                return
            if time.monotonic() - self.full_since >= self.server.cfg.limits.backlog_wait:
                # Waited long enough: tell the ones in the backlog (421), then wait again.
                self._drain_full()
                self.full_since = time.monotonic()
        elif why == "fd":
            if not self.server.fd_tight(self):
                self._resume()
                return
        elif why == "error":
            self._resume()
            return
        if self.paused and self.paused != "stop":
            self._poll = asyncio.get_running_loop().call_later(POLL, self._look_again)

    def _accept(self) -> tuple[socket.socket, Any] | None:
        try:
            return self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return self._accept()
            # EMFILE / ENFILE / ENOBUFS / ENOMEM: leave the clients in the backlog a moment.
            maillog.warning(f"accept failed, pausing the listener: {e.strerror}",
                            listener=self.ln.name)
            self._pause("error")
            return None

    def _readable(self) -> None:
        srv = self.server
        for _ in range(ACCEPT_BATCH):
            if srv.stopping:
                return
            if srv.fd_tight(self):
                self._pause("fd")
                srv.fd_warning()
                return
            if self.submission and srv.throttle.full(self.pools) and not self._may_evict():
                # Leave the clients in the kernel backlog until a slot frees (or the wait
                # passes `backlog_wait`): a 421 is an error to a user's mail program.
                if not self.full_since:
                    self.full_since = time.monotonic()
                self._pause("full")
                return
            got = self._accept()
            if got is None:
                return
            self._admit(*got)

    def _drain_full(self) -> None:
        """Accept what waits in the backlog and answer 421 (or admit, if a slot freed)."""
        for _ in range(ACCEPT_BATCH * 16):
            got = self._accept()
            if got is None:
                return
            self._admit(*got)

    # ------------------------------------------------------------ admission
    def _admit(self, sock: socket.socket, addr: Any) -> None:
        if self.ln.cfg.proxy_protocol:  # the client's address comes first (issue 14)
            self._proxied(sock, addr)
            return
        self._admit_client(sock, addr, None)

    def _proxied(self, sock: socket.socket, addr: Any) -> None:
        """A connection to a proxy_protocol listener: only from `[relay] proxy_trusted`,
        and only once its PROXY header is read (before admission, before TLS)."""
        srv = self.server
        ip = client_ip(addr)
        if ip not in srv.proxy_trusted:
            self._proxy_refused(sock, ip, "not a trusted proxy (relay.proxy_trusted)")
            return
        # A header already there whole (a balancer sends it at once) is taken now: the
        # cap below bounds only the reads that must wait, so a flood of slow or missing
        # headers cannot refuse the clients whose headers came (measured: a 3,000-address
        # flood through the balancer left 1-2 of 16 real logins served, the rest reset
        # here for "too many PROXY headers pending").
        try:
            sock.setblocking(False)
            header = proxy.header_if_complete(sock)
        except proxy.ProxyError as e:
            self._proxy_failed(sock, ip, e)
            return
        if header is not None:
            self._admit_client(sock, header.source or addr, header.source)
            return
        if len(self.proxy_reads) >= max(PROXY_READS_MIN, srv.cfg.limits.max_connections):
            self._proxy_refused(sock, ip, "too many PROXY headers pending")
            return
        task = asyncio.get_running_loop().create_task(self._read_proxy(sock, addr, ip))
        self.proxy_reads.add(task)
        task.add_done_callback(self.proxy_reads.discard)

    async def _read_proxy(self, sock: socket.socket, addr: Any, ip: str) -> None:
        try:
            sock.setblocking(False)
            header = await proxy.read_header(sock, self.server.cfg.limits.proxy_timeout)
        except proxy.ProxyError as e:
            self._proxy_failed(sock, ip, e)
            return
        except TimeoutError:
            self._proxy_refused(sock, ip, "no complete PROXY header in time")
            return
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        if self.server.stopping:
            with contextlib.suppress(OSError):
                sock.close()
            return
        # LOCAL / UNKNOWN (the proxy's own health check): the connection's own address.
        self._admit_client(sock, header.source or addr, header.source)

    def _proxy_failed(self, sock: socket.socket, ip: str, e: proxy.ProxyError) -> None:
        """A PROXY header that could not be read: a plain TCP health check (connect,
        close: ProxyClosed) is closed quietly, anything else refused with a line."""
        if isinstance(e, proxy.ProxyClosed):
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._proxy_refused(sock, ip, str(e))

    def _proxy_refused(self, sock: socket.socket, ip: str, why: str) -> None:
        with contextlib.suppress(OSError):
            sock.close()
        self.server.metrics_connection(self.ln.mode, "refused")
        # Within the same per-second budget as the other refusals: a flood through the
        # balancer (measured: 3,000 addresses, "too many PROXY headers pending") wrote
        # some 2,500 lines a second.
        if self._lines < REFUSAL_LINES:
            self._lines += 1
            maillog.warning(f"connection closed: PROXY header refused: {why}",
                            relay=f"unknown [{ip}]", listener=self.ln.name)
        else:
            self._refused["proxy_header"] += 1
        self._summary_soon()

    def admit_passed(self, p: Passed) -> None:
        """A newcomer another worker passed on (handoff.py): admitted here with this
        worker's candidates only (never passed on again)."""
        self._admit_client(p.sock, p.addr, p.peer, passed_by=p.by)

    def refuse_passed(self, p: Passed) -> None:
        """A newcomer passed on to this worker once it stops: 421 4.3.2, a reject line
        (reason=stopping)."""
        self.server.metrics_connection(self.ln.mode, "refused")
        self._refuse(p.sock, client_ip(p.addr),
                     Admission(replies.SHUTTING_DOWN, 0.0, "stopping"))

    def _admit_client(self, sock: socket.socket, addr: Any,
                      peer: tuple[str, int] | None, passed_by: int = 0) -> None:
        srv = self.server
        ip = client_ip(addr)
        exempt = ip in srv.exemptions
        # Counted under the key of this moment (an IPv6 client by its prefix), released
        # under the same one even if a reload changes ipv6_prefix_length meanwhile.
        key = srv.throttle.key(ip)
        ekey = eviction_key(key)
        lim = srv.cfg.limits
        if not exempt and lim.max_pending_per_ip and \
                srv.throttle.pending(key) >= lim.max_pending_per_ip:
            srv.metrics_connection(self.ln.mode, "refused")
            self.candidates.refused(ekey, time.monotonic())
            self._refuse(sock, ip, Admission(replies.TOO_MANY_PENDING, 0.0, "pending_ip"))
            return
        adm = srv.throttle.connect(key, self.pools, exempt=exempt)
        if not adm.admitted and adm.reason.startswith("pool:") and lim.pool_eviction:
            victim = self.candidates.victim(ekey, time.monotonic(), self._weight, who=key)
            if victim is not None:
                # Counted into the victim's slot before the eviction frees it (the pools
                # one over for that moment): freed first, another worker could take it
                # before this one, which evicted again (up to three for one newcomer).
                adm = srv.throttle.connect(key, self.over_pools, exempt=exempt)
                if adm.admitted:
                    self._evict(victim)
        if not adm.admitted and lim.pool_eviction and (
                adm.reason == "ip" or adm.reason.startswith("pool:") and not exempt and
                lim.max_connections_per_ip and
                srv.throttle.connections(key) >= lim.max_connections_per_ip):
            # At its max_connections_per_ip (a full pool may have said so first): its own
            # oldest idle connection; for the full pool, one of this listener's only.
            here = adm.reason != "ip"
            found = self._own_victim(key, ekey, here)
            if not passed_by and self._pass_own(sock, addr, peer, key, found, here):
                return  # the worker holding the address's oldest admits it
            adm = self._take_own(ip, key, exempt, found, passed_by) or adm
        srv.metrics_connection(self.ln.mode, "accepted" if adm.admitted else "refused")
        if not adm.admitted:
            if adm.reason.startswith("pool:"):
                self.candidates.refused(ekey, time.monotonic())  # eviction.py: no tie slot
            self._refuse(sock, ip, adm)
            return
        ticket = Ticket(self, ip, self.pools, exempt, peer, key, addr)
        ticket.sock = sock
        limit_send_buffer(sock)
        # Pending (max_pending_per_ip) only what will really wait: a 465 handshake or a
        # greeting delay. A plaintext connection without delay starts its session as soon
        # as its task runs; counted, a burst of simultaneous connects from one address
        # (an MTA's parallel deliveries, an office behind one NAT) accepted in one batch
        # was refused "in handshake" on 25 and 587.
        if self.ln.mode == "submissions" or adm.delay > 0:
            ticket.pending = True
            srv.throttle.pending_add(key, 1)
        if lim.pool_eviction:
            ticket.handshake = Candidate(ekey, time.monotonic(),
                                         lambda: self._evict_handshake(ticket), "handshake",
                                         who=key, shared=ticket.pending)
            self.candidates.add(ticket.handshake)
        self.open += 1
        srv.open_sockets += 1
        self._check_stress()
        task = asyncio.get_running_loop().create_task(self._serve(sock, ip, ticket, adm.delay))
        ticket.task = task
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._served, ticket))

    def _served(self, ticket: Ticket, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        ticket.task = None  # no cycle ticket -> task -> its frame -> ticket left for the GC

    def _refuse(self, sock: socket.socket, ip: str, adm: Admission) -> None:
        r = adm.refusal
        assert r is not None
        tls = self.ln.mode == "submissions"
        if not tls:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
                sock.send(r.lines())  # a few bytes into an empty socket buffer: never blocks
        with contextlib.suppress(OSError):
            sock.close()
        if self._lines < REFUSAL_LINES:
            self._lines += 1
            self.server.refused(self.ln, ip, r, adm.reason, tls)
        else:
            self._refused[adm.reason] += 1
        self._summary_soon()

    # ------------------------------------------------------------ eviction (issue 17)
    def _may_evict(self) -> bool:
        return self.server.cfg.limits.pool_eviction and self.candidates.total > 0

    def _weight(self, key: str) -> int:
        """An address's eviction candidates as the victim rule counts them: those in
        handshake counted across all workers (the shared pending gauge), idle sessions
        in this one. `key` is an eviction key: an IPv6 /48 wider than the per-address
        prefix has no shared gauge (its /64s have theirs) and counts in this worker."""
        throttle = self.server.throttle
        if ":" in key and throttle.v6_prefix > EVICT_V6_PREFIX:
            return self.candidates.count(key)
        return max(throttle.pending(key), self.candidates.count(key))

    def _own_victim(self, key: str, ekey: str, here: bool
                    ) -> tuple[Acceptor, Candidate] | None:
        """The address `key` is at `max_connections_per_ip`: its own eviction candidate
        connected longest ago in this process (eviction.py `own`: aged TIE_AGE or
        OWN_AGE, never an authenticated session, one in a transaction or with a command
        running), on any listener (the per-address count covers them all; `here`: this
        one's only, for a pool of it full too: only a victim in it frees a slot of every
        pool the newcomer needs), and the acceptor holding it; None when there is none."""
        now, best = time.monotonic(), None
        for acc in [self] if here else self.server.acceptors:
            victim = acc.candidates.own(ekey, key, now)
            if victim is not None and (best is None or victim.born < best[1].born):
                best = (acc, victim)
        return best

    def _pass_own(self, sock: socket.socket, addr: Any, peer: tuple[str, int] | None,
                  key: str, found: tuple[Acceptor, Candidate] | None, here: bool) -> bool:
        """With several workers: whether the newcomer went to another worker (handoff.py,
        which admits it there), the one whose candidate of the address connected longest
        ago is takeable and connected before this one's own victim (`found`); or, this
        one holding none, the one whose candidate connected longest ago is not takeable
        yet (it may hold another that is). Only for a newcomer already refused for its
        address's limit: a shared-memory read per worker. For a full pool of this
        listener (`here`) only when this process holds none of the address's in it: the
        other worker's may be in another listener, whose slot the newcomer cannot use
        (that worker then takes one of this listener's, or refuses)."""
        handoff = self.server.handoff
        if handoff is None or found is not None and here:
            return False
        entries, now = handoff.entries(key), time.monotonic()
        ready = [e for e in entries if takeable(e[2], e[1], now)]
        to = min(ready or (entries if found is None else []), key=lambda e: e[1],
                 default=None)
        if to is None or found is not None and found[1].born <= to[1]:
            return False
        if not handoff.pass_on(to[0], sock, self.ln.name, addr, peer):
            return False  # its inbox full (stalled, or dead): handled here
        with contextlib.suppress(OSError):
            sock.close()  # the descriptor in flight keeps the connection
        return True

    def _take_own(self, ip: str, key: str, exempt: bool,
                  found: tuple[Acceptor, Candidate] | None, passed_by: int = 0
                  ) -> Admission | None:
        """Take the slot of `found` (`_own_victim`) for a newcomer from `key`: counted
        into the victim's slot before the eviction frees it, as the pool eviction is
        (`over_pools`); the admission, or None when there is no victim (the address's
        connections are all busy or young: refused as before). `passed_by`: the pid of
        the worker that accepted the newcomer and passed it here (0: this one)."""
        if found is None:
            return None
        acc, victim = found
        adm = self.server.throttle.connect(
            key, self.over_pools if acc is self else self.pools, exempt=exempt,
            ip_over=True)
        if adm.admitted:
            acc._evict(victim, ip=ip, passed_by=passed_by)
        return adm

    def settle(self, ticket: Ticket) -> None:
        ticket.sock = None  # the transport owns it now
        if ticket.handshake is not None:
            self.candidates.discard(ticket.handshake)
            ticket.handshake = None
        if ticket.pending:
            ticket.pending = False
            self.server.throttle.pending_add(ticket.key, -1)

    def idle(self, ticket: Ticket, evict: Callable[[], None], moved: bool = True) -> None:
        if ticket.released or ticket.idling is not None or \
                not self.server.cfg.limits.pool_eviction:
            return
        c = ticket.idle_candidate
        if c is None:  # (one session per ticket: `evict` is always its own)
            c = ticket.idle_candidate = Candidate(ticket.ekey, time.monotonic(),
                                         lambda: self._evict_session(ticket, evict), "session",
                                         who=ticket.key, born=ticket.born)
        elif moved:
            c.since = time.monotonic()
        ticket.idling = c
        # the youngest again in the order looked at (its age kept when it did not move)
        self.candidates.add(c)
        if self.paused == "full":  # room can be made now: accept again
            self.full_since = 0.0
            self._resume()

    def authenticated(self, ticket: Ticket) -> None:
        """Its address is a user's: no longer marked as pressing (eviction.py)."""
        self.candidates.relieve(ticket.ekey, time.monotonic(), who=ticket.key)

    def busy(self, ticket: Ticket) -> None:
        if ticket.idling is not None:
            self.candidates.discard(ticket.idling)
            ticket.idling = None

    def _evict(self, c: Candidate, ip: str | None = None, passed_by: int = 0) -> None:
        """Evict `c`: for a full pool (counted in the per-second summary line), or, with
        `ip` (the newcomer's address), for `max_connections_per_ip` (a line each, within
        the REFUSAL_LINES budget of this listener's second; past it counted in a summary
        line of their own; `passed_by`: the newcomer's accepting worker's pid, named in
        the line, when another worker passed it here)."""
        self.candidates.discard(c)
        c.evict()  # releases its pool slot now
        self.server.metrics_connection(self.ln.mode, "evicted")
        if ip is not None and self._lines >= REFUSAL_LINES:
            self._own_evicted += 1
        elif ip is not None:
            self._lines += 1
            kind = "in handshake" if c.kind == "handshake" else "idle before AUTH"
            limit = self.server.cfg.limits.max_connections_per_ip
            maillog.warning(f"per-address limit: evicted 1 pre-authentication connection "
                            f"({kind})", relay=f"unknown [{ip}]", listener=self.ln.name,
                            reason="max_connections_per_ip",
                            connections=f"{limit}/{limit}",
                            accepted_by=passed_by or None)
        else:
            self._evicted[c.kind] += 1
            self._evicted_from[c.key] += 1
        self._summary_soon()

    def _evict_handshake(self, ticket: Ticket) -> None:
        """Close a connection still in its TLS handshake or greeting delay: no reply (a TLS
        client could not read one), reset rather than a FIN (nothing to flush)."""
        ticket.evicted = True
        sock, ticket.sock = ticket.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if ticket.handed:
                    # Ends the handshake at once whichever loop runs it (uvloop does not
                    # close the socket of a cancelled connect_accepted_socket until
                    # collected); the transport closes the descriptor.
                    sock.shutdown(socket.SHUT_RDWR)
                else:
                    # Still ours: its _serve task may not even have started (admitted and
                    # evicted in one accept batch), and a task cancelled before it starts
                    # runs none of its code, so nothing else would close it.
                    sock.close()
        ticket.release()
        if ticket.task is not None:
            ticket.task.cancel()

    def _evict_session(self, ticket: Ticket, evict: Callable[[], None]) -> None:
        ticket.evicted = True
        evict()  # the session: 421 4.7.0 and close
        ticket.release()

    def _summary_soon(self) -> None:
        if self._summary is None:
            self._summary = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _tick(self) -> None:
        self._summary = None
        busy = bool(self._evicted or self._refused or self._lines or self._own_evicted)
        self._log_summary()
        if busy:  # keep counting by the second while refusals go on
            self._summary_soon()

    def _log_summary(self) -> None:
        """At most two lines a second however many connections were evicted or refused."""
        self._lines = 0
        ev, self._evicted = self._evicted, Counter()
        src, self._evicted_from = self._evicted_from, Counter()
        ref, self._refused = self._refused, Counter()
        own, self._own_evicted = self._own_evicted, 0
        if ev:
            top, n = src.most_common(1)[0]
            maillog.warning(
                f"pool full: evicted {sum(ev.values())} pre-authentication connections "
                f"({ev['handshake']} in handshake, {ev['session']} idle before AUTH)",
                listener=self.ln.name, busiest=top, busiest_evicted=n,
                connections=f"{self.server.throttle.level(self.pool_key)}/{self.cap}")
        if own:
            maillog.warning(f"per-address limit: evicted {own} more pre-authentication "
                            "connections without a line each", listener=self.ln.name,
                            reason="max_connections_per_ip")
        if ref:
            maillog.warning(
                f"refused {sum(ref.values())} more connections without a line each",
                listener=self.ln.name,
                reasons=" ".join(f"{k}:{v}" for k, v in ref.most_common()))

    def release(self, ticket: Ticket) -> None:
        srv = self.server
        self.settle(ticket)
        self.busy(ticket)
        ticket.idle_candidate = None  # its evict closure holds the ticket and the session
        srv.throttle.disconnect(ticket.key, ticket.pools)
        self.open = max(0, self.open - 1)
        srv.open_sockets = max(0, srv.open_sockets - 1)
        self._check_stress()
        if self.paused == "full" and not srv.throttle.full(self.pools):
            self.full_since = 0.0
            self._resume()
        srv.fd_released()

    async def _serve(self, sock: socket.socket, ip: str, ticket: Ticket, delay: float) -> None:
        """Delay (connection_rate), TLS handshake on 465, then the session."""
        srv, loop = self.server, asyncio.get_running_loop()
        handed = False
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            factory = srv.protocol_factory(self.ln, ticket)
            if self.ln.mode == "submissions":
                lim = srv.cfg.limits
                # In stress mode the handshake gets the short timeout too (as Postfix's
                # smtpd_starttls_timeout): a flood of idle handshakes frees its slots fast.
                hs = min(lim.tls_handshake_timeout, lim.stress_command_timeout) \
                    if self.stressed else lim.tls_handshake_timeout
                started = time.monotonic()
                # From here an eviction shuts the socket down (ending the wait for the
                # ClientHello too) and leaves closing it to us or the transport.
                ticket.handed = True
                refusal = None
                try:
                    # asyncio.timeout rather than only ssl_handshake_timeout: on expiry that
                    # aborts with an error indistinguishable from a reset; we log a timeout.
                    async with asyncio.timeout(hs):
                        # ALPACA, versions (tls.hello_refusal): a client refused for its
                        # ClientHello is refused before the TLS layer sees a byte.
                        hello = await peek_client_hello(sock)
                        ctx = srv.tls_context()
                        refusal = tls.hello_refusal(hello, ctx)
                        if refusal is None:
                            handed = True
                            await loop.connect_accepted_socket(
                                factory, sock, ssl=ctx and tls.for_hello(ctx, hello),
                                ssl_handshake_timeout=hs + 5)
                    if refusal is not None:
                        with contextlib.suppress(OSError):
                            sock.send(refusal.alert)  # 7 bytes: never blocks
                        sock.close()
                        srv.tls_failed(self.ln, ip, refusal.reason,
                                       time.monotonic() - started)
                        ticket.release()
                except TimeoutError:
                    if not handed:
                        sock.close()
                    srv.tls_failed(self.ln, ip, "handshake timed out",
                                   time.monotonic() - started)
                    ticket.release()
                except (ssl.SSLError, OSError, ConnectionError, RuntimeError) as e:
                    if not handed:
                        with contextlib.suppress(OSError):
                            sock.close()
                    srv.tls_failed(self.ln, ip, handshake_failure(e),
                                   time.monotonic() - started)
                    ticket.release()
            else:
                handed = ticket.handed = True
                await loop.connect_accepted_socket(factory, sock)
        except asyncio.CancelledError:
            ticket.release()
            if not handed:
                with contextlib.suppress(OSError):
                    sock.close()
            raise
        except Exception:
            log.exception("accepting a connection from %s", ip)
            ticket.release()
            if not handed:
                with contextlib.suppress(OSError):
                    sock.close()

    # ------------------------------------------------------------ stress mode
    def command_timeout(self, ticket: Ticket) -> float:
        lim = self.server.cfg.limits
        return min(lim.command_timeout, lim.stress_command_timeout) if self.stressed \
            else lim.command_timeout

    def _check_stress(self) -> None:
        if not self.cap:
            return
        lim = self.server.cfg.limits
        n = self.server.throttle.level(self.pool_key)
        pct = 100 * n / self.cap
        now = time.monotonic()
        if pct >= lim.stress_threshold - STRESS_OFF_MARGIN:
            self.calm_since = 0.0
        elif not self.calm_since:
            self.calm_since = now
        if not self.stressed and pct >= lim.stress_threshold:
            self.stressed = True
            maillog.warning("stress mode on: command timeout "
                            f"{lim.stress_command_timeout:g}s", listener=self.ln.name,
                            connections=f"{n}/{self.cap}")
            # Other workers' connections end too: look again until the load has passed.
            if self._stress_poll is None:
                self._stress_poll = asyncio.get_running_loop().call_later(
                    1.0, self._stress_tick)
        elif self.stressed and self.calm_since and now - self.calm_since >= STRESS_CALM:
            # The load has passed: below the threshold by a margin for a while (a flood
            # with churn would otherwise switch it on and off every few seconds).
            self.stressed = False
            if self._stress_poll is not None:
                self._stress_poll.cancel()
                self._stress_poll = None
            maillog.warning("stress mode off", listener=self.ln.name,
                            connections=f"{n}/{self.cap}")

    def _stress_tick(self) -> None:
        self._stress_poll = None
        self._check_stress()
        if self.stressed and self._stress_poll is None:
            self._stress_poll = asyncio.get_running_loop().call_later(1.0, self._stress_tick)
