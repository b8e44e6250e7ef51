"""Shared test fixtures: a real DNS server, fake MX / smart hosts, a test CA.

- `trustme_ca`: one trustme CA per session; `trustme_ca_file`: its PEM on disk (for
  `relay.smart_host_ca_file` or SSL_CERT_FILE); `fakes.smtpserver.server_tls_context(ca,
  *names)` makes a server context whose certificate covers the given names / IPs.
- `dns_server`: a running FakeDNSServer (tests/fakes/dnsserver.py) with empty zones; set
  them with `dns_server.set_zones({...})`; point the config at `dns_server.nameserver`.
- `fake_mx`: a factory `fake_mx(host="127.0.0.2", **FakeSMTPServer options)`. Every
  server a test makes listens on the SAME port (on its own 127.0.0.x address), because
  `[delivery] port` is one number for all MX; `fake_mx.port` is that port. All are
  stopped at teardown.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))  # `fakes` importable with or without __init__

from fakes.dnsserver import FakeDNSServer  # noqa: E402
from fakes.smtpserver import MXFactory, server_tls_context  # noqa: E402, F401


@pytest.fixture(scope="session")
def trustme_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def trustme_ca_file(trustme_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def dns_server() -> Iterator[FakeDNSServer]:
    srv = FakeDNSServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fake_mx() -> Iterator[MXFactory]:
    factory = MXFactory()
    try:
        yield factory
    finally:
        factory.stop()
