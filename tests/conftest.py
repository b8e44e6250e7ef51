"""Shared test fixtures: a real DNS server, fake MX / smart hosts, a test CA.

- `trustme_ca`: one trustme CA per session; `trustme_ca_file`: its PEM on disk (for
  `relay.smart_host_ca_file` or SSL_CERT_FILE); `support.certs.server_tls_context(ca,
  *names)` makes a server context whose certificate covers the given names / IPs.
- `dns_server`: a running FakeDNSServer (tests/fakes/dnsserver.py) with empty zones; set
  them with `dns_server.set_zones({...})`; point the config at `dns_server.nameserver`.
- `fake_mx`: a factory `fake_mx(host="127.0.0.2", **FakeSMTPServer options)`. Every
  server a test makes listens on the SAME port (on its own 127.0.0.x address), because
  `[delivery] port` is one number for all MX; `fake_mx.port` is that port. All are
  stopped at teardown.
- `@pytest.mark.root`: the test needs root; checked here before it runs (fails under
  CI=true, skips elsewhere: support/ci.py). The helpers themselves live in tests/support/.
- Hypothesis runs without its per-example deadline (profile "authrelay", loaded here
  before any test module): a property asserts results, not speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import relayproc
import trustme
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import MXFactory
from hypothesis import settings
from support import ci

# Hypothesis's default deadline (200 ms per example) fails a property with "Unreliable
# test timings" whenever a loaded runner pauses the process for a quarter of a second:
# a verdict on the scheduler, not on the code.
settings.register_profile("authrelay", deadline=None)
settings.load_profile("authrelay")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    relayproc.forget_books()  # the /dev/shm books killed servers left


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        ci.require_root(f"{item.name} needs root")


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
