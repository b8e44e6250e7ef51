"""kill -9 during a delivery: after the restart the maillog names every recipient that was
in flight (`warning=delivery to <rcpt> was in progress when authrelay stopped: it may have
been delivered before the crash`), the message is delivered again (at least once), and a
clean stop leaves no such warning."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import threading
import time

import pytest
from fakes.smtpserver import FakeSMTPServer
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, client_ctx, plain
from support.procfs import unread_from
from support.sessions import session_in_progress

pytestmark = pytest.mark.slow

WARNING = "may have been delivered before the crash"


def _recovered(r: RelayProcess, qid: str, rcpt: str) -> str:
    """The start's line for `rcpt` of `qid`, which a crash left delivered and not saved:
    `recorded=` when the journal says the run wrote its stat=Sent line, else that line
    written by the start (`logged_by=start`); either way a count of stat=Sent has it."""
    rc = re.escape(rcpt)
    line = r.wait_log(rf"{qid}: (?:to=<{rc}>, .*stat=Sent \(sent before the crash .*"
                      rf"logged_by=start|recorded=<{rc}>, status=recorded as delivered "
                      r"\(its delivery line)")
    assert re.search(rf"{qid}: to=<{rc}>, .*stat=Sent", r.maillog()), r.maillog()
    return line


def _submit(r: RelayProcess, rcpts: list[str]) -> None:
    with RawClient(r.ports["submissions"], tls=client_ctx()) as c:
        assert c.reply().code == 220
        c.cmd("EHLO t")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
        for rc in rcpts:  # ("addr PARAM=..": with RCPT parameters)
            addr, _, params = rc.partition(" ")
            assert c.cmd(f"RCPT TO:<{addr}> {params}".rstrip()).code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: in flight\r\n\r\nx\r\n.\r\n")
        assert c.reply().code == 250


def _journal_begun(r: RelayProcess) -> list[dict]:
    path = r.state / "spool" / "inflight.log"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if '"b"' in ln]


def test_kill_during_delivery_names_the_recipients(relay_factory, fake_mx) -> None:
    reply = threading.Event()  # the final dot is answered once the relay has been killed
    smart = fake_mx("127.0.0.2", data_gate=reply)
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"},
                                 "delivery": {"retry": ["1s"]}})
    _submit(r, ["bob@remote.example", "carol@remote.example"])
    r.wait_for(lambda: _journal_begun(r) != [], timeout=20)  # the attempt is under way
    [begun] = _journal_begun(r)
    assert sorted(begun["r"]) == ["bob@remote.example", "carol@remote.example"]
    r.kill()  # SIGKILL while the smart host holds the final reply
    reply.set()  # the delivery after the restart is answered at once
    r.start()
    r.wait_for(lambda: r.maillog().count(WARNING) == 2, timeout=20)
    lines = [ln for ln in r.maillog().splitlines() if WARNING in ln]
    assert all(ln.startswith(begun["q"]) or f" {begun['q']}: " in ln for ln in lines), lines
    assert {"<bob@remote.example>", "<carol@remote.example>"} <= {
        w for ln in lines for w in ln.split() if w.startswith("<")}
    # Delivered again after the restart (at least once), then gone from the queue; the
    # cut attempt counts, and the line says why it may be a duplicate.
    r.wait_for(lambda: r.queued() == [], timeout=30)
    assert len(smart.messages) >= 1
    again = [ln for ln in r.maillog().splitlines() if "stat=Sent" in ln]
    assert len(again) == 2 and all(", tries=2, redelivery=after_crash, " in ln
                                   for ln in again), again
    # A clean stop and start: nothing was in flight, nothing is said.
    r.stop()
    r.start()
    r.wait_for(lambda: r.maillog().count("daemon=started") >= 3)
    assert r.maillog().count(WARNING) == 2


CUT = "delivery cut by authrelay's stop"
MAYBE = "may have been delivered (the next attempt may deliver it twice)"


@pytest.mark.parametrize("phase", ["after-the-dot", "before-the-greeting"])
def test_a_clean_stop_says_what_it_cut_and_is_no_crash(relay_factory, fake_mx,
                                                       phase: str) -> None:
    """SIGTERM with a delivery still running when shutdown_timeout ends: one deferred
    line per recipient naming the stop (and, once the message went out, that it may have
    been delivered), the message stays queued, and the next start does not call it a
    crash."""
    reply = threading.Event()
    silent = socket.socket()  # a next hop that takes the connection and never greets
    silent.bind(("127.0.0.2", 0))
    silent.listen(8)
    smart = fake_mx("127.0.0.2", data_gate=reply)
    hop = smart.address if phase == "after-the-dot" else f"127.0.0.2:{silent.getsockname()[1]}"
    try:
        r = relay_factory(overrides={"shutdown_timeout": "1s",
                                     "relay": {"smart_host": [hop], "smart_host_tls": "none"},
                                     "delivery": {"retry": ["1s"]}})
        _submit(r, ["bob@remote.example", "carol@remote.example"])
        r.wait_for(lambda: _journal_begun(r) != [], timeout=20)
        if phase == "after-the-dot":
            r.wait_for(lambda: smart.gated > 0, timeout=20)
        [begun] = _journal_begun(r)
        r.stop()  # SIGTERM: the delivery is cut when shutdown_timeout ends
        cut = [ln for ln in r.maillog().splitlines() if CUT in ln]
        assert len(cut) == 2, r.maillog()
        assert {"bob@remote.example", "carol@remote.example"} == {
            m for ln in cut for m in re.findall(r"to=<([^>]+)>", ln)}
        assert all(f" {begun['q']}: " in ln and "stat=Deferred (451 4.3.2 " in ln
                   for ln in cut), cut
        assert all((MAYBE in ln) == (phase == "after-the-dot") for ln in cut), cut
        assert len(r.queued()) == 1  # still queued: tried again at the next start
        reply.set()
        r.config_data["relay"]["smart_host"] = [smart.address]
        r.config.write_text(to_toml(r.config_data))
        r.start()
        r.wait_for(lambda: r.queued() == [], timeout=30)  # delivered after the restart
        assert WARNING not in r.maillog()  # a clean stop is not a crash
    finally:
        silent.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_the_first_hosts_recipients_are_not_sent_again_after_a_stop_or_kill_at_the_next(
        relay_factory, fake_mx, how: str) -> None:
    """The first next hop took bob (250 after the dot, NOTIFY=SUCCESS) and deferred carol
    at RCPT (450), so carol went on to the second host, which takes the connection and
    never greets. A SIGTERM (shutdown_timeout 1 s) or a kill -9 meanwhile: bob's 250 was
    in the courier's hands only (journaled once the whole attempt returned), so the stop
    logged him "no reply received: may have been delivered", the next start delivered
    the message to him again (and his notice came with it). Now (ccd8eb7, whose own test
    has one host and its 452) his 250 is journaled before the next host is tried: the
    next start records him sent and queues his one notice; only carol is tried again."""
    silent = socket.socket()  # the second host: takes the connection, never greets
    silent.bind(("127.0.0.2", 0))
    silent.listen(8)
    first = fake_mx("127.0.0.2", rcpt_replies={"carol@remote.example": "450 4.2.1 later"})
    try:
        r = relay_factory(overrides={
            "shutdown_timeout": "1s",
            "relay": {"smart_host": [first.address,
                                     f"127.0.0.2:{silent.getsockname()[1]}"],
                      "smart_host_tls": "none"},
            "delivery": {"retry": ["1s"], "connect_timeout": "60s"}})
        _submit(r, ["bob@remote.example NOTIFY=SUCCESS", "carol@remote.example"])
        r.wait_for(lambda: "passed to the next host" in r.maillog(), timeout=20)
        assert [m.rcpt_tos for m in first.messages] == [["bob@remote.example"]]
        if how == "stop":
            r.stop()  # SIGTERM: cut when shutdown_timeout ends, carol's host still silent
        else:
            r.kill()
        assert "to=<bob@remote.example>" not in "".join(
            ln for ln in r.maillog().splitlines() if CUT in ln)
        r.config_data["relay"]["smart_host"] = [first.address]
        r.config.write_text(to_toml(r.config_data))
        r.start()
        # carol tried again (450 again, nowhere else to go), bob not
        r.wait_for(lambda: any("to=<carol@remote.example>" in ln and
                               "stat=Deferred (450 4.2.1 later" in ln
                               for ln in r.maillog().splitlines()), timeout=30)
        r.wait_for(lambda: "sender_success_notification=" in r.maillog(), timeout=30)
        sent = [m.rcpt_tos for m in first.messages if m.mail_from]
        assert sent.count(["bob@remote.example"]) == 1, sent
        assert all("bob@remote.example" not in rc for rc in sent[1:]), sent
        assert r.maillog().count("sender_success_notification=") == 1  # bob's, once
        if how == "stop":  # one delivery line: the stop's; the start's is no second one
            _one_delivery_line(r, "bob@remote.example")
        else:
            # (the attempt never ended: its stat=Sent line is the start's)
            line = _recovered(r, r"\w+", "bob@remote.example")
            assert "queue=queued" in line and "logged_by=start" in line, line
        assert (WARNING in r.maillog()) == (how == "kill")  # (carol's: a crash)
    finally:
        silent.close()


def test_a_stop_drains_sessions_and_deliveries_at_once(relay_factory, fake_mx) -> None:
    """SIGTERM (one process, workers = 1): the sessions, the local submissions and the
    deliveries drain together, each up to shutdown_timeout. They drained one after the
    other (up to three times shutdown_timeout: past contrib's TimeoutStopSec = 60 with
    the default 30 s, so systemd's SIGKILL), and the scheduler took new work while the
    sessions drained: a message a draining session handed over was delivered during the
    stop. Now it stays queued for the next start, as every message after a SIGTERM."""
    smart = fake_mx("127.0.0.2")
    r = relay_factory(overrides={"shutdown_timeout": "2s",
                                 "relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"}})
    assert r.proc is not None
    with session_in_progress(r) as c:
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: during the stop\r\n\r\nx\r\n")
        os.kill(r.proc.pid, signal.SIGTERM)
        r.wait_log("daemon=stopping")
        c.send(b".\r\n")
        assert c.reply().code == 250  # the session finishes its message...
        r.proc.wait(timeout=30)  # ...and stays open until shutdown_timeout cuts it
    assert "stat=Sent" not in r.maillog()
    assert smart.messages == [] and len(r.queued()) == 1
    r.start()
    r.wait_for(lambda: r.queued() == [], timeout=30)
    assert len(smart.messages) == 1


def _submit_plain(r: RelayProcess, n: int) -> str:
    with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=20) as s:
        s.ehlo("client.example")
        assert s.mail("someone@remote.example")[0] == 250
        assert s.rcpt("bob@local.test")[0] == 250
        code, msg = s.data(b"Subject: removal window %d\r\n\r\nbody\r\n" % n)
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[1]


def _journal_says_delivered(r: RelayProcess, qid: str) -> bool:
    """The journal's end line naming `qid`'s attempt delivered (`{"e": N, "d": 1}`)."""
    path = r.state / "spool" / "inflight.log"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    tokens = {ln["b"] for ln in lines if ln.get("q") == qid}
    return any(ln.get("e") in tokens and ln.get("d") == 1 for ln in lines)


def _journal_says_logged(r: RelayProcess, qid: str) -> bool:
    """The journal's mark (`{"l": [N]}`) saying `qid`'s attempt's stat=Sent lines are
    written."""
    path = r.state / "spool" / "inflight.log"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    tokens = {ln["b"] for ln in lines if ln.get("q") == qid}
    return any(tokens & set(ln.get("l", ())) for ln in lines)


def test_a_kill_between_the_next_hops_250_and_the_removal_is_no_duplicate(relay_factory,
                                                                         fake_mx) -> None:
    """A delivered message's file is removed up to UNLINK_GATHER (5 ms, and a thread
    hand-off) after its delivery (e81e003): a kill -9 of the master in that window
    delivered it again after the restart (b6329bb named it `redelivery=after_crash`).
    The master is stopped (SIGSTOP) a little later after each delivery, until it is
    caught there: the next hop's 250 read (nothing unread on its connection), the
    journal's line saying so written, the file still queued. Killed then, the restart
    records it sent and removes it (one line): the next hop has it once."""
    smart = fake_mx("127.0.0.2")
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"}})
    assert r.proc is not None
    master = r.proc.pid
    caught = None
    for n in range(200):
        qid = _submit_plain(r, n)
        while len(smart.messages) <= n:  # the next hop has it; its 250 is on its way
            time.sleep(0.0002)
        time.sleep(n * 0.0005)  # each round stops the master a little later
        os.kill(master, signal.SIGSTOP)
        if (r.queue_dir / qid).exists() and unread_from(master, smart.host, smart.port) == [0] \
                and _journal_says_delivered(r, qid):
            caught = qid
            break
        os.kill(master, signal.SIGCONT)
        r.wait_for(lambda q=qid: not (r.queue_dir / q).exists(), what=f"{qid} removed")
    assert caught is not None, "the master was never stopped between the 250 and the removal"
    delivered = len(smart.messages)
    r.kill()  # SIGKILL, stopped where it was
    r.start()
    line = _recovered(r, caught, "bob@local.test")
    assert "queue=removed" in line, line
    assert r.queued() == []
    sentinel = _submit_plain(r, 1000)  # delivered after anything the restart would send
    r.wait_for(lambda: len(smart.messages) == delivered + 1, what="the sentinel")
    assert f"id {sentinel}" in smart.messages[-1].content.decode()
    assert WARNING not in r.maillog()


def _removal_an_hour_later(relay_factory, fake_mx, tmp_path, monkeypatch,
                           hook_more: str = "") -> tuple[RelayProcess, FakeSMTPServer]:
    """A relay whose delivered message is removed an hour later (a sitecustomize hook:
    scheduler.UNLINK_GATHER, then `hook_more`), its smart host, and bob's message
    submitted."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import authrelay.scheduler.scheduler\n"
        "authrelay.scheduler.scheduler.UNLINK_GATHER = 3600.0\n" + hook_more)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    smart = fake_mx("127.0.0.2")
    r = relay_factory(overrides={"relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"}})
    _submit(r, ["bob@remote.example"])
    return r, smart


def test_a_message_delivered_and_not_yet_removed_at_a_kill_is_not_sent_again(
        relay_factory, fake_mx, tmp_path, monkeypatch) -> None:
    """A delivered message is removed a batch later (scheduler.UNLINK_GATHER, 5 ms; an
    hour here, by a sitecustomize hook, so the kill lands inside): a kill -9 then
    delivered it again after the restart (`tries=2, redelivery=after_crash`). Now the
    restart records it sent from the in-flight journal and removes it."""
    r, smart = _removal_an_hour_later(relay_factory, fake_mx, tmp_path, monkeypatch)
    r.wait_for(lambda: "stat=Sent" in r.maillog(), timeout=20)
    [sent] = [ln for ln in r.maillog().splitlines() if "stat=Sent" in ln]
    qid = sent.split(": to=")[0].rsplit(" ", 1)[1]
    assert (r.queue_dir / qid).exists()  # delivered, its removal not made yet
    r.wait_for(lambda: _journal_says_delivered(r, qid), what="the journal's line")
    r.wait_for(lambda: _journal_says_logged(r, qid), what="the journal's mark")
    r.kill()
    r.start()
    # (its stat=Sent line written, and marked so: no second one)
    line = r.wait_log(rf"{qid}: recorded=<bob@remote\.example>, status=recorded as delivered")
    assert "queue=removed" in line, line
    assert r.queued() == [] and len(smart.messages) == 1
    assert r.maillog().count("stat=Sent") == 1
    assert WARNING not in r.maillog() and "redelivery" not in r.maillog()


def test_a_kill_before_the_maillog_wrote_stat_sent_leaves_one_stat_sent(
        relay_factory, fake_mx, tmp_path, monkeypatch) -> None:
    """The journal's delivered line written, the maillog's stat=Sent line not yet (its
    writer held by a sitecustomize hook while the file `hold` exists; the removal an
    hour later), then kill -9: the start wrote only `to=<bob>, status=sent before the
    crash`, no stat=Sent, so a count of stat=Sent (README "The maillog") missed the
    delivery. Now the start writes its one stat=Sent line, `logged_by=start`."""
    hold = tmp_path / "hold"
    hold.touch()
    r, smart = _removal_an_hour_later(
        relay_factory, fake_mx, tmp_path, monkeypatch,
        "import os, sys, time\n"
        "class _Held:\n"  # the maillog's target (stdout): a stat=Sent line waits
        "    def __init__(self, out): self._out = out\n"
        "    def __getattr__(self, name): return getattr(self._out, name)\n"
        "    def write(self, data):\n"
        f"        while 'stat=Sent' in data and os.path.exists({str(hold)!r}):\n"
        "            time.sleep(0.01)\n"
        "        return self._out.write(data)\n"
        "sys.stdout = _Held(sys.stdout)\n")
    r.wait_for(lambda: len(r.queued()) == 1
               and _journal_says_delivered(r, r.queued()[0].name),
               timeout=20, what="the journal's delivered line")
    [qid] = [p.name for p in r.queued()]
    assert "stat=Sent" not in r.maillog() and len(smart.messages) == 1
    r.kill()
    hold.unlink()
    r.start()
    line = _recovered(r, qid, "bob@remote.example")
    assert "logged_by=start" in line and "queue=removed" in line, line
    assert r.maillog().count("stat=Sent") == 1
    assert r.queued() == [] and len(smart.messages) == 1


class _AfterTheFirst(threading.Event):
    """A fake next hop's data_gate that lets its first message through and holds the
    dots after it until set."""

    def __init__(self) -> None:
        super().__init__()
        self.fake: FakeSMTPServer | None = None

    def is_set(self) -> bool:
        return super().is_set() or (self.fake is not None and not self.fake.messages)


def _journal_delivered(r: RelayProcess) -> set[str]:
    """The recipients the journal's `d` lines (and `{"e": N, "d": 1}` ends) name."""
    path = r.state / "spool" / "inflight.log"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    begun = {ln["b"]: ln["r"] for ln in lines if "b" in ln}
    return {a for ln in lines for a in (ln.get("r", []) if "d" in ln and "b" not in ln
                                        else begun.get(ln.get("e"), []) if ln.get("d") == 1
                                        else [])}


def _second_transaction_held(relay_factory, fake_mx
                              ) -> tuple[_AfterTheFirst, FakeSMTPServer, RelayProcess, str,
                                         dict]:
    """A delivery in two transactions (the next hop takes one recipient per transaction,
    452 past it), the first one's 250 in and the second's dot held: the gate that lets it
    through, the next hop, the relay, the first transaction's recipient and the attempt's
    begin line."""
    gate = _AfterTheFirst()
    smart = fake_mx("127.0.0.2", data_gate=gate, max_rcpts=1)
    gate.fake = smart
    r = relay_factory(overrides={"shutdown_timeout": "1s",
                                 "relay": {"smart_host": [smart.address],
                                           "smart_host_tls": "none"},
                                 "delivery": {"retry": ["1s"]}})
    _submit(r, ["bob@remote.example", "carol@remote.example"])
    r.wait_for(lambda: smart.gated > 0, timeout=20, what="the second transaction's dot held")
    [first] = smart.messages[0].rcpt_tos
    [begun] = _journal_begun(r)
    return gate, smart, r, first, begun


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_recipient_an_earlier_transaction_delivered_is_not_sent_again(
        relay_factory, fake_mx, how: str) -> None:
    """A delivery in two transactions (the next hop takes one recipient per transaction,
    452 past it): the first one's 250 in, the second's dot held, the master killed (kill
    -9) or stopped (SIGTERM, shutdown_timeout cutting it). The journal recorded only an
    attempt's end, so the restart delivered the first recipient again (a kill: named
    `may have been delivered before the crash`; a stop: `stat=Deferred (... cut by
    authrelay's stop ...)`). Now each transaction's 2xx is journaled as it comes
    (Courier.deliver's taken): the restart records it sent, the next hop has it once."""
    gate, smart, r, first, begun = _second_transaction_held(relay_factory, fake_mx)
    qid = begun["q"]
    if how == "kill":  # (a stop writes the journal's lines before it ends)
        r.wait_for(lambda: _journal_delivered(r) == {first}, timeout=20,
                   what=f"the journal's line for the first transaction's {first}")
        r.kill()
    else:
        r.stop()
        sent = [ln for ln in r.maillog().splitlines() if f"to=<{first}>" in ln]
        assert len(sent) == 1 and "stat=Sent (250 " in sent[0], sent
        assert len([ln for ln in r.maillog().splitlines() if CUT in ln]) == 1
    gate.set()
    r.start()
    r.wait_for(lambda: r.queued() == [], timeout=30, what="the other one delivered")
    if how == "kill":
        line = _recovered(r, qid, first)
        assert "queue=queued" in line, line
    else:
        assert f"{qid}: " in _one_delivery_line(r, first)
    assert [m.rcpt_tos for m in smart.messages].count([first]) == 1
    assert f"delivery to <{first}>" not in r.maillog()
    if how == "stop":
        assert WARNING not in r.maillog()


def test_a_stop_ends_once_the_journal_holds_the_delivery_it_cut(
        relay_factory, fake_mx, tmp_path, monkeypatch) -> None:
    """As above ([stop]), with the in-flight journal's writer slow when the stop cuts the
    second transaction (a sitecustomize hook: the cut's line `{"e": N, "c": 1}` written
    2 s late, a spool disk under load): the writer is a daemon thread and the stop did
    not wait for it, so the master exited without that line, and the next start took the
    clean stop for a crash: the first recipient's second `stat=Sent` line
    (`logged_by=start`) and the other named `may have been delivered before the crash`
    (had the first transaction's `{"d": N}` line been behind too: delivered again). Now
    the stop waits for the journal's lines (at most STOP_SAVE_WAIT)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\n"
        "import authrelay.scheduler.inflight as inflight\n"
        "_write = inflight.InflightJournal._write\n"
        "def _slow(self, data):\n"
        "    if b'\"c\":1' in data:\n"
        "        time.sleep(2.0)  # the disk under load: what the test is about\n"
        "    _write(self, data)\n"
        "inflight.InflightJournal._write = _slow\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    gate, smart, r, first, begun = _second_transaction_held(relay_factory, fake_mx)
    r.wait_for(lambda: _journal_delivered(r) == {first}, timeout=20,
               what=f"the journal's line for the first transaction's {first}")
    r.stop()
    lines = [json.loads(ln) for ln in (r.state / "spool" / "inflight.log").read_text()
             .splitlines()]
    assert {"e": begun["b"], "c": 1} in lines, lines
    gate.set()
    r.start()
    r.wait_for(lambda: r.queued() == [], timeout=30, what="the other one delivered")
    assert f"{begun['q']}: " in _one_delivery_line(r, first)
    assert [m.rcpt_tos for m in smart.messages].count([first]) == 1
    assert WARNING not in r.maillog()


def _one_delivery_line(r: RelayProcess, rcpt: str) -> str:
    """A recipient a stop cut the delivery of after the next hop took it (an earlier
    transaction): the stop's `stat=Sent` line is its only delivery line (an admin's grep
    counts deliveries so), and the next start's names it `recorded=` (no `to=`, nor
    `status=sent`: it had a `to=<rcpt>, status=sent before the stop` line). That line."""
    log = r.wait_log(rf"(recorded|to)=<{re.escape(rcpt)}>, status=(recorded|sent before)")
    assert f"recorded=<{rcpt}>, status=recorded as delivered (" in log, log
    lines = r.maillog().splitlines()
    named = [ln for ln in lines if f"to=<{rcpt}>" in ln]
    assert len(named) == 1 and "stat=Sent (250 " in named[0], named
    assert not [ln for ln in lines if f"<{rcpt}>" in ln and "status=sent" in ln.lower()]
    assert "queue=queued" in log, log
    return log
