"""Spool store: write/commit/load, recovery, corrupt and future-version files, kill safety."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.spools import temp_spool
from support.wait import until

from authrelay.spool import format as fmt
from authrelay.spool import writer as writer_mod
from authrelay.spool.envelope import FAILED, SENT, Envelope, Recipient, new_queue_id
from authrelay.spool.store import UNFINISHED_AGE, CorruptError, Spool, UnsupportedVersion

MSG = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody line\r\n.dot\r\n"


@pytest.fixture
def spool() -> Iterator[Spool]:
    with temp_spool() as s:
        yield s


def _env(*rcpts: str, sender: str = "a@example.org") -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender=sender,
                    recipients=[Recipient(address=r) for r in rcpts or ("b@example.net",)])


async def _put(spool: Spool, env: Envelope, data: bytes = MSG) -> str:
    inc = spool.begin(env)
    for i in range(0, len(data), 7):  # several writes, as the body reader streams
        inc.write(data[i:i + 7])
    await inc.commit()
    return inc.queue_id


async def test_commit_and_load_roundtrip(spool: Spool) -> None:
    env = _env("b@example.net", "c@example.com")
    seen: list[str] = []
    spool.on_commit = lambda qid, vouched: seen.append(qid)
    inc = spool.begin(env)
    # Being received: invisible to readers.
    assert spool.scan() == [] and not spool.exists(inc.queue_id)
    inc.write(MSG)
    assert inc.size == len(MSG)
    await inc.commit()
    qid = inc.queue_id
    assert seen == [qid]
    assert (spool.queue_dir / qid).stat().st_mode & 0o777 == 0o700
    assert spool.scan() == [qid]
    loaded = spool.load(qid)
    assert loaded.sender == "a@example.org"
    assert [r.address for r in loaded.recipients] == ["b@example.net", "c@example.com"]
    assert loaded.size == len(MSG)
    path, off = spool.body_path(qid)
    assert path.read_bytes()[off:] == MSG
    first = path.read_bytes().split(b"\n", 1)[0].split()
    assert first[:2] == [b"AUTHRELAY-SPOOL", b"2"]
    assert spool.read_headers(qid) == MSG[: MSG.index(b"\r\n\r\n") + 4]


@pytest.mark.parametrize("ordered", [True, False])
async def test_fsyncs_per_message(spool: Spool, monkeypatch: pytest.MonkeyPatch,
                                  ordered: bool) -> None:
    """The file always; the directory unless the filesystem journals the create with it."""
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(writer_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    spool.journal_orders_create = ordered
    qid = await _put(spool, _env())
    assert len(calls) == (1 if ordered else 2)
    assert qid in spool.scan()
    if not ordered:
        assert calls[1] == spool.queue_dir_sync.fd


def test_filesystem_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc is no journalling filesystem: directory fsyncs stay on there.
    assert writer_mod.journal_orders_create(Path("/proc")) is False
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    root = next(line.split() for line in mounts if line.split()[1] == "/")
    expect = root[2] in ("ext4", "xfs", "btrfs", "ext3") and "data=writeback" not in root[3]
    assert writer_mod.journal_orders_create(Path("/")) is expect
    monkeypatch.setenv("AUTHRELAY_SPOOL_DIR_FSYNC", "1")  # the operator can insist
    assert writer_mod.journal_orders_create(Path("/")) is False


async def test_notify_datagram(spool: Spool) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(spool.notify_path))
    s.setblocking(False)
    loop = asyncio.get_running_loop()

    async def datagram() -> str:
        """The next datagram (it goes out on a later loop iteration than the commit)."""
        return (await asyncio.wait_for(loop.sock_recv(s, 8192), 10)).decode()

    try:
        qid = await _put(spool, _env())
        assert await datagram() == qid
        # Ids committed together share one datagram.
        ids = await asyncio.gather(*(_put(spool, _env()) for _ in range(5)))
        got: list[str] = []
        while len(got) < 5:
            got += (await datagram()).split("\n")
        assert sorted(got) == sorted(ids)
    finally:
        s.close()
    # No listener any more: commit still succeeds (best effort).
    os.unlink(spool.notify_path)
    await _put(spool, _env())


async def test_notify_resent_when_the_scheduler_queue_is_full(spool: Spool) -> None:
    """Unix datagram queues are short (net.unix.max_dgram_qlen): a refused notice is sent
    again shortly instead of the message waiting for the scheduler's periodic rescan."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(spool.notify_path))
    s.setblocking(False)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:  # fill the queue as a busy scheduler would leave it
            try:
                filler.sendto(b"FILLER", str(spool.notify_path))
            except BlockingIOError:
                break
        qid = await _put(spool, _env())
        await until(lambda: spool.notifier.pending == [qid], "the notice refused and kept")
        loop = asyncio.get_running_loop()
        got: list[str] = []
        while qid not in got:  # the filler's datagrams first, then the notice resent
            got += (await asyncio.wait_for(loop.sock_recv(s, 8192), 10)).decode().split("\n")
        assert spool.notifier.pending == []
    finally:
        s.close()
        filler.close()


async def test_abort_is_idempotent(spool: Spool) -> None:
    inc = spool.begin(_env())
    inc.write(b"partial")
    inc.abort()
    inc.abort()
    assert list(spool.queue_dir.iterdir()) == []
    assert spool.scan() == []


async def test_state_hold_release_remove(spool: Spool) -> None:
    qid = await _put(spool, _env("x@a.example", "y@b.example"))
    env = spool.load(qid)
    env.recipients[0].state = SENT
    env.recipients[1].attempts = 2
    env.recipients[1].last_reply = "451 4.4.1 try later"
    spool.save_state(env)
    again = spool.load(qid)
    assert again.recipients[0].state == SENT
    assert again.recipients[1].attempts == 2
    assert again.recipients[1].last_reply == "451 4.4.1 try later"
    spool.hold(qid)
    assert spool.scan() == [] and spool.held() == [qid]
    held = spool.load(qid)
    assert held.held and held.recipients[0].state == SENT  # state moved along
    spool.release(qid)
    assert spool.scan() == [qid] and spool.held() == []
    assert not spool.load(qid).held
    spool.remove(qid)
    assert spool.scan() == []
    assert list(spool.queue_dir.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        spool.load(qid)


async def test_recover_removes_dead_tmp_but_not_live(spool: Spool) -> None:
    dead = spool.queue_dir / "2N5DEADBEEF"  # a receive that died before its 250
    dead.write_bytes(b"AUTHRELAY-SPOOL 1 10\n{")
    dead.chmod(0o600)
    (spool.tmp_dir / "2N5OLDTMP").write_bytes(b"AUTHRELAY-SPOOL 1 10\n{")  # older layout
    live = spool.begin(_env())
    live.write(b"x" * writer_mod.SPILL)  # a big message streams to its file at once
    assert (spool.queue_dir / live.queue_id).stat().st_mode & 0o777 == 0o600
    assert spool.scan() == [] and not spool.exists(live.queue_id)  # not ready: invisible
    counts = spool.recover()
    assert counts["tmp_removed"] == 2
    assert not dead.exists() and not (spool.tmp_dir / "2N5OLDTMP").exists()
    assert (spool.queue_dir / live.queue_id).exists()  # flock held by a live session
    await live.commit()
    assert spool.scan() == [live.queue_id]


def _unready(spool: Spool, name: str, age: float) -> Path:
    """An unready queue file nobody holds (what a receive killed in DATA leaves), last
    changed `age` seconds ago."""
    path = spool.queue_dir / name
    path.write_bytes(b"AUTHRELAY-SPOOL 2 receiving\n{")
    path.chmod(0o600)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


async def test_sweep_removes_only_dead_receives_files(spool: Spool) -> None:
    """Without a restart: an unready file nobody holds, unchanged for UNFINISHED_AGE, is
    removed and its id given for the maillog; a younger one (a writer may be between its
    create and its lock), one a live receive holds (however long it has been idle), and
    a committed one stay."""
    dead = _unready(spool, "2N5DEAD1", 2 * UNFINISHED_AGE)
    young = _unready(spool, "2N5YOUNG1", 0)
    live = spool.begin(_env())
    live.write(b"x" * writer_mod.SPILL)  # streamed to its file, locked
    live_path = spool.queue_dir / live.queue_id
    old = time.time() - 2 * UNFINISHED_AGE
    os.utime(live_path, (old, old))  # a slow DATA: idle past the age, its lock held
    ready = await _put(spool, _env())
    os.utime(spool.queue_dir / ready, (old, old))
    assert spool.sweep_unfinished() == 1
    assert spool.swept == ["2N5DEAD1"]
    assert not dead.exists() and young.exists() and live_path.exists()
    assert spool.scan() == [ready]
    await live.commit()
    assert spool.scan() == sorted([ready, live.queue_id], key=lambda s: (len(s), s))
    # recover() at start takes every unready file nobody holds, whatever its age, and
    # names each one too
    spool.swept.clear()
    assert spool.recover()["tmp_removed"] == 1 and spool.swept == ["2N5YOUNG1"]


async def test_a_dead_receives_file_from_before_a_clock_set_back_is_swept(
        spool: Spool) -> None:
    """The sweep judged a file's age by the wall clock alone: a dead receive's file
    changed before the clock was set back (a day: a VM restored, a boot before NTP) had a
    negative age, and stayed (its disk taken, `queue hold` answering 'still being
    received') until the clock caught up. Now a change time ahead of the clock by more
    than UNFINISHED_AGE counts as old; one a moment ahead is still young."""
    ahead = _unready(spool, "2N5AHEAD1", -86400)
    moment = _unready(spool, "2N5MOMENT1", -UNFINISHED_AGE / 2)
    assert spool.sweep_unfinished() == 1 and spool.swept == ["2N5AHEAD1"]
    assert not ahead.exists() and moment.exists()


async def test_recover_beside_receiving_never_takes_a_message_being_committed() -> None:
    # recover() runs while messages are received (workers, or the scheduler's recovery
    # in the background at start). Between the writer's open and its lock, recover()
    # took the new file for a dead receive's: unlinked (the commit went to a nameless
    # file, the message lost after its 250) or locked (the commit failed). Here recover()
    # loops in a thread while 1,500 messages are committed: every one is in the queue.
    stop = threading.Event()
    lost: list[str] = []
    with temp_spool(fsync=False) as spool:

        def recover_again() -> None:
            while not stop.is_set():
                spool.recover()

        t = threading.Thread(target=recover_again)
        t.start()
        try:
            for _ in range(1500):
                qid = await _put(spool, _env(), b"Subject: x\r\n\r\nhi\r\n")
                if spool.exists(qid):
                    spool.remove(qid)  # a small directory: recover() goes round fast
                else:
                    lost.append(qid)
        finally:
            stop.set()
            t.join()
    assert lost == []


async def test_recover_moves_corrupt_files(spool: Spool) -> None:
    good = await _put(spool, _env())
    path, off = spool.body_path(good)
    truncated = path.read_bytes()[: off - 20]
    (spool.queue_dir / "TRUNC1").write_bytes(truncated)
    (spool.queue_dir / "GARBAGE1").write_bytes(b"\x00\x01 not a spool file\n")
    (spool.queue_dir / "EMPTY1").write_bytes(b"")
    (spool.queue_dir / "TRUNC1.state").write_bytes(b'{"v":1,"recipients":[]}')
    for name in ("TRUNC1", "GARBAGE1", "EMPTY1"):  # committed (ready) but damaged on disk
        (spool.queue_dir / name).chmod(0o700)
    counts = spool.recover()
    assert counts["corrupt"] == 3
    assert spool.scan() == [good]
    assert sorted(p.name for p in spool.corrupt_dir.iterdir()) == [
        "EMPTY1", "GARBAGE1", "TRUNC1", "TRUNC1.state"]
    with pytest.raises(CorruptError), open(spool.corrupt_dir / "TRUNC1", "rb") as f:
        fmt.check_size(fmt.read_layout(f), len(truncated))


async def test_unknown_version_refused_not_deleted(spool: Spool) -> None:
    env = _env()
    ej = env.to_json(version=1)
    data = b"AUTHRELAY-SPOOL 3 %d\n%s\n" % (len(ej), ej) + MSG
    (spool.queue_dir / env.queue_id).write_bytes(data)
    (spool.queue_dir / env.queue_id).chmod(0o700)
    counts = spool.recover()
    assert counts["unsupported"] == 1
    assert (spool.queue_dir / env.queue_id).read_bytes() == data
    with pytest.raises(UnsupportedVersion):
        spool.load(env.queue_id)
    # A newer envelope version inside a v1 file is refused the same way.
    env2 = _env()
    ej2 = ej.replace(b'"v":1', b'"v":9').replace(env.queue_id.encode(), env2.queue_id.encode())
    (spool.queue_dir / env2.queue_id).write_bytes(b"AUTHRELAY-SPOOL 1 %d\n%s\n" % (len(ej2), ej2))
    (spool.queue_dir / env2.queue_id).chmod(0o700)
    with pytest.raises(UnsupportedVersion):
        spool.load(env2.queue_id)
    assert spool.recover()["unsupported"] == 2


async def test_orphan_state_files(spool: Spool) -> None:
    qid = await _put(spool, _env())
    env = spool.load(qid)
    env.recipients[0].state = FAILED
    spool.save_state(env)
    # Interrupted hold: body moved, state left behind.
    os.rename(spool.queue_dir / qid, spool.hold_dir / qid)
    (spool.queue_dir / "GONE1.state").write_bytes(b"{}")  # interrupted remove
    (spool.queue_dir / "X1.state.tmp").write_bytes(b"{")
    counts = spool.recover()
    assert counts["orphans"] == 2
    assert sorted(p.name for p in spool.queue_dir.iterdir()) == []
    assert spool.load(qid).recipients[0].state == FAILED


_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from authrelay.spool.store import Spool
    from authrelay.spool.envelope import Envelope, Recipient

    async def main():
        spool = Spool(Path(sys.argv[1]))
        spool.ensure_dirs()
        n = 0
        while True:
            env = Envelope(queue_id="", sender="a@x.example",
                           recipients=[Recipient("b@y.example")])
            inc = spool.begin(env)
            for i in range(64):
                inc.write(b"line %05d of message %06d\\r\\n" % (i, n))
            await inc.commit()
            n += 1
            if n == 20:
                print("ready", flush=True)

    asyncio.run(main())
""")


def test_sigkill_never_leaves_partial_message_in_queue(spool: Spool) -> None:
    """SIGKILL while committing in a loop: queue/ holds only whole messages."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(spool.root)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ids = spool.scan()
    assert len(ids) >= 20
    for qid in ids:
        env = spool.load(qid)
        path, off = spool.body_path(qid)
        body = path.read_bytes()[off:]
        lines = body.split(b"\r\n")
        assert len(lines) == 65 and lines[-1] == b"", qid
        assert env.size == len(body)
    counts = spool.recover()
    assert counts["corrupt"] == 0
    assert sorted(p.name for p in spool.queue_dir.iterdir() if "." not in p.name) == ids
    assert spool.scan() == ids


async def test_remove_delivered_skips_only_state_files_that_cannot_exist(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivering scheduler's removal (issue 22: a system call less is a GIL hand-off
    less) leaves nothing behind: ID.state and ID.state.tmp are unlinked whenever they may
    exist (one at the load, a save since, one that failed after its tmp file), the body
    of a message held meanwhile is found in hold/, a message gone is that id's
    FileNotFoundError alone."""
    plain = spool.load(await _put(spool, _env()))
    assert not plain.state_file  # no ID.state at the load
    stated = spool.load(await _put(spool, _env()))
    spool.save_state(stated)
    assert stated.state_file and spool.load(stated.queue_id).state_file
    left = spool.load(await _put(spool, _env()))  # a save that failed after its tmp file
    assert not left.state_file
    tmp = spool.queue_dir / (left.queue_id + ".state.tmp")

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        spool.save_state(left)
    monkeypatch.undo()
    assert tmp.exists() and left.state_file
    held = spool.load(await _put(spool, _env()))
    spool.save_state(held)
    spool.hold(held.queue_id)
    gone = spool.load(await _put(spool, _env()))
    spool.remove(gone.queue_id)
    errors = spool.remove_delivered([plain, stated, left, held, gone])
    assert errors[:4] == [None, None, None, None]
    assert isinstance(errors[4], FileNotFoundError)
    assert list(spool.queue_dir.iterdir()) == [] and list(spool.hold_dir.iterdir()) == []


async def test_a_header_section_past_the_limit_is_cut_after_a_whole_line(
        spool: Spool) -> None:
    """A header section longer than read_headers' 256 KiB (what a DSN returns), its limit
    falling between a line's CR and LF: the CR was returned alone (make_bounce then added
    CRLF: '\\r\\r\\n', a bare CR in the bounce) and the line cut short. Now it ends
    after the last whole line within the limit."""
    limit = 256 * 1024
    line = b"X-Pad: " + b"a" * 990 + b"\r\n"  # 999 octets
    whole = limit // len(line) * len(line)
    last = b"X-End: " + b"b" * (limit - whole - 8) + b"\r\n"  # its CR the limit's last
    head = line * (limit // len(line)) + last + b"Subject: after\r\n"
    assert head[limit - 1:limit + 1] == b"\r\n"
    qid = await _put(spool, _env(), head + b"\r\nbody\r\n")
    got = spool.read_headers(qid, limit)
    assert got == head[:whole]
    assert not spool.read_headers(qid, 3)  # no whole line: nothing rather than a piece
