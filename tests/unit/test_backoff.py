"""Back-off: walks [delivery] retry, repeats the last, jitter +-10%, clamped; lifetime."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from authrelay.scheduler import backoff
from authrelay.spool.envelope import Envelope

RETRY = (300.0, 600.0, 1200.0, 2400.0, 3600.0)


def test_walks_the_list_then_repeats_the_last() -> None:
    mid = lambda: 0.5  # noqa: E731  (no jitter at the midpoint)
    got = [backoff.next_delay(RETRY, n, rand=mid) for n in range(1, 9)]
    assert got == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0, 3600.0]
    assert backoff.next_delay(RETRY, 0, rand=mid) == 300.0  # attempts < 1 treated as 1


def test_jitter_bounds() -> None:
    assert backoff.next_delay(RETRY, 1, rand=lambda: 0.0) == 270.0
    assert backoff.next_delay(RETRY, 1, rand=lambda: 1.0) == 330.0


@given(st.integers(min_value=1, max_value=50), st.floats(min_value=0.0, max_value=1.0))
def test_always_within_jitter_and_clamp(attempts: int, r: float) -> None:
    d = backoff.next_delay(RETRY, attempts, rand=lambda: r)
    base = RETRY[min(attempts, len(RETRY)) - 1]
    assert base * 0.9 - 1e-9 <= d <= base * 1.1 + 1e-9
    assert backoff.MIN_DELAY <= d <= backoff.MAX_DELAY


def test_clamped() -> None:
    assert backoff.next_delay((0.0,), 1) == backoff.MIN_DELAY
    assert backoff.next_delay((30 * 86400.0,), 1) == backoff.MAX_DELAY


def test_expired_and_last_attempt_at_expiry() -> None:
    env = Envelope(queue_id="Q1", sender="a@x", received_at=1000.0)
    life = 5 * 86400.0
    assert not backoff.expired(env, 1000.0 + life - 1, life)
    assert backoff.expired(env, 1000.0 + life, life)
    assert not backoff.expired(env, 10**12, 0)  # 0 = never
    now = 1000.0 + life - 60
    t = backoff.next_attempt(env, now, RETRY, 5, life, rand=lambda: 0.5)
    assert t == 1000.0 + life  # not an hour later: the bounce goes out on time
    early = backoff.next_attempt(env, 1000.0, RETRY, 1, life, rand=lambda: 0.5)
    assert early == 1300.0
