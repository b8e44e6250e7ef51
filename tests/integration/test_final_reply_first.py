"""The final 250 of an authenticated message waits neither for the per-user counters
nor for the maillog's `from=` line.

After the commit (the message is durable) the session still updates the user's message
and recipient counters (`Throttle.user_sent`: a Redis round trip in a farm, up to its
timeout when Redis is slow) and, with containment on, its work. The 250 must already be
on the wire then. A real in-process SMTPServer (wiring.server) on its own loop in a
thread, the user DB, TLS from a test CA, a real client (smtplib: STARTTLS, AUTH PLAIN);
the one stand-in is a throttle whose `user_sent` waits until the test lets it go, so the
order is observed without timing anything. The `from=` line: a MailLog whose `queued`
(made on the event loop) holds the loop until the test lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.certs import install_cert
from support.inproc import ServerThread
from support.ports import free_port
from support.spools import HeldDirSync
from support.tmpfs import mounted
from support.wait import wait_until

from authrelay import wiring
from authrelay.auth.userdb import UserDB
from authrelay.config import Config, from_dict
from authrelay.maillog import MailLog
from authrelay.policy.throttle import LocalThrottle, Share
from authrelay.smtpd.listener import HIGH_WATER
from authrelay.smtpd.server import SMTPServer
from authrelay.spool import writer
from authrelay.spool.abandoned import AbandonedBook
from authrelay.spool.envelope import Envelope
from authrelay.spool.store import Spool
from authrelay.spool.writer import SPILL, Incoming
from authrelay.tls import CertStore


class _HeldCounters(LocalThrottle):
    """The in-process throttle, with `user_sent` held until `go` is set."""

    def __init__(self, cfg: Config, share: Share) -> None:
        super().__init__(cfg, share)
        self.entered = threading.Event()
        self.go: asyncio.Event | None = None
        self.finished = False

    async def user_sent(self, user: str, nrcpts: int) -> None:
        self.go = asyncio.Event()
        self.entered.set()
        await self.go.wait()
        await super().user_sent(user, nrcpts)
        self.finished = True


class _HeldLog(MailLog):
    """The file maillog, its `from=` line (`queued`) held until `go` is set: the
    session's event loop waits in it (at most 10 s)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.go = threading.Event()
        self.hold = False
        self.made = False  # a held `from=` line was made

    def queued(self, *args: Any, **kw: Any) -> None:
        if self.hold:
            self.go.wait(10)
        super().queued(*args, **kw)
        self.made = self.hold


class _Spool(Spool):
    """The spool, keeping each Incoming it begins (a test reads how much it took)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self.begun: list[Incoming] = []

    def begin(self, envelope: Envelope) -> Incoming:
        inc = super().begin(envelope)
        self.begun.append(inc)
        return inc


class _Server:
    def __init__(self, tmp: Path, ca: trustme.CA, limits: dict[str, Any] | None = None
                 ) -> None:
        self.port = free_port()
        cert, key, _ = install_cert(ca, tmp / "tls", "relay.test", "127.0.0.1")
        self.cfg = from_dict({
            "hostname": "relay.test", "state_dir": str(tmp),
            "listen": [{"address": f"127.0.0.1:{self.port}", "mode": "submission"}],
            "tls": {"cert": str(cert), "key": str(key)},
            "relay": {"smart_host": ["127.0.0.1:9"]},
            "limits": {"connection_rate_per_ip": 0, **(limits or {})},
        })
        UserDB(self.cfg.userdb_path).add("alice", "correct horse",
                                         ["alice@example.org"])
        self.spool = _Spool(tmp / "spool")
        self.spool.ensure_dirs()
        self.held: _HeldCounters  # made with the server, on its loop
        self.log = _HeldLog(f"file:{self.cfg.state_dir}/maillog")
        self.thread = ServerThread(self.cfg, self._build)

    def _build(self) -> SMTPServer:
        server = wiring.server(self.cfg, self.spool, CertStore(self.cfg),
                               maillog=self.log)
        self.held = _HeldCounters(self.cfg, server.share)
        server.throttle = self.held
        return server

    def release(self) -> None:
        go = self.held.go
        assert go is not None
        self.thread.call_soon(go.set)


@pytest.fixture
def server(tmp_path: Path, trustme_ca: trustme.CA) -> Iterator[_Server]:
    srv = _Server(tmp_path, trustme_ca)
    srv.thread.start()
    yield srv
    srv.thread.stop()


def _hold_commit_threads(server: _Server, gate: threading.Event, seconds: float) -> None:
    """Every commit thread of the in-process server held until `gate` is set (at most
    `seconds`): a hung disk's."""
    pool = writer.commit_pool()  # the in-process server's
    blockers: list[object] = []
    server.thread.call_soon(lambda: blockers.extend(
        pool.run(lambda: gate.wait(seconds)) for _ in range(pool.size)))
    wait_until(lambda: len(blockers) == pool.size, "every commit thread held")


def _to_bob(server: _Server, ca: trustme.CA) -> smtplib.SMTP:
    """A session of alice's (STARTTLS, AUTH PLAIN) with MAIL and RCPT accepted."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    c = smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=20)
    c.starttls(context=ctx)
    c.login("alice", "correct horse")
    c.mail("alice@example.org")
    assert c.rcpt("bob@remote.test")[0] == 250
    return c


def test_250_is_sent_before_the_user_counters_are_updated(
        server: _Server, trustme_ca: trustme.CA) -> None:
    with _to_bob(server, trustme_ca) as c:
        # smtplib reads the final reply before returning: with the counters held, it
        # only returns because the 250 went out first (else: its 20 s timeout).
        code, text = c.data(b"From: alice@example.org\r\nSubject: t\r\n\r\nhello\r\n")
        assert code == 250 and b"queued as" in text
        # ... and user_sent, called right after it, is still held: not finished before
        assert server.held.entered.wait(10) and not server.held.finished
        assert len(list(server.spool.queue_dir.iterdir())) == 1
        server.release()
        assert c.noop()[0] == 250  # the session goes on once the counters are done


def test_250_is_sent_before_the_from_line_is_made(
        server: _Server, trustme_ca: trustme.CA) -> None:
    """The `from=` line and the scheduler's notice follow the 250 (Draft.commit's
    on_durable): the maillog is not the client's to wait for."""
    with _to_bob(server, trustme_ca) as c:
        server.log.hold = True
        # With the loop held in `queued`, the 250 reaches the client before the line
        # is made only if it was written first (else: after the log's 10 s).
        code, text = c.data(b"From: alice@example.org\r\nSubject: t\r\n\r\nhello\r\n")
        assert code == 250 and b"queued as" in text
        assert not server.log.made
        server.log.go.set()
        assert server.held.entered.wait(10)
        server.release()
        assert c.noop()[0] == 250
    server.log.flush()
    lines = (Path(server.cfg.state_dir) / "maillog").read_text().splitlines()
    qid = text.decode().rsplit(" ", 1)[-1]
    assert [ln for ln in lines if f"{qid}: from=<alice@example.org>" in ln]


def test_the_bounded_commit_wait_starts_no_task_of_its_own(
        server: _Server, trustme_ca: trustme.CA) -> None:
    """296af27 bounded the wait after the final dot by a task of its own around the
    commit, awaited with asyncio.wait (~20 us and a loop turn a message: PERFORMANCE.md
    (20)); the session's own task waits now, a timer bounds it (the bound itself: the
    hung-disk tests below). No task is made on the server's loop for a message."""
    loop = server.thread.loop
    made: list[str] = []

    def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=lp, **kw)

    set_ = threading.Event()
    with _to_bob(server, trustme_ca) as c:
        server.thread.call_soon(lambda: (loop.set_task_factory(factory), set_.set()))
        assert set_.wait(10)
        code, text = c.data(b"From: alice@example.org\r\nSubject: t\r\n\r\nhello\r\n")
        assert code == 250 and b"queued as" in text
        assert server.held.entered.wait(10)
        server.release()
        assert c.noop()[0] == 250
        assert made == []  # (the old code: ['Draft.commit'])


def _queue_files(server: _Server) -> list[Path]:
    return sorted(server.spool.queue_dir.iterdir())


def test_the_queue_file_is_made_while_the_message_arrives(
        server: _Server, trustme_ca: trustme.CA) -> None:
    """The file is created (not ready, 0600) by a commit thread once DATA is accepted,
    not after the final dot; the dot only writes, marks and fsyncs it. A message whose
    client goes away before the dot leaves no file; one committed reads back whole."""
    head = b"From: alice@example.org\r\nSubject: early\r\n\r\n"
    committed: list[str] = []
    for finish in (True, False):
        c = _to_bob(server, trustme_ca)
        c.putcmd("data")
        assert c.getreply()[0] == 354
        c.send(head)  # part of the message; no dot yet
        files = wait_until(lambda: [p for p in _queue_files(server)
                                    if "." not in p.name and p.name not in committed],
                           "the queue file of a message still arriving")
        assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
        if not finish:
            c.close()  # lost connection after DATA: nothing of it stays
            wait_until(lambda gone=files[0]: not gone.exists(),
                       "the dropped message's file gone")
            continue
        c.send(b"hello\r\n.\r\n")
        code, text = c.getreply()
        assert code == 250 and files[0].name in text.decode()
        # ready: committed (0710 until its from= line is written, then 0700)
        assert files[0].stat().st_mode & 0o777 in (0o700, 0o710)
        committed.append(files[0].name)
        path, offset = server.spool.body_path(files[0].name)
        data = path.read_bytes()[offset:]  # (our Received:, Date:, Message-ID: added)
        assert head[:-2] in data and data.endswith(b"\r\n\r\nhello\r\n")
        assert server.held.entered.wait(10)
        server.release()
        c.quit()
    assert [p.name for p in _queue_files(server) if "." not in p.name] == committed


def test_a_large_message_waiting_for_its_early_create_does_not_hold_the_loop(
        server: _Server, trustme_ca: trustme.CA) -> None:
    """Every commit thread busy (fsyncs on a slow disk, say) and the early create of a
    message still queued behind them when its first 128 KiB are in: that session waits
    for its file, the event loop does not (it used to wait in write(), and every other
    session of the process with it). Another session is answered meanwhile; once the
    threads are free the message is stored whole."""
    body = b"".join(b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(SPILL // 78 + 800))
    head = b"From: alice@example.org\r\nSubject: big\r\n\r\n"
    a = _to_bob(server, trustme_ca)
    b = _to_bob(server, trustme_ca)
    gate = threading.Event()
    release = threading.Timer(10, gate.set)  # the old write() held the loop until this
    try:
        _hold_commit_threads(server, gate, 30)
        a.putcmd("data")
        assert a.getreply()[0] == 354
        a.send(head + body)  # past SPILL; no dot yet
        (inc,) = wait_until(lambda: [i for i in server.spool.begun if i.size >= SPILL],
                            "the first 128 KiB of the message taken in")
        release.start()
        assert b.noop()[0] == 250
        assert not gate.is_set(), "a session's reply waited for the commit threads"
        assert not list(server.spool.queue_dir.iterdir())  # the create is still queued
        gate.set()
        a.send(b".\r\n")
        code, text = a.getreply()
        assert code == 250 and inc.queue_id in text.decode()
        path, offset = server.spool.body_path(inc.queue_id)
        data = path.read_bytes()[offset:]
        assert head[:-2] in data and data.endswith(b"\r\n\r\n" + body)
        assert server.held.entered.wait(10)
        server.release()
        a.quit()
        b.quit()
    finally:
        release.cancel()
        gate.set()


def test_a_session_waiting_for_its_early_create_is_under_the_data_timeouts(
        tmp_path: Path, trustme_ca: trustme.CA) -> None:
    """A session waiting for its early create (past 128 KiB, every commit thread held: a
    hung disk) waited for it without limit, its connection and memory held for good. It
    now waits as for the client's next block of data: past data_block_timeout it ends as
    the other DATA timeouts do, 421 4.4.2 and the message's own `stage=timeout` line; the
    file the create makes later is removed."""
    server = _Server(tmp_path, trustme_ca, limits={"data_block_timeout": "1s"})
    server.thread.start()
    body = b"".join(b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(SPILL // 78 + 800))
    gate = threading.Event()
    release = threading.Timer(60, gate.set)  # a hang detector: the old session waited
    try:
        a = _to_bob(server, trustme_ca)
        _hold_commit_threads(server, gate, 90)
        a.putcmd("data")
        assert a.getreply()[0] == 354
        release.start()
        a.send(b"From: alice@example.org\r\nSubject: big\r\n\r\n" + body)  # no dot
        code, text = a.getreply()
        assert (code, text[:5]) == (421, b"4.4.2"), (code, text)
        assert not gate.is_set(), "the session waited for its create past the timeout"
        (inc,) = server.spool.begun
        line = wait_until(lambda: [ln for ln in (tmp_path / "maillog").read_text(
            ).splitlines() if f" {inc.queue_id}: reject=" in ln], "the message's line")
        assert re.search(r": [0-9A-Z]{17}: reject=421 4\.4\.2 Timeout exceeded, closing "
                         r"connection, relay=unknown \[127\.0\.0\.1\], stage=timeout, "
                         r"size=\d+$", line[0]), line
        assert not list(server.spool.queue_dir.iterdir())  # the create still queued
        gate.set()
        wait_until(lambda: inc._early is not None and inc._early.done(), "the create ran")
        wait_until(lambda: not list(server.spool.queue_dir.iterdir()),
                   "the file the late create made removed")
    finally:
        release.cancel()
        gate.set()
        server.thread.stop()


def _port25_server(tmp_path: Path, ca: trustme.CA, spool: Spool) -> tuple[ServerThread, int]:
    """An in-process server of `spool` on an smtp listener (strangers, to the local domain
    example.net), started; and its port."""
    port = free_port()
    cert, key, _ = install_cert(ca, tmp_path / "tls", "relay.test", "127.0.0.1")
    cfg = from_dict({
        "hostname": "relay.test", "state_dir": str(tmp_path),
        "listen": [{"address": f"127.0.0.1:{port}", "mode": "smtp"}],
        "tls": {"cert": str(cert), "key": str(key)},
        "relay": {"local_domains": ["example.net"], "smart_host": ["127.0.0.1:9"]},
        "limits": {"connection_rate_per_ip": 0},
    })
    spool.ensure_dirs()
    log = MailLog(f"file:{tmp_path}/maillog")
    thread = ServerThread(cfg, lambda: wiring.server(cfg, spool, CertStore(cfg),
                                                     maillog=log))
    thread.start()
    return thread, port


def test_a_strangers_message_on_25_gets_its_file_at_the_dot(
        tmp_path: Path, trustme_ca: trustme.CA) -> None:
    """The early create is for clients allowed to relay (an authenticated user, a trusted
    network): a stranger on 25 (here to a local domain) gets no file while its message
    arrives, so DATA alone on many connections cannot make the relay hold a file (and a
    descriptor) per connection; its file is made at the dot, as before."""
    spool = Spool(tmp_path / "spool", fsync=False)
    thread, port = _port25_server(tmp_path, trustme_ca, spool)
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                          timeout=20) as c:
            c.ehlo()
            c.mail("someone@far.test")
            assert c.rcpt("bob@example.net")[0] == 250
            c.putcmd("data")
            assert c.getreply()[0] == 354
            c.send(b"From: someone@far.test\r\nSubject: s\r\n\r\n")
            # An early create takes a commit thread a few ms: sampled for a second,
            # none may appear before the dot.
            seen: list[Path] = []
            for _ in range(50):
                time.sleep(0.02)
                seen += spool.queue_dir.iterdir()
            assert not seen
            c.send(b"hello\r\n.\r\n")
            code, text = c.getreply()
            assert code == 250
            assert [p.name for p in spool.queue_dir.iterdir()] == [
                text.decode().rsplit(" ", 1)[-1]]
    finally:
        thread.stop()


class _HeldCreateSpool(Spool):
    """The spool, each queue file's create (Incoming._open_locked) held until `go` is
    set (at most `limit` seconds, a hang detector): a create waiting behind a journal
    commit. `creating`: the threads the creates ran in."""

    def __init__(self, root: Path, limit: float) -> None:
        super().__init__(root, fsync=False)
        self.go = threading.Event()
        self.limit = limit
        self.creating: list[str] = []

    def begin(self, envelope: Envelope) -> Incoming:
        inc = super().begin(envelope)
        create = inc._open_locked

        def held() -> int:
            self.creating.append(threading.current_thread().name)
            self.go.wait(self.limit)
            return create()

        inc._open_locked = held  # type: ignore[method-assign]
        return inc


def test_a_strangers_large_message_is_not_created_on_the_loop(
        tmp_path: Path, trustme_ca: trustme.CA) -> None:
    """A stranger's message (no early create) past 128 KiB had its queue file made by
    write() on the event loop: a create waiting behind a journal commit held every
    session of the process. Now a commit thread makes it, as the early create of an
    authenticated user's message; that session waits for it (under the DATA timeouts),
    another is answered meanwhile, and the message is stored whole at the dot."""
    spool = _HeldCreateSpool(tmp_path / "spool", limit=30)
    thread, port = _port25_server(tmp_path, trustme_ca, spool)
    body = b"".join(b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(SPILL // 78 + 800))
    head = b"From: someone@far.test\r\nSubject: big\r\n\r\n"
    release = threading.Timer(10, spool.go.set)  # the old write() held the loop until this
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="a.test", timeout=20) as a, \
                smtplib.SMTP("127.0.0.1", port, local_hostname="b.test", timeout=20) as b:
            for c in (a, b):
                c.ehlo()
                c.mail("someone@far.test")
                assert c.rcpt("bob@example.net")[0] == 250
            a.putcmd("data")
            assert a.getreply()[0] == 354
            a.send(head + body)  # past SPILL; no dot yet
            wait_until(lambda: spool.creating, "the create begun")
            release.start()
            assert b.noop()[0] == 250
            assert not spool.go.is_set(), "a session's reply waited for another's create"
            assert spool.creating == ["spool-commit"]
            spool.go.set()
            a.send(b".\r\n")
            code, text = a.getreply()
            assert code == 250
            qid = text.decode().rsplit(" ", 1)[-1]
            path, offset = spool.body_path(qid)
            data = path.read_bytes()[offset:]
            assert head[:-2] in data and data.endswith(b"\r\n\r\n" + body)
    finally:
        release.cancel()
        spool.go.set()
        thread.stop()


HELD = b"From: alice@example.org\r\nSubject: held\r\n\r\nhello\r\n"


def _abandoned_line(server: _Server, qid: str, size: int) -> str:
    """The message's one line: 451 4.3.0, why, its size; no `from=` line for it."""
    server.log.flush()
    lines = [ln for ln in (Path(server.cfg.state_dir) / "maillog").read_text().splitlines()
             if f" {qid}: " in ln]
    assert len(lines) == 1, lines
    assert re.search(r": [0-9A-Z]{17}: reject=451 4\.3\.0 Queue file write timed out, try "
                     r"again later, relay=unknown \[127\.0\.0\.1\], reason=queue file not "
                     r"durable within data_block_timeout, commit abandoned, size=(\d+)$",
                     lines[0]), lines
    # (296af27 logged size=0 there: the engine's count of DATA ends at the dot)
    assert lines[0].endswith(f", size={size}"), (lines[0], size)
    return lines[0]


def _noticed(server: _Server) -> list[str]:
    """The queue ids the spool told the scheduler of (its in-process hook)."""
    told: list[str] = []
    server.spool.on_commit = lambda qid, vouched: told.append(qid)
    return told


def test_a_commit_queued_behind_a_hung_disk_is_given_up_with_451(
        tmp_path: Path, trustme_ca: trustme.CA) -> None:
    """After the final dot the session waited for its commit without a bound: every commit
    thread held (a hung disk), it held the connection and its pool slot for good. It now
    waits data_block_timeout: the commit is abandoned (the file was never made ready),
    the client gets 451 4.3.0 and the message its line; the commit, once a thread runs
    it, removes the file: nothing delivered, nothing noticed, no `from=` line. The
    session goes on: its next message, the threads free again, gets its 250."""
    server = _Server(tmp_path, trustme_ca, limits={"data_block_timeout": "1s"})
    told = _noticed(server)
    server.thread.start()
    gate = threading.Event()
    release = threading.Timer(60, gate.set)  # a hang detector: the old session waited
    try:
        c = _to_bob(server, trustme_ca)
        _hold_commit_threads(server, gate, 90)
        release.start()
        code, text = c.data(HELD)
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        assert not gate.is_set(), "the session waited for its commit past the timeout"
        (inc,) = server.spool.begun
        assert inc.abandoned
        _abandoned_line(server, inc.queue_id, len(HELD))
        gate.set()
        wait_until(lambda: inc._early is not None and inc._early.done(), "the create ran")
        wait_until(lambda: not list(server.spool.queue_dir.iterdir()),
                   "the abandoned commit's file removed")
        c.mail("alice@example.org")
        assert c.rcpt("bob@remote.test")[0] == 250
        code, text = c.data(b"From: alice@example.org\r\nSubject: again\r\n\r\nhello\r\n")
        assert code == 250 and b"queued as" in text
        assert server.held.entered.wait(10)
        server.release()
        second = text.decode().rsplit(" ", 1)[-1]
        wait_until(lambda: told == [second], "the second message noticed, alone")
        assert [p.name for p in _queue_files(server)] == [second]
        c.quit()
    finally:
        release.cancel()
        gate.set()
        server.thread.stop()


def test_a_commit_held_after_its_ready_mark_is_given_up_and_never_delivered(
        tmp_path: Path, trustme_ca: trustme.CA) -> None:
    """The commit thread past the ready mark and the file's fsync, held in queue/'s
    fsync (a hung disk): the session gives up after data_block_timeout (451 4.3.0);
    meanwhile the file, ready but still held by its writer, is refused to the scheduler
    (load_for_delivery: not durable yet, and given up), and when the thread returns it
    removes the file rather than handing it over: no 250, no delivery, no notice. The
    scheduler is told the commit was given up (Notifier.abandoned, `ID abandoned` from
    a worker): were this process killed in that fsync, the ready file it left would be
    dropped, not delivered (it was, a duplicate of the client's retry). The id is kept
    in the process's slot of the /dev/shm book (a kill of the whole server: the start
    drops the file) until the commit thread has returned, then freed (a slot kept every
    id until written over: in a long hang the oldest, the one held, went first)."""
    server = _Server(tmp_path, trustme_ca, limits={"data_block_timeout": "1s"})
    spool = server.spool
    spool.fsync = True
    spool.journal_orders_create = False  # queue/ fsynced after the file: held there
    held = spool.queue_dir_sync = HeldDirSync(spool.queue_dir)
    told = _noticed(server)
    gave_up: list[str] = []
    spool.notifier.on_abandoned = gave_up.append
    book = spool.notifier.book = AbandonedBook(None, 1).slot(0)
    release = threading.Timer(60, held.go.set)  # a hang detector: the old session waited
    server.thread.start()
    try:
        c = _to_bob(server, trustme_ca)
        release.start()
        code, text = c.data(HELD)
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        assert held.entered.is_set() and not held.go.is_set()
        (inc,) = spool.begun
        (path,) = _queue_files(server)
        assert path.name == inc.queue_id and path.stat().st_mode & 0o100  # marked ready
        with pytest.raises(FileNotFoundError, match="still being committed"):
            spool.load_for_delivery(inc.queue_id)
        _abandoned_line(server, inc.queue_id, len(HELD))
        assert gave_up == [inc.queue_id]  # told while the thread still holds the file
        assert book.ids() == [inc.queue_id]
        held.go.set()
        wait_until(lambda: not path.exists(), "the abandoned commit's file removed")
        wait_until(lambda: book.ids() == [], "its entry in the book freed")
        assert c.noop()[0] == 250
        c.quit()
        assert told == [] and spool.scan() == []
    finally:
        release.cancel()
        held.go.set()
        server.thread.stop()


def _inodes_used_up(where: Path, name: str = "fill") -> list[Path]:
    """Files made in `where` until its filesystem has no inode left (ENOSPC)."""
    made: list[Path] = []
    while True:
        p = where / f"{name}{len(made)}"
        try:
            p.touch(exist_ok=False)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return made
        made.append(p)


@pytest.mark.root
def test_a_failed_early_create_is_made_again_off_the_loop(
        tmp_path: Path, trustme_ca: trustme.CA) -> None:
    """An early create that failed (here the spool's filesystem out of inodes: ENOSPC)
    left the file to be made past 128 KiB by write(), on the event loop (a create can
    wait behind a journal commit: every session of the process with it). A commit
    thread makes it now: with every one held, the message's bytes wait in memory and no
    file is made, the loop answers another session; released, the message is stored
    whole. Made again only once: out of inodes for good, the message gets 452 4.3.1."""
    with mounted(tmp_path / "fs", "64m", inodes=64) as fs:
        server = _Server(tmp_path, trustme_ca, limits={"queue_min_free": 0})
        spool = server.spool = _Spool(fs / "spool")
        spool.ensure_dirs()
        fill = _inodes_used_up(fs)
        server.thread.start()
        body = b"".join(b"%06d " % i + b"x" * 70 + b"\r\n" for i in range(SPILL // 78 + 800))
        head = b"From: alice@example.org\r\nSubject: big\r\n\r\n"
        gate = threading.Event()
        release = threading.Timer(30, gate.set)  # a hang detector
        try:
            a = _to_bob(server, trustme_ca)
            b = _to_bob(server, trustme_ca)
            a.putcmd("data")
            assert a.getreply()[0] == 354
            (inc,) = spool.begun
            wait_until(lambda: inc._early is not None and inc._early.done(),
                       "the early create ran (and failed)")
            assert inc._early_fd is None and not list(spool.queue_dir.iterdir())
            _hold_commit_threads(server, gate, 60)
            fill.pop().unlink()  # an inode free again
            release.start()
            a.send(head + body)  # past SPILL; no dot yet
            wait_until(lambda: inc.size >= SPILL, "the first 128 KiB taken in")
            assert b.noop()[0] == 250
            assert not gate.is_set(), "the loop waited for the commit threads"
            assert not list(spool.queue_dir.iterdir()), "the file made on the loop"
            gate.set()
            a.send(b".\r\n")
            code, text = a.getreply()
            assert code == 250 and inc.queue_id in text.decode(), (code, text)
            path, offset = spool.body_path(inc.queue_id)
            assert path.read_bytes()[offset:].endswith(b"\r\n\r\n" + body)
            assert server.held.entered.wait(10)
            server.release()
            # Out of inodes for good: the create made again fails too, and says so.
            _inodes_used_up(fs, "more")
            a.mail("alice@example.org")
            assert a.rcpt("bob@remote.test")[0] == 250
            code, text = a.data(head + body)
            assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
            a.quit()
            b.quit()
        finally:
            release.cancel()
            gate.set()
            server.thread.stop()


@contextlib.contextmanager
def _in_data_behind_busy_commit_threads(
        tmp: Path, ca: trustme.CA, limits: dict[str, Any] | None = None
) -> Iterator[tuple[_Server, smtplib.SMTP, threading.Event, threading.Timer]]:
    """A session of alice's past DATA's 354, its message begun, its early create queued
    behind every commit thread, held until `gate` is set (by `release`, 0.5 s after its
    start): (server, client, gate, release). Everything let go of and stopped at the end."""
    server = _Server(tmp, ca, limits=limits)
    server.thread.start()
    gate = threading.Event()
    release = threading.Timer(0.5, gate.set)  # the commit threads busy until then
    try:
        c = _to_bob(server, ca)
        _hold_commit_threads(server, gate, 30)
        c.putcmd("data")
        assert c.getreply()[0] == 354
        wait_until(lambda: server.spool.begun, "the message begun (its early create queued)")
        yield server, c, gate, release
    finally:
        release.cancel()
        gate.set()
        server.thread.stop()


def _answered_after_the_create(server: _Server, c: smtplib.SMTP, gate: threading.Event
                               ) -> tuple[int, bytes]:
    """The client's next reply, asserted sent once the early create had run and no file
    of the message is left (then, and once the commit threads are free)."""
    code, text = c.getreply()
    after_create = gate.is_set()
    files = _queue_files(server)
    assert after_create, f"{code} before the early create had run"
    assert files == []
    gate.wait(30)
    assert _queue_files(server) == []
    return code, text


@pytest.mark.parametrize("refused", ["bare LF", "long line", "too big"])
def test_a_refusal_by_the_engine_goes_once_its_early_file_cannot_exist(
        tmp_path: Path, trustme_ca: trustme.CA, refused: str) -> None:
    """The refusals the SMTP engine makes itself (521 bare LF, 550 5.6.0 a line past 998
    octets, 552 5.3.4 too big) were answered at once, while the early create of the
    message (queued behind busy commit threads) had still to run: it made the file and
    removed it after the client had its refusal (as 78dce45 fixed for the refusals at
    the dot). The reply now goes once that create is done, and no file is left."""
    with _in_data_behind_busy_commit_threads(
            tmp_path, trustme_ca, {"max_message_size": 2000}) as (server, c, gate, release):
        body = {"bare LF": b"a bare\nLF\r\n", "long line": b"x" * 1000 + b"\r\n",
                "too big": (b"y" * 70 + b"\r\n") * 40}[refused]
        release.start()
        c.send(b"From: alice@example.org\r\n\r\n" + body + b".\r\n")
        code, _ = _answered_after_the_create(server, c, gate)
        assert code == {"bare LF": 521, "long line": 550, "too big": 552}[refused]


@pytest.mark.parametrize("ended_by", ["session limit", "shutdown"])
def test_a_session_ended_in_data_says_421_once_its_early_file_cannot_exist(
        tmp_path: Path, trustme_ca: trustme.CA, ended_by: str) -> None:
    """A session ended in DATA by the session time limit (Session.expire) or a shutdown
    (the cancel of its task, server.stop) wrote its 421 at once and dropped the message
    afterwards, while its early create (queued behind busy commit threads) had still to
    run: the file was made and removed after the client had its 421 (as 4affc62 fixed for
    the engine's refusals). The 421 now goes once that create is done, no file left."""
    with _in_data_behind_busy_commit_threads(tmp_path, trustme_ca) as (
            server, c, gate, release):
        c.send(b"From: alice@example.org\r\n\r\nhalf a message\r\n")
        srv = server.thread.server
        assert srv is not None

        def end() -> None:
            for s in srv.sessions:
                if ended_by == "session limit":
                    s.expire()
                elif s.conn.task is not None:
                    s.conn.task.cancel()

        release.start()
        server.thread.call_soon(end)
        code, text = _answered_after_the_create(server, c, gate)
        assert (code, text.split(b" ", 1)[0]) == (
            421, b"4.4.2" if ended_by == "session limit" else b"4.3.2")


def _unread_by_server(server: _Server, client: smtplib.SMTP) -> int:
    """Bytes the kernel holds between `client` and the server, unread by the server: the
    server end's receive queue and the client end's send queue (/proc/net/tcp rx_queue,
    tx_queue). Both count: a receiver that stopped reading has the kernel stop growing its
    receive buffer (autotuning follows the reads), so the rest waits in the sender's."""
    cport = client.sock.getsockname()[1]
    rx = tx = None
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = row.split()
        local, remote = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
        if (local, remote) == (server.port, cport):
            rx = int(f[4].split(":")[1], 16)
        elif (local, remote) == (cport, server.port):
            tx = int(f[4].split(":")[0], 16)
    assert rx is not None and tx is not None, "no such connection"
    return rx + tx


def test_a_large_message_stops_being_read_while_its_writes_wait(
        server: _Server, trustme_ca: trustme.CA) -> None:
    """Past 128 KiB a message streams into its file; a commit thread writes it (the event
    loop wrote it itself, held in the kernel by a frozen disk with every session of the
    process). With the commit threads held (a hung disk), the session keeps at most about
    SPILL unwritten and stops reading (back-pressure: the client's bytes wait in the
    kernel, not in the server's memory) while another session is answered; once the
    threads are free the message is received and stored whole."""
    line = b"x" * 76 + b"\r\n"
    head = b"From: alice@example.org\r\nSubject: big\r\n\r\n"
    first = line * (2 * SPILL // len(line))
    more = line * ((8 << 20) // len(line))  # 8 MiB while the writes wait
    a = _to_bob(server, trustme_ca)
    b = _to_bob(server, trustme_ca)
    gate = threading.Event()
    sender = threading.Thread(target=a.send, args=(more + b".\r\n",), daemon=True)
    try:
        a.putcmd("data")
        assert a.getreply()[0] == 354
        a.send(head + first)
        (inc,) = wait_until(lambda: [i for i in server.spool.begun
                                     if i.size >= len(head + first) - 2], "all taken in")
        wait_until(lambda: inc._fd is not None and inc._write_job is None, "streaming")
        _hold_commit_threads(server, gate, 60)
        sender.start()
        wait_until(lambda: _unread_by_server(server, a) > (1 << 20),
                   "the server stopped reading")
        assert len(inc._unwritten) < 2 * SPILL, len(inc._unwritten)
        assert inc.size < len(head + first) + 2 * SPILL + HIGH_WATER, inc.size
        assert b.noop()[0] == 250
        gate.set()
        sender.join(30)
        code, text = a.getreply()
        assert code == 250 and inc.queue_id in text.decode(), (code, text)
        path, offset = server.spool.body_path(inc.queue_id)
        data = path.read_bytes()[offset:]
        assert data.endswith(b"\r\n\r\n" + first + more)
        assert server.held.entered.wait(10)
        server.release()
        a.quit()
        b.quit()
    finally:
        gate.set()
