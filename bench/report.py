"""RESULTS.md from bench/results.json: every figure as median (min-max), ratio per row.

Owns: which figure each scenario reports and the goals of the Performance issues (9, 22).
Contract: `write_markdown(results) -> str`; `python bench/report.py results.json > RESULTS.md`
re-renders without re-running. One column per target; "ours" is authrelay (else the last
target), the others are peers. Per row: ours / the best peer of that row (the highest
rate, the least CPU or latency; a peer that does not fsync its queue is marked so beside
the ratio) and ours / Postfix. A missing figure shows as "-", never as a made-up number.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

# (scenario, label contains, metric, caption, higher is better, target)
_ROWS: list[tuple[str, str, str, str, bool, str]] = [
    ("a", "", "accepted_per_s", "(a) accepted msg/s", True,
     "best: >= 1.0x at 1, >= 1.5x at 10/50, >= 2.0x reused"),
    ("b", "", "accepted_per_s", "(b) accepted msg/s (= sessions/s)", True, "best: >= 1.0x"),
    ("b", "", "final_250_p50_ms", "(b) final 250 p50 ms", False, "best: <= 1.0x"),
    ("b", "", "final_250_p99_ms", "(b) final 250 p99 ms", False, ""),
    ("r", "", "sessions_per_s", "(r) sessions/s achieved (offered: the label)", True, ""),
    ("r", "", "final_250_p50_ms", "(r) final 250 p50 ms, same offered load", False, ""),
    ("r", "", "final_250_p99_ms", "(r) final 250 p99 ms, same offered load", False, ""),
    ("c", "", "accepted_per_s", "(c) accepted msg/s", True, "best: >= 1.5x"),
    ("a", "10 sessions", "delivered_per_s", "(d) delivered msg/s, end to end", True,
     "best: >= 1.0x"),
    ("c", "", "delivered_per_s", "(d) delivered msg/s, end to end", True, "best: >= 1.0x"),
    ("e", "", "accept_s", "(e) time to accept, s", False, ""),
    ("e", "", "rss_idle_mb", "(e) server RSS idle, MB", False, ""),
    ("e", "", "rss_peak_mb", "(e) server peak RSS, MB", False, ""),
    ("e", "", "rss_growth_mb", "(e) peak RSS growth over idle, MB", False, "< 5 MB"),
    ("e", "", "pss_idle_mb", "(e) server PSS idle, MB", False, ""),
    ("e", "", "pss_peak_mb", "(e) server peak PSS, MB", False, ""),
    ("e", "", "pss_growth_mb", "(e) peak PSS growth over idle, MB", False, "< 5 MB"),
    ("f", "", "rss_mb", "(f) server RSS (sum), MB", False, "< 500 MB"),
    ("f", "", "pss_mb", "(f) server PSS (sum), MB", False, "< 500 MB"),
    ("f", "", "server_processes", "(f) server processes", False, ""),
    ("f", "", "greeted", "(f) connections greeted (banner)", True, ""),
    ("h", "", "session_p50_ms", "(h) connect-to-QUIT p50 ms", False, ""),
    ("h", "", "session_p99_ms", "(h) connect-to-QUIT p99 ms", False, ""),
    ("h", "", "rss_growth_mb", "(h) server peak RSS growth, MB", False, ""),
    ("i", "", "ok_ratio", "(i) fresh clients served (share of tries)", True, ">= 0.95"),
    ("i", "", "probe_p50_ms", "(i) fresh client, connect to 250, p50 ms", False, ""),
    ("i", "", "probe_p99_ms", "(i) fresh client, connect to 250, p99 ms", False, "< 2000"),
    ("i", "", "fds_peak", "(i) server descriptors, peak", False, ""),
    ("i", "", "rss_growth_mb", "(i) server peak RSS growth, MB", False, ""),
    ("a", "", "cpu_ms_per_msg", "(g) server CPU ms/msg", False,
     "postfix: <= 1.0x; chasquid: <= 1.5x"),
    ("b", "", "cpu_ms_per_msg", "(g) server CPU ms/msg", False,
     "postfix: <= 1.0x; chasquid: <= 1.5x"),
    ("c", "", "cpu_ms_per_msg", "(g) server CPU ms/msg", False,
     "postfix: <= 1.0x; chasquid: <= 1.5x"),
    ("s", "", "accepted_per_s", "(s) accepted msg/s, DKIM signing", True,
     "signed: >= 2.0x postfix+opendkim"),
    ("s", "", "cpu_ms_per_msg", "(s) server CPU ms/msg, DKIM signing", False, ""),
    ("a", "", "cpu_master_ms_per_msg", "(g) authrelay master (scheduler+courier) CPU ms/msg",
     False, ""),
    ("a", "", "cpu_master_share", "(g) authrelay master's share of server CPU", False, ""),
]


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def _cell(xs: list[float]) -> str:
    if not xs:
        return "-"
    med = statistics.median(xs)
    return f"{_fmt(med)} ({_fmt(min(xs))}-{_fmt(max(xs))})" if len(xs) > 1 else _fmt(med)


def medians(res: dict[str, Any]) -> dict[tuple[str, str, str, str], float]:
    """(scenario, label, metric, target) -> median, for plot.py and the table."""
    acc: dict[tuple[str, str, str, str], list[float]] = {}
    for r in res["runs"]:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                acc.setdefault((r["scenario"], r["label"], k, r["target"]), []).append(v)
    return {k: statistics.median(v) for k, v in acc.items()}


def _signing_cost(res: dict[str, Any]) -> list[str]:
    """(s): CPU per message and accept rate signed vs unsigned, same size, for authrelay
    (unsigned: itself) and Postfix + OpenDKIM (unsigned: Postfix alone, same run)."""
    runs = [r for r in res["runs"] if r["scenario"] == "s"]
    if not any(r["target"] == "authrelay" for r in runs):
        return []

    def med(target: str, size: int, variant: str, metric: str) -> float | None:
        xs = [r[metric] for r in runs if r["target"] == target and r["size"] == size
              and r.get("label", "").startswith(f"DKIM {variant},")
              and isinstance(r.get(metric), int | float)]
        return statistics.median(xs) if xs else None

    out = ["", "## DKIM signing cost (s)", "",
           "| size | signer | keys | CPU ms/msg | + over unsigned | accepted msg/s | "
           "vs unsigned | authrelay / postfix+opendkim |",
           "|---|---|---|---|---|---|---|---|"]
    signers = [("authrelay", "authrelay")]
    if any(r["target"] == "postfix+opendkim" for r in runs):
        signers.append(("postfix+opendkim", "postfix"))
    for size in sorted({r["size"] for r in runs}):
        for target, unsigned in signers:
            off_cpu = med(unsigned, size, "off", "cpu_ms_per_msg")
            off_rate = med(unsigned, size, "off", "accepted_per_s")
            for v in ("off", "rsa", "ed25519", "both"):
                t = unsigned if v == "off" else target
                cpu, rate = med(t, size, v, "cpu_ms_per_msg"), med(t, size, v, "accepted_per_s")
                if cpu is None or rate is None:
                    continue
                extra = f"{cpu - off_cpu:+.2f}" if off_cpu is not None and v != "off" else "-"
                rel = f"{rate / off_rate:.2f}x" if off_rate and v != "off" else "-"
                theirs = med("postfix+opendkim", size, v, "accepted_per_s")
                vs = (f"{rate / theirs:.2f}x" if target == "authrelay" and theirs
                      and v != "off" else "-")
                out.append(f"| {size // 1024} KiB | {t} | {v} | {cpu:.2f} | {extra} | "
                           f"{rate:.0f} | {rel} | {vs} |")
    return out


def _ours(tg: list[str]) -> str:
    return "authrelay" if "authrelay" in tg else tg[-1]


def _no_fsync(res: dict[str, Any], t: str) -> bool:
    return (res.get("target_info") or {}).get(t, {}).get("fsync") is False


def _ratios(res: dict[str, Any], vals: dict[str, list[float]], higher: bool,
            metric: str) -> tuple[str, str]:
    """(ours / best peer, ours / postfix) cells of one row."""
    tg = res["targets"]
    ours = _ours(tg)
    if not vals.get(ours) or "growth" in metric:
        return "-", "-"
    mine = statistics.median(vals[ours])
    peers = {t: statistics.median(v) for t, v in vals.items() if t != ours and v}
    peers = {t: v for t, v in peers.items() if abs(v) >= 0.05}  # no ratio of ~0
    if not peers:
        return "-", "-"
    best = (max if higher else min)(peers, key=lambda t: peers[t])
    mark = ", no fsync" if _no_fsync(res, best) else ""
    vs_best = f"{mine / peers[best]:.2f}x ({best}{mark})"
    vs_pf = f"{mine / peers['postfix']:.2f}x" if "postfix" in peers else "-"
    return vs_best, vs_pf


def write_markdown(res: dict[str, Any]) -> str:
    m, tg = res["machine"], res["targets"]
    ours = _ours(tg)
    nofs = [t for t in tg if _no_fsync(res, t)]
    labels: dict[str, list[str]] = {}
    for r in res["runs"]:
        ls = labels.setdefault(r["scenario"], [])
        if r["label"] not in ls:
            ls.append(r["label"])
    out = [
        "# authrelay vs " + ", ".join(t for t in tg if t != ours) + ": benchmark results", "",
        f"Generated by `bench/run.sh` ({res['mode']} mode, {res['reps']} repetitions, "
        f"targets alternating {' / '.join(tg)} within every scenario; wall "
        f"{res.get('wall_s', '?')} s).", "",
        f"- Date: {m['date']}",
        f"- Machine: {m['nproc']} CPUs, {m['cpu']}, {m['mem_gb']} GB RAM, "
        f"Linux {m['kernel']}",
        f"- Postfix {m['postfix']} (durable queue as shipped), Python {m['python']}",
        "- Load and servers share the machine; every figure is median (min-max) over the "
        f"repetitions. \"vs best peer\" = {ours} / the best peer of the row (highest rate, "
        f"least CPU or latency), named beside it; \"vs postfix\" = {ours} / postfix. For "
        "rows marked lower-is-better a ratio below 1 is a win.",
    ]
    if nofs:
        out.append(f"- **{', '.join(nofs)} do not fsync their queue** before the 250 (a "
                   f"crash loses accepted mail); postfix and {ours} fsync every message. "
                   "Every ratio against them says \"no fsync\".")
    for t, info in (res.get("target_info") or {}).items():
        if info.get("note"):
            out.append(f"- {t}: {info['note']}")
    if res.get("note"):
        out.append(f"- Note: {res['note']}")
    out.append("")
    cols = [f"{t} (no fsync)" if t in nofs else t for t in tg]
    head = ("| scenario | figure | " + " | ".join(cols)
            + " | vs best peer | vs postfix | better | goal |")
    out += [head, "|" + "---|" * (len(tg) + 6)]
    for sc, filt, metric, caption, higher, target in _ROWS:
        for label in labels.get(sc, []):
            if filt not in label:
                continue
            vals = {t: [r[metric] for r in res["runs"] if r["scenario"] == sc
                        and r["label"] == label and r["target"] == t
                        and isinstance(r.get(metric), int | float)] for t in tg}
            if not any(vals.values()):
                continue
            vs_best, vs_pf = _ratios(res, vals, higher, metric)
            cells = " | ".join(_cell(vals[t]) for t in tg)
            out.append(f"| {label} | {caption} | {cells} | {vs_best} | {vs_pf} | "
                       f"{'higher' if higher else 'lower'} | {target} |")
    hl = labels.get("h", [])
    for hf in hl[1:]:  # (h) goal: p99 under each flood within 2x of idle, per server
        cells = []
        for t in tg:
            idle, flood = ([r["session_p99_ms"] for r in res["runs"] if r["scenario"] == "h"
                            and r["label"] == lab and r["target"] == t
                            and isinstance(r.get("session_p99_ms"), int | float)]
                           for lab in (hl[0], hf))
            cells.append(f"{statistics.median(flood) / statistics.median(idle):.2f}x"
                         if idle and flood and statistics.median(idle) > 0 else "-")
        out.append(f"| {hf} | (h) p99 ratio, flood over idle | "
                   f"{' | '.join(cells)} | - | - | lower | <= 2x |")
    out += _signing_cost(res)
    fails = [r for r in res["runs"] if r.get("failed") or r.get("delivered_all") is False]
    out += ["", "## Failures", ""]
    if not fails:
        out.append("None: every message accepted was delivered to the sink.")
    for r in fails:
        out.append(f"- {r['target']} rep {r['rep']} {r['label']}: failed {r.get('failed')}, "
                   f"delivered {r.get('delivered')}/{r.get('accepted')}, "
                   f"errors {(r.get('load') or {}).get('errors')}")
    out += [
        "", "## How the figures are taken", "",
        "- (a), (c): `smtp-source` (one message per connection) against the plain port, "
        "relay for the trusted network 127.0.0.0/8; accepted msg/s = messages / "
        "smtp-source wall time.",
        "- (b): `bench/load.py` on the submission port: STARTTLS (full handshake, no "
        "resumption) + AUTH PLAIN, one message per session; final 250 = time from the "
        "last DATA byte written to the 250.",
        "- (r): (b)'s sessions started on a fixed schedule (`load.py --rate`), the same "
        "offered load for every target; sessions/s achieved shows whether it kept up.",
        "- (d): the same runs, counted at the loopback `smtp-sink`: delivered msg/s = "
        "messages / (start of load to last message at the sink).",
        "- (e): one message on the plain port; RSS summed over all server processes, "
        "sampled every 10 ms until it reached the sink.",
        "- Memory: RSS summed over processes counts shared pages (libraries; Postfix's "
        "forked smtpd processes) once per process; PSS (/proc/PID/smaps_rollup) shares "
        "them out, so the PSS sum is the real footprint. Both are shown.",
        "- (f): `load.py idle` holds the connections open after reading banners; memory "
        "summed over all server processes. Postfix serves at most its process limit "
        "(100 smtpd); the rest wait in the listen queue, so its figure is for those.",
        "- (h): `load.py latency`, 4 clients in flight, each session connect, EHLO, NOOP, "
        "QUIT timed from connect to the 221; once on an idle server, once while "
        "`load.py flood` runs 2 connections pipelining NOOPs (reading the replies) and 2 "
        "pipelining EHLOs that never read (each reconnects when closed); and once while "
        "8 connections stream an endless oversized DATA without reading (issue 17).",
        "- (i): `bench/poolflood.py`: 3,000 sockets from 40 loopback addresses "
        "(127.0.5.1-40; or 120, more than the 465 pool's 100 slots) held against one "
        "port and reopened whenever the server closes "
        "them (465: never a byte, no TLS; 25: the greeting read, then silence), while one "
        "fresh client after another, each from a new address, does TLS (465 implicit, or "
        "587 STARTTLS) + AUTH PLAIN + one message + QUIT; a try failing or over 10 s "
        "counts as not served. Server descriptors (/proc/PID/fd) and RSS sampled every "
        "0.5 s. Postfix: 465 is `smtpd -o smtpd_tls_wrappermode=yes` (process limit 100); "
        "authrelay's 465 listener has `max_connections = 100` to match.",
        "- (g): utime+stime of every server process plus the cutime+cstime of reaped "
        "children (/proc/PID/stat), from the start of the load until every message "
        "reached the sink, divided by messages. Postfix = master tree + Dovecot tree; "
        "postfix+opendkim = those + both OpenDKIM instances; chasquid = its process; "
        "opensmtpd = its process tree; authrelay = the `authrelay serve` tree.",
        "- Peers (bench/mta-peers.sh): chasquid 1.11 and OpenSMTPD 6.8 from their Debian "
        ".debs, each in its own mount namespace, with a loopback DNS server answering at "
        "once; chasquid's plain-port mail goes through a local alias domain (it relays only "
        "for authenticated users); Postfix + OpenDKIM 2.11 signs with the same key files "
        "as authrelay (one OpenDKIM instance per algorithm, both in a row for \"both\").",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(write_markdown(json.load(f)), end="")
