"""SMTP TLS Reporting (RFC 8460): tally TLS sessions per recipient domain, send daily reports.

Owns: the day's tally (`Recorder`, kept by the courier) and the daily reports
(`Reporter`, run by the delivering process). Off unless `[delivery] tls_reports = true`.

Contract:
- `Recorder.session(domain, policy, ok, kind, mx, ip)`: one TLS session (or one that
  should have been) to an MX of `domain` under `policy` (`PolicyDesc`: sts, tlsa or
  no-policy-found); `kind` is the RFC 8460 4.3 result type of a failure. Counts live in
  memory and are merged into `state_dir/tls-rpt/YYYY-MM-DD.json` (UTC day) by
  `write(take())` (take on the event loop, write in a thread) at most once a minute and
  at close, under an exclusive lock, so several processes and
  a courier replaced on reload add up instead of overwriting each other.
- `await Reporter.send_due()`: for every finished day, for every domain whose
  `_smtp._tls` TXT record (RFC 8460 3) has `mailto:` rua addresses, one report: the JSON
  of 4.4, gzipped, in a `multipart/report; report-type="tlsrpt"` message with the
  `application/tlsrpt+gzip` attachment named as 5.1 says and the TLS-Report-Domain and
  TLS-Report-Submitter headers of 5.3, queued through spool/submit.py (the one way in)
  with a null reverse-path (a report never causes a bounce). `https:` rua are not used
  (documented). Each domain done with leaves the day's file, which is removed once
  empty (a crash before that: sent twice at worst, never lost silently). `run()` does
  this after each UTC midnight.
Failure policy: recording never raises into delivery (a full disk loses the tally, with
a debug line); a DNS or spool failure keeps that domain (only) in the day's file for the
next run, for at most `_GIVE_UP` days.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.policy
import fcntl
import gzip
import json
import logging
import os
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from authrelay.address import AddressError, parse_mailbox
from authrelay.config import Config
from authrelay.dns import DnsError, Resolver, ascii_name
from authrelay.maillog import MailLog
from authrelay.spool.envelope import Envelope, Recipient
from authrelay.spool.submit import Refused, Submitter

log = logging.getLogger(__name__)

_FLUSH_EVERY = 60.0
_GIVE_UP = 7  # days: a day's reports not sent by then are dropped (with a maillog warning)
_MAX_KEYS = 100_000  # tally entries per day kept in memory before a forced flush
# Per domain and day: a hostile domain (random MX names from a wildcard zone, TLSA records
# per host) must not grow the tally, the day's file and its report without end. Past
# _MAX_DETAILS failure details of a policy, new ones count under their result type only
# (no MX host, no address); past _MAX_POLICIES policies, a new policy is not counted.
_MAX_POLICIES = 20
_MAX_DETAILS = 100
RESULT_TYPES = ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid",
                "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
                "sts-policy-invalid", "sts-webpki-invalid")


@dataclass(frozen=True)
class PolicyDesc:
    """RFC 8460 4.4 "policy": what was applied to the domain."""

    type: str = "no-policy-found"  # sts | tlsa | no-policy-found
    strings: tuple[str, ...] = ()  # the STS policy lines, or the TLSA records
    mx: tuple[str, ...] = ()  # STS mx patterns

    def key(self) -> str:
        return json.dumps([self.type, list(self.strings), list(self.mx)])


def _day(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d")


class Recorder:
    def __init__(self, cfg: Config, *, clock: Any = time.time) -> None:
        self.dir = cfg.state_path / "tls-rpt"
        self.clock = clock
        # day -> domain -> policy key -> [ok, {"type|mx|ip": n}]
        self._tally: dict[str, dict[str, dict[str, list[Any]]]] = {}
        self._n = 0
        self._last = clock()

    def session(self, domain: str, policy: PolicyDesc, ok: bool, kind: str = "",
                mx: str = "", ip: str = "", local_ip: str = "") -> None:
        try:
            day = _day(self.clock())
            # The A-label: bücher.example and xn--bcher-kva.example are one domain, one
            # report (its policy fetch failures are recorded under the A-label).
            pols = self._tally.setdefault(day, {}).setdefault(ascii_name(domain), {})
            pk = policy.key()
            if pk not in pols and len(pols) >= _MAX_POLICIES:
                return
            entry = pols.setdefault(pk, [0, {}])
            if ok:
                entry[0] += 1
            else:
                k = f"{kind or 'validation-failure'}|{mx}|{ip}|{local_ip}"
                _count(entry[1], k, 1)
            self._n += 1
        except Exception:  # the tally must never break a delivery
            log.exception("TLS-RPT: cannot record a session")

    def due(self) -> bool:
        return bool(self._tally) and (self.clock() - self._last >= _FLUSH_EVERY
                                      or self._n >= _MAX_KEYS)

    def take(self) -> dict[str, dict[str, dict[str, list[Any]]]]:
        """The tally so far, and a fresh one (on the event loop: session() runs there)."""
        tally, self._tally, self._n = self._tally, {}, 0
        self._last = self.clock()
        return tally

    def flush(self) -> None:
        """take() and write() in one (blocking)."""
        self.write(self.take())

    def write(self, tally: dict[str, dict[str, dict[str, list[Any]]]]) -> None:
        """Merge a taken tally into the day files (blocking: run it in a thread)."""
        if not tally:
            return
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.dir / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                for day, domains in tally.items():
                    _merge(self.dir / f"{day}.json", domains)
        except OSError as e:
            log.warning("TLS-RPT: cannot save the tally: %s", e)


def _merge(path: Path, domains: dict[str, dict[str, list[Any]]]) -> None:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        data = {}
    for dom, pols in domains.items():
        dd = data.setdefault(dom, {})
        for pk, (ok, fails) in pols.items():
            if pk not in dd and len(dd) >= _MAX_POLICIES:
                continue
            e = dd.setdefault(pk, [0, {}])
            e[0] += ok
            for k, n in fails.items():
                _count(e[1], k, n)
    _write_json(path, data)


def _write_json(path: Path, data: object) -> None:
    """Replace `path` with `data` as JSON, durably (temporary file, fsync, rename); the
    caller holds the tally lock."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _count(fails: dict[str, int], key: str, n: int) -> None:
    """Add `n` failures under `key` ("type|mx|ip|local"), or under its result type alone
    once the policy holds _MAX_DETAILS distinct details."""
    if key not in fails and len(fails) >= _MAX_DETAILS:
        key = key.split("|", 1)[0] + "|||"
    fails[key] = fails.get(key, 0) + n


_RUA = re.compile(r"^v=TLSRPTv1\s*(;|$)")


def parse_rua(records: list[str]) -> list[str]:
    """The mailto: addresses of the one `v=TLSRPTv1` record (RFC 8460 3: exactly one)."""
    ours = [r for r in records if _RUA.match(r.strip())]
    if len(ours) != 1:
        return []
    out: list[str] = []
    for part in ours[0].split(";"):
        k, _, v = part.strip().partition("=")
        if k.strip() != "rua":
            continue
        for uri in v.split(","):
            uri = uri.strip()
            if uri.lower().startswith("mailto:"):
                addr = urllib.parse.unquote(uri[7:].split("?")[0])
                if re.fullmatch(r"[^@\s<>]+@[A-Za-z0-9.-]+", addr) and _mailbox(addr):
                    out.append(addr)
    return out[:10]


def _mailbox(addr: str) -> bool:
    """An RFC 5321 mailbox, as every recipient the courier sends was checked on the way
    in (wire.command relies on it): a DNS answer's %00 or %01 never reaches RCPT TO or
    the report's To: field."""
    try:
        parse_mailbox(addr)
    except AddressError:
        return False
    return True


def report_json(cfg: Config, domain: str, day: str, pols: dict[str, list[Any]],
                report_id: str) -> dict[str, Any]:
    """RFC 8460 4.4."""
    policies = []
    for pk, (ok, fails) in pols.items():
        ptype, strings, mx = json.loads(pk)
        pol: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
        if strings:
            pol["policy-string"] = strings
        if mx:
            pol["mx-host"] = mx
        details = []
        for k, n in sorted(fails.items()):
            kind, host, ip, local = (k.split("|", 3) + ["", "", ""])[:4]
            d: dict[str, Any] = {"result-type": kind, "failed-session-count": n}
            if local:
                d["sending-mta-ip"] = local
            if host:
                d["receiving-mx-hostname"] = host
            if ip:
                d["receiving-ip"] = ip
            details.append(d)
        entry: dict[str, Any] = {
            "policy": pol,
            "summary": {"total-successful-session-count": ok,
                        "total-failure-session-count": sum(fails.values())}}
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    return {
        "organization-name": cfg.hostname,
        "date-range": {"start-datetime": f"{day}T00:00:00Z",
                       "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": f"postmaster@{cfg.hostname}",
        "report-id": report_id,
        "policies": policies,
    }


def report_message(cfg: Config, domain: str, day: str, rua: list[str],
                   report: dict[str, Any], now: float) -> bytes:
    """RFC 8460 5.3: multipart/report; report-type="tlsrpt" with the gzipped JSON. A
    UTF-8 address in `rua` is written in To: as it is (RFC 6532 3.2: an SMTPUTF8
    message's header), never as an encoded word, which RFC 2047 5 forbids in an address."""
    start = int(datetime.datetime.fromisoformat(f"{day}T00:00:00+00:00").timestamp())
    end = start + 86399
    utf8 = not all(a.isascii() for a in rua)
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    msg["From"] = f"TLS reporting <postmaster@{cfg.hostname}>"
    msg["To"] = ", ".join(rua)
    msg["Subject"] = (f"Report Domain: {domain} Submitter: {cfg.hostname} "
                      f"Report-ID: <{report['report-id']}>")
    msg["Date"] = format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
    msg["Message-ID"] = make_msgid(domain=cfg.hostname)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = cfg.hostname
    msg.set_content(f"This is an aggregate TLS report (RFC 8460) from {cfg.hostname} for "
                    f"{domain}, {day}.\n")
    body = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    name = f"{cfg.hostname}!{domain}!{start}!{end}!{report['report-id'].split('_')[-1]}.json.gz"
    msg.add_attachment(body, maintype="application", subtype="tlsrpt+gzip", filename=name)
    msg.set_type("multipart/report")  # was multipart/mixed; RFC 6522 + RFC 8460 5.3
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes()


class Reporter:
    """Daily reports from the day files (see the module docstring)."""

    def __init__(self, cfg: Config, resolver: Resolver, submitter: Submitter,
                 maillog: MailLog, *, clock: Any = time.time) -> None:
        self.cfg = cfg
        self.dir = cfg.state_path / "tls-rpt"
        self.resolver = resolver
        self.submitter = submitter
        self.maillog = maillog
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def reload(self, cfg: Config, resolver: Resolver | None) -> None:
        """SIGHUP: reports from now on name `cfg.hostname` (organization, From:, Subject,
        file name) and, given a `resolver` (new [delivery] nameservers / dns_timeout),
        look `_smtp._tls` up through it. When either changed, a run starts now: a day held
        back by lookups that failed on the old servers goes out without waiting an hour.
        The tally directory (state_dir) and `tls_reports` itself need a restart."""
        renamed = cfg.hostname != self.cfg.hostname
        self.cfg = cfg
        if resolver is not None:
            self.resolver = resolver
        if renamed or resolver is not None:
            self._wake.set()

    async def send_due(self) -> int:
        """Reports for every finished UTC day; returns how many messages were queued (two
        for a domain whose rua mixes ASCII and UTF-8 mailboxes)."""
        today = _day(self.clock())
        try:
            days = sorted(p for p in self.dir.glob("????-??-??.json") if p.stem < today)
        except OSError:
            return 0
        sent = 0
        for path in days:
            try:
                data = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError) as e:
                self.maillog.warning(f"TLS-RPT: unreadable tally {path.name}: {e}")
                continue
            if path.stem < _day(self.clock() - _GIVE_UP * 86400):
                self.maillog.warning(f"TLS-RPT: reports of {path.stem} for "
                                     f"{', '.join(sorted(data))[:200]} not sent after "
                                     f"{_GIVE_UP} days of failed attempts: given up")
                await asyncio.to_thread(self._finish_day, path, {})
                continue
            left: dict[str, Any] = {}  # domains to try again at the next run
            for domain, pols in data.items():
                try:
                    rua = parse_rua(await self.resolver.txt(f"_smtp._tls.{domain}"))
                except DnsError as e:
                    if "NXDOMAIN" not in str(e) and "no TXT" not in str(e):
                        left[domain] = pols  # a temporary failure: try again next run
                    continue
                if not rua:
                    continue
                rid = f"{path.stem}T00:00:00Z_{domain}_{secrets.token_hex(8)}"
                report = report_json(self.cfg, domain, path.stem, pols, rid)
                # UTF-8 mailboxes get their own SMTPUTF8 copy (RFC 6531: its To: is
                # UTF-8), so a next hop without SMTPUTF8 bounces (5.6.7) only that copy,
                # never the report to the ASCII ones.
                for group in ([a for a in rua if a.isascii()],
                              [a for a in rua if not a.isascii()]):
                    if not group:
                        continue
                    try:
                        await self._queue(domain, path.stem, group, report)
                    except Refused as e:
                        self.maillog.warning(f"TLS-RPT: report for {domain} not queued: {e}")
                        left[domain] = pols
                        break
                    sent += 1
            # Only what is left stays: a domain whose lookup keeps failing (its owner can
            # make it SERVFAIL at will) must not get every other domain of the day its
            # report again at each run.
            await asyncio.to_thread(self._finish_day, path, left)
        return sent

    async def _queue(self, domain: str, day: str, rua: list[str],
                     report: dict[str, Any]) -> None:
        """One report message to `rua` through the queue (raises Refused)."""
        data = report_message(self.cfg, domain, day, rua, report, self.clock())
        env = Envelope("", "", [Recipient(a) for a in rua], listener="tls-rpt",
                       protocol="local", smtputf8=not all(a.isascii() for a in rua))
        draft = self.submitter.begin(env, add_missing=False, check_content=False,
                                     sign=True, on_loop=True)
        draft.write(data)
        await draft.commit(origin=f"tls-rpt {domain} {day}")

    def _finish_day(self, path: Path, left: dict[str, Any]) -> None:
        """The day's file keeps only `left` (removed when empty), under the tally lock."""
        try:
            with open(self.dir / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not left:
                    path.unlink(missing_ok=True)
                    return
                _write_json(path, left)
        except OSError as e:
            log.warning("TLS-RPT: cannot update %s: %s", path.name, e)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.send_due()
            except Exception:
                log.exception("TLS-RPT: sending reports failed")
            now = self.clock()
            nxt = (int(now) // 86400 + 1) * 86400 + 300  # 00:05 UTC
            # The hour passed, or reload() woke us. asyncio.timeout, not wait_for: 3.11's
            # wait_for can lose stop()'s cancel to a wake-up in the same loop turn.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(3600.0, max(60.0, nxt - now))):
                    await self._wake.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="tls-rpt")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


__all__ = ["PolicyDesc", "Recorder", "Reporter", "parse_rua", "report_json",
           "report_message"]
