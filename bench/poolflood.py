#!/usr/bin/env python3
"""poolflood.py -- scenario (i) of bench/scenarios.py: a many-address connection flood held
against one port, and fresh clients measured on another (or the same) port (issue 17).

    python bench/poolflood.py --flood-port 465 --sockets 3000 --addresses 40 \
        --seconds 120 --probe implicit --probe-port 465 --user alice --password '...'

Attacker (one process, non-blocking sockets and a selector): --sockets connections from
--addresses loopback addresses (127.0.5.1 ...) to --flood-port that never send a byte;
whatever the server sends is read and dropped (a port 25 greeting); a connection the
server closes (or refuses, or that fails) is reopened at once, for --seconds.

Probe (this process's main thread): one fresh client after another, each from a new
loopback address (127.0.9.N), doing a whole submission: --probe implicit (TLS on connect,
465) or starttls (587): EHLO, AUTH PLAIN, MAIL, RCPT, DATA, one small message, QUIT; a try
that fails or takes longer than --try-timeout counts as failed.

Contract: prints one JSON object: tries, ok, ok_ratio, ms {p50, p99, max} of the
successful tries, errors (by kind), attacker counters (opened, closed_by_server,
connect_failed, peak_open). Only loopback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import resource
import selectors
import socket
import ssl
import statistics
import threading
import time
from collections import Counter
from typing import Any

SENDER, RCPT = "src@bench.example.test", "sink@remote.example.net"


# --------------------------------------------------------------------------- attacker


class Flood:
    def __init__(self, port: int, n: int, addrs: list[str]) -> None:
        self.port, self.n, self.addrs = port, n, addrs
        self.sel = selectors.DefaultSelector()
        self.st: Counter[str] = Counter()
        self.stop = threading.Event()
        self.open = 0

    def _open(self, i: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((self.addrs[i % len(self.addrs)], 0))
            e = s.connect_ex(("127.0.0.1", self.port))
        except OSError:
            s.close()
            self.st["connect_failed"] += 1
            return
        if e not in (0, errno.EINPROGRESS):
            s.close()
            self.st["connect_failed"] += 1
            return
        self.sel.register(s, selectors.EVENT_READ, i)
        self.open += 1
        self.st["opened"] += 1
        self.st["peak_open"] = max(self.st["peak_open"], self.open)

    def run(self) -> None:
        for i in range(self.n):
            self._open(i)
        reopen: list[int] = []
        while not self.stop.is_set():
            for i in reopen:
                self._open(i)
            reopen = []
            for key, _ in self.sel.select(0.2):
                s: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # a greeting: read and dropped, the connection stays idle
                self.sel.unregister(s)
                s.close()
                self.open -= 1
                self.st["closed_by_server"] += 1
                reopen.append(key.data)
            if len(reopen) < self.n - self.open:  # failed opens: try those again too
                reopen += list(range(self.n - self.open - len(reopen)))
        for key in list(self.sel.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- probe


class Dialog:
    def __init__(self, s: socket.socket | ssl.SSLSocket) -> None:
        self.s, self.buf = s, b""

    def reply(self) -> int:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.s.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3])

    def cmd(self, line: str, want: int) -> None:
        self.s.sendall(line.encode() + b"\r\n")
        code = self.reply()
        if code != want:
            raise RuntimeError(f"{line.split()[0]} {code}")


def submission(port: int, src: str, implicit: bool, user: str, password: str,
               timeout: float) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                   source_address=(src, 0))
    s: socket.socket | ssl.SSLSocket = raw
    try:
        if implicit:
            s = ctx.wrap_socket(raw, server_hostname="localhost")
        d = Dialog(s)
        if d.reply() != 220:
            raise RuntimeError("greeting")
        d.cmd("EHLO fresh.bench.example.test", 250)
        if not implicit:
            d.cmd("STARTTLS", 220)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            d = Dialog(s)
            d.cmd("EHLO fresh.bench.example.test", 250)
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        d.cmd(f"AUTH PLAIN {token}", 235)
        d.cmd(f"MAIL FROM:<{SENDER}>", 250)
        d.cmd(f"RCPT TO:<{RCPT}>", 250)
        d.cmd("DATA", 354)
        d.cmd(f"From: <{SENDER}>\r\nSubject: fresh\r\n\r\nduring a flood\r\n.", 250)
        with contextlib.suppress(OSError, ConnectionError, RuntimeError):
            d.cmd("QUIT", 221)
    finally:
        with contextlib.suppress(OSError):
            s.close()


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flood-port", type=int, required=True)
    ap.add_argument("--sockets", type=int, default=3000)
    ap.add_argument("--addresses", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--probe", choices=("implicit", "starttls"), required=True)
    ap.add_argument("--probe-port", type=int, required=True)
    ap.add_argument("--user", default="alice")
    ap.add_argument("--password", default="correct horse")
    ap.add_argument("--try-timeout", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0, help="flood alone first, seconds")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flood = Flood(a.flood_port, a.sockets,
                  [f"127.0.5.{i + 1}" for i in range(a.addresses)])
    th = threading.Thread(target=flood.run, daemon=True)
    th.start()
    time.sleep(a.warmup)
    times: list[float] = []
    errors: Counter[str] = Counter()
    tries, end = 0, time.monotonic() + a.seconds
    while time.monotonic() < end:
        tries += 1
        src = f"127.0.9.{tries % 250 + 1}"
        t0 = time.monotonic()
        try:
            submission(a.probe_port, src, a.probe == "implicit", a.user, a.password,
                       a.try_timeout)
            el = time.monotonic() - t0
            if el > a.try_timeout:
                errors["slower than try-timeout"] += 1
            else:
                times.append(el * 1000)
        except Exception as e:  # noqa: BLE001 - every failure is a figure
            errors[f"{type(e).__name__}: {e}"[:60]] += 1
        time.sleep(0.2)
    flood.stop.set()
    th.join(10)
    out: dict[str, Any] = dict(
        tries=tries, ok=len(times), ok_ratio=round(len(times) / tries, 4) if tries else 0.0,
        ms=dict(p50=round(statistics.median(times), 1) if times else None,
                p99=pct(times, 99), max=round(max(times), 1) if times else None),
        errors=dict(errors.most_common(6)), flood=dict(flood.st),
        flood_port=a.flood_port, probe=a.probe, probe_port=a.probe_port,
        sockets=a.sockets, addresses=a.addresses, seconds=a.seconds)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
