"""maillog: the operator's audit trail, one line per event, queue id first.

Owns the stable log format admins grep and fail2ban parses. Text lines look like
sendmail/Postfix maillog lines:

    2N53XR3DNR: from=<a@x>, size=812, nrcpts=1, relay=laptop [192.0.2.7], auth=alice

JSON lines carry the same fields as keys. Contract: never raises into the caller (a full
disk must not fail a session), never logs an AUTH payload or password: callers pass only
the fields below, and values are sanitised of CR/LF so a client cannot forge log lines.
Targets: stdout, stderr, file:PATH (reopened on SIGHUP for logrotate), syslog (mail facility).
Lines are handed to a writer thread (one per process, started lazily so forked workers get
their own): a write to a log file on a busy filesystem can wait behind a journal commit,
and that wait must never stall the event loop. The thread writes whatever has queued up
in one system call, and `flush()` (called at exit and on stop) waits until all is written.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import sys
import threading
import time
from typing import Any, TextIO

NOQUEUE = "NOQUEUE"

# getpid() is a system call on current glibc; a log line needs it twice. Cache it per
# process (reset in every forked child).
_pid = os.getpid()


def _reset_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)


def _clean(value: Any) -> str:
    s = str(value)
    if any(c in s for c in "\r\n\x00"):
        s = s.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0")
    return s


class MailLog:
    def __init__(self, target: str = "stdout", fmt: str = "text", ident: str = "authrelay"):
        self.target = target
        self.fmt = fmt
        self.ident = ident
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        self._syslog: Any = None
        self._q: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._open()
        atexit.register(self.flush)

    def _open(self) -> None:
        if self.target == "stdout":
            self._fh = sys.stdout
        elif self.target == "stderr":
            self._fh = sys.stderr
        elif self.target.startswith("file:"):
            path = self.target[5:]
            self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115  (flushed per batch)
        elif self.target == "syslog":
            import syslog

            syslog.openlog(self.ident, syslog.LOG_PID, syslog.LOG_MAIL)
            self._syslog = syslog
        else:
            self._fh = sys.stdout

    def reopen(self) -> None:
        """SIGHUP: reopen a file target so logrotate's rename takes effect."""
        with self._lock:
            if self.target.startswith("file:") and self._fh is not None:
                try:
                    self._fh.close()
                except OSError:
                    pass
                self._open()

    def event(self, queue_id: str | None, **fields: Any) -> None:
        """One line: `QID: k=v, k=v`. Keys with value None are left out."""
        qid = queue_id or NOQUEUE
        items = [(k, v) for k, v in fields.items() if v is not None]
        try:
            if self.fmt == "json":
                rec: dict[str, Any] = {"ts": round(time.time(), 6), "queue_id": qid}
                for k, v in items:
                    rec[k] = v if isinstance(v, int | float | bool) else _clean(v)
                line = json.dumps(rec, ensure_ascii=False)
            else:
                body = ", ".join(f"{k}={_clean(v)}" for k, v in items)
                line = f"{qid}: {body}"
            self._emit(line)
        except Exception:  # the audit log must never break mail flow
            pass

    def _emit(self, line: str) -> None:
        if self._syslog is not None:
            self._syslog.syslog(self._syslog.LOG_INFO, line)
            return
        if self.fmt == "text":  # syslog adds its own stamp; files and stdout need one
            line = f"{self._stamp()} {self.ident}[{_pid}]: {line}"
        if self._thread is None or self._pid != _pid:
            self._start_thread()
        self._q.put(line + "\n")  # the only cost on the event loop

    _stamp_cache: tuple[int, str] = (0, "")

    def _stamp(self) -> str:
        now = int(time.time())
        if self._stamp_cache[0] != now:
            self._stamp_cache = (now, time.strftime("%b %d %H:%M:%S", time.localtime(now)))
        return self._stamp_cache[1]

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            # After fork the parent's thread does not exist here: start our own.
            self._q = queue.SimpleQueue()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._writer, name="maillog", daemon=True)
            self._thread.start()

    def _writer(self) -> None:
        q = self._q
        while True:
            batch = [q.get()]
            # Let a burst gather (a few ms) so a busy server writes many lines per system
            # call and wakes this thread less often; the loop thread never waits for it.
            time.sleep(_GATHER)
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            lines = [b for b in batch if isinstance(b, str)]
            try:
                if lines:
                    with self._lock:
                        assert self._fh is not None
                        self._fh.write("".join(lines))
                        self._fh.flush()
            except Exception:  # a full disk must not kill the writer
                pass
            for b in batch:
                if isinstance(b, threading.Event):
                    b.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every line queued so far is written (exit, stop)."""
        if self._thread is None or self._pid != os.getpid():
            return
        done = threading.Event()
        self._q.put(done)
        done.wait(timeout)


_GATHER = 0.005


_current: MailLog | None = None


def configure(target: str = "stdout", fmt: str = "text") -> MailLog:
    global _current
    _current = MailLog(target, fmt)
    return _current


def get() -> MailLog:
    """The process-wide maillog (stdout text until configured)."""
    global _current
    if _current is None:
        _current = MailLog()
    return _current
