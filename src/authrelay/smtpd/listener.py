"""The I/O edge of the SMTP server: one `asyncio.Protocol` per connection.

Owns the socket side of a session: buffering input, flow control both ways, TLS
(implicit on 465 by the transport, `starttls()` for RFC 3207), and closing. The session
adapter (session.py) moves bytes between this and the sans-I/O engine (protocol.py):
`take()` hands over what arrived, `wait_input()` waits for more, `write()` sends.

Memory per connection is bounded whatever the client does:
- input: reading pauses while more than `HIGH_WATER` bytes wait unconsumed;
- output: the socket's kernel send buffer is fixed at `SNDBUF` (replies are all we send),
  the transport's write buffer limits are `OUT_HIGH_WATER`/`OUT_LOW_WATER`; above
  the high mark asyncio calls `pause_writing()`, `write_blocked` turns True and the session
  stops executing commands until `drain()` returns (a client that pipelines without
  reading its replies stalls itself, not the server);
- closing: `close(grace)` flushes for at most `grace` seconds, then aborts the transport,
  so a client that never reads cannot hold the socket, its buffers or its descriptor.
Failure policy: a wait that passes its deadline raises `Timeout`; a lost connection raises
`Closed` (so does `abort()` during a STARTTLS handshake: an eviction; a handshake that
fails raises its subclass `HandshakeFailed`, which says why). STARTTLS discards
everything the client pipelined after the command (CVE-2011-0411, CVE-2024-34083): only
bytes that arrive through the TLS layer count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable

from authrelay import tls
from authrelay.tls import handshake_failure

log = logging.getLogger(__name__)

HIGH_WATER = 128 * 1024  # pause reading above this much unconsumed input
CHUNK = 256 * 1024  # largest DATA piece the engine hands the body reader at once
OUT_HIGH_WATER = 64 * 1024  # unsent output above this: stop executing commands
OUT_LOW_WATER = 16 * 1024  # resume once the client has read down to this
SNDBUF = 32 * 1024  # kernel send buffer per connection (Linux doubles it): replies only
CLOSE_GRACE = 2.0  # seconds a closing connection may take to flush before it is aborted
QUIT_GRACE = 30.0  # the same after a normal end (QUIT): the last replies matter more


class Closed(Exception):
    """The peer went away (or we closed)."""


class Timeout(Exception):
    """A phase deadline passed."""


class HandshakeFailed(Closed):
    """A STARTTLS handshake failed: `reason` says why, as a 465 handshake's maillog line
    (tls.handshake_failure)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def peek_client_hello(sock: socket.socket) -> tls.Hello:
    """Wait for the client's ClientHello on `sock` and read it without consuming a byte
    (MSG_PEEK: the TLS layer reads it all afterwards). SO_RCVLOWAT keeps the socket
    unreadable until the records announced so far are whole, so a slow or fragmenting
    client costs one wakeup per step, not a busy loop. Gives up with `Hello()` (OpenSSL
    judges the bytes as usual) at EOF, past `tls.HELLO_PEEK_MAX`, or on a socket error.
    The caller bounds the wait (the handshake deadline)."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    need = 5
    try:
        while True:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_ready, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                data = sock.recv(tls.HELLO_PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if len(data) < need:  # EOF before the records are whole (or the kernel woke
                return tls.Hello()  # us early under memory pressure): OpenSSL judges
            hello = tls.read_hello(data)
            if not hello.need:
                return hello
            if hello.need > tls.HELLO_PEEK_MAX:
                return tls.Hello()
            need = hello.need
    except OSError:
        return tls.Hello()
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def limit_send_buffer(sock: socket.socket) -> None:
    """Fix an accepted socket's kernel send buffer at SNDBUF. We only ever send replies, so
    a small fixed send buffer costs no speed and keeps the kernel from autotuning up to
    megabytes of unread replies for a client that never reads (tcp_wmem max: 4 MB per
    connection)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    except OSError:
        pass


class Connection(asyncio.Protocol):
    def __init__(self, on_connect: Callable[[Connection], None],
                 loop: asyncio.AbstractEventLoop, peer: object = None) -> None:
        """`peer`: the client's address as accept() gave it (the transport is not asked
        for it again); None: asked of the transport."""
        self._on_connect = on_connect
        # The loop this connection runs on, held: asyncio.get_running_loop() costs a
        # getpid(2) per call on Python 3.11, and wait_input runs once per command.
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        # The input wait's deadline (loop time) and one timer per connection, re-armed
        # lazily: a wait whose deadline is at or after the armed timer's leaves it; when
        # it fires, it expires the wait in progress if that wait's deadline is the
        # timer's, and otherwise re-arms at that deadline (no timer per command).
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False  # the peer sent FIN (or the connection is gone)
        self._lost = False  # connection_lost was called
        self._paused = False  # reading paused (input back-pressure)
        self.write_blocked = False  # writing paused (output back-pressure)
        self._abort_handle: asyncio.TimerHandle | None = None
        self.peer: tuple[str, int] = ("", 0)
        self._accepted_peer = peer
        self.tls_info = ""  # "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
        self.task: asyncio.Task[None] | None = None
        # The task awaiting starttls() while it does; abort() ends that wait (below).
        self._tls_task: asyncio.Task[object] | None = None
        self._tls_aborted = False

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._limit_writes(transport)
        # (The socket's send buffer was fixed at SNDBUF by admission before it was handed
        # to the loop: limit_send_buffer.)
        peer = self._accepted_peer
        if peer is None:
            peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        obj = transport.get_extra_info("ssl_object")
        if obj is not None:  # implicit TLS (RFC 8314): the handshake is already done
            self._set_tls_info(obj)
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        # Keep our half open: replies to what the client sent before its FIN (the 250 for
        # a message just committed) must still go out; close() ends the connection.
        # (TLS transports cannot stay half open; asyncio would only warn.)
        t = self.transport
        return t is None or t.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self.write_blocked = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        self._wake()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.write_blocked = True

    def resume_writing(self) -> None:
        self.write_blocked = False
        self._wake_drain()

    # ------------------------------------------------------------ internals
    @staticmethod
    def _limit_writes(transport: asyncio.BaseTransport) -> None:
        with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError):
            transport.set_write_buffer_limits(  # type: ignore[attr-defined]
                high=OUT_HIGH_WATER, low=OUT_LOW_WATER)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    @staticmethod
    def _expire(w: asyncio.Future[None]) -> None:
        if not w.done():
            w.set_exception(Timeout())

    # ------------------------------------------------------------ session API
    @property
    def closed(self) -> bool:
        return self._lost

    def take(self) -> bytes:
        """Everything received so far (b"" if nothing), handed over to the caller."""
        if not self._buf:
            return b""
        data = bytes(self._buf)
        self._buf.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def input_ended(self) -> bool:
        """The peer sent FIN, or the connection is closed or gone (input may still be
        buffered)."""
        return self._eof

    @property
    def at_eof(self) -> bool:
        """No more input will come (FIN or connection lost) and none is buffered."""
        return self._eof and not self._buf

    async def wait_input(self, timeout: float) -> None:
        """Return once input is buffered or the peer closed; `Timeout` after `timeout`."""
        if self._buf or self._eof:
            return
        if timeout <= 0:
            raise Timeout
        loop = self.loop
        due = self._due = loop.time() + timeout
        if self._timer is None or self._timer_at > due:
            self._arm(due)
        w = self._waiter = loop.create_future()
        try:
            await w
        finally:
            self._waiter = None

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._input_timer)

    def _input_timer(self) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done():  # no wait in progress: the next one arms the timer
            return
        if self._due <= self._timer_at:  # this wait's own deadline
            w.set_exception(Timeout())
        else:  # armed for an earlier wait: this one's deadline is later
            self._arm(self._due)

    async def drain(self, timeout: float) -> None:
        """Wait until the client has read our output down to the low-water mark."""
        if not self.write_blocked:
            return
        if self._lost:
            raise Closed
        if timeout <= 0:
            raise Timeout
        loop = self.loop
        w = self._drain_waiter = loop.create_future()
        h = loop.call_later(timeout, self._expire, w)
        try:
            await w
        finally:
            h.cancel()
            self._drain_waiter = None
        if self._lost:
            raise Closed

    def write(self, data: bytes) -> None:
        t = self.transport
        if data and t is not None and not t.is_closing():
            t.write(data)

    def discard_input(self) -> int:
        n = len(self._buf)
        self.take()
        return n

    async def starttls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        """Upgrade to TLS. Anything buffered before the handshake is discarded by the caller."""
        if self.transport is None or self._lost or self._eof:
            raise Closed
        loop = self.loop
        self._paused = False
        task = self._tls_task = asyncio.current_task()
        try:
            # Our own deadline: on expiry asyncio's ssl_handshake_timeout aborts with a
            # ConnectionAbortedError, indistinguishable from a reset; the session must know
            # it was a timeout (maillog "421 4.4.2 ... stage=timeout"). asyncio.timeout,
            # not wait_for: a separate task would start a loop turn late, and a ClientHello
            # arriving in between would land in this plaintext protocol and be lost.
            async with asyncio.timeout(timeout):
                ctx = tls.for_hello(ctx, await self._screen_hello(ctx))
                new = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                           ssl_handshake_timeout=timeout + 5)
        except TimeoutError:
            self._eof = True
            raise Timeout from None
        except (ssl.SSLError, OSError, ConnectionError, RuntimeError) as e:
            self._eof = True
            raise HandshakeFailed(handshake_failure(e)) from e
        except asyncio.CancelledError:
            # abort() during the handshake (an eviction, a close that could not flush):
            # the connection is gone. Anyone else's cancel (shutdown) goes on as it came.
            if not self._tls_aborted or task is None or task.uncancel() > 0:
                raise
            self._eof = True
            raise Closed from None
        finally:
            self._tls_task = None
        if new is None:
            raise Closed
        self.transport = new
        self._limit_writes(new)
        obj = new.get_extra_info("ssl_object")
        if obj is not None:
            self._set_tls_info(obj)

    async def _screen_hello(self, ctx: ssl.SSLContext) -> tls.Hello:
        """Read the ClientHello before the TLS layer does, on a duplicate of the socket
        while the transport does not read (tls.for_hello picks the context by it). One
        that tls.hello_refusal refuses (ALPACA, versions) gets its alert and
        `HandshakeFailed`."""
        t = self.transport
        raw = t.get_extra_info("socket") if t is not None else None
        if t is None or raw is None:
            raise Closed
        t.pause_reading()  # start_tls resumes it
        with socket.socket(fileno=os.dup(raw.fileno())) as sock:
            hello = await peek_client_hello(sock)
        refusal = tls.hello_refusal(hello, ctx)
        if refusal is not None:
            self.write(refusal.alert)
            raise HandshakeFailed(refusal.reason)
        return hello

    def _set_tls_info(self, obj: ssl.SSLObject) -> None:
        cipher = obj.cipher()
        if cipher:
            bits = cipher[2]
            self.tls_info = f"{obj.version()} with cipher {cipher[0]} ({bits}/{bits} bits)"
        else:
            self.tls_info = str(obj.version())

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Flush what is written and close; abort if that takes longer than `grace`.

        A client that stops reading would otherwise keep the socket ESTABLISHED, its
        buffers allocated and its descriptor open for as long as it likes."""
        self._eof = True
        self._buf.clear()
        t = self.transport
        if t is None or self._lost:
            return
        if grace <= 0:
            self.abort()
            return
        if not t.is_closing():
            with contextlib.suppress(Exception):
                t.close()
        if self._abort_handle is None:
            with contextlib.suppress(RuntimeError):
                self._abort_handle = asyncio.get_running_loop().call_later(grace, self.abort)

    def abort(self) -> None:
        self._abort_handle = None
        t = self.transport
        if t is not None and not self._lost:
            with contextlib.suppress(Exception):
                t.abort()
        # A STARTTLS handshake in progress: uvloop's start_tls does not notice that its
        # transport was aborted and would wait for tls_handshake_timeout, the session
        # living on (its pool slot already released by an eviction). End the wait now.
        task = self._tls_task
        if task is not None and not self._tls_aborted and not task.done():
            self._tls_aborted = True
            task.cancel()
