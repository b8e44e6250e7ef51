"""An SMTPServer on its own event loop in a thread, for tests that drive it with real
sockets from the test's thread (pipelining, reply order).

`ServerThread(cfg, build, loop=None)`: `build()` makes the server (e.g.
`wiring.server(...)`) on the server's loop, which is set by then (`loop`: the one to run,
e.g. `uvloop.new_event_loop()` as `serve` runs; default a new asyncio loop); `start()`
binds cfg's first listener, starts serving and returns the server once it listens;
`call_soon(fn)` runs fn on that loop; `stop()` stops the server (2 s for its sessions) and
the loop. `uvloop_relay(cfg, tmp)`: one of `wiring.server` as `serve` runs it (uvloop), with
no AUTH, a spool in tmp/spool (no fsync) and a maillog file tmp/maillog.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import uvloop

from authrelay import wiring
from authrelay.config import Config
from authrelay.maillog import MailLog
from authrelay.smtpd.server import Listener, SMTPServer, bind
from authrelay.spool.store import Spool


class ServerThread:
    def __init__(self, cfg: Config, build: Callable[[], SMTPServer],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self._build = build
        self.loop = loop if loop is not None else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self.server: SMTPServer | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self._build()
        ln = Listener(self.cfg.listen[0], bind(self.cfg.listen[0]))
        self.loop.run_until_complete(self.server.start([ln]))
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop(2))
        self.loop.close()

    def start(self) -> SMTPServer:
        self._thread.start()
        assert self._ready.wait(10), "the in-process server did not start listening"
        assert self.server is not None
        return self.server

    def call_soon(self, fn: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def uvloop_relay(cfg: Config, tmp: Path) -> ServerThread:
    spool = Spool(tmp / "spool", fsync=False)
    spool.ensure_dirs()
    return ServerThread(cfg, lambda: wiring.server(
        cfg, spool, None, auth=None, maillog=MailLog(f"file:{tmp / 'maillog'}")),
        loop=uvloop.new_event_loop())
