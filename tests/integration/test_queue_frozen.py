"""`authrelay queue` with the spool's filesystem frozen (fsfreeze: a backup's, a VM
snapshot's; support.tmpfs.ext4 + frozen): reads answer, changes answer at once with
"spool not writable", never wait for the thaw."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import tmpfs
from support.maillog import ListLog
from test_queuecli import BODY, acli
from test_scheduler import FakeCourier

from authrelay import wiring
from authrelay.config import load
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool
from authrelay.spool.writable import NOT_WRITABLE

pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture
def frozen_site() -> Iterator[tuple[Path, Spool, Path]]:
    base = Path(tempfile.mkdtemp(prefix="arf", dir="/tmp"))
    with tmpfs.ext4(base / "mnt") as mnt:
        cfgfile = base / "authrelay.toml"
        cfgfile.write_text(f'hostname = "relay.test"\nstate_dir = "{mnt}"\n'
                           '[delivery]\nretry = ["1h"]\ndelay_warning = 0\n')
        spool = Spool(mnt / "spool")
        spool.ensure_dirs()
        yield cfgfile, spool, mnt
        spool.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("scheduler", [False, True], ids=["offline", "running"])
async def test_with_the_spool_frozen_reads_answer_and_changes_say_not_writable(
        frozen_site: tuple[Path, Spool, Path], scheduler: bool) -> None:
    """`queue hold/release/delete ID` waited for the thaw (the scheduler's move, or the
    CLI's own, blocked on the frozen filesystem; seen: a hold answered 'held' only after
    fsfreeze -u). Each now answers while frozen, exit 1, `spool not writable (filesystem
    frozen?)`, and changed nothing; `list` and `show` (reads) answer as ever; after the
    thaw the hold is done."""
    cfgfile, spool, mnt = frozen_site
    env = Envelope(queue_id=new_queue_id(), sender="a@a.example",
                   recipients=[Recipient("x@b.example")])
    inc = spool.begin(env)
    inc.write(BODY)
    await inc.commit()
    qid = env.queue_id
    assert spool.hold(qid)  # (not delivered meanwhile)
    sched = wiring.scheduler(load(str(cfgfile)), spool, FakeCourier(), ListLog())
    if scheduler:
        await sched.start()
    try:
        with tmpfs.frozen(mnt, limit=90) as thawed:
            for op in ("release", "delete"):
                rc, out, err = await acli(cfgfile, op, qid)
                assert not thawed.is_set(), f"{op} answered only after the thaw"
                assert (rc, out, err) == (1, "", f"authrelay: {NOT_WRITABLE}\n"), op
            rc, out, err = await acli(cfgfile, "list")
            assert rc == 0 and qid in out and "held" in out, (out, err)
            rc, out, err = await acli(cfgfile, "show", qid)
            assert rc == 0 and f"Queue ID:  {qid}" in out, (out, err)
            assert not thawed.is_set()
        assert spool.held() == [qid] and spool.scan() == []
        rc, out, err = await acli(cfgfile, "delete", qid)
        assert (rc, out) == (0, f"{qid}: deleted\n"), err
    finally:
        if scheduler:
            await sched.stop()
