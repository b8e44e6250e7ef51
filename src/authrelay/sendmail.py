"""`authrelay sendmail`: local submission with the /usr/sbin/sendmail command line.

Owns the command-line interface cron, mail(1), PHP and shell scripts use:
`sendmail [-t] [-i|-oi] [-f sender] [-F fullname] [-C config] [--] [recipient ...]`
(plus -N/-R/-V DSN options, and -odi -oem -bm -v -U -m -B -h ..., accepted and ignored).
Contract: reads one message from stdin (LF or CRLF line ends; without -i a line holding a
single "." ends it, as in sendmail), stores it with CRLF line ends, prepends a `Received:`
field (RFC 5321 4.4, WITH protocol "local"), adds `From:`, `Date:` and `Message-ID:` when
missing (RFC 6409 8.1, 8.3, 8.6), and queues it exactly like a network submission,
through spool/submit.py (fsync file and directory). Exit 0 only once the message is
durable.

Who sends: the message goes to the running server over state_dir/public/submit.sock
(localsubmit.py), which runs this module's `submit()` with the caller's identity from the
kernel (SO_PEERCRED): every local user can send, as themselves (`login@hostname`; -f
only for trusted users: root, the daemon's `user`, `trusted_users`), and the server
writes the maillog line. The command reads its standard input whole first, so a slow
pipeline never holds the server. A message with NUL
characters is refused (EX_DATAERR); one with more `Received:` fields than `max_hops` is
accepted and bounced to the sender, not relayed (as Postfix does with local mail); less
free space than `queue_min_free` is EX_TEMPFAIL.

-t takes recipients from To/Cc/Bcc (Resent-To/-Cc/-Bcc when the message has Resent-
fields, RFC 5322 3.6.6) and removes Bcc; recipients given as arguments are added to them
(Postfix's reading). Unqualified addresses (`root`, as cron uses) get `@hostname`.

No server running (nobody listens on the socket): root queues directly (the sender still
root's), becoming the spool's owner (the daemon's `user`) before touching the spool, so
the queued file is readable by the daemon and nothing in the spool is ever root-owned;
anyone else gets EX_TEMPFAIL and nothing is queued.

Failure policy: exit status as sendmail's (sysexits.h), one line on stderr:
EX_USAGE 64 (bad option, no recipients), EX_DATAERR 65 (bad address, message too big or
malformed), EX_NOPERM 77 (-f by an untrusted user; mailq by a user who may not read the
queue), EX_CANTCREAT 73 (root, no server: spool not writable), EX_TEMPFAIL 75 (no server
running for a non-root user, a rate limit, spool I/O error, or no config file found: the
caller may retry; nothing is ever queued into a spool no daemon reads), EX_CONFIG 78 (bad
config). On any failure nothing is queued.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import io
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

# Everything is imported up front: after switching to the spool owner the Python install
# (e.g. under /root) may no longer be readable, so no lazy imports past that point.
from authrelay import aliases, localsubmit, maillog, replies, wiring
from authrelay.address import AddressError, parse_mailbox
from authrelay.config import (
    LOOKUP,
    Config,
    ConfigError,
    NoConfig,
    error_line,
    find_config_path,
    load_file,
)
from authrelay.policy import verdicts
from authrelay.policy.ownership import Owner
from authrelay.policy.relay import RelayPolicy
from authrelay.scheduler import queuecli
from authrelay.scheduler.bounce import make_bounce, should_notify
from authrelay.smtpd import protocol as smtp
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool
from authrelay.spool.submit import Refused, Submitter
from authrelay.types import Reply

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
PROG = "authrelay sendmail"


class Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- options

# getopt-style like sendmail's own: flags may be bundled (-ti), arguments attached
# (-fuser) or separate (-f user).
_FLAGS = set("tivmnUGSI")  # I: -I is "newaliases" in some; treated as a no-op flag
_WITH_ARG = set("fFrCNRVhBLXOobdpAq")


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


USAGE = """\
usage: sendmail [-t] [-i|-oi] [-f sender] [-F fullname] [-C config] [--] [recipient ...]
       sendmail -bp          list the queue (mailq)
       sendmail -bs          an SMTP dialogue on standard input and output
       sendmail -bi          rebuild the aliases: nothing to do ([aliases] is in the config)
       sendmail -q           deliver the queue now (-qIID: that message)

Reads one message from standard input and queues it for the running authrelay.
  -t            recipients from To:, Cc:, Bcc: (Bcc: removed)
  -i, -oi       a line with a single "." does not end the message
  -f ADDR       envelope sender (default: the invoking user @hostname; -f '' for <>)
  -F NAME       full name for the From: added when the message has none
  -C FILE       config file (default: $AUTHRELAY_CONFIG, ./authrelay.toml,
                /etc/authrelay/authrelay.toml)
  -N LIST       DSN NOTIFY (NEVER or SUCCESS,FAILURE,DELAY); -R FULL|HDRS; -V ENVID
  -B 8BITMIME   the body is 8-bit
Local names (root, postmaster...) are rewritten through the config's [aliases] table
(and aliases_file). Accepted and ignored: -odi -odb -oem -oep -m -v -U -h N -L TAG ...
Exit status (sysexits.h): 0 queued, 64 usage, 65 bad message or address, 73 spool not
writable, 75 temporary (spool I/O, no config found, mail system down), 78 bad config.
"""


def parse_args(argv: list[str]) -> Options:
    o = Options()
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a in ("--help", "-help"):
            o.mode = "help"
            return o
        if a == "--":
            o.recipients += argv[i:]
            break
        if not a.startswith("-") or a == "-":
            o.recipients.append(a)
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            if c in _FLAGS:
                if c == "t":
                    o.extract = True
                elif c == "i":
                    o.ignore_dots = True
                continue
            if c not in _WITH_ARG:
                raise Fail(EX_USAGE, f"unknown option -{c}")
            if j < len(a):
                val, j = a[j:], len(a)
            elif c == "q":
                val = ""
            elif i < len(argv):
                val, i = argv[i], i + 1
            else:
                raise Fail(EX_USAGE, f"option -{c} requires an argument")
            _option(o, c, val)
    return o


def _option(o: Options, c: str, val: str) -> None:
    if c in "fr":
        o.sender = val
    elif c == "F":
        o.fullname = val
    elif c == "C":
        o.config = val
    elif c == "N":
        o.notify = val.upper()
    elif c == "R":
        o.ret = val.upper()
    elif c == "V":
        o.envid = val
    elif c == "B":
        o.body_8bit = val.upper() == "8BITMIME"
    elif c == "o":
        # -oi = -i; -oem/-oep/-oeq, -odi/-odb/-odq and the rest change nothing here.
        if val == "i":
            o.ignore_dots = True
    elif c == "b":
        if val in ("m", ""):
            o.mode = "m"
        elif val in ("p", "i", "s"):
            o.mode = val
        elif val in ("d", "D"):
            raise Fail(EX_USAGE, f"-b{val}: the daemon is `authrelay serve`")
        else:
            raise Fail(EX_USAGE, f"-b{val} is not supported (-bm send, -bp list the queue, "
                                 "-bs SMTP on stdin, -bi aliases)")
    elif c == "q":
        o.mode, o.queue_arg = "q", val
    # -h hops, -L tag, -X logfile, -O option, -d debug, -p protocol, -A submit: ignored


# --------------------------------------------------------------------------- message

_HEADER = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


class LineReader(Protocol):
    """What a message is read from: stdin, or the local socket's frames (localsubmit.py)."""

    def readline(self, limit: int = -1, /) -> bytes: ...


def _lines(stream: LineReader, ignore_dots: bool) -> Iterator[bytes]:
    """Message lines with CRLF line ends; stops at a lone '.' unless -i."""
    while True:
        line = stream.readline(65536)
        if not line:
            return
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        elif len(line) == 65536:  # a very long line: pass it on in pieces, no line end
            yield line.replace(b"\r", b"\r\n")
            continue
        if not ignore_dots and line == b".":
            return
        # A bare CR inside a line is a line end too: the spool holds CRLF text only.
        yield line.replace(b"\r", b"\r\n") + b"\r\n"


def _unfold(headers: list[bytes]) -> list[tuple[str, str, int, int]]:
    """(lower-cased name, unfolded value, first line index, end index) per field."""
    out: list[tuple[str, str, int, int]] = []
    i = 0
    while i < len(headers):
        start = i
        name, _, value = headers[i].partition(b":")
        i += 1
        while i < len(headers) and headers[i][:1] in (b" ", b"\t"):
            value += b" " + headers[i].strip()
            i += 1
        out.append((name.strip().decode("ascii", "replace").lower(),
                    value.decode("utf-8", "surrogateescape").strip(), start, i))
    return out


def _qualify(addr: str, cfg: Config) -> str:
    return addr if "@" in addr else f"{addr}@{cfg.hostname}"


def _check_address(addr: str, where: str) -> str:
    try:
        return str(parse_mailbox(addr))
    except AddressError as e:
        raise Fail(EX_DATAERR, f"{where}: bad address <{addr}>: {e.reply.text}") from None


def _addresses(values: list[str], cfg: Config, where: str) -> list[str]:
    out = []
    for _name, addr in email.utils.getaddresses(values):
        addr = addr.strip()
        if not addr:
            continue  # e.g. "undisclosed-recipients:;"
        out.append(_check_address(_qualify(addr, cfg), where))
    return out


# --------------------------------------------------------------------------- config / user

def _load_config(explicit: str | None) -> Config:
    """The daemon's config by the usual lookup; none found: EX_TEMPFAIL, nothing queued.
    (A spool under ./var that no daemon reads would lose the mail without a word.)"""
    path = find_config_path(explicit)
    if path is None:
        raise NoConfig(f"no config file found (looked for {LOOKUP}); message not queued")
    return load_file(path)


def _become_spool_owner(cfg: Config) -> None:
    """As root, write the spool as its owner (the daemon's user), never as root."""
    if os.geteuid() != 0:
        return
    for p in (cfg.spool_dir, cfg.state_path):
        try:
            st = p.stat()
        except OSError:
            continue
        if st.st_uid != 0:
            os.setgroups([])
            os.setgid(st.st_gid)
            os.setuid(st.st_uid)
        return


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
        raise Fail(EX_NOPERM, f"-f <{sender}>: only trusted users may set the envelope "
                              f"sender ({who.login} is not in trusted_users)")
    return sender


def submit(opts: Options, stdin: LineReader, cfg: Config, who: Identity, *,
           submitter: Submitter | None = None,
           check: Callable[[Envelope], None] | None = None) -> str:
    """Queue one message from `who`; returns its queue id. Raises Fail. `submitter`: the
    running server's (local socket); `check(env)`: the server's per-user limits, called
    once the envelope is known and before anything is stored."""
    login, gecos = who.login, who.gecos
    # The header section (bounded) is read first: -t needs it before the envelope exists.
    lines = _lines(stdin, opts.ignore_dots)
    headers: list[bytes] = []
    first_body: bytes | None = None
    size = 0
    for n, line in enumerate(lines):
        if n == 0 and line.startswith(b"From ") and not _HEADER.match(line):
            continue  # an mbox separator line, as Postfix drops it
        if line == b"\r\n":
            first_body = line
            break
        if _HEADER.match(line) or (headers and line[:1] in (b" ", b"\t")):
            headers.append(line[:-2])
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise Fail(EX_DATAERR, "header section too large")
            continue
        first_body = b"\r\n" + line  # no blank line before the body: supply one
        break
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
            if name in ("bcc", "resent-bcc"):
                drop.update(range(start, end))  # RFC 5322 3.6.3: Bcc is not passed on
    seen: set[str] = set()
    unique: list[str] = []
    for r in rcpts:  # the first of each, in order
        if r.lower() not in seen:
            seen.add(r.lower())
            unique.append(r)
    rcpts = unique
    if not rcpts:
        raise Fail(EX_USAGE, "no recipients (give them as arguments, or use -t)")
    rcpts = _expand(cfg, rcpts)

    sender = _envelope_sender(opts.sender, who, cfg)
    _check_dsn(opts)

    out_headers = [h for i, h in enumerate(headers) if i not in drop]
    if not any(f[0] == "from" for f in fields):
        name = opts.fullname if opts.fullname is not None else gecos
        addr = sender or f"{login}@{cfg.hostname}"
        value = email.utils.formataddr((name, addr)) if name else addr
        out_headers.append(f"From: {value}".encode("utf-8", "replace"))

    env = Envelope(
        queue_id=new_queue_id(), sender=sender,
        recipients=[Recipient(r, notify=opts.notify) for r in rcpts],
        client_ip="127.0.0.1", helo="localhost", auth_user="", protocol="local",
        listener="sendmail", envid=opts.envid, ret=opts.ret, body_8bit=opts.body_8bit,
        smtputf8=not all(a.isascii() for a in (sender, *rcpts)),
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


def _expand(cfg: Config, rcpts: list[str]) -> list[str]:
    """Local names through [aliases] / aliases_file; every result checked."""
    return [_check_address(a, "alias") for a in aliases.expand(cfg, rcpts)]


def queue_message(cfg: Config, env: Envelope, pieces: Iterator[bytes], who: Identity,
                  submitter: Submitter | None = None) -> str:
    """Store one message (CRLF text, headers first) for `env` through the one accept path
    (spool/submit.py: Received:, the missing Date:/Message-ID:, NUL and hop checks, the
    DKIM hook, fsync); returns the queue id. Raises Fail. Over the hop limit the message
    is bounced to its sender instead (exit 0, as Postfix does with local mail)."""
    sub = submitter if submitter is not None else _direct_submitter(cfg)
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
    try:
        total = 0
        for piece in pieces:
            total += len(piece)
            if limit and total > limit:
                raise Fail(EX_DATAERR, f"message too big (limit {limit} bytes)")
            draft.write(piece)
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
            raise Fail(EX_DATAERR, "message contains NUL characters") from None
        if e.reply.code == 452:
            raise Fail(EX_TEMPFAIL, f"spool: {e.reason}") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise Fail(EX_CANTCREAT, f"cannot write to the spool {spool.queue_dir}: "
                                     "Permission denied (run as root or as the authrelay "
                                     "user)") from None
        raise Fail(EX_TEMPFAIL, f"spool write failed: {e.reason}") from None
    except BaseException:
        draft.abort()
        raise
    return env.queue_id


def _direct_submitter(cfg: Config) -> Submitter:
    """No server running (root only): write the spool from this process."""
    spool = Spool(cfg.spool_dir)
    try:
        spool.ensure_dirs()
    except PermissionError as e:
        raise Fail(EX_CANTCREAT, f"cannot create {cfg.spool_dir}: {e.strerror}") from None
    except OSError as e:
        raise Fail(EX_TEMPFAIL, f"spool {cfg.spool_dir}: {e.strerror}") from None
    ml = _maillog(cfg)
    return wiring.submitter(cfg, spool, ml)


def _bounce_hops(sub: Submitter, env: Envelope, headers: bytes, e: Refused) -> None:
    """Queue a DSN (RFC 3464) for every recipient instead of the looping message."""
    for r in env.recipients:
        r.state, r.last_code = "failed", e.reply.code
        r.last_reply = f"{e.reply.code} {e.reply.enhanced} {e.reply.text}"
    for r in env.recipients:
        sub.maillog.bounced(env.queue_id, r.address, None, 0.0, 0, e.reply.enhanced,
                            f"{r.last_reply}: {e.reason}")
    if not should_notify(env, None, "failed"):
        return  # the null sender: nobody to tell
    benv, data = make_bounce(env, env.recipients, headers, sub.cfg.hostname, "failed")
    bdraft = sub.begin(benv, add_missing=False, check_content=False)
    bdraft.write(data)
    try:
        bdraft.commit_blocking(origin=env.queue_id)
    except Refused as be:
        raise Fail(EX_TEMPFAIL, f"cannot queue the bounce: {be.reason}") from None
    sub.maillog.notification(env.queue_id, "failed", benv.queue_id)


def _maillog(cfg: Config) -> maillog.MailLog:
    # Only to a shared target: stdout/stderr would be mail output for cron. Otherwise the
    # lines are dropped (a MailLog on /dev/null, never None: the DKIM signer would then
    # write its dkim= notes to the process-wide maillog, this command's stdout).
    discard = f"file:{os.devnull}"
    if not (cfg.log.target == "syslog" or cfg.log.target.startswith("file:")):
        return maillog.MailLog(discard)
    try:
        return maillog.configure(cfg.log.target, cfg.log.format)
    except Exception:  # logging must not fail a queued message
        return maillog.MailLog(discard)


# --------------------------------------------------------------------------- -bs

Deliver = Callable[[Options, BinaryIO], str]


def smtp_dialogue(cfg: Config, stdin: BinaryIO, stdout: BinaryIO, deliver: Deliver) -> int:
    """-bs: an SMTP dialogue on stdin/stdout with the server's own engine
    (smtpd/protocol.py), as sendmail -bs: the local user needs no AUTH (no TLS on a pipe),
    every accepted message is queued like `sendmail` queues it, by `deliver` (through the
    running server, or directly by root): MAIL FROM is the -f of the command line, so only
    a trusted user may name another sender. Returns 0 (per-message results are in the
    replies)."""
    policy = RelayPolicy(cfg)
    eng = smtp.Engine(cfg, mode="smtp", trusted=True, auth_available=False,
                      tls_available=False)
    eng.greet()
    body: list[bytes] = []
    fd = stdin.fileno()

    def flush() -> None:
        data = eng.data_to_send()
        if data:
            stdout.write(data)
            stdout.flush()

    while True:
        ev = eng.next_event()
        if ev is smtp.NEED_DATA:
            flush()
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            eng.receive_data(chunk)  # b"": end of input
        elif ev is smtp.CLOSED:
            flush()
            return EX_OK
        elif ev is smtp.CONTINUE or ev is smtp.PAUSED:
            continue
        elif isinstance(ev, smtp.MailRequest):
            # As a session decides for a client without AUTH (the sender is checked as
            # the invoker's when the message is queued).
            eng.policy_result(verdicts.mail_verdict(cfg.auth.sender_policy,
                                                    ev.transaction.sender.address, "", ()))
        elif isinstance(ev, smtp.RcptRequest):
            # A local user is trusted: any recipient.
            refusal = verdicts.rcpt_verdict(policy, ev.address, postmaster=ev.postmaster,
                                            authenticated=False, trusted=True)
            eng.policy_result(refusal, bad_recipient=refusal is not None)
        elif isinstance(ev, smtp.DataRequest):
            body = []
            eng.policy_result(None)
        elif isinstance(ev, smtp.BodyData):
            body.extend(ev.segments)
        elif isinstance(ev, smtp.MessageAborted):
            body = []
        elif isinstance(ev, smtp.MessageComplete):
            eng.message_result(_queue_dialogue_message(ev.transaction, body, deliver))
            body = []
        elif isinstance(ev, smtp.Delay):
            eng.resume()  # a local user's own mistakes need no tar pit
        elif isinstance(ev, smtp.CloseConnection):
            flush()
        # Reject / LogWarning: nothing to do for a local dialogue


def _queue_dialogue_message(t: smtp.Transaction, body: list[bytes],
                            deliver: Deliver) -> Reply:
    notify = {(r.params.get("NOTIFY") or "").upper() for r in t.rcpts}
    opts = Options(ignore_dots=True, sender=t.sender.text,
                   recipients=[r.text for r in t.rcpts], envid=t.envid, ret=t.ret,
                   body_8bit=t.body_8bit, notify=notify.pop() if len(notify) == 1 else "")
    try:
        qid = deliver(opts, io.BytesIO(b"".join(body)))
    except Fail as e:
        if e.code in (EX_DATAERR, EX_NOPERM, EX_USAGE):
            code, enh = (550, "5.7.1") if e.code == EX_NOPERM else (552, "5.3.4")
        else:
            code, enh = 451, "4.3.0"
        return Reply(code, enh, str(e))
    except Exception:  # never a traceback on the dialogue
        return Reply(451, "4.3.0", "Local error in processing")
    return Reply(250, "2.0.0", f"Ok: queued as {qid}")


# --------------------------------------------------------------------------- delivery

def _where(explicit: str | None) -> tuple[str, Config | None]:
    """(the server's submission socket, the config when this user may read it). A config
    this user may not read (0640, it holds a database password) is normal for everyone
    but root and the daemon's group: then the packaged state dir's socket, or
    $AUTHRELAY_SUBMIT_SOCKET."""
    override = os.environ.get(localsubmit.SOCKET_ENV)
    path = find_config_path(explicit)
    if path is None:
        raise NoConfig(f"no config file found (looked for {LOOKUP}); message not queued")
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return override or localsubmit.DEFAULT_SOCKET, None
    cfg = load_file(path)
    return override or str(localsubmit.socket_path(cfg)), cfg


def _deliver(opts: Options, message: BinaryIO, explicit: str | None, invoker: int) -> str:
    """Through the running server; with none running, root (only) queues directly."""
    try:
        sock, cfg = _where(explicit)
    except NoConfig as e:
        raise Fail(EX_TEMPFAIL, str(e)) from None
    except ConfigError as e:
        raise Fail(EX_CONFIG, error_line(e)) from None
    try:
        resp = localsubmit.send(sock, opts, message)
    except localsubmit.NotRunning:
        if invoker != 0 or cfg is None:
            raise Fail(EX_TEMPFAIL, "the mail system is not running (no authrelay server "
                                    f"on {sock}); message not queued, try again later") \
                from None
        return _direct(opts, message, cfg, invoker)
    except PermissionError:
        raise Fail(EX_TEMPFAIL, f"{sock}: permission denied (the server's state dir must "
                                "be 0711); message not queued, try again later") from None
    except OSError as e:
        raise Fail(EX_TEMPFAIL, f"{sock}: {e.strerror or e}; message not queued") from None
    if resp["code"] != EX_OK:
        raise Fail(resp["code"], str(resp.get("error", "refused")))
    return str(resp.get("queue_id", ""))


def _direct(opts: Options, message: BinaryIO, cfg: Config, invoker: int) -> str:
    """No server: root writes the spool itself, as the spool's owner (never root-owned
    files in the spool). The sender is still root's, decided before the switch."""
    who = identity(invoker, cfg)
    try:
        _become_spool_owner(cfg)
    except (OSError, KeyError) as e:
        raise Fail(EX_NOPERM, f"cannot switch to the spool owner: {e}") from None
    message.seek(0)
    return submit(opts, message, cfg, who)


# --------------------------------------------------------------------------- -bp, -q

def _queue_args(cfg: Config, **kw: object) -> argparse.Namespace:
    return argparse.Namespace(config=cfg.source, json=False, **kw)


def main(argv: list[str], config: str | None = None) -> int:
    """`authrelay sendmail ARGS`: 0 when queued, a sysexits code otherwise."""
    invoker = os.getuid()  # the sender, whatever this process becomes later
    try:
        opts = parse_args(argv)
        if opts.mode == "help":
            sys.stdout.write(USAGE)
            return EX_OK
        if opts.mode == "i":  # newaliases: [aliases] is read at each use; nothing to build
            return EX_OK
        explicit = opts.config or config
        if opts.mode == "s":
            try:
                _sock, dcfg = _where(explicit)
            except NoConfig as e:
                raise Fail(EX_TEMPFAIL, str(e)) from None
            except ConfigError as e:
                raise Fail(EX_CONFIG, error_line(e)) from None
            return smtp_dialogue(dcfg or Config(), sys.stdin.buffer, sys.stdout.buffer,
                                 lambda o, m: _deliver(o, m, explicit, invoker))
        if opts.mode in ("p", "q"):
            try:
                cfg = _load_config(explicit)
            except NoConfig as e:
                raise Fail(EX_TEMPFAIL, str(e)) from None
            except ConfigError as e:
                raise Fail(EX_CONFIG, error_line(e)) from None
            try:
                if opts.mode == "p":  # mailq
                    return queuecli.cmd_list(_queue_args(cfg))
                arg = opts.queue_arg  # -q: deliver now: the running scheduler does it
                qid = arg[1:] if arg[:1] == "I" else None
                return queuecli.cmd_flush(_queue_args(cfg, id=qid))
            except PermissionError:
                raise Fail(EX_NOPERM, "the queue is readable by root and the authrelay "
                                      "user only") from None
        message = localsubmit.buffer_stdin(sys.stdin.buffer)
        _deliver(opts, message, explicit, invoker)
    except Fail as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    return EX_OK


def _cmd(args: argparse.Namespace) -> int:
    return main(list(args.args), config=args.config)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Reached as `authrelay -c FILE sendmail ...`; plain `authrelay sendmail ...` and a
    # /usr/sbin/sendmail link are handed to main() before argparse (cli.py).
    p = sub.add_parser("sendmail", help="queue a message from stdin (/usr/sbin/sendmail "
                       "compatible: -t -i -f -F ...)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd)
