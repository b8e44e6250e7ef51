"""Throttle (anvil) counters: limits, sliding windows, bounded memory, reload.

The clock is the module's `time.monotonic`, replaced by a settable one so windows can be
crossed without waiting.
"""

from __future__ import annotations

import pytest

from authrelay import replies
from authrelay.config import from_dict
from authrelay.policy import throttle as th


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(th.time, "monotonic", c)
    return c


def make(limits: dict | None = None, auth: dict | None = None, share: th.Share | None = None
         ) -> th.Throttle:
    cfg = from_dict({"limits": {"connection_rate_per_ip": 0, **(limits or {})},
                     "auth": auth or {}})
    return th.Throttle(cfg, share)


def test_concurrent_connections_global_and_per_ip(clock: Clock) -> None:
    t = make({"max_connections": 3, "max_connections_per_ip": 2})
    assert t.connect("192.0.2.1") is None
    assert t.connect("192.0.2.1") is None
    assert t.connect("192.0.2.1") is replies.TOO_MANY_FROM_IP
    assert t.connect("192.0.2.2") is None
    assert t.connect("192.0.2.3") is replies.TOO_MANY_CONNECTIONS
    t.disconnect("192.0.2.1")
    assert t.connect("192.0.2.3") is None
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        t.disconnect(ip)
    assert t.connections == 0 and t.per_ip == {}


def test_connection_rate_per_ip_slides(clock: Clock) -> None:
    t = make({"connection_rate_per_ip": 3})
    for _ in range(3):
        assert t.connect("192.0.2.9") is None
        t.disconnect("192.0.2.9")
    assert t.connect("192.0.2.9") is replies.RATE_LIMITED
    assert t.connect("192.0.2.10") is None  # others unaffected
    clock.now += 61
    assert t.connect("192.0.2.9") is None


def test_connection_rate_global(clock: Clock) -> None:
    t = make({"connection_rate": 2})
    assert t.connect("a") is None
    assert t.connect("b") is None
    assert t.connect("c") is replies.RATE_LIMITED
    clock.now += 1.01
    assert t.connect("c") is None


def test_auth_lock_per_ip_and_user_expires(clock: Clock) -> None:
    t = make(auth={"max_failures_per_ip": 3, "max_failures_per_user": 2,
                   "failure_window": 60})
    t.auth_failed("192.0.2.1", "Alice")
    assert not t.auth_locked("192.0.2.1", "bob")
    t.auth_failed("192.0.2.2", "alice")
    assert t.auth_locked("192.0.2.3", "ALICE")  # user names fold case
    assert not t.auth_locked("192.0.2.3", "bob")
    t.auth_failed("192.0.2.1", "x")
    t.auth_failed("192.0.2.1", "y")
    assert t.auth_locked("192.0.2.1", "bob")  # the IP is locked for every user
    clock.now += 61
    assert not t.auth_locked("192.0.2.1", "alice")


def test_user_rates(clock: Clock) -> None:
    t = make({"user_messages_per_hour": 2, "user_recipients_per_hour": 5})
    assert t.user_may_send("u") and t.user_may_add_rcpt("u", 4)
    assert not t.user_may_add_rcpt("u", 5)
    t.user_sent("u", 3)
    assert t.user_may_send("u")
    assert t.user_may_add_rcpt("u", 1) and not t.user_may_add_rcpt("u", 2)
    t.user_sent("u", 1)
    assert not t.user_may_send("u")
    assert t.user_may_send("v")
    clock.now += 3601
    assert t.user_may_send("u") and t.user_may_add_rcpt("u", 4)


def test_user_rate_huge_message_counts_bounded(clock: Clock) -> None:
    t = make({"user_recipients_per_hour": 3})
    t.user_sent("u", 10_000)  # stored as at most cap+1 events, still over the limit
    assert not t.user_may_add_rcpt("u", 0)
    assert len(t.user_rcpts._d["u"]) <= t.user_rcpts.cap + 1


def test_window_keys_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(th, "MAX_KEYS", 100)
    w = th._Window(60, 5)
    for i in range(1000):
        w.add(f"10.0.{i // 256}.{i % 256}", clock.now)
    assert len(w._d) == 100
    assert w.count("10.0.3.231", clock.now) == 1  # the newest are kept


def test_share_splits_global_limits_only() -> None:
    cfg = from_dict({"limits": {"max_connections": 100, "connection_rate": 9,
                                "max_connections_per_ip": 20}})
    t = th.Throttle(cfg, th.Share(1, 4))
    assert t.max_connections == 25 and t.rate_global_limit == 2
    assert t.max_per_ip == 20
    assert th.Share(0, 4).part(2) == 1 and th.Share(0, 4).part(0) == 0


def test_reload_keeps_counts(clock: Clock) -> None:
    t = make(auth={"max_failures_per_ip": 2})
    t.auth_failed("192.0.2.1", "a")
    t.auth_failed("192.0.2.1", "b")
    assert t.auth_locked("192.0.2.1", "c")
    t.reload(from_dict({"limits": {"max_recipients": 5}, "auth": {"max_failures_per_ip": 3}}))
    assert not t.auth_locked("192.0.2.1", "c")
    t.auth_failed("192.0.2.1", "c")
    assert t.auth_locked("192.0.2.1", "c")  # the two earlier failures still count
