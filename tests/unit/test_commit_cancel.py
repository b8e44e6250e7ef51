"""A cancelled commit (the daemon's stop cancels sessions still running after its drain
time) never abandons the commit thread: the thread may be signing or writing through the
queue file's descriptor, which the cleanup used to close under it, and the next file the
process opened took that number. Now the commit is waited for; a message it made durable
is kept, announced and logged, and the cancellation is raised after it."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from support.maillog import ListLog

from authrelay.config import from_dict
from authrelay.spool import writer as writer_mod
from authrelay.spool.envelope import Envelope, Recipient, new_queue_id
from authrelay.spool.store import Spool
from authrelay.spool.submit import Submitter
from authrelay.spool.writer import READY_MODE, Incoming

SMALL = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody line\r\n"
BIG = SMALL + b"".join(b"line %07d of a big message\r\n" % i
                       for i in range(writer_mod.SPILL // 20))
SIG = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; b=abc\r\n"


@pytest.fixture
def spool() -> Iterator[Spool]:
    d = tempfile.mkdtemp(prefix="arc", dir="/tmp")
    s = Spool(Path(d) / "spool", fsync=False)
    s.ensure_dirs()
    yield s
    s.close()
    shutil.rmtree(d, ignore_errors=True)


def _env() -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender="a@example.org",
                    recipients=[Recipient(address="b@example.net")])


class HeldSigner:
    """A MessageSigner that holds the commit thread until released."""

    def __init__(self, result: bytes | Exception = SIG) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.result = result

    def sign_stream(self, chunks: Iterable[bytes]) -> bytes | None:
        for _ in chunks:  # a streamed message is read back through the descriptor
            pass
        self.entered.set()
        assert self.release.wait(10)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def skip(self, reason: str) -> None:
        pass


async def _held_commit(inc: Incoming, signer: HeldSigner) -> asyncio.Task[None]:
    inc.signer = signer
    task = asyncio.get_running_loop().create_task(inc.commit())
    assert await asyncio.to_thread(signer.entered.wait, 10)
    return task


async def _cancel_then_open_victim(task: asyncio.Task[None], path: Path) -> int:
    """Cancel the commit while its thread is held, let the loop run the cancellation,
    then open a file the way a concurrent session would (the lowest free descriptor)."""
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"V" * 300)
    return fd


@pytest.mark.parametrize("data", [SMALL, BIG], ids=["in-memory", "streamed"])
async def test_cancelled_commit_is_finished_kept_and_announced(spool: Spool, data: bytes,
                                                               tmp_path: Path) -> None:
    announced: list[str] = []
    inc = Incoming(spool.queue_dir, _env(), fsync=False, dir_sync=None,
                   notify=announced.append)
    inc.write(data)
    signer = HeldSigner()
    task = await _held_commit(inc, signer)
    victim = _cancel_then_open_victim(task, tmp_path / "victim")
    vfd = await victim
    assert not task.done()  # waits for the thread, whatever its caller wants
    signer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        os.lseek(vfd, 0, os.SEEK_SET)
        assert os.read(vfd, 1000) == b"V" * 300  # nothing written through a reused fd
        assert os.fstat(vfd).st_mode & 0o777 == 0o600
    finally:
        os.close(vfd)
    assert inc.committed and announced == [inc.queue_id]
    path = spool.queue_dir / inc.queue_id
    assert os.stat(path).st_mode & 0o777 == READY_MODE
    spool.verify(inc.queue_id)
    body, off = spool.body_path(inc.queue_id)
    assert body.read_bytes()[off:] == SIG + data


async def test_cancelled_commit_that_fails_leaves_nothing(spool: Spool) -> None:
    announced: list[str] = []
    inc = Incoming(spool.queue_dir, _env(), fsync=False, dir_sync=None,
                   notify=announced.append)
    inc.write(BIG)
    real = os.fchmod

    def no_space(fd: int, mode: int) -> None:
        raise OSError(28, "No space left on device")

    signer = HeldSigner()
    task = await _held_commit(inc, signer)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    os.fchmod = no_space  # the ready mark, after the signer, fails
    try:
        signer.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        os.fchmod = real
    assert not inc.committed and announced == []
    assert list(spool.queue_dir.iterdir()) == []


async def test_cancelled_draft_that_committed_is_logged(spool: Spool,
                                                        tmp_path: Path) -> None:
    log = ListLog()
    cfg = from_dict({"hostname": "relay.test", "state_dir": str(tmp_path)})
    signer = HeldSigner()

    class Bind:
        def bind(self, queue_id: str, owner: object = None, *,
                 crlf_only: bool = False) -> HeldSigner:
            return signer

        def reload(self, cfg: object) -> None:
            pass

    sub = Submitter(spool, cfg, signer=Bind(), maillog=log)
    draft = sub.begin(_env(), sign=True)
    draft.write(SMALL)
    task = asyncio.get_running_loop().create_task(draft.commit())
    assert await asyncio.to_thread(signer.entered.wait, 10)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    signer.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    qid = draft.queue_id
    assert log.grep(f"{qid}: from=<a@example.org>")  # kept, so logged like any other
    spool.verify(qid)
