"""smtpd/eviction.py: the choice of a victim cannot be turned into a churn."""

from __future__ import annotations

import random

import pytest

from authrelay.smtpd.admission import eviction_key
from authrelay.smtpd.eviction import (
    MAX_MARKS,
    OWN_AGE,
    PRESSED_AFTER,
    PRESSURE_TTL,
    TIE_AGE,
    Candidate,
    Candidates,
)


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


def _flood(cs: Candidates, addrs: int, pool: int, seconds: float, fresh_every: float,
           rng: random.Random) -> tuple[int, int, int]:
    """`addrs` flooding addresses reconnecting at once whenever refused or evicted (as the
    admission does: a refusal at a full pool is `pressed`), one fresh client (a new
    address) every `fresh_every` seconds. Returns (fresh tries, fresh admitted,
    evictions by the flood)."""
    held: list[Candidate] = []
    now, tries, admitted, churn, next_fresh, n = 0.0, 0, 0, 0, 1.0, 0
    while now < seconds:
        now += 0.0005
        if now >= next_fresh:
            next_fresh += fresh_every
            n += 1
            key, fresh = f"192.0.2.{n}", True
            tries += 1
        else:
            key, fresh = f"10.0.{rng.randrange(addrs) // 250}.{rng.randrange(250)}", False
        if len(held) >= pool:
            v = cs.victim(key, now)
            if v is None:
                cs.pressed(key, now)
                continue
            cs.discard(v)
            held.remove(v)
            churn += not fresh
        c = Candidate(key, now, lambda: None, "handshake")
        admitted += fresh
        if not fresh:  # a fresh client completes its handshake and AUTH: no candidate
            cs.add(c)
            held.append(c)
    return tries, admitted, churn


def test_fresh_client_served_under_more_flooding_addresses_than_slots() -> None:
    """120 addresses, 100 slots: most flooding addresses hold none at any moment, so the
    tie rule alone would hand every aged slot to them; marked as pressing, they need an
    address holding three and the fresh client gets the oldest."""
    rng = random.Random(17)
    tries, admitted, churn = _flood(Candidates(), 120, 100, 60.0, 0.25, rng)
    assert tries >= 200
    assert admitted >= tries * 0.95, (admitted, tries)
    assert churn < 1000, churn  # the flood does not evict itself in a loop


def test_pressure_marks_expire_and_are_bounded() -> None:
    cs = Candidates()
    cs.pressed("a", 0.0)
    assert not cs.under_pressure("a", 0.1)  # one refusal: a client may retry once
    cs.pressed("a", 0.2)
    assert cs.under_pressure("a", 0.3)
    assert not cs.under_pressure("a", 0.2 + PRESSURE_TTL)
    cs.pressed("a", 100.0)  # the old count has expired: one refusal again
    assert not cs.under_pressure("a", 100.1)
    for i in range(MAX_MARKS + 10):
        cs.pressed(f"k{i}", 200.0, PRESSED_AFTER)
    assert not cs.under_pressure("k0", 200.0)  # dropped: the least recently pressed
    assert cs.under_pressure(f"k{MAX_MARKS + 9}", 200.0)


@pytest.mark.parametrize("key, ekey", [
    ("192.0.2.7", "192.0.2.7"),  # IPv4: the address
    ("2001:db8:1:2::/64", "2001:db8:1::/48"),  # ipv6_prefix_length 64 (the default)
    ("2001:db8:1:2::9", "2001:db8:1::/48"),  # ipv6_prefix_length 128
    ("2001:db8:1:2::/56", "2001:db8:1::/48"),
    ("2001:db8::/48", "2001:db8::/48"), ("2001:db8::/32", "2001:db8::/32"),  # wider: kept
])
def test_eviction_counts_an_ipv6_client_by_its_48(key: str, ekey: str) -> None:
    """A /48's /64s are one address to eviction (a host rotates through them at will)."""
    assert eviction_key(key) == ekey


def test_a_knocking_addresss_young_candidate_is_taken_a_users_is_not() -> None:
    """All candidates younger than TIE_AGE (a flood's sessions admitted together): one
    whose address was refused at the full pool twice is taken at once; one whose address
    only took a slot by the tie rule (a user's, or one that authenticated since) is not."""
    cs, log = Candidates(), []
    user, flood = _cand("u", 10.0, log), _cand("f", 10.1, log)
    cs.add(user)
    cs.add(flood)
    cs.pressed("u", 10.0, PRESSED_AFTER)  # took its slot by the tie rule
    cs.refused("f", 9.0)
    assert cs.victim("fresh", 10.2) is None  # refused once: may be a client's retry
    cs.refused("f", 9.5)
    assert cs.victim("fresh", 10.2) is flood
    cs.relieve("f", 10.25)  # logged in since: a user's address
    assert cs.victim("other", 10.3) is None


def test_a_users_address_refused_twice_is_still_a_fresh_client() -> None:
    """A mail program whose tries meet a flood is refused like a flooder; marked by two
    refusals it was one to every try until one got in (measured before: 10 of 10 such
    retries refused during a flood). An address that logged in lately is a user's: its
    refusals do not mark it (a flooder cannot log in); a tie slot it takes still does."""
    cs, log = Candidates(), []
    flood = [_cand(f"f{i}", 0.0, log) for i in range(3)]  # one each, aged
    for c in flood:
        cs.add(c)
    cs.relieve("u", 1.0)  # logged in
    for t in (5.0, 5.5):
        cs.refused("u", t)
        cs.refused("x", t)
    assert not cs.under_pressure("u", 6.0) and not cs.knocking("u", 6.0)
    assert cs.under_pressure("x", 6.0) and cs.knocking("x", 6.0)
    assert cs.victim("x", 6.0) is None  # never logged in: a flood's address, or one like it
    assert cs.victim("u", 6.0) is flood[0]  # the user's retry takes the aged slot
    cs.discard(flood[0])
    assert cs.victim("u", 6.1) is None  # one tie slot per PRESSURE_TTL, as any address
    assert cs.under_pressure("u", 6.1 + PRESSURE_TTL / 2)


def test_a_users_aged_session_is_not_taken_by_the_tie_rule() -> None:
    """A user's next login, slow in its STARTTLS handshake, aged past TIE_AGE while the
    flood's sessions were young, and a fresh flooder took its slot (then its address was
    marked as having lost one). An address that logged in lately loses a slot only to
    rule one (it holds two more than the newcomer); a flood's aged one is taken."""
    cs, log = Candidates(), []
    cs.relieve("u", 1.0)
    mine = _cand("u", 2.0, log)  # the oldest, aged
    flood = _cand("f", 2.5, log)
    cs.add(mine)
    cs.add(flood)
    assert cs.victim("fresh", 5.0) is flood
    cs.discard(flood)
    assert cs.victim("fresh2", 5.0) is None
    cs.add(_cand("u", 3.0, log))  # two: rule one takes its oldest still
    assert cs.victim("fresh3", 5.0) is mine


def test_a_login_makes_its_own_v6_net_a_users_not_its_whole_48() -> None:
    """(9d35eec) An IPv6 client is counted by its /48 (eviction_key), and a login made
    that whole /48 a user's for USER_TTL: a flooder in the same /48 as a user (a hosting
    provider's, each customer a /64 of it) had its refusals unmarked and its aged
    sessions safe from the tie rule. Now the login's own /64 is a user's: its retries
    still are not marked, the flooder's /64s are, and lose their aged slots."""
    user_net, flood_net = "2001:db8:7:1::/64", "2001:db8:7:2::/64"
    ekey = eviction_key(flood_net)
    assert ekey == eviction_key(user_net)  # one /48
    cs, log = Candidates(), []
    cs.relieve(ekey, 1.0, who=user_net)  # the user logged in
    for t in (5.0, 5.5):
        cs.refused(ekey, t)  # the flooder's tries, refused at the full pool
    assert cs.user(ekey, 6.0, who=user_net) and not cs.knocking(ekey, 6.0, who=user_net)
    assert not cs.user(ekey, 6.0, who=flood_net)
    assert cs.knocking(ekey, 6.0, who=flood_net)
    assert cs.under_pressure(ekey, 6.0, who=flood_net)
    aged = Candidate(ekey, 2.0, lambda: log.append("flood"), "session", who=flood_net)
    cs.add(aged)
    assert cs.victim("198.51.100.7", 6.0) is aged  # a fresh client takes the flood's slot


def test_own_takes_the_addresses_oldest_aged_candidate_only() -> None:
    """max_connections_per_ip: a newcomer takes its own address's oldest candidate, and
    only one that has waited TIE_AGE (two clients of one address cannot evict each
    other for ever); never another address's, nor another /64 of the same /48."""
    cs, log = Candidates(), []
    mine_young = Candidate("a", 5.0, lambda: None, "session", who="a")
    mine_old = Candidate("a", 1.0, lambda: None, "session", who="a")
    other = Candidate("b", 0.0, lambda: None, "session", who="b")
    for c in (mine_young, mine_old, other):
        cs.add(c)
    assert cs.own("a", "a", 1.0 + TIE_AGE - 0.01) is None  # none aged yet
    assert cs.own("a", "a", 1.0 + TIE_AGE) is mine_old
    assert cs.own("c", "c", 100.0) is None
    v6 = Candidate("2001:db8::/48", 0.0, lambda: None, "session", who="2001:db8:0:1::/64")
    cs.add(v6)
    assert cs.own("2001:db8::/48", "2001:db8:0:2::/64", 100.0) is None
    assert cs.own("2001:db8::/48", "2001:db8:0:1::/64", 100.0) is v6
    cs.discard(v6)
    assert cs.own("2001:db8::/48", "2001:db8:0:1::/64", 100.0) is None
    assert not log
    assert not cs.under_pressure("a", 100.0)  # own() sets no mark


def test_own_takes_a_candidate_connected_own_age_ago_however_recently_it_moved() -> None:
    """A session that moves every 0.9 s (AUTH LOGIN, then `*`) was never TIE_AGE old
    since its last move, so a guesser's sessions kept their address's slots for ever;
    connected OWN_AGE ago without authenticating it is taken all the same, the one
    connected longest ago first."""
    cs = Candidates()
    moved = OWN_AGE + 0.1  # both just moved on
    second = Candidate("a", moved, lambda: None, "session", who="a", born=0.5)
    first = Candidate("a", moved, lambda: None, "session", who="a", born=0.0)
    for c in (second, first):
        cs.add(c)
    assert cs.own("a", "a", OWN_AGE + 0.2) is first
    cs.discard(first)
    assert cs.own("a", "a", OWN_AGE + 0.2) is None  # 0.5 s short of OWN_AGE
    assert cs.own("a", "a", OWN_AGE + 0.5) is second


class _Counted(Candidate):
    """A candidate counting how often its address or age is read (what `own` looks at)."""

    __slots__ = ()
    reads = 0

    @property  # type: ignore[override]
    def who(self) -> str:
        _Counted.reads += 1
        return Candidate.who.__get__(self)  # type: ignore[attr-defined, no-any-return]

    @who.setter
    def who(self, v: str) -> None:
        Candidate.who.__set__(self, v)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def since(self) -> float:
        _Counted.reads += 1
        return Candidate.since.__get__(self)  # type: ignore[attr-defined, no-any-return]

    @since.setter
    def since(self, v: float) -> None:
        Candidate.since.__set__(self, v)  # type: ignore[attr-defined]


def test_own_looks_at_one_64s_candidates_not_its_48s() -> None:
    """At its limit, an IPv6 /64's newcomer looks at that /64's candidates only: a /48
    holding a pool's worth of candidates in other /64s costs it nothing (before: every
    connection refused for the per-address limit went through the whole /48's)."""
    cs = Candidates()
    for i in range(2000):
        cs.add(_Counted("2001:db8::/48", 0.0, lambda: None, "session",
                        who=f"2001:db8:0:{i:x}::/64"))
    _Counted.reads = 0
    assert cs.own("2001:db8::/48", "2001:db8:0:7::/64", 10.0) is not None
    assert _Counted.reads <= 4, _Counted.reads
