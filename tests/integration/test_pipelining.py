"""RFC 2920 pipelining on a real loopback socket: replies complete, in order, gathered.

A real in-process SMTPServer (wiring.server) on its own loop in a thread, a temp spool,
plain sockets as the client. The server answers a pipelined group with one write (its
replies are gathered while more input is buffered) and flushes whenever it runs out of
input, so a client that waits for a reply before sending more (DATA's 354, the final
250, or simply an incomplete next command) always gets it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.inproc import ServerThread
from support.ports import free_port

from authrelay import wiring
from authrelay.config import from_dict
from authrelay.maillog import MailLog
from authrelay.smtpd import listener
from authrelay.spool.store import Spool


class _Server:
    """SMTPServer on its own loop in a thread; records every reply write per connection."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.cfg = from_dict({
            "hostname": "pipe.test", "state_dir": str(tmp),
            "listen": [{"address": f"127.0.0.1:{self.port}", "mode": "smtp"}],
            "relay": {"local_domains": ["local.test"]},
            "limits": {"connection_rate_per_ip": 0, "bad_rcpt_throttle": 0},
        })
        self.spool = Spool(tmp / "spool", fsync=False)
        self.spool.ensure_dirs()
        self.log = tmp / "maillog"
        self.writes: dict[int, list[bytes]] = {}  # client port -> writes, in order
        self.thread = ServerThread(self.cfg, lambda: wiring.server(
            self.cfg, self.spool, None, auth=None, maillog=MailLog(f"file:{self.log}")))


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    srv = _Server(tmp_path)
    real = listener.Connection.write

    def recording(conn: listener.Connection, data: bytes) -> None:
        srv.writes.setdefault(conn.peer[1], []).append(bytes(data))
        real(conn, data)

    monkeypatch.setattr(listener.Connection, "write", recording)
    srv.thread.start()
    yield srv
    srv.thread.stop()


class _Client:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    @property
    def port(self) -> int:
        return int(self.s.getsockname()[1])

    def reply(self) -> tuple[int, list[str]]:
        """One whole (possibly multi-line) reply: (code, its lines)."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                got = self.s.recv(65536)
                assert got, f"connection closed; had {lines}"
                self.buf += got
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def codes(self, n: int) -> list[int]:
        return [self.reply()[0] for _ in range(n)]

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def close(self) -> None:
        self.s.close()


GROUP = (b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\n"
         b"RCPT TO:<c@elsewhere.test>\r\nRCPT TO:<d@local.test>\r\nDATA\r\n")


def test_pipelined_group_answered_in_order_in_one_write(server: _Server) -> None:
    c = _Client(server.port)
    try:
        assert c.reply()[0] == 220
        c.send(GROUP)  # one segment: the server reads the whole group at once
        code, ehlo = c.reply()
        assert code == 250 and any(line[4:] == "PIPELINING" for line in ehlo)
        # MAIL, RCPT, refused RCPT (relay denied), RCPT, DATA: each answered, in order
        assert c.codes(5) == [250, 250, 550, 250, 354]
        writes = server.writes[c.port]
        assert len(writes) == 2, writes  # the greeting, then the whole group's replies
        assert writes[1].startswith(b"250-pipe.test") and writes[1].endswith(b"\r\n")
        assert b"354 " in writes[1] and writes[1].count(b"\r\n354 ") == 1
    finally:
        c.close()


def test_replies_flushed_when_input_runs_out_mid_command(server: _Server) -> None:
    """RFC 2920 3.1: the server must not wait for more input before sending what it has;
    a client may hold back the rest of a command until it sees earlier replies."""
    c = _Client(server.port)
    try:
        assert c.reply()[0] == 220
        c.send(b"HELO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<b@loc")
        assert c.codes(2) == [250, 250]  # HELO, MAIL: sent although a command is pending
        c.send(b"al.test>\r\n")
        assert c.codes(1) == [250]
        c.send(b"QUIT\r\n")
        assert c.codes(1) == [221]
    finally:
        c.close()


def test_final_250_then_the_next_pipelined_transaction(server: _Server) -> None:
    """The 250 for a message (after its durable commit) goes out before the replies to
    commands pipelined behind the end-of-data dot, and each of those is answered."""
    c = _Client(server.port)
    try:
        assert c.reply()[0] == 220
        c.send(b"HELO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<b@local.test>\r\n"
               b"DATA\r\n")
        assert c.codes(4) == [250, 250, 250, 354]
        c.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<a@remote.test>\r\n"
               b"RCPT TO:<b@local.test>\r\nDATA\r\n")
        code, lines = c.reply()
        assert code == 250 and "queued as" in lines[-1]
        assert c.codes(3) == [250, 250, 354]
        c.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        code, lines = c.reply()
        assert code == 250 and "queued as" in lines[-1]
        assert c.codes(1) == [221]
        assert len(server.spool.scan()) == 2
    finally:
        c.close()


def test_a_connection_has_the_small_send_buffer_and_its_clients_address(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission fixes an accepted socket's send buffer at listener.SNDBUF (the kernel
    doubles it) before the loop takes it, and the session's peer is the client's (address,
    port) as accept() gave it."""
    seen: list[tuple[int, tuple[str, int]]] = []
    real = listener.Connection.write

    def recording(conn: listener.Connection, data: bytes) -> None:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        seen.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), conn.peer))
        real(conn, data)

    monkeypatch.setattr(listener.Connection, "write", recording)
    c = _Client(server.port)
    try:
        assert c.reply()[0] == 220
        assert seen == [(2 * listener.SNDBUF, ("127.0.0.1", c.port))]
    finally:
        c.close()
