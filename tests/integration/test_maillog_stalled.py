"""A log target that takes nothing does not hold up deliveries.

Since 25cf3be the scheduler is told of a new message once the receiving worker's maillog
writer has written its `from=` line (MailLog.then). A real `authrelay serve` (master and
two workers) logs into a FIFO (`[log] target = "file:FIFO"`) whose reader the test pauses
with the pipe full, as a log pipe nobody reads or a hung NFS mount: every write of every
process's writer thread blocks. A message accepted then still reaches the next hop
(aiosmtpd) within spool/submit.NOTICE_WAIT, not at the scheduler's rescan (made an hour
here by a sitecustomize hook, so the test cannot pass through it), and once the reader
reads again every line of the message is there, each process's in its order.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import RelayProcess, alive, children
from support.wait import wait_until

pytestmark = pytest.mark.slow

_HOOK = ("import authrelay.scheduler.scheduler\n"
         "authrelay.scheduler.scheduler.RESCAN_INTERVAL = 3600.0\n")


class FifoReader:
    """The reading end of a FIFO, read by a thread that can be paused: paused, it reads
    nothing, and `fill()` leaves the pipe with no room, so every writer blocks."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._data = bytearray()
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()  # paused, and not inside a read
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import select

        while not self._stop:
            if not self._go.is_set():
                self._idle.set()
                self._go.wait(0.2)
                continue
            self._idle.clear()
            if select.select([self._fd], [], [], 0.2)[0]:
                try:
                    self._data += os.read(self._fd, 65536)
                except BlockingIOError:
                    continue

    def pause(self) -> None:
        self._go.clear()
        assert self._idle.wait(5)

    def fill(self) -> int:
        """Bytes written until the pipe took no more (empty lines: no log line)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        n = 0
        try:
            while True:
                try:
                    n += os.write(fd, b"\n" * 4096)
                except BlockingIOError:
                    try:  # the last page's room, a byte at a time
                        while True:
                            n += os.write(fd, b"\n")
                    except BlockingIOError:
                        return n
        finally:
            os.close(fd)

    def resume(self) -> None:
        self._go.set()

    def lines(self) -> list[str]:
        return [ln for ln in bytes(self._data).decode(errors="replace").splitlines() if ln]

    def close(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join()
        os.close(self._fd)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[FifoReader]:
    reader = FifoReader(tmp_path / "maillog.fifo")
    yield reader
    reader.close()


def _submit(r: RelayProcess) -> str:
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=20) as s:
        s.ehlo("client.example")
        assert s.mail("someone@remote.example")[0] == 250
        assert s.rcpt("bob@local.test")[0] == 250
        code, msg = s.data(b"Subject: stalled log\r\n\r\nbody\r\n")
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[1]


def _kill(workers: list[int]) -> None:
    """kill -9 of `workers`, returning once each is dead (a zombie at most). A process
    blocked writing to the full pipe and sent SIGKILL leaves its write only when it next
    runs, and the kernel looks for room before it looks for the signal: the reader resumed
    before then (a loaded machine: seen in CI) would let the dying worker write the line
    the test means it to die owing."""
    for p in workers:
        os.kill(p, signal.SIGKILL)
    for p in workers:
        wait_until(lambda p=p: not alive(p), what=f"worker {p} dead")


def _stalled(relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory,
             fifo: FifoReader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             workers: int = 2) -> tuple[RelayProcess, FakeSMTPServer]:
    """A serve (two workers, or one process) delivering to a next hop, its log stalled
    once it started."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    smart = fake_mx("127.0.0.2")
    r = relay_factory({"log": {"target": f"file:{fifo.path}"},
                       "relay": {"smart_host": [smart.address], "smart_host_tls": "none"}},
                      workers=workers, start=False)
    r.start()
    n = workers + 1 if workers > 1 else 1
    wait_until(lambda: sum("daemon=started" in ln for ln in fifo.lines()) == n,
               what=lambda: f"{n} processes started: {fifo.lines()[-20:]}")
    fifo.pause()
    assert fifo.fill() > 0  # from now on every write to the log blocks
    return r, smart


def test_a_message_accepted_while_the_log_takes_nothing_is_delivered(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory, fifo: FifoReader,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r, smart = _stalled(relay_factory, fake_mx, fifo, tmp_path, monkeypatch)
    qid = _submit(r)
    # Delivered although no process can write a line: the notice did not wait for the
    # from= line (the rescan is an hour away).
    r.wait_for(lambda: len(smart.messages) == 1, timeout=30,
               what="the message delivered while the log is stalled")
    assert qid not in "\n".join(fifo.lines())

    fifo.resume()  # the log drains: every line of the message, each process's in order
    wait_until(lambda: any(f" {qid}: status=removed" in ln for ln in fifo.lines()),
               what=lambda: f"the message's lines: {fifo.lines()[-20:]}")
    mine = [ln for ln in fifo.lines() if f" {qid}: " in ln]
    pids = {m[1] for ln in mine if (m := re.search(r" authrelay\[(\d+)\]: ", ln))}
    assert len(pids) == 2, mine  # the worker's from=, the master's delivery lines
    kinds = [re.search(r": (from|to|status)=", ln)[1] for ln in mine]  # type: ignore[index]
    assert sorted(kinds) == ["from", "status", "to"], mine
    assert kinds.index("to") < kinds.index("status"), mine  # the master's, in its order
    assert "stat=Sent" in next(ln for ln in mine if f" {qid}: to=" in ln), mine
    r.stop()


def test_a_worker_killed_before_its_notice_went_leaves_no_message_for_the_rescan(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory, fifo: FifoReader,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notice of a committed message goes from its worker once the from= line is
    written, or NOTICE_WAIT later (the log stalled here, so the window is seconds, not
    the writer's 5 ms gather): a worker killed (kill -9) inside it took the notice with
    it, and the message waited for the master's next rescan. The master scans the queue
    when it reaps a dead worker. The worker's from= line died with it too (queued for its
    stalled writer): the master writes it from the queue file (`logged_by=scheduler`),
    once, before the message's delivery lines; a message whose worker wrote its own line
    gets no second one."""
    r, smart = _stalled(relay_factory, fake_mx, fifo, tmp_path, monkeypatch)
    assert r.proc is not None
    workers = [p for p in children(r.proc.pid)
               if Path(f"/proc/{p}/comm").read_text().startswith("authrelay-w")]
    assert len(workers) == 2
    earlier: list[str] = []  # delivered by the notice of a worker that lived on
    for _ in range(5):  # a round counts when the workers stopped before the notice went
        t0 = time.monotonic()
        qid = _submit(r)
        earlier.append(qid)
        for p in workers:
            os.kill(p, signal.SIGSTOP)
        if time.monotonic() - t0 < 1.0 and not smart.messages:  # < NOTICE_WAIT: not sent
            break
        for p in workers:
            os.kill(p, signal.SIGCONT)
        r.wait_for(lambda q=qid: not (r.queue_dir / q).exists(), what=f"{qid} delivered")
    else:
        pytest.fail("the workers were never stopped within a second of a 250")
    assert (r.queue_dir / qid).exists()
    _kill(workers)
    earlier.remove(qid)
    r.wait_for(lambda: any(qid.encode() in m.content for m in smart.messages), timeout=30,
               what="the message delivered after its worker died (the rescan is an hour away)")
    fifo.resume()
    wait_until(lambda: any(f" {qid}: status=removed" in ln for ln in fifo.lines()),
               what=lambda: f"the message's lines: {fifo.lines()[-20:]}")
    mine = [ln for ln in fifo.lines() if f" {qid}: " in ln]
    froms = [ln for ln in mine if f" {qid}: from=<someone@remote.example>" in ln]
    assert len(froms) == 1, mine  # written once, by the master
    assert froms[0].endswith(", logged_by=scheduler"), froms
    assert f"authrelay[{r.proc.pid}]: " in froms[0], froms
    assert "nrcpts=1, relay=" in froms[0] and "proto=ESMTP" in froms[0], froms
    first_to = next(i for i, ln in enumerate(mine) if f" {qid}: to=" in ln)
    assert mine.index(froms[0]) < first_to, mine
    for q in earlier:  # their workers' own lines, and no second one
        theirs = [ln for ln in fifo.lines() if f" {q}: from=" in ln]
        assert len(theirs) == 1 and "logged_by" not in theirs[0], theirs
    r.stop()


def test_a_worker_killed_after_its_notice_went_by_the_timer_leaves_one_from_line(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory, fifo: FifoReader,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log stalled past NOTICE_WAIT: the notice goes by its timer, the message is
    delivered and removed, its from= line still queued in its worker's writer. The
    worker killed then (kill -9) took that line with it (8ddf930: no from= line at all):
    the master writes it (`logged_by=scheduler`) when it reaps the worker. A worker
    whose line was written after its timer's notice, killed later, gets no second one."""
    r, smart = _stalled(relay_factory, fake_mx, fifo, tmp_path, monkeypatch)
    assert r.proc is not None
    workers = [p for p in children(r.proc.pid)
               if Path(f"/proc/{p}/comm").read_text().startswith("authrelay-w")]
    lived = _submit(r)  # its line written after its notice: the worker said so
    r.wait_for(lambda: not (r.queue_dir / lived).exists(), timeout=30,
               what=f"{lived} delivered by its notice's timer")
    fifo.resume()
    wait_until(lambda: any(f" {lived}: from=" in ln for ln in fifo.lines()),
               what=lambda: f"its worker's from= line: {fifo.lines()[-20:]}")
    fifo.pause()
    assert fifo.fill() > 0
    qid = _submit(r)
    r.wait_for(lambda: any(qid.encode() in m.content for m in smart.messages), timeout=30,
               what="the message delivered by its notice's timer")
    r.wait_for(lambda: not (r.queue_dir / qid).exists(), what=f"{qid} removed")
    _kill(workers)
    fifo.resume()
    wait_until(lambda: sum("daemon=started" in ln for ln in fifo.lines()) >= 5,
               what=lambda: f"the workers replaced: {fifo.lines()[-20:]}")
    wait_until(lambda: any(f" {qid}: from=" in ln for ln in fifo.lines()),
               what=lambda: f"the message's from= line: {fifo.lines()[-20:]}")
    froms = [ln for ln in fifo.lines() if f" {qid}: from=<someone@remote.example>" in ln]
    assert len(froms) == 1, froms
    assert froms[0].endswith(", logged_by=scheduler"), froms
    assert f"authrelay[{r.proc.pid}]: " in froms[0], froms
    theirs = [ln for ln in fifo.lines() if f" {lived}: from=" in ln]
    assert len(theirs) == 1 and "logged_by" not in theirs[0], theirs
    r.stop()


def _refused(r: RelayProcess, rcpt: str) -> str:
    """A relay attempt refused at RCPT (550 5.7.1): the reply's text."""
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=20) as s:
        s.ehlo("client.example")
        assert s.mail("someone@remote.example")[0] == 250
        code, msg = s.rcpt(rcpt)
        assert code == 550, msg
        return msg.decode()


def test_a_worker_killed_before_its_writer_wrote_a_refusal_leaves_the_line_to_the_master(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory, fifo: FifoReader,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal's reply goes out before its `reject=` line is written (up to the
    writer's 5 ms gather; the log stalled here, for as long as the test holds it): a
    worker killed (kill -9) in between took the line with it, the client refused with no
    trace in the maillog. The line is kept in the worker's slot of owedlines until it is
    written; the master, reaping the worker, writes it (`logged_by=master`), once."""
    r, _smart = _stalled(relay_factory, fake_mx, fifo, tmp_path, monkeypatch)
    assert r.proc is not None
    workers = [p for p in children(r.proc.pid)
               if Path(f"/proc/{p}/comm").read_text().startswith("authrelay-w")]
    assert len(workers) == 2
    refused = [f"victim{n}@elsewhere.example" for n in range(4)]
    for rcpt in refused:  # the reply sent, the line waiting for the stalled writer
        assert "Relaying denied" in _refused(r, rcpt)
    _kill(workers)
    fifo.resume()
    wait_until(lambda: sum("daemon=started" in ln for ln in fifo.lines()) >= 5,
               what=lambda: f"the workers replaced: {fifo.lines()[-20:]}")
    for rcpt in refused:
        mine = [ln for ln in fifo.lines() if f"<{rcpt}>" in ln]
        assert len(mine) == 1, (rcpt, fifo.lines()[-30:])
        assert "NOQUEUE: reject=550 5.7.1" in mine[0] and "Relaying denied" in mine[0], mine
        assert mine[0].endswith(", logged_by=master"), mine
        stamp = re.search(r" authrelay\[(\d+)\]: ", mine[0])
        assert stamp and int(stamp[1]) in workers, mine  # as the worker would have written it
    lived = "survivor@elsewhere.example"  # a worker that writes its line: no second one
    _refused(r, lived)
    r.stop()
    theirs = [ln for ln in fifo.lines() if f"<{lived}>" in ln]
    assert len(theirs) == 1 and "logged_by" not in theirs[0], theirs


def test_a_refusal_line_owed_by_a_killed_instance_is_written_by_its_next_start(
        relay_factory: Callable[..., RelayProcess], fifo: FifoReader) -> None:
    """`workers = 1`: the one process refuses, its log stalled, and is killed (kill -9)
    before its writer wrote the line; nobody is left to reap it. The next start writes
    it from the process's owedlines slot (`logged_by=master`), once."""
    r = relay_factory({"log": {"target": f"file:{fifo.path}"}}, workers=1, start=False)
    r.start()
    wait_until(lambda: any("daemon=started" in ln for ln in fifo.lines()),
               what=lambda: f"started: {fifo.lines()[-20:]}")
    fifo.pause()
    assert fifo.fill() > 0
    assert "Relaying denied" in _refused(r, "victim@elsewhere.example")
    assert r.proc is not None
    killed = r.proc.pid
    r.kill()
    fifo.resume()
    assert not any("<victim@elsewhere.example>" in ln for ln in fifo.lines())
    r.start()
    wait_until(lambda: any("<victim@elsewhere.example>" in ln for ln in fifo.lines()),
               what=lambda: f"the killed process's refusal: {fifo.lines()[-20:]}")
    r.stop()
    mine = [ln for ln in fifo.lines() if "<victim@elsewhere.example>" in ln]
    assert len(mine) == 1, mine
    assert f" authrelay[{killed}]: NOQUEUE: reject=550 5.7.1 " in mine[0], mine
    assert mine[0].endswith(", logged_by=master"), mine


def test_a_single_process_killed_before_its_own_notice_went_delivers_after_its_restart(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory, fifo: FifoReader,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`workers = 1`: the master receives, and its own commit's notice waits for its
    from= line (the writer's 5 ms gather; the log stalled here, NOTICE_WAIT). A kill -9
    inside leaves a ready file (0710) nobody was told of, and no process to reap: the
    restart's scan (every ready file of queue/, oldest first, before the start returns)
    finds it; it is delivered once, its from= line written once, by the scheduler, before
    its delivery line. The rescan is an hour away: only the start's scan can find it."""
    r, smart = _stalled(relay_factory, fake_mx, fifo, tmp_path, monkeypatch, workers=1)
    assert r.proc is not None
    for _ in range(5):  # a round counts when the process stopped before its notice went
        t0 = time.monotonic()
        qid = _submit(r)
        os.kill(r.proc.pid, signal.SIGSTOP)
        if time.monotonic() - t0 < 1.0 and not smart.messages:  # < NOTICE_WAIT: not sent
            break
        os.kill(r.proc.pid, signal.SIGCONT)
        r.wait_for(lambda q=qid: not (r.queue_dir / q).exists(), what=f"{qid} delivered")
        smart.messages.clear()
    else:
        pytest.fail("the process was never stopped within a second of a 250")
    assert (r.queue_dir / qid).stat().st_mode & 0o777 == 0o710  # ready, its line owed
    os.kill(r.proc.pid, signal.SIGKILL)
    r.proc.wait(timeout=30)
    fifo.resume()
    r.start()
    r.wait_for(lambda: any(qid.encode() in m.content for m in smart.messages), timeout=30,
               what="the message delivered after the restart (the rescan is an hour away)")
    wait_until(lambda: any(f" {qid}: status=removed" in ln for ln in fifo.lines()),
               what=lambda: f"the message's lines: {fifo.lines()[-20:]}")
    r.stop()
    assert sum(qid.encode() in m.content for m in smart.messages) == 1
    mine = [ln for ln in fifo.lines() if f" {qid}: " in ln]
    froms = [ln for ln in mine if f" {qid}: from=<someone@remote.example>" in ln]
    assert len(froms) == 1 and froms[0].endswith(", logged_by=scheduler"), mine
    first_to = next(i for i, ln in enumerate(mine) if f" {qid}: to=" in ln)
    assert mine.index(froms[0]) < first_to, mine


def _attempts(r: RelayProcess, qid: str) -> int:
    """The delivery attempts `qid`'s state file records (0: none saved yet)."""
    import json

    try:
        state = json.loads((r.queue_dir / f"{qid}.state").read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return max(int(rc.get("attempts", 0)) for rc in state["recipients"])


def _accepted_while_stalled(relay_factory: Callable[..., RelayProcess],
                            fifo: FifoReader) -> tuple[RelayProcess, str]:
    """`workers = 1`, retries every second: started, the log then stalled (the FIFO full),
    one message accepted (its from= line waiting in the writer): the relay, its queue id."""
    r = relay_factory({"log": {"target": f"file:{fifo.path}"},
                       "delivery": {"retry": ["1s"]}}, workers=1, start=False)
    r.start()
    wait_until(lambda: any("daemon=started" in ln for ln in fifo.lines()),
               what=lambda: f"started: {fifo.lines()[-20:]}")
    fifo.pause()
    assert fifo.fill() > 0
    return r, _submit(r)


def test_a_message_of_the_master_s_own_deferred_while_its_line_waits_gets_one_from_line(
        relay_factory: Callable[..., RelayProcess], fifo: FifoReader) -> None:
    """`workers = 1`, the log stalled: the master's own commit's notice goes by its timer
    (NOTICE_WAIT) with the from= line still queued in its own writer. In-process that
    notice did not say the line was owed (a worker's datagram does), so the message,
    deferred (the next hop is down) and loaded again later, looked like one whose
    producer died: the scheduler wrote the line (`logged_by=scheduler`), and the
    writer, once the log took lines again, its own: two from= lines."""
    r, qid = _accepted_while_stalled(relay_factory, fifo)
    # Loaded again past LOG_OWED_WAIT (3 s) after its commit, its line still unwritten.
    r.wait_for(lambda: _attempts(r, qid) >= 4, timeout=60,
               what="the message deferred four times while the log is stalled")
    fifo.resume()
    wait_until(lambda: sum(f" {qid}: to=" in ln for ln in fifo.lines()) >= 4,
               what=lambda: f"the message's lines: {fifo.lines()[-20:]}")
    r.stop()
    froms = [ln for ln in fifo.lines() if f" {qid}: from=" in ln]
    assert len(froms) == 1, froms
    assert "logged_by" not in froms[0], froms  # the producer's own: it never died

@pytest.mark.root
@pytest.mark.parametrize("workers", [1, 2])
def test_a_refusal_with_the_spool_frozen_leaves_every_client_answered(
        tmp_path: Path, workers: int) -> None:
    """Since d3d246f a refusal line is copied into a shared file mapping in the spool
    (owed-lines) on the event loop. With the spool's filesystem frozen (fsfreeze: a
    backup's, a VM snapshot's), that write faults and blocks until the thaw: the process's
    event loop stopped at its first refusal, the refused client had no reply, nor did any
    other client (seen: a real serve, the spool on a frozen ext4). The book lives in
    /dev/shm now: the refusal is answered, a new client greeted, while the spool is
    frozen; and the book's file is removed at the stop."""
    from support.tmpfs import ext4, frozen

    from authrelay import owedlines

    with ext4(tmp_path / "fs") as fs:
        r = RelayProcess(tmp_path, {"state_dir": str(fs / "state")}, workers=workers)
        r.start()
        try:
            with frozen(fs, limit=60):  # (thawed at the end, or by its timer)
                for _ in range(2):  # (each worker's first refusal)
                    with smtplib.SMTP("127.0.0.1", r.ports["submission"], timeout=20) as s:
                        s.starttls(context=ssl._create_unverified_context())
                        s.ehlo("client.example")
                        code, msg = s.docmd("AUTH", "PLAIN !not-base64!")  # (no user DB read)
                        assert code == 501, msg
                with smtplib.SMTP("127.0.0.1", r.ports["submission"], timeout=20) as s:
                    assert s.noop()[0] == 250
        finally:
            r.stop()  # (whatever the thaw did: no server left behind)
        assert not owedlines.book_path(fs / "state" / "spool").exists()
        assert r.maillog().count("reject=501 5.5.2") == 2, r.maillog()[-2000:]


def test_an_owed_from_line_the_scheduler_queued_survives_its_kill(
        relay_factory: Callable[..., RelayProcess], fifo: FifoReader) -> None:
    """A message whose producer died owing its from= line (`workers = 1`, the log
    stalled, kill -9 after the 250) gets that line from the next start's scheduler. The
    scheduler cleared the file's mark as it queued the line, not once the line was
    written: killed again before its writer wrote it (seen: torture run, a worker killed
    after a 250, the master killed 3 s later: the message delivered twice and no from=
    line at all), the message had none ever. The mark now stays until the line is
    written: the start after that writes it, once."""
    r, qid = _accepted_while_stalled(relay_factory, fifo)
    r.kill()  # its own from= line still in its writer's queue: the file's mark stays
    assert (r.queue_dir / qid).stat().st_mode & 0o777 == 0o710
    r.start()  # the log still stalled: its scheduler's from= line queued, not written
    wait_until(lambda: _attempts(r, qid) >= 1, what="a delivery attempt after the line")
    r.kill()
    assert (r.queue_dir / qid).stat().st_mode & 0o777 == 0o710, "marked as written"
    fifo.resume()
    r.start()
    wait_until(lambda: any(f" {qid}: from=" in ln for ln in fifo.lines()),
               what=lambda: f"{qid}'s from= line: {fifo.lines()[-20:]}")
    r.stop()
    froms = [ln for ln in fifo.lines() if f" {qid}: from=" in ln]
    assert len(froms) == 1 and froms[0].endswith(", logged_by=scheduler"), froms
