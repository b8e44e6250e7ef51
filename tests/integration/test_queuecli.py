"""`authrelay queue ...` as a subprocess: on a spool with no server, and against a running
Scheduler (control socket) in this test's event loop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.maillog import ListLog
from support.wait import until
from test_scheduler import TEMP, FakeCourier

from authrelay import wiring
from authrelay.scheduler import control
from authrelay.scheduler.inflight import InflightJournal
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool

pytestmark = pytest.mark.slow

BODY = b"From: a@a.example\r\nSubject: queue test\r\n\r\nhello\r\n"


@pytest.fixture
def site() -> Iterator[tuple[Path, Spool]]:
    d = Path(tempfile.mkdtemp(prefix="arc", dir="/tmp"))
    cfgfile = d / "authrelay.toml"
    cfgfile.write_text(f'hostname = "relay.test"\nstate_dir = "{d}"\n'
                       '[delivery]\nretry = ["1h"]\ndelay_warning = 0\n')
    spool = Spool(d / "spool")
    spool.ensure_dirs()
    yield cfgfile, spool
    spool.close()
    shutil.rmtree(d, ignore_errors=True)


async def put(spool: Spool, rcpts: list[str], sender: str = "a@a.example") -> str:
    env = Envelope(queue_id=new_queue_id(), sender=sender,
                   recipients=[Recipient(r) for r in rcpts])
    inc = spool.begin(env)
    inc.write(BODY)
    await inc.commit()
    return inc.queue_id


def cli(cfgfile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "authrelay", "-c", str(cfgfile), "queue", *args],
                          capture_output=True, text=True, timeout=60, env=env)


async def acli(cfgfile: Path, *args: str) -> tuple[int, str, str]:
    """The CLI without blocking the loop the scheduler runs on."""
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authrelay", "-c", str(cfgfile), "queue", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await p.communicate()
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def parked_requests(sched: Any) -> list[str]:
    """The ids of the control requests `sched` parks in _wait_idle from now on (behind a
    delivery, or another request's change), in order: seen there, the CLI reached it."""
    parked: list[str] = []
    wait_idle = sched._wait_idle

    async def spy(qid: str) -> None:
        parked.append(qid)
        await wait_idle(qid)

    sched._wait_idle = spy
    return parked


def listing(cfgfile: Path) -> dict[str, dict]:
    r = cli(cfgfile, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {rec["id"]: rec for rec in json.loads(r.stdout)}


async def site_scheduler(cfgfile: Path, spool: Spool, *, start: bool) -> Any:
    """The site's scheduler (a FakeCourier's), started when `start`: else the CLI finds
    none and edits the files under its lock."""
    from authrelay.config import load

    sched = wiring.scheduler(load(str(cfgfile)), spool, FakeCourier(), ListLog())
    if start:
        await sched.start()
    return sched


async def test_offline_list_show_hold_release_delete(site: tuple[Path, Spool]) -> None:
    cfgfile, spool = site
    q1 = await put(spool, ["x@b.example", "y@b.example"])
    q2 = await put(spool, ["z@c.example"])
    env = spool.load(q2)
    env.recipients[0].attempts = 2
    env.recipients[0].last_code = 451
    env.recipients[0].last_reply = "451 4.4.1 connection refused"
    env.recipients[0].next_attempt = time.time() + 3600
    spool.save_state(env)

    recs = listing(cfgfile)
    assert set(recs) == {q1, q2}
    assert recs[q1]["state"] == "active" and recs[q2]["state"] == "deferred"
    assert recs[q2]["last_error"] == "451 4.4.1 connection refused"
    assert recs[q1]["sender"] == "a@a.example" and recs[q1]["size"] == len(BODY)
    assert [r["address"] for r in recs[q1]["recipients"]] == ["x@b.example", "y@b.example"]
    assert recs[q1]["arrival"].endswith("Z")

    text = cli(cfgfile, "list")
    assert q1 in text.stdout and "connection refused" in text.stdout
    assert "2 requests" in text.stdout

    show = cli(cfgfile, "show", q1)
    assert show.returncode == 0
    assert "Subject: queue test" in show.stdout and "<x@b.example>" in show.stdout

    assert cli(cfgfile, "hold", q1).returncode == 0
    assert spool.held() == [q1]
    assert listing(cfgfile)[q1]["state"] == "held"
    assert cli(cfgfile, "release", q1).returncode == 0
    assert spool.held() == [] and q1 in spool.scan()

    # Offline flush: no server to deliver it; said so (non-zero), marked due for the start.
    r = cli(cfgfile, "flush", q2)
    assert r.returncode == 69 and "mail system is down" in r.stderr and r.stdout == ""
    assert spool.load(q2).recipients[0].next_attempt == 0
    # Hold of a held message, release of one that is not: the asked state is there.
    cli(cfgfile, "hold", q1)
    assert cli(cfgfile, "hold", q1).returncode == 0 and spool.held() == [q1]
    cli(cfgfile, "release", q1)
    assert cli(cfgfile, "release", q1).returncode == 0 and spool.held() == []

    r = cli(cfgfile, "delete", q1)
    assert r.returncode == 0 and f"{q1}: deleted" in r.stdout
    assert spool.scan() == [q2]
    missing = cli(cfgfile, "delete", q1)
    assert missing.returncode == 1 and "not in the queue" in missing.stderr
    assert cli(cfgfile, "show", "NOSUCHID").returncode == 1

    spool.hold(q2)
    await put(spool, ["w@b.example"])
    assert cli(cfgfile, "delete", "--all").returncode == 0
    assert spool.scan() == [] and spool.held() == []
    assert cli(cfgfile, "list").stdout.strip() == "Mail queue is empty"


async def test_offline_edit_refused_when_scheduler_lock_held(site: tuple[Path, Spool]) -> None:
    cfgfile, spool = site
    qid = await put(spool, ["x@b.example"])
    fd = control.acquire_scheduler_lock(spool)  # a scheduler without a control socket
    try:
        r = cli(cfgfile, "hold", qid)
    finally:
        control.release_scheduler_lock(fd)
    assert r.returncode == 1 and "lock" in r.stderr
    assert spool.held() == []


async def test_cli_against_running_scheduler(site: tuple[Path, Spool]) -> None:
    cfgfile, spool = site
    from authrelay.config import load

    cfg = load(str(cfgfile))
    courier = FakeCourier()
    log = ListLog()
    sched = wiring.scheduler(cfg, spool, courier, log)
    await sched.start()
    try:
        # 1. A deferred message: flush delivers it now, ignoring the 1h back-off.
        courier.script["d@b.example"] = [TEMP]
        qd = await put(spool, ["d@b.example"])
        await until(lambda: log.grep(qd, "Deferred"), "deferral")
        await until(lambda: not sched.active, "idle")
        rc, out, err = await acli(cfgfile, "list", "--json")
        assert rc == 0, err
        assert {r["id"]: r["state"] for r in json.loads(out)}[qd] == "deferred"
        rc, out, _ = await acli(cfgfile, "flush", qd)
        assert rc == 0 and f"{qd}: flushed" in out
        await until(lambda: qd not in spool.scan(), "flushed delivery")
        assert len(courier.calls_for("d@b.example")) == 2

        # 2. Hold while a delivery is in flight: done after that attempt ends, no race.
        gate = courier.gates["slow.example"] = asyncio.Event()
        courier.script["s@slow.example"] = [TEMP]
        qs = await put(spool, ["s@slow.example"])
        await until(lambda: qs in sched.active and courier.calls_for("s@slow.example"),
                    "in flight")
        rc, out, _ = await acli(cfgfile, "list", "--json")
        assert {r["id"]: r["state"] for r in json.loads(out)}[qs] == "active"
        # The scheduler parks a control request in _wait_idle while that message is in
        # flight: seen there, the CLI has reached it, and the hold must not be done yet.
        parked = parked_requests(sched)
        hold = asyncio.create_task(acli(cfgfile, "hold", qs))
        await until(lambda: qs in parked, "the hold request parked behind the delivery")
        assert not hold.done() and spool.held() == []  # not while the delivery is in flight
        assert not log.grep(qs, "held")
        gate.set()
        rc, out, err = await hold
        assert rc == 0, err
        assert spool.held() == [qs] and qs not in spool.scan()
        # The attempt ended (deferred) before the hold: the maillog says so in that order.
        deferred = log.lines.index(log.grep(qs, "Deferred")[0])
        assert deferred < log.lines.index(log.grep(qs, "held")[0])
        assert spool.load(qs).recipients[0].attempts == 1  # the attempt's state was kept
        sched.flush(qs)  # held mail is skipped even when asked
        await until(lambda: not sched.active, "idle")
        assert len(courier.calls_for("s@slow.example")) == 1

        # 3. Release: delivered at once.
        rc, _, _ = await acli(cfgfile, "release", qs)
        assert rc == 0
        await until(lambda: not spool.scan() and not spool.held(), "released delivery")
        assert len(courier.calls_for("s@slow.example")) == 2

        # 4. Delete through the scheduler, single and --all (held included).
        courier.script["z@b.example"] = [TEMP]
        courier.script["y@b.example"] = [TEMP]
        qz = await put(spool, ["z@b.example"])
        qy = await put(spool, ["y@b.example"])
        await until(lambda: log.grep(qz, "Deferred") and log.grep(qy, "Deferred"), "defer")
        rc, _, _ = await acli(cfgfile, "hold", qy)
        assert rc == 0 and spool.held() == [qy]
        rc, out, _ = await acli(cfgfile, "delete", qz)
        assert rc == 0 and f"{qz}: deleted" in out
        assert log.grep(qz, "status=removed", "by=operator")
        rc, out, _ = await acli(cfgfile, "delete", "--all")
        assert rc == 0 and f"{qy}: deleted" in out
        assert not spool.scan() and not spool.held()
        rc, _, err = await acli(cfgfile, "hold", qz)
        assert rc == 1 and "not in the queue" in err
    finally:
        for g in courier.gates.values():
            g.set()
        await sched.stop()


def test_bare_queue_lists(site: tuple[Path, Spool]) -> None:
    cfgfile, _ = site
    r = cli(cfgfile)
    assert r.returncode == 0 and r.stdout.strip() == "Mail queue is empty"


async def test_closed_pipe_ends_quietly(site: tuple[Path, Spool]) -> None:
    """`queue list --json | head -1`: no traceback, no message, the SIGPIPE status."""
    cfgfile, spool = site
    for _ in range(300):
        await put(spool, ["x@b.example"])
    env = {k: v for k, v in os.environ.items() if k != "AUTHRELAY_CONFIG"}
    for args in (["queue", "list", "--json"], ["queue", "list"], ["queue"]):
        cmd = " ".join([sys.executable, "-m", "authrelay", "-c", str(cfgfile), *args])
        r = subprocess.run(["/bin/bash", "-c", f"set -o pipefail; {cmd} | head -1"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.stderr == "", r.stderr
        assert len(r.stdout.splitlines()) == 1
        # More than a pipe buffer of JSON: the writer meets the closed pipe (141); the
        # text listing may fit in the buffer before head exits (0). Never a traceback.
        assert r.returncode == 141 if "--json" in args else r.returncode in (0, 141)


def test_queue_as_a_user_who_may_not_read_it(site: tuple[Path, Spool]) -> None:
    """One line and EX_NOPERM, not a traceback (the spool is 0700, the daemon's)."""
    from privpython import python_for

    cfgfile, spool = site
    py = python_for("nobody")
    os.chmod(cfgfile.parent, 0o755)
    os.chmod(cfgfile, 0o644)
    for args in (["queue"], ["queue", "show", "2N5AAAAAAAAAAAAAA"], ["queue", "flush"]):
        r = subprocess.run(["runuser", "-u", "nobody", "--", py, "-m", "authrelay", "-c",
                            str(cfgfile), *args], capture_output=True, text=True, timeout=120,
                           cwd="/")
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == 77, (args, r.returncode, r.stderr)
        assert "permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1


async def test_show_and_list_keep_client_values_off_the_terminal(
        site: tuple[Path, Spool]) -> None:
    """What a client wrote (HELO, addresses, header fields) reaches the operator's
    terminal escaped as in the maillog: no escape sequence, no extra line."""
    cfgfile, spool = site
    evil = "x\x1b]0;owned\x07\x1b[2J\r\nState:     ok\u2028"
    env = Envelope(queue_id=new_queue_id(), sender=f'"{evil}"@a.example',
                   recipients=[Recipient(f'"{evil}"@b.example')], helo=evil,
                   client_ip="192.0.2.1")
    inc = spool.begin(env)
    subject = evil.replace("\r\n", "")  # a header line cannot hold CRLF itself
    inc.write(f"From: a@a.example\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
    await inc.commit()
    for args in (("show", env.queue_id), ("list",)):
        r = cli(cfgfile, *args)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
        assert "\u2028" not in r.stdout and "\r" not in r.stdout, r.stdout
        assert "x\\x1b]0;owned\\x07" in r.stdout, r.stdout
    show = cli(cfgfile, "show", env.queue_id).stdout
    assert sum(ln.startswith("State:") for ln in show.splitlines()) == 1, show


async def test_corrupt_files_are_counted_and_listed(site: tuple[Path, Spool]) -> None:
    """After a downgrade an older release set format-2 files aside; files of a newer
    format and damaged ones land there too: `queue list` counts them, `queue corrupt`
    says which is which."""
    cfgfile, spool = site
    intact = await put(spool, ["b@b.example"])
    os.rename(spool.queue_dir / intact, spool.corrupt_dir / intact)  # as a downgrade did
    (spool.corrupt_dir / "2N5NEWERFORMAT001").write_bytes(
        b"AUTHRELAY-SPOOL 9 whatever\nrest")
    (spool.corrupt_dir / "2N5TRUNCATED00001").write_bytes(b"AUTHRELAY-SPOOL 2")
    r = cli(cfgfile, "list")
    assert r.returncode == 0, r.stderr
    assert "Mail queue is empty" in r.stdout
    assert "-- 3 damaged files in" in r.stdout and "authrelay queue corrupt" in r.stdout
    r = cli(cfgfile, "corrupt")
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("2N")}
    assert "intact and readable by this release" in lines[intact]
    assert "written by a newer release" in lines["2N5NEWERFORMAT001"]
    assert "truncated" in lines["2N5TRUNCATED00001"]
    r = cli(cfgfile, "corrupt", "--json")
    assert {x["id"] for x in json.loads(r.stdout)} == {intact, "2N5NEWERFORMAT001",
                                                       "2N5TRUNCATED00001"}


async def test_list_says_why_a_file_is_unreadable(site: tuple[Path, Spool]) -> None:
    # A damaged file still in queue/ (before the scheduler sets it aside) was listed as
    # "unreadable 0 <>" with no reason; the reason was only in --json.
    cfgfile, spool = site
    good = await put(spool, ["x@b.example"])
    bad = await put(spool, ["y@b.example"])
    data = (spool.queue_dir / bad).read_bytes()
    (spool.queue_dir / bad).write_bytes(data[:20] + b"garbage" + data[27:])
    r = cli(cfgfile, "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(bad))
    recs = {rec["id"]: rec for rec in json.loads(cli(cfgfile, "list", "--json").stdout)}
    why = recs[bad]["last_error"]
    assert set(recs[bad]) == set(recs[good])  # one schema: scripts index every record
    assert why and "unreadable" in lines[i]
    assert lines[i + 1].strip() == f"({why})", lines
    assert any(ln.startswith(good) and "active" in ln for ln in lines)


async def test_an_id_set_aside_in_corrupt_is_named_so(site: tuple[Path, Spool]) -> None:
    # The id of a damaged message (read in the maillog's "moved to corrupt/" line) got
    # only "not in the queue" from show, hold, delete and flush: the admin could not
    # tell a typo from a message the spool set aside.
    cfgfile, spool = site
    qid = await put(spool, ["b@b.example"])
    os.rename(spool.queue_dir / qid, spool.corrupt_dir / qid)
    for args in (("show", qid), ("hold", qid), ("delete", qid), ("release", qid)):
        r = cli(cfgfile, *args)
        assert r.returncode == 1, (args, r.stdout)
        assert r.stderr == (f"authrelay: {qid}: not in the queue: set aside in "
                            f"{spool.corrupt_dir} (not delivered; authrelay queue corrupt "
                            "says why)\n"), (args, r.stderr)
    r = cli(cfgfile, "flush", qid)
    assert r.returncode == 69 and f"{qid}: not in the queue: set aside in" in r.stderr
    r = cli(cfgfile, "hold", "2N5NOSUCHMESSAGE1")
    assert r.stderr == "authrelay: 2N5NOSUCHMESSAGE1: not in the queue\n"


async def test_offline_flush_skips_unreadable_and_held_files(site: tuple[Path, Spool]) -> None:
    """With no server, `queue flush` meets a file of a newer spool format (start-up
    recovery leaves those in queue/) or a damaged one: it says so for that file, marks
    the others due and leaves the file as it was (it used to end in a traceback, the
    rest unflushed). A held message is not flushed, as the running scheduler answers."""
    cfgfile, spool = site
    newer = "2N5NEWERFORMAT001"  # sorts before the others: it came first in the loop
    (spool.queue_dir / newer).write_bytes(b"AUTHRELAY-SPOOL 9 whatever\nrest")
    os.chmod(spool.queue_dir / newer, 0o700)  # ready, as a committed file
    good = await put(spool, ["x@b.example"])
    env = spool.load(good)
    env.recipients[0].attempts, env.recipients[0].next_attempt = 1, time.time() + 3600
    spool.save_state(env)
    held = await put(spool, ["y@b.example"])
    spool.hold(held)

    r = cli(cfgfile, "flush")
    assert r.returncode == 69, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{newer}: cannot flush it: spool format version 9" in r.stderr
    assert "1 message marked to go" in r.stderr
    assert spool.load(good).recipients[0].next_attempt == 0
    assert (spool.queue_dir / newer).read_bytes() == b"AUTHRELAY-SPOOL 9 whatever\nrest"

    r = cli(cfgfile, "flush", held)
    assert r.returncode == 69 and "Traceback" not in r.stderr
    assert f"{held}: is held, so it is not delivered" in r.stderr
    assert "0 messages marked to go" in r.stderr
    assert spool.held() == [held]


async def test_flush_of_a_damaged_file_says_it_was_not_flushed(
        site: tuple[Path, Spool]) -> None:
    """`queue flush ID` of a deferred message whose file was damaged since (a disk
    error), with the server running: it said "ID: flushed", exit 0, and the scheduler
    then set the file aside. Now the file is read and checked first: damage is set aside
    in corrupt/ at once (one maillog line), "cannot flush it ... set aside", exit 1; a file
    of a newer spool format is left as it is, said so, exit 1."""
    cfgfile, spool = site
    from authrelay.config import load

    courier = FakeCourier()
    log = ListLog()
    sched = wiring.scheduler(load(str(cfgfile)), spool, courier, log)
    await sched.start()
    try:
        courier.script["d@b.example"] = [TEMP]
        qd = await put(spool, ["d@b.example"])
        await until(lambda: log.grep(qd, "Deferred"), "deferral")
        await until(lambda: not sched.active, "idle")
        data = (spool.queue_dir / qd).read_bytes()
        (spool.queue_dir / qd).write_bytes(data[:-3] + b"XYZ")  # body: checksum fails
        rc, out, err = await acli(cfgfile, "flush", qd)
        assert (rc, out) == (1, ""), (rc, out, err)
        assert err.startswith(f"authrelay: {qd}: cannot flush it: damaged"), err
        assert f"set aside in {spool.corrupt_dir} (not delivered; authrelay queue " \
            "corrupt says why)" in err, err
        assert qd not in spool.scan() and (spool.corrupt_dir / qd).exists()
        assert len(log.grep(qd, "damaged queue file moved to corrupt/")) == 1
        assert len(courier.calls_for("d@b.example")) == 1  # never tried again

        newer = "2N5NEWERFORMAT001"
        (spool.queue_dir / newer).write_bytes(b"AUTHRELAY-SPOOL 9 whatever\nrest")
        os.chmod(spool.queue_dir / newer, 0o700)
        rc, out, err = await acli(cfgfile, "flush", newer)
        assert (rc, out) == (1, ""), (rc, out, err)
        assert err == (f"authrelay: {newer}: cannot flush it: spool format version 9 "
                       "(we read 1, 2) (the file is left as it is)\n"), err
        assert (spool.queue_dir / newer).read_bytes() == b"AUTHRELAY-SPOOL 9 whatever\nrest"
    finally:
        await sched.stop()


async def test_flush_and_delete_all_while_a_delivery_ends(site: tuple[Path, Spool]) -> None:
    """`queue flush` (everything) and `queue delete --all` wait for a message's delivery in
    flight; one that is delivered meanwhile was not named by the operator and is simply
    gone: no "not in the queue" error, exit status 0 (it was 1, as for a wrong id). A
    flush of that one message says it was delivered meanwhile, exit 0 (was "not in the
    queue", 1)."""
    cfgfile, spool = site
    from authrelay.config import load

    courier = FakeCourier()
    sched = wiring.scheduler(load(str(cfgfile)), spool, courier, ListLog())
    await sched.start()
    try:
        for args in (("flush",), ("delete", "--all"), ("flush", "ID")):
            gate = courier.gates["slow.example"] = asyncio.Event()
            qs = await put(spool, ["s@slow.example"])  # delivered when the gate opens
            op = tuple(qs if a == "ID" else a for a in args)
            await until(lambda qs=qs: courier.calls_for("s@slow.example")
                        and qs in sched.active, "in flight")
            parked: list[str] = []
            wait_idle = sched._wait_idle

            async def spy(qid: str, parked: list[str] = parked,
                          wait_idle: Any = wait_idle) -> None:
                parked.append(qid)
                await wait_idle(qid)

            sched._wait_idle = spy  # type: ignore[method-assign]
            task = asyncio.create_task(acli(cfgfile, *op))
            await until(lambda qs=qs, parked=parked: qs in parked, "parked behind it")
            gate.set()
            rc, out, err = await task
            sched._wait_idle = wait_idle  # type: ignore[method-assign]
            assert rc == 0, (op, out, err)
            assert "not in the queue" not in err, err
            if len(op) == 2 and op[0] == "flush":
                assert f"{qs}: delivered (or bounced) meanwhile" in err, err
            assert qs not in spool.scan() and not spool.held()
            courier.calls.clear()
    finally:
        for g in courier.gates.values():
            g.set()
        await sched.stop()


async def test_an_overlong_queue_id_is_not_in_the_queue(site: tuple[Path, Spool]) -> None:
    """An id of thousands of characters (a paste gone wrong) is "not in the queue" for
    every command (exit 1; flush without a server: 69, as for any id): it said
    "control.sock: File name too long" (hold, release, delete, flush: the offline path's
    file name over NAME_MAX) and show printed the spool path."""
    cfgfile, spool = site
    q = await put(spool, ["x@b.example"])
    huge = "A" * 5000
    for op in ("show", "hold", "release", "delete", "flush"):
        r = cli(cfgfile, op, huge)
        assert r.returncode == (69 if op == "flush" else 1), (op, r)  # 69: server down
        assert f"{huge}: not in the queue" in r.stderr, (op, r.stderr[-300:])
        assert "too long" not in r.stderr and "spool" not in r.stderr, (op, r.stderr[-300:])
    assert spool.scan() == [q] and spool.held() == []


async def test_delete_of_an_id_given_twice(site: tuple[Path, Spool]) -> None:
    """`queue delete A B A` (ids pasted from a listing): each deleted once, exit 0; the
    second A used to be reported "not in the queue" with exit status 1."""
    cfgfile, spool = site
    a, b = await put(spool, ["x@b.example"]), await put(spool, ["y@b.example"])
    r = cli(cfgfile, "delete", a, b, a)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{a}: deleted", f"{b}: deleted"]
    assert "not in the queue" not in r.stderr
    assert spool.scan() == []
    r = cli(cfgfile, "delete", a)  # a wrong (here: gone) id still fails
    assert r.returncode == 1 and "not in the queue" in r.stderr


async def test_hold_of_a_held_and_release_of_a_queued_message(
        site: tuple[Path, Spool]) -> None:
    """Nothing to do, so nothing done, said on stderr, exit 0 (the documented contract):
    they used to print "ID: held" / "ID: released", and through a running scheduler
    also log "held" / "released" in the maillog, and a release of a deferred message
    sent it at once, ignoring its back-off, as a flush."""
    cfgfile, spool = site
    q = await put(spool, ["x@b.example"])
    for _ in range(2):  # offline, with no scheduler
        r = cli(cfgfile, "release", q)
        assert (r.returncode, r.stdout) == (0, ""), r
        assert f"{q}: is not held" in r.stderr
        cli(cfgfile, "hold", q)
        r = cli(cfgfile, "hold", q)
        assert (r.returncode, r.stdout) == (0, ""), r
        assert f"{q}: already held" in r.stderr and spool.held() == [q]
        cli(cfgfile, "release", q)

    from authrelay.config import load

    courier = FakeCourier()
    log = ListLog()
    courier.script["d@b.example"] = [TEMP]
    sched = wiring.scheduler(load(str(cfgfile)), spool, courier, log)
    await sched.start()
    try:
        await until(lambda: not spool.scan(), "the first message delivered")
        qd = await put(spool, ["d@b.example"])  # deferred, next try in an hour
        await until(lambda: log.grep(qd, "Deferred") and not sched.active, "deferral")
        rc, out, err = await acli(cfgfile, "release", qd)
        assert (rc, out) == (0, ""), err
        assert f"{qd}: is not held" in err
        rc, out, err = await acli(cfgfile, "hold", qd)
        assert rc == 0 and f"{qd}: held" in out
        rc, out, err = await acli(cfgfile, "hold", qd)
        assert (rc, out) == (0, "") and f"{qd}: already held" in err
        assert len(log.grep(qd, "held")) == 1 and not log.grep(qd, "released")
        rc, out, err = await acli(cfgfile, "release", qd)
        assert rc == 0 and f"{qd}: released" in out
        await until(lambda: len(courier.calls_for("d@b.example")) == 2,
                    "released: tried at once")
    finally:
        await sched.stop()


async def test_list_streams_a_big_queue_in_bounded_memory(
        site: tuple[Path, Spool], monkeypatch: pytest.MonkeyPatch) -> None:
    """`queue list` prints each message as it reads it (postqueue -p streams): the memory
    it takes is one envelope's plus the ids, not every record of the queue at once."""
    import argparse
    import contextlib
    import io
    import tracemalloc

    from authrelay.scheduler import queuecli

    cfgfile, spool = site
    fast = Spool(spool.root, fsync=False)
    rcpts = [f"recipient-{i:03d}@destination-{i % 7}.example" for i in range(40)]
    ids = []
    for _ in range(400):
        env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                       recipients=[Recipient(r) for r in rcpts])
        inc = fast.begin(env)
        inc.write(BODY)
        await inc.commit()
        ids.append(inc.queue_id)
    env = fast.load(ids[-1])
    for r in env.recipients:
        r.attempts, r.last_code = 1, 451
        r.last_reply = "451 4.4.1 " + "connection refused by the destination " * 3
    fast.save_state(env)
    fast.close()

    class Sink(io.TextIOWrapper):
        """stdout to a file (its text not held in traced memory); notes how much memory
        was held when output began and at most while it went on."""
        first: int | None = None
        most = 0

        def write(self, s: str) -> int:
            held = tracemalloc.get_traced_memory()[0]
            if self.first is None:
                self.first = held
            self.most = max(self.most, held)
            return super().write(s)

    for as_json in (False, True):
        path = spool.root / f"out{as_json}"
        with open(path, "wb") as raw, Sink(raw, encoding="utf-8") as out:
            with contextlib.redirect_stdout(out):
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    rc = queuecli.cmd_list(argparse.Namespace(config=str(cfgfile),
                                                              json=as_json))
                finally:
                    tracemalloc.stop()
            first, most = out.first, out.most
        text = path.read_text()
        assert rc == 0
        if as_json:  # the same document json.dump(list, indent=2) wrote
            recs = json.loads(text)
            assert [r["id"] for r in recs] == ids
            assert text == json.dumps(recs, indent=2) + "\n"
            assert recs[-1]["last_error"].startswith("451 4.4.1 connection refused")
        else:
            assert text.startswith("-Queue ID-")
            assert text.count("recipient-039@destination-4.example") == 400
            assert text.rstrip().endswith(f"{400 * len(BODY)} bytes in 400 requests.")
        # Output begins once the first message is read, and goes on holding the ids and
        # one message's record (all the records at once: 6 MB here). Not the peak:
        # loading the config takes more, for a moment, before any message is read.
        assert first is not None and first - base < 500_000, first - base
        assert most - base < 1_000_000, most - base


@pytest.mark.parametrize("op", ["show", "hold", "release", "delete", "flush"])
def test_a_hostile_queue_id_is_not_written_raw_to_the_terminal(
        site: tuple[Path, Spool], op: str) -> None:
    """An id that is no queue id (pasted from elsewhere, or a script's input) came back
    raw in "ID: not in the queue": its terminal escape sequences ran on the admin's
    terminal (ESC [2J cleared it), its line breaks forged further lines. Now escaped as
    the rest of the command's output from outside (the maillog's escaping)."""
    cfgfile, _ = site
    r = cli(cfgfile, op, "\x1b[2J\nQ1: deleted")
    assert r.returncode in (1, 69)
    assert "\x1b" not in r.stderr and "\nQ1: deleted" not in r.stderr
    assert "\\x1b[2J\\x0aQ1: deleted: not in the queue" in r.stderr


@pytest.mark.parametrize("scheduler", [False, True], ids=["offline", "running"])
async def test_a_named_hold_of_a_message_still_in_its_commit_says_so(
        site: tuple[Path, Spool], scheduler: bool) -> None:
    """`queue hold ID` of a message whose commit is under way (ready, in its fsync, its
    writer's lock held: a hung disk) was refused since a061578, and the operator was told
    "ID: not in the queue" (seen: torture run with the spool's filesystem frozen), though
    the message was there and then delivered. It now says it is not in the queue yet; the
    file stays where it is, and once committed (offline) it is held as asked. Both ways:
    the scheduler's control socket, and the files under its lock when none runs."""
    from support.spools import held_commit


    cfgfile, spool = site
    sched = await site_scheduler(cfgfile, spool, start=scheduler)
    env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                   recipients=[Recipient("x@b.example")])
    inc, held = held_commit(spool.queue_dir, env, BODY)
    task = asyncio.ensure_future(inc.commit())
    try:
        assert await asyncio.to_thread(held.entered.wait, 10)
        r = await asyncio.to_thread(cli, cfgfile, "hold", inc.queue_id)
        assert r.returncode == 1, r
        assert ": not in the queue\n" not in r.stderr, r.stderr  # (the plain answer)
        assert f"{inc.queue_id}: {control.ARRIVING}" in r.stderr, r.stderr
        assert spool.held() == []
    finally:
        held.go.set()
        await task
        if scheduler:
            await sched.stop()
    if not scheduler:  # (a running one may have delivered it by now)
        r = await asyncio.to_thread(cli, cfgfile, "hold", inc.queue_id)
        assert r.returncode == 0 and spool.held() == [inc.queue_id], r


def _raw_request(path: Path, data: bytes) -> bytes:
    """One request's bytes to the control socket as they are; the answer line (b"" when
    the scheduler closed without one)."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
        return buf


async def test_a_request_nested_too_deep_is_answered_bad_request(
        site: tuple[Path, Spool]) -> None:
    """A control request of 30,000 nested arrays (json.loads raises RecursionError, no
    ValueError) got no answer: the connection closed and the maillog said 'error=
    authrelay.loop: Unhandled exception in client_connected_cb: RecursionError'. It is a
    bad request like any other, and the scheduler goes on answering."""
    from authrelay.config import load

    cfgfile, spool = site
    sched = wiring.scheduler(load(str(cfgfile)), spool, FakeCourier(), ListLog())
    await sched.start()
    try:
        path = control.control_path(spool)
        got = await asyncio.to_thread(_raw_request, path, b"[" * 30000 + b"\n")
        resp = json.loads(got)
        assert resp["ok"] is False and resp["error"].startswith("bad request: "), resp
        got = await asyncio.to_thread(_raw_request, path, b'{"op": "status"}\n')
        assert json.loads(got) == {"ok": True, "active": []}
    finally:
        await sched.stop()


async def test_an_id_longer_than_a_control_request_is_not_in_the_queue(
        site: tuple[Path, Spool]) -> None:
    """An id of 70,000 characters (an argument may be 128 KiB) against a running
    scheduler: its request was over the control socket's MAX_REQUEST, the scheduler
    closed the connection unanswered and the operator read "the scheduler closed the
    control connection", as for a scheduler in trouble. Now "not in the queue" (exit 1),
    as offline and for any shorter id that is none, and the queue is untouched."""
    from authrelay.config import load

    cfgfile, spool = site
    q = await put(spool, ["x@b.example"])
    assert spool.hold(q)  # (not delivered meanwhile)
    sched = wiring.scheduler(load(str(cfgfile)), spool, FakeCourier(), ListLog())
    await sched.start()
    try:
        huge = "A" * (control.MAX_REQUEST + 4000)
        for op in ("hold", "release", "delete", "flush"):
            rc, _, err = await acli(cfgfile, op, huge)
            assert rc == 1, (op, err[-300:])
            assert err.endswith(f"{huge}: not in the queue\n"), (op, err[-300:])
            assert "closed" not in err, (op, err[-300:])
        assert spool.held() == [q] and spool.scan() == []
    finally:
        await sched.stop()


async def test_a_hold_and_a_delete_parked_behind_one_delivery_take_turns(
        site: tuple[Path, Spool]) -> None:
    """Two changes of one message waiting for its delivery to end (two admins; or
    containment's hold and an admin's delete) woke together and moved its files at once,
    in two threads: the delete unlinked the body while the hold was moving it and its
    state file (an orphan state in hold/, a "held" line after "removed", a gauge
    counting a message that is gone). They now take turns: the delete starts once the
    hold has ended, and deletes the held message."""
    import threading

    from authrelay.config import load

    cfgfile, spool = site
    courier = FakeCourier()
    sched = wiring.scheduler(load(str(cfgfile)), spool, courier, ListLog())
    await sched.start()
    gate = courier.gates["slow.example"] = asyncio.Event()
    courier.script["s@slow.example"] = [TEMP]  # deferred: the message stays
    removing, overlap = threading.Event(), []
    real_hold, real_remove = sched.spool.hold, sched.spool.remove

    def hold(qid: str) -> bool:  # (a pool thread)
        # the delete's remove, if it starts while this hold is under way
        overlap.append(removing.wait(5))
        return real_hold(qid)

    def remove(qid: str) -> None:
        removing.set()
        real_remove(qid)

    sched.spool.hold = hold  # type: ignore[method-assign]
    sched.spool.remove = remove  # type: ignore[method-assign]
    parked = parked_requests(sched)
    try:
        qs = await put(spool, ["s@slow.example"])
        await until(lambda: qs in sched.active, "in flight")
        held = asyncio.create_task(acli(cfgfile, "hold", qs))
        await until(lambda: len(parked) == 1, "the hold parked behind the delivery")
        deleted = asyncio.create_task(acli(cfgfile, "delete", qs))
        await until(lambda: len(parked) == 2, "the delete parked behind it too")
        gate.set()
        (rc1, out1, err1), (rc2, out2, err2) = await held, await deleted
    finally:
        gate.set()
        await sched.stop()
    assert overlap == [False], "the delete ran while the hold moved the files"
    assert rc1 == 0 and f"{qs}: held" in out1, (out1, err1)
    assert rc2 == 0 and f"{qs}: deleted" in out2, (out2, err2)
    assert spool.scan() == [] and spool.held() == []
    assert sorted(p.name for p in spool.hold_dir.iterdir()) == []


def killed_receive(spool: Spool) -> str:
    """A receive killed (SIGKILL) in DATA: a process spilled a message past SPILL into
    its unready queue file, locked, and was killed before its commit; the file is then
    made 60 s old (past store.UNFINISHED_AGE: a dead receive's, as found later). Its id."""
    import signal

    qid = new_queue_id()
    code = (
        "import os, sys, time\n"
        "from authrelay.spool.envelope import Envelope, Recipient\n"
        "from authrelay.spool.store import Spool\n"
        "from authrelay.spool.writer import SPILL\n"
        f"s = Spool({str(spool.root)!r})\n"
        f"inc = s.begin(Envelope(queue_id={qid!r}, sender='a@a.example',\n"
        "                        recipients=[Recipient('x@b.example')]))\n"
        "inc.write(b'Subject: x\\r\\n\\r\\n' + b'x' * (SPILL + 10))\n"
        f"while not os.path.exists(s.queue_dir / {qid!r}): time.sleep(0.01)\n"
        "print('spilled', flush=True)\n"
        "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "spilled\n"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    path = spool.queue_dir / qid
    assert not path.stat().st_mode & 0o100  # unready: its client never had a reply
    old = time.time() - 60
    os.utime(path, (old, old))
    return qid


@pytest.mark.parametrize("scheduler", [False, True], ids=["offline", "running"])
async def test_a_named_hold_never_takes_a_killed_receives_file(
        site: tuple[Path, Spool], scheduler: bool) -> None:
    """`queue hold ID` of a receive killed in DATA (its id from the maillog's from= line
    or the spool file's name) moved its unready file to hold/ ("ID: held", exit 0): a
    message never acknowledged was kept there (out of the sweep's reach, out of `queue
    list`), and a release put it back. Only ready files are held: it is "not in the
    queue", stays in queue/, and the sweep of dead receives removes it."""

    cfgfile, spool = site
    sched = await site_scheduler(cfgfile, spool, start=scheduler)
    try:
        qid = await asyncio.to_thread(killed_receive, spool)
        rc, out, err = await acli(cfgfile, "hold", qid)
        assert (rc, out, err) == (1, "", f"authrelay: {qid}: not in the queue\n")
        assert not (spool.hold_dir / qid).exists()
        assert await asyncio.to_thread(spool.sweep_unfinished) <= 1
        assert not (spool.queue_dir / qid).exists() and spool.held() == []
    finally:
        if scheduler:
            await sched.stop()


@pytest.mark.parametrize("scheduler", [False, True], ids=["offline", "running"])
@pytest.mark.parametrize("stage", ["in-data", "in-commit"])
async def test_every_command_says_a_message_still_arriving_is_not_in_the_queue_yet(
        site: tuple[Path, Spool], scheduler: bool, stage: str) -> None:
    """A message still being received (in DATA: its file spilled, unready, its writer's
    lock held; or in its commit: ready, in its fsync, still locked) was "not in the queue"
    to show, delete, flush and release, but "its commit is still under way" to hold.
    Every named command now says the one thing, `ID: not in the queue yet: ...` (exit 1),
    and leaves the file alone; once committed it is in the queue."""
    from support.spools import held_commit

    from authrelay.spool.writer import SPILL

    cfgfile, spool = site
    sched = await site_scheduler(cfgfile, spool, start=scheduler)
    env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                   recipients=[Recipient("x@b.example")])
    qid = env.queue_id
    if stage == "in-data":
        inc = spool.begin(env)
        inc.write(BODY + b"x" * (SPILL + 10))
        await until(lambda: (spool.queue_dir / qid).exists(), "the file spilled")
        held = None
    else:
        inc, held = held_commit(spool.queue_dir, env, BODY)
        task = asyncio.ensure_future(inc.commit())
        assert await asyncio.to_thread(held.entered.wait, 10)
    try:
        for op in ("show", "hold", "release", "delete", "flush"):
            rc, out, err = await acli(cfgfile, op, qid)
            down = op == "flush" and not scheduler  # "mail system is down" (69), as always
            assert rc == (69 if down else 1) and out == "", (op, rc, out, err)
            assert err.startswith(f"authrelay: {qid}: {control.ARRIVING}\n"), (op, err)
        assert (spool.queue_dir / qid).exists() and spool.held() == []
    finally:
        if held is None:
            inc.abort()
        else:
            held.go.set()
            await task
        if scheduler:
            await sched.stop()


async def test_a_flush_during_a_shutdown_says_the_mail_system_is_stopping(
        site: tuple[Path, Spool]) -> None:
    """A flush reaching the scheduler while it stops (on a control connection opened
    before; the stop waits for a delivery under way) was answered "flushed": but nothing
    is tried again before the next start, and a flush lives in memory only, so the
    deferred message then waited out its back-off. It is answered "mail system is
    stopping" (not ok), and nothing is marked."""
    import socket

    from authrelay.config import load

    cfgfile, spool = site
    courier = FakeCourier()
    sched = wiring.scheduler(load(str(cfgfile)), spool, courier, ListLog())
    await sched.start()
    courier.script["d@later.example"] = [TEMP]
    qd = await put(spool, ["d@later.example"])
    await until(lambda: qd not in sched.active and spool.load(qd).recipients[0].attempts,
                "deferred")
    gate = courier.gates["slow.example"] = asyncio.Event()
    qs = await put(spool, ["s@slow.example"])
    await until(lambda: qs in sched.active, "in flight")
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(30)
    conn.connect(str(control.control_path(spool)))
    stopping = asyncio.create_task(sched.stop())
    try:
        await until(lambda: sched._stopping, "stopping")
        await asyncio.to_thread(conn.sendall, json.dumps({"op": "flush"}).encode() + b"\n")
        answer = json.loads(await asyncio.to_thread(conn.makefile("rb").readline))
    finally:
        conn.close()
        gate.set()
        await stopping
    assert answer.get("ok") is False, answer  # (was: ok, "done": [qd, ...])
    assert "mail system is stopping" in answer["error"], answer


async def test_an_offline_delete_cut_by_an_error_still_records_what_it_removed(
        site: tuple[Path, Spool]) -> None:
    """An offline `queue delete` records the ids it removed in the in-flight journal
    (`{"x": ID}`: a success notice a killed run committed before its `{"s": N}` line is
    not queued again at the start, 83cc6f6), but only after its whole loop: an unlink
    that failed with another error than "no such file" (here an immutable file: EPERM;
    an EIO, a read-only remount, a Ctrl-C alike) ended the command with those already
    removed unrecorded. Now each one removed is recorded whatever ends the loop."""
    cfgfile, spool = site
    first = await put(spool, ["x@b.example"])
    stuck = await put(spool, ["y@b.example"])
    assert spool.hold(stuck)  # (delete --all takes queue/ first, then hold/)
    held = spool.hold_dir / stuck
    subprocess.run(["chattr", "+i", str(held)], check=True)
    try:
        r = cli(cfgfile, "delete", "--all")
    finally:
        subprocess.run(["chattr", "-i", str(held)], check=True)
    assert r.returncode == 77 and "permission denied" in r.stderr, r
    assert spool.scan() == [] and spool.held() == [stuck]
    journal = InflightJournal(spool.root)
    journal.leftovers()
    assert journal.deleted == {first}
