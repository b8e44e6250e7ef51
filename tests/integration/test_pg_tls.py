"""PostgreSQL over TLS: `[auth] dsn = "postgresql://...?sslmode=verify-full&sslrootcert=CA"`
against a real cluster the test starts with `ssl = on`, a trustme certificate and a
pg_hba that refuses anything but TLS. The CLI and AUTH through a running server work; a
server certificate from another CA is refused (one line, never a traceback)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from relayproc import PASSWORD, RelayProcess
from scalerig import PostgresServer
from smtpclient import RawClient, client_ctx, plain

pytestmark = [pytest.mark.external, pytest.mark.slow]


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path]]:
    pg = PostgresServer()
    try:
        pg.stop()
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        crt, key = pg.data / "server.crt", pg.data / "server.key"
        crt.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        os.chmod(key, 0o600)
        if pg._as:
            for p in (crt, key):
                os.chown(p, pg._as["user"], pg._as["group"])
        with open(pg.data / "postgresql.conf", "a") as f:
            f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        # TLS or nothing: a plain connection is rejected by the server itself.
        (pg.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 127.0.0.1/32 reject\n")
        pg.start()
        cadir = tmp_path_factory.mktemp("pgca")
        ca_file = cadir / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        yield pg, ca_file
    finally:
        pg.cleanup()


def _relay(tmp: Path, dsn: str) -> RelayProcess:
    return RelayProcess(tmp, {"auth": {"backend": "postgresql", "dsn": dsn}}, users={})


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_verify_full_with_the_ca(tmp_path: Path, tls_pg: tuple[PostgresServer, Path],
                                 where: str) -> None:
    """The CA file named absolute, or relative: then from the config file's directory
    (the CLI and `serve` run with the test's working directory, where it is not)."""
    pg, ca = tls_pg
    if where == "relative":
        (tmp_path / "db ca.pem").write_bytes(ca.read_bytes())
        ca = Path("db%20ca.pem")  # beside tmp_path/authrelay.toml
    dsn = f"{pg.dsn}?sslmode=verify-full&sslrootcert={ca}"
    user = f"alice-{where}"  # one database for the module
    r = _relay(tmp_path, dsn)
    r.cli("user", "add", user, "--password-stdin", input=PASSWORD + "\n")
    assert user in r.cli("user", "list").stdout.split()
    r.start()
    try:
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            assert c.reply().code == 220
            c.cmd("EHLO t")
            assert c.cmd(f"AUTH PLAIN {plain(user, PASSWORD)}").code == 235
    finally:
        r.stop()


def test_plain_and_foreign_ca_refused(tmp_path: Path, tls_pg: tuple[PostgresServer, Path]
                                      ) -> None:
    pg, _ = tls_pg
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    for i, dsn in enumerate([f"{pg.dsn}?sslmode=disable",
                             f"{pg.dsn}?sslmode=verify-full&sslrootcert={other}"]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        out = _relay(d, dsn).cli("user", "list", check=False)
        assert out.returncode != 0, dsn
        assert "Traceback" not in out.stderr and pg.PASSWORD not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
