"""The one way into the spool: SMTP sessions, the sendmail command and bounces.

Owns what happens to every message on its way into the queue, whoever produced it:
- our `Received:` trace field (cleanup.received_for, RFC 5321 4.4), and `Date:` /
  `Message-ID:` when missing (RFC 6409 8.3, 8.6; cleanup.HeaderCleanup);
- refusals decided on the content: a NUL anywhere (RFC 5322 2.3 / RFC 6152: no NUL
  outside BINARYMIME, which we do not offer) -> 554 5.6.0; more `Received:` fields than
  `[limits] max_hops` (RFC 5321 6.3 loop detection, Postfix hopcount_limit) -> 554 5.4.6;
- 8-bit octets anywhere in the message mark it 8bit (`Envelope.body_8bit`) whatever the
  BODY parameter said (RFC 6152: accepted, as Postfix does without strict_8bitmime);
- free space: `space_ok()` before a transaction (`[limits] queue_min_free`, statvfs cached
  ~1 s) and ENOSPC / EDQUOT while writing -> 452 4.3.1, nothing half-written left;
- an authenticated user's From:/Sender: (issue 17): judged once, on the header section
  as received, as soon as it is complete (policy/ownership.py; no second read of the
  message): `[auth] from_header_policy = "own"` refuses a mailbox the user does not own
  (550 5.7.1, nothing more stored), else such a message is not signed unless `[dkim]
  sign_unowned` (`dkim=skipped, reason=From: not owned by user`);
- the DKIM hook (`Signer`: `bind(queue_id, owner, from_domain=...).sign_stream(pieces)
  -> header lines | None`; no signer bound when the From: domain the ownership check
  read has no key) runs once, before commit, on the message (read back from disk in
  chunks for a streamed one); its lines are stored as the queue file's prepend, which the courier
  sends first (spool/format.py);
- durability (Incoming.commit: fsync before the caller answers 250) and the one maillog
  `from=` line per accepted message.

Contract (docs/INTERFACES.md):

    sub = Submitter(spool, cfg, maillog=ml, signer=dkim_signer)  # wiring.submitter()
    draft = sub.begin(env, tls=..., add_missing=...)  # no I/O
    draft.write(bytes) ...                            # never raises for I/O or content
    await draft.commit(**extra_log_fields)            # or draft.commit_blocking()
    draft.abort()                                     # idempotent; after any failure

`write()` takes the message as the producer has it (CRLF line ends, not dot-stuffed).
It records the first problem and drops the rest; `commit()` then raises `Refused` with
the reply to give (`.reply`, `.reason` for the log) and nothing is stored. OSError from
commit is mapped to `Refused` too (452 4.3.1 for a full disk, else 451 4.3.0): callers
catch one exception. The caller logs the refusal (it knows the client); the submitter
logs the `from=` line of accepted mail.
Failure policy: content refusals are permanent (5xx), storage trouble transient (4xx).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from authrelay import aliases, replies
from authrelay.address import orcpt_of
from authrelay.config import Config
from authrelay.maillog import MailLog
from authrelay.policy.ownership import NO_FROM, Owner
from authrelay.spool.cleanup import HeaderCleanup, received_for
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.format import SpoolError
from authrelay.spool.store import Spool
from authrelay.spool.writer import Incoming, MessageSigner
from authrelay.types import Reply


class BoundSigner(MessageSigner, Protocol):
    """The signer of one message (dkim/signer.py's `Signer.bind`)."""

    def skip(self, reason: str) -> None:
        """Not signed by policy: the maillog's `dkim=skipped, reason=...`."""


class Signer(Protocol):
    """The signing seam of the accept path (dkim/signer.py's Signer)."""

    def bind(self, queue_id: str, owner: Owner | None = None, *,
             crlf_only: bool = False, from_domain: str = "") -> BoundSigner | None:
        """The signer for one message (its maillog notes carry the queue id; `owner`: an
        authenticated user's, signed only for its own From:; `crlf_only`: the message
        holds no bare CR or LF; `from_domain`: its From: domain as the ownership check
        read it, "" when not known); None when nothing can be signed (no key at all, or
        none for `from_domain`: then noted `dkim=none` already), so a streamed file is not
        read back and the commit thread parses nothing."""

    def reload(self, cfg: Config) -> None:
        """SIGHUP: re-read the keys and `[dkim]`."""

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# The maillog's reason on an authenticated user's message left unsigned for its From:.
FROM_NOT_OWNED_NOTE = "From: not owned by user"  # = dkim.signer.FROM_NOT_OWNED
SPACE_CACHE = 1.0  # seconds a statvfs answer is reused
# Seconds the scheduler's notice of a committed message waits for the message's `from=`
# line to be written (MailLog.then) before it goes anyway: a log target that takes
# nothing (a pipe nobody reads, a hung NFS mount) must not hold deliveries until the
# scheduler's rescan. A target that writes normally takes the writer's 5 ms gather and one
# write; 2 s is the syslog target's own limit for a batch (syslogsocket.SEND_TIMEOUT),
# past which the maillog already treats a target as stalled.
NOTICE_WAIT = 2.0


class Refused(Exception):
    """The message is not queued; `reply` says why (to the client), `reason` to the log."""

    def __init__(self, reply: Reply, reason: str = "", errno: int | None = None) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply
        self.reason = reason or reply.text
        self.errno = errno  # the OSError behind a storage refusal

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500


def _announce_on(loop: asyncio.AbstractEventLoop, announce: Callable[[], None]) -> None:
    """`announce` on `loop`: now when called on it (a maillog without a writer thread),
    else (the writer thread) handed to it, unless it has closed."""
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        announce()
    elif not loop.is_closed():
        loop.call_soon_threadsafe(announce)


def _logged(mark: Callable[[], None], then: Callable[[], None]) -> None:
    """In the maillog's writer thread, once a message's `from=` line is written: its
    file's mark cleared (Incoming.logged), then `then` (the notice)."""
    mark()
    then()


class _Notice:
    """The scheduler's notice of one committed message: sent once, by the first caller.
    Sent by the timer (`expire`, its `from=` line not written yet) it is `owed` instead,
    and the line written later is `logged` (spool/notify.py): a producer that dies in
    between leaves the line to the scheduler."""

    __slots__ = ("announce", "due", "owed", "logged", "expired")

    def __init__(self, announce: Callable[[], None], due: float,
                 owed: Callable[[], None] | None = None,
                 logged: Callable[[], None] | None = None) -> None:
        self.announce: Callable[[], None] | None = announce
        self.due = due
        self.owed = owed
        self.logged = logged
        self.expired = False

    def send(self) -> None:
        """The line is written (on the loop)."""
        announce, self.announce = self.announce, None
        if announce is not None:
            announce()
        elif self.expired:
            self.tell_logged()

    def expire(self) -> None:
        """NOTICE_WAIT passed (on the loop)."""
        announce, self.announce = self.announce, None
        if announce is not None:
            (self.owed or announce)()
            self.expired = True  # (after the owed notice went: `logged` follows it)

    def tell_logged(self) -> None:
        logged, self.logged = self.logged, None
        if logged is not None:
            logged()


def _line_written(loop: asyncio.AbstractEventLoop, notice: _Notice) -> None:
    """In the maillog's writer thread, the `from=` line written: a notice that went by
    its timer is followed by "logged" from here (a loop closed meanwhile, a stopping
    worker, must not keep it), else the notice goes on its loop."""
    if notice.expired:
        notice.tell_logged()
    else:  # (expired meanwhile: the loop's send() tells it)
        _announce_on(loop, notice.send)


class _Notices:
    """The notices of one event loop not sent yet, oldest first. Each goes once its
    message's `from=` line is written (MailLog.then, handed back to the loop) or
    NOTICE_WAIT after the commit, whichever is first: one timer for all of them, armed
    only while some wait, so a log that writes normally costs a deque entry per message."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waiting: deque[_Notice] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, announce: Callable[[], None], owed: Callable[[], None] | None = None,
            logged: Callable[[], None] | None = None) -> _Notice:
        """`announce`'s notice: `send()` sends it (at most once); it goes by itself
        NOTICE_WAIT from now, as `owed` when given (see _Notice)."""
        n = _Notice(announce, self.loop.time() + NOTICE_WAIT, owed, logged)
        self._waiting.append(n)
        if self._timer is None:
            self._timer = self.loop.call_at(n.due, self._expire)
        return n

    def _expire(self) -> None:
        self._timer = None  # (a notice that raised leaves the rest to the next add's timer)
        now = self.loop.time()
        waiting = self._waiting
        while waiting and (waiting[0].announce is None or waiting[0].due <= now):
            waiting.popleft().expire()  # (a no-op for one sent already)
        if waiting:
            self._timer = self.loop.call_at(waiting[0].due, self._expire)


def log_queued(ml: MailLog, env: Envelope, size: int, **log: Any) -> None:
    """The `from=` line of a message queued with `env` (`size` bytes; `log`: fields
    after the usual ones): the submitter's, and the scheduler's for a message whose
    producer died before it wrote it (with `logged_by=scheduler`)."""
    if env.is_bounce:
        ml.queued(env.queue_id, env.sender, size, len(env.recipients), **log)
    elif env.listener == "sendmail" or env.protocol == "local":
        ml.queued(env.queue_id, env.sender, size, len(env.recipients),
                  relay="local", proto="local", **log)
    else:
        ml.queued(env.queue_id, env.sender, size, len(env.recipients),
                  relay=f"{env.client_rdns or 'unknown'} [{env.client_ip}]",
                  proto=env.protocol, auth=env.auth_user or None,
                  helo=env.helo or None, **log)


def _io_refusal(e: BaseException) -> Refused:
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return Refused(replies.NO_STORAGE, os.strerror(e.errno), e.errno)
    if isinstance(e, OSError) and e.errno is not None:
        return Refused(replies.SPOOL_ERROR, f"spool I/O error: {os.strerror(e.errno)}",
                       e.errno)
    return Refused(replies.SPOOL_ERROR, f"spool error: {e}")


class Submitter:
    """Accepts messages into one spool for one configuration (see module docstring)."""

    def __init__(self, spool: Spool, cfg: Config, *, maillog: MailLog,
                 signer: Signer | None = None) -> None:
        self.spool = spool
        self.cfg = cfg
        self.maillog = maillog
        self.signer = signer
        self._space: tuple[float, int] = (-1e9, 0)  # (monotonic time, bytes free)
        self._notices: _Notices | None = None  # of the event loop that commits
        # Told +1 when a message begins and -1 when it is committed or aborted (the
        # queue's "incoming" gauge: metrics.Metrics.receiving, set by wiring).
        self.receiving: Callable[[int], None] | None = None

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        if self.signer is not None:  # the DKIM signer re-reads its keys and [dkim]
            self.signer.reload(cfg)

    def notices(self, loop: asyncio.AbstractEventLoop) -> _Notices:
        """The pending scheduler notices of `loop` (one loop per process in serve)."""
        if self._notices is None or self._notices.loop is not loop:
            self._notices = _Notices(loop)
        return self._notices

    # ------------------------------------------------------------------ free space
    def free_bytes(self) -> int:
        """Bytes available to us in the queue directory (statvfs, cached ~1 s)."""
        now = time.monotonic()
        at, free = self._space
        if now - at >= SPACE_CACHE:
            st = os.statvfs(self.spool.queue_dir)
            free = st.f_bavail * st.f_frsize
            self._space = (now, free)
        return free

    def space_ok(self, size: int = 0) -> bool:
        """Room for a message of `size` bytes (RFC 1870 SIZE, else 0) above queue_min_free?
        As Postfix smtpd: free - size must stay at or above the minimum. A statvfs error
        is answered as "no room" (transient 452, never a lost message)."""
        need = self.cfg.limits.min_free_bytes
        if need <= 0:
            return True
        try:
            return self.free_bytes() - max(size, 0) >= need
        except OSError:
            return False

    # ------------------------------------------------------------------ messages
    def begin(self, env: Envelope, *, tls: str = "", add_missing: bool = True,
              local_uid: int | None = None, nul_checked: bool = False,
              lines_checked: bool = False,
              check_content: bool = True, sign: bool | None = None,
              owner: Owner | None = None, refuse_unowned: bool = True,
              create_early: bool = False, on_loop: bool = False) -> Draft:
        """A new message for `env` (queue id assigned if empty). `nul_checked`: the producer
        already refuses NUL (smtpd/bodyreader.py); `lines_checked`: it refuses every bare CR
        and LF (the same reader), so the signer need not look at line ends again.
        `check_content=False` (bounces we build)
        skips the NUL and hop checks. `sign`: hand the message to the signer (mail we
        originate); None decides from the envelope: authenticated senders, the sendmail
        command and our bounces are signed, anything else (inbound to a local domain) is
        not -- a trusted-network client has no mark in the envelope, so the SMTP session
        passes `sign=True` for it. `owner`: the authenticated user and its addresses; the
        From:/Sender: of the header as received is checked against them (`[auth]
        from_header_policy`, `[dkim] sign_unowned`). None (trusted networks, trusted local
        users, bounces): no check, as before. `refuse_unowned=False`: an unowned From: only
        goes unsigned, whatever from_header_policy says (an untrusted local user's mail,
        as sendmail takes it). `create_early`: the queue file is created by a commit
        thread now, while the message arrives (spool/writer.py Incoming.create_early;
        on an event loop). `on_loop`: the producer writes on an event loop and awaits
        `Draft.spill_wait()` between writes: past 128 KiB the file is made by a commit
        thread, never on the loop (Incoming.on_loop; implied by `create_early`)."""
        if not env.queue_id:
            env.queue_id = new_queue_id()
        if env.is_bounce:
            _to_local_sender(self.cfg, env)
        else:
            _to_local_recipients(self.cfg, env)
        if sign is None:
            sign = bool(env.auth_user) or env.is_bounce or env.listener == "sendmail"
        draft = Draft(self, env, tls=tls, add_missing=add_missing, local_uid=local_uid,
                      scan_nul=check_content and not nul_checked, check_hops=check_content,
                      sign=sign, owner=owner, refuse_unowned=refuse_unowned,
                      crlf_only=lines_checked, on_loop=on_loop or create_early)
        if create_early:
            draft.create_early()
        return draft


def _to_local_sender(cfg: Config, env: Envelope) -> None:
    """A DSN for a local sender (cron's root@hostname, www-data@hostname: the sendmail
    command's envelope sender) goes where [aliases] send that user's mail, as Postfix
    delivers it to the local mailbox and so through aliases(5); unexpanded it went to the
    relay's own host name and was lost. Its To: still names the sender; a non-local or
    unaliased address is unchanged."""
    sender = [r.address for r in env.recipients]
    targets = aliases.expand(cfg, sender)
    if targets and [a.lower() for a in targets] != [a.lower() for a in sender]:
        env.recipients = [Recipient(address=a) for a in targets]
        env.smtputf8 = not all(a.isascii() for a in targets)


def _to_local_recipients(cfg: Config, env: Envelope) -> None:
    """Recipients at this relay's own names (`hostname`, localhost: `RCPT TO:<Postmaster>`
    when no local_domains are set, `root@hostname`) go where [aliases] send them, as the
    sendmail command's do: delivered by MX they went to our own name (a loop, 5.4.6, or
    NXDOMAIN) and were bounced, so mail for the postmaster (RFC 5321 4.5.1) never reached
    one. Each target keeps its recipient's NOTIFY and ORCPT, or without one gets ORCPT
    naming the recipient as received (RFC 3461 4.2, as Postfix passes it on), so the
    DSN's Original-Recipient says which of the sender's recipients it is about, and a
    next hop's DSN too; other recipients, and mail already expanded (the sendmail
    command's), are unchanged."""
    if not any(aliases.is_local(cfg, r.address) for r in env.recipients):
        return  # the usual case: no aliases_file read for mail to other domains
    out: list[Recipient] = []
    seen: set[str] = set()
    changed = False
    for r in env.recipients:
        targets = aliases.expand(cfg, [r.address])
        if [a.lower() for a in targets] != [r.address.lower()]:
            changed = True
        for a in targets:
            if a.lower() not in seen:
                seen.add(a.lower())
                out.append(r if a == r.address else
                           replace(r, address=a, orcpt=r.orcpt or orcpt_of(r.address)))
    if changed:
        env.recipients = out
        env.smtputf8 = env.smtputf8 or not all(r.address.isascii() for r in out)


class Draft:
    """One message on its way in: write() then commit(), or abort()."""

    def __init__(self, sub: Submitter, env: Envelope, *, tls: str, add_missing: bool,
                 local_uid: int | None, scan_nul: bool, check_hops: bool,
                 sign: bool = False, owner: Owner | None = None,
                 refuse_unowned: bool = True, crlf_only: bool = False,
                 on_loop: bool = False) -> None:
        self.submitter = sub
        self._crlf_only = crlf_only
        self.sign = sign
        self.owner = owner
        self._refuse_unowned = refuse_unowned
        # None: not decided yet (or no owner); "": every From:/Sender: mailbox is the
        # owner's; else why not. Decided once, on the header section as received.
        self.from_verdict: str | None = None
        self._from_domain = ""  # the one From: domain, when the verdict is "" (assess)
        self.envelope = env
        self.queue_id = env.queue_id
        self._cleanup = HeaderCleanup(
            received_for(env, sub.cfg.hostname, tls=tls, local_uid=local_uid),
            sub.cfg.hostname, add_missing=add_missing)
        self._incoming: Incoming = sub.spool.begin(env)
        self._notifier = sub.spool.notifier
        # Our own lines are CRLF (cleanup, the signer): the file is, when the producer's were.
        self._incoming.lines_checked = crlf_only
        self._incoming.on_loop = on_loop
        self._incoming.log_owed = True  # the `from=` line is ours, after the commit
        if sub.receiving is not None:
            sub.receiving(1)
        self._scan_nul = scan_nul
        self._check_hops = check_hops
        self._problem: Refused | None = None
        self.nul = False
        self.received = 0  # bytes given to write()
        self._done = False
        # commit()'s refusal, set before it waits for the file's removal: a caller whose
        # own bound ends that wait (a frozen spool) answers with it.
        self.refused: Refused | None = None

    def create_early(self) -> None:
        """Have a commit thread create the queue file now, while the message arrives
        (Incoming.create_early; on an event loop)."""
        self._incoming.create_early()

    def spill_wait(self) -> asyncio.Future[Any] | None:
        """What to await (asyncio.wait) before the next write(), or None: the early
        create still being made past 128 KiB (Incoming.spill_wait)."""
        return self._incoming.spill_wait()

    def abandon(self) -> bool:
        """The caller gives up waiting for commit() (Incoming.abandon): True unless the
        message is durable already; then commit() ends in Refused, its file removed,
        and the scheduler is told (Notifier.abandoned: it drops the file should this
        process die before the commit thread removes it)."""
        if not self._incoming.abandon():
            return False
        entry = self._notifier.abandoned(self.queue_id)
        if entry >= 0:  # kept in the book until the commit thread has returned
            self._incoming.when_settled(functools.partial(self._notifier.settled, entry))
        return True

    @property
    def size(self) -> int:
        """Bytes stored so far (our header lines included)."""
        return self._incoming.size

    @property
    def hops(self) -> int:
        return self._cleanup.hops

    @property
    def header_section(self) -> bytes:
        """The header section as it arrived (for a bounce built by the caller)."""
        return self._cleanup.header_section

    def mark_nul(self) -> None:
        """The producer found a NUL itself (the body reader): refuse at commit. What was
        stored so far is dropped now (a streamed file does not wait for the end of data)."""
        self.nul = True
        self._incoming.abort()

    def write(self, data: bytes) -> None:
        if self._problem is not None or self._done:
            return
        self.received += len(data)
        if self.nul:
            return  # will be refused: store nothing more
        if self._scan_nul and data.find(b"\x00") >= 0:
            self.mark_nul()
            return
        if not self.envelope.body_8bit and not data.isascii():
            # RFC 6152: 8-bit octets without BODY=8BITMIME (or with BODY=7BIT) are
            # accepted, as Postfix does, and recorded: relayed with BODY=8BITMIME where
            # offered, converted for a next hop without it (delivery/downgrade.py).
            self.envelope.body_8bit = True
        try:
            out = self._cleanup.feed(data)
            if out and self.owner is not None and self.from_verdict is None \
                    and self._from_refused():
                return
            if out:
                self._incoming.write(out)
        except (OSError, SpoolError) as e:
            self._fail(e)

    def _from_refused(self) -> bool:
        """Decide From: ownership on the header section as it arrived (complete now: the
        cleanup released it), before anything of ours is prepended and without reading the
        message back. With from_header_policy "own" a mailbox the user does not own
        refuses the message: nothing more is stored, commit() raises Refused."""
        assert self.owner is not None
        if self._cleanup.header_truncated:  # a From: could hide past what was looked at
            verdict = "header section too large to vouch for its From:"
        else:
            verdict, self._from_domain = self.owner.assess(self._cleanup.header_section)
        self.from_verdict = verdict
        # No From: at all claims no address: not signed, but not refused either.
        if verdict and verdict != NO_FROM and self._refuse_unowned \
                and self.submitter.cfg.auth.from_policy == "own":
            self._problem = Refused(replies.FROM_NOT_OWNED, verdict)
            self._incoming.abort()
            return True
        return False

    def _fail(self, e: BaseException) -> None:
        self._problem = _io_refusal(e)
        self._incoming.abort()  # nothing half-written stays

    def _check(self) -> None:
        if self.nul:
            raise Refused(replies.MSG_NUL)
        if self._problem is not None:
            raise self._problem
        limit = self.submitter.cfg.limits.max_hops
        if self._check_hops and limit and self._cleanup.hops > limit:
            raise Refused(replies.TOO_MANY_HOPS,
                          f"{self._cleanup.hops} Received: headers (max_hops {limit})")

    def _prepare(self) -> None:
        if self._done:
            raise SpoolError("commit after commit/abort")
        tail = self._cleanup.finish()
        if self.owner is not None and self.from_verdict is None and self._problem is None \
                and not self.nul and self._from_refused():
            tail = b""  # a message that is all header: decided at its end
        self._check()  # header counting is complete once finish() ran
        try:
            if tail:
                self._incoming.write(tail)
        except (OSError, SpoolError) as e:
            self._fail(e)
            raise self._problem from None  # type: ignore[misc]
        if self.sign:
            self._incoming.signer = self._signer()

    def _signer(self) -> MessageSigner | None:
        """The signer for this message, or None (unsigned). An authenticated user's
        message is signed only when its From:/Sender: is the user's, unless `[dkim]
        sign_unowned`; the signer checks its own parse of the stored header again."""
        signer = self.submitter.signer
        if signer is None:
            return None
        owner = self.owner
        # The From: domain the ownership check read (all owned): a domain without a key
        # is noted here and binds no signer, so the commit thread parses nothing.
        dom = self._from_domain
        if owner is None or self.submitter.cfg.dkim.sign_unowned:
            return signer.bind(self.queue_id, crlf_only=self._crlf_only, from_domain=dom)
        bound = signer.bind(self.queue_id, owner=owner, crlf_only=self._crlf_only,
                            from_domain=dom)
        if bound is not None and self.from_verdict:
            bound.skip(NO_FROM if self.from_verdict == NO_FROM else FROM_NOT_OWNED_NOTE)
            return None
        return bound

    async def commit(self, on_durable: Callable[[], None] | None = None,
                     **log: Any) -> None:
        """Durable when this returns (fsync); then the maillog `from=` line. Raises
        Refused (nothing stored). Cancelled, it raises CancelledError once the commit
        thread is done: the message may have been stored, and then its `from=` line was
        logged and it will be delivered (spool/writer.py Incoming.commit).
        `on_durable` (the session's 250) runs once the message is durable, before the
        `from=` line is made and the scheduler told: neither is owed to the client, and
        a crash in between leaves what it did before (a committed file, delivered after
        a rescan; the line was only queued for the maillog's writer thread then). It
        runs in the loop callback that brings the commit thread's result
        (Incoming.commit), not loop turns later when this coroutine resumes."""
        ran: list[bool] = []
        failed: list[Exception] = []

        def durable() -> None:  # (in a loop callback: what it raises is raised below)
            ran.append(True)
            self._end()
            if on_durable is not None:
                try:
                    on_durable()
                except Exception as e:
                    failed.append(e)
        try:
            self._prepare()
            await self._incoming.commit(announce=False, on_durable=durable)
        except Refused as e:
            self.refused = e
            await self.discard()  # the refusal's reply goes once no file can be made
            raise
        except (OSError, SpoolError) as e:
            await self.discard()
            raise _io_refusal(e) from None
        except asyncio.CancelledError:
            if self._incoming.committed:  # kept (spool/writer.py): it will go out, so logged
                self._committed(log)
            else:
                self.abort()
            raise
        self._committed(log, None if ran else on_durable)
        if failed:
            raise failed[0]

    def commit_blocking(self, **log: Any) -> None:
        """commit() without an event loop (the sendmail command)."""
        try:
            self._prepare()
            self._incoming.commit_blocking(announce=False)
        except Refused:
            self.abort()
            raise
        except (OSError, SpoolError) as e:
            self.abort()
            raise _io_refusal(e) from None
        self._committed(log)

    def _committed(self, log: dict[str, Any],
                   on_durable: Callable[[], None] | None = None) -> None:
        """`on_durable`, then the maillog `from=` line, then the scheduler told
        (Incoming.announce) once that line is written (MailLog.then): a delivery line
        never comes before it, whichever thread or process delivers, while the log target
        takes lines: on an event loop the notice goes NOTICE_WAIT after the commit if
        the line is not written by then (a stalled target), and when it is written it is
        handed back to the loop (the Notifier is the loop's); its loop closed meanwhile
        (a stopping worker), the scheduler's rescan finds the message."""
        self._end()
        try:
            if on_durable is not None:
                on_durable()
        finally:
            try:
                self._log_queued(log)
            finally:
                inc = self._incoming
                try:
                    loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is None:
                    self.submitter.maillog.then(functools.partial(
                        _logged, inc.logged, inc.announce))
                else:
                    notifier = self.submitter.spool.notifier
                    notice = self.submitter.notices(loop).add(
                        inc.announce,
                        functools.partial(notifier.notify, inc.queue_id, inc.vouched,
                                          os.getpid()),
                        functools.partial(notifier.logged, inc.queue_id))
                    self.submitter.maillog.then(functools.partial(
                        _logged, inc.logged, functools.partial(_line_written, loop, notice)))

    def _log_queued(self, log: dict[str, Any]) -> None:
        ml = self.submitter.maillog
        env, inc = self.envelope, self._incoming
        if inc.sign_error:
            ml.warning(f"not signed: {inc.sign_error}", queue_id=env.queue_id)
        log_queued(ml, env, inc.size, **log)

    def abort(self) -> None:
        """Drop the message (idempotent); never raises."""
        if not self._done:
            self._end()
            self._incoming.abort()

    async def discard(self) -> None:
        """abort(), returning once no file of the message can exist (Incoming.gone: an
        early create still under way has made and removed it). Only a refusal waits for
        that (an accepted message never does)."""
        self.abort()
        await self._incoming.gone()

    def _end(self) -> None:
        """Committed or aborted: no longer being received (once)."""
        if self._done:
            return
        self._done = True
        if self.submitter.receiving is not None:
            self.submitter.receiving(-1)
