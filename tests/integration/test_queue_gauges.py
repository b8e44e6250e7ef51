"""The queue gauges of /metrics come from counts kept as the queue changes, never from
reading the queue's directories at scrape time.

A real Scheduler on a real spool (in-memory courier, as test_scheduler.py), a real
/metrics listener scraped over HTTP. A scrape that stat'ed every queue file held the GIL
for 0.1-0.9 s with 20,000 queued and stalled the master's event loop (its deliveries);
here the spool's directory reads are seen through the interpreter's audit hook (PEP 578)
while a scrape runs, and must be none. The figures must still be what `authrelay queue`
shows after deliveries, deferrals, bounces, holds, releases, deletions, a quarantine and
a restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ports import free_port
from support.wait import until
from test_metrics import scrape, val
from test_scheduler import OK, PERM, TEMP, Rig, put

from authrelay import metrics as metrics_mod
from authrelay.config import from_dict
from authrelay.scheduler import control
from authrelay.scheduler.scheduler import Scheduler

STATES = ("incoming", "active", "deferred", "held", "corrupt")

# The directory reads of the spool, recorded only while `_watching` is set (an audit hook
# cannot be removed: it stays, idle, for the rest of the session).
_watching = threading.Event()
_reads: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching.is_set() and event in ("os.scandir", "os.listdir"):
        _reads.append(os.fsdecode(args[0]) if args and args[0] is not None else ".")


sys.addaudithook(_audit)


@pytest.fixture
def multiproc_env() -> Iterator[None]:
    """Metrics switch prometheus-client to multiprocess values (an environment variable
    and its value class): put both back for the tests that run after."""
    old = os.environ.get(metrics_mod.ENV)
    yield
    if old is None:
        os.environ.pop(metrics_mod.ENV, None)
    else:
        os.environ[metrics_mod.ENV] = old
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class Served:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.port = free_port()
        self.cfg = from_dict({**_cfg_dict(rig), "metrics": {"address": f"127.0.0.1:{self.port}"}})
        metrics_mod.prepare(self.cfg)
        self.metrics = metrics_mod.Metrics(self.cfg)

    async def start(self, **kw: Any) -> Scheduler:
        sched = await self.rig.start(**kw)
        self.metrics.start(scheduler=sched, spool=self.rig.spool)
        return sched

    async def stop(self) -> None:
        self.metrics.stop()
        await self.rig.stop()

    async def gauges(self) -> dict[str, float]:
        """One scrape over HTTP; the spool's directories read meanwhile are recorded."""
        _watching.set()
        try:
            m = await asyncio.to_thread(scrape, self.port)
        finally:
            _watching.clear()
        return {s: val(m, "authrelay_queue_messages", state=s) for s in STATES}

    def truth(self) -> dict[str, float]:
        """What `authrelay queue list` and `queue corrupt` count: the files themselves."""
        spool = self.rig.spool
        corrupt = [p for p in spool.corrupt_dir.iterdir() if not p.name.endswith(".state")]
        return {"queued": len(spool.scan()), "held": len(spool.held()),
                "corrupt": len(corrupt)}

    async def assert_counts_match(self) -> None:
        sched = self.rig.sched
        assert sched is not None
        await until(lambda: not sched.active, "the scheduler idle")
        g = await self.gauges()
        assert {"queued": g["active"] + g["deferred"], "held": g["held"],
                "corrupt": g["corrupt"]} == self.truth()
        assert g["incoming"] == 0


async def _control(rig: Rig, req: dict[str, Any]) -> dict[str, Any]:
    """One request on the control socket, as `authrelay queue` sends it."""
    return await asyncio.to_thread(control.request, control.control_path(rig.spool), req)


def _cfg_dict(rig: Rig) -> dict[str, Any]:
    return {"hostname": "relay.test", "state_dir": str(rig.cfg.state_path),
            "shutdown_timeout": 5,
            "delivery": {"retry": ["1h"], "max_queue_lifetime": "5d", "delay_warning": 0}}


@pytest.fixture
async def served(multiproc_env: None) -> AsyncIterator[Served]:
    d = Path(tempfile.mkdtemp(prefix="arg", dir="/tmp"))  # short: unix socket paths
    rig = Rig(d)
    s = Served(rig)
    rig.cfg = s.cfg
    yield s
    await s.stop()
    rig.spool.close()
    shutil.rmtree(d, ignore_errors=True)


async def test_a_scrape_reads_no_queue_directory(served: Served) -> None:
    rig = served.rig
    for _ in range(30):
        await put(rig.spool, ["later@b.example"])
    rig.courier.script.update({"later@b.example": [TEMP] * 30})
    sched = await served.start(rescan_interval=3600)
    await until(lambda: len(rig.courier.calls) == 30 and not sched.active,
                "every message tried once")
    _reads.clear()
    g = await served.gauges()
    assert g["deferred"] == 30
    spool_root = str(rig.spool.root)
    assert [p for p in _reads if p.startswith(spool_root)] == []


async def test_the_gauges_follow_the_queue_through_every_change(served: Served) -> None:
    rig = served.rig
    c = rig.courier
    c.script.update({"later@b.example": [TEMP] * 10, "gone@b.example": [PERM],
                     "ok@b.example": [OK]})
    held_before = await put(rig.spool, ["ok@b.example"])
    rig.spool.hold(held_before)  # held while no scheduler ran: found by the start's scan
    (rig.spool.corrupt_dir / "OLDDAMAGE").write_bytes(b"set aside by an earlier run")
    await put(rig.spool, ["later@b.example"])  # queued before the start
    await served.start(rescan_interval=3600)
    await served.assert_counts_match()
    # Accepted while running: one delivered, one bounced (its DSN to the sender
    # delivered too), two deferred.
    await put(rig.spool, ["ok@b.example"])
    await put(rig.spool, ["gone@b.example"])
    d1 = await put(rig.spool, ["later@b.example"])
    await put(rig.spool, ["later@b.example"])
    await until(lambda: len(rig.spool.scan()) == 3, "delivered and bounced gone")
    await served.assert_counts_match()
    # Held, released, deleted through the control socket as the CLI does.
    assert (await _control(rig, {"op": "hold", "id": d1}))["done"] == [d1]
    await served.assert_counts_match()
    assert (await _control(rig, {"op": "release", "id": held_before}))["done"]
    await until(lambda: held_before not in rig.spool.scan(), "released and delivered")
    await served.assert_counts_match()
    assert (await _control(rig, {"op": "delete", "id": d1}))["done"] == [d1]
    await served.assert_counts_match()
    # A damaged file found at its flush: set aside in corrupt/.
    bad = rig.spool.scan()[0]
    (rig.spool.queue_dir / bad).write_bytes(b"AR2 damaged\n")
    os.chmod(rig.spool.queue_dir / bad, 0o700)
    resp = await _control(rig, {"op": "flush", "id": bad})
    assert resp["failed"]
    await served.assert_counts_match()
    # A restart counts the same.
    await served.stop()
    await served.start(rescan_interval=3600)
    await served.assert_counts_match()
