"""policy/verdicts.py: the MAIL/RCPT decisions and the counters' verdicts, without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from authrelay import replies
from authrelay.address import Address, parse_mailbox
from authrelay.config import from_dict
from authrelay.policy import verdicts as v
from authrelay.policy.relay import RelayPolicy


def addr(text: str) -> Address:
    return parse_mailbox(text)


def policy(**relay: object) -> RelayPolicy:
    return RelayPolicy(from_dict({"relay": {"local_domains": ["local.test"], **relay}}))


# ------------------------------------------------------------------ sender ownership

def test_mail_verdict_any_case_trailing_dot_login_address() -> None:
    own = {"alice@example.com"}
    assert v.mail_verdict("own", addr("Alice@Example.COM."), "alice", own) is None
    assert v.mail_verdict("own", addr("carol@EXAMPLE.org"), "Carol@example.org", ()) is None
    assert v.mail_verdict("own", addr("carol@example.org"), "carol", ()) \
        is replies.SENDER_NOT_OWNED


def test_mail_verdict() -> None:
    own = {"alice@example.com"}
    assert v.mail_verdict("own", addr("alice@example.com"), "alice", own) is None
    assert v.mail_verdict("own", addr("bob@example.com"), "alice", own) \
        is replies.SENDER_NOT_OWNED
    assert v.mail_verdict("own", None, "alice", own) is None  # the null sender: bounces
    assert v.mail_verdict("any", addr("bob@example.com"), "alice", own) is None
    assert v.mail_verdict("own", addr("bob@example.com"), "", ()) is None  # no AUTH


# ------------------------------------------------------------------ relay

def test_rcpt_verdict_unauthenticated_only_local_domains() -> None:
    p = policy()
    kw = {"postmaster": False, "authenticated": False, "trusted": False}
    assert v.rcpt_verdict(p, addr("x@local.test"), **kw) is None
    assert v.rcpt_verdict(p, addr("x@LOCAL.test."), **kw) is None
    assert v.rcpt_verdict(p, addr("x@remote.test"), **kw) is replies.RELAY_DENIED
    # sender-routing syntax through a local domain: never (percent hack, bang path)
    assert v.rcpt_verdict(p, addr("v%remote.test@local.test"), **kw) is replies.RELAY_DENIED
    assert v.rcpt_verdict(p, addr("remote!v@local.test"), **kw) is replies.RELAY_DENIED


def test_rcpt_verdict_authenticated_trusted_postmaster() -> None:
    p = policy()
    far = addr("x@remote.test")
    assert v.rcpt_verdict(p, far, postmaster=False, authenticated=True, trusted=False) is None
    assert v.rcpt_verdict(p, far, postmaster=False, authenticated=False, trusted=True) is None
    assert v.rcpt_verdict(p, far, postmaster=True, authenticated=False, trusted=False) is None


def test_rcpt_verdict_address_literal_is_never_local() -> None:
    p = policy()
    assert v.rcpt_verdict(p, addr("x@[127.0.0.1]"), postmaster=False, authenticated=False,
                          trusted=False) is replies.RELAY_DENIED


def test_rcpt_verdict_an_internationalised_local_domain_in_either_form() -> None:
    """A 7-bit client writes the A-label, an SMTPUTF8 one the U-label: both are the local
    domain whichever form the config names; a name IDNA2003 would map onto another is not."""
    kw = {"postmaster": False, "authenticated": False, "trusted": False}
    for configured in ("bücher.example", "xn--bcher-kva.example", "BÜCHER.example."):
        p = policy(local_domains=[configured])
        assert v.rcpt_verdict(p, addr("x@xn--bcher-kva.example"), **kw) is None, configured
        assert v.rcpt_verdict(p, addr("x@Bücher.example"), **kw) is None, configured
        assert v.rcpt_verdict(p, addr("x@bucher.example"), **kw) is replies.RELAY_DENIED
    p = policy(local_domains=["boss.example"])
    assert v.rcpt_verdict(p, addr("x@boss.example"), **kw) is None
    assert v.rcpt_verdict(p, addr("x@boß.example"), **kw) is replies.RELAY_DENIED
    p = policy(local_domains=["boß.example"])  # never local: not boss.example either
    assert v.rcpt_verdict(p, addr("x@boss.example"), **kw) is replies.RELAY_DENIED
    assert v.rcpt_verdict(p, addr("x@boß.example"), **kw) is replies.RELAY_DENIED


# ------------------------------------------------------------------ counters

def test_rates() -> None:
    assert v.messages_allowed(0, 0) and v.messages_allowed(10**9, 0)  # 0: no limit
    assert v.messages_allowed(2, 3) and not v.messages_allowed(3, 3)
    assert v.recipients_allowed(5, 4, 10) and not v.recipients_allowed(5, 5, 10)
    assert v.recipients_allowed(10**9, 10**9, 0)


@given(st.floats(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_recipients_allowed_is_monotonic(counted: float, pending: int, limit: int) -> None:
    if not v.recipients_allowed(counted, pending, limit):
        assert not v.recipients_allowed(counted + 1, pending, limit)
        assert not v.recipients_allowed(counted, pending + 1, limit)


def test_lockout() -> None:
    kw = {"max_ip": 5, "max_user": 3}
    assert v.lockout(5, 0, 0, user="", **kw) is v.Lockout.LOCKED  # the address guesses
    assert v.lockout(4, 2, 2, user="alice", **kw) is v.Lockout.OPEN
    assert v.lockout(0, 3, 0, user="alice", **kw) is v.Lockout.UNLESS_KNOWN
    assert v.lockout(0, 3, 3, user="alice", **kw) is v.Lockout.LOCKED  # her network too
    assert v.lockout(0, 99, 99, user="", **kw) is v.Lockout.OPEN  # no name: per-IP only
    assert v.lockout(99, 99, 99, user="a", max_ip=0, max_user=0) is v.Lockout.OPEN


def test_lockout_past_the_address_limit_spares_known_networks() -> None:
    """Past the per-address limit (a NAT one of whose users guesses), a named user is
    refused unchecked unless known there, and not once this user's own failures from that
    network reached the per-(user, network) limit: max_failures_per_user, else
    max_failures_per_ip."""
    kw = {"max_ip": 5, "max_user": 3}
    assert v.lockout(5, 0, 0, user="alice", **kw) is v.Lockout.UNLESS_KNOWN
    assert v.lockout(5, 2, 2, user="alice", **kw) is v.Lockout.UNLESS_KNOWN
    assert v.lockout(5, 3, 3, user="alice", **kw) is v.Lockout.LOCKED  # guessed from there
    assert v.lockout(5, 0, 4, user="alice", max_ip=5, max_user=0) is v.Lockout.UNLESS_KNOWN
    assert v.lockout(5, 0, 5, user="alice", max_ip=5, max_user=0) is v.Lockout.LOCKED
    assert v.usernet_limit(5, 3) == 3 and v.usernet_limit(5, 0) == 5
