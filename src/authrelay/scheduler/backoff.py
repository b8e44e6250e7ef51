"""Retry back-off and queue lifetime.

Owns when a deferred recipient is tried again. Contract: `next_delay(retry, attempts)`
walks `[delivery] retry` (e.g. 5m, 10m, 20m, 40m, 1h) by the number of attempts made, then
repeats the last interval; so the delay grows with time in the queue. Each delay gets
+-10% jitter so a queue that filled during an outage does not retry in lock step, and is
clamped to [MIN_DELAY, MAX_DELAY]. `expired()` says when a message has been queued longer
than `max_queue_lifetime` (RFC 5321 4.5.4.1: give up after 4-5 days) and must bounce;
`age()` is what both it and the delay warning count (an arrival in the future: 0).
Pure functions: no I/O, no failure modes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from authrelay.spool.envelope import Envelope

MIN_DELAY = 0.01  # sanity bound only; sub-second retries are for tests ("50ms")
MAX_DELAY = 7 * 86400.0
JITTER = 0.10


def next_delay(retry: Sequence[float], attempts: int, *, jitter: float = JITTER,
               rand: Callable[[], float] = random.random) -> float:
    """Seconds until the next try after `attempts` (>= 1) failed tries."""
    if not retry:
        retry = (300.0,)
    base = retry[min(max(attempts, 1), len(retry)) - 1]
    delay = base * (1.0 + jitter * (2.0 * rand() - 1.0))
    return min(max(delay, MIN_DELAY), MAX_DELAY)


def next_attempt(env: Envelope, now: float, retry: Sequence[float], attempts: int,
                 max_queue_lifetime: float, *, jitter: float = JITTER,
                 rand: Callable[[], float] = random.random) -> float:
    """Absolute time of the next try; never later than the expiry, so the last try
    happens when the lifetime runs out and the bounce goes out then, not an interval later."""
    t = now + next_delay(retry, attempts, jitter=jitter, rand=rand)
    if max_queue_lifetime > 0:
        t = min(t, max(min(env.received_at, now) + max_queue_lifetime, now + MIN_DELAY))
    return t


def latest(retry: Sequence[float], now: float) -> float:
    """The furthest next attempt `next_attempt` can set from `now`. A recorded one beyond
    it was written while the clock was ahead (then set back): the caller tries it now
    rather than leaving the message frozen until the clock catches up."""
    return now + min(max(retry or (300.0,)) * (1.0 + JITTER), MAX_DELAY)


def age(env: Envelope, now: float) -> float:
    """Seconds the message has been queued; an arrival time in the future (the clock set
    back since it was accepted) counts as now: 0, never negative."""
    return max(0.0, now - env.received_at)


def expired(env: Envelope, now: float, max_queue_lifetime: float) -> bool:
    """True when the message has been queued for `max_queue_lifetime` or more (0 = never)."""
    return max_queue_lifetime > 0 and age(env, now) >= max_queue_lifetime
