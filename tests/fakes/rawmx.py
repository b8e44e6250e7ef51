"""A scripted next hop for the courier's tests: a raw asyncio SMTP server on loopback.

`RawMX(host, port, script)` runs `script(mx, reader, writer)` for each connection on its
own event loop in a thread, so a test sends the exact bytes a broken or hostile next hop
would (replies split, doubled, out of step, never ending) where aiosmtpd
(fakes/smtpserver.py) would answer correctly. `verbs(replies)` makes the usual script
(a reply per command verb); `new_connection(mx)` keeps per-connection records.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class RawMX:
    """A scripted SMTP server on its own loop: `script(reader, writer)` per connection."""

    def __init__(self, host: str, port: int, script: Any) -> None:
        self.host, self.port, self.script = host, port, script
        self.received: list[bytes] = []
        self.sockets: list[Any] = []  # server-side sockets a script recorded
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RawMX:
        self._thread.start()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await self.script(self, r, w)
            finally:
                w.close()

        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(handle, self.host, self.port), self._loop)
        self._server = fut.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def verbs(replies: dict[bytes, bytes | None],
          at_dot: Callable[[RawMX], None] | None = None,
          stall: Callable[[RawMX], None] | None = None) -> Any:
    """A RawMX script answering each command by its verb (its first four octets, upper
    case) from `replies`, else 250: `None` never answers (the connection is read to its
    end); a 354 to DATA reads the message to its dot (recording b"message"; `at_dot(mx)`
    once the dot is read) and answers `replies[b"."]` (250 by default; None: the
    connection closes unanswered); QUIT is 221 and the end. `stall`: after the 354,
    `stall(mx)` is called and nothing more is read (a next hop whose receive window
    stays full), until the server stops."""
    async def script(mx: RawMX, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 raw.test ESMTP\r\n")
        while line := await r.readline():
            mx.received.append(line)
            verb = line[:4].upper()
            if verb == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            reply = replies.get(verb, b"250 ok\r\n")
            if reply is None:
                await r.read()  # no reply, ever
                return
            w.write(reply)
            if verb == b"DATA" and reply.startswith(b"354"):
                await w.drain()
                if stall is not None:
                    stall(mx)
                    await asyncio.Future()  # cancelled by RawMX.__exit__
                while (ln := await r.readline()) not in (b".\r\n", b""):
                    pass
                mx.received.append(b"message")
                if at_dot is not None and ln:
                    at_dot(mx)
                end = replies.get(b".", b"250 2.0.0 taken\r\n")
                if end is None:
                    return  # no reply: the connection closes
                w.write(end)
            await w.drain()
    return script


def new_connection(mx: RawMX) -> tuple[int, list[bytes]]:
    """A new connection to `mx`: its index in `mx.conns` and the list of the messages
    it takes (mx.conns[index])."""
    mx.conns = getattr(mx, "conns", [])
    taken: list[bytes] = []
    mx.conns.append(taken)
    return len(mx.conns) - 1, taken
