"""Daemons a test starts itself (saslauthd, Dovecot, PostgreSQL, Redis, HAProxy, BIND):
waiting until one accepts connections, and stopping it by its PID.

Owns the two steps every such fixture repeated. `wait_accepting` polls until a TCP port
or a Unix socket accepts (a start-up wait, not a timing assertion) and fails at once,
with the daemon's log, if the process exits first. `stop` ends only the process the test
started (or its own process group, for one started with start_new_session=True):
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from support.wait import wait_until


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""


def wait_accepting(address: tuple[str, int] | Path, proc: subprocess.Popen | None = None,
                   log: Path | None = None, what: str = "daemon",
                   timeout: float = 30.0) -> None:
    """Until `address` ((host, port) or a Unix socket path) accepts a connection."""

    def accepts() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        if isinstance(address, Path):
            s = socket.socket(socket.AF_UNIX)
            target: object = str(address)
        else:
            s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
            target = address
        s.settimeout(1)
        try:
            s.connect(target)
            return True
        except OSError:
            return False
        finally:
            s.close()

    wait_until(accepts, lambda: f"{what} accepting on {address}: {_tail(log)}", timeout,
               interval=0.05)


def stop(proc: subprocess.Popen | None, *, group: bool = False, grace: float = 20.0) -> None:
    """SIGTERM the process we started (its process group if `group`), SIGKILL after
    `grace` seconds; always reaped."""
    if proc is None or proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=grace)
