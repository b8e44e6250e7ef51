"""Pool eviction: which pre-authentication connection makes room for a new one.

Owns the eviction candidates of one listener in this process and the choice of a victim.
A candidate is a connection that has done nothing worth keeping: its TLS handshake (465)
or its greeting delay is not finished, or its session is waiting for a command (or a
STARTTLS handshake) without having authenticated and outside a mail transaction.
Authenticated sessions and sessions inside a transaction are never candidates; neither is
a session while a command of it is being executed (an AUTH being checked). A candidate's
age (`since`) runs from its session's wait after its last command that moved it on: junk
(NOOP, RSET, ...) or an error does not make it younger (admission.py, `Ticket.idle`).

Contract: `Candidates.add(c)` / `discard(c)` in O(1); `victim(key, now, weight)` in O(1)
amortised names the candidate to evict so that a new connection from address `key` can
be admitted into a full pool, or None. The caller evicts it (`Candidate.evict()`), which
must release its pool slot synchronously.

The choice cannot be gamed into a churn: a new connection may only take the slot of the
oldest candidate of the address holding the most candidates, and only if that address
still holds at least as many as the newcomer's afterwards (`top >= mine + 2`). Every
eviction so strictly lowers the sum of squares of the per-address counts, so attackers
cannot evict each other in a loop: a flood from A addresses settles at an even share
each, and a fresh client (0 candidates) still finds an address with two or more. When
the busiest address holds only one more than the newcomer (more attacking addresses than
pool slots), only a newcomer holding none may take the slot of the oldest candidate, and
only once that has waited `TIE_AGE` seconds (evictions then run at most one pool per
`TIE_AGE`), or at once if its address holds two or more; or, at once, that of one of the
`LOOK` oldest whose address is knocking (`knocking()`: refused at a full pool
`PRESSED_AFTER` times within `PRESSURE_TTL`): a flood's sessions admitted together are
all younger than `TIE_AGE` together, and a user's session is never knocking (its address
got in without being refused, or logged in since). The counts compared may be the
ones shared by all workers (`weight`); the heaviest address is this listener's own.

An address under pressure counts one more than it holds: one refused at a full pool
`PRESSED_AFTER` times, one that took a slot by that tie rule, or one whose connection was
evicted, within `PRESSURE_TTL` seconds (`pressed()`). With more flooding addresses than
slots most of them hold none at any moment, and without this they would take every slot
that ages into a tie before a fresh client could (they reconnect far more often); marked,
they need an address holding three, and a fresh client (no history, nothing held) gets
the oldest. The marks live in a `MarkTable`: this process's own (`LocalMarks`, at most
`MAX_MARKS` addresses, the least recently pressed dropped first), or, with several
workers, the node's shared one (policy/counters.SharedCounters), so that an address
refused or evicted by one worker is marked in all. A session that authenticates clears
its address's mark (`relieve`): a user's address takes a tie slot, logs in, and its next
connection is fresh again; for `USER_TTL` after, its refusals at a full pool do not mark
it (a mail program whose retries meet a flood is not a flooder; a flooder cannot log in).
`own(key, who, now)`: the victim when the newcomer's address is at its
`max_connections_per_ip` instead (docs/LIMITS.md): that address's own candidate connected
longest ago, aged at least TIE_AGE or connected OWN_AGE (`takeable`). With several
workers, `Oldest` keeps this process's candidate of each address connected longest ago
(all its listeners) published for the others (smtpd/handoff.py), so a newcomer is passed
to the worker holding the node's.
Failure policy: pure bookkeeping; never raises for unknown candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from authrelay.policy.counters import Mark, MarkTable

TIE_AGE = 1.0  # seconds a candidate is kept before a fresh address may take its slot
# seconds connected without authenticating after which a candidate's slot may go to a
# newcomer of its own address at max_connections_per_ip however recently it moved (`own`)
OWN_AGE = 10.0
LOOK = 8  # addresses of the top count looked at for one that weighs enough
PRESSURE_TTL = 30.0  # seconds an address stays marked as pressing on a full pool
PRESSED_AFTER = 2  # refusals at a full pool within PRESSURE_TTL that mark an address
MAX_MARKS = 16384  # addresses remembered (per listener, in one process)
USER_TTL = 86400.0  # seconds an address that logged in is a user's: refusals do not mark it


class Candidate:
    """One evictable connection: its address key, since when, and how to evict it."""

    __slots__ = ("key", "since", "evict", "kind", "who", "born", "shared")

    def __init__(self, key: str, since: float, evict: Callable[[], None],
                 kind: str, who: str | None = None, born: float | None = None,
                 shared: bool = True) -> None:
        self.key = key
        self.who = who if who is not None else key  # its own address key (`_live`)
        self.since = since
        self.born = born if born is not None else since  # its connection's accept
        self.evict = evict
        self.kind = kind  # "handshake" (not yet a session) | "session" (idle, pre-AUTH)
        # Published to the other workers (`Oldest`): not a handshake candidate that
        # settles at the next turn of the loop (no TLS handshake, no greeting delay),
        # which cannot age to TIE_AGE: the accept path then writes nothing shared.
        self.shared = shared


class LocalMarks:
    """One process's eviction marks: at most MAX_MARKS addresses, the least recently
    marked dropped first (MarkTable)."""

    def __init__(self) -> None:
        self._d: dict[str, Mark] = {}

    def mark_get(self, key: str) -> Mark | None:
        return self._d.get(key)

    def mark_put(self, key: str, mark: Mark) -> None:
        self._d.pop(key, None)
        self._d[key] = mark
        if len(self._d) > MAX_MARKS:
            del self._d[next(iter(self._d))]


def takeable(since: float, born: float, now: float) -> bool:
    """Whether a candidate idle since `since`, connected at `born`, may be taken by a
    newcomer of its own address at max_connections_per_ip (`Candidates.own`)."""
    return now - since >= TIE_AGE or now - born >= OWN_AGE


class OldestTable(Protocol):
    """Where a worker publishes its candidate of each address connected longest ago
    (smtpd/handoff.Handoff)."""

    def publish(self, key: str, born: float | None, since: float = 0.0) -> None: ...


class Oldest:
    """This process's candidates by their own address (`who`), every listener's, and the
    `born` and `since` of each address's candidate connected longest ago (the one `own`
    takes first once takeable), published in `table` whenever that candidate or its
    `since` changes: O(1) for a candidate that is not it, a look at the address's
    candidates in this process (at most its max_connections_per_ip, plus one) when it
    goes (a session's command: busy, then idle again)."""

    def __init__(self, table: OldestTable) -> None:
        self._table = table
        self._by_who: dict[str, dict[Candidate, None]] = {}
        self._first: dict[str, Candidate] = {}

    def add(self, c: Candidate) -> None:
        mine = self._by_who.setdefault(c.who, {})
        mine[c] = None
        first = self._first.get(c.who)
        if first is None or c.born < first.born:
            self._first[c.who] = c
            self._table.publish(c.who, c.born, c.since)

    def discard(self, c: Candidate) -> None:
        mine = self._by_who.get(c.who)
        if mine is None or c not in mine:
            return
        del mine[c]
        if not mine:
            del self._by_who[c.who]
            del self._first[c.who]
            self._table.publish(c.who, None)
        elif self._first[c.who] is c:
            first = self._first[c.who] = min(mine, key=lambda x: x.born)
            self._table.publish(c.who, first.born, first.since)


class Candidates:
    """The candidates of one listener: by address (oldest first), addresses by count."""

    def __init__(self, marks: MarkTable | None = None, oldest: Oldest | None = None
                 ) -> None:
        self._all: dict[Candidate, None] = {}  # insertion order: oldest first
        self._by_key: dict[str, dict[Candidate, None]] = {}
        # by `who` where it is not `key` (an IPv6 client's /64 inside its /48): `own()`
        # looks at one address's candidates, never a whole /48's
        self._by_who: dict[str, dict[Candidate, None]] = {}
        self._buckets: dict[int, dict[str, None]] = {}  # count -> addresses
        self._top = 0
        # address -> its Mark: this process's own, or the workers' shared table
        self._marks: MarkTable = marks if marks is not None else LocalMarks()
        self._oldest = oldest  # the process's, with several workers (handoff.py)

    @property
    def total(self) -> int:
        return len(self._all)

    def count(self, key: str) -> int:
        got = self._by_key.get(key)
        return len(got) if got else 0

    def _move(self, key: str, old: int, new: int) -> None:
        if old:
            b = self._buckets.get(old)
            if b is not None:
                b.pop(key, None)
                if not b:
                    del self._buckets[old]
        if new:
            self._buckets.setdefault(new, {})[key] = None
            self._top = max(self._top, new)
        while self._top and self._top not in self._buckets:
            self._top -= 1

    def add(self, c: Candidate) -> None:
        if c in self._all:
            return
        self._all[c] = None
        mine = self._by_key.setdefault(c.key, {})
        mine[c] = None
        self._move(c.key, len(mine) - 1, len(mine))
        if c.who != c.key:
            self._by_who.setdefault(c.who, {})[c] = None
        if self._oldest is not None and c.shared:
            self._oldest.add(c)

    def discard(self, c: Candidate) -> None:
        if c not in self._all:
            return
        del self._all[c]
        if self._oldest is not None and c.shared:
            self._oldest.discard(c)
        if c.who != c.key:
            who = self._by_who.get(c.who)
            if who is not None:
                who.pop(c, None)
                if not who:
                    del self._by_who[c.who]
        mine = self._by_key.get(c.key)
        if mine is None:
            return
        mine.pop(c, None)
        self._move(c.key, len(mine) + 1, len(mine))
        if not mine:
            del self._by_key[c.key]

    def pressed(self, key: str, now: float, times: int = 1, refused: bool = False) -> None:
        """`key` took a slot by the tie rule or had one evicted (`times=PRESSED_AFTER`),
        or, `refused`, was refused a slot of a full pool (or for max_pending_per_ip)."""
        got = self._marks.mark_get(key)
        n, last, r, authed = got if got is not None else (0, 0.0, 0, 0.0)
        if now - last >= PRESSURE_TTL:
            n, r = 0, 0
        self._marks.mark_put(key, (n + times, now, r + refused, authed))

    def refused(self, key: str, now: float) -> None:
        """`key` was refused at a full pool (or for max_pending_per_ip)."""
        self.pressed(key, now, refused=True)

    def _live(self, key: str, now: float, who: str | None = None
              ) -> tuple[int, int, bool]:
        """(marks, refusals) of `key` within PRESSURE_TTL, and whether it is a user's
        address (`who`, the client's own address key, authenticated within USER_TTL;
        `key` itself when None: an IPv6 client is counted by its /48 (`key`), but only
        its own /64 (`who`) becomes a user's by a login). A user's has no refusals: a
        mail program whose first tries met the flood is refused like a flooder, and
        marked by it stayed a flooder to every try until one got in; what a flooder
        cannot do is log in. A tie slot it took still marks it (one such slot per
        PRESSURE_TTL unless it logs in again)."""
        got = self._marks.mark_get(key)
        mine = got if who is None or who == key else self._marks.mark_get(who)
        user = mine is not None and mine[3] > 0 and now - mine[3] < USER_TTL
        if got is None or now - got[1] >= PRESSURE_TTL:
            return 0, 0, user
        if user:
            return got[0] - got[2], 0, True
        return got[0], got[2], False

    def knocking(self, key: str, now: float, who: str | None = None) -> bool:
        """Refused at a full pool `PRESSED_AFTER` times within `PRESSURE_TTL`, and
        not a user's: a flood's address, whose connection a fresh client may take
        however young (a tie slot it took or a slot it lost marks it, never this)."""
        return self._live(key, now, who)[1] >= PRESSED_AFTER

    def user(self, key: str, now: float, who: str | None = None) -> bool:
        """Whether `who` (`key` when None) authenticated within USER_TTL (`relieve`)."""
        return self._live(key, now, who)[2]

    def relieve(self, key: str, now: float, who: str | None = None) -> None:
        """A session from `key` authenticated: its address is a user's, not a flood's
        (an office behind one NAT, a mail program that connects again); its marks go,
        so its next connection is a fresh client again, and for USER_TTL its refusals
        do not mark it (the shared table keeps a user's entry before a flood's). `who`:
        the client's own address key when `key` is wider (an IPv6 /48): that one becomes
        a user's, not every address of the /48 (a flooder in the same /48, a hosting
        provider's, would be a user's too)."""
        if who is None or who == key:
            self._marks.mark_put(key, (0, 0.0, 0, now))
            return
        self._marks.mark_put(key, (0, 0.0, 0, 0.0))
        self._marks.mark_put(who, (0, 0.0, 0, now))

    def under_pressure(self, key: str, now: float, who: str | None = None) -> bool:
        return self._live(key, now, who)[0] >= PRESSED_AFTER

    def own(self, key: str, who: str, now: float) -> Candidate | None:
        """The candidate whose slot a new connection from address `who` (eviction key
        `key`) may take when `who` is at `max_connections_per_ip`: its own connected
        longest ago, once it has waited TIE_AGE since its last command that moved it on
        (younger ones are kept, so two clients of one address cannot evict each other
        for ever: each keeps its slot at least TIE_AGE), or once it has been connected
        OWN_AGE without authenticating, however often it moved (a guesser's AUTH LOGIN
        cancelled with `*` every 0.9 s kept each of its sessions younger than TIE_AGE
        for ever); or None. No mark is set: an address evicting its own connection is
        not pressing on a pool, and a NAT's user must not be counted a flooder for it.
        Looks at that address's candidates of this listener only (at most its limit,
        plus one)."""
        best: Candidate | None = None
        for c in (self._by_key if who == key else self._by_who).get(who, ()):
            if takeable(c.since, c.born, now) and (best is None or c.born < best.born):
                best = c
        return best

    def victim(self, key: str, now: float, weight: Callable[[str], int] | None = None,
               pressed: bool | None = None, who: str | None = None) -> Candidate | None:
        """The candidate whose slot a new connection from `key` may take, or None.

        `weight(address)` is what the rule compares: by default this listener's own
        count; with several workers the admission passes the count shared by all of
        them (a flood spread over the workers must not look light to each one).
        `pressed`: whether `key` is under pressure, as it was when its admission began
        (None: now); the admission's further tries must not see the mark its first one
        set. The victim's address is marked too: it reconnects at once, and would
        otherwise take the next aged slot before a fresh client could."""
        if not self._all:
            return None
        w = weight or self.count
        mine = w(key) + (self.under_pressure(key, now, who) if pressed is None else pressed)
        # The heaviest here; with shared weights a few of this listener's heaviest are
        # looked at (they may weigh differently across the workers), never more.
        for i, heaviest in enumerate(self._buckets[self._top]):
            if w(heaviest) >= mine + 2:
                self.pressed(heaviest, now, PRESSED_AFTER)
                return next(iter(self._by_key[heaviest]))
            if i + 1 >= LOOK:
                break
        if mine == 0:
            # The first of the LOOK longest in the order (a session idle again after
            # a NOOP is last in it, however long it has waited) that has waited
            # TIE_AGE, or whose address is knocking; the first also when its address
            # holds two or more (as rule one). A flood's sessions admitted together (a
            # stress-mode timeout ending them at once, or a flood closing and reopening
            # them all) are all younger than TIE_AGE together; their addresses are the
            # ones refused meanwhile (measured: 600 addresses on a 587 pool of 48
            # reopening every 0.8 s: 1 of 16 logins served).
            # Never a user's address's (one that logged in lately): its next login, slow
            # in its STARTTLS handshake on a loaded machine, aged past TIE_AGE while
            # the flood's were young, was taken by a fresh flooder (seen: mail programs
            # that had logged in, retrying in a 3,000-address flood's first second, were
            # closed after EHLO or STARTTLS, and then, marked as having lost a slot, were
            # refused 421 to every retry); only rule one evicts it.
            for i, c in enumerate(self._all):
                _n, refusals, user = self._live(c.key, now, c.who)
                if not user and (now - c.since >= TIE_AGE or refusals >= PRESSED_AFTER or
                                 i == 0 and w(c.key) >= 2):
                    self.pressed(key, now, PRESSED_AFTER)  # one such slot per PRESSURE_TTL
                    self.pressed(c.key, now, PRESSED_AFTER)
                    return c
                if i + 1 >= LOOK:
                    break
        return None
