"""An endless oversized DATA (issue 17): 552 5.3.4 and close after a bounded overshoot.

A real authrelay process, a raw socket client that streams message lines without ever
ending DATA, and a reader thread that collects what the server says meanwhile. Once the
message is past max_message_size by protocol.OVERSHOOT (1 MiB) the server answers
552 5.3.4 and hangs up, instead of reading on until data_final_timeout. The bytes past
max_message_size are read no faster than `[limits] oversize_read_rate`: the sender of an
endless oversized DATA ends up blocked in send() on a connection still open, ordinary
clients are served meanwhile, and a message just over the limit still gets its 552 after
its end of data with the session going on.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from relayproc import RelayProcess
from smtpclient import RawClient
from support.wait import wait_until

from authrelay.smtpd.protocol import OVERSHOOT

pytestmark = pytest.mark.slow

MAX = 100_000


def test_endless_oversized_data_gets_552_and_close(relay_factory) -> None:  # noqa: ANN001
    # the overshoot read fast enough for this test (the default would take 16 s)
    r: RelayProcess = relay_factory({"limits": {"max_message_size": MAX,
                                                "data_final_timeout": "10m",
                                                "oversize_read_rate": "2MB"}})
    s = socket.create_connection(("127.0.0.1", r.ports["smtp"]), timeout=30,
                                 source_address=("127.0.9.1", 0))
    got = bytearray()
    closed = threading.Event()

    def reader() -> None:
        try:
            while chunk := s.recv(4096):
                got.extend(chunk)
        except OSError:
            pass
        closed.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    s.sendall(b"EHLO big.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@local.test>\r\n"
              b"DATA\r\n")
    wait_until(lambda: b"354 " in got, lambda: f"354 (got {bytes(got)!r})", timeout=10)
    line = b"y" * 998 + b"\r\n"
    sent, t0 = 0, time.monotonic()
    try:
        while sent < 64 * 1024 * 1024 and not closed.is_set():
            s.sendall(line * 64)
            sent += len(line) * 64
    except OSError:
        pass  # reset by the server: expected
    assert closed.wait(30), "the server did not close"
    took = time.monotonic() - t0
    s.close()
    text = bytes(got).decode()
    assert "552 5.3.4 Message size exceeds fixed maximum message size" in text, text
    assert text.rstrip().endswith("552 5.3.4 Message size exceeds fixed maximum message size")
    assert took < 20, took
    # What we managed to send beyond the bound is only what the socket buffers held.
    assert sent < 64 * 1024 * 1024, sent
    log = r.maillog(settle=0.5)
    assert "reject=552 5.3.4" in log and "127.0.9.1" in log, log[-2000:]
    assert "Traceback" not in log
    # The reader's count: the server consumed at most the message plus the overshoot
    # (and one read of at most 256 KiB), as the maillog's size= says.
    sizes = [int(x.split("size=")[1].split(",")[0]) for x in log.splitlines()
             if "reject=552 5.3.4" in x and "size=" in x]
    assert sizes and MAX < sizes[-1] <= MAX + OVERSHOOT + 512 * 1024, sizes
    # ... and the server is still there for the next client.
    with RawClient(r.ports["smtp"], source="127.0.9.2") as c:
        assert c.reply().code == 220


LINE = b"y" * 998 + b"\r\n"
HEAD = (b"EHLO big.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@local.test>\r\n"
        b"DATA\r\n")


class Streamer:
    """A raw client that has DATA accepted, then sends message lines from a thread until
    told to stop or the server hangs up; another thread collects the replies."""

    def __init__(self, port: int, source: str) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=60,
                                          source_address=(source, 0))
        self.got = bytearray()
        self.closed = threading.Event()
        self.stop = threading.Event()
        self.sent = 0
        self._sender: threading.Thread | None = None
        threading.Thread(target=self._read, daemon=True).start()
        self.s.sendall(HEAD)
        wait_until(lambda: b"354 " in self.got, lambda: f"354 (got {bytes(self.got)!r})")

    def _read(self) -> None:
        try:
            while chunk := self.s.recv(4096):
                self.got.extend(chunk)
        except OSError:
            pass
        self.closed.set()

    def _send(self, block: bytes) -> None:
        try:
            while not self.stop.is_set() and not self.closed.is_set():
                self.s.sendall(block)
                self.sent += len(block)
        except OSError:
            pass

    def stream(self, block: bytes = LINE * 64) -> None:
        self._sender = threading.Thread(target=self._send, args=(block,), daemon=True)
        self._sender.start()

    def stalled(self, beyond: int, settle: float = 1.0) -> Callable[[], bool]:
        """A poll predicate: the sender has sent more than `beyond` bytes and then nothing
        for `settle` seconds (it blocks in send(): the server stopped taking its bytes)
        -- or the connection is gone."""
        last = [-1, time.monotonic()]

        def pred() -> bool:
            if self.closed.is_set():
                return True
            if self.sent != last[0] or self.sent <= beyond:
                last[:] = [self.sent, time.monotonic()]
                return False
            return time.monotonic() - last[1] >= settle
        return pred

    def close(self) -> None:
        """Hang up with a reset (SO_LINGER 0): the unsent bytes are dropped, not
        trickled to the server behind a FIN at its paced rate after the test."""
        self.stop.set()
        with contextlib.suppress(OSError):
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.s.shutdown(socket.SHUT_RDWR)  # wakes the sender blocked in sendall
        if self._sender is not None:
            self._sender.join(10)
        self.s.close()  # the last reference: the reset goes out now


def _rss_kib(pid: int) -> int:
    """VmRSS summed over the server and its children (the workers)."""
    pids = [pid]
    for p in pids:  # grows while iterating: children of children
        with contextlib.suppress(OSError):
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    kib = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
    return kib


def _ordinary(port: int, source: str) -> None:
    with RawClient(port, source=source) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO ordinary.test").code == 250
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221


def test_oversized_rest_is_read_slowly_and_the_sender_blocks(relay_factory) -> None:  # noqa: ANN001
    """Past max_message_size the server reads at oversize_read_rate: the senders stall in
    send() with the connection open (nothing answered yet, nothing closed), an ordinary
    client is served meanwhile, and the server holds no more than its bounded buffers."""
    r: RelayProcess = relay_factory({"limits": {"max_message_size": MAX,
                                                "oversize_read_rate": "4KB"}})
    assert r.proc is not None
    _ordinary(r.ports["smtp"], "127.0.9.29")
    rss0 = _rss_kib(r.proc.pid)
    streams = [Streamer(r.ports["smtp"], f"127.0.9.{10 + i}") for i in range(3)]
    try:
        for st in streams:
            st.stream()
        for st in streams:
            # past the limit first: it is the overshoot that is slowed, not the message
            wait_until(st.stalled(MAX), "the oversized sender to block past the limit",
                       timeout=60)
        for st in streams:
            # At 4 KB/s the 1 MiB overshoot takes minutes: still open, nothing said.
            assert not st.closed.is_set(), bytes(st.got)
            assert b"552" not in st.got, bytes(st.got)
        for i in range(5):
            _ordinary(r.ports["smtp"], f"127.0.9.{30 + i}")
        # the server's side of each stream: kernel buffers and listener.HIGH_WATER, not
        # what the clients pushed (each pushed more than MAX)
        grown = _rss_kib(r.proc.pid) - rss0
        assert grown < 16 * 1024, (grown, [st.sent for st in streams])
    finally:
        for st in streams:
            st.close()
    # (the server learns of the hang-ups only once it reads again: a paused transport
    # is not polled; the rest of what it buffered is read at the paced rate until then)
    assert "Traceback" not in r.maillog()


def test_just_oversized_message_gets_552_after_its_end_and_goes_on(relay_factory) -> None:  # noqa: ANN001
    """A message a little over the limit (within the overshoot) is read to its end at
    oversize_read_rate, answered 552 5.3.4 there, and the session goes on."""
    r: RelayProcess = relay_factory({"limits": {"max_message_size": MAX,
                                                "oversize_read_rate": "200KB"}})
    with RawClient(r.ports["smtp"], source="127.0.9.40") as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO big.test").code == 250
        assert c.cmd("MAIL FROM:<a@remote.test>").code == 250
        assert c.cmd("RCPT TO:<x@local.test>").code == 250
        assert c.cmd("DATA").code == 354
        body = LINE * (MAX // len(LINE) + 200)  # ~200 KB past the limit
        rep = c.cmd(body.decode() + ".")
        assert (rep.code, rep.text.split()[0]) == (552, "5.3.4"), rep
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221
