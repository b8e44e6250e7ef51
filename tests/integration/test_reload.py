"""SIGHUP applies what it says: a changed smart host is used by the next delivery, and a
key that needs a restart is named in the maillog (`reload: KEY needs a restart`) at every
reload until the restart, while the running value stays in use."""

from __future__ import annotations

import os
import signal

import pytest
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, client_ctx, plain

pytestmark = pytest.mark.slow


def _submit(r: RelayProcess, subject: str) -> None:
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220
        c.cmd("EHLO t")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(f"Subject: {subject}\r\n\r\nx\r\n.\r\n".encode())
        assert c.reply().code == 250


def _reload(r: RelayProcess, data: dict, processes: int) -> None:
    r.config.write_text(to_toml(data))
    before = r.maillog().count("daemon=reloaded")
    assert r.proc is not None
    os.kill(r.proc.pid, signal.SIGHUP)
    r.wait_for(lambda: r.maillog().count("daemon=reloaded") >= before + processes)


@pytest.mark.parametrize("workers", [1, 2])
def test_smart_host_change_applies_and_restart_keys_are_named(relay_factory, fake_mx,
                                                              workers: int) -> None:
    a, b = fake_mx("127.0.0.2"), fake_mx("127.0.0.3")
    r = relay_factory(workers=workers, overrides={
        "relay": {"smart_host": [a.address], "smart_host_tls": "none"},
        "delivery": {"retry": ["1s"]}})
    processes = workers + 1 if workers > 1 else 1
    r.wait_for(lambda: r.maillog().count("daemon=started") >= processes)
    _submit(r, "to A")
    r.wait_for(lambda: len(a.messages) == 1, timeout=20)
    data = dict(r.config_data)
    data["relay"] = {**data["relay"], "smart_host": [b.address]}
    data["auth"] = {**data["auth"], "cache_ttl": "1m"}  # restart-only
    _reload(r, data, processes)
    _submit(r, "to B")
    r.wait_for(lambda: len(b.messages) == 1, timeout=20)
    assert len(a.messages) == 1
    log = r.maillog()
    assert log.count("warning=reload: auth.cache_ttl needs a restart") == 1
    assert "relay.smart_host needs a restart" not in log
    # Still not applied: said again at the next reload (once, by the master).
    _reload(r, data, processes)
    assert r.maillog().count("warning=reload: auth.cache_ttl needs a restart") == 2
