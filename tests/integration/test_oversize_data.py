"""An endless oversized DATA (issue 17): 552 5.3.4 and close after a bounded overshoot.

A real authrelay process, a raw socket client that streams message lines without ever
ending DATA, and a reader thread that collects what the server says meanwhile. Once the
message is past max_message_size by protocol.OVERSHOOT (1 MiB) the server answers
552 5.3.4 and hangs up, instead of reading on until data_final_timeout.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from relayproc import RelayProcess
from smtpclient import RawClient
from support.wait import wait_until

from authrelay.smtpd.protocol import OVERSHOOT

pytestmark = pytest.mark.slow

MAX = 100_000


def test_endless_oversized_data_gets_552_and_close(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({"limits": {"max_message_size": MAX,
                                                "data_final_timeout": "10m"}})
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
