"""Inbound TLS as a scanner and an attacker see it, against a real `authrelay serve`:
465 (implicit TLS) and STARTTLS on 587 and 25.
"""

from __future__ import annotations

import socket
import ssl

import pytest
from relayproc import RelayProcess
from smtpclient import RawClient, client_ctx


def tls12_only() -> ssl.SSLContext:
    ctx = client_ctx()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@pytest.mark.parametrize("mode", ["submission", "smtp"])
def test_a_failed_starttls_handshake_is_logged_with_its_reason(relay_factory,  # noqa: ANN001
                                                               mode: str) -> None:
    """A client refused by `[tls] min_version` (or for its ciphers) after STARTTLS gets a
    tls_failed line saying why, as on 465: before, only 'disconnect ... starttls=1', so an
    operator raising min_version could not see which clients it turned away."""
    r: RelayProcess = relay_factory({"tls": {"min_version": "1.3"}})
    with RawClient(r.ports[mode], source="127.0.0.5") as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO client.example").code == 250
        assert c.cmd("STARTTLS").code == 220
        with pytest.raises((ssl.SSLError, OSError)):
            c.starttls(tls12_only())
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.5\]")
    assert f"reason=handshake failed: UNSUPPORTED_PROTOCOL, listener={mode}:" in line
    # The same client on 465 gets the same reason.
    s = socket.create_connection(("127.0.0.1", r.ports["submissions"]),
                                 source_address=("127.0.0.6", 0))
    with pytest.raises((ssl.SSLError, OSError)):
        tls12_only().wrap_socket(s)
    s.close()
    line = r.wait_log(r"tls_failed=from unknown \[127\.0\.0\.6\]")
    assert "reason=handshake failed: UNSUPPORTED_PROTOCOL" in line
    assert "Traceback" not in r.maillog()
