"""A cancelled commit (the daemon's stop cancels sessions still running after its drain
time) never abandons the commit thread: the thread may be signing or writing through the
queue file's descriptor, which the cleanup used to close under it, and the next file the
process opened took that number. Now the commit is waited for; a message it made durable
is kept, announced and logged, and the cancellation is raised after it. Also: timeouts,
repeated cancels, failures while cancelled, and a commit coroutine closed (not
cancelled) while its thread still holds the queue file's descriptor."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from support.maillog import ListLog
from support.spools import held_commit, temp_spool
from support.wait import wait_until

from authrelay.config import from_dict
from authrelay.spool import format as fmt
from authrelay.spool import writer as writer_mod
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool
from authrelay.spool.submit import Draft, Refused, Submitter
from authrelay.spool.writer import READY_MODE, Incoming

SMALL = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody line\r\n"
BIG = SMALL + b"".join(b"line %07d of a big message\r\n" % i
                       for i in range(writer_mod.SPILL // 20))
SIG = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; b=abc\r\n"


@pytest.fixture
def spool() -> Iterator[Spool]:
    with temp_spool(fsync=False) as s:
        yield s


def _env() -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender="a@example.org",
                    recipients=[Recipient(address="b@example.net")])


class HeldSigner:
    """A MessageSigner that holds the commit thread until released."""

    def __init__(self, result: bytes | BaseException = SIG) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.result = result
        self.thread: int | None = None  # the commit thread it holds (threading.get_ident)

    def sign_stream(self, chunks: Iterable[bytes]) -> bytes | None:
        for _ in chunks:  # a streamed message is read back through the descriptor
            pass
        self.thread = threading.get_ident()
        self.entered.set()
        assert self.release.wait(10)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    def skip(self, reason: str) -> None:
        pass


async def _held_commit(inc: Incoming, signer: HeldSigner) -> asyncio.Task[None]:
    inc.signer = signer
    task = asyncio.get_running_loop().create_task(inc.commit())
    assert await asyncio.to_thread(signer.entered.wait, 10)
    return task


async def _cancel_then_open_victim(task: asyncio.Task[None], path: Path) -> int:
    """Cancel the commit while its thread is held, let the loop run the cancellation,
    then open a file the way a concurrent session would (the lowest free descriptor)."""
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"V" * 300)
    return fd


@pytest.mark.parametrize("data", [SMALL, BIG], ids=["in-memory", "streamed"])
async def test_cancelled_commit_is_finished_kept_and_announced(spool: Spool, data: bytes,
                                                               tmp_path: Path) -> None:
    announced: list[str] = []
    inc = Incoming(spool.queue_dir, _env(), fsync=False, dir_sync=None,
                   notify=lambda qid, vouched: announced.append(qid))
    inc.write(data)
    signer = HeldSigner()
    task = await _held_commit(inc, signer)
    victim = _cancel_then_open_victim(task, tmp_path / "victim")
    vfd = await victim
    assert not task.done()  # waits for the thread, whatever its caller wants
    signer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        os.lseek(vfd, 0, os.SEEK_SET)
        assert os.read(vfd, 1000) == b"V" * 300  # nothing written through a reused fd
        assert os.fstat(vfd).st_mode & 0o777 == 0o600
    finally:
        os.close(vfd)
    assert inc.committed and announced == [inc.queue_id]
    path = spool.queue_dir / inc.queue_id
    assert os.stat(path).st_mode & 0o777 == READY_MODE
    spool.verify(inc.queue_id)
    body, off = spool.body_path(inc.queue_id)
    assert body.read_bytes()[off:] == SIG + data


async def test_cancelled_commit_that_fails_leaves_nothing(spool: Spool) -> None:
    announced: list[str] = []
    inc = Incoming(spool.queue_dir, _env(), fsync=False, dir_sync=None,
                   notify=lambda qid, vouched: announced.append(qid))
    inc.write(BIG)
    real = os.fchmod

    def no_space(fd: int, mode: int) -> None:
        raise OSError(28, "No space left on device")

    signer = HeldSigner()
    task = await _held_commit(inc, signer)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    os.fchmod = no_space  # the ready mark, after the signer, fails
    try:
        signer.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        os.fchmod = real
    assert not inc.committed and announced == []
    assert list(spool.queue_dir.iterdir()) == []


def held_draft(spool: Spool, tmp_path: Path) -> tuple[Draft, HeldSigner, ListLog]:
    """A draft of SMALL whose commit thread the returned signer holds until released."""
    log = ListLog()
    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path)})
    signer = HeldSigner()

    class Bind:
        def bind(self, queue_id: str, owner: object = None, *,
                 crlf_only: bool = False, from_domain: str = "") -> HeldSigner:
            return signer

        def reload(self, cfg: object) -> None:
            pass

    sub = Submitter(spool, cfg, signer=Bind(), maillog=log)
    draft = sub.begin(_env(), sign=True)
    draft.write(SMALL)
    return draft, signer, log


async def test_cancelled_draft_that_committed_is_logged(spool: Spool,
                                                        tmp_path: Path) -> None:
    draft, signer, log = held_draft(spool, tmp_path)
    sent: list[str] = []  # the session's 250: never for a cancelled commit
    task = asyncio.get_running_loop().create_task(draft.commit(lambda: sent.append("250")))
    assert await asyncio.to_thread(signer.entered.wait, 10)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    signer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent == []
    qid = draft.queue_id
    assert log.grep(f"{qid}: from=<a@example.org>")  # kept, so logged like any other
    spool.verify(qid)


# ---------------------------------------------------------------- around it (review)

def _incoming(spool: Spool, data: bytes, announced: list[str]) -> Incoming:
    env = Envelope(queue_id=new_queue_id(), sender="a@example.org",
                   recipients=[Recipient(address="b@example.net")])
    inc = Incoming(spool.queue_dir, env, fsync=False, dir_sync=None,
                   notify=lambda qid, vouched: announced.append(qid))
    inc.write(data)
    return inc


async def _spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _cancelled_while_held(inc: Incoming, signer: HeldSigner) -> None:
    """Commit, cancel while the signer holds the commit thread, release it: the commit
    ends in CancelledError once the thread is done."""
    task = await _held_commit(inc, signer)
    task.cancel()
    await _spin()
    signer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("data", [SMALL, BIG], ids=["in-memory", "streamed"])
async def test_timeout_around_a_commit_is_still_timeout_error(spool: Spool,
                                                              data: bytes) -> None:
    announced: list[str] = []
    inc = _incoming(spool, data, announced)
    signer = HeldSigner()
    inc.signer = signer
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, signer.release.set)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await inc.commit()
    assert inc.committed and announced == [inc.queue_id]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    spool.verify(inc.queue_id)


async def test_repeated_cancels_wait_for_the_thread_once(spool: Spool) -> None:
    announced: list[str] = []
    inc = _incoming(spool, BIG, announced)
    signer = HeldSigner()
    inc.signer = signer
    task = asyncio.get_running_loop().create_task(inc.commit())
    assert await asyncio.to_thread(signer.entered.wait, 10)
    for _ in range(4):
        task.cancel()
        await _spin()
        assert not task.done()
    signer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert announced == [inc.queue_id]
    spool.verify(inc.queue_id)


async def test_cancelled_commit_with_a_failing_signer_is_kept_unsigned(spool: Spool) -> None:
    announced: list[str] = []
    inc = _incoming(spool, BIG, announced)
    signer = HeldSigner(RuntimeError("boom"))
    await _cancelled_while_held(inc, signer)
    assert inc.committed and "boom" in inc.sign_error
    spool.verify(inc.queue_id)


async def test_cancelled_commit_failing_the_slot_check_is_removed(spool: Spool) -> None:
    announced: list[str] = []
    inc = _incoming(spool, BIG, announced)
    inc.prepend = b"X-Long: " + b"x" * fmt.PREPEND_SLOT + b"\r\n"
    signer = HeldSigner(b"")
    await _cancelled_while_held(inc, signer)
    assert not inc.committed and announced == []
    assert list(spool.queue_dir.iterdir()) == []


async def test_not_cancelled_failure_is_raised_as_is(spool: Spool) -> None:
    inc = _incoming(spool, BIG, [])
    inc.prepend = b"X-Long: " + b"x" * fmt.PREPEND_SLOT + b"\r\n"
    with pytest.raises(fmt.SpoolError, match="reserved slot"):
        await inc.commit()
    assert list(spool.queue_dir.iterdir()) == []


async def test_closing_the_commit_coroutine_while_its_thread_runs(spool: Spool,
                                                                 tmp_path: Path) -> None:
    """A commit coroutine closed rather than cancelled (GeneratorExit: the task was
    dropped with its loop, e.g. tests/support/inproc.py closing its loop after stop())
    must end (not swallow GeneratorExit and await again: "coroutine ignored
    GeneratorExit"), and whatever cleans up after it (Draft.abort from a session's
    finally, the scheduler's `except BaseException: draft.abort()`) must not close the
    descriptor the commit thread is still writing through."""
    inc = _incoming(spool, BIG, [])
    signer = HeldSigner()
    inc.signer = signer
    coro = inc.commit()
    coro.send(None)  # up to the first wait: the job is in the commit thread
    assert await asyncio.to_thread(signer.entered.wait, 10)
    try:
        coro.close()  # 5849def: RuntimeError: coroutine ignored GeneratorExit
        inc.abort()  # what the caller's cleanup does next
        victim = os.open(tmp_path / "victim", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(victim, b"V" * 300)
    finally:
        signer.release.set()
    # The thread finishes on its own; nothing of it lands in the victim file.
    for _ in range(200):
        if (spool.queue_dir / inc.queue_id).exists() and \
                os.stat(spool.queue_dir / inc.queue_id).st_mode & 0o100:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    try:
        os.lseek(victim, 0, os.SEEK_SET)
        assert os.read(victim, 1000) == b"V" * 300
        assert os.fstat(victim).st_mode & 0o777 == 0o600
    finally:
        os.close(victim)
    gc.collect()


async def test_commit_that_cannot_start_its_thread_leaves_nothing(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit thread cannot be started (RuntimeError: can't start new thread, e.g. a
    container's pids limit): the streamed file is removed, as before 5849def (which moved
    commit_pool().run() out of the try that removes the file)."""
    inc = _incoming(spool, BIG, [])
    assert list(spool.queue_dir.iterdir())  # streamed: the file exists already

    class NoThreads:
        def run(self, fn: object, then: object = None) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(writer_mod, "commit_pool", NoThreads)
    with pytest.raises(RuntimeError):
        await inc.commit()
    inc.abort()  # what the caller's cleanup does
    assert list(spool.queue_dir.iterdir()) == []


async def test_pool_without_a_new_thread_queues_to_the_running_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed thread start (a pids limit) is not counted as a thread: with none, the
    job fails at once; with some, they take it when free. Before, every failed start
    counted, and once `size` had failed no job ever started again."""
    pool = writer_mod.CommitPool(size=3)
    real_start = threading.Thread.start

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    for _ in range(4):
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.run(lambda: 1)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    gate = threading.Event()
    first = pool.run(lambda: gate.wait(10))  # the pool's one thread, held
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    rest = [pool.run(lambda i=i: i) for i in range(5)]  # no new thread: queued to it
    gate.set()
    assert await first is True
    assert [await f for f in rest] == [0, 1, 2, 3, 4]
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert await pool.run(lambda: "again") == "again"


def _queued_line_seen_at_notify(spool: Spool) -> tuple[ListLog, list[list[str]], Submitter]:
    log = ListLog()
    seen: list[list[str]] = []
    spool.on_commit = lambda qid, vouched: seen.append(
        [ln for ln in log.lines if f"{qid}: from=" in ln])
    cfg = from_dict({"hostname": "relay.test", "state_dir": "/nonexistent"})  # unused
    return log, seen, Submitter(spool, cfg, maillog=log)


async def test_the_scheduler_is_told_only_after_the_from_line(spool: Spool) -> None:
    # The local submission commits in a pool thread: the notify reached the scheduler
    # before that thread wrote the `from=` line, and a fast delivery logged its
    # `relay=... stat=` lines first (seen in a real serve's maillog): a reader that tracks
    # queue ids met a delivery of a message never queued. Now the `from=` line is
    # written before the scheduler hears of the message, on both commit paths.
    log, seen, sub = _queued_line_seen_at_notify(spool)
    for blocking in (True, False):
        env = Envelope(queue_id=new_queue_id(), sender="a@example.org",
                       recipients=[Recipient("b@example.net")], listener="sendmail",
                       protocol="local")
        d = sub.begin(env, lines_checked=True)
        d.write(SMALL)
        if blocking:
            await asyncio.to_thread(d.commit_blocking, uid=0, user="root")
        else:
            await d.commit()
        assert len(seen[-1]) == 1, (blocking, log.lines)
    assert len(seen) == 2


def test_an_abort_does_not_wait_for_an_early_create_still_queued(spool: Spool) -> None:
    """abort() runs on the event loop: with every commit thread busy (fsyncs on a slow
    disk, say) and the early create still queued behind them, it returns at once
    instead of holding the loop; the create's thread removes the file it makes."""
    gate = threading.Event()
    release = threading.Timer(5, gate.set)  # the old abort waited for this

    async def main() -> bool:
        pool = writer_mod.commit_pool()
        blockers = [pool.run(lambda: gate.wait(30)) for _ in range(pool.size)]
        inc = spool.begin(_env())
        inc.create_early()
        release.start()
        inc.abort()
        returned_first = not gate.is_set()
        gate.set()
        await asyncio.gather(*blockers)
        return returned_first

    try:
        assert asyncio.run(main()), "abort() waited for the commit threads"
    finally:
        release.cancel()
        gate.set()
    wait_until(lambda: not list(spool.queue_dir.iterdir()),
               "the aborted message's early file removed by its thread")


def test_an_abort_while_commit_waits_for_the_early_create_stores_nothing(
        spool: Spool) -> None:
    """commit() waits (off the thread) for an early create still queued; an abort() in
    that wait drops the message: the commit must not go on and store it anyway."""
    gate = threading.Event()

    async def main() -> BaseException | None:
        pool = writer_mod.commit_pool()
        blockers = [pool.run(lambda: gate.wait(30)) for _ in range(pool.size)]
        inc = spool.begin(_env())
        inc.create_early()
        inc.write(SMALL)
        task = asyncio.get_running_loop().create_task(inc.commit())
        for _ in range(5):
            await asyncio.sleep(0)  # the commit is in its wait for the create
        inc.abort()
        gate.set()
        await asyncio.gather(*blockers)
        try:
            await task
        except BaseException as e:  # the outcome is the assertion
            return e
        return None

    try:
        outcome = asyncio.run(main())
    finally:
        gate.set()
    assert isinstance(outcome, fmt.SpoolError), outcome
    wait_until(lambda: not list(spool.queue_dir.iterdir()),
               "nothing stored for the aborted message")


def test_a_message_that_ends_while_its_early_create_is_queued_is_stored_whole(
        spool: Spool) -> None:
    """Past SPILL with the early create still queued, write() keeps the bytes (the caller
    is handed the create to await, spill_wait); a commit in that state waits for the
    create and writes the whole message from memory; a write after the create takes the
    file and streams as before."""
    gate = threading.Event()

    async def main(more: bool) -> tuple[str, bool]:
        pool = writer_mod.commit_pool()
        blockers = [pool.run(lambda: gate.wait(30)) for _ in range(pool.size)]
        inc = spool.begin(_env())
        inc.create_early()
        inc.write(BIG)
        wait = inc.spill_wait()
        assert wait is not None and not (spool.queue_dir / inc.queue_id).exists()
        gate.set()
        await asyncio.wait((wait,))
        assert inc.spill_wait() is None
        if more:
            inc.write(b"one more line\r\n")  # takes the file made meanwhile
        await inc.commit()
        await asyncio.gather(*blockers)
        gate.clear()
        return inc.queue_id, more

    for more in (False, True):
        qid, _ = asyncio.run(main(more))
        path, offset = spool.body_path(qid)
        assert path.read_bytes()[offset:] == BIG + (b"one more line\r\n" if more else b"")
        spool.verify(qid)  # lengths and checksum


def test_a_forked_child_runs_commits_in_a_pool_of_its_own() -> None:
    """commit_pool() answers without a lock or getpid once the pool exists; a forked
    worker must still get a pool of its own: the parent's threads do not exist in the
    child, and the parent's pool, with an idle thread counted, would queue the child's
    commit to nobody (its 250 never sent)."""
    async def run_one() -> int:
        return int(await writer_mod.commit_pool().run(lambda: 42))

    assert asyncio.run(run_one()) == 42  # the parent's pool, its thread now idle
    parent = writer_mod.commit_pool()
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its commit ran in a pool of its own
        code = 1
        try:
            child = writer_mod.commit_pool()
            if child is not parent:
                code = 0 if asyncio.run(asyncio.wait_for(run_one(), 10)) == 42 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert writer_mod.commit_pool() is parent


@pytest.mark.parametrize("data", [SMALL, BIG], ids=["in-memory", "streamed"])
async def test_a_commit_abandoned_before_its_ready_mark_removes_its_file(
        spool: Spool, data: bytes) -> None:
    """Incoming.abandon (a session that gave up waiting, its client told 451) while the
    commit thread is still at work before the ready mark (here: signing): the thread
    marks nothing ready, removes the file, and commit() raises Abandoned; no notice."""
    announced: list[str] = []
    inc = _incoming(spool, data, announced)
    signer = HeldSigner()
    task = await _held_commit(inc, signer)
    assert inc.abandon()
    signer.release.set()
    with pytest.raises(writer_mod.Abandoned):
        await task
    assert not inc.committed and announced == []
    assert list(spool.queue_dir.iterdir()) == []


async def test_a_commit_durable_first_is_not_abandoned(spool: Spool) -> None:
    """The other order: the file durable before the caller gives up; abandon() says so
    (False: the caller gives its 250) and the file stays, ready and announced."""
    announced: list[str] = []
    inc = _incoming(spool, SMALL, announced)
    await inc.commit()
    assert not inc.abandon() and not inc.abandoned
    assert inc.committed and announced == [inc.queue_id]
    assert spool.scan() == [inc.queue_id]


async def test_a_child_forked_while_a_queue_file_is_open_does_not_hold_its_lock(
        spool: Spool) -> None:
    """The master forks a new receiving worker while one of its own commits (a bounce, a
    local submission past SPILL) has its queue file open and locked: the child's copy of
    the descriptor shared the flock, which outlived the parent's commit as long as the
    child lived, and load_for_delivery (which loads no file its writer holds, 296af27)
    refused the committed message for good. The child closes its copies at fork."""
    inc = Incoming(spool.queue_dir, _env(), fsync=False, dir_sync=None,
                   notify=lambda qid, vouched: None)
    inc.write(BIG)  # past SPILL: the file is made and locked now
    assert list(spool.queue_dir.iterdir())
    r, w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: lives until the parent is done
        os.close(w)
        os.write(up_w, b"+")  # its fork handlers have run
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(up_w)
    try:
        assert os.read(up_r, 1) == b"+"
        await inc.commit()
        env, _, _ = spool.load_for_delivery(inc.queue_id)
        assert env.queue_id == inc.queue_id
    finally:
        os.close(w)
        os.close(up_r)
        os.waitpid(pid, 0)


async def test_containment_never_holds_a_file_still_in_its_commit(spool: Spool) -> None:
    """A user suspended while one of its commits is past the ready mark, in its fsync:
    the hold (scheduler/control, `hold` of the user's mail) took the ready file into
    hold/, so when the session then gave up (451) the commit thread's unlink of queue/ID
    missed it, and `user resume --release` delivered a message its client was told 451
    (296af27). A file its writer still holds is not moved: it is the scheduler's to hold
    before sending once committed; an abandoned one is removed."""
    from authrelay.scheduler import control

    env = _env()
    env.auth_user = "alice"
    inc, held = held_commit(spool.queue_dir, env, SMALL, limit=10)
    task = asyncio.ensure_future(inc.commit())
    try:
        assert await asyncio.to_thread(held.entered.wait, 10)
        assert spool.scan() == [inc.queue_id]  # ready, as a scan sees it
        assert inc.abandon()
        resp = control.run_offline(spool, {"op": "hold", "user": "alice"})
        assert resp["done"] == [], resp
    finally:
        held.go.set()
    with pytest.raises(writer_mod.Abandoned):
        await task
    assert spool.scan() == [] and spool.held() == []


def test_a_refusal_at_the_dot_returns_once_its_early_file_cannot_exist(
        spool: Spool) -> None:
    """A message refused at its end of data (here: too many Received: fields) before the
    commit thread had made its early file (Incoming.create_early, queued behind busy
    commit threads) was answered at once, and the thread made the file and removed it
    just after the reply (seen: test_hop_limit asserting queue/ empty, 1 of 3,281).
    commit() now raises the refusal only once that thread is done: no file then, none
    later."""
    gate = threading.Event()
    release = threading.Timer(0.5, gate.set)  # the commit threads busy until then
    cfg = from_dict({"hostname": "relay.test", "state_dir": "/nonexistent",
                     "limits": {"max_hops": 2}})
    sub = Submitter(spool, cfg, maillog=ListLog())

    async def main() -> tuple[bool, list[str]]:
        pool = writer_mod.commit_pool()
        blockers = [pool.run(lambda: gate.wait(30)) for _ in range(pool.size)]
        d = sub.begin(_env())
        d.create_early()
        d.write(b"Received: from a\r\n" * 3 + SMALL)
        release.start()
        with pytest.raises(Refused):
            await d.commit()
        after_create, files = gate.is_set(), sorted(os.listdir(spool.queue_dir))
        await asyncio.gather(*blockers)
        return after_create, files

    try:
        after_create, files = asyncio.run(main())
    finally:
        release.cancel()
        gate.set()
    assert after_create, "refused before the early create had run"
    assert files == []
    assert os.listdir(spool.queue_dir) == []
