"""Local mail: one message from a local user, made into an envelope and queued.

Owns what `authrelay sendmail` and the server's local socket (localsubmit.py) share: the
sendmail options (`Options`), the exit codes (sysexits.h) and `Fail`, who submits
(`Identity`, from the kernel's uid, never from the message), and `submit()`: the message
read from a line stream (LF or CRLF; a lone "." ends it unless -i), its recipients (the
arguments, or -t: To/Cc/Bcc or the Resent- set), Bcc, Resent-Bcc, Return-Path and
Content-Length removed (with or without -t, as Postfix does; RFC 5322 3.6.3), lines over
max_text_line_length (998) octets broken with CRLF SPACE as Postfix's smtp client breaks
them (longlines.py; RFC 5322 2.1.1), aliases expanded, `From:` added when missing (RFC
6409 8.1), the envelope sender (-f only for trusted users), the DSN options checked as
SMTP takes them (RFC 3461 4.1, 4.3, 4.4), then `queue_message()` through spool/submit.py
(Received:, Date:, Message-ID:, NUL and hop checks, DKIM, fsync). It sits below both
sendmail.py (the command line, the client) and localsubmit.py (the server): neither
imports the other's internals, and nothing here builds parts (the Submitter is handed
in, made by the caller: the running server's, or sendmail.py's direct one through
wiring.py).

Contract: `submit()` returns the queue id only once the message is durable; on any error
nothing is queued (the draft is aborted). The Submitter is asked for (`submitter()`) only
once the envelope is known and `check(env)` passed, so a refused message touches no spool.

Failure policy: every refusal is `Fail(code, line)`: EX_USAGE (no recipients, bad DSN
option), EX_DATAERR (bad address, too big, NUL, header section over 1 MiB), EX_NOPERM
(-f by an untrusted user), EX_CANTCREAT (spool not writable), EX_TEMPFAIL (no space,
spool I/O). A message over the hop limit is accepted and bounced to its sender (RFC 3464),
as Postfix does with local mail; the refusal's maillog `reject=` line is the same as for
SMTP. RFC 5321 4.4 (Received:), RFC 6409 8.
"""

from __future__ import annotations

import email.utils
import errno
import pwd
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from authrelay import aliases, replies
from authrelay.address import AddressError, orcpt_of, parse_mailbox
from authrelay.config import Config
from authrelay.longlines import LineBreaker
from authrelay.policy.ownership import Owner
from authrelay.scheduler.bounce import make_bounce, should_notify
from authrelay.smtpd import protocol as smtp
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.submit import Refused, Submitter

EX_UNAVAILABLE = 69

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

MAX_HEADER_BYTES = 1024 * 1024
# How much of a refused address the refusal (the client's error, the maillog line) quotes:
# a path is at most 256 octets (RFC 5321 4.5.3.1.3), while one read from a header under
# -t may be as long as the header section, and was quoted whole.
SHOWN = 256
# The message goes to the spool's draft in pieces of about this size: a line each cost
# the draft's cleanup and write (~2 us: seconds per MiB of one-byte lines, in the master).
WRITE_BATCH = 64 * 1024


class Fail(Exception):
    """A refusal: `code` the sendmail exit code; `logged`: its maillog line (the queue
    id's `reject=`) is written already, so the caller writes none of its own."""

    def __init__(self, code: int, message: str, *, logged: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.logged = logged


@dataclass
class Options:
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    sender: str | None = None  # -f / -r
    fullname: str | None = None  # -F
    config: str | None = None  # -C
    notify: str = ""  # -N
    ret: str = ""  # -R
    envid: str = ""  # -V
    body_8bit: bool = False  # -B 8BITMIME
    mode: str = "m"  # -b: m send (default), p queue list, i aliases (no-op), s SMTP; q: -q
    queue_arg: str = ""  # -q's value: "", an interval, I<id>...
    recipients: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- message

LINE_PIECE = 65536  # a message line is read in pieces of at most this many octets
_HEADER = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
_DROPPED = ("bcc", "resent-bcc", "return-path", "content-length")


class LineReader(Protocol):
    """What a message is read from: stdin, or the local socket's frames (localsubmit.py)."""

    def readline(self, limit: int = -1, /) -> bytes: ...


def _lines(stream: LineReader, ignore_dots: bool) -> Iterator[bytes]:
    """Message lines with CRLF line ends; stops at a lone '.' unless -i. A line longer
    than LINE_PIECE comes in pieces, joined again in the spool."""
    cr_ended = False  # the last piece ended in a CR: an LF right after is its CRLF's
    mid = False  # the last piece ended inside its line: what follows is no line of its own
    while True:
        line = stream.readline(LINE_PIECE)
        if cr_ended:
            cr_ended = False
            if line[:1] == b"\n":  # (its line end was passed on with the CR)
                line = line[1:]
                if not line:
                    continue
        if not line:
            return
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        elif len(line) == LINE_PIECE:  # a very long line: pass it on in pieces, no line end
            cr_ended = line.endswith(b"\r")
            mid = not cr_ended
            yield line.replace(b"\r", b"\r\n")
            continue
        if not ignore_dots and line == b"." and not mid:
            return
        mid = False
        # A bare CR inside a line is a line end too: the spool holds CRLF text only.
        yield line.replace(b"\r", b"\r\n") + b"\r\n"


def _unfold(headers: list[bytes]) -> list[tuple[str, str, int, int]]:
    """(lower-cased name, unfolded value, first line index, end index) per field."""
    out: list[tuple[str, str, int, int]] = []
    i = 0
    while i < len(headers):
        start = i
        name, _, first = headers[i].partition(b":")
        i += 1
        parts = [first]  # joined once: a value grown a fold at a time was copied per fold
        while i < len(headers) and headers[i][:1] in (b" ", b"\t"):
            parts.append(headers[i].strip())
            i += 1
        value = b" ".join(parts)
        out.append((name.strip().decode("ascii", "replace").lower(),
                    value.decode("utf-8", "surrogateescape").strip(), start, i))
    return out


def display_name(name: str) -> str:
    """The full name for the `From:` we add (-F, or the GECOS name) as one line: every
    control, format or line-separator character (CR, LF, TAB, U+2028...) becomes a space.
    formataddr() quotes a name but keeps a CR LF inside the quotes, so a -F value (often
    a web form's name field) could otherwise end the From: field and add fields of its
    own (`Bcc:`, `Reply-To:`) to the message (sendmail and Postfix keep the name on the
    one line too)."""
    flat = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
                   for c in name)
    return " ".join(flat.split()) if flat != name else name


def _qualify(addr: str, cfg: Config) -> str:
    return addr if "@" in addr else f"{addr}@{cfg.hostname}"


def shown(addr: str) -> str:
    """`addr` as a refusal quotes it: at most SHOWN characters of it."""
    return addr if len(addr) <= SHOWN else f"{addr[:SHOWN]}... ({len(addr)} characters)"


def _check_address(addr: str, where: str) -> str:
    try:
        return str(parse_mailbox(addr))
    except AddressError as e:
        raise Fail(EX_DATAERR, f"{where}: bad address <{shown(addr)}>: {e.reply.text}"
                   ) from None


def _addresses(values: list[str], cfg: Config, where: str) -> list[str]:
    try:
        parsed = email.utils.getaddresses(values)
    except RecursionError:  # comments nested ~1,000 deep: "(((..." recurses per level
        raise Fail(EX_DATAERR, f"{where}: not an address list (comments nested too "
                               "deep)") from None
    out = []
    for _name, addr in parsed:
        addr = addr.strip()
        if not addr:
            continue  # e.g. "undisclosed-recipients:;"
        out.append(_check_address(_qualify(addr, cfg), where))
    return out



@dataclass(frozen=True)
class Identity:
    """Who submits: decided by the kernel (getuid, or SO_PEERCRED on the server's local
    socket), never by the message or the command line."""

    uid: int
    login: str
    gecos: str = ""
    trusted: bool = False  # may set the envelope sender with -f (sendmail's class t)


def identity(uid: int, cfg: Config, *, server_uid: int | None = None) -> Identity:
    """The local user `uid`: login and GECOS name from the password database. Trusted
    (may use -f / MAIL FROM freely): root, the daemon's own user, and `trusted_users`."""
    try:
        pw = pwd.getpwuid(uid)
        login, gecos = pw.pw_name, pw.pw_gecos.split(",")[0]
    except KeyError:
        login, gecos = f"uid{uid}", ""
    trusted = uid == 0 or uid == server_uid or login in cfg.trusted_users
    return Identity(uid, login, gecos, trusted)


def _envelope_sender(opts_sender: str | None, who: Identity, cfg: Config) -> str:
    """-f as sendmail's trusted users have it: root, the daemon's user and
    `trusted_users` set any sender (or <>); anyone else only their own address, so the
    envelope sender of local mail always names the user who sent it."""
    own = f"{who.login}@{cfg.hostname}"
    if opts_sender is None:
        return own
    if opts_sender in ("", "<>"):
        sender = ""
    else:
        sender = _check_address(_qualify(opts_sender.strip("<>"), cfg), "-f")
    if not who.trusted and sender.lower() != own.lower():
        raise Fail(EX_NOPERM, f"-f <{shown(sender)}>: only trusted users may set the envelope "
                              f"sender ({who.login} is not in trusted_users)")
    return sender


def submit(opts: Options, stdin: LineReader, cfg: Config, who: Identity, *,
           submitter: Callable[[], Submitter],
           check: Callable[[Envelope], None] | None = None) -> str:
    """Queue one message from `who`; returns its queue id. Raises Fail. `submitter()`:
    the Submitter to store through (the running server's, or sendmail's direct one),
    asked for once the envelope is known; `check(env)`: the server's per-user limits,
    called before that, so nothing is stored when it raises."""
    login, gecos = who.login, who.gecos
    # The header section (bounded) is read first: -t needs it before the envelope exists.
    lines = _lines(stdin, opts.ignore_dots)
    headers: list[bytes] = []
    first_body: bytes | None = None
    size = 0
    longer: list[bytes] = []  # the pieces so far of a header line longer than LINE_PIECE
    for n, line in enumerate(lines):
        whole = line.endswith(b"\r\n")  # else the first pieces of a longer line
        if longer:  # (a header line's: joined, as Postfix's cleanup joins it)
            longer.append(line)
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise Fail(EX_DATAERR, "header section too large")
            if whole:
                headers.append(b"".join(longer)[:-2])
                longer = []
            continue
        if n == 0 and line.startswith(b"From ") and not _HEADER.match(line):
            continue  # an mbox separator line, as Postfix drops it
        if line == b"\r\n":
            first_body = line
            break
        if _HEADER.match(line) or (headers and line[:1] in (b" ", b"\t")):
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise Fail(EX_DATAERR, "header section too large")
            if whole:
                headers.append(line[:-2])
            else:
                longer.append(line)
            continue
        first_body = b"\r\n" + line  # no blank line before the body: supply one
        break
    if longer:  # the message ended in it
        headers.append(b"".join(longer))
    fields = _unfold(headers)

    rcpts: list[str] = []
    for arg in opts.recipients:
        if "," in arg or "<" in arg:  # "a@x, Bob <b@y>": an address list, as sendmail takes
            rcpts += _addresses([arg], cfg, "recipient")
        else:
            rcpts.append(_check_address(_qualify(arg.strip(), cfg), "recipient"))
    drop: set[int] = set()
    if opts.extract:
        resent = any(f[0].startswith("resent-") for f in fields)
        names = (("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc"))
        for name, value, _start, _end in fields:
            if name in names:
                rcpts += _addresses([value], cfg, name.title())
    for name, _v, start, end in fields:
        # With or without -t (as Postfix's message_drop_headers): Bcc is not passed on
        # (RFC 5322 3.6.3; a mail program that names its recipients as arguments may
        # leave it in), nor a Return-Path (RFC 5321 4.4: added at final delivery) or a
        # Content-Length of a local mailbox format.
        if name in _DROPPED:
            drop.update(range(start, end))
    seen: set[str] = set()
    unique: list[str] = []
    for r in rcpts:  # the first of each, in order
        if r.lower() not in seen:
            seen.add(r.lower())
            unique.append(r)
    rcpts = unique
    if not rcpts:
        raise Fail(EX_USAGE, "no recipients (give them as arguments, or use -t)")
    expanded = _expand(cfg, rcpts, opts.notify)

    sender = _envelope_sender(opts.sender, who, cfg)
    _check_dsn(opts)

    out_headers = [h for i, h in enumerate(headers) if i not in drop]
    if not any(f[0] == "from" for f in fields):
        name = display_name(opts.fullname if opts.fullname is not None else gecos)
        addr = sender or f"{login}@{cfg.hostname}"
        value = email.utils.formataddr((name, addr)) if name else addr
        out_headers.append(f"From: {value}".encode("utf-8", "replace"))

    env = Envelope(
        queue_id=new_queue_id(), sender=sender,
        recipients=expanded,
        client_ip="127.0.0.1", helo="localhost", auth_user="", protocol="local",
        listener="sendmail", envid=opts.envid, ret=opts.ret, body_8bit=opts.body_8bit,
        smtputf8=not all(a.isascii() for a in (sender, *(x.address for x in expanded))),
    )

    def pieces() -> Iterator[bytes]:
        yield b"".join(h + b"\r\n" for h in out_headers)
        yield first_body if first_body is not None else b"\r\n"
        yield from lines

    if check is not None:
        check(env)
    return queue_message(cfg, env, pieces(), who, submitter)


def _check_dsn(opts: Options) -> None:
    """-N, -R, -V as SMTP's MAIL/RCPT parameters take them (RFC 3461 4.1, 4.3, 4.4): the
    delivery client writes them into its MAIL and RCPT commands as they are, so a value
    with a CR LF or a space would inject commands into the next hop's session."""
    if opts.notify and not smtp.notify_ok(opts.notify):
        raise Fail(EX_USAGE, "-N: NEVER or a list of SUCCESS, FAILURE, DELAY")
    if opts.ret and opts.ret.upper() not in ("FULL", "HDRS"):
        raise Fail(EX_USAGE, "-R: FULL or HDRS")
    if opts.envid and not smtp.xtext_ok(opts.envid, 100):
        raise Fail(EX_USAGE, "-V: an envelope id is at most 100 printable ASCII characters "
                             "(xtext: no spaces, + and = as +XX)")


def _expand(cfg: Config, rcpts: list[str], notify: str) -> list[Recipient]:
    """Local names through [aliases] / aliases_file; every result checked. An alias's
    target carries ORCPT naming the recipient given (`@hostname` added to a bare name),
    as one received over SMTP does (spool/submit.py): its DSN says which one it was."""
    out: list[Recipient] = []
    seen: set[str] = set()
    for r in rcpts:
        given = r if "@" in r else f"{r}@{cfg.hostname}"
        for a in aliases.expand(cfg, [r]):
            if a.lower() not in seen:
                seen.add(a.lower())
                orcpt = "" if a.lower() == given.lower() else orcpt_of(given)
                out.append(Recipient(_check_address(a, "alias"), notify=notify,
                                     orcpt=orcpt))
    return out


def queue_message(cfg: Config, env: Envelope, pieces: Iterator[bytes], who: Identity,
                  submitter: Callable[[], Submitter]) -> str:
    """Store one message (CRLF text, headers first) for `env` through the one accept path
    (spool/submit.py: Received:, the missing Date:/Message-ID:, NUL and hop checks, the
    DKIM hook, fsync); returns the queue id. Raises Fail. Over the hop limit the message
    is bounced to its sender instead (exit 0, as Postfix does with local mail)."""
    sub = submitter()
    spool = sub.spool
    if not sub.space_ok():
        raise Fail(EX_TEMPFAIL, f"{replies.NO_STORAGE.text} in {spool.queue_dir} "
                                "(limits.queue_min_free)")
    # Every local user can submit (the server's socket), so only a trusted one (root, the
    # daemon's user, trusted_users) lends our DKIM signature to any From:; anyone else's
    # message is signed only when its From:/Sender: is the user's own login@hostname, and
    # otherwise queued unsigned (never refused: sendmail takes any From: from cron).
    owner = None if who.trusted else Owner.of(who.login, [f"{who.login}@{cfg.hostname}"])
    draft = sub.begin(env, add_missing=True, local_uid=who.uid, owner=owner,
                      refuse_unowned=False)
    limit = cfg.limits.max_message_size
    # RFC 5322 2.1.1: what leaves the relay has no line over max_text_line_length (998)
    # octets; the SMTP listeners refuse such a line, a local program's (cron's, a
    # script's) is broken as Postfix's smtp client breaks it, here before the DKIM
    # signer, so the signature covers what is sent (longlines.py).
    breaker = LineBreaker(cfg.limits.max_text_line_length)
    try:
        total = 0
        batch: list[bytes] = []
        held = 0
        for piece in map(breaker.feed, pieces):
            total += len(piece)
            if limit and total > limit:
                raise Fail(EX_DATAERR, f"message too big (limit {limit} bytes)")
            batch.append(piece)
            held += len(piece)
            if held >= WRITE_BATCH:
                draft.write(b"".join(batch))
                batch.clear()
                held = 0
        if batch:
            draft.write(b"".join(batch))
        draft.commit_blocking(uid=who.uid, user=who.login)
    except Refused as e:
        draft.abort()
        if e.reply is replies.TOO_MANY_HOPS:
            _bounce_hops(sub, env, draft.header_section, e)
            return env.queue_id
        sub.maillog.reject(e.reply, relay="local", queue_id=env.queue_id,  # as for SMTP
                           reason=e.reason if e.reason != e.reply.text else None,
                           uid=who.uid, user=who.login)
        if e.reply is replies.MSG_NUL:
            raise Fail(EX_DATAERR, "message contains NUL characters", logged=True) from None
        if e.reply.code == 452:
            raise Fail(EX_TEMPFAIL, f"spool: {e.reason}", logged=True) from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise Fail(EX_CANTCREAT, f"cannot write to the spool {spool.queue_dir}: "
                                     "Permission denied (run as root or as the authrelay "
                                     "user)", logged=True) from None
        raise Fail(EX_TEMPFAIL, f"spool write failed: {e.reason}", logged=True) from None
    except BaseException:
        draft.abort()
        raise
    if breaker.broken:
        sub.maillog.warning(f"lines over {breaker.limit} octets broken with CRLF SPACE "
                            "(RFC 5322 2.1.1)", queue_id=env.queue_id, uid=who.uid,
                            user=who.login)
    return env.queue_id


def _bounce_hops(sub: Submitter, env: Envelope, headers: bytes, e: Refused) -> None:
    """Queue a DSN (RFC 3464) for every recipient instead of the looping message."""
    for r in env.recipients:
        r.state, r.last_code = "failed", e.reply.code
        r.last_reply = f"{e.reply.code} {e.reply.enhanced} {e.reply.text}"
    for r in env.recipients:
        sub.maillog.bounced(env.queue_id, r.address, None, 0.0, 0, e.reply.enhanced,
                            f"{r.last_reply}: {e.reason}")
    # The null sender: nobody to tell; -N never (or without failure): not asked for
    # (RFC 3461 4.1), per recipient as the scheduler's bounces.
    report = [r for r in env.recipients if should_notify(env, r, "failed")]
    if not report:
        return
    benv, data = make_bounce(env, report, headers, sub.cfg.hostname, "failed")
    bdraft = sub.begin(benv, add_missing=False, check_content=False)
    bdraft.write(data)
    try:
        bdraft.commit_blocking(origin=env.queue_id)
    except Refused as be:
        raise Fail(EX_TEMPFAIL, f"cannot queue the bounce: {be.reason}") from None
    sub.maillog.notification(env.queue_id, "failed", benv.queue_id)
