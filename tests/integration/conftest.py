"""Fixtures for integration tests: a real authrelay process per test (or per module)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess
from scalerig import PostgresServer


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


# A PostgreSQL cluster for the tests of the postgresql backend (test_pg_users,
# test_app_passwords, test_health): started once per module, by the test, on a free port.
@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    pg = PostgresServer()
    try:
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def pg(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """The cluster, running, with no authrelay schema and no authrelay_ro role (each test
    starts empty); started again after a test that stopped it."""
    if not (postgres.data / "postmaster.pid").exists():
        postgres.start()

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute("DROP SCHEMA IF EXISTS authrelay CASCADE")
            await conn.execute("DROP ROLE IF EXISTS authrelay_ro")
        finally:
            await conn.close()

    asyncio.run(drop())
    yield postgres
    if not (postgres.data / "postmaster.pid").exists():
        postgres.start()
