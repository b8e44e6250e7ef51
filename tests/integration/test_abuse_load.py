"""A short mixed load: abusive clients beside well-behaved ones, against a real process.

Abuse (each from its own loopback addresses): a connection flood holding sockets open,
slowloris clients dribbling a command a byte at a time, an AUTH brute force against one
user over implicit TLS. Meanwhile well-behaved clients (Python's smtplib, AUTH over
implicit TLS and STARTTLS) each submit a few messages: every one must be accepted.
Bounded to a few seconds; no timing assertions.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess
from smtpclient import client_ctx, plain

pytestmark = pytest.mark.slow

DURATION = 3.0


def test_mixed_abuse_and_good_clients(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, overrides={
        "limits": {"max_connections": 200, "max_connections_per_ip": 5,
                   "connection_rate_per_ip": 0, "command_timeout": "2s",
                   "max_auth_failures": 3},
        "auth": {"max_failures_per_ip": 6, "max_failures_per_user": 50,
                 "failure_delay": 0.05},
    }, users={"alice": PASSWORD, "victim": "victim's real password"}).start()
    ports = relay.ports
    stop = threading.Event()
    results: dict[str, list] = {"good": [], "good_errors": [], "flood": [], "slow": [],
                                "brute": []}
    lock = threading.Lock()

    def record(key: str, value: object) -> None:
        with lock:
            results[key].append(value)

    def flood() -> None:
        held = []
        try:
            for _ in range(30):
                s = socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=5,
                                             source_address=("127.0.6.1", 0))
                held.append(s)
                try:
                    record("flood", s.recv(200)[:3])
                except OSError as e:
                    record("flood", type(e).__name__)
            stop.wait(DURATION)
        finally:
            for s in held:
                s.close()

    def slowloris(src: str) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=5,
                                         source_address=(src, 0))
        except OSError:
            return
        try:
            s.recv(200)
            for b in b"EHLO slow.example.with.a.very.long.name.test\r\n":
                if stop.is_set():
                    break
                s.sendall(bytes([b]))
                time.sleep(0.1)
            record("slow", "done")
        except OSError as e:
            record("slow", type(e).__name__)
        finally:
            s.close()

    def brute() -> None:
        n = 0
        while not stop.is_set():
            try:
                raw = socket.create_connection(("127.0.0.1", ports["submissions"]),
                                               timeout=10, source_address=("127.0.6.3", 0))
                s = client_ctx().wrap_socket(raw)
                f = s.makefile("rwb")
                f.readline()
                f.write(b"EHLO brute.test\r\n")
                f.flush()
                while not f.readline().startswith(b"250 "):
                    pass
                for _ in range(3):
                    n += 1
                    f.write(f"AUTH PLAIN {plain('victim', f'guess{n}')}\r\n".encode())
                    f.flush()
                    line = f.readline()
                    record("brute", line[:3])
                    if not line.startswith(b"535") and not line.startswith(b"454"):
                        break
                s.close()
            except (OSError, ssl.SSLError) as e:
                record("brute", type(e).__name__)

    def good(i: int, use_starttls: bool) -> None:
        src = f"127.0.7.{i + 1}"
        for k in range(3):
            try:
                if use_starttls:
                    c = smtplib.SMTP("127.0.0.1", ports["submission"], timeout=20,
                                     source_address=(src, 0))
                    c.starttls(context=client_ctx())
                else:
                    c = smtplib.SMTP_SSL("127.0.0.1", ports["submissions"], timeout=20,
                                         context=client_ctx(), source_address=(src, 0))
                with c:
                    c.login("alice", PASSWORD)
                    refused = c.sendmail("alice@example.org", [f"r{i}.{k}@remote.test"],
                                         f"Subject: good {i}.{k}\r\n\r\nhello\r\n")
                    assert refused == {}
                    record("good", (i, k))
            except Exception as e:  # collected, asserted below
                record("good_errors", f"{i}.{k}: {e!r}")

    try:
        threads = [threading.Thread(target=flood), threading.Thread(target=brute)]
        threads += [threading.Thread(target=slowloris, args=(f"127.0.6.{10 + j % 3}",))
                    for j in range(12)]
        threads += [threading.Thread(target=good, args=(i, i % 2 == 0)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(DURATION)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        relay.stop()

    # Every well-behaved client got every message accepted.
    assert results["good_errors"] == []
    assert sorted(results["good"]) == [(i, k) for i in range(6) for k in range(3)]
    assert len(relay.queued()) == 18
    # The abuse met the limits.
    assert results["flood"].count(b"220") == 5 and results["flood"].count(b"421") == 25
    assert b"454" in results["brute"]  # per-IP AUTH lock reached
    log = relay.maillog()
    assert "Traceback" not in log
    assert "Too many connections from your address" in log
    assert "sasl_username=victim" in log
    # Slowloris: the command timeout bounds a whole line, however slowly it trickles in.
    assert "reject=421 4.4.2 Timeout exceeded, closing connection, relay=unknown [127.0.6.1" \
        in log
