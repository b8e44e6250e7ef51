"""The hand-off between workers (smtpd/handoff.py) and what feeds it (eviction.Oldest):
real shared memory written by a forked worker, a real socket passed over the inbox."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from authrelay.smtpd.eviction import Candidate, Candidates, Oldest
from authrelay.smtpd.handoff import Handoff


def _c(who: str, born: float, since: float | None = None) -> Candidate:
    return Candidate(who, born if since is None else since, lambda: None, "session",
                     who=who, born=born)


def test_oldest_publishes_each_addresses_first_connected_across_listeners() -> None:
    """Two listeners' candidates of one address: the one connected first is published
    (with since when it waits), the next one when it goes, nothing once none is left;
    another address's are its own; one that is not its address's first says nothing."""
    said: list[tuple[str, float | None, float]] = []

    class Table:
        def publish(self, key: str, born: float | None, since: float = 0.0) -> None:
            said.append((key, born, since))

    oldest = Oldest(Table())
    smtp, sub = Candidates(oldest=oldest), Candidates(oldest=oldest)
    a, b, c = _c("192.0.2.1", 5.0), _c("192.0.2.1", 3.0, 6.0), _c("192.0.2.1", 4.0)
    smtp.add(a)
    sub.add(b)
    smtp.add(c)  # not the first connected: nothing said
    sub.add(_c("192.0.2.2", 1.0))
    assert said == [("192.0.2.1", 5.0, 5.0), ("192.0.2.1", 3.0, 6.0),
                    ("192.0.2.2", 1.0, 1.0)]
    said.clear()
    smtp.discard(a)  # not the first: nothing said
    sub.discard(b)
    smtp.discard(c)
    assert said == [("192.0.2.1", 4.0, 4.0), ("192.0.2.1", None, 0.0)]


def test_a_not_shared_candidate_is_never_published() -> None:
    """A handshake candidate that settles at the next turn of the loop (plaintext, no
    greeting delay): the accept path writes nothing shared."""
    said: list[object] = []

    class Table:
        def publish(self, key: str, born: float | None, since: float = 0.0) -> None:
            said.append(key)

    cs = Candidates(oldest=Oldest(Table()))
    h = Candidate("192.0.2.1", 1.0, lambda: None, "handshake", shared=False)
    cs.add(h)
    cs.discard(h)
    assert said == []


def _in_worker_1(h: Handoff, body: Callable[[], None]) -> None:
    """`body` run by worker 1 (a forked process that adopts its row); then this process
    is worker 0."""
    pid = os.fork()
    if pid == 0:
        try:
            h.adopt(1)
            body()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    h.adopt(0)


def test_a_worker_reads_the_others_entries_and_passes_a_socket_to_one() -> None:
    """Worker 1 (a forked process) publishes its first-connected candidate of an
    address; worker 0 reads it (never its own), passes an accepted socket to worker 1's
    inbox, which receives it with its listener, address and the sender's pid; a
    cleared row (a dead worker's) reads as none."""
    h = Handoff(2)

    def worker_1() -> None:
        h.publish("192.0.2.1", 7.5, 8.25)
        h.publish("192.0.2.9", 2.0, 2.0)
        h.publish("192.0.2.9", None)

    _in_worker_1(h, worker_1)
    h.publish("192.0.2.1", 9.0, 9.0)  # its own: not among the others'
    assert h.entries("192.0.2.1") == [(1, 7.5, 8.25)]
    assert h.entries("192.0.2.9") == []
    assert h.entries("192.0.2.2") == []
    ours, theirs = socket.socketpair()
    try:
        assert h.pass_on(1, ours, "submission:127.0.0.1:587", ("192.0.2.1", 4321), None)
        ours.close()
        h.index = 1  # (read worker 1's inbox here)
        [p] = h.receive()
        assert (p.listener, p.addr, p.peer, p.by) == (
            "submission:127.0.0.1:587", ("192.0.2.1", 4321), None, os.getpid())
        theirs.sendall(b"hi")
        assert p.sock.recv(2) == b"hi"  # the very connection
        p.sock.close()
        assert h.receive() == []
    finally:
        theirs.close()
    h.forget(1)
    h.index = 0
    assert h.entries("192.0.2.1") == []


def test_a_stopping_worker_withdraws_its_row() -> None:
    """Worker 1 stops (its listeners closed) while holding candidates: its row reads as
    none at once, and what it would publish as its sessions end is not written (before:
    its entries stayed, and newcomers were passed to an inbox it no longer read)."""
    h = Handoff(2)

    def worker_1() -> None:
        h.publish("192.0.2.1", 7.5, 8.25)
        h.publish("192.0.2.2", 7.0, 7.0)
        h.withdraw()
        h.publish("192.0.2.1", 7.75, 9.0)  # its first one closed at the stop

    _in_worker_1(h, worker_1)
    assert h.entries("192.0.2.1") == []
    assert h.entries("192.0.2.2") == []
