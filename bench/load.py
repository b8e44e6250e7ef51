#!/usr/bin/env python3
"""SMTP load generator for the side-by-side benchmark (asyncio, several processes).

Owns: the client side of scenarios (b), (c), (e) and (f) of bench/run.sh, and any ad-hoc
load against authrelay or the Postfix peer. Two modes:

  smtp  N sessions (or sessions for a duration) with C in flight, spread over P processes.
        Each session: banner, EHLO, [STARTTLS, EHLO] (RFC 3207), [AUTH PLAIN] (RFC 4954),
        M x (MAIL, RCPT, DATA, body, final dot), QUIT (RFC 5321 3.3, 4.1.1.4).
  idle  open K connections, read each banner, hold them until stdin says go (or --hold
        seconds), then close: the "10,000 idle connections" scenario.
  latency  ordinary short sessions (banner, EHLO, NOOP, QUIT), C in flight, timing each
        from connect to the 221: scenario (h), the client side that is measured.
  flood  the hostile side of scenario (h): --bigdata K connections that stream an endless
        message without reading (issue 17), --noop N connections that pipeline NOOPs as
        fast as the server takes them (reading and discarding the replies) and --noread M
        connections that pipeline EHLOs and never read; each reconnects when the server
        closes it. Runs until stdin says go (or --hold seconds); prints what it did.

Contract: the last line on stdout is one JSON object. latency mode: sessions_ok/failed,
session_ms {p50, p99, max}, errors. smtp mode: messages_ok/failed,
sessions_ok/failed, elapsed_s, messages_per_s, sessions_per_s, final_250_ms {p50, p99, max}
(time from the last byte of DATA written to the final 250 read), setup_ms, errors (counts by
stage and reply). idle mode prints {"event": "ready", ...} when every connection has been
tried, then the final object. Exit status 0 when nothing failed, 1 otherwise.

Failure policy: a 4xx/5xx for one message counts it failed and RSETs; a dropped connection
or 421 ends that session (counted failed) and the next session starts. Never retries.
Safety: refuses non-loopback targets. Never prints the password or AUTH payload.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import multiprocessing as mp
import os
import resource
import socket
import ssl
import sys
import time
from collections import Counter
from typing import Any


class SMTPError(Exception):
    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage, self.code, self.text = stage, code, text


class Conn:
    """One SMTP client connection over asyncio streams: just enough protocol for load."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, timeout: float):
        self.r, self.w, self.timeout = r, w, timeout

    async def reply(self, stage: str) -> tuple[int, str]:
        last = b""
        while True:  # multiline replies: "250-..." until "250 ..." (RFC 5321 4.2.1)
            line = await asyncio.wait_for(self.r.readline(), self.timeout)
            if not line:
                raise SMTPError(stage, 0, "connection closed")
            last = line
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            return int(last[:3]), last[4:80].decode("utf-8", "replace").rstrip()
        except ValueError:
            raise SMTPError(stage, 0, f"bad reply {last[:40]!r}") from None

    async def cmd(self, line: bytes, stage: str, expect: tuple[int, ...]) -> None:
        self.w.write(line + b"\r\n")
        await self.w.drain()
        code, text = await self.reply(stage)
        if code not in expect:
            raise SMTPError(stage, code, text)


# `--body text`: lines of words, two spaces after a sentence now and then, a blank ending
# some lines (what relaxed DKIM canonicalization changes, RFC 6376 3.4.4; smtp-source's
# body and `--body x` have no blank at all)
TEXT_LINES = (b"Hello Bob, this is a line of text about the meeting on Tuesday.\r\n",
              b"We will talk about the budget.  Please bring the numbers along \r\n",
              b"and the notes from last time, if you still have them.\r\n",
              b"\r\n")


def make_body(size: int, sender: str, rcpt: str, kind: str = "x") -> bytes:
    """A message of about `size` bytes, CRLF lines, none starting with a dot; ends CRLF.
    `kind`: "x" (76 x's a line) or "text" (TEXT_LINES over and over)."""
    hdr = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: authrelay bench\r\n"
        f"Message-ID: <{time.time_ns()}.{os.getpid()}@load.bench.example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ).encode()
    room = max(0, size - len(hdr))
    if kind == "text":
        block = b"".join(TEXT_LINES)
        body = block * (room // len(block) + 1)
        cut = body.rfind(b"\r\n", 0, room)
        return hdr + (body[:cut + 2] if cut >= 0 else b"")
    nfull, rem = divmod(room, 78)
    tail = b"y" * (rem - 2) + b"\r\n" if rem >= 3 else b""
    return hdr + (b"x" * 76 + b"\r\n") * nfull + tail


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))], 3)


# --------------------------------------------------------------------------- smtp mode


async def _session(a: argparse.Namespace, ctx: ssl.SSLContext | None, data: bytes,
                   st: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    w = None
    try:
        # --source: a client address of our own (127.0.0.x), e.g. one that is not
        # exempt from per-address limits (bench/scale.py).
        local = (a.source, 0) if a.source else None
        if a.tls == "implicit":
            r, w = await asyncio.wait_for(
                asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.sni,
                                        local_addr=local),
                a.timeout)
        else:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(a.host, a.port, local_addr=local), a.timeout)
        c = Conn(r, w, a.timeout)
        code, text = await c.reply("banner")
        if code != 220:
            raise SMTPError("banner", code, text)
        ehlo = f"EHLO {a.ehlo}".encode()
        await c.cmd(ehlo, "ehlo", (250,))
        if a.tls == "starttls":
            await c.cmd(b"STARTTLS", "starttls", (220,))
            await asyncio.wait_for(w.start_tls(ctx, server_hostname=a.sni), a.timeout)
            await c.cmd(ehlo, "ehlo2", (250,))
        if a.auth == "plain":
            tok = base64.b64encode(f"\0{a.user}\0{a.password}".encode()).decode()
            await c.cmd(f"AUTH PLAIN {tok}".encode(), "auth", (235,))
        st["setup"].append((time.perf_counter() - t0) * 1000)
        mail = f"MAIL FROM:<{a.mail_from}>".encode()
        rcpt = f"RCPT TO:<{a.rcpt_to}>".encode()
        for _ in range(a.messages):
            try:
                await c.cmd(mail, "mail", (250,))
                await c.cmd(rcpt, "rcpt", (250, 251))
                await c.cmd(b"DATA", "data", (354,))
                w.write(data)
                await w.drain()
                t_end = time.perf_counter()  # end of DATA: the final dot is handed over
                code, text = await c.reply("eod")
                if code != 250:
                    raise SMTPError("eod", code, text)
                st["final"].append((time.perf_counter() - t_end) * 1000)
                st["msg_ok"] += 1
                st["bytes"] += len(data)
            except SMTPError as e:
                st["msg_fail"] += 1
                st["errors"][f"{e.stage} {e.code} {e.text[:50]}"] += 1
                if e.code in (0, 421):
                    raise _SessionDead() from None
                await c.cmd(b"RSET", "rset", (250,))
        try:
            await c.cmd(b"QUIT", "quit", (221,))
        except (TimeoutError, SMTPError, OSError):
            pass
        st["sess_ok"] += 1
    except _SessionDead:
        st["sess_fail"] += 1
    except SMTPError as e:
        st["sess_fail"] += 1
        st["errors"][f"{e.stage} {e.code} {e.text[:50]}"] += 1
    except (TimeoutError, OSError, ssl.SSLError) as e:
        st["sess_fail"] += 1
        st["errors"][f"{type(e).__name__} {str(e)[:60]}"] += 1
    finally:
        if w is not None:
            w.close()
            try:
                await asyncio.wait_for(w.wait_closed(), 2)
            except Exception:
                pass


class _SessionDead(Exception):
    pass


def _client_context(a: argparse.Namespace) -> ssl.SSLContext | None:
    if a.tls == "none":
        return None
    if a.cafile:
        return ssl.create_default_context(cafile=a.cafile)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a bench against self-signed loopback servers
    return ctx


async def _smtp_worker_main(a: argparse.Namespace, sessions: int, concurrency: int,
                            start_at: float) -> dict[str, Any]:
    ctx = _client_context(a)
    data = make_body(a.size, a.mail_from, a.rcpt_to, a.body) + b".\r\n"
    st: dict[str, Any] = dict(sess_ok=0, sess_fail=0, msg_ok=0, msg_fail=0, bytes=0,
                              setup=[], final=[], errors=Counter())
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)  # all processes start together
    t0 = time.monotonic()
    deadline = t0 + a.duration if a.duration else None
    left = sessions

    # --rate: sessions start on a fixed schedule (this process's share of the rate), at
    # most `concurrency` in flight: the offered load is the same whatever the server's
    # speed, so latencies of two servers compare at equal load (a closed loop runs the
    # faster server at more sessions per second, on the same cores as this client).
    gap = a.procs / a.rate if a.rate else 0.0  # seconds between this process's starts
    started = 0

    async def lane() -> None:
        nonlocal left, started
        while (left > 0 if deadline is None else time.monotonic() < deadline):
            left -= 1
            if gap:
                due = t0 + started * gap
                started += 1
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            await _session(a, ctx, data, st)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    st["t0"], st["t1"] = t0, time.monotonic()
    return st


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _smtp_child(a: argparse.Namespace, sessions: int, concurrency: int, start_at: float,
                q: Any) -> None:
    st = _run_loop(_smtp_worker_main(a, sessions, concurrency, start_at))
    st["errors"] = dict(st["errors"])
    q.put(st)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def run_smtp(a: argparse.Namespace) -> dict[str, Any]:
    procs = max(1, min(a.processes or os.cpu_count() or 1, a.concurrency))
    a.procs = procs
    conc = _split(a.concurrency, procs)
    sess = _split(a.sessions, procs) if not a.duration else [0] * procs
    start_at = time.monotonic() + 0.3 + 0.05 * procs
    q: Any = mp.get_context("fork").Queue()
    children = [
        mp.get_context("fork").Process(target=_smtp_child, args=(a, s, c, start_at, q))
        for s, c in zip(sess, conc, strict=True)
    ]
    for p in children:
        p.start()
    results = [q.get() for _ in children]
    for p in children:
        p.join()
    errors: Counter[str] = Counter()
    final: list[float] = []
    setup: list[float] = []
    for r in results:
        errors.update(r["errors"])
        final += r["final"]
        setup += r["setup"]
    tot = {k: sum(r[k] for r in results) for k in ("sess_ok", "sess_fail", "msg_ok",
                                                   "msg_fail", "bytes")}
    elapsed = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return dict(
        tool="load.py", mode="smtp", host=a.host, port=a.port, tls=a.tls, auth=a.auth,
        processes=procs, concurrency=a.concurrency, sessions=a.sessions,
        duration=a.duration, rate=a.rate, messages_per_session=a.messages, size=a.size,
        sessions_ok=tot["sess_ok"], sessions_failed=tot["sess_fail"],
        messages_ok=tot["msg_ok"], messages_failed=tot["msg_fail"], bytes=tot["bytes"],
        elapsed_s=round(elapsed, 4),
        messages_per_s=round(tot["msg_ok"] / elapsed, 2) if elapsed > 0 else 0.0,
        sessions_per_s=round(tot["sess_ok"] / elapsed, 2) if elapsed > 0 else 0.0,
        final_250_ms=dict(p50=pct(final, 50), p99=pct(final, 99),
                          max=round(max(final), 3) if final else None),
        setup_ms=dict(p50=pct(setup, 50), p99=pct(setup, 99)),
        errors=dict(errors.most_common(8)),
    )


# --------------------------------------------------------------------------- idle mode


async def _idle_main(a: argparse.Namespace) -> dict[str, Any]:
    writers: list[asyncio.StreamWriter] = []
    st = Counter()
    sem = asyncio.Semaphore(a.parallel)
    greeted_all = asyncio.Event()

    async def one() -> None:
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port),
                                              a.timeout)
            except (TimeoutError, OSError):
                st["connect_failed"] += 1
                return
            st["connected"] += 1
            writers.append(w)
        try:  # the banner wait is outside the semaphore: a server may never greet
            line = await r.readline()
            if line.startswith(b"220"):
                st["greeted"] += 1
                if st["greeted"] == a.connections:
                    greeted_all.set()
            else:
                st["refused"] += 1
        except OSError:
            st["refused"] += 1

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(a.connections)]
    # Ready when every connect has finished and the greetings have settled: a server with
    # a process limit (Postfix) leaves the rest waiting in its listen queue for good.
    last, quiet_since = -1, time.monotonic()
    while not greeted_all.is_set():
        now = time.monotonic()
        tried = st["connected"] + st["connect_failed"]
        if st["greeted"] != last:
            last, quiet_since = st["greeted"], now
        elif tried >= a.connections and now - quiet_since > a.settle:
            break
        await asyncio.sleep(0.05)
    ready = dict(event="ready", connections=a.connections, connected=st["connected"],
                 greeted=st["greeted"], refused=st["refused"],
                 connect_failed=st["connect_failed"],
                 open_s=round(time.monotonic() - t0, 3))
    print(json.dumps(ready), flush=True)
    if a.hold is not None:
        await asyncio.sleep(a.hold)
    else:  # hold until the orchestrator writes a line (or closes stdin)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in writers:
        w.close()
    return dict(ready, event="done", tool="load.py", mode="idle", host=a.host, port=a.port)


def run_idle(a: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.connections + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return _run_loop(_idle_main(a))


# --------------------------------------------------------------------------- latency mode


async def _latency_main(a: argparse.Namespace) -> dict[str, Any]:
    times: list[float] = []
    st: Counter[str] = Counter()
    left = a.sessions

    async def one() -> None:
        t0 = time.perf_counter()
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port), a.timeout)
            c = Conn(r, w, a.timeout)
            code, text = await c.reply("banner")
            if code != 220:
                raise SMTPError("banner", code, text)
            await c.cmd(f"EHLO {a.ehlo}".encode(), "ehlo", (250,))
            await c.cmd(b"NOOP", "noop", (250,))
            await c.cmd(b"QUIT", "quit", (221,))
            times.append((time.perf_counter() - t0) * 1000)
            st["ok"] += 1
        except SMTPError as e:
            st["failed"] += 1
            st[f"{e.stage} {e.code} {e.text[:40]}"] += 1
        except (TimeoutError, OSError) as e:
            st["failed"] += 1
            st[type(e).__name__] += 1
        finally:
            if w is not None:
                w.close()

    t0 = time.monotonic()
    stop_at = t0 + a.max_time if a.max_time else None

    async def lane() -> None:
        nonlocal left
        while left > 0 and (stop_at is None or time.monotonic() < stop_at):
            left -= 1
            await one()

    await asyncio.gather(*(lane() for _ in range(a.concurrency)))
    el = time.monotonic() - t0
    st["failed"] += left  # never started within --max-time: count them as failed
    errors = {k: v for k, v in st.items() if k not in ("ok", "failed")}
    return dict(tool="load.py", mode="latency", port=a.port, sessions=a.sessions,
                concurrency=a.concurrency, sessions_ok=st["ok"], sessions_failed=st["failed"],
                elapsed_s=round(el, 3),
                session_ms=dict(p50=pct(times, 50), p99=pct(times, 99),
                                max=round(max(times), 3) if times else None),
                errors=dict(Counter(errors).most_common(8)))


# --------------------------------------------------------------------------- flood mode


async def _flood_main(a: argparse.Namespace) -> dict[str, Any]:
    st: Counter[str] = Counter()
    stop = asyncio.Event()
    noop_block = b"NOOP\r\n" * 8192  # 48 KiB per write
    ehlo_block = f"EHLO {a.ehlo}\r\n".encode() * 2048

    async def noop_flooder() -> None:
        while not stop.is_set():
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port),
                                              a.timeout)
                st["noop_connections"] += 1

                async def drain_replies(r: asyncio.StreamReader = r) -> None:
                    try:
                        while True:
                            data = await r.read(65536)
                            if not data:
                                return
                            st["noop_reply_bytes"] += len(data)
                    except OSError:  # the server reset it (a limit): the next one starts
                        return

                reader = asyncio.ensure_future(drain_replies())
                w.write(b"EHLO flood.bench.example.test\r\n")
                while not stop.is_set() and not reader.done():
                    w.write(noop_block)
                    await w.drain()
                    st["noop_bytes_sent"] += len(noop_block)
                reader.cancel()
            except (OSError, TimeoutError):
                st["noop_errors"] += 1
                await asyncio.sleep(0.05)
            finally:
                if w is not None:
                    w.close()

    async def noread_flooder() -> None:
        while not stop.is_set():
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port),
                                              a.timeout)
                st["noread_connections"] += 1
                while not stop.is_set():
                    w.write(ehlo_block)
                    # never reads: drain blocks once the kernel buffers are full, until
                    # the server closes (then the next connection starts)
                    drained = asyncio.ensure_future(w.drain())
                    stopped = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({drained, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    if not drained.done():
                        drained.cancel()
                        break
                    drained.result()
                    st["noread_bytes_sent"] += len(ehlo_block)
            except (OSError, TimeoutError):
                st["noread_errors"] += 1
                await asyncio.sleep(0.05)
            finally:
                if w is not None:
                    w.transport.abort()

    big_head = (b"EHLO big.bench.example.test\r\nMAIL FROM:<src@bench.example.test>\r\n"
                b"RCPT TO:<sink@remote.example.net>\r\nDATA\r\n")
    big_block = (b"y" * 998 + b"\r\n") * 64  # 64 KB of message lines, never a "."

    async def bigdata_flooder() -> None:
        """Issue 17: an endless oversized DATA without reading; again when closed."""
        while not stop.is_set():
            w = None
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port),
                                              a.timeout)
                st["bigdata_connections"] += 1
                w.write(big_head)  # pipelined blindly (never reads a reply)
                while not stop.is_set():
                    w.write(big_block)
                    drained = asyncio.ensure_future(w.drain())
                    stopped = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({drained, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    if not drained.done():
                        drained.cancel()
                        break
                    drained.result()
                    st["bigdata_bytes_sent"] += len(big_block)
            except (OSError, TimeoutError):
                st["bigdata_closed"] += 1
                await asyncio.sleep(0.05)
            finally:
                if w is not None:
                    w.transport.abort()

    tasks = [asyncio.ensure_future(noop_flooder()) for _ in range(a.noop)]
    tasks += [asyncio.ensure_future(noread_flooder()) for _ in range(a.noread)]
    tasks += [asyncio.ensure_future(bigdata_flooder()) for _ in range(a.bigdata)]
    await asyncio.sleep(0.5)
    print(json.dumps(dict(event="ready", **st)), flush=True)
    if a.hold is not None:
        await asyncio.sleep(a.hold)
    else:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dict(event="done", tool="load.py", mode="flood", port=a.port, **st)


# --------------------------------------------------------------------------- cli


def check_loopback(host: str) -> None:
    for *_, sa in socket.getaddrinfo(host, None):
        if not ipaddress.ip_address(sa[0]).is_loopback:
            sys.exit(f"load.py: refusing non-loopback target {host} ({sa[0]})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["smtp", "idle", "latency", "flood"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=30.0, help="per reply/connect (s)")
    g = ap.add_argument_group("smtp mode")
    g.add_argument("--tls", choices=["starttls", "implicit", "none"], default="none")
    g.add_argument("--auth", choices=["plain", "none"], default="none")
    g.add_argument("--user", default="alice")
    g.add_argument("--password", default="correct horse")
    g.add_argument("--cafile", help="verify the server against this CA (default: no checks)")
    g.add_argument("--sni", default=None)
    g.add_argument("--source", default=None,
                   help="bind this local (loopback) address, e.g. 127.0.0.9")
    g.add_argument("--ehlo", default="load.bench.example.test")
    g.add_argument("--from", dest="mail_from", default="alice@bench.example.test")
    g.add_argument("--to", dest="rcpt_to", default="sink@remote.example.net")
    g.add_argument("--size", type=int, default=1024, help="message size in bytes")
    g.add_argument("--body", choices=["x", "text"], default="x",
                   help="x: lines of 76 x's (as smtp-source's); text: lines of words with "
                        "double spaces and trailing blanks (TEXT_LINES)")
    g.add_argument("--concurrency", "-c", type=int, default=10, help="sessions in flight")
    g.add_argument("--sessions", "-n", type=int, default=100, help="sessions in all")
    g.add_argument("--duration", type=float, default=0.0,
                   help="run sessions for this many seconds instead of --sessions")
    g.add_argument("--rate", type=float, default=0.0,
                   help="sessions started per second in all (open loop, at most -c in "
                        "flight); 0: as fast as the server allows (closed loop)")
    g.add_argument("--messages", "-m", type=int, default=1, help="messages per session")
    g.add_argument("--processes", "-p", type=int, default=0, help="default: one per core")
    g = ap.add_argument_group("idle mode")
    g.add_argument("--connections", type=int, default=10000)
    g.add_argument("--parallel", type=int, default=1000, help="connects in flight")
    g.add_argument("--settle", type=float, default=1.0,
                   help="ready when no new banner arrived for this long")
    g.add_argument("--hold", type=float, default=None,
                   help="seconds to hold after ready (default: until a line on stdin)")
    g = ap.add_argument_group("latency mode (also -c, -n, --ehlo)")
    g.add_argument("--max-time", type=float, default=0.0,
                   help="start no new session after this many seconds (0: no limit)")
    g = ap.add_argument_group("flood mode (also --hold)")
    g.add_argument("--noop", type=int, default=2, help="connections pipelining NOOPs")
    g.add_argument("--noread", type=int, default=2, help="connections that never read")
    g.add_argument("--bigdata", type=int, default=0,
                   help="connections streaming an endless oversized DATA, never reading")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    check_loopback(a.host)
    if getattr(a, "source", None):
        check_loopback(a.source)
    if a.mode == "latency":
        out = _run_loop(_latency_main(a))
        print(json.dumps(out), flush=True)
        return 0 if out["sessions_failed"] == 0 else 1
    if a.mode == "flood":
        out = _run_loop(_flood_main(a))
        print(json.dumps(out), flush=True)
        return 0
    if a.mode == "idle":
        out = run_idle(a)
        print(json.dumps(out), flush=True)
        return 0 if out["greeted"] == a.connections else 1
    out = run_smtp(a)
    print(json.dumps(out), flush=True)
    return 0 if out["sessions_failed"] == 0 and out["messages_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
