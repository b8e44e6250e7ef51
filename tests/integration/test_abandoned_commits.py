"""Commits given up after data_block_timeout (451 4.3.0: the client sends again) through a
real `authrelay serve`: the file of one held in its fsync (support/hungfsync.py) when the
whole server is killed is never delivered by the start after it; past ABANDONED_MAX ids
the oldest is forgotten, and no acknowledged message is ever dropped."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
from pathlib import Path

import pytest
from fakes.smtpserver import FakeSMTPServer
from relayproc import PASSWORD, RelayProcess, alive, children
from support import hungfsync
from support.wait import wait_until

from authrelay.scheduler.scheduler import ABANDONED_MAX
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.notify import NOTIFY_SOCK
from authrelay.spool.store import Spool

pytestmark = pytest.mark.slow

DROPPED = "queue file of an abandoned commit removed, not delivered"


def _client(r: RelayProcess) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL("127.0.0.1", r.ports["submissions"], timeout=30,
                            context=r.client_context())


def _given_up(r: RelayProcess) -> None:
    """One message from alice whose commit the server gives up: 451 4.3.0."""
    with _client(r) as s:
        s.login("alice", PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("alice@local.test", ["bob@remote.example"],
                       b"Subject: held\r\n\r\nheld in its fsync\r\n")
        assert e.value.smtp_code == 451, e.value
        assert b"4.3.0" in e.value.smtp_error


def _kill_all(r: RelayProcess) -> None:
    """kill -9 of the master and every worker at once (a whole-server kill)."""
    assert r.proc is not None
    pids = [r.proc.pid, *children(r.proc.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    r.proc.wait(timeout=30)
    wait_until(lambda: not any(alive(p) for p in pids), what="every process gone")


def _given_up_then_killed(relay_factory, fake_mx, tmp_path: Path,  # noqa: ANN001
                          monkeypatch: pytest.MonkeyPatch, workers: int
                          ) -> tuple[RelayProcess, FakeSMTPServer, Path]:
    """A relay (`workers`, a smart host) whose commit thread is held in the file's fsync
    past the ready mark (a hung disk): the session gives up (451 4.3.0), then the whole
    server is killed -9 and the fsyncs let go. The relay, its smart host, the file."""
    smart = fake_mx("127.0.0.2")
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"},
                                 "limits": {"data_block_timeout": "1s"}},
                      workers=workers, start=False)
    gate = tmp_path / "fsync-gate"
    lib = hungfsync.build(tmp_path)
    for k, v in hungfsync.environ(lib, gate, r.queue_dir).items():
        monkeypatch.setenv(k, v)
    r.queue_dir.mkdir(parents=True)
    r.start()
    gate.touch()  # every fsync of a queue file waits from here on
    _given_up(r)
    [held] = r.queued()
    assert held.stat().st_mode & 0o100, "ready: held past its ready mark"
    r.wait_log(f"{held.name}: reject=")  # the 451's line
    _kill_all(r)
    gate.unlink()
    return r, smart, held


def _dropped_not_delivered(r: RelayProcess, smart: FakeSMTPServer, qid: str) -> None:
    """`qid`'s file dropped (one line) or delivered, whichever comes: dropped, the queue
    empty, nothing at the smart host."""
    r.wait_for(lambda: DROPPED in r.maillog() or "stat=Sent" in r.maillog(),
               what="the file dropped or delivered")
    assert f"{qid}: warning={DROPPED}" in r.maillog()
    assert "stat=Sent" not in r.maillog()
    assert smart.messages == []
    assert r.queued() == []


@pytest.mark.parametrize("workers", [1, 2])
def test_an_abandoned_commit_left_by_a_whole_server_kill_is_dropped_at_the_start(
        relay_factory, fake_mx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        workers: int) -> None:
    """The commit thread past the ready mark, held in the file's fsync (a hung disk);
    the session gives up after data_block_timeout (451 4.3.0: the client sends the
    message again); then the whole server is killed (master and workers: kill -9) before
    the thread removed the file. The file was left ready and the start delivered it: a
    duplicate of the client's retry (the master's memory of the abandon died with it).
    The abandonment is now also in the instance's book in /dev/shm
    (spool/abandoned.py): the start drops the file, one line, never delivered."""
    r, smart, held = _given_up_then_killed(relay_factory, fake_mx, tmp_path, monkeypatch,
                                           workers)
    qid = held.name
    assert r.queued() == [held]  # left ready by the killed server
    r.start()
    _dropped_not_delivered(r, smart, qid)
    # Another message after it goes through as ever.
    with _client(r) as s:
        s.login("alice", PASSWORD)
        s.sendmail("alice@local.test", ["carol@remote.example"], b"Subject: next\r\n\r\nx\r\n")
    r.wait_for(lambda: len(smart.messages) == 1, what="the next message delivered")


def test_an_abandoned_commits_file_held_across_a_whole_server_kill_is_not_delivered(
        relay_factory, fake_mx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but the file is moved to hold/ (`queue hold`, the server down) before the
    start: the start kept the book's ids of files in queue/ only, so it forgot this one,
    and a release delivered it, a duplicate of the client's retry. Now the start keeps
    the ids of files in hold/ too: the release drops it, one line, never delivered."""
    r, smart, held = _given_up_then_killed(relay_factory, fake_mx, tmp_path, monkeypatch, 1)
    qid = held.name
    assert r.cli("queue", "hold", qid).stdout.strip() == f"{qid}: held"
    assert r.queued() == []
    r.start()
    assert r.cli("queue", "release", qid).stdout.strip() == f"{qid}: released"
    _dropped_not_delivered(r, smart, qid)
    assert not (r.state / "spool" / "hold" / qid).exists()


def _left_ready(r: RelayProcess, rcpt: str) -> str:
    """A ready queue file no process holds (what a worker killed in the commit thread's
    fsync leaves), its scheduler not told: its queue id."""
    spool = Spool(r.state / "spool")
    inc = spool.begin(Envelope(queue_id=new_queue_id(), sender="alice@local.test",
                               recipients=[Recipient(rcpt)]))
    inc.write(b"Subject: left\r\n\r\nleft ready\r\n")
    asyncio.run(inc.commit(announce=False))
    return inc.queue_id


def test_past_abandoned_max_the_oldest_is_forgotten_and_nothing_acknowledged_dropped(
        relay_factory, fake_mx) -> None:
    """ABANDONED_MAX + 1 (10,001) commits given up said to a running master (`ID
    abandoned` on notify.sock, as its workers say them): it keeps the last 10,000. A
    file a dead worker left under the 10,001st is dropped, never delivered; one under
    the first, forgotten, is delivered (the client was told 451: a duplicate, never a
    loss); a message acknowledged meanwhile (250) is delivered as ever."""
    smart = fake_mx("127.0.0.2")
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"}}, workers=2)
    r.wait_log(r"daemon=started \(master\)")  # its start's scan done: finds neither file
    first = _left_ready(r, "first@remote.example")
    last = _left_ready(r, "last@remote.example")
    ids = [first, *(new_queue_id() for _ in range(ABANDONED_MAX - 1)), last]
    assert len(set(ids)) == ABANDONED_MAX + 1
    notify = str(r.state / "spool" / NOTIFY_SOCK)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for at in range(0, len(ids), 200):  # (spool/notify.py's batch)
            s.sendto("\n".join(f"{q} abandoned" for q in ids[at:at + 200]).encode(), notify)
        s.sendto(f"{first}\n{last}".encode(), notify)  # their files: looked at now
    with _client(r) as c:
        c.login("alice", PASSWORD)
        c.sendmail("alice@local.test", ["acked@remote.example"], b"Subject: a\r\n\r\nx\r\n")
    r.wait_for(lambda: f"{last}: warning={DROPPED}" in r.maillog(), what="the last dropped")
    r.wait_for(lambda: len(smart.messages) == 2, what="the first and the acknowledged sent")
    assert sorted(m.rcpt_tos[0] for m in smart.messages) == [
        "acked@remote.example", "first@remote.example"]
    assert r.maillog().count(DROPPED) == 1
    r.wait_for(lambda: r.queued() == [], what="the queue empty")
