"""Queue control: the channel between `authrelay queue ...` and a running scheduler.

Owns the control protocol and the offline queue operations. Contract: the scheduler
listens on the unix stream socket `spool_dir/control.sock` (mode 0600, so only the spool's
owner may talk to it); each request is one line of JSON, each answer one line of JSON:

    {"op": "flush", "id": "ID"}      {"op": "flush"}            (all)
    {"op": "hold" | "release", "id": "ID"}
    {"op": "delete", "id": "ID"}     {"op": "delete", "all": true}
    {"op": "hold", "user": "U"}      every queued message U sent (containment)
    {"op": "release" | "delete", "user": "U"}   every held message U sent
    {"op": "status"}                 -> {"ok": true, "active": [ids in flight]}
    answer: {"ok": true, "done": [ids], "missing": [ids], "failed": [[id, why]]} or
            {"ok": false, "error": "..."}; failed: a named id whose file could not be read
            (left as is), or still being received (why == ARRIVING: not in the queue yet)

The scheduler performs every change itself (after any in-flight delivery of that message
ends), so the CLI never races it. When no scheduler runs (connect fails and the scheduler
lock `spool_dir/scheduler.lock` is free) the CLI acts on the files directly, holding that
lock so a scheduler starting meanwhile waits. Failure policy: a scheduler that holds the lock
but does not answer is an error for the operator (never a silent offline edit).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from authrelay import process
from authrelay.jsonline import read_line, request_object
from authrelay.scheduler.inflight import record_deleted
from authrelay.spool.store import InCommit, Spool, SpoolError, is_queue_id

MAX_REQUEST = 64 * 1024
CONTROL_SOCK = "control.sock"  # in spool_dir: the scheduler's control socket (0600)
SCHEDULER_LOCK = "scheduler.lock"  # in spool_dir: held (flock) by the one scheduler
# A named request (show, flush, hold, release, delete) of a message still being received
# (Spool.arriving, store.InCommit): what the operator is told, after "ID: " (as Postfix,
# whose commands leave a message in incoming/ alone until it is complete)
ARRIVING = "not in the queue yet: still being received (its client has no reply yet): try again"

# A delete of a success notice whose message's in-flight journal line saying it is queued
# (`{"s": N}`) is not written within inflight.BEGIN_WAIT (the journal's thread behind: the
# spool stalled?): deleted then, a crash's start would queue it again (scheduler._said_within)
UNSAID = ("a success notice the in-flight journal does not yet say is queued (its writer "
          "is behind: the spool stalled?): try again")

# A flush asked of a scheduler that is stopping (its control connection opened before)
STOPPING = ("cannot flush: mail system is stopping (authrelay serve is shutting down); "
            "nothing flushed: flush again once it has started")


def control_path(spool: Spool) -> Path:
    return spool.root / CONTROL_SOCK


class ServerNotRunning(Exception):
    """No scheduler answers on the control socket."""


class ServerBusy(Exception):
    """A scheduler holds the lock but its control socket does not answer."""


# --------------------------------------------------------------------------- server side

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on `path` (a stale socket file from a crash is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    break
                if not line:
                    break
                try:
                    req = request_object(line)
                except ValueError as e:
                    resp: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
                else:
                    try:
                        resp = await handler(req)
                    except Exception as e:  # report, keep serving
                        resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                writer.write(json.dumps(resp).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old)
    return server


def acquire_scheduler_lock(spool: Spool, *, block: bool = False) -> int:
    """Taken by the scheduler for its lifetime (and by the CLI for offline edits).
    Returns the fd; raises BlockingIOError when another process holds it."""
    spool.ensure_dirs()
    fd = os.open(spool.root / SCHEDULER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_scheduler_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing drops the flock


# --------------------------------------------------------------------------- client side

def request(path: Path, req: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Send one request to a running scheduler; ServerNotRunning if none listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ServerNotRunning(str(e)) from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = read_line(s)
    finally:
        s.close()
    if not buf:
        raise ServerBusy("the scheduler closed the control connection")
    return json.loads(buf)


@contextlib.contextmanager
def offline(spool: Spool) -> Iterator[None]:
    """Hold the scheduler lock for a direct edit; ServerBusy if a scheduler runs.
    Run by root on a spool another user owns (the daemon's `user`), the edit is done
    with that user's rights (effective uid and gid, restored after): the spool is that
    user's to change, so a link planted in it (hold/ pointing at /etc) cannot make root
    move or write files elsewhere, and the files made (ID.state) stay the daemon's."""
    with process.as_owner_of(spool.root):
        try:
            fd = acquire_scheduler_lock(spool)
        except BlockingIOError:
            raise ServerBusy(
                "a scheduler holds the spool lock but its control socket does not answer"
            ) from None
        try:
            yield
        finally:
            release_scheduler_lock(fd)


# --------------------------------------------------------------------------- operations

def flush_files(spool: Spool, qid: str) -> None:
    """Make every pending recipient due now (offline flush: the next start tries them).
    A held message is not flushed (FileNotFoundError, as the scheduler answers); a file
    that cannot be read raises SpoolError and is left as it is."""
    if not is_queue_id(qid) or not (spool.queue_dir / qid).exists():
        raise FileNotFoundError(qid)
    env = spool.load(qid)
    changed = False
    for r in env.pending:
        if r.next_attempt:
            r.next_attempt = 0.0
            changed = True
    if changed:
        spool.save_state(env)


def ids_of_user(spool: Spool, user: str, held: bool) -> list[str]:
    """The queue ids of `user`'s authenticated mail: held ones, or those in the queue."""
    out = []
    for qid in (spool.held() if held else spool.scan()):
        try:
            if spool.load(qid).auth_user == user:
                out.append(qid)
        except Exception:  # gone, being written, damaged: not ours to judge here
            continue
    return out


def run_offline(spool: Spool, req: dict[str, Any]) -> dict[str, Any]:
    """Perform a control request directly on the files (no scheduler running)."""
    op = req.get("op")
    if op == "status":
        return {"ok": True, "active": []}
    ids: list[str]
    if req.get("user") and op in ("hold", "release", "delete"):
        ids = ids_of_user(spool, str(req["user"]), op != "hold")
    elif req.get("all"):
        ids = spool.scan() + spool.held() if op == "delete" else spool.scan()
    elif req.get("id"):
        ids = [str(req["id"])]
    elif op == "flush":
        ids = spool.scan()
    else:
        return {"ok": False, "error": f"{op}: a queue id is required"}
    done, missing = [], []
    failed: list[list[str]] = []
    unrecorded = ""
    try:
        for qid in ids:
            try:
                if req.get("id") and spool.arriving(qid):
                    raise InCommit(qid)
                if op == "flush":
                    flush_files(spool, qid)
                elif op == "hold":
                    if not spool.hold(qid):
                        raise FileNotFoundError(qid)  # held already
                elif op == "release":
                    if not spool.release(qid):
                        raise FileNotFoundError(qid)  # not held
                elif op == "delete":
                    spool.remove(qid)
                else:
                    return {"ok": False, "error": f"unknown op {op!r}"}
                done.append(qid)
            except InCommit:
                if req.get("id"):
                    failed.append([qid, ARRIVING])
                else:  # a user's (containment): the scheduler holds it before sending
                    missing.append(qid)
            except FileNotFoundError:
                missing.append(qid)
            except SpoolError as e:  # damaged or of a newer format: not ours to touch here
                failed.append([qid, str(e)])
    finally:
        # The delete is final: a success notice a killed run committed before its journal
        # said so is not queued again by the next start (inflight.record_deleted); each
        # id removed is recorded also when the loop is cut (an unlink's error, a Ctrl-C).
        if op == "delete" and done:
            try:
                record_deleted(spool.root, done)
            except OSError as e:
                unrecorded = (f"deleted {len(done)}, but cannot record it in the in-flight "
                              f"journal (a success notice among them may be queued again "
                              f"at the start): {e}")
    if unrecorded:
        return {"ok": False, "error": unrecorded}
    return {"ok": True, "done": done, "missing": missing, "failed": failed}


async def hold_user(spool: Spool, user: str) -> int:
    """Containment (policy/suspender.py, from a receiving process): ask this node's
    scheduler to hold `user`'s queued mail; how many of the user's messages are held now
    (any the scheduler held itself before sending included). No scheduler running: the
    files are moved directly, under its lock."""
    resp = await asyncio.to_thread(perform, spool, {"op": "hold", "user": user}, 60.0)
    if not resp.get("ok"):
        raise RuntimeError(str(resp.get("error")))
    return len(await asyncio.to_thread(ids_of_user, spool, user, True))


def perform(spool: Spool, req: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Ask the running scheduler, else act on the files under the scheduler lock."""
    try:
        return request(control_path(spool), req, timeout=timeout)
    except ServerNotRunning:
        pass
    with offline(spool):
        return run_offline(spool, req)
