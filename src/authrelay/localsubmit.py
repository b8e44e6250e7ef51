"""Local submission through the running server: `state_dir/public/submit.sock`.

Owns the socket every local user's `authrelay sendmail` (and /usr/sbin/sendmail, mailq -bs)
talks to, both ends of its protocol, and the identity of local mail. The master (or the
single process) serves it: it runs the scheduler, so the one process that is always there
when the server is up, whatever `workers` says.

Identity: the kernel's SO_PEERCRED uid of the connecting process decides the user; nothing
the client sends can change it. The envelope sender is `login@hostname` (root:
`root@hostname`, as sendmail), `Received: by HOST (authrelay, from userid N)`, the `From:`
added when missing names the same user, and the maillog line carries `uid=N user=LOGIN`.
-f (or MAIL FROM in -bs) is honoured only for trusted users (root, the daemon's user,
`trusted_users`, as sendmail's class t); anyone else may only name their own address.

Protocol (client -> server, then one answer line):
    {"v": 1, "opts": {...sendmail Options...}}\\n           one JSON line (<= 64 KiB)
    <4-byte big-endian length><data> ...  <0000>            the message, framed
    server: {"code": 0, "queue_id": "..."} | {"code": N, "error": "..."}\\n
The zero frame ends the message: a client that dies before it (EOF) queued nothing (the
draft is aborted; nothing half-written). The client reads its standard input whole (a
temporary file past 1 MiB) before it connects, so a slow pipeline never holds the server.

Abuse by local users: the socket is open to all (0666 in a 0711 directory, the state dir
0711 with every other entry 0700/0600), so the same limits as SMTP apply: max_message_size
(counted while reading: the server stops reading past it), user_messages_per_hour and
user_recipients_per_hour per local user (trusted users exempt), max_recipients, at most
PER_UID_ACTIVE concurrent submissions per uid and MAX_ACTIVE in all (then 75, try again),
READ_DEADLINE for the request and the whole message (a stop cuts those still
reading after shutdown_timeout). The submissions run in a small thread pool (the
spool writes and fsyncs are blocking), never on the event loop.

Failure policy: every refusal is the sendmail exit code (sysexits) and one line; the server
logs a `reject=` or the `from=` line; no server listening (ENOENT / ECONNREFUSED): the
client says so and the caller decides (root queues directly, anyone else exits 75).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import os
import socket
import stat
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, BinaryIO

from authrelay import localmail, stopdeadline
from authrelay import maillog as maillog_mod
from authrelay.config import Config
from authrelay.jsonline import read_line, request_object
from authrelay.spool.envelope import Envelope
from authrelay.spool.submit import Submitter

SOCKET_DIR = "public"
SOCKET_NAME = "submit.sock"
# Where the client looks when it may not read the config (a 0640 config holding a
# database password): the packaged state_dir. $AUTHRELAY_SUBMIT_SOCKET overrides it.
DEFAULT_SOCKET = "/var/lib/authrelay/public/submit.sock"
SOCKET_ENV = "AUTHRELAY_SUBMIT_SOCKET"

MAX_REQUEST = 64 * 1024
MAX_FRAME = 1024 * 1024
FRAME = 256 * 1024  # what the client sends per frame
MAX_ACTIVE = 8  # submissions being read and stored at once (threads)
MAX_WAITING = 64  # connections waiting for a thread before new ones are refused
PER_UID_ACTIVE = 4
IO_TIMEOUT = 60.0  # writing the answer
# Reading the request and the whole message: the client has read its input before it
# connects and sends at once, so this is generous; a client that drips (a byte a minute
# kept a thread for ever under a per-read timeout: two local users held all MAX_ACTIVE
# threads and every other user's mail waited) is cut here, with nothing queued.
READ_DEADLINE = 30.0

EX_TEMPFAIL = 75
EX_PROTOCOL = 76


def socket_path(cfg: Config) -> Path:
    return cfg.state_path / SOCKET_DIR / SOCKET_NAME


class Truncated(Exception):
    """The client went away before the end of the message."""


class _Frames:
    """The framed message as a stream with readline() (what localmail.submit reads)."""

    def __init__(self, f: BinaryIO, on_end: Any = None) -> None:
        self._f = f
        # The frames read and not yet returned start at _pos: a line is sliced out, the
        # rest never copied (a frame of a million one-byte lines was a million copies of
        # up to a MiB each, seconds of the master's CPU per MiB a local user sent).
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._on_end = on_end  # called once the zero frame (the end) has been read

    def _fill(self) -> None:
        head = self._f.read(4)
        if len(head) < 4:
            raise Truncated("connection closed before the end of the message")
        (n,) = struct.unpack(">I", head)
        if n == 0:
            self._eof = True
            if self._on_end is not None:
                self._on_end()
            return
        if n > MAX_FRAME:
            raise Truncated(f"frame of {n} bytes")
        data = self._f.read(n)
        if len(data) < n:
            raise Truncated("connection closed in the middle of the message")
        self._buf = self._buf[self._pos:] + data  # the rest is short: no line end in it
        self._pos = 0

    def readline(self, limit: int = -1) -> bytes:
        while True:
            buf, pos = self._buf, self._pos
            end = len(buf) if limit < 0 else min(pos + limit, len(buf))
            i = buf.find(b"\n", pos, end)
            if i >= 0:
                end = i + 1
            if i >= 0 or (limit >= 0 and len(buf) - pos >= limit) or self._eof:
                self._pos = end
                return buf[pos:end]
            self._fill()


class LocalSubmission:
    """The server end: accepts on the socket, runs each submission in a thread."""

    def __init__(self, cfg: Config, submitter: Submitter,
                 maillog: maillog_mod.MailLog) -> None:
        self.cfg = cfg
        self.path = socket_path(cfg)
        self.maillog = maillog
        # Its own submitter (wiring.local_submission): a Spool without the scheduler's
        # in-process hook, since commits happen in pool threads; the scheduler is woken
        # by the notify datagram instead.
        self.submitter = submitter
        self._pool = ThreadPoolExecutor(max_workers=MAX_ACTIVE,
                                        thread_name_prefix="local-submit")
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._active: collections.Counter[int] = collections.Counter()
        self._pending: set[asyncio.Future[None]] = set()
        self._sent: dict[str, collections.deque[tuple[float, int]]] = {}
        self._conns: set[socket.socket] = set()  # being served (stop() may cut them)
        self._uid = os.geteuid()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        d = self.path.parent
        d.mkdir(mode=0o711, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{d}: not a directory owned by uid {os.geteuid()}")
        os.chmod(d, 0o711)
        # Every local user must reach the socket: the state dir is searchable (0711),
        # nothing in it but public/ is open to others (files 0600, directories 0700).
        with contextlib.suppress(OSError):
            if os.stat(self.cfg.state_path).st_mode & 0o777 == 0o700:
                os.chmod(self.cfg.state_path, 0o711)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(self.path))
            os.chmod(self.path, 0o666)
            s.listen(64)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self._task = asyncio.get_running_loop().create_task(self._accept())

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        self.submitter.reload(cfg)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close()
            # Not on the event loop: on a frozen filesystem the unlink waits for the
            # thaw, and the stop does not (stopdeadline.py; the next start unlinks it).
            await stopdeadline.unlink([self.path], "submit-socket-unlink")
        if self._pending:  # submissions being stored finish, up to shutdown_timeout
            _, late = await asyncio.wait(self._pending, timeout=self.cfg.shutdown_timeout)
            if late:  # still reading from their clients: cut them (nothing is queued)
                for conn in list(self._conns):
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RD)  # its read ends; the answer goes
                await asyncio.wait(self._pending, timeout=IO_TIMEOUT)
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ serving
    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # EMFILE and the like: say so, breathe, go on
                self.maillog.warning(f"local submission: accept failed: {e.strerror or e}")
                await asyncio.sleep(0.5)
                continue
            try:
                uid = _peer_uid(conn)
            except OSError:
                conn.close()
                continue
            if len(self._pending) >= MAX_WAITING or self._active[uid] >= PER_UID_ACTIVE:
                _answer(conn, {"code": EX_TEMPFAIL, "error": "too many local submissions "
                               "at once; try again later"})
                conn.close()
                continue
            self._active[uid] += 1
            fut = loop.run_in_executor(self._pool, self._handle, conn, uid)
            self._pending.add(fut)
            fut.add_done_callback(functools.partial(self._done, uid=uid))

    def _done(self, fut: asyncio.Future[None], uid: int) -> None:
        self._pending.discard(fut)
        self._active[uid] -= 1
        if self._active[uid] <= 0:
            del self._active[uid]
        if not fut.cancelled() and fut.exception() is not None:
            self.maillog.error(f"local submission failed: {fut.exception()!r}")

    def _handle(self, conn: socket.socket, uid: int) -> None:
        """One submission (a pool thread): read, queue, answer. Never raises."""
        cfg = self.cfg
        who = localmail.identity(uid, cfg, server_uid=self._uid)
        self._conns.add(conn)
        # Reading has READ_DEADLINE in all: the timer shuts the socket's reading side down
        # (the read in progress sees EOF: Truncated, nothing queued). It is stopped once
        # the whole message is in, so storing it and answering are never cut.
        cut = threading.Timer(READ_DEADLINE, _cut_reading, (conn,))
        cut.daemon = True
        try:
            conn.setblocking(True)
            conn.settimeout(IO_TIMEOUT)
            f = conn.makefile("rb")
            cut.start()
            try:
                opts = _options(f.readline(MAX_REQUEST))
                qid = localmail.submit(opts, _Frames(f, on_end=cut.cancel), cfg, who,
                                      submitter=lambda: self.submitter,
                                      check=lambda env: self._limits(env, who))
                resp: dict[str, Any] = {"code": 0, "queue_id": qid}
            except localmail.Fail as e:
                resp = {"code": e.code, "error": str(e)}
                # (one line per refusal: the spool's was written with its queue id)
                if not e.logged and (e.code != EX_TEMPFAIL or "per hour" in str(e)):
                    self.maillog.warning(f"local submission refused: {e}", uid=uid,
                                         user=who.login)
            except (Truncated, TimeoutError, OSError, ValueError) as e:
                # Nothing was stored: localmail.queue_message aborts the draft on any error.
                resp = {"code": EX_TEMPFAIL, "error": f"message not queued: {e}"}
                self.maillog.warning(f"local submission aborted: {e}", uid=uid,
                                     user=who.login)
            finally:
                f.close()
            _answer(conn, resp)
        except Exception as e:  # a bug: one error line, the client gets 75
            self.maillog.error(f"local submission: {type(e).__name__}: {e}", uid=uid)
            _answer(conn, {"code": EX_TEMPFAIL, "error": "local error in processing"})
        finally:
            self._conns.discard(conn)
            cut.cancel()
            conn.close()

    def _limits(self, env: Envelope, who: localmail.Identity) -> None:
        """user_messages_per_hour / user_recipients_per_hour / max_recipients for local
        users, as for an authenticated SMTP user (trusted users are exempt from the rate)."""
        lim = self.cfg.limits
        n = len(env.recipients)
        if lim.max_recipients and n > lim.max_recipients:
            raise localmail.Fail(localmail.EX_DATAERR, f"too many recipients ({n}; "
                                f"limits.max_recipients {lim.max_recipients})")
        if who.trusted or not (lim.user_messages_per_hour or lim.user_recipients_per_hour):
            return
        now = time.monotonic()
        sent = self._sent.setdefault(who.login, collections.deque())
        while sent and sent[0][0] < now - 3600:
            sent.popleft()
        if lim.user_messages_per_hour and len(sent) + 1 > lim.user_messages_per_hour:
            raise localmail.Fail(EX_TEMPFAIL, "message rate limit reached "
                                f"({lim.user_messages_per_hour} per hour)")
        rcpts = sum(k for _, k in sent)
        if lim.user_recipients_per_hour and rcpts + n > lim.user_recipients_per_hour:
            raise localmail.Fail(EX_TEMPFAIL, "recipient rate limit reached "
                                f"({lim.user_recipients_per_hour} per hour)")
        sent.append((now, n))


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _cut_reading(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RD)


def _answer(conn: socket.socket, resp: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(resp).encode() + b"\n")


def _options(line: bytes) -> localmail.Options:
    """The client's Options (only known fields of the right types; the rest refused)."""
    if not line.endswith(b"\n"):
        raise ValueError(f"request longer than {MAX_REQUEST} bytes" if len(line) >= MAX_REQUEST
                         else "bad request")
    req = request_object(line)
    if req.get("v") != 1 or not isinstance(req.get("opts"), dict):
        raise ValueError("bad request")
    kinds = {f.name: f.type for f in fields(localmail.Options)}
    out = localmail.Options()
    for k, v in req["opts"].items():
        if k not in kinds or k in ("config", "mode", "queue_arg"):
            raise ValueError(f"bad request field {localmail.shown(k)!r}")
        want = getattr(out, k)
        ok = (isinstance(v, list) and all(isinstance(x, str) for x in v)
              if isinstance(want, list)
              else v is None or isinstance(v, str) if k in ("sender", "fullname")
              else isinstance(v, type(want)))
        if not ok:
            raise ValueError(f"bad request field {localmail.shown(k)!r}")
        setattr(out, k, v)
    return out


# --------------------------------------------------------------------------- client side

class NotRunning(Exception):
    """No server listens on the socket (not started, or gone)."""


def buffer_stdin(stdin: BinaryIO, limit: int = 0) -> BinaryIO:
    """The whole input, read before connecting (memory, then a temporary file). `limit`
    (max_message_size when this user may read the config; 0: none known): past it the
    reading stops with Fail(EX_DATAERR), as the server would refuse it anyway, instead of
    filling the temporary directory with a runaway cron job's endless output."""
    tmp = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)  # noqa: SIM115
    total = 0
    while True:
        chunk = stdin.read(FRAME)
        if not chunk:
            break
        total += len(chunk)
        if limit and total > limit:
            tmp.close()
            raise localmail.Fail(localmail.EX_DATAERR,
                                 f"message too big (limit {limit} bytes); not queued")
        tmp.write(chunk)
    tmp.seek(0)
    return tmp  # type: ignore[return-value]


def request_too_long(opts: localmail.Options, size: int) -> str:
    """Why a command line's request is refused before connecting: the server reads at
    most MAX_REQUEST bytes of it (and answered 75 `bad request` past them: retried for
    ever by cron, the cause unsaid)."""
    return (f"the command line's {len(opts.recipients)} recipients and options take "
            f"{size} bytes, more than the {MAX_REQUEST} a local submission takes: give the "
            "recipients in the message's To:, Cc: or Bcc: with -t, or send it in parts; "
            "message not queued")


def send(path: str | os.PathLike[str], opts: localmail.Options, message: BinaryIO,
         timeout: float = 300.0) -> dict[str, Any]:
    """Submit through the server at `path`: its answer ({"code": ..., ...}).
    NotRunning when nobody listens there; Fail(EX_USAGE) for a request (the recipients
    and options) longer than MAX_REQUEST, before anything is sent."""
    data = {k: v for k, v in asdict(opts).items() if k not in ("config", "mode",
                                                              "queue_arg")}
    request = json.dumps({"v": 1, "opts": data}).encode() + b"\n"
    if len(request) > MAX_REQUEST:
        raise localmail.Fail(localmail.EX_USAGE, request_too_long(opts, len(request)))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise NotRunning(f"{path}: {e.strerror}") from None
        try:
            s.sendall(request)
            while True:
                chunk = message.read(FRAME)
                if not chunk:
                    break
                s.sendall(struct.pack(">I", len(chunk)) + chunk)
            s.sendall(struct.pack(">I", 0))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading (too big, refused): its answer says why
        buf = read_line(s)
    finally:
        s.close()
    if not buf.endswith(b"\n"):
        return {"code": EX_TEMPFAIL, "error": "the server closed the connection without "
                "an answer; message not queued"}
    resp = json.loads(buf)
    if not isinstance(resp, dict) or not isinstance(resp.get("code"), int):
        return {"code": EX_PROTOCOL, "error": "unexpected answer from the server"}
    return resp
