"""Containment (policy/containment.py, policy/suspensions.py): the pure decision and the
node's SQLite store (sliding window, distinct values, bounded counts, one suspension)."""

from __future__ import annotations

from pathlib import Path

import pytest

from authrelay.config import Containment, from_dict
from authrelay.policy import containment
from authrelay.policy.containment import Counts, Trip
from authrelay.policy.suspensions import LocalStore


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
    assert (c.enabled, c.window, c.messages, c.recipients, c.refused, c.networks) == \
        (True, 3600.0, 500, 1000, 100, 20)
    assert containment.mail_refusal(False) is None
    r = containment.mail_refusal(True)
    assert (r.code, r.enhanced) == (450, "4.7.1")
    assert containment.window_text(3600) == "1h" and containment.window_text(90) == "90s"


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
