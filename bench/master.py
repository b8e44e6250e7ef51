"""The delivering process alone (scheduler + courier): CPU per message, 1 KiB, smart host.

    PYTHONPATH=src python bench/master.py [N] [CONCURRENCY] [RATE] [LABEL] [SIZE]

A forked producer commits N messages of SIZE bytes (default 1 KiB; 80-column lines of
text, as smtp-source's) (plain SMTP from a trusted network: no AUTH
user) into a fresh spool, CONCURRENCY at a time and RATE a second at most (default 400,
about the bench's (a)), each announced on `notify.sock` as a receiving worker does (the
notice vouching for its line ends, as a session's: issue 22);
this process runs the scheduler and courier as the daemon builds them (`wiring` when
the tree has it) against Postfix's `smtp-sink`, and prints one JSON
line: its own CPU ms per message (getrusage, threads included: the fsyncs of the state
saves) from the first commit to an empty queue, and messages per second. The bench's (g)
"master" row in one process, without the workers' CPU; compare two trees by pointing
PYTHONPATH at each (docs/PERFORMANCE.md, issue 22).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from authrelay import maillog
from authrelay.config import from_dict
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool

MSG = (b"From: a@b.test\r\nTo: c@d.test\r\nSubject: x\r\n\r\n" + b"x" * 70 + b"\r\n") * 14


def message(size: int) -> bytes:
    """The 1 KiB message above, or one of about `size` bytes: a header, then 80-column
    lines (78 characters + CRLF)."""
    if size <= len(MSG):
        return MSG
    head = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: x\r\n\r\n"
    return head + (b"X" * 78 + b"\r\n") * ((size - len(head)) // 80)


def produce(spool_dir: Path, n: int, conc: int, rate: float, go: int, msg: bytes) -> None:
    """Child: wait for the go byte, then commit n messages, conc at a time, `rate` a second
    at most (faster than the scheduler drains, notify datagrams would be dropped and the
    periodic rescan would set the pace)."""
    os.read(go, 1)
    spool = Spool(spool_dir, fsync=False)  # the workers' fsyncs are not this figure

    async def one() -> None:
        env = Envelope(new_queue_id(), "a@b.test", [Recipient("c@d.test")])
        inc = spool.begin(env)
        if hasattr(inc, "lines_checked"):  # trees since issue 22's vouching notice
            inc.lines_checked = True  # as a session's: its body reader refused bare CR/LF
        inc.write(msg)
        await inc.commit()

    async def run() -> None:  # paced as the bench's workers accept: `rate` per second
        left, t = n, time.monotonic()
        while left > 0:
            k = min(conc, left)
            left -= k
            await asyncio.gather(*(one() for _ in range(k)))
            t += k / rate
            await asyncio.sleep(max(0.0, t - time.monotonic()))

    asyncio.run(run())
    os._exit(0)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def deliver(state: str, port: int, n: int, conc: int, rate: float, size: int
                  ) -> tuple[float, float]:
    cfg = from_dict({"hostname": "bench.test", "state_dir": state,
                     "relay": {"smart_host": [f"127.0.0.1:{port}"],
                               "smart_host_tls": "none"}})
    spool = Spool(cfg.spool_dir)
    spool.ensure_dirs()
    ml = maillog.configure(f"file:{state}/maillog")
    try:
        from authrelay import wiring
    except ImportError:  # the trees before the composition root (issue 18)
        from authrelay.delivery.client import Courier
        from authrelay.scheduler.scheduler import Scheduler

        sched = Scheduler(cfg, spool, Courier(cfg), ml)
    else:
        # Trees since issue 18's explicit maillog take it as a required argument.
        if "maillog" in inspect.signature(wiring.courier).parameters:
            courier = wiring.courier(cfg, ml)
        else:
            courier = wiring.courier(cfg)
        sched = wiring.scheduler(cfg, spool, courier, ml)
    await sched.start()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        produce(cfg.spool_dir, n, conc, rate, r, message(size))
    os.close(r)
    prof = None
    if os.environ.get("MASTER_PROFILE"):  # cProfile of the window, the loop thread's CPU
        import cProfile

        prof = cProfile.Profile(time.thread_time)
    c0, t0 = cpu(), time.monotonic()
    if prof is not None:
        prof.enable()
    os.write(w, b"g")
    produced = False
    while True:  # cheap polls: this process's CPU is the figure
        await asyncio.sleep(0.1)
        produced = produced or os.waitpid(pid, os.WNOHANG)[0] == pid
        if produced and not any(True for _ in os.scandir(cfg.spool_dir / "queue")):
            break
    c1, t1 = cpu(), time.monotonic()
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.environ["MASTER_PROFILE"])
    await sched.stop()
    return c1 - c0, t1 - t0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    conc = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 400.0
    label = sys.argv[4] if len(sys.argv) > 4 else ""
    size = int(sys.argv[5]) if len(sys.argv) > 5 else 1024
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        with tempfile.TemporaryDirectory() as state:  # noqa: SIM117
            os.environ.get("MASTER_KEEP") and print(state, file=sys.stderr)
            used, wall = asyncio.run(deliver(state, port, n, conc, rate, size))
    finally:
        sink.terminate()
        sink.wait()
    print(json.dumps({"label": label, "messages": n, "size": size, "concurrency": conc,
                      "rate": rate,
                      "cpu_ms_per_msg": round(1000 * used / n, 3),
                      "msg_per_s": round(n / wall, 1)}))


if __name__ == "__main__":
    main()
