"""RFC 3461 DSN end to end: NOTIFY=SUCCESS to a next hop without DSN gives a "relayed"
notice; NOTIFY=NEVER suppresses the bounce; ENVID and ORCPT come back in the report."""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import PASSWORD, RelayProcess, _stat
from test_e2e_delivery import (
    BODY,
    SENDER,
    assert_null_sender,
    log_lines,
    mx_overrides,
    parse_dsn,
)
from test_sendmail import AUTHRELAY, _sh

pytestmark = pytest.mark.slow


def _submit(relay: RelayProcess, rcpts: list[tuple[str, list[str]]],
            mail_options: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=20) as s:
        s.ehlo("laptop.test")
        s.starttls(context=relay.client_context())
        s.ehlo("laptop.test")
        assert s.has_extn("dsn")
        s.login("alice", PASSWORD)
        code, msg = s.mail(SENDER, mail_options)
        assert code == 250, msg
        for r, opts in rcpts:
            code, msg = s.rcpt(r, opts)
            assert code == 250, (r, msg)
        code, msg = s.data(BODY)
        assert code == 250, msg
    m = re.search(rb"queued as (\S+)", msg)
    assert m
    return m.group(1).decode()


def test_success_notice_when_next_hop_lacks_dsn(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    mx1 = fake_mx("127.0.0.2")  # aiosmtpd: no DSN extension
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS,FAILURE",
                                                 "ORCPT=rfc822;bob+2Bx@example.test"]),
                          ("carol@example.test", [])],
                  ["RET=HDRS", "ENVID=track+2D42"])
    relay.wait_for(lambda: sender_mx.messages, what="the success notice")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert sorted(r for m in mx1.messages for r in m.rcpt_tos) == \
        ["bob@example.test", "carol@example.test"]
    [notice] = sender_mx.messages
    assert_null_sender(sender_mx, notice)
    msg, groups = parse_dsn(notice.content)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert [g["Action"] for g in groups] == ["relayed"]  # only bob asked for it
    g = groups[0]
    assert g["Status"] == "2.0.0" and "bob@example.test" in g["Final-Recipient"]
    assert g["Original-Recipient"] == "rfc822;bob+x@example.test"  # xtext decoded
    assert "Original-Envelope-Id: track-42" in msg.get_payload()[1].as_string()
    assert any("sender_success_notification=" in ln for ln in log_lines(relay, qid))


def _journal_owes(relay: RelayProcess, qid: str, rcpt: str) -> bool:
    """The in-flight journal says `qid`'s attempt was delivered and `rcpt` is owed a
    success DSN (`"n"` on its delivered line)."""
    path = relay.state / "spool" / "inflight.log"
    lines = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    tokens = {ln["b"] for ln in lines if ln.get("q") == qid}
    return any((ln.get("e") in tokens or ln.get("d") in tokens) and rcpt in ln.get("n", [])
               for ln in lines)


def test_a_success_notice_owed_at_a_kill_comes_once_and_the_message_is_not_sent_again(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The master killed (kill -9) after the next hop's 250 and before it queued the
    success notice owed (a sitecustomize hook holds the notice's queueing there, once a
    file says so): a recipient owed a success DSN was left out of the journal's
    delivered line, so the restart delivered the message to it again (and sent its
    notice then). Now the line names it owed: the restart records both recipients sent,
    removes the message and queues the one notice; the next hop has the message once.
    And that notice says what one sent without a crash says (a first message's, before
    the hook holds): it had no Remote-MTA nor Diagnostic-Code (the reply was not
    journaled), and its text no reply."""
    hook = tmp_path / "hook"
    hook.mkdir()
    hold = tmp_path / "hold"
    (hook / "sitecustomize.py").write_text(
        "import asyncio, os\n"
        "import authrelay.scheduler.scheduler as s\n"
        "_send = s.Scheduler._send_owed\n"
        "async def _held(self, act):\n"
        f"    if act.owed.get('relayed') and os.path.exists({str(hold)!r}):\n"
        "        await asyncio.Event().wait()  # killed here\n"
        "    return await _send(self, act)\n"
        "s.Scheduler._send_owed = _held\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    mx1 = fake_mx("127.0.0.2")  # aiosmtpd: no DSN extension, the notice is ours
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"])], [])
    relay.wait_for(lambda: sender_mx.messages, what="the success notice without a crash")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    hold.touch()
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"]),
                          ("carol@example.test", [])], [])
    relay.wait_for(lambda: _journal_owes(relay, qid, "bob@example.test"),
                   what="the journal's delivered line owing bob's notice")
    assert len(sender_mx.messages) == 1 and relay.queued() != []
    relay.kill()
    hold.unlink()
    relay.start()
    relay.wait_for(lambda: len(sender_mx.messages) == 2, what="the success notice")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [sorted(m.rcpt_tos) for m in mx1.messages] == [
        ["bob@example.test"], ["bob@example.test", "carol@example.test"]]
    said = [_said(m.content) for m in sender_mx.messages]
    assert said[1] == said[0], said  # (the next hop's reply names its FAKEn: as FAKE)
    assert said[1][1] == [
        ("Final-Recipient", "rfc822; bob@example.test"), ("Action", "relayed"),
        ("Status", "2.0.0"), ("Remote-MTA", "dns; mx1.example.test"),
        ("Diagnostic-Code", "smtp; 250 2.0.0 Ok: queued as FAKE")]
    lines = log_lines(relay, qid)
    # (recorded=: its stat=Sent line was written; else the start's, logged_by=start)
    assert [ln for ln in lines if "queue=removed" in ln and (
        "status=recorded as delivered" in ln or "logged_by=start" in ln)]
    assert len([ln for ln in lines if "to=<bob@example.test>" in ln and "stat=Sent" in ln]) >= 1
    assert len([ln for ln in lines if "sender_success_notification=" in ln]) == 1
    assert not [ln for ln in lines if "may have been delivered" in ln]


def _said(notice: bytes) -> tuple[list[str], list[tuple[str, str]]]:
    """What a success notice says of its recipient: its text's lines naming one, and its
    report's fields but the date (each notice's own), the next hop's FAKEn as FAKE."""
    msg, groups = parse_dsn(notice)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    [group] = groups
    assert group["Last-Attempt-Date"]
    text = msg.get_payload()[0].get_payload(decode=True).decode()
    return ([re.sub(r"FAKE\d+", "FAKE", ln) for ln in text.splitlines() if ln.startswith("<")],
            [(k, re.sub(r"FAKE\d+", "FAKE", v)) for k, v in group.items()
             if k != "Last-Attempt-Date"])


def _stopping_after_the_notice(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer, fake_mx: MXFactory,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RelayProcess,
                                                                  FakeSMTPServer]:
    """A relay (and its next hop) whose master SIGSTOPs itself just after it committed a
    success notice, before the journal's `{"s": N}` line (the first time only: a
    sitecustomize hook)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    once = tmp_path / "once"
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "import authrelay.scheduler.scheduler as s\n"
        "_queue = s.Scheduler._queue_dsn\n"
        "async def _stopped(self, env, rcpts, action, remote, **kw):\n"
        "    qid = await _queue(self, env, rcpts, action, remote, **kw)\n"
        f"    if action == 'relayed' and not os.path.exists({str(once)!r}):\n"
        f"        open({str(once)!r}, 'w').close()  # (the first run only)\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)  # committed; no 's' line yet\n"
        "    return qid\n"
        "s.Scheduler._queue_dsn = _stopped\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    mx1 = fake_mx("127.0.0.2")  # aiosmtpd: no DSN extension, the notice is ours
    return relay_factory(mx_overrides(dns, fake_mx.port)), mx1


def _wait_stopped(relay: RelayProcess) -> None:
    assert relay.proc is not None
    master = relay.proc.pid
    relay.wait_for(lambda: (_stat(master) or ("",))[0] == "T", what="the master stopped")


def test_a_success_notice_committed_just_before_a_kill_is_not_queued_again(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The master stopped (a sitecustomize hook: SIGSTOP to itself) just after it
    committed the success notice owed and before the journal's `{"s": N}` line, then
    killed -9: the restart found the journal's "n" without "s" and queued the notice
    again, so the sender got two. Now the notice's queue id is derived from the message
    and its recipients (bounce.notice_id): the restart finds it queued and sends one."""
    relay, mx1 = _stopping_after_the_notice(relay_factory, dns, fake_mx, tmp_path,
                                            monkeypatch)
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"]),
                          ("carol@example.test", [])], [])
    _wait_stopped(relay)
    [notice_file] = [p for p in relay.queued() if p.name != qid]  # committed
    assert _journal_owes(relay, qid, "bob@example.test")
    assert '{"s":' not in (relay.state / "spool" / "inflight.log").read_text()
    relay.kill()
    relay.start()
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [sorted(m.rcpt_tos) for m in mx1.messages] == [
        ["bob@example.test", "carol@example.test"]]
    [notice] = sender_mx.messages  # the one committed before the kill
    assert f"X-Authrelay-Queue-ID: {qid}" in notice.content.decode()
    msg, groups = parse_dsn(notice.content)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert [(g["Action"], g["Status"]) for g in groups] == [("relayed", "2.0.0")]
    assert any("stat=Sent" in ln for ln in log_lines(relay, notice_file.name))


def _stall_at_the_s_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sitecustomize hook for the relay: the in-flight journal's thread held before
    writing a `{"s": N}` line while the file returned exists."""
    hook = tmp_path / "hook"
    hook.mkdir()
    stall = tmp_path / "stall"
    stall.touch()
    (hook / "sitecustomize.py").write_text(
        "import os, time\n"
        "import authrelay.scheduler.inflight as j\n"
        "_write = j.InflightJournal._write\n"
        "def _stalled(self, data):\n"
        "    while b'{\"s\":' in data and os.path.exists(" + repr(str(stall)) + "):\n"
        "        time.sleep(0.01)  # the journal's thread held at the 's' line\n"
        "    _write(self, data)\n"
        "j.InflightJournal._write = _stalled\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    return stall


def test_a_success_notice_is_not_delivered_before_the_journal_says_it_is_queued(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-flight journal's thread stalled at the `{"s": N}` line of a success notice
    (a sitecustomize hook holds it there while a file says so): the notice's own
    end-of-data dot waited BEGIN_WAIT for its begin line (behind the "s") and went on,
    the notice was delivered and removed, and a kill -9 then had the start find the
    journal's "n" without "s" and the notice gone: queued again, the sender got two. Now
    a success notice is not delivered before its "s" line is written (one warning while
    it waits): after the kill the start finds it queued and it comes once."""
    stall = _stall_at_the_s_line(tmp_path, monkeypatch)
    # carol deferred: the message stays queued (the start's recovery looks only at a
    # message still there)
    later = {"carol@example.test": "451 4.3.0 try later"}
    mx1 = fake_mx("127.0.0.2", rcpt_replies=later)  # aiosmtpd: no DSN extension
    fake_mx("127.0.0.3", rcpt_replies=later)
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"]),
                          ("carol@example.test", [])], [])

    def only_the_message() -> bool:
        return [p.name for p in relay.queued()] == [qid]
    # The old code: the notice delivered and removed; now: it waits for the "s" line.
    relay.wait_for(lambda: sender_mx.messages and only_the_message() or re.search(
        r"success notice \S+ waits for the in-flight journal", relay.maillog()),
        what="the notice delivered, or waiting for its 's' line")
    relay.kill()
    stall.unlink()
    relay.start()
    relay.wait_for(lambda: sender_mx.messages and only_the_message(),
                   what="the notice delivered, the message alone in the queue")
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    assert len(sender_mx.messages) == 1, [m.content[:300] for m in sender_mx.messages]
    assert len([ln for ln in log_lines(relay, qid)
                if "sender_success_notification=" in ln]) == 1


def test_a_notice_an_admin_deletes_while_the_server_is_down_is_not_queued_again(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The master killed just after committing a success notice, before the journal's
    `{"s": N}` line; the admin deletes the notice (`queue delete`, no server running);
    the start found the journal owing it and the queue without it, and queued it again:
    the admin's delete undone. Now the offline delete is recorded in the journal
    (`{"x": QID}`) and the start queues nothing."""
    relay, mx1 = _stopping_after_the_notice(relay_factory, dns, fake_mx, tmp_path,
                                            monkeypatch)
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"])], [])
    _wait_stopped(relay)
    [notice] = [p.name for p in relay.queued() if p.name != qid]  # committed
    relay.kill()
    assert relay.cli("queue", "delete", notice).stdout.strip() == f"{notice}: deleted"
    relay.start()
    relay.wait_log(rf"{qid}: (?:recorded=<bob@example.test>, status=recorded as delivered"
                   r"|to=<bob@example.test>, .*stat=Sent \(sent before the crash)")
    assert relay.queued() == []  # (the notice would be queued before the line)
    relay.stop()
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    assert sender_mx.messages == []
    assert not [ln for ln in log_lines(relay, qid) if "sender_success_notification=" in ln]


def test_an_admins_delete_of_a_notice_waits_for_the_journals_line(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A success notice deleted by an admin (`queue delete`, the server running) while the
    journal's thread had not yet written the `{"s": N}` line saying it was queued (a hook
    holds the thread there): deleted, and a kill -9 then had the start queue it again.
    Now that delete answers 'not deleted ... try again' (after inflight.BEGIN_WAIT); once
    the line is written the delete goes through, and a kill then brings nothing back."""
    stall = _stall_at_the_s_line(tmp_path, monkeypatch)
    later = {"carol@example.test": "451 4.3.0 try later"}  # the message stays queued
    fake_mx("127.0.0.2", rcpt_replies=later)  # aiosmtpd: no DSN extension
    fake_mx("127.0.0.3", rcpt_replies=later)
    sender_mx.rcpt_replies["alice@sender.test"] = "451 4.3.0 try later"  # the notice too
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"]),
                          ("carol@example.test", [])], [])
    relay.wait_log(rf"{qid}: sender_success_notification=")
    [notice] = [p.name for p in relay.queued() if p.name != qid]
    refused = relay.cli("queue", "delete", notice, check=False)
    assert refused.returncode != 0
    assert f"{notice}: cannot delete it: a success notice the in-flight journal does not " \
        "yet say is queued" in refused.stderr, refused
    stall.unlink()
    relay.wait_for(lambda: '{"s":' in (relay.state / "spool" / "inflight.log").read_text(),
                   what="the journal's 's' line")
    assert relay.cli("queue", "delete", notice).stdout.strip() == f"{notice}: deleted"
    tried = relay.maillog().count("to=<carol@example.test>")
    relay.kill()
    relay.start()
    relay.wait_for(lambda: relay.maillog().count("to=<carol@example.test>") > tried,
                   what="carol tried again after the start")
    assert [p.name for p in relay.queued()] == [qid]
    assert sender_mx.messages == []


def test_a_success_notice_whose_derived_id_is_taken_gets_a_new_one(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A success notice's derived id (bounce.notice_id) shares its clock part with its
    message's id, so its 30-bit tail may match a queued one's (the message itself, one in
    2**30): the commit's exclusive create then failed and the notice was lost, with a
    traceback. A hook makes the derived id the message's own: the notice goes under a new
    id, and the sender gets it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import authrelay.scheduler.scheduler as s\n"
        "s.notice_id = lambda env, rcpts: env.queue_id  # the worst collision\n")
    monkeypatch.setenv("PYTHONPATH", str(hook))
    mx1 = fake_mx("127.0.0.2")  # aiosmtpd: no DSN extension, the notice is ours
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [("bob@example.test", ["NOTIFY=SUCCESS"])], [])
    relay.wait_for(lambda: sender_mx.messages, what="the success notice")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@example.test"]]
    [notice] = sender_mx.messages
    assert f"X-Authrelay-Queue-ID: {qid}" in notice.content.decode()
    msg, groups = parse_dsn(notice.content)
    assert [(g["Action"], g["Status"]) for g in groups] == [("relayed", "2.0.0")]
    log = relay.maillog()
    assert f"{qid}: sender_success_notification=" in log, log[-3000:]
    assert "Traceback" not in log


def test_a_raw_utf8_original_recipient_reaches_the_next_hop_and_the_bounce(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """RFC 6533 3: in an SMTPUTF8 transaction ORCPT=utf-8;<raw UTF-8> (utf-8-addr-unitext)
    was refused '501 5.5.4 ESMTP parameter values must be ASCII' (smtplib's client could
    not submit it). Now accepted; the next hop (DSN and SMTPUTF8) gets it as given, and
    the bounce for a refused recipient gives it as Original-Recipient (RFC 3464 2.3.1)."""
    mx = fake_mx("127.0.0.2", dsn=True,
                 rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    _submit(relay, [("bob@example.test", ["ORCPT=utf-8;bjørn@öld.example"]),
                    ("nobody@example.test", ["ORCPT=utf-8;élise@old.example"])],
            ["SMTPUTF8"])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.test"]]
    assert "RCPT ORCPT=utf-8;bjørn@öld.example" in mx.dsn_params
    [bounce] = sender_mx.messages
    _, groups = parse_dsn(bounce.content)
    assert [(g["Original-Recipient"], g["Final-Recipient"]) for g in groups] == [
        ("utf-8;élise@old.example", "rfc822; nobody@example.test")]


def test_a_raw_utf8_original_recipient_goes_escaped_to_a_7bit_next_hop(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """RFC 6533 3: a next hop with DSN but without SMTPUTF8 gets a raw UTF-8 ORCPT in its
    utf-8-addr-xtext form (each non-ASCII character as \\x{HEX}); it was left out."""
    mx = fake_mx("127.0.0.2", dsn=True, smtputf8=False)
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    _submit(relay, [("bob@example.test", ["ORCPT=utf-8;bjørn@old.example"])], ["SMTPUTF8"])
    relay.wait_for(lambda: mx.messages, what="the delivery")
    assert "RCPT ORCPT=utf-8;bj\\x{F8}rn@old.example" in mx.dsn_params, mx.dsn_params


def test_a_next_hops_undecodable_reply_keeps_the_report_ascii(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """A next hop answering RCPT with octets that are not UTF-8 (broken or hostile): the
    ASCII message's bounce was message/global-delivery-status (RFC 6533, 8bit) because
    of them. Now the report is message/delivery-status, 7bit, the octets "?"."""
    fake_mx("127.0.0.2",
            rcpt_replies={"nobody@example.test": b"550 5.1.1 no \xff\xfe\xc3 such user"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    _submit(relay, [("nobody@example.test", [])], [])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    [bounce] = sender_mx.messages
    assert bounce.content.isascii()
    msg, groups = parse_dsn(bounce.content)
    assert msg.get_payload()[1].get_content_type() == "message/delivery-status"
    assert [g["Diagnostic-Code"] for g in groups] == ["smtp; 550 5.1.1 no ??? such user"]


def test_notify_never_suppresses_the_bounce(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [("nobody@example.test", ["NOTIFY=NEVER"])], [])
    relay.wait_for(lambda: any("stat=Bounced" in ln for ln in log_lines(relay, qid)),
                   what="the permanent failure")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert sender_mx.messages == []
    assert not any("notification" in ln for ln in log_lines(relay, qid))


def test_ret_full_returns_the_whole_message(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    fake_mx("127.0.0.2", rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    _submit(relay, [("nobody@example.test", [])], ["RET=FULL"])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    msg, groups = parse_dsn(sender_mx.messages[0].content)
    assert [g["Action"] for g in groups] == ["failed"]
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    body = BODY.split(b"\r\n\r\n", 1)[1].decode().replace("\r\n", "\n").strip()
    assert body and body in returned.as_string()


def test_one_bounce_for_failures_in_two_domains(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """Refused at a.test's MX and at b.test's MX, delivered at c.test: the sender gets
    one DSN listing both failures (as Postfix does), not one per destination."""
    fake_mx("127.0.0.5", rcpt_replies={"ann@a.test": "550 5.1.1 no such user"})
    fake_mx("127.0.0.6", rcpt_replies={"ben@b.test": "554 5.7.1 relay access denied"})
    c = fake_mx("127.0.0.7")
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [("ann@a.test", []), ("ben@b.test", []), ("cat@c.test", [])], [])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [m.rcpt_tos for m in c.messages] == [["cat@c.test"]]
    [bounce] = sender_mx.messages
    assert_null_sender(sender_mx, bounce)
    _, groups = parse_dsn(bounce.content)
    assert sorted((g["Final-Recipient"], g["Status"]) for g in groups) == [
        ("rfc822; ann@a.test", "5.1.1"), ("rfc822; ben@b.test", "5.7.1")]
    lines = log_lines(relay, qid)
    assert sum("sender_non-delivery_notification=" in ln for ln in lines) == 1


def test_a_hostile_next_hops_huge_replies_are_kept_bounded(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """A next hop answering each RCPT with a 1 MB reply (256 lines of 4000, what
    delivery/wire.py reads): the reply used to be kept whole per recipient, in memory, in
    the spool state, in each maillog line and twice in the bounce (1000 recipients:
    gigabytes). Now at most types.MAX_TEXT (16384) characters are kept, marked as truncated; the
    bounce still gives the reply's code and start, one DSN for all."""
    bound = 16384  # authrelay.types.MAX_TEXT
    huge = "".join(f"550-5.1.1 line{i} " + "x" * 4000 + "\r\n" for i in range(255)) + \
        "550 5.1.1 the end"
    names = [f"r{i}@example.test" for i in range(5)]
    fake_mx("127.0.0.2", rcpt_replies=dict.fromkeys(names, huge))
    relay = relay_factory(mx_overrides(dns, fake_mx.port))
    qid = _submit(relay, [(a, []) for a in names], [])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    lines = [ln for ln in log_lines(relay, qid) if "stat=Bounced" in ln]
    assert len(lines) == len(names)
    assert all(len(ln) < bound + 1000 and "(reply truncated)" in ln for ln in lines)
    [bounce] = sender_mx.messages
    assert len(bounce.content) < 2 * len(names) * (bound + 2000) + 10_000
    _, groups = parse_dsn(bounce.content)
    assert [g["Status"] for g in groups] == ["5.1.1"] * len(names)
    assert all("".join(g["Diagnostic-Code"].split()).startswith("smtp;5505.1.1line0xxx")
               for g in groups)


def test_a_local_senders_bounce_goes_through_aliases(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """cron's mail (`authrelay sendmail`, envelope sender root@hostname) refused by the
    next hop: its bounce goes where [aliases] send root's mail, as Postfix delivers it to
    root's mailbox and so through aliases(5). It used to go to root@relay.test itself, a
    name with no mail host: the bounce bounced and the admin never knew. To: still names
    root@relay.test."""
    fake_mx("127.0.0.2", rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory({**mx_overrides(dns, fake_mx.port),
                           "aliases": {"root": "admin@sender.test"}})
    res = _sh(f"printf 'Subject: cron job\\n\\nfailed\\n' | {AUTHRELAY} sendmail "
              "-f root@relay.test nobody@example.test", relay.config)
    assert res.returncode == 0, res.stderr
    relay.wait_for(lambda: sender_mx.messages, what="the bounce at admin's MX")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    [bounce] = sender_mx.messages
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["admin@sender.test"]
    msg, groups = parse_dsn(bounce.content)
    assert msg["To"] == "root@relay.test"
    assert [(g["Final-Recipient"], g["Status"]) for g in groups] == [
        ("rfc822; nobody@example.test", "5.1.1")]


def test_a_looping_local_messages_bounce_goes_through_aliases(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer) -> None:
    """The sendmail command's own bounce (a message with more Received: fields than
    max_hops: 5.4.6) for root@relay.test reaches root's alias too, as the scheduler's do."""
    relay = relay_factory({**mx_overrides(dns, sender_mx.port),
                           "aliases": {"root": "admin@sender.test"},
                           "limits": {"max_hops": 3}})
    hops = "Received: from a by b; Sun, 6 Dec 2026 00:00:00 +0000\\n" * 4
    res = _sh(f"printf '{hops}Subject: loop\\n\\nx\\n' | {AUTHRELAY} sendmail "
              "-f root@relay.test bob@example.test", relay.config)
    assert res.returncode == 0, res.stderr
    relay.wait_for(lambda: sender_mx.messages, what="the bounce at admin's MX")
    [bounce] = sender_mx.messages
    assert bounce.rcpt_tos == ["admin@sender.test"]
    _, groups = parse_dsn(bounce.content)
    assert [g["Status"] for g in groups] == ["5.4.6"]


def test_an_aliased_recipients_bounce_names_the_address_the_sender_wrote(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """A user's mail to root@hostname, which [aliases] send to two addresses, one of
    them refused: the bounce named only nobody@example.test, an address the sender never
    wrote (no Original-Recipient), and the next hop (with DSN) got no ORCPT, so its own
    reports could not name root either. Now each target carries ORCPT=rfc822;root@...
    (RFC 3461 4.2: the address as received, as Postfix passes it on), and the bounce says
    'Original-Recipient: rfc822;root@relay.test' and, as Postfix, '(expanded from
    <root@relay.test>)'."""
    mx = fake_mx("127.0.0.2", dsn=True,
                 rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory({**mx_overrides(dns, fake_mx.port),
                           "aliases": {"root": "nobody@example.test, bob@example.test"}})
    _submit(relay, [("root@relay.test", ["NOTIFY=FAILURE"])], [])
    relay.wait_for(lambda: sender_mx.messages, what="the bounce")
    relay.wait_for(lambda: relay.queued() == [], what="an empty queue")
    assert [m.rcpt_tos for m in mx.messages] == [["bob@example.test"]]
    assert mx.dsn_params.count("RCPT ORCPT=rfc822;root@relay.test") == 2, mx.dsn_params
    [bounce] = sender_mx.messages
    msg, groups = parse_dsn(bounce.content)
    assert [(g["Original-Recipient"], g["Final-Recipient"]) for g in groups] == [
        ("rfc822;root@relay.test", "rfc822; nobody@example.test")]
    human = msg.get_payload()[0].get_payload()
    assert "<nobody@example.test> (expanded from <root@relay.test>): 550 5.1.1 no such user" \
        in human, human


def test_a_local_messages_aliased_recipient_is_named_in_its_bounce(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """The sendmail command's recipient `ops`, which [aliases] send to an address the
    next hop refuses: the bounce (to root's alias) named only that address. Now it
    carries 'Original-Recipient: rfc822;ops@relay.test' and '(expanded from ...)', as
    mail received over SMTP does."""
    fake_mx("127.0.0.2", rcpt_replies={"nobody@example.test": "550 5.1.1 no such user"})
    relay = relay_factory({**mx_overrides(dns, fake_mx.port),
                           "aliases": {"root": "admin@sender.test",
                                       "ops": "nobody@example.test"}})
    res = _sh(f"printf 'Subject: backup\\n\\nfailed\\n' | {AUTHRELAY} sendmail "
              "-f root@relay.test ops", relay.config)
    assert res.returncode == 0, res.stderr
    relay.wait_for(lambda: sender_mx.messages, what="the bounce at admin's MX")
    [bounce] = sender_mx.messages
    msg, groups = parse_dsn(bounce.content)
    assert [(g["Original-Recipient"], g["Final-Recipient"]) for g in groups] == [
        ("rfc822;ops@relay.test", "rfc822; nobody@example.test")]
    assert "<nobody@example.test> (expanded from <ops@relay.test>): 550 5.1.1" \
        in msg.get_payload()[0].get_payload()
