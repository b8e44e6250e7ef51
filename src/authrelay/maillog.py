"""maillog: the operator's audit trail, one line per event, queue id first.

Owns the stable log format admins grep and fail2ban parses. Text lines look like
sendmail/Postfix maillog lines:

    2N53XR3DNR: from=<a@x>, size=812, nrcpts=1, relay=laptop [192.0.2.7], auth=alice

JSON lines carry the same fields as keys. Contract: never raises into the caller (a full
disk must not fail a session), never logs an AUTH payload or password: callers pass only
the fields below. Every value is escaped here, where the line is formatted (`escape()`,
one documented scheme: non-printables as \\xHH / \\uHHHH, a value holding a space, `,` or
`=` in quotes), so nothing a client sends can end a line or add a field, and fail2ban's
documented regex only ever reads the relay address we wrote.
Targets: stdout, stderr, file:PATH (reopened on SIGHUP for logrotate; created again when
deleted while open; lines a failed write lost, a full disk, are counted and said when
writing works again), syslog (mail facility;
when /dev/log is missing or nobody listens on it, stderr, with a warning on stderr and a
`warning=` line, since
syslog(3) would drop every line without a word).
API: one method per event (connect, tls, tls_failed, auth_ok, auth_failed, reject, queued,
sent, deferred, bounced, expired, notification/delayed, held, released, removed,
host_failed, next_host, tls_handshake_failed, tls_not_used, dkim, disconnect, warning,
error, daemon), each also a module-level function on the process-wide log
(`maillog.queued(...)`); `event(qid, **kv)` stays for anything else. See docs/INTERFACES.md.
Lines are handed to a writer thread (one per process, started lazily so forked workers get
their own): a write to a log file on a busy filesystem can wait behind a journal commit,
and that wait must never stall the event loop. At most MAX_WAITING lines wait for it; past
that they are dropped and the next line written says how many. The thread writes whatever
has queued up in one system call, and `flush()` (called at exit and on stop) waits until
all is written.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import json
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO

from authrelay.owedlines import Slot, marked
from authrelay.syslogsocket import SyslogSocket

NOQUEUE = "NOQUEUE"
SYSLOG_SOCKET = "/dev/log"  # the `syslog` target's socket (syslog(3)'s)

# getpid() is a system call on current glibc; a log line needs it twice. Cache it per
# process (reset in every forked child).
_pid = os.getpid()


def _reset_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)

# Every MailLog, for the fork hooks below.
_instances: weakref.WeakSet[MailLog] = weakref.WeakSet()
_held: list[MailLog] = []  # the MailLogs whose write lock _before_fork took
_busy: list[MailLog] = []  # those whose writer held it past FORK_LOCK_WAIT (a stalled write)
# Seconds a fork waits for a write in progress. A write that takes longer is one the
# target does not take (a pipe nobody reads, a hung NFS mount, a full FIFO): a fork that
# waited for it (a worker replaced by the master) held the master's event loop for as long
# as the target stalled, every delivery with it.
FORK_LOCK_WAIT = 0.2


def _before_fork() -> None:
    """No write in progress across a fork: a child forked while the writer thread held
    `_lock` (a process that logged before forking its workers: a start-up warning)
    inherited it locked, and its first line (daemon=started) then waited for ever, the
    worker hung with its listening socket. A write that holds the lock past
    FORK_LOCK_WAIT is not waited for: the child gets a lock of its own instead
    (`_after_fork_in_child`)."""
    _held.clear()
    _busy.clear()
    for ml in list(_instances):
        (_held if ml._lock.acquire(timeout=FORK_LOCK_WAIT) else _busy).append(ml)


def _after_fork() -> None:
    for ml in _held:
        ml._lock.release()
    _held.clear()
    _busy.clear()


def _after_fork_in_child() -> None:
    """A MailLog whose write the fork did not wait for: a new lock (the one inherited is
    held by a thread this process does not have) and, for stdout or stderr, a stream of
    its own on the same descriptor (the inherited one's buffer may be mid-write)."""
    for ml in _busy:
        ml._lock = threading.Lock()
        if ml._fh is not None:
            ml._fh = open(ml._fh.fileno(), "w", encoding=ml._fh.encoding,  # noqa: SIM115
                          errors=ml._fh.errors, closefd=False)
    _after_fork()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork,
                    after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------- escaping
# Every value that reaches a line passes through escape() here, at the formatting
# boundary, so no call site can forget: a client chooses HELO names, SASL user names,
# addresses, ENVID/ORCPT, PROXY data, TLS SNI, remote replies and reverse DNS names, and
# none of them may end a line or start a field (issue 17). See README "The maillog".

# ASCII characters each context escapes (the fast path: most values are plain ASCII).
_UNSAFE = {
    "value": re.compile(r'[\x00-\x1f\x7f\\"]'),
    "text": re.compile(r'[\x00-\x1f\x7f\\"]'),
    "token": re.compile(r'[\x00-\x20\x7f\\",=\[\]]'),
    "json": re.compile(r"[\x00-\x1f\x7f\\]"),
}
_ALSO = {"value": '"', "text": '"', "token": '" ,=[]', "json": ""}
_QUOTE_IF = re.compile(r"[ ,=]")
# ", key=" inside our own prose would read as a field separator: its comma is escaped.
_FIELD_COMMA = re.compile(r",(?=\s*[^\s,=]+=)")
_RELAY = re.compile(r"(.*) \[([^\[\]]*)\](:\d+)?", re.S)
# The result fields of a delivery line (`dsn=2.0.0, tls=verified, policy=dane,
# stat=Sent`) written inside a value or text that comes from elsewhere (a remote reply in
# `stat=Deferred (...)`, a HELO name): the `=` is escaped (`tls\x3dverified`), so `grep
# 'tls=verified'` or `grep 'stat=Sent'` only ever finds the field we wrote. "starttls=1"
# (`commands=`) is not such a token.
_OUR_FIELD = re.compile(r"(?<![\w.-])((?i:tls|policy|stat|dsn))=")


# sent_at_start's `stat=Sent (...)` text: a delivery whose stat=Sent line the run died
# before writing (README "The maillog").
SENT_BEFORE_CRASH = ("sent before the crash (the in-flight journal recorded the next hop's "
                     "2xx before the process died): not delivered again")
# sent_before_crash's status of recipients whose stat=Sent line the crashed run wrote (the
# journal's `{"l": [N]}`): no second delivery line.
RECORDED_AFTER_CRASH = ("recorded as delivered (its delivery line written before the crash; "
                        "the in-flight journal kept the next hop's 2xx): not delivered again")
# ... of recipients a delivery cut by a stop had delivered in an earlier transaction: no
# `to=` nor "sent" (the stop logged their delivery, `stat=Sent`: one line per delivery).
RECORDED_AFTER_STOP = ("recorded as delivered (the next hop took it in a transaction of a "
                       "delivery the stop cut, logged then; the in-flight journal kept its "
                       "2xx): not delivered again")


def _char(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _chars(s: str, context: str) -> str:
    """`s` with every non-printable character (Unicode Cc, Cf, Zl, Zp, Zs other than the
    ASCII space, Co, Cn, Cs), the backslash and the context's own characters escaped."""
    if s.isascii() and _UNSAFE[context].search(s) is None:
        return s
    also = _ALSO[context]
    return "".join(_char(c) if c == "\\" or c in also or not c.isprintable() else c
                   for c in s)


def escape(value: Any, context: str = "value") -> str:
    """The one escaping of maillog values (README "The maillog" documents it).

    Characters, in every context: each non-printable character (Unicode categories Cc,
    Cf, Zl, Zp, separators other than the ASCII space, private-use, unassigned, lone
    surrogates), the backslash and (in text lines) the double quote are written `\\xHH`,
    `\\uHHHH` or `\\UHHHHHHHH`: no value can end a line or hide text from a reader.
    Then, by context:
    - "value" (a field's whole value, e.g. `sasl_username=`, `helo=`): written bare when
      it holds no space, `,` or `=` and is not empty, else in double quotes, with `[`
      and `]` escaped too inside the quotes (`\\x5b`, `\\x5d`), so a literal `[` after
      a space only ever comes from a `relay=HOST [IP]` we wrote (what fail2ban reads);
    - "text" (our own prose and the client's part inside a field we compose: the
      address in `from=<...>`, `to=<...>`, a reply in `stat=Sent (...)`): a comma that
      would start a field (`, key=`) is written `\\x2c`;
    - in "value" and "text", the `=` of a `tls=` or `policy=` token (any case, not part
      of a longer word) is written `\\x3d`: those fields of a delivery line are ours;
    - "token" (the host name and address of `relay=HOST [IP]`): space, `,`, `=`, `[`
      and `]` are written `\\xHH`;
    - "json" (a JSON value; json.dumps quotes it): the characters above, the double quote
      left to JSON.
    """
    if context not in _UNSAFE:
        raise ValueError(f"unknown maillog escaping context {context!r}")
    s = _chars(value if isinstance(value, str) else str(value), context)
    if context in ("value", "text") and "=" in s:
        s = _OUR_FIELD.sub(r"\1\\x3d", s)
    if context == "value":
        if not s or _QUOTE_IF.search(s):
            return '"' + s.replace("[", "\\x5b").replace("]", "\\x5d") + '"'
    elif context == "text" and "," in s:
        return _FIELD_COMMA.sub(r"\\x2c", s)
    return s


class _Field(str):
    """A value this module composed from escaped parts: written as it is."""

    __slots__ = ()


def _text(value: Any) -> str:
    return escape(value, "text")


# Characters of a next hop's reply in a delivery line (`stat=Deferred (REPLY)`) or a
# host's (`status=host failed` / `recipients passed to the next host`, reason=), as the
# 2048 octets Postfix keeps of one: the bounce keeps more (types.MAX_TEXT), but a hostile
# next hop must not write 16 KiB per recipient per retry into the maillog.
LOG_REPLY = 2048
LOG_TRUNCATED = " [...] (reply truncated)"


def _reply(text: str) -> str:
    return text if len(text) <= LOG_REPLY else text[:LOG_REPLY] + LOG_TRUNCATED


_relay_cache: dict[str, _Field] = {}


def relay_field(relay: Any) -> str:
    """`HOST [IP]` / `HOST [IP]:PORT` with HOST and IP escaped as tokens (a reverse DNS
    name and a PROXY address come from outside); anything else as a value. A session
    logs the same relay many times: results are cached (bounded)."""
    if isinstance(relay, _Field):
        return relay
    s = relay if isinstance(relay, str) else str(relay)
    hit = _relay_cache.get(s)
    if hit is not None:
        return hit
    m = _RELAY.fullmatch(s)
    if m is None:
        out = _Field(escape(s))
    else:
        host, ip, port = m.groups()
        out = _Field(f"{escape(host, 'token')} [{escape(ip, 'token')}]{port or ''}")
    if len(_relay_cache) >= 4096:  # many clients: start over rather than grow
        _relay_cache.clear()
    _relay_cache[s] = out
    return out


# Keys whose values are our own prose (spaces are part of the line format admins grep):
# escaped as "text". Every other key's value is escaped as a "value".
_TEXT_KEYS = frozenset({
    "reject", "reason", "warning", "error", "daemon", "status", "next", "stat", "problem",
    "lost", "tls", "commands", "rcpts", "connect", "disconnect", "tls_failed", "by",
    "action", "listeners", "s",
})


# Values that need no work at all in a text line (the common case, checked first).
_PLAIN_VALUE = re.compile(r'[^\x21-\x7e]|[\\",=]').search
_PLAIN_TEXT = re.compile(r'[^\x20-\x7e]|[\\",]').search


def _format(key: str, value: Any, json_line: bool) -> Any:
    if type(value) is str and not json_line and key != "relay":
        if key in _TEXT_KEYS:
            # (a `tls=` token needs its escape too: looked for only when there is a "=")
            return value if _PLAIN_TEXT(value) is None and (
                "=" not in value or _OUR_FIELD.search(value) is None) \
                else escape(value, "text")
        return value if value and _PLAIN_VALUE(value) is None else escape(value)
    if isinstance(value, _Field):
        return str(value)
    if isinstance(value, bool | int | float):
        return value if json_line else str(value)
    if key == "relay":
        return str(relay_field(value))
    if json_line:
        return escape(value, "json")
    return escape(value, "text" if key in _TEXT_KEYS else "value")


def syslog_path(target: str) -> str | None:
    """The socket of a syslog target (`syslog`: SYSLOG_SOCKET, `syslog:PATH`), None for
    any other target."""
    if target == "syslog":
        return SYSLOG_SOCKET
    return target[7:] if target.startswith("syslog:") else None


def _syslog_unreachable(path: str) -> str:
    """'' when a syslog daemon listens on `path` (as syslog(3) connects: datagram, then
    stream), else why not ("is missing", "has no listener")."""
    if not os.path.exists(path):
        return "is missing"
    import socket

    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as s:
                s.connect(path)
            return ""
        except OSError:
            continue
    return "has no listener"


def _code(reply: Any) -> str:
    """"CODE ENHANCED" of a Reply (or the string itself)."""
    if isinstance(reply, str):
        return reply
    return f"{reply.code} {reply.enhanced}".strip()


class MailLog:
    def __init__(self, target: str = "stdout", fmt: str = "text", ident: str = "authrelay"):
        self.target = target
        self.fmt = fmt
        self.ident = ident
        self._lock = threading.Lock()
        self._fh: TextIO | None = None  # stdout, stderr
        self._file: io.FileIO | None = None  # a file: target, written unbuffered
        self._lost = 0  # lines the file could not take since the last write that worked
        self._lost_why = ""
        self._lost_since = 0.0
        self._said_deleted = False  # the file was deleted, and that said on stderr
        self._waiting = 0  # lines queued for the writer thread, not yet written
        self._dropped = 0  # lines not queued: MAX_WAITING were waiting (said when written)
        self._dropped_since = 0.0
        self._syslog: SyslogSocket | None = None  # the writer thread's only
        self._q: queue.SimpleQueue[str | threading.Event | Callable[[], None]] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._owed: Slot | None = None  # where refusal lines are kept until written
        self._owed_pid = 0  # the process `_owed` is the slot of (a fork's child: not)
        self.fallback = ""  # why the configured target is not used (empty: it is)
        _instances.add(self)
        self._open()
        if self.fallback:
            self.warning(self.fallback)
        atexit.register(self.flush)

    def _open(self) -> None:
        if self.target == "stdout":
            self._fh = sys.stdout
        elif self.target == "stderr":
            self._fh = sys.stderr
        elif self.target.startswith("file:"):
            self._file = _open_file(self.target[5:])
        elif (path := syslog_path(self.target)) is not None:
            why = _syslog_unreachable(path)
            if why:
                # Nothing listens on /dev/log (a container, a host without
                # rsyslog/journald): the audit trail would be gone without a word. Say so
                # once and log to stderr instead.
                self.target = "stderr"
                self._fh = sys.stderr
                self.fallback = f"syslog socket {path} {why}; logging to stderr instead"
                try:
                    sys.stderr.write(f"{self.ident}: warning: maillog: {self.fallback}\n")
                    sys.stderr.flush()
                except Exception:
                    pass
                return
            self._syslog = SyslogSocket(path, self.ident)
        else:
            self._fh = sys.stdout

    def reopen(self, fd: int | None = None) -> None:
        """SIGHUP: reopen a file target so logrotate's rename takes effect.

        The new file is opened before the old one is closed: when it cannot be opened
        (e.g. a directory the unprivileged user may not create files in), logging carries
        on into the old file and OSError is raised for the caller to log there. `fd`: the
        file already opened by a privileged process (serve's key helper), taken over.
        """
        if not self.target.startswith("file:"):
            if fd is not None:
                os.close(fd)
            return
        new = os.fdopen(fd, "ab", buffering=0) if fd is not None else \
            _open_file(self.target[5:])
        with self._lock:
            old, self._file, self._said_deleted = self._file, new, False
        if old is not None:
            try:
                old.close()
            except OSError:
                pass

    def event(self, queue_id: str | None, **fields: Any) -> None:
        """One line: `QID: k=v, k=v`. Keys with value None are left out."""
        try:
            self._emit(self._compose(queue_id, fields))
        except Exception:  # the audit log must never break mail flow
            pass

    def keep_owed(self, slot: Slot) -> None:
        """This process's refusal lines (reject(), auth_failed()) are kept in `slot` until
        its writer wrote them: one it died before writing is written by the master
        (owedlines.py)."""
        self._owed, self._owed_pid = slot, os.getpid()

    def write_owed(self, lines: list[str]) -> None:
        """Lines another process kept and died owing (owedlines), as it would have written
        them, `logged_by=master` added."""
        for line in lines:
            try:
                self._emit(marked(line, self.fmt == "json"), stamped=True)
            except Exception:  # the audit log must never break mail flow (as event())
                pass

    def _refusal(self, queue_id: str | None, fields: dict[str, Any]) -> None:
        """event() for a refusal line: kept (keep_owed) until written."""
        try:
            self._emit(self._compose(queue_id, fields), owed=True)
        except Exception:  # the audit log must never break mail flow
            pass

    def _compose(self, queue_id: str | None, fields: dict[str, Any]) -> str:
        qid = escape(queue_id, "token") if queue_id else NOQUEUE
        items = [(k, v) for k, v in fields.items() if v is not None]
        if self.fmt == "json":
            # (the process as a text line's `authrelay[PID]:` names it)
            rec: dict[str, Any] = {"ts": round(time.time(), 6), "pid": _pid, "queue_id": qid}
            for k, v in items:
                rec[k] = _format(k, v, True)
            return json.dumps(rec, ensure_ascii=False)
        body = ", ".join(f"{k}={_format(k, v, False)}" for k, v in items)
        return f"{qid}: {body}"

    def _stamped(self, line: str) -> str:
        if self.fmt == "text":  # syslog adds its own stamp; files and stdout need one
            return f"{self._stamp()} {self.ident}[{_pid}]: {line}"
        return line

    # ------------------------------------------------------------------ events
    # One method per event (chasquid style). Each writes exactly the line the generic
    # event() call it replaced wrote, so admins' greps and fail2ban filters keep working.
    # Field order is the line's order. `relay` is "host [ip]" as Session.relay_desc().
    # Every interpolated value is escaped here (escape(), relay_field()): a value passed
    # in is never trusted to be clean.

    def connect(self, relay: str, listener: str | None = None) -> None:
        """A client connected: `NOQUEUE: connect=from HOST [IP], listener=NAME`."""
        if self.fmt != "text":
            self.event(None, connect=_Field(f"from {relay_field(relay)}"), listener=listener)
            return
        # Once per connection: the line event() makes, composed directly (its fields are
        # known; each value escaped by _format as there).
        try:
            line = f"{NOQUEUE}: connect=from {relay_field(relay)}"
            if listener is not None:
                line += f", listener={_format('listener', listener, False)}"
            self._emit(line)
        except Exception:  # the audit log must never break mail flow (as event())
            pass

    def tls(self, relay: str, protocol: str, cipher: str | None = None,
            bits: int | None = None) -> None:
        """TLS established (STARTTLS done or implicit TLS on 465), as Postfix logs it:
        `NOQUEUE: tls=from HOST [IP], protocol=TLSv1.3, cipher=NAME, bits=256`."""
        self.event(None, tls=_Field(f"from {relay_field(relay)}"), protocol=protocol,
                   cipher=cipher, bits=bits)

    def tls_from(self, relay: str, ssl_object: Any) -> None:
        """tls() with the values read from an ssl.SSLObject / SSLSocket (None: nothing)."""
        if ssl_object is None:
            return
        try:
            c = ssl_object.cipher()
            self.tls(relay, str(ssl_object.version()), c[0] if c else None,
                     c[2] if c else None)
        except Exception:  # the log must never break a session
            pass

    def auth_ok(self, relay: str, mechanism: str, username: str, app: str = "") -> None:
        """`NOQUEUE: auth=ok, sasl_method=PLAIN, sasl_username=U[, sasl_app=NAME],
        relay=HOST [IP]`; `sasl_app` names the app password used (auth/apppasswords.py)."""
        self.event(None, auth="ok", sasl_method=mechanism, sasl_username=username,
                   sasl_app=app or None, relay=relay)

    def auth_failed(self, relay: str, reply: Any = "535 5.7.8", mechanism: str | None = None,
                    username: str | None = None, reason: str | None = None) -> None:
        """fail2ban's line: `NOQUEUE: reject=535 5.7.8 authentication failed,
        relay=HOST [IP], sasl_method=M, sasl_username=U[, reason=R]`. `reply` is a Reply
        or "CODE ENHANCED"; `reason` (no secrets: e.g. "bad password", "not UTF-8")
        is optional."""
        code = _text(_code(reply))
        self._refusal(None, {"reject": _Field(f"{code} authentication failed"),
                             "relay": relay, "sasl_method": mechanism or None,
                             "sasl_username": username or None, "reason": reason})

    def reject(self, reply: Any, relay: str | None = None, queue_id: str | None = None,
               what: str = "", **extra: Any) -> None:
        """A refused command or connection: `QID: reject=CODE ENH [what]TEXT, relay=...`.
        `reply` is a Reply (code, enhanced, text are used) or the complete string."""
        if isinstance(reply, str):
            text = _text(reply)
        else:  # `what` holds the client's address: escaped as text, like the reply
            text = f"{reply.code} {_text(reply.enhanced)} {_text(what)}{_text(reply.text)}"
        self._refusal(queue_id, {"reject": _Field(text.strip()), "relay": relay, **extra})

    def queued(self, queue_id: str, sender: str, size: int, nrcpts: int,
               relay: str | None = None, proto: str | None = None, auth: str | None = None,
               helo: str | None = None, **extra: Any) -> None:
        """A message is in the queue (after fsync): `QID: from=<S>, size=N, nrcpts=N,
        relay=..., proto=ESMTPSA, auth=U, helo=H`, extra keys after (uid, user, origin)."""
        if self.fmt != "text" or extra:
            self.event(queue_id, **{"from": _Field(f"<{_text(sender)}>")}, size=size,
                       nrcpts=nrcpts,
                       relay=relay, proto=proto, auth=auth, helo=helo, **extra)
            return
        # Once per message received: the line event() makes, composed directly (its
        # fields are known; each value escaped as _format escapes it there).
        try:
            qid = escape(queue_id, "token") if queue_id else NOQUEUE
            line = f"{qid}: from=<{_text(sender)}>, size={_format('size', size, False)}" \
                   f", nrcpts={_format('nrcpts', nrcpts, False)}"
            if relay is not None:
                line += f", relay={relay_field(relay)}"
            if proto is not None:
                line += f", proto={_format('proto', proto, False)}"
            if auth is not None:
                line += f", auth={_format('auth', auth, False)}"
            if helo is not None:
                line += f", helo={_format('helo', helo, False)}"
            self._emit(line)
        except Exception:  # the audit log must never break mail flow (as event())
            pass

    def _delivery(self, queue_id: str, stat: str, rcpt: str, relay: str | None, delay: float,
                  tries: int, dsn: str | None, reply: str, tls: str | None,
                  policy: str | None, redelivery: str | None = None) -> None:
        if self.fmt != "text":
            self.event(queue_id, to=_Field(f"<{_text(rcpt)}>"), relay=relay or "none",
                       delay=f"{delay:.2f}", tries=tries, redelivery=redelivery,
                       dsn=dsn or None, tls=tls or None,
                       policy=policy or None,
                       stat=_Field(f"{stat} ({_text(_reply(reply))})"))
            return
        # Once per recipient per attempt, on the master's path: the line event() makes,
        # composed directly (no field dict, no generic walk; each value escaped by
        # _format as there: test_delivery_and_removed_lines_are_the_generic_events).
        try:
            qid = escape(queue_id, "token") if queue_id else NOQUEUE
            line = (f"{qid}: to=<{_text(rcpt)}>, relay={relay_field(relay or 'none')}, "
                    f"delay={_format('delay', f'{delay:.2f}', False)}, "
                    f"tries={_format('tries', tries, False)}")
            if redelivery:
                line += f", redelivery={_format('redelivery', redelivery, False)}"
            if dsn:
                line += f", dsn={_format('dsn', dsn, False)}"
            if tls:
                line += f", tls={_format('tls', tls, False)}"
            if policy:
                line += f", policy={_format('policy', policy, False)}"
            self._emit(f"{line}, stat={stat} ({_text(_reply(reply))})")
        except Exception:  # the audit log must never break mail flow (as event())
            pass

    def sent(self, queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
             dsn: str | None, reply: str, tls: str | None = None,
             policy: str | None = None, redelivery: str | None = None) -> None:
        """`QID: to=<R>, relay=HOST[IP]:PORT, delay=1.23, tries=1, dsn=2.0.0, tls=verified,
        policy=dane, stat=Sent (REPLY)` (tls=, policy=: the outbound TLS result and the
        policy that applied, when a connection was made; delivery/tlspolicy.py;
        `redelivery=after_crash` after tries: the attempt before was cut by a crash, after
        it may have delivered: this one may be a duplicate)."""
        self._delivery(queue_id, "Sent", rcpt, relay, delay, tries, dsn, reply, tls, policy,
                       redelivery)

    def deferred(self, queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
                 dsn: str | None, reply: str, tls: str | None = None,
                 policy: str | None = None, redelivery: str | None = None) -> None:
        """As sent(), `stat=Deferred (REPLY)`: a transient failure, tried again later."""
        self._delivery(queue_id, "Deferred", rcpt, relay, delay, tries, dsn, reply, tls, policy,
                       redelivery)

    def bounced(self, queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
                dsn: str | None, reply: str, tls: str | None = None,
                policy: str | None = None, redelivery: str | None = None) -> None:
        """As sent(), `stat=Bounced (REPLY)`: a permanent failure."""
        self._delivery(queue_id, "Bounced", rcpt, relay, delay, tries, dsn, reply, tls, policy,
                       redelivery)

    def expired(self, queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
                dsn: str | None, reply: str, tls: str | None = None,
                policy: str | None = None, redelivery: str | None = None) -> None:
        """Given up after max_queue_lifetime:
        `stat=Bounced (LAST REPLY, message expired in the queue)`."""
        self._delivery(queue_id, "Bounced", rcpt, relay, delay, tries, dsn,
                       reply + ", message expired in the queue", tls, policy,
                       redelivery)

    def tls_connection(self, queue_id: str, relay: str, result: str, protocol: str,
                       cipher: str | None, bits: int | None, policy: str,
                       reason: str | None = None) -> None:
        """Outbound TLS up, as Postfix logs it: `QID: tls=Verified TLS connection
        established to HOST [IP]:PORT: TLSv1.3 with cipher NAME (256/256 bits),
        policy=dane[, reason=WHY NOT VERIFIED]`. result: verified | trusted | untrusted |
        anonymous."""
        how = f"{protocol} with cipher {cipher}" if cipher else protocol
        if bits:
            how += f" ({bits}/{bits} bits)"
        self.event(queue_id, tls=_Field(f"{result.capitalize()} TLS connection established "
                                        f"to {relay_field(relay)}: {_text(how)}"),
                   policy=policy, reason=reason)

    def notification(self, queue_id: str, action: str, dsn_queue_id: str) -> None:
        """A DSN about QID was queued as DSN_QID (action failed | delayed | relayed):
        `QID: sender_non-delivery_notification=DSN_QID` (delay, success likewise)."""
        kind = {"failed": "non-delivery", "delayed": "delay"}.get(action, "success")
        self.event(queue_id, **{f"sender_{kind}_notification": dsn_queue_id})

    def delayed(self, queue_id: str, dsn_queue_id: str) -> None:
        """A delay warning was queued: `QID: sender_delay_notification=DSN_QID`."""
        self.notification(queue_id, "delayed", dsn_queue_id)

    def held(self, queue_id: str) -> None:
        """`QID: status=held`."""
        self.event(queue_id, status="held")

    def released(self, queue_id: str) -> None:
        """`QID: status=released`."""
        self.event(queue_id, status="released")

    def sent_before_crash(self, queue_id: str, rcpts: list[str], queue: str,
                          stop: bool = False) -> None:
        """Start-up recovery: recipients the next hop answered 2xx (the in-flight journal
        says so) before the last run died, their outcome not saved yet, and their
        stat=Sent line written by it: recorded as sent, not delivered again, in a line
        that is no second delivery line: `QID: recorded=<a>,<b>, status=recorded as
        delivered (...), queue=removed` (held: left in hold/; queued: other recipients
        still pending). `stop`: the delivery was cut by a stop, not a crash."""
        rcpts_field = _Field(",".join(f"<{_text(r)}>" for r in rcpts))
        self.event(queue_id, recorded=rcpts_field,
                   status=RECORDED_AFTER_STOP if stop else RECORDED_AFTER_CRASH, queue=queue)

    def sent_at_start(self, queue_id: str, rcpt: str, relay: str | None, delay: float,
                      tries: int, queue: str) -> None:
        """Start-up recovery of a recipient as sent_before_crash, whose stat=Sent line the
        last run died before writing (no `{"l": [N]}` in the journal): its one delivery
        line, written now and saying so: `QID: to=<R>, relay=HOST (the next hop when the
        journal kept it, else none), delay=D, tries=N, stat=Sent (sent before the crash
        (...): not delivered again), queue=removed, logged_by=start`."""
        self.event(queue_id, to=_Field(f"<{_text(rcpt)}>"), relay=relay or "none",
                   delay=f"{delay:.2f}", tries=tries,
                   stat=_Field(f"Sent ({_text(SENT_BEFORE_CRASH)})"), queue=queue,
                   logged_by="start")

    def removed(self, queue_id: str, by: str | None = None) -> None:
        """`QID: status=removed` (delivered or bounced everywhere), `, by=operator` when
        `queue delete` removed it."""
        if by is not None or self.fmt != "text":
            self.event(queue_id, status="removed", by=by)
            return
        try:  # once per delivered message: event()'s line, composed directly
            self._emit(f"{escape(queue_id, 'token') if queue_id else NOQUEUE}: status=removed")
        except Exception:  # the audit log must never break mail flow (as event())
            pass

    def disconnect(self, relay: str, auth: str | None = None,
                   commands: str | None = None) -> None:
        """`NOQUEUE: disconnect=from HOST [IP], auth=U, commands=ehlo=1 mail=1 ...`."""
        if self.fmt != "text":
            self.event(None, disconnect=_Field(f"from {relay_field(relay)}"),
                       auth=auth or None, commands=commands or None)
            return
        try:  # composed directly, as connect()
            line = f"{NOQUEUE}: disconnect=from {relay_field(relay)}"
            if auth:
                line += f", auth={_format('auth', auth, False)}"
            if commands:
                line += f", commands={_format('commands', commands, False)}"
            self._emit(line)
        except Exception:
            pass

    def tls_failed(self, relay: str, reason: str, listener: str | None = None,
                   delay: float | None = None) -> None:
        """An inbound TLS handshake failed (Postfix: "SSL_accept error from"):
        `NOQUEUE: tls_failed=from HOST [IP], reason=R, listener=L, delay=0.12`."""
        self.event(None, tls_failed=_Field(f"from {relay_field(relay)}"), reason=reason,
                   listener=listener,
                   delay=None if delay is None else f"{delay:.2f}")

    def host_failed(self, queue_id: str, relay: str, reason: str) -> None:
        """Outbound: one host of the route failed (Postfix's `connect to host[ip]:25:
        Connection refused`): `QID: relay=H, status=host failed, reason=R`."""
        self.event(queue_id, relay=relay, status="host failed", reason=_reply(reason))

    def next_host(self, queue_id: str, relay: str, rcpts: str, reason: str) -> None:
        """Outbound: recipients a host answered 4xx go to the next MX:
        `QID: relay=H, status=recipients passed to the next host, rcpts=<a>,<b>, reason=R`."""
        self.event(queue_id, relay=relay, status="recipients passed to the next host",
                   rcpts=rcpts, reason=_reply(reason))

    def tls_handshake_failed(self, queue_id: str, relay: str, reason: str,
                             next: str | None = None) -> None:  # noqa: A002 - the log key
        """Outbound STARTTLS failed: `QID: relay=H, status=TLS handshake failed, reason=R,
        next=WHAT HAPPENS NOW`."""
        self.event(queue_id, relay=relay, status="TLS handshake failed", reason=reason,
                   next=next)

    def tls_policy_failed(self, queue_id: str, relay: str, policy: str, reason: str,
                          action: str) -> None:
        """Outbound TLS policy not met: `QID: relay=H, status=TLS policy failed,
        policy=mta-sts, reason=WHY, action=deferred|delivered anyway (testing)`."""
        self.event(queue_id, relay=relay, status="TLS policy failed", policy=policy,
                   reason=reason, action=action)

    def tls_not_used(self, queue_id: str, relay: str, why: str) -> None:
        """Outbound plain text by policy: `QID: relay=H, tls=not used: WHY`."""
        self.event(queue_id, relay=relay, tls=f"not used: {why}")

    def dkim(self, queue_id: str | None, result: str, **extra: Any) -> None:
        """DKIM signing: `QID: dkim=signed|none|error|warning, d=DOMAIN, s=SEL, reason=R`."""
        self.event(queue_id, dkim=result, **extra)

    def warning(self, text: str, relay: str | None = None, queue_id: str | None = None,
                **extra: Any) -> None:
        """`QID: warning=TEXT, relay=..., k=v`."""
        self.event(queue_id, warning=text, relay=relay, **extra)

    def error(self, text: str, queue_id: str | None = None, **extra: Any) -> None:
        """`QID: error=TEXT, k=v`: something failed that the operator must look at."""
        self.event(queue_id, error=text, **extra)

    def daemon(self, state: str, **extra: Any) -> None:
        """Life cycle: `NOQUEUE: daemon=started (master), pid=N, ...` (stopping, stopped,
        reloaded, "reload failed, keeping the running config" with error=...)."""
        self.event(None, daemon=state, **extra)

    def _emit(self, line: str, *, owed: bool = False, stamped: bool = False) -> None:
        if self._syslog is None and not stamped:  # syslog stamps the line itself
            line = self._stamped(line)
        if self._thread is None or self._pid != _pid:
            self._start_thread()
        if self._waiting >= MAX_WAITING:  # the target takes nothing: memory stays bounded
            if not self._dropped:
                self._dropped_since = time.time()
            self._dropped += 1
            return
        self._waiting += 1  # (approximate across threads: a bound, not an account)
        if owed and self._owed is not None and self._owed_pid == _pid:
            entry = self._owed.keep(line)
            if entry >= 0:
                self._q.put(_Owed(line + "\n", entry))
                return
        self._q.put(line + "\n")  # the only cost on the event loop

    _stamp_cache: tuple[int, str] = (0, "")

    def _stamp(self) -> str:
        now = int(time.time())
        if self._stamp_cache[0] != now:
            self._stamp_cache = (now, time.strftime("%b %d %H:%M:%S", time.localtime(now)))
        return self._stamp_cache[1]

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._pid == os.getpid():
                return
            # After fork the parent's thread does not exist here: start our own.
            self._q = queue.SimpleQueue()
            self._waiting = self._dropped = 0
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._writer, name="maillog", daemon=True)
            self._thread.start()

    def _writer(self) -> None:
        q = self._q
        while True:
            batch = [q.get()]
            # Let a burst gather (a few ms) so a busy server writes many lines per system
            # call and wakes this thread less often; the loop thread never waits for it.
            time.sleep(_GATHER)
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            lines = [b for b in batch if isinstance(b, str)]
            taken = len(lines)
            if self._dropped:
                lines.insert(0, self._dropped_line())
            try:
                if lines:
                    with self._lock:
                        if self._file is not None:
                            self._write_file(self._file, "".join(lines))
                        elif self._syslog is not None:
                            self._write_syslog(self._syslog, [ln[:-1] for ln in lines])
                        else:
                            assert self._fh is not None
                            self._fh.write("".join(lines))
                            self._fh.flush()
            except Exception:  # never kills the writer (a file's failures: _write_file)
                pass
            self._waiting -= taken
            for b in batch:
                if type(b) is _Owed:
                    if self._owed is not None:
                        self._owed.written(b.entry)
                elif isinstance(b, threading.Event):
                    b.set()
                elif not isinstance(b, str):
                    try:
                        b()  # then(): its lines are written now
                    except Exception as e:  # never kills the writer; said where it can be
                        print(f"authrelay: maillog: after-write call failed: {e!r}",
                              file=sys.stderr)

    def _dropped_line(self) -> str:
        """The line that says how many lines _emit dropped (and counts them as said)."""
        n = self._dropped
        self._dropped -= n
        since = time.strftime("%H:%M:%S", time.localtime(self._dropped_since))
        line = self._compose(None, {"warning": (
            f"maillog: {n} lines dropped from {since} to {time.strftime('%H:%M:%S')}: the "
            f"log target took none while {MAX_WAITING} waited for it (a stalled journal, "
            "pipe, disk or syslog daemon)")})
        return (line if self._syslog is not None else self._stamped(line)) + "\n"

    def _write_file(self, f: io.FileIO, data: str) -> None:
        """`data` (whole lines) appended to the file target, under `_lock`. A file deleted
        while open (`rm`, not logrotate's rename) is created again first: lines are not
        written into a deleted file until the next SIGHUP. A write that fails (a full
        disk, an I/O error) loses its lines: counted, said once on stderr, and said in
        the file by the first write that works again (`warning=maillog: N lines lost
        ...`). A line cut by a failed write (this process's or another's: workers share
        the file) is ended before that one."""
        path = self.target[5:]
        notes = []
        if os.fstat(f.fileno()).st_nlink == 0:
            f, note = self._recreate(f, path)
            notes += [note] if note else []
        if self._lost:
            since = time.strftime("%H:%M:%S", time.localtime(self._lost_since))
            notes.append(f"maillog: {self._lost} lines lost, {path} could not be written "
                         f"from {since} to {time.strftime('%H:%M:%S')}: {self._lost_why}")
        head = ("\n" if self._lost and _cut(f) else "") + "".join(
            self._stamped(self._compose(None, {"warning": n})) + "\n" for n in notes)
        body = data.encode("utf-8")
        out = memoryview(head.encode("utf-8") + body)
        start = len(out) - len(body)  # where `data` begins
        done = 0
        try:
            while done < len(out):
                n = f.write(out[done:])
                if not n:  # (a regular file never does this; no busy loop if one does)
                    raise OSError(errno.EIO, "the write wrote nothing")
                done += n
        except OSError as e:
            if not self._lost:
                self._lost_since = time.time()
                _stderr(f"maillog: cannot write {path}: {e.strerror or e}; its lines are "
                        "lost until it can be written again, then counted there")
            self._lost += out[max(done, start):].tobytes().count(b"\n")
            self._lost_why = e.strerror or str(e)
            return
        self._lost = 0

    def _write_syslog(self, sl: SyslogSocket, lines: list[str]) -> None:
        """`lines` to the syslog socket; those it does not take (the daemon gone, not
        reading: syslogsocket.py) go to stderr, counted: said once on stderr when it
        starts, and in the first lines syslog takes again (`warning=maillog: syslog
        socket PATH took no lines from T to T (WHY): N lines went to stderr`)."""
        notes = []
        if self._lost:
            since = time.strftime("%H:%M:%S", time.localtime(self._lost_since))
            notes.append(self._compose(None, {"warning": (
                f"maillog: syslog socket {sl.path} took no lines from {since} to "
                f"{time.strftime('%H:%M:%S')} ({self._lost_why}): {self._lost} lines went "
                "to stderr")}))
        failed, why = sl.send(notes + lines)
        if len(failed) < len(notes) + len(lines):
            self._lost = 0  # syslog took the note (or had no need of one)
        if not failed:
            return
        failed = failed[-len(lines):]  # (a note that failed is said again later)
        if not self._lost:
            self._lost_since = time.time()
            _stderr(f"maillog: syslog socket {sl.path} {why}; lines go to stderr until it "
                    "takes them again")
        self._lost += len(failed)
        self._lost_why = why
        with contextlib.suppress(Exception):
            sys.stderr.write("".join(self._stamped(ln) + "\n" for ln in failed))
            sys.stderr.flush()

    def _recreate(self, f: io.FileIO, path: str) -> tuple[io.FileIO, str]:
        """The file target deleted while open: `path` created again (the deleted one
        closed) and the line to say so; `f` and no line when that fails (said once on
        stderr: the deleted file is written until a reload opens the path)."""
        try:
            new = _open_file(path)
        except OSError as e:
            if not self._said_deleted:
                self._said_deleted = True
                _stderr(f"maillog: {path} was deleted and cannot be created again "
                        f"({e.strerror or e}): lines go to the deleted file until a reload "
                        "(SIGHUP) opens it")
            return f, ""
        self._file, self._said_deleted = new, False
        with contextlib.suppress(OSError):
            f.close()
        return new, f"maillog: {path} was deleted while open; created again"

    def then(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every line emitted so far is written to the target, in the writer
        thread (at once when no writer thread takes this process's lines). The spool's
        notice to the scheduler goes this way: another process's delivery line can never
        be written before the `from=` line of its message (both processes' writer threads
        gather lines for `_GATHER` before writing them). A target that takes nothing holds
        `fn` as long as it holds the lines: a caller that must not wait for ever bounds
        its own wait (spool/submit.NOTICE_WAIT). While lines are being dropped
        (MAX_WAITING wait) `fn` runs at once too: the line it waits for was dropped, and a
        call queued for each would grow the process without bound."""
        if self._thread is None or self._pid != _pid or self._waiting >= MAX_WAITING:
            fn()
            return
        self._q.put(fn)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every line queued so far is written (exit, stop)."""
        if self._thread is None or self._pid != os.getpid():
            return
        done = threading.Event()
        self._q.put(done)
        done.wait(timeout)


class _Owed(str):
    """A line queued for the writer and kept in the process's owedlines slot `entry`."""

    entry: int

    def __new__(cls, line: str, entry: int) -> _Owed:
        s = super().__new__(cls, line)
        s.entry = entry
        return s


_GATHER = 0.005
# Lines that may wait for a target that takes none (journald stalled, `serve | less`
# paused, a hung NFS mount): past this, lines are dropped and counted, never queued
# without bound (a connection flood would otherwise grow the process until the OOM
# killer). About 100 bytes each: tens of MB.
MAX_WAITING = 100_000


def _open_file(path: str) -> io.FileIO:
    """A file target, for appending unbuffered (each batch one write) and reading its
    last byte (_cut); created 0640, as process.open_log_file does as root: the lines
    name senders, recipients and users, not for every local account (a file created
    again after an `rm`, or by a serve that does not start as root, was 0644 by umask)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return open(fd, "a+b", buffering=0)  # noqa: SIM115


def _cut(f: io.FileIO) -> bool:
    """The file ends in the middle of a line (a write that failed part way)."""
    try:
        size = os.fstat(f.fileno()).st_size
        return size > 0 and os.pread(f.fileno(), 1, size - 1) != b"\n"
    except OSError:
        return False


def _stderr(text: str) -> None:
    """A problem with the maillog itself, where an admin may still see it (a terminal,
    the journal under systemd): `authrelay: warning: maillog: ...`."""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"authrelay: warning: {text}\n")
        sys.stderr.flush()


_current: MailLog | None = None


def descriptors() -> set[int]:
    """The descriptors every MailLog of this process writes to (a forked child keeps
    them: it writes its lines through the MailLog it inherited)."""
    out: set[int] = set()
    for ml in list(_instances):
        for fd in (ml._fh.fileno() if ml._fh is not None else None,
                   ml._file.fileno() if ml._file is not None else None,
                   ml._syslog.fileno() if ml._syslog is not None else None):
            if fd is not None:
                out.add(fd)
    return out


def exc_text(e: BaseException) -> str:
    """An exception as a line says why: "Type: message", or "Type" alone when it has no
    message (a TimeoutError), not "Type: " with nothing after it."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def configure(target: str = "stdout", fmt: str = "text") -> MailLog:
    global _current
    _current = MailLog(target, fmt)
    return _current


def get() -> MailLog:
    """The process-wide maillog (stdout text until configured)."""
    global _current
    if _current is None:
        _current = MailLog()
    return _current


# Module-level shortcuts on the process-wide maillog: `maillog.queued(qid, ...)`.
# Code that is handed a MailLog (scheduler, server) calls the same methods on it.
def connect(relay: str, listener: str | None = None) -> None:
    get().connect(relay, listener)


def tls(relay: str, protocol: str, cipher: str | None = None, bits: int | None = None) -> None:
    get().tls(relay, protocol, cipher, bits)


def tls_from(relay: str, ssl_object: Any) -> None:
    get().tls_from(relay, ssl_object)


def auth_ok(relay: str, mechanism: str, username: str, app: str = "") -> None:
    get().auth_ok(relay, mechanism, username, app)


def auth_failed(relay: str, reply: Any = "535 5.7.8", mechanism: str | None = None,
                username: str | None = None, reason: str | None = None) -> None:
    get().auth_failed(relay, reply, mechanism, username, reason)


def reject(reply: Any, relay: str | None = None, queue_id: str | None = None, what: str = "",
           **extra: Any) -> None:
    get().reject(reply, relay, queue_id, what, **extra)


def queued(queue_id: str, sender: str, size: int, nrcpts: int, relay: str | None = None,
           proto: str | None = None, auth: str | None = None, helo: str | None = None,
           **extra: Any) -> None:
    get().queued(queue_id, sender, size, nrcpts, relay, proto, auth, helo, **extra)


def sent(queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
         dsn: str | None, reply: str) -> None:
    get().sent(queue_id, rcpt, relay, delay, tries, dsn, reply)


def deferred(queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
             dsn: str | None, reply: str) -> None:
    get().deferred(queue_id, rcpt, relay, delay, tries, dsn, reply)


def bounced(queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
            dsn: str | None, reply: str) -> None:
    get().bounced(queue_id, rcpt, relay, delay, tries, dsn, reply)


def expired(queue_id: str, rcpt: str, relay: str | None, delay: float, tries: int,
            dsn: str | None, reply: str) -> None:
    get().expired(queue_id, rcpt, relay, delay, tries, dsn, reply)


def notification(queue_id: str, action: str, dsn_queue_id: str) -> None:
    get().notification(queue_id, action, dsn_queue_id)


def delayed(queue_id: str, dsn_queue_id: str) -> None:
    get().delayed(queue_id, dsn_queue_id)


def held(queue_id: str) -> None:
    get().held(queue_id)


def released(queue_id: str) -> None:
    get().released(queue_id)


def removed(queue_id: str, by: str | None = None) -> None:
    get().removed(queue_id, by)


def disconnect(relay: str, auth: str | None = None, commands: str | None = None) -> None:
    get().disconnect(relay, auth, commands)


def tls_failed(relay: str, reason: str, listener: str | None = None,
               delay: float | None = None) -> None:
    get().tls_failed(relay, reason, listener, delay)


def host_failed(queue_id: str, relay: str, reason: str) -> None:
    get().host_failed(queue_id, relay, reason)


def next_host(queue_id: str, relay: str, rcpts: str, reason: str) -> None:
    get().next_host(queue_id, relay, rcpts, reason)


def tls_handshake_failed(queue_id: str, relay: str, reason: str,
                         next: str | None = None) -> None:  # noqa: A002
    get().tls_handshake_failed(queue_id, relay, reason, next)


def tls_not_used(queue_id: str, relay: str, why: str) -> None:
    get().tls_not_used(queue_id, relay, why)


def dkim(queue_id: str | None, result: str, **extra: Any) -> None:
    get().dkim(queue_id, result, **extra)


def warning(text: str, relay: str | None = None, queue_id: str | None = None,
            **extra: Any) -> None:
    get().warning(text, relay, queue_id, **extra)


def error(text: str, queue_id: str | None = None, **extra: Any) -> None:
    get().error(text, queue_id, **extra)


def daemon(state: str, **extra: Any) -> None:
    get().daemon(state, **extra)
