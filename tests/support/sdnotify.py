"""A notify socket in systemd's place: what a `serve` the test started tells it.

Owns: receiving sd_notify(3) datagrams with the sender's pid (SCM_CREDENTIALS), so a test
knows that *its* server is ready (READY=1 is sent once every listener is bound, and serve
binds only addresses no other process holds), not merely that something answers on a port.
Contract: `wait_for(text)` returns the pid of the first sender of a datagram holding the
line `text`; at the deadline, or as soon as `check()` raises (the process exited), it fails
naming what was received.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []  # (sender pid, text)

    def wait_for(self, text: str, timeout: float = 30.0,
                 check: Callable[[], None] | None = None) -> int:
        """Read datagrams until one holds the line `text`; returns its sender's pid.
        `check` is called about every second while waiting (it raises to give up early,
        e.g. when the process that should speak has exited)."""
        deadline = time.monotonic() + timeout
        for pid, msg in self.messages:
            if text in msg.split("\n"):
                return pid
        while time.monotonic() < deadline:
            if check is not None:
                check()
            self.sock.settimeout(min(1.0, max(0.1, deadline - time.monotonic())))
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            self.messages.append((pid, data.decode()))
            if text in data.decode().split("\n"):
                return pid
        if check is not None:
            check()
        raise AssertionError(f"no {text!r} within {timeout} s; received {self.messages}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
