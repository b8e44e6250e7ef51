"""systemd Type=notify: a real `authrelay serve` tells a notify socket (the test's, in
the place of systemd's) READY=1 once it serves, RELOADING=1 / READY=1 around a SIGHUP
reload, STOPPING=1 at SIGTERM; only the main process speaks (workers inherit the
variable but stay silent, as NotifyAccess=main requires)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess

pytestmark = pytest.mark.slow


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, str]] = []  # (sender pid, text)

    def wait_for(self, text: str, timeout: float = 30.0) -> int:
        """Read datagrams until one contains `text`; returns its sender's pid."""
        deadline = time.monotonic() + timeout
        for pid, msg in self.messages:
            if text in msg.split("\n"):
                return pid
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                break
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            self.messages.append((pid, data.decode()))
            if text in data.decode().split("\n"):
                return pid
        raise AssertionError(f"no {text!r} in {self.messages}")


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    d = Path(tempfile.mkdtemp(prefix="ar-nt-"))
    ns = NotifySocket(d / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(d / "notify"))
    yield ns
    ns.sock.close()
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping(relay_factory, notify: NotifySocket, workers: int) -> None:
    r: RelayProcess = relay_factory(workers=workers)
    assert r.proc is not None
    main = r.proc.pid
    assert notify.wait_for("READY=1") == main
    os.kill(main, signal.SIGHUP)
    assert notify.wait_for("RELOADING=1") == main
    reloading = next(m for _, m in notify.messages if "RELOADING=1" in m)
    assert "MONOTONIC_USEC=" in reloading
    r.wait_for(lambda: "daemon=reloaded" in r.maillog())
    n_ready = sum(1 for _, m in notify.messages if "READY=1" in m.split("\n"))
    if n_ready < 2:
        notify.messages.clear()
        assert notify.wait_for("READY=1") == main
    r.stop()
    assert notify.wait_for("STOPPING=1") == main
    # Nobody but the main process ever spoke (workers inherited NOTIFY_SOCKET).
    assert {pid for pid, _ in notify.messages} <= {main}


def test_no_notify_socket_is_fine(relay_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    r: RelayProcess = relay_factory()
    # SIGHUP is ignored until the loop handles it (then "started" is logged): wait for it.
    r.wait_for(lambda: "daemon=started" in r.maillog(), timeout=30)
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: "daemon=reloaded" in r.maillog(), timeout=30)
    r.stop()
    assert r.proc.returncode == 0
