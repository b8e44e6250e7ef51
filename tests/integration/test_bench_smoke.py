"""Smoke test of bench/load.py against a real SMTP server on loopback.

Owns: keeping the benchmark's load generator from rotting (issue "Performance", must 5).
Runs `bench/load.py` as a subprocess, briefly, against the fake MX (aiosmtpd; plain, and
STARTTLS + AUTH PLAIN with a trustme certificate), and checks the JSON report has its
fields and that its counts match what the server received. No timed assertions.
The server is pluggable: `smtp_server` is the one place to switch it to `authrelay serve`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from fakes.smtpserver import FakeSMTPServer
from support.certs import server_tls_context

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOAD = ROOT / "bench" / "load.py"
USER, PASSWORD = "alice", "correct horse"


@pytest.fixture
def smtp_server(trustme_ca: trustme.CA) -> Iterator[tuple[int, FakeSMTPServer]]:
    """aiosmtpd (tests/fakes/smtpserver.py): STARTTLS and AUTH offered, not required."""
    with FakeSMTPServer("127.0.0.1", starttls_context=server_tls_context(
            trustme_ca, "localhost", "127.0.0.1"), users={USER: PASSWORD},
            auth_required=False, hostname="bench.test") as srv:
        yield srv.port, srv


def run_load(*args: str) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, str(LOAD), *args], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.strip(), p.stderr
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


FIELDS = {"messages_ok", "messages_failed", "sessions_ok", "sessions_failed", "elapsed_s",
          "messages_per_s", "sessions_per_s", "final_250_ms", "setup_ms", "errors"}


def test_plain_counts_match_server(smtp_server: tuple[int, FakeSMTPServer]) -> None:
    port, received = smtp_server
    rc, out = run_load("smtp", "--port", str(port), "-c", "4", "-n", "6", "-m", "3",
                       "--size", "2048", "-p", "2")
    assert rc == 0, out["errors"]
    assert out.keys() >= FIELDS
    assert set(out["final_250_ms"]) == {"p50", "p99", "max"}
    assert out["messages_ok"] == 18 == len(received.messages)
    assert out["sessions_ok"] == 6 and out["messages_failed"] == 0
    assert out["messages_per_s"] > 0 and out["final_250_ms"]["p50"] is not None
    body = received.messages[0].content
    assert b"Subject: authrelay bench" in body and 1900 < len(body) < 2200


def test_starttls_auth_counts_match_server(smtp_server: tuple[int, FakeSMTPServer]) -> None:
    port, received = smtp_server
    rc, out = run_load("smtp", "--port", str(port), "--tls", "starttls", "--auth", "plain",
                       "--user", USER, "--password", PASSWORD, "-c", "3", "-n", "5")
    assert rc == 0, out["errors"]
    assert out["messages_ok"] == 5 == len(received.messages)
    assert out["sessions_ok"] == 5


def test_wrong_password_is_counted_failed(smtp_server: tuple[int, FakeSMTPServer]) -> None:
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


def test_idle_connections_are_held(smtp_server: tuple[int, FakeSMTPServer]) -> None:
    port, _ = smtp_server
    rc, out = run_load("idle", "--port", str(port), "--connections", "20", "--hold", "0.2")
    assert rc == 0
    assert out["greeted"] == out["connected"] == 20


def test_refuses_non_loopback() -> None:
    p = subprocess.run([sys.executable, str(LOAD), "smtp", "--host", "192.0.2.1",
                        "--port", "25"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "non-loopback" in p.stderr
