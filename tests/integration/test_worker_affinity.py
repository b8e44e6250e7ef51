"""`worker_cpu_affinity`: each receiving worker, every thread of it, on a CPU of its own;
the master and the default (off) not pinned."""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest
from relayproc import RelayProcess, children

pytestmark = pytest.mark.slow


def _workers(r: RelayProcess) -> list[int]:
    assert r.proc is not None
    return [p for p in children(r.proc.pid)
            if Path(f"/proc/{p}/comm").read_text().startswith("authrelay-w")]


def _threads_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU set of every thread of `pid`."""
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


def _send(r: RelayProcess) -> None:
    """One message on each of a few connections: the workers' commit and maillog threads
    exist afterwards."""
    for i in range(4):
        with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=10) as s:
            s.sendmail("a@local.test", ["b@local.test"], f"Subject: {i}\r\n\r\nhi\r\n")


def test_each_worker_and_its_threads_stay_on_a_cpu_of_their_own(relay_factory) -> None:  # noqa: ANN001
    ours = frozenset(os.sched_getaffinity(0))  # what the server may use (it inherits ours)
    r: RelayProcess = relay_factory({"worker_cpu_affinity": True}, workers=2)
    _send(r)
    workers = _workers(r)
    assert len(workers) == 2
    sets = [_threads_cpus(p) for p in workers]
    if len(ours) >= 2:
        # every thread of a worker on the worker's one CPU, the two workers on two CPUs
        assert all(len(s) == 1 and len(next(iter(s))) == 1 for s in sets), sets
        assert sets[0] != sets[1]
        assert all(next(iter(s)) <= ours for s in sets)
    else:  # one CPU to run on: nothing to choose, nobody pinned
        assert sets == [{ours}, {ours}]
    assert r.proc is not None
    assert _threads_cpus(r.proc.pid) == {ours}  # the master is not pinned


def test_workers_are_not_pinned_by_default(relay_factory) -> None:  # noqa: ANN001
    ours = frozenset(os.sched_getaffinity(0))
    r: RelayProcess = relay_factory(workers=2)
    _send(r)
    workers = _workers(r)
    assert len(workers) == 2
    assert [_threads_cpus(p) for p in workers] == [{ours}, {ours}]
