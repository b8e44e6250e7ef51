"""The scheduler against a real spool and an in-memory Courier (the backend interface).

Covers: pick-up at once (hook and notify.sock), per-recipient retry, bounces on 5xx (one
per message per pass, whatever the destinations) and
on expiry, none for the null sender, delay warnings, restart recovery, re-delivery after
an interrupted delivery, held messages skipped, per-destination limits and fresh mail
overtaking a stuck destination.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import email.utils
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.maillog import ListLog
from support.tmpfs import ext4, frozen
from support.wait import DEADLINE, until

from authrelay import wiring
from authrelay.config import Config, from_dict
from authrelay.maillog import RECORDED_AFTER_CRASH, SENT_BEFORE_CRASH
from authrelay.scheduler import scheduler as scheduler_mod
from authrelay.scheduler.scheduler import Scheduler
from authrelay.spool.envelope import PENDING, SENT, Envelope, Recipient, new_queue_id
from authrelay.spool.store import UNFINISHED_AGE, Spool
from authrelay.spool.writer import SPILL, Incoming
from authrelay.types import BeforeEnd, DeliveryResult, Taken

OK = DeliveryResult.sent(250, "2.0.0", "Ok: queued as X", "mx.test [127.0.0.1]:25")
TEMP = DeliveryResult.temp("Greylisted, try later", "4.7.1", 451, "mx.test [127.0.0.1]:25")
PERM = DeliveryResult.perm("<bob@b.example>: user unknown", "5.1.1", 550,
                           "mx.test [127.0.0.1]:25")
BODY = b"From: a@a.example\r\nTo: x@b.example\r\nSubject: t\r\n\r\nhello\r\n"


class FakeCourier:
    """In-memory Courier: scripted results per address, records every call."""

    def __init__(self) -> None:
        self.script: dict[str, list[DeliveryResult]] = defaultdict(list)
        self.calls: list[tuple[Envelope, list[str], bytes]] = []
        self.given_bytes: list[bool] = []  # per call: the message came as bytes (not a file)
        self.gates: dict[str, asyncio.Event] = {}  # domain -> wait until set
        self.inflight: dict[str, int] = defaultdict(int)
        self.max_inflight: dict[str, int] = defaultdict(int)

    async def deliver(self, env: Envelope, rcpts: list[Recipient], message: bytes | Path,
                      offset: int = 0, sent: dict[str, str] | None = None,
                      before_end: BeforeEnd | None = None, taken: Taken | None = None
                      ) -> dict[str, DeliveryResult]:
        data = message[offset:] if isinstance(message, bytes) else \
            Path(message).read_bytes()[offset:]
        if before_end is not None and (wait := before_end()) is not None:
            await wait  # as the courier's end-of-data dot
        self.given_bytes.append(isinstance(message, bytes))
        domain = rcpts[0].address.rsplit("@", 1)[-1]
        assert all(r.address.endswith("@" + domain) for r in rcpts)  # one route key
        self.calls.append((env, [r.address for r in rcpts], data))
        self.inflight[domain] += 1
        self.max_inflight[domain] = max(self.max_inflight[domain], self.inflight[domain])
        try:
            if domain in self.gates:
                await self.gates[domain].wait()
        finally:
            self.inflight[domain] -= 1
        out = {}
        for r in rcpts:
            seq = self.script.get(r.address)
            out[r.address] = seq.pop(0) if seq else OK
        if taken is not None and (ok := {a: res for a, res in out.items() if res.ok}):
            taken(ok)  # (one transaction, as the courier's)
        return out

    def calls_for(self, address: str) -> list[tuple[Envelope, list[str], bytes]]:
        return [c for c in self.calls if address in c[1]]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="arq", dir="/tmp")  # short: unix socket paths
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def make_cfg(state_dir: Path, **delivery: Any) -> Config:
    d = {"retry": ["50ms"], "max_queue_lifetime": "1h", "delay_warning": 0}
    d.update(delivery)
    return from_dict({"hostname": "relay.test", "state_dir": str(state_dir),
                      "shutdown_timeout": 5, "delivery": d})


async def put(spool: Spool, rcpts: list[str], sender: str = "a@a.example",
              body: bytes = BODY, notify: bool = True, **kw: Any) -> str:
    env = Envelope(queue_id=new_queue_id(), sender=sender,
                   recipients=[Recipient(r) for r in rcpts], **kw)
    inc = spool.begin(env)
    inc.write(body)
    await inc.commit(announce=notify)
    return inc.queue_id


class Rig:
    def __init__(self, state_dir: Path, **delivery: Any) -> None:
        self.cfg = make_cfg(state_dir, **delivery)
        self.spool = Spool(self.cfg.spool_dir)
        self.spool.ensure_dirs()
        self.courier = FakeCourier()
        self.log = ListLog()
        self.sched: Scheduler | None = None

    async def start(self, **kw: Any) -> Scheduler:
        self.sched = Scheduler(self.cfg, self.spool, self.courier, self.log,
                               submitter=wiring.submitter(self.cfg, self.spool, self.log), **kw)
        await self.sched.start()
        return self.sched

    async def stop(self) -> None:
        if self.sched is not None:
            await self.sched.stop()
            self.sched = None

    def queued(self) -> list[str]:
        return self.spool.scan() + self.spool.held()


@pytest.fixture
async def rig(state_dir: Path) -> AsyncIterator[Rig]:
    r = Rig(state_dir)
    yield r
    for g in r.courier.gates.values():
        g.set()
    await r.stop()
    r.spool.close()


async def test_fresh_mail_delivered_at_once_and_removed(rig: Rig) -> None:
    await rig.start(rescan_interval=3600)
    qid = await put(rig.spool, ["x@b.example"])
    await until(lambda: not rig.queued(), "removal")
    (env, rcpts, data), = rig.courier.calls
    assert env.queue_id == qid and rcpts == ["x@b.example"] and data == BODY
    (line,) = rig.log.grep(qid, "to=<x@b.example>")
    assert "relay=mx.test [127.0.0.1]:25" in line and "dsn=2.0.0" in line
    assert "stat=Sent (250 2.0.0 Ok: queued as X)" in line
    # (the file is unlinked in a commit thread, the line made on the loop after it)
    await until(lambda: rig.log.grep(qid, "status=removed"), "the removed line")


async def test_notify_socket_from_another_process_spool(rig: Rig) -> None:
    await rig.start(rescan_interval=3600)
    other = Spool(rig.cfg.spool_dir)  # as a receiving worker process has: no hook
    assert other.on_commit is None
    await put(other, ["x@b.example"])
    await until(lambda: rig.courier.calls and not rig.queued(), "delivery via notify.sock")
    other.close()


async def test_a_workers_vouching_notice_marks_its_own_file_only(rig: Rig) -> None:
    """issue 22: a receiving worker's notice vouches for the line ends of the file it
    committed (its inode, over notify.sock); the courier is told `lines_checked` for
    that file only: not for an unvouched one, nor for a file put in its place after the
    notice, nor for a notice naming an inode that is not the file's."""
    await rig.start(rescan_interval=3600)
    other = Spool(rig.cfg.spool_dir)  # a receiving worker's: no hook, datagrams

    async def put_vouched(vouched: bool, replace: bool = False) -> str:
        env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                       recipients=[Recipient("x@b.example")])
        inc = other.begin(env)
        inc.lines_checked = vouched
        inc.write(BODY)
        await inc.commit(announce=False)
        if replace:  # the same bytes, another file (inode) under the name
            path = other.queue_dir / env.queue_id
            tmp = other.tmp_dir / env.queue_id
            shutil.copy2(path, tmp)
            tmp.rename(path)
        inc.announce()
        return env.queue_id

    vouched = await put_vouched(True)
    plain = await put_vouched(False)
    replaced = await put_vouched(True, replace=True)
    forged = await put(rig.spool, ["x@b.example"], notify=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(f"{forged} 12345".encode(), str(rig.spool.notify_path))
    await until(lambda: len(rig.courier.calls) == 4 and not rig.queued(), "4 deliveries")
    marks = {env.queue_id: env.lines_checked for env, _, _ in rig.courier.calls}
    assert marks == {vouched: True, plain: False, replaced: False, forged: False}
    # A mark lives while its message is queued: kept, they would fill VOUCHED_MAX and
    # every later message would be checked again.
    assert rig.sched is not None
    await until(lambda: not rig.sched._vouched, "the marks gone with their messages")
    other.close()


async def test_past_vouched_max_a_notice_s_mark_is_dropped_and_its_file_checked(
        rig: Rig, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VOUCHED_MAX bounds the marks kept for queued messages: past it a vouching
    notice's mark is not kept (memory), so the courier checks that file's line ends as
    for any unvouched file, and the message is delivered all the same."""
    monkeypatch.setattr(scheduler_mod, "VOUCHED_MAX", 1)
    # The deferred message must stay queued while the second arrives: with the rig's
    # 50 ms retry a loaded machine retried (and delivered) it first.
    rig.cfg = make_cfg(state_dir, retry=["1h"])
    rig.courier.script["held@b.example"] = [TEMP]  # stays queued: its mark stays
    await rig.start(rescan_interval=3600)
    other = Spool(rig.cfg.spool_dir)  # a receiving worker's: no hook, datagrams

    async def put_vouched(rcpt: str) -> str:
        env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                       recipients=[Recipient(rcpt)])
        inc = other.begin(env)
        inc.lines_checked = True
        inc.write(BODY)
        await inc.commit()
        return env.queue_id

    held = await put_vouched("held@b.example")
    await until(lambda: len(rig.courier.calls) == 1, "the first attempt (deferred)")
    past = await put_vouched("x@b.example")
    await until(lambda: len(rig.courier.calls) == 2 and rig.queued() == [held],
                "the second delivered")
    marks = {env.queue_id: env.lines_checked for env, _, _ in rig.courier.calls}
    assert marks == {held: True, past: False}
    assert rig.sched is not None and list(rig.sched._vouched) == [held]
    other.close()


async def test_only_the_temp_failed_recipient_is_retried(rig: Rig) -> None:
    rig.courier.script["b2@b.example"] = [TEMP]
    await rig.start()
    qid = await put(rig.spool, ["b1@b.example", "b2@b.example", "b3@b.example"])
    await until(lambda: not rig.queued(), "final delivery")
    assert [c[1] for c in rig.courier.calls] == [
        ["b1@b.example", "b2@b.example", "b3@b.example"], ["b2@b.example"]]
    assert rig.log.grep(qid, "to=<b2@b.example>", "stat=Deferred (451 4.7.1 Greylisted")
    assert len(rig.log.grep(qid, "stat=Sent")) == 3


async def test_an_address_given_twice_is_not_delivered_again_on_retries(
        rig: Rig) -> None:
    """RCPT TO the same address twice (or an alias expanded twice): both entries are
    saved as sent. The state file was merged back by address, so only the second entry
    was marked and the first came back pending at each load: the address got the message
    again on every retry of another recipient (three times here, not once)."""
    rig.courier.script["c@c.example"] = [TEMP, TEMP]
    await rig.start()
    qid = await put(rig.spool, ["b@b.example", "b@b.example", "c@c.example"])
    await until(lambda: not rig.queued(), "final delivery")
    assert len(rig.courier.calls_for("b@b.example")) == 1, rig.courier.calls
    assert len(rig.courier.calls_for("c@c.example")) == 3
    assert len(rig.log.grep(qid, "to=<b@b.example>", "stat=Sent")) == 2  # one per entry


async def test_state_saved_between_attempts(rig: Rig, state_dir: Path) -> None:
    rig.cfg = make_cfg(state_dir, retry=["1h"])
    rig.courier.script["b2@b.example"] = [TEMP]
    await rig.start()
    qid = await put(rig.spool, ["b1@b.example", "b2@b.example"])
    await until(lambda: rig.log.grep(qid, "Deferred"), "deferral")
    await until(lambda: rig.sched is not None and not rig.sched.active, "idle")
    env = rig.spool.load(qid)  # from disk: header merged with ID.state
    b1, b2 = env.recipients
    assert b1.state == SENT and b2.state == "pending"
    assert b2.attempts == 1 and b2.last_reply.startswith("451 4.7.1")
    assert b2.next_attempt > time.time() + 1800


async def test_bounce_on_5xx_is_queued_and_delivered(rig: Rig) -> None:
    rig.courier.script["bob@b.example"] = [PERM]
    await rig.start()
    qid = await put(rig.spool, ["bob@b.example", "ok@b.example"], sender="alice@a.example")
    await until(lambda: not rig.queued() and rig.courier.calls_for("alice@a.example"),
                "bounce delivery")
    assert rig.log.grep(qid, "to=<bob@b.example>", "stat=Bounced (550 5.1.1")
    (bounce_env, rcpts, data), = rig.courier.calls_for("alice@a.example")
    assert bounce_env.sender == "" and bounce_env.is_bounce and rcpts == ["alice@a.example"]
    assert rig.log.grep(qid, f"sender_non-delivery_notification={bounce_env.queue_id}")
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    report = msg.get_payload()[1].get_payload()
    assert len(report) == 2  # per-message + only the failed recipient
    assert report[1]["Final-Recipient"] == "rfc822; bob@b.example"
    assert report[1]["Action"] == "failed" and report[1]["Status"] == "5.1.1"
    assert report[1]["Remote-MTA"] == "dns; mx.test"
    assert "Subject: t" in msg.get_payload()[2].get_payload()


async def test_one_bounce_per_message_for_every_failed_destination(rig: Rig) -> None:
    """Failures in three domains (deliveries in parallel) give one DSN listing all three."""
    for r in ("bob@b.example", "carl@c.example", "dora@d.example"):
        rig.courier.script[r] = [PERM]
    rig.courier.gates["b.example"] = asyncio.Event()  # b finishes last
    await rig.start()
    qid = await put(rig.spool, ["bob@b.example", "carl@c.example", "dora@d.example",
                                "ok@e.example"], sender="alice@a.example")
    await until(lambda: len(rig.courier.calls) == 4, "four deliveries")
    assert rig.courier.calls_for("alice@a.example") == []  # no bounce before b is done
    # Until the pass's bounce is queued, the failed recipients stay pending on disk.
    assert {r.address for r in rig.spool.load(qid).pending} >= {"carl@c.example",
                                                                 "dora@d.example"}
    rig.courier.gates["b.example"].set()
    await until(lambda: not rig.queued() and rig.courier.calls_for("alice@a.example"),
                "bounce delivery")
    bounces = rig.courier.calls_for("alice@a.example")
    assert len(bounces) == 1
    assert len(rig.log.grep(qid, "sender_non-delivery_notification=")) == 1
    msg = email.message_from_bytes(bounces[0][2], policy=email.policy.compat32)
    report = msg.get_payload()[1].get_payload()
    assert sorted(g["Final-Recipient"] for g in report[1:]) == [
        "rfc822; bob@b.example", "rfc822; carl@c.example", "rfc822; dora@d.example"]


@pytest.mark.parametrize("limit,whole", [(10_000_000, True), (10, False)])
async def test_ret_full_returns_the_message_up_to_a_limit(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, limit: int, whole: bool) -> None:
    """RFC 3461 RET=FULL: the whole message comes back, unless it is past the limit;
    then the bounce carries the headers only."""
    from authrelay.scheduler import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "_FULL_RETURN_MAX", limit)
    rig.courier.script["bob@b.example"] = [PERM]
    await rig.start()
    await put(rig.spool, ["bob@b.example"], sender="alice@a.example", ret="FULL")
    await until(lambda: rig.courier.calls_for("alice@a.example"), "bounce delivery")
    (_env, _rcpts, data), = rig.courier.calls_for("alice@a.example")
    part = email.message_from_bytes(data, policy=email.policy.compat32).get_payload()[2]
    if whole:
        assert part.get_content_type() == "message/rfc822"
        assert BODY.split(b"\r\n\r\n", 1)[1].strip().decode() in part.as_string()
    else:
        assert part.get_content_type() == "text/rfc822-headers"
        assert "Subject: t" in part.get_payload() and "hello" not in part.get_payload()


async def test_a_big_bounce_gets_its_file_from_a_commit_thread(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bounce over 128 KiB (RET=FULL of a big message) had its queue file made by
    write() on the scheduler's event loop: a create waiting behind a journal commit held
    every delivery and the control socket with it. Now a commit thread makes it, as it
    does a session's; the bounce is queued whole."""
    creators: dict[str, str] = {}
    begin = rig.spool.begin

    def recording(env: Envelope) -> Incoming:
        inc = begin(env)
        create = inc._open_locked

        def traced() -> int:
            creators[inc.queue_id] = threading.current_thread().name
            return create()

        inc._open_locked = traced  # type: ignore[method-assign]
        return inc

    monkeypatch.setattr(rig.spool, "begin", recording)
    rig.courier.script["bob@b.example"] = [PERM]
    await rig.start()
    big = BODY + b"".join(b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(SPILL // 78))
    await put(rig.spool, ["bob@b.example"], sender="alice@a.example", ret="FULL", body=big)
    await until(lambda: rig.courier.calls_for("alice@a.example"), "bounce delivery")
    (benv, _rcpts, data), = rig.courier.calls_for("alice@a.example")
    assert len(data) > SPILL and big.split(b"\r\n\r\n", 1)[1] in data
    assert creators[benv.queue_id] == "spool-commit"


@pytest.mark.slow  # mkfs and mount
@pytest.mark.root
async def test_a_frozen_spool_filesystem_does_not_stall_the_loop_at_a_delivery(
        state_dir: Path) -> None:
    """The in-flight journal's line (inflight.py), written on the event loop at the start
    of each delivery, waited there while the spool's filesystem was frozen (fsfreeze; a
    hung disk): the master's scheduler, control socket and timers stood still until the
    thaw (seen: workers answering 451, `authrelay queue` timing out). Now the journal's
    own thread waits: the delivery is made meanwhile, its outcome saved after the thaw."""
    with ext4(state_dir / "fs") as fs:
        rig = Rig(fs)
        try:
            await rig.start()
            qid = await put(rig.spool, ["bob@b.example"], notify=False)
            with frozen(fs, limit=10) as thawed:  # the old loop waited for this timer
                assert rig.sched is not None
                rig.sched.notify(qid)
                await until(lambda: rig.courier.calls, "the delivery, the spool frozen")
                assert not thawed.is_set(), "the loop waited for the frozen spool"
            await until(lambda: not rig.queued(), "the message removed after the thaw")
        finally:
            await rig.stop()
            rig.spool.close()


async def test_dead_destination_marks_are_bounded(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each destination none of whose hosts answers is marked dead (a route key each);
    a mark was forgotten only when the destination answered or on a flush, so mail to
    many domains whose MX refuses connections (a wildcard zone's: any number of them)
    grew the master's map without end. Now at most DEAD_MAX are kept (5 here)."""
    from authrelay.scheduler import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "DEAD_MAX", 5, raising=False)
    rig = Rig(state_dir, retry=["1h"])
    refused = dataclasses.replace(  # the courier's own connect failure: no answer
        DeliveryResult.temp("connect to mx [192.0.2.1]:25: connection refused"),
        unanswered=True)
    rcpts = [f"u@d{i}.example" for i in range(20)]
    for r in rcpts:
        rig.courier.script[r] = [refused]
    try:
        sched = await rig.start()
        for r in rcpts:
            await put(rig.spool, [r])
        await until(lambda: len(rig.courier.calls) == 20 and not sched.active,
                    "every destination tried once")
        assert 1 <= len(sched._dead) <= 5
    finally:
        await rig.stop()
        rig.spool.close()


async def test_no_bounce_for_null_sender_nor_for_a_bounce(rig: Rig) -> None:
    rig.courier.script["bob@b.example"] = [PERM]
    rig.courier.script["gone@b.example"] = [PERM]
    await rig.start()
    q1 = await put(rig.spool, ["bob@b.example"], sender="")
    q2 = await put(rig.spool, ["gone@b.example"], sender="", is_bounce=True)
    await until(lambda: not rig.queued(), "both final")
    await until(lambda: rig.sched is not None and not rig.sched.active, "idle")
    assert len(rig.courier.calls) == 2
    assert rig.log.grep(q1, "stat=Bounced") and rig.log.grep(q2, "stat=Bounced")
    assert not rig.log.grep("notification")


async def test_expiry_bounces_after_temp_failure(state_dir: Path) -> None:
    rig = Rig(state_dir, max_queue_lifetime="1s")
    rig.courier.script["slow@b.example"] = [TEMP] * 100
    await rig.start()
    qid = await put(rig.spool, ["slow@b.example"], received_at=time.time() - 5)
    await until(lambda: rig.courier.calls_for("a@a.example"), "expiry bounce")
    assert rig.log.grep(qid, "stat=Bounced (451 4.7.1 Greylisted, try later, message expired")
    bounce = rig.courier.calls_for("a@a.example")[0][2]
    rcpt = email.message_from_bytes(bounce).get_payload()[1].get_payload()[1]
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "4.7.1"
    await until(lambda: not rig.queued(), "queue empty")
    await rig.stop()
    rig.spool.close()


async def test_delay_warning_sent_once(state_dir: Path) -> None:
    rig = Rig(state_dir, delay_warning="1ms", retry=["20ms"])
    rig.courier.script["slow@b.example"] = [TEMP, TEMP, TEMP]
    await rig.start()
    qid = await put(rig.spool, ["slow@b.example"])
    await until(lambda: len(rig.courier.calls_for("slow@b.example")) == 4, "4 attempts")
    await until(lambda: not rig.queued(), "done")
    warnings = rig.courier.calls_for("a@a.example")
    assert len(warnings) == 1
    msg = email.message_from_bytes(warnings[0][2])
    assert msg.get_payload()[1].get_payload()[1]["Action"] == "delayed"
    assert len(rig.log.grep(qid, "sender_delay_notification")) == 1
    await rig.stop()
    rig.spool.close()


async def test_one_delay_warning_per_message_and_one_transaction_per_destination(
        state_dir: Path) -> None:
    """Recipients deferred on different schedules (back-off jitter, or different passes):
    the pass that is due takes every pending recipient of that destination in one
    delivery, and the delay warning names all the message's pending recipients, also
    those to another destination not due yet; it is sent once."""
    rig = Rig(state_dir, delay_warning="1s", retry=["1h"])
    qid = await put(rig.spool, ["ann@a.example", "amy@a.example", "ben@b.example"],
                    received_at=time.time() - 600)  # queued 10 minutes ago
    env = rig.spool.load(qid)
    now = time.time()
    for r, later in zip(env.recipients, (0.0, 30.0, 60.0), strict=True):
        r.attempts, r.last_code, r.next_attempt = 1, 451, now + later
        r.last_reply = "451 4.7.1 Greylisted, try later"
    rig.spool.save_state(env)
    rig.courier.script["ann@a.example"] = [TEMP]
    rig.courier.script["amy@a.example"] = [TEMP]
    await rig.start(rescan_interval=3600)
    try:  # stopped whatever happens: a scheduler left running hangs the loop's close
        await until(lambda: rig.courier.calls_for("a@a.example"), "the delay warning")
        assert [c[1] for c in rig.courier.calls_for("ann@a.example")] == [
            ["ann@a.example", "amy@a.example"]]  # one transaction for a.example
        assert not rig.courier.calls_for("ben@b.example")  # not due: not tried
        (warning,) = rig.courier.calls_for("a@a.example")
        msg = email.message_from_bytes(warning[2], policy=email.policy.compat32)
        groups = msg.get_payload()[1].get_payload()[1:]
        assert sorted(g["Final-Recipient"] for g in groups) == [
            "rfc822; amy@a.example", "rfc822; ann@a.example", "rfc822; ben@b.example"]
        assert {g["Action"] for g in groups} == {"delayed"}
        assert len(rig.log.grep(qid, "sender_delay_notification")) == 1
        # The warning is queued (and may be delivered, above) before the pass saves the
        # message's state: wait for that save rather than read the file at once.
        await until(lambda: all(r.delay_warned for r in rig.spool.load(qid).recipients),
                    "every recipient's delay_warned saved")
        after = rig.spool.load(qid)
        # One next attempt for the two retried together.
        ann, amy, _ = after.recipients
        assert ann.next_attempt == amy.next_attempt
        assert len(rig.courier.calls_for("a@a.example")) == 1  # still the one warning
    finally:
        await rig.stop()
        rig.spool.close()


async def test_restart_finds_everything(rig: Rig) -> None:
    # Queued while no scheduler ran; one message already half delivered.
    q1 = await put(rig.spool, ["x@b.example"])
    q2 = await put(rig.spool, ["y1@c.example", "y2@c.example"])
    env = rig.spool.load(q2)
    env.recipients[0].state = SENT
    env.recipients[0].attempts = 1
    rig.spool.save_state(env)
    (rig.spool.tmp_dir / "GARBAGE").write_bytes(b"half a message")
    await rig.start(rescan_interval=3600)
    await until(lambda: not rig.queued(), "all delivered")
    assert sorted(tuple(c[1]) for c in rig.courier.calls) == [
        ("x@b.example",), ("y2@c.example",)]
    assert rig.log.grep(q1, "stat=Sent") and rig.log.grep(q2, "to=<y2@c.example>", "Sent")
    assert not (rig.spool.tmp_dir / "GARBAGE").exists()


async def test_interrupted_delivery_is_redone_after_restart(state_dir: Path) -> None:
    rig = Rig(state_dir)
    rig.cfg = from_dict({"hostname": "relay.test", "state_dir": str(state_dir),
                         "shutdown_timeout": 0, "delivery": {"retry": ["50ms"]}})
    rig.courier.gates["b.example"] = asyncio.Event()  # never answers
    await rig.start()
    qid = await put(rig.spool, ["x@b.example"])
    await until(lambda: rig.courier.calls, "delivery started")
    await rig.stop()  # the in-flight delivery is cut off: no state saved
    assert rig.spool.scan() == [qid]
    assert rig.spool.load(qid).recipients[0].attempts == 0
    del rig.courier.gates["b.example"]
    await rig.start()
    await until(lambda: not rig.queued(), "re-delivered")
    assert [c[0].queue_id for c in rig.courier.calls] == [qid, qid]
    await rig.stop()
    rig.spool.close()


async def test_a_delivery_ending_during_the_stop_has_its_outcome_saved(rig: Rig) -> None:
    """stop() waits (up to shutdown_timeout) for the deliveries in flight, and for what
    ends each: the state saved, the message removed, its DSN queued (_finish, a task the
    delivery starts as it ends). It waited for the deliveries alone and returned while
    that was still to come: a sent message stayed queued (sent again at the next start)."""
    rig.courier.gates["b.example"] = gate = asyncio.Event()
    rig.courier.script["y@b.example"] = [TEMP]
    await rig.start()
    sent = await put(rig.spool, ["x@b.example"])
    deferred = await put(rig.spool, ["y@b.example"])
    await until(lambda: len(rig.courier.calls) == 2, "both deliveries started")
    stopping = asyncio.create_task(rig.stop())
    await until(lambda: rig.sched is not None and rig.sched._stopping, "stop() waiting")
    gate.set()  # both deliveries end while stop() waits
    await stopping
    assert rig.spool.scan() == [deferred]
    assert rig.log.grep(sent, "status=removed")
    (y,) = rig.spool.load(deferred).recipients
    assert (y.attempts, y.last_reply) == (1, "451 4.7.1 Greylisted, try later")


async def test_a_stop_lets_a_delivery_whose_results_are_in_save_them(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery whose results were in when stop()'s shutdown_timeout ended (its state
    being saved: held here until the stop has cut what it cuts) was cut like one still
    at the next hop: the state not saved, and the next start took the stop for a crash
    (x, taken by the next hop, `sent before the crash`; y, deferred by it, `may have
    been delivered before the crash`). Now the stop lets it save (up to STOP_SAVE_WAIT):
    x sent and y deferred on disk, nothing for the next start to recover."""
    rig.cfg = from_dict({"hostname": "relay.test", "state_dir": str(rig.cfg.state_dir),
                         "shutdown_timeout": 0, "delivery": {"retry": ["1h"]}})
    rig.courier.script["y@b.example"] = [TEMP]
    sched = await rig.start()
    assert sched._control is not None  # (closed by stop() just before it cuts)
    save = sched._save_state
    entered = asyncio.Event()

    async def held(env: Envelope) -> bool:
        entered.set()
        while sched._control is not None:
            await asyncio.sleep(0.001)
        return await save(env)

    monkeypatch.setattr(sched, "_save_state", held)
    qid = await put(rig.spool, ["x@b.example", "y@b.example"])
    await until(entered.is_set, "the outcome being saved")
    await rig.stop()
    x, y = rig.spool.load(qid).recipients
    assert (x.state, y.state, y.attempts) == (SENT, PENDING, 1)
    await rig.start()
    assert not rig.log.grep(qid, "before the crash")
    assert len(rig.courier.calls) == 1


async def test_an_outcome_not_saved_stays_in_the_in_flight_journal(rig: Rig) -> None:
    """The journal entry of an attempt ended once its outcome was applied in memory,
    though the state of a message's last job is saved later (_finish): an attempt whose
    state could not be saved (here: an I/O error, its tmp file's name taken by a
    directory) left nothing to say, and after a crash its recipients, sent and deferred
    alike, were tried again unannounced. Now the entry ends once the state is on disk,
    so the next start names them: the deferred one as possibly delivered; the sent one
    the journal saw delivered (the next hop's 2xx) is recorded sent, not tried again."""
    rig.cfg = make_cfg(Path(rig.cfg.state_dir), retry=["1h"])
    rig.courier.script["y@b.example"] = [TEMP]
    qid = await put(rig.spool, ["x@b.example", "y@b.example"])
    (rig.spool.queue_dir / f"{qid}.state.tmp").mkdir()  # save_state fails: EISDIR
    await rig.start()
    await until(lambda: rig.log.grep(qid, "stat=Deferred"), "the attempt's outcome")
    await until(lambda: rig.sched is not None and not rig.sched.active, "finished")
    await rig.stop()  # as a crash, here: the journal is read at the next start
    (rig.spool.queue_dir / f"{qid}.state.tmp").rmdir()
    await rig.start()
    warned = rig.log.grep(qid, "may have been delivered before the crash")
    assert {"y@b.example"} == {
        a for ln in warned for a in re.findall(r"delivery to <([^>]+)>", ln)}, warned
    assert rig.log.grep(qid, "recorded=<x@b.example>", RECORDED_AFTER_CRASH, "queue=queued")
    assert len(rig.log.grep(qid, "to=<x@b.example>", "stat=Sent")) == 1


def _crashed_with(rig: Rig, *lines: dict[str, Any]) -> None:
    """The in-flight journal a run killed (kill -9) left: `lines`, as its thread wrote them."""
    (rig.spool.root / "inflight.log").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _removals_cut_at_stop(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivered message's removal an hour later (UNLINK_GATHER) and a stop that waits
    for nothing (not even for results in hand, STOP_SAVE_WAIT): stop() then ends a run as
    a kill -9 in the removal window would."""
    monkeypatch.setattr(scheduler_mod, "UNLINK_GATHER", 3600.0)
    monkeypatch.setattr(scheduler_mod, "STOP_SAVE_WAIT", 0.0)
    rig.cfg = from_dict({"hostname": "relay.test", "state_dir": str(rig.cfg.state_dir),
                         "shutdown_timeout": 0, "delivery": {"retry": ["50ms"]}})


async def _crash_after(rig: Rig, monkeypatch: pytest.MonkeyPatch, qid: str,
                       line: str) -> None:
    """Once `qid`'s attempt logged `line` and the journal's lines are written: the run
    ended in the removal window (_removals_cut_at_stop), the next started as usual."""
    await until(lambda: rig.log.grep(qid, line), f"{qid}'s {line}")
    assert rig.sched is not None
    assert await asyncio.to_thread(rig.sched.inflight.written, 10)
    await rig.stop()
    monkeypatch.undo()  # removals as usual again
    await rig.start()


async def test_a_message_delivered_and_not_removed_at_a_crash_is_not_delivered_again(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivered message is removed a batch later (UNLINK_GATHER, 5 ms; an hour here):
    a run that died in between (here: stopped with shutdown_timeout = 0, its removal cut,
    as a kill -9 there) delivered it again at the next start. Now the journal's end line
    says it was delivered (written after the next hop's 250): the start removes it, one
    line, and the next hop gets it once."""
    _removals_cut_at_stop(rig, monkeypatch)
    await rig.start()
    qid = await put(rig.spool, ["x@b.example"])
    await _crash_after(rig, monkeypatch, qid, "stat=Sent")
    assert rig.log.grep(qid, "recorded=<x@b.example>", RECORDED_AFTER_CRASH, "queue=removed")
    assert len(rig.log.grep(qid, "stat=Sent")) == 1
    assert not rig.queued() and len(rig.courier.calls) == 1
    assert not rig.log.grep(qid, "may have been delivered")


async def test_after_a_crash_only_the_recipients_delivered_are_not_sent_again(
        rig: Rig) -> None:
    """An attempt some of whose recipients the next hop took (250 for x, the run killed
    before y's reply): x is recorded sent, y is tried again and named as possibly
    delivered. On the old code both were delivered again."""
    qid = await put(rig.spool, ["x@b.example", "y@b.example"], notify=False)
    _crashed_with(rig, {"b": 1, "q": qid, "r": ["x@b.example", "y@b.example"]},
                  {"d": 1, "r": ["x@b.example"]})
    await rig.start()
    await until(lambda: not rig.queued(), "y delivered")
    assert [c[1] for c in rig.courier.calls] == [["y@b.example"]]
    assert rig.log.grep(qid, "to=<x@b.example>", SENT_BEFORE_CRASH, "queue=queued")
    assert rig.log.grep(qid, "delivery to <y@b.example> was in progress")
    assert not rig.log.grep(qid, "delivery to <x@b.example>")
    assert rig.log.grep(qid, "to=<y@b.example>", "tries=2, redelivery=after_crash")


async def test_a_crash_before_the_delivered_line_still_delivers_again(rig: Rig) -> None:
    """The journal's line not written yet (a kill within the thread's turn, a power
    loss, the journal disabled): the message is delivered again, named, as it always
    was; nothing is removed on a begin line alone. (A guard: the old code did so too.)"""
    qid = await put(rig.spool, ["x@b.example"], notify=False)
    _crashed_with(rig, {"b": 1, "q": qid, "r": ["x@b.example"]})
    await rig.start()
    await until(lambda: not rig.queued(), "delivered again")
    assert len(rig.courier.calls) == 1
    assert rig.log.grep(qid, "delivery to <x@b.example> was in progress")
    assert not rig.log.grep(qid, SENT_BEFORE_CRASH)


async def test_a_message_held_after_the_crash_keeps_its_delivered_recipients(
        rig: Rig) -> None:
    """Held while the server was down (`queue hold` offline) after a crash in the
    removal window: the hold stands (not removed: the operator's), its recipient is
    recorded sent, so a release removes it without a second delivery. The old code
    delivered it at the release. A message deleted meanwhile is nothing to record."""
    qid = await put(rig.spool, ["x@b.example"], notify=False)
    gone = await put(rig.spool, ["y@b.example"], notify=False)
    rig.spool.hold(qid)
    rig.spool.remove(gone)
    _crashed_with(rig, {"b": 1, "q": qid, "r": ["x@b.example"]}, {"e": 1, "d": 1},
                  {"b": 2, "q": gone, "r": ["y@b.example"]}, {"e": 2, "d": 1})
    sched = await rig.start()
    assert rig.spool.held() == [qid]
    assert [r.state for r in rig.spool.load(qid).recipients] == [SENT]
    assert rig.log.grep(qid, SENT_BEFORE_CRASH, "queue=held")
    assert not rig.log.grep(gone)
    assert (await sched._handle_control({"op": "release", "id": qid}))["done"] == [qid]
    await until(lambda: rig.log.grep(qid, "status=removed"), "removed at its release")
    assert not rig.queued() and rig.courier.calls == []


def _success_owed() -> Envelope:
    """x@b.example owed a success DSN (NOTIFY=SUCCESS), y@b.example not."""
    return Envelope(queue_id=new_queue_id(), sender="a@a.example",
                    recipients=[Recipient("x@b.example", notify="SUCCESS"),
                                Recipient("y@b.example")])


async def test_a_success_notice_queued_before_the_crash_is_not_queued_again(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipient owed a success DSN (NOTIFY=SUCCESS, not passed on) was left out of the
    journal's delivered line (a crash before its DSN was queued would have lost it), so
    a crash in the removal window delivered it again, and its notice came twice. Now
    the line names it owed and `{"s": N}` says its notice was queued: the start records
    both sent, removes the message, and queues no second notice."""
    _removals_cut_at_stop(rig, monkeypatch)
    await rig.start()
    inc = rig.spool.begin(_success_owed())
    inc.write(BODY)
    await inc.commit(announce=True)
    qid = inc.queue_id
    await _crash_after(rig, monkeypatch, qid, "sender_success_notification=")
    assert rig.log.grep(qid, "recorded=<x@b.example>,<y@b.example>", RECORDED_AFTER_CRASH,
                        "queue=removed")
    assert len(rig.log.grep(qid, "sender_success_notification=")) == 1
    assert qid not in rig.queued()
    assert [c[1] for c in rig.courier.calls if c[0].queue_id == qid] == [
        ["x@b.example", "y@b.example"]]
    assert not rig.log.grep(qid, "may have been delivered")


async def test_a_success_notice_owed_at_the_crash_is_queued_by_the_start(rig: Rig) -> None:
    """The journal says the next hop took both and x is owed a success DSN not queued
    yet (the run died first): the start records both sent, queues x's notice once and
    removes the message; the next hop does not get it again. The old code read no
    "n" (and wrote none: x was delivered again)."""
    env = _success_owed()
    inc = rig.spool.begin(env)
    inc.write(BODY)
    await inc.commit()
    qid = inc.queue_id
    _crashed_with(rig, {"b": 1, "q": qid, "r": ["x@b.example", "y@b.example"]},
                  {"e": 1, "d": 1, "n": ["x@b.example"]})
    await rig.start()
    for rcpt in ("x@b.example", "y@b.example"):  # (no "l": their lines not written)
        (line,) = rig.log.grep(qid, f"to=<{rcpt}>", "stat=Sent")
        assert SENT_BEFORE_CRASH in line and "queue=removed, logged_by=start" in line
    (notice,) = rig.log.grep(qid, "sender_success_notification=")
    dsn = notice.rsplit("=", 1)[1].strip()
    await until(lambda: rig.log.grep(dsn, "status=removed"), "the notice delivered")
    assert [(c[0].queue_id, c[1]) for c in rig.courier.calls] == [(dsn, ["a@a.example"])]
    assert b"Action: relayed" in rig.courier.calls[0][2]


async def test_a_success_notice_owed_by_a_job_saved_before_a_cut_is_not_lost(
        rig: Rig) -> None:
    """x (NOTIFY=SUCCESS) at b.example taken, its state saved SENT (the message's other
    job, y at c.example, still at its next hop), then the stop cut y's job: the pass's
    notices are queued when its last job ends (_finish), which a cut job never reaches,
    and x's journal entry had ended at the save: x's notice was lost. Now its entry
    stays until the notice is queued: the next start queues it, once."""
    rig.cfg = from_dict({"hostname": "relay.test", "state_dir": str(rig.cfg.state_dir),
                         "shutdown_timeout": 0, "delivery": {"retry": ["50ms"]}})
    rig.courier.gates["c.example"] = gate = asyncio.Event()
    await rig.start()
    env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                   recipients=[Recipient("x@b.example", notify="SUCCESS"),
                               Recipient("y@c.example")])
    inc = rig.spool.begin(env)
    inc.write(BODY)
    await inc.commit(announce=True)
    qid = inc.queue_id
    await until(lambda: rig.spool.load(qid).recipients[0].state == SENT, "x saved sent")
    await rig.stop()  # y's delivery cut
    gate.set()
    await rig.start()
    await until(lambda: not rig.queued(), "y delivered, the notice too")
    assert len(rig.log.grep(qid, "sender_success_notification=")) == 1
    assert [c[1] for c in rig.courier.calls_for("x@b.example")] == [["x@b.example"]]


async def test_a_message_delivered_with_a_bounce_owed_keeps_the_bounce(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """One recipient taken (250), one refused (550, a bounce owed): a crash before the
    removal records the taken one as sent; the refused one was never 2xx, so it is
    tried again and its bounce is not lost (late or second, as before)."""
    _removals_cut_at_stop(rig, monkeypatch)
    rig.courier.script["y@b.example"] = [PERM, PERM]
    await rig.start()
    qid = await put(rig.spool, ["x@b.example", "y@b.example"])
    await _crash_after(rig, monkeypatch, qid, "stat=Bounced")
    assert rig.log.grep(qid, "recorded=<x@b.example>", RECORDED_AFTER_CRASH, "queue=queued")
    await until(lambda: rig.log.grep(qid, "status=removed"), "y bounced again, removed")
    assert [c[1] for c in rig.courier.calls if c[0].queue_id == qid] == [
        ["x@b.example", "y@b.example"], ["y@b.example"]]
    assert rig.log.grep(qid, "sender_non-delivery_notification=")


async def test_an_abandoned_commits_file_left_by_a_dead_worker_is_dropped(rig: Rig) -> None:
    """A worker gave up waiting for a commit (data_block_timeout: its client told 451
    4.3.0, no 250 ever) while the commit thread was in its fsync past the ready mark,
    then died (kill -9) before the thread removed the file: the file, ready and no
    longer locked, was delivered (a duplicate of what the client sends again). The
    worker now says so at once (`ID abandoned` on notify.sock): the scheduler removes
    the file, one line, never delivered. An id it was not told of is delivered."""
    await rig.start()
    dropped = await put(rig.spool, ["x@b.example"], notify=False)
    kept = await put(rig.spool, ["y@b.example"], notify=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(f"{dropped} abandoned\n{dropped}\n{kept}".encode(), str(rig.spool.notify_path))
    await until(lambda: rig.log.grep(kept, "status=removed"), "the other one delivered")
    await until(lambda: rig.log.grep(dropped, "abandoned commit removed, not delivered"), "dropped")
    assert not rig.queued()
    assert [c[0].queue_id for c in rig.courier.calls] == [kept]
    assert "never 250" in rig.log.grep(dropped)[0]


async def test_held_messages_are_skipped(rig: Rig) -> None:
    q1 = await put(rig.spool, ["x@b.example"])
    q2 = await put(rig.spool, ["y@b.example"])
    rig.spool.hold(q1)
    await rig.start()
    await until(lambda: rig.spool.scan() == [], "q2 delivered")
    assert [c[0].queue_id for c in rig.courier.calls] == [q2]
    assert rig.spool.held() == [q1]
    assert rig.sched is not None
    rig.sched.notify(q1)  # a stray notification must not deliver a held message
    await until(lambda: not rig.sched.active, "idle")
    assert [c[0].queue_id for c in rig.courier.calls] == [q2]


async def test_per_destination_limit_and_fresh_mail_overtakes(state_dir: Path) -> None:
    rig = Rig(state_dir, concurrency=4, concurrency_per_domain=2)
    gate = rig.courier.gates["slow.example"] = asyncio.Event()
    await rig.start()
    slow = [await put(rig.spool, [f"s{i}@slow.example"]) for i in range(6)]
    await until(lambda: rig.courier.inflight["slow.example"] == 2, "2 slow in flight")
    fast = await put(rig.spool, ["f@fast.example"])
    await until(lambda: fast not in rig.queued(), "fast delivered past the stuck domain")
    assert rig.courier.inflight["slow.example"] == 2
    gate.set()
    await until(lambda: not rig.queued(), "all delivered")
    assert rig.courier.max_inflight["slow.example"] == 2
    assert {c[0].queue_id for c in rig.courier.calls} == set(slow) | {fast}
    await rig.stop()
    rig.spool.close()


async def test_many_messages(rig: Rig) -> None:
    await rig.start()
    ids = await asyncio.gather(*(put(rig.spool, [f"u{i}@d{i % 7}.example"])
                                 for i in range(300)))
    await until(lambda: not rig.queued(), "300 delivered")
    assert sorted(c[0].queue_id for c in rig.courier.calls) == sorted(ids)


async def test_delay_warning_last_attempt_date_is_each_recipients_own(
        state_dir: Path) -> None:
    """RFC 3464 2.3.7: a delay warning's Last-Attempt-Date is the recipient's last
    attempt. ben@b.example was last tried 5 minutes ago and is not due in the pass that
    sends the warning (ann's): his group says that time, not the report's; ann's says
    the pass's. The attempt time is kept in the state file (the old code wrote the
    report's time for both)."""
    rig = Rig(state_dir, delay_warning="1s", retry=["1h"])
    qid = await put(rig.spool, ["ann@a.example", "ben@b.example"],
                    received_at=time.time() - 600)
    env = rig.spool.load(qid)
    now = time.time()
    earlier = float(int(now) - 300)  # whole seconds: the DSN's dates have no fraction
    for r, due in zip(env.recipients, (now, now + 3600), strict=True):
        r.attempts, r.last_code, r.next_attempt, r.last_attempt = 1, 451, due, earlier
        r.last_reply = "451 4.7.1 Greylisted, try later"
    rig.spool.save_state(env)
    rig.courier.script["ann@a.example"] = [TEMP]
    await rig.start(rescan_interval=3600)
    try:
        await until(lambda: rig.courier.calls_for("a@a.example"), "the delay warning")
        (warning,) = rig.courier.calls_for("a@a.example")
        msg = email.message_from_bytes(warning[2], policy=email.policy.compat32)
        groups = {g["Final-Recipient"]: g for g in msg.get_payload()[1].get_payload()[1:]}
        ben = email.utils.parsedate_to_datetime(
            groups["rfc822; ben@b.example"]["Last-Attempt-Date"])
        ann = email.utils.parsedate_to_datetime(
            groups["rfc822; ann@a.example"]["Last-Attempt-Date"])
        assert ben.timestamp() == earlier
        assert ann.timestamp() >= int(now)  # this pass's attempt, not the earlier one
        await until(lambda: all(r.delay_warned for r in rig.spool.load(qid).recipients),
                    "the pass's state saved")
        a, b = rig.spool.load(qid).recipients
        assert b.last_attempt == earlier and a.last_attempt >= now  # durable
    finally:
        await rig.stop()
        rig.spool.close()


async def test_retry_backlog_filling_the_active_set_does_not_keep_fresh_mail_out(
        state_dir: Path) -> None:
    # 40 deferred messages due at once for a destination that never answers fill the
    # active set (max_active 20): they wait for its 2 slots. Fresh mail elsewhere is
    # still taken in and delivered (old code: not until the backlog drained).
    rig = Rig(state_dir, concurrency=4, concurrency_per_domain=2)
    gate = rig.courier.gates["slow.example"] = asyncio.Event()
    for i in range(40):
        qid = await put(rig.spool, [f"s{i}@slow.example"])
        env = rig.spool.load(qid)
        env.recipients[0].attempts = 1
        env.recipients[0].next_attempt = time.time() - 1
        rig.spool.save_state(env)
    sched = await rig.start(max_active=20)
    await until(lambda: rig.courier.inflight["slow.example"] == 2, "2 slow in flight")
    await until(lambda: len(sched.active) >= 15, "the backlog in the active set")
    fast = await put(rig.spool, ["f@fast.example"])
    await until(lambda: fast not in rig.queued(), "fresh mail delivered past the backlog")
    assert len(sched.active) <= 20
    gate.set()
    await until(lambda: not rig.queued(), "all delivered")
    await rig.stop()
    rig.spool.close()


async def test_a_next_attempt_written_by_a_clock_ahead_does_not_freeze_the_message(
        rig: Rig) -> None:
    # The state was saved while the clock was ten years ahead (then set right): the
    # message is tried now, not in ten years.
    qid = await put(rig.spool, ["x@b.example"])
    env = rig.spool.load(qid)
    env.recipients[0].attempts = 1
    env.recipients[0].next_attempt = time.time() + 10 * 365 * 86400
    rig.spool.save_state(env)
    await rig.start()
    await until(lambda: not rig.queued(), "delivered")
    assert rig.log.grep(qid, "clock was set back")


async def test_a_retry_schedule_shortened_before_a_restart_is_no_clock_warning(
        rig: Rig) -> None:
    # Deferred an hour ago under retry = ["4h"] (next attempt in 3 h); the admin sets a
    # shorter retry and restarts. That next attempt lies beyond what the new schedule
    # sets, but the clock was never set back (the last attempt is in the past): the new
    # schedule applies from the last attempt, with no "clock was set back?" warning (one
    # line per deferred message: 20,000 of them blaming NTP). A state written by a clock
    # ahead (its last attempt in the future) is still tried now, with the warning.
    now = time.time()
    shortened = await put(rig.spool, ["x@b.example"])
    ahead = await put(rig.spool, ["y@c.example"])
    for qid, last in ((shortened, now - 3600), (ahead, now + 86400)):
        env = rig.spool.load(qid)
        env.recipients[0].attempts = 1
        env.recipients[0].last_attempt = last
        env.recipients[0].next_attempt = last + 4 * 3600
        rig.spool.save_state(env)
    await rig.start()
    await until(lambda: not rig.queued(), "both delivered")
    assert not rig.log.grep(shortened, "clock was set back")
    assert rig.log.grep(ahead, "clock was set back")


async def test_a_clock_set_back_while_running_does_not_freeze_the_retries(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The host booted with its clock ten years ahead; serve deferred a message (its next
    # attempt an hour later by that clock, in the heap); then NTP set the clock right.
    # The restart rule (a recorded next attempt the schedule cannot have set is tried
    # now) never ran: the message waited in the heap for ten years, restart or nothing.
    # Now a rescan that sees the wall clock set back looks at every scheduled message.
    # (The scheduler's wall clock is the one thing faked: the machine's is shared.)
    from authrelay.scheduler import scheduler as sched_mod

    class Clock:
        offset = 10 * 365 * 86400.0

        def time(self) -> float:
            return time.time() + self.offset

        def monotonic(self) -> float:
            return time.monotonic()

    clock = Clock()
    monkeypatch.setattr(sched_mod, "time", clock)
    rig = Rig(state_dir, retry=["1h"])
    rig.courier.script["bob@b.example"] = [TEMP]
    try:
        sched = await rig.start(rescan_interval=0.05)
        qid = await put(rig.spool, ["bob@b.example"], received_at=clock.time())
        await until(lambda: len(rig.courier.calls) == 1 and not sched.active,
                    "the first attempt deferred")
        clock.offset = 0.0  # set back
        await until(lambda: not rig.queued(), "delivered after the clock was set back")
        assert len(rig.courier.calls) == 2
        assert rig.log.grep(qid, "clock was set back")
    finally:
        await rig.stop()
        rig.spool.close()


class _AheadClock:
    """The scheduler's wall clock (the one thing faked: the machine's is shared), `offset`
    seconds ahead of the machine's."""

    offset = 10 * 365 * 86400.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


async def test_an_arrival_in_the_future_is_counted_from_now_and_saved(
        rig: Rig) -> None:
    """A message accepted while the clock was ten years ahead (then set right): its age
    was negative for ten years, so it would expire (and be warned about) ten years late.
    Its age counts from now, kept in its state (a restart does not start it again), with
    one warning; now is never before the real arrival, so nothing expires early."""
    rig.cfg = make_cfg(Path(rig.cfg.state_dir), retry=["1h"])
    rig.courier.script["bob@b.example"] = [TEMP]
    before = time.time()
    qid = await put(rig.spool, ["bob@b.example"], received_at=before + 10 * 365 * 86400)
    await rig.start()
    await until(lambda: rig.log.grep(qid, "stat=Deferred"), "the first attempt deferred")
    (line,) = rig.log.grep(qid, "stat=Deferred")
    delay = float(re.search(r"delay=(-?[0-9.]+)", line).group(1))  # type: ignore[union-attr]
    assert 0 <= delay < 3600, line
    await rig.stop()
    saved = rig.spool.load(qid).received_at  # header merged with ID.state
    assert before <= saved <= time.time()
    assert len(rig.log.grep(qid, "in the future (the clock was set back?)")) == 1
    await rig.start()  # counted from the saved time: no second warning
    await until(lambda: rig.sched is not None and qid not in rig.sched.active, "looked at")
    await rig.stop()
    assert rig.spool.load(qid).received_at == saved
    assert len(rig.log.grep(qid, "in the future (the clock was set back?)")) == 1


async def test_an_arrival_saved_while_the_clock_was_behind_gives_way_once_it_is_right(
        rig: Rig) -> None:
    """The other way round: a message accepted at the right time, first seen by the
    scheduler while the clock was behind (a boot at 1970 before NTP, a dead RTC). Its
    header's arrival looked in the future, so the clock's wrong time was saved as its
    arrival, and kept for good: with the clock right again it counted decades old and
    expired (bounced) at its next attempt. Once the clock has reached the header's
    arrival, the header is believed again (here the clock is 'behind' by 1.5 s)."""
    rig.cfg = make_cfg(Path(rig.cfg.state_dir), retry=["1h"])
    rig.courier.script["bob@b.example"] = [TEMP]
    header = time.time() + 1.5
    qid = await put(rig.spool, ["bob@b.example"], received_at=header)
    await rig.start()
    await until(lambda: rig.log.grep(qid, "stat=Deferred"), "the first attempt deferred")
    await rig.stop()
    assert len(rig.log.grep(qid, "in the future (the clock was set back?)")) == 1
    assert rig.spool.load(qid).received_at < header  # the clock's time, while behind
    await until(lambda: time.time() > header, "the clock reaching the header's arrival")
    assert rig.spool.load(qid).received_at == header


async def test_a_clock_set_back_after_acceptance_delays_neither_expiry_nor_warning(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted while the clock was ten years ahead, then the clock set back: the delay
    warning (delay_warning) and the expiry bounce (max_queue_lifetime) come that long
    after now, not ten years later."""
    from authrelay.scheduler import scheduler as sched_mod

    clock = _AheadClock()
    monkeypatch.setattr(sched_mod, "time", clock)
    rig = Rig(state_dir, max_queue_lifetime="1s", delay_warning="300ms", retry=["50ms"])
    rig.courier.script["slow@b.example"] = [TEMP] * 1000
    qid = await put(rig.spool, ["slow@b.example"], received_at=clock.time())
    clock.offset = 0.0  # set back before the first attempt
    try:
        await rig.start()
        await until(lambda: rig.log.grep(qid, "message expired"), "the expiry bounce")
        assert len(rig.log.grep(qid, "sender_delay_notification")) == 1
        (line,) = rig.log.grep(qid, "stat=Bounced")
        delay = float(re.search(r"delay=([0-9.]+)", line).group(1))  # type: ignore[union-attr]
        assert delay >= 1.0, line  # not early: the lifetime, counted from the clamp
        await until(lambda: not rig.queued(), "queue empty")
    finally:
        await rig.stop()
        rig.spool.close()


async def test_a_big_queue_at_start_is_loaded_a_batch_per_turn_of_the_loop(
        rig: Rig) -> None:
    # 600 messages found at start: each is read on the event loop, so reading them all
    # in one stretch stalls every other client of the loop (in single mode the SMTP
    # sessions, TLS handshakes, /metrics' control socket). Counted per loop turn by a
    # ticker callback that runs once in every turn.
    for i in range(600):
        await put(rig.spool, [f"u{i}@d{i % 5}.example"])
    turn = 0
    loads: dict[int, int] = defaultdict(int)
    loop = asyncio.get_running_loop()

    def tick() -> None:
        nonlocal turn
        turn += 1
        if rig.queued():
            loop.call_soon(tick)

    real = rig.spool.load_for_delivery

    def counted(qid: str, *a: Any, **kw: Any) -> Any:
        loads[turn] += 1
        return real(qid, *a, **kw)

    rig.spool.load_for_delivery = counted  # type: ignore[method-assign]
    loop.call_soon(tick)
    await rig.start()
    await until(lambda: not rig.queued(), "600 delivered")
    assert sum(loads.values()) == 600
    assert max(loads.values()) <= 64, sorted(loads.values())[-5:]


async def test_new_mail_is_delivered_while_the_queue_is_recovered_at_start(
        rig: Rig) -> None:
    # The start's recovery of a big queue (here: any) reads every queued file (seconds
    # per 20,000, minutes from a cold disk): held here until the test lets it go.
    # Meanwhile start() has returned (the daemon opens its listeners after it) and new
    # mail is delivered.
    old = await put(rig.spool, ["old@b.example"])
    gate = threading.Event()
    real = rig.spool.recover

    def slow_recover() -> dict[str, int]:
        gate.wait(60)
        return real()

    rig.spool.recover = slow_recover  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(rig.start(recover_inline=0), 20)
        new = await put(rig.spool, ["new@b.example"])
        await until(lambda: new not in rig.queued(), "new mail delivered")
        assert [c[0].queue_id for c in rig.courier.calls] == [new]
    finally:
        gate.set()
    await until(lambda: old not in rig.queued(), "the queue found at start delivered")


async def test_messages_waiting_for_a_busy_destination_are_not_kept_in_memory(
        state_dir: Path) -> None:
    # 60 messages of 200 KB due at once for a destination taking one at a time (and
    # never answering): the 59 waiting for its slot were each held in memory as read at
    # load time (max_active of them: up to 5 GB). Now they are read again when their
    # turn comes. Measured with tracemalloc once all are in the active set.
    import tracemalloc

    rig = Rig(state_dir, concurrency=4, concurrency_per_domain=1)
    gate = rig.courier.gates["slow.example"] = asyncio.Event()
    body = BODY + b"x" * 200_000 + b"\r\n"
    for i in range(60):
        await put(rig.spool, [f"s{i}@slow.example"], body=body)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sched = await rig.start()
        await until(lambda: len(sched.active) == 60 and rig.courier.inflight["slow.example"],
                    "all loaded, one in flight")
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 20 * len(body), held  # old code: 60 bodies (12 MB); now 0.4 MB
    gate.set()
    await until(lambda: not rig.queued(), "all delivered")
    assert all(c[2] == body for c in rig.courier.calls)
    await rig.stop()
    rig.spool.close()


async def test_messages_waiting_within_the_budget_are_not_read_twice(state_dir: Path) -> None:
    # The memory bound above (0cfa6ec) sent every message that waited for a slot back to
    # its file: on a busy destination's ordinary queue (a smart host at 500 msg/s, its
    # concurrency_per_domain slots full) each was opened and checked once more at load
    # and read again at delivery, ~0.2 ms of the master's CPU per message. Within
    # WAITING_INLINE_BUDGET the bytes read at load are what the courier gets.
    rig = Rig(state_dir, concurrency=4, concurrency_per_domain=1)
    gate = rig.courier.gates["busy.example"] = asyncio.Event()
    for i in range(20):
        await put(rig.spool, [f"b{i}@busy.example"])
    sched = await rig.start()
    await until(lambda: len(sched.active) == 20 and rig.courier.inflight["busy.example"],
                "all loaded, one in flight")
    gate.set()
    await until(lambda: not rig.queued(), "all delivered")
    assert len(rig.courier.given_bytes) == 20
    assert all(rig.courier.given_bytes)  # old code: 19 of 20 given the file
    await rig.stop()
    rig.spool.close()


NO_ANSWER = dataclasses.replace(DeliveryResult.temp(
    "connect to mx.dead.example [192.0.2.1]:25: connection timed out"), unanswered=True)


async def _a_dead_destination(rig: Rig, n: int) -> tuple[Scheduler, list[str]]:
    """`n` messages to dead.example, none of whose hosts answers: the first deliveries
    mark it, the rest are deferred as suspended. Returns once every one is deferred."""
    rig.courier.script.update({f"u{i}@dead.example": [NO_ANSWER] * 10 for i in range(n)})
    sched = await rig.start(rescan_interval=3600)
    ids = [await put(rig.spool, [f"u{i}@dead.example"]) for i in range(n)]
    await until(lambda: all(rig.log.grep(q, "stat=Deferred") for q in ids)
                and not sched.active, "every message deferred")
    return sched, ids


async def test_deferring_at_a_suspended_destination_writes_no_state(state_dir: Path) -> None:
    """A deferral at a dead destination (no attempt made) rewrote the message's state
    file, an fsync each: ~285 a second, 20,000 messages over a minute of fsyncs. Now it
    writes nothing; the messages tried for real keep their saved state, and after a
    crash (the scheduler's memory lost: a new one on the same spool) every message is
    still queued and delivered once the destination answers."""
    rig = Rig(state_dir, retry=["1h"], concurrency_per_domain=2)
    try:
        _sched, ids = await _a_dead_destination(rig, 12)
        suspended = [q for q in ids if rig.log.grep(q, "temporarily suspended")]
        tried = [q for q in ids if q not in suspended]
        assert len(suspended) >= 10 and 1 <= len(tried) <= 2
        assert [q for q in suspended if (rig.spool.queue_dir / f"{q}.state").exists()] == []
        for q in tried:  # a real attempt is on disk, its next one an hour away
            r = rig.spool.load(q).recipients[0]
            assert r.attempts == 1 and r.next_attempt > time.time() + 3000
        await rig.stop()  # what a kill -9 leaves is the files: nothing more was written
        for i in range(12):
            rig.courier.script[f"u{i}@dead.example"] = [OK]
        await rig.start(rescan_interval=3600)
        await until(lambda: rig.spool.scan() == tried, "the suspended ones delivered")
        assert all(rig.log.grep(q, "stat=Sent") for q in suspended)
    finally:
        await rig.stop()
        rig.spool.close()


async def test_a_flush_of_all_probes_a_dead_destination_with_one_delivery(
        state_dir: Path) -> None:
    """`queue flush` of all forgot the dead marks: a destination still dead was then tried
    by concurrency_per_domain deliveries at once, each waiting out its connect timeout
    before the mark came back. Now the flush ends the mark: one delivery probes, and the
    others are deferred as suspended when it finds the destination dead again."""
    rig = Rig(state_dir, retry=["1h"], concurrency_per_domain=4)
    try:
        sched, ids = await _a_dead_destination(rig, 10)
        gate = rig.courier.gates["dead.example"] = asyncio.Event()
        rig.courier.max_inflight.clear()
        calls = len(rig.courier.calls)
        sched.flush()
        await until(lambda: rig.courier.inflight["dead.example"] >= 1, "the probe started")
        gate.set()
        await until(lambda: all(len(rig.log.grep(q, "stat=Deferred")) >= 2 for q in ids)
                    and not sched.active, "every message deferred again")
        assert rig.courier.max_inflight["dead.example"] == 1
        assert len(rig.courier.calls) - calls == 1
    finally:
        rig.courier.gates.clear()
        await rig.stop()
        rig.spool.close()


async def test_deferrals_at_a_suspended_destination_still_count_as_tries(
        state_dir: Path) -> None:
    """A suspended pass writes nothing, but its tries are kept in memory: the next pass of
    a message whose destination is still dead counts on from them (its back-off grows as
    before, rather than restarting from the last write at every reload)."""
    rig = Rig(state_dir, retry=["1h"], concurrency_per_domain=2)
    try:
        sched, ids = await _a_dead_destination(rig, 8)
        first = [q for q in ids if rig.log.grep(q, "temporarily suspended", "tries=1")]
        assert len(first) >= 6
        sched.flush()  # one probe finds it dead again; the others are suspended again
        await until(lambda: all(len(rig.log.grep(q, "stat=Deferred")) >= 2 for q in ids)
                    and not sched.active, "every message deferred again")
        again = [q for q in first if rig.log.grep(q, "temporarily suspended", "tries=2")]
        assert len(again) >= len(first) - 1  # all but the probe, if it was one of them
        probe = [q for q in first if q not in again]
        for q in probe:  # its real attempt saved the tries the suspensions counted
            assert rig.spool.load(q).recipients[0].attempts == 2
    finally:
        await rig.stop()
        rig.spool.close()


async def test_a_stop_whose_cancel_meets_a_wake_up_still_stops(state_dir: Path) -> None:
    """stop() cancels the scheduler's loop, which waits for a wake-up or its next due
    time. Python 3.11's wait_for returned normally when the wake-up (a commit, a flush, a
    delivery ending) and the cancel landed in the same loop turn: the cancel was lost and
    stop() waited for the next due time (here an hour; seen under load: 300 s, a dead
    destination's mark). The wake-up is set just before the stop, as a busy master does."""
    rig = Rig(state_dir, retry=["1h"])
    rig.courier.script["bob@b.example"] = [TEMP]
    sched = await rig.start(rescan_interval=3600)
    main = sched._main
    assert main is not None and sched._wake is not None
    stopping: asyncio.Future[None] | None = None
    try:
        q = await put(rig.spool, ["bob@b.example"])
        await until(lambda: rig.log.grep(q, "stat=Deferred") and not sched.active,
                    "deferred: next attempt in an hour")
        sched._wake.set()
        stopping = asyncio.ensure_future(rig.stop())
        await asyncio.wait({stopping}, timeout=DEADLINE)  # a bound: it hung for an hour
        assert stopping.done(), "stop() hung: its cancel of the scheduler's loop was lost"
        assert main.done()
    finally:
        if not main.done():
            main.cancel()  # a second cancel, without the wake-up: it ends
        if stopping is not None:
            await stopping
        await rig.stop()
        rig.spool.close()


async def test_a_burst_of_deliveries_is_removed_in_batches_leaving_nothing(rig: Rig) -> None:
    """Removals go to the commit thread in batches (issue 22): every message of a burst
    is removed with its one `removed` line, and none leaves a state file behind: not one
    deferred first, nor one to two destinations (the first job's outcome saved in ID.state
    after a load that found none, the message removed after the second's)."""
    rig.courier.script["r0@b.example"] = [TEMP]
    await rig.start(rescan_interval=3600)
    ids = await asyncio.gather(*(put(rig.spool, [f"r{i}@b.example"]) for i in range(40)),
                               put(rig.spool, ["two@b.example", "two@c.example"]))
    await until(lambda: rig.log.grep(ids[0], "Deferred"), "the deferral")
    await until(lambda: not rig.queued() and rig.sched is not None and not rig.sched.active,
                "all delivered and removed")
    removed = [ln.split(":")[0] for ln in rig.log.grep("status=removed")]
    assert sorted(removed) == sorted(ids)  # each once
    assert list(rig.spool.queue_dir.iterdir()) == []  # no ID.state left either


async def test_rescans_sweep_dead_receives_files_and_never_a_live_or_committed_one(
        rig: Rig) -> None:
    """A receive that died in DATA (a worker killed) leaves an unready file that nobody
    holds: each rescan removes such files, one maillog line each, without a restart.
    Across many sweeps a live receive idle past UNFINISHED_AGE (a slow DATA: its file
    unchanged, its lock held) and a committed message waiting for its delivery stay;
    both are delivered after."""
    await rig.start(rescan_interval=0.05)
    gate = rig.courier.gates["b.example"] = asyncio.Event()
    waiting = await put(rig.spool, ["bob@b.example"])
    await until(lambda: rig.courier.calls, "the committed message in its delivery")
    live = rig.spool.begin(Envelope(queue_id=new_queue_id(), sender="a@a.example",
                                    recipients=[Recipient("carol@c.example")]))
    live.create_early()
    live.write(BODY[:20])
    live_path = rig.spool.queue_dir / live.queue_id
    await until(live_path.exists, "the live receive's file")
    old = time.time() - 2 * UNFINISHED_AGE
    for path in (live_path, rig.spool.queue_dir / waiting):
        os.utime(path, (old, old))  # idle past the age: only the lock / ready bit count
    for _ in range(5):  # each dead file's removal proves one more sweep
        dead = rig.spool.queue_dir / new_queue_id()
        dead.write_bytes(b"AUTHRELAY-SPOOL 2 receiving\n{")
        dead.chmod(0o600)
        os.utime(dead, (old, old))
        await until(lambda d=dead: not d.exists(), "a rescan's sweep")
        await until(lambda d=dead: rig.log.grep(d.name, "unfinished queue file removed"),
                    "its maillog line")
        assert live_path.exists() and (rig.spool.queue_dir / waiting).exists()
    live.write(BODY[20:])
    await live.commit()
    gate.set()
    await until(lambda: not rig.queued(), "both delivered")
    assert sorted(c[1][0] for c in rig.courier.calls) == ["bob@b.example",
                                                           "carol@c.example"]


async def _put_owed(spool: Spool, rcpts: list[str], notify: bool = False,
                    age: float = 0.0) -> str:
    """A message committed as a session's is (its from= line still owed: the group-execute
    mark), `age` seconds old, its producer's line never written."""
    env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                   recipients=[Recipient(r) for r in rcpts], protocol="ESMTPSA",
                   client_ip="192.0.2.7", auth_user="alice", helo="laptop")
    inc = spool.begin(env)
    inc.log_owed = True
    inc.write(BODY)
    await inc.commit(announce=notify)
    path = spool.queue_dir / env.queue_id
    assert path.stat().st_mode & 0o777 == 0o710
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return env.queue_id


async def test_a_message_whose_producer_died_before_its_from_line_gets_it_once(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue file still marked as its from= line owed, found by a scan (no notice: its
    worker was killed between the 250 and its maillog writer's write) gets the line from
    the scheduler, marked `logged_by=scheduler`, before its delivery line, once; one whose
    producer's notice came (its writer lives on: a stalled log) gets none from here; a
    young one waits LOG_OWED_WAIT (its producer may still write it) and then gets it."""
    monkeypatch.setattr(scheduler_mod, "LOG_OWED_WAIT", 1.0)
    dead = await _put_owed(rig.spool, ["x@b.example"], age=60)
    rig.courier.script["y@b.example"] = [TEMP]  # deferred: loaded again, no second line
    deferred = await _put_owed(rig.spool, ["y@b.example"], age=60)
    sched = await rig.start(rescan_interval=3600)
    noticed = await _put_owed(rig.spool, ["z@b.example"], notify=True, age=60)
    young = await _put_owed(rig.spool, ["w@b.example"])
    sched.receiver_died()  # (its scan: the young one found without a notice)
    await until(lambda: not rig.queued(), "every message delivered")
    assert len(rig.courier.calls_for("y@b.example")) == 2  # deferred, then sent
    for qid in (dead, deferred, young):
        (line,) = rig.log.grep(qid, "from=<a@a.example>")
        assert line == (f"{qid}: from=<a@a.example>, size={len(BODY)}, nrcpts=1, "
                        "relay=unknown [192.0.2.7], proto=ESMTPSA, auth=alice, helo=laptop, "
                        "logged_by=scheduler"), line
        mine = [ln for ln in rig.log.lines if ln.startswith(f"{qid}: ")]
        assert mine[0] == line, mine  # before its delivery lines
    assert rig.courier.calls_for("z@b.example") and not rig.log.grep(noticed, "from=")


async def test_an_owed_line_committed_before_the_clock_went_back_waits_for_its_producer(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file marked as its from= line owed whose commit time is ahead of the clock (set
    back since the commit) had a negative age, taken as past LOG_OWED_WAIT: the
    scheduler wrote the line at once, though its producer, alive, may still write its
    own (two lines). It waits LOG_OWED_WAIT from its first load now (an hour here: it is
    not written or delivered meanwhile), while one as old as the wait gets its line."""
    monkeypatch.setattr(scheduler_mod, "LOG_OWED_WAIT", 3600.0)
    ahead = await _put_owed(rig.spool, ["x@b.example"], age=-3 * 3600)
    old = await _put_owed(rig.spool, ["y@b.example"], age=2 * 3600)
    await rig.start(rescan_interval=3600)
    await until(lambda: rig.log.grep(old, "stat=Sent"), "the old one delivered")
    assert rig.log.grep(old, "logged_by=scheduler")
    assert not rig.log.grep(ahead, "from=") and not rig.courier.calls_for("x@b.example")
    assert (rig.spool.queue_dir / ahead).stat().st_mode & 0o777 == 0o710


async def test_a_message_a_scan_finds_in_its_commit_is_looked_at_again(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ready file its writer still holds (in its fsync: store.InCommit) was dropped
    by the load that found it, the writer's notice counted on; a notice lost (sent
    before a restarted scheduler bound notify.sock: a sendmail command committing
    across the restart) left it for the next rescan (60 s; an hour here). It is
    loaded again IN_COMMIT_AGAIN later and delivered."""
    from support.spools import held_commit

    from authrelay.spool.store import InCommit

    found = threading.Event()
    load = rig.spool.load_for_delivery

    def watched(qid: str, vouched: int = 0) -> Any:
        try:
            return load(qid, vouched)
        except InCommit:
            found.set()
            raise

    monkeypatch.setattr(rig.spool, "load_for_delivery", watched)
    sched = await rig.start(rescan_interval=3600)
    env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                   recipients=[Recipient("x@b.example")])
    inc, held = held_commit(rig.spool.queue_dir, env, BODY)  # its notice: lost
    task = asyncio.ensure_future(inc.commit())
    try:
        assert await asyncio.to_thread(held.entered.wait, 10)
        sched.receiver_died()  # a scan: the file found in its commit
        assert await asyncio.to_thread(found.wait, 10)
    finally:
        held.go.set()
        await task
    await until(lambda: rig.courier.calls_for("x@b.example"), "delivered without a rescan")
    await until(lambda: not rig.queued(), "removed")


async def test_past_owed_max_a_notice_s_producer_is_not_remembered(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """OWED_MAX bounds the messages remembered as owing their from= line to a live
    producer (a notice sent by the timer, `ID INODE PID`: memory). Past it the producer is
    not remembered: when it dies its line is not written here (the documented loss past
    the limit), while the one remembered gets it, once, marked logged_by=scheduler."""
    monkeypatch.setattr(scheduler_mod, "OWED_MAX", 1)
    sched = await rig.start(rescan_interval=3600)
    pid = 4242  # a producer that is not this process (never signalled: only a number)
    kept = await _put_owed(rig.spool, ["x@b.example"], age=60)
    sched._notify(kept, 0, pid)
    past = await _put_owed(rig.spool, ["y@b.example"], age=60)
    sched._notify(past, 0, pid)
    await until(lambda: not rig.queued(), "both delivered (their producer lives on)")
    assert not rig.log.grep(kept, "from=") and not rig.log.grep(past, "from=")
    sched.receiver_died(pid)
    await until(lambda: rig.log.grep(kept, "from="), "the remembered one's line")
    (line,) = rig.log.grep(kept, "from=")
    assert line.endswith("logged_by=scheduler"), line
    assert not rig.log.grep(past, "from=") and not sched._owed_by
