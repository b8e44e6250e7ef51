"""Containment (policy/containment.py, policy/suspensions.py): the pure decision and the
node's SQLite store (sliding window, distinct values, bounded counts, one suspension)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.maillog import ListLog

from authrelay.config import ConfigError, Containment, from_dict
from authrelay.policy import containment
from authrelay.policy.containment import Counts, Trip
from authrelay.policy.suspensions import CLOCK_SLACK, LocalStore


def test_decide_first_threshold_in_order() -> None:
    cfg = Containment(messages=3, recipients=5, refused=2, networks=2)
    assert containment.decide("alice", Counts(2, 4, 1, 1), cfg) is None
    assert containment.decide("alice", Counts(3, 5, 0, 0), cfg) == Trip("messages", 3, 3)
    assert containment.decide("alice", Counts(0, 0, 2, 2), cfg) == Trip("refused", 2, 2)
    assert containment.decide("alice", Counts(0, 0, 0, 9), cfg).describe() == \
        "networks=9 (limit 2)"


def test_off_zero_and_exempt() -> None:
    big = Counts(10**6, 10**6, 10**6, 10**6)
    assert containment.decide("alice", big, Containment(enabled=False)) is None
    assert containment.decide("alice", big, Containment(exempt=("alice",))) is None
    assert containment.decide("", big, Containment()) is None
    off = Containment(messages=0, recipients=0, refused=0, networks=0)
    assert containment.decide("alice", big, off) is None and not containment.watched(
        "alice", off)
    only = Containment(messages=0, recipients=0, refused=0, networks=3)
    assert containment.decide("alice", Counts(10**6, 10**6, 10**6, 2), only) is None


def test_defaults_and_mail_refusal() -> None:
    c = from_dict({}).limits.containment
    assert (c.enabled, c.window, c.messages, c.recipients, c.refused, c.networks,
            c.refused_per_message) == (True, 3600.0, 500, 1000, 100, 20, 10)
    assert containment.mail_refusal(False) is None
    r = containment.mail_refusal(True)
    assert (r.code, r.enhanced) == (450, "4.7.1")
    assert containment.window_text(3600) == "1h" and containment.window_text(90) == "90s"


def test_refused_counted_capped_per_message() -> None:
    """One message counts at most `refused_per_message` refused recipients, over all its
    delivery attempts; the same list refused again counts the same addresses."""
    dead = [f"Gone{i:03}@example.net" for i in range(100)]
    first = containment.refused_counted(dead, 0, 10)
    assert first == [f"gone{i:03}@example.net" for i in range(10)]
    assert containment.refused_counted(list(reversed(dead)), 0, 10) == first
    assert containment.refused_counted(dead[:3], 8, 10) == first[:2]  # 8 earlier: 2 left
    assert containment.refused_counted(dead, 10, 10) == []
    assert containment.refused_counted(["a@x.test", "A@X.test"], 0, 10) == ["a@x.test"]
    with pytest.raises(ConfigError, match="refused_per_message: at least 1"):
        from_dict({"limits": {"containment": {"refused_per_message": 0}}})


def test_reply_all_to_dead_list_is_not_a_spam_run(tmp_path: Path) -> None:
    """The counting end to end through the suspender's store: one reply-all to 100 dead
    addresses (and replies to the same list) stays under `refused = 100`; ten messages
    to fresh dead addresses reach it."""
    store = LocalStore(tmp_path / "containment.db")
    try:
        def refusals(addresses: list[str]) -> int:
            counted = containment.refused_counted(addresses, 0, 10)
            return store.record("alice", [("refused", a) for a in counted], 3600,
                                limits={"refused": 100}).refused

        stale = [f"old{i}@example.net" for i in range(100)]
        assert refusals(stale) == 10
        for _ in range(20):  # the thread goes on: the same dead list each time
            assert refusals(stale) == 10
        run = [[f"v{m}.{i}@example.com" for i in range(10)] for m in range(9)]
        got = [refusals(batch) for batch in run]
        assert got[-1] == 100 and containment.decide(
            "alice", Counts(refused=got[-1]), Containment()) == Trip("refused", 100, 100)
    finally:
        store.close()


def test_notice_says_what_and_how() -> None:
    text = containment.notice("alice", Trip("recipients", 1000, 1000), Containment(),
                              hostname="relay.test", held=37)
    assert "recipients: 1000 within 1h (limit 1000)" in text and "held in the queue: 37" in text
    assert "authrelay user resume alice --delete-held" in text


@pytest.fixture
def store(tmp_path: Path):
    s = LocalStore(tmp_path / "containment.db")
    yield s
    s.close()


def test_sliding_window_distinct(store: LocalStore) -> None:
    c = store.record("alice", [("recipients", "a@x"), ("recipients", "b@x")], 60, now=1000)
    assert c == Counts(recipients=2)
    c = store.record("alice", [("recipients", "a@x"), ("messages", "Q1")], 60, now=1030)
    assert c == Counts(messages=1, recipients=2)  # a@x again: not a new recipient
    c = store.record("alice", [("networks", "192.0.2.0/24")], 60, now=1061)
    assert c == Counts(messages=1, recipients=1, networks=1)  # b@x (t=1000) fell out
    assert store.record("bob", [("messages", "Q2")], 60, now=1061) == Counts(messages=1)


def test_a_clock_set_back_never_counts_the_events_ahead_of_it(store: LocalStore) -> None:
    """Events are kept by the wall clock; set back (a day: a VM restored, a boot before
    NTP), those counted before the jump lay ahead of it and counted for the jump's length
    plus the window: a user at two thirds of a threshold each hour was suspended in the
    first hour after the jump (600 + 600 of 1,000). Now an event more than CLOCK_SLACK
    ahead no longer counts and is dropped, as a clock set forward forgets those it
    leaps past; one a moment ahead (processes' clocks read apart) still counts."""
    t, day = 1_000_000.0, 86400.0
    before = [("recipients", f"r{i}@x") for i in range(600)]
    assert store.record("alice", before, 3600, now=t).recipients == 600
    after = [("recipients", f"s{i}@x") for i in range(600)]
    assert store.record("alice", after, 3600, now=t - day).recipients == 600
    assert store.counts("alice", 3600, now=t - day).recipients == 600
    assert store.record("bob", [("messages", "Q1")], 3600, now=t) == Counts(messages=1)
    assert store.prune(3600, now=t - day) == 1  # bob's, a day ahead
    assert store.record("carol", [("messages", "Q2")], 3600, now=t + CLOCK_SLACK) \
        == Counts(messages=1)
    assert store.counts("carol", 3600, now=t) == Counts(messages=1)  # a moment ahead


def test_counts_stop_at_the_threshold(store: LocalStore) -> None:
    items = [("recipients", f"r{i}@x") for i in range(50)]
    c = store.record("alice", items, 60, now=1000, limits={"recipients": 10})
    assert c.recipients == 10


def test_one_suspension_and_resume(store: LocalStore) -> None:
    assert store.suspension("alice") is None
    assert store.suspend("alice", 5, "messages=3 (limit 3)", "n1") is True
    assert store.suspend("alice", 6, "recipients=9 (limit 9)", "n2") is False  # one trip
    s = store.suspension("alice")
    assert (s.user, s.at, s.reason, s.node) == ("alice", 5, "messages=3 (limit 3)", "n1")
    assert [x.user for x in store.suspensions()] == ["alice"]
    store.record("alice", [("messages", "Q1")], 60)
    assert store.resume("alice") == s and store.resume("alice") is None
    store.clear("alice")
    assert store.record("alice", [], 60) == Counts()


def test_survives_reopening(tmp_path: Path) -> None:
    a = LocalStore(tmp_path / "c.db")
    a.suspend("alice", 1, "x", "")
    a.close()
    b = LocalStore(tmp_path / "c.db")
    assert b.suspension("alice") is not None
    b.close()
    assert oct((tmp_path / "c.db").stat().st_mode & 0o777) == "0o600"


def test_notice_goes_to_postmaster_through_aliases(tmp_path: Path) -> None:
    from authrelay.policy.suspender import Suspender
    from authrelay.policy.suspensions import State

    def notify(data: dict) -> list[str]:
        cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path), **data})
        s = Suspender(cfg, State(LocalStore(tmp_path / "c.db")), submitter=None,
                      maillog=ListLog())
        return s.notify_addresses()

    assert notify({}) == ["postmaster@relay.test"]
    assert notify({"aliases": {"postmaster": "ops@example.org"}}) == ["ops@example.org"]
    assert notify({"limits": {"containment": {"notify": "sec@example.org"}}}) == \
        ["sec@example.org"]
    # Every address an alias names, and `notify` through [aliases] too.
    assert notify({"aliases": {"postmaster": ["ops@example.org", "sec@example.org"]}}) == \
        ["ops@example.org", "sec@example.org"]
    assert notify({"aliases": {"security": ["a@example.org", "b@example.org"]},
                   "limits": {"containment": {"notify": "security"}}}) == \
        ["a@example.org", "b@example.org"]
    assert notify({"limits": {"containment": {"notify": "root"}}}) == ["root@relay.test"]


async def test_database_refusing_keeps_the_suspension_on_the_node(tmp_path: Path) -> None:
    """PostgreSQL down or a role without INSERT: the node keeps the suspension itself
    (and still refuses the user); MAIL is never refused because the database is down."""
    from authrelay.policy.suspensions import State

    class Refusing:
        async def suspension(self, user: str) -> None:
            raise OSError("connection refused")

        async def suspend(self, user: str, at: int, reason: str, node: str) -> bool:
            raise PermissionError("permission denied for table suspensions")

        async def close(self) -> None:
            pass

    state = State(LocalStore(tmp_path / "c.db"), pg=Refusing())
    try:
        assert await state.suspended("alice") is False  # fail open, not refused
        assert "connection refused" in state.pg_problem
        assert await state.suspend("alice", "messages=3 (limit 3)", "n1") is True
        assert "permission denied" in state.pg_problem
        assert await state.suspend("alice", "again", "n1") is False  # still one trip
        assert await state.suspended("alice") is True  # from the node's own file
    finally:
        await state.close()


@pytest.mark.parametrize(("code", "enhanced", "counted"), [
    (550, "5.1.1", True),    # no such mailbox
    (553, "5.1.3", True),    # bad address syntax
    (550, "5.1.10", True),   # Microsoft 365: recipient not found
    (556, "5.1.10", True),   # null MX at the peer
    (554, "5.1.2", True),    # bad destination system
    (550, "5.2.1", True),    # mailbox disabled
    (552, "5.2.2", True),    # mailbox full
    (552, "5.2.3", False),   # the message's length, not the mailbox
    (550, "5.1.8", False),   # Postfix at RCPT: "Sender address rejected: Domain not found"
    (550, "5.1.7", False),   # the sender's mailbox (syntax, unverified sender)
    (550, "5.1.6", True),    # the recipient's mailbox has moved
    (554, "5.7.1", False),   # "Client host blocked using zen.spamhaus.org"
    (550, "5.7.1", False),   # a blocked tenant, relay denied
    (550, "5.7.606", False),  # Microsoft 365: the sender's tenant blocked
    (550, "5.0.0", False),   # an enhanced code saying nothing about the recipient
    (552, "5.3.4", False),
    (550, "5.4.1", False),
    (451, "4.1.1", False),   # 4xx: never
    (450, "4.2.1", False),
    (550, None, True),       # no enhanced code: 550, 551, 553 only
    (551, None, True),
    (553, None, True),
    (554, None, False),
    (552, None, False),
    (450, None, False),
    (550, "x.1.1", False),
])
def test_refuses_recipient(code: int, enhanced: str | None, counted: bool) -> None:
    """Only a reply that says the recipient is bad counts: 5.1.x, mailbox-level 5.2.x, or
    550/551/553 without an enhanced code; never policy (5.7.x) nor 4xx."""
    assert containment.refuses_recipient(code, enhanced) is counted


def test_refused_before_judges_the_recorded_reply() -> None:
    """The per-message cap counts a message's earlier refusals from their recorded replies
    (the enhanced code filled in as X.0.0 when the server gave none): a policy refusal
    leaves the room for the bad recipients of the same message."""
    assert containment.refused_before("550 5.1.1 no such user")
    assert containment.refused_before("550 5.0.0 no such user here")  # a bare 550
    assert containment.refused_before("550 5.2.1 mailbox disabled")
    assert not containment.refused_before("554 5.0.0 go away")  # a bare 554
    assert not containment.refused_before("554 5.7.1 Client host blocked using zen")
    assert not containment.refused_before("552 5.3.4 too big")
    assert not containment.refused_before("451 4.1.1 try later")
    assert not containment.refused_before("")


def test_a_refusal_about_the_sender_leaves_the_room() -> None:
    """A next hop's RCPT refusal about the SENDER (Postfix's "Sender address rejected",
    any 5.1.x; Exim's "Sender verify failed"; a reply naming the sender first) is not
    counted by the courier, so it must not use up the per-message room either: judged as
    counted, a message's sender refusals at one destination left no room for its bad
    recipients at another."""
    for reply in ("550 5.1.0 <alice@example.org>: Sender address rejected: User unknown",
                  "550 5.1.1 <alice@example.org>: Sender address rejected: undeliverable",
                  "550 5.0.0 Sender verify failed"):
        assert not containment.refused_before(reply), reply
    sender, rcpt = "alice@example.org", "bob@example.net"
    for reply in ("550 5.1.0 <alice@example.org>: Sender address rejected: User unknown",
                  "553 5.1.0 <Alice@Example.org>: unknown in this domain"):
        assert not containment.refused_before(reply, sender, rcpt), reply
        assert containment.about_sender(reply.split(None, 2)[2], sender, rcpt)
    assert containment.refused_before("550 5.1.1 <bob@example.net>: Recipient address "
                                      "rejected: User unknown", sender, rcpt)
    # sent to oneself: the named address is the recipient's too
    assert containment.refused_before("550 5.1.1 <alice@example.org>: no such user",
                                      sender, sender)
