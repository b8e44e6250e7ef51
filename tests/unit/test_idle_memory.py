"""Memory an idle connection holds in the receiving process (bench scenario (f): 10,000
idle connections), measured with tracemalloc on a real in-process SMTPServer (uvloop, as
`serve` runs it) serving real loopback sockets that were greeted and then say nothing."""

from __future__ import annotations

import socket
import time
import tracemalloc
from pathlib import Path

import pytest
from support.inproc import uvloop_relay
from support.ports import free_port

from authrelay.config import from_dict
from authrelay.smtpd import protocol

N = 300
# Python heap per idle connection (uvloop transport, Connection, Session, Engine, Ticket,
# the session task, its timers). 10.6 KB before the Engine got __slots__ and the finished
# accept task was let go (issue 22), 7.8 KB after; the bound leaves room for noise.
BOUND = 9000


def test_engine_has_no_instance_dict() -> None:
    cfg = from_dict({"hostname": "m.test"})
    eng = protocol.Engine(cfg, mode="smtp")
    assert not hasattr(eng, "__dict__")
    eng.greet()
    assert eng.data_to_send().startswith(b"220 m.test ESMTP")


@pytest.mark.slow
def test_idle_connection_memory_is_bounded(tmp_path: Path) -> None:
    port = free_port()
    cfg = from_dict({
        "hostname": "mem.test", "state_dir": str(tmp_path),
        "listen": [{"address": f"127.0.0.1:{port}", "mode": "smtp"}],
        "limits": {"connection_rate_per_ip": 0, "max_connections_per_ip": 2 * N,
                   "max_connections": 2 * N},
    })
    t = uvloop_relay(cfg, tmp_path)
    srv = t.start()
    socks: list[socket.socket] = []
    tracemalloc.start(8)
    try:
        # one connection first, so one-off allocations (first accept) are not counted
        warm = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert warm.recv(512).startswith(b"220")
        # the client's sockets exist before the first snapshot: only the server's side of
        # each connection is counted
        socks = [socket.socket() for _ in range(N)]
        time.sleep(0.2)
        before = tracemalloc.take_snapshot()
        for s in socks:
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
        for s in socks:
            assert s.recv(512).startswith(b"220")
        deadline = time.monotonic() + 10
        while len(srv.sessions) < N + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # every session is waiting for its first command
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        for s in socks:
            s.close()
        warm.close()
        t.stop()
    mine = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename")
    per_conn = sum(d.size_diff for d in diff) / N
    top = sorted(diff, key=lambda d: -d.size_diff)[:8]
    assert per_conn < BOUND, (per_conn, [str(d) for d in top])
