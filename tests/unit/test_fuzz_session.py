"""Hypothesis fuzzing of DATA framing and the whole SMTP session.

1. BodyReader against a reference model written straight from RFC 5321 4.1.1.4 / 4.5.2 /
   2.3.8 (end marker, dot-unstuffing, bare CR/LF), fed in random chunks.
2. A real in-process SMTPServer on a loopback socket with a temp Spool: random byte
   streams built from SMTP fragments, smuggling-style line ends and raw bytes. Invariants:
   - no traceback (no ERROR log record) and the session always ends;
   - input buffers never grow past a bound (sampled on the server's loop);
   - no message is smuggled: messages stored == "250 ... queued as" replies, each stored
     message has CRLF line ends only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.ports import free_port

from authrelay import wiring
from authrelay.config import from_dict
from authrelay.maillog import MailLog
from authrelay.smtpd.bodyreader import BARE, NUL, OK, TOO_BIG, BodyReader
from authrelay.smtpd.listener import CHUNK, HIGH_WATER
from authrelay.smtpd.server import Listener, bind
from authrelay.spool.format import split
from authrelay.spool.store import Spool

# ---------------------------------------------------------------------- body reader model


def reference(stream: bytes, max_size: int) -> tuple[str, bytes | None, bytes]:
    """(error, message or None, leftover) for a complete stream; error '' while incomplete."""
    data = b"\r\n" + stream  # DATA starts at a line start
    end = data.find(b"\r\n.\r\n")
    region = data if end < 0 else data[:end + 5]
    crlf = region.count(b"\r\n")
    tail_cr = end < 0 and region.endswith(b"\r")  # may still become CRLF
    if region.count(b"\n") != crlf or region.count(b"\r") - tail_cr != crlf:
        return BARE, None, b""
    if end < 0:
        return "", None, b""
    body = (b"\r\n" + data[2:end + 2]).replace(b"\r\n.", b"\r\n")[2:]
    if len(body) > max_size:
        return TOO_BIG, None, data[end + 5:]
    if b"\x00" in body:  # refused after the end of data (554 5.6.0)
        return NUL, body, data[end + 5:]
    return OK, body, data[end + 5:]


_pieces = st.one_of(
    st.sampled_from([b"\r\n", b".", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r",
                     b"\n", b"..", b"\r\n..\r\n", b".\r\n", b"abc", b"MAIL FROM:<x@y>\r\n"]),
    st.binary(max_size=20),
)


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(_pieces, max_size=30), cuts=st.lists(st.integers(0, 400), max_size=8),
       max_size=st.sampled_from([5, 40, 100000]))
def test_bodyreader_matches_reference(parts: list[bytes], cuts: list[int],
                                      max_size: int) -> None:
    stream = b"".join(parts)
    want_err, want_body, want_left = reference(stream, max_size)
    r = BodyReader(max_size, max_line=100000)
    got, left, err, done = [], b"", OK, False
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for a, b in zip(bounds, bounds[1:], strict=False):
        f = r.feed(stream[a:b])
        got += f.segments
        if f.error == BARE:
            err = BARE
            break
        if f.done:
            done, left, err = True, f.leftover + stream[b:], f.error
            break
        # nothing held back beyond a possible end-marker prefix: memory stays bounded
        assert len(r._hold) <= 4
    assert sum(len(s) for s in got) <= max_size
    if want_err == BARE:
        assert err == BARE
        return
    assert err != BARE
    if want_body is None and want_err == "":
        assert not done
        return
    assert done and err == want_err and left == want_left
    if want_err == OK:
        assert b"".join(got) == want_body


# ---------------------------------------------------------------------- in-process server


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ServerThread:
    """SMTPServer on its own loop in a thread, serving a loopback port."""

    def __init__(self, tmp: Path) -> None:
        port = free_port()
        self.cfg = from_dict({
            "hostname": "fuzz.test", "state_dir": str(tmp),
            "listen": [{"address": f"127.0.0.1:{port}", "mode": "smtp"}],
            "relay": {"local_domains": ["local.test"]},
            "limits": {"max_message_size": 3000, "command_timeout": "5s",
                       "data_block_timeout": "5s", "max_errors": 30,
                       "connection_rate_per_ip": 0, "bad_rcpt_throttle": 0},
        })
        self.port = port
        self.spool = Spool(tmp / "spool", fsync=False)
        self.spool.ensure_dirs()
        self.log_path = tmp / "maillog"
        self.errors = _Errors()
        self.max_buf = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = wiring.server(self.cfg, self.spool, None, auth=None,
                                    maillog=MailLog(f"file:{self.log_path}"))
        ln = Listener(self.cfg.listen[0], bind(self.cfg.listen[0]))
        self.loop.run_until_complete(self.server.start([ln]))
        self.loop.call_soon(self._sample)
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop(2))
        self.loop.close()

    def _sample(self) -> None:
        for s in list(self.server.sessions):
            self.max_buf = max(self.max_buf, len(s.conn._buf))
        self.loop.call_later(0.001, self._sample)

    def start(self) -> ServerThread:
        logging.getLogger("authrelay").addHandler(self.errors)
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        logging.getLogger("authrelay").removeHandler(self.errors)

    def stored(self) -> dict[str, bytes]:
        """The committed messages (a file still being received, or being removed after
        its client went away, is not one: the spool's readers skip it too)."""
        out = {}
        for p in self.spool.queue_dir.iterdir():
            if "." in p.name:
                continue
            try:
                if not p.stat().st_mode & stat.S_IXUSR:  # store.READY_MODE not set
                    continue
                raw = p.read_bytes()
            except FileNotFoundError:
                continue
            out[p.name] = split(raw)[1]
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("fuzz")).start()
    yield srv
    srv.stop()
    assert not srv.errors.records, [r.getMessage() for r in srv.errors.records]
    assert "Traceback" not in srv.log_path.read_text()


def converse(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send everything, half-close, read until the server closes. (replies, clean end)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    got = bytearray()
    clean = True

    def reader() -> None:
        nonlocal clean
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    return
                got.extend(b)
        except OSError:
            clean = False

    t = threading.Thread(target=reader)
    t.start()
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        clean = False  # the server closed first (521, 421): fine
    t.join(20)
    assert not t.is_alive(), "session never ended"
    s.close()
    return bytes(got), clean


_SETUP = b"EHLO fuzz.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n"
_fragments = st.one_of(
    st.sampled_from([
        b"\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r",
        b"\n", b"..", b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@remote.test>\r\n",
        b"RCPT TO:<c@local.test>\r\n", b"RCPT TO:<c@evil.test>\r\n", b"DATA\r\n",
        b"RSET\r\n", b"NOOP\r\n", b"BDAT 10 LAST\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n",
        b"Subject: x\r\n\r\nbody\r\n", b"MAIL FROM:<a@b> SIZE=99999999\r\n",
        b"X" * 600 + b"\r\n", b"Y" * 1200, b"\x00\xff\xfe", "é\r\n".encode(),
    ]),
    st.binary(max_size=40),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=st.booleans(), parts=st.lists(_fragments, max_size=25))
def test_random_sessions_never_crash_or_smuggle(server: ServerThread, setup: bool,
                                                parts: list[bytes]) -> None:
    before = set(server.stored())
    data = (_SETUP if setup else b"") + b"".join(parts)
    replies, clean = converse(server.port, data)
    after = server.stored()
    new = {q: after[q] for q in set(after) - before}
    queued = re.findall(rb"^250 2\.0\.0 Ok: queued as (\S+)\r$", replies, re.M)
    # Every stored message was acknowledged; a reset connection may lose the last replies.
    assert {q.decode() for q in queued} <= set(new)
    if clean:
        assert len(queued) == len(new)
    for msg in new.values():
        assert msg.count(b"\r\n") == msg.count(b"\n") == msg.count(b"\r"), msg
    assert server.max_buf <= HIGH_WATER + 2 * CHUNK
    assert not server.errors.records, [r.getMessage() for r in server.errors.records]


def test_huge_line_without_crlf_bounded(server: ServerThread) -> None:
    """10 MB without a line end: buffer stays bounded, the line is refused with 500 5.5.6."""
    replies, _clean = converse(server.port, b"A" * (10 << 20) + b"\r\nNOOP\r\n")
    assert b"500 5.5.6" in replies and b"250 2.0.0 Ok" in replies
    assert server.max_buf <= HIGH_WATER + 2 * CHUNK


def test_half_close_after_final_dot_still_gets_250(server: ServerThread) -> None:
    """Found by the fuzzer: a client that sends the final dot and half-closes got no 250
    although the message was stored (a client would resend it: a duplicate)."""
    before = set(server.stored())
    replies, clean = converse(server.port, _SETUP + b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert clean
    queued = re.findall(rb"queued as (\S+)\r\n", replies)
    assert len(queued) == 1 and set(server.stored()) - before == {queued[0].decode()}
