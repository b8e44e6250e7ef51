"""Torture: kill -9 of the master at random moments during a steady flow, counting what
the next hop got per Message-ID (not a test: a script; its figures go in
docs/PERFORMANCE.md).

    .venv/bin/python tests/torture_removal.py --runs 200 --dir /tmp/dup-torture

A real `authrelay serve` (tests/relayproc.py, workers = 1) relays to a loopback smart
host (aiosmtpd, tests/fakes/smtpserver.py); one client sends messages back to back on
port 25 (a local domain: no AUTH). Each run: a random wait (`--min`..`--max` seconds of
flow), SIGKILL of the master, a restart. At the end the queue drains and every message
is counted: acknowledged (250 read by the client) and never delivered is a LOSS;
delivered more than once a DUPLICATE, split by where the kill caught it: after the
relay had read the next hop's 250 (a `stat=Sent` line for each copy: the removal
window, which the in-flight journal's delivered line closes) or before (the next hop
took the message and its reply was still on the way: at least once, announced by
`redelivery=after_crash`; Postfix has it too); UNANNOUNCED: delivered again with no
`may have been delivered` warning for its queue id (no begin line). PYTHONPATH=<an old tree's
src> runs another version of the server (the client side is this tree's).
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import smtplib
import sys
import threading
import time
from pathlib import Path

from fakes.smtpserver import FakeSMTPServer
from relayproc import RelayProcess


def _flow(r: RelayProcess, acked: list[str], tried: list[str], stop: threading.Event,
          seq: collections.abc.Iterator[int]) -> None:
    """Messages back to back until `stop` (or the server dies under the client)."""
    try:
        with smtplib.SMTP("127.0.0.1", r.ports["smtp"], timeout=10) as s:
            s.ehlo("client.example")
            while not stop.is_set():
                mid = f"<t{next(seq)}@torture.test>"
                tried.append(mid)
                s.mail("someone@remote.example")
                s.rcpt("bob@local.test")
                code, _ = s.data(f"Message-ID: {mid}\r\nSubject: t\r\n\r\nbody\r\n".encode())
                if code == 250:
                    acked.append(mid)
    except (OSError, smtplib.SMTPException):
        pass  # the kill: the message in DATA, if any, was not acknowledged


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--min", type=float, default=0.3)
    ap.add_argument("--max", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    a.dir.mkdir(parents=True, exist_ok=True)
    hop = FakeSMTPServer("127.0.0.2")
    hop.start()
    r = RelayProcess(a.dir, {"relay": {"smart_host": [f"{hop.host}:{hop.port}"],
                                       "smart_host_tls": "none"},
                             "delivery": {"retry": ["300ms"]}}, users={})
    acked: list[str] = []
    tried: list[str] = []
    seq = iter(range(10**9))
    try:
        r.start()
        for _ in range(a.runs):
            stop = threading.Event()
            t = threading.Thread(target=_flow, args=(r, acked, tried, stop, seq))
            t.start()
            time.sleep(rng.uniform(a.min, a.max))  # the moment of the kill: the point
            r.kill()
            stop.set()
            t.join(30)
            r.start()
        r.wait_for(lambda: r.queued() == [], timeout=120, what="the queue drained")
        time.sleep(1.0)  # deliveries' last replies
    finally:
        r.stop()
        hop.stop()
    got = collections.Counter(
        m.group(1).decode() for msg in hop.messages
        if (m := re.search(rb"Message-ID: (<[^>]+>)", msg.content)))
    qid_of = {m.group(2).decode(): m.group(1).decode() for msg in hop.messages
              if (m := re.search(rb"by relay\.test[^;]*?id (\w+).*?Message-ID: (<[^>]+>)",
                                 msg.content, re.S))}
    log = r.log.read_text(errors="replace")
    sent_lines = collections.Counter(re.findall(r" (\w+): to=<bob@local\.test>.*stat=Sent",
                                                log))
    announced = len(re.findall(r"redelivery=after_crash", log))
    warned = set(re.findall(r" (\w+): warning=delivery to <bob@local\.test> was in progress",
                            log))
    recovered = log.count("stat=Sent (sent before the crash") + log.count(
        "status=recorded as delivered (its delivery line")
    lost = [m for m in acked if got[m] == 0]
    dups = {m: n for m, n in got.items() if n > 1}
    window = [m for m in dups if sent_lines[qid_of.get(m, "")] > 1]
    # delivered again with no warning at the restart (the journal had no begin line)
    unannounced = [m for m in dups if qid_of.get(m) not in warned]
    print(f"runs={a.runs} tried={len(tried)} acked={len(acked)} delivered={sum(got.values())} "
          f"distinct={len(got)} lost={len(lost)} duplicates={len(dups)} "
          f"unannounced={len(unannounced)} "
          f"after_the_250_read={len(window)} reply_in_flight={len(dups) - len(window)} "
          f"extra_copies={sum(n - 1 for n in dups.values())} "
          f"redelivery_after_crash_lines={announced} recovered_lines={recovered} "
          f"unacked_delivered={sum(1 for m in got if m not in set(acked))}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
