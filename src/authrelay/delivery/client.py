"""Courier: the outbound SMTP client (RFC 5321), one call per delivery.

Owns: picking the hosts (MX via `mx.resolve`, or `[relay] smart_host` in order), the
session with each (EHLO, STARTTLS policy, smart-host AUTH, SIZE / 8BITMIME / SMTPUTF8 /
DSN parameters), per-recipient results, and an idle-connection cache so several messages
to one host share a connection (RSET between messages only after an idle spell or after a
refused one: a transaction that ended without a message, or a message refused at its dot;
a permanent refusal no 354 followed ends the session instead, its QUIT confirming it;
a cached connection whose first transaction gets a reply blaming the connection, a 503 or
any other refusal to MAIL, a 421 before the message or replies out of step, is dropped and
the message retried on a new one, once; a follow-up transaction on one connection, after
a 452, likewise goes on a new one, once per attempt, then its recipients are deferred).
The protocol is our own: `wire.py` (sans-I/O reply parser, command bytes) under
`connection.py` (an asyncio Protocol with flow control); no third-party SMTP client.

Contract (docs/INTERFACES.md): `await Courier(cfg, maillog=ml).deliver(env, rcpts, message,
offset)` returns one `DeliveryResult` per recipient address and never raises for network, TLS or
DNS trouble. All `rcpts` share one route key (`router.route_key`).

PIPELINING (RFC 2920): to a host that offers it, MAIL, every RCPT and DATA go out in one
write and the replies are read afterwards (one round trip instead of 2 + recipients);
the message follows the 354. Without it, one command per round trip.

Failure policy (codes per RFC 3463):
- Replies out of step are never a verdict (RFC 5321 4.1.1: one reply per command, in
  order): a reply already waiting when a command goes out (`wire.OutOfStep`, as Postfix's
  smtp_tls_block_early_mail_reply), a second reply with the end of data's after a
  refusal (which is the dot's is unknown: deferred 4.5.0, "may have been delivered";
  after a 2xx the 2xx stands, RFC 5321 4.1.1.4, the connection dropped with a maillog
  warning: a duplicate is worse than a dropped connection), a 354 to an RSET, a
  refusal of MAIL on a reused connection (without PIPELINING, a late second reply to the
  last dot reads the same), anything but 221 to the QUIT that ends a session whose
  permanent refusal no 354 followed (`Courier._settle`: a stray reply still on its way
  when a command went out shifts every reply after it; a 421 alone is the next hop
  closing, as a closed connection: the refusal stands): the connection is dropped,
  the message retried at once on a new one (once) or deferred, never bounced nor
  counted sent on another command's reply.
- 2xx to the end of data: sent (the only reply that delivers; any 2yz to MAIL or RCPT
  goes on, RFC 5321 4.2.1, as Postfix; a 2xx or 3xx that is not the reply a step wants,
  such as 250 to DATA or a greeting other than 220, is transient 4.5.0, never "sent").
  5xx from the peer: permanent. 4xx: transient.
- No connection (refused, unreachable) 4.4.1; timeout or lost connection 4.4.2;
  garbage instead of a reply 4.5.0; DNS trouble 4.4.3, NXDOMAIN 5.1.2, null MX 5.1.10;
  an MX host (or address literal) that is one of our own [[listen]] sockets: not
  connected to, nor any host after it (as Postfix truncates its MX list at itself); the
  best MX: 554 5.4.6 "mail for D loops back to myself", else the better hosts' result.
- Hosts are tried in order (RFC 5321 5.1). A host that fails as a whole (connection,
  greeting, EHLO, TLS, AUTH, a 4xx at MAIL) passes every recipient to the next host; a 4xx
  at RCPT, or a 4xx reply to DATA or to the message, passes just those recipients to the
  next host in the same attempt (as Postfix does: only the last host's soft errors are
  final). A recipient keeps the most specific reply it got: a 450 from the primary stays
  its result if the backup cannot be reached; so does a host-level failure of a host that
  answered (a 421 greeting, a 4xx to MAIL, a TLS failure): only when no host answered is
  the reason a connection failure (4.4.1), which is what the scheduler marks a
  destination dead on. Every failed host is written to the maillog
  (`ID: relay=HOST [IP]:PORT, status=host failed, reason=...`), also when a later host
  takes the mail.
- TLS per host by policy (tlspolicy.py, tlsplan.py: levels none/may/encrypt/verify/
  dane/dane-only, DANE, MTA-STS). The handshake never verifies; the certificate is judged
  right after it, before EHLO (peercert.py, dane.py), so every TLS connection gets one
  maillog line with its result (verified/trusted/untrusted/anonymous) and policy, and
  every result carries them (`DeliveryResult.tls`, `.tls_policy`).
- TLS required but not offered: 4.7.4; TLS handshake failure, or a certificate the policy
  does not accept (verify, DANE mismatch, MTA-STS enforce): 4.7.5. All transient, and the
  next host is tried. MTA-STS testing: logged, delivered anyway.
  `may` (RFC 7435 opportunistic): STARTTLS whenever offered, unauthenticated; a refused
  STARTTLS command continues in plain text (as if it had not been offered). After a failed
  STARTTLS *handshake* the host is tried in plain text for `tls_fallback_time` (next
  attempts; logged): only at level `may`, never for a smart host.
- Smart host AUTH rejected, or no PLAIN/LOGIN: transient 454 4.7.0 (an admin problem;
  the mail is kept). The password is read from `smart_host_password_file` per connection
  and never logged.
- `452` for too many recipients (RFC 5321 4.5.3.1.10, 4.5.3): the rest go in another
  transaction on the same connection at once, while each one makes progress. At most
  1000 recipients go in one transaction; more are sent the same way. At most
  `MAX_TRANSACTIONS` transactions (each one an upload of the message) in one delivery
  attempt, all hosts together: a next hop taking one recipient per transaction cannot
  have the message sent once per recipient. The rest are deferred 452 4.5.3 for the next
  attempt (not passed to another host), as Postfix's bounded delivery requests leave them.
- Message larger than the peer's SIZE: permanent 552 5.3.4 (RFC 1870).
- UTF-8 address but the peer lacks SMTPUTF8: an internationalised domain goes as its
  A-label (`bob@xn--bcher-kva.example`, the same mailbox, as Postfix converts it); a UTF-8
  local part is a permanent 553 5.6.7 (RFC 6531 3.5), for that recipient only (or all, for
  a UTF-8 sender). A message flagged SMTPUTF8 with UTF-8 in its own header section
  (RFC 6532: a display name, a raw Subject) is a permanent 553 5.6.7 for every
  recipient at such a peer (RFC 6531 3.4; Postfix: "SMTPUTF8 is required, but was not
  offered"), and so is one with UTF-8 in a MIME body part's or an attached message's
  header (downgrade.headers_8bit, as Postfix's cleanup flags it); one whose header
  sections are ASCII (UTF-8 in the content only, message/global's included) goes there
  without the parameter, as 8-bit or 7-bit mail.
  BODY=8BITMIME is passed when the message is 8bit (declared, or 8-bit octets received)
  and the peer offers it; to a peer without 8BITMIME an 8-bit message is converted to
  7-bit (downgrade.py: quoted-printable where the MIME structure allows, re-signed with
  DKIM when we had signed it) or, when it cannot be, refused permanently 554 5.6.3
  (RFC 6152 3, RFC 3463; 5.6.2 for 8-bit in a multipart/signed, whose signature no
  conversion may break). RFC 3461 RET/ENVID/NOTIFY/ORCPT when the peer offers DSN.
- Smart host with `smart_host_tls = "none"` and a user: AUTH goes in plain text (the
  operator asked for it, e.g. over a tunnel); at any other level (may included) it is
  never sent before TLS. An OAuth token (XOAUTH2, OAUTHBEARER) goes where a password
  would, at the level smart_host_tls names: the default (starttls, verified) sends it
  only to a host whose certificate verified; a level that does not verify is the
  operator's choice (a tunnel, a private network), warned about by check-config.
- Lost connection or timeout after the message was sent: transient for the accepted
  recipients and no other host is tried (it may have arrived; at-least-once, never lost);
  once the end-of-data dot went out, the reason says the retry may deliver it twice.

What goes out: every line end is CRLF (a bare CR or LF in the stored message becomes
CRLF: the outbound half of SMTP smuggling), then dot-stuffed here (messages over 1 MiB are
streamed from the spool file chunk by chunk, waiting whenever the socket buffer is full).
RFC 5321 4.5.3.2 timeouts: `[delivery] connect_timeout` (connect, TLS handshake, greeting),
`command_timeout` (each reply to EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET),
`data_timeout` (each socket-buffer wait while sending the message, and the final reply).
`attempt_timeout` bounds the whole attempt from its start (each wait above is cut short
by it, and the DNS and MTA-STS lookups: 4.4.3 when it cuts them; the wait for a smart
host's OAuth token: 4.4.2; no host is connected to, no transaction started, past it):
per-wait timeouts
alone let 1,000 RCPTs each answered just in time hold a delivery slot for days. The
recipients not done by then are deferred 4.4.2 ("the delivery attempt's time limit
... was reached"), the connection given up; those already answered keep their result
(a cut after the end-of-data dot is the usual "may be delivered twice" timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from authrelay import maillog as maillog_mod
from authrelay.address import orcpt_for_7bit
from authrelay.config import Config, SmartHostOAuth, parse_hostport
from authrelay.delivery import (
    bearer,
    dane,
    downgrade,
    mx,
    peercert,
    tlsplan,
    tlspolicy,
    tlsrpt,
    wire,
)
from authrelay.delivery.connection import (
    TIMER_SLACK,
    Connection,
    ConnectionLost,
    DeadlineExceeded,
    open_connection,
)
from authrelay.delivery.mtasts import HttpsStsSource, StsPolicy, StsSource
from authrelay.delivery.router import SMARTHOST, route_key
from authrelay.delivery.tlspolicy import HostPolicy
from authrelay.delivery.wire import ProtocolError, SMTPReply
from authrelay.dns import DnsError, Resolver
from authrelay.dotlines import MARK, find_mark
from authrelay.policy import containment
from authrelay.policy.ownership import a_label
from authrelay.spool.envelope import Envelope, Recipient
from authrelay.tls import handshake_cut
from authrelay.types import BeforeEnd, DeliveryResult, Taken

log = logging.getLogger(__name__)

# ASCII digits only (re.ASCII): str's \d takes "٣" too, and a next hop's "550 5.٣.1" made
# a status of it (the maillog's dsn=, a DSN's Status: field, internationalizing the DSN).
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+", re.ASCII)
_BAD_EOL = re.compile(rb"\r\n|\r|\n")
_NORMALIZE_OFFLOAD = 1 << 20  # bigger messages are streamed from the spool file
_STREAM_CHUNK = 256 * 1024
_FRESH = 2.0  # seconds a checked-in connection is trusted without an RSET probe
_QUIT_TIMEOUT = 5.0
# Transactions (MAIL ... end of data: an upload of the message each) one delivery attempt
# makes, all hosts together; more recipients wait for the next attempt (see the docstring).
MAX_TRANSACTIONS = 20
# Recipients per transaction: Postfix smtpd's default limit (RFC 5321 4.5.3.1.8 asks a
# server for 100 at least). Also the largest pipelined group whose replies a server that
# buffers them (as Postfix's smtpd does) sends at once: connection.MAX_QUEUED must hold it.
_MAX_RCPTS = 1000
_FALLBACK_MAX = 10000  # hosts remembered for the plain-text fallback (memory bound)

_LOST = (ConnectionLost, ConnectionError, OSError, ProtocolError)
# No reply to the end of data (RFC 5321 6.1, 4.5.3.2.6): the next hop may have the message
# (as Postfix's "while sending end of data -- message may be sent more than once").
_MAYBE_SENT = "; the message may have been delivered (the retry may deliver it twice)"
_MAYBE_TWICE = ": no reply to the end of data" + _MAYBE_SENT


# --------------------------------------------------------------------------- helpers

def normalize_crlf(data: bytes, lines_checked: bool = False) -> bytes:
    """Every line end CRLF; a bare CR or LF becomes CRLF; ends with CRLF.

    The spool already stores CRLF text, so the common case is a fast count-only check
    (C speed, no copy); only a message with stray CR/LF is rewritten. `lines_checked`:
    the receiving worker vouched that `data` holds no bare CR or LF
    (`Envelope.lines_checked`): the counts (~230 us per 100 KiB) are skipped."""
    if not lines_checked:
        crlf = data.count(b"\r\n")
        if not (data.count(b"\r") == crlf == data.count(b"\n")):
            data = _BAD_EOL.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency plus the end marker, for CRLF-only text
    (`bytes.replace` runs in C: no per-line Python work)."""
    # A body without a line-starting dot (dotlines.find_mark: by memchr) is not searched
    # again by the replace, whose search stops at every line end (~85 µs per 100 KiB).
    out = data.replace(MARK, b"\r\n..") if find_mark(data) >= 0 else data
    if out.startswith(b"."):
        out = b"." + out
    return out + b".\r\n"


@dataclass(frozen=True)
class _FileBody:
    """A large queued message, streamed from the spool file instead of read into memory."""

    path: Path
    offset: int
    size: int
    lines_checked: bool = False  # Envelope.lines_checked: no bare CR or LF to look for

    def __len__(self) -> int:  # what SIZE= and the peer's size limit are checked against
        return self.size


async def _stream_file(wire_conn: Connection, body: _FileBody, timeout: float,
                       before_end: BeforeEnd | None) -> SMTPReply | None:
    """Normalise line ends and dot-stuff chunk by chunk, waiting for the socket buffer
    to drain after each chunk, so a 20 MB message costs a few hundred KB of memory.
    The end-of-data dot is sent (once `before_end` allows) unless the next hop refused
    the message before it (`_in_step`): then that refusal is returned."""
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
            if not body.lines_checked:
                crlf = chunk.count(b"\r\n")
                if not (chunk.count(b"\r") == crlf == chunk.count(b"\n")):
                    chunk = _BAD_EOL.sub(b"\r\n", chunk)
            out = chunk.replace(MARK, b"\r\n..") if find_mark(chunk) >= 0 else chunk
            if at_line_start and out.startswith(b"."):
                out = b"." + out
            if out:
                at_line_start = out.endswith(b"\r\n")
                wire_conn.write(out)
                await wire_conn.drain(timeout)
    tail = b"\r\n" if carry_cr or not at_line_start else b""
    if before_end is not None and (wait := before_end()) is not None:
        await wait
    early = _in_step(wire_conn)
    if early is None:
        wire_conn.write(tail + b".\r\n")
    return early


def _in_step(w: Connection) -> SMTPReply | None:
    """Before the end-of-data dot goes out: a reply received by then is none to it.
    A refusal (4xx, 5xx: a next hop that gave up on the message while it came, its size
    say) is returned: it stands, and the dot is not sent. Anything else (a next hop
    answering DATA twice, "354" then "250", or out of order) taken for the dot's reply
    would count a message delivered that the next hop may refuse: the next hop is out of
    step, a protocol error (the message not ended, so not sent)."""
    early = w.peek()
    if early is not None and early.code >= 400:
        return early
    if w.has_unread:
        raise ProtocolError(f"a reply came before the end of data was sent"
                            f"{f': {early}' if early is not None else ''}")
    return None


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
    if code < 400:  # a 3xx where a final reply was due: protocol trouble, retry
        return DeliveryResult.temp(f"unexpected reply {code} {text}", "4.5.0", 451, remote)
    return DeliveryResult.temp(text, enhanced, code, remote)



def ascii_address(addr: str) -> str:
    """`addr` as a next hop without SMTPUTF8 can take it: an internationalised domain as
    its A-label (`bob@bücher.example` -> `bob@xn--bcher-kva.example`, the same mailbox);
    "" when the local part is not ASCII (RFC 6531 3.5: no downgrade) or the domain has no
    A-label we trust (ownership.a_label: IDNA2003 would map it onto another name)."""
    if addr.isascii():
        return addr
    local, at, domain = addr.rpartition("@")
    if not at or not local.isascii():
        return ""
    ace = a_label(domain.lower())
    return f"{local}@{ace}" if ace else ""

def _result(rep: SMTPReply, remote: str) -> DeliveryResult:
    """The result of a reply that did not let the transaction go on (to the greeting,
    EHLO, MAIL, RCPT, DATA). Only the reply to the end of data delivers: a 2xx or 3xx
    here is not the reply that step wants (a 250 to DATA instead of 354, a 220 greeting
    answered by 250, replies out of step), so it is a transient protocol error, never
    "sent" for a message that did not go."""
    if rep.code < 400:
        return DeliveryResult.temp(f"unexpected reply {rep}", "4.5.0", 451, remote)
    return reply_result(rep.code, rep.text, remote)


def _rcpt_result(rep: SMTPReply, remote: str, sender: str, rcpt: str) -> DeliveryResult:
    """A refusal of RCPT `rcpt`, marked `recipient_refused` when it says the recipient is
    bad (policy/containment.refuses_recipient: what containment counts) and not that the
    envelope `sender` is (by the reply's words, or the address it names first)."""
    res = _result(rep, remote)
    text = " ".join(rep.text.split("\n")).strip()
    m = _ENHANCED.match(text)
    given = text[:m.end()].strip() if m and m.group(1) == str(rep.code)[0] else None
    rest = text[m.end():] if given and m else text
    if not containment.about_sender(rest, sender, rcpt) and \
            containment.refuses_recipient(rep.code, given):
        res = dataclasses.replace(res, recipient_refused=True)
    return res


class _Payload:
    """The message of one delivery, and its 7-bit form once a host without 8BITMIME
    needed it (converted once per delivery, in a thread, `downgrade.MAX_CONCURRENT` at
    once per courier)."""

    def __init__(self, data: bytes | _FileBody, env: Envelope, courier: Courier,
                 sent: dict[str, str] | None = None, before_end: BeforeEnd | None = None,
                 taken: Taken | None = None) -> None:
        self.data = data
        self.env = env
        self.courier = courier
        # The caller's record of who may have the message (Courier.deliver's `sent`).
        self.sent: dict[str, str] = {} if sent is None else sent
        self.before_end = before_end  # asked before each end-of-data dot (deliver)
        self.taken = taken  # told each transaction's 2xx results (deliver)
        self._8bit: bool | None = True if env.body_8bit else None
        self._utf8_header: bool | None = None
        self._seven: bytes | downgrade.Unconvertible | None = None
        self.transactions = 0  # started in this attempt (MAX_TRANSACTIONS)

    @property
    def spent(self) -> bool:
        """No transaction left for this attempt."""
        return self.transactions >= MAX_TRANSACTIONS

    async def eightbit(self) -> bool:
        """8-bit octets in the message: as recorded at submission, else looked for (a
        message queued before that was recorded, or a large streamed one whose 8-bit
        octets came after its envelope was written)."""
        if self._8bit is None:
            data = self.data
            self._8bit = downgrade.is_8bit(data) if isinstance(data, bytes) else \
                await asyncio.to_thread(_file_is_8bit, data)
        return self._8bit

    async def utf8_header(self, deadline: float | None) -> bool:
        """8-bit octets in a header section of the message: its own (downgrade.
        header_8bit, read until its empty line), else a MIME body part's or an attached
        message's (downgrade.headers_8bit, on the message in memory: under a conversion
        slot, as seven_bit, whose wait ends at `deadline`). Asked only of an 8-bit
        SMTPUTF8 message for a host without SMTPUTF8; read once."""
        if self._utf8_header is None:
            if not await self.eightbit():
                self._utf8_header = False
            else:
                data = self.data
                self._utf8_header = downgrade.header_8bit(
                    data[i:i + _STREAM_CHUNK] for i in range(0, len(data), _STREAM_CHUNK)
                ) if isinstance(data, bytes) else \
                    await asyncio.to_thread(_file_header_8bit, data)
                if not self._utf8_header:
                    async with self._conversion_slot(deadline):
                        self._utf8_header = await asyncio.to_thread(
                            lambda: downgrade.headers_8bit(self._raw()))
        return self._utf8_header

    @contextlib.asynccontextmanager
    async def _conversion_slot(self, deadline: float | None) -> AsyncIterator[None]:
        """One of the courier's conversion slots (downgrade.MAX_CONCURRENT: the memory a
        message in memory takes); the wait ends at `deadline` (DeadlineExceeded)."""
        slots = self.courier.conversions
        try:
            async with asyncio.timeout(None if deadline is None
                                       else max(0.0, deadline - time.monotonic())):
                await slots.acquire()
        except TimeoutError:
            raise DeadlineExceeded("the delivery attempt's time limit was reached") \
                from None
        try:
            yield
        finally:
            slots.release()

    def _raw(self) -> bytes:
        """The message as queued (our prepended header lines first), in memory."""
        data = self.data
        return data if isinstance(data, bytes) else \
            normalize_crlf(_read_message(data.path, data.offset))

    async def seven_bit(self, remote: str, deadline: float | None) -> bytes:
        """The 7-bit form. The wait for a conversion slot ends at `deadline` (the
        attempt's: DeadlineExceeded); a conversion begun runs to its end (a thread, bounded
        by downgrade.MAX_PARTS), so the slots bound the memory it takes."""
        if self._seven is None:
            async with self._conversion_slot(deadline):
                try:
                    self._seven = await asyncio.to_thread(self._convert)
                except downgrade.Unconvertible as e:
                    self._seven = e
            if isinstance(self._seven, bytes):
                self.courier.maillog.warning(
                    f"8-bit message converted to 7-bit (quoted-printable) for {remote}, "
                    "which does not offer 8BITMIME (RFC 6152)", queue_id=self.env.queue_id)
        if isinstance(self._seven, downgrade.Unconvertible):
            raise self._seven
        return self._seven

    def _convert(self) -> bytes:
        raw = self._raw()
        n = self.env.prepend_len  # our DKIM-Signature fields, made on the 8-bit form
        seven = downgrade.downgrade(raw[n:])
        if not n:
            return seven
        signer = self.courier.signer
        sig = signer(seven, self.env.queue_id) if signer is not None else None
        return (sig or b"") + seven


def _file_header_8bit(body: _FileBody) -> bool:
    with open(body.path, "rb") as f:
        f.seek(body.offset)
        return downgrade.header_8bit(iter(lambda: f.read(_STREAM_CHUNK), b""))


def _file_is_8bit(body: _FileBody) -> bool:
    with open(body.path, "rb") as f:
        f.seek(body.offset)
        while chunk := f.read(_STREAM_CHUNK):
            if not chunk.isascii():
                return True
    return False


class _TryNext(Exception):
    """This host failed before any recipient was settled: try the next one. The host
    did not answer when `result.unanswered` (no connection was made)."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(str(result))
        self.result = result


class _Stale(_TryNext):
    """A transaction on a reused connection (a cached one's first, or a follow-up on the
    same connection) got a reply that blames the connection, not the message (a 503 to
    MAIL: the next hop lost the connection's state, or we left it in a wrong one; a 421
    before the message; any other refusal of MAIL, which without PIPELINING may be a
    late second reply to the previous message's dot, read before MAIL's own; replies
    out of step: a positive one where another was due, a 250 to DATA, a 354 to the RSET
    after a refused MAIL or DATA, or a reply waiting before a command went out,
    `wire.OutOfStep`, as when a late second reply to the previous message's dot shifts
    them all by one or comes after the 354): the connection is dropped and the message
    tried at once on a new one (_via, once; a follow-up, _follow_up: once per attempt);
    only a refusal on a fresh connection counts (as Postfix blames a cached session's
    first failure on it). `result` (transient) stands when no new connection is tried:
    deferred, never bounced on a reply that may be another command's."""


# Replies to MAIL that mean "this connection" on a cached one (RFC 5321 4.2.4: 503 bad
# sequence of commands; 421: closing).
_CONNECTION_FAULTS = (421, 503)


@dataclass
class _Target:
    host: str  # MX or smart host name: pool key, SNI, the "host" in remote
    addr: str  # what is connected to: an IP for MX, the configured name for a smart host
    port: int
    mode: str  # "mx" | "smart" (STARTTLS per policy) | "tls" (smart host, implicit TLS)
    policy: HostPolicy = dataclasses.field(default_factory=lambda: HostPolicy("may", "may"))
    tls: str = ""  # the TLS result of the last connection used ("" before any)
    domain: str = ""  # the destination domain (MX routes; TLS-RPT)
    entry: str = ""  # a smart host: its [relay] smart_host entry, as written (its AUTH)
    deadline: float | None = None  # time.monotonic() end of the attempt (attempt_timeout)

    @property
    def where(self) -> str:
        return f"{self.host} [{self.addr}]:{self.port}" if self.host != self.addr \
            else f"{self.addr}:{self.port}"


@dataclass(eq=False)
class _Conn:
    wire: Connection
    key: tuple[str, int, str]  # host, port, policy key (tlspolicy.HostPolicy.key)
    remote: str
    tls: str = "none"  # verified | trusted | untrusted | anonymous | none
    ext: dict[str, str] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    idle_since: float = 0.0
    reused: bool = False


@dataclass
class _Outcome:
    """One host's answer for some recipients: final results, and who goes on."""

    results: dict[str, DeliveryResult]
    next_host: set[str]  # addresses whose (transient) result another host may improve
    reusable: bool


# --------------------------------------------------------------------------- courier

class Courier:
    """Delivers one message to a set of recipients that share a route key."""

    def __init__(self, cfg: Config, resolver: Resolver | None = None, *,
                 maillog: maillog_mod.MailLog,
                 signer: Callable[[bytes, str], bytes | None] | None = None,
                 tokens: Mapping[str, bearer.Tokens] | None = None) -> None:
        self.cfg = cfg
        # Re-signs a message converted for a host without 8BITMIME (downgrade.py): the
        # DKIM signer's `(message, queue_id) -> DKIM-Signature lines | None`.
        self.signer = signer
        self.conversions = asyncio.Semaphore(downgrade.MAX_CONCURRENT)
        d = cfg.delivery
        self.resolver = resolver or Resolver(list(d.nameservers), d.dns_timeout,
                                             dnssec=d.dnssec)
        self.maillog = maillog
        # This relay's own listeners: an MX host among them is a mail loop (mx.py).
        self._own = mx.listener_addresses((ln.host, ln.port) for ln in cfg.listen)
        self._idle: dict[tuple[str, int, str], list[_Conn]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Hosts whose STARTTLS handshake failed: (host, ip, port) -> plain text until then.
        self._plain_until: dict[tuple[str, str, int], float] = {}
        # MX: the handshake does not verify; peercert/dane judge the certificate after it
        # and the policy decides (a self-signed MX at level may still gets encryption,
        # RFC 7435, and the maillog says tls=untrusted).
        self._mx_ctx = ssl.create_default_context()
        self._mx_ctx.check_hostname = False
        self._mx_ctx.verify_mode = ssl.CERT_NONE
        self._cas = peercert.CaStore(d.tls_ca_file, with_system=True)
        # Smart host: it receives our credentials, so it is verified unless told not to
        # (level verify: OpenSSL checks chain and name during the handshake).
        r = cfg.relay
        self._smart_level, self._smart_implicit = tlspolicy.smart_host_level(cfg)
        self._smart_ctx = ssl.create_default_context(cafile=r.smart_host_ca_file or None)
        if self._smart_level != "verify":
            self._smart_ctx.check_hostname = False
            self._smart_ctx.verify_mode = ssl.CERT_NONE
        self._smart_cas = peercert.CaStore(r.smart_host_ca_file)
        # (entry, host, port, policy) of each [relay] smart_host, made at the first use
        self._smart_hosts: list[tuple[str, str, int, HostPolicy]] | None = None
        # MTA-STS policies (None: [delivery] mta_sts is off).
        self.sts: StsSource | None = HttpsStsSource(cfg, self.resolver) \
            if d.mta_sts else None
        # RFC 8460 tally of TLS sessions per destination ([delivery] tls_reports).
        self.tlsrpt: tlsrpt.Recorder | None = tlsrpt.Recorder(cfg) if d.tls_reports else None
        if self.tlsrpt is not None and isinstance(self.sts, HttpsStsSource):
            rec = self.tlsrpt
            self.sts.on_failure = lambda dom, kind: rec.session(
                dom, tlsrpt.PolicyDesc("sts"), False, kind)
        self.connections_opened = 0  # for metrics and tests
        # OAuth 2.0: each smart host entry authenticated with a token (its own
        # [[relay.smart_host_oauth]] table, or smart_host_auth = xoauth2 | oauthbearer)
        # -> its settings and token source; entries with the same settings share one
        # source (one token cache). Made by wiring.courier (delivery/oauth.py, whose
        # Authlib loads only then).
        self._oauth: dict[str, tuple[SmartHostOAuth, bearer.Tokens]] = {}
        for entry in r.smart_host:
            settings = r.oauth_for(entry)
            if settings is None:
                continue
            if tokens is None or entry not in tokens:
                raise ValueError(f"{settings.key('auth')} = {settings.auth!r} needs a token "
                                 f"source for {entry} (wiring.courier makes it)")
            self._oauth[entry] = (settings, tokens[entry])

    def tokens_for(self, entry: str) -> bearer.Tokens | None:
        """The token source of the smart_host entry `entry` (None: no OAuth for it)."""
        got = self._oauth.get(entry)
        return got[1] if got is not None else None

    @property
    def planner(self) -> tlsplan.Planner:
        return tlsplan.Planner(self.cfg, self.resolver, self.sts)

    # ----------------------------------------------------------------- public API

    async def deliver(self, env: Envelope, rcpts: list[Recipient], message: bytes | Path,
                      offset: int = 0, sent: dict[str, str] | None = None,
                      before_end: BeforeEnd | None = None, taken: Taken | None = None
                      ) -> dict[str, DeliveryResult]:
        """One result per recipient. `sent` (the caller's) is filled as the attempt goes:
        recipient -> next hop, once the end-of-data dot went out to a host that had
        accepted it, and not refused after; a caller that cancels the attempt (a stop at
        shutdown_timeout) knows from it whose message may have been delivered.
        `before_end()` is called just before each end-of-data dot (the next hop has the
        whole message only after it): an awaitable it returns is awaited first (the
        caller bounds it; the scheduler's: its in-flight journal's begin line).
        `taken(results)` is called once per transaction the next hop answered 2xx, with
        its recipients' results (those in an earlier transaction of an attempt cut later
        are known delivered)."""
        if not rcpts:
            return {}
        try:
            data = await self._load(message, offset, env.lines_checked)
        except OSError as e:
            res = DeliveryResult.temp(f"cannot read queued message: {e.strerror or e}",
                                      "4.3.0", 451)
            return {r.address: res for r in rcpts}

        at = self.cfg.delivery.attempt_timeout
        deadline = time.monotonic() + at if at > 0 else None
        key = route_key(self.cfg, rcpts[0].address)
        last = DeliveryResult.temp("no host to deliver to", "4.4.0", 451)
        # The lookups (MX, addresses, TLSA, MTA-STS) count against the attempt's time and
        # are cut at its end: a hostile MX RRset (thousands of hosts, each lookup up to
        # dns_timeout; mx_address_limit = 0) must not hold the slot past it. A lookup other
        # deliveries share goes on for them (dns.Resolver._query, mtasts: shielded).
        found: tuple[list[_Target], DeliveryResult | None] | dict[str, DeliveryResult]
        if key == SMARTHOST and not self.cfg.delivery.nameservers:
            # Nothing to look up (the system resolver is asked at connect time): no wait
            # for the time limit to cut, so no timer around it (~9 us a delivery, issue 22).
            found = self._smart_targets(), None
        else:
            cut = asyncio.timeout(None if deadline is None
                                  else max(0.0, deadline - time.monotonic()))
            try:
                async with cut:
                    found = await self._lookups(env, rcpts, key)
            except TimeoutError:
                if not cut.expired():
                    raise
                res = DeliveryResult.temp(
                    f"lookups for {'the smart host' if key == SMARTHOST else key} (DNS, "
                    f"MTA-STS) not finished: the delivery attempt's time limit ([delivery] "
                    f"attempt_timeout = {at:g}s) was reached; for the next attempt",
                    "4.4.3", 451)
                return {r.address: res for r in rcpts}
        if isinstance(found, dict):
            return found
        targets, failed = found
        last = failed or last
        # `last` is what the recipients no host settled get. A host that answered (a 421
        # greeting, a 4xx to EHLO, TLS or MAIL) keeps its failure over a later host's
        # connection failure (the backup refusing), as Postfix reports the most
        # informative reason: the scheduler marks a destination dead (4.4.1,
        # `unanswered`) only when no host answered in this attempt.
        answered = False
        if key == SMARTHOST:
            if self._smart_level != "verify":  # judged by peercert after the handshake
                await self._smart_cas.warm()
        else:
            await self._cas.warm()  # once per courier, off the event loop

        results: dict[str, DeliveryResult] = {}
        todo = list(rcpts)
        payload = _Payload(data, env, self, sent, before_end, taken)
        for i, t in enumerate(targets):
            t.deadline = deadline
            if _past(deadline):  # the rest keep the reply they got, else this reason
                last = self._deadline_result(t.where)
                break
            if t.mode == "mx" and mx.is_own_listener(self._own, t.addr, t.port):
                # RFC 5321 5.1 / RFC 3463 X.4.6: this MX is us. Hosts from here on are not
                # tried (as Postfix truncates its MX list at itself: a backup MX hands
                # the mail back); first in the list, the mail has nowhere to go: 5.4.6;
                # later, the better hosts' (temporary) failure stands.
                loop = DeliveryResult.perm(
                    f"mail for {t.domain} loops back to myself: {t.where} is this relay's "
                    "own listener", "5.4.6", 554, t.where)
                self._host_failed(env.queue_id, t, loop)
                if i == 0:
                    last = loop
                break
            if payload.spent:  # the rest keep the reply they got, for the next attempt
                break
            try:
                out = await self._via(t, env, todo, payload)
            except _TryNext as e:
                if not e.result.unanswered or not answered:
                    last, answered = _stamp(e.result, t), not e.result.unanswered
                self._host_failed(env.queue_id, t, e.result)
                continue
            results.update({a: _stamp(r, t) for a, r in out.results.items()})
            todo = [r for r in todo if r.address in out.next_host]
            if not todo:
                break
            if i + 1 < len(targets) and not payload.spent and not _past(deadline):
                # (past the deadline no next host is tried: they keep this host's reply)
                worst = out.results[todo[0].address]
                self.maillog.next_host(env.queue_id, worst.remote or t.where,
                                       ",".join(f"<{r.address}>" for r in todo), str(worst))
        for r in todo:  # settled by no host: the last answering host's failure, else
            # the last host-level reason
            results.setdefault(r.address, last)
        if self.tlsrpt is not None and self.tlsrpt.due():
            self._spawn(asyncio.to_thread(self.tlsrpt.write, self.tlsrpt.take()))
        return results

    async def _lookups(self, env: Envelope, rcpts: list[Recipient], key: str
                       ) -> tuple[list[_Target], DeliveryResult | None] | \
            dict[str, DeliveryResult]:
        """The hosts to try for `key` and the last host-level failure met finding them
        (None: none); or every recipient's result when there is no host to try."""
        last: DeliveryResult | None = None
        if key == SMARTHOST:  # (without nameservers deliver() takes them, no lookup)
            targets, unresolved = await self._resolve_smart(self._smart_targets())
            for t, res in unresolved:
                self._host_failed(env.queue_id, t, res)
                last = res
            return targets, last
        # Without DNSSEC no DANE can apply, so a default-level destination's MTA-STS
        # policy is asked for at once, beside the MX lookup (one round trip saved).
        prefetch: asyncio.Task[StsPolicy | None] | None = None
        if self.sts is not None and not self.cfg.delivery.dnssec \
                and not key.startswith("[") \
                and tlspolicy.for_domain(self.cfg, key).level == "dane":
            prefetch = asyncio.get_running_loop().create_task(self.sts.policy(key))
        try:
            try:
                route = await mx.resolve_route(self.resolver, key,
                                               limit=self.cfg.delivery.mx_address_limit)
            except mx.RouteError as e:
                if prefetch is not None:
                    await asyncio.gather(prefetch, return_exceptions=True)
                return {r.address: e.result for r in rcpts}
            for host, res in route.unresolved:  # not tried: said, as every failed host
                self.maillog.host_failed(env.queue_id, host, str(res))
            planner = self.planner if prefetch is None else \
                tlsplan.Planner(self.cfg, self.resolver, _Prefetched(prefetch))
            plan = await planner.plan(key, route)
        except asyncio.CancelledError:  # cut by attempt_timeout (or the delivery stopped)
            if prefetch is not None:
                prefetch.cancel()  # its fetch, shared, goes on for the others (mtasts)
            raise
        for host, res, rpt, kind in plan.failed:  # unusable by policy (DANE, MTA-STS)
            self.maillog.host_failed(env.queue_id, host, str(res))
            if self.tlsrpt is not None:
                self.tlsrpt.session(key, rpt, False, kind, host)
        for note in plan.notes:
            self.maillog.warning(note, queue_id=env.queue_id)
        if plan.failed:
            last = plan.failed[0][1]
        return [_Target(h, ip, self.cfg.delivery.port, "mx", hp, domain=key)
                for h, ip, hp in plan.hosts], last

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
        if self.tlsrpt is not None:
            await asyncio.to_thread(self.tlsrpt.write, self.tlsrpt.take())
        if isinstance(self.sts, HttpsStsSource):
            await self.sts.close()

    # ----------------------------------------------------------------- targets

    def _smart_targets(self) -> list[_Target]:
        if self._smart_hosts is None:  # parsed once (a regex per host per message)
            default = 465 if self._smart_implicit else 25
            self._smart_hosts = []
            for i, entry in enumerate(self.cfg.relay.smart_host):
                host, port = parse_hostport(entry, f"relay.smart_host[{i}]",
                                            default_port=default)
                level = self._smart_level
                if level == "may" and (self.cfg.relay.smart_host_user or entry in self._oauth):
                    level = "encrypt"  # credentials never go in plain text unless level none
                # (a HostPolicy is immutable: one per smart host serves every attempt)
                self._smart_hosts.append((entry, host, port,
                                          HostPolicy(level, level, (host,))))
        mode = "tls" if self._smart_implicit else "smart"
        # new targets each time: an attempt writes its TLS result on its own target
        return [_Target(host, host, port, mode, policy, entry=entry)
                for entry, host, port, policy in self._smart_hosts]

    async def _resolve_smart(self, targets: list[_Target]
                             ) -> tuple[list[_Target], list[tuple[_Target, DeliveryResult]]]:
        """With `[delivery] nameservers`, a smart host named by a name is resolved through
        them (as every MX is), one target per address, IPv6 first; without them the
        system resolver (getaddrinfo, /etc/hosts included) is asked at connect time. A
        name that does not resolve fails that smart host (4.4.3: the next one is tried,
        the mail waits)."""
        if not self.cfg.delivery.nameservers:
            return targets, []
        out: list[_Target] = []
        failed: list[tuple[_Target, DeliveryResult]] = []
        for t in targets:
            if _is_ip(t.host):
                out.append(t)
                continue
            try:
                addrs = await self.resolver.addresses(t.host)
            except DnsError as e:
                failed.append((t, DeliveryResult.temp(
                    f"cannot resolve the smart host {t.host}: {e}", "4.4.3", 451,
                    f"{t.host}:{t.port}")))
                continue
            out.extend(dataclasses.replace(t, addr=ip) for ip in mx.v6_first(addrs))
        return out, failed

    async def _load(self, message: bytes | Path, offset: int, lines_checked: bool = False
                    ) -> bytes | _FileBody:
        if type(message) is bytes and not offset:  # the spool's load: no copy of it
            raw = message
        elif isinstance(message, bytes | bytearray | memoryview):
            raw = bytes(memoryview(message)[offset:])
        else:
            path = Path(message)
            size = path.stat().st_size - offset
            if size > _NORMALIZE_OFFLOAD:
                return _FileBody(path, offset, size, lines_checked)  # streamed at DATA time
            raw = _read_message(path, offset)  # small: the page cache answers at once
        if len(raw) > _NORMALIZE_OFFLOAD and not lines_checked:
            return await asyncio.to_thread(normalize_crlf, raw)
        return normalize_crlf(raw, lines_checked)

    def _deadline_result(self, where: str) -> DeliveryResult:
        """What the recipients not done when the attempt's time is up get (4.4.2)."""
        return DeliveryResult.temp(
            f"not delivered in this attempt: the delivery attempt's time limit "
            f"([delivery] attempt_timeout = {self.cfg.delivery.attempt_timeout:g}s) was "
            f"reached (last host {where}); for the next attempt", "4.4.2", 451, where)

    def _host_failed(self, qid: str, t: _Target, res: DeliveryResult) -> None:
        """Postfix's `connect to host[ip]:25: Connection refused`: every failed host."""
        self.maillog.host_failed(qid, res.remote or t.where, str(res))

    # ----------------------------------------------------------------- TLS fallback

    def _may_fall_back(self, t: _Target) -> bool:
        """Opportunistic hosts only: level may, or MTA-STS testing (RFC 8461 5: a policy
        in testing mode must not stop delivery)."""
        p = t.policy
        return t.mode == "mx" and self.cfg.delivery.tls_fallback_time > 0 and \
            (p.level == "may" or (p.level == "mta-sts" and not p.enforce))

    def _plain_now(self, t: _Target) -> bool:
        k = (t.host.lower(), t.addr, t.port)
        until = self._plain_until.get(k)
        if until is None:
            return False
        if until <= time.monotonic() or not self._may_fall_back(t):
            del self._plain_until[k]
            return False
        return True

    # ----------------------------------------------------------------- one host

    async def _via(self, t: _Target, env: Envelope, rcpts: list[Recipient],
                   data: _Payload) -> _Outcome:
        conn = await self._checkout(t, env.queue_id)
        try:
            out = await self._transaction(conn, env, rcpts, data, reused=conn.reused)
        except _TryNext as e:
            conn.wire.abort()
            if not conn.reused:
                raise
            # A cached connection the server had meanwhile dropped (idle timeout, 421)
            # or that lost its state (_Stale): one more try on a fresh connection before
            # blaming the host or the message.
            conn, out = await self._renewed(conn, t, env, rcpts, data, e)
        except BaseException:
            conn.wire.abort()
            raise
        try:
            conn = await self._follow_up(conn, t, env, rcpts, data, out)
        except BaseException:
            conn.wire.abort()
            raise
        if out.reusable and conn.wire.is_connected:
            self._checkin(conn)
        else:
            self._spawn(self._quit(conn))
        return out

    async def _follow_up(self, conn: _Conn, t: _Target, env: Envelope,
                         rcpts: list[Recipient], data: _Payload, out: _Outcome) -> _Conn:
        """RFC 5321 4.5.3.1.10: recipients refused with 452 for too many recipients go in
        another transaction on the same connection (as Postfix does), for as long as
        each transaction gets some recipients through, within the attempt's
        MAX_TRANSACTIONS; past it they are deferred to the next attempt, not passed to
        another host. A follow-up whose replies blame the connection (_Stale: out of
        step, a refused MAIL) goes at once on a new connection to `t`, once per call
        (as a cached connection's first transaction, _via); the earlier transactions
        stand. Updates `out` in place; returns the connection it ended on."""
        batch = rcpts
        renewed = False  # a new connection was taken after a _Stale
        while True:
            more = [r for r in batch if _too_many(out.results.get(r.address))]
            if not more or len(more) == len(batch):
                return conn  # none left, or the host takes none: its 452 stands
            if _past(conn.wire.deadline):  # also when it cut the last transaction
                late = self._deadline_result(conn.remote)
                for r in more:
                    out.results[r.address] = late
                out.next_host -= {r.address for r in more}
                out.reusable = False  # given up, as at a deadline in a transaction
                return conn
            if not out.reusable or not conn.wire.is_connected:
                return conn  # the next host, if any, takes them
            if data.spent:
                later = DeliveryResult.temp(
                    f"not sent in this attempt: the message went in {data.transactions} "
                    f"transactions already, the most one attempt makes ({conn.remote} takes "
                    "few recipients per transaction); for the next attempt",
                    "4.5.3", 452, conn.remote)
                for r in more:
                    out.results[r.address] = later
                out.next_host -= {r.address for r in more}
                return conn
            try:
                try:
                    nxt = await self._transaction(conn, env, more, data, reused=True)
                except _Stale as e:
                    if renewed or data.spent:
                        raise
                    renewed = True
                    conn, nxt = await self._renewed(conn, t, env, more, data, e)
            except _TryNext as e:  # the earlier transactions stand; these go on
                for r in more:
                    out.results[r.address] = e.result
                out.reusable = False
                return conn
            out.results.update(nxt.results)
            out.next_host = (out.next_host - {r.address for r in more}) | nxt.next_host
            out.reusable = nxt.reusable
            batch = more

    async def _renewed(self, old: _Conn, t: _Target, env: Envelope, rcpts: list[Recipient],
                       data: _Payload, why: _TryNext) -> tuple[_Conn, _Outcome]:
        """`rcpts`' transaction on a new connection to `t`, `old` dropped for `why`: the
        connection and the outcome (its failure raises _TryNext, as _transaction)."""
        old.wire.abort()
        log.debug("%s: connection to %s failed, a new one: %s", env.queue_id, old.remote,
                  why.result.text)
        conn = await self._connect(t, env.queue_id)
        try:
            return conn, await self._transaction(conn, env, rcpts, data)
        except BaseException:
            conn.wire.abort()
            raise

    async def _checkout(self, t: _Target, qid: str) -> _Conn:
        key = (t.host.lower(), t.port, t.policy.key())
        lst = self._idle.get(key)
        while lst:
            conn = lst.pop()
            if not lst:
                self._idle.pop(key, None)
            if not conn.wire.is_connected:
                continue
            if conn.wire.has_unread:  # the server spoke while idle (a 421, say): drop it
                conn.wire.abort()
                continue
            conn.reused = True
            conn.wire.deadline = t.deadline
            t.tls = conn.tls
            if time.monotonic() - conn.idle_since < _FRESH:
                # Just finished a transaction (RFC 5321 4.1.4: the server is ready for the
                # next MAIL): no RSET round trip. If it was dropped after all, _via retries
                # once on a new connection.
                return conn
            try:
                # After a longer idle spell an RSET proves the cached connection still works.
                rep = await conn.wire.command(b"RSET\r\n", self.cfg.delivery.command_timeout)
                if rep.code == 250:
                    log.debug("reusing connection to %s", conn.remote)
                    return conn
            except (TimeoutError, *_LOST):
                pass
            conn.wire.abort()
        return await self._connect(t, qid)

    def _checkin(self, conn: _Conn) -> None:
        conn.wire.deadline = None  # the attempt is over; the next one sets its own
        d = self.cfg.delivery
        total = sum(len(v) for v in self._idle.values())
        if (not conn.wire.is_connected or d.idle_timeout <= 0
                or total >= d.max_idle_connections):
            self._spawn(self._quit(conn))
            return
        conn.idle_since = time.monotonic()
        if conn.timer is None:  # else the one armed at an earlier check-in looks first
            conn.timer = asyncio.get_running_loop().call_later(
                d.idle_timeout, self._expire, conn)
        self._idle.setdefault(conn.key, []).append(conn)

    def _expire(self, conn: _Conn) -> None:
        """A connection's idle timer, armed at a check-in and left armed while the
        connection is used again (not armed and cancelled per message, issue 22): QUIT
        when it has been idle `idle_timeout` since its last check-in; idle for less, the
        timer is armed again for the rest; in use (or dropped), its next check-in arms
        one."""
        conn.timer = None
        lst = self._idle.get(conn.key)
        if not lst or conn not in lst:
            return
        left = conn.idle_since + self.cfg.delivery.idle_timeout - time.monotonic()
        if left > TIMER_SLACK:
            conn.timer = asyncio.get_running_loop().call_later(left, self._expire, conn)
            return
        lst.remove(conn)
        if not lst:
            del self._idle[conn.key]
        self._spawn(self._quit(conn))

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quit(self, conn: _Conn) -> None:
        conn.wire.deadline = None  # QUIT (in the background) has its own 5 s
        try:
            if conn.wire.is_connected:
                await conn.wire.command(b"QUIT\r\n", _QUIT_TIMEOUT)
        except (TimeoutError, *_LOST):
            pass
        finally:
            conn.wire.close()

    # ----------------------------------------------------------------- session setup

    async def _connect(self, t: _Target, qid: str) -> _Conn:
        d = self.cfg.delivery
        where = t.where
        implicit = t.mode == "tls"
        if t.mode != "mx" and t.entry in self._oauth:
            # The token first (a cached valid one at once): a slow or failing token
            # endpoint (up to its 30 s deadline) holds no connection to the smart host.
            await self._oauth_token(t, where)
        connect_timeout = d.connect_timeout
        if t.deadline is not None:
            left = t.deadline - time.monotonic()
            if left <= 0:
                raise _TryNext(_no_answer(self._deadline_result(where)))
            connect_timeout = min(connect_timeout, left)
        self.connections_opened += 1
        try:
            w = await open_connection(
                t.addr, t.port, timeout=connect_timeout,
                ssl_context=self._smart_ctx if implicit else None,
                server_hostname=t.host if implicit else None)
        except TimeoutError:
            if _past(t.deadline):
                raise _TryNext(_no_answer(self._deadline_result(where))) from None
            raise _TryNext(_no_answer(DeliveryResult.temp(
                f"connect to {where}: timed out", "4.4.1", 451, where))) from None
        except (ssl.SSLError, ssl.CertificateError) as e:
            raise _TryNext(DeliveryResult.temp(
                f"TLS handshake with {where} failed: "
                f"{handshake_cut(e, 'server') or _ssl_reason(e)}", "4.7.5", 451,
                where)) from None
        except (ConnectionResetError, BrokenPipeError) as e:
            if not implicit:  # (no TCP connect is reset: the session's, if it ever is)
                raise _TryNext(_no_answer(DeliveryResult.temp(
                    f"connect to {where}: {_os_reason(e)}", "4.4.1", 451, where))) from None
            # Connected, then cut in the implicit-TLS handshake: the host answered.
            raise _TryNext(DeliveryResult.temp(
                f"TLS handshake with {where} failed: {handshake_cut(e, 'server')}",
                "4.7.5", 451, where)) from None
        except OSError as e:
            raise _TryNext(_no_answer(DeliveryResult.temp(
                f"connect to {where}: {_os_reason(e)}", "4.4.1", 451, where))) from None

        w.deadline = t.deadline
        peer = w.peername() or (t.addr, t.port)
        remote = f"{t.host} [{peer[0]}]:{peer[1]}"
        conn = _Conn(w, (t.host.lower(), t.port, t.policy.key()), remote)
        t.tls = "none"
        ct = d.command_timeout
        try:
            if implicit:
                self._judge(conn, t, qid)
            greeting = await w.reply(d.connect_timeout)
            if greeting.code != 220:
                raise _TryNext(_result(greeting, remote))
            await self._hello(conn, ct)
            await self._tls(conn, t, qid, ct)
            if t.mode != "mx":
                if t.entry in self._oauth:
                    await self._auth_oauth(conn, t, ct)
                elif self.cfg.relay.smart_host_user:
                    await self._auth(conn, ct)
        except _TryNext:
            self._spawn(self._quit(conn))
            raise
        except TimeoutError as e:
            w.abort()
            raise _TryNext(DeliveryResult.temp(
                _timed_out(e, f"timeout talking to {remote}"), "4.4.2", 451, remote)) from None
        except ProtocolError as e:
            w.abort()
            raise _TryNext(DeliveryResult.temp(
                f"protocol error from {remote}: {e}", "4.5.0", 451, remote)) from None
        except _LOST:
            w.abort()
            raise _TryNext(DeliveryResult.temp(
                f"lost connection with {remote}", "4.4.2", 451, remote)) from None
        except BaseException:
            w.abort()
            raise
        return conn

    async def _hello(self, conn: _Conn, timeout: float) -> None:
        w = conn.wire
        name = _helo_name(self.cfg.hostname)
        rep = await w.command(wire.command(b"EHLO", name), timeout)
        if rep.code == 250:
            conn.ext = wire.parse_ehlo(rep)
            return
        if rep.code == 421 or not w.is_connected:
            raise _TryNext(_result(rep, conn.remote))
        # RFC 5321 3.2: fall back to HELO for an old server
        rep = await w.command(wire.command(b"HELO", name), timeout)
        if rep.code != 250:
            raise _TryNext(_result(rep, conn.remote))
        conn.ext = {}

    async def _tls(self, conn: _Conn, t: _Target, qid: str, timeout: float) -> None:
        hp = t.policy
        if t.mode == "tls" or hp.level == "none":
            return  # implicit TLS is up already; none: never STARTTLS
        d = self.cfg.delivery
        required = hp.requires_tls
        if "starttls" not in conn.ext:
            if required or hp.level == "mta-sts" or hp.sts_unlisted:
                self._report(t, conn, False, "starttls-not-supported")
            if required:
                raise _TryNext(DeliveryResult.temp(
                    f"TLS is required (policy {hp.policy}), but was not offered by "
                    f"{conn.remote}", "4.7.4", 451, conn.remote))
            if hp.level == "mta-sts":  # testing mode: RFC 8461 5, deliver and report
                self.maillog.tls_policy_failed(qid, conn.remote, hp.policy,
                                               "STARTTLS not offered",
                                               "delivered anyway (MTA-STS testing)")
            return  # may: the server did not offer it, plain text is allowed
        if not required and self._plain_now(t):
            log.debug("%s: plain text to %s after a failed TLS handshake", qid, conn.remote)
            self.maillog.tls_not_used(qid, conn.remote, "the last STARTTLS handshake with "
                                                        f"this host failed (policy {hp.policy})")
            return
        rep = await conn.wire.command(b"STARTTLS\r\n", timeout)
        if rep.code != 220:
            if not required:  # RFC 3207 4: the client decides; "may" goes on in plain text
                # ...and says so: offered, then refused, is also what a STARTTLS-stripping
                # man in the middle looks like.
                self.maillog.tls_not_used(qid, conn.remote, f"STARTTLS refused: {rep}"[:300])
                return
            raise _TryNext(DeliveryResult.temp(
                f"STARTTLS refused by {conn.remote}: {rep}", "4.7.5", 451, conn.remote))
        ctx = self._mx_ctx if t.mode == "mx" else self._smart_ctx
        try:
            await conn.wire.start_tls(ctx, t.host if t.mode != "mx" else
                                      _sni(hp.sni or t.host),
                                      d.connect_timeout)
        except (ProtocolError, DeadlineExceeded):
            # bytes injected before the handshake (RFC 3207 5), or the attempt's end: not
            # a TLS failure (no plain-text fallback for it)
            raise
        except (ssl.SSLError, ssl.CertificateError, TimeoutError, *_LOST) as e:
            why = handshake_cut(e, "server") or (
                _ssl_reason(e) if isinstance(e, ssl.SSLError | ssl.CertificateError)
                else "timed out" if isinstance(e, TimeoutError) else "connection lost")
            res = DeliveryResult.temp(f"TLS handshake with {conn.remote} failed: {why}",
                                      "4.7.5", 451, conn.remote)
            self._report(t, conn, False, "validation-failure")
            if self._may_fall_back(t) and not required:
                now = time.monotonic()
                if len(self._plain_until) >= _FALLBACK_MAX:  # bounded: forget expired ones
                    for k in [k for k, u in self._plain_until.items() if u <= now]:
                        del self._plain_until[k]
                if len(self._plain_until) < _FALLBACK_MAX:
                    self._plain_until[(t.host.lower(), t.addr, t.port)] = \
                        now + d.tls_fallback_time
                self.maillog.tls_handshake_failed(
                    qid, conn.remote, why,
                    next="plain text for the next attempts to this host "
                         f"(policy {hp.policy})")
            raise _TryNext(res) from None
        self._judge(conn, t, qid)
        # RFC 3207 4.2: forget what was learnt before TLS and ask again.
        await self._hello(conn, timeout)

    def _report(self, t: _Target, conn: _Conn, ok: bool, kind: str = "") -> None:
        """One session for the TLS-RPT tally (MX routes only)."""
        if self.tlsrpt is None or not t.domain:
            return
        peer = conn.wire.peername()
        transport = conn.wire.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        self.tlsrpt.session(t.domain, t.policy.rpt, ok, kind, t.host,
                            str(peer[0]) if peer else t.addr, str(local[0]) if local else "")

    def _judge(self, conn: _Conn, t: _Target, qid: str) -> None:
        """The certificate against the host's policy, right after the handshake and before
        anything is sent over TLS: one maillog line; a policy failure raises _TryNext."""
        hp = t.policy
        transport = conn.wire.transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        chain = peercert.peer_chain(sslobj)
        if hp.level == "dane":
            check = dane.match(chain, hp.tlsa, hp.names)
        elif t.mode != "mx":
            check = peercert.Check("verified") if self._smart_level == "verify" and chain \
                else self._smart_cas.verify(chain, (t.host,))
        else:
            check = self._cas.verify(chain, hp.names or (t.host,))
        conn.tls = t.tls = check.result
        c = sslobj.cipher() if sslobj is not None else None
        self.maillog.tls_connection(
            qid, conn.remote, check.result, str(sslobj.version() if sslobj else "TLS"),
            c[0] if c else None, c[2] if c else None, hp.policy,
            reason=check.reason if not check.verified and check.reason else None)
        ok = not hp.authenticates or check.verified
        # RFC 8460 / 8461 5: an MX the testing policy does not list is a failure to report
        # (the reason testing mode exists), whatever its certificate.
        self._report(t, conn, ok and not hp.sts_unlisted,
                     "validation-failure" if hp.sts_unlisted else check.kind)
        if ok:
            return
        if hp.enforce:
            self.maillog.tls_policy_failed(qid, conn.remote, hp.policy, check.reason,
                                           "deferred")
            raise _TryNext(DeliveryResult.temp(
                f"TLS policy {hp.policy}: the certificate of {conn.remote} is not accepted: "
                f"{check.reason}", "4.7.5", 451, conn.remote))
        self.maillog.tls_policy_failed(qid, conn.remote, hp.policy, check.reason,
                                       "delivered anyway (MTA-STS testing)")

    # Set by serve when it drops privileges: the password file is read as root by the key
    # helper (docs/PRIVILEGES.md), so it may be 0600 root as Postfix's sasl_passwd is.
    read_password: Callable[[], str] | None = None

    def _password(self) -> str:
        path = self.cfg.relay.smart_host_password_file
        if not path:
            return ""
        if self.read_password is not None:
            return self.read_password()
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")

    async def _oauth_token(self, t: _Target, where: str) -> str:
        """The smart host's OAuth token (cached, or fetched now); none: 454 4.7.0 naming
        the cause, and the next smart host is tried. The wait is cut at the attempt's
        deadline (attempt_timeout; the fetch has its own min(30 s, connect_timeout), and
        may be asked for twice per smart host): 4.4.2 naming the limit. The fetch goes on
        for the other deliveries (oauth.TokenSource.get)."""
        cut = asyncio.timeout(None if t.deadline is None
                              else max(0.0, t.deadline - time.monotonic()))
        try:
            async with cut:
                return await self._oauth[t.entry][1].get()
        except TimeoutError:
            if not cut.expired():
                raise
            raise _TryNext(DeliveryResult.temp(
                f"no OAuth token for smart host {where}: the token endpoint had not "
                "answered when the delivery attempt's time limit ([delivery] "
                f"attempt_timeout = {self.cfg.delivery.attempt_timeout:g}s) was reached; "
                "for the next attempt", "4.4.2", 451, where)) from None
        except bearer.TokenError as e:
            raise _TryNext(DeliveryResult.temp(
                f"no OAuth token for smart host {where}: {e}", "4.7.0", 454,
                where)) from None

    async def _auth_oauth(self, conn: _Conn, t: _Target, timeout: float) -> None:
        """XOAUTH2 or OAUTHBEARER (RFC 7628) with a token from the smart host's token
        source. A refused token is dropped and a fresh one tried once on the same
        connection (RFC 4954 4 allows another AUTH after a failure); then the mail waits
        (454 4.7.0)."""
        settings, tokens = self._oauth[t.entry]
        mech = "XOAUTH2" if settings.auth == "xoauth2" else "OAUTHBEARER"
        w = conn.wire
        if mech not in wire.auth_methods(conn.ext):
            offered = " ".join(sorted(wire.auth_methods(conn.ext))) or "none"
            raise _TryNext(DeliveryResult.temp(
                f"smart host {conn.remote} does not offer AUTH {mech} (offers: {offered}; "
                f"check {settings.key('auth')})", "4.7.0", 454, conn.remote))
        rep = SMTPReply(535, ("no attempt",))
        detail = ""
        for attempt in (1, 2):
            # Fetched before connecting (_connect): cached then, unless refused just now
            # (the second attempt) or this is a cached connection.
            token = await self._oauth_token(t, conn.remote)
            resp = bearer.xoauth2(settings.user, token) if mech == "XOAUTH2" else \
                bearer.oauthbearer(settings.user, token, t.host, t.port)
            rep = await w.command(b"AUTH " + mech.encode() + b" " + resp + b"\r\n", timeout)
            secrets = (token, resp.decode("ascii"))
            del resp
            detail = ""
            if rep.code == 334:
                # The failure as a challenge (RFC 7628 3.2.2; Google's XOAUTH2 too): the
                # client answers ^A (OAUTHBEARER) or an empty line, the server then 5xx.
                detail = bearer.server_error(rep.text)
                rep = await w.command(b"AQ==\r\n" if mech == "OAUTHBEARER" else b"\r\n",
                                      timeout)
                if rep.code == 334:  # still a challenge: cancel (RFC 4954 4)
                    rep = await w.command(b"*\r\n", timeout)
                    if rep.code == 235:
                        rep = SMTPReply(535, ("unexpected extra challenge",))
            if rep.code == 235:
                return
            if attempt == 1 and 500 <= rep.code < 600 and rep.code != 504 \
                    and w.is_connected and tokens.drop(token):
                # Maybe revoked or expired early: a fresh token, once. The second one is
                # kept (it is fresh; the cause is elsewhere, e.g. a missing permission),
                # and for fail_hold seconds not replaced again (TokenSource.drop).
                continue
            break
        raise _TryNext(DeliveryResult.temp(
            f"smart host {conn.remote} refused the OAuth token for {settings.user} "
            f"(AUTH {mech}): {bearer.redact(str(rep), *secrets)}"
            + (f" [{bearer.redact(detail, *secrets)}]" if detail else ""),
            "4.7.0", 454, conn.remote))

    async def _auth(self, conn: _Conn, timeout: float) -> None:
        r = self.cfg.relay
        try:
            password = await asyncio.to_thread(self._password)
        except OSError as e:
            raise _TryNext(DeliveryResult.temp(
                f"cannot read relay.smart_host_password_file: {e.strerror or e}",
                "4.7.0", 451, conn.remote)) from None
        methods = wire.auth_methods(conn.ext)
        w = conn.wire
        # What a server could echo back into the reply we log: the password as is, and
        # as it went on the wire (LOGIN's base64, PLAIN's base64 blob).
        secrets = (password, wire.b64_line(password).decode("ascii").strip(),
                   wire.auth_plain(r.smart_host_user, password)[11:].decode("ascii").strip())
        try:
            if "PLAIN" in methods:
                rep = await w.command(wire.auth_plain(r.smart_host_user, password), timeout)
                if rep.code == 334:  # wanted the response on its own line after all
                    rep = await w.command(wire.auth_plain(r.smart_host_user, password)[11:],
                                          timeout)
            elif "LOGIN" in methods:
                rep = await w.command(b"AUTH LOGIN\r\n", timeout)
                if rep.code == 334:
                    rep = await w.command(wire.b64_line(r.smart_host_user), timeout)
                if rep.code == 334:
                    rep = await w.command(wire.b64_line(password), timeout)
            else:
                raise _TryNext(DeliveryResult.temp(
                    f"smart host {conn.remote} offers neither AUTH PLAIN nor LOGIN",
                    "4.7.0", 454, conn.remote))
        finally:
            del password
        if rep.code == 334:  # a further challenge we cannot answer: cancel (RFC 4954 4)
            rep = await w.command(b"*\r\n", timeout)
            if rep.code == 235:
                rep = SMTPReply(535, ("unexpected extra challenge",))
        if rep.code != 235:
            # The reply text is the server's: a hostile or broken one may echo what we
            # sent, so our credentials are cut out before it reaches the maillog.
            raise _TryNext(DeliveryResult.temp(
                f"authentication failed at smart host {conn.remote} "
                f"(check relay.smart_host_user / smart_host_password_file): "
                f"{bearer.redact(str(rep), *secrets)}",
                "4.7.0", 454, conn.remote))

    # ----------------------------------------------------------------- transaction

    async def _transaction(self, conn: _Conn, env: Envelope, rcpts: list[Recipient],
                           payload: _Payload, reused: bool = False) -> _Outcome:
        """One MAIL/RCPT/DATA exchange, pipelined when the host offers PIPELINING.
        `reused`: a transaction went on this connection before (a cached one's first, or
        a follow-up), so a reply that means the connection (a 503 or any refusal to
        MAIL, a 421 before the message, replies out of step) raises _Stale. Out of step
        anywhere (wire.OutOfStep: a reply waiting when a command goes out, or right
        after the end-of-data dot's) is never a verdict: delivered and bounced are taken
        only from replies read in step."""
        remote, w, ext = conn.remote, conn.wire, conn.ext
        payload.transactions += 1
        d = self.cfg.delivery
        ct = d.command_timeout
        results: dict[str, DeliveryResult] = {}
        eightbit = await payload.eightbit()

        # RFC 6531 3.4: an SMTPUTF8 message with UTF-8 in its header section (RFC 6532)
        # cannot go to a host without SMTPUTF8 (nothing downgrades a header; Postfix
        # bounces it too). One whose header is ASCII goes there as 8-bit or 7-bit mail
        # below, its internationalised domains as A-labels.
        if env.smtputf8 and "smtputf8" not in ext and await payload.utf8_header(w.deadline):
            res = DeliveryResult.perm(
                f"SMTPUTF8 is required, but was not offered by host {remote}: a header "
                "section of the message holds UTF-8 (RFC 6531 3.4)", "5.6.7", 553, remote)
            return _Outcome({r.address: res for r in rcpts}, set(), True)

        # RFC 6152: 8-bit content for a host without 8BITMIME is converted to 7-bit
        # (quoted-printable, re-signed), or bounced when it cannot be.
        data: bytes | _FileBody = payload.data
        if eightbit and "8bitmime" not in ext:
            try:
                data = await payload.seven_bit(remote, w.deadline)
            except DeadlineExceeded as e:  # no conversion slot within the attempt's time
                raise _TryNext(DeliveryResult.temp(
                    _timed_out(e, f"waiting to convert the message to 7-bit for {remote}, "
                                  "which does not offer 8BITMIME"), "4.4.2", 451,
                    remote)) from None
            except downgrade.Unconvertible as e:
                res = DeliveryResult.perm(
                    f"{remote} does not support 8BITMIME and the message cannot be "
                    f"converted to 7-bit: {e}", e.status, 554, remote)
                return _Outcome({r.address: res for r in rcpts}, set(), True)
            eightbit = False

        # RFC 1870: never send what the peer announced it will refuse.
        if "size" in ext:
            limit = _int(ext["size"])
            if limit and len(data) > limit:
                res = DeliveryResult.perm(
                    f"message size {len(data)} exceeds the size limit {limit} of {remote}",
                    "5.3.4", 552, remote)
                return _Outcome({r.address: res for r in rcpts}, set(), True)

        # RFC 6531 3.5: a UTF-8 local part cannot be downgraded; refuse it clearly. An
        # internationalised domain can: its A-label names the same domain (RFC 5890).
        utf8_needed = env.smtputf8 or not env.sender.isascii() or \
            any(not r.address.isascii() for r in rcpts)
        use_utf8 = utf8_needed and "smtputf8" in ext
        send = list(rcpts)
        sender = env.sender
        on_wire: dict[str, str] = {}  # recipient -> the ASCII form sent for it
        if utf8_needed and not use_utf8:
            def no_utf8(addr: str) -> DeliveryResult:
                return DeliveryResult.perm(
                    f"{remote} does not support SMTPUTF8, required for the internationalized "
                    f"address {addr}; the message cannot be delivered there",
                    "5.6.7", 553, remote)
            sender = ascii_address(env.sender)
            if not sender:
                res = no_utf8(env.sender)
                return _Outcome({r.address: res for r in rcpts}, set(), True)
            for r in rcpts:
                if a := ascii_address(r.address):
                    on_wire[r.address] = a
                else:
                    results[r.address] = no_utf8(r.address)
            send = [r for r in rcpts if r.address in on_wire]
            if not send:
                return _Outcome(results, set(), True)

        # At most _MAX_RCPTS recipients per transaction; the rest go in the next one on
        # this connection (_follow_up, as for a 452 "too many recipients").
        next_host: set[str] = set()
        if len(send) > _MAX_RCPTS:
            later = DeliveryResult.temp(
                f"not sent in this transaction (more than {_MAX_RCPTS} recipients): "
                "for the next one", "4.5.3", 452, remote)
            for r in send[_MAX_RCPTS:]:
                results[r.address] = later
                next_host.add(r.address)
            send = send[:_MAX_RCPTS]

        mail_opts: list[bytes] = []
        if "size" in ext:
            mail_opts.append(b"SIZE=%d" % len(data))
        if eightbit and "8bitmime" in ext:
            mail_opts.append(b"BODY=8BITMIME")
        if use_utf8:
            mail_opts.append(b"SMTPUTF8")
        dsn = "dsn" in ext
        if dsn and env.ret:
            mail_opts.append(b"RET=" + env.ret.encode("ascii"))
        if dsn and env.envid:
            mail_opts.append(b"ENVID=" + env.envid.encode("ascii"))
        enc = "utf-8" if use_utf8 else "ascii"
        lines = [wire.mail_from(sender.encode(enc), mail_opts)]
        for r in send:
            opts: list[bytes] = []
            if dsn and r.notify:
                opts.append(b"NOTIFY=" + r.notify.encode("ascii"))
            orcpt = r.orcpt if use_utf8 else orcpt_for_7bit(r.orcpt)
            if dsn and orcpt:
                # RFC 6533 3: a raw UTF-8 ORCPT only in an SMTPUTF8 transaction; without
                # it, its \x{HEX} form (left out when too long: it is optional).
                opts.append(b"ORCPT=" + orcpt.encode("utf-8"))
            lines.append(wire.rcpt_to(on_wire.get(r.address, r.address).encode(enc), opts))
        lines.append(b"DATA\r\n")
        pipelining = "pipelining" in ext

        accepted: list[Recipient] = []
        data_rep: SMTPReply | None = None
        refusal: SMTPReply | None = None  # the last permanent refusal read (RCPT's)
        try:
            if pipelining:
                w.send(b"".join(lines))  # RFC 2920 3.1: DATA ends the group
                unread = len(lines)
            else:
                w.send(lines[0])
                unread = 1
            rep = await w.reply(ct)
            unread -= 1
            if not rep.ok:  # any 2yz is positive completion (RFC 5321 4.2.1), as Postfix
                res = _result(rep, remote)
                if reused and (rep.code in _CONNECTION_FAULTS or rep.code < 400
                               or res.permanent):
                    # (< 400: out of step; a 5xx: maybe a late reply to the last dot)
                    raise _Stale(_stale(rep, remote))
                if not res.permanent:
                    raise _TryNext(res)  # RFC 5321 5.1: another host may take it
                results.update({r.address: res for r in send})
                if await self._skip(w, unread, ct):
                    await self._settle(rep, w, ct, remote)
                return _Outcome(results, set(), False)
            for i, r in enumerate(send):
                if not pipelining:
                    w.send(lines[1 + i])
                    unread += 1
                rep = await w.reply(ct)
                unread -= 1
                if rep.ok:  # 250, 251 (RFC 5321 4.3.2); any 2yz, as Postfix takes it
                    accepted.append(r)
                    continue
                if reused and rep.code < 400:  # a 354 here: out of step
                    raise _Stale(_stale(rep, remote))
                res = _rcpt_result(rep, remote, sender,
                                   on_wire.get(r.address, r.address))
                results[r.address] = res
                if res.permanent:
                    refusal = rep
                if not res.permanent:
                    next_host.add(r.address)
                if rep.code == 421:  # service closing: nothing more on this connection
                    if reused:
                        raise _Stale(_stale(rep, remote))
                    for other in accepted + send[i + 1:]:
                        results[other.address] = res
                        next_host.add(other.address)
                    return _Outcome(results, next_host, False)
            if pipelining:
                data_rep = await w.reply(ct)
            elif accepted:
                data_rep = await w.command(b"DATA\r\n", ct)
        except TimeoutError as e:
            raise _TryNext(DeliveryResult.temp(
                _timed_out(e, f"timeout talking to {remote} (MAIL/RCPT)"), "4.4.2", 451,
                remote)) from None
        except ProtocolError as e:  # what it sent is no reply (we cut it): said so
            raise _TryNext(DeliveryResult.temp(
                f"protocol error from {remote} (MAIL/RCPT): {e}", "4.5.0", 451,
                remote)) from None
        except _LOST:
            raise _TryNext(DeliveryResult.temp(
                f"lost connection with {remote} (MAIL/RCPT)", "4.4.2", 451, remote)) from None

        if not accepted:
            reusable = True
            if data_rep is not None and data_rep.code == 354:
                # RFC 2920 3.1: a server that says 354 with no valid recipient gets an
                # empty message, which it must then refuse.
                try:
                    w.write(b".\r\n")
                    await w.reply(d.data_timeout)
                except (TimeoutError, *_LOST):
                    reusable = False
            if refusal is not None:  # no 354 showed the replies in step: QUIT does
                if reusable:
                    await self._settle(refusal, w, ct, remote)
                return _Outcome(results, next_host, False)
            try:
                reusable = reusable and await self._reset(w, ct)
            except wire.OutOfStep as e:  # the refusals may be other commands' replies
                raise _Stale(_out_of_step(e, remote)) from None
            return _Outcome(results, next_host, reusable)

        assert data_rep is not None
        if data_rep.code != 354:
            if reused and (data_rep.code == 421 or data_rep.code < 400):
                raise _Stale(_stale(data_rep, remote))  # (< 400: a 250, out of step)
            res = _result(data_rep, remote)
            for r in accepted:
                results[r.address] = res
                if not res.permanent:
                    next_host.add(r.address)
            if res.permanent or refusal is not None:
                await self._settle(data_rep, w, ct, remote)
                return _Outcome(results, next_host, False)
            try:
                reusable = data_rep.code != 421 and \
                    await self._reset_after(data_rep, w, ct, reused, remote)
            except wire.OutOfStep as e:  # DATA's refusal may be another command's reply
                raise _Stale(_out_of_step(e, remote)) from None
            return _Outcome(results, next_host, reusable)

        # The message: the final reply applies to every accepted recipient (RFC 5321 3.3).
        moved = False
        ended = False  # the end-of-data dot went out: the peer may have taken the message
        try:
            if isinstance(data, _FileBody):
                early = await _stream_file(w, data, d.data_timeout, payload.before_end)
            else:
                if payload.before_end is not None and \
                        (wait := payload.before_end()) is not None:
                    await wait
                if (early := _in_step(w)) is None:
                    w.write(dot_stuff(data))
            ended = early is None
            if ended:
                payload.sent.update((r.address, remote) for r in accepted)
            rep = await w.reply(d.data_timeout)  # (the early refusal: read at once)
            stray = _after_dot(w, rep) if ended else None
            if stray is not None:  # the 2xx stands: the next hop has the message
                self.maillog.warning(
                    f"replies out of step: a second reply to the end of data, {stray}, "
                    f"after its {str(rep)[:200]}; the first stands (delivered), the "
                    "connection dropped", relay=remote, queue_id=env.queue_id)
                w.abort()
            res = reply_result(rep.code, rep.text, remote)  # the one reply that delivers
            # (a 421 already waiting after it: the next hop closing, not cached)
            reusable = rep.code != 421 and w.is_connected and ended and not w.has_unread
            if not ended:  # an early refusal: the message unended, nothing more on it
                w.abort()
            moved = not res.ok and not res.permanent  # refused for now: not taken
            if not res.ok:  # refused: this host does not have it
                for r in accepted:
                    payload.sent.pop(r.address, None)
        except TimeoutError as e:
            res = DeliveryResult.temp(_timed_out(e, f"timeout after DATA to {remote}")
                                      + (_MAYBE_TWICE if ended else ""), "4.4.2", 451, remote)
            reusable = False
        except ProtocolError as e:
            w.abort()  # out of step (or cut already): nothing more on it
            if reused and not ended:  # (a reply before the dot): the connection's fault
                raise _Stale(_out_of_step(e, remote)) from None
            res = DeliveryResult.temp(
                f"protocol error from {remote} during DATA: {e}" + (
                    "" if not ended else _MAYBE_SENT if isinstance(e, wire.OutOfStep)
                    else _MAYBE_TWICE), "4.5.0", 451, remote)
            reusable = False
        except _LOST:
            res = DeliveryResult.temp(f"lost connection with {remote} during DATA"
                                      + (_MAYBE_TWICE if ended else ""), "4.4.2", 451, remote)
            reusable = False
        if reusable and not res.ok:
            # RFC 5321 3.3 has the server clear its transaction whatever it answers the
            # dot, but one that refused the message may not have (an aiosmtpd whose DATA
            # hook failed keeps the MAIL): as Postfix, RSET before the connection serves
            # another message, whose MAIL would otherwise get 503 and bounce it.
            try:
                reusable = await self._reset(w, ct)
            except wire.OutOfStep as e:  # the refusal may have been another's reply
                res = DeliveryResult.temp(f"protocol error from {remote} during DATA: {e}"
                                          + _MAYBE_SENT, "4.5.0", 451, remote)
                moved, reusable = False, False
                payload.sent.update((r.address, remote) for r in accepted)
        if res.ok and dsn:
            res = res.stamped(res.tls, res.tls_policy, True)  # RFC 3461 5.2.2: they notify
        for r in accepted:
            results[r.address] = res
            if moved:
                next_host.add(r.address)
        if res.ok and payload.taken is not None:
            payload.taken({r.address: res for r in accepted})
        return _Outcome(results, next_host, reusable)

    @staticmethod
    async def _skip(w: Connection, n: int, timeout: float) -> bool:
        """Read and drop the replies still due for a pipelined group."""
        try:
            for _ in range(n):
                await w.reply(timeout)
        except (TimeoutError, *_LOST):
            return False
        return True

    @staticmethod
    async def _reset(w: Connection, timeout: float) -> bool:
        """RSET after a transaction that ended without a message: reusable if 250."""
        rep = await Courier._rset(w, timeout)
        return rep is not None and rep.code == 250 and w.is_connected

    @staticmethod
    async def _rset(w: Connection, timeout: float) -> SMTPReply | None:
        """RSET's reply; None when there is none (a timeout, the connection lost).
        A reply waiting before it goes out raises wire.OutOfStep: the verdict just read
        may be that reply's command's, not the step's it was read for."""
        try:
            return await w.command(b"RSET\r\n", timeout)
        except wire.OutOfStep:
            raise
        except (TimeoutError, *_LOST):
            return None

    @staticmethod
    async def _settle(refusal: SMTPReply, w: Connection, timeout: float,
                      remote: str) -> None:
        """Before a permanent refusal stands that no 354 followed (MAIL's, RCPT's, DATA's:
        it may be a stray reply read in its command's place, a late second reply to an
        earlier command still on its way when this one went out; one reply per command,
        RFC 5321 4.1.1, is all that pairs them): QUIT, whose 221 (RFC 5321 4.1.1.10) no
        other command gets. QUIT answered 221, or no reply at all (the connection
        closed, the timeout; TCP keeps the order, so a reply due to an earlier command
        comes before QUIT's): the replies were in step, the refusal stands. Anything
        else read in QUIT's place (or already waiting when QUIT goes out) is an earlier
        command's reply, every reply a step behind: _Stale, out of step, no verdict.
        Except a 421, alone, waiting or in QUIT's place: the next hop closing (RFC 5321
        3.8; Postfix past smtpd_hard_error_limit, 1 under stress, writes it right after
        the refusal and hangs up), as a closed connection says the same: it stands.
        The connection is closed either way (as Postfix's RSET after a refused
        transaction ignores its reply, this costs the cached connection)."""
        try:
            if (early := w.peek()) is not None and early.code == 421:
                await w.reply(timeout)  # (read at once: waiting)
                if not w.has_unread:
                    return
            rep = await w.command(b"QUIT\r\n", timeout)
        except ProtocolError as e:  # waiting before QUIT went out (OutOfStep), or garbage
            raise _Stale(_out_of_step(e, remote)) from None
        except (TimeoutError, *_LOST):
            return
        finally:
            w.close()
        if rep.code not in (221, 421):
            raise _Stale(_out_of_step(wire.OutOfStep(
                f"replies out of step: {str(rep)[:200]} to QUIT after {str(refusal)[:200]}"),
                remote))

    @staticmethod
    async def _reset_after(refusal: SMTPReply, w: Connection, timeout: float,
                           reused: bool, remote: str) -> bool:
        """RSET after a refused MAIL or DATA (`refusal`): reusable if 250. A 354 to it
        raises _Stale (on any connection: the refusal is no verdict): DATA's reply came
        to the RSET, every reply one step behind (a late second reply to the previous
        message's dot), so the refusal was an earlier reply, not this message's."""
        rep = await Courier._rset(w, timeout)
        if rep is not None and rep.code == 354:
            raise _Stale(_stale(refusal, remote) if reused else _out_of_step(
                wire.OutOfStep(f"replies out of step: 354 to RSET after {refusal}"), remote))
        return rep is not None and rep.code == 250 and w.is_connected


class _Prefetched(StsSource):
    """The MTA-STS answer already being looked up for this delivery."""

    def __init__(self, task: asyncio.Task[StsPolicy | None]) -> None:
        self.task = task

    async def policy(self, domain: str) -> StsPolicy | None:
        return await self.task


def _stale(rep: SMTPReply, remote: str) -> DeliveryResult:
    """A reused connection's reply that blames the connection (_Stale), transient."""
    text = rep.text.replace("\n", " ")
    return DeliveryResult.temp(f"reused connection to {remote} failed: {rep.code} {text}",
                               "4.4.2", 451, remote)


def _out_of_step(e: ProtocolError, remote: str) -> DeliveryResult:
    """Replies out of step (`e`): no verdict, transient 4.5.0 (RFC 3463: protocol)."""
    return DeliveryResult.temp(f"protocol error from {remote}: {e}",
                               "4.5.0", 451, remote)


def _after_dot(w: Connection, rep: SMTPReply) -> str | None:
    """Just after the end-of-data dot's reply `rep` was read: another reply already
    waiting (other than a 421, the next hop closing) is one too many (the next hop
    answered DATA twice, the second after the check at the dot, `_in_step`; or the dot
    twice). A 2xx read first stands, as one arriving later does (every SMTP client
    takes the first reply after the dot, Postfix's smtp included): RFC 5321 4.1.1.4,
    the next hop has said it took the message, and a retry would deliver it twice; the
    second reply is returned (its text, for the log: the caller drops the connection).
    A refusal read first is no verdict (which is the dot's is unknown): OutOfStep, the
    message deferred. None: nothing more was waiting."""
    nxt = w.peek()
    if (nxt is not None and nxt.code != 421) or (nxt is None and w.has_unread):
        then = str(nxt)[:200] if nxt else "..."
        if rep.ok:
            return then
        raise wire.OutOfStep(f"replies out of step: two to the end of data, "
                             f"{str(rep)[:200]}, then {then}")
    return None


def _no_answer(res: DeliveryResult) -> DeliveryResult:
    """`res` of a host that did not answer (no connection made): see `unanswered`."""
    return dataclasses.replace(res, unanswered=True)


def _stamp(res: DeliveryResult, t: _Target) -> DeliveryResult:
    """The TLS result and policy of the attempt, on the recipient's result."""
    return res.stamped(t.tls or "none", t.policy.policy, res.dsn_passed)


def _helo_name(hostname: str) -> bytes:
    """Our name for EHLO/HELO: A-labels for an internationalized name (RFC 5321 4.1.1.1)."""
    try:
        return hostname.encode("idna")
    except UnicodeError:
        return hostname.encode("ascii", "replace")


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _timed_out(e: TimeoutError, reason: str) -> str:
    """`reason` for a timeout, saying so when it was the attempt's (attempt_timeout)."""
    if isinstance(e, DeadlineExceeded):
        return f"{reason}: the delivery attempt's time limit ([delivery] attempt_timeout) " \
               "was reached"
    return reason


def _too_many(res: DeliveryResult | None) -> bool:
    """A 452 for the server's recipient limit (RFC 5321 4.5.3.1.10; RFC 3463 4.5.3)."""
    return res is not None and res.code == 452 and \
        (res.enhanced == "4.5.3" or "too many" in res.text.lower())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_SNI_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _sni(host: str) -> str | None:
    """SNI for an MX: its name (RFC 6066 3 allows no IP literals), when it is a host name
    at all. An MX name from DNS may hold any byte (dnspython writes them as \\DDD, so one
    label can grow past 63 characters): such a name is not sent, the handshake goes on
    without SNI (ssl would raise UnicodeError out of the courier for it)."""
    if host.startswith("[") or not any(c.isalpha() for c in host):
        return None
    if not all(_SNI_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
        return None
    return host


def _int(value: str) -> int:
    """An EHLO parameter's number (RFC 1870 SIZE: 1*20DIGIT); 0 (none stated) for
    anything else: int() would also read "-1", "+5", "1_0" and non-ASCII digits, and
    a limit the next hop never stated must not bounce a message (Postfix ignores it)."""
    word = value.split(maxsplit=1)[0] if value.strip() else ""
    return int(word) if word.isascii() and word.isdigit() and len(word) <= 20 else 0


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


__all__ = ["Courier", "dot_stuff", "normalize_crlf", "reply_result"]
