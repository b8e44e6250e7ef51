"""A fake MX / smart host for tests: aiosmtpd on a loopback address, in its own thread.

Runs a real SMTP server on its own event loop (so both sync tests and async tests, and a
real authrelay process, can talk to it). Options:

- `starttls_context`: offer STARTTLS with this server context (trustme); `require_starttls`
- `implicit_tls_context`: TLS from the first byte (port-465 style)
- `users`: {"user": "password"}: AUTH PLAIN/LOGIN offered (after TLS) and required
  (`auth_required=False`: offered, not required); `auth_exclude`: mechanisms not to
  offer (e.g. ["PLAIN"] for a LOGIN-only server)
- `greeting`: e.g. "421 4.3.2 busy": sent instead of 220, then the connection is closed
- `mail_reply`, `data_reply`: a reply to give instead of 250
- `rcpt_replies`: {"address": "550 5.1.1 no such user"}: per-recipient refusals (bytes
  are sent as they are: octets that are not UTF-8, a broken or hostile server), read
  once per transaction (at MAIL): a test that changes them while the relay may be
  mid-transaction changes the next transaction, never half of this one
- `data_delay`: seconds to wait before answering the final dot (timeout tests)
- `data_fault`: recipient addresses (lower case) whose message makes the DATA hook fail:
  aiosmtpd then answers the final dot `500 Error: (RuntimeError) ...` and, unlike
  after a reply the hook gives, keeps the transaction (its MAIL stands until RSET):
  a server that refuses a message without clearing its transaction
- `data_gate`: a threading.Event; the final dot is answered only once it is set (a test
  holds a delivery in flight for as long as it needs, not for a guessed time);
  `gated`: how many final dots have waited at it (the message is out, its reply held)
- `size_limit`: the SIZE announced (and enforced); `smtputf8`: announce SMTPUTF8
- `pipelining`: announce PIPELINING (RFC 2920; aiosmtpd reads commands line by line, so
  it serves pipelined groups correctly; default on, as on most real MX)
- `max_rcpts`: recipients per transaction, then `452 4.5.3 Too many recipients`
- `eightbitmime=False`: a 7-bit server: no 8BITMIME in the EHLO reply, a BODY parameter
  refused with 555 (RFC 5321 4.1.1.11); pair with `smtputf8=False` (RFC 6531 needs it)
- `dsn`: announce DSN (RFC 3461): RET / ENVID on MAIL and NOTIFY / ORCPT on RCPT are
  accepted (aiosmtpd refuses every parameter it does not know) and recorded, as sent, in
  `dsn_params` (one "VERB PARAM=value" string each)
- `broken_starttls`: offer STARTTLS, answer 220, then answer the client's TLS hello with
  garbage and close (a broken TLS stack or middlebox: the handshake fails)
- `starttls_reply`: offer STARTTLS, answer it with this (e.g. "454 4.7.0 TLS not
  available"), the session goes on in plain text

Records, thread-safely readable after the client got its reply:
- `messages`: one `Received` per accepted DATA (envelope, options, raw content bytes as
  received after dot-unstuffing, TLS/AUTH state, which connection it came on)
- `connections`: the number of TCP connections accepted
- `wire`: per connection, every byte the client sent (plaintext, after TLS decryption):
  for "no bare CR or LF ever left the client" assertions
- `reads`: per connection, the chunks as each read returned them (pipelining shows as
  MAIL, RCPTs and DATA in one chunk)
- `starttls_attempts`: STARTTLS commands answered with 220
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from support.ports import common_free_port

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def bare_line_ends(data: bytes) -> list[int]:
    """Offsets of every bare CR or bare LF in `data` (empty: clean CRLF text)."""
    return [m.start() for m in _BARE.finditer(data)]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    content: bytes  # as aiosmtpd stores it: dot-unstuffed, CRLF line ends, no final dot
    helo: str
    tls: bool
    auth_user: str | None
    connection: int  # 1-based index of the connection it arrived on
    peer: Any = None


@dataclass
class _Conn:
    index: int
    wire: bytearray = field(default_factory=bytearray)
    reads: list[bytes] = field(default_factory=list)


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP plus a raw byte tap and an optional refusing greeting."""

    def __init__(self, fake: FakeSMTPServer, conn: _Conn, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._fake = fake
        self._conn = conn

    def data_received(self, data: bytes) -> None:
        if self._broken_tls:  # the client's TLS hello: answer with garbage, hang up
            assert self.transport is not None
            self.transport.write(b"this is not TLS\r\n" * 4)
            self.transport.close()
            return
        self._conn.wire += data
        self._conn.reads.append(bytes(data))
        super().data_received(data)

    _broken_tls = False

    def _take_dsn_params(self, verb: str, arg: str) -> str:
        """`arg` without its DSN parameters, recorded in the fake's `dsn_params`."""
        head, sep, params = arg.rpartition(">")
        kept: list[str] = []
        for p in params.split():
            if p.split("=", 1)[0].upper() in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                self._fake.dsn_params.append(f"{verb} {p}")
            else:
                kept.append(p)
        return head + sep + "".join(" " + p for p in kept)

    async def smtp_MAIL(self, arg: str) -> None:
        if self._fake.dsn and arg:
            arg = self._take_dsn_params("MAIL", arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if self._fake.dsn and arg:
            arg = self._take_dsn_params("RCPT", arg)
        await super().smtp_RCPT(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._fake.starttls_reply and not arg:
            await self.push(self._fake.starttls_reply)
            return
        if self._fake.broken_starttls and not arg:
            self._fake.starttls_attempts += 1
            await self.push("220 2.0.0 Ready to start TLS")
            self._broken_tls = True
            return
        if not arg and self.tls_context:
            self._fake.starttls_attempts += 1
        await super().smtp_STARTTLS(arg)

    async def _handle_client(self) -> None:
        if self._fake.greeting:
            await self.push(self._fake.greeting)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()


class _Handler:
    def __init__(self, fake: FakeSMTPServer) -> None:
        self.fake = fake
        # each session's transaction: the rcpt_replies as they were at its MAIL
        self._txn_replies: weakref.WeakKeyDictionary[Session, dict[str, str | bytes]] = \
            weakref.WeakKeyDictionary()

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.fake.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if self.fake.dsn:
            responses.insert(-1, "250-DSN")
        if not self.fake.eightbitmime:  # a 7-bit server (RFC 6152 not implemented)
            responses = [r for r in responses if r != "250-8BITMIME"]
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.fake.mail_reply:
            return self.fake.mail_reply
        if not self.fake.eightbitmime and any(o.upper().startswith("BODY=")
                                              for o in mail_options):
            return "555 5.5.4 BODY parameter not recognized"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self._txn_replies[session] = dict(self.fake.rcpt_replies)  # one copy: atomic
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str | bytes:
        reply = self._txn_replies.get(session, self.fake.rcpt_replies).get(address.lower())
        if reply:
            return reply
        if self.fake.max_rcpts and len(envelope.rcpt_tos) >= self.fake.max_rcpts:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.fake.data_delay:
            await asyncio.sleep(self.fake.data_delay)
        if self.fake.data_gate is not None and not self.fake.data_gate.is_set():
            self.fake.gated += 1
        while self.fake.data_gate is not None and not self.fake.data_gate.is_set():
            await asyncio.sleep(0.01)
        if self.fake.data_reply:
            return self.fake.data_reply
        if any(r.lower() in self.fake.data_fault for r in envelope.rcpt_tos):
            raise RuntimeError("data_fault")
        assert isinstance(server, _RecordingSMTP)
        login = session.auth_data
        self.fake.messages.append(Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            content=bytes(envelope.original_content or b""),
            helo=session.host_name or "",
            tls=session.ssl is not None,
            auth_user=login.login.decode() if isinstance(login, LoginPassword) else None,
            connection=server._conn.index,
            peer=session.peer,
        ))
        return f"250 2.0.0 Ok: queued as FAKE{len(self.fake.messages)}"


class FakeSMTPServer:
    handler_class: type[_Handler] = _Handler  # a subclass may add auth_MECH methods

    def __init__(self, host: str = "127.0.0.2", port: int = 0, *,
                 starttls_context: ssl.SSLContext | None = None,
                 require_starttls: bool = False,
                 implicit_tls_context: ssl.SSLContext | None = None,
                 users: dict[str, str] | None = None,
                 auth_required: bool = True,
                 auth_exclude: list[str] | None = None,
                 greeting: str | None = None,
                 mail_reply: str | None = None,
                 data_reply: str | None = None,
                 rcpt_replies: dict[str, str | bytes] | None = None,
                 data_delay: float = 0.0,
                 data_fault: set[str] | None = None,
                 data_gate: threading.Event | None = None,
                 size_limit: int = 33554432,
                 smtputf8: bool = True,
                 pipelining: bool = True,
                 broken_starttls: bool = False,
                 starttls_reply: str = "",
                 max_rcpts: int = 0,
                 eightbitmime: bool = True,
                 dsn: bool = False,
                 hostname: str = "fake.test") -> None:
        self.host, self.port = host, port
        self.starttls_context = starttls_context
        self.require_starttls = require_starttls
        self.implicit_tls_context = implicit_tls_context
        self.users = users
        self.auth_required = auth_required
        self.auth_exclude = ["CRAM-MD5", *(auth_exclude or [])]
        self.greeting = greeting
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_delay = data_delay
        self.data_fault = data_fault or set()
        self.data_gate = data_gate
        self.gated = 0  # final dots that waited at data_gate
        self.size_limit = size_limit
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.broken_starttls = broken_starttls
        self.starttls_reply = starttls_reply
        self.max_rcpts = max_rcpts
        self.eightbitmime = eightbitmime
        self.dsn = dsn
        self.dsn_params: list[str] = []
        self.starttls_attempts = 0
        self.hostname = hostname
        self.messages: list[Received] = []
        self._conns: list[_Conn] = []
        self.auth_attempts: list[tuple[str, bool]] = []  # (user, ok): never the password
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._protocols: list[_RecordingSMTP] = []
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- records
    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def wire(self) -> list[bytes]:
        return [bytes(c.wire) for c in self._conns]

    @property
    def reads(self) -> list[list[bytes]]:
        return [list(c.reads) for c in self._conns]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -------------------------------------------------------------- auth
    def _authenticator(self, server: SMTP, session: Session, envelope: Envelope,
                       mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword) or self.users is None:
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        ok = self.users.get(user) == auth_data.password.decode("utf-8", "replace")
        self.auth_attempts.append((user, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    # -------------------------------------------------------------- lifecycle
    def _factory(self) -> _RecordingSMTP:
        conn = _Conn(len(self._conns) + 1)
        self._conns.append(conn)
        auth = self.users is not None
        with warnings.catch_warnings():
            # "AUTH without TLS" warning: on implicit TLS the whole link is TLS.
            warnings.simplefilter("ignore", UserWarning)
            proto = self._make_protocol(conn, auth)
        self._protocols.append(proto)
        return proto

    def _make_protocol(self, conn: _Conn, auth: bool) -> _RecordingSMTP:
        return _RecordingSMTP(
            self, conn, self.handler_class(self),
            data_size_limit=self.size_limit,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            hostname=self.hostname,
            tls_context=self.starttls_context or (
                _dummy_tls_context() if self.broken_starttls else None),
            require_starttls=self.require_starttls,
            authenticator=self._authenticator if auth else None,
            auth_required=auth and self.auth_required,
            # aiosmtpd only counts STARTTLS as TLS; on implicit TLS the link is TLS anyway.
            auth_require_tls=auth and self.implicit_tls_context is None,
            auth_exclude_mechanism=self.auth_exclude if auth else None,
            timeout=30,
        )

    def start(self) -> FakeSMTPServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(loop.create_server(
                    self._factory, self.host, self.port, ssl=self.implicit_tls_context))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 - reported to start()
                error.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True,
                                        name=f"fakesmtp-{self.host}")
        self._thread.start()
        ready.wait(10)
        if error:
            self._thread.join()
            loop.close()
            raise error[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for p in self._protocols:
                if p.transport is not None:
                    p.transport.close()
            await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
            loop.close()
            self._loop = None

    def __enter__(self) -> FakeSMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dummy_tls_context() -> ssl.SSLContext:
    """A context only so aiosmtpd offers STARTTLS; `broken_starttls` never uses it."""
    return ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)


class MXFactory:
    """Callable: start a FakeSMTPServer on `host`; every server it makes shares one port
    (`[delivery] port` is one number for all MX), `self.port` once the first started."""

    def __init__(self) -> None:
        self.port = 0
        self.servers: list[FakeSMTPServer] = []

    def __call__(self, host: str = "127.0.0.2", **opts: Any) -> FakeSMTPServer:
        if not self.port:
            # All MX share one port: pick one free on every test address now, so a later
            # MX does not find it taken by another test run on the same machine.
            self.port = common_free_port()
        srv = FakeSMTPServer(host, self.port, **opts).start()
        self.port = srv.port
        self.servers.append(srv)
        return srv

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()
