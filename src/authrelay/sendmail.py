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
(localsubmit.py), which runs `localmail.submit()` with the caller's identity from the
kernel (SO_PEERCRED): every local user can send, as themselves (`login@hostname`; -f
only for trusted users: root, the daemon's `user`, `trusted_users`), and the server
writes the maillog line. The command reads its standard input whole first, so a slow
pipeline never holds the server. A message with NUL
characters is refused (EX_DATAERR); one with more `Received:` fields than `max_hops` is
accepted and bounced to the sender, not relayed (as Postfix does with local mail); less
free space than `queue_min_free` is EX_TEMPFAIL.

-t takes recipients from To/Cc/Bcc (Resent-To/-Cc/-Bcc when the message has Resent-
fields, RFC 5322 3.6.6); recipients given as arguments are added to them (Postfix's
reading). Bcc, Resent-Bcc, Return-Path and Content-Length are removed with or without -t
(Postfix's message_drop_headers). Unqualified addresses (`root`, as cron uses) get `@hostname`.

No server running (nobody listens on the socket): root queues directly (the sender still
root's), becoming the spool's owner (the daemon's `user`) before touching the spool, so
the queued file is readable by the daemon and nothing in the spool is ever root-owned;
anyone else gets EX_TEMPFAIL and nothing is queued.

Failure policy: exit status as sendmail's (sysexits.h), one line on stderr:
EX_USAGE 64 (bad option, no recipients, recipients and options past the 64 KiB of a
local submission's request), EX_DATAERR 65 (bad address, message too big or
malformed), EX_NOPERM 77 (-f by an untrusted user; mailq by a user who may not read the
queue), EX_CANTCREAT 73 (root, no server: spool not writable), EX_TEMPFAIL 75 (no server
running for a non-root user, a rate limit, spool I/O error, or no config file found: the
caller may retry; nothing is ever queued into a spool no daemon reads), EX_CONFIG 78 (bad
config). On any failure nothing is queued.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO

# Everything is imported up front: after switching to the spool owner the Python install
# (e.g. under /root) may no longer be readable, so no lazy imports past that point.
from authrelay import localsubmit, maillog, wiring
from authrelay.config import (
    LOOKUP,
    Config,
    ConfigError,
    NoConfig,
    error_line,
    find_config_path,
    load_file,
)
from authrelay.localmail import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    Fail,
    Options,
    identity,
    shown,
    submit,
)
from authrelay.policy import verdicts
from authrelay.policy.relay import RelayPolicy
from authrelay.scheduler import queuecli
from authrelay.smtpd import protocol as smtp
from authrelay.spool.store import Spool
from authrelay.spool.submit import Submitter
from authrelay.types import Reply

PROG = "authrelay sendmail"



# --------------------------------------------------------------------------- options

# getopt-style like sendmail's own: flags may be bundled (-ti), arguments attached
# (-fuser) or separate (-f user).
_FLAGS = set("tivmnUGSI")  # I: -I is "newaliases" in some; treated as a no-op flag
_WITH_ARG = set("fFrCNRVhBLXOobdpAq")



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
        if a.startswith("--"):  # (read letter by letter it was "unknown option --")
            raise Fail(EX_USAGE, f"unknown option {shown(a)}")
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


def _maillog(cfg: Config) -> maillog.MailLog:
    # Only to a shared target: stdout/stderr would be mail output for cron. Otherwise the
    # lines are dropped (a MailLog on /dev/null, never None: the DKIM signer would then
    # write its dkim= notes to the process-wide maillog, this command's stdout).
    discard = f"file:{os.devnull}"
    if not (maillog.syslog_path(cfg.log.target) or cfg.log.target.startswith("file:")):
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


@contextlib.contextmanager
def _config_fails() -> Iterator[None]:
    """Finding and reading the config: none found is EX_TEMPFAIL (75: a cron job retries,
    nothing was written), one that does not load EX_CONFIG (78), each one line."""
    try:
        yield
    except NoConfig as e:
        raise Fail(EX_TEMPFAIL, str(e)) from None
    except ConfigError as e:
        raise Fail(EX_CONFIG, error_line(e)) from None


def _deliver(opts: Options, message: BinaryIO, where: tuple[str, Config | None],
             invoker: int) -> str:
    """Through the running server (`where`: _where()'s socket and config); with none
    running, root (only) queues directly."""
    sock, cfg = where
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
    return submit(opts, message, cfg, who, submitter=lambda: _direct_submitter(cfg))


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
            with _config_fails():
                where = _where(explicit)
            return smtp_dialogue(where[1] or Config(), sys.stdin.buffer, sys.stdout.buffer,
                                 lambda o, m: _deliver(o, m, where, invoker))
        if opts.mode in ("p", "q"):
            with _config_fails():
                cfg = _load_config(explicit)
            try:
                if opts.mode == "p":  # mailq
                    return queuecli.cmd_list(_queue_args(cfg))
                arg = opts.queue_arg  # -q: deliver now: the running scheduler does it
                qid = arg[1:] if arg[:1] == "I" else None
                return queuecli.cmd_flush(_queue_args(cfg, id=qid))
            except PermissionError:
                raise Fail(EX_NOPERM, "the queue is readable by root and the authrelay "
                                      "user only") from None
        with _config_fails():
            where = _where(explicit)
        known = where[1]
        limit = known.limits.max_message_size if known is not None else 0
        message = localsubmit.buffer_stdin(sys.stdin.buffer, limit)
        _deliver(opts, message, where, invoker)
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
