#!/usr/bin/env python3
"""Benchmark orchestrator: runs the scenarios against each target, A B A B, and reports.

Owns: scenario definitions (a)-(g) of the Performance issue, (h) of the session issue
(ordinary clients' connect-to-QUIT latency while 2 connections flood pipelined NOOPs and 2
never read, or while 8 stream an endless oversized DATA without reading (issue 17), against
the same on an idle server), (i) of issue 17 (bench/poolflood.py: fresh clients' TLS + AUTH
+ one message on 465 while 3,000 sockets from 40 addresses (and from 120, more than the
pool's slots) that never start TLS are held and reopened against 465; the same on 587 while
port 25 is flooded with idle connections; server RSS and descriptors sampled), per-run
measurement of the server side (CPU from /proc/<pid>/stat utime+stime+cutime+cstime summed
over the server's process trees; RSS summed over the same processes; messages counted at
the smtp-sink the server relays to), and the outputs bench/results.json, bench/RESULTS.md
and (via plot.py) bench/throughput.png.

Contract: `--targets FILE` is a JSON list of targets, each
  {"name": "postfix", "plain": 11025, "submission": 11587, "submissions": 11465,
   "sink_out": "/run/.../sink.out", "pids": [1234, ...] | "pids_cmd": "bash ... pids",
   optional: "scenarios": "abc" (keys it runs), "dkim": "off,rsa" ((s) variants it runs),
   "variant_ports": {"rsa": 11027} ((s) plain port by variant), "fsync": false (accepts
   without fsyncing its queue: said beside every ratio), "note": "...", "user": "...",
   "caps": {"b": 100} (a slow peer's runs of a scenario send at most this many)}
(`sink_out`: the output of `smtp-sink -c`, whose last `mesg=N` counts delivered mail).
Targets run in the order given, alternating within every scenario and repetition.
The server side is found again before every run (pids_cmd), so a restart is harmless.

Failure policy: a failed run (load errors, undelivered mail) is recorded with its errors
and the bench goes on; the report shows the counts, never hides them. Only loopback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOAD = [sys.executable, str(HERE / "load.py")]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20
SENDER, RCPT = "src@bench.example.test", "sink@remote.example.net"


# --------------------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def process_tree(roots: list[int]) -> list[int]:
    """The roots and all their descendants (live), each once (a root may be another's
    descendant: Target.roots() lists every process of authrelay's session, workers too)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [r for r in roots if _stat(r)]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of the live processes plus cutime+cstime of their reaped children.

    A child that exits inside the window moves its whole life into its parent's cutime, so
    the difference of two such sums is the CPU spent in between (proc(5))."""
    ticks = 0
    for p in pids:
        f = _stat(p)
        if f:  # fields 14-17 (1-based) -> index 11..14 here
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def own_cpu_seconds(pid: int) -> float:
    """utime+stime of one process alone (not its children): authrelay's master, which
    runs the scheduler and the outbound client while the workers receive."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / CLK_TCK if f else 0.0


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) summed over the processes, bytes.

    RSS sums count shared pages (libraries, Postfix's ~100 forked smtpd) once per process;
    PSS divides each shared page among its sharers, so its sum is the real footprint."""
    rss = pss = 0
    for p in pids:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
    return rss, pss


class MemSampler(threading.Thread):
    """Peaks of the summed RSS and PSS of a process tree, sampled every `interval` s."""

    def __init__(self, roots: list[int], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak_rss = self.peak_pss = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        pids, n = process_tree(self.roots), 0
        while not self._stop_evt.is_set():
            if n % 10 == 0:  # new processes (Postfix forks smtpd/cleanup on demand)
                pids = process_tree(self.roots)
            rss, pss = memory(pids)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            n += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> tuple[int, int]:
        self._stop_evt.set()
        self.join()
        return self.peak_rss, self.peak_pss


# --------------------------------------------------------------------------- targets


_MESG = re.compile(rb"mesg=(\d+)")


@dataclass
class Target:
    name: str
    plain: int
    submission: int
    sink_out: str
    submissions: int = 0  # implicit TLS (465); 0: scenario (i)'s 465 part is skipped
    pids: list[int] = field(default_factory=list)
    pids_cmd: str = ""
    sid: int = 0  # also every process of this session (a daemon's orphaned workers)
    user: str = "alice"
    password: str = "correct horse"
    scenarios: str = ""  # the scenario keys it runs; empty: all
    dkim: str = "off"  # (s): the variants it runs (comma-separated); authrelay and
    # Postfix + OpenDKIM sign, the others run only "off"
    variant_ports: dict[str, int] = field(default_factory=dict)  # (s): plain port by variant
    fsync: bool = True  # False: accepts without fsyncing its queue (chasquid, OpenSMTPD)
    note: str = ""  # for RESULTS.md: what this peer cannot do here, and why
    caps: dict[str, int] = field(default_factory=dict)  # scenario key -> at most this
    # many messages per run, for a slow peer (rates stay rates)

    def runs(self, sc: Scenario) -> bool:
        if self.scenarios and sc.key not in self.scenarios:
            return False
        return sc.key != "s" or sc.dkim in self.dkim.split(",")

    def roots(self) -> list[int]:
        if self.pids_cmd:
            out = subprocess.run(shlex.split(self.pids_cmd), capture_output=True, text=True,
                                 check=True).stdout
            return [int(x) for x in out.split()]
        roots = list(self.pids)
        if self.sid:
            for d in os.listdir("/proc"):
                f = _stat(int(d)) if d.isdigit() else None
                if f and int(f[3]) == self.sid and int(d) not in roots:
                    roots.append(int(d))
        return roots

    def delivered(self) -> int:
        """The sink's running message counter (last `mesg=N` written by smtp-sink -c)."""
        try:
            with open(self.sink_out, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 512))
                found = _MESG.findall(f.read())
        except OSError:
            return 0
        return int(found[-1]) if found else 0


# --------------------------------------------------------------------------- load


def smtp_source(port: int, sessions: int, messages: int, size: int,
                sender: str = SENDER, reuse: bool = False) -> dict[str, Any]:
    """Plain SMTP load with Postfix's smtp-source: one message per connection, or with
    `reuse` (-d) every message of a session over one connection (its From: header is the
    envelope sender)."""
    cmd = ["smtp-source", *(["-d"] if reuse else []), "-s", str(sessions), "-m", str(messages),
           "-l", str(size),
           "-f", sender, "-t", RCPT, "-M", "source.bench.example.test", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    el = time.monotonic() - t0
    ok = p.returncode == 0
    return dict(tool="smtp-source", messages_ok=messages if ok else 0,
                messages_failed=0 if ok else messages, sessions_ok=messages if ok else 0,
                elapsed_s=round(el, 4), messages_per_s=round(messages / el, 2) if ok else 0.0,
                sessions_per_s=round(messages / el, 2) if ok else 0.0,
                errors={} if ok else {"smtp-source": (p.stderr or p.stdout)[-200:]})


def load_py(args: list[str]) -> dict[str, Any]:
    p = subprocess.run(LOAD + args, capture_output=True, text=True, timeout=900)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict(messages_ok=0, messages_failed=1, errors={"load.py": p.stderr[-300:]})


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    key: str  # a, b, c, e, f, h, i, r, s
    label: str
    sessions: int = 1
    messages: int = 0
    size: int = 1024
    connections: int = 0
    sender: str = SENDER  # (s): the From: domain picks the DKIM keys that sign
    dkim: str = ""  # (s): off | rsa | ed25519 | both (Target.dkim says who runs which)
    reuse: bool = False  # (a'): smtp-source -d, the messages of a session on one connection
    attack: tuple[str, ...] = ("--noop", "2", "--noread", "2")  # (h): load.py flood args
    flood_port: str = ""  # (i): the Target port flooded: "submissions" | "plain"
    probe: str = ""  # (i): "implicit" (465) | "starttls" (587)
    seconds: float = 0.0  # (i): how long the flood is held
    addresses: int = 40  # (i): loopback addresses the flood comes from
    rate: float = 0.0  # (r): sessions started per second (open loop), at most `sessions`
    # in flight: the same offered load for every target, whatever its top speed


# (s) DKIM: run.sh makes keys for these From: domains (authrelay dkim keygen), so one
# running authrelay signs with none, RSA-2048, Ed25519 or both, by sender domain.
DKIM_SENDERS = {
    "off": SENDER,
    "rsa": "src@rsa.bench.example.test",
    "ed25519": "src@ed25519.bench.example.test",
    "both": "src@both.bench.example.test",
}


def scenarios(smoke: bool, quick: bool) -> list[Scenario]:
    if smoke:
        na, nb, nc, big, idle, nh = 30, 8, 10, 1_000_000, 200, 40
    elif quick:
        na, nb, nc, big, idle, nh = 600, 150, 200, 20_000_000, 10_000, 300
    else:
        na, nb, nc, big, idle, nh = 2000, 500, 600, 20_000_000, 10_000, 600
    out = []
    for s in (1, 10, 50):
        out.append(Scenario("a", f"plain 1 KiB, {s} sessions", s, na // 3 if s == 1 else na))
    # (a'): the same over reused connections (smtp-source -d: MAIL after the 250, no QUIT)
    out.append(Scenario("a", "plain 1 KiB, 10 sessions, connections reused (-d)", 10,
                        na * 3 // 2, reuse=True))
    for s in (1, 10, 50):
        out.append(Scenario("b", f"STARTTLS+AUTH 1 KiB, {s} sessions", s,
                            nb // 3 if s == 1 else nb))
    # (r): (b)'s sessions on a fixed schedule, the same offered load for every target, so
    # the final-250 latency is compared at equal work (in the closed loop of (b) a faster
    # server is also a busier machine: more TLS per second on the 2 shared cores)
    for rate, s in ((100, 10), (150, 50)):
        out.append(Scenario("r", f"STARTTLS+AUTH 1 KiB, {rate} sessions/s offered, "
                            f"up to {s} in flight", s, nb * 2 // 3, rate=rate))
    out.append(Scenario("c", "plain 100 KiB, 10 sessions", 10, nc, 102400))
    out.append(Scenario("e", f"one {big / 1e6:g} MB message", 1, 1, big))
    out.append(Scenario("f", f"{idle} idle connections", connections=idle))
    # (h): 4 clients in flight doing connect, EHLO, NOOP, QUIT; idle server, then the same
    # while 2 connections pipeline NOOPs and 2 pipeline EHLOs without ever reading.
    out.append(Scenario("h", "connect-to-QUIT, idle server", 4, nh))
    out.append(Scenario("h", "connect-to-QUIT, 2 NOOP floods + 2 never read", 4, nh,
                        connections=4))
    # issue 17: 8 connections on the plain port streaming an endless oversized DATA
    out.append(Scenario("h", "connect-to-QUIT, 8 endless oversized DATA, never read", 4, nh,
                        connections=8, attack=("--noop", "0", "--noread", "0",
                                               "--bigdata", "8")))
    # (i) issue 17: a 40-address flood held (and reopened) on one port; fresh clients
    fs, ns = (5.0, 300) if smoke else (30.0, 3000) if quick else (120.0, 3000)
    out.append(Scenario("i", f"465 flood: {ns} never-TLS sockets, 40 addresses, {fs:g} s; "
                        "fresh 465 TLS+AUTH+msg", connections=ns, flood_port="submissions",
                        probe="implicit", seconds=fs))
    # ... and from more addresses than the 465 pool (100) has slots
    out.append(Scenario("i", f"465 flood: {ns} never-TLS sockets, 120 addresses, {fs:g} s; "
                        "fresh 465 TLS+AUTH+msg", connections=ns, flood_port="submissions",
                        probe="implicit", seconds=fs, addresses=120))
    out.append(Scenario("i", f"25 flood: {ns} idle sockets, 40 addresses, {fs:g} s; "
                        "fresh 587 STARTTLS+AUTH+msg", connections=ns, flood_port="plain",
                        probe="starttls", seconds=fs))
    for size, n in ((1024, na // 2), (102400, nc)):
        for variant, sender in DKIM_SENDERS.items():
            out.append(Scenario("s", f"DKIM {variant}, {size // 1024} KiB, 10 sessions", 10,
                                n, size, sender=sender, dkim=variant))
    return out


STALL_S = 15.0  # give up waiting for the sink after this long without a new message


def wait_delivered(t: Target, goal: int, stall: float | None = None) -> tuple[int, float]:
    """Poll the sink until `goal` messages arrived or none came for `stall` seconds.

    Returns (count, monotonic time the last counted message arrived)."""
    stall = STALL_S if stall is None else stall
    n, t_last = t.delivered(), time.monotonic()
    while n < goal and time.monotonic() - t_last < stall:
        time.sleep(0.02)
        m = t.delivered()
        if m != n:
            n, t_last = m, time.monotonic()
    return n, t_last


def run_one(t: Target, sc: Scenario) -> dict[str, Any]:
    roots = t.roots()
    pids0 = process_tree(roots)
    rss_idle, pss_idle = memory(pids0)
    rec: dict[str, Any] = dict(target=t.name, scenario=sc.key, label=sc.label,
                               sessions=sc.sessions, size=sc.size, reuse=sc.reuse,
                               server_processes_idle=len(pids0),
                               rss_idle_mb=round(rss_idle / MB, 2),
                               pss_idle_mb=round(pss_idle / MB, 2))
    if sc.key == "f":
        return run_idle(t, sc, roots, rec)
    if sc.key == "h":
        return run_latency(t, sc, roots, rec)
    if sc.key == "i":
        return run_flood(t, sc, roots, rec)
    sampler = MemSampler(roots) if sc.key == "e" else None
    c0, cpu0 = t.delivered(), cpu_seconds(process_tree(roots))
    master = t.pids[0] if t.pids else 0  # authrelay: the serve process (scheduler, courier)
    mcpu0 = own_cpu_seconds(master) if master else 0.0
    if sampler:
        sampler.start()
    t0 = time.monotonic()
    n_msgs = min(sc.messages, t.caps.get(sc.key, sc.messages))
    if sc.key in ("a", "c", "s"):
        port = t.variant_ports.get(sc.dkim, t.plain)
        load = smtp_source(port, sc.sessions, n_msgs, sc.size, sc.sender, sc.reuse)
    elif sc.key in ("b", "r"):
        load = load_py(["smtp", "--port", str(t.submission), "--tls", "starttls",
                        "--auth", "plain", "--user", t.user, "--password", t.password,
                        "-c", str(sc.sessions), "-n", str(n_msgs), "-m", "1",
                        "--size", str(sc.size), "--from", SENDER, "--to", RCPT]
                       + (["--rate", f"{sc.rate:g}"] if sc.rate else []))
    else:  # e: one big message on the plain port
        load = load_py(["smtp", "--port", str(t.plain), "-c", "1", "-n", "1", "-m", "1",
                        "--size", str(sc.size), "-p", "1", "--timeout", "120",
                        "--from", SENDER, "--to", RCPT])
    t_end = time.monotonic()
    # load.py's own clock excludes interpreter start-up: the load began accept_s ago
    t_begin = max(t0, t_end - float(load.get("elapsed_s") or 0))
    accepted = int(load.get("messages_ok", 0))
    n, t_done = wait_delivered(t, c0 + accepted)
    cpu = cpu_seconds(process_tree(roots)) - cpu0
    mcpu = own_cpu_seconds(master) - mcpu0 if master else None
    delivered = n - c0
    rec.update(
        load=load, accepted=accepted, failed=int(load.get("messages_failed", 0)),
        accept_s=load.get("elapsed_s"), accepted_per_s=load.get("messages_per_s"),
        sessions_per_s=load.get("sessions_per_s"),
        final_250_p50_ms=(load.get("final_250_ms") or {}).get("p50"),
        final_250_p99_ms=(load.get("final_250_ms") or {}).get("p99"),
        delivered=delivered, delivered_all=delivered >= accepted,
        deliver_s=round(t_done - t_begin, 4),
        delivered_per_s=round(delivered / (t_done - t_begin), 2) if delivered > 0 else 0.0,
        cpu_s=round(cpu, 3),
        cpu_ms_per_msg=round(1000 * cpu / accepted, 3) if accepted else None,
    )
    if mcpu is not None and accepted:
        rec.update(cpu_master_ms_per_msg=round(1000 * mcpu / accepted, 3),
                   cpu_master_share=round(mcpu / cpu, 3) if cpu > 0 else None)
    if sampler:
        peak_rss, peak_pss = sampler.stop()
        rec.update(rss_peak_mb=round(peak_rss / MB, 2),
                   rss_growth_mb=round((peak_rss - rss_idle) / MB, 2),
                   pss_peak_mb=round(peak_pss / MB, 2),
                   pss_growth_mb=round((peak_pss - pss_idle) / MB, 2))
    return rec


def run_idle(t: Target, sc: Scenario, roots: list[int], rec: dict[str, Any]) -> dict[str, Any]:
    p = subprocess.Popen(LOAD + ["idle", "--port", str(t.plain), "--connections",
                                 str(sc.connections), "--timeout", "5",
                                 "--parallel", "5000"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin and p.stdout
    ready = json.loads(p.stdout.readline() or "{}")
    peak_rss = peak_pss = 0
    for _ in range(5):  # a few samples while every connection is held open
        rss, pss = memory(process_tree(roots))
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    nproc = len(process_tree(roots))
    p.stdin.write("go\n")
    p.stdin.flush()
    p.communicate(timeout=120)
    rec.update(idle=ready, connected=ready.get("connected"), greeted=ready.get("greeted"),
               rss_mb=round(peak_rss / MB, 2), pss_mb=round(peak_pss / MB, 2),
               server_processes=nproc)
    time.sleep(1.0)  # let the server notice the closes before the next run
    return rec


def run_latency(t: Target, sc: Scenario, roots: list[int],
                rec: dict[str, Any]) -> dict[str, Any]:
    """(h): connect-to-QUIT latency of ordinary clients, with or without the flooders."""
    flood = None
    if sc.connections:
        flood = subprocess.Popen(LOAD + ["flood", "--port", str(t.plain), *sc.attack],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert flood.stdin and flood.stdout
        json.loads(flood.stdout.readline() or "{}")  # ready: the floods are running
        time.sleep(1.0)  # let the never-readers fill their buffers
    sampler = MemSampler(roots, interval=0.05)
    sampler.start()
    cpu0 = cpu_seconds(process_tree(roots))
    load = load_py(["latency", "--port", str(t.plain), "-c", str(sc.sessions),
                    "-n", str(sc.messages), "--timeout", "30", "--max-time", "60"])
    cpu = cpu_seconds(process_tree(roots)) - cpu0
    peak_rss, _ = sampler.stop()
    flood_out: dict[str, Any] = {}
    if flood is not None:
        assert flood.stdin
        out, _ = flood.communicate("go\n", timeout=60)
        try:
            flood_out = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            flood_out = {}
        time.sleep(1.0)  # let the server notice the closes before the next run
    ms = load.get("session_ms") or {}
    rec.update(load=load, flood=flood_out, accepted=int(load.get("sessions_ok", 0)),
               failed=int(load.get("sessions_failed", 1)),
               session_p50_ms=ms.get("p50"), session_p99_ms=ms.get("p99"),
               session_max_ms=ms.get("max"), cpu_s=round(cpu, 3),
               rss_peak_mb=round(peak_rss / MB, 2),
               rss_growth_mb=round((peak_rss - rec["rss_idle_mb"] * MB) / MB, 2))
    return rec


def fds(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return n


def run_flood(t: Target, sc: Scenario, roots: list[int],
              rec: dict[str, Any]) -> dict[str, Any]:
    """(i): bench/poolflood.py holds the flood and times fresh submissions; we sample the
    server's RSS and descriptors meanwhile."""
    port = getattr(t, sc.flood_port)
    probe_port = t.submissions if sc.probe == "implicit" else t.submission
    if not port or not probe_port:
        rec.update(skipped="no such port on this target", failed=0)
        return rec
    fd0 = fds(process_tree(roots))
    peak = {"fds": fd0, "rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            pids = process_tree(roots)
            peak["fds"] = max(peak["fds"], fds(pids))
            peak["rss"] = max(peak["rss"], memory(pids)[0])

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    p = subprocess.run([sys.executable, str(HERE / "poolflood.py"), "--flood-port", str(port),
                        "--sockets", str(sc.connections), "--addresses", str(sc.addresses),
                        "--seconds", str(sc.seconds), "--probe", sc.probe,
                        "--probe-port", str(probe_port), "--user", t.user,
                        "--password", t.password],
                       capture_output=True, text=True, timeout=sc.seconds + 300)
    done.set()
    th.join()
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        out = dict(tries=1, ok=0, ok_ratio=0.0, ms={}, errors={"poolflood.py": p.stderr[-300:]})
    time.sleep(3.0)  # let the server notice the closes before the next run
    ms = out.get("ms") or {}
    rec.update(poolflood=out, accepted=out.get("ok", 0),
               failed=out.get("tries", 1) - out.get("ok", 0), ok_ratio=out.get("ok_ratio"),
               probe_p50_ms=ms.get("p50"), probe_p99_ms=ms.get("p99"),
               probe_max_ms=ms.get("max"), fds_idle=fd0, fds_peak=peak["fds"],
               fds_after=fds(process_tree(roots)),
               rss_peak_mb=round(peak["rss"] / MB, 2),
               rss_growth_mb=round((peak["rss"] - rec["rss_idle_mb"] * MB) / MB, 2))
    return rec


def warm_up(t: Target, scs: list[Scenario]) -> None:
    """A few messages down every path the target's scenarios take (first-use costs)."""
    if not scs:
        return
    n = t.delivered()
    for sc in [sc for sc in scs if sc.key == "s" and sc.size == 1024] or scs[:1]:
        smtp_source(t.variant_ports.get(sc.dkim, t.plain), 5, 20, 1024, sc.sender)
        n += 20
    if any(sc.key == "b" for sc in scs):
        load_py(["smtp", "--port", str(t.submission), "--tls", "starttls", "--auth", "plain",
                 "--user", t.user, "--password", t.password, "-c", "2", "-n", "4",
                 "--from", SENDER, "--to", RCPT])
        n += 4
    wait_delivered(t, n, stall=3)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pf = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True)
    return dict(date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                nproc=os.cpu_count(), cpu=cpu, kernel=platform.release(),
                python=platform.python_version(), postfix=pf.stdout.strip() or "?",
                mem_gb=round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", required=True, help="JSON file: list of targets")
    ap.add_argument("--reps", type=int, default=0,
                    help="repetitions (A B A B ...); default 3, --quick 2, --smoke 1")
    ap.add_argument("--smoke", action="store_true", help="tiny counts: seconds, not minutes")
    ap.add_argument("--quick", action="store_true", help="short normal mode")
    ap.add_argument("--only", default="", help="scenario keys to run, e.g. 'abc'")
    ap.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""),
                    help="a line for RESULTS.md (default: $BENCH_NOTE)")
    ap.add_argument("--out", help="default bench/results.json (smoke: in /tmp)")
    ap.add_argument("--md", help="default bench/RESULTS.md (smoke: in /tmp)")
    ap.add_argument("--png", help="default bench/throughput.png (smoke: in /tmp)")
    a = ap.parse_args(argv)
    # a smoke run must never overwrite the committed results
    outdir = Path("/tmp/authrelay-bench-smoke") if a.smoke else HERE
    outdir.mkdir(exist_ok=True)
    a.out = a.out or str(outdir / "results.json")
    a.md = a.md or str(outdir / "RESULTS.md")
    a.png = a.png or str(outdir / "throughput.png")
    a.reps = a.reps or (1 if a.smoke else 2 if a.quick else 3)
    global STALL_S
    STALL_S = 5.0 if a.smoke else STALL_S
    targets = [Target(**t) for t in json.loads(Path(a.targets).read_text())]
    scs = [s for s in scenarios(a.smoke, a.quick) if not a.only or s.key in a.only]
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    res: dict[str, Any] = dict(machine=machine(), mode=mode, reps=a.reps,
                               targets=[t.name for t in targets], note=a.note, runs=[],
                               target_info={t.name: dict(fsync=t.fsync, note=t.note,
                                                         scenarios=t.scenarios, dkim=t.dkim)
                                            for t in targets})
    t_start = time.monotonic()
    for t in targets:
        warm_up(t, [sc for sc in scs if t.runs(sc)])
    for rep in range(a.reps):
        for sc in scs:
            for t in targets:
                if not t.runs(sc):
                    continue  # e.g. only Postfix + OpenDKIM and authrelay sign (s)
                rec = run_one(t, sc)
                rec["rep"] = rep
                res["runs"].append(rec)
                print(f"[{time.monotonic() - t_start:6.1f}s] rep {rep} {t.name:9} "
                      f"{sc.key} {sc.label}: {summary(rec)}", file=sys.stderr, flush=True)
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    Path(a.out).write_text(json.dumps(res, indent=1))
    from report import write_markdown  # noqa: E402 (bench/ is on sys.path when run)

    Path(a.md).write_text(write_markdown(res))
    try:
        from plot import plot_throughput

        plot_throughput(res, a.png)
    except ImportError as e:  # matplotlib missing: the numbers still stand
        print(f"plot skipped: {e}", file=sys.stderr)
    bad = [r for r in res["runs"] if r.get("failed") or r.get("delivered_all") is False]
    return 1 if bad else 0


def summary(r: dict[str, Any]) -> str:
    if r["scenario"] == "i":
        if r.get("skipped"):
            return f"skipped: {r['skipped']}"
        return (f"ok {r['accepted']}/{r['accepted'] + r['failed']} ({r['ok_ratio']}), "
                f"p50/p99/max {r['probe_p50_ms']}/{r['probe_p99_ms']}/{r['probe_max_ms']} "
                f"ms, fds {r['fds_idle']}->{r['fds_peak']}->{r['fds_after']}, peak rss "
                f"{r['rss_peak_mb']} MB (+{r['rss_growth_mb']}), errors "
                f"{r['poolflood'].get('errors')}, flood {r['poolflood'].get('flood')}")
    if r["scenario"] == "h":
        return (f"p50/p99/max {r['session_p50_ms']}/{r['session_p99_ms']}/"
                f"{r['session_max_ms']} ms, failed {r['failed']}, peak rss "
                f"{r['rss_peak_mb']} MB (+{r['rss_growth_mb']}), flood {r.get('flood')}")
    if r["scenario"] == "f":
        return (f"greeted {r['greeted']}/{r['connected']} rss {r['rss_mb']} MB "
                f"pss {r['pss_mb']} MB ({r['server_processes']} processes)")
    s = (f"{r['accepted_per_s']} msg/s accepted, {r['delivered_per_s']} delivered/s, "
         f"cpu {r['cpu_ms_per_msg']} ms/msg")
    if r.get("cpu_master_ms_per_msg") is not None:
        s += f" (master {r['cpu_master_ms_per_msg']} ms/msg, share {r['cpu_master_share']})"
    if r["scenario"] in ("b", "r"):
        s += f", p50/p99 {r['final_250_p50_ms']}/{r['final_250_p99_ms']} ms"
    if r["scenario"] == "e":
        s += (f", {r['accept_s']} s, peak rss {r['rss_peak_mb']} MB (+{r['rss_growth_mb']})"
              f" pss {r['pss_peak_mb']} MB (+{r['pss_growth_mb']})")
    if r.get("failed") or not r.get("delivered_all"):
        s += f" FAILED={r.get('failed')} delivered={r['delivered']}/{r['accepted']}"
    return s


def median_span(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


if __name__ == "__main__":
    sys.exit(main())
