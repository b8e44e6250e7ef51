"""Connections that never read, flood or stall, against a real `authrelay serve` (issue 9).

- A client that pipelines 50 MB of commands without reading its replies: the server stops
  executing (unsent output passes a small high-water mark), so its memory stays within a
  few MB of idle; at the command timeout it answers 421 and aborts the socket, and the
  memory is given back.
- With the junk-command limit (default 100) such a client is cut off at once: 421 4.7.0
  Too many commands, and the socket is closed without waiting for the client to read.
- A client pipelining NOOPs as fast as it can on one connection while other clients
  transact: they are all served while the flood goes on.
Memory is read from /proc (RSS of the single serve process, workers = 1). No timed
assertions: waits are generous upper bounds for events, never speed measurements.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from support.wait import wait_until

pytestmark = pytest.mark.slow

MB = 1 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_sockets(pid: int, port: int) -> int:
    """Client connections on `port` whose descriptor the server process still holds (the
    socket inodes of /proc/PID/fd matched against /proc/net/tcp; LISTEN excluded)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            local, state, inode = f[1], f[3], f[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode in inodes:
                n += 1
    return n


def settle_rss(pid: int) -> int:
    """RSS once it stops moving (a few samples apart)."""
    last = rss(pid)
    for _ in range(20):
        time.sleep(0.1)
        now = rss(pid)
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


class Flooder(threading.Thread):
    """Pipelines `block` repeatedly up to `total` bytes without ever reading."""

    def __init__(self, port: int, block: bytes, total: int) -> None:
        super().__init__(daemon=True)
        self.s = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.block, self.total = block, total
        self.sent = 0
        self.error: str = ""
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while self.sent < self.total:
                self.s.sendall(self.block)
                self.sent += len(self.block)
        except OSError as e:  # reset or pipe: the server closed it
            self.error = type(e).__name__
        finally:
            self.done.set()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path, overrides={"limits": {
        "command_timeout": "4s", "connection_rate_per_ip": 0, "max_junk_commands": 0}}).start()
    yield r
    r.stop()


def test_never_reading_pipeliner_is_bounded_then_aborted(relay: RelayProcess) -> None:
    assert relay.proc is not None
    pid, port = relay.proc.pid, relay.ports["smtp"]
    idle = settle_rss(pid)
    f = Flooder(port, b"EHLO never.reads.example\r\n" * 4000, 50 * MB)
    f.start()
    # The server stops executing once ~64 KB of replies are unsent; the client's sends
    # then block on full socket buffers. Watch the memory while it is stuck there.
    peak = 0
    for _ in range(20):
        time.sleep(0.1)
        peak = max(peak, rss(pid))
    assert f.sent < 50 * MB, "the server kept reading a client that does not read"
    assert peak - idle < 8 * MB, (idle, peak)
    assert open_sockets(pid, port) == 1  # the stalled connection, held until the timeout
    # command_timeout (4 s): 421 and the socket is aborted, not left ESTABLISHED.
    assert f.done.wait(30), "the server never closed the stalled connection"
    assert f.error, "the connection ended without a reset/close from the server"
    wait_until(lambda: open_sockets(pid, port) == 0, "server socket gone", 15)
    after = settle_rss(pid)
    assert after - idle < 8 * MB, (idle, after)
    log = relay.maillog()
    assert "stage=timeout" in log
    # Commands executed before the server stopped: only as many as fit in a bounded amount
    # of unsent replies (~64 KB transport + a fixed kernel send buffer), not megabytes.
    executed = [int(m) for m in re.findall(r"disconnect=.*commands=ehlo=(\d+)", log)]
    assert executed and max(executed) < 3000, executed
    f.s.close()


def test_noop_flood_does_not_stall_other_clients(relay: RelayProcess) -> None:
    """One connection pipelines NOOPs (reading the replies) while 20 sessions each send a
    message: all 20 finish while the flood is still going on."""
    port = relay.ports["smtp"]
    stop = threading.Event()
    replies = [0]
    s = socket.create_connection(("127.0.0.1", port), timeout=60)

    def read() -> None:
        try:
            while not stop.is_set():
                b = s.recv(65536)
                if not b:
                    return
                replies[0] += b.count(b"\r\n")
        except OSError:
            return

    def write() -> None:
        try:
            s.sendall(b"EHLO flood.example\r\n")
            while not stop.is_set():
                s.sendall(b"NOOP\r\n" * 5000)
        except OSError:
            return

    threads = [threading.Thread(target=read, daemon=True),
               threading.Thread(target=write, daemon=True)]
    for t in threads:
        t.start()
    wait_until(lambda: replies[0] > 10_000, "the flood under way", 30)
    before = len(relay.queued())
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            f = c.makefile("rb")
            msg = (b"EHLO c.example\r\nMAIL FROM:<a@remote.example>\r\n"
                   b"RCPT TO:<x@local.test>\r\nDATA\r\n")
            f.readline()
            c.sendall(msg)
            codes = []
            while len(codes) < 4:
                line = f.readline()
                if line[3:4] == b" ":
                    codes.append(int(line[:3]))
            c.sendall(b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n")
            codes.append(int(f.readline()[:3]))
            assert codes == [250, 250, 250, 354, 250], codes
            c.close()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{i}: {e!r}")

    clients = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    flood_alive = not stop.is_set() and threads[1].is_alive()
    stop.set()
    s.close()
    assert not errors, errors
    assert flood_alive, "the flood ended before the other clients were served"
    wait_until(lambda: len(relay.queued()) >= before + 20, "20 messages queued", 15)


@pytest.fixture
def junk_relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path, overrides={"limits": {"connection_rate_per_ip": 0}}).start()
    yield r
    r.stop()


@pytest.mark.parametrize("block", [b"NOOP\r\n", b"EHLO again.example\r\n", b"RSET\r\n"])
def test_junk_limit_ends_a_pipelined_flood(junk_relay: RelayProcess, block: bytes) -> None:
    assert junk_relay.proc is not None
    pid, port = junk_relay.proc.pid, junk_relay.ports["smtp"]
    idle = settle_rss(pid)
    f = Flooder(port, b"EHLO first.example\r\n" + block * 8000, 50 * MB)
    f.start()
    assert f.done.wait(30), "a 50 MB junk flood was not cut off"
    assert f.error and f.sent < 50 * MB
    wait_until(lambda: open_sockets(pid, port) == 0, "server socket gone", 15)
    assert settle_rss(pid) - idle < 8 * MB
    assert "reject=421 4.7.0 Too many commands" in junk_relay.maillog()
    f.s.close()
