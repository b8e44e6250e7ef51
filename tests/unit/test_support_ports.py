"""The ports tests give servers before they start (tests/support/ports.py): never from the
kernel's ephemeral range (an outgoing connection could take one before the server binds),
handed out in turn, and skipping one something already holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support import ports


def test_ports_are_below_the_ephemeral_range_and_not_repeated() -> None:
    first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    got = [ports.free_port() for _ in range(20)]
    got += [ports.common_free_port(), ports.free_udp_tcp_port(), ports.free_port("::1")]
    assert all(1024 <= p < first for p in got), got
    assert len(set(got)) == len(got), got


def test_a_held_port_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "PORTS_COUNTER", tmp_path / "next")
    held = ports.free_port()
    (tmp_path / "next").write_text(f"{held}\n")  # the next turn falls on a port in use
    with socket.socket() as s:
        s.bind(("127.0.0.1", held))
        s.listen(1)
        got = ports.free_port()
    assert got != held and (tmp_path / "next").read_text().strip() == str(got + 1)
