"""Eviction across the workers of a node (smtpd/eviction.py, smtpd/admission.py): the
marks kept in the shared table (policy/counters.py) and one eviction per newcomer.
Real shared memory (a forked worker writes, the parent reads), a real Acceptor with the
shared throttle two workers use, real sockets."""

from __future__ import annotations

import os

from authrelay.policy.counters import MARK_WAYS, SharedCounters
from authrelay.smtpd.eviction import PRESSED_AFTER, Candidates


def _in_child(fn: object) -> None:
    """Run `fn` in a forked process (another worker) and wait for it."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()  # type: ignore[operator]
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_address_refused_by_one_worker_is_knocking_at_another() -> None:
    """The refusals that mark a flood's address were counted in each worker: with two
    workers an address had to be refused twice at the same one before any saw it knocking
    or under pressure (measured: a 3,000-address flood through PROXY headers, 2 workers:
    5 of 16 real logins refused 421 4.7.0 in its first seconds). Refused once in each of
    two workers, it is knocking and under pressure in both; one that logged in at a
    third is neither, everywhere."""
    table = SharedCounters(slots=4096, workers=2)
    here = Candidates(table)
    _in_child(lambda: Candidates(table).refused("198.51.100.7", 10.0))
    here.refused("198.51.100.7", 10.5)
    assert here.knocking("198.51.100.7", 11.0)
    assert here.under_pressure("198.51.100.7", 11.0)
    _in_child(lambda: Candidates(table).refused("198.51.100.8", 10.0))
    assert not here.knocking("198.51.100.8", 11.0)  # once: may be a client's retry
    _in_child(lambda: Candidates(table).relieve("198.51.100.7", 11.5))
    assert not here.knocking("198.51.100.7", 12.0)
    assert not here.under_pressure("198.51.100.7", 12.0)


def test_the_shared_marks_keep_a_users_entry_and_tell_addresses_apart() -> None:
    """Bounded (MARK_WAYS entries a bucket): a flood's addresses push out one another's
    marks, not a user's; and no address ever reads another's marks."""
    table = SharedCounters(slots=MARK_WAYS, workers=1)  # one bucket: all collide
    cs = Candidates(table)
    cs.relieve("user", 1.0)
    for i in range(50):
        for t in range(PRESSED_AFTER):
            cs.refused(f"flood{i}", 2.0 + i + t / 10)
    assert table.mark_get("user") == (0, 0.0, 0, 1.0)
    assert cs.knocking("flood49", 52.0)
    assert table.mark_get("flood0") is None  # pushed out by the later ones
    assert not cs.knocking("someone", 52.0)
