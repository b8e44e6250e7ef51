"""`authrelay send-test`: a real submission through the config's submission listener
(STARTTLS, AUTH PLAIN, the relay's self-signed certificate verified), the server's replies
printed; 1 when refused, 75 when nothing listens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_send_test_trusts_the_self_signed_pairs_named_in_tls(relay_factory,  # noqa: ANN001
                                                             tmp_path: Path) -> None:
    """An RSA pair beside the ECDSA one needs [tls] cert/key set (the self-signed default
    is not served beside a second pair): send-test trusts `cert make`'s self-signed
    certificates named there as it trusts the default's (old: it connected to `hostname`
    and verified against the system CAs: exit 75, 'CERTIFICATE_VERIFY_FAILED ...
    self-signed certificate' where the name resolves)."""
    d = tmp_path / "certs"
    for extra in ((), ("--rsa",)):
        subprocess.run([sys.executable, "-m", "authrelay", "cert", "make", "--hostname",
                        "relay.test", "--out", str(d), *extra], check=True,
                       capture_output=True, timeout=60)
    r = relay_factory({"tls": {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"),
                               "second_cert": str(d / "rsa-cert.pem"),
                               "second_key": str(d / "rsa-key.pem")}})
    for server in ((), ("--server", f"127.0.0.1:{r.ports['submissions']}")):
        out = _send(r, PASSWORD, *server)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "250 2.0.0 Ok: queued as" in out.stdout
