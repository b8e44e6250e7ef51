"""Smoke test of bench/load.py against a real SMTP server on loopback.

Owns: keeping the benchmark's load generator from rotting (issue "Performance", must 5).
Runs `bench/load.py` as a subprocess, briefly, against an aiosmtpd server (plain, and
STARTTLS + AUTH PLAIN with a trustme certificate), and checks the JSON report has its
fields and that its counts match what the server received. No timed assertions.
The server is pluggable: `smtp_server` is the one place to switch it to `authrelay serve`.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOAD = ROOT / "bench" / "load.py"
USER, PASSWORD = "alice", "correct horse"


@dataclass
class Received:
    messages: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
        with self.lock:
            self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"


def _authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
          and auth_data.password == PASSWORD.encode())
    return AuthResult(success=ok)


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


def _free_port() -> int:
    # aiosmtpd's Controller probes its own port once started, so port 0 will not do
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server(tls_context: ssl.SSLContext) -> Iterator[tuple[int, Received]]:
    handler = Received()
    port = _free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, tls_context=tls_context,
                     require_starttls=False, auth_require_tls=True,
                     authenticator=_authenticator, server_hostname="bench.test")
    ctl.start()
    try:
        yield port, handler
    finally:
        ctl.stop()


def run_load(*args: str) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, str(LOAD), *args], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.strip(), p.stderr
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


FIELDS = {"messages_ok", "messages_failed", "sessions_ok", "sessions_failed", "elapsed_s",
          "messages_per_s", "sessions_per_s", "final_250_ms", "setup_ms", "errors"}


def test_plain_counts_match_server(smtp_server: tuple[int, Received]) -> None:
    port, received = smtp_server
    rc, out = run_load("smtp", "--port", str(port), "-c", "4", "-n", "6", "-m", "3",
                       "--size", "2048", "-p", "2")
    assert rc == 0, out["errors"]
    assert out.keys() >= FIELDS
    assert set(out["final_250_ms"]) == {"p50", "p99", "max"}
    assert out["messages_ok"] == 18 == len(received.messages)
    assert out["sessions_ok"] == 6 and out["messages_failed"] == 0
    assert out["messages_per_s"] > 0 and out["final_250_ms"]["p50"] is not None
    body = received.messages[0]
    assert b"Subject: authrelay bench" in body and 1900 < len(body) < 2200


def test_starttls_auth_counts_match_server(smtp_server: tuple[int, Received]) -> None:
    port, received = smtp_server
    rc, out = run_load("smtp", "--port", str(port), "--tls", "starttls", "--auth", "plain",
                       "--user", USER, "--password", PASSWORD, "-c", "3", "-n", "5")
    assert rc == 0, out["errors"]
    assert out["messages_ok"] == 5 == len(received.messages)
    assert out["sessions_ok"] == 5


def test_wrong_password_is_counted_failed(smtp_server: tuple[int, Received]) -> None:
    port, received = smtp_server
    rc, out = run_load("smtp", "--port", str(port), "--tls", "starttls", "--auth", "plain",
                       "--user", USER, "--password", "wrong", "-c", "1", "-n", "2",
                       "--timeout", "1.5")
    assert rc == 1
    assert out["sessions_failed"] == 2 and out["messages_ok"] == 0
    assert received.messages == []
    # aiosmtpd answers a failed AUTH late (a 535 or, within 1.5 s, nothing): both fail it
    assert sum(out["errors"].values()) == 2
    assert "wrong" not in json.dumps(out)  # the password never reaches the report


def test_idle_connections_are_held(smtp_server: tuple[int, Received]) -> None:
    port, _ = smtp_server
    rc, out = run_load("idle", "--port", str(port), "--connections", "20", "--hold", "0.2")
    assert rc == 0
    assert out["greeted"] == out["connected"] == 20


def test_refuses_non_loopback() -> None:
    p = subprocess.run([sys.executable, str(LOAD), "smtp", "--host", "192.0.2.1",
                        "--port", "25"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "non-loopback" in p.stderr
