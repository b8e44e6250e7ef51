"""/health and authrelay_dependency_up on the metrics listener, with a real PostgreSQL,
a real Redis and a real Redis Sentinel the tests start: 200 `ok` while every configured
dependency answers, 503 naming the one that does not (what HAProxy's `option httpchk`
wants), 503 `stopping` while the node drains after SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from scalerig import PostgresServer, RedisSentinel, RedisServer
from smtpclient import RawClient
from support.ports import free_port
from test_metrics import scrape, val

pytestmark = pytest.mark.slow


def health(port: int, query: str = "") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health{query}",
                                    timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _up(r: RelayProcess, port: int) -> None:
    def ok() -> bool:
        try:
            health(port)
            return True
        except OSError:
            return False
    r.wait_for(ok, timeout=20)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    rs = RedisServer().start()
    try:
        yield rs
    finally:
        rs.cleanup()


def test_no_dependencies_ok_then_stopping(relay_factory) -> None:
    """A node without PostgreSQL or Redis: 200 ok; after SIGTERM, while a session still
    drains, 503 stopping; `daemon=stopped` of the master comes after its workers'."""
    port = free_port()
    r = relay_factory(workers=2, overrides={"metrics": {"address": f"127.0.0.1:{port}"},
                                            "shutdown_timeout": "60s"})
    _up(r, port)
    assert health(port) == (200, "ok\n")
    c = RawClient(r.ports["smtp"])
    try:
        assert c.reply().code == 220
        assert c.cmd("EHLO t").code == 250
        assert r.proc is not None
        os.kill(r.proc.pid, signal.SIGTERM)
        r.wait_for(lambda: "daemon=stopping" in r.maillog())
        status, body = health(port)
        assert status == 503 and body.startswith("stopping"), body
        assert c.cmd("QUIT").code == 221
    finally:
        c.close()
    r.proc.wait(timeout=60)
    lines = [ln for ln in r.maillog().splitlines() if "daemon=stopped" in ln]
    assert len(lines) == 3, lines  # two workers, then the master
    master = f"pid={r.proc.pid}"
    assert master in lines[-1] and all(master not in ln for ln in lines[:-1])


@pytest.mark.external
def test_postgresql_down_and_back(tmp_path: Path, postgres: PostgresServer) -> None:
    if not (postgres.data / "postmaster.pid").exists():
        postgres.start()
    port = free_port()
    r = RelayProcess(tmp_path, {"auth": {"backend": "postgresql", "dsn": postgres.dsn},
                                "metrics": {"address": f"127.0.0.1:{port}"}}).start()
    try:
        _up(r, port)
        assert health(port) == (200, "ok\n")
        assert val(scrape(port), "authrelay_dependency_up", dependency="postgresql") == 1
        postgres.stop()
        r.wait_for(lambda: health(port)[0] == 503, timeout=15)
        body = health(port)[1]
        assert body.startswith("postgresql down: ") and postgres.PASSWORD not in body
        assert health(port, "?require=") == (200, f"ok\ndegraded: {body}")
        assert val(scrape(port), "authrelay_dependency_up", dependency="postgresql") == 0
        postgres.start()
        r.wait_for(lambda: health(port) == (200, "ok\n"), timeout=15)
        assert val(scrape(port), "authrelay_dependency_up", dependency="postgresql") == 1
    finally:
        r.stop()
        if not (postgres.data / "postmaster.pid").exists():
            postgres.start()


@pytest.mark.external
@pytest.mark.parametrize("via", ["redis", "sentinel"])
def test_redis_down_and_back(tmp_path: Path, redis_server: RedisServer, via: str) -> None:
    sentinel = RedisSentinel(redis_server).start() if via == "sentinel" else None
    try:
        url = sentinel.url if sentinel is not None else redis_server.url
        port = free_port()
        r = RelayProcess(tmp_path, {"limits": {"shared": url},
                                    "metrics": {"address": f"127.0.0.1:{port}"}}).start()
        try:
            _up(r, port)
            r.wait_for(lambda: health(port) == (200, "ok\n"), timeout=15)
            assert val(scrape(port), "authrelay_dependency_up", dependency="redis") == 1
            redis_server.stop()
            # Without Redis the node counts locally and serves everyone: it stays in
            # rotation (200, degraded); a check that requires Redis gets 503.
            r.wait_for(lambda: health(port, "?require=redis")[0] == 503, timeout=15)
            assert health(port, "?require=redis")[1].startswith("redis down: ")
            status, body = health(port)
            assert status == 200 and body.startswith("ok\ndegraded: redis down: "), body
            assert val(scrape(port), "authrelay_dependency_up", dependency="redis") == 0
            redis_server.start()
            r.wait_for(lambda: health(port, "?require=redis") == (200, "ok\n"), timeout=20)
        finally:
            r.stop()
    finally:
        if sentinel is not None:
            sentinel.cleanup()


@pytest.mark.external
def test_shared_counters_through_sentinel(redis_server: RedisServer) -> None:
    """The counters themselves work through a Sentinel URL (the master it names)."""
    from authrelay.policy.shared import SharedCounters

    sentinel = RedisSentinel(redis_server).start()
    try:
        async def go() -> tuple[bool, bytes | None]:
            sc = SharedCounters(sentinel.url, timeout=2.0)
            try:
                ok = await sc.ping()
                await sc._call(lambda c: c.set("authrelay:test", "via-sentinel"))
                got = await sc._call(lambda c: c.get("authrelay:test"))
                return ok, got
            finally:
                await sc.close()

        assert asyncio.run(go()) == (True, b"via-sentinel")
    finally:
        sentinel.cleanup()


def test_hostile_http_clients_stay_bounded(relay_factory) -> None:
    """Attack: 600 connections to the metrics listener that never finish their request
    (slowloris) held a thread and a descriptor each in the master without end (999 took a
    1024-descriptor master: local submission and delivery stalled). Now the master's
    descriptors and threads stay bounded, local submission works meanwhile, another
    address's health check is answered, and the held ones are cut after the deadline."""
    import socket

    from authrelay import metrics

    port = free_port()
    r = relay_factory(overrides={"metrics": {"address": f"127.0.0.1:{port}"}})
    _up(r, port)
    assert r.proc is not None
    pid = r.proc.pid
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    held = []
    try:
        for _ in range(600):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")  # never ends its request
            held.append(s)
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        other.connect(("127.0.0.1", port))
        with other:
            other.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert other.recv(100).startswith(b"HTTP/1.0 200 OK")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
        assert fds < fds_before + metrics.MAX_CONNECTIONS + 70, fds  # backlog included
        assert threads < 20 + metrics.MAX_CONNECTIONS, threads
        res = r.cli("sendmail", "-i", "bob@remote.example", input="Subject: x\n\nhi\n",
                    check=False)
        assert res.returncode == 0, res.stderr
        # The served ones are cut at the deadline: their sockets read EOF (a socket
        # timeout, not an EOF, if they were held for ever).
        held[0].settimeout(metrics.REQUEST_DEADLINE + 10)
        assert held[0].recv(100) == b""
    finally:
        for s in held:
            s.close()

    def answered() -> bool:
        try:
            return health(port)[0] == 200
        except OSError:  # closed at once while the server still counts this address's
            return False  # held connections (4 per address): they are going away

    r.wait_for(answered, what="a health check answered once the held connections closed")
    assert "Traceback" not in r.maillog()
