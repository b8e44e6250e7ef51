"""One SMTP connection: the command loop, the mail transaction, AUTH, DATA into the spool.

Owns the SMTP dialogue of RFC 5321 (with RFC 1869/5321 EHLO, RFC 2920 PIPELINING,
RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 2034 ENHANCEDSTATUSCODES,
RFC 3207 STARTTLS, RFC 4954 AUTH, RFC 8314 implicit TLS, RFC 6409 submission).
Each command is `check` (may we?) then `proceed` (do it). Every reply comes from
replies.py and carries an enhanced status code.

Security decisions, in order of the dialogue:
- AUTH is offered and accepted only under TLS (RFC 4954 4, RFC 8314): passwords never
  cross the network in clear. No anonymous mechanism exists.
- On submission listeners MAIL needs AUTH first (RFC 6409 4.3: 530 5.7.0).
- RCPT goes through the relay policy; unauthenticated clients reach only local domains.
- STARTTLS forgets everything from before it (RFC 3207 4.2) and discards any plaintext
  pipelined behind it (CVE-2011-0411).
- A bare CR/LF closes the connection with 521 (anti-smuggling, RFC 5321 2.3.8); a NUL
  in the message is refused after the end of data (554 5.6.0).
Failure policy: transient trouble (spool, auth backend) gives 4xx; nothing a client sends
raises out of here: every path ends in a reply, a maillog line, or a close.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import TYPE_CHECKING

from authrelay import replies
from authrelay.address import Address, AddressError, PathArg, parse_path_arg
from authrelay.smtpd.bodyreader import BARE, LONG_LINE, NUL, TOO_BIG, BodyReader
from authrelay.smtpd.listener import BareLineEnding, Closed, Connection, LineTooLong, Timeout
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.submit import Refused
from authrelay.types import Reply

if TYPE_CHECKING:
    from authrelay.smtpd.admission import Ticket
    from authrelay.smtpd.server import Listener, SMTPServer

log = logging.getLogger(__name__)


class _Close(Exception):
    """End the session after the reply already queued."""


class Session:
    def __init__(self, server: SMTPServer, listener: Listener, conn: Connection,
                 ticket: Ticket) -> None:
        self.server = server
        # From admission (smtpd/admission.py): the current command timeout (shorter in
        # stress mode) and the throttle bound to this client's address.
        self.ticket = ticket
        self.cfg = server.cfg
        self.listener = listener
        self.conn = conn
        self.ip = conn.peer[0]
        if self.ip.startswith("::ffff:"):
            self.ip = self.ip[7:]
        self.port = conn.peer[1]
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.auth_user = ""
        self.trusted = server.policy.is_trusted(self.ip)
        self.rdns = ""
        self.errors = 0
        self.bad_rcpts = 0
        self.rcpt_throttled = False
        self.auth_failures = 0
        self.host_check: Reply | None | bool = False  # False: not done yet
        self.commands: dict[str, int] = {}  # per verb, for the disconnect line (as Postfix)
        self._reset()

    # ------------------------------------------------------------------ helpers
    def _reset(self) -> None:
        self.mail: PathArg | None = None
        self.rcpts: list[PathArg] = []
        self.body_8bit = False
        self.smtputf8 = False
        self.dsn_ret = ""  # RFC 3461 RET / ENVID of the transaction
        self.dsn_envid = ""

    def reply(self, r: Reply) -> None:
        self.conn.write(r.lines())

    def relay_desc(self) -> str:
        return f"{self.rdns or 'unknown'} [{self.ip}]"

    def _log_reject(self, r: Reply, what: str = "", qid: str | None = None, **extra: object
                    ) -> None:
        self.server.maillog.event(qid, reject=f"{r.code} {r.enhanced} {what}{r.text}".strip(),
                                  relay=self.relay_desc(), **extra)
        # Metrics by reason: the reply's enhanced code (low cardinality, no addresses).
        self.server.metrics_rejected(_REASONS.get(r, r.enhanced or str(r.code)))

    def _log_tls(self) -> None:
        """The maillog's TLS line (protocol, cipher), as Postfix logs one per session."""
        t = self.conn.transport
        self.server.maillog.tls_from(self.relay_desc(),
                                     t.get_extra_info("ssl_object") if t is not None else None)

    def _error(self, r: Reply) -> None:
        """A client error; too many of them end the session (a confused or hostile client)."""
        self.errors += 1
        self.reply(r)
        if self.errors >= self.cfg.limits.max_errors:
            self.reply(replies.TOO_MANY_ERRORS)
            self._log_reject(replies.TOO_MANY_ERRORS)
            raise _Close

    @property
    def protocol(self) -> str:
        """RFC 3848 WITH value."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        srv, lim = self.server, self.cfg.limits
        try:
            if self.listener.mode == "submissions":
                self.tls = True  # handshake done by the transport (server.py)
            try:
                srv.maillog.connect(self.relay_desc(), self.listener.name)
                if self.tls:  # implicit TLS (465): the handshake is done
                    self._log_tls()
                self.reply(Reply(220, "", f"{self.cfg.hostname} ESMTP authrelay"))
                while True:
                    limit = lim.max_line_length
                    try:
                        line = await self.conn.readline(limit, self.ticket.command_timeout)
                    except LineTooLong:
                        self._error(replies.LINE_TOO_LONG)
                        continue
                    await self.dispatch(line)
            finally:
                self.ticket.release()
        except _Close:
            pass
        except Timeout:
            self.reply(replies.TIMEOUT)
            self._log_reject(replies.TIMEOUT, stage="timeout")
        except BareLineEnding:
            self.reply(replies.BARE_LF)
            self._log_reject(replies.BARE_LF)
        except Closed:
            pass
        except asyncio.CancelledError:
            # Shutdown: say so politely if the socket is still there.
            self.reply(replies.SHUTTING_DOWN)
            self.conn.close()
            raise
        except Exception:  # never a traceback to the client; keep the server serving
            log.exception("session error from %s", self.ip)
            self.reply(replies.LOCAL_ERROR)
        finally:
            self.conn.close()
            srv.maillog.event(None, disconnect=f"from {self.relay_desc()}",
                              auth=self.auth_user or None,
                              commands=" ".join(f"{k}={v}" for k, v in self.commands.items())
                              or None)

    async def dispatch(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(Reply(500, "5.5.2", "Invalid UTF-8 in command"))
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        key = verb.lower() if handler is not None else "unknown"
        self.commands[key] = self.commands.get(key, 0) + 1
        if handler is None:
            if verb in ("EXPN", "TURN", "ETRN", "BDAT", "SEND", "SOML", "SAML"):
                self._error(replies.NOT_IMPLEMENTED)
            else:
                self._error(replies.UNRECOGNIZED)
            return
        await handler(self, arg)

    # ------------------------------------------------------------------ commands
    async def cmd_ehlo(self, arg: str) -> None:
        await self._hello(arg, esmtp=True)

    async def cmd_helo(self, arg: str) -> None:
        await self._hello(arg, esmtp=False)

    async def _hello(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name:
            self._error(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX)
            return
        self._reset()
        self.helo, self.esmtp = name[:255], esmtp
        host = self.cfg.hostname
        if not esmtp:
            self.reply(Reply(250, "", host))
            return
        lines = [f"{host} greets {self.helo}", "PIPELINING",
                 f"SIZE {self.cfg.limits.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "DSN"]
        if not self.tls:
            lines.append("STARTTLS")
        elif not self.auth_user and self.server.auth_available:
            # RFC 4954 4: mechanisms only where they may be used (after TLS).
            lines.append("AUTH " + " ".join(self.cfg.auth.mechanisms))
        lines.append("HELP")
        self.reply(Reply(250, "", "\n".join(lines)))

    async def cmd_noop(self, arg: str) -> None:
        self.reply(replies.NOOP)

    async def cmd_rset(self, arg: str) -> None:
        if arg.strip():
            self._error(replies.NO_PARAMS)
            return
        self._reset()
        self.reply(replies.RESET)

    async def cmd_quit(self, arg: str) -> None:
        self.reply(replies.bye(self.cfg.hostname))
        raise _Close

    async def cmd_vrfy(self, arg: str) -> None:
        if not arg.strip():
            self._error(replies.SYNTAX)
            return
        # RFC 5321 3.5.3: 252 -- no address harvesting, no false "unknown".
        self.reply(replies.VRFY)

    async def cmd_help(self, arg: str) -> None:
        self.reply(replies.HELP)

    async def cmd_starttls(self, arg: str) -> None:
        if arg.strip():
            self._error(replies.NO_PARAMS)
            return
        if self.tls:
            self._error(replies.ALREADY_TLS)
            return
        ctx = self.server.certs.context if self.server.certs else None
        if ctx is None:
            self.reply(replies.TLS_UNAVAILABLE)
            return
        self.reply(replies.START_TLS)
        # CVE-2011-0411: plaintext pipelined after STARTTLS must never be executed as if
        # it came through TLS. Drop it; only bytes from the TLS layer count from here.
        dropped = self.conn.discard_input()
        if dropped:
            self.server.maillog.event(None, warning=f"discarded {dropped} bytes pipelined "
                                      "after STARTTLS", relay=self.relay_desc())
        await self.conn.starttls(ctx, self.cfg.limits.tls_handshake_timeout)
        self.tls = True
        self._log_tls()
        # RFC 3207 4.2: forget everything learnt before TLS, EHLO included.
        self.helo, self.esmtp = None, False
        self._reset()

    async def cmd_auth(self, arg: str) -> None:
        from authrelay.auth.authenticator import AuthResult
        from authrelay.auth.sasl import SaslError, SaslExchange

        srv, lim = self.server, self.cfg.limits
        if self.helo is None:
            self._error(replies.NEED_HELO)
            return
        if not self.tls:
            self._error(replies.TLS_REQUIRED_FOR_AUTH)
            return
        if self.auth_user:
            self._error(replies.ALREADY_AUTH)
            return
        if self.mail is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(replies.SYNTAX)
            return
        mech = parts[0].upper()
        if mech not in self.cfg.auth.mechanisms or not srv.auth_available:
            self._error(Reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        try:
            ex = SaslExchange(mech, parts[1] if len(parts) > 1 else None)
            while not ex.done:
                challenge = ex.challenge or b""
                self.reply(Reply(334, "", base64.b64encode(challenge).decode()))
                try:
                    line = await self.conn.readline(lim.max_auth_line_length,
                                                    self.ticket.command_timeout)
                except LineTooLong:
                    self._error(replies.AUTH_LINE_TOO_LONG)
                    return
                ex.feed(line.decode("ascii", "replace"))
        except SaslError as e:
            r = Reply(e.code, e.enhanced, e.text)
            if e.code == 535:
                await self._auth_failed(r, "")
            else:
                # Every AUTH failure is logged (with why, never the payload) and counted.
                srv.maillog.auth_failed(self.relay_desc(), r, mech, None, e.reason)
                srv.metrics_auth("malformed")
                self._error(r)
            return
        except (binascii.Error, UnicodeError):
            r = Reply(501, "5.5.2", "Cannot decode response")
            srv.maillog.auth_failed(self.relay_desc(), r, mech, None, "not decodable")
            srv.metrics_auth("malformed")
            self._error(r)
            return
        user = ex.username
        if await self.ticket.auth_locked(user):
            # Past the window limit: answer without even checking the password, so a
            # brute-forcer learns nothing and costs us no hashing.
            await asyncio.sleep(self.cfg.auth.failure_delay)
            self.reply(replies.AUTH_LOCKED)
            self._log_reject(replies.AUTH_LOCKED, "", sasl_method=mech, sasl_username=user)
            srv.metrics_auth("locked")
            self.auth_failures += 1
            if self.auth_failures >= lim.max_auth_failures:
                self.reply(replies.TOO_MANY_AUTH_FAILURES)
                raise _Close
            return
        try:
            result = await asyncio.wait_for(srv.authenticator.verify(user, ex.password),
                                            self.cfg.auth.backend_timeout + 5)
        except Exception:
            log.exception("auth backend failure")
            result = AuthResult.TEMPFAIL
        if result is AuthResult.OK:
            self.auth_user = user
            await self.ticket.auth_succeeded(user)
            self.reply(replies.AUTH_OK)
            srv.maillog.event(None, auth="ok", sasl_method=mech, sasl_username=user,
                              relay=self.relay_desc())
            srv.metrics_auth("ok")
        elif result is AuthResult.TEMPFAIL:
            self.reply(replies.AUTH_TEMPFAIL)
            self._log_reject(replies.AUTH_TEMPFAIL, "", sasl_method=mech, sasl_username=user)
            srv.metrics_auth("tempfail")
        else:
            await self._auth_failed(replies.AUTH_FAILED, user, mech)

    async def _auth_failed(self, r: Reply, user: str, mech: str = "") -> None:
        srv = self.server
        await self.ticket.auth_failed(user)
        srv.metrics_auth("fail")
        self.auth_failures += 1
        # Same delay for unknown users and wrong passwords (no user enumeration), and
        # it slows a brute-forcer down.
        await asyncio.sleep(self.cfg.auth.failure_delay)
        self.reply(r)
        # fail2ban-friendly: IP and username on the line.
        srv.maillog.event(None, reject=f"{r.code} {r.enhanced} authentication failed",
                          relay=self.relay_desc(), sasl_method=mech or None,
                          sasl_username=user or None)
        if self.auth_failures >= self.cfg.limits.max_auth_failures:
            self.reply(replies.TOO_MANY_AUTH_FAILURES)
            self._log_reject(replies.TOO_MANY_AUTH_FAILURES)
            raise _Close

    async def cmd_mail(self, arg: str) -> None:
        if self.helo is None:
            self._error(replies.NEED_HELO)
            return
        if self.mail is not None:
            self._error(replies.NESTED_MAIL)
            return
        if self.listener.mode != "smtp" and not self.auth_user and not self.trusted:
            self._error(replies.AUTH_REQUIRED)
            self._log_reject(replies.AUTH_REQUIRED, stage="MAIL")
            return
        if arg[:5].upper() != "FROM:":
            self._error(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        try:
            path = parse_path_arg(arg[5:], allow_null=True)
        except AddressError as e:
            self._error(e.reply)
            return
        p = path.params
        body_8bit, smtputf8 = False, False
        dsn_ret, dsn_envid = "", ""
        for key, value in p.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self._error(Reply(501, "5.5.4", "Bad SIZE parameter"))
                    return
                if int(value) > self.cfg.limits.max_message_size:
                    self.reply(replies.MSG_TOO_BIG)
                    self._log_reject(replies.MSG_TOO_BIG, f"<{path.text}>... ",
                                     size=int(value))
                    return
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(replies.BAD_BODY_PARAM)
                    return
                body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    self._error(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
                    return
                smtputf8 = True
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted; we do not trust a client-supplied identity
            elif key == "RET":  # RFC 3461 4.3
                if value is None or value.upper() not in ("FULL", "HDRS") or dsn_ret:
                    self._error(Reply(501, "5.5.4", "RET must be FULL or HDRS"))
                    return
                dsn_ret = value.upper()
            elif key == "ENVID":  # RFC 3461 4.4: xtext, at most 100 characters
                if value is None or not _xtext_ok(value, 100) or dsn_envid:
                    self._error(Reply(501, "5.5.4", "Bad ENVID parameter"))
                    return
                dsn_envid = value
            else:
                self._error(replies.UNKNOWN_PARAM)
                return
        if path.address is not None and not path.address.ascii and not smtputf8:
            self._error(replies.NEED_SMTPUTF8)
            return
        declared = int(p["SIZE"]) if p.get("SIZE") else 0
        if not self.server.submitter.space_ok(declared):
            # Postfix queue_minfree: refuse before the client sends anything (RFC 5321
            # 4.5.3.1.10 / RFC 3463 4.3.1), rather than 451 after the whole DATA.
            self.reply(replies.NO_STORAGE)
            self._log_reject(replies.NO_STORAGE, f"<{path.text}>... ", stage="MAIL")
            return
        if self.auth_user:
            owned = self.server.authenticator.addresses(self.auth_user) \
                if self.cfg.auth.sender_policy == "own" else ()
            if not self.server.policy.sender_allowed(path.address, self.auth_user, owned):
                self.reply(replies.SENDER_NOT_OWNED)
                self._log_reject(replies.SENDER_NOT_OWNED, f"<{path.text}>... ",
                                 sasl_username=self.auth_user)
                return
            if not await self.ticket.user_may_send(self.auth_user):
                self.reply(replies.USER_RATE)
                self._log_reject(replies.USER_RATE, "", sasl_username=self.auth_user)
                return
        self.mail = path
        self.body_8bit, self.smtputf8 = body_8bit, smtputf8
        self.dsn_ret, self.dsn_envid = dsn_ret, dsn_envid
        self.reply(replies.SENDER_OK)

    async def cmd_rcpt(self, arg: str) -> None:
        lim = self.cfg.limits
        if lim.bad_rcpt_throttle and self.bad_rcpts >= lim.bad_rcpt_throttle:
            # sendmail confBAD_RCPT_THROTTLE: past N refused recipients every further RCPT
            # waits a second (answers to what came before go out first), logged once.
            if not self.rcpt_throttled:
                self.rcpt_throttled = True
                self.server.maillog.event(None, warning="possible SMTP RCPT flood, "
                                          "throttling", relay=self.relay_desc(),
                                          bad_rcpts=self.bad_rcpts)
            self.conn.flush()
            await asyncio.sleep(1.0)
        if self.mail is None:
            self._error(replies.NEED_MAIL)
            return
        if arg[:3].upper() != "TO:":
            self._error(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        try:
            path = parse_path_arg(arg[3:], allow_null=False)
        except AddressError as e:
            self._error(e.reply)
            await self._bad_rcpt()
            return
        for key, value in path.params.items():
            if key == "NOTIFY":  # RFC 3461 4.1
                words = {w.upper() for w in (value or "").split(",")}
                if not value or not words <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or \
                        ("NEVER" in words and len(words) > 1):
                    self._error(Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of "
                                      "SUCCESS, FAILURE, DELAY"))
                    return
            elif key == "ORCPT":  # RFC 3461 4.2: addr-type ";" xtext
                atype, semi, addr = (value or "").partition(";")
                if not semi or not atype or not _xtext_ok(addr, 500):
                    self._error(Reply(501, "5.5.4", "Bad ORCPT parameter"))
                    return
            else:
                self._error(replies.UNKNOWN_PARAM)
                return
        assert path.address is not None
        postmaster = path.address.domain == ""  # RCPT TO:<Postmaster> (RFC 5321 4.5.1)
        if postmaster:
            # The site's postmaster: at the first local domain, else at our own name.
            # Always accepted, from anyone, like mail to a local domain.
            domain = (self.cfg.relay.local_domains or (self.cfg.hostname,))[0]
            path = PathArg(Address("postmaster", domain), path.params)
        if not path.address.ascii and not self.smtputf8:
            self._error(replies.NEED_SMTPUTF8)
            return
        if len(self.rcpts) >= lim.max_recipients:
            self.reply(replies.TOO_MANY_RCPTS)
            self._log_reject(replies.TOO_MANY_RCPTS, f"<{path.text}>... ")
            return
        if self.auth_user and not await self.ticket.user_may_add_rcpt(
                self.auth_user, len(self.rcpts)):
            self.reply(replies.USER_RATE)
            self._log_reject(replies.USER_RATE, "", sasl_username=self.auth_user)
            return
        policy = self.server.policy
        if not postmaster and not policy.may_relay(
                path.address, authenticated=bool(self.auth_user), trusted=self.trusted):
            self.reply(replies.RELAY_DENIED)
            self._log_reject(replies.RELAY_DENIED, f"<{path.text}>... ",
                             **{"from": f"<{self.mail.text}>"})
            await self._bad_rcpt()
            return
        if not postmaster and not self.auth_user and not self.trusted and \
                self.server.checks is not None:
            # sendmail delay_checks: host checks only for clients that did not AUTH, so a
            # roaming user without reverse DNS can always authenticate and relay.
            if self.host_check is False:
                self.host_check = await self.server.checks.client_refusal(self)
            if isinstance(self.host_check, Reply):
                self.reply(self.host_check)
                self._log_reject(self.host_check, f"<{path.text}>... ")
                await self._bad_rcpt()
                return
        self.rcpts.append(path)
        self.reply(replies.RCPT_OK)

    async def _bad_rcpt(self) -> None:
        lim = self.cfg.limits
        self.bad_rcpts += 1
        if lim.bad_rcpt_limit and self.bad_rcpts >= lim.bad_rcpt_limit:
            self.reply(replies.TOO_MANY_BAD_RCPTS)
            self._log_reject(replies.TOO_MANY_BAD_RCPTS)
            raise _Close

    async def cmd_data(self, arg: str) -> None:
        if arg.strip():
            self._error(replies.NO_PARAMS)
            return
        if self.mail is None:
            self._error(replies.NEED_MAIL)
            return
        if not self.rcpts:
            self._error(replies.NEED_RCPT)
            return
        await self._receive_body()

    async def _receive_body(self) -> None:
        srv, lim = self.server, self.cfg.limits
        assert self.mail is not None
        env = Envelope(
            queue_id=new_queue_id(), sender=self.mail.text,
            recipients=[Recipient(r.text, notify=(r.params.get("NOTIFY") or "").upper(),
                                  orcpt=r.params.get("ORCPT") or "") for r in self.rcpts],
            ret=self.dsn_ret, envid=self.dsn_envid,
            client_ip=self.ip, client_port=self.port, client_rdns=self.rdns,
            helo=self.helo or "", auth_user=self.auth_user, protocol=self.protocol,
            listener=self.listener.name, body_8bit=self.body_8bit, smtputf8=self.smtputf8,
        )
        qid = env.queue_id
        # The one way into the spool (spool/submit.py): Received, Date/Message-ID, hop
        # count, the DKIM hook, fsync, the maillog from= line.
        draft = srv.submitter.begin(
            env, tls=self.conn.tls_info if self.tls else "", nul_checked=True,
            add_missing=bool(self.auth_user) or self.listener.mode != "smtp",
            sign=bool(self.auth_user) or self.trusted)
        self.reply(replies.START_DATA)
        reader = BodyReader(lim.max_message_size, lim.max_text_line_length)
        deadline = time.monotonic() + lim.data_final_timeout
        nrcpts = len(self.rcpts)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout
                chunk = await self.conn.read_chunk(min(lim.data_block_timeout, left))
                feed = reader.feed(chunk)
                if feed.error == BARE:
                    raise BareLineEnding
                if feed.error == NUL:
                    draft.mark_nul()  # refused at the end of data; stop storing now
                for seg in feed.segments:
                    draft.write(seg)  # never raises: problems are reported by commit()
                if feed.done:
                    self.conn.unread(feed.leftover)
                    break
            if reader.error == TOO_BIG:
                self.reply(replies.MSG_TOO_BIG)
                self._log_reject(replies.MSG_TOO_BIG, qid=qid, size=reader.wire_bytes)
                return
            if reader.error == LONG_LINE:
                self.reply(replies.TEXT_LINE_TOO_LONG)
                self._log_reject(replies.TEXT_LINE_TOO_LONG, qid=qid)
                return
            await draft.commit()  # fsync file + directory: durable before 250
        except Refused as e:
            self.reply(e.reply)
            self._log_reject(e.reply, qid=qid, **({"reason": e.reason}
                                                  if e.reason != e.reply.text else {}))
            return
        finally:
            draft.abort()  # no-op once committed
            self._reset()
        self.reply(replies.queued(qid))
        if self.auth_user:
            await self.ticket.user_sent(self.auth_user, nrcpts)
        srv.metrics_accepted(self.listener.mode)


def _xtext_ok(value: str, limit: int) -> bool:
    """RFC 3461 4: xtext is printable ASCII without "+" or "=" except "+XX" hex escapes."""
    if not value or len(value) > limit or not value.isascii():
        return False
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            if len(value) < i + 3 or not all(h in "0123456789ABCDEF" for h in value[i + 1:i + 3]):
                return False
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            return False
        i += 1
    return True


# Named reasons for the rejections an operator watches most; others go by enhanced code.
_REASONS = {
    replies.RELAY_DENIED: "relay_denied", replies.AUTH_REQUIRED: "auth_required",
    replies.MSG_TOO_BIG: "size", replies.TEXT_LINE_TOO_LONG: "line_length",
    replies.MSG_NUL: "nul", replies.TOO_MANY_HOPS: "hops", replies.NO_STORAGE: "storage",
    replies.BARE_LF: "bare_line_ending", replies.TIMEOUT: "timeout",
    replies.SENDER_NOT_OWNED: "sender_not_owned", replies.TOO_MANY_RCPTS: "too_many_rcpts",
    replies.AUTH_LOCKED: "auth_locked", replies.USER_RATE: "user_rate",
    replies.TOO_MANY_CONNECTIONS: "connections", replies.TOO_MANY_FROM_IP: "connections_ip",
    replies.RATE_LIMITED: "connection_rate", replies.NO_RDNS: "no_rdns",
}

_COMMANDS = {
    "EHLO": Session.cmd_ehlo, "HELO": Session.cmd_helo, "MAIL": Session.cmd_mail,
    "RCPT": Session.cmd_rcpt, "DATA": Session.cmd_data, "RSET": Session.cmd_rset,
    "NOOP": Session.cmd_noop, "QUIT": Session.cmd_quit, "VRFY": Session.cmd_vrfy,
    "HELP": Session.cmd_help, "STARTTLS": Session.cmd_starttls, "AUTH": Session.cmd_auth,
}
