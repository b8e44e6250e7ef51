"""`authrelay queue ...`: mailq, sendmail -q and postsuper in one command.

Owns the operator's view of the queue. Contract:
    queue list [--json]      id, arrival, size, sender, recipients, state, last error
    queue show ID [--json]   envelope (with per-recipient state) and the message headers
    queue flush [ID]         try now, ignoring back-off
    queue hold ID | release ID
    queue delete ID... | --all
    queue corrupt [--json]   files moved to corrupt/ (damaged, or of a newer spool format)
Reads (list/show) come straight from the spool files, which the scheduler only ever
replaces atomically. list streams (as postqueue -p): each message is printed as it is
read, in memory bounded by one message's record (plus the queue ids). Changes go
through the running scheduler's control socket, or, when no scheduler runs, straight
to the files under the scheduler lock (control.py), so they never race a delivery.
Bare `authrelay queue` lists (mailq).
Exit status: 0 ok (also for a hold of a held message or a release of one not held: the
state asked for is there, said on stderr; and for a flush of a message whose delivery
attempt under way ended it); 1 a queue id was not found, was held (flush), its
file is damaged (flush ID: set aside in corrupt/, said so) or unreadable,
was delivered while being deleted, or the request failed; 69 (EX_UNAVAILABLE) flush while
no server runs ("mail system is down", as Postfix's postqueue says; the messages are
marked due and go when it starts); 77 (EX_NOPERM) the control socket is not ours to use.
Output to a closed pipe (`| head`) ends quietly (cli.py).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

from authrelay.config import load
from authrelay.maillog import escape
from authrelay.scheduler import control
from authrelay.spool import writable
from authrelay.spool.envelope import PENDING, Envelope
from authrelay.spool.store import Spool, SpoolError, is_queue_id

EX_UNAVAILABLE = 69  # sysexits.h: the mail system is down
EX_NOPERM = 77


def _spool(args: argparse.Namespace) -> Spool:
    # No config found: refuse (exit 75), never show or change a spool no server reads.
    cfg = load(args.config, embedded=False)
    return Spool(cfg.spool_dir)


def _active_ids(spool: Spool) -> set[str]:
    try:
        resp = control.request(control.control_path(spool), {"op": "status"}, timeout=10.0)
        return set(resp.get("active", []))
    except (control.ServerNotRunning, control.ServerBusy, OSError, ValueError):
        return set()


def _running(spool: Spool) -> bool:
    """Whether a scheduler holds the spool (its lock taken: answering or not)."""
    try:
        control.request(control.control_path(spool), {"op": "status"}, timeout=10.0)
    except control.ServerNotRunning:
        try:
            with control.offline(spool):
                return False
        except control.ServerBusy:
            return True
    except (control.ServerBusy, OSError, ValueError):
        return True
    return True


def _state(env: Envelope, active: set[str]) -> str:
    if env.held:
        return "held"
    if env.queue_id in active:
        return "active"
    if any(r.attempts for r in env.recipients if r.state == PENDING):
        return "deferred"
    return "active"  # waiting for its first attempt


def _t(value: str) -> str:
    """What a client or a remote server wrote, made safe for the operator's terminal (no
    escape sequences, no line breaks): the maillog's escaping (README "The maillog")."""
    return escape(value, "text")


def _last_error(env: Envelope) -> str:
    errs = [r for r in env.recipients if r.state == PENDING and r.last_code >= 400]
    return errs[-1].last_reply if errs else ""


def _record(env: Envelope, active: set[str]) -> dict[str, Any]:
    return {
        "id": env.queue_id,
        "arrival": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(env.received_at)),
        "arrival_ts": env.received_at,
        "size": env.size,
        "sender": env.sender,
        "state": _state(env, active),
        "last_error": _last_error(env),
        "recipients": [
            {"address": r.address, "state": r.state, "attempts": r.attempts,
             "last_reply": r.last_reply, "next_attempt": r.next_attempt}
            for r in env.recipients
        ],
        "auth_user": env.auth_user,
        "is_bounce": env.is_bounce,
    }


def _ids(spool: Spool) -> Iterator[str]:
    """Queued and held ids in arrival order, each once: the two directories' sorted
    lists merged (a message moved between them while listed shows up once)."""
    last = ""
    for qid in heapq.merge(spool.scan(), spool.held(), key=lambda s: (len(s), s)):
        if qid != last:
            yield qid
        last = qid


def _records(spool: Spool) -> Iterator[dict[str, Any]]:
    """One record per message, read as it is yielded (a queue of any size is listed in
    the memory of one envelope: only the ids are held, as the scan returns them)."""
    active = _active_ids(spool)
    for qid in _ids(spool):
        try:
            env = spool.load(qid)
        except FileNotFoundError:
            continue  # delivered while we listed
        except (SpoolError, OSError) as e:
            # Every key of _record (a script reading rec["auth_user"] must not fail on
            # the one damaged file); what could not be read is empty.
            yield {"id": qid, "arrival": "", "arrival_ts": 0, "size": 0, "sender": "",
                   "state": "unreadable", "last_error": str(e), "recipients": [],
                   "auth_user": "", "is_bounce": False}
            continue
        yield _record(env, active)


def _corrupt_note(spool: Spool) -> str:
    n = len(_corrupt_files(spool))
    if not n:
        return ""
    return (f"-- {n} damaged file{'s' if n != 1 else ''} in {spool.corrupt_dir} "
            "(not delivered; authrelay queue corrupt)")


def _json_array(items: Iterator[dict[str, Any]]) -> None:
    """json.dump(list(items), sys.stdout, indent=2), written element by element."""
    sep = "[\n"
    for item in items:
        sys.stdout.write(sep)
        sys.stdout.write(textwrap.indent(json.dumps(item, indent=2), "  ", lambda _: True))
        sep = ",\n"
    sys.stdout.write("[]" if sep == "[\n" else "\n]")


def cmd_list(args: argparse.Namespace) -> int:
    """Streams (as postqueue -p): each message is printed as it is read."""
    spool = _spool(args)
    recs = _records(spool)
    if args.json:
        _json_array(recs)
        sys.stdout.write("\n")
        note = _corrupt_note(spool)
        if note:
            print(note, file=sys.stderr)
        return 0
    total = count = 0
    for rec in recs:
        if not count:
            print(f"{'-Queue ID-':<18} {'-State-':<9} {'--Size--':>9} "
                  f"{'----Arrival Time----':<20} -Sender/Recipient-")
        count += 1
        total += rec["size"]
        sender = f"<{_t(rec['sender'])}>" if rec["sender"] else "<>"
        print(f"{rec['id']:<18} {rec['state']:<9} {rec['size']:>9} {rec['arrival']:<20}"
              f" {sender}")
        if rec["state"] == "unreadable":  # why, as a deferred message's last reply
            print(f"{'':<60}({_t(rec['last_error'])})")
        for r in rec["recipients"]:
            if r["state"] != PENDING:
                continue
            if r["last_reply"]:
                print(f"{'':<60}({_t(r['last_reply'])})")
            print(f"{'':<60}{_t(r['address'])}")
        print()
        if count == 1:
            sys.stdout.flush()  # the first message at once, also through a pipe
    note = _corrupt_note(spool)
    if not count:
        print("Mail queue is empty")
    else:
        print(f"-- {total} bytes in {count} request{'s' if count != 1 else ''}.")
    if note:
        print(note)
    return 0


def _corrupt_files(spool: Spool) -> list[str]:
    try:
        return sorted(p.name for p in spool.corrupt_dir.iterdir()
                      if not p.name.endswith(".state"))
    except FileNotFoundError:
        return []


def cmd_corrupt(args: argparse.Namespace) -> int:
    """The files the spool set aside: damaged, or written by a newer release (a
    downgrade across a spool format is not supported: upgrade again to deliver them)."""
    spool = _spool(args)
    recs = []
    for name in _corrupt_files(spool):
        p = spool.corrupt_dir / name
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        recs.append({"file": str(p), "id": name, "size": st.st_size,
                     "moved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
                     "why": spool.check_corrupt(name) or "intact and readable by this "
                     "release (set aside by an older one?): stop the server, move it and "
                     "its .state back to queue/, start"})
    if args.json:
        json.dump(recs, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not recs:
        print(f"No damaged files in {spool.corrupt_dir}")
        return 0
    for r in recs:
        print(f"{r['id']:<18} {r['size']:>9} {r['moved']:<20} {r['why']}")
    print(f"-- {len(recs)} file{'s' if len(recs) != 1 else ''} in {spool.corrupt_dir}: "
          "not delivered; a newer format needs the newer release, a damaged one is "
          "kept for you to inspect (the maillog said why when it was moved)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    spool = _spool(args)
    if spool.arriving(args.id):
        _err(f"{args.id}: {control.ARRIVING}")
        return 1
    try:
        env = spool.load(args.id)
        headers = spool.read_headers(args.id)
    except FileNotFoundError:
        print(f"authrelay: {_not_queued(spool, args.id)}", file=sys.stderr)
        return 1
    except SpoolError as e:
        print(f"authrelay: {args.id}: {e}", file=sys.stderr)
        return 1
    rec = _record(env, _active_ids(spool))
    if args.json:
        rec["envelope"] = json.loads(env.to_json())
        rec["headers"] = headers.decode("utf-8", "replace")
        json.dump(rec, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"Queue ID:  {env.queue_id}")
    print(f"State:     {rec['state']}")
    print(f"Arrival:   {rec['arrival']}")
    print(f"Size:      {env.size}")
    print(f"Sender:    <{_t(env.sender)}>")
    if env.auth_user:
        print(f"Auth user: {_t(env.auth_user)}")
    print(f"Client:    {_t(env.client_rdns or 'unknown')} [{_t(env.client_ip)}] "
          f"helo={_t(env.helo)}")
    for r in env.recipients:
        extra = f" attempts={r.attempts}" if r.attempts else ""
        print(f"Recipient: <{_t(r.address)}> {r.state}{extra}"
              + (f" ({_t(r.last_reply)})" if r.last_reply else ""))
    print()
    text = headers.decode("utf-8", "replace").rstrip("\r\n")
    for line in text.split("\r\n") if text else ():
        print(_t(line.replace("\t", " ")))  # a folded line starts with a tab
    return 0


def _err(text: str) -> None:
    print(f"authrelay: {text}", file=sys.stderr)


def _attempt_bound(attempt_timeout: float) -> str:
    """What bounds the wait for a delivery attempt in progress, for the operator."""
    if attempt_timeout <= 0:
        return "[delivery] attempt_timeout = 0: no limit on the attempt"
    for unit, n in (("h", 3600), ("m", 60)):
        if attempt_timeout >= n and attempt_timeout % n == 0:
            return f"at most [delivery] attempt_timeout, {int(attempt_timeout // n)}{unit}"
    return f"at most [delivery] attempt_timeout, {attempt_timeout:g}s"


def _change(args: argparse.Namespace, req: dict[str, Any]) -> int:
    cfg = load(args.config, embedded=False)
    spool = Spool(cfg.spool_dir)
    op = req["op"]
    running = True
    active: set[str] = set()
    # The scheduler answers a delete (a flush, a hold, a release) once the attempts in
    # progress on its messages have ended: [delivery] attempt_timeout bounds that wait
    # (a margin for the attempt's ending); 0 (no limit on the attempt): waits ~12 days.
    attempt = cfg.delivery.attempt_timeout
    timeout = 1e6 if attempt <= 0 else max(600.0, attempt + 60.0)
    try:
        if op in ("delete", "flush") and req.get("id"):
            active = _active_ids(spool)
            if op == "delete" and req["id"] in active:
                _err(f"{req['id']}: a delivery attempt is in progress; waiting for it to end "
                     f"({_attempt_bound(attempt)})")
        named = req.get("id")
        if named is not None and not is_queue_id(named):
            # No queue id (a paste gone wrong): not in the queue, asked of no one. Sent,
            # one of over MAX_REQUEST (an argument may be 128 KiB) had the scheduler
            # close the connection unanswered: "the scheduler closed the control
            # connection". (Whether one runs still decides what flush says.)
            resp: dict[str, Any] = {"ok": True, "done": [], "missing": [named],
                                    "failed": []}
            running = _running(spool)
        else:
            try:
                resp = control.request(control.control_path(spool), req, timeout=timeout)
            except control.ServerNotRunning:
                running = False
                if not writable.writable_forked(spool.root):  # never hang on a frozen disk
                    _err(writable.NOT_WRITABLE)
                    return 1
                with control.offline(spool):
                    resp = control.run_offline(spool, req)
    except control.ServerBusy as e:
        _err(str(e))
        return 1
    except PermissionError as e:
        _err(f"{e.filename or control.control_path(spool)}: permission denied (run as root "
             "or as the user that runs authrelay serve)")
        return EX_NOPERM
    except OSError as e:
        _err(f"{control.control_path(spool)}: {e.strerror or e}")
        return 1
    if not resp.get("ok"):
        _err(str(resp.get("error", "request failed")))
        return 1
    held = set(spool.held())
    queued = set(spool.scan())
    verb = {"flush": "flushed", "hold": "held", "release": "released",
            "delete": "deleted"}[op]
    rc = 0
    corrupt = set(_corrupt_files(spool)) if resp.get("failed") else set()
    for qid, why in resp.get("failed", []):  # a file that cannot be read or is damaged
        rc = 1
        if why == control.ARRIVING:
            _err(f"{qid}: {why}")
            continue
        where = (f"set aside in {spool.corrupt_dir} (not delivered; authrelay queue corrupt "
                 "says why)" if qid in corrupt else "(the file is left as it is)")
        _err(f"{qid}: cannot {op} it: {_t(str(why))} {where}")
    if op == "flush" and not running:
        for qid in resp.get("missing", []):
            _err(f"{qid}: is held, so it is not delivered (authrelay queue release {qid})"
                 if qid in held else _not_queued(spool, qid))
        n = len(resp.get("done", []))
        _err(f"cannot flush the queue: mail system is down (authrelay serve is not "
             f"running); {n} message{'s' if n != 1 else ''} marked to go as soon as it "
             "starts")
        return EX_UNAVAILABLE
    for qid in resp.get("done", []):
        print(f"{qid}: {verb}")
    for qid in resp.get("missing", []):
        if op == "flush" and qid in held:
            _err(f"{qid}: is held, so it is not delivered (authrelay queue release {qid})")
            rc = 1
        elif op == "hold" and qid in held:
            _err(f"{qid}: already held")
        elif op == "release" and qid in queued:
            _err(f"{qid}: is not held (authrelay queue flush {qid} to deliver it now)")
        elif op == "delete" and qid in active:
            _err(f"{qid}: delivered (or bounced) while being deleted: no longer in the "
                 "queue (see the maillog)")
            rc = 1
        elif op == "flush" and qid in active:  # the attempt under way was its flush
            _err(f"{qid}: delivered (or bounced) meanwhile, by the attempt that was under "
                 "way: no longer in the queue (see the maillog)")
        else:
            _err(_not_queued(spool, qid))
            rc = 1
    return rc


def _not_queued(spool: Spool, qid: str) -> str:
    """'QID: not in the queue', and where it is when the spool set it aside (the admin
    who read its id in the maillog or `queue list` is told why the command did nothing)."""
    corrupt = _corrupt_files(spool)
    if is_queue_id(qid) and qid in corrupt:
        return (f"{qid}: not in the queue: set aside in {spool.corrupt_dir} (not delivered; "
                "authrelay queue corrupt says why)")
    return f"{_t(qid)}: not in the queue"  # (an id typed or piped in: anything at all)


def cmd_flush(args: argparse.Namespace) -> int:
    return _change(args, {"op": "flush", "id": args.id} if args.id else {"op": "flush"})


def cmd_hold(args: argparse.Namespace) -> int:
    return _change(args, {"op": "hold", "id": args.id})


def cmd_release(args: argparse.Namespace) -> int:
    return _change(args, {"op": "release", "id": args.id})


def cmd_delete(args: argparse.Namespace) -> int:
    if args.all:
        if args.ids:
            print("authrelay: give queue ids or --all, not both", file=sys.stderr)
            return 2
        return _change(args, {"op": "delete", "all": True})
    if not args.ids:
        print("authrelay: queue delete needs a queue id or --all", file=sys.stderr)
        return 2
    rc = 0
    for qid in dict.fromkeys(args.ids):  # an id given twice is deleted once, not "missing"
        rc |= _change(args, {"op": "delete", "id": qid})
    return rc


def register(subparsers: Any) -> None:
    q = subparsers.add_parser("queue", help="list, show, flush, hold, release, delete queued mail")
    qs = q.add_subparsers(dest="queue_command", metavar="ACTION")
    q.set_defaults(func=cmd_list, json=False)  # bare `authrelay queue` lists, as mailq
    p = qs.add_parser("list", help="list queued messages (mailq)")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=cmd_list)
    p = qs.add_parser("show", help="show one message's envelope and headers")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=cmd_show)
    p = qs.add_parser("flush", help="deliver now, ignoring back-off (sendmail -q)")
    p.add_argument("id", nargs="?", help="one message (default: every deferred one)")
    p.set_defaults(func=cmd_flush)
    p = qs.add_parser("hold", help="keep a message from being delivered")
    p.add_argument("id")
    p.set_defaults(func=cmd_hold)
    p = qs.add_parser("release", help="release a held message")
    p.add_argument("id")
    p.set_defaults(func=cmd_release)
    p = qs.add_parser("delete", help="delete messages (postsuper -d)")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="delete every queued and held message")
    p.set_defaults(func=cmd_delete)
    p = qs.add_parser("corrupt", help="list the files set aside in corrupt/ (damaged, or "
                      "of a newer spool format)")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=cmd_corrupt)
