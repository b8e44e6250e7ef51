"""The queue CLI end to end, against a running `authrelay serve` (a real process).

`authrelay -c CONFIG queue list | show | hold | release | flush | delete` runs as its own
process while the server delivers; changes go through the server's control socket. The
MX first defers everything (451) and the retry interval is an hour, so mail sits in the
queue until the CLI moves it; what arrives at the fake MX shows what the CLI did.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fakes.dnsserver import FakeDNSServer
from fakes.smtpserver import FakeSMTPServer, MXFactory
from relayproc import RelayProcess
from test_e2e_delivery import (
    SENDER,
    delivered_to,
    gone,
    log_lines,
    mx_overrides,
    submit,
)

pytestmark = pytest.mark.slow

DEFER = "451 4.3.0 try again later"


def deferred(relay: RelayProcess, qid: str) -> bool:
    return any("stat=Deferred" in ln for ln in log_lines(relay, qid))


def queue_json(relay: RelayProcess) -> dict[str, dict[str, Any]]:
    return {rec["id"]: rec for rec in json.loads(relay.cli("queue", "list", "--json").stdout)}


def start_deferring(relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
                    fake_mx: MXFactory, rcpts: list[str]
                    ) -> tuple[RelayProcess, FakeSMTPServer, list[str]]:
    """A relay whose MX defers `rcpts`, retrying only after an hour; one message to each
    recipient, each deferred once. Returns (relay, mx, queue ids in order)."""
    mx1 = fake_mx("127.0.0.2", rcpt_replies={r: DEFER for r in rcpts})
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"]))
    qids = [submit(relay, [r]) for r in rcpts]
    for q in qids:
        relay.wait_for(lambda q=q: deferred(relay, q), what=f"{q} deferred")
    return relay, mx1, qids


def test_queue_list_show_hold_release_flush(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    rcpts = ["bob@example.test", "carol@example.test", "dave@example.test"]
    relay, mx1, (q_hold, q_one, q_all) = start_deferring(relay_factory, dns, fake_mx, rcpts)

    # list: every message, deferred, with the MX's reason (mailq).
    out = relay.cli("queue", "list").stdout
    for q, r in zip((q_hold, q_one, q_all), rcpts, strict=True):
        line = next(ln for ln in out.splitlines() if ln.startswith(q))
        assert "deferred" in line and f"<{SENDER}>" in line
        assert r in out
    assert f"({DEFER})" in out
    assert "in 3 requests." in out
    recs = queue_json(relay)
    assert set(recs) == {q_hold, q_one, q_all}
    rec = recs[q_one]
    assert (rec["state"], rec["sender"], rec["last_error"]) == ("deferred", SENDER, DEFER)
    assert rec["size"] > 0 and rec["auth_user"] == "alice"
    assert [(r["address"], r["state"], r["attempts"]) for r in rec["recipients"]] == [
        ("carol@example.test", "pending", 1)]

    # show: envelope, per-recipient state, the message headers.
    out = relay.cli("queue", "show", q_one).stdout
    assert f"Queue ID:  {q_one}" in out and f"Sender:    <{SENDER}>" in out
    assert f"Recipient: <carol@example.test> pending attempts=1 ({DEFER})" in out
    assert "Subject: end to end" in out and f"id {q_one}" in out  # our Received header
    shown = json.loads(relay.cli("queue", "show", q_one, "--json").stdout)
    assert shown["envelope"]["sender"] == SENDER
    assert "Message-ID: <e2e.1@sender.test>" in shown["headers"]
    missing = relay.cli("queue", "show", "2N5400000000000XX", check=False)
    assert missing.returncode == 1 and "not in the queue" in missing.stderr

    # hold: the MX now accepts, but a held message stays put.
    assert relay.cli("queue", "hold", q_hold).stdout.strip() == f"{q_hold}: held"
    assert queue_json(relay)[q_hold]["state"] == "held"
    assert "State:     held" in relay.cli("queue", "show", q_hold).stdout
    mx1.rcpt_replies.clear()

    # flush ID: that one goes at once, the others keep their hour of back-off.
    assert relay.cli("queue", "flush", q_one).stdout.strip() == f"{q_one}: flushed"
    relay.wait_for(lambda: gone(relay, q_one), what="the flushed message delivered")
    assert [m.rcpt_tos for m in mx1.messages] == [["carol@example.test"]]
    assert not gone(relay, q_all)

    # flush (all): the rest of the queue goes; the held message does not.
    relay.cli("queue", "flush")
    relay.wait_for(lambda: gone(relay, q_all), what="the queue flushed")
    assert delivered_to(mx1, "dave@example.test")
    flushed_held = relay.cli("queue", "flush", q_hold, check=False)
    assert flushed_held.returncode == 1  # held mail is not in the active queue
    assert f"{q_hold}: is held, so it is not delivered (authrelay queue release {q_hold})" \
        in flushed_held.stderr
    assert set(queue_json(relay)) == {q_hold}
    assert delivered_to(mx1, "bob@example.test") == []
    assert (relay.state / "spool" / "hold" / q_hold).exists()

    # release: tried at once (not after the back-off), delivered.
    assert relay.cli("queue", "release", q_hold).stdout.strip() == f"{q_hold}: released"
    relay.wait_for(lambda: delivered_to(mx1, "bob@example.test"), what="the released message")
    relay.wait_for(lambda: not (relay.state / "spool" / "hold" / q_hold).exists()
               and gone(relay, q_hold), what="the released message removed")
    assert relay.cli("queue", "list").stdout.strip() == "Mail queue is empty"
    assert queue_json(relay) == {}
    log = relay.maillog()
    assert f"{q_hold}: status=held" in log and f"{q_hold}: status=released" in log
    assert sender_mx.messages == []


def test_queue_delete(relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
                      sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    rcpts = ["bob@example.test", "carol@example.test", "dave@example.test"]
    relay, mx1, (q1, q2, q3) = start_deferring(relay_factory, dns, fake_mx, rcpts)
    relay.cli("queue", "hold", q3)

    assert relay.cli("queue", "delete", q1).stdout.strip() == f"{q1}: deleted"
    assert set(queue_json(relay)) == {q2, q3}
    again = relay.cli("queue", "delete", q1, check=False)
    assert again.returncode == 1 and "not in the queue" in again.stderr

    out = relay.cli("queue", "delete", "--all").stdout
    assert set(out.split()) == {f"{q2}:", f"{q3}:", "deleted"}
    assert queue_json(relay) == {}
    assert relay.queued() == []
    assert f"{q1}: status=removed, by=operator" in relay.maillog()

    # Nothing deleted is delivered later, even with the MX accepting and a flush.
    mx1.rcpt_replies.clear()
    relay.cli("queue", "flush")
    q4 = submit(relay, ["erin@example.test"])
    relay.wait_for(lambda: gone(relay, q4), what="a fresh message delivered")
    assert [m.rcpt_tos for m in mx1.messages] == [["erin@example.test"]]
    assert sender_mx.messages == []  # deleting bounces nothing


def test_delete_of_a_message_being_delivered(
        relay_factory: Callable[..., RelayProcess], dns: FakeDNSServer,
        sender_mx: FakeSMTPServer, fake_mx: MXFactory) -> None:
    """The MX holds its reply to the final dot until the delete has said it waits for the
    attempt; then the delete says the message was delivered and so could not be deleted
    (exit 1)."""
    import subprocess
    import sys
    import threading

    reply = threading.Event()
    mx1 = fake_mx("127.0.0.2", data_gate=reply)
    # data_timeout: the relay waits for the held reply as long as the test holds it
    relay = relay_factory(mx_overrides(dns, fake_mx.port, retry=["1h"], data_timeout="5m"))
    qid = submit(relay, ["bob@example.test"])
    try:
        relay.wait_for(lambda: queue_json(relay).get(qid, {}).get("state") == "active"
                       and mx1.connections > 0, what="the delivery attempt under way")
        p = subprocess.Popen([sys.executable, "-m", "authrelay", "-c", str(relay.config),
                              "queue", "delete", qid], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stderr is not None
        waits = p.stderr.readline()  # said before its request goes to the server
    finally:
        reply.set()  # the MX answers: the attempt ends
    out, err = p.communicate(timeout=120)
    assert f"{qid}: a delivery attempt is in progress; waiting for it to end" in waits, \
        waits + err
    # attempt_timeout (1h by default) bounds the attempt, not data_timeout (5m here)
    assert "(at most [delivery] attempt_timeout, 1h)" in waits, waits
    assert p.returncode == 1, out + err
    assert f"{qid}: delivered (or bounced) while being deleted" in err
    assert delivered_to(mx1, "bob@example.test")


def test_flush_with_server_stopped(relay_factory: Callable[..., RelayProcess],
                                   dns: FakeDNSServer, fake_mx: MXFactory) -> None:
    relay, _mx, (qid,) = start_deferring(relay_factory, dns, fake_mx, ["bob@example.test"])
    relay.stop()
    r = relay.cli("queue", "flush", check=False)
    assert r.returncode == 69 and "mail system is down" in r.stderr, r.stderr
    assert "flushed" not in r.stdout
