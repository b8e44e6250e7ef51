"""An HTTPS server for MTA-STS policies (RFC 8461 3.3) on a loopback address, port 443.

RFC 8461 fixes the port (https://mta-sts.DOMAIN/.well-known/mta-sts.txt), and authrelay
keeps that: no setting moves it. The tests run as root, so they bind port 443 on a
loopback address of their own (127.19.X.Y in the MTA-STS tests, 127.0.19.1 by default);
`mta-sts.DOMAIN` resolves there through the test's DNS server. A non-root run skips
(fails under CI=true).

    srv = PolicyServer(ctx, host="127.0.19.1").start()
    srv.policies["mta-sts.example.test"] = "version: STSv1\\nmode: enforce\\n..."
    srv.requests  # [(host header, path)] seen
    srv.stop()

`policies[name]` may also be a (status, content type, body bytes) tuple, for broken
servers (404, wrong media type, oversized body), or (status, content type, body, seconds)
for a server that drips the body one byte every `seconds` (a slow-read attack), or bytes:
the whole raw answer (status line, headers, body), for a server that bends HTTP itself.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support import ci


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        self.server.owner.requests.append((host, self.path))
        entry = self.server.owner.policies.get(host)
        drip = 0.0
        if isinstance(entry, bytes):  # a raw answer: status line, headers and body as given
            self.wfile.write(entry)
            self.close_connection = True
            return
        if entry is None or self.path != "/.well-known/mta-sts.txt":
            status, ctype, body = 404, "text/plain", b"not found\n"
        elif isinstance(entry, tuple):
            status, ctype, body = entry[:3]
            drip = entry[3] if len(entry) > 3 else 0.0
        else:
            status, ctype, body = 200, "text/plain; charset=utf-8", entry.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not drip:
            self.wfile.write(body)
            return
        self.wfile.flush()
        try:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                if self.server.owner.stopping.wait(drip):
                    return
        except OSError:  # the client gave up: what a drip test wants to see
            self.server.owner.dropped.set()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: PolicyServer


class PolicyServer:
    def __init__(self, ctx: ssl.SSLContext, host: str = "127.0.19.1") -> None:
        self.ctx = ctx
        self.host = host
        self.policies: dict[str, Any] = {}
        self.requests: list[tuple[str, str]] = []
        self.stopping = threading.Event()  # stop() ends a dripping handler
        self.dropped = threading.Event()  # a client closed a dripped response
        self._srv: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PolicyServer:
        ci.require_root("binding port 443 (RFC 8461's fixed port) needs root")
        srv = _Server((self.host, 443), _Handler)
        srv.socket = self.ctx.wrap_socket(srv.socket, server_side=True)
        srv.owner = self
        self._srv = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
