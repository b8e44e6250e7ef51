"""smtpd/eviction.py: the choice of a victim cannot be turned into a churn."""

from __future__ import annotations

import random

from authrelay.smtpd.eviction import TIE_AGE, Candidate, Candidates


def _cand(key: str, since: float, log: list[str]) -> Candidate:
    return Candidate(key, since, lambda: log.append(key), "handshake")


def test_fresh_address_evicts_oldest_of_busiest() -> None:
    cs, log = Candidates(), []
    a1, a2 = _cand("a", 0.0, log), _cand("a", 1.0, log)
    b1 = _cand("b", 0.5, log)
    for c in (a1, b1, a2):
        cs.add(c)
    assert cs.victim("fresh", 2.0) is a1  # "a" holds 2: its oldest
    assert cs.victim("b", 2.0) is None  # b would hold 2, a 1: no gain
    assert cs.victim("a", 2.0) is None


def test_tie_only_after_age() -> None:
    cs, log = Candidates(), []
    old = _cand("a", 0.0, log)
    cs.add(old)
    cs.add(_cand("b", 0.2, log))
    assert cs.victim("fresh", TIE_AGE - 0.1) is None
    assert cs.victim("fresh", TIE_AGE) is old
    assert cs.victim("a", 5.0) is None  # a holder of one never swaps for another


def test_discard_keeps_counts() -> None:
    cs, log = Candidates(), []
    xs = [_cand("a", float(i), log) for i in range(3)]
    for c in xs:
        cs.add(c)
    cs.add(xs[0])  # idempotent
    assert cs.total == 3 and cs.count("a") == 3
    cs.discard(xs[1])
    cs.discard(xs[1])  # idempotent
    assert cs.count("a") == 2 and cs.victim("z", 9.0) is xs[0]
    cs.discard(xs[0])
    cs.discard(xs[2])
    assert cs.total == 0 and cs.victim("z", 99.0) is None


def test_attackers_cannot_evict_each_other_forever() -> None:
    """40 addresses reconnecting whenever theirs is evicted: evictions stop (the sum of
    squares of the counts falls with each), and a fresh client still gets a victim."""
    rng = random.Random(7)
    cs, pool, now, evictions = Candidates(), 100, 0.0, 0
    held: list[Candidate] = []
    for step in range(20000):
        now += 0.001
        key = f"10.0.0.{rng.randrange(40)}"
        if len(held) < pool:
            c = Candidate(key, now, lambda: None, "handshake")
            cs.add(c)
            held.append(c)
            continue
        v = cs.victim(key, now)
        if v is None:
            continue
        evictions += 1
        cs.discard(v)
        held.remove(v)
        c = Candidate(key, now, lambda: None, "handshake")
        cs.add(c)
        held.append(c)
        assert step < 20000
    counts = sorted(cs.count(f"10.0.0.{i}") for i in range(40))
    assert counts[-1] - counts[0] <= 1, counts  # even shares: nobody may evict
    assert evictions < 400, evictions
    assert cs.victim("192.0.2.1", now) is not None
