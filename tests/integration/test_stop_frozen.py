"""A stop (SIGTERM) of `serve` whose spool's filesystem is frozen (fsfreeze: a backup's, a
VM snapshot's; support.tmpfs.ext4 + frozen): every process ends within its bound
(stopdeadline.py), never waiting for the thaw, and nothing acknowledged is lost. And a
refusal on the frozen spool holds no other session of its process."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess, alive, children
from support.tmpfs import ext4, frozen
from support.wait import wait_until

from authrelay.spool.writer import SPILL, WRITE_BATCH

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _logged_in(r: RelayProcess) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", r.ports["submission"], timeout=60)
    s.starttls(context=ssl._create_unverified_context())
    s.ehlo("client.example")
    s.login("alice", PASSWORD)
    return s


def _in_data(r: RelayProcess) -> smtplib.SMTP:
    """A session of alice's past DATA's 354 (a message to bob on its way)."""
    s = _logged_in(r)
    s.mail("alice@relay.test")
    s.rcpt("bob@example.org")
    assert s.docmd("DATA")[0] == 354
    return s


@contextlib.contextmanager
def _serving_one_acknowledged(tmp_path: Path, workers: int, **limits: object
                              ) -> Iterator[tuple[RelayProcess, Path, list[str]]]:
    """`serve` with its state on an ext4 of its own (ext4(): frozen by the test), one
    message acknowledged and queued: (the server, the mount, the queued ids). Killed at
    the end. `limits`: more of [limits]."""
    with ext4(tmp_path / "fs") as fs:
        r = RelayProcess(tmp_path, {"state_dir": str(fs / "state"), "shutdown_timeout": "1s",
                                    "limits": {"queue_min_free": 0, **limits}},
                         workers=workers)
        r.state = fs / "state"  # (queued() reads its queue/)
        r.start()
        try:
            with _logged_in(r) as s:
                assert s.sendmail("alice@relay.test", ["bob@example.org"],
                                  b"Subject: kept\r\n\r\nacknowledged\r\n") == {}
            yield r, fs, r.wait_for(r.queued, what="the acknowledged message queued")
        finally:
            r.kill()


def _ended(pid: int) -> bool:
    """Exited (a zombie), or killed: SIGKILL pending on a process whose thread the kernel
    holds in a write to the frozen filesystem (nobody can end it before the thaw; it runs
    nothing more)."""
    if not alive(pid):
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    pending = {ln.split(":")[0]: int(ln.split()[1], 16) for ln in status.splitlines()
               if ln.startswith(("SigPnd:", "ShdPnd:"))}
    return any(v & (1 << (signal.SIGKILL - 1)) for v in pending.values())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_with_the_spool_frozen_ends_every_process_before_the_thaw(
        tmp_path: Path, workers: int) -> None:
    """With the spool frozen a SIGTERM did not finish until the thaw: the master unlinked
    its local submission and scheduler sockets on its event loop's thread, held in the
    kernel, and Python's exit joins threads waiting on the disk (seen: `systemctl stop`
    ended by TimeoutStopSec). Now the master exits (its deadline: shutdown_timeout + 20 s
    after the SIGTERM, naming what it could not finish), a worker held in the kernel is
    killed at shutdown_timeout + 10 s; the message answered 250 before is on disk, the one
    whose commit the freeze held (2 workers) got no 250."""
    with _serving_one_acknowledged(tmp_path, workers) as (r, fs, acked):
        assert r.proc is not None
        master = r.proc.pid
        ours = [master, *children(master)]
        cut = None
        if workers > 1:  # (one process: its loop is held by the cut session: the next test)
            cut = _logged_in(r)
            cut.mail("alice@relay.test")
            cut.rcpt("bob@example.org")
            assert cut.docmd("DATA")[0] == 354
            cut.send(b"Subject: cut\r\n\r\n" + b"x" * 1000 + b"\r\n")
        with frozen(fs, limit=120) as thawed:
            if cut is not None:
                cut.send(b".\r\n")  # its commit waits for the thaw: no 250 can go
            os.kill(master, signal.SIGTERM)
            wait_until(lambda: all(_ended(p) for p in ours), timeout=150,
                       what="every process of the instance ended or killed")
            assert not alive(master)  # the master itself exited
            assert not thawed.is_set(), "the stop waited for the thaw"
        if cut is not None:
            try:
                answer = cut.getreply()
            except smtplib.SMTPServerDisconnected:
                answer = (0, b"closed")
            assert answer[0] != 250, answer
        r.proc.wait(timeout=60)  # (reaped once the thaw let its held threads end)
        log = r.maillog()
        assert "daemon=stopped" in log, log[-3000:]
        assert r.queued() == acked  # the acknowledged one, kept


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_while_a_message_streams_into_the_frozen_spool_ends_in_time(
        tmp_path: Path, workers: int) -> None:
    """A message past 128 KiB streaming into its file when the spool is frozen: its writes
    are a commit thread's (the event loop wrote them, and the kernel held it there until
    the thaw, the stop left to the watcher below); the SIGTERM is the loop's own, every
    process ends by its deadline, before the thaw, the acknowledged message kept and the
    cut one never made ready."""
    with _serving_one_acknowledged(tmp_path, workers) as (r, fs, acked):
        assert r.proc is not None
        master = r.proc.pid
        ours = [master, *children(master)]
        held = _in_data(r)
        held.send(b"Subject: streamed\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200)
        wait_until(lambda: any(p.stat().st_size > SPILL for p in r.queued()),
                   what="the message streamed into its file")
        with frozen(fs, limit=150) as thawed:
            # past WRITE_BATCH more: its write waits for the thaw
            held.send((b"x" * 998 + b"\r\n") * (2 * WRITE_BATCH // 1000))
            wait_until(lambda: any(_a_thread_in_disk_wait(p) for p in ours),
                       what="its write held in the kernel")
            os.kill(master, signal.SIGTERM)
            wait_until(lambda: all(_ended(p) for p in ours), timeout=120,
                       what="every process of the instance ended or killed")
            assert not thawed.is_set(), "the stop waited for the thaw"
        assert sorted(set(r.queued()) - set(r.unready())) == acked
        r.proc.wait(timeout=60)


_HELD_MAIN = """
import os, signal, sys
from authrelay import stopdeadline
signal.signal(signal.SIGTERM, lambda *_: None)  # (serve's loop has its handler)
stopdeadline.watch(lambda: (os.write(1, b"stop\\n"), os._exit(3)))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
os.write(1, b"ready\\n")
sys.stdin.readline()
os.write(fd, b"x" * 4096)  # the filesystem is frozen now: held in the kernel
"""


def test_a_loop_held_on_the_frozen_disk_before_the_sigterm_still_stops(
        tmp_path: Path) -> None:
    """stopdeadline.watch: a process whose main thread the kernel holds in a write to a
    frozen filesystem never runs its signal handler (the SIGTERM stays pending on that
    thread), so its stop's deadline never started (a receiving loop that wrote a message
    past 128 KiB itself was held so, `workers = 1` ran until the thaw). The watcher
    thread takes the pending SIGTERM and starts the stop."""
    with ext4(tmp_path / "fs") as fs:
        proc = subprocess.Popen([sys.executable, "-c", _HELD_MAIN, str(fs / "f")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline() == b"ready\n"
            with frozen(fs, limit=60) as thawed:
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
                wait_until(lambda: _main_thread_in_disk_wait(proc.pid),
                           what="the main thread held in the kernel")
                os.kill(proc.pid, signal.SIGTERM)
                assert proc.stdout.readline() == b"stop\n"
                assert not thawed.is_set(), "the stop waited for the thaw"
        finally:
            proc.kill()
            proc.wait(timeout=60)


def _main_thread_in_disk_wait(pid: int) -> bool:
    """The process's main thread waits in the kernel, uninterruptible (state D)."""
    try:
        stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] == "D"


@pytest.mark.parametrize(("head", "refusal"), [
    (b"Subject: refused\r\n\r\n" + b"x" * 1000, b"550 5.6.0"),  # the engine's own
    (b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nhops", b"554 5.4.6"),  # the commit's
], ids=["long line", "max_hops"])
def test_a_refusal_on_the_frozen_spool_holds_no_other_session(
        tmp_path: Path, head: bytes, refusal: bytes) -> None:
    """A message refused once its early file was made, the spool then frozen: the event
    loop unlinked that file itself and the kernel held it there until the thaw, so every
    other session of the process waited with it (its NOOP answered only at the thaw). The
    unlink is a commit thread's now: the other session is answered while it is held, and
    the refused client gets its refusal at data_block_timeout (its file removed at the
    thaw); a refusal of the commit's own (max_hops) too, not the commit's 451 4.3.0."""
    with _serving_one_acknowledged(tmp_path, 1, data_block_timeout="8s",
                                   max_hops=2) as (r, fs, acked):
        assert r.proc is not None
        pid = r.proc.pid
        other = _logged_in(r)
        refused = _in_data(r)
        refused.send(head + b"\r\n")
        wait_until(lambda: len(r.queued()) > len(acked), what="its early file made")
        with frozen(fs, limit=50) as thawed:  # (below the client's 60 s timeout)
            refused.send(b".\r\n")  # refused: its early file's unlink waits for the thaw
            wait_until(lambda: _a_thread_in_disk_wait(pid), what="the unlink held")
            assert other.noop()[0] == 250
            assert not thawed.is_set(), "the other session answered only at the thaw"
            code, text = refused.getreply()
            assert b"%d %s" % (code, text[:5]) == refusal, (code, text)
            assert not thawed.is_set(), "the refusal answered only at the thaw"
        r.wait_for(lambda: r.queued() == acked, what="the refused message's file removed")
        other.quit()
        refused.close()


def _a_thread_in_disk_wait(pid: int) -> bool:
    """A thread of the process waits in the kernel, uninterruptible (state D)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "D":
                return True
    return False


def test_a_stop_cutting_a_session_in_data_on_the_frozen_spool_still_says_421(
        tmp_path: Path) -> None:
    """A stop cancelling a session in DATA sends its 421 once the message's early file
    is removed (a commit thread's); with the spool frozen that removal waits for the
    thaw, so the 421 waits at most session.STOP_DISCARD_WAIT (not data_block_timeout,
    10 min here): the client still gets `421 4.3.2` and the process ends by its deadline,
    before the thaw."""
    with _serving_one_acknowledged(tmp_path, 1) as (r, fs, acked):
        assert r.proc is not None
        master = r.proc.pid
        cut = _in_data(r)
        cut.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
        wait_until(lambda: len(r.queued()) > len(acked), what="its early file made")
        with frozen(fs, limit=120) as thawed:
            os.kill(master, signal.SIGTERM)
            code, text = cut.getreply()
            assert b"%d %s" % (code, text[:5]) == b"421 4.3.2", (code, text)
            wait_until(lambda: _ended(master), timeout=100, what="the process ended")
            assert not thawed.is_set(), "the 421 or the stop waited for the thaw"
        r.proc.wait(timeout=60)
        assert sorted(set(r.queued()) - set(r.unready())) == acked


def test_a_large_message_streaming_into_the_frozen_spool_holds_no_other_session(
        tmp_path: Path) -> None:
    """A message past 128 KiB streams into its queue file; the event loop wrote each piece
    itself, so with the spool frozen it was held in the kernel by the next piece, and every
    other session of the worker with it (a NOOP answered only at the thaw). The writes are
    a commit thread's now: the other session is answered while the writer is held, the
    streaming client is simply not read (its memory bounded: spool/writer.py SPILL), and
    at the thaw its message is received whole and queued."""
    line = b"x" * 76 + b"\r\n"
    first = b"Subject: big\r\n\r\n" + line * (3 * SPILL // len(line))
    more = line * ((2 << 20) // len(line))  # 2 MiB, sent while frozen
    with _serving_one_acknowledged(tmp_path, 1) as (r, fs, acked):
        assert r.proc is not None
        pid = r.proc.pid
        other = _logged_in(r)
        big = _in_data(r)
        big.send(first)  # past SPILL: streamed into its file
        wait_until(lambda: len(r.queued()) > len(acked), what="its file made")
        sender = threading.Thread(target=big.send, args=(more + b".\r\n",), daemon=True)
        with frozen(fs, limit=50) as thawed:  # (below the clients' 60 s timeout)
            sender.start()
            wait_until(lambda: _a_thread_in_disk_wait(pid), what="a write held")
            assert other.noop()[0] == 250
            assert not thawed.is_set(), "the other session answered only at the thaw"
        sender.join(60)
        code, text = big.getreply()
        assert code == 250, (code, text)
        qid = text.split()[-1].decode()
        r.wait_for(lambda: any(p.name == qid for p in r.queued()), what="queued")
        size = (r.queue_dir / qid).stat().st_size
        assert size > len(first) + len(more)
        other.quit()
        big.quit()
