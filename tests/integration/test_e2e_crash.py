"""At least once, never lost: SIGKILL a real `authrelay serve` at the worst moments.

- while the MX holds its reply to the final dot (the message may or may not have
  arrived): after a restart it is delivered again;
- right after the 250 to the submitting client, before any delivery could happen: the
  spool file is intact (envelope and message) and is delivered after the restart;
- after one recipient of a message was delivered and while another is in DATA: only the
  unfinished one is tried again (per-recipient state survives the crash);
- a worker (not the master) killed while authenticated sessions are in DATA: their
  unfinished queue files go without a restart, the other worker's live ones stay.
Fake DNS and MX run in this test process (threads); the relay is a separate process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import PASSWORD, RelayProcess, children
from test_e2e_delivery import (
    BODY,
    SENDER,
    ZONES,
    assert_clean_wire,
    gone,
    mx_overrides,
    split_received,
    submit,
)

from authrelay.spool.envelope import PENDING, SENT
from authrelay.spool.store import Spool

pytestmark = pytest.mark.slow


def in_data(server: FakeSMTPServer, n: int = 1) -> bool:
    """True once `n` messages' final dots reached the server (whatever its reply)."""
    return sum(w.count(b"\r\n.\r\n") for w in server.wire) >= n


def spool_of(relay: RelayProcess) -> Spool:
    return Spool(relay.state / "spool")


def test_sigkill_while_mx_holds_the_data_reply(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2", data_delay=60)  # the reply to the final dot never comes
    relay = relay_factory(mx_overrides(dns, fake_mx.port, data_timeout="30s"))
    qid = submit(relay, ["bob@example.test"])
    relay.wait_for(lambda: in_data(mx1), what="the final dot at the MX")
    relay.kill()
    assert mx1.messages == []  # not acknowledged: the relay cannot know it arrived
    assert (relay.queue_dir / qid).exists()
    assert spool_of(relay).load(qid).recipients[0].state == PENDING

    mx1.data_delay = 0
    relay.start()
    relay.wait_for(lambda: gone(relay, qid), what="delivery after the restart")
    assert len(mx1.messages) >= 1  # at least once
    m = mx1.messages[-1]
    assert m.rcpt_tos == ["bob@example.test"] and split_received(m.content)[1] == BODY
    assert_clean_wire(mx1)
    assert relay.queued() == [] and sender_mx.messages == []
    assert sum(f" {qid}: " in ln and "stat=Sent" in ln
               for ln in relay.maillog().splitlines()) == 1


def test_sigkill_right_after_250_on_submission(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2")
    # DNS never answers: the relay cannot get anywhere before it is killed.
    dns.update({"example.test": "TIMEOUT"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port, dns_timeout="20s"))
    qid = submit(relay, ["bob@example.test", "carol@example.test"])
    relay.kill()

    # The acknowledged message is on disk, intact, nothing delivered yet.
    assert [p.name for p in relay.queued()] == [qid]
    stored = relay.message_bytes(relay.queue_dir / qid)
    received, rest = split_received(stored)
    assert rest == BODY and f"id {qid}".encode() in received
    env = spool_of(relay).load(qid)
    assert env.sender == SENDER and env.auth_user == "alice"
    assert [(r.address, r.state, r.attempts) for r in env.recipients] == [
        ("bob@example.test", PENDING, 0), ("carol@example.test", PENDING, 0)]
    assert mx1.connections == 0

    dns.update({"example.test": ZONES["example.test"]})
    relay.start()
    relay.wait_for(lambda: gone(relay, qid), what="delivery after the restart")
    assert len(mx1.messages) == 1
    m = mx1.messages[0]
    assert m.rcpt_tos == ["bob@example.test", "carol@example.test"]
    assert m.content == stored  # what was spooled is exactly what went out


def test_sigkill_keeps_per_recipient_state(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    a = fake_mx("127.0.0.5")
    c = fake_mx("127.0.0.7", data_delay=60)
    relay = relay_factory(mx_overrides(dns, fake_mx.port, data_timeout="30s"))
    qid = submit(relay, ["ann@a.test", "cat@c.test"])

    def ann_sent() -> bool:
        try:
            env = spool_of(relay).load(qid)
        except FileNotFoundError:
            return False
        return {r.address: r.state for r in env.recipients}["ann@a.test"] == SENT

    relay.wait_for(ann_sent, what="a.test's success saved in the spool")
    relay.wait_for(lambda: in_data(c), what="the final dot at c.test's MX")
    relay.kill()
    assert [m.rcpt_tos for m in a.messages] == [["ann@a.test"]]

    c.data_delay = 0
    relay.start()
    relay.wait_for(lambda: gone(relay, qid), what="delivery after the restart")
    assert [m.rcpt_tos for m in c.messages][-1:] == [["cat@c.test"]]
    # a.test already had it: the restart did not send it again.
    assert (len(a.messages), a.connections) == (1, 1)


def _in_data(relay: RelayProcess, head: bytes) -> tuple[smtplib.SMTP, Path]:
    """alice's session (STARTTLS, AUTH) in DATA with `head` sent, and the queue file made
    for it while the message arrives (not ready; its worker holds the lock)."""
    before = set(relay.unready())
    s = smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20)
    s.ehlo("laptop.test")
    s.starttls(context=relay.client_context())
    s.ehlo("laptop.test")
    s.login("alice", PASSWORD)
    assert s.mail(SENDER)[0] == 250 and s.rcpt("bob@example.test")[0] == 250
    s.putcmd("data")
    assert s.getreply()[0] == 354
    s.send(head)
    (path,) = relay.wait_for(lambda: [p for p in relay.unready() if p not in before],
                             what="the early queue file of the message in DATA")
    return s, path


def _holder(relay: RelayProcess, path: Path) -> int:
    """The worker with `path` open (the receiving one)."""
    def find() -> int | None:
        for pid in children(relay.proc.pid):
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) == str(path):
                            return pid
        return None
    return relay.wait_for(find, what=f"the worker holding {path.name}")


def test_a_killed_workers_unfinished_files_go_without_a_restart(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """kill -9 of a worker while authenticated sessions are in DATA: their unready
    queue files (made at DATA) are removed by the master once past UNFINISHED_AGE, one
    maillog line each, without a restart (they stayed until the next start, so a client
    that got workers killed, or the OOM killer, filled the spool). A live slow DATA on
    the other worker keeps its file and its message is accepted; a message committed
    before, still queued, is delivered."""
    mx1 = fake_mx("127.0.0.2")
    dns.update({"example.test": "TIMEOUT"})  # nothing delivered until the end
    relay = relay_factory(mx_overrides(dns, fake_mx.port), workers=2)
    committed = submit(relay, ["bob@example.test"])
    head = b"From: Alice <alice@sender.test>\r\nSubject: slow\r\n\r\n"
    sessions: dict[int, list[tuple[smtplib.SMTP, Path]]] = {}
    for _ in range(40):  # the kernel spreads connections over the workers
        s, path = _in_data(relay, head)
        sessions.setdefault(_holder(relay, path), []).append((s, path))
        if len(sessions) == 2:
            break
    assert len(sessions) == 2, "every session landed on one worker"
    victim, survivor = sessions
    os.kill(victim, signal.SIGKILL)
    for s, path in sessions[victim]:
        s.close()
        relay.wait_log(rf"{path.name}: warning=unfinished queue file removed")
        assert not path.exists()
    assert all(p.exists() for _, p in sessions[survivor])
    assert (relay.queue_dir / committed).exists()  # committed: never swept
    qids = [committed]
    for s, _ in sessions[survivor]:  # the live ones finish after the sweep
        s.send(b"Hello.\r\n.\r\n")
        code, text = s.getreply()
        assert code == 250, (code, text)
        qids.append(text.decode().rsplit(" ", 1)[-1])
        s.quit()
    dns.update({"example.test": ZONES["example.test"]})
    relay.wait_for(lambda: all(gone(relay, q) for q in qids), what="every message delivered")
    assert len(mx1.messages) == len(qids)
    assert relay.unready() == []


def test_a_worker_killed_during_the_masters_start_is_swept_after_it(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The master told its scheduler of a dead worker (`receiver_died`: a scan, and the
    sweep of the worker's unfinished files UNFINISHED_AGE later) only once the scheduler
    had started: a worker killed while the master was still starting (its recovery done,
    the queue still being scanned) left its unready file to the next rescan's sweep (60 s;
    an hour here). Here the master's start is held after its recovery (a sitecustomize
    hook makes it wait for a file, as a slow disk would) while a worker in DATA is killed
    and reaped; the file is swept once the start ends, without a rescan."""
    gate, held = tmp_path / "start-may-end", tmp_path / "start-held"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import asyncio, os\n"
        "import authrelay.scheduler.scheduler as s\n"
        "s.RESCAN_INTERVAL = 3600.0\n"
        "_warn = s.Scheduler._after_crash\n"
        "async def _held(self, leftovers):\n"
        f"    open({str(held)!r}, 'w').close()\n"
        f"    while not os.path.exists({str(gate)!r}):\n"
        "        await asyncio.sleep(0.05)\n"
        "    await _warn(self, leftovers)\n"
        "s.Scheduler._after_crash = _held\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    relay = relay_factory(mx_overrides(dns, fake_mx.port), workers=2)
    relay.wait_for(held.exists, what="the master's start held after its recovery")
    s, path = _in_data(relay, b"From: Alice <alice@sender.test>\r\nSubject: s\r\n\r\n")
    victim = _holder(relay, path)
    os.kill(victim, signal.SIGKILL)
    s.close()
    relay.wait_log(rf"error=worker {victim} died \(killed by SIGKILL\)")
    assert "daemon=started (master)" not in relay.maillog()  # reaped during the start
    gate.touch()
    relay.wait_log(r"daemon=started \(master\)")
    relay.wait_log(rf"{path.name}: warning=unfinished queue file removed")
    assert not path.exists()
