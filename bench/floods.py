"""floods.py -- the connection floods of issue 10 against a real authrelay, measured.

    flock /tmp/authrelay-bench.lock python bench/floods.py [--connects 48000] [--seconds 40]

Starts `authrelay serve` (default limits, `workers = 2`, loopback ports; test helpers from
tests/relayproc.py) and runs, one after the other:

  A. 465 pre-TLS flood: --connects raw TCP connections from 40 loopback addresses
     (127.0.5.1-40) that never start a handshake, opened without waiting (non-blocking,
     by 3 attacker processes) and held open.
  B. port 25 idle flood: 100 connections from 5 addresses that read the greeting and
     say nothing.

During each, once a second: the server's sockets and RSS (master + workers, from /proc),
and the latency of a legitimate client: a whole submission on 587 (STARTTLS, AUTH, one
message) and a greeting on 25 (A) / a login on 465 (B). Prints one line per sample and a
summary; figures, not pass/fail (the tests in tests/integration/test_admission.py assert).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from relayproc import PASSWORD, RelayProcess  # noqa: E402
from smtpclient import RawClient, client_ctx, plain  # noqa: E402


def family(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{d}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d))
    return [pid, *kids]


def sockets(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def rss_mib(pids: list[int]) -> float:
    kib = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
    return kib / 1024


def submission(port: int, src: str) -> float:
    t0 = time.monotonic()
    c = RawClient(port, source=src, timeout=60)
    assert c.reply().code == 220
    c.cmd("EHLO legit.test")
    c.cmd("STARTTLS")
    c.starttls(client_ctx())
    c.cmd("EHLO legit.test")
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
    assert c.cmd("MAIL FROM:<alice@local.test>").code == 250
    assert c.cmd("RCPT TO:<bob@example.net>").code == 250
    assert c.cmd("DATA").code == 354
    assert c.cmd("Subject: legit\r\n\r\nhello\r\n.").code == 250
    c.cmd("QUIT")
    c.close()
    return time.monotonic() - t0


def login465(port: int, src: str) -> float:
    t0 = time.monotonic()
    c = RawClient(port, tls=client_ctx(), source=src, timeout=60)
    assert c.reply().code == 220
    c.cmd("EHLO legit.test")
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").code == 235
    c.cmd("QUIT")
    c.close()
    return time.monotonic() - t0


def greet25(port: int, src: str) -> float:
    t0 = time.monotonic()
    with RawClient(port, source=src, timeout=60) as c:
        code = c.reply().code
    if code != 220:
        raise RuntimeError(f"greeting {code}")
    return time.monotonic() - t0


def attacker(port: int, addrs: list[str], n: int, hold: float, out: multiprocessing.Queue
             ) -> None:
    """Open n connections without waiting for them (non-blocking), hold them, report."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, failed = [], 0
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((addrs[i % len(addrs)], 0))
            e = s.connect_ex(("127.0.0.1", port))
        except OSError:
            s.close()
            failed += 1
            continue
        if e not in (0, errno.EINPROGRESS):
            s.close()
            failed += 1
            continue
        socks.append(s)
    time.sleep(hold)
    established = sum(1 for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
    for s in socks:
        s.close()
    out.put((len(socks), established, failed))


def sample(name: str, pids: list[int], probes: dict, seconds: float) -> list[dict]:
    rows = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        row: dict = {"t": round(seconds - (end - time.monotonic()), 1),
                     "sockets": sockets(pids), "rss_mib": round(rss_mib(pids), 1)}
        for label, fn in probes.items():
            try:
                row[label] = round(fn(), 3)
            except Exception as e:  # noqa: BLE001 - a refused legit client is a figure too
                row[label] = f"FAILED {type(e).__name__}: {e}"[:60]
        rows.append(row)
        print(f"  {name} {row}", flush=True)
        time.sleep(max(0.0, 1.0 - sum(v for v in row.values()
                                      if isinstance(v, float) and v < 1) / 4))
    return rows


def summary(name: str, rows: list[dict], base: dict, after: dict) -> None:
    print(f"\n== {name}")
    print(f"  server sockets: before {base['sockets']}, peak "
          f"{max(r['sockets'] for r in rows)}, after {after['sockets']}")
    print(f"  server RSS MiB: before {base['rss_mib']}, peak "
          f"{max(r['rss_mib'] for r in rows)}, after {after['rss_mib']}")
    for k in rows[0]:
        if k in ("t", "sockets", "rss_mib"):
            continue
        ok = [r[k] for r in rows if isinstance(r[k], float)]
        bad = [r[k] for r in rows if not isinstance(r[k], float)]
        if ok:
            print(f"  {k}: {len(ok)} ok, median {statistics.median(ok):.3f}s, "
                  f"max {max(ok):.3f}s; {len(bad)} failed {bad[:2]}")
        else:
            print(f"  {k}: all {len(bad)} failed {bad[:2]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=48000)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="authrelay-floods-"))
    r = RelayProcess(tmp, workers=args.workers).start()
    try:
        assert r.proc is not None
        deadline = time.monotonic() + 30
        while len(family(r.proc.pid)) < args.workers + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = family(r.proc.pid)
        ports = r.ports
        sub = lambda: submission(ports["submission"], "127.0.0.3")  # noqa: E731
        base = {"sockets": sockets(pids), "rss_mib": round(rss_mib(pids), 1)}
        quiet = [sub() for _ in range(3)]
        print(f"processes {pids}; quiet submission {statistics.median(quiet):.3f}s; {base}")

        # A: 465 pre-TLS flood from 40 addresses
        addrs = [f"127.0.5.{i}" for i in range(1, 41)]
        q: multiprocessing.Queue = multiprocessing.Queue()
        per = args.connects // 3
        procs = [multiprocessing.Process(target=attacker, args=(
            ports["submissions"], addrs, per, args.seconds, q)) for _ in range(3)]
        for p in procs:
            p.start()
        rows = sample("A", pids, {"submission587_s": sub,
                                  "greeting25_s": lambda: greet25(ports["smtp"], "127.0.0.4")},
                      args.seconds)
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        time.sleep(5)
        after = {"sockets": sockets(pids), "rss_mib": round(rss_mib(pids), 1)}
        summary(f"A. 465 pre-TLS flood: {sum(x[0] for x in results)} connects started, "
                f"{sum(x[1] for x in results)} established at the end, "
                f"{sum(x[2] for x in results)} failed to start, from 40 addresses",
                rows, base, after)
        log = r.maillog(settle=0.5)
        print(f"  maillog: {log.count('reason=ip')} per-IP refusals, "
              f"{log.count('reason=pool:')} pool refusals, "
              f"{log.count('tls_failed=')} failed/timed-out handshakes, "
              f"{log.count('near the file descriptor limit')} fd warnings")

        # B: port 25 idle flood, 100 connections from 5 addresses
        base = after
        idle, codes = [], []
        for i in range(100):
            c = socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=30,
                                         source_address=(f"127.0.6.{i % 5 + 1}", 0))
            idle.append(c)
            codes.append(c.recv(100)[:3])
        rows = sample("B", pids, {"submission587_s": sub,
                                  "login465_s": lambda: login465(ports["submissions"],
                                                                 "127.0.0.5")},
                      min(args.seconds, 20))
        for c in idle:
            c.close()
        time.sleep(3)
        after = {"sockets": sockets(pids), "rss_mib": round(rss_mib(pids), 1)}
        summary(f"B. port 25 idle flood: 100 connects from 5 addresses, "
                f"{codes.count(b'220')} greeted, {codes.count(b'421')} refused",
                rows, base, after)
        log = r.maillog(settle=0.5)
        print(f"  maillog: stress mode on {log.count('stress mode on')}x, "
              f"off {log.count('stress mode off')}x")
        return 0
    finally:
        r.stop()


if __name__ == "__main__":
    sys.exit(main())
