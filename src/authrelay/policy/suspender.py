"""The reaction to a compromised account: count, decide, suspend, hold, tell the admin.

Owns: feeding a user's activity to the counters (policy/suspensions.py), asking
policy/containment.py whether a threshold is reached, and acting once it is:
1. the suspension is recorded (PostgreSQL for a farm, else this node's SQLite file);
   further MAIL from the user gets `450 4.7.1` (smtpd/session.py asks `suspended()`);
2. the user's messages still in the queue are held (`hold_user`, given by wiring.py: the
   scheduler itself, or scheduler/control.hold_user over the control socket from a
   receiving process; the scheduler also holds, instead of
   delivering, any message of a suspended user it is about to send: mail accepted in
   the same instant, or queued on another node of a farm);
3. `warning=user suspended` in the maillog with the figure that tripped, and the metric
   `authrelay_users_suspended_total{threshold=...}`;
4. ONE notice to `[limits.containment] notify` (default postmaster, through [aliases]),
   through spool/submit.py, the one way in, from the null sender (never counted, never
   bounced back). Only the process that created the suspension sends it.

Contract: every method is safe to call for any user; none raises to the caller (the
session, the scheduler): a counter or store failure is logged and the mail goes on.
Callers: the receiving session (`message_accepted` after the 250, `suspended` at MAIL)
and the scheduler (`refused` for the next hops' RCPT refusals that say the recipient is bad:
containment.refuses_recipient; `suspended` before a delivery). Failure policy: transient
for the client (450); nothing is bounced or deleted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from authrelay import aliases
from authrelay.auth.authenticator import account_for
from authrelay.config import Config, Containment
from authrelay.maillog import MailLog
from authrelay.metrics import Metrics
from authrelay.policy import containment
from authrelay.policy.containment import Trip
from authrelay.policy.shared import SharedCounters
from authrelay.policy.suspensions import State, make_state
from authrelay.policy.throttle import source_net
from authrelay.spool.envelope import Envelope, Recipient
from authrelay.spool.submit import Submitter

log = logging.getLogger(__name__)

HoldUser = Callable[[str], Awaitable[int]]


def _containment(cfg: Config) -> Containment:
    """`[limits.containment]` with `exempt` as accounts (`ALICE@REALM` for alice behind
    saslauthd): users are counted by account (session: Authenticator.account)."""
    c = cfg.limits.containment
    return dataclasses.replace(c, exempt=tuple(account_for(cfg, e) for e in c.exempt))


class Suspender:
    def __init__(self, cfg: Config, state: State, *, submitter: Submitter,
                 maillog: MailLog, metrics: Metrics | None = None,
                 hold_user: HoldUser | None = None) -> None:
        self.cfg = cfg
        self.ccfg = _containment(cfg)
        self.state = state
        self.submitter = submitter
        self.maillog = maillog
        self.metrics = metrics
        self.hold_user = hold_user
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pg_warned = False

    def reload(self, cfg: Config) -> None:
        self.cfg, self.ccfg = cfg, _containment(cfg)
        self.state.window = self.ccfg.window

    # ------------------------------------------------------------------ questions
    async def suspended(self, user: str) -> bool:
        """Is `user` suspended? (MAIL, and the scheduler before a delivery.) False when
        the stores cannot say: containment never stops mail because a store is down."""
        if not user:
            return False
        try:
            return await self.state.suspended(user)
        except Exception:
            log.exception("containment: cannot read suspensions")
            return False
        finally:
            self._pg_state()

    # ------------------------------------------------------------------ events
    async def message_accepted(self, user: str, qid: str, rcpts: list[str],
                               client_ip: str) -> None:
        """A message of `user` is in the queue (after the 250)."""
        if not containment.watched(user, self.ccfg):
            return
        c = self.ccfg
        items: list[tuple[str, str]] = []
        if c.messages:
            items.append(("messages", qid))
        if c.recipients:
            items += [("recipients", r.lower()) for r in rcpts]
        if c.networks and client_ip:
            items.append(("networks", source_net(client_ip)))
        await self._count(user, items)

    async def refused(self, user: str, addresses: list[str], *, earlier: int = 0) -> None:
        """Recipients of one of `user`'s messages the next hops refused as bad
        (containment.refuses_recipient); `earlier`: that message's recipients refused
        before (containment.refused_counted counts at most `refused_per_message` of a
        message)."""
        if not addresses or not self.ccfg.refused or not containment.watched(user, self.ccfg):
            return
        counted = containment.refused_counted(addresses, earlier,
                                              self.ccfg.refused_per_message)
        await self._count(user, [("refused", a) for a in counted])

    async def _count(self, user: str, items: list[tuple[str, str]]) -> None:
        if not items:
            return
        limits = {k: getattr(self.ccfg, k) for k in containment.KINDS if getattr(self.ccfg, k)}
        try:
            counts = await self.state.record(user, items, limits)
        except Exception:
            log.exception("containment: cannot count")
            return
        trip = containment.decide(user, counts, self.ccfg)
        if trip is not None:
            await self.trip(user, trip)

    # ------------------------------------------------------------------ acting
    async def trip(self, user: str, trip: Trip) -> bool:
        """Suspend `user` for `trip`; True when this call created the suspension. Then,
        in the background (the caller may be the scheduler in the middle of one of the
        user's deliveries, which the hold waits for): hold its mail, log, one notice."""
        try:
            created = await self.state.suspend(user, trip.describe(), self.cfg.hostname)
        except Exception:
            log.exception("containment: cannot record a suspension")
            return False
        finally:
            self._pg_state()
        if not created:
            return False  # another process or node got there first and acts
        t = asyncio.get_running_loop().create_task(self._act(user, trip))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return True

    async def _act(self, user: str, trip: Trip) -> None:
        held = 0
        if self.hold_user is not None:
            try:
                held = await self.hold_user(user)
            except Exception as e:  # the scheduler holds it at the next attempt anyway
                self.maillog.warning("containment: cannot hold the queue now; the "
                                     "scheduler holds each message before sending it",
                                     sasl_username=user, reason=str(e)[:200])
        self.maillog.warning("user suspended", sasl_username=user, threshold=trip.kind,
                             count=trip.count, limit=trip.limit,
                             window=containment.window_text(self.ccfg.window), held=held)
        if self.metrics is not None:
            self.metrics.suspended(trip.kind)
        try:
            await self._notice(user, trip, held)
        except Exception:
            log.exception("containment: cannot queue the notice")
            self.maillog.error("containment: cannot queue the admin notice",
                               sasl_username=user)

    def notify_addresses(self) -> list[str]:
        """Who gets the notice: `notify` (default postmaster) through [aliases], every
        address it expands to (a bare name gets @hostname, as local mail's does)."""
        got = aliases.expand(self.cfg, [self.ccfg.notify or "postmaster"])
        return got or [f"postmaster@{self.cfg.hostname}"]

    async def _notice(self, user: str, trip: Trip, held: int) -> None:
        to = self.notify_addresses()
        msg = EmailMessage()
        msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{self.cfg.hostname}>"
        msg["To"] = ", ".join(to)
        msg["Subject"] = f"authrelay: user {user} suspended ({trip.kind})"
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = make_msgid(domain=self.cfg.hostname)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
        msg.set_content(containment.notice(user, trip, self.ccfg,
                                           hostname=self.cfg.hostname, held=held))
        data = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        env = Envelope(queue_id="", sender="", recipients=[Recipient(a) for a in to],
                       helo=self.cfg.hostname, protocol="local", listener="containment")
        # The one way into the spool (spool/submit.py): Received, fsync, the from= line.
        draft = self.submitter.begin(env, add_missing=False, check_content=False)
        draft.write(data)
        try:
            await draft.commit(origin="containment")
        except BaseException:
            draft.abort()
            raise

    def _pg_state(self) -> None:
        problem = self.state.pg_problem
        if problem and not self._pg_warned:
            self._pg_warned = True
            self.maillog.warning("containment: suspensions not shared (PostgreSQL "
                                 "unavailable); this node keeps them locally",
                                 reason=problem[:200])
        elif not problem:
            self._pg_warned = False

    async def close(self) -> None:
        if self._tasks:  # a hold and notice under way: a moment to finish
            _, pending = await asyncio.wait(set(self._tasks), timeout=10)
            for t in pending:
                t.cancel()
        await self.state.close()


def make_suspender(cfg: Config, *, submitter: Submitter, maillog: MailLog,
                   metrics: Metrics | None = None,
                   hold_user: HoldUser | None = None,
                   redis: SharedCounters | None = None) -> Suspender | None:
    """The process's Suspender, or None when `[limits.containment] enabled = false`.
    `redis`: the process's Redis client for `[limits] shared` (one per process, so one
    "unreachable" line), else one of its own."""
    if not cfg.limits.containment.enabled:
        return None
    return Suspender(cfg, make_state(cfg, redis), submitter=submitter, maillog=maillog,
                     metrics=metrics, hold_user=hold_user)
