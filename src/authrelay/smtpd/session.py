"""One SMTP connection: the I/O adapter that drives the sans-I/O engine (protocol.py).

Owns what the engine cannot do itself: reading and writing the socket (listener.py), the
deadlines (command_timeout; data_block_timeout and data_final_timeout in DATA), the TLS
handshake, AUTH backend calls and failure delays, the awaits policy needs (user rates,
host checks; the decisions themselves are policy/verdicts.py's), the spool draft and its
durable commit, and the maillog/metrics lines. Everything about the SMTP dialogue itself
(grammar, order, per-command checks, replies) is the engine's.

Contract: `Session(deps, conn, ticket)`; `await run()`; `expire()` ends it at the session
time limit. `deps` (SessionDeps) holds narrow interfaces only (config, relay policy,
authenticator, spool submit function, host checks, TLS context, maillog, metrics), never
the server; `ticket` is the admission ticket (`command_timeout`, per-client throttle
calls, `release()`), so server.py imports session.py and not the other way round.

Bounded per connection, whatever the client does (issue 9): commands are executed only
while unsent output stays under listener.OUT_HIGH_WATER (a client that never reads stalls
itself), at most BATCH pipelined commands run before the loop yields to other sessions,
input is buffered up to listener.HIGH_WATER, and a connection closed for a limit or a
timeout is aborted after a short grace instead of waiting for a flush that never comes.
DATA is read one protocol.CHUNK per loop turn for the whole worker, round-robin among the
sessions reading DATA (dataturns.py); once a message is past max_message_size
the rest (at most protocol.OVERSHOOT) is read at `[limits] oversize_read_rate` (issue 17).
Failure policy: transient trouble (spool, auth backend) gives 4xx; nothing a client sends
raises out of here: every path ends in a reply, a maillog line, or a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from authrelay import replies
from authrelay.auth.base import Authenticator, AuthResult, Login, Standing
from authrelay.config import Config
from authrelay.maillog import MailLog
from authrelay.metrics import Metrics
from authrelay.policy import containment, recipients, verdicts
from authrelay.policy.checks import HostChecks
from authrelay.policy.ownership import Owner
from authrelay.policy.relay import RelayPolicy
from authrelay.policy.suspender import Suspender
from authrelay.smtpd import protocol as p
from authrelay.smtpd.dataturns import DataTurns
from authrelay.smtpd.listener import (
    CLOSE_GRACE,
    QUIT_GRACE,
    Closed,
    Connection,
    HandshakeFailed,
    Timeout,
)
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.submit import Refused
from authrelay.types import Reply

log = logging.getLogger(__name__)

BATCH = 32  # pipelined commands executed before yielding to the event loop (fairness)
# The lockout's answers (454 4.7.0) leave at least this long after the AUTH arrived, or
# `[auth] failure_delay` if longer; a SPARED check (a known network past a limit) must be
# done by then, else it is answered as the lockout too (docs/LIMITS.md).
LOCKOUT_ANSWER_MIN = 0.5
# A session's refusals of one kind (the same reply) without a queue id logged one by one;
# past it counted, and one `warning=N more refusals of the same kind suppressed` line per
# kind at the session's end: a client pipelining RCPTs past max_recipients (1,000 452s a
# transaction before they count as errors, again after each RSET) cannot write a maillog
# line per command. Metrics count every refusal.
REPEATED_REFUSAL_LINES = 5
# Seconds server.stop gives a session it cancelled to write its 421 and end.
CANCEL_GRACE = 5.0
# Seconds a session cut by a stop in DATA waits for its message's file to be gone before
# its 421 (a frozen spool: it goes then anyway, within CANCEL_GRACE).
STOP_DISCARD_WAIT = 2.0
# Known networks' checks answered before they were done, awaited for their outcome
# (Session._late_check; a reference each, so none is collected while pending).
_LATE_CHECKS: set[asyncio.Task[None]] = set()


class Draft(Protocol):
    """A message on its way into the spool (spool/submit.py's Draft)."""

    def write(self, data: bytes) -> None: ...  # never raises; problems come from commit()
    # None, or what to await (asyncio.wait) before the next write: the early create
    # still being made past 128 KiB (spool/writer.py Incoming.spill_wait)
    def spill_wait(self) -> asyncio.Future[Any] | None: ...
    # raises spool.submit.Refused; on_durable runs once the message is on disk
    def commit(self, on_durable: Callable[[], None] | None = None) -> Awaitable[None]: ...
    def abort(self) -> None: ...  # idempotent
    # abort(), returning once no file of the message can exist (a refusal's reply waits)
    def discard(self) -> Awaitable[None]: ...
    # the caller gives up waiting for commit(): True unless durable already (then 250)
    def abandon(self) -> bool: ...
    # commit()'s refusal, once made (it then waits for the file's removal)
    refused: Refused | None


class Submitter(Protocol):
    """The one way into the spool (spool/submit.py)."""

    def space_ok(self, size: int = 0) -> bool: ...
    def begin(self, env: Envelope, *, tls: str = "", add_missing: bool = True,
              nul_checked: bool = False, lines_checked: bool = False, sign: bool = True,
              owner: Owner | None = None, create_early: bool = False,
              on_loop: bool = False) -> Draft: ...


class Ticket(Protocol):
    """What admission hands a session (smtpd/admission.py): the per-client throttle."""

    @property
    def command_timeout(self) -> float: ...
    @property
    def stressed(self) -> bool: ...  # the listener is in stress mode
    def release(self) -> None: ...
    def idle(self, evict: Callable[[], None], moved: bool = True) -> None: ...  # evictable ...
    def busy(self) -> None: ...  # ... until this
    async def auth_lockout(self, user: str) -> verdicts.Lockout: ...
    async def auth_failed(self, user: str, known_net: bool = False) -> None: ...
    async def auth_succeeded(self, user: str) -> None: ...
    async def user_may_send(self, user: str) -> bool: ...
    async def user_may_add_rcpt(self, user: str, have: int) -> bool: ...
    async def user_sent(self, user: str, nrcpts: int) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionDeps:
    """The narrow interfaces a session uses; built by the server per listener."""

    cfg: Config
    listener: str  # "submission:127.0.0.1:587", for the maillog
    mode: str  # smtp | submission | submissions
    policy: RelayPolicy
    authenticator: Authenticator | None
    submitter: Submitter  # the way into the spool
    tls_context: Callable[[], ssl.SSLContext | None]
    maillog: MailLog  # the server's (wiring.server's caller decides which)
    checks: HostChecks | None = None
    metrics: Metrics | None = None  # metrics.auth(result) / accepted(mode) / rejected(reason)
    containment: Suspender | None = None  # None: containment off


class Session:
    def __init__(self, deps: SessionDeps, conn: Connection, ticket: Ticket) -> None:
        self.deps = deps
        self.cfg = cfg = deps.cfg
        self.conn = conn
        self.ticket = ticket
        self.maillog = deps.maillog
        self.ip = conn.peer[0]
        if self.ip.startswith("::ffff:"):
            self.ip = self.ip[7:]
        self.port = conn.peer[1]
        self.rdns = ""
        self.trusted = deps.policy.is_trusted(self.ip)
        self.host_check: tuple[Reply | None] | None = None  # cached verdict of the checks
        self.eng = p.Engine(cfg, mode=deps.mode, trusted=self.trusted,
                            auth_available=deps.authenticator is not None,
                            tls_available=deps.tls_context() is not None,
                            tls_active=deps.mode == "submissions")
        # the message being received
        self._draft: Draft | None = None
        self._qid = ""
        self._data_deadline = 0.0
        self._expired = False
        self._expiring: Reply | None = None  # expire()'s 421, sent by run() (in DATA)
        self._owned: Owner | None = None  # the authenticated user's addresses
        # The account the login named (Authenticator.account: `alice` for a login
        # `alice@REALM`): the one key of everything counted or decided per user (AUTH
        # lockout, rates, containment, the envelope's auth_user); "" before AUTH.
        self.account = ""
        self._login: Login | None = None  # the OK login, checked again at each MAIL
        self._over_mark: tuple[float, int] | None = None  # see _pace_oversize
        self._refusals: Counter[Reply] = Counter()  # NOQUEUE refusals logged, by reply
        self._suppressed: Counter[Reply] = Counter()  # and those past the first few

    # ------------------------------------------------------------------ helpers
    def relay_desc(self) -> str:
        return f"{self.rdns or 'unknown'} [{self.ip}]"

    def _log_reject(self, r: Reply, what: str = "", qid: str | None = None,
                    **extra: object) -> None:
        if qid is None and self._refusals[r] >= REPEATED_REFUSAL_LINES:
            self._suppressed[r] += 1  # (a message's refusal, its qid's line, always goes)
        else:
            self._refusals[r] += qid is None
            self.maillog.reject(r, relay=self.relay_desc(), queue_id=qid, what=what,
                                **extra)
        # Metrics by reason: the reply's enhanced code (low cardinality, no addresses).
        if self.deps.metrics is not None:
            self.deps.metrics.rejected(reject_reason(r))

    def _metric_auth(self, result: str) -> None:
        if self.deps.metrics is not None:
            self.deps.metrics.auth(result)

    def _log_tls(self) -> None:
        """The maillog's TLS line (protocol, cipher), as Postfix logs one per session."""
        t = self.conn.transport
        self.maillog.tls_from(self.relay_desc(),
                              t.get_extra_info("ssl_object") if t is not None else None)

    def _flush(self) -> None:
        out = self.eng.data_to_send()
        if out:
            self.conn.write(out)

    def expire(self) -> None:
        """The session time limit passed (server.py): 421 and close, from outside."""
        if self._expired:
            return
        self._expired = True
        qid, size = self._receiving()
        self.maillog.reject("421 4.4.2 session time limit", relay=self.relay_desc(),
                            queue_id=qid, size=size)
        if self.eng.phase is p.Phase.TLS:
            # In a STARTTLS handshake: no reply in clear (RFC 3207 4), and the abort ends
            # the handshake's wait (a close did not: the session, and its slot, lived on
            # to tls_handshake_timeout).
            self.conn.abort()
            return
        r = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
        if qid is not None and self.conn.task is not None:
            # Receiving a message (a commit is never cut): its 421 goes once no file of
            # it can exist, as a refusal's (run(), on this cancel).
            self._expiring = r
            self.conn.task.cancel()
            return
        self.eng.close_with(r, "session_limit")
        self._flush()
        # Not a task cancel: a commit in progress finishes (its 250 just cannot be sent);
        # the loop sees the closed connection at its next wait and ends.
        self.conn.close(CLOSE_GRACE)

    def evict(self) -> None:
        """A full pool takes this idle, unauthenticated session's slot (admission.py):
        421 and close, from outside (the loop sees the closed connection and ends)."""
        if self._expired:
            return
        self._expired = True
        if self.eng.phase is p.Phase.TLS:  # in a STARTTLS handshake: no clear-text reply
            self.conn.abort()
            return
        self.eng.close_with(replies.EVICTED, "evicted")
        self._flush()
        self.conn.close(CLOSE_GRACE)

    def _receiving(self) -> tuple[str | None, int | None]:
        """The queue id and bytes so far of a message being received (DATA), else Nones:
        a session cut from outside names the message it loses."""
        if self._draft is not None and self.eng.phase is p.Phase.DATA:
            return self._qid, self.eng.data_bytes
        return None, None

    @property
    def refusing_data(self) -> bool:
        """Reading the rest of a message already past max_message_size (paced)."""
        return self.eng.phase is p.Phase.DATA and self.eng.oversize > 0

    def _evictable(self) -> bool:
        """Pre-authentication and outside a transaction (issue 17)."""
        return not self.eng.auth_user and self.eng.transaction is None

    def _authenticator(self) -> Authenticator:
        """The authenticator (AUTH is offered, so asked, only when there is one)."""
        assert self.deps.authenticator is not None
        return self.deps.authenticator

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        conn, eng = self.conn, self.eng
        try:
            self.maillog.connect(self.relay_desc(), self.deps.listener)
            if eng.tls:  # implicit TLS (465): the handshake is done
                self._log_tls()
            eng.greet()
            await self._loop()
        except asyncio.CancelledError:
            expiring, self._expiring = self._expiring, None
            if expiring is not None:  # the session time limit, in DATA (expire)
                await self._close_once_discarded(expiring, "session_limit",
                                                 self.cfg.limits.data_block_timeout)
                task = asyncio.current_task()
                if task is None or task.uncancel() == 0:
                    return  # (expire's own cancel: the session ended as it asked)
            elif self._expired:
                pass
            elif eng.phase is p.Phase.TLS:  # in a STARTTLS handshake: nothing in clear
                conn.abort()  # (RFC 3207 4)
            else:  # shutdown: say so politely if the socket is still there
                self._expired = True  # (an expire() meanwhile sends nothing of its own)
                qid, size = self._receiving()
                if qid is not None:  # the message being received is lost: name it
                    self._log_reject(replies.SHUTTING_DOWN, qid=qid, size=size)
                await self._close_once_discarded(
                    replies.SHUTTING_DOWN, "shutdown",
                    min(self.cfg.limits.data_block_timeout, STOP_DISCARD_WAIT))
            raise
        except Closed:
            if self._draft is not None or eng.phase is p.Phase.DATA:  # peer gone mid-DATA
                self._log_lost(self.eng.data_bytes)
        except Exception:  # never a traceback to the client; keep the server serving
            log.exception("session error from %s", self.ip)
            conn.write(replies.LOCAL_ERROR.lines())
        finally:
            self._abort_draft()
            conn.close(CLOSE_GRACE)
            for r, n in self._suppressed.items():
                said = " ".join(x for x in (str(r.code), r.enhanced, r.text) if x)
                self.maillog.warning(f"{n} more refusals of the same kind suppressed ({said})",
                                     relay=self.relay_desc())
            commands = " ".join(f"{k}={v}" for k, v in eng.commands.items())
            self.maillog.disconnect(self.relay_desc(), auth=eng.auth_user or None,
                                    commands=commands or None)

    async def _loop(self) -> None:
        conn, eng = self.conn, self.eng
        loop = self.conn.loop
        turns = DataTurns.of(loop)
        n = 0  # commands executed since the last yield
        progressed = True
        deadline = 0.0
        # A candidate for eviction (issue 17) from the wait after its last command until
        # its next one: bytes of an unfinished command (a client dripping one a byte at a
        # time) neither end that nor make it younger, as they do not renew `deadline`.
        idling = False
        moved = -1  # eng.moved at the last idle() (-1: none yet)
        while True:
            if (n >= BATCH or conn.write_blocked) and eng.phase is not p.Phase.CLOSED:
                # Fairness: a client pipelining thousands of commands gets BATCH of them
                # per loop turn, like everyone else (an awaited handler that does not
                # suspend yields nothing, so every step counts). Back-pressure: while its
                # unsent replies pass the high-water mark, execute nothing more.
                n = 0
                self._flush()
                if conn.write_blocked:
                    await self._drain()
                elif eng.phase is p.Phase.DATA:
                    # one chunk of DATA per loop turn for the whole worker, round-robin
                    # among the readers (dataturns.py): commands are never queued behind
                    # a chunk from every streaming connection
                    await turns.turn()
                else:
                    await asyncio.sleep(0)
            ev = eng.next_event()
            if idling and ev is not p.NEED_DATA:
                idling = False
                self.ticket.busy()
            if ev is p.CONTINUE:
                progressed = True
                # Fairness: a DATA step is up to protocol.CHUNK bytes scanned; one per
                # loop turn, so a fast sender (or one streaming an oversized message)
                # cannot hold the loop for BATCH of them.
                if eng.phase is p.Phase.DATA:
                    n += BATCH
                    if eng.oversize:
                        await self._pace_oversize()
                else:
                    n += 1
                continue
            if ev is p.NEED_DATA:
                self._flush()
                if conn.write_blocked:
                    await self._drain()
                    continue  # the engine may have been closed (timeout) meanwhile
                data = conn.take()
                if not data:
                    if conn.at_eof:
                        eng.receive_data(b"")
                        continue
                    now = loop.time()
                    if eng.phase is p.Phase.DATA:
                        timeout = min(self.cfg.limits.data_block_timeout,
                                      self._data_deadline - now)
                    else:
                        if progressed:
                            deadline = now + self.ticket.command_timeout
                        timeout = deadline - now
                    progressed = False
                    n = 0
                    if not idling and eng.phase is not p.Phase.DATA and self._evictable():
                        idling = True
                        # aged from its last command that moved it on: a NOOP (or any
                        # junk, or an error) every 0.5 s kept a flood's sessions younger
                        # than eviction's TIE_AGE for ever (measured: 0 of 16 logins)
                        self.ticket.idle(self.evict, eng.moved != moved)
                        moved = eng.moved
                    try:
                        await conn.wait_input(timeout)
                    except Timeout:
                        eng.timeout()
                        continue
                    data = conn.take()
                    if not data:
                        continue  # eof: handled above on the next turn
                eng.receive_data(data)
                continue
            if ev is p.CLOSED or ev is p.PAUSED:
                # PAUSED cannot happen here (every request is answered before the next
                # call); treat it as the end rather than spin.
                self._flush()
                return
            progressed = True
            n += BATCH if isinstance(ev, p.BodyData) else 1  # (fairness, as above)
            await self._handle(ev)

    async def _pace_oversize(self) -> None:
        """Issue 17: a message past max_message_size is refused whatever comes next; the
        rest of it (protocol.OVERSHOOT at most, then 552 and close) is read no faster than
        `[limits] oversize_read_rate`. Meanwhile the input buffer fills, reading pauses
        and the client blocks in send(): an endless oversized DATA costs the server a few
        scans a second instead of a core, and nothing under the limit is ever slowed.
        data_final_timeout still ends it."""
        rate = self.cfg.limits.oversize_read_rate
        if rate <= 0 or self.conn.input_ended:
            # (a sender that has hung up sends nothing more: what it left buffered is
            # scanned at once, to the end of data or the close)
            return
        loop = asyncio.get_running_loop()
        now, over = loop.time(), self.eng.oversize
        if self._over_mark is None:
            self._over_mark = (now, over)
            return
        t0, over0 = self._over_mark
        due = min(t0 + (over - over0) / rate, self._data_deadline)
        if due > now:
            await asyncio.sleep(due - now)
        if loop.time() >= self._data_deadline:
            self.eng.timeout()

    async def _drain(self) -> None:
        try:
            await self.conn.drain(self.ticket.command_timeout)
        except Timeout:
            self.eng.timeout()  # a client that does not read its replies: 421, abort

    # ------------------------------------------------------------------ events
    async def _handle(self, ev: Any) -> None:
        eng = self.eng
        if isinstance(ev, p.BodyData):
            self._store(ev.segments)
            draft = self._draft
            wait = draft.spill_wait() if draft is not None else None
            if wait is not None:  # the file still being made: this session waits, not
                await self._create_wait(wait)  # the loop
        elif isinstance(ev, p.RcptRequest):
            await self._rcpt(ev)
        elif isinstance(ev, p.MailRequest):
            await self._mail(ev)
        elif isinstance(ev, p.DataRequest):
            self._begin(ev.transaction)
        elif isinstance(ev, p.MessageComplete):
            await self._commit(ev)
        elif isinstance(ev, p.MessageAborted):
            await self._aborted(ev)
        elif isinstance(ev, p.Reject):
            # While a message is being received (a DATA timeout, a bare LF), the line is
            # its own, and its refusal (queued by the engine) goes once its file is gone.
            qid = self._qid if self._draft is not None else None
            await self._discard_draft()
            self._log_reject(ev.reply, ev.what, qid, **ev.extra)
        elif isinstance(ev, p.CloseConnection):
            self._flush()
            self.conn.close(QUIT_GRACE if not ev.abort else CLOSE_GRACE)
        elif isinstance(ev, p.AuthRequest):
            await self._auth(ev)
        elif isinstance(ev, p.StartTLS):
            await self._starttls(ev)
        elif isinstance(ev, p.Delay):
            self._flush()
            await asyncio.sleep(ev.seconds)
            eng.resume()
        elif isinstance(ev, p.LogWarning):
            # = maillog.warning(), its fields typed as the engine's (str keys, any value)
            self.maillog.event(None, warning=ev.text, relay=self.relay_desc(), **ev.extra)
        elif isinstance(ev, p.AuthMalformed):
            self.maillog.auth_failed(self.relay_desc(), ev.reply, ev.mechanism, None, ev.reason)
            self._metric_auth("malformed")

    async def _create_wait(self, create: asyncio.Future[Any]) -> None:
        """Wait for the message's early create, or for the write of its bytes past 128
        KiB (Draft.spill_wait; the client is not read meanwhile), as for the client's next
        block of data: under data_block_timeout and what is left of data_final_timeout. A
        create or write that does not come (the commit threads held by a hung disk) ends the
        session as those timeouts do: 421 4.4.2 and the message's own `stage=timeout`
        line; the thread removes the file if it ever makes it. A cancel (shutdown) leaves
        the create be (asyncio.wait)."""
        timeout = min(self.cfg.limits.data_block_timeout,
                      self._data_deadline - self.conn.loop.time())
        done, _ = await asyncio.wait((create,), timeout=max(0.0, timeout))
        if not done:
            self.eng.timeout()

    async def _starttls(self, ev: p.StartTLS) -> None:
        self._flush()
        # CVE-2011-0411: plaintext pipelined after STARTTLS is dropped (the engine dropped
        # what it had; this is what arrived since).
        dropped = ev.dropped + self.conn.discard_input()
        if dropped:
            self.maillog.warning(f"discarded {dropped} bytes pipelined after STARTTLS",
                                 relay=self.relay_desc())
        ctx = self.deps.tls_context()
        if ctx is None:  # the certificate went away since EHLO (reload): cannot go on
            raise Closed
        # A client that never completes the handshake holds its slot no better than one
        # that never sends a command: evictable meanwhile (nothing authenticated yet).
        self.ticket.idle(self.evict)
        lim = self.cfg.limits
        # In stress mode the short deadline, as for a 465 handshake (admission.py) and
        # Postfix's smtpd_starttls_timeout: stalled handshakes free their slots fast.
        hs = min(lim.tls_handshake_timeout, lim.stress_command_timeout) \
            if self.ticket.stressed else lim.tls_handshake_timeout
        started = time.monotonic()
        try:
            await self.conn.starttls(ctx, hs)
        except Timeout:
            # RFC 3207 4: after our 220 only TLS may cross; the client may be half-way
            # through its ClientHello, so a 421 in clear would be read as a broken TLS
            # record. Closed without a reply, logged as a 465 handshake's expiry is.
            self.maillog.tls_failed(self.relay_desc(), "handshake timed out",
                                    self.deps.listener, time.monotonic() - started)
            raise Closed from None
        except HandshakeFailed as e:
            # One line, as for a 465 handshake (Postfix: "SSL_accept error"): a client
            # refused for its protocol version or ciphers (min_version) must show up.
            self.maillog.tls_failed(self.relay_desc(), e.reason, self.deps.listener,
                                    time.monotonic() - started)
            raise Closed from None
        finally:
            self.ticket.busy()
        self.eng.tls_started()
        self._log_tls()

    async def _auth(self, ev: p.AuthRequest) -> None:
        eng, mech, user = self.eng, ev.mechanism, ev.username
        if ev.refusal is not None:  # (not counted against the user it names)
            await self._auth_failure(ev.refusal, user, mech, ev.reason)
            eng.auth_result(p.AuthOutcome.BAD)
            return
        # Every answer of the lockout leaves at this one moment, whether the password was
        # checked (SPARED: a network the user is known from) or not: its timing must not
        # tell which users are known from the client's network.
        loop = self.conn.loop
        due = loop.time() + max(self.cfg.auth.failure_delay, LOCKOUT_ANSWER_MIN)
        # Counted by account, logged as sent: `alice@REALM`, `alice@rElAy` and `alice`
        # are one account, so no spelling gets guesses, rates or a suspension of its own.
        account = self._authenticator().account(user)
        gate = await self.ticket.auth_lockout(account)
        if gate is verdicts.Lockout.LOCKED:
            # Past the window limit: answer without even checking the password, so a
            # brute-forcer learns nothing and costs us no hashing.
            await self._auth_locked(mech, user, due)
            return
        spared = gate is verdicts.Lockout.SPARED
        timeout = self.cfg.auth.backend_timeout + 5
        if spared:  # checked only if the check is done by `due` (docs/LIMITS.md)
            timeout = min(timeout, due - loop.time())
        late = False
        check = loop.create_task(self._authenticator().login(user, ev.password, self.ip))
        try:
            # A SPARED check not done by `due` goes on (shielded): its outcome is what
            # counts (_late_check), not its lateness.
            login = await asyncio.wait_for(asyncio.shield(check) if spared else check,
                                           max(timeout, 0.0))
        except asyncio.CancelledError:
            check.cancel()
            raise
        except Exception as e:
            late = spared and isinstance(e, TimeoutError)
            if late:
                self._late_check(check, mech, user, account,
                                 loop.time() + self.cfg.auth.backend_timeout + 5)
            else:
                log.exception("auth backend failure")
            login = Login(AuthResult.TEMPFAIL)
        result = login.result
        named = login.user or account
        if named != account and result is not AuthResult.TEMPFAIL:
            # The backend took this spelling for another account (Dovecot's user=; under
            # `%Ln`, `alice@x` is alice): that account's lockout holds whatever the
            # spelling, else each `alice@x` was a guesser's fresh budget.
            other = await self.ticket.auth_lockout(named)
            if other is verdicts.Lockout.LOCKED:
                await self._auth_locked(mech, user, due)
                return
            spared = spared or other is verdicts.Lockout.SPARED
        if result is AuthResult.OK:
            self.account = named
            self._login = login
            await self.ticket.auth_succeeded(named)
            self.maillog.auth_ok(self.relay_desc(), mech, user, login.app)
            self._metric_auth("ok")
            eng.auth_result(p.AuthOutcome.OK)
        elif spared:
            await self._auth_spared(mech, user, named, login, late, due)
        elif result is AuthResult.TEMPFAIL:
            self._log_reject(replies.AUTH_TEMPFAIL, "", sasl_method=mech, sasl_username=user)
            self._metric_auth("tempfail")
            eng.auth_result(p.AuthOutcome.TEMPFAIL)
        else:
            # Right credentials refused by policy (`hint`: an account password under
            # app_passwords = "require") are no guess: not counted, else a forgotten
            # device still sending the account password locked its user out of the app
            # passwords of every device at that address or network.
            await self._auth_failure(replies.AUTH_FAILED, user, mech, login.hint, named,
                                     guess=not login.hint)
            eng.auth_result(p.AuthOutcome.BAD)

    async def _until(self, due: float) -> None:
        """Flush what is owed, then wait for the loop time `due`."""
        self._flush()
        await asyncio.sleep(max(0.0, due - self.conn.loop.time()))

    async def _auth_locked(self, mech: str, user: str, due: float) -> None:
        """AUTH refused by the lockout (454 4.7.0), unchecked, at `due`."""
        await self._until(due)
        self._log_reject(replies.AUTH_LOCKED, "", sasl_method=mech, sasl_username=user)
        self._metric_auth("locked")
        self.eng.auth_result(p.AuthOutcome.LOCKED)

    async def _auth_spared(self, mech: str, user: str, account: str, login: Login,
                           late: bool, due: float) -> None:
        """A SPARED AUTH (past a limit, from a network `account` is known from) without
        the right password: the client gets exactly what an unchecked one gets (the
        lockout's 454 at `due`), so neither the reply nor its time says whether the
        user is known from there; only a right password would. A wrong one counts as a
        guess toward this network's own limit for the user (which ends the exemption),
        and only there: the unchecked ones count nowhere, so a per-address or per-user
        count that moved would tell it too (Throttle.auth_failed); it has the maillog's
        `authentication failed` line. A check not done by `due` (`late`) is answered so
        and goes on: its outcome, when it comes, is counted and logged (_late_check). A
        backend failure (not counted) has the lockout's line with the reason."""
        if late:
            await self._until(due)
        elif login.result is AuthResult.TEMPFAIL:
            await self._until(due)
            self._log_reject(replies.AUTH_LOCKED, "", sasl_method=mech, sasl_username=user,
                             reason="known network, temporary authentication failure")
            self._metric_auth("tempfail")
        else:
            if not login.hint:  # right credentials refused by policy are no guess
                await self.ticket.auth_failed(account, known_net=True)
            await self._until(due)
            self.maillog.auth_failed(self.relay_desc(), replies.AUTH_LOCKED, mech, user,
                                     login.hint or "known network past the lockout")
            self._metric_auth("fail")
        self.eng.auth_result(p.AuthOutcome.LOCKED)

    def _late_check(self, check: asyncio.Task[Login], mech: str, user: str, account: str,
                    until: float) -> None:
        """A SPARED check not done by the lockout's answer (the client has its 454): its
        outcome, once in (up to the loop time `until`), is a timely one's: a wrong password
        counts as a guess of this network (its `authentication failed` line); the right
        one, a backend failure or no answer by then count nowhere and have the lockout's
        line `known network, check not done in time`. Counting the lateness instead (a
        backend that answers a wrong password late, Dovecot's auth_failure_delay, and a
        right one at once needs the count) had a client elsewhere that fills the hashing
        pool turn a known user's right passwords into guesses of her own network, past
        its limit locking her out there too."""
        async def outcome() -> None:
            try:
                login = await asyncio.wait_for(check, max(until - self.conn.loop.time(), 0.0))
            except Exception:
                login = Login(AuthResult.TEMPFAIL)
            if login.result is AuthResult.BAD:
                named = login.user or account
                if not login.hint:  # right credentials refused by policy are no guess
                    await self.ticket.auth_failed(named, known_net=True)
                self.maillog.auth_failed(self.relay_desc(), replies.AUTH_LOCKED, mech, user,
                                         login.hint or "known network past the lockout")
                self._metric_auth("fail")
            else:
                self._log_reject(replies.AUTH_LOCKED, "", sasl_method=mech,
                                 sasl_username=user,
                                 reason="known network, check not done in time")
                self._metric_auth("tempfail")

        task = self.conn.loop.create_task(outcome())
        _LATE_CHECKS.add(task)
        task.add_done_callback(_LATE_CHECKS.discard)

    async def _auth_failure(self, r: Reply, user: str, mech: str, hint: str = "",
                            account: str = "", guess: bool = True) -> None:
        """A failed AUTH: counted against `account` (and the address) when a `guess`,
        logged as `user`."""
        if guess:
            await self.ticket.auth_failed(account)
        self._metric_auth("fail")
        # Same delay for unknown users and wrong passwords (no user enumeration), and
        # it slows a brute-forcer down.
        self._flush()
        await asyncio.sleep(self.cfg.auth.failure_delay)
        # fail2ban-friendly: IP and username on the line.
        self.maillog.auth_failed(self.relay_desc(), r, mechanism=mech or None,
                                 username=user or None, reason=hint or None)

    async def _mail(self, ev: p.MailRequest) -> None:
        eng, login, user = self.eng, self.eng.auth_user, self.account
        if not self.deps.submitter.space_ok(ev.transaction.size or 0):
            # Postfix queue_minfree: refuse before the client sends anything (RFC 5321
            # 4.5.3.1.10 / RFC 3463 4.3.1), rather than 451 after the whole DATA.
            self._log_reject(replies.NO_STORAGE, f"<{ev.transaction.sender.text}>... ",
                             stage="MAIL")
            eng.policy_result(replies.NO_STORAGE)
            return
        if login:
            # A user deleted since this session's AUTH sends no more ("changes to users
            # apply at once"), not for the rest of session_timeout.
            refusal = await self._login_refusal(replies.ACCOUNT_GONE)
            if refusal is replies.AUTH_REVOKED:
                self._log_reject(refusal, "", sasl_username=login)
                eng.close_with(refusal, "auth_revoked")
                return
            if refusal is not None:
                self._log_reject(refusal, "", sasl_username=login)
                eng.policy_result(refusal)
                return
            path = ev.transaction.sender
            owner = self._owner()
            owned = owner.addresses if self.cfg.auth.sender_policy == "own" else ()
            refusal = verdicts.mail_verdict(self.cfg.auth.sender_policy, path.address,
                                            owner.user, owned)
            if refusal is not None:
                self._log_reject(refusal, f"<{path.text}>... ", sasl_username=login)
                eng.policy_result(refusal)
                return
            if self.deps.containment is not None:
                # A suspended account (policy/containment.py): 450 4.7.1, the client
                # keeps the message and retries; nothing is bounced.
                refusal = await self._suspension_refusal()
                if refusal is not None:
                    self._log_reject(refusal, "", sasl_username=login)
                    eng.policy_result(refusal)
                    return
            if not await self.ticket.user_may_send(user):
                self._log_reject(replies.USER_RATE, "", sasl_username=login)
                eng.policy_result(replies.USER_RATE)
                return
        eng.policy_result(None)

    async def _login_refusal(self, gone: Reply) -> Reply | None:
        """This session's login as it stands now, asked at each MAIL and at the end of
        each message: `gone` for a user deleted since its AUTH; AUTH_REVOKED (the caller
        closes the connection: the client reconnects and its AUTH decides) when the
        password or app password it logged in with changed or was revoked; else None.
        While the user DB has not changed since the login, one generation read
        (auth/login.py StoreAuthenticator.standing)."""
        standing = await self._authenticator().standing(self.eng.auth_user, self._login)
        if standing is Standing.GONE:
            return gone
        if standing is Standing.REVOKED:
            return replies.AUTH_REVOKED
        return None

    async def _suspension_refusal(self) -> Reply | None:
        """450 4.7.1 while containment has this session's user suspended, else None."""
        if self.deps.containment is None:
            return None
        return containment.mail_refusal(await self.deps.containment.suspended(self.account))

    async def _refused_at_dot(self, qid: str) -> bool:
        """The login checked again at the end of data, before the commit: a user deleted,
        suspended or whose credentials were revoked while its message arrived (checked
        only at MAIL, that message was queued) gets a refusal for it, one maillog line,
        nothing queued. Deleted: 550 5.7.1 (the session goes on: its next MAIL gets 530
        5.7.0); suspended: 450 4.7.1, as at MAIL; revoked: 421 4.7.0 and the connection
        closed, as at MAIL. True when refused."""
        refusal = await self._login_refusal(replies.ACCOUNT_GONE_MESSAGE)
        if refusal is None:
            refusal = await self._suspension_refusal()
        if refusal is None:
            return False
        await self._discard_draft()
        self._log_reject(refusal, qid=qid, sasl_username=self.eng.auth_user)
        if refusal is replies.AUTH_REVOKED:
            self.eng.close_with(refusal, "auth_revoked")
        else:
            self.eng.message_result(refusal)
        return True

    async def _rcpt(self, ev: p.RcptRequest) -> None:
        eng, user, path = self.eng, self.account, ev.recipient
        if user and not await self.ticket.user_may_add_rcpt(user, len(ev.transaction.rcpts)):
            self._log_reject(replies.USER_RATE, "", sasl_username=eng.auth_user)
            eng.policy_result(replies.USER_RATE)
            return
        who = {"postmaster": ev.postmaster, "authenticated": bool(user),
               "trusted": self.trusted}
        owned: bool | None = False
        if verdicts.needs_owner(self.deps.policy, ev.address, **who) \
                and self.deps.authenticator is not None:
            # Not in local_recipients_file: known if it is one of the users' addresses.
            self._flush()
            owned = await self.deps.authenticator.owns_address(
                recipients.candidates(ev.address))
        refusal = verdicts.rcpt_verdict(self.deps.policy, ev.address, **who,
                                        user_owned=owned)
        if refusal is not None:
            # The 550 5.1.1 names the address itself (Postfix's form).
            self._log_reject(refusal, "" if refusal.enhanced == "5.1.1"
                             else f"<{path.text}>... ",
                             **{"from": f"<{ev.transaction.sender.text}>"})
            # A refused recipient counts towards bad_rcpt_throttle / bad_rcpt_limit
            # (a dictionary attack on local parts is slowed, then cut); a store that
            # could not be asked (451) is not the client's doing.
            eng.policy_result(refusal, bad_recipient=refusal.permanent)
            return
        # Postmaster at a local domain is exempt too, as <Postmaster> is (RFC 5321 4.5.1:
        # blocks on it narrowly tailored): a listed or PTR-less sender can ask for help.
        postmaster = ev.postmaster or (ev.address.local.lower() == "postmaster"
                                       and self.deps.policy.is_local(ev.address))
        if not postmaster and not user and not self.trusted and self.deps.checks is not None:
            # sendmail delay_checks: host checks only for clients that did not AUTH, so a
            # roaming user without reverse DNS can always authenticate and relay.
            if self.host_check is None:
                self._flush()
                refusal, rdns = await self.deps.checks.client_refusal(self.ip)
                self.host_check = (refusal,)
                if rdns:
                    self.rdns = rdns
            refusal = self.host_check[0]
            if refusal is not None:
                self._log_reject(refusal, f"<{path.text}>... ")
                eng.policy_result(refusal, bad_recipient=True)
                return
        eng.policy_result(None)

    def _owner(self) -> Owner:
        """The authenticated user and the addresses it may send as (read once per
        session: a session authenticates once). By the name as sent (a login
        `alice@REALM` owns that address), unless the backend named the account it logged
        in (Dovecot's `user=`, `Login.user`): then by that name, since the login's own
        spelling was not what the backend checked (`auth_username_format = %Ln` lets
        `alice@bank.test` in as alice: that login must not own alice@bank.test)."""
        user = (self._login.user if self._login is not None else "") or self.eng.auth_user
        if self._owned is None or self._owned.user != user:
            self._owned = Owner.of(user, self._authenticator().addresses(user))
        return self._owned

    # ------------------------------------------------------------------ the message
    def _begin(self, txn: p.Transaction) -> None:
        eng = self.eng
        qid = new_queue_id()
        env = Envelope(
            queue_id=qid, sender=txn.sender.text,
            recipients=[Recipient(r.text, notify=(r.params.get("NOTIFY") or "").upper(),
                                  orcpt=r.params.get("ORCPT") or "") for r in txn.rcpts],
            ret=txn.ret, envid=txn.envid,
            client_ip=self.ip, client_port=self.port, client_rdns=self.rdns,
            helo=eng.helo or "", auth_user=self.account, protocol=eng.protocol,
            listener=self.deps.listener, body_8bit=txn.body_8bit, smtputf8=txn.smtputf8,
        )
        try:
            # The one way into the spool (spool/submit.py): Received, Date/Message-ID,
            # hop count, the DKIM hook, fsync, the maillog from= line.
            draft = self.deps.submitter.begin(
                env, tls=self.conn.tls_info if eng.tls else "", nul_checked=True,
                lines_checked=True,  # bodyreader.py refuses bare CR / LF
                add_missing=bool(eng.auth_user) or eng.mode != "smtp",
                sign=bool(eng.auth_user) or self.trusted,  # DKIM: only mail we originate
                # An authenticated user's From:/Sender: must be its own to be signed
                # (and, with from_header_policy "own", to be accepted at all).
                owner=self._owner() if eng.auth_user else None,
                # The file is made while the body arrives, off the dot-to-250 path: for
                # clients allowed to relay only (an authenticated user or a trusted
                # network), so a stranger on 25 cannot make the relay hold a file per
                # connection by sending DATA alone (a file descriptor each, beside the
                # socket's the descriptor budget counts); a stranger's is made at the dot,
                # or past 128 KiB, by a commit thread too (on_loop).
                create_early=bool(eng.auth_user) or self.trusted, on_loop=True)
        except OSError:
            log.exception("spool begin failed")
            self._log_reject(replies.SPOOL_ERROR, qid=qid)
            eng.policy_result(replies.SPOOL_ERROR)
            return
        self._draft, self._qid = draft, qid
        self._data_deadline = self.conn.loop.time() + \
            self.cfg.limits.data_final_timeout
        self._over_mark = None  # (time, bytes) when this message went past the limit
        eng.policy_result(None)

    def _store(self, segments: list[bytes]) -> None:
        draft = self._draft
        if draft is not None:
            for seg in segments:
                draft.write(seg)  # never raises: problems are reported by commit()

    async def _commit(self, ev: p.MessageComplete) -> None:
        draft, qid, eng = self._draft, self._qid, self.eng
        assert draft is not None
        nrcpts = len(ev.transaction.rcpts)
        self._flush()
        if eng.auth_user and await self._refused_at_dot(qid):
            return

        def durable() -> None:
            # The 250 goes out as soon as the message is on disk, before the `from=`
            # line is made and the scheduler told (Draft.commit: they follow it).
            self._draft = None
            eng.message_result(replies.queued(qid))
            self._flush()

        try:
            # fsync file + directory: durable before 250; a wait bounded (_durable)
            if not await self._durable(draft.commit(durable), draft, ev.size):
                return
        except Refused as e:
            self._abort_draft()
            self._refused(e, qid)
            return
        if eng.auth_user:
            # The 250 is out (durable() above), not held for the per-user counters (a
            # Redis round trip in a farm, up to its timeout when Redis is slow) or the
            # containment work that follow it.
            await self.ticket.user_sent(self.account, nrcpts)
            if self.deps.containment is not None:
                await self.deps.containment.message_accepted(
                    self.account, qid, [r.text for r in ev.transaction.rcpts], self.ip)
        if self.deps.metrics is not None:
            self.deps.metrics.accepted(self.deps.mode)

    async def _durable(self, commit: Awaitable[None], draft: Draft, size: int) -> bool:
        """Await the commit up to data_block_timeout (as Postfix's smtpd waits for its
        cleanup server only so long): False when it was given up. A hung disk no longer
        holds the session and its pool slot for good; the contract holds whichever side
        settles first (Incoming.abandon, under one lock with the commit thread): a file
        durable first gets its 250; one given up first gets 451 4.3.0 and its own line,
        and the thread, when it runs or returns, removes the file before anything can
        deliver it. A cancel (shutdown) is passed on (the commit ends by itself).
        `size`: the message's, for its line (DATA is over: the engine counts none).
        The wait is this task's own, bounded by a timer that cancels it once abandon()
        says so (Incoming.commit then stops waiting), not a task of its own awaited
        with asyncio.wait: that cost ~20 us and a loop turn per message."""
        task = asyncio.current_task()
        assert task is not None
        gave_up = False

        def overdue() -> None:
            nonlocal gave_up
            if draft.abandon():  # False: durable already, its 250 on its way
                gave_up = True
                task.cancel()

        timer = self.conn.loop.call_later(self.cfg.limits.data_block_timeout, overdue)
        try:
            await commit
            return True
        except asyncio.CancelledError:
            if not gave_up or task.uncancel() > 0:
                raise  # (a shutdown's cancel, with or without the timer's)
        finally:
            timer.cancel()
        self._abort_draft()  # (its file is the commit thread's to remove)
        if draft.refused is not None:  # refused, its file's removal held (a frozen spool)
            self._refused(draft.refused, self._qid)
            return False
        r = replies.COMMIT_TIMEOUT
        self._log_reject(r, qid=self._qid, reason="queue file not durable within "
                         "data_block_timeout, commit abandoned", size=size)
        self.eng.message_result(r)
        return False

    def _refused(self, e: Refused, qid: str | None) -> None:
        """The commit refused the message: its line and its reply."""
        self._log_reject(e.reply, qid=qid, **({"reason": e.reason}
                                              if e.reason != e.reply.text else {}))
        self.eng.message_result(e.reply)

    async def _aborted(self, ev: p.MessageAborted) -> None:
        """The engine refused the message (its reply queued, not yet sent: the session
        sends nothing before this returns)."""
        qid = self._qid
        await self._discard_draft()
        if ev.lost:
            self._log_lost(ev.wire_bytes, qid)
            return
        if ev.reply is replies.BARE_LF:
            return  # logged by the engine's Reject
        self._log_reject(ev.reply, qid=qid, size=ev.wire_bytes)

    def _log_lost(self, wire_bytes: int, qid: str = "") -> None:
        """As Postfix's "lost connection after DATA (N bytes) from host[ip]"."""
        self.maillog.event(qid or self._qid or None,
                           lost=f"connection after DATA ({wire_bytes} bytes)",
                           relay=self.relay_desc())

    async def _discard_draft(self, bound: float | None = None) -> None:
        """Drop the message being received, returning once no file of it can exist (an
        early create still queued has made and removed it): a refusal's reply goes only
        then, so the refused client never finds a file of its message made meanwhile.
        Bounded as a commit (data_block_timeout: a hung disk), or by `bound`. Refusals
        only (a commit's message is never discarded)."""
        draft, self._draft = self._draft, None
        if draft is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(draft.discard(), self.cfg.limits.data_block_timeout
                                       if bound is None else bound)

    async def _close_once_discarded(self, r: Reply, why: str, bound: float) -> None:
        """A session ended from outside (the time limit, a stop): its 421 and close once
        no file of a message being received can exist (_discard_draft, at most `bound`
        s). A message in its commit (the engine's WAIT) is left to it, as before; a
        second cancel meanwhile ends the wait: the 421 goes then."""
        try:
            if self.eng.phase is p.Phase.DATA:
                await self._discard_draft(bound)
        finally:
            self.eng.close_with(r, why)
            self._flush()
            self.conn.close(CLOSE_GRACE)

    def _abort_draft(self) -> None:
        draft, self._draft = self._draft, None
        if draft is not None:
            try:
                draft.abort()
            except Exception:
                log.exception("spool abort failed")


def reject_reason(r: Reply) -> str:
    """The metrics label of a refusal: a name for the common ones, else its enhanced code."""
    return _REASONS.get(r, r.enhanced or str(r.code))


# Named reasons for the rejections an operator watches most; others go by enhanced code.
_REASONS = {
    replies.RELAY_DENIED: "relay_denied", replies.AUTH_REQUIRED: "auth_required",
    replies.MSG_TOO_BIG: "size", replies.TEXT_LINE_TOO_LONG: "line_length",
    replies.BARE_LF: "bare_line_ending", replies.TIMEOUT: "timeout",
    replies.SENDER_NOT_OWNED: "sender_not_owned", replies.TOO_MANY_RCPTS: "too_many_rcpts",
    replies.FROM_NOT_OWNED: "from_not_owned",
    replies.AUTH_LOCKED: "auth_locked", replies.USER_RATE: "user_rate",
    replies.AUTH_REVOKED: "auth_revoked",
    replies.TOO_MANY_CONNECTIONS: "connections", replies.TOO_MANY_FROM_IP: "connections_ip",
    replies.RATE_LIMITED: "connection_rate", replies.NO_RDNS: "no_rdns",
    replies.TOO_MANY_COMMANDS: "junk_commands", replies.NON_SMTP: "non_smtp",
    replies.TLS_WITHOUT_STARTTLS: "tls_without_starttls",
    replies.MSG_NUL: "nul", replies.TOO_MANY_HOPS: "hops", replies.NO_STORAGE: "storage",
    containment.SUSPENDED: "user_suspended", replies.ACCOUNT_GONE: "account_gone",
    replies.ACCOUNT_GONE_MESSAGE: "account_gone",
}
