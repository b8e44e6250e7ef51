"""What a process holds, read from /proc (the tests run as the relay's user or root).

Owns: counting a process's TCP socket descriptors (`sockets_of`), what tests of floods
and evictions compare with a baseline to find a connection the server never closed; the
sockets a process holds (`socket_inodes`) and which of them are connected to a peer
(`connected_to`), what the process-model tests compare between a master and its workers.
"""

from __future__ import annotations

import contextlib
import os


def sockets_of(pid: int) -> int:
    """How many of `pid`'s open descriptors are TCP sockets now (listening or connected):
    the client connections a flood test bounds. Unix sockets are left out: the processes
    open some of their own for their whole life after the ports answer (with two
    workers, 22 sockets then, 27 a moment later: the master's notify, control and
    local submission sockets once its scheduler is up, each worker's notice socket at
    its first message), so a baseline read early missed them and the count stayed
    above it for good (the flaky test_465_flood_from_many_addresses_leaves_other_ports_
    served, under load: baseline 22, 27 with every connection closed)."""
    tcp: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            tcp.update(line.split()[9] for line in f)
    return len(socket_inodes(pid) & tcp)


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def _established(pid: int, host: str, port: int, state: str | None = "01"
                 ) -> list[list[str]]:
    """/proc/net/tcp's rows of `pid`'s sockets connected to host:port (IPv4), in `state`
    (01: ESTABLISHED; None: any)."""
    a, b, c, d = (int(x) for x in host.split("."))
    peer = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    mine = socket_inodes(pid)
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        rows = [line.split() for line in f]
    return [cols for cols in rows
            if cols[2] == peer and state in (None, cols[3]) and cols[9] in mine]


def unread_from(pid: int, host: str, port: int) -> list[int]:
    """Bytes waiting unread in each of `pid`'s TCP sockets connected to host:port (IPv4):
    /proc/net/tcp's rx_queue. 0: the process has read all the peer sent."""
    return [int(cols[4].split(":")[1], 16) for cols in _established(pid, host, port)]


def connected_to(pid: int, host: str, port: int) -> set[str]:
    """The socket inodes of `pid`'s TCP connections to host:port (IPv4)."""
    return {cols[9] for cols in _established(pid, host, port)}


def holder(pids: list[int], host: str, port: int, established: bool = True) -> int | None:
    """Which of `pids` holds the server's end of the TCP connection from host:port (IPv4):
    the worker the kernel's SO_REUSEPORT gave it to (or another worker passed it to);
    `established` False: in any state (closed by the peer, not yet by the server)."""
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            if _established(pid, host, port, "01" if established else None):
                return pid
    return None
