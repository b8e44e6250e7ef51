"""Attacks from outside and an operator's accidents, against a real `authrelay serve`.

Each test is one finding of the attack session (h-attack) that broke something, kept as a
regression test: the input that broke it and the precise outcome expected now (an RFC 5321
/ RFC 3463 reply or a maillog line; never a traceback, a hang or a failed start).
"""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest
from relayproc import RelayProcess

pytestmark = pytest.mark.slow


def _queue_one(r: RelayProcess) -> str:
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=30) as c:
        c.sendmail("a@remote.example", ["u@local.test"], b"Subject: t\r\n\r\nhi\r\n")
    r.wait_for(lambda: len(r.queued()) == 1)
    qid = r.queued()[0].name
    # ... and tried once (the scheduler is told of it once its `from=` line is written):
    # its deferral saved, the `.state` file the callers tamper with
    r.wait_for(lambda: (r.queue_dir / (qid + ".state")).exists())
    return qid


def _stopped_with_one_queued(tmp_path: Path) -> tuple[RelayProcess, str]:
    """A relay run until one message is queued, then stopped: its spool to tamper with."""
    r = RelayProcess(tmp_path).start()
    try:
        return r, _queue_one(r)
    finally:
        r.stop()


def test_spool_entries_that_are_not_regular_files_are_quarantined(tmp_path: Path) -> None:
    """A queue id's name in queue/ held by a dangling symlink, a symlink to a file, a
    directory or a FIFO: serve used to fail to start (FileNotFoundError out of recovery)
    or hang for ever on the FIFO's open(). Now each goes to corrupt/ with a warning line,
    nothing is followed through a link, and real messages beside them stay queued."""
    r, qid = _stopped_with_one_queued(tmp_path)
    q = r.queue_dir
    bad = {"2N5CGWQ68GZSZCV4A": "dangling", "2N5CGWQ68GZSZCV4B": "dir",
           "2N5CGWQ68GZSZCV4C": "link", "2N5CGWQ68GZSZCV4D": "fifo",
           "2N5CGWQ68GZSZCV4E": "fifo-unready"}
    os.symlink(tmp_path / "nonexistent", q / "2N5CGWQ68GZSZCV4A")
    os.mkdir(q / "2N5CGWQ68GZSZCV4B")
    target = tmp_path / "outside"
    target.write_bytes((q / qid).read_bytes())
    target.chmod(0o700)
    os.symlink(target, q / "2N5CGWQ68GZSZCV4C")
    os.mkfifo(q / "2N5CGWQ68GZSZCV4D", 0o700)
    os.mkfifo(q / "2N5CGWQ68GZSZCV4E", 0o600)
    (q / (qid + ".state")).unlink()
    os.mkfifo(q / (qid + ".state"), 0o600)  # a FIFO as the real message's state file
    r.start()
    try:
        corrupt = r.state / "spool" / "corrupt"
        r.wait_for(lambda: set(bad) <= set(os.listdir(corrupt)), timeout=30)
        assert [p.name for p in r.queued()] == [qid]
        assert target.exists()  # never followed, never deleted
        log = r.maillog()
        for name in bad:
            assert f"{name}: damaged spool file moved to corrupt/" in log, log[-3000:]
        assert "Traceback" not in log
    finally:
        r.stop()


def test_spool_damage_while_running_is_quarantined_and_delivery_goes_on(
        tmp_path: Path) -> None:
    """The same damage while serve runs, found by `queue flush`: a FIFO used to block a
    thread of the master for ever in open() (no delivery attempt for new mail after it,
    and SIGTERM no longer stopped the master); a symlink was skipped without a word."""
    r = RelayProcess(tmp_path).start()
    try:
        ids = [_queue_one_more(r, i) for i in range(3)]
        q = r.queue_dir
        for qid in ids:
            (q / qid).unlink()
        os.mkdir(q / ids[0])
        os.mkfifo(q / ids[1], 0o700)
        # A link to a file of ours (never a system file: a chmod through such a link
        # made /etc/passwd 0700 here once); it must come out with its mode unchanged.
        planted = tmp_path / "planted-target"
        planted.write_text("x")
        planted.chmod(0o644)
        os.symlink(planted, q / ids[2])
        r.cli("queue", "flush")
        corrupt = r.state / "spool" / "corrupt"
        r.wait_for(lambda: set(ids) <= set(os.listdir(corrupt)), timeout=30)
        later = _queue_one_more(r, 3)
        r.wait_for(lambda: f"{later}: to=<u3@local.test>" in r.maillog(), timeout=30)
        log = r.maillog()
        for qid in ids:
            assert f"{qid}: warning=damaged queue file moved to corrupt/" in log, log[-3000:]
        assert "Traceback" not in log
        assert planted.stat().st_mode & 0o777 == 0o644  # never followed
    finally:
        r.stop()
    assert r.proc is not None and r.proc.returncode == 0  # SIGTERM still stops it


def _queue_one_more(r: RelayProcess, i: int) -> str:
    before = {p.name for p in r.queued()}
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=30) as c:
        c.sendmail("a@remote.example", [f"u{i}@local.test"], b"Subject: t\r\n\r\nhi\r\n")
    r.wait_for(lambda: len({p.name for p in r.queued()} - before) == 1)
    (new,) = {p.name for p in r.queued()} - before
    return new


def test_client_gone_mid_data_leaves_a_maillog_line(tmp_path: Path) -> None:
    """A half-close or a reset in the middle of DATA: nothing stored, and (unlike before)
    one line saying so, as Postfix's "lost connection after DATA (N bytes)"."""
    import socket
    import struct

    r = RelayProcess(tmp_path).start()
    try:
        for how in ("fin", "rst"):
            s = socket.create_connection(("127.0.0.1", r.ports["smtp"]), timeout=30)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO x\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<u@local.test>\r\n"
                      b"DATA\r\n")
            replies = []
            while not replies or not replies[-1].startswith(b"354"):
                line = f.readline()
                assert line, replies
                if line[3:4] == b" ":
                    replies.append(line)
            s.sendall(b"Subject: cut\r\n\r\n" + b"x" * 5000 + b"\r\n")
            if how == "fin":
                s.shutdown(socket.SHUT_WR)
                assert f.read() == b""  # no reply: the message was not accepted
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            f.close()  # the file object holds the socket open too
            s.close()
            r.wait_for(lambda n=("fin", "rst").index(how) + 1:
                       r.maillog().count("lost=connection after DATA (") == n, timeout=30)
        assert r.queued() == [] and r.unready() == []
        assert "Traceback" not in r.maillog()
    finally:
        r.stop()


def test_spool_warnings_about_a_message_start_with_its_queue_id(tmp_path: Path) -> None:
    """The spool's own warnings (a damaged file set aside, a damaged .state ignored, a
    file of a newer format left in place) were maillog lines starting `NOQUEUE:` with the
    queue id inside the text: `grep '^... QID:'` and log readers that follow a message by
    its id missed them. Now they start with the queue id, the text as it was."""
    r, qid = _stopped_with_one_queued(tmp_path)
    q = r.queue_dir
    (q / (qid + ".state")).write_bytes(b"{not json")
    damaged, newer = "2N5CGWQ68GZSZCV4F", "2N5CGWQ68GZSZCV4G"
    (q / damaged).write_bytes(b"AUTHRELAY-SPOOL 2 truncated")
    (q / newer).write_bytes(b"AUTHRELAY-SPOOL 9 whatever\nrest")
    for name in (damaged, newer):
        os.chmod(q / name, 0o700)  # ready, as a committed file
    r.start()
    try:
        r.cli("queue", "flush", qid)  # loads it (and its .state) for delivery
        r.wait_for(lambda: "state file ignored" in r.maillog()
                   and "damaged spool file moved" in r.maillog(), timeout=30)
    finally:
        r.stop()
    log = r.maillog()
    for name, text in ((qid, "state file ignored"), (damaged, "damaged spool file moved"),
                       (newer, "left in place")):
        lines = [ln.split("]: ", 1)[1] for ln in log.splitlines() if text in ln]
        assert lines, (text, log[-3000:])
        assert all(ln.startswith(f"{name}: ") for ln in lines), lines
    assert f"{damaged}: damaged spool file moved to corrupt/" in log  # the text as it was


@pytest.mark.root
def test_root_offline_queue_edit_never_follows_a_link_in_the_spool(
        reachable_dir: Path) -> None:
    """The spool is the daemon user's. With no server running, root's `queue hold` moved
    the message through spool/hold, a symlink that user (or whoever took the daemon over)
    had put there, into the link's target (a root directory standing for /etc), and an
    offline `queue flush` left a root-owned 0600 ID.state in the daemon's spool. Now the
    offline edit runs with the spool owner's ids: the move is refused, nothing lands in
    the target, and the files made are the daemon's."""
    import subprocess
    import sys

    from privpython import python_for
    from support.privileges import TEST_USER, unprivileged_user

    pw = unprivileged_user()
    r = RelayProcess(reachable_dir, {"user": TEST_USER})
    r.python = python_for(TEST_USER)
    r.config.chmod(0o644)
    r.start()
    try:
        qid = _queue_one(r)
    finally:
        r.stop()
    target = reachable_dir / "etc"
    target.mkdir(mode=0o755)
    hold = r.state / "spool" / "hold"
    os.rmdir(hold)
    os.symlink(target, hold)
    os.lchown(hold, pw.pw_uid, pw.pw_gid)

    def queue(*args: str) -> subprocess.CompletedProcess[str]:  # as root, offline
        return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(r.config),
                               "queue", *args], capture_output=True, text=True, timeout=60)

    out = queue("hold", qid)
    assert out.returncode == 77 and "Traceback" not in out.stderr, out.stderr
    assert f"{qid}: permission denied" in out.stderr
    assert list(target.iterdir()) == []
    assert [p.name for p in r.queued()] == [qid]
    assert queue("flush").returncode == 69
    assert (r.queue_dir / (qid + ".state")).stat().st_uid == pw.pw_uid


@pytest.mark.root
def test_root_user_command_never_follows_a_link_planted_as_the_user_db(
        reachable_dir: Path) -> None:
    """state_dir is the daemon user's. Root's `user add` opened state_dir/users.db with
    SQLite, which follows a symlink: one that user (or whoever took the daemon over) put
    there, pointing at a file that did not exist yet in a root directory (standing for
    /etc/cron.d/x), made root create a file there holding user names and addresses. Now a
    link there is refused (one line, exit non-zero) and nothing is made; a real users.db
    made by root's command is the daemon user's."""
    import subprocess
    import sys

    from support.privileges import TEST_USER, unprivileged_user

    pw = unprivileged_user()
    r = RelayProcess(reachable_dir, {"user": TEST_USER})
    r.state.mkdir(parents=True, exist_ok=True)
    os.chown(r.state, pw.pw_uid, pw.pw_gid)
    rootdir = reachable_dir / "rootonly"
    rootdir.mkdir(mode=0o700)
    target = rootdir / "planted"
    link = r.state / "users.db"
    os.symlink(target, link)
    os.lchown(link, pw.pw_uid, pw.pw_gid)

    def user(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:  # as root
        return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(r.config),
                               "user", *args], input=stdin, capture_output=True, text=True,
                              timeout=60)

    out = user("add", "zed", "--password-stdin", stdin="pw-of-zed\n")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "symbolic link" in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert not target.exists()
    link.unlink()
    out = user("add", "zed", "--password-stdin", stdin="pw-of-zed\n")
    assert out.returncode == 0, out.stderr
    for name in ("users.db", "users.db-wal", "users.db-shm"):
        p = r.state / name
        if p.exists():
            assert (p.stat().st_uid, p.is_symlink()) == (pw.pw_uid, False), name
    assert "zed" in user("list").stdout
