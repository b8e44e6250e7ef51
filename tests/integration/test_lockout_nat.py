"""The per-address AUTH lockout behind a NAT, against a real `authrelay serve`.

Behind one public address (a hotel, a company, a carrier's CGNAT) one guesser reaching
`[auth] max_failures_per_ip` used to lock every other user of that address out, their
right passwords refused unchecked (454 4.7.0) for the whole window. Now a user who
logged in from that network before is still checked there (policy/verdicts.lockout,
Lockout.SPARED), until that user's own failures from it reach the per-(user, network)
limit; anybody else gets the lockout's answer unchecked, and a known user's wrong
password gets exactly that answer too (no oracle for who is known there).

The clients are real (smtplib, swaks) from their own loopback addresses: the "NAT" is
127.0.0.50 (network 127.0.0.0/24 for the known-address store), alice's office is in
127.0.1.0/24.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Callable

import pytest
from relayproc import PASSWORD, RelayProcess
from smtpclient import client_ctx
from support import ci

pytestmark = pytest.mark.slow

NAT = "127.0.0.50"
MAX_IP = 4
MAX_USER = 3
LOCKED = (454, b"4.7.0 Too many authentication failures, try again later")
USERS = {"alice": PASSWORD, "bob": PASSWORD, "carol": PASSWORD}
Factory = Callable[..., RelayProcess]


def make(relay_factory: Factory) -> RelayProcess:
    return relay_factory({"auth": {"max_failures_per_ip": MAX_IP,
                                   "max_failures_per_user": MAX_USER,
                                   "failure_window": "10m", "failure_delay": 0.05},
                          "limits": {"max_auth_failures": 10,
                                     "connection_rate_per_ip": 0}}, users=USERS)


def auth(relay: RelayProcess, src: str, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN by smtplib from `src` after STARTTLS: the server's (code, text)."""
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], source_address=(src, 0),
                      timeout=30) as s:
        s.starttls(context=client_ctx())
        s.ehlo()
        s.user, s.password = user, password
        try:
            return s.auth("PLAIN", s.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


def lock_the_nat(relay: RelayProcess) -> None:
    """Somebody behind the NAT guesses MAX_IP times (other names, none of alice's), so
    the address reaches max_failures_per_ip: a stranger there is now refused unchecked."""
    for i in range(MAX_IP):
        assert auth(relay, NAT, f"guess{i}", "wrong")[0] == 535
    assert auth(relay, NAT, "carol", PASSWORD) == LOCKED  # carol never logged in there


def test_a_user_known_behind_a_locked_address_still_logs_in_and_sends(
        relay_factory: Factory) -> None:
    swaks = ci.require_tool("swaks", "swaks")
    r = make(relay_factory)
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235  # alice at the hotel, once
    lock_the_nat(r)
    # Before: 454 4.7.0 for alice too, unchecked, for as long as the guessing went on.
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235
    out = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(r.ports["submission"]),
         "--local-interface", NAT, "-tls", "--auth", "PLAIN",
         "--auth-user", "alice", "--auth-password", PASSWORD,
         "--from", "alice@local.test", "--to", "friend@example.net"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "queued as" in out.stdout, out.stdout + out.stderr
    r.wait_log(rf"auth=ok, sasl_method=PLAIN, sasl_username=alice, relay=unknown "
               rf"\[{re.escape(NAT)}\]")


def test_past_the_address_lockout_only_known_users_are_checked(
        relay_factory: Factory) -> None:
    """A user never seen there (bob, even with his right password) and a name nobody has
    get the lockout's answer unchecked; alice's wrong password gets exactly the same
    answer (reply and code), so guessing cannot tell that alice is known there; only her
    right password is let in."""
    r = make(relay_factory)
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235
    lock_the_nat(r)
    assert auth(r, NAT, "nosuchuser", "wrong") == LOCKED
    assert auth(r, NAT, "bob", PASSWORD) == LOCKED  # right, but not checked
    assert auth(r, NAT, "alice", "wrong") == LOCKED  # checked: wrong, answered the same
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235
    assert auth(r, "127.0.0.51", "bob", PASSWORD)[0] == 235  # the NAT's neighbour: open
    nat = re.escape(NAT)
    # The maillog says which was checked: the unchecked ones have the lockout's line ...
    for user in ("nosuchuser", "bob"):
        r.wait_log(rf"reject=454 4\.7\.0 Too many authentication failures, try again "
                   rf"later, relay=unknown \[{nat}\], sasl_method=PLAIN, "
                   rf"sasl_username={user}$")
    # ... alice's wrong password the failure line with the code she was given.
    r.wait_log(rf"reject=454 4\.7\.0 authentication failed, relay=unknown \[{nat}\], "
               r"sasl_method=PLAIN, sasl_username=alice, "
               r"reason=known network past the lockout$")


def test_guessing_alices_password_from_her_own_network_is_still_stopped(
        relay_factory: Factory) -> None:
    """Past the NAT's lockout her known network is checked, but each wrong guess of her
    password there counts: at max_failures_per_user of them her network's own limit
    locks it for her too. Her other known network (the office) still lets her in."""
    r = make(relay_factory)
    office = "127.0.1.9"
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235
    assert auth(r, office, "alice", PASSWORD)[0] == 235
    lock_the_nat(r)
    for i in range(MAX_USER - 1):
        assert auth(r, NAT, "alice", f"wrong{i}") == LOCKED
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235  # not yet at her network's limit
    assert auth(r, NAT, "alice", "wrong-last") == LOCKED
    # Now MAX_USER guesses of her password from there: even the right one is refused
    # there unchecked ...
    assert auth(r, NAT, "alice", PASSWORD) == LOCKED
    r.wait_log(r"reject=454 4\.7\.0 Too many authentication failures, try again later, "
               r"relay=unknown \[127\.0\.0\.50\], sasl_method=PLAIN, sasl_username=alice$")
    # ... but not from the office, nor from elsewhere: those guesses counted toward her
    # network's limit only (test_whether_a_user_is_known_behind_the_address_...).
    assert auth(r, office, "alice", PASSWORD)[0] == 235
    assert auth(r, "127.0.2.9", "alice", PASSWORD)[0] == 235


def test_whether_a_user_is_known_behind_the_address_does_not_show_from_elsewhere(
        relay_factory: Factory) -> None:
    """The checked guesses of a known user behind a locked address counted toward her
    per-user limit (and the address's), the unchecked ones of anybody else toward
    nothing: so from other networks a guesser saw the difference. Two wrong guesses
    each for alice (known at the NAT) and bob (not) from elsewhere, one more for each
    from behind the locked NAT (both 454 there), then one from a third network: alice's
    was refused unchecked (her per-user limit reached), bob's checked (535): the reply
    told that alice logs in from behind that NAT. Now both are checked (535)."""
    r = make(relay_factory)
    assert auth(r, NAT, "alice", PASSWORD)[0] == 235
    for user, elsewhere in (("alice", "127.0.3.9"), ("bob", "127.0.4.9")):
        for i in range(MAX_USER - 1):
            assert auth(r, elsewhere, user, f"wrong{i}")[0] == 535
    lock_the_nat(r)
    assert auth(r, NAT, "alice", "wrong-at-the-nat") == LOCKED  # checked: known there
    assert auth(r, NAT, "bob", "wrong-at-the-nat") == LOCKED  # unchecked
    assert auth(r, "127.0.5.9", "alice", "wrong-again")[0] == 535
    assert auth(r, "127.0.6.9", "bob", "wrong-again")[0] == 535
