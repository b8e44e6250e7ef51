"""Both ends of our local JSON-line sockets: the scheduler's control socket
(scheduler/control.py) and the local submission socket (localsubmit.py).

Owns reading the server's one answer line from a Unix stream socket, and parsing a
client's one request line. Contract: `read_line(sock)` -> the bytes up to and including
the first newline, or what arrived before the server closed or reset the connection
(then without a newline: the caller says that the server went away). Failure policy: a
timeout (the socket's) propagates; a reset is an end of answer, as a close is.
`request_object(line)` -> the JSON object the line holds; ValueError for anything else
(not JSON, not an object, arrays or objects nested past the interpreter's recursion
limit: json raises RecursionError there, which is a bad request too, not a bug).
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

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


def request_object(line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except RecursionError:  # e.g. 30,000 "[": no request, whatever else it is
        raise ValueError("nested too deep") from None
    if not isinstance(req, dict):
        raise ValueError("request must be an object")
    return req
