"""The bound on a stop: a process of `serve` has exited a fixed time after its SIGTERM,
whatever it was still waiting for.

A stop waits for sessions, local submissions and deliveries up to `shutdown_timeout`, for
saved outcomes up to `scheduler.STOP_SAVE_WAIT`, for the workers up to `STOP_OVERRUN`
more. What it cannot bound itself is a thread (or the main thread) waiting on a disk that
takes no writes: a frozen filesystem (fsfreeze: a backup's, a VM snapshot's) holds every
write, unlink and fsync until the thaw, and Python's exit joins the threads that wait
there (`asyncio.run`'s default executor, the pools'). Past its deadline the process says
what it could not finish (one maillog error line naming the threads still running) and
ends with `os._exit(1)`.

The deadline starts at the SIGTERM even when the event loop cannot take it: a loop already
held in the kernel (an unlink, a write on a frozen filesystem) never runs its signal
handler, and the kernel leaves the signal pending on that held thread. A watcher thread
(`watch`) takes such a signal off the process's pending set within SIGNAL_POLL and starts
the stop from there.

Contract: nothing acknowledged is lost by that exit (a 250 goes only after its file's
fsync; a commit cut by it sent none, and its file, never made ready, is removed by the
next start's sweep). A thread held inside the frozen filesystem cannot be ended by anyone
(not even SIGKILL): the kernel keeps the process in its table, killed, running nothing
more, until the thaw; its sockets other than the listeners (closed first) and its instance
lock are let go of then.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

# Seconds past shutdown_timeout a receiving worker may take to end (a session cancelled at
# shutdown_timeout gets 5 s to write its 421; the stores close); the master kills a worker
# still there then (SIGKILL) and ends itself STOP_OVERRUN later again.
STOP_OVERRUN = 10.0
# Seconds a stop waits for one change of its on the disk (a socket's unlink, a database's
# close): a frozen filesystem holds it until the thaw, and the stop goes on without it.
DISK_WAIT = 1.0
# Seconds between a stop watcher's looks for a SIGTERM/SIGINT still pending on the process
# (its event loop's thread held in the kernel): the deadline starts at most this late.
SIGNAL_POLL = 0.5
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

_armed: int | None = None  # the pid whose deadline runs (a fork starts unarmed)


def deadline(shutdown_timeout: float, role: str) -> float:
    """Seconds from SIGTERM to the forced exit: a worker's first, the master's (or the
    single process's, which saves its deliveries' outcomes too) one STOP_OVERRUN later, so
    that nothing of the instance is left running after the master."""
    return shutdown_timeout + STOP_OVERRUN * (1 if role == "worker" else 2)


def still_running() -> str:
    """The threads this process still runs besides the caller's, by name, counted."""
    me = threading.current_thread()
    names = Counter(re.sub(r"_\d+$", "", t.name) for t in threading.enumerate()
                    if t is not me and t.is_alive())
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(names.items())) or "none"


def arm(seconds: float, say: Callable[[str], None], flush: Callable[[], None]) -> None:
    """From now, `seconds` until the process ends: then `say` the line naming what it
    could not finish, `flush` the log (bounded by its caller) and exit 1. A daemon timer
    thread: a process that ends first ends it too; it runs while the main thread waits in
    the kernel. Once per process: a second call (the watcher's, then the loop's) is none."""
    global _armed
    if _armed == os.getpid():
        return
    _armed = os.getpid()

    def expire() -> None:
        try:
            say(f"stop not finished {seconds:g} s after SIGTERM, still running: "
                f"{still_running()} (waiting on a disk that takes no writes? a frozen "
                "filesystem); exiting now: every message answered 250 is on disk, a "
                "commit cut here got no 250")
            flush()
        finally:
            os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.name = "stop-deadline"
    timer.daemon = True
    timer.start()


async def off_loop(work: Callable[[], None], name: str, timeout: float) -> bool:
    """Run `work` (a change on the disk a stop makes) in a daemon thread of its own and
    wait for it up to `timeout`: True when it finished. Never the event loop's thread nor
    the default executor's (joined at exit): on a frozen filesystem it waits for the
    thaw, and the stop goes on without it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            work()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=run, name=name, daemon=True).start()
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return False
    return True


async def unlink(paths: Iterable[Path], name: str) -> None:
    """Remove a stopping server's socket paths (missing ones are no error), waiting up to
    DISK_WAIT: on a frozen filesystem they go at the thaw (or the next start does it)."""
    todo = list(paths)

    def work() -> None:
        for p in todo:
            with contextlib.suppress(OSError):
                os.unlink(p)

    await off_loop(work, name, DISK_WAIT)


def watch(on_stop: Callable[[], None]) -> None:
    """From now, a SIGTERM or SIGINT that this process's event loop has not taken is taken
    by a daemon thread, which calls `on_stop` (it must arm() the deadline first and be
    safe off the loop: the loop may be held in the kernel for good) and ends.

    The kernel marks a process's signal for its main thread when that thread blocks none:
    held in an uninterruptible wait (a write to a frozen filesystem) it never returns to
    run the handler, and the signal stays pending. The watcher dequeues a pending one
    every SIGNAL_POLL (sigtimedwait); when the loop runs, its handler takes the signal
    first, and the watcher only in the instant between the signal and the handler: either
    way the stop starts once."""

    def run() -> None:
        # CPython's sigtimedwait returns a siginfo it never filled (not None) when the
        # wait is interrupted past its timeout: a SIGSTOP held longer than SIGNAL_POLL
        # then SIGCONT (an admin's pause, a debugger), or another handler's signal run
        # in this thread. Only a stop signal's own siginfo stops the process.
        while True:
            got = signal.sigtimedwait(STOP_SIGNALS, SIGNAL_POLL)
            if got is not None and got.si_signo in STOP_SIGNALS:
                break
        on_stop()

    threading.Thread(target=run, name="stop-watch", daemon=True).start()
