"""MAIL and RCPT verdicts: pure functions of what is known, no I/O, no clock.

Owns every decision on a transaction that does not need to wait for something: MAIL FROM
of an authenticated user under `sender_policy = "own"` (through policy/ownership.py's
`may_send_as`, the one answer the From: check and the DKIM signer share), whether a
recipient may be relayed to, and what the per-user and AUTH-failure counters mean against
their limits (containment's verdicts are policy/containment.py's). The I/O
adapters (smtpd/session.py, `sendmail -bs`) read the counters and addresses (awaits:
throttle, user store, DNS) and then ask here; tests/engineharness.py asks here too, so
the engine's dialog tests and the server run the same decisions.

Contract: every function is total and deterministic; a verdict is `None` (go on) or the
`Reply` to give. RFC 4954 (AUTH), RFC 6409 8.1 (sender ownership on submission), RFC
5321 3.6 (relaying). Failure policy: none needed (pure).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from authrelay import replies
from authrelay.address import Address
from authrelay.policy.ownership import may_send_as
from authrelay.policy.relay import RelayPolicy
from authrelay.types import Reply


def mail_verdict(sender_policy: str, sender: Address | None, user: str,
                 owned: Iterable[str]) -> Reply | None:
    """MAIL FROM of an authenticated `user` (Postfix reject_sender_login_mismatch):
    under `sender_policy = "own"` the address must be one of theirs; the null sender
    (bounces, RFC 5321 4.5.5) is always allowed. Unauthenticated senders are not judged
    here (relaying is decided per recipient)."""
    if not user or sender_policy != "own" or sender is None:
        return None
    # The one "may USER send as ADDRESS" (policy/ownership.py; From: and DKIM ask it too).
    mine = may_send_as(f"{sender.local}@{sender.domain_key}", user, owned)
    return None if mine else replies.SENDER_NOT_OWNED


def needs_owner(policy: RelayPolicy, rcpt: Address, *, postmaster: bool,
                authenticated: bool, trusted: bool) -> bool:
    """Whether rcpt_verdict needs `user_owned` for `rcpt`: a client neither authenticated
    nor trusted, at a local domain, not named by the local recipients list. The caller
    then asks the user store (an await) whether a user owns the address."""
    return not (postmaster or authenticated or trusted) and policy.unlisted(rcpt)


def rcpt_verdict(policy: RelayPolicy, rcpt: Address, *, postmaster: bool,
                 authenticated: bool, trusted: bool,
                 user_owned: bool | None = False) -> Reply | None:
    """RCPT TO: postmaster is always accepted (RFC 5321 4.5.1), anything else only as the
    relay policy allows it (policy/relay.py); otherwise 550 5.7.1 Relaying denied. At a
    local domain with a local recipients list, a recipient it does not name is accepted
    when `user_owned` (one of the users' addresses; asked when needs_owner() says so),
    else 550 5.1.1 (Postfix's relay_recipient_maps: refused at RCPT, never bounced to a
    forged sender later), or 451 4.3.0 when the user store could not be asked (None)."""
    if postmaster:
        return None
    if not policy.may_relay(rcpt, authenticated=authenticated, trusted=trusted):
        return replies.RELAY_DENIED
    if user_owned or not needs_owner(policy, rcpt, postmaster=postmaster,
                                     authenticated=authenticated, trusted=trusted):
        return None
    if user_owned is None:
        return replies.RECIPIENT_LOOKUP_TEMPFAIL
    return replies.unknown_local_recipient(str(rcpt))


# --------------------------------------------------------------------------- counters

def messages_allowed(sent: float, limit: int) -> bool:
    """`user_messages_per_hour`: one more message after `sent` in the window (0: no limit)."""
    return not limit or sent < limit


def recipients_allowed(counted: float, pending: int, limit: int) -> bool:
    """`user_recipients_per_hour`: one more recipient after `counted` in the window and
    `pending` in this transaction (0: no limit)."""
    return not limit or counted + pending < limit


class Lockout(enum.Enum):
    """The AUTH lockout given the failure counts (policy/throttle.py's docstring)."""

    OPEN = "open"  # check the password
    LOCKED = "locked"  # refuse unchecked
    UNLESS_KNOWN = "unless_known"  # refuse unchecked unless the user's network is known
    # Past a limit, but from a network the user is known from (the throttle's answer for
    # UNLESS_KNOWN then): check the password; only a right one changes the lockout's
    # answer (smtpd/session.py answers anything else exactly as LOCKED: no oracle).
    SPARED = "spared"


def usernet_limit(max_ip: int, max_user: int) -> int:
    """The limit of the per-(user, network) failures that ends a known network's
    exemption: `max_failures_per_user`, or `max_failures_per_ip` when that is 0 (the
    exemption from the per-address limit must not make a user's password guessable
    without end from their own network). 0: no limit at all."""
    return max_user or max_ip


def lockout(by_ip: float, by_user: float, by_usernet: float, *, user: str,
            max_ip: int, max_user: int) -> Lockout:
    """Failures counted per source address, per user and per (user, source network)
    against `max_failures_per_ip` / `max_failures_per_user` (0: no limit)."""
    over_ip = bool(max_ip) and by_ip >= max_ip
    over_user = bool(max_user and user) and by_user >= max_user
    if not (over_ip or over_user):
        return Lockout.OPEN
    if not user:
        return Lockout.LOCKED  # this address is guessing and names nobody
    # Past the per-address limit (someone behind this address, a NAT's other user, is
    # guessing) or the per-user one (someone is guessing this user's password). Refuse
    # unchecked, except from a network this user logged in from recently, unless that
    # network itself failed too often for this user (an attacker guessing alice's
    # password from alice's own NAT is stopped there as anywhere).
    if by_usernet >= usernet_limit(max_ip, max_user):
        return Lockout.LOCKED
    return Lockout.UNLESS_KNOWN
