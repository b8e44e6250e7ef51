"""One outbound SMTP connection: an asyncio Protocol around the sans-I/O `wire` parser.

Owns the socket side of the courier: connecting (plain or implicit TLS), reading replies
with a deadline per reply, writing commands and message data with flow control, and
upgrading to TLS in place (STARTTLS, RFC 3207). It knows nothing of envelopes or
recipients; `client.py` drives it.

Contract:
- `await open_connection(host, port, ...)` -> `Connection`, connected (no greeting read).
- `write(data)` never blocks; `await drain(timeout)` waits while the transport's buffer
  is over its high-water mark (asyncio `pause_writing` / `resume_writing`), so a 20 MB
  message streamed from the spool never sits in memory whole.
- `await reply(timeout)` returns the next reply in arrival order; replies to a pipelined
  group (RFC 2920) queue up and are returned one by one.
- `send(line)` (and `command`) writes a command whose reply is the next one due: a reply
  (or part of one) already waiting then answers no command of ours, and whatever came
  next would be read as the wrong command's: `OutOfStep` (a `ProtocolError`), the
  connection dropped.
- `await start_tls(ctx, server_hostname, timeout)` upgrades the transport. Bytes that
  arrived after the server's 220 and before the handshake are refused (RFC 3207 5,
  the STARTTLS response-injection attack): `ProtocolError`.
- `deadline` (a `time.monotonic()` instant, or None): the end of the delivery attempt
  the connection serves (`[delivery] attempt_timeout`). Every wait (`reply`, `drain`,
  `start_tls`) ends by then whatever its own timeout: `DeadlineExceeded` (a
  `TimeoutError`), at once when it has passed already.
Failure policy: a lost connection makes every later `reply`/`drain` raise
`ConnectionLost`; a deadline raises `TimeoutError` (`DeadlineExceeded` for the attempt's);
garbage from the server raises `ProtocolError` and aborts the transport. The caller maps
these to transient results.
At most `MAX_QUEUED` unread replies are kept: a server that floods replies nobody asked
for is cut off. Replies of up to `wire.MAX_LINES` lines of `wire.MAX_LINE` octets make
that count alone worth a GiB, so reading also pauses (TCP pushes back on the server)
while the unread replies cost more than `MAX_UNREAD_BYTES`, and resumes as they are read:
memory per connection stays a few MiB whatever the server sends, while idle in the
cache too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
import struct
import time
from collections import deque
from typing import Any

from authrelay.delivery.wire import OutOfStep, ProtocolError, ReplyParser, SMTPReply

MAX_QUEUED = 1024  # replies received but not yet read (a pipelined group: 1 + rcpts + 1, with
# at most client._MAX_RCPTS recipients in one)
MAX_UNREAD_BYTES = 1 << 20  # what unread replies may cost before reading pauses
_LINE_COST = 64  # a reply line's cost beyond its text: the str object, its tuple slot
# uvloop's timers count whole milliseconds: one may go off up to this much before the
# time it was armed for (loop.time()). A timer re-armed for less would go off at once,
# again and again (seen: 179 turns for three waits) until the clock caught up.
TIMER_SLACK = 0.001


def _cost(rep: SMTPReply) -> int:
    """What a parsed reply costs in memory, about (text plus per-line overhead)."""
    return sum(map(len, rep.lines)) + _LINE_COST * len(rep.lines)


def _expire(fut: asyncio.Future[None]) -> None:
    """A reply or drain wait's timer: its time is up."""
    if not fut.done():
        fut.set_exception(TimeoutError())


class ConnectionLost(ConnectionError):
    """The server closed the connection (or it broke) before the expected reply."""


class DeadlineExceeded(TimeoutError):
    """A wait reached `Connection.deadline`, the end of the delivery attempt."""


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = ReplyParser()
        self._replies: deque[SMTPReply] = deque()
        self._costs: deque[int] = deque()  # _cost() of each in _replies, computed once
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: BaseException | None = None
        self._closed = False
        self._unread = 0  # _cost() of the replies in _replies
        self._reading_paused = False
        self.tls = False
        self.deadline: float | None = None  # time.monotonic(): no wait goes past it
        # The wait in progress (its waiter and loop.time() it ends) and the timer watching
        # it (_within, _alarm): armed at _alarm_at, math.inf when off.
        self._due = 0.0
        self._due_fut: asyncio.Future[None] | None = None
        self._alarm_handle: asyncio.TimerHandle | None = None
        self._alarm_at = math.inf

    def _budget(self, timeout: float) -> tuple[float, bool]:
        """(how long a wait of `timeout` may take, whether the deadline cut it)."""
        if self.deadline is None:
            return timeout, False
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the delivery attempt's time limit was reached")
        return (left, True) if left < timeout else (timeout, False)

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as e:
            self._fail(e)
            return
        if replies:
            costs = list(map(_cost, replies))
            self._replies.extend(replies)
            self._costs.extend(costs)
            if len(self._replies) > MAX_QUEUED:
                self._fail(ProtocolError("too many unsolicited replies"))
                return
            self._unread += sum(costs)
            if self._unread > MAX_UNREAD_BYTES and not self._reading_paused \
                    and self.transport is not None:
                self.transport.pause_reading()  # resumed by reply() as they are read
                self._reading_paused = True
            self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._disarm()
        if self._lost is None:
            self._lost = ConnectionLost(str(exc) if exc else "connection closed by the server")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ------------------------------------------------------------------ helpers
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    @property
    def is_connected(self) -> bool:
        return not self._closed and self._lost is None and self.transport is not None \
            and not self.transport.is_closing()

    @property
    def unread_bytes(self) -> int:
        """What the replies received but not yet read cost (see `MAX_UNREAD_BYTES`)."""
        return self._unread

    @property
    def reading_paused(self) -> bool:
        """Reading is paused: the unread replies cost more than `MAX_UNREAD_BYTES`."""
        return self._reading_paused

    @property
    def has_unread(self) -> bool:
        """Replies (or parts of one) arrived that no command asked for yet: on an idle
        connection that means it cannot be trusted to stay in step (e.g. a 421)."""
        return bool(self._replies) or self._parser.pending

    def peek(self) -> SMTPReply | None:
        """The next reply received and not read yet, left unread (None: none whole)."""
        return self._replies[0] if self._replies else None

    def peername(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport else None

    # ------------------------------------------------------------------ API
    def write(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        assert self.transport is not None
        self.transport.write(data)

    async def _within(self, fut: asyncio.Future[None], timeout: float) -> None:
        """Await `fut` for `timeout` or up to the attempt's deadline, whichever is first;
        past the deadline DeadlineExceeded, past `timeout` TimeoutError. `fut` is a
        fresh waiter nobody else awaits, so a timer that fails it does what
        `asyncio.wait_for` did at ~6 us less per wait (no second future, no callbacks);
        a cancel of the awaiting task cancels `fut`, as wait_for's did. The timer is the
        connection's own (`_alarm`), left armed between waits and moved only when a wait
        ends sooner than it: a wait of ms against timeouts of minutes arms one about once
        a timeout, not a timer armed and cancelled per reply (two a message, issue 22)."""
        wait, cut = self._budget(timeout)
        loop = asyncio.get_running_loop()
        due = loop.time() + wait
        if self._due_fut is not None:  # a second wait at once (none does): its own timer
            timer: asyncio.TimerHandle | None = loop.call_at(due, _expire, fut)
        else:
            timer = None
            self._due, self._due_fut = due, fut
            if self._alarm_at > due:
                if self._alarm_handle is not None:
                    self._alarm_handle.cancel()
                self._alarm_handle = loop.call_at(due, self._alarm)
                self._alarm_at = due
        try:
            await fut
        except TimeoutError:
            if cut:
                raise DeadlineExceeded("the delivery attempt's time limit was reached") \
                    from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
            elif self._due_fut is fut:
                self._due_fut = None
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a cancel that met the timer logs nothing

    def _alarm(self) -> None:
        """The connection's timer: the wait in progress, if any, fails once its time is
        up; one that ends later re-arms it for then; with none the timer stays off until
        the next wait."""
        self._alarm_handle, self._alarm_at = None, math.inf
        fut = self._due_fut
        if fut is None or fut.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() >= self._due - TIMER_SLACK:
            _expire(fut)
            return
        self._alarm_handle = loop.call_at(self._due, self._alarm)
        self._alarm_at = self._due

    def _disarm(self) -> None:
        """The connection is gone: its timer must not keep it in memory until it fires."""
        if self._alarm_handle is not None:
            self._alarm_handle.cancel()
            self._alarm_handle, self._alarm_at = None, math.inf

    async def drain(self, timeout: float) -> None:
        if self._lost is not None:
            raise self._lost
        if not self._paused:
            return
        self._drain = asyncio.get_running_loop().create_future()
        try:
            await self._within(self._drain, timeout)
        finally:
            self._drain = None
        if self._lost is not None:
            raise self._lost

    async def reply(self, timeout: float) -> SMTPReply:
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._within(self._waiter, timeout)
            finally:
                self._waiter = None
        rep = self._replies.popleft()
        self._unread -= self._costs.popleft()
        if self._reading_paused and self._unread <= MAX_UNREAD_BYTES // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return rep

    def send(self, line: bytes) -> None:
        """Write a command (or a pipelined group, RFC 2920) that starts a new exchange: every
        reply due so far has been read, so anything received now answers no command of
        ours (a next hop out of step: a late second reply to an earlier command). Read
        next, it would be taken for this command's reply (a refusal bouncing a message
        it belongs to no step of): OutOfStep, the connection dropped (as Postfix's
        smtp_tls_block_early_mail_reply drops a session whose MAIL reply came first).
        The message names the reply, never `line` (it may hold credentials)."""
        if self._replies or self._parser.pending:
            early = self.peek()
            err = OutOfStep("replies out of step: a reply came before the next command was sent"
                            + (f": {str(early)[:200]}" if early is not None else ""))
            self._fail(err)
            raise err
        self.write(line)

    async def command(self, line: bytes, timeout: float) -> SMTPReply:
        self.send(line)
        return await self.reply(timeout)

    async def start_tls(self, ctx: ssl.SSLContext, server_hostname: str | None,
                        timeout: float) -> None:
        """Upgrade in place after the server's 220 to STARTTLS."""
        if self._replies or self._parser.pending:
            # RFC 3207 5: nothing may be read as if it came over TLS when it did not.
            self._fail(ProtocolError("data after the STARTTLS reply, before TLS"))
            raise ProtocolError("data after the STARTTLS reply, before TLS")
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        timeout, cut = self._budget(timeout)
        try:
            # Our own deadline, so a stalled handshake raises TimeoutError (asyncio's
            # ssl_handshake_timeout, kept as a backstop, aborts with ConnectionAbortedError:
            # "connection lost" in the reason, though the peer never said a word).
            async with asyncio.timeout(timeout):
                new = await loop.start_tls(self.transport, self, ctx, server_side=False,
                                           server_hostname=server_hostname,
                                           ssl_handshake_timeout=timeout + 1)
        except BaseException as e:
            self._closed = True
            if self.transport is not None:
                self.transport.abort()
            if cut and isinstance(e, TimeoutError):
                raise DeadlineExceeded("the delivery attempt's time limit was reached") \
                    from None
            raise
        if new is None:  # the transport was closed during the handshake
            self._closed = True
            raise ConnectionLost("connection closed during the TLS handshake")
        self.transport = new
        self.tls = True

    def close(self) -> None:
        """Close after what is buffered is sent; if anything is still unsent (a peer that
        stopped reading: a tarpit, a zero window), reset the connection instead: asyncio's
        close() would keep the socket and its buffer until the peer reads, that is for
        ever, and a plain abort() would leave the kernel's send buffer (MBs) waiting
        behind the FIN for minutes."""
        t = self.transport
        if t is not None and not t.is_closing():
            if t.get_write_buffer_size():
                self.abort()
                return
            t.close()
        self._closed = True

    def abort(self) -> None:
        """Drop the connection now; with data still unsent, as a reset (SO_LINGER 0), so
        the kernel frees the send buffer at once instead of probing a zero window."""
        t = self.transport
        if t is not None:
            if not t.is_closing() and t.get_write_buffer_size():
                sock = t.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):  # gone already: abort() does it
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            t.abort()
        self._closed = True


async def open_connection(host: str, port: int, *, timeout: float,
                          ssl_context: ssl.SSLContext | None = None,
                          server_hostname: str | None = None) -> Connection:
    """Connect (and, with `ssl_context`, do the implicit-TLS handshake) within `timeout`."""
    loop = asyncio.get_running_loop()
    kw: dict[str, Any] = {}
    if ssl_context is not None:
        kw = {"ssl": ssl_context, "server_hostname": server_hostname or host,
              "ssl_handshake_timeout": timeout}
    _, proto = await asyncio.wait_for(
        loop.create_connection(Connection, host, port, **kw), timeout)
    if ssl_context is not None:
        proto.tls = True
    return proto
