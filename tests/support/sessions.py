"""Real SMTP clients in a known state, for tests that act on a server mid-session
(reload, restart, drain, privilege checks)."""

from __future__ import annotations

from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient, client_ctx, plain


def session_in_progress(r: RelayProcess, user: str = "alice",
                        password: str = PASSWORD) -> RawClient:
    """An authenticated session on 587 (STARTTLS) half way through a transaction:
    MAIL and one RCPT accepted, DATA not sent. The caller closes it."""
    c = RawClient(r.ports["submission"])
    assert c.reply().code == 220
    assert c.cmd("EHLO t").code == 250
    assert c.cmd("STARTTLS").code == 220
    c.starttls(client_ctx())
    assert c.cmd("EHLO t").code == 250
    assert c.cmd(f"AUTH PLAIN {plain(user, password)}").code == 235
    assert c.cmd(f"MAIL FROM:<{user}@local.test>").code == 250
    assert c.cmd("RCPT TO:<bob@remote.example>").code == 250
    return c
