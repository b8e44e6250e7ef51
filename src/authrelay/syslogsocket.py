"""syslogsocket: maillog lines to the local syslog daemon's socket, as syslog(3) sends them.

Owns the syslog target's wire: one datagram per line, `<22>Dec  6 12:47:21
authrelay[PID]: LINE` (facility mail, severity info, RFC 3164 as glibc writes it; a
stream socket gets each line NUL-terminated, as glibc does). Used from the maillog's
writer thread only, never the event loop: syslog(3) called there blocked every session of
the process while the daemon did not read (a datagram queue full), and dropped every line
without a word while it was gone.
Contract: `send(lines)` returns the lines it could not hand over (the socket missing, no
listener, a line too long for it, or not taken within SEND_TIMEOUT of the call: a daemon
that stopped reading, or one reading more slowly than lines come, whose lines would
otherwise pile up in the writer's queue); the caller writes those elsewhere. A socket
that failed is connected again at the next send, so a restarted daemon gets the next
lines.
"""

from __future__ import annotations

import errno
import os
import socket
import time

FACILITY_MAIL = 2
SEVERITY_INFO = 6
SEND_TIMEOUT = 2.0  # seconds one send() may take; the lines not taken by then go elsewhere


class SyslogSocket:
    def __init__(self, path: str, ident: str) -> None:
        self.path = path
        self.ident = ident
        self._sock: socket.socket | None = None
        self._stream = False

    def _connect(self) -> socket.socket:
        last: OSError = OSError(errno.ENOENT, "is missing")
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
            try:
                s.settimeout(SEND_TIMEOUT)
                s.connect(self.path)
            except OSError as e:
                s.close()
                last = e
                if e.errno != errno.EPROTOTYPE:  # a stream socket answers a datagram so
                    break
                continue
            self._stream = kind == socket.SOCK_STREAM
            return s
        raise last

    def fileno(self) -> int | None:
        """The connected socket's descriptor (None before the first send)."""
        return self._sock.fileno() if self._sock is not None else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, lines: list[str]) -> tuple[list[str], str]:
        """Each line (without its newline) as one message; returns the lines not sent
        (from the first the daemon did not take on) and why ('' when all went)."""
        prefix = f"<{FACILITY_MAIL * 8 + SEVERITY_INFO}>{_stamp()} {self.ident}[{os.getpid()}]: "
        # One deadline for the whole call, not one per line: a daemon that takes each line
        # just within the limit would make the writer's queue grow without bound.
        deadline = time.monotonic() + SEND_TIMEOUT
        for i, line in enumerate(lines):
            data = (prefix + line).encode("utf-8", "replace")
            for again in (True, False):  # a daemon restarted: connect again, once
                try:
                    self._send(data, deadline)
                    break
                except OSError as e:
                    self.close()
                    if not again or isinstance(e, TimeoutError):
                        return lines[i:], _why(e)
        return [], ""

    def _send(self, data: bytes, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if self._sock is None:
            self._sock = self._connect()
        self._sock.settimeout(left)
        if self._stream:
            self._sock.sendall(data + b"\0")
        else:
            self._sock.send(data)


def _why(e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return f"the syslog daemon did not read within {SEND_TIMEOUT:g} s"
    if e.errno == errno.ENOENT:
        return "is missing"
    if e.errno == errno.ECONNREFUSED:
        return "has no listener"
    return e.strerror or str(e)


def _stamp() -> str:
    """`Dec  6 12:47:21`: glibc's `%h %e %T`."""
    t = time.localtime()
    return time.strftime("%b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S", t)
