"""Free loopback ports for servers a test starts (its own or the fakes), and the fixed
development ports of the embedded default and run.sh.

Owns: picking a port the kernel says is free now. Prefer binding to port 0 and reading
the port back; these are for what must know its port before it starts (a config file for
a subprocess, aiosmtpd's Controller, every fake MX on one shared port).
Ports come from outside the kernel's ephemeral range (ip_local_port_range), handed out in
turn machine-wide (a counter file under a lock): a port from bind(0) is an ephemeral
port, so between the check and the server's own bind the kernel could give it to any
outgoing connection on the host (a test's client to PostgreSQL, say) and the server
would fail "address already in use". Outside that range (below it, or above it when too
little lies below) only these helpers hand ports out, and the counter means a port comes
round again only after the whole range.
Also the few tests that must use DEV_PORTS (127.0.0.1:2525/2587/2465, what README promises
for run.sh and a config-less `serve`): `dev_ports()` makes them take turns on this machine
(a lock file every checkout's tests share: several engineers' and CI clones' suites on one
host) and checks the ports free, naming the process that holds one (`holders`) when not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from support import ci

DEV_PORTS = (2525, 2587, 2465)  # the embedded default's listeners (config.py, README)
DEV_PORTS_LOCK = Path(tempfile.gettempdir()) / "authrelay-dev-ports.lock"

TEST_HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 10))  # the fake MX / smart hosts


PORTS_COUNTER = Path(tempfile.gettempdir()) / "authrelay-test-ports.next"


MIN_SPAN = 2000  # fewer ports than this outside the ephemeral range: let the kernel pick


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral ports, first and last (ip_local_port_range)."""
    first, last = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
    return int(first), int(last)


def _port_range() -> tuple[int, int] | None:
    """[lo, hi): up to 12,000 ports just below the ephemeral range, or just above it where
    too few lie below; None when neither side has MIN_SPAN ports."""
    first, last = ephemeral_range()
    if first - 1024 >= MIN_SPAN:
        return max(1024, first - 12000), first
    if 65535 - last >= MIN_SPAN:
        return last + 1, min(65536, last + 1 + 12000)
    return None


def _next_port() -> int:
    """The range's next port in turn (machine-wide, wrapping); on a host whose ephemeral
    range leaves no room, one the kernel picks (bind to port 0: the race above remains)."""
    span = _port_range()
    if span is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    lo, hi = span
    fd = os.open(PORTS_COUNTER, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 16, 0).strip()
        port = int(raw) if raw.isdigit() and lo <= int(raw) < hi else lo
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{lo + (port - lo + 1) % (hi - lo)}\n".encode(), 0)
        return port
    finally:
        os.close(fd)


def _bindable(port: int, hosts: tuple[str, ...], udp: bool = False) -> bool:
    """Whether TCP (and with `udp` also UDP) `port` binds on every host now."""
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    socks: list[socket.socket] = []
    try:
        for h in hosts:
            for kind in kinds:
                s = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET, kind)
                socks.append(s)
                s.bind((h, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def _allocate(hosts: tuple[str, ...], udp: bool = False, tries: int = 200) -> int:
    for _ in range(tries):
        port = _next_port()
        if _bindable(port, hosts, udp):
            return port
    raise RuntimeError(f"no free port outside the ephemeral range on {hosts} in {tries} tries")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, outside the kernel's ephemeral range."""
    return _allocate((host,))


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on `host` now (a DNS server's)."""
    return _allocate((host,), udp=True)


def common_free_port(hosts: tuple[str, ...] = TEST_HOSTS) -> int:
    """A TCP port free on every one of `hosts` at this moment."""
    return _allocate(hosts)



def _listening_inodes(port: int) -> dict[int, str]:
    """Inode -> local address of every TCP socket listening on `port` (any address)."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                hexaddr, hexport = f[1].rsplit(":", 1)
                if f[3] == "0A" and int(hexport, 16) == port:  # 0A: TCP_LISTEN
                    raw = bytes.fromhex(hexaddr)  # 32-bit words in host byte order
                    if sys.byteorder == "little":
                        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    fam = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
                    addr = socket.inet_ntop(fam, raw)
                    found[int(f[9])] = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    return found


def holders(port: int) -> list[str]:
    """Who listens on `port` now: "pid N (command line) on ADDRESS" for each socket whose
    process we can see, else the socket alone. Read from /proc (we are root in CI)."""
    inodes = _listening_inodes(port)
    out: list[str] = []
    seen: set[int] = set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or len(seen) == len(inodes):
            continue
        with contextlib.suppress(OSError):
            for fd in (pid_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        ino = int(link[8:-1])
                        if ino in inodes and ino not in seen:
                            seen.add(ino)
                            raw = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ")
                            cmd = raw.decode(errors="replace").strip()[:200]
                            out.append(f"pid {pid_dir.name} ({cmd}) on {inodes[ino]}")
    out += [f"a socket on {a} (process not visible)" for i, a in inodes.items()
            if i not in seen]
    return list(dict.fromkeys(out))  # a server with several workers: one line per process


def busy_dev_ports() -> list[str]:
    """One line per DEV_PORTS port something listens on, naming the holders."""
    busy = []
    for port in DEV_PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT: free
            try:
                s.bind(("127.0.0.1", port))
                continue
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        who = holders(port)
        busy.append(f"127.0.0.1:{port} in use by " + ("; ".join(who) or "an unknown socket"))
    return busy


@contextlib.contextmanager
def dev_ports(timeout: float = 1800.0) -> Iterator[None]:
    """Hold DEV_PORTS for the test: wait for the machine-wide turn (another checkout's
    test using them, up to `timeout`), then require them free. A port held by anything
    else (a server left running, a developer's ./run.sh) fails under CI and skips
    elsewhere, naming the process."""
    fd = os.open(DEV_PORTS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    ci.require(False, f"{DEV_PORTS_LOCK} held for {timeout:g} s by another "
                                      f"test using ports {DEV_PORTS} (pid {holder or '?'})")
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        busy = busy_dev_ports()
        ci.require(not busy, "; ".join(busy) + ": the embedded default's ports are taken "
                             "(a server left running?)")
        yield
    finally:
        os.close(fd)  # releases the lock
