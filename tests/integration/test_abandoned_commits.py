"""Commits given up after data_block_timeout (451 4.3.0: the client sends again) through a
real `authrelay serve`: the file of one held in its fsync (support/hungfsync.py) when the
whole server is killed is never delivered by the start after it."""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess, alive, children
from support import hungfsync
from support.wait import wait_until

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
    qid = held.name
    r.wait_log(f"{qid}: reject=")  # the 451's line
    _kill_all(r)
    gate.unlink()
    assert r.queued() == [held]  # left ready by the killed server
    r.start()
    r.wait_for(lambda: DROPPED in r.maillog() or "stat=Sent" in r.maillog(),
               what="the file dropped or delivered")
    assert f"{qid}: warning={DROPPED}" in r.maillog()
    assert "stat=Sent" not in r.maillog()
    assert smart.messages == []
    assert r.queued() == []
    # Another message after it goes through as ever.
    with _client(r) as s:
        s.login("alice", PASSWORD)
        s.sendmail("alice@local.test", ["carol@remote.example"], b"Subject: next\r\n\r\nx\r\n")
    r.wait_for(lambda: len(smart.messages) == 1, what="the next message delivered")

