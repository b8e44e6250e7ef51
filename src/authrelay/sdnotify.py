"""systemd readiness notification (sd_notify(3)) for `Type=notify` units, in a few lines.

Owns the datagram protocol: when systemd starts the service it sets $NOTIFY_SOCKET (a
path, or "@name" for an abstract socket); the main process sends newline-separated
assignments to it: READY=1 once the listeners accept and the queue runs, RELOADING=1
(with MONOTONIC_USEC, as systemd 253+ wants) when a SIGHUP reload starts and READY=1 when
it is done (or failed: the old config keeps running), STOPPING=1 when shutdown starts
(with EXTEND_TIMEOUT_USEC: how long the stop may take, shutdown_timeout's).
STATUS= carries a line for `systemctl status`.

Contract: every function returns whether a datagram was sent and never raises (a missing
or broken notify socket must not stop mail). Only the process that imported this module
speaks: that is `serve` itself, the service's main process (it imports the daemon before
forking anything); a forked worker or helper inheriting $NOTIFY_SOCKET stays silent, since
systemd (NotifyAccess=main) would ignore it and log a warning.
"""

from __future__ import annotations

import os
import socket
import time

_owner = os.getpid()  # the main process: it imports this before forking children


def notify(state: str) -> bool:
    """Send `state` ("READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; False when there is none."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@" or os.getpid() != _owner:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8", "replace"))
        return True
    except OSError:
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping(lasts: float) -> bool:
    """STOPPING=1, with EXTEND_TIMEOUT_USEC (systemd 236+): the stop may take `lasts`
    seconds from now, so the unit's TimeoutStopSec (contrib's 60 s) never SIGKILLs a stop
    a longer shutdown_timeout allows (systemd waits for the later of the two)."""
    return notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={round(lasts * 1_000_000)}")
