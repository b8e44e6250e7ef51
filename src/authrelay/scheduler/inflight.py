"""The in-flight journal: which recipients were being delivered when the process died.

Owns `spool_dir/inflight.log`. Delivery is at least once (as in every MTA): a process
killed after the next hop took a message but before the outcome was saved delivers it
again after the restart. This journal makes that window visible: the scheduler calls
`begin(qid, rcpts)` just before a delivery attempt and `end(token)` once the outcome is
saved (the state file fsynced); a clean stop ends what it waited for, and a delivery it
cut at the shutdown timeout once its maillog line says so (scheduler._cut_by_stop: no
crash, and the line already said whether it may have been delivered). At the next start
`leftovers()` returns every attempt begun and not ended, and the scheduler logs its
recipients that are still pending: `warning=delivery to <rcpt> was in progress when
authrelay stopped: it may have been delivered before the crash`.

Contract: one JSON object per line, `{"b": N, "q": QID, "r": [rcpts]}` and `{"e": N}`,
appended with one write(2) each on an O_APPEND descriptor, never fsynced: the lines
survive the death of the process (kill -9, the OOM killer: they are in the page cache),
which is the case at hand; a power loss may lose the last ones, and then there is no
warning (mail is never lost either way: the state file decides what is pending).
Delivered, not yet saved: `delivered([(token, rcpts, every, owed)])` once the next hop
answered 2xx for `rcpts` (the scheduler calls it with each transaction's results as the
courier reports them, Courier.deliver's `taken`, and with the attempt's results, never
before them, those of one loop turn together: one write for all; a recipient already
said is not said again). When
that is every recipient of the attempt the line is the attempt's end, `{"e": N, "d": 1}`
(then `end()` writes nothing: the same two lines per attempt as before, the end written
before the removal rather than after it); else `{"d": N, "r": [rcpts]}`; either with
`"n": [rcpts]`, those of them owed a success DSN (NOTIFY=SUCCESS, not passed on), and
`"w": {rcpt: [remote, reply, at]}`, what that DSN says of each (Owed: the next hop, its
2xx, at most types.MAX_TEXT of its text as the state file keeps it, JSON-escaped, and
when), so the DSN the start queues after a crash is the one the run would have; a line
owing nobody one is as before (nothing more on the path of every delivery); and
then `{"s": N}` once that DSN is queued (`notified`; such an attempt is ended only after
it, even when its state was saved before; a kill between the DSN's commit and this
line: the start finds the DSN in the queue by its derived id, bounce.notice_id; so
that DSN is not delivered, and removed, before this line is written: `notified` returns
the mark `said` waits for, without a bound; an admin's delete of it waits for the line
too, and one made while no scheduler runs appends `{"x": QID}`, record_deleted: the
start does not queue again a notice an admin deleted).
`leftovers()` returns them, and the scheduler's start records those recipients as sent (the message
removed when none is left; the success DSN owed queued first) instead of delivering
them again: a message delivered and
not yet removed (the removals are batched, UNLINK_GATHER) is no duplicate after a kill
-9, nor one an earlier transaction of an attempt cut later delivered. A stop cutting an
attempt ends it with `cut(token)`: `{"e": N, "c": 1}` when some were delivered (they
stand: the next start records them sent, and names nothing else), else `{"e": N}`.
Once the maillog's writer has written an attempt's stat=Sent lines, `{"l": [N, ..]}`
(`logged`, from that thread through MailLog.then): the start writes `recorded=` for
those recipients, and their stat=Sent line for the others (a kill between the two
writes: that line twice, never none).
Such a line is only ever written after the 2xx; one lost (a power loss, a kill
before the thread wrote it, the journal disabled) leaves the old behaviour: a
redelivery, named by the warning. A compaction or a re-enabled journal writes each live
attempt's delivered recipients again after its begin line.
The writes (and compactions) are made by a thread of the journal's own, in order, never
on the event loop: on a spool filesystem that stalls (frozen, a hung disk) a write waits
there, and on the loop it held the whole master (the scheduler, the control socket) for
as long. `begin` does not wait for its line, but the courier asks `begun(token)` just
before the end-of-data dot (the scheduler hands it over): None once the thread has
written the line (nearly always: the attempt's round trips gave it its turn), else an
awaitable that waits for it, at most BEGIN_WAIT seconds; so the next hop never has the
whole message before its begin line is written (a kill -9 in between warned of
nothing: a duplicate unannounced). Past BEGIN_WAIT (a spool stalled) the delivery goes
on as with a disabled journal, one warning, and later attempts do not wait until the
thread has caught up (a kill then has no warning for them, as a power loss). Cost:
two small writes per delivery attempt (docs/PERFORMANCE.md: 26 µs per attempt, nothing
next to the attempt's own fsync of the state). When the file
passes COMPACT_AT bytes it is rewritten with only the live entries and renamed over.
`leftovers()` only reads; `start()` (after the scheduler applied them) truncates: a
crash during that recovery finds the same lines again.
Failure policy: the journal is advice; an I/O error (a full disk) disables it with one
warning (never a failed delivery), and it is opened again RETRY_AFTER seconds later at the
next attempt, rewritten with every attempt still live (one line when it comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

JOURNAL = "inflight.log"
COMPACT_AT = 1024 * 1024
RETRY_AFTER = 60.0  # seconds a journal disabled by an I/O error waits to be tried again
BEGIN_WAIT = 1.0  # seconds the end-of-data dot waits for its attempt's begin line (begun)
BEGIN_POLL = 0.001  # seconds between looks at the thread's progress while it waits
SAID_POLL = 0.1  # at most this between looks while a success notice waits (said)


def _begin_line(token: int, qid: str, rcpts: list[str]) -> bytes:
    """The bytes of json.dumps({"b": token, "q": qid, "r": rcpts}, separators=(",", ":"))
    and a newline, without the dict and the encoder's generic walk (issue 22: two lines
    per delivery attempt on the master's path)."""
    return f'{{"b":{token},"q":{json.dumps(qid)},"r":[{_rcpts_json(rcpts)}]}}\n'.encode()


def _rcpts_json(rcpts: list[str] | tuple[str, ...]) -> str:
    return ",".join(map(json.dumps, rcpts))


class Owed(NamedTuple):
    """A delivered recipient owed a success DSN, with what the DSN says of its delivery
    (RFC 3464 2.3: Remote-MTA, Diagnostic-Code, Last-Attempt-Date), so the one a start
    queues after a crash is the one the run would have queued."""

    rcpt: str
    remote: str  # the next hop, "mx.example.org [192.0.2.1]:25" (DeliveryResult.remote)
    reply: str  # its 2xx (DeliveryResult.reply: at most types.MAX_TEXT of its text)
    at: int  # when (Unix seconds)


def _delivered_line(token: int, rcpts: list[str] | tuple[str, ...],
                    owed: list[Owed] | tuple[Owed, ...] = ()) -> bytes:
    """json.dumps({"d": token, "r": rcpts}, separators=(",", ":")) and a newline; with
    `"n"` and `"w"` (_owed_json) when some of them are owed a success DSN."""
    return f'{{"d":{token},"r":[{_rcpts_json(rcpts)}]{_owed_json(owed)}}}\n'.encode()


def _owed_json(owed: list[Owed] | tuple[Owed, ...]) -> str:
    """`,"n":[rcpts],"w":{rcpt:[remote,reply,at]}`: the recipients owed a success DSN
    (NOTIFY=SUCCESS) and what it says of each (JSON-escaped: no reply ends the line);
    none: nothing (the line of a delivery nobody is owed one for is as before)."""
    if not owed:
        return ""
    said = ",".join(f"{json.dumps(o.rcpt)}:[{json.dumps(o.remote)},{json.dumps(o.reply)},"
                    f"{int(o.at)}]" for o in owed)
    return f',"n":[{_rcpts_json([o.rcpt for o in owed])}],"w":{{{said}}}'


class Leftover(NamedTuple):
    """An attempt of the previous run the journal did not see saved: its recipients,
    those of them the next hop answered 2xx (after the answer; maybe all, maybe none),
    and those of the delivered owed a success DSN (NOTIFY=SUCCESS, not passed on), with
    what the journal says of their delivery (`said`: by recipient; a journal of an older
    version says nothing)."""

    qid: str
    rcpts: list[str]
    delivered: list[str]
    owed: list[str]
    said: dict[str, Owed]
    cut: bool = False  # ended by a stop that cut it (`{"e": N, "c": 1}`): rcpts are those
    # the next hop took (2xx) in its transactions before the cut, the rest not in doubt
    logged: bool = False  # `{"l": [N]}`: the maillog's stat=Sent lines of its delivered
    # recipients were written (logged()); else the start writes them


# A live attempt: queue id, recipients, those delivered, whether its `{"e": N, "d": 1}`
# line was given (end() then writes nothing), and the delivered owed a success DSN. A
# plain tuple: made on the master's path per attempt (a NamedTuple and its _replace cost
# microseconds there).
_Live = tuple[str, list[str], tuple[str, ...], bool, tuple[Owed, ...]]


def _owed(left: Leftover, rec: dict[str, object]) -> None:
    """A delivered line's `"n"`: its recipients owed a success DSN, to `left.owed`; its
    `"w"`: what the DSN says of them, to `left.said`."""
    owed = rec.get("n")
    if isinstance(owed, list):
        got = {str(r) for r in owed}
        left.owed.extend(r for r in left.rcpts if r in got and r not in left.owed)
        said = rec.get("w")
        if isinstance(said, dict):
            for rcpt, (remote, reply, at) in said.items():
                if rcpt in got:
                    left.said[rcpt] = Owed(rcpt, str(remote), str(reply), int(at))


def record_deleted(spool_root: Path, qids: list[str]) -> None:
    """`qids` deleted by an admin while no scheduler runs (control.run_offline, under the
    scheduler's lock: nobody else writes the journal): `{"x": QID}` each, fsynced (once,
    off any delivery path), so the next start's recovery does not queue again a success
    notice among them that a killed run had committed before its `{"s": N}` line (the
    derived id it looks for, bounce.notice_id, is gone from the queue either way). An I/O
    error is raised: the delete is done, the command says this record is not."""
    if not qids:
        return
    fd = os.open(spool_root / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, "".join(f'{{"x":{json.dumps(q)}}}\n' for q in qids).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class InflightJournal:
    def __init__(self, spool_root: Path) -> None:
        self.path = spool_root / JOURNAL
        self._fd: int | None = None
        self._live: dict[int, _Live] = {}
        self._next = 1
        self._size = 0
        self._broken = False
        self._disabled_at: float | None = None  # monotonic; None: working or closed
        # What _submit already handed the writer the live attempts for (one copy per
        # retry and per compaction, not one per line while the journal is off: a full
        # disk for RETRY_AFTER with thousands live was O(live) per attempt, issue 22):
        # the _disabled_at whose retry was asked, and whether a compaction is due.
        self._retry_asked: float | None = None
        self._compact_asked = False
        # What the writer thread does, in order: a line to append, or (when the journal
        # is past COMPACT_AT or disabled) the live attempts to rewrite it with, and the
        # token whose begin line it is (0: none); None: stop. (An Event: set when
        # reached, written().)
        self._q: queue.SimpleQueue[tuple[bytes, list[tuple[int, _Live]] | None, int]
                                   | frozenset[int] | threading.Event | None] = \
            queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        # begun(): the last token whose begin line the thread is done with (written, or
        # dropped by a disabled journal), set by the thread; how many attempts wait for
        # theirs; the token whose wait ran past BEGIN_WAIT (0: none): until the thread
        # is past it nobody waits.
        self._through = 0
        self._waiting = 0
        self._late = 0
        # leftovers(): the queue ids an admin deleted while no scheduler ran (`{"x": QID}`,
        # record_deleted): a success notice among them is not queued again.
        self.deleted: set[str] = set()
        # The writer thread's own: the attempts whose `{"l": [N]}` it has met (logged()),
        # so a compaction or a re-enabled journal keeps their marks; cut down to the live
        # ones at each rewrite (at most the attempts of COMPACT_AT bytes of lines).
        self._logged: set[int] = set()

    # ------------------------------------------------------------------ start
    def leftovers(self) -> list[Leftover]:
        """Every attempt the previous run began and did not end, and every one it ended
        as delivered (`{"e": N, "d": 1}`: its message may not be removed yet), in order.
        Reads only: `start()` begins this run's journal once they are dealt with."""
        begun: dict[int, Leftover] = {}
        done: list[tuple[int, Leftover]] = []
        seen: dict[int, Leftover] = {}  # every attempt by token, ended or not ("s")
        marks: set[int] = set()  # attempts whose stat=Sent lines were written ("l")
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        if "b" in rec:
                            begun[int(rec["b"])] = seen[int(rec["b"])] = Leftover(
                                str(rec["q"]), [str(r) for r in rec["r"]], [], [], {})
                        elif "s" in rec:
                            left = seen.get(int(rec["s"]))
                            if left is not None:  # its success DSN is queued
                                left.owed.clear()
                        elif "e" in rec:
                            left = begun.pop(int(rec["e"]), None)
                            if left is not None and rec.get("d") == 1:
                                _owed(left, rec)
                                done.append((int(rec["e"]),
                                             left._replace(delivered=left.rcpts)))
                            elif left is not None and rec.get("c") == 1 and left.delivered:
                                done.append((int(rec["e"]), left._replace(
                                    rcpts=list(left.delivered), cut=True)))
                        elif "d" in rec:
                            left = begun.get(int(rec["d"]))
                            if left is not None:  # (only a begun attempt's recipients)
                                got = {str(r) for r in rec["r"]}
                                left.delivered.extend(r for r in left.rcpts if r in got)
                                _owed(left, rec)
                        elif "l" in rec:
                            marks.update(int(t) for t in rec["l"])
                        elif "x" in rec:
                            self.deleted.add(str(rec["x"]))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue  # a torn last line: the process died while writing it
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot read %s: %s", self.path, e)
        return [left._replace(logged=token in marks)
                for token, left in done + list(begun.items())]

    def start(self) -> None:
        """This run's journal: the file truncated (blocking: a commit thread's)."""
        self.deleted = set()
        self._logged = set()
        self._open(truncate=True)

    def _open(self, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        if truncate:
            flags |= os.O_TRUNC
        try:
            self._fd = os.open(self.path, flags, 0o600)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            self._disable(e)

    def _disable(self, e: OSError) -> None:
        if not self._broken:
            self._broken = True
            log.warning("in-flight journal %s disabled: %s (tried again in %.0f s)",
                        self.path, e, RETRY_AFTER)
        self._close_fd()
        self._disabled_at = time.monotonic()

    def _retry(self, live: list[tuple[int, _Live]]) -> None:
        """Disabled long enough: the journal again, with every live attempt in it."""
        if self._disabled_at is None or time.monotonic() - self._disabled_at < RETRY_AFTER:
            return
        self._disabled_at = None
        self._compact(live)
        if self._fd is not None:
            self._broken = False
            log.warning("in-flight journal %s enabled again", self.path)

    # ------------------------------------------------------------------ attempts
    def begin(self, qid: str, rcpts: list[str]) -> int:
        token = self._next
        self._next += 1
        self._live[token] = (qid, rcpts, (), False, ())
        self._submit(_begin_line(token, qid, rcpts), token)
        return token

    def begun(self, token: int) -> Awaitable[None] | None:
        """Before the end-of-data dot of attempt `token` (the courier's call): None when
        its begin line is written (or dropped by a disabled journal), or while the
        thread is behind past BEGIN_WAIT; else an awaitable (on the event loop) that
        returns once it is, or after BEGIN_WAIT (then one warning, and no wait until the
        thread has caught up)."""
        if self._late:
            if self._through < self._late:
                return None  # behind: go on, as with a disabled journal
            self._late = 0
            log.warning("in-flight journal %s caught up: deliveries wait for their "
                        "begin lines again", self.path)
        if token <= self._through:
            return None
        return self._wait_begun(token)

    @property
    def waiting(self) -> int:
        """How many attempts wait for their begin line (begun)."""
        return self._waiting

    async def _wait_begun(self, token: int) -> None:
        """Looks at the thread's progress every BEGIN_POLL (the thread needs only the
        GIL, which the loop's wait frees; no wake-up from the thread: a pipe write and
        read per wait cost the master more than the looks)."""
        self._waiting += 1
        try:
            end = time.monotonic() + BEGIN_WAIT
            while token > self._through:
                if time.monotonic() >= end:
                    if not self._late:
                        log.warning(
                            "in-flight journal %s: a begin line not written within %g s "
                            "(the spool stalled?): deliveries go on without waiting for "
                            "it; a crash meanwhile delivers them again unannounced",
                            self.path, BEGIN_WAIT)
                    self._late = max(self._late, token)
                    return
                await asyncio.sleep(BEGIN_POLL)
        finally:
            self._waiting -= 1

    def delivered(self, done: list[tuple[int, list[str], bool, list[Owed]]]) -> None:
        """For each (token, rcpts, every, owed) of `done`: the next hop answered 2xx for
        `rcpts` of attempt `token` (`every`: all its recipients; `owed`: those of them
        owed a success DSN, the recovery queues it, with what it says of them), recorded
        for a crash before the outcome is saved or the message removed; one hand-off to
        the thread for all (the scheduler gathers a loop turn's: a wake of the thread per
        delivered message cost the master ~0.05 ms). Call only with a 2xx in hand (the
        recovery removes on its word)."""
        lines = []
        for token, rcpts, every, owed in done:
            live = self._live.get(token)
            if live is None or not rcpts or live[3]:
                continue  # (ended meanwhile: its outcome saved; or said already)
            qid, begun, got, _, was_owed = live
            if got:  # told per transaction before (Courier's taken): each one line
                rcpts = [r for r in rcpts if r not in got]
                known = {o.rcpt for o in was_owed}
                owed = [o for o in owed if o.rcpt not in known]
                if not rcpts and not every:
                    continue
            if every:
                self._live[token] = (qid, begun, tuple(begun), True, was_owed + tuple(owed))
                lines.append(b'{"e":%d,"d":1%s}\n' % (token, _owed_json(owed).encode()))
            else:
                self._live[token] = (qid, begun, got + tuple(rcpts), False,
                                     was_owed + tuple(owed))
                lines.append(_delivered_line(token, rcpts, owed))
        if lines:
            self._submit(b"".join(lines))

    def notified(self, tokens: list[int]) -> int:
        """The success DSN owed for the delivered recipients of `tokens` is queued (or
        given up): `{"s": N}` for each that named some, so a crash before its end does
        not have the start queue it again. Returns the mark `said(mark)` waits for (0:
        no line): the notice must not be delivered before its line is written (once
        delivered and removed, a crash's start would not find it queued and would queue
        it again)."""
        lines = []
        for token in tokens:
            live = self._live.get(token)
            if live is not None and live[4]:
                self._live[token] = live[:4] + ((),)
                lines.append(b'{"s":%d}\n' % token)
        if not lines:
            return 0
        mark = self._next  # (a token of no attempt: the thread passes it as a begin's)
        self._next += 1
        self._submit(b"".join(lines), mark)
        return mark

    def said(self, mark: int) -> Awaitable[None] | None:
        """None once the lines `notified` returned `mark` for are written (or dropped by
        a disabled journal); else an awaitable that returns when they are, without a
        bound (unlike `begun`: a success notice delivered before its `{"s": N}` line
        comes twice after a crash; it waits, queued, while the journal's thread is
        stalled)."""
        if mark <= self._through:
            return None
        return self._wait_said(mark)

    async def _wait_said(self, mark: int) -> None:
        pause = BEGIN_POLL
        while mark > self._through:
            await asyncio.sleep(pause)
            pause = min(pause * 2, SAID_POLL)

    def logged(self, tokens: list[int]) -> None:
        """The maillog's writer wrote the stat=Sent lines of the delivered recipients of
        attempts `tokens` (the scheduler calls it through MailLog.then, in that thread;
        any thread may): `{"l": [N, ..]}`, so the start after a crash writes no second
        one (`recorded=`). Written after theirs: a kill in between has the start write
        them again (doubled, never missed)."""
        if tokens:
            self._q.put(frozenset(tokens))

    def cut(self, token: int) -> None:
        """Attempt `token` cut by a stop, whose lines said what it cut (the next start
        warns of nothing): ended, but its delivered recipients (an earlier transaction's
        2xx) stand, `{"e": N, "c": 1}`, so the next start records them sent. (Such an
        attempt stays live: a compaction in the rest of the stop keeps its delivered
        recipients, then as a crash's.)"""
        live = self._live.get(token)
        if live is None or live[3]:
            return
        if live[2]:
            self._submit(b'{"e":%d,"c":1}\n' % token)
        else:
            del self._live[token]
            self._submit(b'{"e":%d}\n' % token)

    def end(self, token: int) -> None:
        live = self._live.pop(token, None)
        if live is not None and not live[3]:
            self._submit(b'{"e":%d}\n' % token)  # json.dumps({"e": token}), compact

    def _submit(self, line: bytes, token: int = 0) -> None:
        """`line` to the writer thread (started at the first); with the live attempts
        when the journal is to be rewritten: once past COMPACT_AT, and once per spell of
        being disabled, when its retry is due (_retry). A line the thread meets while
        the journal is off is dropped; the rewrite that brings it back is asked for
        after it, so it holds every attempt still live. (_size, _fd and _disabled_at
        are the thread's, read here as hints: the thread takes the items in order and
        checks the time again.)"""
        live = None
        if self._fd is None:
            since = self._disabled_at
            if since is not None and since != self._retry_asked \
                    and time.monotonic() - since >= RETRY_AFTER:
                self._retry_asked = since
                live = list(self._live.items())
        elif self._size > COMPACT_AT and not self._compact_asked:
            self._compact_asked = True  # until the thread has compacted
            live = list(self._live.items())
        self._q.put((line, live, token))
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_all, name="inflight-journal",
                                            daemon=True)
            self._writer.start()

    def _write_all(self) -> None:
        """The writer thread: each item in order; ends at None (close())."""
        while (item := self._q.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            if isinstance(item, frozenset):  # logged(): kept for a rewrite
                self._logged |= item
                self._write(b'{"l":[%s]}\n' % ",".join(map(str, sorted(item))).encode())
                continue
            line, live, token = item
            if live is None:
                self._write(line)
            elif self._fd is None:
                self._retry(live)  # (its live attempts include this line's, or not)
            else:
                self._compact(live)
            if live is not None:  # rewritten (or still off): the next crossing asks again
                self._compact_asked = False  # (after _size)
            if token:
                self._through = token  # (begun: the attempt's dot may go)
        self._close_fd()

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
            self._size += len(data)
        except OSError as e:
            self._disable(e)

    def _compact(self, live: list[tuple[int, _Live]]) -> None:
        """Only the `live` attempts (with their delivered recipients), in a new file
        renamed over the old one."""
        tmp = self.path.with_name(JOURNAL + ".new")
        try:
            with open(tmp, "wb") as f:
                for token, (qid, rcpts, delivered, _, owed) in live:
                    f.write(_begin_line(token, qid, rcpts))
                    if delivered:
                        f.write(_delivered_line(token, delivered, owed))
                self._logged &= {token for token, _ in live}
                if self._logged:
                    f.write(b'{"l":[%s]}\n' % ",".join(map(str, sorted(self._logged))).encode())
            os.replace(tmp, self.path)
        except OSError as e:
            self._disable(e)
            return
        if self._fd is not None:
            os.close(self._fd)
        self._open(truncate=False)

    def written(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds (off the event loop) until every line given so far
        is written: True when it is."""
        if self._writer is None:
            return True
        reached = threading.Event()
        self._q.put(reached)
        return reached.wait(timeout)

    def close(self) -> threading.Thread | None:
        """A clean stop: never opened again. The writer thread closes the file once its
        lines are written, and is returned (None: none ran) for the stop to wait for,
        bounded (a stalled spool must not hold the stop; a daemon thread, it dies with
        the process: an exit before it wrote the lines of the attempts the stop cut or
        ended has the next start take them for a crash's)."""
        writer = self._writer
        if writer is not None:
            self._q.put(None)
            self._writer = None
            return writer
        self._close_fd()
        return None

    def _close_fd(self) -> None:
        self._disabled_at = None  # a clean stop: never opened again
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
