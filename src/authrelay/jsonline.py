"""The client end of our local JSON-line sockets: the scheduler's control socket
(scheduler/control.py) and the local submission socket (localsubmit.py).

Owns reading the server's one answer line from a Unix stream socket. Contract:
`read_line(sock)` -> the bytes up to and including the first newline, or what arrived
before the server closed or reset the connection (then without a newline: the caller
says that the server went away). Failure policy: a timeout (the socket's) propagates; a
reset is an end of answer, as a close is.
"""

from __future__ import annotations

import contextlib
import socket

CHUNK = 65536


def read_line(sock: socket.socket) -> bytes:
    buf = b""
    with contextlib.suppress(ConnectionResetError):
        while not buf.endswith(b"\n"):
            chunk = sock.recv(CHUNK)
            if not chunk:
                break
            buf += chunk
    return buf
