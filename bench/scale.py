#!/usr/bin/env python3
"""Scale-out bench: submission through HAProxy with one and two nodes, and what PROXY,
PostgreSQL and Redis cost per message (docs/SCALING.md).

    flock /tmp/authrelay-bench.lock .venv/bin/python bench/scale.py [--quick] [--reps N]

Everything runs on this machine, on loopback (one machine, two cores: the point is the
cost per message of each shared component, not scaling). Started here and stopped at the
end: a PostgreSQL cluster and a redis-server in temporary directories (tests/scalerig.py),
HAProxy 2.x in TCP mode, authrelay nodes (`workers = 1` each, implicit TLS on a 465-style
port, smart host = an smtp-sink), the load generator bench/load.py from its own address
127.0.0.9 (not exempt from per-address limits, so every counter is exercised).

Each session is one message with AUTH PLAIN, so every message pays a full AUTH: with
PostgreSQL one indexed lookup (argon2 is cached per process after the first login), with
Redis the lockout check, the known-address write and the per-user and per-address
counters. The configurations, each adding one part to the one before:

  direct       client -> node (users.db, local counters)
  haproxy      client -> HAProxy -> node (no PROXY header)
  +proxy       ... HAProxy send-proxy-v2 -> node with proxy_protocol
  +postgresql  ... users in PostgreSQL
  +redis       ... counters in Redis (the full farm with one node)
  2 nodes      the full farm with two nodes

For each: messages/s (sessions of one message, 10 in flight), the p50 of the final 250,
and CPU ms per message of every part (the node processes, HAProxy, all PostgreSQL
processes, redis-server) measured from /proc over the run plus the delivery of every
accepted message to the sink. Writes bench/scale-results.json and bench/SCALE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from relayproc import free_port, to_toml  # noqa: E402
from scalerig import HAProxy, PostgresServer, RedisServer  # noqa: E402

USER, PASSWORD = "alice", "correct horse"
SOURCE = "127.0.0.9"
TICK = os.sysconf("SC_CLK_TCK")

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("direct", {"haproxy": False, "proxy": False, "pg": False, "redis": False, "nodes": 1}),
    ("haproxy", {"haproxy": True, "proxy": False, "pg": False, "redis": False, "nodes": 1}),
    ("+proxy", {"haproxy": True, "proxy": True, "pg": False, "redis": False, "nodes": 1}),
    ("+postgresql", {"haproxy": True, "proxy": True, "pg": True, "redis": False, "nodes": 1}),
    ("+redis", {"haproxy": True, "proxy": True, "pg": True, "redis": True, "nodes": 1}),
    ("2 nodes", {"haproxy": True, "proxy": True, "pg": True, "redis": True, "nodes": 2}),
]


# --------------------------------------------------------------------------- /proc

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in ticks) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds of `roots` and all their descendants now alive."""
    procs: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                procs[int(d)] = st
    want = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in procs.items():
            if ppid in want and pid not in want:
                want.add(pid)
                changed = True
    return sum(procs[p][1] for p in want if p in procs) / TICK


# --------------------------------------------------------------------------- parts

class Node:
    def __init__(self, base: Path, name: str, sink: int, *, proxy: bool, pg: PostgresServer
                 | None, redis: RedisServer | None) -> None:
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.health_port = free_port()  # HAProxy checks GET /health on the metrics listener
        cfg: dict[str, Any] = {
            "hostname": f"{name}.bench.test", "state_dir": str(self.dir / "state"),
            "workers": 1,
            "listen": [{"address": f"127.0.0.1:{self.port}", "mode": "submissions",
                        "proxy_protocol": proxy}],
            "relay": {"smart_host": [f"127.0.0.1:{sink}"], "smart_host_tls": "none",
                      "proxy_trusted": ["127.0.0.1/32"]},
            "auth": {"failure_delay": 0.05},
            # Counters on (so each is paid for), limits out of reach.
            "limits": {"user_messages_per_hour": 10**9, "user_recipients_per_hour": 10**9,
                       # thousands an hour: exempt, as a bulk sender would be
                       "containment": {"exempt": [USER]},
                       "connection_rate_per_ip": 10**9, "max_connections_per_ip": 1000,
                       "max_connections": 1000},
            "log": {"target": f"file:{self.dir / 'maillog'}"},
            "metrics": {"address": f"127.0.0.1:{self.health_port}"},
        }
        if not proxy:
            del cfg["listen"][0]["proxy_protocol"]
        if pg is not None:
            cfg["auth"].update({"backend": "postgresql", "dsn": pg.dsn})
        if redis is not None:
            cfg["limits"]["shared"] = redis.url
        self.conf = self.dir / "authrelay.toml"
        self.conf.write_text(to_toml(cfg))
        self.spool = self.dir / "state" / "spool" / "queue"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str = "") -> None:
        subprocess.run([sys.executable, "-m", "authrelay", "-c", str(self.conf), *args],
                       input=stdin.encode(), check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        log = open(self.dir / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authrelay", "-c", str(self.conf), "serve"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "serve.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("node did not come up") from None
                time.sleep(0.1)

    def queued(self) -> int:
        try:
            return sum(1 for p in self.spool.iterdir() if "." not in p.name)
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def pg_pids(pg: PostgresServer) -> list[int]:
    try:
        return [int((pg.data / "postmaster.pid").read_text().split()[0])]
    except (OSError, ValueError, IndexError):
        return []


def load(port: int, sessions: int, concurrency: int = 10) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "load.py"), "smtp", "--port", str(port),
         "--tls", "implicit", "--auth", "plain", "--user", USER, "--password", PASSWORD,
         "--from", "alice@bench.example.test", "--to", "sink@remote.example.net",
         "-c", str(concurrency), "-n", str(sessions), "-p", "1", "--source", SOURCE],
        capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"load.py: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    return json.loads(lines[-1])


def run_config(name: str, spec: dict[str, Any], base: Path, sink: int, pg: PostgresServer,
               redis: RedisServer, sessions: int) -> dict[str, Any]:
    nodes = [Node(base, f"{name.strip('+').replace(' ', '')}-{i}", sink,
                  proxy=spec["proxy"], pg=pg if spec["pg"] else None,
                  redis=redis if spec["redis"] else None) for i in range(spec["nodes"])]
    hap: HAProxy | None = None
    try:
        if spec["pg"]:
            try:
                nodes[0].cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
            except subprocess.CalledProcessError:
                pass  # already in the shared database
        else:
            for n in nodes:
                n.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        for n in nodes:
            n.start()
        port = nodes[0].port
        if spec["haproxy"]:
            port = free_port()
            hap = HAProxy({"s": (port, [("127.0.0.1", n.port, n.health_port) for n in nodes])},
                          proxy="send-proxy-v2" if spec["proxy"] else "")
            hap.start()
        load(port, 20)  # warm-up: TLS session setup paths, argon2 cache, pools
        drain(nodes)
        parts: dict[str, list[int]] = {"nodes": [n.proc.pid for n in nodes if n.proc]}
        if hap is not None and hap.proc is not None:
            parts["haproxy"] = [hap.proc.pid]
        if spec["pg"]:
            parts["postgresql"] = pg_pids(pg)
        if spec["redis"] and redis.proc is not None:
            parts["redis"] = [redis.proc.pid]
        before = {k: tree_cpu(v) for k, v in parts.items()}
        res = load(port, sessions)
        drain(nodes)
        after = {k: tree_cpu(v) for k, v in parts.items()}
        ok = res["messages_ok"] or 1
        return {
            "config": name, "messages_ok": res["messages_ok"],
            "messages_failed": res["messages_failed"],
            "messages_per_s": res["messages_per_s"],
            "final_250_p50_ms": (res.get("final_250_ms") or {}).get("p50"),
            "cpu_ms_per_msg": {k: round(1000 * (after[k] - before[k]) / ok, 3)
                               for k in parts},
            "errors": res.get("errors"),
        }
    finally:
        if hap is not None:
            hap.cleanup()
        for n in nodes:
            n.stop()


def drain(nodes: list[Node], timeout: float = 300) -> None:
    """Until every accepted message has left every node's queue (delivered to the sink)."""
    deadline = time.monotonic() + timeout
    while any(n.queued() for n in nodes):
        if time.monotonic() > deadline:
            raise RuntimeError("queues did not drain")
        time.sleep(0.05)


# --------------------------------------------------------------------------- report

def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(results: list[dict[str, Any]], reps: int, sessions: int) -> str:
    names = [c for c, _ in CONFIGS]
    rows = []
    prev_total = None
    out = [
        "# Scale-out bench: HAProxy, PROXY, PostgreSQL, Redis (bench/scale.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; {reps} repetition(s) "
        f"of {sessions} sessions x 1 message (1 KiB) with AUTH PLAIN over implicit TLS, "
        "10 in flight, from 127.0.0.9; nodes with `workers = 1`; figures are medians.",
        "",
        "| configuration | msg/s | final 250 p50 ms | CPU ms/msg: nodes | HAProxy | "
        "PostgreSQL | Redis | total | added vs the row above |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [r for r in results if r["config"] == name]
        if not rs:
            continue

        def cpu(part: str, rs: list[dict[str, Any]] = rs) -> float | None:
            xs = [r["cpu_ms_per_msg"][part] for r in rs if part in r["cpu_ms_per_msg"]]
            return med(xs) if xs else None

        parts = {p: cpu(p) for p in ("nodes", "haproxy", "postgresql", "redis")}
        total = sum(v for v in parts.values() if v is not None)
        added = "" if prev_total is None else f"{total - prev_total:+.2f}"
        prev_total = total
        p50 = med([r["final_250_p50_ms"] for r in rs if r["final_250_p50_ms"] is not None])

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        rows.append(name)
        out.append(f"| {name} | {med([r['messages_per_s'] for r in rs]):.0f} | {p50:.1f} | "
                   f"{f(parts['nodes'])} | {f(parts['haproxy'])} | {f(parts['postgresql'])} "
                   f"| {f(parts['redis'])} | {total:.2f} | {added} |")
    failed = sum(r["messages_failed"] for r in results)
    out += ["", f"Messages failed in all runs: {failed}.", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="1 repetition of 150 sessions")
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--out", default=str(HERE), help="directory for the result files")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.sessions = 1, 150
    for tool in ("smtp-sink", "haproxy", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"scale.py: {tool} not installed (apt-get install postfix haproxy "
                     "redis-server postgresql)")
    configs = [(n, s) for n, s in CONFIGS if not a.only or n in a.only.split(",")]
    base = Path(tempfile.mkdtemp(prefix="authrelay-scale-bench-"))
    sink_port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{sink_port}",
                             "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pg = PostgresServer()
    redis = RedisServer().start()
    results: list[dict[str, Any]] = []
    try:
        for rep in range(a.reps):
            for i, (name, spec) in enumerate(configs):
                r = run_config(name, spec, base / f"rep{rep}-{i}", sink_port, pg, redis,
                               a.sessions)
                r["rep"] = rep
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        pg.cleanup()
        redis.cleanup()
        os.killpg(sink.pid, signal.SIGTERM)
        sink.wait(10)
        shutil.rmtree(base, ignore_errors=True)
    out = Path(a.out)
    (out / "scale-results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results, a.reps, a.sessions)
    (out / "SCALE.md").write_text(text)
    print(text)
    return 0 if all(r["messages_failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
