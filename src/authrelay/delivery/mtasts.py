"""MTA-STS (RFC 8461): a domain's published policy, fetched, cached and applied.

Owns: the `_mta-sts.DOMAIN` TXT record (3.1), the policy file from
`https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (3.3), its strict parsing (3.2), the
cache in `state_dir/mta-sts/` (one JSON file per domain, survives restarts), and MX
matching with wildcards (4.1).

Contract: `await StsSource(...).policy(domain)` -> `StsPolicy | None` (None: no policy).
- A cached, unexpired policy is used as is; the TXT record is still looked at (at most
  every `_RECHECK` seconds per domain) and a changed `id` refreshes the policy in the
  background (3.3, 5.1): the delivery never waits for HTTPS when a policy is cached.
- No cached policy: TXT then HTTPS inline (bounded by `[delivery] dns_timeout` and
  `_FETCH_TIMEOUT` for the whole exchange, not per read; on `_FETCH_POOL`'s threads, so
  slow policy hosts never hold the default executor), the body at most `_MAX_BODY`
  bytes (3.3: 64 KiB), a redirect is not followed (3.3), the certificate must verify
  for `mta-sts.DOMAIN` against the CA set (the system store plus
  `[delivery] tls_ca_file`), the media type must be text/plain.
- Any failure to find or fetch a policy when none is cached: None (no policy: 5 says a
  sender MUST NOT refuse delivery when no policy can be found). A failed refresh keeps
  the cached policy until its max_age ends (5.1).
Failure policy: never raises; reasons go to the debug log (and the TLS-RPT tally).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from authrelay.config import Config
from authrelay.dns import DnsError, Resolver, ascii_name

log = logging.getLogger(__name__)

MAX_AGE_CAP = 31557600  # RFC 8461 3.2: max_age at most one year
_MX_LABEL = re.compile(r"[a-z0-9_-]+")  # a label of a hostname, as parse_policy's patterns


class StsParseError(ValueError):
    pass


@dataclass(frozen=True)
class StsPolicy:
    domain: str
    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched: float = 0.0  # unix time

    def allows(self, host: str) -> bool:
        """RFC 8461 4.1: an MX pattern matches the host exactly, or "*.example.com"
        matches exactly one label in front of "example.com"; compared label by label.
        `host` is an MX name as DNS gives it (presentation form, A-labels): a name that is
        no hostname (a label with an escaped dot or any character outside the patterns'
        letters, digits, '-' and '_') matches nothing. As text, `x\\.victim.test` (the
        two labels `x.victim` and `test`) matched `*.victim.test`."""
        labels = host.lower().removesuffix(".").split(".")
        if not all(_MX_LABEL.fullmatch(label) for label in labels):
            return False
        for pat in self.mx:
            want = pat.split(".")
            if want[0] == "*":
                if len(labels) == len(want) and labels[1:] == want[1:]:
                    return True
            elif labels == want:
                return True
        return False

    def lines(self) -> tuple[str, ...]:
        """The policy as RFC 8460 4.4's policy-string."""
        return ("version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx),
                f"max_age: {self.max_age}")

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age


_TXT = re.compile(r"^v=STSv1(;|$)")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def parse_txt(records: list[str]) -> str | None:
    """The id of the one `v=STSv1` TXT record (3.1); None if there is not exactly one."""
    ours = [r for r in records if _TXT.match(r.strip())]
    if len(ours) != 1:
        return None
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields.setdefault(k.strip(), v.strip())
    sid = fields.get("id", "")
    return sid if _ID.match(sid) else None


def parse_policy(domain: str, sid: str, text: str, now: float) -> StsPolicy:
    """RFC 8461 3.2: `key: value` lines (CRLF or LF); version STSv1, mode, max_age, and
    at least one mx unless mode is none. Unknown keys are ignored; duplicates of a
    single-valued key keep the first."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise StsParseError(f"malformed line {line[:40]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", value):
                raise StsParseError(f"bad mx pattern {value[:60]!r}")
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise StsParseError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise StsParseError(f"bad mode {mode[:20]!r}")
    age = fields.get("max_age", "")
    if not (age.isascii() and age.isdigit()) or len(age) > 10:  # "²".isdigit() is True
        raise StsParseError(f"bad max_age {age[:20]!r}")
    if mode != "none" and not mx:
        raise StsParseError("no mx line")
    return StsPolicy(domain, sid, mode, tuple(mx), min(int(age), MAX_AGE_CAP), now)


class StsSource:
    """Where policies come from (see the module docstring); `policy()` never raises."""

    async def policy(self, domain: str) -> StsPolicy | None:  # pragma: no cover - interface
        return None


class MemoryStsSource(StsSource):
    """Policies from a dict (unit tests of the planner; no DNS, no HTTPS)."""

    def __init__(self, policies: dict[str, StsPolicy] | None = None) -> None:
        self.policies = dict(policies or {})
        self.asked: list[str] = []

    async def policy(self, domain: str) -> StsPolicy | None:
        self.asked.append(domain)
        return self.policies.get(domain)


_MAX_BODY = 64 * 1024  # RFC 8461 3.3: senders may refuse bigger policies
# The blocking HTTPS fetches run on threads of their own, never on the event loop's default
# executor: a hostile policy host (a wildcard zone gives an attacker any number of
# domains) holds its thread for up to _FETCH_TIMEOUT, and the default executor has
# min(32, CPUs + 4) threads, which the courier needs for spool reads and cache files.
# Fetches past this many wait their turn (within their own deadline).
_FETCH_THREADS = 16
_FETCH_POOL = ThreadPoolExecutor(max_workers=_FETCH_THREADS,
                                 thread_name_prefix="authrelay-mta-sts")
_FETCH_TIMEOUT = 30.0  # RFC 8461 3.3 suggests a minute at most; HTTPS connect + read
_NEGATIVE_TTL = 300.0  # "no policy" remembered in memory this long (one TXT per 5 min)
_RECHECK = 3600.0  # a cached policy's TXT id is looked at again after this long
_MAX_DOMAINS = 100_000  # memory bound of the in-process caches
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")


class StsFetchError(Exception):
    pass


_MAX_RESPONSE = 4 * _MAX_BODY  # the whole answer: status lines, headers, framing, body


class _Capped(io.RawIOBase):
    """The response's bytes, cut at `_MAX_RESPONSE` in all: http.client skips "100
    Continue" interim responses in a loop without end, so a policy host could keep the
    fetching thread parsing them at full speed (holding the GIL) until the deadline."""

    def __init__(self, fp: io.BufferedReader) -> None:
        super().__init__()
        self._fp = fp
        self._left = _MAX_RESPONSE

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._fp.readinto(b)
        self._left -= n
        if self._left < 0:
            raise StsFetchError(f"answer larger than {_MAX_RESPONSE} bytes")
        return n

    def close(self) -> None:
        self._fp.close()
        super().close()


class _CappedResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(sock, debuglevel, method, url)
        self.fp = io.BufferedReader(_Capped(self.fp))


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address we resolved (through [delivery] nameservers), with SNI and the
    certificate check for the policy host name (RFC 8461 3.3)."""

    response_class = _CappedResponse

    def __init__(self, name: str, ip: str, timeout: float, ctx: ssl.SSLContext) -> None:
        super().__init__(name, 443, timeout=timeout, context=ctx)
        self._ip = ip
        self._ctx = ctx
        self._lock = threading.Lock()
        self._tls: ssl.SSLSocket | None = None  # kept: close() drops self.sock while the
        self.aborted = False  # response still reads from it (HTTP/1.0, will_close)

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        tls = self._ctx.wrap_socket(sock, server_hostname=self.host,
                                    do_handshake_on_connect=False)
        with self._lock:
            self.sock = self._tls = tls
            if self.aborted:
                raise TimeoutError("timed out")
        tls.do_handshake()

    def abort(self) -> None:
        """The whole fetch's deadline (a timer thread): shut the socket down, so a read
        blocked in the fetching thread returns now (the socket's timeout is per read)."""
        with self._lock:
            self.aborted = True
            if self._tls is not None:
                # socket.socket's, not SSLSocket's (which would drop its TLS state under
                # the reading thread's feet): the reader sees an EOF. Once really closed
                # the object's fd is -1 (EBADF), never a reused descriptor.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._tls, socket.SHUT_RDWR)


def _get(name: str, ip: str, timeout: float, ctx: ssl.SSLContext) -> str:
    """One GET of the policy, within `timeout` in all (connect, handshake, headers and
    body together): a server dripping a byte every few seconds would otherwise keep
    this worker thread for as long as it likes, and a few such domains would take every
    thread of the event loop's default executor (queue and cache I/O stall)."""
    conn = _PinnedHTTPS(name, ip, timeout, ctx)
    deadline = threading.Timer(timeout, conn.abort)
    deadline.daemon = True
    deadline.start()
    try:
        try:
            return _exchange(conn)
        except (OSError, http.client.HTTPException):
            if conn.aborted:
                raise TimeoutError("timed out") from None
            raise
    finally:
        deadline.cancel()
        conn.close()


def _exchange(conn: _PinnedHTTPS) -> str:
    """The request and the checks of RFC 8461 3.3 on the answer."""
    name = conn.host
    conn.request("GET", "/.well-known/mta-sts.txt",
                 headers={"Host": name, "User-Agent": "authrelay"})
    with conn.getresponse() as resp:  # closed on the way out: the socket with it
        return _checked(conn, resp)


def _checked(conn: _PinnedHTTPS, resp: http.client.HTTPResponse) -> str:
    if resp.status != 200:  # 3.3: redirects are not followed
        raise StsFetchError(f"HTTP status {resp.status}")
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "text/plain":
        raise StsFetchError(f"media type {ctype or '-'} is not text/plain")
    body = resp.read(_MAX_BODY + 1)
    if conn.aborted:  # cut short by the deadline: not the policy the server meant
        raise TimeoutError("timed out")
    if len(body) > _MAX_BODY:
        raise StsFetchError(f"policy larger than {_MAX_BODY} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsFetchError("policy is not UTF-8") from None


class HttpsStsSource(StsSource):
    """Policies over DNS + HTTPS, cached in memory and in `state_dir/mta-sts/`."""

    def __init__(self, cfg: Config, resolver: Resolver, *, recheck: float = _RECHECK,
                 save: bool = True) -> None:
        self.cfg = cfg
        self.save = save  # False: never write the cache (authrelay tls-policy)
        self.resolver = resolver
        self.recheck = recheck
        self.dir = cfg.state_path / "mta-sts"
        self._mem: dict[str, StsPolicy] = {}
        self._none_until: dict[str, float] = {}
        self._checked: dict[str, float] = {}  # domain -> when its TXT id was last compared
        self._disk_seen: set[str] = set()  # domains whose cache file was looked for
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx = ssl.create_default_context()  # the system store...
        if cfg.delivery.tls_ca_file:  # ...plus a private CA
            self._ctx.load_verify_locations(cafile=cfg.delivery.tls_ca_file)
        self.fetches = 0  # HTTPS fetches made (tests, bench)
        # Called with (domain, RFC 8460 result type) when a published policy cannot be
        # fetched or parsed: sts-webpki-invalid, sts-policy-invalid, sts-policy-fetch-error.
        self.on_failure: Callable[[str, str], None] | None = None
        self._inflight: dict[str, asyncio.Task[StsPolicy]] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        domain = ascii_name(domain)  # "bücher.example": the policy of xn--bcher-kva.example
        if not _DOMAIN.match(domain):
            return None
        now = time.time()
        cached = self._mem.get(domain)
        if cached is None and domain not in self._disk_seen:
            # Once per domain and process: after that, memory is the truth (this process
            # writes the files), so a domain without a policy costs no thread hop. Marked
            # once read: a caller cut during the read (attempt_timeout) leaves it to the
            # next one, never a cached policy unread (an inline fetch a DNS attack foils).
            cached = await asyncio.to_thread(self._load, domain)
            if len(self._disk_seen) >= _MAX_DOMAINS:
                self._disk_seen.clear()
            self._disk_seen.add(domain)
            if cached is not None:
                self._remember(domain, cached)
        if cached is not None and not cached.expired(now):
            if now - self._checked.get(domain, cached.fetched) >= self.recheck:
                self._checked[domain] = now
                self._spawn(self._refresh(domain, cached))
            return cached
        if self._none_until.get(domain, 0.0) > now:
            return None
        try:
            sid = await self._txt(domain)
            if sid is None:
                raise StsFetchError("no (single, valid) v=STSv1 TXT record")
            pol = await self._fetch_once(domain, sid)
        except StsFetchError as e:
            log.debug("MTA-STS %s: no policy: %s", domain, e)
            if len(self._none_until) >= _MAX_DOMAINS:
                self._none_until.clear()
            self._none_until[domain] = now + _NEGATIVE_TTL
            return None
        return pol

    async def settle(self) -> None:
        """Wait for background refreshes (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the background refreshes (nobody waits for them; the cache files stay).
        A first fetch that deliveries wait for is left to finish (bounded by its timeout):
        a courier replaced on reload still has deliveries in flight."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _remember(self, domain: str, pol: StsPolicy) -> None:
        if len(self._mem) >= _MAX_DOMAINS:
            # Forgotten in memory only: every domain's cache file must be read again on its
            # next delivery, or a cached enforce policy would lapse into an inline fetch
            # that a DNS attack (no TXT record) turns into "no policy" (RFC 8461 10.3).
            self._mem.clear()
            self._disk_seen.clear()
            self._checked.clear()
        self._mem[domain] = pol

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, domain: str, cached: StsPolicy) -> None:
        """RFC 8461 5.1: a changed id means a new policy; a failed refresh keeps the
        cached one (until its max_age ends)."""
        try:
            sid = await self._txt(domain)
            # A new id, or half of max_age gone (5.1: refresh before it expires, so a
            # stable policy never lapses into an inline fetch).
            if sid is not None and (sid != cached.id or
                                    time.time() >= cached.fetched + cached.max_age / 2):
                await self._fetch_once(domain, sid)
        except StsFetchError as e:
            log.debug("MTA-STS %s: refresh failed, keeping id %s: %s", domain, cached.id, e)

    async def _txt(self, domain: str) -> str | None:
        try:
            records = await self.resolver.txt(f"_mta-sts.{domain}")
        except DnsError:
            return None
        return parse_txt(records)

    async def _fetch_once(self, domain: str, sid: str) -> StsPolicy:
        """One fetch per domain at a time: concurrent deliveries to a new domain wait for
        the same HTTPS request (a task of its own, so a waiter cancelled at shutdown does
        not cancel it for the others)."""
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(domain, sid))
            self._inflight[domain] = task

            def done(t: asyncio.Task[StsPolicy]) -> None:
                self._inflight.pop(domain, None)
                if not t.cancelled():
                    t.exception()  # retrieved, even when every waiter went away
            task.add_done_callback(done)
        return await asyncio.shield(task)

    def _failed(self, domain: str, kind: str) -> None:
        if self.on_failure is not None:
            self.on_failure(domain, kind)

    async def _fetch(self, domain: str, sid: str) -> StsPolicy:
        name = f"mta-sts.{domain}"
        try:
            addrs = await self.resolver.addresses(name)
        except DnsError as e:
            self._failed(domain, "sts-policy-fetch-error")
            raise StsFetchError(f"{name}: {e}") from None
        self.fetches += 1
        err: Exception | None = None
        for ip in addrs[:2]:
            try:
                text = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                    _FETCH_POOL, _get, name, ip, _FETCH_TIMEOUT, self._ctx), _FETCH_TIMEOUT)
                break
            except (OSError, TimeoutError, http.client.HTTPException, StsFetchError) as e:
                err = e
        else:
            why = _reason(err)
            self._failed(domain, "sts-webpki-invalid"
                         if isinstance(err, ssl.SSLCertVerificationError)
                         else "sts-policy-fetch-error")
            raise StsFetchError(f"fetching https://{name}/.well-known/mta-sts.txt: {why}")
        try:
            pol = parse_policy(domain, sid, text, time.time())
        except StsParseError as e:
            self._failed(domain, "sts-policy-invalid")
            raise StsFetchError(f"invalid policy at {name}: {e}") from None
        self._remember(domain, pol)
        self._checked[domain] = pol.fetched
        if self.save:
            await asyncio.to_thread(self._save, pol)
        return pol

    def _path(self, domain: str) -> Path:
        return self.dir / f"{domain}.json"

    def _load(self, domain: str) -> StsPolicy | None:
        """The cached policy, checked as strictly as a fetched one (the same parser): a
        file damaged or edited by hand is no policy (fetched again), never an exception
        in the delivery or a mode or MX pattern the parser would refuse; one fetched "in
        the future" (a clock set back, a hand edit) would never expire: refused too."""
        try:
            data = json.loads(self._path(domain).read_text("utf-8"))
            fetched, mxs = data["fetched"], data["mx"]
            if data.get("v") != 1 or data.get("domain") != domain \
                    or not isinstance(fetched, int | float) or fetched > time.time() + 300 \
                    or not isinstance(mxs, list) \
                    or not all(isinstance(v, str) and "\n" not in v for v in
                               [data["id"], data["mode"], str(data["max_age"]), *mxs]) \
                    or not _ID.match(data["id"]) or not isinstance(data["max_age"], int):
                return None
            text = "\n".join(["version: STSv1", f"mode: {data['mode']}",
                              *(f"mx: {m}" for m in mxs), f"max_age: {data['max_age']}"])
            return parse_policy(domain, data["id"], text, float(fetched))
        except (OSError, ValueError, TypeError, KeyError, OverflowError):
            return None  # (OverflowError: a fetched of -10**400, no float)

    def _save(self, pol: StsPolicy) -> None:
        """Atomically (write, fsync, rename): a crash leaves the old file or the new."""
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self._path(pol.domain).with_suffix(".tmp")
            data = {"v": 1, **asdict(pol), "mx": list(pol.mx)}
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(pol.domain))
        except OSError as e:
            log.warning("MTA-STS: cannot cache the policy of %s: %s", pol.domain, e)


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__ if exc else "unknown"


__all__ = ["HttpsStsSource", "MemoryStsSource", "StsParseError", "StsPolicy", "StsSource",
           "parse_policy", "parse_txt"]
