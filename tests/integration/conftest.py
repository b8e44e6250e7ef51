"""Fixtures for integration tests: a real authrelay process per test (or per module)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path).start()
    yield r
    r.stop()


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory the unprivileged TEST_USER (support.privileges) can reach: pytest's
    temp root is 0700 root."""
    base = Path(tempfile.mkdtemp(prefix="authrelay-priv-"))
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator:
    made: list[RelayProcess] = []

    def make(overrides: dict | None = None, users: dict | None = None, workers: int = 1,
             start: bool = True, sub: str = "r") -> RelayProcess:
        d = tmp_path / f"{sub}{len(made)}"
        d.mkdir()
        r = RelayProcess(d, overrides, users, workers)
        made.append(r)
        return r.start() if start else r

    yield make
    for r in made:
        r.stop()


# The end-to-end tests' DNS (test zones) and the envelope sender's MX, shared by the
# test_e2e_* files (test_delivery.py and test_limits.py define their own `dns`).
@pytest.fixture
def dns(dns_server):  # noqa: ANN001, ANN201
    from test_e2e_delivery import ZONES

    dns_server.set_zones(ZONES)
    return dns_server


@pytest.fixture
def sender_mx(fake_mx):  # noqa: ANN001, ANN201
    """The envelope sender's MX (receives bounces); also fixes `fake_mx.port`."""
    from test_e2e_delivery import SENDER_MX

    return fake_mx(SENDER_MX)
