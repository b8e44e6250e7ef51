"""Process plumbing for `authrelay serve`: one instance per state dir, children that die
with their master, and the privileged helper that reads root-only TLS keys.

Owns five mechanisms (docs/PRIVILEGES.md tells the whole split):

- The instance lock: `flock` on `state_dir/authrelay.lock`, taken by `serve` before it
  binds or forks anything; the file holds the master's pid so a second `serve` can name
  it. Every process of the instance inherits the locked descriptor, so the lock is free
  only once the last of them is gone. Failure policy: `InstanceBusy` (one line, exit 1).
- The bind lock: an abstract unix socket name, one per network namespace, held from the
  listen addresses' free check to the last SO_REUSEPORT bind, so of two instances started
  at the same instant on different state dirs the second checks after the first bound.
- Parent death: a forked child (receiving worker, key helper) calls `arm_child()`:
  PR_SET_PDEATHSIG=SIGKILL (the kernel kills it the moment the master dies, however the
  master died, kill -9 included), then checks getppid() (the master may have died between
  fork and prctl: then it exits at once). Besides the signal, every child holds one end of
  a socketpair whose other end only the master holds (`Channel`): end-of-file on it means
  the master is gone, as Postfix's children watch their master's status pipe. That second
  path does not depend on the parent-death signal surviving (the kernel clears it when a
  process changes credentials, and it is bound to the forking *thread*: children are
  forked from the main thread only).
- The key helper: when `serve` drops privileges (root + `user = ...`), it first forks a
  small process that stays root and answers one request, "the certificates and keys of the
  config file", with the PEM bytes (validated: pairs that load, so no other file's
  contents can be obtained through it) or an error line. The unprivileged master asks it
  on SIGHUP, so a renewed root-only key (mode 0600 root, as certbot makes) is loaded;
  likewise the config file itself (only the one it was started with, and only once it
  loads) when the master may not read it (0600 root: it holds a database password).
  Workers get the master's config bytes and PEM pairs in one reload message, a memory
  file passed over the socketpair (any size: a datagram is capped by the send buffer).
- A child's descriptors: a worker the master forks again lets go at once of what the
  master opened since its start (`descriptors()` before the fork, `shed()` in the child),
  or it held the master's connections open for its whole life.

Messages on a channel are single SOCK_SEQPACKET datagrams: `kind(1 byte) + payload`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = "authrelay.lock"
log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 4 * 1024 * 1024  # a certificate chain and key fit many times over


class StartError(RuntimeError):
    """`serve` cannot start: the message is the one line it prints (exit status 1)."""


class InstanceBusy(StartError):
    """Another authrelay instance holds the state dir, or a listen address is taken."""


# --------------------------------------------------------------------------- instance lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _holder(fd: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).split()[0])
    return 0


def acquire_instance_lock(state_dir: Path, *, wait_dead: float = 5.0) -> int:
    """Lock `state_dir/authrelay.lock` for this instance; return the descriptor (kept open
    for the life of the instance, inherited by its children).

    Busy and the recorded master alive: InstanceBusy at once. Busy but that master dead:
    its children are exiting (they die within a second of it), so wait up to `wait_dead`
    seconds for them, then InstanceBusy.
    """
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_dead
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
        pid = _holder(fd)
        if pid and _alive(pid) or time.monotonic() > deadline:
            os.close(fd)
            who = f"pid {pid}" if pid and _alive(pid) else "an exiting instance"
            raise InstanceBusy(f"another authrelay ({who}) is running on state dir "
                               f"{state_dir} (lock {path})")
        time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


BIND_LOCK = b"\0authrelay/bind-lock"  # abstract: one per network namespace, no file
# A holder binds and listens at once; one that answers no connection for this long is not
# an authrelay between its bind and listen (microseconds) but a program squatting the name.
SILENT_HOLDER = 1.0
PROBE_INTERVAL = 0.5


def _holder_uid(name: bytes) -> int | None:
    """The effective uid the holder of the abstract socket `name` listened with
    (SO_PEERCRED), or None when it answers no connection (not listening, backlog full)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as c:
        c.setblocking(False)
        try:
            c.connect(name)
        except OSError:
            return None
        creds = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


@contextlib.contextmanager
def bind_lock(wait: float = 30.0, name: bytes = BIND_LOCK) -> Iterator[None]:
    """Machine-wide (per network namespace) lock held from the free check to the last
    SO_REUSEPORT bind: two instances started at the same instant on different state dirs
    otherwise both pass the check, then both bind into one SO_REUSEPORT group. An abstract
    unix socket: the kernel frees it when its holder dies, so it never goes stale. Held
    by another instance for longer than `wait` seconds: InstanceBusy.

    An abstract name has no permissions: any local user can bind it. Only a holder of our
    effective uid is waited for: the kernel admits a socket into a SO_REUSEPORT group only
    from the uid that made the group, so another user's program, whatever it holds, can
    never share our ports, and it must not keep the relay from starting (www-data binding
    the name would otherwise stop every start and restart: 30 s, then exit 1). A holder
    that answers no connection for SILENT_HOLDER seconds (ours listen as they bind) is
    such a squatter too. Either way the binds go on without the lock (logged)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + wait
    next_probe = 0.0
    silent_since: float | None = None
    try:
        while True:
            try:
                s.bind(name)
                # Waiters' probes queue here unaccepted: room for all (capped by somaxconn).
                s.listen(4096)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
            now = time.monotonic()
            if now >= next_probe:  # a probe stays in the holder's backlog: rarely
                next_probe = now + PROBE_INTERVAL
                uid = _holder_uid(name)
                if uid is not None:
                    silent_since = None
                elif silent_since is None:
                    silent_since = now
                if (uid is not None and uid != os.geteuid()) or (
                        silent_since is not None and now - silent_since >= SILENT_HOLDER):
                    who = "answers nothing" if uid is None else f"is uid {uid}"
                    log.warning("the bind lock is held by a program that %s, not an instance "
                                "that could share our ports: binding without it", who)
                    break
            if now > deadline:
                raise InstanceBusy("another authrelay is binding its listen addresses "
                                   f"(held for over {wait:g} s)")
            time.sleep(0.01)
        yield
    finally:
        s.close()


def check_address_free(family: int, host: str, port: int, label: str) -> None:
    """Bind (not listen) without SO_REUSEPORT: fails if any other socket holds the address,
    whether or not it set SO_REUSEPORT, so our own SO_REUSEPORT sockets, bound next, can
    never join another process's group (and a second instance never joins ours)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InstanceBusy(f"cannot listen on {label}: address already in use "
                                   f"by {address_holder(family, host, port)}") from None
            raise InstanceBusy(f"cannot listen on {label}: {e.strerror}") from None
    finally:
        s.close()


def address_holder(family: int, host: str, port: int) -> str:
    """Who holds a TCP address, for the admin: `pid N (NAME)` when /proc tells (the
    socket bound to it, or to the wildcard, in /proc/net/tcp[6], then the process with
    that socket open: any user's as root, our own user's otherwise), else
    `another process`."""
    import ipaddress

    want = ipaddress.ip_address(host).packed
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    inodes = []
    try:
        with open(table, encoding="ascii") as f:
            next(f)
            for row in f:
                local, inode = row.split()[1], row.split()[9]
                addr, _, hexport = local.partition(":")
                if int(hexport, 16) != port or inode == "0":
                    continue
                # /proc writes the address as 32-bit words in host (little-endian) order
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1]
                               for i in range(0, len(addr), 8))
                if raw == want or not any(raw):
                    inodes.append(f"socket:[{inode}]")
    except (OSError, ValueError, StopIteration, IndexError):
        return "another process"
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    return f"pid {pid} ({f.read().strip()})"
        except OSError:  # gone, or another user's: not ours to read
            continue
    return "another process"


# --------------------------------------------------------------------------- owner's rights

@contextlib.contextmanager
def as_owner_of(path: Path) -> Iterator[None]:
    """Run the block with the effective uid and gid of `path`'s owner when we are root and
    it is another user's (the daemon's `user` owns state_dir and the spool): a link that
    user planted there then cannot make root read, move or write files elsewhere, and the
    files made are that user's (as Postfix's commands run as mail_owner). Otherwise, or
    in a process with other threads (the ids are the whole process's), as we are.
    Restored after."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None  # made as we are (root: as before)
    if os.geteuid() != 0 or st is None or st.st_uid == 0 or threading.active_count() > 1:
        yield
        return
    uid, gid = os.geteuid(), os.getegid()
    os.setegid(st.st_gid)
    try:
        os.seteuid(st.st_uid)
        try:
            yield
        finally:
            os.seteuid(uid)
    finally:
        os.setegid(gid)


# --------------------------------------------------------------------------- descriptors

# What an open descriptor is (st_dev, st_ino): a number alone may since name another file.
Identity = tuple[int, int]


def descriptors() -> dict[int, Identity]:
    """This process's open descriptors (from /proc/self/fd) and what each is."""
    out: dict[int, Identity] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
        out[fd] = (st.st_dev, st.st_ino)
    return out


def shed(owned: dict[int, Identity], keep: set[int]) -> None:
    """In a child right after fork: let go of the parent's descriptors `owned` (listed by
    descriptors() in the parent before the fork; a number that names something else now,
    made in the child by a library's fork handler, is left alone), except `keep`.

    A copy keeps its socket open: a worker the master forks again held the master's
    cached outbound connections, its control and local submission sockets and their
    clients, its DNS, Redis and PostgreSQL sockets, so a next hop or a client saw no close
    until that worker exited. Nothing in the child uses them (they belong to the parent's
    event loop and threads, which the child does not run): a socket is closed; anything
    else (the scheduler's lock and journal, SQLite and metrics files) is replaced by
    /dev/null, its number kept, because a library of the parent's may still close its
    object's descriptor by number in the child (prometheus_client does at a pid change):
    with the number free, that close would hit the child's own file."""
    with contextlib.suppress(ValueError):  # the parent loop's wakeup socket, shed below
        signal.set_wakeup_fd(-1)
    devnull = -1
    try:
        for fd, what in owned.items():
            if fd in keep:
                continue
            try:
                st = os.fstat(fd)
            except OSError:  # closed in the child already
                continue
            if (st.st_dev, st.st_ino) != what:
                continue
            if stat.S_ISSOCK(st.st_mode):
                os.close(fd)
                continue
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(devnull, fd, inheritable=False)
    finally:
        if devnull >= 0:
            os.close(devnull)


# --------------------------------------------------------------------------- parent death

_libc: Any = None


def _prctl() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc.prctl


def preload() -> None:
    """Resolve prctl while the interpreter can still read its own files (before a drop)."""
    with contextlib.suppress(OSError, AttributeError):
        _prctl()


PR_SET_NAME = 15


def set_name(name: str) -> None:
    """The process name `ps -o comm`, top and /proc/PID/comm show (15 bytes at most), so an
    admin tells the master, the workers and the key helper apart."""
    with contextlib.suppress(OSError, AttributeError):
        _prctl()(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def pin_to_cpu(index: int) -> int | None:
    """Keep this process (its threads made from now on too) on one CPU: the `index`-th,
    round robin, of those it may run on now; the CPU, or None when it may use only one
    anyway or the kernel refuses (a cpuset changed meanwhile: it runs unpinned).
    A worker whose threads stay on one core finds its code and data still in that
    core's caches (docs/PERFORMANCE.md (28))."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        cpu = cpus[index % len(cpus)]
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpu


M_MMAP_THRESHOLD = -3  # glibc mallopt(): allocations from this size up are mmap()ed
BIG_ALLOCATION = 1 << 20


def return_big_allocations() -> None:
    """Allocations of 1 MiB and more get their own mapping, given back when freed.

    glibc raises its mmap threshold to the size of any mapped block that is freed (up to
    32 MiB): after the first argon2 hash (19 MiB, `[auth] hash_threads` threads per
    worker) every later one came from the thread's malloc arena and stayed there, ~19 MiB
    per hashing thread that ever ran (bench (f): +60 MB per worker after the first burst
    of logins, measured as PSS). A fixed threshold turns that off; smaller blocks (our
    reading and spool buffers are at most 256 KiB) still come from the arenas. glibc only
    (other C libraries: no such function or a no-op); called before any thread or fork,
    the setting is inherited by every process of the instance."""
    with contextlib.suppress(OSError, AttributeError):
        _prctl()  # loads libc
        _libc.mallopt(M_MMAP_THRESHOLD, BIG_ALLOCATION)


def arm_child(master_pid: int) -> None:
    """In a child right after fork: die with the master. Exits at once if it is gone."""
    try:
        if os.environ.get("AUTHRELAY_NO_PDEATHSIG") == "1":  # tests: the channel path alone
            raise AttributeError
        if _prctl()(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError):  # not Linux: the channel alone watches the master
        pass
    # The master may have died before prctl took effect: the signal would never come.
    if os.getppid() != master_pid:
        os._exit(1)


class Channel:
    """A SOCK_SEQPACKET socketpair between the master and one child.

    The master keeps `master`, the child `child`; each closes the other's end after fork
    (`in_child()` also closes every other channel's master end the child inherited, or
    that child would keep another child's master end open and its EOF would never come).
    """

    def __init__(self) -> None:
        self.master, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.suppress(OSError):
            self.master.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
            self.child.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)

    def in_master(self) -> None:
        self.child.close()

    def in_child(self, others: list[Channel]) -> socket.socket:
        for ch in others:
            if ch is not self:
                with contextlib.suppress(OSError):
                    ch.master.close()
                with contextlib.suppress(OSError):
                    ch.child.close()
        self.master.close()
        return self.child

    def close(self) -> None:
        for s in (self.master, self.child):
            with contextlib.suppress(OSError):
                s.close()


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(kind + payload)


def recv(sock: socket.socket) -> tuple[bytes, bytes]:
    """One message: (kind, payload); (b"", b"") at end of file (the peer is gone)."""
    kind, payload, fds = recv_with_fds(sock)
    for fd in fds:  # not expected here: never leak one
        os.close(fd)
    return kind, payload


def recv_with_fds(sock: socket.socket) -> tuple[bytes, bytes, list[int]]:
    """One message and the descriptors passed with it (SCM_RIGHTS)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    return data[:1], data[1:], list(fds)


def open_log_file(path: str, owner: tuple[int, int]) -> int:
    """As root: the maillog file opened for appending (created 0640 if missing; readable
    too: the maillog reads its last byte after a failed write) and made
    `owner`'s, for the dropped processes. Never through a symbolic link (O_NOFOLLOW) and
    only a regular file with one link: the directory may be the dropped user's, and a
    link it put in the file's place (to /etc/shadow) must not be chowned to it by root."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                 | os.O_NOFOLLOW | os.O_NONBLOCK, 0o640)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EPERM, "not a regular file with one link; not opened")
        if (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def send_fd(sock: socket.socket, kind: bytes, fd: int) -> None:
    socket.send_fds(sock, [kind], [fd])


PEM = tuple[tuple[bytes, bytes], ...]  # tls.PEM: (certificate chain, key) per served pair


def pack_pem(pem: PEM) -> bytes:
    """Every pair: their count, then each one's two lengths and bytes."""
    return struct.pack("!I", len(pem)) + b"".join(
        struct.pack("!II", len(c), len(k)) + c + k for c, k in pem)


def unpack_pem(data: bytes) -> PEM:
    (count,) = struct.unpack("!I", data[:4])
    out, pos = [], 4
    for _ in range(count):
        a, b = struct.unpack("!II", data[pos:pos + 8])
        pos += 8
        out.append((data[pos:pos + a], data[pos + a:pos + a + b]))
        pos += a + b
    if pos != len(data):
        raise ValueError("truncated certificate message")
    return tuple(out)


_NO_FILE = 0xFFFFFFFF  # pack_reload: no config file (the embedded default)


def pack_reload(config: bytes | None, pem: PEM) -> bytes:
    """A worker's reload: the config bytes the master loaded (None: no file) and the PEM
    pair, so every process runs what the master read (workers may not read the file)."""
    head = struct.pack("!I", _NO_FILE if config is None else len(config))
    return head + (config or b"") + pack_pem(pem)


def message_fd(data: bytes) -> int:
    """A memory file (memfd) holding `data`, read from its start: what a message too large
    for one datagram travels in (a reload: the config file may be larger than the
    socketpair's send buffer, net.core.wmem_max, ~416 KiB on a stock kernel). The caller
    owns the descriptor."""
    fd = os.memfd_create("authrelay-reload", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int) -> bytes:
    """All of a message_fd() file (from offset 0; the descriptor is left open)."""
    size = os.fstat(fd).st_size
    parts: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def unpack_reload(data: bytes) -> tuple[bytes | None, PEM]:
    (n,) = struct.unpack("!I", data[:4])
    if n == _NO_FILE:
        return None, unpack_pem(data[4:])
    if len(data) < 4 + n:
        raise ValueError("truncated reload message")
    return data[4:4 + n], unpack_pem(data[4 + n:])


def watch(loop: Any, sock: socket.socket,
          on_message: Callable[[bytes, bytes, list[int]], None],
          on_gone: Callable[[], None]) -> None:
    """Call on_message(kind, payload, fds) for each message on the event loop (it owns the
    descriptors); on_gone at end of file."""
    sock.setblocking(False)

    def readable() -> None:
        try:
            kind, payload, fds = recv_with_fds(sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            kind, payload, fds = b"", b"", []
        if not kind:
            loop.remove_reader(sock.fileno())
            on_gone()
            return
        on_message(kind, payload, fds)

    loop.add_reader(sock.fileno(), readable)


# --------------------------------------------------------------------------- key helper

class HelperGone(OSError):
    """The key helper died (kill -9, the OOM killer): nothing it reads can be read again
    until a restart (the master runs without the privileges to start another)."""


class KeyHelper:
    """The root process that reads the certificate and key (see the module docstring)."""

    def __init__(self, config_path: str | None, close: list[socket.socket] | None = None,
                 log_file: str | None = None, owner: tuple[int, int] | None = None) -> None:
        self.channel = Channel()
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            sock = self.channel.in_child([])
            code = 0
            try:
                arm_child(master_pid)
                set_name("authrelay-keys")
                for s in close or ():  # the listening sockets: never in this process
                    s.close()
                _helper_main(sock, config_path, log_file, owner)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        self.pid = pid
        self._lock = threading.Lock()
        self.channel.in_master()
        self.sock = self.channel.master

    def gone(self) -> HelperGone:
        return HelperGone(f"key helper {self.pid} is gone (it died; see the maillog): "
                          "restart authrelay to read root-only files again")

    def _ask(self, kind: bytes, payload: bytes = b"") -> tuple[bytes, bytes]:
        # One request at a time: the SIGHUP reload and delivery threads share the socket.
        with self._lock:
            self.sock.settimeout(30)
            try:
                send(self.sock, kind, payload)
                answer = recv(self.sock)
            except ConnectionError:  # it died: 'Broken pipe' named nothing
                raise self.gone() from None
        if not answer[0]:
            raise self.gone()
        return answer

    def read_pem(self) -> PEM:
        """Blocking request (a few ms): the PEM pairs, or TLSConfigError."""
        from authrelay.tls import TLSConfigError

        try:
            kind, payload = self._ask(b"K")
        except HelperGone as e:
            raise TLSConfigError(str(e)) from None
        except OSError as e:
            raise TLSConfigError(f"key helper: {e}") from None
        if kind == b"K":
            return unpack_pem(payload)
        if kind == b"E":
            raise TLSConfigError(payload.decode("utf-8", "replace"))
        raise TLSConfigError(f"key helper: unexpected answer {kind!r}")

    def open_log(self) -> int:
        """The maillog file opened (created if logrotate renamed it) by root for the
        dropped user, as a descriptor the caller owns; OSError on failure."""
        with self._lock:
            self.sock.settimeout(30)
            try:
                send(self.sock, b"L")
                kind, payload, fds = recv_with_fds(self.sock)
            except ConnectionError:
                raise self.gone() from None
        if kind == b"L" and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        if kind == b"E":
            raise OSError(payload.decode("utf-8", "replace"))
        raise self.gone()

    def read_config(self) -> bytes:
        """The config file's bytes read as root (blocking), for a reload by processes
        that dropped privileges and may not read it (0600 root: it holds a password);
        OSError on failure, with the reason (a config that does not load included)."""
        kind, payload = self._ask(b"C")
        if kind == b"C":
            return payload
        if kind == b"E":
            raise OSError(payload.decode("utf-8", "replace"))
        raise self.gone()

    def read_password(self) -> str:
        """relay.smart_host_password_file read as root (blocking); OSError on failure."""
        kind, payload = self._ask(b"P")
        if kind == b"P":
            return payload.decode("utf-8", "replace")
        if kind == b"E":
            raise OSError(payload.decode("utf-8", "replace"))
        raise self.gone()

    def read_oauth_secret(self, host: str = "") -> bytes:
        """The OAuth secret_file (or key_file) of the [[relay.smart_host_oauth]] table for
        `host` ("": [relay] smart_host_oauth_secret_file or _key_file) read as root
        (blocking); OSError on failure. The helper reads only what its own copy of the
        config names for that host."""
        kind, payload = self._ask(b"O", host.encode("utf-8"))
        if kind == b"O":
            return payload
        if kind == b"E":
            raise OSError(payload.decode("utf-8", "replace"))
        raise self.gone()

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)


_MAX_CONFIG = 1 << 20  # bytes of a config file the helper hands out (a sane bound)


def _helper_main(sock: socket.socket, config_path: str | None, log_file: str | None,
                 owner: tuple[int, int] | None) -> None:  # pragma: no cover
    # Runs as root for the life of the instance: keep it small. A SIGHUP meant for the
    # master (pkill -HUP authrelay) must not kill it; SIGTERM/SIGINT are left to the master
    # (the helper ends when the master's end of the socket closes).
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    from authrelay.config import ConfigError, find_config_path, load, read_config_bytes
    from authrelay.tls import TLSConfigError, read_pem

    # The secrets (P, O) are those the running config names: the config at start, then
    # the file as loaded for each reload's key request (K: asked once the master has
    # parsed the file, the last step that can refuse it). Loading the file per request
    # read whatever it said at that moment: a file being edited, or one whose reload had
    # been refused, sent its password to the running smart host, or none at all (every
    # delivery deferred while the running config was still whole).
    running = None
    with contextlib.suppress(ConfigError, OSError):
        running = load(find_config_path(config_path))
    sock.setblocking(True)
    while True:
        kind, arg = recv(sock)
        if not kind:
            return
        try:
            if kind == b"L":
                # The log file fixed at start (not re-read from the config): opened, and
                # created after a logrotate rename, for the dropped user.
                if not log_file or owner is None:
                    raise OSError("no log file to open")
                fd = open_log_file(log_file, owner)
                try:
                    send_fd(sock, b"L", fd)
                finally:
                    os.close(fd)
                continue
            if kind not in (b"K", b"P", b"O", b"C"):
                raise TLSConfigError("unknown request")
            path = find_config_path(config_path)
            _check_trusted(path)
            cfg = running if kind in (b"P", b"O") and running is not None else load(path)
            if kind == b"C":  # the file the master runs on (it had it at start)
                if path is None:
                    raise OSError("no config file")
                try:
                    data = read_config_bytes(path, _MAX_CONFIG)  # a regular file only
                except OSError as e:
                    raise OSError(f"{path}: {e.strerror or e}") from None
                send(sock, b"C", data)
            elif kind == b"K":
                send(sock, b"K", pack_pem(read_pem(cfg)))
                running = cfg  # a reload: the secrets are this file's from now on
            elif kind == b"O":  # an OAuth client secret or signing key (delivery/oauth.py)
                host = arg.decode("utf-8", "replace")
                settings = next((t for t in cfg.relay.smart_host_oauth if t.host == host),
                                None) if host else cfg.relay.oauth_for("")
                if settings is None:
                    raise OSError(f"no OAuth settings for smart host {host!r} in the config")
                send(sock, b"O", _read_secret(settings.secret_file or settings.key_file))
            else:
                send(sock, b"P", _read_secret(cfg.relay.smart_host_password_file))
        except (ConfigError, TLSConfigError, OSError) as e:
            send(sock, b"E", str(e).encode("utf-8", "replace")[:4000])
        except Exception as e:  # never die on a request: the master keeps its old state
            send(sock, b"E", f"key helper: {type(e).__name__}: {e}".encode()[:4000])


def _check_trusted(path: str | None) -> None:  # pragma: no cover - runs in the helper
    """The helper reads, as root, files the config names: only a config that the
    unprivileged processes cannot rewrite (owned by root, not group/other-writable)."""
    from authrelay.tls import TLSConfigError

    if path is None:
        return  # the embedded default names files under the state dir only
    st = os.stat(path)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise TLSConfigError(
            f"{path}: the key helper reads root-only files only for a config owned by root "
            f"and not writable by group/others (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o7777:04o})")


def _read_secret(path: str) -> bytes:  # pragma: no cover - runs in the helper
    if not path:
        return b""
    with open(path, "rb") as f:
        return f.read(64 * 1024).rstrip(b"\r\n")
