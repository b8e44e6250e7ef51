"""The account a login name counts as (Authenticator.account) and what an admin types
for it (auth.authenticator.account_for) agree for every backend and `[auth] realms`."""

from __future__ import annotations

from pathlib import Path

import pytest

from authrelay import wiring
from authrelay.auth.authenticator import account_for
from authrelay.config import from_dict

NAMES = ["alice", "ALICE", "Alice@Relay.Test", "alice@relay.test", "Bob@Example.org",
         "carol@other.test", "ß@relay.test"]


@pytest.mark.parametrize("backend", ["userdb", "saslauthd:/nonexistent/mux",
                                     "dovecot:/nonexistent/auth-client"])
@pytest.mark.parametrize("realms", [[], ["relay.test"]])
def test_account_for_is_what_the_session_counts(backend: str, realms: list[str],
                                                tmp_path: Path) -> None:
    cfg = from_dict({"state_dir": str(tmp_path), "auth": {"backend": backend,
                                                          "realms": realms}})
    auth = wiring.authenticator(cfg)
    try:
        for name in NAMES:
            assert account_for(cfg, name) == auth.account(name), name
    finally:
        auth.close()


def test_external_backends_count_every_spelling_as_one() -> None:
    """saslauthd and Dovecot match names as they like (PAM with Active Directory ignores
    case): one account per login whatever its case; the user DB keeps names exact."""
    ext = from_dict({"auth": {"backend": "saslauthd:/x", "realms": ["relay.test"]}})
    assert {account_for(ext, n) for n in ("alice", "ALICE", "Alice@RELAY.test")} == {"alice"}
    own = from_dict({"auth": {"backend": "userdb"}})
    assert account_for(own, "Alice") == "Alice"
