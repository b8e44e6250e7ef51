"""Outbound client alone: CPU per message through `Courier` to a local smtp-sink.

    PYTHONPATH=src python bench/courier.py [N] [CONCURRENCY] [RCPTS] [LABEL]

Starts Postfix's `smtp-sink` on a free loopback port (smart host, no TLS), delivers N
1 KiB messages with CONCURRENCY tasks (connections are reused, as in the server), and
prints one JSON line: process CPU ms per message (this process: the client, the event
loop, uvloop when installed) and messages per second. Compare two trees by pointing
PYTHONPATH at each (docs/PERFORMANCE.md, "Outbound client").
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time

from authrelay import maillog
from authrelay.config import from_dict
from authrelay.delivery.client import Courier
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id

MSG = (b"From: a@b.test\r\nTo: c@d.test\r\nSubject: x\r\n\r\n" + b"x" * 70 + b"\r\n") * 14


async def run(port: int, n: int, conc: int, rcpts: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as state:
        cfg = from_dict({"hostname": "bench.test", "state_dir": state,
                         "relay": {"smart_host": [f"127.0.0.1:{port}"],
                                   "smart_host_tls": "none"},
                         "delivery": {"max_idle_connections": 100}})
        courier = Courier(cfg, maillog=maillog.get())  # this command's log
        left, ok = n, 0

        async def worker() -> None:
            nonlocal left, ok
            while left > 0:
                left -= 1
                env = Envelope(new_queue_id(), "a@b.test",
                               [Recipient(f"r{j}@d.test") for j in range(rcpts)])
                res = await courier.deliver(env, env.recipients, MSG)
                ok += all(r.ok for r in res.values())

        warm = Envelope(new_queue_id(), "a@b.test", [Recipient("w@d.test")])
        await courier.deliver(warm, warm.recipients, MSG)
        c0, t0 = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conc)))
        c1, t1 = time.process_time(), time.monotonic()
        await courier.close()
    return c1 - c0, t1 - t0, ok


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    conc = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    rcpts = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    label = sys.argv[4] if len(sys.argv) > 4 else ""
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
        cpu, wall, ok = asyncio.run(run(port, n, conc, rcpts))
    finally:
        sink.terminate()
        sink.wait()
    print(json.dumps({"label": label, "messages": n, "ok": ok, "concurrency": conc,
                      "rcpts": rcpts, "cpu_ms_per_msg": round(1000 * cpu / n, 3),
                      "msg_per_s": round(n / wall, 1)}))


if __name__ == "__main__":
    main()
