"""The SMTP engine alone, per command: scenario (a)'s dialogue driven through
smtpd/protocol.Engine in-process, no sockets, no loop (issue 22 step 2).

    PYTHONPATH=src python bench/engine.py            # µs per command kind, thread time
    PYTHONPATH=src python bench/engine.py --profile  # cProfile per kind: top callees

Each session: EHLO, MAIL, RCPT, DATA, a 1 KiB body and the dot, RSET, NOOP, QUIT, every
request answered at once (policy None, the message "queued"). Figures are the minimum of
15 runs of 2,000 sessions; A/B two trees by PYTHONPATH, alternating, as
docs/PERFORMANCE.md's session 17 "The engine's per-command cost" did.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from authrelay import replies
from authrelay.config import from_dict
from authrelay.smtpd import protocol as p

CFG = from_dict({"hostname": "relay.test", "state_dir": "/nonexistent",
                 "relay": {"local_domains": ["local.test"]}})
BODY = (b"From: a@b.example\r\nTo: c@local.test\r\nSubject: x\r\n\r\n"
        + b"x" * 70 + b"\r\n") * 10
SESSION = [b"EHLO client.example.org\r\n", b"MAIL FROM:<sender@client.example.org>\r\n",
           b"RCPT TO:<user@local.test>\r\n", b"DATA\r\n", BODY + b".\r\n", b"RSET\r\n",
           b"NOOP\r\n", b"QUIT\r\n"]
KINDS = ["EHLO", "MAIL", "RCPT", "DATA", "body+dot", "RSET", "NOOP", "QUIT"]
QUEUED = replies.queued("2N6HBCPW1TGGJTFFH")


def session(acc: list[int], profiles: list[cProfile.Profile] | None = None) -> None:
    clock = time.thread_time_ns
    eng = p.Engine(CFG, mode="smtp")
    eng.greet()
    eng.data_to_send()
    for k, data in enumerate(SESSION):
        if profiles:
            profiles[k].enable()
        t0 = clock()
        eng.receive_data(data)
        while True:
            ev = eng.next_event()
            if ev is p.NEED_DATA or ev is p.CLOSED or ev is p.PAUSED:
                break
            if ev is p.CONTINUE:
                continue
            if isinstance(ev, (p.MailRequest, p.RcptRequest, p.DataRequest)):
                eng.policy_result(None)
            elif isinstance(ev, p.MessageComplete):
                eng.message_result(QUEUED)
        eng.data_to_send()
        acc[k] += clock() - t0
        if profiles:
            profiles[k].disable()


def main() -> None:
    if "--profile" in sys.argv:
        profiles = [cProfile.Profile(time.thread_time) for _ in SESSION]
        acc = [0] * len(SESSION)
        for _ in range(10000):
            session(acc, profiles)
        for kind, prof in zip(KINDS, profiles, strict=True):
            stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
            total = sum(v[2] for v in stats.values())
            top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:5]
            print(kind, "; ".join(f"{f[2]} {v[2] / total * 100:.0f}%" for f, v in top))
        return
    best: list[float] = []
    for run in range(16):
        acc = [0] * len(SESSION)
        for _ in range(2000):
            session(acc)
        us = [a / 2000 / 1000 for a in acc]
        if run:  # the first is warm-up
            best = us if not best else [min(a, b) for a, b in zip(best, us, strict=True)]
    print(" ".join(f"{k}={v:.2f}" for k, v in zip(KINDS, best, strict=True)),
          f"total={sum(best):.2f}")


if __name__ == "__main__":
    main()
