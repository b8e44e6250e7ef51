"""Containment of a compromised account: the decisions, as pure functions of counters.

Owns: when a user's recent activity means "this account is sending for someone else"
(`decide`), what a suspended user's MAIL is answered (`mail_refusal`), and the text of
the one notice the admin gets (`notice`). No I/O: the counts come from the stores in
policy/suspensions.py, and policy/suspender.py acts on a verdict.

Contract: `decide(counts, cfg)` -> the first threshold reached (`Trip`), or None. A
threshold of 0 is off; `enabled = false` or an exempt user is never tripped. Thresholds
count within `[limits.containment] window` (sliding): messages accepted, distinct
recipient addresses, distinct recipient addresses the next hops refused as bad recipients
(`refuses_recipient`; at most `refused_per_message` of them from one message:
`refused_counted`), distinct client networks (/24 for IPv4, /64 for IPv6:
policy/throttle.source_net).

What counts as refused (`refuses_recipient`): only a 5xx reply to RCPT that says the
RECIPIENT is bad: enhanced status 5.1.x but 5.1.7 and 5.1.8 (RFC 3463 3.2: bad mailbox,
address, domain; 5.1.7/5.1.8 are the sender's, which Postfix reports at RCPT) or
5.2.x but 5.2.3 (3.3: mailbox disabled, full; 5.2.3 is the message's length), or, from a
server giving no enhanced code, 550, 551 or 553 (RFC 5321 4.2.2); never a refusal about
the sender whatever its code (`about_sender`: Postfix's "Sender address rejected"). Not counted: a
refusal at the greeting, EHLO, MAIL or DATA (it is about the relay, the sender or the
message, and applies to every recipient alike); 5.7.x at RCPT (policy: "client host
blocked using zen.spamhaus.org", a blocked tenant: it describes the relay or the
content); any other 5xx with an enhanced code (5.0.0, 5.3.x, 5.4.x, 5.5.x...); 4xx; and
verdicts of our own (DNS: no such domain, null MX; no SMTPUTF8 or 8BITMIME at the next
hop). Otherwise the relay's address on a blocklist, or its smart-host tenant blocked,
would make every message of every active user a refusal and suspend them all: a limit an
outsider, or an accident (a resolver answering NXDOMAIN for everything), turns against
every legitimate user.

Why refusals are capped per message: a compromised account sends many messages to
harvested lists, and refusals come from message after message; a person's one reply-all
to a stale list of 100 dead addresses is 100 refusals from one message. Counting every
recipient suspended that person at once (`refused = 100`); counting at most 10 a message
takes ten such messages within the window, while a spam run still trips: 100 refused
one-recipient messages, or 10 messages of 10 refused each. Refusals count by address
(distinct), so replying again to the same dead list adds nothing new.

Failure policy: a suspension is transient for the client: `450 4.7.1` at MAIL (RFC 5321
4.2.5: the client keeps the message and retries; nothing is bounced), so a false positive
costs a delay, never a lost message. Anchors: Microsoft 365 and Google Workspace restrict
a sender after suspicious volume and an admin lifts it; Postfix and sendmail have nothing.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from authrelay.config import Containment
from authrelay.types import Reply


@dataclass(frozen=True)
class Suspension:
    """A suspended user: when (unix seconds), why (the figure that tripped), by which node
    (policy/suspensions.py stores it; auth/pgusers.py too, for the farm)."""

    user: str
    at: int
    reason: str
    node: str = ""

# RFC 3463 4.7.1: delivery not authorized (policy); 450: mailbox unavailable, try later.
SUSPENDED = Reply(450, "4.7.1", "Sending suspended for this account: contact the "
                                "administrator")

KINDS = ("messages", "recipients", "refused", "networks")


@dataclass(frozen=True)
class Counts:
    """A user's activity within the window."""

    messages: int = 0
    recipients: int = 0
    refused: int = 0
    networks: int = 0


@dataclass(frozen=True)
class Trip:
    """The threshold that tripped: `kind` (one of KINDS), the count and the limit."""

    kind: str
    count: int
    limit: int

    def describe(self) -> str:
        """For the maillog and the notice: "recipients=1000 (limit 1000 per 1h)"."""
        return f"{self.kind}={self.count} (limit {self.limit})"


def watched(user: str, cfg: Containment) -> bool:
    """Whether `user`'s activity is counted at all."""
    return cfg.enabled and bool(user) and user not in cfg.exempt and any(
        getattr(cfg, k) for k in KINDS)


def decide(user: str, counts: Counts, cfg: Containment) -> Trip | None:
    """The first threshold `counts` reached, in KINDS order; None: nothing to do."""
    if not watched(user, cfg):
        return None
    for kind in KINDS:
        limit = getattr(cfg, kind)
        n = getattr(counts, kind)
        if limit and n >= limit:
            return Trip(kind, n, limit)
    return None


def refuses_recipient(code: int, enhanced: str | None) -> bool:
    """Whether a next hop's reply `code` to RCPT, with the enhanced status code the server
    gave (None when it gave none), says the recipient is bad (see the module header)."""
    if not 500 <= code < 600:
        return False
    if enhanced is None:
        return code in (550, 551, 553)
    try:
        klass, subject, detail = (int(p) for p in enhanced.split("."))
    except ValueError:  # not three numbers
        return False
    # RFC 3463 3.2: X.1.7 / X.1.8 are the SENDER's address (bad syntax, bad system):
    # Postfix reports its sender checks at RCPT (smtpd_delay_reject), "550 5.1.8 <a@b>:
    # Sender address rejected: Domain not found" to every recipient alike.
    # RFC 3463 3.3: X.2.3 "message length exceeds administrative limit" is the message's.
    return klass == 5 and ((subject == 1 and detail not in (7, 8))
                           or (subject == 2 and detail != 3))


# A refusal at RCPT that names the SENDER: Postfix's sender restrictions, reported at RCPT
# (smtpd_delay_reject), all say "<sender>: Sender address rejected: ..." whatever their
# code (reject_unlisted_sender 550 5.1.0, reject_unverified_sender 5.1.1 from its probe);
# Exim's sender verification at RCPT says "Sender verify failed".
_SENDER_REFUSED = re.compile(r"sender address rejected|sender verify failed", re.IGNORECASE)


def about_sender(text: str, sender: str = "", rcpt: str = "") -> bool:
    """Whether a next hop's refusal of RCPT `rcpt` (its text, codes stripped or not) is
    about the envelope `sender`, not the recipient: by its words, or by naming the sender
    first (`<sender>: ...`, Postfix's form) when it is not also the recipient. Such a
    refusal is not counted as a refused recipient, whatever its code."""
    if _SENDER_REFUSED.search(text):
        return True
    return bool(sender) and sender.lower() != rcpt.lower() and \
        text.lstrip().lower().startswith(f"<{sender.lower()}>:")


def refused_before(last_reply: str, sender: str = "", rcpt: str = "") -> bool:
    """Whether a recipient's recorded last reply ("550 5.1.1 text", as the scheduler keeps
    it: an enhanced code the server did not give is filled in as X.0.0) may have counted
    as refused (`refuses_recipient`, X.0.0 taken as no code; not `about_sender`, as
    delivery/client.py judges it). For the per-message cap only: a reply wrongly taken as
    counted leaves less room, never more."""
    parts = last_reply.split(None, 2)
    try:
        code = int(parts[0])
    except (ValueError, IndexError):
        return False
    enhanced = parts[1] if len(parts) > 1 and parts[1].count(".") == 2 else None
    if about_sender(parts[2] if len(parts) > 2 and enhanced else " ".join(parts[1:]),
                    sender, rcpt):
        return False
    if enhanced == f"{code // 100}.0.0":
        enhanced = None
    return refuses_recipient(code, enhanced)


def refused_counted(refused: list[str], earlier: int, cap: int) -> list[str]:
    """Of the addresses a next hop has just refused in one message (`refuses_recipient`),
    those that
    count: at most `cap` per message, `earlier` being how many of that message's
    recipients were refused in its earlier delivery attempts (other destinations, other
    passes). Lower-cased, de-duplicated, in a stable order (sorted), so the same list
    refused again counts the same addresses, not new ones."""
    room = max(0, cap - earlier)
    return sorted({a.lower() for a in refused})[:room]


def mail_refusal(suspended: bool) -> Reply | None:
    """MAIL from an authenticated user: `450 4.7.1` while suspended, else None."""
    return SUSPENDED if suspended else None


def window_text(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def notice(user: str, trip: Trip, cfg: Containment, *, hostname: str, held: int) -> str:
    """The body of the one message the admin gets when `user` is suspended. The commands
    in it name the user quoted for a POSIX shell: the admin pastes them, and the account
    may be a login name as a client sent it (saslauthd's: blanks, `;`, `$(...)`)."""
    arg = shlex.quote(user)
    return (
        f"authrelay on {hostname} suspended sending for the user {user}.\n\n"
        f"Threshold reached: {trip.kind}: {trip.count} within "
        f"{window_text(cfg.window)} (limit {trip.limit}).\n"
        f"Messages of {user} held in the queue: {held} (not sent, not deleted).\n\n"
        "Until you act, every MAIL from this user gets '450 4.7.1' (mail clients keep\n"
        "the message and retry; nothing is bounced). If the account is compromised,\n"
        "change its password (authrelay user passwd) and revoke its app passwords\n"
        "(authrelay user app-password list / revoke), look at the held mail\n"
        "(authrelay queue list), then:\n\n"
        f"  authrelay user resume {arg} --delete-held   # spam: drop the held mail\n"
        f"  authrelay user resume {arg} --release       # a false alarm: send it\n"
    )
