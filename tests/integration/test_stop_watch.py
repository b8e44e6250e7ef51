"""The stop watcher (stopdeadline.watch, 58ed433) takes only a real SIGTERM/SIGINT: a
worker paused (SIGSTOP) longer than SIGNAL_POLL and continued (SIGCONT), as an admin or
a debugger pauses a process, goes on serving. CPython's sigtimedwait returns an unfilled
siginfo when its wait is interrupted past the timeout, which the watcher took for a
SIGTERM: the worker stopped itself (seen in test_natconn's full hand-off inbox test,
whose worker is SIGSTOPped for a while: 'daemon=stopping' with no signal sent)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from relayproc import RelayProcess, children
from smtpclient import RawClient

from authrelay.stopdeadline import SIGNAL_POLL

pytestmark = pytest.mark.slow


def test_a_worker_paused_and_continued_goes_on_serving(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({}, workers=2)
    assert r.proc is not None
    workers = children(r.proc.pid)
    assert len(workers) == 2
    victim = workers[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        time.sleep(SIGNAL_POLL * 4)  # time under test: the watcher's wait runs out while paused
    finally:
        os.kill(victim, signal.SIGCONT)
    time.sleep(SIGNAL_POLL * 4)  # time under test: a stop would have begun by now
    assert "daemon=stopping" not in r.maillog(0)
    assert children(r.proc.pid) == workers
    for _ in range(6):  # the kernel spreads connections over both workers: each answers
        c = RawClient(r.ports["submission"], timeout=10)
        assert c.reply().code == 220
        c.close()
