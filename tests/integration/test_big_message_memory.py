"""Bounded memory for a big message through a real `authrelay serve`: receive, spool
(CRC-32), DKIM decision and signing, the scheduler's verification and delivery all stream.

Bench scenario (e) once showed +50-77 MB of server RSS for one 20 MB message: with DKIM
keys loaded, the spool read every streamed message back whole (20 MB + a copy) for the
signer, even when the From: domain had no key. Here a 20 MB message is sent twice with
keys loaded -- From: a domain without key, then From: a signed domain -- with one
process (workers = 1) and with a master and two receiving workers; the RSS of every server
process is sampled throughout, from before the first byte until the fake MX has the
message. Each process may grow by at most a quarter of the message (the regression held
more than one and a half times its size in one process; a healthy run grows by 1-5 MB).
Memory, not time, is asserted.
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes.smtpserver import MXFactory
from relayproc import RelayProcess, children

pytestmark = pytest.mark.slow

SIZE = 20_000_000
LIMIT = SIZE // 4


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Peak RSS of each of `pids` (KiB), every few milliseconds."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.base = {p: rss_kib(p) for p in pids}
        self.peak = dict(self.base)
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            for p in self.peak:
                self.peak[p] = max(self.peak[p], rss_kib(p))
            self._stop_evt.wait(0.003)

    def stop(self) -> dict[int, int]:
        self._stop_evt.set()
        self.join()
        return {p: (self.peak[p] - self.base[p]) * 1024 for p in self.peak}


def message(sender: str, size: int) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <bob@example.test>\r\nSubject: big\r\n"
            f"Message-ID: <big.{time.monotonic_ns()}@x.test>\r\n\r\n").encode()
    line = b"0123456789 abcdefghijklmnopqrstuvwxyz  ABCDEFGHIJKLMNOPQRSTUVWXYZ\t.,-+\r\n"
    return head + line * ((size - len(head)) // len(line))


def send(relay: RelayProcess, sender: str, msg: bytes) -> None:
    """Plain SMTP from the trusted network, as bench (e) (trusted mail is signed). Not
    AUTH: the first argon2id verification in a worker takes its 19 MiB (m=19 MiB, once,
    then the credential cache answers), which is the password hash's, not the message's."""
    with smtplib.SMTP("127.0.0.1", relay.ports["smtp"], timeout=120) as s:
        s.sendmail(sender, ["bob@example.test"], msg)


@pytest.mark.parametrize("workers", [1, 2])
def test_20mb_message_streams_through_every_process(
        relay_factory: Callable[..., RelayProcess], fake_mx: MXFactory, workers: int) -> None:
    mx = fake_mx("127.0.0.2")
    relay = relay_factory({"relay": {"smart_host": [f"127.0.0.2:{mx.port}"],
                                     "trusted_networks": ["127.0.0.0/8"]}},
                          workers=workers, start=False)
    relay.cli("dkim", "keygen", "signed.test", "--selector", "s")  # RSA + Ed25519
    relay.start()
    assert relay.proc is not None
    pids = [relay.proc.pid] + children(relay.proc.pid)
    assert len(pids) == (1 if workers == 1 else 3), pids

    def delivered(n: int) -> None:
        deadline = time.monotonic() + 120
        while len(mx.messages) < n:
            assert time.monotonic() < deadline, relay.maillog()[-3000:]
            time.sleep(0.05)

    # Warm up the code paths (a streamed and signed message, delivery) in every process
    # (the kernel spreads connections over the workers), so that the baseline holds
    # what a running server holds anyway.
    for n in range(1, 5):
        send(relay, "alice@signed.test", message("alice@signed.test", 400_000))
        delivered(n)
    time.sleep(0.5)

    for i, sender in enumerate(("alice@nokey.test", "alice@signed.test"), start=5):
        msg = message(sender, SIZE)
        sampler = Sampler(pids)
        sampler.start()
        send(relay, sender, msg)
        delivered(i)
        time.sleep(0.2)
        growth = sampler.stop()
        got = mx.messages[-1].content
        signed = got.count(b"DKIM-Signature:")
        assert signed == (2 if sender.endswith("signed.test") else 0)
        assert got.endswith(msg[-1000:]) and len(got) > SIZE
        del msg, got
        mx.messages[-1].content = b""  # the fake MX's copy is the test's, not the server's
        for pid, grew in growth.items():
            assert grew < LIMIT, (
                f"{sender}: server process {pid} grew by {grew / 1e6:.1f} MB for a "
                f"{SIZE / 1e6:.0f} MB message (limit {LIMIT / 1e6:.0f} MB): {growth}")
    log = relay.maillog()
    assert "dkim=none, reason=no key for nokey.test" in log
    assert "dkim=signed, d=signed.test" in log
