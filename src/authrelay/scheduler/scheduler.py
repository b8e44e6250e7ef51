"""The scheduler (Postfix's qmgr): decides what is delivered when, and records the outcome.

Owns: which queued message is tried next, the active set, concurrency, per-recipient
state, bounces and removal from the spool. Contract:
- New mail is picked up at once: `notify(qid)` (the spool's in-process `on_commit` hook)
  and datagrams on `spool_dir/notify.sock` from receiving processes; plus a full scan at
  start (a restart finds everything) and a periodic rescan as a safety net. The start's
  scan, and its recovery (spool.recover: every file's header and envelope checked) when
  queue/ holds over `recover_inline` entries, run in the background: `start()` returns
  at once (the daemon opens its listeners after it) and new mail flows while a big queue
  is read.
- Fresh mail goes first: it waits in its own FIFO ahead of the retry heap, and per
  destination ahead of retries; retries fill at most three quarters of `max_active`
  (the rest is fresh mail's); a slow or dead destination only ever holds its own
  `concurrency_per_domain` slots, so deferred mail never blocks fresh mail elsewhere.
- A message's pending recipients are grouped by `route_key`; each group is one
  `courier.deliver()` call. A destination with one recipient due takes all of the
  message's pending recipients there (one transaction, not one per back-off jitter),
  and a job's deferred recipients share one next attempt. Per recipient: 2xx -> SENT;
  5xx -> FAILED and a DSN is queued (RFC 3464; never for the null sender or a bounce);
  4xx -> stays PENDING with back-off (backoff.py) until `max_queue_lifetime`, then
  FAILED with a DSN; an optional one-off delay warning DSN after `delay_warning`: one per
  message, naming every recipient still pending and not yet warned (whatever its
  destination), as Postfix does.
- One DSN per message per pass and action: every recipient that failed in this pass,
  whatever its destination, is in the same report (as Postfix does), queued when the
  pass's last delivery ends. Until then such a recipient stays PENDING on disk, so a crash
  in between re-tries it (a late or second bounce, never a lost one).
- At least once, never lost: state is saved (fsync) after every attempt before the next
  action, and a message leaves the spool only when no recipient is PENDING. A crash
  mid-delivery re-delivers after restart; a duplicate is possible, a loss is not. The
  in-flight journal (inflight.py) names, at the next start, the recipients whose attempt
  was under way when the process died, and records as sent those the next hop had
  answered 2xx before it died, their outcome not saved yet (a delivered message's
  removal is batched: no duplicate for a kill in that window). A clean stop (stop())
  waits for deliveries up to
  `shutdown_timeout`, then cuts them: each recipient gets a deferred line naming the stop
  (and saying it may have been delivered when the message had gone out), stays PENDING,
  and its journal entry is ended (no crash warning at the next start). A delivery whose
  results are in (the next hop answered) is not cut: its state is saved, its message
  removed and its DSNs queued, up to STOP_SAVE_WAIT more (past it, a hung disk: cut, and
  the next start recovers it as after a crash).
- A dead destination (Postfix's qmgr marks it so): a job whose every recipient got
  RFC 3463 4.4.1 (no answer from any host: connection refused, unreachable, connect
  timeout) marks its route key unreachable for min(first retry interval, DEAD_FOR). Until
  then that destination's jobs are not tried: each is deferred at once with
  `delivery temporarily suspended: REASON` (its normal back-off, so no thundering herd when
  the destination returns); after it, one job at a time probes until one gets an answer.
  A message the operator named (`queue flush ID`, `queue release ID`) is tried anyway;
  `queue flush` of all ends every mark at once: each such destination is probed by one
  job, then gets all its slots (it answered) or is marked again (its other messages
  deferred without a connection: one connect timeout, not concurrency_per_domain of
  them); a reload bringing new routes forgets the marks (use_courier). Deferring at a
  suspended destination writes nothing to the spool (no attempt was made): its next
  time and tries are the scheduler's, in memory (the back-off grows as before); after a
  crash the file's last attempt applies.
- Queue control (`control.sock`): flush/hold/release/delete are done here, after any
  in-flight delivery of the message ends, so the CLI never races a delivery.
Failure policy: a courier that raises is a transient failure for its recipients; an
unreadable or newer-format spool file is logged and skipped (left on disk) until restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from authrelay import maillog as maillog_mod
from authrelay import stopdeadline
from authrelay.config import Config
from authrelay.delivery.router import route_key
from authrelay.policy.containment import refused_before
from authrelay.policy.suspender import Suspender
from authrelay.scheduler import backoff, control
from authrelay.scheduler.bounce import make_bounce, notice_id, should_notify
from authrelay.scheduler.inflight import BEGIN_WAIT, InflightJournal, Leftover, Owed
from authrelay.spool.envelope import FAILED, PENDING, SENT, Envelope, Recipient
from authrelay.spool.notify import ABANDONED_NOTICE, LOGGED_NOTICE
from authrelay.spool.store import (
    UNFINISHED_AGE,
    CorruptError,
    InCommit,
    Spool,
    SpoolError,
    commit_pool,
    is_queue_id,
)
from authrelay.spool.submit import NOTICE_WAIT, Submitter, log_queued
from authrelay.spool.writable import NOT_WRITABLE, ThreadProbe
from authrelay.spool.writer import settle
from authrelay.types import BeforeEnd, DeliveryResult, Taken

log = logging.getLogger(__name__)

RESCAN_INTERVAL = 60.0  # read when a Scheduler is made
RECOVER_INLINE = 2000  # queue/ entries (files and states) recovered before start() returns
BUSY_RETRY = 0.2  # a message under a control operation is looked at again this soon
NEXT_ATTEMPT_SLACK = 0.5  # recipients due within this are tried with the rest
DISPATCH_BATCH = 64  # messages loaded per turn of the event loop
# Bytes of messages kept in memory while their deliveries wait for a slot; past it a
# waiting message is read again from its file when its turn comes.
WAITING_INLINE_BUDGET = 2 * 1024 * 1024
CLOCK_STEP = 60.0  # a wall clock set back further re-times the retries (_check_clock)
DEAD_FOR = 300.0  # longest a destination stays marked unreachable (Postfix: 300 s)
DEAD_MAX = 10_000  # marks kept (memory): past it the expired go, then the oldest
# Queued messages whose notice vouched for their line ends (memory: ~100 bytes each); past
# it a notice's mark is not kept and the courier checks that file, as ever.
VOUCHED_MAX = 100_000
# Seconds after its commit a message marked as its `from=` line not written yet (the
# receiving worker's writer had not written it) may still get it from its producer: its
# notice goes once the line is written or NOTICE_WAIT after the commit. Found by a scan
# without a notice, it waits this long; then the scheduler writes the line (_log_owed).
LOG_OWED_WAIT = NOTICE_WAIT + 1.0
# Seconds until a message found still in its commit (store.InCommit) is loaded again.
IN_COMMIT_AGAIN = 1.0
# Messages whose from= line a live producer still owes (a stalled log), kept with their
# envelopes past delivery (memory: ~1 KB each); past it one is not kept, and its
# producer's death before its line loses that line, as before 8ddf930.
OWED_MAX = 10_000
# Queue ids whose commit their producer gave up (Notifier.abandoned), kept until their file
# is gone (memory: ~100 bytes each); past it the oldest is forgotten (its file, if a dead
# producer left it, is delivered: a duplicate, as before).
ABANDONED_MAX = 10_000
# The maillog's line for such a file, dropped at its load (_drop_abandoned).
ABANDONED_DROPPED = ("queue file of an abandoned commit removed, not delivered: its "
                     "receiving process gave up waiting for the commit (the client was "
                     "told 451 4.3.0, never 250) and died before the commit thread "
                     "removed it")
UNREACHABLE = "4.4.1"  # RFC 3463: no answer from host (the courier's connect failures)
SHUTDOWN = "4.3.2"  # RFC 3463: system not accepting network messages (our own stop)


_FULL_RETURN_MAX = 10_000_000  # RET=FULL returns bigger messages as headers only

# The DSNs a pass may owe, in the order they are queued, and what the log says when one
# cannot be (RFC 3464 actions).
_DSN_ACTIONS = (("failed", "cannot queue a bounce; retrying later"),
                ("delayed", "cannot queue a delay warning"),
                ("relayed", "cannot queue a success notice"))

class CourierLike(Protocol):
    async def deliver(self, env: Envelope, rcpts: list[Recipient], message: bytes | Path,
                      offset: int = 0, sent: dict[str, str] | None = None,
                      before_end: BeforeEnd | None = None, taken: Taken | None = None
                      ) -> dict[str, DeliveryResult]: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class _Active:
    """A message in the active set: loaded, with deliveries queued or in flight."""

    qid: str
    forced: bool = False
    named: bool = False  # flushed or released by id: tried even at a dead destination
    env: Envelope | None = None
    path: bytes | Path | None = None  # small messages are kept as bytes (one read)
    offset: int = 0
    waiting_bytes: int = 0  # its share of WAITING_INLINE_BUDGET, given back at release
    jobs: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # DSNs owed for this pass, sent as one per action when the last job ends, whatever
    # the recipients' destinations: action -> recipients; plus each one's remote MTA.
    owed: dict[str, list[Recipient]] = field(default_factory=dict)
    remote: dict[str, str] = field(default_factory=dict)
    # In-flight journal tokens of attempts whose outcome is not on disk yet (the state is
    # saved by _finish): ended once it is.
    unsaved: list[int] = field(default_factory=list)
    # Recipients an attempt cut by a crash may have reached (the in-flight journal's
    # leftovers): their next line says `redelivery=after_crash`.
    crashed: set[str] = field(default_factory=set)
    # This pass changed what must reach the disk: an attempt was made, or a recipient
    # bounced, expired or is owed a delay warning. A pass of only deferrals at a
    # suspended destination saves nothing (its file keeps the last attempt's state).
    to_save: bool = False


@dataclass(eq=False)
class _Job:
    act: _Active
    key: str
    rcpts: list[Recipient]
    started: bool = False


# How long the first removal of a batch waits for more (_unlink): a burst of deliveries
# ends in one thread hand-off. A message is removed this much later after its delivery;
# a crash until then finds the in-flight journal's delivered line (_journal_delivered,
# written after the 2xx) and the next start removes it (_after_crash), not delivering it
# again (without the line, a kill before its thread wrote it: delivered again, named).
UNLINK_GATHER = 0.005
# Seconds a stop waits, past shutdown_timeout, for deliveries whose results are in (the
# next hop answered) to save them, remove their message and queue their DSNs, before it
# cuts them too (a hung disk): cut, the next start's crash recovery has them.
STOP_SAVE_WAIT = 5.0
# The maillog's line for each unfinished queue file removed (recover, sweep_unfinished).
UNFINISHED_REMOVED = ("unfinished queue file removed: its receive ended without a commit "
                      "(the receiving process died; no 250 was sent for it)")


class Scheduler:
    def __init__(self, cfg: Config, spool: Spool, courier: CourierLike,
                 maillog: maillog_mod.MailLog, *, submitter: Submitter,
                 rescan_interval: float | None = None, max_active: int = 20000,
                 recover_inline: int = RECOVER_INLINE) -> None:
        self.cfg = cfg
        self.spool = spool
        self._write_probe = ThreadProbe(spool.root)  # an operator's change on a frozen disk
        self.courier = courier
        self.maillog = maillog
        self.rescan_interval = RESCAN_INTERVAL if rescan_interval is None else rescan_interval
        self.max_active = max_active  # messages loaded at once (memory bound)
        self.recover_inline = recover_inline  # a bigger queue is recovered in the background
        self.concurrency = max(1, cfg.delivery.concurrency)
        self.per_destination = max(1, cfg.delivery.concurrency_per_domain)
        self._heap: list[tuple[float, int, str]] = []
        # Wall clock minus monotonic clock at the last rescan: a drop is the clock set back
        self._wall_offset = time.time() - time.monotonic()
        self._fresh: deque[tuple[int, str]] = deque()
        self._seq = itertools.count()
        self._token: dict[str, int] = {}  # qid -> seq of its one valid heap/fresh entry
        self._forced: set[str] = set()
        self._named: set[str] = set()
        self._active: dict[str, _Active] = {}
        # qid -> set when the control request changing it ends (one at a time per id)
        self._busy: dict[str, asyncio.Event] = {}
        self._ignored: set[str] = set()
        self._waiting: dict[str, tuple[deque[_Job], deque[_Job]]] = {}  # fresh, retries
        self._rr: OrderedDict[str, None] = OrderedDict()
        self._dest_running: dict[str, int] = {}
        self._waiting_bytes = 0  # held by active messages waiting inline (their waiting_bytes)
        # route key -> (monotonic time the mark ends, the failure that set it)
        self._dead: dict[str, tuple[float, DeliveryResult]] = {}
        # The queue as this scheduler knows it, kept at every change it makes or is told
        # of (commit notices, scans, hold/release/delete, removal, quarantine), so the
        # queue gauges cost a len() (stats(), metrics.py), never a directory's stat.
        self._queued: set[str] = set()  # committed in queue/: loaded, waiting, unreadable
        self._held: set[str] = set()  # in hold/ (listed at the start's scan)
        self._corrupt = 0  # files in corrupt/ (counted at each scan, plus each quarantine)
        # Messages whose last passes were only deferrals at a suspended destination (not
        # written: _apply): each recipient's attempts then, given back at the next load so
        # the back-off keeps growing while the destination stays dead (tens of bytes a
        # message; gone at the next save, removal or restart).
        self._unsaved_attempts: dict[str, tuple[int, ...]] = {}
        # Queue id -> the recipients a delivery attempt had under way when the last run
        # died (in-flight journal), still pending, and the journal token naming them
        # again until their next attempt's outcome is saved: that attempt counts in their
        # tries and its lines say it is a redelivery (_start_message, _apply).
        self._crashed: dict[str, tuple[set[str], int]] = {}
        # Queue id -> monotonic time a load first saw its owed from= line with a commit
        # time in the future (_log_owed: the clock set back); at most OWED_MAX.
        self._owed_seen: dict[str, float] = {}
        # Queue id -> inode of its file, from a receiving worker's notice that vouched for
        # the file's line ends (spool/notify.py): the load marks the envelope
        # `lines_checked` only for that file; gone when the message leaves the queue.
        self._vouched: dict[str, int] = {}
        # Queue ids whose producer's notice came since their last load: that producer
        # writes (or wrote) the `from=` line, never this scheduler (_log_owed).
        self._noticed: set[str] = set()
        # Queue ids whose producer's notice went before its `from=` line was written (a
        # stalled log: NOTICE_WAIT), by that producer's pid, until its "logged" notice;
        # with the envelope once loaded. Kept past the message's removal: the producer's
        # death (receiver_died) has this scheduler write the line it took with it.
        self._owed_by: dict[str, int] = {}
        # Queue ids whose producer gave up their commit (its client told 451, no 250
        # ever): a file found under that id is removed, never delivered (_drop_abandoned).
        self._abandoned: dict[str, None] = {}
        self._owed_env: dict[str, Envelope] = {}
        self._running = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        # Those of them recording results already in hand: a job past its courier, a
        # _finish, a removal batch (stop() cuts them only past STOP_SAVE_WAIT).
        self._saving: set[asyncio.Task[Any]] = set()
        # Removals waiting for their batch (one thread hand-off for all; _unlink).
        self._unlinks: list[tuple[Envelope, asyncio.Future[None]]] = []
        self._unlinking = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._rescan: asyncio.Task[None] | None = None
        # Recovery and the sweeps of dead receives' files, one at a time (each unlinks
        # only under the file's lock; two at once could unlink a name re-created).
        self._sweeping = asyncio.Lock()
        self._sweep_timer: asyncio.TimerHandle | None = None  # after a receiver died
        self._nsock: socket.socket | None = None
        self._control: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._hooked = False
        self._stopping = False
        self._scanned = False  # the start's scan is done (the counts above are whole)
        self.metrics: Any = None  # authrelay.metrics.Metrics, set by Metrics.start()
        self.submitter = submitter  # bounces go in here (wiring.scheduler)
        self.inflight = InflightJournal(spool.root)  # what a crash may have delivered twice
        # (token, recipients, every, those owed a success DSN) the next hop took in this
        # loop turn (_journal_delivered)
        self._delivered: list[tuple[int, list[str], bool, list[Owed]]] = []
        # attempts of this loop turn whose stat=Sent lines _apply gave the maillog: the
        # journal's mark once its writer wrote them (_hand_logged)
        self._logged: list[int] = []
        # Success notices queued by this run whose message's `{"s": N}` journal line may
        # not be written yet: the mark InflightJournal.said waits for (on the future,
        # set once `notified` gave it: a notice's delivery may start first, at its
        # commit's notice), not delivered before it is (_said).
        self._unsaid: dict[str, asyncio.Future[int]] = {}
        # policy/suspender.Suspender (containment), set by wiring: a suspended user's
        # mail is held instead of sent; 5xx from the next hops count against its sender.
        self.containment: Suspender | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._thread = threading.get_ident()
        self._wake = asyncio.Event()
        self.spool.ensure_dirs()
        self._lock_fd = await self._take_lock()
        big = await self._io(self._queue_bigger_than, self.recover_inline)
        if not big:  # a small queue: recovered and scanned before start() returns
            await self._recover()
        await self._after_crash(await self._io(self.inflight.leftovers))
        if self.spool.on_commit is None:
            self.spool.on_commit = self.notify
            self._hooked = True
        if self.spool.on_commit == self.notify:  # this process's own producers
            self.spool.notifier.on_owed = self.owed
            self.spool.notifier.on_abandoned = self.abandoned
        self._bind_notify()
        try:
            cpath = control.control_path(self.spool)
            self._control = await control.serve(cpath, self._handle_control)
        except OSError as e:  # e.g. a path longer than sun_path: the CLI then reports it
            log.error("cannot listen on %s: %s", cpath, e)
        if not big:  # after notify.sock is bound: a message committed meanwhile is seen
            await self._scan_all()
        self._main = asyncio.create_task(self._run(), name="scheduler")
        self._rescan = asyncio.create_task(self._rescan_loop(big), name="scheduler-rescan")

    def _queue_bigger_than(self, n: int) -> bool:
        with os.scandir(self.spool.queue_dir) as it:
            return any(i >= n for i, _ in enumerate(it))

    async def _recover(self) -> None:
        await self._tidy(self.spool.recover,
                         "spool recovery failed (retried at the next start)")

    async def _sweep_unfinished(self) -> None:
        """The files of receives that died (a worker killed in DATA, the OOM killer, a
        killed sendmail command): removed without a restart (Spool.sweep_unfinished, in
        a commit thread), one maillog line each. At every rescan, and UNFINISHED_AGE
        after a receiving process died (`receiver_died`)."""
        await self._tidy(self.spool.sweep_unfinished,
                         "sweep of unfinished queue files failed")

    async def _tidy(self, fn: Callable[[], object], failed: str) -> None:
        """`fn` (recover, a sweep) in a commit thread, one at a time; then the maillog
        lines of the files it set aside or removed."""
        async with self._sweeping:
            try:
                await self._io(fn)
            except OSError as e:
                log.error("%s: %s", failed, e)
        self._log_quarantined()
        self._log_swept()

    def _log_swept(self) -> None:
        q = self.spool.swept  # appended to by commit-pool threads: pop one by one
        while q:
            self.maillog.warning(UNFINISHED_REMOVED, queue_id=q.pop(0))

    def receiver_died(self, pid: int = 0) -> None:
        """A receiving process died (the master reaped a worker): the files it was
        receiving into are swept once every one of them is past UNFINISHED_AGE (a later
        death moves the sweep later; the rescan's sweeps go on meanwhile). The queue is
        scanned now: a message it committed may have died with its notice (sent once the
        maillog's writer wrote its `from=` line, a few ms later, or NOTICE_WAIT with a
        stalled log), which would otherwise wait for the next rescan. The `from=` lines
        `pid` still owed when it died (its notices went by NOTICE_WAIT, the lines stayed
        in its stalled writer) are written here, delivered or not; those of messages not
        loaded yet by their load (_log_owed)."""
        if self._loop is None or self._stopping:
            return
        if pid:
            if self._nsock is not None:
                self._on_datagram()  # its last notices first: a line written after all
            for qid in [q for q, p in self._owed_by.items() if p == pid]:
                del self._owed_by[qid]
                env = self._owed_env.pop(qid, None)
                if env is None:
                    self._noticed.discard(qid)
                else:
                    self._write_owed(env)
        self._spawn(self._scan_all())
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep_timer = self._loop.call_later(UNFINISHED_AGE + 0.5, self._swept_late)

    def _swept_late(self) -> None:
        self._sweep_timer = None
        if not self._stopping:
            self._spawn(self._sweep_unfinished())

    async def _after_crash(self, leftovers: list[Leftover]) -> None:
        """The in-flight journal's leftovers (inflight.py): recipients the next hop
        answered 2xx before the last run died and still pending are recorded as sent
        (_sent_before_crash: the message removed when none is left), never delivered
        again; then this run's journal is begun (truncated: a crash before it finds the
        same lines) and the recipients an attempt had under way are tried again, named:
        the next hop may already have them (at least once)."""
        delivered: dict[str, set[str]] = {}
        logged: dict[str, set[str]] = {}  # their stat=Sent lines written ("l")
        owed: dict[str, dict[str, Owed | None]] = {}  # (None: an older journal's "n")
        crashed: set[str] = set()  # (else: every attempt of it that left some was cut)
        for left in leftovers:
            if left.delivered:
                delivered.setdefault(left.qid, set()).update(left.delivered)
                if left.logged or left.cut:
                    logged.setdefault(left.qid, set()).update(left.delivered)
                owed.setdefault(left.qid, {}).update(
                    (r, left.said.get(r)) for r in left.owed)
                if not left.cut:
                    crashed.add(left.qid)
        for qid, done in delivered.items():
            await self._sent_before_crash(qid, done, owed[qid], logged.get(qid, set()),
                                          stop=qid not in crashed)
        await self._io(self.inflight.start)
        for left in leftovers:
            qid, rcpts = left.qid, left.rcpts
            if set(rcpts) <= delivered.get(qid, set()):
                continue  # recorded above (most: removed since, their line not compacted)
            try:
                env = await self._io(self.spool.load, qid)
            except (OSError, SpoolError):
                continue  # gone (delivered and removed) or quarantined
            pending = {r.address for r in env.pending}
            cut = [rcpt for rcpt in rcpts if rcpt in pending]
            if cut:
                known = self._crashed.pop(qid, (set(), 0))[0]
                self._crashed[qid] = (known | set(cut), self.inflight.begin(qid, cut))
            for rcpt in cut:
                self.maillog.warning(
                    f"delivery to <{rcpt}> was in progress when authrelay stopped: it "
                    "may have been delivered before the crash (it is tried again; the "
                    "recipient may get it twice)", queue_id=qid)

    async def _sent_before_crash(self, qid: str, rcpts: set[str],
                                 owed: dict[str, Owed | None], logged: set[str],
                                 stop: bool = False) -> None:
        """`rcpts` of `qid` were delivered (the journal's line after the next hop's 2xx)
        and the run died before saving it: those still PENDING become SENT, in its state
        file, or the message is removed when that leaves none pending (held: left in
        hold/ with its state, an operator's decision; a release then removes it). One
        maillog line for those in `logged` (their stat=Sent lines written: the journal's
        `{"l": [N]}`, or a stop's cut), `recorded=`; one stat=Sent line each for the others
        (the run died before its maillog wrote theirs; or between that write and the mark:
        then a second one). Those of them in `owed` (NOTIFY=SUCCESS, not passed on) get their
        success DSN, as the run would have built it from the journal's Owed (the next hop
        and its reply; an older journal's: none), queued before the state is saved,
        unless it is in the queue already (its id is derived from them,
        bounce.notice_id: the dead run committed it and died before the journal's
        `{"s": N}`): a crash in between finds it so. Gone
        (delivered and removed, deleted) or unreadable: nothing. An I/O error: logged,
        and they are delivered again (the old behaviour). `stop`: they were delivered in
        an earlier transaction of a delivery a stop cut."""
        try:
            env = await self._io(self.spool.load, qid)
        except (OSError, SpoolError):
            return
        newly = [r for r in env.recipients if r.state == PENDING and r.address in rcpts]
        now = time.time()
        for r in newly:
            r.state = SENT
            r.attempts += 1  # the attempt the crash cut was made
            said = owed.get(r.address)
            if said is not None:  # (journaled for those owed a notice)
                r.last_attempt, r.last_reply = said.at, said.reply
                r.last_code = int(said.reply[:3]) if said.reply[:3].isdigit() else 250
            else:  # its last reply (an earlier attempt's, if any) is not this 2xx
                r.last_attempt, r.last_code, r.last_reply = now, 250, ""
        # (also one whose state was saved SENT: its message's other job was still running)
        notify = [r for r in env.recipients if r.state == SENT and r.address in owed]
        if notify and ((nid := notice_id(env, notify)) in self.inflight.deleted
                       or await self._io(self.spool.exists, nid)):
            # committed by the run, which died before its journal said so (deleted since
            # by an admin while no scheduler ran: final)
            notify = []
        if notify:
            remote = {r: said.remote for r, said in owed.items() if said is not None}
            try:
                await self._queue_dsn(env, notify, "relayed", remote)
            except Exception:
                log.exception("%s: cannot queue the success notification of the recipients "
                              "delivered before the crash (they are delivered again)", qid,
                              extra={"queue_id": qid})
                return
        if not newly:
            return
        try:
            if env.done and not env.held:
                await self._io(self.spool.remove, qid)
                where = "removed"
            else:
                await self._io(self.spool.save_state, env)
                where = "held" if env.held else "queued"
        except OSError as e:
            log.error("%s: cannot record the recipients delivered before the crash (they "
                      "are delivered again): %s", qid, e, extra={"queue_id": qid})
            return
        recorded = [r.address for r in newly if r.address in logged]
        if recorded:
            self.maillog.sent_before_crash(qid, recorded, where, stop)
        for r in newly:
            if r.address not in logged:
                said = owed.get(r.address)
                self.maillog.sent_at_start(qid, r.address, said.remote if said else None,
                                           backoff.age(env, now), r.attempts, where)

    async def _take_lock(self) -> int:
        # The CLI holds the lock for a moment during offline edits: wait a little for it.
        for _ in range(50):
            try:
                return control.acquire_scheduler_lock(self.spool)
            except BlockingIOError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"another scheduler holds {self.spool.root}/scheduler.lock")

    def _bind_notify(self) -> None:
        assert self._loop is not None
        path = self.spool.notify_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(str(path))
            os.chmod(path, 0o600)
            s.setblocking(False)
        except OSError as e:
            s.close()
            log.error("cannot bind %s (relying on rescans): %s", path, e)
            return
        with contextlib.suppress(OSError):  # room for bursts from all workers
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._nsock = s
        self._loop.add_reader(s.fileno(), self._on_datagram)

    async def stop(self) -> None:
        """Stop taking work; let in-flight deliveries finish (up to shutdown_timeout)."""
        self._stopping = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for t in (self._main, self._rescan):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        gone: list[Path] = []  # the sockets' paths
        if self._nsock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._nsock.fileno())
            self._nsock.close()
            self._nsock = None
            gone.append(self.spool.notify_path)
        if self._control is not None:
            self._control.close()
            gone.append(control.control_path(self.spool))
            self._control = None
        if gone:  # off the loop: a frozen spool holds an unlink until the thaw
            await stopdeadline.unlink(gone, "scheduler-socket-unlink")
        # Every task, those the waited ones start as they end too (a delivery's _finish:
        # its state saved, the message removed, its DSN queued), up to shutdown_timeout.
        loop = asyncio.get_running_loop()
        until = loop.time() + self.cfg.shutdown_timeout
        while self._tasks and (left := until - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        # Then deliveries still waiting for the next hop (and loads, scans) are cut: their
        # recipients are tried again at the next start, logged as deferred (_cut_by_stop).
        # Those whose results are in (`_saving`: their state save, removal, DSNs) go on,
        # up to STOP_SAVE_WAIT more, and are cut only past it (a hung disk): a stop never
        # leaves what the next hop answered to the next start's crash recovery.
        deadline = loop.time() + STOP_SAVE_WAIT
        cut: set[asyncio.Task[Any]] = set()
        while self._tasks:
            past = loop.time() >= deadline
            for t in self._tasks - cut:
                if past or t not in self._saving:
                    t.cancel()
                    cut.add(t)
            if self._tasks <= cut:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
        if self.spool.notifier.on_owed == self.owed:
            self.spool.notifier.on_owed = None
        if self.spool.notifier.on_abandoned == self.abandoned:
            self.spool.notifier.on_abandoned = None
        if self._hooked:
            self.spool.on_commit = None
            self._hooked = False
        # The journal's last lines (a cut's `{"e": N, "c": 1}` and its delivered
        # recipients, the ends) are on disk before the process exits, as their saves:
        # else the next start took this stop for a crash (a second stat=Sent, a
        # recipient named "may have been delivered", or delivered again). Past
        # STOP_SAVE_WAIT (a hung disk) the stop goes on, as for the saves.
        writer = self.inflight.close()
        if writer is not None and not await stopdeadline.off_loop(
                writer.join, "inflight-close", STOP_SAVE_WAIT):
            log.warning("in-flight journal %s: its last lines not written %g s into the "
                        "stop (the spool stalled?): the next start may take what this "
                        "stop cut for a crash's", self.inflight.path, STOP_SAVE_WAIT)
        if self._lock_fd is not None:
            control.release_scheduler_lock(self._lock_fd)
            self._lock_fd = None
        if self.containment is not None:
            await self.containment.close()

    # ------------------------------------------------------------------ public
    def notify(self, qid: str, vouched: int = 0) -> None:
        """A new message was committed (`vouched`: its file's inode when the producer
        vouches for its line ends, spool/notify.py). Thread-safe; cheap."""
        self._on_loop(self._notify, qid, vouched)

    def _on_loop(self, fn: Callable[[str, int], None], qid: str, n: int) -> None:
        """`fn(qid, n)` on the scheduler's loop, from any thread; nothing once stopping."""
        if self._loop is None or self._stopping:
            return
        if threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(fn, qid, n)
        else:
            fn(qid, n)

    def owed(self, qid: str, producer: int) -> None:
        """The in-process notice's `owed_by` (spool/notify.py `on_owed`): this process's
        producer still owes `qid`'s from= line (its pid), or wrote it (0), as the
        datagrams `ID INODE PID` and `ID logged` say of another's. Thread-safe."""
        self._on_loop(self._owed_notice, qid, producer)

    def abandoned(self, qid: str) -> None:
        """`qid`'s producer gave up its commit (Notifier.abandoned; the datagram
        `ID abandoned` from another process). Thread-safe."""
        self._on_loop(self._abandoned_notice, qid, 0)

    def abandoned_at_start(self, qids: list[str]) -> None:
        """Before start(): ids a killed instance's producers gave up whose files are
        still there (spool/abandoned.py, the book's leftovers): dropped at their load,
        as those told by a notice. Not thread-safe (nothing else runs yet)."""
        for qid in qids:
            self._abandoned_notice(qid)

    def _abandoned_notice(self, qid: str, _: int = 0) -> None:
        if not is_queue_id(qid):
            return
        if len(self._abandoned) >= ABANDONED_MAX:
            del self._abandoned[next(iter(self._abandoned))]
        self._abandoned[qid] = None

    def _owed_notice(self, qid: str, producer: int) -> None:
        if producer:
            if len(self._owed_by) < OWED_MAX:
                self._owed_by[qid] = producer
        else:
            self._owed_by.pop(qid, None)
            self._owed_env.pop(qid, None)

    def flush(self, qid: str | None = None) -> None:
        """Try now, ignoring back-off: one message or everything known."""
        if not qid:
            self._probe_dead_now()  # as postqueue -f: dead destinations are tried again
        ids = [qid] if qid else list(self._token)
        for q in ids:
            self._forced.add(q)
            if q not in self._active:
                self._schedule(q, 0.0, fresh=True)

    @property
    def active(self) -> list[str]:
        return sorted(self._active)

    def stats(self) -> dict[str, int]:
        """For metrics, O(1): messages in the active set, deliveries in flight, scheduled;
        the queue's committed messages (queue/), held and corrupt files as this scheduler
        knows them (complete once the start's scan is done: `scanned` is 1)."""
        return {"active": len(self._active), "deliveries": self._running,
                "scheduled": len(self._token), "destinations": len(self._dest_running),
                "queued": len(self._queued), "held": len(self._held),
                "corrupt": self._corrupt, "scanned": int(self._scanned)}

    def reload(self, cfg: Config) -> None:
        """SIGHUP: new limits and retry settings apply to the next decisions."""
        self.cfg = cfg
        self.submitter.reload(cfg)
        if self.containment is not None:
            self.containment.reload(cfg)
        self.concurrency = max(1, cfg.delivery.concurrency)
        self.per_destination = max(1, cfg.delivery.concurrency_per_domain)
        self._pump()

    def use_courier(self, courier: CourierLike) -> None:
        """SIGHUP with new [relay] / [delivery] settings: deliveries started from now on
        go through `courier`; those in flight finish on the old one, whose idle
        connections are closed. The dead marks are forgotten: they judged the old
        routes (a smart host, port or nameservers the reload may have just fixed)."""
        old, self.courier = self.courier, courier
        self._dead.clear()
        task = asyncio.get_running_loop().create_task(old.close())
        self._closing = task  # keep a reference until it is done

    # ------------------------------------------------------------------ queueing
    def _notify(self, qid: str, vouched: int = 0, owed_by: int = 0) -> None:
        if not is_queue_id(qid) or qid in self._ignored:
            return
        self._noticed.add(qid)  # (until its load or its removal)
        if owed_by and len(self._owed_by) < OWED_MAX:
            self._owed_by[qid] = owed_by
        if qid in self._active:
            return
        if vouched and len(self._vouched) < VOUCHED_MAX:
            self._vouched[qid] = vouched  # until it leaves the queue (_gone)
        self._queued.add(qid)  # committed: a notice comes after the fsync
        if qid in self._token:
            return  # already known; fresh mail is never deferred
        self._schedule(qid, time.time(), fresh=True)

    def _on_datagram(self) -> None:
        assert self._nsock is not None
        for _ in range(1000):  # bounded so a flood cannot starve the loop
            try:
                data = self._nsock.recv(8192)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for line in data.decode("ascii", "replace").split("\n"):  # batched by senders
                qid, _, rest = line.strip().partition(" ")
                ino, _, by = rest.partition(" ")
                if ino == ABANDONED_NOTICE:
                    self._abandoned_notice(qid)
                    continue
                if ino == LOGGED_NOTICE:  # the producer's from= line written after all
                    self._owed_by.pop(qid, None)
                    self._owed_env.pop(qid, None)
                    continue
                self._notify(qid, int(ino) if ino.isdigit() and ino.isascii() else 0,
                             int(by) if by.isdigit() and by.isascii() else 0)

    def _schedule(self, qid: str, due: float, *, fresh: bool = False) -> None:
        seq = next(self._seq)
        self._token[qid] = seq
        if fresh:
            self._fresh.append((seq, qid))
        else:
            heapq.heappush(self._heap, (due, seq, qid))
        if self._wake is not None:
            self._wake.set()

    def _spawn(self, coro: Any, *, saving: bool = False) -> None:
        """`coro` as a task stop() waits for; `saving`: it records results already in
        hand (a stop lets it finish, up to STOP_SAVE_WAIT past shutdown_timeout)."""
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        if saving:
            self._saving.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        self._saving.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("scheduler task failed", exc_info=t.exception())

    async def _io(self, fn: Any, *args: Any) -> Any:
        # The spool's lean commit threads: cheaper hand-off than run_in_executor.
        return await commit_pool().run(functools.partial(fn, *args))

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            if self._dispatch():  # a batch started: let them (and everyone else) run
                await asyncio.sleep(0)
                continue
            timeout: float | None = None
            if self._heap and len(self._active) < self._retry_room:
                timeout = max(0.0, self._heap[0][0] - time.time())
            if timeout == 0.0:
                await asyncio.sleep(0)
                continue
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns normally when
            # the wake-up and stop()'s cancel land in the same loop turn (a busy master:
            # the cancel was lost and stop() waited for the next due time, minutes).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    @property
    def _retry_room(self) -> int:
        """Active messages retries may fill: the last quarter of `max_active` is fresh
        mail's, so a backlog stuck at a slow destination never keeps new mail out."""
        return max(1, self.max_active - self.max_active // 4)

    def _dispatch(self) -> bool:
        """Start due messages, at most DISPATCH_BATCH; True when it stopped at the batch.
        Each start reads its file on the loop, so thousands due at once (a start with a
        big queue, a flush of all) are taken a batch per turn of the loop, never in one
        stretch that stalls every client and the control socket."""
        now = time.time()
        started = 0
        while True:
            if started >= DISPATCH_BATCH:
                return True
            if self._fresh and len(self._active) < self.max_active:
                seq, qid = self._fresh.popleft()
            elif self._heap and self._heap[0][0] <= now \
                    and len(self._active) < self._retry_room:
                _, seq, qid = heapq.heappop(self._heap)
            else:
                break
            if self._token.get(qid) != seq:
                continue  # superseded entry
            del self._token[qid]
            if qid in self._active:
                continue
            if qid in self._busy:
                self._schedule(qid, now + BUSY_RETRY)
                continue
            forced = qid in self._forced
            self._forced.discard(qid)
            act = _Active(qid, forced, qid in self._named)
            self._named.discard(qid)
            self._active[qid] = act
            self._spawn(self._start_message(act))
            started += 1
        return False

    async def _rescan_loop(self, big: bool) -> None:
        """For a big queue, the start's recovery and scan (reading every file takes
        seconds per 20,000, minutes from a cold disk; meanwhile new mail is taken in and
        delivered); then a rescan every `rescan_interval`."""
        if big:
            await self._recover()
            await self._scan_all()
        while True:
            await asyncio.sleep(self.rescan_interval)
            self._check_clock()
            await self._scan_all()
            await self._sweep_unfinished()

    async def _scan_all(self) -> None:
        try:
            ids = await self._io(self.spool.scan)
            held = [] if self._scanned else await self._io(self.spool.held)
            self._corrupt = await self._io(self.spool.corrupt_count)
        except OSError as e:
            log.error("rescan failed: %s", e)
            return
        now = time.time()
        for qid in ids:
            if (qid not in self._token and qid not in self._active
                    and qid not in self._ignored and qid not in self._busy):
                self._queued.add(qid)  # one removed meanwhile goes again at its load
                self._schedule(qid, now)
        # hold/ changes only through this scheduler once it runs: listed once.
        self._held.update(held)
        self._scanned = True

    def _check_clock(self) -> None:
        """The wall clock set back (past CLOCK_STEP) while retries wait in the heap:
        their times were reckoned by the clock ahead, so each would wait the jump out
        too (a year's jump, a year). Every scheduled message is looked at now, as at a
        start: one whose recorded next attempt the retry schedule cannot have set is
        tried now with the maillog warning (_start_message), the others keep their
        times."""
        offset = time.time() - time.monotonic()
        back = self._wall_offset - offset
        self._wall_offset = offset
        if back <= CLOCK_STEP or not self._heap:
            return
        log.warning("the clock was set back %.0fs: every scheduled message looked at now",
                    back)
        now = time.time()
        self._heap = [(min(due, now), seq, qid) for due, seq, qid in self._heap]
        heapq.heapify(self._heap)
        if self._wake is not None:
            self._wake.set()

    def _release(self, act: _Active) -> None:
        """Leave the active set (synchronously with any rescheduling by the caller)."""
        self._active.pop(act.qid, None)
        self._waiting_bytes -= act.waiting_bytes
        act.waiting_bytes = 0
        act.done.set()
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ the counts
    def _gone(self, qid: str) -> None:
        """`qid` left the queue (removed, quarantined, or found missing)."""
        self._queued.discard(qid)
        self._held.discard(qid)
        self._unsaved_attempts.pop(qid, None)
        self._vouched.pop(qid, None)
        self._noticed.discard(qid)
        self._owed_seen.pop(qid, None)
        self._abandoned.pop(qid, None)
        self._unsaid.pop(qid, None)

    def _moved_to_hold(self, qid: str) -> None:
        self._queued.discard(qid)
        self._held.add(qid)

    # ------------------------------------------------------------------ one message
    def _log_quarantined(self) -> None:
        q = self.spool.quarantined  # appended to by commit-pool threads: pop one by one
        while q:
            qid, reason = q.pop(0)
            self._gone(qid)
            self._corrupt += 1
            self.maillog.warning(f"damaged queue file moved to corrupt/: {reason}",
                                 queue_id=qid)

    def _load(self, qid: str) -> tuple[Envelope, bytes | Path, int]:
        # One read for a small message: header, envelope and body (the courier gets bytes).
        return self.spool.load_for_delivery(qid, vouched=self._vouched.get(qid, 0))

    async def _start_message(self, act: _Active) -> None:
        qid = act.qid
        try:
            # A header read from the page cache: cheaper inline than a thread hand-off.
            # Lengths and checksum are verified (spool format 2); a big message's checksum
            # is read off the event loop.
            env, path, offset = self._load(qid)
            if isinstance(path, Path):
                await self._io(self.spool.verify, qid)
        except InCommit:
            # Found by a scan in its writer's fsync: its notice follows, unless it was
            # lost (sent before a restarted scheduler bound its socket): looked at again.
            self._release(act)
            self._schedule(qid, time.time() + IN_COMMIT_AGAIN)
            return
        except FileNotFoundError:
            self._gone(qid)
            self._release(act)
            return
        except CorruptError as e:
            # Damage is never delivered and never deleted: corrupt/ and a warning line.
            await self._io(self.spool.quarantine, qid, str(e))
            self._log_quarantined()
            self._ignored.add(qid)
            self._release(act)
            return
        except (SpoolError, OSError) as e:
            log.error("%s: cannot read spool file, skipped until restart: %s", qid, e,
                      extra={"queue_id": qid})  # daemon.MaillogHandler
            self._ignored.add(qid)
            self._release(act)
            return
        if qid in self._abandoned:
            await self._drop_abandoned(qid)
            self._release(act)
            return
        if env.held:
            self._moved_to_hold(qid)
            self._release(act)
            return
        noticed = qid in self._noticed
        if noticed:
            self._noticed.discard(qid)
        if qid in self._owed_by:  # its producer lives on, its line not written yet
            if env.log_owed:
                noticed = True
                self._owed_env[qid] = env
            else:
                del self._owed_by[qid]
                self._owed_env.pop(qid, None)
        if env.log_owed and not noticed:
            wait = self._log_owed(env)
            if wait > 0:
                self._release(act)  # its producer may still write the line: looked at later
                self._schedule(qid, time.time() + wait)
                return
        unsaved = self._unsaved_attempts.get(qid)
        if unsaved is not None and len(unsaved) == len(env.recipients):
            for r, attempts in zip(env.recipients, unsaved, strict=True):
                r.attempts = max(r.attempts, attempts)
        if env.auth_user and self.containment is not None \
                and await self.containment.suspended(env.auth_user):
            # Accepted just before the suspension, or queued on another node of a farm:
            # held, not sent, not deleted (`authrelay user resume --release` sends it).
            try:
                await self._io(self.spool.hold, qid)
                self._token.pop(qid, None)
                self._moved_to_hold(qid)
                self.maillog.held(qid)
            except FileNotFoundError:
                pass
            self._release(act)
            return
        pending = env.pending
        if not pending:  # every recipient final, but we stopped before removing the file
            await self._remove(env)
            self._release(act)
            return
        crashed = self._crashed.pop(qid, None)
        if crashed is not None:  # the attempt the crash cut was made: it counts
            for r in pending:
                if r.address in crashed[0]:
                    r.attempts += 1
                    act.crashed.add(r.address)
            if act.crashed:
                act.unsaved.append(crashed[1])  # still named until the outcome is on disk
                act.to_save = True
            else:
                self.inflight.end(crashed[1])
        now = time.time()
        if env.received_at > now:
            await self._clamp_arrival(env, now)
        retry = self.cfg.delivery.retry
        latest = backoff.latest(retry, now) + NEXT_ATTEMPT_SLACK
        if any(r.next_attempt > latest for r in pending):
            if all(0 < r.last_attempt <= now + NEXT_ATTEMPT_SLACK
                   for r in pending if r.next_attempt > latest):
                # Tried in the past by a longer schedule (a restart with a shorter
                # [delivery] retry), not by a clock ahead: the new schedule applies from
                # the last attempt, each message on its own time, and no warning.
                for r in pending:
                    r.next_attempt = min(r.next_attempt, backoff.latest(
                        retry, r.last_attempt or now) + NEXT_ATTEMPT_SLACK)
            else:
                self.maillog.warning("next attempt recorded further ahead than the retry "
                                     "schedule allows (the clock was set back?): tried now",
                                     queue_id=qid)
                for r in pending:
                    r.next_attempt = min(r.next_attempt, now)
        by_key: dict[str, list[Recipient]] = {}
        for r in pending:
            try:
                key = route_key(self.cfg, r.address)
            except Exception:  # a malformed address still needs a slot and a result
                key = r.address.rsplit("@", 1)[-1].lower()
            by_key.setdefault(key, []).append(r)
        # A destination with one recipient due takes all its pending recipients: a
        # message's retries to one destination go in one transaction (as Postfix's qmgr
        # retries the whole message), not one per back-off jitter.
        groups = {key: rcpts for key, rcpts in by_key.items()
                  if act.forced or any(r.next_attempt <= now + NEXT_ATTEMPT_SLACK
                                       for r in rcpts)}
        if not groups:  # found by a scan before its time
            self._release(act)
            self._schedule(qid, min(r.next_attempt for r in pending))
            return
        act.env, act.path, act.offset = env, path, offset
        act.jobs = len(groups)
        jobs = []
        for key, rcpts in groups.items():
            job = _Job(act, key, rcpts)
            jobs.append(job)
            fresh_q, retry_q = self._waiting.setdefault(key, (deque(), deque()))
            (fresh_q if all(r.attempts == 0 for r in rcpts) else retry_q).append(job)
            self._rr[key] = None
        self._pump()
        if isinstance(path, bytes) and not all(j.started for j in jobs):
            # Waiting for a slot. Within WAITING_INLINE_BUDGET the bytes stay (a busy
            # destination's ordinary queue: no second read); past it (a slow destination
            # may keep thousands waiting, up to INLINE_MAX each) the message is read from
            # its file when its turn comes.
            if self._waiting_bytes + len(path) <= WAITING_INLINE_BUDGET:
                act.waiting_bytes = len(path)
                self._waiting_bytes += len(path)
            else:
                try:
                    act.path, act.offset = self.spool.body_path(qid)
                except (OSError, SpoolError):
                    pass  # delivered from the copy in memory

    async def _drop_abandoned(self, qid: str) -> None:
        """A ready file whose producer gave up its commit (told 451 4.3.0: no 250 was or
        will be sent for this id) and died in the commit thread's fsync, before the
        thread removed it: removed here, one line, never delivered (the client sends
        the message again). Loaded at all means its writer let go of it (the flock)."""
        try:
            await self._io(self.spool.remove, qid)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("%s: cannot remove the abandoned commit's file: %s", qid, e,
                      extra={"queue_id": qid})
            self._ignored.add(qid)  # never delivered; looked at again at the restart
            return
        self._gone(qid)
        self.maillog.warning(ABANDONED_DROPPED, queue_id=qid)

    def _log_owed(self, env: Envelope) -> float:
        """A message found by a scan, not by its producer's notice, whose file says its
        `from=` line was never written (Envelope.log_owed: a worker killed between the
        250 and its maillog writer's write, Postfix's qmgr writes that line itself): the
        line, from the envelope, marked `logged_by=scheduler`, before any delivery line,
        and the mark cleared so it is written once: 0.0. While the commit is under
        LOG_OWED_WAIT old (the producer may still write it and notify), nothing written:
        the seconds left. A commit time in the future (the clock set back since) says no
        age: LOG_OWED_WAIT from the first load that saw it (else the line of a live
        producer was written here too: two lines)."""
        age = time.time() - env.log_owed
        if age < 0 and len(self._owed_seen) < OWED_MAX:
            now = time.monotonic()
            age = now - self._owed_seen.setdefault(env.queue_id, now)
        if 0 <= age < LOG_OWED_WAIT:
            return LOG_OWED_WAIT - age
        self._owed_seen.pop(env.queue_id, None)
        self._write_owed(env)
        return 0.0

    def _write_owed(self, env: Envelope) -> None:
        """`env`'s `from=` line, which its producer never wrote, `logged_by=scheduler`;
        its file's mark cleared once the line is written (MailLog.then, as a producer's
        is: cleared at once, a kill -9 before the writer wrote the line left the message
        with no `from=` line ever; a file gone meanwhile has none)."""
        log_queued(self.maillog, env, env.size, logged_by="scheduler")
        env.log_owed = 0.0  # (this run writes it no more)
        self.maillog.then(functools.partial(self._mark_logged, env))

    def _mark_logged(self, env: Envelope) -> None:
        """In the maillog's writer thread: `env`'s owed `from=` line written."""
        try:
            self.spool.logged(env)
        except FileNotFoundError:
            pass  # removed meanwhile: nothing more of it is logged
        except OSError as e:  # the line may be written again at its next load
            self.maillog.warning(f"cannot mark the from= line written: {e}",
                                 queue_id=env.queue_id)

    async def _clamp_arrival(self, env: Envelope, now: float) -> None:
        """An arrival time in the future: accepted while the clock was ahead, set back
        since. Its age (max_queue_lifetime, delay_warning) would stay 0 until the clock
        caught up, delaying both by the size of the jump: it is counted from now, saved
        in the state at once (so a later load does not restart it) with one warning. Now
        is never earlier than the real arrival, so nothing expires early."""
        self.maillog.warning(
            f"arrival time {env.received_at - now:.0f}s in the future (the clock was set "
            "back?): its time in the queue is counted from now", queue_id=env.queue_id)
        env.received_at = now
        await self._save_state(env)

    async def _save_state(self, env: Envelope) -> bool:
        """env's state on disk; False when it could not be written (logged). A message
        gone meanwhile (an operator's delete) counts as saved: nothing left to deliver."""
        try:
            await self._io(self.spool.save_state, env)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("%s: cannot save state", env.queue_id,
                          extra={"queue_id": env.queue_id})  # daemon.MaillogHandler
            return False
        return True

    def _pump(self) -> None:
        """Start waiting deliveries, round robin over destinations, within the limits."""
        if self._stopping:
            return
        while self._running < self.concurrency and self._rr:
            started = False
            now = time.monotonic()
            for key in list(self._rr):
                if self._running >= self.concurrency:
                    break
                dead = self._dead.get(key)
                probing = dead is not None and now >= dead[0]
                limit = 1 if probing else self.per_destination  # a probe at a time
                if self._dest_running.get(key, 0) >= limit:
                    continue
                fresh_q, retry_q = self._waiting[key]
                job = fresh_q.popleft() if fresh_q else retry_q.popleft()
                if not fresh_q and not retry_q:
                    del self._waiting[key]
                    del self._rr[key]
                else:
                    self._rr.move_to_end(key)
                suspended = None
                if dead is not None and not probing and not job.act.named:
                    suspended = dead[1]
                self._running += 1
                self._dest_running[key] = self._dest_running.get(key, 0) + 1
                job.started = True
                self._spawn(self._run_job(job, suspended))
                started = True
            if not started:
                break

    def _judge_destination(self, key: str, results: dict[str, DeliveryResult]) -> None:
        """Mark `key` unreachable when no host answered for any recipient; forget the
        mark when one did. `unanswered` is the courier's own connect failure, never a
        next hop's reply (a smart host answering '451 4.4.1' for its own next hop is
        alive); on a recipient's result it means no host of the attempt answered."""
        if results and all(not r.ok and not r.permanent and r.enhanced == UNREACHABLE
                           and r.unanswered for r in results.values()):
            retry = self.cfg.delivery.retry
            hold = min(retry[0] if retry else DEAD_FOR, DEAD_FOR)
            first = next(iter(results.values()))
            if key not in self._dead:
                log.warning("destination %s unreachable, deliveries suspended for %.0fs: %s",
                            key, hold, first.text)
                self._bound_dead()
            self._dead[key] = (time.monotonic() + hold, first)
        elif results:
            self._dead.pop(key, None)

    def _probe_dead_now(self) -> None:
        """`queue flush` of all: every mark ends now, so each dead destination is probed
        by one job (and marked again if still dead) rather than tried by
        `concurrency_per_domain` at once, each waiting out its connect timeout."""
        now = time.monotonic()
        for key, (end, why) in self._dead.items():
            self._dead[key] = (min(end, now), why)

    def _bound_dead(self) -> None:
        """Room for one more mark within DEAD_MAX: a mark is forgotten only on an answer
        or a flush, and each domain is a key (a user's mail to thousands of domains
        whose MX refuses, a wildcard zone's, would grow it without end). The expired
        go first (their destination is probed like any other then), else the oldest."""
        if len(self._dead) < DEAD_MAX:
            return
        now = time.monotonic()
        for k in [k for k, (end, _r) in self._dead.items() if end <= now]:
            del self._dead[k]
        while len(self._dead) >= DEAD_MAX:
            del self._dead[next(iter(self._dead))]

    async def _run_job(self, job: _Job, suspended: DeliveryResult | None = None) -> None:
        """One delivery; with `suspended` (its destination is marked unreachable) no
        attempt is made: every recipient is deferred with that reason."""
        act = job.act
        assert act.env is not None and act.path is not None
        completed = False
        try:
            if suspended is not None:
                res = DeliveryResult.temp(
                    f"delivery temporarily suspended: {suspended.text}", suspended.enhanced,
                    suspended.code, suspended.remote)
                async with act.lock:
                    await self._apply(act, job, {r.address: res for r in job.rcpts},
                                      suspended=True)
                completed = True
                return
            if self._unsaid and act.qid in self._unsaid:
                await self._said(act.qid)
            token = self.inflight.begin(act.qid, [r.address for r in job.rcpts])
            courier = self.courier  # a reload may bring another meanwhile
            sent: dict[str, str] = {}  # who may have the message (the courier fills it)
            got: dict[str, DeliveryResult] = {}  # who has it: a transaction's 2xx (_taken)
            try:
                t0 = time.monotonic()
                # (the next hop gets the end-of-data dot once the begin line is written)
                results = await courier.deliver(
                    act.env, job.rcpts, act.path, act.offset, sent=sent,
                    before_end=functools.partial(self.inflight.begun, token),
                    taken=functools.partial(self._taken, token, act.env, job.rcpts, got))
                task = asyncio.current_task()
                if task is not None and task in self._tasks:  # results in hand: a stop
                    # lets it save them
                    self._saving.add(task)
                if self.metrics is not None:
                    self.metrics.delivery_attempt(
                        "smarthost" if job.key == "smarthost" else "mx", time.monotonic() - t0)
            except asyncio.CancelledError:
                if self._stopping:  # cut by a clean stop: said here, not taken for a crash
                    self._cut_by_stop(act.env, job, sent, got)
                    if self._delivered:
                        self._hand_delivered()  # (got's lines before the cut's end)
                    self.inflight.cut(token)  # (got: recorded sent by the next start)
                raise
            except Exception:
                log.exception("%s: courier failed", act.qid, extra={"queue_id": act.qid})
                results = {}
            if courier is self.courier:  # an old courier's routes judge nothing now
                self._judge_destination(job.key, results)
            owed = self._journal_delivered(token, act.env, job.rcpts, results)
            async with act.lock:
                saved = await self._apply(act, job, results)
            if got or any(res.ok for res in results.values()):
                self._log_written(token)
            if saved and not owed:  # (owed a success DSN: ended once _finish queued it)
                self.inflight.end(token)  # the outcome is on disk
            else:
                act.unsaved.append(token)  # ended by _finish, once it is
            completed = True
        finally:
            self._running -= 1
            n = self._dest_running.get(job.key, 1) - 1
            if n:
                self._dest_running[job.key] = n
            else:
                self._dest_running.pop(job.key, None)
            act.jobs -= 1
            if act.jobs == 0:
                if completed:
                    self._spawn(self._finish(act), saving=True)
                else:
                    self._release(act)
            self._pump()

    async def _said(self, qid: str) -> None:
        """Before the first attempt of success notice `qid`: until the journal's line
        saying it is queued (`{"s": N}`) is written. Delivered and removed before that, a
        crash's start finds the journal owing it and the queue without it: a second
        notice (the end-of-data dot's wait for the attempt's begin line, written after
        that line, is bounded: BEGIN_WAIT). One warning when it waits longer than that."""
        mark = await self._unsaid[qid]
        wait = self.inflight.said(mark) if mark else None
        if wait is not None:
            try:
                await asyncio.wait_for(asyncio.shield(wait), BEGIN_WAIT)
            except TimeoutError:
                log.warning("success notice %s waits for the in-flight journal %s (its "
                            "thread is behind: the spool stalled?) before it is delivered",
                            qid, self.inflight.path, extra={"queue_id": qid})
                await wait
        self._unsaid.pop(qid, None)

    async def _said_within(self, qid: str, timeout: float) -> bool:
        """Whether success notice `qid`'s `{"s": N}` line is written within `timeout`
        seconds (an admin's delete waits for it: deleted before, a crash's start would
        queue the notice again)."""
        fut = self._unsaid.get(qid)
        if fut is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                mark = await asyncio.shield(fut)
                if mark and (wait := self.inflight.said(mark)) is not None:
                    await wait
        except TimeoutError:
            return False
        return True

    def _journal_delivered(self, token: int, env: Envelope, rcpts: list[Recipient],
                           results: dict[str, DeliveryResult]) -> bool:
        """The recipients the next hop answered 2xx, to the in-flight journal before the
        outcome is saved or the message removed (batched, UNLINK_GATHER later): a crash
        in between records them sent at the next start (_after_crash), not delivered
        again. Those owed a success DSN (NOTIFY=SUCCESS, not passed on) are named so:
        _finish queues it (then InflightJournal.notified), and after a crash before that
        the start (_sent_before_crash). True when some are."""
        ok = [r for r in rcpts if (res := results.get(r.address)) is not None and res.ok]
        if not ok:
            return False
        if not self._delivered:  # the turn's first: handed over once the turn ends
            asyncio.get_running_loop().call_soon(self._hand_delivered)
        owed = [Owed(r.address, res.remote, res.reply, int(time.time())) for r in ok
                if not (res := results[r.address]).dsn_passed
                and should_notify(env, r, "relayed")]
        self._delivered.append((token, [r.address for r in ok], len(ok) == len(rcpts), owed))
        return bool(owed)

    def _taken(self, token: int, env: Envelope, rcpts: list[Recipient],
               got: dict[str, DeliveryResult], results: dict[str, DeliveryResult]) -> None:
        """The courier's `taken`: a transaction of attempt `token` delivered (2xx) to
        `results`' recipients, journaled at once, not when the attempt ends: a crash or a
        stop cutting a later transaction (another host, past a RCPT limit) does not
        deliver them again. `got` collects them (_cut_by_stop)."""
        got.update(results)
        self._journal_delivered(token, env, rcpts, results)

    def _log_written(self, token: int) -> None:
        """Attempt `token`'s stat=Sent lines are given to the maillog: the journal marks
        it (InflightJournal.logged) once the maillog's writer wrote them, so a crash's
        start writes no second one; one hand-off per loop turn."""
        if not self._logged:
            asyncio.get_running_loop().call_soon(self._hand_logged)
        self._logged.append(token)

    def _hand_logged(self) -> None:
        tokens, self._logged = self._logged, []
        self.maillog.then(functools.partial(self.inflight.logged, tokens))

    def _hand_delivered(self) -> None:
        """A loop turn's delivered recipients to the journal, one hand-off to its thread
        (at most a loop turn later than their 2xx: the window they close is that much
        longer; each end() or save comes later still)."""
        done, self._delivered = self._delivered, []
        self.inflight.delivered(done)

    def _cut_by_stop(self, env: Envelope, job: _Job, sent: dict[str, str],
                     got: dict[str, DeliveryResult]) -> None:
        """A delivery still running when stop()'s shutdown_timeout ended: one deferred
        line per recipient naming the stop (and, when the message had gone out, that it
        may have been delivered). The state is not changed: the message stays queued
        and is tried again at the next start, as after any deferral; but a recipient an
        earlier transaction delivered (`got`: its 2xx) gets its Sent line, and the next
        start records it sent from the journal (InflightJournal.cut), not sent again."""
        now = time.time()
        why = (f"delivery cut by authrelay's stop (still running when shutdown_timeout = "
               f"{self.cfg.shutdown_timeout:g}s ended); tried again at the next start")
        for r in job.rcpts:
            if (res := got.get(r.address)) is not None:
                self.maillog.sent(env.queue_id, r.address, res.remote or None,
                                  backoff.age(env, now), r.attempts + 1, res.enhanced or None,
                                  res.reply, tls=res.tls or None, policy=res.tls_policy or None)
                continue
            relay = sent.get(r.address)
            text = why if relay is None else (
                f"{why}; the message had been sent to {relay} and no reply received: it "
                "may have been delivered (the next attempt may deliver it twice)")
            self.maillog.deferred(env.queue_id, r.address, relay, backoff.age(env, now),
                                  r.attempts + 1, SHUTDOWN, f"451 {SHUTDOWN} {text}")

    async def _apply(self, act: _Active, job: _Job, results: dict[str, DeliveryResult],
                     *, suspended: bool = False) -> bool:
        """Record one job's results; True when they are on disk (saved here: the message
        has other jobs; else `_finish` saves them). A recipient that failed and wants a
        DSN stays PENDING (in memory and on disk) until `_finish` has queued the pass's
        one DSN: a crash in between re-tries it, so the bounce is late or doubled, never
        lost. `suspended`: no attempt was made (a dead destination); a mere deferral then
        writes nothing (one fsync per message made a dead destination's 20,000 cost over
        a minute): its next time is kept in memory, and after a crash the file's, its
        last attempt's, applies (due: tried, or deferred again once the mark is back)."""
        env = act.env
        assert env is not None
        d = self.cfg.delivery
        now = time.time()
        refused: list[str] = []  # bad recipients by the next hop: containment counts them
        retry_at: float | None = None  # one next attempt for the job's deferred ones
        for r in job.rcpts:
            res = results.get(r.address)
            if res is None:
                res = DeliveryResult.temp("internal error: no result for recipient", "4.3.0")
            r.attempts += 1
            r.last_attempt = now  # RFC 3464 2.3.7 Last-Attempt-Date of a later DSN
            r.last_code = res.code
            r.last_reply = res.reply
            act.remote[r.address] = res.remote
            expired = False
            if not suspended:
                act.to_save = True
            if res.ok:
                r.state, stat = SENT, "Sent"
                if not res.dsn_passed and should_notify(env, r, "relayed"):
                    act.owed.setdefault("relayed", []).append(r)
            elif res.permanent or res.code >= 500 or \
                    backoff.expired(env, now, d.max_queue_lifetime):
                expired = not (res.permanent or res.code >= 500)
                if res.recipient_refused:  # a next hop's RCPT reply: no such recipient
                    refused.append(r.address)
                stat = "Bounced"
                act.to_save = True
                if should_notify(env, r, "failed"):
                    act.owed.setdefault("failed", []).append(r)  # FAILED once it is queued
                else:
                    r.state = FAILED
            else:
                if retry_at is None:  # they go together again: one jitter for all
                    retry_at = backoff.next_attempt(
                        env, now, d.retry, max(x.attempts for x in job.rcpts),
                        d.max_queue_lifetime)
                r.next_attempt = retry_at
                stat = "Deferred"
                if (d.delay_warning > 0 and backoff.age(env, now) >= d.delay_warning
                        and not r.delay_warned):
                    act.to_save = True
                    if should_notify(env, r, "delayed"):
                        act.owed.setdefault("delayed", []).append(r)
                    else:
                        r.delay_warned = True
            if self.metrics is not None:
                self.metrics.delivery_result(stat.lower(), backoff.age(env, now))
                if res.tls_policy:
                    self.metrics.delivery_tls(stat.lower(), res.tls or "none", res.tls_policy)
            record = (self.maillog.expired if expired else
                      {"Sent": self.maillog.sent, "Deferred": self.maillog.deferred}.get(
                          stat, self.maillog.bounced))
            again = r.address in act.crashed
            if again:
                act.crashed.discard(r.address)
            record(env.queue_id, r.address, res.remote or None, backoff.age(env, now),
                   r.attempts, res.enhanced or None, r.last_reply, tls=res.tls or None,
                   policy=res.tls_policy or None,
                   redelivery="after_crash" if again else None)
        if refused and env.auth_user and self.containment is not None:
            # At most [limits.containment] refused_per_message of one message count: its
            # recipients refused in earlier attempts (other destinations, passes) too.
            # Those of other jobs are judged by their recorded reply (refused_before).
            mine = {id(x) for x in job.rcpts}
            earlier = sum(1 for x in env.recipients
                          if id(x) not in mine and x.last_code >= 500
                          and refused_before(x.last_reply, env.sender, x.address))
            # In the background: a trip holds this user's mail, which waits for this
            # very delivery to end.
            self._spawn(self.containment.refused(env.auth_user, refused, earlier=earlier))
        # The last job's state is saved by _finish, after the pass's DSNs.
        return act.jobs > 1 and act.to_save and await self._save_state(env)

    async def _send_owed(self, act: _Active) -> list[str]:
        """One DSN per action for the whole pass (RFC 3464 allows many recipients per
        report; Postfix sends one bounce per message, whatever the destinations). The
        success notice's queue id (in _unsaid until `notified`), if one was queued."""
        notices = []
        env = act.env
        assert env is not None
        now = time.time()
        d = self.cfg.delivery
        if act.owed.get("delayed"):
            # One delay warning per message (as Postfix): every still-pending recipient
            # not warned yet is named, also those to other destinations or not due in
            # this pass (retried on another schedule).
            named = {id(r) for rs in act.owed.values() for r in rs}
            for r in env.pending:
                if id(r) in named or r.delay_warned:
                    continue
                if should_notify(env, r, "delayed"):
                    act.owed["delayed"].append(r)
                else:
                    r.delay_warned = True
        for action, trouble in _DSN_ACTIONS:
            rcpts = act.owed.pop(action, [])
            if not rcpts:
                continue
            try:
                notice = await self._queue_dsn(env, rcpts, action, act.remote,
                                               journaled=True)
                if action == "relayed":
                    notices.append(notice)
            except Exception:
                log.exception("%s: %s", env.queue_id, trouble,
                              extra={"queue_id": env.queue_id})
                if action == "failed":
                    # No bounce without a retry: keep them pending, so the failure (and
                    # its bounce) comes again later rather than silently vanishing. (A
                    # delay warning or a success notice that cannot be queued is not
                    # retried: the mail itself is still on its way, or went out.)
                    for r in rcpts:
                        r.next_attempt = now + (d.retry[0] if d.retry else 300.0)
                continue
            for r in rcpts:
                if action == "failed":
                    r.state = FAILED
                elif action == "delayed":
                    r.delay_warned = True
        return notices

    async def _queue_dsn(self, env: Envelope, rcpts: list[Recipient], action: str,
                         remote: dict[str, str], journaled: bool = False) -> str:
        """The DSN queued (the one way into the spool); its queue id. `journaled`: a
        success notice the in-flight journal is to say is queued (_finish): in _unsaid
        from before its commit, whose notice may start its delivery at once."""
        headers = await self._io(self.spool.read_headers, env.queue_id)
        full = None
        if action == "failed" and env.ret == "FULL" and env.size <= _FULL_RETURN_MAX:
            # RFC 3461 4.3 RET=FULL: the sender asked for the whole message back.
            full = await self._io(self._read_message, env.queue_id)
        lifetime = self.cfg.delivery.max_queue_lifetime
        # A success notice's id is derived (notice_id): a crash recovery finds it. Its
        # clock part is the message's, so its 30-bit tail may match a queued message's
        # (the message itself: 2**-30): then a new id, as any other notice's (else the
        # commit's exclusive create failed and the notice was lost).
        qid = notice_id(env, rcpts) if action == "relayed" else None
        if qid is not None and (qid == env.queue_id
                                or await self._io(self.spool.exists, qid)):
            qid = None
        benv, data = make_bounce(
            env, rcpts, headers, self.cfg.hostname, action, remote=remote,
            will_retry_until=env.received_at + lifetime if lifetime else None,
            original_message=full, queue_id=qid,
        )
        # The one way into the spool (spool/submit.py): Received, fsync, the from= line.
        draft = self.submitter.begin(benv, add_missing=False, check_content=False,
                                     on_loop=True)  # a big one's file: a commit thread's
        draft.write(data)
        if journaled and action == "relayed":
            self._unsaid[benv.queue_id] = asyncio.get_running_loop().create_future()
        try:
            await draft.commit(origin=env.queue_id)
        except BaseException:
            draft.abort()
            if (fut := self._unsaid.pop(benv.queue_id, None)) is not None:
                settle(fut, 0, None)
            raise
        self.maillog.notification(env.queue_id, action, benv.queue_id)
        return benv.queue_id

    def _read_message(self, qid: str) -> bytes:
        path, offset = self.spool.body_path(qid)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(_FULL_RETURN_MAX + 1)

    async def _remove(self, env: Envelope) -> None:
        qid = env.queue_id
        try:
            # Off the loop: unlink waits on the directory lock behind concurrent commits.
            await self._unlink(env)
        except FileNotFoundError:
            self._gone(qid)
            return
        self._gone(qid)
        self.maillog.removed(qid)

    def _unlink(self, env: Envelope) -> asyncio.Future[None]:
        """The message's files removed in a commit thread (`Spool.remove_delivered`), its
        outcome (None or the OSError) on the future. Removals go in batches, the first
        waiting UNLINK_GATHER for others: a thread hand-off per delivered message cost
        the master ~0.1 ms of CPU (the GIL changing hands, wake-ups; issue 22)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unlinks.append((env, fut))
        if not self._unlinking:
            self._unlinking = True
            self._spawn(self._unlink_batches(), saving=True)
        return fut

    async def _unlink_batches(self) -> None:
        batch: list[tuple[Envelope, asyncio.Future[None]]] = []
        try:
            while self._unlinks:
                await asyncio.sleep(UNLINK_GATHER)
                batch, self._unlinks = self._unlinks, []
                errors = await self._io(self.spool.remove_delivered, [e for e, _ in batch])
                for (_, fut), err in zip(batch, errors, strict=True):
                    settle(fut, None, err)
                batch = []
        finally:
            self._unlinking = False
            for _, fut in batch + self._unlinks:  # cut (a stop) or failed: never left hanging
                fut.cancel()
            self._unlinks = []

    async def _finish(self, act: _Active) -> None:
        env = act.env
        assert env is not None
        reschedule: float | None = None
        try:
            relayed = bool(act.owed.get("relayed"))
            notices = await self._send_owed(act)
            if relayed:  # queued (or given up, never retried): not again after a crash
                mark = self.inflight.notified(act.unsaved)
                for qid in notices:
                    if (fut := self._unsaid.get(qid)) is not None:
                        settle(fut, mark, None)
            saved = True
            if env.done:
                await self._remove(env)
            else:
                # not saved: its attempts stay in the journal (at a crash, named)
                if act.to_save:
                    saved = await self._save_state(env)
                    self._unsaved_attempts.pop(act.qid, None)
                else:
                    self._unsaved_attempts[act.qid] = tuple(r.attempts for r in env.recipients)
                reschedule = min(r.next_attempt for r in env.pending)
            if saved:
                for token in act.unsaved:
                    self.inflight.end(token)  # the outcome is on disk
                act.unsaved.clear()
        except Exception:
            log.exception("%s: cannot finish; looking again later", act.qid,
                          extra={"queue_id": act.qid})
            reschedule = time.time() + 60.0
        self._release(act)
        if reschedule is not None and not self._stopping:
            self._schedule(act.qid, reschedule)

    # ------------------------------------------------------------------ control
    async def hold_user(self, user: str) -> int:
        """Hold every queued message of `user` (containment); how many are held now
        (including any held before delivery by `_start_message`)."""
        await self._handle_control({"op": "hold", "user": user})
        return len(await self._io(control.ids_of_user, self.spool, user, True))

    async def _wait_idle(self, qid: str) -> None:
        """Until no delivery of `qid` is in progress, nor another control request's
        change of it: two (a hold and a delete, say: two admins, or containment's hold
        and an admin's delete) ran their file moves at once in two threads, parked
        behind one delivery and woken together."""
        while True:
            if (act := self._active.get(qid)) is not None:
                await act.done.wait()
            elif (busy := self._busy.get(qid)) is not None:
                await busy.wait()
            else:
                return

    def _exists(self, qid: str) -> bool:
        return (self.spool.queue_dir / qid).exists() or (self.spool.hold_dir / qid).exists()

    async def _handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "active": self.active}
        if op not in ("flush", "hold", "release", "delete"):
            return {"ok": False, "error": f"unknown op {op!r}"}
        if op == "flush" and self._stopping:
            # nothing is tried again before the next start, and a flush is kept in memory
            # only: never "flushed" for an attempt that will not come (hold, release and
            # delete change the files: done as ever)
            return {"ok": False, "error": control.STOPPING}
        if req.get("user") and op in ("hold", "release", "delete"):
            # Containment (policy/suspender.py, `authrelay user resume`): every message of
            # one user, queued (hold) or held (release, delete).
            ids = await self._io(control.ids_of_user, self.spool, str(req["user"]),
                                 op != "hold")
        elif req.get("all") or (op == "flush" and not req.get("id")):
            if op == "flush":
                self._probe_dead_now()  # as postqueue -f: dead destinations tried again
            ids = await self._io(self.spool.scan)
            if op == "delete":
                ids += await self._io(self.spool.held)
            elif op != "flush":
                return {"ok": False, "error": f"{op}: --all is not supported"}
        elif req.get("id"):
            ids = [str(req["id"])]
        else:
            return {"ok": False, "error": f"{op}: a queue id is required"}
        named = bool(req.get("id")) and not req.get("user") and not req.get("all")
        if op in ("hold", "release", "delete") and not req.get("user") \
                and not await self._write_probe.writable():
            # the operator's command answers at once (a user's, containment's: waits)
            return {"ok": False, "error": NOT_WRITABLE}
        done: list[str] = []
        missing: list[str] = []
        failed: list[list[str]] = []  # [id, why]: a named flush of a file not deliverable
        for qid in ids:
            if not is_queue_id(qid):
                missing.append(qid)
                continue
            if op == "delete" and qid in self._unsaid \
                    and not await self._said_within(qid, BEGIN_WAIT):
                failed.append([qid, control.UNSAID])  # (deleted, a crash would queue it again)
                continue
            was_active = qid in self._active or qid in self._busy
            await self._wait_idle(qid)
            # One of many (--all, a user's) delivered or bounced meanwhile: gone, not an id
            # the operator got wrong. (A stat, as flush's: no await before _busy.)
            if not named and was_active and not self._exists(qid):
                continue
            # no await between the wait and this: no delivery nor other change starts
            self._busy[qid] = asyncio.Event()
            try:
                if named and await self._io(self.spool.arriving, qid):
                    raise InCommit(qid)  # not in the queue yet: for any op, as for a hold
                if op == "flush":
                    if not (self.spool.queue_dir / qid).exists():
                        raise FileNotFoundError(qid)
                    why = await self._unflushable(qid) if named else ""
                    if why:  # never "flushed": the file cannot be delivered
                        failed.append([qid, why])
                        continue
                    self._ignored.discard(qid)
                    self._forced.add(qid)
                    if named:
                        self._named.add(qid)
                    self._schedule(qid, 0.0, fresh=True)
                elif op == "hold":
                    if not await self._io(self.spool.hold, qid):
                        raise FileNotFoundError(qid)  # held already: nothing done
                    self._token.pop(qid, None)
                    self._moved_to_hold(qid)
                    self.maillog.held(qid)
                elif op == "release":
                    if not await self._io(self.spool.release, qid):
                        raise FileNotFoundError(qid)  # not held: nothing done, not flushed
                    self._held.discard(qid)
                    self._queued.add(qid)
                    self._ignored.discard(qid)
                    self._forced.add(qid)  # released mail is tried now, not after back-off
                    if named:
                        self._named.add(qid)
                    self._schedule(qid, 0.0, fresh=True)
                    self.maillog.released(qid)
                else:
                    await self._io(self.spool.remove, qid)
                    self._token.pop(qid, None)
                    self._gone(qid)
                    self.maillog.removed(qid, by="operator")
                done.append(qid)
            except InCommit:
                if named:
                    failed.append([qid, control.ARRIVING])
                else:  # a user's (containment): held here before sending, once committed
                    missing.append(qid)
            except FileNotFoundError:
                if not self.spool.exists(qid):
                    self._gone(qid)
                missing.append(qid)
            finally:
                self._busy.pop(qid).set()
        return {"ok": True, "done": done, "missing": missing, "failed": failed}

    async def _unflushable(self, qid: str) -> str:
        """`queue flush ID`: why the file cannot be delivered ("" when it can), read and
        checked whole (envelope, state, checksum) before the operator is told "flushed".
        Damage goes to corrupt/ now, as the delivery attempt would send it (one maillog
        line); a file this release cannot read (a newer format) is left as it is."""
        try:
            await self._io(self.spool.load, qid)
            await self._io(self.spool.verify, qid)
        except CorruptError as e:
            if await self._io(self.spool.quarantine, qid, str(e)):
                self._log_quarantined()
            self._ignored.add(qid)
            return f"damaged: {e}"
        except FileNotFoundError:
            raise  # gone meanwhile: "missing", as before
        except (SpoolError, OSError) as e:
            return str(e)
        return ""
