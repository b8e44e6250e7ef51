"""systemd Type=notify: a real `authrelay serve` tells a notify socket (the test's, in
the place of systemd's) READY=1 once it serves, RELOADING=1 / READY=1 around a SIGHUP
reload, STOPPING=1 at SIGTERM; only the main process speaks (workers inherit the
variable but stay silent, as NotifyAccess=main requires)."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from support.sdnotify import NotifySocket

pytestmark = pytest.mark.slow


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    d = Path(tempfile.mkdtemp(prefix="ar-nt-"))
    ns = NotifySocket(d / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(d / "notify"))
    yield ns
    ns.close()
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


@pytest.mark.parametrize("workers", [1, 2])
def test_stopping_extends_systemds_stop_timeout_to_shutdown_timeouts(
        relay_factory, notify: NotifySocket, workers: int) -> None:
    """shutdown_timeout = 5m under contrib's unit (TimeoutStopSec=60): systemd SIGKILLed
    the whole service 60 s into the stop (KillMode=mixed), sessions and deliveries the
    5 minutes allowed cut without a line. STOPPING=1 now says how long the stop may take,
    the main process's own forced end (5 min + 20 s) and 10 s more, so systemd waits."""
    r: RelayProcess = relay_factory({"shutdown_timeout": "5m"}, workers=workers)
    assert r.proc is not None
    main = r.proc.pid
    assert notify.wait_for("READY=1") == main
    r.stop()
    assert notify.wait_for("STOPPING=1") == main
    [stopping] = [m for _, m in notify.messages if "STOPPING=1" in m.split("\n")]
    assert stopping.split("\n") == ["STOPPING=1", f"EXTEND_TIMEOUT_USEC={330 * 10**6}"]
