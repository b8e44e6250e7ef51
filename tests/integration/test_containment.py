"""A compromised account is contained: real authrelay processes, real sockets and TLS.

Each threshold trips (messages, distinct recipients, refused by the next hop, distinct
client networks); then MAIL gets 450 4.7.1, the user's queued mail is held (not sent, not
deleted), the admin gets one notice through the queue and one maillog line; the
suspension survives a restart; `authrelay user resume` with --delete-held or --release.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from fakes.smtpserver import MXFactory
from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient, client_ctx, plain

from authrelay.spool.format import split
from authrelay.spool.store import Spool

pytestmark = pytest.mark.slow  # real authrelay processes, restarts

ADMIN = "admin@local.test"


def relay(tmp_path: Path, **containment: object) -> RelayProcess:
    return RelayProcess(tmp_path, {"limits": {"containment": {"notify": ADMIN,
                                                              **containment}}})


def send(port: int, rcpts: list[str], *, source: str | None = None,
         user: str = "alice") -> list[int]:
    """One message over implicit TLS: the reply codes of MAIL, each RCPT, and the end."""
    with RawClient(port, tls=client_ctx(), source=source) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd(f"AUTH PLAIN {plain(user, PASSWORD)}").code == 235
        codes = [c.cmd("MAIL FROM:<alice@example.org>").code]
        if codes[0] != 250:
            return codes
        codes += [c.cmd(f"RCPT TO:<{r}>").code for r in rcpts]
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        codes.append(c.reply().code)
        c.cmd("QUIT")
        return codes


def mail_reply(port: int) -> str:
    with RawClient(port, tls=client_ctx()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
        r = c.cmd("MAIL FROM:<alice@example.org>")
        return f"{r.code} {r.text}"


def envelopes(r: RelayProcess, held: bool) -> list:
    spool = Spool(r.state / "spool")
    return [spool.load(q) for q in (spool.held() if held else spool.scan())]


def notices(r: RelayProcess) -> list[bytes]:
    out = []
    spool = Spool(r.state / "spool")
    for qid in spool.scan() + spool.held():
        env = spool.load(qid)
        if env.sender == "" and [x.address for x in env.recipients] == [ADMIN]:
            path = next(p for p in (r.state / "spool" / "queue" / qid,
                                    r.state / "spool" / "hold" / qid) if p.exists())
            out.append(split(path.read_bytes())[1])
    return out


def suspended_lines(r: RelayProcess) -> list[str]:
    return [ln for ln in r.maillog().splitlines() if "warning=user suspended" in ln]


def test_messages_threshold_hold_notice_restart_delete(tmp_path: Path) -> None:
    r = relay(tmp_path, messages=3).start()
    try:
        port = r.ports["submissions"]
        for _ in range(3):
            assert send(port, ["bob@example.net"]) == [250, 250, 250]
        r.wait_for(lambda: suspended_lines(r))
        line = suspended_lines(r)[0]
        assert "sasl_username=alice, threshold=messages, count=3, limit=3, window=1h" in line
        # Every message of alice is held: not sent, not deleted.
        r.wait_for(lambda: len(envelopes(r, held=True)) == 3)
        assert all(e.auth_user == "alice" for e in envelopes(r, held=True))
        assert not [e for e in envelopes(r, held=False) if e.auth_user == "alice"]
        # MAIL from now on: 450 4.7.1 (clients retry, nothing bounced).
        for _ in range(3):
            assert mail_reply(port).startswith("450 4.7.1 Sending suspended")
        assert "reject=450 4.7.1 Sending suspended" in r.maillog()
        # One notice, one maillog line, however often she retries.
        r.wait_for(lambda: len(notices(r)) == 1)
        body = notices(r)[0].decode()
        assert "Subject: authrelay: user alice suspended (messages)" in body
        assert "messages: 3 within 1h (limit 3)" in body and "held in the queue: 3" in body
        assert len(suspended_lines(r)) == 1
        listed = r.cli("user", "suspended").stdout
        assert listed.startswith("alice\tsince ") and "messages=3 (limit 3)" in listed
        # A restart remembers the suspension.
        r.stop()
        r.start()
        assert mail_reply(port).startswith("450")
        out = r.cli("user", "resume", "alice", "--delete-held").stdout
        assert "alice resumed" in out and "3 held message(s) of alice deleted" in out
        assert envelopes(r, held=True) == []
        # Resumed, with the counts that tripped it forgotten: she sends again.
        assert send(port, ["bob@example.net"]) == [250, 250, 250]
        assert "was not suspended" in r.cli("user", "resume", "alice").stdout
        assert len(notices(r)) == 1
    finally:
        r.stop()


def test_the_notice_goes_to_every_address_postmaster_names(tmp_path: Path) -> None:
    """Without `notify`, postmaster through [aliases]: the notice went to the first
    address of the alias only (a second admin, the security team, never heard of it).
    Now to every address it names, in one message."""
    team = [ADMIN, "security@local.test"]
    r = RelayProcess(tmp_path, {"aliases": {"postmaster": team},
                                "limits": {"containment": {"messages": 1}}}).start()
    try:
        assert send(r.ports["submissions"], ["bob@example.net"])[-1] == 250
        r.wait_for(lambda: suspended_lines(r))

        def notice() -> list:
            return [e for e in envelopes(r, held=False) if e.sender == ""]

        r.wait_for(notice)
        (env,) = notice()
        assert [x.address for x in env.recipients] == team
    finally:
        r.stop()


def test_distinct_recipients_then_release(tmp_path: Path) -> None:
    r = relay(tmp_path, recipients=4).start()
    try:
        port = r.ports["submissions"]
        # The same recipient again is not a new one.
        assert send(port, ["a@example.net", "b@example.net"])[-1] == 250
        assert send(port, ["A@example.net", "b@example.net", "c@example.net"])[-1] == 250
        assert not suspended_lines(r)
        assert send(port, ["d@example.net"])[-1] == 250
        r.wait_for(lambda: suspended_lines(r))
        assert "threshold=recipients, count=4, limit=4" in suspended_lines(r)[0]
        r.wait_for(lambda: len(envelopes(r, held=True)) == 3)
        out = r.cli("user", "resume", "alice", "--release").stdout
        assert "3 held message(s) of alice released" in out
        assert envelopes(r, held=True) == []
        assert len([e for e in envelopes(r, held=False) if e.auth_user == "alice"]) == 3
        assert mail_reply(port).startswith("250")
    finally:
        r.stop()


def test_distinct_networks(tmp_path: Path) -> None:
    r = relay(tmp_path, networks=3).start()
    try:
        port = r.ports["submissions"]
        assert send(port, ["bob@example.net"], source="127.0.1.1")[-1] == 250
        assert send(port, ["bob@example.net"], source="127.0.1.2")[-1] == 250  # same /24
        assert send(port, ["bob@example.net"], source="127.0.2.1")[-1] == 250
        assert not suspended_lines(r)
        assert send(port, ["bob@example.net"], source="127.0.3.1")[-1] == 250
        r.wait_for(lambda: suspended_lines(r))
        assert "threshold=networks, count=3, limit=3" in suspended_lines(r)[0]
        assert mail_reply(port).startswith("450")
    finally:
        r.stop()


def test_a_stranger_knowing_the_name_cannot_trip_a_users_containment(tmp_path: Path
                                                                    ) -> None:
    """Containment counts only what the user's own logins sent (and the next hops'
    refusals of it): wrong passwords for alice from many networks, and mail from
    <alice@...> by clients that did not log in as alice, count nothing towards her
    thresholds, so nobody who merely knows her name can suspend her."""
    r = relay(tmp_path, networks=2, messages=2, recipients=2).start()
    try:
        for i in range(1, 4):  # three networks: one past each threshold
            src = f"127.0.{i}.7"
            with RawClient(r.ports["submissions"], tls=client_ctx(), source=src) as c:
                c.reply()
                c.cmd("EHLO stranger.test")
                assert c.cmd(f"AUTH PLAIN {plain('alice', f'guess{i}')}").code == 535
            with RawClient(r.ports["smtp"], source=src) as c:
                c.reply()
                c.cmd("EHLO stranger.test")
                assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
                assert c.cmd(f"RCPT TO:<r{i}@local.test>").code == 250
                assert c.cmd("DATA").code == 354
                assert c.cmd("Subject: as alice\r\n\r\nhi\r\n.").code == 250
        assert send(r.ports["submissions"], ["bob@example.net"],
                    source="127.0.4.7") == [250, 250, 250]
        assert mail_reply(r.ports["submissions"]).startswith("250")
        assert not suspended_lines(r)
    finally:
        r.stop()


def test_refused_by_the_next_hop(tmp_path: Path, fake_mx: MXFactory) -> None:
    mx = fake_mx("127.0.0.2", rcpt_replies={"nobody1@example.net": "550 5.1.1 no such user",
                                            "nobody2@example.net": "550 5.1.1 no such user"})
    r = RelayProcess(tmp_path, {
        "relay": {"smart_host": [f"127.0.0.2:{mx.port}"]},
        "limits": {"containment": {"notify": ADMIN, "refused": 2}}}).start()
    try:
        port = r.ports["submissions"]
        assert send(port, ["nobody1@example.net", "ok@example.net"])[-1] == 250
        r.wait_for(lambda: "nobody1@example.net>" in r.maillog() and
                   "stat=Bounced" in r.maillog())
        assert not suspended_lines(r)
        assert send(port, ["nobody2@example.net"])[-1] == 250
        r.wait_for(lambda: suspended_lines(r))
        assert "threshold=refused, count=2, limit=2" in suspended_lines(r)[0]
        assert mail_reply(port).startswith("450")
        # The notice went out through the queue like any message (to the smart host).
        r.wait_for(lambda: any(ADMIN in m.rcpt_tos for m in mx.messages))
        notice = next(m for m in mx.messages if ADMIN in m.rcpt_tos)
        assert notice.mail_from == "<>" and b"user alice suspended (refused)" in notice.content
        assert re.search(rb"Auto-Submitted: auto-generated", notice.content)
    finally:
        r.stop()


def test_reply_all_to_dead_list_does_not_suspend_a_spam_run_does(
        tmp_path: Path, fake_mx: MXFactory) -> None:
    """Default thresholds (refused = 100, refused_per_message = 10). One reply-all to 100
    addresses the next hop refuses, and a second reply to the same list, suspend nobody;
    a spam run (messages to fresh addresses, most refused) still trips `refused`."""
    stale = [f"old{i:03}@example.net" for i in range(100)]
    spam = [[f"v{m}.{i}@example.com" for i in range(12)] for m in range(9)]
    dead = {a: "550 5.1.1 no such user" for a in stale + [a for b in spam for a in b]}
    mx = fake_mx("127.0.0.2", rcpt_replies=dead)
    r = RelayProcess(tmp_path, {"relay": {"smart_host": [f"127.0.0.2:{mx.port}"]},
                                "limits": {"containment": {"notify": ADMIN}}}).start()

    def bounced() -> int:
        return r.maillog().count("stat=Bounced")

    try:
        port = r.ports["submissions"]
        assert send(port, stale)[-1] == 250
        r.wait_for(lambda: bounced() == 100)
        assert send(port, stale)[-1] == 250  # the thread goes on
        r.wait_for(lambda: bounced() == 200)
        assert not suspended_lines(r) and mail_reply(port).startswith("250")
        for n, batch in enumerate(spam):
            assert send(port, batch)[-1] == 250
            r.wait_for(lambda n=n: bounced() == 200 + 12 * (n + 1))
            if n < 8:
                assert not suspended_lines(r)
        r.wait_for(lambda: suspended_lines(r))
        assert "threshold=refused, count=100, limit=100" in suspended_lines(r)[0]
        assert mail_reply(port).startswith("450 4.7.1")
    finally:
        r.stop()


def refused_events(r: RelayProcess) -> set[str]:
    """The addresses counted as refused for alice (the node's containment store)."""
    db = sqlite3.connect(f"file:{r.state / 'containment.db'}?mode=ro", uri=True)
    try:
        return {v for (v,) in db.execute(
            "SELECT value FROM events WHERE user = 'alice' AND kind = 'refused'")}
    finally:
        db.close()


BLOCKED = "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using " \
          "zen.spamhaus.org"
SENDER_REFUSED = "550 5.1.8 <alice@example.org>: Sender address rejected: Domain not found"


def test_policy_refusals_at_rcpt_do_not_count(tmp_path: Path, fake_mx: MXFactory) -> None:
    """The relay's address on a blocklist: the next hop answers 554 5.7.1 to every RCPT
    (or 550 5.1.8, the sender's domain, as Postfix does at RCPT). Many messages with many
    recipients suspend nobody (the refusal is about the relay or the sender, not the
    recipients); 550 5.1.1 and a bare 550 (no enhanced code) still count, and only they
    are in the store."""
    blocked = [f"b{i}@example.net" for i in range(12)]
    # Half of them as Postfix refuses a sender whose domain does not resolve: at RCPT
    # (smtpd_delay_reject), 5.1.8, the sender's address, not the recipient's.
    replies = {a: BLOCKED if i % 2 else SENDER_REFUSED for i, a in enumerate(blocked)}
    replies |= {"dead1@example.net": "550 5.1.1 no such user",
                "dead2@example.net": "550 5.1.1 no such user",
                "gone@example.net": "550 no such user here"}
    mx = fake_mx("127.0.0.2", rcpt_replies=replies)
    r = RelayProcess(tmp_path, {
        "relay": {"smart_host": [f"127.0.0.2:{mx.port}"]},
        "limits": {"containment": {"notify": ADMIN, "refused": 3}}}).start()
    try:
        port = r.ports["submissions"]
        for i in range(0, 12, 2):
            assert send(port, blocked[i:i + 2])[-1] == 250
        r.wait_for(lambda: r.maillog().count("stat=Bounced") == 12)
        assert BLOCKED.split(" ", 1)[1] in r.maillog()  # the bounce's reason, as it came
        assert "5.1.8 <alice@example.org>: Sender address rejected" in r.maillog()
        assert refused_events(r) == set()
        assert send(port, ["dead1@example.net"]) == [250, 250, 250]
        r.wait_for(lambda: r.maillog().count("stat=Bounced") == 13)
        assert send(port, ["dead2@example.net", "gone@example.net"]) == [250, 250, 250, 250]
        r.wait_for(lambda: suspended_lines(r))
        assert "threshold=refused, count=3, limit=3" in suspended_lines(r)[0]
    finally:
        r.stop()
    assert refused_events(r) == {"dead1@example.net", "dead2@example.net",
                                 "gone@example.net"}


# Postfix's other sender restrictions, reported at RCPT under smtpd_delay_reject with a
# 5.1.x code that is not 5.1.7/5.1.8: reject_unlisted_sender (5.1.0) and
# reject_unverified_sender (the probe's 5.1.1); Exim's sender verification at RCPT.
SENDER_REPLIES = [
    "550 5.1.0 <alice@example.org>: Sender address rejected: User unknown in virtual "
    "mailbox table",
    "550 5.1.1 <alice@example.org>: Sender address rejected: undeliverable address: "
    "host mx.example.org said: 550 5.1.1 no such user",
    "550 Sender verify failed",
    "553 5.1.0 <alice@example.org>: unknown in this domain",
]


def test_next_hop_refusing_the_sender_at_rcpt_does_not_count(
        tmp_path: Path, fake_mx: MXFactory) -> None:
    """A next hop that refuses the SENDER at RCPT (Postfix's "550 5.1.0 <alice@...>:
    Sender address rejected" from reject_unlisted_sender, or 5.1.1 from
    reject_unverified_sender) refuses every recipient alike: that is not the user spraying
    bad recipients, so none counts (these used to, and suspended the user after
    `refused` of them). A 550 5.1.1 about the recipient still counts."""
    names = [f"s{i}@example.net" for i in range(len(SENDER_REPLIES))]
    replies = dict(zip(names, SENDER_REPLIES, strict=True))
    replies["dead@example.net"] = "550 5.1.1 <dead@example.net>: Recipient address " \
        "rejected: User unknown"
    mx = fake_mx("127.0.0.2", rcpt_replies=replies)
    r = RelayProcess(tmp_path, {
        "relay": {"smart_host": [f"127.0.0.2:{mx.port}"]},
        "limits": {"containment": {"notify": ADMIN, "refused": 2}}}).start()
    try:
        port = r.ports["submissions"]
        for a in names:
            assert send(port, [a])[-1] == 250
        r.wait_for(lambda: r.maillog().count("stat=Bounced") == len(names))
        assert "5.1.0 <alice@example.org>: Sender address rejected" in r.maillog()
        assert send(port, ["dead@example.net"])[-1] == 250
        r.wait_for(lambda: r.maillog().count("stat=Bounced") == len(names) + 1)
        assert mail_reply(port).startswith("250")  # not suspended
    finally:
        r.stop()
    assert not suspended_lines(r) and refused_events(r) == {"dead@example.net"}


@pytest.mark.parametrize("stage", ["greeting", "mail"])
def test_refusal_before_rcpt_does_not_count(tmp_path: Path, fake_mx: MXFactory,
                                            stage: str) -> None:
    """The relay blocked at the greeting, or the smart-host tenant blocked at MAIL (554
    5.7.1): every recipient of every message bounces; none counts as a refused recipient."""
    mx = fake_mx("127.0.0.2", **{("greeting" if stage == "greeting" else "mail_reply"):
                                 BLOCKED})
    r = RelayProcess(tmp_path, {
        "relay": {"smart_host": [f"127.0.0.2:{mx.port}"]},
        "limits": {"containment": {"notify": ADMIN, "refused": 2}}}).start()
    try:
        port = r.ports["submissions"]
        for i in range(4):
            assert send(port, [f"x{i}@example.net", f"y{i}@example.net"])[-1] == 250
        r.wait_for(lambda: len(re.findall(r"to=<[xy]\d@.*stat=Bounced", r.maillog())) == 8)
        assert mail_reply(port).startswith("250")
    finally:
        r.stop()
    assert not suspended_lines(r) and refused_events(r) == set()


def test_exempt_and_off(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    r = RelayProcess(tmp_path / "a", {"limits": {"containment": {
        "messages": 1, "exempt": ["alice"]}}}, users={"alice": PASSWORD, "bob": PASSWORD})
    r.start()
    try:
        port = r.ports["submissions"]
        for _ in range(2):
            assert send(port, ["bob@example.net"])[-1] == 250
        assert mail_reply(port).startswith("250")
        assert not suspended_lines(r)
        assert send(port, ["x@example.net"], user="bob")[-1] == 250  # bob is watched
        r.wait_for(lambda: suspended_lines(r))
        assert "sasl_username=bob" in suspended_lines(r)[0]
    finally:
        r.stop()
    (tmp_path / "b").mkdir()
    r = RelayProcess(tmp_path / "b", {"limits": {"containment": {
        "messages": 1, "enabled": False}}}).start()
    try:
        for _ in range(2):
            assert send(r.ports["submissions"], ["bob@example.net"])[-1] == 250
        assert not suspended_lines(r) and not (r.state / "containment.db").exists()
    finally:
        r.stop()


def test_workers_and_metric(tmp_path: Path) -> None:
    """Two receiving workers and a master: a worker trips, the master's scheduler holds
    (control socket); the metric counts one suspension and the 450s by reason."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from support.ports import free_port

    mport = free_port()
    r = RelayProcess(tmp_path, {"metrics": {"address": f"127.0.0.1:{mport}"},
                                "limits": {"containment": {"notify": ADMIN,
                                                           "messages": 2}}},
                     workers=2).start()

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as f:
            text = f.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    try:
        port = r.ports["submissions"]
        for _ in range(2):
            assert send(port, ["bob@example.net"])[-1] == 250
        r.wait_for(lambda: suspended_lines(r))
        r.wait_for(lambda: len(envelopes(r, held=True)) == 2)
        for _ in range(2):
            assert mail_reply(port).startswith("450 4.7.1")
        r.wait_for(lambda: scrape().get(("authrelay_messages_rejected_total",
                                         (("reason", "user_suspended"),))) == 2.0)
        m = scrape()
        assert m[("authrelay_users_suspended_total", (("threshold", "messages"),))] == 1.0
        assert m[("authrelay_users_suspended_total", (("threshold", "recipients"),))] == 0.0
        assert len(notices(r)) == 1
    finally:
        r.stop()


def test_realm_spellings_are_one_account(tmp_path: Path) -> None:
    """`[auth] realms`: `alice`, `alice@relay.test` and `alice@RELAY.TEST` log in to one
    account, so they share its counts, its suspension and its AUTH lockout: a suspended
    alice must not send on under another spelling, nor a guesser get a lockout budget
    per spelling."""
    r = RelayProcess(tmp_path, {
        "auth": {"realms": ["relay.test"], "max_failures_per_user": 3,
                 "max_failures_per_ip": 100, "failure_delay": 0},
        "limits": {"max_auth_failures": 10, "connection_rate_per_ip": 0,
                   "containment": {"notify": ADMIN, "messages": 2}}}).start()
    try:
        port = r.ports["submissions"]
        assert send(port, ["bob@example.net"], user="alice") == [250, 250, 250]
        assert send(port, ["bob@example.net"], user="alice@relay.test") == [250, 250, 250]
        line = r.wait_for(lambda: suspended_lines(r), what="alice suspended")[0]
        assert "sasl_username=alice, threshold=messages, count=2" in line
        for spelling in ("alice", "alice@relay.test", "alice@RELAY.Test"):
            assert send(port, ["bob@example.net"], user=spelling) == [450], spelling
        r.wait_for(lambda: len(envelopes(r, held=True)) == 2, what="both messages held")
        assert {e.auth_user for e in envelopes(r, held=True)} == {"alice"}
        out = r.cli("user", "resume", "alice", "--delete-held").stdout
        assert "alice resumed" in out and "2 held message(s) of alice deleted" in out
        # Three wrong guesses, each under another spelling, lock alice's account for
        # addresses she has not logged in from.
        for spelling in ("alice", "alice@relay.test", "alice@Relay.test"):
            with RawClient(port, tls=client_ctx(), source="127.0.1.7") as c:
                c.reply()
                c.cmd("EHLO client.test")
                assert c.cmd(f"AUTH PLAIN {plain(spelling, 'wrong')}").code == 535
        with RawClient(port, tls=client_ctx(), source="127.0.2.8") as c:
            c.reply()
            c.cmd("EHLO client.test")
            rep = c.cmd(f"AUTH PLAIN {plain('alice@RELAY.TEST', PASSWORD)}")
            assert (rep.code, rep.text[:5]) == (454, "4.7.0"), rep
    finally:
        r.stop()


@pytest.mark.root
def test_root_cli_leaves_containment_working_for_a_dropped_daemon(
        reachable_dir: Path) -> None:
    """`authrelay user suspended` run by root before anyone was counted made
    containment.db itself, root's and 0600: the daemon, dropped to `user`, could not open
    it, so nobody was counted or suspended until a restart. A file root makes in the
    daemon's state dir is the daemon's user's."""
    from privpython import python_for
    from support.privileges import TEST_USER, unprivileged_user

    pw = unprivileged_user()
    r = RelayProcess(reachable_dir, {"user": TEST_USER, "limits": {"containment": {
        "notify": ADMIN, "messages": 2}}})
    r.python = python_for(TEST_USER)
    r.config.chmod(0o644)
    r.start()
    try:
        assert not (r.state / "containment.db").exists()
        assert r.cli("user", "suspended").stdout == ""
        assert (r.state / "containment.db").stat().st_uid == pw.pw_uid
        for _ in range(2):
            assert send(r.ports["submissions"], ["bob@example.net"]) == [250, 250, 250]
        r.wait_for(lambda: suspended_lines(r), what="alice suspended")
        assert mail_reply(r.ports["submissions"]).startswith("450 4.7.1")
        assert "cannot count" not in r.maillog()
    finally:
        r.stop()
