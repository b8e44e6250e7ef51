"""The I/O edge of the SMTP server: sockets, TLS, per-phase deadlines, back-pressure.

Owns one `asyncio.Protocol` per connection (`Connection`) that buffers input and exposes
three awaitables to the session: `readline()`, `read_chunk()` and `starttls()`. Replies
are queued with `write()` and flushed whenever the session is about to wait for input,
which answers pipelined commands (RFC 2920) in order and in as few segments as possible.

Failure policy: a read that passes its deadline raises `Timeout` (the session answers
421 4.4.2); a lost connection raises `Closed`. Input is never buffered without bound:
reading pauses above `HIGH_WATER`, and a command line that grows past its limit without a
line end is cut off (`LineTooLong`). A bare CR or LF in a command raises `BareLineEnding`.
STARTTLS discards everything the client pipelined after the command (CVE-2011-0411,
CVE-2024-34083): only bytes that arrive through the TLS layer are read afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024  # pause reading above this much unread input
CHUNK = 256 * 1024  # largest DATA chunk handed to the body reader at once


class Closed(Exception):
    """The peer went away (or we closed)."""


class Timeout(Exception):
    """A phase deadline passed."""


class LineTooLong(Exception):
    """A command line exceeded its limit; the rest of that line has been discarded."""


class BareLineEnding(Exception):
    """A bare CR or LF in a command line (RFC 5321 2.3.8)."""


class Connection(asyncio.Protocol):
    def __init__(self, on_connect: Callable[[Connection], None]) -> None:
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._paused = False
        self._out: list[bytes] = []
        self._skipping = False  # discarding the rest of an over-long line
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.tls_info = ""  # "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        self.local = (str(local[0]), int(local[1])) if isinstance(local, tuple) else ("", 0)
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
        self._closed = True
        self._wake()
        # Keep our half open: replies to what the client sent before its FIN (the 250 for
        # a message just committed) must still go out; close() ends the connection.
        # (TLS transports cannot stay half open; asyncio would only warn.)
        t = self.transport
        return t is None or t.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    # ------------------------------------------------------------ internals
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _consumed(self) -> None:
        if self._paused and len(self._buf) < HIGH_WATER // 2 and self.transport:
            self._paused = False
            self.transport.resume_reading()

    async def _wait(self, timeout: float) -> None:
        """Wait for more input (after flushing queued replies)."""
        self.flush()
        if self._closed:
            raise Closed
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        h = loop.call_later(timeout, self._expire, w)
        try:
            await w
        finally:
            h.cancel()
            self._waiter = None
        if not self._buf and self._closed:
            raise Closed

    @staticmethod
    def _expire(w: asyncio.Future[None]) -> None:
        if not w.done():
            w.set_exception(Timeout())

    # ------------------------------------------------------------ session API
    def write(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def unread(self, data: bytes) -> None:
        """Give back bytes read past the end of DATA (pipelined commands)."""
        if data:
            self._buf[:0] = data

    async def readline(self, limit: int, timeout: float) -> bytes:
        """One command line without its CRLF. `limit` counts the CRLF (RFC 5321 4.5.3.1.4).

        `timeout` bounds the whole line, not each read: a slowloris client dribbling a
        byte at a time cannot hold a session open past it."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            buf = self._buf
            i = buf.find(b"\n")
            if i >= 0:
                line = bytes(buf[:i + 1])
                del buf[:i + 1]
                self._consumed()
                if self._skipping:
                    self._skipping = False
                    raise LineTooLong
                if line[-2:] != b"\r\n" or b"\r" in line[:-2]:
                    raise BareLineEnding
                if len(line) > limit:
                    raise LineTooLong
                return line[:-2]
            cr = buf.find(b"\r")
            if cr != -1 and cr != len(buf) - 1:
                raise BareLineEnding  # a CR followed by something other than LF
            if len(buf) > limit:
                # Drop what we have and the rest of the line; never grow without bound.
                self._skipping = True
                del buf[:]
                self._consumed()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise Timeout
            await self._wait(left)

    async def read_chunk(self, timeout: float) -> bytes:
        """Whatever input is there (at most CHUNK bytes), waiting up to `timeout` for some."""
        while not self._buf:
            await self._wait(timeout)
        if len(self._buf) <= CHUNK:
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:CHUNK])
            del self._buf[:CHUNK]
        self._consumed()
        return data

    def discard_input(self) -> int:
        n = len(self._buf)
        self._buf.clear()
        self._consumed()
        return n

    async def starttls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        """Upgrade to TLS. Anything buffered before the handshake is discarded by the caller."""
        if self.transport is None or self._closed:
            raise Closed
        self.flush()
        loop = asyncio.get_running_loop()
        self._paused = False
        try:
            # Our own deadline: on expiry asyncio's ssl_handshake_timeout aborts with a
            # ConnectionAbortedError, indistinguishable from a reset; the session must know
            # it was a timeout (maillog "421 4.4.2 ... stage=timeout"). asyncio.timeout,
            # not wait_for: a separate task would start a loop turn late, and a ClientHello
            # arriving in between would land in this plaintext protocol and be lost.
            async with asyncio.timeout(timeout):
                new = await loop.start_tls(self.transport, self, ctx, server_side=True,
                                           ssl_handshake_timeout=timeout + 5)
        except TimeoutError:
            self._closed = True
            raise Timeout from None
        except (ssl.SSLError, OSError, ConnectionError, RuntimeError) as e:
            self._closed = True
            raise Closed from e
        if new is None:
            raise Closed
        self.transport = new
        obj = new.get_extra_info("ssl_object")
        if obj is not None:
            self._set_tls_info(obj)

    def _set_tls_info(self, obj: ssl.SSLObject) -> None:
        cipher = obj.cipher()
        if cipher:
            bits = cipher[2]
            self.tls_info = f"{obj.version()} with cipher {cipher[0]} ({bits}/{bits} bits)"
        else:
            self.tls_info = str(obj.version())

    def close(self) -> None:
        self.flush()
        self._closed = True
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()
