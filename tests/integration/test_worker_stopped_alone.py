"""A receiving worker stopped alone (SIGTERM to it, not to the master): the connections
the kernel would have queued at its listening sockets go to the other workers at once,
and the worker forked in its place takes its share again."""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from relayproc import RelayProcess, alive, children
from support.procfs import holder
from support.wait import wait_until

pytestmark = pytest.mark.slow


def _greeted_by(r: RelayProcess, port: int) -> Callable[[], set[int]]:
    """The pids whose maillog says they took a connection on `port`."""
    rx = re.compile(rf"authrelay\[(\d+)\]: NOQUEUE: connect=.*listener=smtp:127\.0\.0\.1:{port}")

    def pids() -> set[int]:
        return {int(m.group(1)) for m in rx.finditer(r.maillog(settle=0.01))}
    return pids


def _greeting(s: socket.socket) -> bytes:
    s.settimeout(60)  # (a hang detector: the wait below bounds the test)
    return s.recv(100)


def test_a_worker_stopped_alone_leaves_no_connection_waiting(tmp_path: Path) -> None:
    """The master keeps each worker's listening sockets for the worker it forks in its
    place, so a worker stopped alone (its sessions given shutdown_timeout) left its
    socket in the SO_REUSEPORT group: about half the new connections were queued there,
    unanswered until it had ended and its replacement ran (seen: 2 workers,
    shutdown_timeout 5 s, 20 of 40 connections greeted after 1.3 to 5.4 s). Now the
    stopping worker answers what its backlog holds (421) and takes the socket out of
    the group: every new connection is greeted by the other worker while it drains; its
    replacement listens on the socket again and takes its share."""
    r = RelayProcess(tmp_path, {"shutdown_timeout": "120s"}, workers=2).start()
    assert r.proc is not None
    port = r.ports["smtp"]
    took = _greeted_by(r, port)
    idle: list[socket.socket] = []
    try:
        first = socket.create_connection(("127.0.0.1", port))
        assert _greeting(first).startswith(b"220")
        idle.append(first)
        # The worker holding it (the connect lines would not say: wait_ready's probe of
        # this port may have been the other's, and a set has no order).
        victim = r.wait_for(lambda: holder(children(r.proc.pid) if r.proc else [],
                                           "127.0.0.1", first.getsockname()[1]),
                            what="the worker holding the first connection")
        os.kill(victim, signal.SIGTERM)  # its idle session holds it up to 120 s
        r.wait_log(rf"authrelay\[{victim}\]: NOQUEUE: daemon=stopping")
        news = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        greetings = [_greeting(s) for s in news]  # (the old code: ~10 of them wait 120 s)
        assert all(g.startswith(b"220") for g in greetings), greetings
        assert alive(victim)  # greeted while it still drains
        for s in news:
            s.close()
        first.close()  # the victim ends; its replacement is forked
        wait_until(lambda: not alive(victim), what="the stopped worker gone")
        fresh = r.wait_for(lambda: set(children(r.proc.pid)) - took() - {victim},
                           what="the replacement forked")

        def replacement_takes_one() -> bool:
            s = socket.create_connection(("127.0.0.1", port))
            idle.append(s)
            assert _greeting(s).startswith(b"220")
            return bool(took() & fresh)

        r.wait_for(replacement_takes_one, what="a connection taken by the replacement")
    finally:
        for s in idle:
            s.close()
        r.stop()
