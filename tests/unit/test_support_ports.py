"""The ports tests give servers before they start (tests/support/ports.py): never from the
kernel's ephemeral range (an outgoing connection could take one before the server binds),
handed out in turn, and skipping one something already holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from support import ports


def test_ports_are_outside_the_ephemeral_range_and_not_repeated() -> None:
    first, last = ports.ephemeral_range()
    got = [ports.free_port() for _ in range(20)]
    got += [ports.common_free_port(), ports.free_udp_tcp_port(), ports.free_port("::1")]
    assert all(1024 <= p < first or last < p <= 65535 for p in got), (got, first, last)
    assert len(set(got)) == len(got), got


@pytest.mark.parametrize(("first", "last", "expect"), [
    (32768, 60999, (20768, 32768)),  # Linux's default: below
    (1024, 60999, (61000, 65536)),  # nothing below: above
    (2000, 65535, None),  # no room either side: the kernel picks
])
def test_range_outside_the_ephemeral_ports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           first: int, last: int,
                                           expect: tuple[int, int] | None) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (first, last))
    monkeypatch.setattr(ports, "PORTS_COUNTER", tmp_path / "next")  # not the shared turn
    assert ports._port_range() == expect
    assert 1024 <= ports.free_port() <= 65535


def test_a_held_port_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "PORTS_COUNTER", tmp_path / "next")
    held = ports.free_port()
    (tmp_path / "next").write_text(f"{held}\n")  # the next turn falls on a port in use
    with socket.socket() as s:
        s.bind(("127.0.0.1", held))
        s.listen(1)
        got = ports.free_port()
    assert got != held and (tmp_path / "next").read_text().strip() == str(got + 1)
