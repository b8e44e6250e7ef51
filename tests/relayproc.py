"""A real authrelay process for tests: config in a temp dir, free loopback ports, users.

Used by the integration and dialog tests; speaks to the server only over real sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from support.ports import free_port
from support.wait import DEADLINE, wait_until

from authrelay.importer import toml_value

PASSWORD = "correct horse battery"
# The spools (device, inode) of the servers this test process started: their books in
# /dev/shm are removed when the session ends (forget_books).
_STARTED: set[tuple[int, int]] = set()
T = TypeVar("T")


def to_toml(data: dict[str, Any]) -> str:
    out: list[str] = []
    tables = []
    for k, v in data.items():
        if isinstance(v, dict) or isinstance(v, list) and v and isinstance(v[0], dict):
            tables.append((k, v))
        else:
            out.append(f"{k} = {toml_value(v)}")
    for k, v in tables:
        if isinstance(v, dict):
            out.append(f"\n[{k}]")
            out += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
        else:
            for item in v:
                out.append(f"\n[[{k}]]")
                out += [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(out) + "\n"


class RelayProcess:
    """`authrelay serve` in a subprocess with its own state dir and ports."""

    def __init__(self, tmp: Path, overrides: dict[str, Any] | None = None,
                 users: dict[str, str] | None = None, workers: int = 1) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.ports = {"smtp": free_port(), "submission": free_port(),
                      "submissions": free_port()}
        cfg: dict[str, Any] = {
            "hostname": "relay.test",
            "state_dir": str(self.state),
            "workers": workers,
            "listen": [{"address": f"127.0.0.1:{p}", "mode": m} for m, p in self.ports.items()],
            # Tests never reach the outside: by default delivery goes to a loopback port
            # where nothing listens, so mail stays queued (deferred) for inspection.
            "relay": {"local_domains": ["local.test"], "smart_host": [f"127.0.0.1:{free_port()}"],
                      "smart_host_tls": "none"},
            "delivery": {"retry": ["1h"]},
            "auth": {"failure_delay": 0.1},
        }
        for k, v in (overrides or {}).items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        self.config_data = cfg
        self.config = tmp / "authrelay.toml"
        self.config.write_text(to_toml(cfg))
        self.log = tmp / "maillog.txt"
        self.users = users if users is not None else {"alice": PASSWORD}
        self.proc: subprocess.Popen[bytes] | None = None
        # The interpreter that runs `serve` and the CLI (tests/privpython.py makes one an
        # unprivileged user can run, for the privilege-drop tests).
        self.python = sys.executable

    def cli(self, *args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, "-m", "authrelay", "-c", str(self.config), *args],
            input=input, capture_output=True, text=True, check=check, timeout=60,
        )

    def start(self, extra_args: tuple[str, ...] = (), nofile: int | None = None
              ) -> RelayProcess:
        """Run `serve`; `nofile`: its RLIMIT_NOFILE (soft and hard), to test fd limits."""
        for name, pw in self.users.items():
            if name not in self.cli("user", "list").stdout.split():
                self.cli("user", "add", name, "--password-stdin", input=pw + "\n")
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.python, "-m", "authrelay", "-c", str(self.config), "serve", *extra_args],
            stdout=logf, stderr=subprocess.STDOUT,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        try:
            self.wait_ready()
        except BaseException:
            self.kill()  # never leave a server behind a failed start
            raise
        with contextlib.suppress(OSError):
            st = os.stat(self.state / "spool")
            _STARTED.add((st.st_dev, st.st_ino))
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        # the end lines of the probes below, in the text and the JSON log format
        peer = "from unknown [127.0.0.1]"
        probe_ends = (f"disconnect={peer}", f"tls_failed={peer}",
                      f'"disconnect": "{peer}"', f'"tls_failed": "{peer}"')
        earlier = self._count(probe_ends)  # a restart's maillog holds the last run's probes
        for port in self.ports.values():
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"authrelay exited: {self.log.read_text()[-3000:]}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("authrelay did not start listening") from None
                    time.sleep(0.05)
        # A probe above is answered by whichever worker is up (the kernel queues one for
        # a worker not yet forked): wait until the master has forked them all, so a test
        # listing them (children) sees every worker a connection may land in. Bounded, not
        # required: a test of workers that die at start (a crash loop) goes on without.
        nworkers = int(self.config_data.get("workers", 1))
        forked = time.monotonic() + 5.0
        proc = self.proc
        assert proc is not None
        while nworkers > 1 and len(children(proc.pid)) < nworkers \
                and time.monotonic() < forked and proc.poll() is None:
            time.sleep(0.05)
        # The probes above hold connection slots until the server has seen them close;
        # wait for their end lines so a test's own connections find every slot free. A
        # probe of a proxy_protocol listener ends before admission (no PROXY header: a
        # health check), so it holds no slot and leaves no line.
        proxied = {int(str(ln["address"]).rsplit(":", 1)[1])
                   for ln in self.config_data.get("listen", []) if ln.get("proxy_protocol")}
        expected = sum(1 for port in self.ports.values() if port not in proxied)
        settle = time.monotonic() + 5.0
        while time.monotonic() < settle:
            if self._count(probe_ends) - earlier >= expected:
                break
            time.sleep(0.05)

    def _count(self, lines: tuple[str, ...]) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return sum(text.count(e) for e in lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def reload(self, changes: dict[str, Any], processes: int = 1) -> None:
        """Rewrite the config with `changes` (top-level keys replaced whole), SIGHUP the
        server and wait for `processes` more `daemon=reloaded` lines (1 per process)."""
        self.config_data = {**self.config_data, **changes}
        self.config.write_text(to_toml(self.config_data))
        before = self.maillog().count("daemon=reloaded")
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)
        self.wait_for(lambda: self.maillog().count("daemon=reloaded") >= before + processes,
                      what="the reload")

    def maillog(self, settle: float = 0.05) -> str:
        """The maillog so far. The server writes it from a background thread, so a line
        may land a moment after the reply a test just saw: read until it stops growing."""
        text = self.log.read_text(errors="replace")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            time.sleep(settle)
            again = self.log.read_text(errors="replace")
            if again == text:
                break
            text = again
        return text

    @property
    def queue_dir(self) -> Path:
        return self.state / "spool" / "queue"

    def queued(self) -> list[Path]:
        d = self.queue_dir
        if not d.exists():
            return []
        return sorted(p for p in d.iterdir() if "." not in p.name)

    def nothing_stored(self, timeout: float = 10.0) -> bool:
        """True once queue/ holds no file: after a message refused at its end-of-data
        dot. Its file is made by a commit thread while the body arrives (spool/writer.py
        Incoming.create_early); a refusal before that thread has made it leaves the
        removal to the thread, so the file may exist for the moment between its create
        and its removal, just after the reply (seen: 1 run in a suite). Waits for that;
        fails when a file stays."""
        self.wait_for(lambda: self.queued() == [], timeout,
                      what="queue/ empty: the refused message's file removed")
        return True

    def unready(self) -> list[Path]:
        """Files in queue/ or hold/ without the ready mark (owner-execute, set at commit):
        a message being received, or one whose receive failed and was not cleaned up.
        After a refused or aborted message, and after a clean stop, there are none."""
        out = []
        for d in (self.queue_dir, self.state / "spool" / "hold"):
            if d.exists():
                out += [p for p in d.iterdir()  # ID.state files carry no ready mark
                        if p.is_file() and "." not in p.name
                        and not p.stat().st_mode & stat.S_IXUSR]
        return sorted(out)

    def message_bytes(self, path: Path) -> bytes:
        """The stored message (after the spool header)."""
        from authrelay.spool.format import split

        return split(path.read_bytes())[1]

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.state / "tls" / "cert.pem"))
        ctx.check_hostname = False
        return ctx

    def wait_for(self, pred: Callable[[], T], timeout: float = DEADLINE,
                 what: str = "condition") -> T:
        """Poll `pred` until truthy (its value is returned); at the deadline fail naming
        `what`, with the tail of this relay's maillog."""
        return wait_until(pred, lambda: f"{what}\n--- maillog ---\n{self._tail()}", timeout,
                          interval=0.05)

    def wait_log(self, pattern: str, timeout: float = 30.0) -> str:
        """The first maillog line matching `pattern` (a regex), once it is written."""
        rx = re.compile(pattern)

        def first() -> str | None:
            return next((ln for ln in self.maillog(settle=0.01).splitlines()
                         if rx.search(ln)), None)

        line = self.wait_for(first, timeout, what=f"a maillog line matching {pattern!r}")
        assert line is not None
        return line

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


# --------------------------------------------------------------------------- processes

def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live process; None when gone. A zombie counts as gone: it holds
    no socket and waits only for its (new) parent to reap it."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    state, ppid = fields[0], int(fields[1])
    return None if state in ("Z", "X") else (state, ppid)


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[1] == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    return _stat(pid) is not None


def processes_running(config: Path) -> list[int]:
    """Every live process whose command line names this config file."""
    out = []
    needle = str(config).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmd.split(b"\0") and alive(int(d.name)):
                out.append(int(d.name))
    return out


def refuses(port: int, host: str = "127.0.0.1") -> bool:
    """True when a TCP connection to the port is refused (nothing listens)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def forget_books() -> list[Path]:
    """Remove the books in /dev/shm (owedlines.py, spool/abandoned.py: named by the
    spool's device and inode) of the servers this test process started, except one a live
    process maps; returns those removed. A server killed -9 leaves its books for its next
    start, and a suite's kill tests left hundreds (each (workers + 1) x ~340 KiB of
    memory); called at the session's end (tests/conftest.py)."""
    mapped: set[str] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                mapped.update(ln.split(None, 5)[5] for ln in
                              (d / "maps").read_text(errors="replace").splitlines()
                              if "/dev/shm/authrelay-" in ln and len(ln.split(None, 5)) == 6)
    gone = []
    for dev, ino in _STARTED:
        for book in Path("/dev/shm").glob(f"authrelay-*-{dev:x}-{ino:x}"):
            if str(book) not in mapped:
                book.unlink(missing_ok=True)
                gone.append(book)
    return gone
