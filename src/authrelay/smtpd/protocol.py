"""The SMTP server engine, sans-I/O: bytes in, replies out, and requests for the adapter.

Owns the whole SMTP dialogue of RFC 5321 (EHLO per RFC 1869/5321 4.1.1.1, RFC 2920
PIPELINING, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 2034
ENHANCEDSTATUSCODES, RFC 3461 DSN, RFC 3207 STARTTLS, RFC 4954 AUTH, RFC 8314 implicit
TLS, RFC 6409 submission): the command grammar, every per-command check, the session
state (HELO, TLS, AUTH) and the mail transaction (`Transaction`: MAIL, RCPTs, their ESMTP
parameters, the body). It does no I/O, never awaits and reads no clock (the model is h11):

    eng = Engine(cfg, mode="submission", trusted=False, auth_available=True,
                 tls_available=True, tls_active=False)
    eng.greet()                       # queues the 220 banner
    eng.receive_data(b"EHLO x\\r\\n")  # b"" = the peer closed its side
    while (ev := eng.next_event()) not in (NEED_DATA, PAUSED, CLOSED):
        ...                           # act on ev; answer requests (below)
    transport.write(eng.data_to_send())

`next_event()` executes at most one command per call, so the adapter can bound the work
done per loop turn (fairness). It returns:
- `NEED_DATA`: feed more bytes; `PAUSED`: an answer to the last request is outstanding;
  `CLOSED`: the dialogue is over (the last reply is queued); `CONTINUE`: one command
  was executed entirely here (its reply is queued), call again.
- requests the adapter must answer before the engine goes on:
  `StartTLS` -> `tls_started()` (or close the connection if the handshake fails);
  `AuthRequest` -> `auth_result(AuthOutcome)`; `MailRequest`, `RcptRequest`,
  `DataRequest` -> `policy_result(reply_or_None)` (RCPT: `bad_recipient=True` when the
  refusal counts towards the bad-recipient limits); `MessageComplete` ->
  `message_result(reply)` once the message is durable (or not); `Delay` -> `resume()`
  after sleeping (answers queued before it must be sent first).
- notices: `BodyData` (message bytes to store, in order), `AuthMalformed` (a failed AUTH
  exchange, for the maillog), `MessageAborted` (the engine
  refused the message; drop what was stored), `Reject` / `LogWarning` (maillog lines),
  `CloseConnection` (send what is queued, then close; `abort=True`: a limit or a
  protocol violation, so do not wait long for a slow reader).
`timeout()` (a phase deadline passed) and `close_with(reply)` (shutdown, session time
limit) end the dialogue from outside.

Security decisions (each also cited where it is made):
- AUTH only under TLS (RFC 4954 4, RFC 8314); no anonymous mechanism.
- Submission listeners need AUTH (or a trusted network) before MAIL (RFC 6409 4.3).
- STARTTLS discards everything pipelined behind it (CVE-2011-0411) and forgets all state
  learnt before it (RFC 3207 4.2).
- An HTTP method as the command (CONNECT, GET, POST as Postfix's
  smtpd_forbidden_commands, and PUT, PATCH, DELETE, OPTIONS, HEAD, TRACE: an HTTP
  request at an SMTP port, cross-protocol, SSRF) ends the session at once with 421, so no
  line of its body runs as a command.
- A TLS handshake record (a ClientHello: 0x16 0x03) as the first bytes in plain text (a
  client set for implicit TLS at a STARTTLS port) ends the session at once with 421
  naming it, not as a command line (a "bare LF" in its random bytes, or a wait for a
  line end that never comes).
- A bare CR or LF in a command or in DATA ends the session with 521 (RFC 5321 2.3.8;
  SMTP smuggling). ESMTP parameter values must be ASCII (RFC 5321 4.1.2, RFC 1870):
  anything else is 501 5.5.4.
- Bounded work per client: `max_errors` errors, `max_junk_commands` NOOP/RSET/HELP/VRFY/
  repeated EHLO (Postfix's smtpd_junk_command_limit; reset by an accepted message),
  `max_auth_failures`, `bad_rcpt_limit`, RCPT_OVERSHOOT 452s past max_recipients before
  each counts as an error; command lines longer than their limit are cut off
  and refused, never buffered without bound.
Failure policy: the engine never raises on any input. A bug in a handler is caught,
logged at error level with its traceback (a bug of ours, never the client's), answered
451 4.3.0 and the session closed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import logging
import re
import unicodedata
from dataclasses import dataclass, field

from authrelay import replies
from authrelay.address import Address, AddressError, PathArg, parse_path_arg
from authrelay.auth.sasl import SaslError, SaslExchange
from authrelay.config import Config
from authrelay.policy.ownership import a_label
from authrelay.smtpd.bodyreader import BARE, LONG_LINE, NUL, TOO_BIG, BodyReader
from authrelay.types import Reply

log = logging.getLogger(__name__)

CHUNK = 16 * 1024  # largest DATA piece handed to the body reader at once (one a loop turn)
# A message past max_message_size is read on (discarded) for at most this many more bytes,
# so that a client whose message was only a little too big gets its 552 after the end of
# data and may go on; past it, 552 5.3.4 at once and the connection is closed (issue 17).
OVERSHOOT = 1024 * 1024
# RCPTs past max_recipients answered 452 before each further one counts as an error
# (Postfix's smtpd_recipient_overshoot_limit): a legitimate client pipelining a long list
# is not cut off, a flood of RCPTs ends with max_errors instead of running for ever.
RCPT_OVERSHOOT = 1000
# RFC 5321 4.5.3.1.4: "SMTP extensions may be used to increase" the 512-octet command
# line, and each extension we advertise lengthens MAIL or RCPT by what its parameters may
# add: MAIL by SIZE (RFC 1870 3: 26), BODY=8BITMIME (RFC 6152: 16), SMTPUTF8 (RFC 6531
# 3.4: 10), AUTH= (RFC 4954 3: 500), RET=HDRS and an ENVID of 100 characters (RFC 3461
# 4.3, 4.4: 117); RCPT by NOTIFY=SUCCESS,FAILURE,DELAY and an ORCPT of 500 characters
# (RFC 3461 4.1, 4.2: 537). A peer relaying a long path with AUTH= or ORCPT= must not get
# "500 5.5.6 Line too long" for a command the extensions it was offered allow.
MAIL_LINE_EXTRA = 26 + 16 + 10 + 500 + 117
RCPT_LINE_EXTRA = 537


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")
CLOSED = _Sentinel("CLOSED")
CONTINUE = _Sentinel("CONTINUE")


class Phase(enum.Enum):
    COMMAND = "command"  # reading command lines
    AUTH_LINE = "auth_line"  # reading a SASL response line (RFC 4954 4)
    WAIT = "wait"  # a request is outstanding; input is kept, not parsed
    TLS = "tls"  # STARTTLS answered; input is discarded until tls_started()
    DATA = "data"  # reading the message (RFC 5321 4.1.1.4)
    CLOSED = "closed"


class AuthOutcome(enum.Enum):
    OK = "ok"  # 235
    BAD = "bad"  # 535 (counts towards max_auth_failures)
    TEMPFAIL = "tempfail"  # 454, the backend is unavailable
    LOCKED = "locked"  # 454, too many failures for this user/address (counts)


# ------------------------------------------------------------------------ state objects


@dataclass(slots=True)
class Transaction:
    """One mail transaction (RFC 5321 3.3): from MAIL to the end of DATA or RSET."""

    sender: PathArg
    rcpts: list[PathArg] = field(default_factory=list)
    body_8bit: bool = False  # BODY=8BITMIME (RFC 6152)
    smtputf8: bool = False  # SMTPUTF8 (RFC 6531)
    ret: str = ""  # RFC 3461 RET: FULL | HDRS
    envid: str = ""  # RFC 3461 ENVID (xtext)
    size: int | None = None  # the SIZE the client declared (RFC 1870)
    overshoot: int = 0  # RCPTs answered 452 too many recipients
    # the accepted recipients as (local part, domain key): a repeated one is not added
    seen: set[tuple[str, str]] = field(default_factory=set)
    repeats: int = 0  # repeated RCPTs answered 250: they count toward max_recipients


# ------------------------------------------------------------------------ events


@dataclass(slots=True)
class StartTLS:
    """Answer: `tls_started()` after the handshake. `dropped`: plaintext bytes pipelined
    after the command that were discarded (CVE-2011-0411)."""

    dropped: int


@dataclass(slots=True)
class AuthRequest:
    """Answer: `auth_result()`. With `refusal` set the exchange already failed (e.g. an
    authzid other than the user): record a failure, do not verify, answer BAD; `reason`
    says why, for the maillog."""

    mechanism: str
    username: str
    password: str = field(repr=False)
    refusal: Reply | None = None
    reason: str = ""


@dataclass(slots=True)
class AuthMalformed:
    """Notice: an AUTH exchange failed on the client's syntax (501/504: cancelled, not
    base64, malformed); `reason` is for the maillog and never holds the payload."""

    mechanism: str
    reply: Reply
    reason: str


@dataclass(slots=True)
class MailRequest:
    """Answer: `policy_result()`: None accepts the sender (sender policy, rate limits,
    free space are the adapter's)."""

    transaction: Transaction


@dataclass(slots=True)
class RcptRequest:
    """Answer: `policy_result(reply, bad_recipient=...)` (relay policy, host checks,
    rates). `postmaster`: RCPT TO:<Postmaster> or postmaster@hostname, always
    acceptable (RFC 5321 4.5.1)."""

    transaction: Transaction
    recipient: PathArg
    postmaster: bool

    @property
    def address(self) -> Address:
        """The recipient's address (the engine never asks about a null path)."""
        assert self.recipient.address is not None
        return self.recipient.address


@dataclass(slots=True)
class DataRequest:
    """Answer: `policy_result()`: None once the adapter is ready to store the body (354
    follows); a reply (e.g. 451 spool trouble) refuses DATA."""

    transaction: Transaction


@dataclass(slots=True)
class BodyData:
    segments: list[bytes]  # message bytes, CRLF line ends, dots un-stuffed


@dataclass(slots=True)
class MessageComplete:
    """The end of data was reached and the message is acceptable. Answer:
    `message_result(reply)` (250 once durable, else 4yz)."""

    transaction: Transaction
    size: int


@dataclass(slots=True)
class MessageAborted:
    """The engine refused the message after DATA (its reply is queued): discard it."""

    transaction: Transaction
    reply: Reply
    wire_bytes: int
    lost: bool = False  # the client went away before the end of data (no reply sent)


@dataclass(slots=True)
class Delay:
    """Send what is queued, sleep `seconds`, then call `resume()` (sendmail's
    confBAD_RCPT_THROTTLE)."""

    seconds: float


@dataclass(slots=True)
class Reject:
    """A refusal the operator sees in the maillog (`reject=` line)."""

    reply: Reply
    what: str = ""
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class LogWarning:
    """A `warning=` maillog line."""

    text: str
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class CloseConnection:
    """Send what is queued and close. `abort`: do not wait long for a slow reader."""

    reason: str  # quit | errors | junk | auth_failures | bad_rcpts | bare | timeout | ...
    abort: bool = True


Event = (StartTLS | AuthRequest | AuthMalformed | MailRequest | RcptRequest | DataRequest
         | BodyData
         | MessageComplete | MessageAborted | Delay | Reject | LogWarning | CloseConnection)

_BODY_ERRORS: dict[str, Reply] = {
    TOO_BIG: replies.MSG_TOO_BIG,
    NUL: replies.MSG_NUL,  # issue 11: 554 5.6.0, nothing stored
    LONG_LINE: replies.TEXT_LINE_TOO_LONG,
}

# Wire bytes of every constant reply, computed once (the hot path answers mostly these),
# keyed by identity: hashing a Reply runs the dataclass's Python __hash__ over its three
# fields, which cost more than the lookup saved. Each value holds its reply, so no other
# object can take its id; any other Reply (equal or not) is rendered by Reply.lines().
_WIRE: dict[int, tuple[Reply, bytes]] = {id(r): (r, r.lines()) for r in vars(replies).values()
                                         if isinstance(r, Reply)}

_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "BDAT", "SEND", "SOML", "SAML"})
_JUNK = frozenset({"NOOP", "RSET", "HELP", "VRFY"})
# Postfix's smtpd_forbidden_commands: an HTTP request sent to an SMTP port (a browser
# form, a server-side request forgery) must never have its body run as SMTP commands.
# Postfix names CONNECT, GET and POST; a forged PUT, PATCH, DELETE or OPTIONS carries a
# body too, and no SMTP verb is an HTTP method.
_NON_SMTP = frozenset({"CONNECT", "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                       "HEAD", "TRACE"})
# A TLS record of type handshake (22), protocol major version 3 (RFC 8446 5.1): no SMTP
# command starts with a control character.
_TLS_HANDSHAKE = b"\x16\x03"

_AGAIN = _Sentinel("AGAIN")

_BAD_UTF8 = Reply(500, "5.5.2", "Invalid UTF-8 in command")
_MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
_RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
_BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
_NON_ASCII_PARAM = Reply(501, "5.5.4", "ESMTP parameter values must be ASCII")
_SMTPUTF8_VALUE = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
_BAD_RET = Reply(501, "5.5.4", "RET must be FULL or HDRS")
_BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter")
_BAD_NOTIFY = Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
_BAD_ORCPT = Reply(501, "5.5.4", "Bad ORCPT parameter")
_BAD_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode response")
_NOTIFY_WORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
_HEX = frozenset("0123456789ABCDEF")


@functools.lru_cache(maxsize=8)
def _upper(mechanisms: tuple[str, ...]) -> tuple[str, ...]:
    """The configured SASL mechanisms in upper case: one tuple shared by every session."""
    return tuple(m.upper() for m in mechanisms)


@functools.lru_cache(maxsize=8)
def _greeting(hostname: str) -> bytes:
    """The 220 banner's wire form (one per host name, not one per connection)."""
    return Reply(220, "", f"{hostname} ESMTP authrelay").lines()


@functools.lru_cache(maxsize=8)
def _bye(hostname: str) -> bytes:
    """QUIT's 221 in wire form."""
    return replies.bye(hostname).lines()


@functools.lru_cache(maxsize=32)
def _ehlo_keywords(max_size: int, starttls: bool, auth: bool,
                   mechanisms: tuple[str, ...]) -> bytes:
    """The EHLO reply after its first line, in wire form: the same for every session of a
    listener in the same state (STARTTLS offered, else the AUTH mechanisms if any)."""
    lines = ["PIPELINING", f"SIZE {max_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
             "DSN"]
    if starttls:  # RFC 3207: only when it can be done
        lines.append("STARTTLS")
    elif auth:  # RFC 4954 4: mechanisms only where they may be used (after TLS)
        lines.append("AUTH " + " ".join(mechanisms))
    lines.append("HELP")
    return Reply(250, "", "\n".join(lines)).lines()


# Kept out of the EHLO name written into our Received field (Engine._hello).
_NEUTER = frozenset('()<>\\";@')


def notify_ok(value: str) -> bool:
    """RFC 3461 4.1: NEVER, or a comma list of SUCCESS, FAILURE, DELAY (any case)."""
    words = {w.upper() for w in value.split(",")}
    return bool(value) and words <= _NOTIFY_WORDS and not ("NEVER" in words and len(words) > 1)


def xtext_ok(value: str, limit: int) -> bool:
    """RFC 3461 4: xtext is printable ASCII without "+" or "=" except "+XX" hex escapes,
    each of which must stand for a printable ASCII character (space included): what the
    value decodes to is ASCII text (4.2's addresses, 4.4's "printable (graphic) US-ASCII"
    ENVID), as Postfix's smtpd checks it. A "+C3" or "+0A" would reach a DSN decoded (a
    Latin-1 character making an ASCII report message/global-delivery-status, a line
    break), so it is refused here."""
    if not value or len(value) > limit or not value.isascii():
        return False
    i = 0
    while i < len(value):
        c = value[i]
        if c == "+":
            if len(value) < i + 3 or not set(value[i + 1:i + 3]) <= _HEX \
                    or not 0x20 <= int(value[i + 1:i + 3], 16) <= 0x7E:
                return False
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            return False
        i += 1
    return True


def orcpt_ok(value: str, smtputf8: bool) -> bool:
    """RFC 3461 4.2 ORCPT: addr-type ";" xtext, the address at most 500 octets. With the
    utf-8 type (RFC 6533 3) the address may also use utf-8-addr-xtext's `\\x{HEX}`
    escapes (printable ASCII: xtext already) and, in an SMTPUTF8 transaction only, raw
    UTF-8 (utf-8-addr-unitext). Control characters (C0, DEL, C1) and line or paragraph
    separators are refused in either form: the value reaches DSNs and the next hop."""
    atype, semi, addr = value.partition(";")
    # The addr-type is a name (rfc822, utf-8, x400, unknown: IANA's address types), never
    # xtext: "utf+2D8" would be "utf-8" to the DSN, which decodes the whole value.
    if not semi or not _ADDR_TYPE.fullmatch(atype):
        return False
    utf8_type = atype.lower() == "utf-8"
    # The DSN decodes xtext's "+XX" first (scheduler/bounce.py): "+5Cx{85}" is an escape.
    if utf8_type and not _escapes_ok(_XTEXT_ESCAPE.sub(_xtext_char, addr)):
        return False
    if addr.isascii() or not smtputf8 or not utf8_type:
        return xtext_ok(addr, 500)
    if len(addr.encode("utf-8")) > 500:
        return False
    # The ASCII characters keep xtext's rules; each non-ASCII one stands for itself.
    ascii_part = "".join(c if c.isascii() else "x" for c in addr)
    return xtext_ok(ascii_part, 500) and not any(
        unicodedata.category(c) in _BAD_UNITEXT for c in addr if not c.isascii())


# Cc (C0 and C1 controls, DEL), Cs (surrogates: not text), Zl / Zp (U+2028 / U+2029).
_BAD_UNITEXT = frozenset({"Cc", "Cs", "Zl", "Zp"})
_UNITEXT_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


_XTEXT_ESCAPE = re.compile(r"\+([0-9A-Fa-f]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def _xtext_char(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 16))


def _escapes_ok(addr: str) -> bool:
    """RFC 6533 3's `\\x{HEX}` escapes of a utf-8 address stand for Unicode characters,
    and the DSN (scheduler/bounce.py) writes them as those characters: one that is no
    character, or a control or line separator, is refused as the raw form is."""
    for m in _UNITEXT_ESCAPE.finditer(addr):
        cp = int(m.group(1), 16)
        if cp > 0x10FFFF or unicodedata.category(chr(cp)) in _BAD_UNITEXT:
            return False
    return True


# ------------------------------------------------------------------------ the engine


class Engine:
    """One SMTP server dialogue. See the module docstring for the calling convention."""

    # Slots, not a __dict__: one Engine per connection, and with more than 30 attributes
    # CPython gives every instance a full dict of its own (~1.5 KB each; 10,000 idle
    # connections, bench (f)). A new attribute must be added here.
    __slots__ = (
        "_buf", "_eof", "_events", "_long_auth", "_out", "_pending", "_reader", "_sasl",
        "_skip_cr", "_skipping", "_waiting", "auth_available", "auth_failures",
        "auth_user", "bad_rcpt_limit", "bad_rcpt_throttle", "bad_rcpts", "commands",
        "discarded", "errors", "esmtp", "helo", "hostname", "junk", "max_auth_failures",
        "max_auth_line", "max_errors", "max_junk", "max_line", "max_recipients",
        "max_size", "max_text_line", "mechanisms", "mode", "moved", "phase",
        "postmaster_domain", "rcpt_throttled", "tls", "tls_available", "transaction", "trusted",
    )

    def __init__(self, cfg: Config, *, mode: str, trusted: bool = False,
                 auth_available: bool = True, tls_available: bool = True,
                 tls_active: bool = False) -> None:
        lim = cfg.limits
        self.hostname = cfg.hostname
        self.mode = mode  # smtp | submission | submissions
        self.trusted = trusted
        self.auth_available = auth_available
        self.tls_available = tls_available
        self.mechanisms = _upper(cfg.auth.mechanisms)
        # As an A-label: an IDN first local domain (config takes either form) made the
        # <Postmaster> of a 7-bit client "553 5.6.7 requires SMTPUTF8" (RFC 5321 4.5.1).
        first = (cfg.relay.local_domains or (cfg.hostname,))[0]
        self.postmaster_domain = a_label(first) or first
        self.max_line = lim.max_line_length
        self.max_auth_line = lim.max_auth_line_length
        self._long_auth = False  # the last over-long line was measured as an AUTH line
        self.max_size = lim.max_message_size
        self.max_text_line = lim.max_text_line_length
        self.max_recipients = lim.max_recipients
        self.max_errors = lim.max_errors
        self.max_junk = lim.max_junk_commands
        self.max_auth_failures = lim.max_auth_failures
        self.bad_rcpt_throttle = lim.bad_rcpt_throttle
        self.bad_rcpt_limit = lim.bad_rcpt_limit
        # session state (RFC 5321 4.1.4; RFC 3207 4.2 resets it)
        self.helo: str | None = None
        self.esmtp = False
        self.tls = tls_active  # submissions: the transport did the handshake (RFC 8314)
        self.auth_user = ""
        self.transaction: Transaction | None = None
        # counters
        self.errors = 0
        self.junk = 0
        # Commands that moved the session on: neither junk nor an error (eviction ages an
        # idle session from the last of them: admission.py, smtpd/eviction.py).
        self.moved = 0
        self.auth_failures = 0
        self.bad_rcpts = 0
        self.rcpt_throttled = False
        self.commands: dict[str, int] = {}  # per verb, for the disconnect line (as Postfix)
        # machinery
        self.phase = Phase.COMMAND
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []  # a short FIFO (a deque costs ~600 bytes)
        self._skipping = False  # dropping the rest of an over-long line
        self._skip_cr = False  # the last byte dropped was a CR
        self._waiting = ""  # which answer is outstanding in Phase.WAIT
        self._pending: object = None  # what the outstanding request was about
        self._sasl: SaslExchange | None = None
        self._reader: BodyReader | None = None
        self._eof = False
        self.discarded = 0  # bytes discarded while a TLS handshake was pending

    # ------------------------------------------------------------------ public API
    def greet(self) -> None:
        self._out.append(_greeting(self.hostname))

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means end of input."""
        if not data:
            self._eof = True
            return
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.TLS:  # CVE-2011-0411: plaintext after STARTTLS is dropped
            self.discarded += len(data)
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        """Input bytes received but not yet consumed (the adapter's read back-pressure)."""
        return len(self._buf)

    @property
    def eof(self) -> bool:
        return self._eof

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def protocol(self) -> str:
        """RFC 3848 WITH value."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.auth_user else "")

    def next_event(self) -> Event | _Sentinel:
        if self._events:
            return self._events.pop(0)
        phase = self.phase
        if phase is Phase.CLOSED:
            return CLOSED
        if phase is Phase.TLS and self._eof:
            # The peer hung up before the handshake: nothing more can happen here.
            self._close("eof", abort=False)
            return self._events.pop(0)
        if phase is Phase.WAIT or phase is Phase.TLS:
            return PAUSED
        try:
            if phase is Phase.DATA:
                if not self._data_step():
                    return NEED_DATA
            elif (not self.commands and phase is Phase.COMMAND and not self.tls
                  and self._buf[:2] == _TLS_HANDSHAKE):  # (a slice only before a command)
                self._tls_without_starttls()
            else:
                line = self._take_line(phase) if self._buf else None
                if line is None:
                    if not self._eof:
                        return NEED_DATA
                    self._close("eof", abort=False)
                elif line is _AGAIN:
                    pass
                elif phase is Phase.AUTH_LINE:
                    assert isinstance(line, bytes)
                    self._auth_line(line)
                else:
                    assert isinstance(line, bytes)
                    self._command(line)
        except Exception:  # never a traceback to the client; the session ends cleanly
            log.error("SMTP engine error", exc_info=True)
            self._reply(replies.LOCAL_ERROR)
            self._close("error")
        if self._events:
            return self._events.pop(0)
        if self.phase is Phase.CLOSED:
            return CLOSED
        return CONTINUE

    # answers to requests ------------------------------------------------------
    def tls_started(self) -> None:
        if self.phase is Phase.CLOSED:  # ended from outside meanwhile: nothing to do
            return
        self._expect("tls")
        self.tls = True
        # RFC 3207 4.2: forget everything learnt before TLS, EHLO included.
        self.helo, self.esmtp, self.transaction = None, False, None
        self._buf.clear()
        self.phase = Phase.COMMAND

    def auth_result(self, outcome: AuthOutcome) -> None:
        if self.phase is Phase.CLOSED:  # ended from outside meanwhile: nothing to do
            return
        req = self._expect("auth")
        assert isinstance(req, AuthRequest)
        self.phase = Phase.COMMAND
        if outcome is AuthOutcome.OK:
            self.auth_user = req.username
            self._reply(replies.AUTH_OK)
        elif outcome is AuthOutcome.TEMPFAIL:
            self._reply(replies.AUTH_TEMPFAIL)
        else:
            self.auth_failures += 1
            if outcome is AuthOutcome.LOCKED:
                self._reply(replies.AUTH_LOCKED)
            else:
                self._reply(req.refusal or replies.AUTH_FAILED)
            if self.auth_failures >= self.max_auth_failures:
                self._reply(replies.TOO_MANY_AUTH_FAILURES)
                self._events.append(Reject(replies.TOO_MANY_AUTH_FAILURES))
                self._close("auth_failures")

    def policy_result(self, reply: Reply | None, *, bad_recipient: bool = False) -> None:
        """The adapter's verdict on a MailRequest, RcptRequest or DataRequest."""
        if self.phase is Phase.CLOSED:
            return
        kind = self._waiting
        req = self._expect(kind if kind in ("mail", "rcpt", "data") else "policy")
        self.phase = Phase.COMMAND
        # A refused command counts as an error, as in Postfix (smtpd_hard_error_limit
        # counts every failed command): a client repeating a refused MAIL (sender not its
        # own, over its rate) ends at max_errors instead of running, and writing a maillog
        # line, for as long as it likes. Refused recipients count towards bad_rcpt_limit.
        if kind == "mail":
            assert isinstance(req, MailRequest)
            if reply is not None:
                self._error(reply)
                return
            self.transaction = req.transaction
            self._reply(replies.SENDER_OK)
        elif kind == "rcpt":
            assert isinstance(req, RcptRequest)
            if reply is not None:
                if bad_recipient:
                    self._reply(reply)
                    self._bad_rcpt()
                else:
                    self._error(reply)
                return
            txn, addr = req.transaction, req.address
            txn.rcpts.append(req.recipient)
            txn.seen.add((addr.local, addr.domain_key))
            self._reply(replies.RCPT_OK)
        else:
            if reply is not None:
                self._error(reply)
                return
            self._reply(replies.START_DATA)
            self._reader = BodyReader(self.max_size, self.max_text_line)
            self.phase = Phase.DATA

    def message_result(self, reply: Reply) -> None:
        if self.phase is Phase.CLOSED:  # ended from outside meanwhile: nothing to do
            return
        self._expect("commit")
        self.phase = Phase.COMMAND
        self.transaction = None
        if reply.code != 250:  # refused at the end of data: an error like a refused
            self._error(reply)  # command (a client resending it ends at max_errors)
            return
        self._reply(reply)
        self.junk = 0  # Postfix: the junk command count is reset after mail is accepted

    def resume(self) -> None:
        if self.phase is Phase.CLOSED:  # ended from outside meanwhile: nothing to do
            return
        arg = self._expect("delay")
        self.phase = Phase.COMMAND
        assert isinstance(arg, str)
        self._rcpt(arg)

    def timeout(self) -> None:
        """A phase deadline passed (command, DATA block, DATA total, handshake)."""
        if self.phase is Phase.CLOSED:
            return
        self._reply(replies.TIMEOUT)
        extra: dict[str, object] = {"stage": "timeout"}
        if self._reader is not None:  # in DATA: the message is lost (Postfix: "timeout
            extra["size"] = self._reader.wire_bytes  # after DATA (N bytes)")
        self._events.append(Reject(replies.TIMEOUT, extra=extra))
        self._close("timeout")

    @property
    def oversize(self) -> int:
        """Bytes of the message being read that arrived past max_message_size (0: none).
        Non-zero means it is refused whatever comes next; the adapter reads the rest (up
        to OVERSHOOT more) slowly (`[limits] oversize_read_rate`, issue 17)."""
        r = self._reader
        if r is None or r.error != TOO_BIG:
            return 0
        return max(0, r.wire_bytes - self.max_size)

    @property
    def data_bytes(self) -> int:
        """Bytes of DATA received so far in the message being read (0 outside DATA)."""
        return self._reader.wire_bytes if self._reader is not None else 0

    def close_with(self, reply: Reply, reason: str = "closed") -> None:
        """End the dialogue from outside (shutdown, session time limit) with `reply`."""
        if self.phase is Phase.CLOSED:
            return
        self._reply(reply)
        self._close(reason)

    # ------------------------------------------------------------------ internals
    def _reply(self, r: Reply) -> None:
        w = _WIRE.get(id(r))
        self._out.append(w[1] if w is not None else r.lines())

    def _expect(self, kind: str) -> object:
        if self.phase is not (Phase.TLS if kind == "tls" else Phase.WAIT) or \
                self._waiting != kind:
            raise RuntimeError(f"no {kind} request outstanding (waiting for "
                               f"{self._waiting or 'nothing'})")
        self._waiting = ""
        pending, self._pending = self._pending, None
        return pending

    def _wait(self, kind: str, event: Event, pending: object = None) -> None:
        self.phase = Phase.WAIT
        self._waiting = kind
        self._pending = event if pending is None else pending
        self._events.append(event)

    def _close(self, reason: str, abort: bool = True) -> None:
        self.phase = Phase.CLOSED
        self._buf.clear()
        self._reader = None
        self._events.append(CloseConnection(reason, abort))

    def _error(self, r: Reply) -> None:
        """A client error; too many of them end the session (a confused or hostile client)."""
        self.errors += 1
        self._reply(r)
        if self.errors >= self.max_errors:
            self._reply(replies.TOO_MANY_ERRORS)
            self._events.append(Reject(replies.TOO_MANY_ERRORS))
            self._close("errors")

    def _tls_without_starttls(self) -> None:
        # The client cannot read the reply (it waits for a ServerHello); the operator can.
        self._reply(replies.TLS_WITHOUT_STARTTLS)
        self._events.append(Reject(replies.TLS_WITHOUT_STARTTLS, extra={
            "reason": "the client sent a TLS ClientHello: it is set for implicit TLS "
                      "(port 465), not STARTTLS"}))
        self._close("tls_without_starttls")

    def _bare(self, aborted: MessageAborted | None = None) -> None:
        # RFC 5321 2.3.8: CR and LF only together; anything else may be smuggling.
        self._reply(replies.BARE_LF)
        self._events.append(Reject(replies.BARE_LF))
        if aborted is not None:  # in DATA: after the Reject, logged while the message
            self._events.append(aborted)  # (its queue id) is still open, as 552 / 554 are
        self._close("bare")

    def _take_line(self, phase: Phase) -> bytes | _Sentinel | None:
        """The next complete command line without CRLF; None: more input is needed;
        `_AGAIN`: a line was refused here (its reply queued), call again.

        The limit of `_line_limit(phase)` counts the CRLF (RFC 5321 4.5.3.1.4); it is
        looked up only for a line longer than `max_line_length` (the least of the limits
        but a SASL response line's). An over-long line is dropped as it
        arrives (memory stays bounded) and refused when its end comes; a bare CR or LF
        anywhere ends the session. The result does not depend on how the input was split.
        """
        buf = self._buf
        if self._skipping:
            i = buf.find(b"\n")
            seg = bytes(buf if i < 0 else buf[:i])
            if self._skip_cr and seg:  # a CR we dropped is followed by something not LF
                self._bare()
                return _AGAIN
            if i < 0:
                if b"\r" in seg[:-1]:
                    self._bare()
                    return _AGAIN
                if seg:
                    self._skip_cr = seg.endswith(b"\r")
                buf.clear()
                return None
            ends_crlf = seg.endswith(b"\r") if seg else self._skip_cr
            if not ends_crlf or b"\r" in seg[:-1]:
                self._bare()
                return _AGAIN
            del buf[:i + 1]
            self._skipping = self._skip_cr = False
            self._line_too_long()
            return _AGAIN
        i = buf.find(b"\n")
        if i < 0:
            cr = buf.find(b"\r")
            if cr != -1 and cr != len(buf) - 1:
                self._bare()
                return _AGAIN
            n = len(buf)  # no line end yet: too long whatever follows?
            if (n > self.max_line or phase is Phase.AUTH_LINE) and n > self._line_limit(phase):
                self._long_auth = self._auth_sized()
                self._skipping = True
                self._skip_cr = buf.endswith(b"\r")
                buf.clear()
            return None
        if i == 0 or buf[i - 1] != 13 or buf.find(b"\r", 0, i - 1) != -1:
            self._bare()
            return _AGAIN
        if (i >= self.max_line or phase is Phase.AUTH_LINE) and i + 1 > self._line_limit(phase):
            self._long_auth = self._auth_sized()
            del buf[:i + 1]
            self._line_too_long()
            return _AGAIN
        line = bytes(buf[:i - 1])
        del buf[:i + 1]
        return line

    def _auth_sized(self) -> bool:
        """The buffered line is an AUTH command line measured against the longer AUTH
        limit (its refusal is then a failed AUTH exchange)."""
        return self.max_auth_line > self.max_line and self._buf[:5].upper() == b"AUTH "

    def _line_limit(self, phase: Phase) -> int:
        """A command line may have `max_line_length` octets; an AUTH command line and a
        SASL response line `max_auth_line_length` (RFC 4954 4: 12288 for the initial
        response); a MAIL or RCPT line what its ESMTP parameters add (MAIL_LINE_EXTRA,
        RCPT_LINE_EXTRA). Decided by the line's first bytes (only ever consulted once
        more than `max_line_length` are buffered, so those bytes are there)."""
        if phase is Phase.AUTH_LINE:
            return self.max_auth_line
        verb = self._buf[:5].upper()
        if verb == b"AUTH ":
            return max(self.max_line, self.max_auth_line)
        if verb == b"MAIL ":
            return self.max_line + MAIL_LINE_EXTRA
        if verb == b"RCPT ":
            return self.max_line + RCPT_LINE_EXTRA
        return self.max_line

    def _line_too_long(self) -> None:
        if self.phase is Phase.AUTH_LINE or self._long_auth:
            # a SASL response line, or an AUTH command line, past 12288: a failed AUTH
            # exchange like any other, so logged as one (the line itself is gone)
            mech = self._sasl.mechanism if self._sasl is not None else ""
            self._sasl = None
            self.phase = Phase.COMMAND
            self._events.append(AuthMalformed(mech, replies.AUTH_LINE_TOO_LONG,
                                              "line too long"))
            self._error(replies.AUTH_LINE_TOO_LONG)
        else:
            self._error(replies.LINE_TOO_LONG)

    # commands ---------------------------------------------------------------
    def _command(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(_BAD_UTF8)
            return
        verb, _, arg = line.partition(" ")
        # Command words are ASCII, case-insensitive in ASCII only (RFC 5321 2.4): str.upper
        # would also map "MA\u0131L" to MAIL and "\ufb06ARTTLS" to STARTTLS, commands
        # that Postfix (and any filter in front of us) reads as unknown.
        verb = verb.upper() if verb.isascii() else "?"
        handler = _HANDLERS.get(verb)
        key = verb.lower() if handler is not None else "unknown"
        self.commands[key] = self.commands.get(key, 0) + 1
        if handler is None:
            if verb in _NON_SMTP:
                self._reply(replies.NON_SMTP)
                self._events.append(Reject(replies.NON_SMTP, extra={"command": line[:100]}))
                self._close("non_smtp")
                return
            self._error(replies.NOT_IMPLEMENTED if verb in _NOT_IMPLEMENTED
                        else replies.UNRECOGNIZED)
            return
        junk = verb in _JUNK or verb in ("EHLO", "HELO") and self.helo is not None
        if junk and self.max_junk:
            # Postfix smtpd_junk_command_limit: commands that move no mail cost us work
            # without end (a pipelined NOOP flood); past the limit the session ends.
            self.junk += 1
            if self.junk > self.max_junk:
                self._reply(replies.TOO_MANY_COMMANDS)
                self._events.append(Reject(replies.TOO_MANY_COMMANDS))
                self._close("junk")
                return
        errors = self.errors
        handler(self, arg)
        self.moved += not junk and self.errors == errors

    def _ehlo(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _helo(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        # Of the ASCII whitespace only SP is printable: a printable ASCII name holds
        # whitespace when it holds a SP (test_engine_fastpaths compares with isspace).
        plain = name.isascii() and name.isprintable()
        if not name or (" " in name if plain else any(c.isspace() for c in name)):
            # a TAB separates as SP does
            self._error(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX)
            return
        self.transaction = None  # RFC 5321 4.1.4: EHLO implies RSET
        # The name goes verbatim into our Received field (and the EHLO reply): a NUL or
        # a control character there is not the client's to put into the message, so each
        # becomes "?" (as Postfix's printable() does with the HELO name). So does every
        # non-ASCII character: the name is ASCII (RFC 6531 3.7.1: LDH labels or A-labels,
        # RFC 5321 4.1.1.1), reply text is ASCII (RFC 5321 4.2), and a trace field of a
        # message sent without SMTPUTF8 must be (RFC 6531 3.7.3) -- a UTF-8 name made
        # every 7-bit message 8-bit, refused (554 5.6.3) by a next hop without 8BITMIME.
        # The characters that give the field's text a structure (RFC 5322 3.6.7, 3.2.2:
        # "(" opens a comment that, left open, hides the by-clause, the client's address
        # and the date from a parser; ";" ends the tokens, "\\" quotes) become "?" too,
        # as Postfix's NEUTER_CHARACTERS (":" kept: an IPv6 literal holds it).
        if not plain or not _NEUTER.isdisjoint(name):
            name = "".join(c if c.isascii() and c.isprintable() and c not in _NEUTER
                           else "?" for c in name)
        self.helo, self.esmtp = name[:255], esmtp
        if not esmtp:
            self._reply(Reply(250, "", self.hostname))
            return
        starttls = not self.tls and self.tls_available
        auth = not starttls and not self.auth_user and self.auth_available
        # The first line as Reply.lines() renders it (the host name is a validated name
        # and the client's one was made printable ASCII above: neither holds a line end),
        # the keyword lines built once (test_engine_fastpaths pins the bytes).
        self._out.append(f"250-{self.hostname} greets {self.helo}\r\n".encode("utf-8", "replace")
                         + _ehlo_keywords(self.max_size, starttls, auth, self.mechanisms))

    def _noop(self, arg: str) -> None:
        self._reply(replies.NOOP)

    def _rset(self, arg: str) -> None:
        if arg.strip():
            self._error(replies.NO_PARAMS)
            return
        self.transaction = None
        self._reply(replies.RESET)

    def _quit(self, arg: str) -> None:
        self._out.append(_bye(self.hostname))
        self._close("quit", abort=False)

    def _vrfy(self, arg: str) -> None:
        if not arg.strip():
            self._error(replies.SYNTAX)
            return
        # RFC 5321 3.5.3: 252 -- no address harvesting, no false "unknown".
        self._reply(replies.VRFY)

    def _help(self, arg: str) -> None:
        self._reply(replies.HELP)

    def _starttls(self, arg: str) -> None:
        if arg.strip():
            self._error(replies.NO_PARAMS)
            return
        if self.tls:
            self._error(replies.ALREADY_TLS)
            return
        if not self.tls_available:
            self._reply(replies.TLS_UNAVAILABLE)
            return
        self._reply(replies.START_TLS)
        # CVE-2011-0411: plaintext pipelined after STARTTLS must never be executed as if
        # it came through TLS. Drop it; only bytes from the TLS layer count from here.
        dropped = len(self._buf)
        self._buf.clear()
        self.discarded = 0
        self.phase = Phase.TLS
        self._waiting = "tls"
        self._events.append(StartTLS(dropped))

    # AUTH (RFC 4954) ----------------------------------------------------------
    def _auth(self, arg: str) -> None:
        if self.helo is None:
            self._error(replies.NEED_HELO)
            return
        if not self.tls:
            # One line each (an admin sees which client tries to log in without TLS, and
            # whether it sent its credentials in clear with it); max_errors bounds them.
            parts = arg.split()
            extra: dict[str, object] = {}
            if parts:
                extra["sasl_method"] = parts[0].upper() if parts[0].isascii() else "?"
            if len(parts) > 1:
                extra["reason"] = "credentials sent without TLS"
            self._events.append(Reject(replies.TLS_REQUIRED_FOR_AUTH, extra=extra))
            self._error(replies.TLS_REQUIRED_FOR_AUTH)
            return
        if self.auth_user:
            self._error(replies.ALREADY_AUTH)
            return
        if self.transaction is not None:
            self._error(replies.AUTH_IN_TRANSACTION)
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(replies.SYNTAX)
            return
        mech = parts[0].upper() if parts[0].isascii() else "?"  # (as the verb's case)
        if mech not in self.mechanisms or not self.auth_available:
            self._error(_BAD_MECH)
            return
        try:
            ex = SaslExchange(mech, parts[1] if len(parts) > 1 else None)
        except SaslError as e:
            self._sasl_failed(mech, e)
            return
        except (binascii.Error, UnicodeError):
            self._undecodable(mech)
            return
        self._sasl_step(ex)

    def _undecodable(self, mech: str) -> None:
        self._events.append(AuthMalformed(mech, _UNDECODABLE, "not decodable"))
        self._error(_UNDECODABLE)

    def _sasl_step(self, ex: SaslExchange) -> None:
        if ex.done:
            self._sasl = None
            self._wait("auth", AuthRequest(ex.mechanism, ex.username, ex.password))
            return
        self._sasl = ex
        self.phase = Phase.AUTH_LINE
        self._reply(Reply(334, "", base64.b64encode(ex.challenge or b"").decode()))

    def _auth_line(self, raw: bytes) -> None:
        ex = self._sasl
        self._sasl = None
        self.phase = Phase.COMMAND
        assert ex is not None
        try:
            ex.feed(raw.decode("ascii", "replace"))
        except SaslError as e:
            self._sasl_failed(ex.mechanism, e)
            return
        except (binascii.Error, UnicodeError):
            self._undecodable(ex.mechanism)
            return
        self._sasl_step(ex)

    def _sasl_failed(self, mech: str, e: SaslError) -> None:
        r = Reply(e.code, e.enhanced, e.text)
        if e.code == 535:  # credentials refused inside the exchange: a failed login
            self._wait("auth", AuthRequest(mech, e.username, "", refusal=r,
                                           reason=e.reason))
        else:
            # Every AUTH failure is logged (with why, never the payload) and counted.
            self._events.append(AuthMalformed(mech, r, getattr(e, "reason", "") or e.text))
            self._error(r)

    # the mail transaction -----------------------------------------------------
    def _mail(self, arg: str) -> None:
        if self.helo is None:
            self._error(replies.NEED_HELO)
            return
        if self.transaction is not None:
            self._error(replies.NESTED_MAIL)
            return
        if self.mode != "smtp" and not self.auth_user and not self.trusted:
            # RFC 6409 4.3: submission needs authentication first.
            self._error(replies.AUTH_REQUIRED)
            self._events.append(Reject(replies.AUTH_REQUIRED, extra={"stage": "MAIL"}))
            return
        if arg[:5].upper() != "FROM:":
            self._error(_MAIL_SYNTAX)
            return
        try:
            path = parse_path_arg(arg[5:], allow_null=True)
        except AddressError as e:
            self._error(e.reply)
            return
        txn = Transaction(path)
        for key, value in path.params.items():
            if value is not None and not value.isascii():
                self._error(_NON_ASCII_PARAM)
                return
            if key == "SIZE":  # RFC 1870 6: size-value ::= 1*20DIGIT
                if value is None or not value.isdigit() or len(value) > 20:
                    self._error(_BAD_SIZE)
                    return
                txn.size = int(value)
                if txn.size > self.max_size:
                    self._events.append(Reject(replies.MSG_TOO_BIG, f"<{path.text}>... ",
                                               {"size": txn.size}))
                    self._error(replies.MSG_TOO_BIG)  # (a refused MAIL: see policy_result)
                    return
            elif key == "BODY":  # RFC 6152
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(replies.BAD_BODY_PARAM)
                    return
                txn.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":  # RFC 6531 3.4
                if value is not None:
                    self._error(_SMTPUTF8_VALUE)
                    return
                txn.smtputf8 = True
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted; we do not trust a client-supplied identity
            elif key == "RET":  # RFC 3461 4.3
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    self._error(_BAD_RET)
                    return
                txn.ret = value.upper()
            elif key == "ENVID":  # RFC 3461 4.4: xtext, at most 100 characters
                if value is None or not xtext_ok(value, 100):
                    self._error(_BAD_ENVID)
                    return
                txn.envid = value
            else:
                self._error(replies.UNKNOWN_PARAM)
                return
        if path.address is not None and not path.address.ascii and not txn.smtputf8:
            self._events.append(Reject(replies.NEED_SMTPUTF8, f"<{path.text}>... "))
            self._error(replies.NEED_SMTPUTF8)
            return
        self._wait("mail", MailRequest(txn))

    def _rcpt_cmd(self, arg: str) -> None:
        if self.bad_rcpt_throttle and self.bad_rcpts >= self.bad_rcpt_throttle:
            # sendmail confBAD_RCPT_THROTTLE: past N refused recipients every further RCPT
            # waits a second (answers to what came before go out first), logged once.
            if not self.rcpt_throttled:
                self.rcpt_throttled = True
                self._events.append(LogWarning("possible SMTP RCPT flood, throttling",
                                               {"bad_rcpts": self.bad_rcpts}))
            self._wait("delay", Delay(1.0), pending=arg)
            return
        self._rcpt(arg)

    def _rcpt(self, arg: str) -> None:
        txn = self.transaction
        if txn is None:
            self._error(replies.NEED_MAIL)
            return
        if arg[:3].upper() != "TO:":
            self._error(_RCPT_SYNTAX)
            return
        try:
            path = parse_path_arg(arg[3:], allow_null=False)
        except AddressError as e:
            self._error(e.reply)
            self._bad_rcpt()
            return
        for key, value in path.params.items():
            # RFC 6533 3: ORCPT=utf-8;<raw UTF-8> in an SMTPUTF8 transaction (orcpt_ok).
            if value is not None and not value.isascii() and not (
                    key == "ORCPT" and txn.smtputf8):
                self._error(_NON_ASCII_PARAM)
                return
            if key == "NOTIFY":  # RFC 3461 4.1
                if not notify_ok(value or ""):
                    self._error(_BAD_NOTIFY)
                    return
            elif key == "ORCPT":  # RFC 3461 4.2 / RFC 6533 3
                if not orcpt_ok(value or "", txn.smtputf8):
                    self._error(_BAD_ORCPT)
                    return
            else:
                self._error(replies.UNKNOWN_PARAM)
                return
        given = path.address
        assert given is not None
        postmaster = given.domain == ""  # RCPT TO:<Postmaster> (RFC 5321 4.5.1)
        if postmaster:
            # The site's postmaster: at the first local domain, else at our own name.
            path = PathArg(Address("postmaster", self.postmaster_domain), path.params)
        elif (given.local.lower() == "postmaster" and not given.is_literal
              and given.domain_key == self.hostname.lower().rstrip(".")):
            # Postmaster at our own name (where our bounces come from, RFC 7208 2.3's
            # HELO identity) from anyone, as at a local domain; [aliases] deliver it.
            postmaster = True
        assert path.address is not None
        if not path.address.ascii and not txn.smtputf8:
            # (logged: a client that cannot say SMTPUTF8 loses this recipient; the admin
            # must see which and why)
            self._events.append(Reject(replies.NEED_SMTPUTF8, f"<{path.text}>... "))
            self._error(replies.NEED_SMTPUTF8)
            return
        if len(txn.rcpts) + txn.repeats >= self.max_recipients:
            self._events.append(Reject(replies.TOO_MANY_RCPTS, f"<{path.text}>... "))
            txn.overshoot += 1
            if txn.overshoot > RCPT_OVERSHOOT:
                self._error(replies.TOO_MANY_RCPTS)
            else:
                self._reply(replies.TOO_MANY_RCPTS)
            return
        if (path.address.local, path.address.domain_key) in txn.seen:
            # The same recipient again (<a@X.example> after <a@x.example>, <Postmaster>
            # after <postmaster@local.domain>): accepted once, so delivered once (Postfix
            # drops repeated recipients too). It still counts toward max_recipients, as
            # Postfix's smtpd_recipient_limit counts it: an endless run of them is not
            # a way around the limit and its 452 / error count.
            txn.repeats += 1
            self._reply(replies.RCPT_OK)
            return
        self._wait("rcpt", RcptRequest(txn, path, postmaster))

    def _bad_rcpt(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.bad_rcpts += 1
        if self.bad_rcpt_limit and self.bad_rcpts >= self.bad_rcpt_limit:
            self._reply(replies.TOO_MANY_BAD_RCPTS)
            self._events.append(Reject(replies.TOO_MANY_BAD_RCPTS))
            self._close("bad_rcpts")

    def _data(self, arg: str) -> None:
        if arg.strip():
            self._error(replies.NO_PARAMS)
            return
        txn = self.transaction
        if txn is None:
            self._error(replies.NEED_MAIL)
            return
        if not txn.rcpts:
            self._error(replies.NEED_RCPT)
            return
        self._wait("data", DataRequest(txn))

    def _data_step(self) -> bool:
        """Feed buffered input to the body reader; False when there is none."""
        reader, txn = self._reader, self.transaction
        assert reader is not None and txn is not None
        buf = self._buf
        if not buf:
            if not self._eof:
                return False
            self._events.append(MessageAborted(txn, replies.LOCAL_ERROR, reader.wire_bytes,
                                               lost=True))
            self.transaction = None
            self._close("eof", abort=False)
            return True
        if len(buf) <= CHUNK:
            chunk = bytes(buf)
            buf.clear()
        else:
            chunk = bytes(buf[:CHUNK])
            del buf[:CHUNK]
        feed = reader.feed(chunk)
        if feed.error == BARE:
            self.transaction = None
            self._bare(MessageAborted(txn, replies.BARE_LF, reader.wire_bytes))
            return True
        if feed.segments and not reader.error:
            # Once the message is known to be refused (too big, NUL, long line) nothing
            # more of it is stored; the refusal comes after the end of data.
            self._events.append(BodyData(feed.segments))
        if not feed.done:
            if reader.error == TOO_BIG and reader.wire_bytes > self.max_size + OVERSHOOT:
                # The client gains nothing by going on: say so now and hang up, rather
                # than read (and scan) whatever it sends until data_final_timeout.
                self._reply(replies.MSG_TOO_BIG)
                self._events.append(MessageAborted(txn, replies.MSG_TOO_BIG,
                                                   reader.wire_bytes))
                self.transaction = None
                self._close("size")
            return True
        self._reader = None
        if feed.leftover:
            buf[:0] = feed.leftover  # pipelined commands after the end of data
        if reader.error:
            r = _BODY_ERRORS.get(reader.error, replies.LOCAL_ERROR)
            self._events.append(MessageAborted(txn, r, reader.wire_bytes))
            self.transaction = None
            self.phase = Phase.COMMAND
            self._error(r)  # counted as message_result counts a refusal
            return True
        self._wait("commit", MessageComplete(txn, reader.size))
        return True


_HANDLERS = {
    "EHLO": Engine._ehlo, "HELO": Engine._helo, "MAIL": Engine._mail,
    "RCPT": Engine._rcpt_cmd, "DATA": Engine._data, "RSET": Engine._rset,
    "NOOP": Engine._noop, "QUIT": Engine._quit, "VRFY": Engine._vrfy,
    "HELP": Engine._help, "STARTTLS": Engine._starttls, "AUTH": Engine._auth,
}
