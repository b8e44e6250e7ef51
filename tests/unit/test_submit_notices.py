"""The scheduler's notices of committed messages (spool/submit._Notices): each goes once
its maillog line is written or NOTICE_WAIT after the commit; one loop timer for all."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from support.wait import until

from authrelay import maillog, wiring
from authrelay.config import from_dict
from authrelay.spool import submit, writer
from authrelay.spool.envelope import Envelope, Recipient
from authrelay.spool.store import Spool


async def test_a_notice_that_raises_leaves_the_timer_for_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A notice that raised out of the timer left the fired handle as the armed timer:
    no later notice was ever sent by the timer again (a stalled log then held every
    message until the rescan)."""
    monkeypatch.setattr(submit, "NOTICE_WAIT", 0.01)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    notices = submit._Notices(loop)

    def boom() -> None:
        raise RuntimeError("boom")

    notices.add(boom)
    await until(lambda: errors, what="the first notice raised")
    sent: list[int] = []
    notices.add(lambda: sent.append(1))
    await until(lambda: sent, what="the next notice sent by the timer", timeout=5)


async def test_a_notice_goes_once_whichever_comes_first() -> None:
    loop = asyncio.get_running_loop()
    notices = submit._Notices(loop)
    sent: list[str] = []
    send = notices.add(lambda: sent.append("a")).send
    send()  # its line written: sent now
    send()
    notices._expire()  # (the timer: nothing left to send)
    assert sent == ["a"]


def _a_session_draft(tmp_path: Path
                     ) -> tuple[Spool, maillog.MailLog, submit.Draft, list[str]]:
    """A spool, a file maillog whose writer thread runs, a session's message written (not
    committed), and the queue ids the spool's notices name (the in-process hook)."""
    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path / "state")})
    spool = Spool(cfg.spool_dir)
    spool.ensure_dirs()
    noticed: list[str] = []
    spool.on_commit = lambda qid, _ino: noticed.append(qid)
    ml = maillog.MailLog(f"file:{tmp_path / 'mail.log'}")
    ml.warning("the writer thread runs")
    ml.flush()
    env = Envelope(queue_id="", sender="a@a.example", recipients=[Recipient("b@b.example")],
                   protocol="ESMTPSA", client_ip="192.0.2.7", auth_user="alice")
    draft = wiring.submitter(cfg, spool, ml).begin(env)
    draft.write(b"Subject: t\r\n\r\nhello\r\n")
    return spool, ml, draft, noticed


async def test_a_file_is_marked_as_its_from_line_owed_until_that_line_is_written(
        tmp_path: Path) -> None:
    """A session's message is committed marked as its from= line not written yet (mode
    0710, LOG_OWED_MODE), so a scheduler that finds it without a notice (its worker killed
    between the 250 and the line) writes the line itself; the mark goes once the line is
    in the log, before the notice, so a message whose line was written gets no second."""
    spool, ml, draft, noticed = _a_session_draft(tmp_path)
    env = draft.envelope
    path = spool.queue_dir / env.queue_id
    with ml._lock:  # the writer held in its write (a stalled target)
        await draft.commit()
        await asyncio.sleep(0.05)  # (the writer thread has the line by now, and waits)
        assert path.stat().st_mode & 0o777 == writer.LOG_OWED_MODE
        assert not noticed
    await until(lambda: noticed, what="the notice, once the line is written")
    assert f"{env.queue_id}: from=<a@a.example>" in (tmp_path / "mail.log").read_text()
    assert path.stat().st_mode & 0o777 == writer.READY_MODE
    env2, _, _ = spool.load_for_delivery(env.queue_id)
    assert env2.log_owed == 0.0
    spool.close()


async def test_a_message_held_before_its_from_line_is_written_loses_its_mark(
        tmp_path: Path) -> None:
    """`authrelay queue hold` while the from= line is not written yet (a slow log) moves
    the file, marked, to hold/: the line written, the mark goes there too, so the file
    released (after a restart, with no notice remembered) gets no second from= line."""
    spool, ml, draft, noticed = _a_session_draft(tmp_path)
    env = draft.envelope
    with ml._lock:  # the writer held in its write (a stalled target)
        await draft.commit()
        await asyncio.sleep(0.05)
        assert spool.hold(env.queue_id)
    await until(lambda: noticed, what="the notice, once the line is written")
    held = spool.hold_dir / env.queue_id
    assert held.stat().st_mode & 0o777 == writer.READY_MODE
    assert spool.release(env.queue_id)
    env2, _, _ = spool.load_for_delivery(env.queue_id)
    assert env2.log_owed == 0.0
    spool.close()


async def test_the_mark_is_never_cleared_through_a_link_planted_in_its_place(
        tmp_path: Path) -> None:
    """The mark was cleared by chmod(path), which follows a symlink: a link planted in
    the queue directory in place of the file between the 250 and the from= line (the
    final suite's test_attacks planted one to /etc/passwd, which became 0700) had its
    target's mode changed. The mark is cleared on the regular file itself (O_NOFOLLOW),
    by the writer thread and by the scheduler (Spool.logged) alike."""
    target = tmp_path / "not-a-queue-file"
    target.write_text("x")
    target.chmod(0o644)
    spool, ml, draft, noticed = _a_session_draft(tmp_path)
    env = draft.envelope
    path = spool.queue_dir / env.queue_id
    with ml._lock:  # the writer held before its write: the line not written yet
        await draft.commit()
        path.unlink()
        path.symlink_to(target)
    await until(lambda: noticed, what="the notice, once the line is written")
    assert target.stat().st_mode & 0o777 == 0o644
    assert path.is_symlink()
    env.held = False
    with pytest.raises(OSError):
        spool.logged(env)  # the scheduler's way: refused, the target untouched
    assert target.stat().st_mode & 0o777 == 0o644
    path.unlink()
    os.mkfifo(path, 0o710)  # nor a FIFO (never waited on)
    with pytest.raises(OSError):
        spool.logged(env)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    spool.close()
