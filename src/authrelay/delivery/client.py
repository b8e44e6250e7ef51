"""Courier: the outbound SMTP client (RFC 5321) on aiosmtplib, one call per delivery.

Owns: picking the hosts (MX via `mx.resolve`, or `[relay] smart_host` in order), the
session with each (EHLO, STARTTLS policy, smart-host AUTH, SIZE / 8BITMIME / SMTPUTF8 /
DSN parameters), per-recipient results, and an idle-connection cache so several messages
to one host share a connection (RSET between messages).

Contract (docs/INTERFACES.md): `await Courier(cfg).deliver(env, rcpts, message, offset)`
returns one `DeliveryResult` per recipient address and never raises for network, TLS or
DNS trouble. All `rcpts` share one route key (`router.route_key`).

Failure policy (codes per RFC 3463):
- 2xx: sent. 5xx from the peer: permanent. 4xx: transient.
- No connection (refused, unreachable) 4.4.1; timeout or lost connection 4.4.2;
  DNS trouble 4.4.3, NXDOMAIN 5.1.2, null MX 5.1.10 (see mx.py).
- Connection failure, or a 4xx/5xx greeting/EHLO, or 4xx at MAIL: the next host is
  tried (RFC 5321 5.1); the last host's reason becomes everyone's result.
- TLS required but not offered: 4.7.4 (security feature not supported); TLS handshake or
  STARTTLS failure: 4.7.5 (cryptographic failure). Both transient: next host, then retry.
  With `[delivery] tls = "may"` (RFC 7435 opportunistic) STARTTLS is used whenever offered,
  unverified; plain text only when the server did not offer it.
- Smart host AUTH rejected, or no PLAIN/LOGIN: transient 454 4.7.0 (an admin problem;
  the mail is kept). The password is read from `smart_host_password_file` per connection
  and never logged.
- Message larger than the peer's SIZE: permanent 552 5.3.4 (RFC 1870).
- UTF-8 address but the peer lacks SMTPUTF8: permanent 553 5.6.7 (RFC 6531 3.5), for
  that recipient only (or all, for a UTF-8 sender). A message flagged SMTPUTF8 whose
  addresses are all ASCII goes to such a peer without the parameter (as Postfix does).
  BODY=8BITMIME is passed when the envelope says 8bit and the peer offers it.
- Smart host with `smart_host_tls = "none"` and a user: AUTH goes in plain text (the
  operator asked for it, e.g. over a tunnel); with "starttls" it is never sent before TLS.
- Lost connection after DATA was sent: transient for the accepted recipients and no
  other host is tried (the message may have arrived; at-least-once, never lost).

What goes out: every line end is CRLF (a bare CR or LF in the stored message becomes
CRLF: the outbound half of SMTP smuggling), then dot-stuffed here (large messages are
streamed from the spool file chunk by chunk).
RFC 5321 4.5.3.2 timeouts: `[delivery] connect_timeout` (connect + greeting),
`command_timeout` (EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET), `data_timeout` (DATA).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from authrelay.config import Config, parse_hostport
from authrelay.delivery import mx
from authrelay.delivery.router import SMARTHOST, route_key
from authrelay.dns import Resolver
from authrelay.spool.envelope import Envelope, Recipient
from authrelay.types import DeliveryResult

log = logging.getLogger(__name__)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")
_BAD_EOL = re.compile(rb"\r\n|\r|\n")
_NORMALIZE_OFFLOAD = 1 << 20  # bigger messages are streamed from the spool file
_STREAM_CHUNK = 256 * 1024


# --------------------------------------------------------------------------- helpers

def normalize_crlf(data: bytes) -> bytes:
    """Every line end CRLF; a bare CR or LF becomes CRLF; ends with CRLF.

    The spool already stores CRLF text, so the common case is a fast count-only check
    (C speed, no copy); only a message with stray CR/LF is rewritten."""
    crlf = data.count(b"\r\n")
    if not (data.count(b"\r") == crlf == data.count(b"\n")):
        data = _BAD_EOL.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency plus the end marker, for CRLF-only text.

    bytes.replace runs in C; aiosmtplib's data() re-normalises line ends and stuffs with two
    regex substitutions, which cost ~2 ms per 100 KB in profiles.
    """
    out = data.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    return out + b".\r\n"


@dataclass(frozen=True)
class _FileBody:
    """A large queued message, streamed from the spool file instead of read into memory."""

    path: Path
    offset: int
    size: int

    def __len__(self) -> int:  # what SIZE= and the peer's size limit are checked against
        return self.size


async def _stream_file(proto: Any, body: _FileBody) -> None:
    """Normalise line ends and dot-stuff chunk by chunk, with flow control, so a 20 MB
    message costs a few MB of memory, not several copies of itself."""
    drain = getattr(proto, "_drain_helper", None)  # asyncio FlowControlMixin (aiosmtplib)
    at_line_start, carry_cr = True, False
    with open(body.path, "rb") as f:
        f.seek(body.offset)
        while True:
            chunk = await asyncio.to_thread(f.read, _STREAM_CHUNK)
            if not chunk:
                break
            if carry_cr:
                chunk, carry_cr = b"\r" + chunk, False
            if chunk.endswith(b"\r"):  # maybe half of a CRLF: decide with the next chunk
                chunk, carry_cr = chunk[:-1], True
            crlf = chunk.count(b"\r\n")
            if not (chunk.count(b"\r") == crlf == chunk.count(b"\n")):
                chunk = _BAD_EOL.sub(b"\r\n", chunk)
            out = chunk.replace(b"\r\n.", b"\r\n..")
            if at_line_start and out.startswith(b"."):
                out = b"." + out
            if out:
                at_line_start = out.endswith(b"\r\n")
                proto.write(out)
                if drain is not None:
                    await drain()
    tail = b"\r\n" if carry_cr or not at_line_start else b""
    proto.write(tail + b".\r\n")


async def _send_data(smtp: aiosmtplib.SMTP, data: bytes | _FileBody, timeout: float) -> Any:
    """DATA, then the message normalised (normalize_crlf) and stuffed here."""
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        raise SMTPDataError(start.code, start.message)
    proto = smtp.protocol
    if proto is None:
        raise SMTPServerDisconnected("connection lost")
    # The connection is checked out to this delivery alone: nothing else writes on it.
    if isinstance(data, _FileBody):
        await asyncio.wait_for(_stream_file(proto, data), timeout)
    else:
        proto.write(dot_stuff(data))
    resp = await proto.read_response(timeout=timeout)
    if resp.code != 250:
        raise SMTPDataError(resp.code, resp.message)
    return resp


def _read_message(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


def reply_result(code: int, message: str, remote: str) -> DeliveryResult:
    """A peer's reply as a DeliveryResult; a missing enhanced code gets X.0.0."""
    text = " ".join(message.split("\n")).strip()
    m = _ENHANCED.match(text)
    if m and m.group(1) == str(code)[0]:
        enhanced, text = text[:m.end()].strip(), text[m.end():]
    else:
        enhanced = f"{str(code)[0]}.0.0" if 200 <= code < 600 else "4.0.0"
    if 200 <= code < 300:
        return DeliveryResult.sent(code, enhanced, text, remote)
    if code >= 500:
        return DeliveryResult.perm(text, enhanced, code, remote)
    if code < 400:  # a 1xx/3xx where a final reply was due: protocol trouble, retry
        return DeliveryResult.temp(f"unexpected reply {code} {text}", "4.5.0", 451, remote)
    return DeliveryResult.temp(text, enhanced, code, remote)


def _is_ascii(s: str) -> bool:
    return s.isascii()


_FRESH = 2.0  # seconds a checked-in connection is trusted without an RSET probe


class _TryNext(Exception):
    """This host failed before any recipient was settled: try the next one."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(str(result))
        self.result = result


@dataclass
class _Target:
    host: str  # MX or smart host name: pool key, SNI, the "host" in remote
    addr: str  # what is connected to: an IP for MX, the configured name for a smart host
    port: int
    mode: str  # "mx" | "starttls" | "tls" | "none"


@dataclass(eq=False)
class _Conn:
    smtp: aiosmtplib.SMTP
    key: tuple[str, int]
    remote: str
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    idle_since: float = 0.0
    reused: bool = False


# --------------------------------------------------------------------------- courier

class Courier:
    """Delivers one message to a set of recipients that share a route key."""

    def __init__(self, cfg: Config, resolver: Resolver | None = None) -> None:
        self.cfg = cfg
        d = cfg.delivery
        self.resolver = resolver or Resolver(list(d.nameservers), d.dns_timeout)
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # MX: opportunistic TLS does not authenticate the peer (RFC 7435), so a
        # self-signed MX still gets encryption instead of plain text.
        self._mx_ctx = ssl.create_default_context()
        if not d.tls_verify:
            self._mx_ctx.check_hostname = False
            self._mx_ctx.verify_mode = ssl.CERT_NONE
        # Smart host: it receives our credentials, so it is verified unless told not to.
        r = cfg.relay
        self._smart_ctx = ssl.create_default_context(cafile=r.smart_host_ca_file or None)
        if not r.smart_host_tls_verify:
            self._smart_ctx.check_hostname = False
            self._smart_ctx.verify_mode = ssl.CERT_NONE
        self.connections_opened = 0  # for metrics and tests

    # ----------------------------------------------------------------- public API

    async def deliver(self, env: Envelope, rcpts: list[Recipient], message: bytes | Path,
                      offset: int = 0) -> dict[str, DeliveryResult]:
        if not rcpts:
            return {}
        try:
            data = await self._load(message, offset)
        except OSError as e:
            res = DeliveryResult.temp(f"cannot read queued message: {e.strerror or e}",
                                      "4.3.0", 451)
            return {r.address: res for r in rcpts}

        key = route_key(self.cfg, rcpts[0].address)
        if key == SMARTHOST:
            targets = self._smart_targets()
        else:
            try:
                hops = await mx.resolve(self.resolver, key)
            except mx.RouteError as e:
                return {r.address: e.result for r in rcpts}
            targets = [_Target(h, ip, self.cfg.delivery.port, "mx") for h, ip in hops]

        last = DeliveryResult.temp("no host to deliver to", "4.4.0", 451)
        for t in targets:
            try:
                return await self._via(t, env, rcpts, data)
            except _TryNext as e:
                log.debug("%s: %s:%d failed, trying next: %s", env.queue_id, t.host, t.port,
                          e.result)
                last = e.result
        return {r.address: last for r in rcpts}

    async def close(self) -> None:
        """QUIT every idle connection; later deliveries still work (they reconnect)."""
        conns = [c for lst in self._idle.values() for c in lst]
        self._idle.clear()
        for c in conns:
            if c.timer:
                c.timer.cancel()
        await asyncio.gather(*(self._quit(c) for c in conns), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ----------------------------------------------------------------- targets

    def _smart_targets(self) -> list[_Target]:
        mode = self.cfg.relay.smart_host_tls
        out = []
        for i, hp in enumerate(self.cfg.relay.smart_host):
            default = 465 if mode == "tls" else 25
            host, port = parse_hostport(hp, f"relay.smart_host[{i}]", default_port=default)
            out.append(_Target(host, host, port, mode))
        return out

    async def _load(self, message: bytes | Path, offset: int) -> bytes | _FileBody:
        if isinstance(message, bytes | bytearray | memoryview):
            raw = bytes(memoryview(message)[offset:])
        else:
            path = Path(message)
            size = path.stat().st_size - offset
            if size > _NORMALIZE_OFFLOAD:
                return _FileBody(path, offset, size)  # streamed at DATA time
            raw = _read_message(path, offset)  # small: the page cache answers at once
        if len(raw) > _NORMALIZE_OFFLOAD:
            return await asyncio.to_thread(normalize_crlf, raw)
        return normalize_crlf(raw)

    # ----------------------------------------------------------------- one host

    async def _via(self, t: _Target, env: Envelope, rcpts: list[Recipient],
                   data: bytes | _FileBody) -> dict[str, DeliveryResult]:
        conn = await self._checkout(t)
        try:
            results, reusable = await self._transaction(conn, env, rcpts, data)
        except _TryNext:
            conn.smtp.close()
            if not conn.reused:
                raise
            # A cached connection the server had meanwhile dropped (idle timeout, 421):
            # one more try on a fresh connection before blaming the host.
            conn = await self._connect(t)
            try:
                results, reusable = await self._transaction(conn, env, rcpts, data)
            except BaseException:
                conn.smtp.close()
                raise
        except BaseException:
            conn.smtp.close()
            raise
        if reusable:
            self._checkin(conn)
        else:
            self._spawn(self._quit(conn))
        return results

    async def _checkout(self, t: _Target) -> _Conn:
        key = (t.host.lower(), t.port)
        lst = self._idle.get(key)
        while lst:
            conn = lst.pop()
            if conn.timer:
                conn.timer.cancel()
            if not conn.smtp.is_connected:
                continue
            conn.reused = True
            if time.monotonic() - conn.idle_since < _FRESH:
                # Just finished a transaction (RFC 5321 4.1.4: the server is ready for the
                # next MAIL): no RSET round trip. If it was dropped after all, _via retries
                # once on a new connection.
                return conn
            try:
                # After a longer idle spell an RSET proves the cached connection still works.
                resp = await conn.smtp.execute_command(
                    b"RSET", timeout=self.cfg.delivery.command_timeout)
                if resp.code == 250:
                    log.debug("reusing connection to %s", conn.remote)
                    return conn
            except (SMTPException, OSError):
                pass
            conn.smtp.close()
        return await self._connect(t)

    def _checkin(self, conn: _Conn) -> None:
        d = self.cfg.delivery
        total = sum(len(v) for v in self._idle.values())
        if (not conn.smtp.is_connected or d.idle_timeout <= 0
                or total >= d.max_idle_connections):
            self._spawn(self._quit(conn))
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = time.monotonic()
        conn.timer = loop.call_later(d.idle_timeout, self._expire, conn)
        self._idle.setdefault(conn.key, []).append(conn)

    def _expire(self, conn: _Conn) -> None:
        lst = self._idle.get(conn.key)
        if lst and conn in lst:
            lst.remove(conn)
            if not lst:
                del self._idle[conn.key]
            self._spawn(self._quit(conn))

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quit(self, conn: _Conn) -> None:
        try:
            if conn.smtp.is_connected:
                await asyncio.wait_for(conn.smtp.quit(), timeout=5)
        except (TimeoutError, SMTPException, OSError):
            pass
        finally:
            conn.smtp.close()

    # ----------------------------------------------------------------- session setup

    async def _connect(self, t: _Target) -> _Conn:
        d = self.cfg.delivery
        where = f"{t.host} [{t.addr}]:{t.port}" if t.host != t.addr else f"{t.addr}:{t.port}"
        smtp = aiosmtplib.SMTP(
            hostname=t.addr, port=t.port, local_hostname=self.cfg.hostname,
            timeout=d.command_timeout, use_tls=t.mode == "tls", start_tls=False,
            tls_context=self._smart_ctx if t.mode == "tls" else None,
        )
        self.connections_opened += 1
        try:
            await smtp.connect(timeout=d.connect_timeout)
        except SMTPConnectResponseError as e:  # greeting other than 220
            raise _TryNext(reply_result(e.code, e.message, where)) from None
        except SMTPConnectTimeoutError:
            raise _TryNext(DeliveryResult.temp(
                f"connect to {where}: timed out", "4.4.1", 451, where)) from None
        except SMTPConnectError as e:
            cause = e.__cause__
            if isinstance(cause, ssl.SSLError | ssl.CertificateError):
                raise _TryNext(DeliveryResult.temp(
                    f"TLS handshake with {where} failed: {_ssl_reason(cause)}",
                    "4.7.5", 451, where)) from None
            reason = _os_reason(cause) if cause else str(e)
            raise _TryNext(DeliveryResult.temp(
                f"connect to {where}: {reason}", "4.4.1", 451, where)) from None
        except (SMTPException, OSError) as e:
            raise _TryNext(DeliveryResult.temp(
                f"connect to {where}: {e}", "4.4.1", 451, where)) from None

        peer = smtp.get_transport_info("peername") or (t.addr, t.port)
        remote = f"{t.host} [{peer[0]}]:{peer[1]}"
        conn = _Conn(smtp, (t.host.lower(), t.port), remote)
        try:
            await self._hello(conn)
            await self._tls(conn, t)
            if t.mode != "mx" and self.cfg.relay.smart_host_user:
                await self._auth(conn)
        except _TryNext:
            self._spawn(self._quit(conn))
            raise
        except (TimeoutError, SMTPTimeoutError):
            smtp.close()
            raise _TryNext(DeliveryResult.temp(
                f"timeout talking to {remote}", "4.4.2", 451, remote)) from None
        except (SMTPServerDisconnected, OSError):
            smtp.close()
            raise _TryNext(DeliveryResult.temp(
                f"lost connection with {remote}", "4.4.2", 451, remote)) from None
        except BaseException:
            smtp.close()
            raise
        return conn

    async def _hello(self, conn: _Conn) -> None:
        timeout = self.cfg.delivery.command_timeout
        try:
            await conn.smtp.ehlo(timeout=timeout)
        except SMTPHeloError as e:
            if not conn.smtp.is_connected or e.code == 421:
                raise _TryNext(reply_result(e.code, e.message, conn.remote)) from None
            try:  # RFC 5321 3.2: fall back to HELO for an old server
                await conn.smtp.helo(timeout=timeout)
            except SMTPHeloError as e2:
                raise _TryNext(reply_result(e2.code, e2.message, conn.remote)) from None

    async def _tls(self, conn: _Conn, t: _Target) -> None:
        smtp = conn.smtp
        if t.mode in ("tls", "none"):
            return
        required = t.mode == "starttls" or self.cfg.delivery.tls == "encrypt"
        if not smtp.supports_extension("starttls"):
            if required:
                raise _TryNext(DeliveryResult.temp(
                    f"TLS is required, but was not offered by {conn.remote}",
                    "4.7.4", 451, conn.remote))
            return  # "may": the server did not offer it, plain text is allowed
        ctx = self._mx_ctx if t.mode == "mx" else self._smart_ctx
        try:
            await smtp.starttls(tls_context=ctx, server_hostname=t.host,
                                timeout=self.cfg.delivery.command_timeout)
        except SMTPResponseException as e:
            raise _TryNext(DeliveryResult.temp(
                f"STARTTLS refused by {conn.remote}: {e.code} {e.message}",
                "4.7.5", 451, conn.remote)) from None
        except (ssl.SSLError, ssl.CertificateError) as e:
            raise _TryNext(DeliveryResult.temp(
                f"TLS handshake with {conn.remote} failed: {_ssl_reason(e)}",
                "4.7.5", 451, conn.remote)) from None
        except (SMTPException, OSError) as e:
            cause = e.__cause__ or e.__context__
            why = _ssl_reason(cause) if isinstance(cause, ssl.SSLError) else str(e)
            raise _TryNext(DeliveryResult.temp(
                f"TLS handshake with {conn.remote} failed: {why}",
                "4.7.5", 451, conn.remote)) from None
        # RFC 3207 4.2: forget what was learnt before TLS and ask again.
        await self._hello(conn)

    def _password(self) -> str:
        path = self.cfg.relay.smart_host_password_file
        if not path:
            return ""
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")

    async def _auth(self, conn: _Conn) -> None:
        smtp, r = conn.smtp, self.cfg.relay
        try:
            password = await asyncio.to_thread(self._password)
        except OSError as e:
            raise _TryNext(DeliveryResult.temp(
                f"cannot read relay.smart_host_password_file: {e.strerror or e}",
                "4.7.0", 451, conn.remote)) from None
        methods = smtp.server_auth_methods
        timeout = self.cfg.delivery.command_timeout
        try:
            if "plain" in methods:
                await smtp.auth_plain(r.smart_host_user, password, timeout=timeout)
            elif "login" in methods:
                await smtp.auth_login(r.smart_host_user, password, timeout=timeout)
            else:
                raise _TryNext(DeliveryResult.temp(
                    f"smart host {conn.remote} offers neither AUTH PLAIN nor LOGIN",
                    "4.7.0", 454, conn.remote))
        except SMTPAuthenticationError as e:
            # The reply text is the server's; our credentials are never part of it.
            text = " ".join(e.message.split())
            raise _TryNext(DeliveryResult.temp(
                f"authentication failed at smart host {conn.remote} "
                f"(check relay.smart_host_user / smart_host_password_file): {e.code} {text}",
                "4.7.0", 454, conn.remote)) from None
        finally:
            del password

    # ----------------------------------------------------------------- transaction

    async def _transaction(self, conn: _Conn, env: Envelope, rcpts: list[Recipient],
                           data: bytes | _FileBody) -> tuple[dict[str, DeliveryResult], bool]:
        """One MAIL/RCPT/DATA exchange. Returns (results, connection reusable)."""
        smtp, remote = conn.smtp, conn.remote
        d = self.cfg.delivery
        ext = smtp.esmtp_extensions
        results: dict[str, DeliveryResult] = {}

        # RFC 1870: never send what the peer announced it will refuse.
        if "size" in ext:
            limit = _int(ext["size"])
            if limit and len(data) > limit:
                res = DeliveryResult.perm(
                    f"message size {len(data)} exceeds the size limit {limit} of {remote}",
                    "5.3.4", 552, remote)
                return {r.address: res for r in rcpts}, True

        # RFC 6531 3.5: a UTF-8 address cannot be downgraded; refuse it clearly.
        utf8_needed = env.smtputf8 or not _is_ascii(env.sender) or \
            any(not _is_ascii(r.address) for r in rcpts)
        use_utf8 = utf8_needed and "smtputf8" in ext
        send = list(rcpts)
        if utf8_needed and not use_utf8:
            def no_utf8(addr: str) -> DeliveryResult:
                return DeliveryResult.perm(
                    f"{remote} does not support SMTPUTF8, required for the internationalized "
                    f"address {addr}; the message cannot be delivered there",
                    "5.6.7", 553, remote)
            if not _is_ascii(env.sender):
                res = no_utf8(env.sender)
                return {r.address: res for r in rcpts}, True
            for r in rcpts:
                if not _is_ascii(r.address):
                    results[r.address] = no_utf8(r.address)
            send = [r for r in rcpts if _is_ascii(r.address)]
            if not send:
                return results, True

        mail_opts: list[str] = []
        if "size" in ext:
            mail_opts.append(f"SIZE={len(data)}")
        if env.body_8bit and "8bitmime" in ext:
            mail_opts.append("BODY=8BITMIME")
        if use_utf8:
            mail_opts.append("SMTPUTF8")
        dsn = "dsn" in ext
        if dsn and env.ret:
            mail_opts.append(f"RET={env.ret}")
        if dsn and env.envid:
            mail_opts.append(f"ENVID={env.envid}")
        enc = "utf-8" if use_utf8 else "ascii"

        accepted: list[Recipient] = []
        try:
            resp = await smtp.execute_command(
                b"MAIL", b"FROM:<" + env.sender.encode(enc) + b">",
                *(o.encode("ascii") for o in mail_opts), timeout=d.command_timeout)
            if resp.code != 250:
                res = reply_result(resp.code, resp.message, remote)
                if not res.permanent:
                    raise _TryNext(res)  # RFC 5321 5.1: another MX may take it
                results.update({r.address: res for r in send})
                return results, smtp.is_connected
            for i, r in enumerate(send):
                opts: list[str] = []
                if dsn and r.notify:
                    opts.append(f"NOTIFY={r.notify}")
                if dsn and r.orcpt:
                    opts.append(f"ORCPT={r.orcpt}")
                resp = await smtp.execute_command(
                    b"RCPT", b"TO:<" + r.address.encode(enc) + b">",
                    *(o.encode("ascii") for o in opts), timeout=d.command_timeout)
                if resp.code in (250, 251):
                    accepted.append(r)
                    continue
                results[r.address] = reply_result(resp.code, resp.message, remote)
                if resp.code == 421:  # service closing: nothing more on this connection
                    res = reply_result(resp.code, resp.message, remote)
                    for other in accepted + send[i + 1:]:
                        results[other.address] = res
                    return results, False
        except (TimeoutError, SMTPTimeoutError):
            raise _TryNext(DeliveryResult.temp(
                f"timeout talking to {remote} (MAIL/RCPT)", "4.4.2", 451, remote)) from None
        except (SMTPServerDisconnected, OSError):
            raise _TryNext(DeliveryResult.temp(
                f"lost connection with {remote} (MAIL/RCPT)", "4.4.2", 451, remote)) from None

        if not accepted:
            try:
                await smtp.execute_command(b"RSET", timeout=d.command_timeout)
            except (TimeoutError, SMTPException, OSError):
                return results, False
            return results, smtp.is_connected

        # DATA: the reply applies to every accepted recipient (RFC 5321 3.3).
        try:
            resp = await _send_data(smtp, data, d.data_timeout)
            res = reply_result(resp.code, resp.message, remote)
            reusable = smtp.is_connected
        except SMTPDataError as e:
            res = reply_result(e.code, e.message, remote)
            reusable = smtp.is_connected and e.code != 421
        except (TimeoutError, SMTPTimeoutError):
            res = DeliveryResult.temp(f"timeout after DATA to {remote}", "4.4.2", 451, remote)
            reusable = False
        except (SMTPServerDisconnected, SMTPException, OSError):
            res = DeliveryResult.temp(f"lost connection with {remote} during DATA",
                                      "4.4.2", 451, remote)
            reusable = False
        if res.ok and dsn:
            res = dataclasses.replace(res, dsn_passed=True)  # RFC 3461 5.2.2: they notify
        for r in accepted:
            results[r.address] = res
        return results, reusable


def _int(value: str) -> int:
    try:
        return int(value.split()[0]) if value.strip() else 0
    except ValueError:
        return 0


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__


def _ssl_reason(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    return str(exc) if exc else "unknown"


__all__ = ["Courier", "normalize_crlf", "reply_result"]
