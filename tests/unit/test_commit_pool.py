"""spool/writer.CommitPool: a job wakes the one thread that runs it.

Idle pool threads blocked together in one `queue.SimpleQueue.get()` woke each other:
the getter that took a job released the queue's lock on its way out, which woke a second
idle thread, which competed for the GIL with the first (before its write and fsync) only
to find the queue empty and sleep again: two thread wake-ups per commit instead of one,
on the dot-to-250 path (docs/PERFORMANCE.md, session 28)."""

from __future__ import annotations

import functools
import threading

from authrelay.spool import writer as writer_mod

JOBS = 60


def _voluntary_switches(tid: int) -> int:
    """The voluntary context switches (times it blocked) of this thread so far."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


async def test_a_job_wakes_only_the_thread_that_runs_it() -> None:
    pool = writer_mod.CommitPool(size=4)
    together = threading.Barrier(5)
    held = [pool.run(lambda: (together.wait(10), threading.get_native_id())[1])
            for _ in range(4)]  # four threads, each running one job at the same time
    together.wait(10)
    tids = [await f for f in held]
    assert len(set(tids)) == 4
    for _ in range(10):  # every thread back to idle, blocked in its wait
        await pool.run(lambda: None)
    before = [_voluntary_switches(t) for t in tids]
    ran: set[int] = set()

    def job() -> None:
        ran.add(threading.get_native_id())

    for _ in range(JOBS):  # one at a time: three threads idle while each runs
        await pool.run(job)
    woke = {t: _voluntary_switches(t) - b for t, b in zip(tids, before, strict=True)}
    # The thread that went idle last runs the next job: with jobs one at a time, one
    # or two threads (the last one may not be back in the idle list when the next job
    # comes) ran them all, and the others slept throughout (at most a block each left
    # over from going idle). A second thread woken per job made every thread run jobs
    # and wake dozens of times.
    slept = [t for t in tids if t not in ran]
    assert len(slept) >= 2, (ran, woke)
    assert sum(woke[t] for t in slept) <= 3, woke


async def test_jobs_queued_while_every_thread_is_busy_all_run_once_one_is_free() -> None:
    pool = writer_mod.CommitPool(size=2)
    gate = threading.Event()
    ran: list[int] = []
    held = [pool.run(lambda: gate.wait(10)) for _ in range(2)]
    queued = [pool.run(functools.partial(ran.append, i)) for i in range(6)]  # none free
    gate.set()
    assert [await f for f in held] == [True, True]
    for f in queued:
        await f
    assert sorted(ran) == list(range(6))
    assert pool._threads == 2
