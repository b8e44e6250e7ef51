"""Eviction across the workers of a node (smtpd/eviction.py, smtpd/admission.py): the
marks kept in the shared table (policy/counters.py) and one eviction per newcomer.
Real shared memory (a forked worker writes, the parent reads), a real Acceptor with the
shared throttle two workers use, real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from types import SimpleNamespace

from authrelay.config import Config, from_dict
from authrelay.policy.anvil import SharedThrottle
from authrelay.policy.counters import MARK_WAYS, SharedCounters
from authrelay.policy.throttle import Exemptions, Share
from authrelay.smtpd.admission import Acceptor
from authrelay.smtpd.eviction import OWN_AGE, PRESSED_AFTER, Candidate, Candidates
from authrelay.smtpd.handoff import Handoff, Passed

CFG = {"listen": [{"address": "127.0.0.1:2587", "mode": "submission", "max_connections": 4}],
       "limits": {"connection_rate_per_ip": 0, "max_connections_per_ip": 50}}


def _in_child(fn: object) -> None:
    """Run `fn` in a forked process (another worker) and wait for it."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()  # type: ignore[operator]
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_address_refused_by_one_worker_is_knocking_at_another() -> None:
    """The refusals that mark a flood's address were counted in each worker: with two
    workers an address had to be refused twice at the same one before any saw it knocking
    or under pressure (measured: a 3,000-address flood through PROXY headers, 2 workers:
    5 of 16 real logins refused 421 4.7.0 in its first seconds). Refused once in each of
    two workers, it is knocking and under pressure in both; one that logged in at a
    third is neither, everywhere."""
    table = SharedCounters(slots=4096, workers=2)
    here = Candidates(table)
    _in_child(lambda: Candidates(table).refused("198.51.100.7", 10.0))
    here.refused("198.51.100.7", 10.5)
    assert here.knocking("198.51.100.7", 11.0)
    assert here.under_pressure("198.51.100.7", 11.0)
    _in_child(lambda: Candidates(table).refused("198.51.100.8", 10.0))
    assert not here.knocking("198.51.100.8", 11.0)  # once: may be a client's retry
    _in_child(lambda: Candidates(table).relieve("198.51.100.7", 11.5))
    assert not here.knocking("198.51.100.7", 12.0)
    assert not here.under_pressure("198.51.100.7", 12.0)


def test_the_shared_marks_keep_a_users_entry_and_tell_addresses_apart() -> None:
    """Bounded (MARK_WAYS entries a bucket): a flood's addresses push out one another's
    marks, not a user's; and no address ever reads another's marks."""
    table = SharedCounters(slots=MARK_WAYS, workers=1)  # one bucket: all collide
    cs = Candidates(table)
    cs.relieve("user", 1.0)
    for i in range(50):
        for t in range(PRESSED_AFTER):
            cs.refused(f"flood{i}", 2.0 + i + t / 10)
    assert table.mark_get("user") == (0, 0.0, 0, 1.0)
    assert cs.knocking("flood49", 52.0)
    assert table.mark_get("flood0") is None  # pushed out by the later ones
    assert not cs.knocking("someone", 52.0)


def _acceptor(cfg: Config, throttle: SharedThrottle) -> tuple[Acceptor, list[str]]:
    said: list[str] = []
    server = SimpleNamespace(
        cfg=cfg, share=Share(), throttle=throttle, exemptions=Exemptions(cfg),
        proxy_trusted=None, stopping=False, open_sockets=0, handoff=None, oldest=None,
        protocol_factory=lambda ln, ticket: asyncio.Protocol,
        metrics_connection=lambda mode, result: said.append(result),
        refused=lambda ln, ip, r, reason, tls: said.append(f"421 {reason}"),
        fd_released=lambda: None, fd_tight=lambda a: False)
    ln_cfg = cfg.listen[0]
    ln = SimpleNamespace(cfg=ln_cfg, mode=ln_cfg.mode, sock=None,
                         name=f"{ln_cfg.mode}:{ln_cfg.address}")
    return Acceptor(server, ln), said  # type: ignore[arg-type]


async def _one_newcomer_evicts_one() -> None:
    cfg = from_dict(CFG)
    table = SharedCounters(slots=4096, workers=2)
    mine, other = SharedThrottle(cfg, table), SharedThrottle(cfg, table)  # two workers
    acc, said = _acceptor(cfg, mine)
    evicted: list[Candidate] = []

    def evict(c: Candidate) -> None:
        evicted.append(c)
        mine.disconnect("192.0.2.1", acc.pools)  # its slot freed ...
        # ... and a client of the other worker tries for it at once
        other.connect(f"192.0.2.{100 + len(evicted)}", acc.pools)

    # a flooder holds the whole pool: four idle sessions, here
    for _ in range(4):
        assert mine.connect("192.0.2.1", acc.pools).admitted
        c = Candidate("192.0.2.1", 0.0, lambda: None, "session")
        c.evict = lambda c=c: evict(c)  # type: ignore[misc]
        acc.candidates.add(c)
    a, b = socket.socketpair()
    try:
        acc._admit_client(a, ("127.0.0.9", 40000), None)  # a fresh client, a user
        await asyncio.sleep(0.05)
    finally:
        acc.stop()
        a.close()
        b.close()
    assert len(evicted) == 1, (evicted, said)
    assert said.count("evicted") == 1 and "accepted" in said, said
    assert table.pool_level(acc.pools[-1].key) == 4  # the pool's cap, never over it


def test_one_newcomer_evicts_one_connection_however_the_workers_race() -> None:
    """An eviction frees its slot, another worker took it before the evicting one could,
    and the evicting one evicted again, up to three connections for one newcomer
    (EVICT_TRIES; ev2's figure: 4 logins, up to 6 evictions). The newcomer is now
    counted into the victim's slot before that is freed: one eviction, one admitted."""
    asyncio.run(_one_newcomer_evicts_one())


async def _refused_once_at_each() -> tuple[bool, bool]:
    cfg = from_dict(CFG)
    table = SharedCounters(slots=4096, workers=2)
    (a, said_a), (b, said_b) = (_acceptor(cfg, SharedThrottle(cfg, table)) for _ in "ab")
    for _ in range(4):  # the pool is full, of connections no one may evict
        assert a.server.throttle.connect("192.0.2.1", a.pools).admitted
    for acc in (a, b):
        s, peer = socket.socketpair()
        acc._admit_client(s, ("198.51.100.7", 40000), None)
        peer.close()
    a.stop()
    b.stop()
    assert said_a == said_b == ["refused", "421 pool:listener:submission:127.0.0.1:2587"]
    return (a.candidates.knocking("198.51.100.7", time.monotonic()),
            b.candidates.under_pressure("198.51.100.7", time.monotonic()))


def test_refused_once_by_each_of_two_workers_is_refused_twice() -> None:
    """The same, through two workers' admissions: refused at a full pool once by each,
    the address is knocking and under pressure (before: at neither)."""
    assert asyncio.run(_refused_once_at_each()) == (True, True)


def test_a_newcomer_goes_to_the_worker_whose_first_connected_is_takeable_and_earlier(
        ) -> None:
    """admission._pass_own's choice (smtpd/handoff.py), a real socket passed: to the
    other worker when its first-connected candidate of the address is takeable (idle
    TIE_AGE, or connected OWN_AGE) and connected before this worker's own victim, or
    when this worker holds none (the other may hold a takeable one after its first);
    never when this worker's victim was connected first, nor for a full pool of this
    listener while this worker holds one in it, nor to a worker holding none."""
    cfg = from_dict(CFG)
    acc, _said = _acceptor(cfg, SharedThrottle(cfg, SharedCounters(slots=4096, workers=2)))
    h = Handoff(2)
    acc.server.handoff = h
    now = time.monotonic()

    def passed(born: float | None, since: float, mine: float | None = None,
               here: bool = False) -> bool:
        h.index = 1  # worker 1's entry of the address ...
        h.publish("192.0.2.1", None if born is None else now - born, now - since)
        h.index = 0  # ... read by worker 0, which holds a victim connected `mine` ago
        found = None if mine is None else (acc, Candidate(
            "192.0.2.1", now - 5, lambda: None, "session", born=now - mine))
        a, b = socket.socketpair()
        try:
            went = acc._pass_own(a, ("192.0.2.1", 4000), None, "192.0.2.1", found, here)
            h.index = 1
            got = h.receive()
            h.index = 0
            assert len(got) == went and all(p.by == os.getpid() for p in got)
            for p in got:
                p.sock.close()
            return went
        finally:
            a.close()
            b.close()

    assert passed(3, 2)  # takeable (idle 2 s); this worker holds none
    assert passed(3, 2, mine=2)  # connected before this worker's victim
    assert not passed(3, 2, mine=4)  # this worker's was connected first
    assert not passed(3, 2, mine=2, here=True)  # a full pool of this listener
    assert passed(3, 0.1)  # not takeable yet, this worker holds none
    assert not passed(3, 0.1, mine=2)
    assert passed(OWN_AGE + 1, 0.1, mine=2)  # connected OWN_AGE: takeable
    assert not passed(None, 0.0)  # the other holds none either


def test_a_newcomer_passed_to_a_stopping_worker_is_refused_with_its_line() -> None:
    """A newcomer that reaches a worker's inbox once it stops (in flight when it
    withdrew): 421 4.3.2 and its reject line (reason=stopping), not closed unanswered."""
    async def refused() -> tuple[bytes, bytes, list[str]]:
        cfg = from_dict(CFG)
        acc, said = _acceptor(cfg, SharedThrottle(cfg, SharedCounters(slots=4096,
                                                                      workers=2)))
        a, b = socket.socketpair()
        acc.stop()  # (server.close_listeners: its acceptors stopped first)
        try:
            acc.refuse_passed(Passed(a, acc.ln.name, ("192.0.2.1", 4000), None, 1))
            return b.recv(200), b.recv(200), said
        finally:
            a.close()
            b.close()

    reply, after, said = asyncio.run(refused())
    assert reply == b"421 4.3.2 Service shutting down, try again later\r\n"
    assert after == b""  # closed
    assert said == ["refused", "421 stopping"]
