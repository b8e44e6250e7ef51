"""The `file:` maillog target of a real `authrelay serve` (master and two workers) when its
file misbehaves under it: the disk fills up, the file is deleted. Nothing the admin needs
is lost silently: a line that could not be written is counted and said once writing works
again, and a deleted file is created again before the next line.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import RelayProcess, children, to_toml
from support.tmpfs import mounted
from support.wait import wait_until

pytestmark = pytest.mark.slow

CONNECT = re.compile(r".* authrelay\[\d+\]: NOQUEUE: connect=from unknown \[127\.0\.0\.1\], "
                     r"listener=smtp:127\.0\.0\.1:\d+")
DISCONNECT = re.compile(r".* authrelay\[\d+\]: NOQUEUE: disconnect=from unknown "
                        r"\[127\.0\.0\.1\], commands=ehlo=1 quit=1")


def _whole(text: str) -> int:
    """The sessions' lines in `text` that are whole."""
    return sum(1 for ln in text.splitlines() if CONNECT.fullmatch(ln) or DISCONNECT.fullmatch(ln))


def _with_log_file(relay_factory, logfile: Path) -> RelayProcess:  # noqa: ANN001
    """Two workers writing `logfile` (stdout and stderr stay in r.log)."""
    r = relay_factory(workers=2, start=False)
    data = dict(r.config_data)
    data["log"] = {"target": f"file:{logfile}"}
    r.config.write_text(to_toml(data))
    r.start()
    wait_until(lambda: logfile.exists() and logfile.read_text().count("daemon=started") == 3,
               what="started")
    return r


def _session(r: RelayProcess) -> None:
    """One session: a connect= and a disconnect= line in the worker that takes it."""
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=20) as s:
        s.ehlo("client.example")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted(tmp_path / "tmpfs", "256k") as mnt:
        yield mnt


@pytest.mark.root
def test_lines_lost_on_a_full_disk_are_counted_when_it_has_room(relay_factory,  # noqa: ANN001
                                                                 tmpfs: Path) -> None:
    """A full disk under the log file: each process's writes fail; the lines were dropped
    without a word (and a failed write's tail could come back later, in the middle of
    another line). Now stderr (the journal under systemd) says it at once, and each
    process's first line once there is room again counts what it lost; every line
    written is whole."""
    logfile = tmpfs / "mail.log"
    r = _with_log_file(relay_factory, logfile)
    before = _whole(logfile.read_text())  # the start's probes
    filler = tmpfs / "filler"
    with open(filler, "wb", buffering=0) as f:  # to the brim (the log file's last page
        try:                                     # still has room)
            while f.write(b"\1" * 4096):
                pass
        except OSError:
            pass
    sessions = 0

    def failing() -> bool:
        nonlocal sessions
        _session(r)
        sessions += 1
        return "maillog: cannot write" in r.log.read_text()

    wait_until(failing, what="a write of the full disk fails")
    assert f"authrelay: warning: maillog: cannot write {logfile}: No space left on device; " \
           "its lines are lost until it can be written again, then counted there" \
        in r.log.read_text()
    filler.unlink()
    workers = children(r.proc.pid)  # type: ignore[union-attr]
    lost: dict[int, int] = {}
    said = re.compile(r".* authrelay\[(\d+)\]: NOQUEUE: warning=maillog: (\d+) lines lost, "
                      + re.escape(str(logfile)) + r" could not be written from "
                      r"\d\d:\d\d:\d\d to \d\d:\d\d:\d\d: No space left on device")

    def counted() -> bool:  # every worker that lost lines has said how many
        nonlocal sessions
        _session(r)
        sessions += 1
        lost.clear()
        for line in logfile.read_text().splitlines():
            m = said.fullmatch(line)
            if m:
                lost[int(m[1])] = lost.get(int(m[1]), 0) + int(m[2])
        after = logfile.read_text().split("lines lost")[-1]
        return bool(lost) and all(f"[{w}]: NOQUEUE: connect=" in after for w in workers)

    wait_until(counted, what="the lost lines counted")
    r.stop()
    # Each session's two lines were either written whole or counted as lost (a line cut
    # by the full disk is counted, and ended before the next one).
    whole = _whole(logfile.read_text()) - before
    assert whole + sum(lost.values()) == 2 * sessions, (whole, lost, sessions)



def test_a_log_file_deleted_while_open_is_created_again(relay_factory,  # noqa: ANN001
                                                        tmp_path: Path) -> None:
    """`rm` of the log file (not logrotate's rename): every process went on writing into
    the deleted file, every line lost until a SIGHUP. Each process now sees it before
    its next line, creates the file again and says so there; nothing is lost. The new
    file is 0640 as serve made the first (it was 0644 by umask: every local account could
    read who mails whom)."""
    logfile = tmp_path / "mail.log"
    r = _with_log_file(relay_factory, logfile)
    workers = children(r.proc.pid)  # type: ignore[union-attr]
    assert stat.S_IMODE(os.stat(logfile).st_mode) == 0o640
    logfile.unlink()
    sessions = 0

    def both_workers_logged() -> bool:  # (the kernel picks the worker: try again)
        nonlocal sessions
        _session(r)
        sessions += 1
        text = logfile.read_text() if logfile.exists() else ""
        return all(f"[{w}]: NOQUEUE: disconnect=" in text for w in workers)

    wait_until(both_workers_logged, what="both workers log into a new file")
    # every session's lines (the last one's written a moment after its reply)
    wait_until(lambda: _whole(logfile.read_text()) == 2 * sessions,
               what=lambda: f"{2 * sessions} lines in {logfile.read_text()}")
    text = logfile.read_text()
    for w in workers:
        assert text.count(f"[{w}]: NOQUEUE: warning=maillog: {logfile} was deleted while "
                          "open; created again") == 1, text
    assert os.stat(logfile).st_nlink == 1
    assert stat.S_IMODE(os.stat(logfile).st_mode) == 0o640


def test_a_log_file_that_cannot_be_opened_is_one_line_naming_the_key(relay_factory,  # noqa: ANN001
                                                                      tmp_path: Path) -> None:
    """A file target in a directory that does not exist: serve exits 1 with one line on
    stderr naming `log.target` and the file (it said `[Errno 2] No such file or
    directory: '...'`, naming neither the key nor what to fix)."""
    r = relay_factory(start=False)
    logfile = tmp_path / "no-such-dir" / "mail.log"
    data = dict(r.config_data)
    data["log"] = {"target": f"file:{logfile}"}
    r.config.write_text(to_toml(data))
    res = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(r.config), "serve"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr == f"authrelay: log.target {logfile}: No such file or directory\n"
    assert res.stdout == ""


def test_logrotate_copytruncate_goes_on_at_the_start_of_the_emptied_file(
        relay_factory, tmp_path: Path) -> None:  # noqa: ANN001
    """README "Operating it": `copytruncate` works without a reload. Every process
    appends, so after the copy and the truncation the next lines start the emptied file
    (a process writing at its own offset would leave a hole of NUL bytes before them)."""
    logfile = tmp_path / "mail.log"
    r = _with_log_file(relay_factory, logfile)
    workers = children(r.proc.pid)  # type: ignore[union-attr]
    (tmp_path / "mail.log.1").write_bytes(logfile.read_bytes())  # logrotate's copy ...
    os.truncate(logfile, 0)  # ... and truncation
    sessions = 0

    def both_workers_logged() -> bool:
        nonlocal sessions
        _session(r)
        sessions += 1
        return all(f"[{w}]: NOQUEUE: disconnect=" in logfile.read_text() for w in workers)

    wait_until(both_workers_logged, what="both workers log into the emptied file")
    wait_until(lambda: _whole(logfile.read_text()) == 2 * sessions, what="every line")
    data = logfile.read_bytes()
    assert b"\0" not in data
    assert all(CONNECT.fullmatch(ln) or DISCONNECT.fullmatch(ln)
               for ln in data.decode().splitlines())


def test_a_start_refused_after_the_log_opened_is_in_the_log_too(relay_factory,  # noqa: ANN001
                                                                tmp_path: Path) -> None:
    """A start refused once the log file is open (a port held by another process, a key
    that does not load): the reason went to stderr only, and an admin reading the log
    file after `systemctl restart` saw the last 'daemon=stopped' and nothing since. The
    same line is in the log file (a file or syslog target)."""
    r = relay_factory(start=False)
    logfile = tmp_path / "mail.log"
    data = dict(r.config_data)
    data["log"] = {"target": f"file:{logfile}"}
    r.config.write_text(to_toml(data))
    held = socket.socket()
    held.bind(("127.0.0.1", r.ports["smtp"]))
    held.listen(1)
    try:
        res = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(r.config), "serve"],
                             capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert res.returncode == 1
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"authrelay: cannot listen on 127.0.0.1:{r.ports['smtp']}: address "
                           "already in use by pid "), line
    (logged,) = logfile.read_text().splitlines()
    why = line.removeprefix("authrelay: ")
    pid = re.search(r" authrelay\[(\d+)\]: ", logged)
    assert pid, logged
    assert logged.endswith(f"]: NOQUEUE: daemon=start failed, error={why}, pid={pid[1]}"), logged
