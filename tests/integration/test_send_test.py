"""`authrelay send-test`: a real submission through the config's submission listener
(STARTTLS, AUTH PLAIN, the relay's self-signed certificate verified), the server's replies
printed; 1 when refused, 75 when nothing listens."""

from __future__ import annotations

import pytest
from relayproc import PASSWORD, RelayProcess
from support.ports import free_port

pytestmark = pytest.mark.slow


def _send(r: RelayProcess, password: str, *extra: str):  # noqa: ANN202
    return r.cli("send-test", "--user", "alice", "--from", "alice@local.test", "--to",
                 "bob@remote.example", "--password-stdin", *extra, input=password + "\n",
                 check=False)


def test_send_test_queues_through_submission(relay_factory) -> None:
    r = relay_factory()
    out = _send(r, PASSWORD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "STARTTLS" in out.stdout and "235 2.7.0" in out.stdout
    assert "250 2.0.0 Ok: queued as" in out.stdout
    r.wait_for(lambda: len(r.queued()) == 1)
    assert "auth=alice" in r.maillog()
    # Implicit TLS on the submissions port too.
    out = _send(r, PASSWORD, "--server", f"127.0.0.1:{r.ports['submissions']}")
    assert out.returncode == 0, out.stdout + out.stderr


def test_send_test_refused_and_unreachable(relay_factory) -> None:
    r = relay_factory()
    out = _send(r, "wrong password")
    assert out.returncode == 1 and "535 " in out.stdout, out.stdout
    out = _send(r, PASSWORD, "--server", f"127.0.0.1:{free_port()}")
    assert out.returncode == 75 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert r.queued() == []
