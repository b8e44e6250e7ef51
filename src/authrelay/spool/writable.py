"""Whether the spool's filesystem takes a write now, asked with a bound.

A frozen filesystem (fsfreeze: a backup's, a VM snapshot's) makes every write wait for the
thaw, uninterruptibly: a process with a thread waiting there cannot even exit (kill -9
included). An operator's command must not hang on it, so a change of the queue first
probes with a write of no consequence (the spool directory's times) in a process or thread
of its own, and gives up after `PROBE_TIMEOUT` with `NOT_WRITABLE`, nothing changed.
Reads (`queue list`, `show`) need no probe: a frozen filesystem serves them.
Contract: a probe left waiting ends at the thaw by itself; at most one thread per
`ThreadProbe` waits so (later callers share it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

PROBE_TIMEOUT = 5.0  # seconds a write of no consequence may take before "not writable"
NOT_WRITABLE = ("spool not writable (filesystem frozen?): nothing done; try again once "
                "it takes writes")


def _touch(path: Path) -> None:
    """The probe's write: the directory's times (an error, e.g. not ours to touch, is an
    answer all the same: the filesystem did not make us wait)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def writable_forked(path: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """For a short-lived command: the probe in a child process (a thread of ours waiting
    on a frozen filesystem would keep this process from exiting); True when it answered
    within `timeout`. A child still waiting is left to end at the thaw (never waited for)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            # nothing of the command's kept open while it may wait (its caller's pipes
            # would not see their end until the thaw)
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))
            _touch(path)
        finally:
            os._exit(0)
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class ThreadProbe:
    """For a long-lived process (the scheduler): the probe in a thread of its own, one at a
    time; a caller while one is still waiting (the filesystem frozen) shares it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pending: asyncio.Future[None] | None = None

    async def writable(self, timeout: float = PROBE_TIMEOUT) -> bool:
        if self._pending is None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def run() -> None:
                try:
                    _touch(self.path)
                finally:
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(self._done, fut)

            self._pending = fut
            threading.Thread(target=run, name="spool-write-probe", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(self._pending), timeout)
        except TimeoutError:
            return False
        return True

    def _done(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_result(None)
        if self._pending is fut:
            self._pending = None
