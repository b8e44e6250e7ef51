"""With several receiving workers, per-IP limits hold across all of them (shared anvil)."""

from __future__ import annotations

import pytest
from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient, client_ctx, plain

pytestmark = pytest.mark.slow


def test_per_ip_connections_across_workers(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({"limits": {"max_connections_per_ip": 3,
                                                "connection_rate_per_ip": 0}}, workers=2)
    # The kernel spreads these over both workers; the limit must still count them all.
    held = [RawClient(r.ports["smtp"], source="127.0.0.2") for _ in range(3)]
    try:
        for c in held:
            assert c.reply().code == 220
        refused = 0
        for _ in range(4):
            with RawClient(r.ports["smtp"], source="127.0.0.2") as c:
                rep = c.reply()
                if rep.code == 421:
                    assert rep.lines[-1].startswith("421 4.7.0")
                    refused += 1
        assert refused == 4
        with RawClient(r.ports["smtp"]) as c:  # the host itself is exempt (loopback)
            assert c.reply().code == 220
    finally:
        for c in held:
            c.close()
    r.wait_for(lambda: "Too many connections from your address" in r.maillog())


def test_auth_failures_counted_across_workers(relay_factory) -> None:  # noqa: ANN001
    r: RelayProcess = relay_factory({"auth": {"max_failures_per_ip": 3, "failure_delay": 0},
                                     "limits": {"max_auth_failures": 10,
                                                "connection_rate_per_ip": 0}}, workers=2)
    for _ in range(3):  # one failure per connection: spread over both workers
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            c.reply()
            c.cmd("EHLO x.example")
            assert c.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}").code == 535
    for _ in range(3):  # now locked, even with the right password, on either worker
        with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
            c.reply()
            c.cmd("EHLO x.example")
            rep = c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
            assert (rep.code, rep.lines[-1][4:9]) == (454, "4.7.0")
